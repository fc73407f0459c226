//! `lazyblk trace`: what a running device has read, as a prefetch list (chunks in first-access
//! order), a block list (`--blocks`) or a prefetch pack read back from the device (`--pack`).

use crate::daemon;
use crate::device::record_of;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Duration;

/// Run `lazyblk trace` for device `id`, writing `output`.
pub fn run(
    state: &Path,
    id: u32,
    output: &Path,
    trace_only: bool,
    blocks: bool,
    pack: bool,
) -> Result<()> {
    if pack {
        trace_pack(state, id, output)
    } else {
        trace_list(state, id, output, trace_only, blocks)
    }
}

/// The record and image of lazyblk device `id`, for the `trace` commands.
fn traced_device(state: &Path, id: u32) -> Result<(daemon::Record, lazyblk_format::ImageId)> {
    lazyblk_ublk::device_state(id)?;
    let rec =
        record_of(state, id).with_context(|| format!("device {id} is not a lazyblk device"))?;
    let image = lazyblk_format::ImageId::parse(&rec.image)?;
    Ok((rec, image))
}

/// A list the daemon of device `id` keeps (`trace`, `published`, `blocks`).
fn ask_list(state: &Path, id: u32, what: &str) -> Result<Vec<u32>> {
    serde_json::from_str(&daemon::control(state, id, what, Duration::from_secs(30))?)
        .with_context(|| format!("bad {what} answer from the daemon"))
}

/// A prefetch list (chunks in first-access order, then the published list unless
/// `trace_only`), or with `blocks` the block list, of device `id` into `output`.
fn trace_list(state: &Path, id: u32, output: &Path, trace_only: bool, blocks: bool) -> Result<()> {
    let (_, image) = traced_device(state, id)?;
    let ask = |what: &str| ask_list(state, id, what);
    let write = |bytes: Vec<u8>| {
        std::fs::write(output, bytes).with_context(|| format!("{}", output.display()))
    };
    if blocks {
        let list = lazyblk_format::BlockList {
            image,
            blocks: ask("blocks")?,
        };
        write(list.encode())?;
        println!(
            "{} blocks of 4 KiB read since add ({} KiB), written to {} (rebuild the image with `lazyblk build --pack-blocks` to store them in its pack)",
            list.blocks.len(),
            4 * list.blocks.len(),
            output.display()
        );
        return Ok(());
    }
    let mut chunks = ask("trace")?;
    let traced = chunks.len();
    if !trace_only {
        // The published list follows the trace, so the new list does not lose what the old
        // one had.
        let seen: std::collections::HashSet<u32> = chunks.iter().copied().collect();
        let published = ask("published")?;
        chunks.extend(published.into_iter().filter(|c| !seen.contains(c)));
    }
    let list = lazyblk_format::PrefetchList { image, chunks };
    write(list.encode())?;
    println!(
        "{traced} chunks in first-access order, {} from the published list, written to {} (publish it next to the manifest as `prefetch`)",
        list.chunks.len() - traced,
        output.display()
    );
    Ok(())
}

/// One 4 KiB buffer aligned for O_DIRECT.
#[repr(C, align(4096))]
struct AlignedBlock([u8; 4096]);

/// A prefetch pack of device `id` into `output` (and `<output>.blob`): the blocks read since
/// `add` and the metadata blocks, read back from the device.
fn trace_pack(state: &Path, id: u32, output: &Path) -> Result<()> {
    let (rec, image) = traced_device(state, id)?;
    if rec.cow.is_some() {
        bail!("device {id} is writable: its blocks may differ from the image's, so they cannot go into a prefetch pack (trace a read-only device, or use --blocks)");
    }
    let manifest = cached_manifest(&rec, image)?;
    let blocks: Vec<u64> = ask_list(state, id, "blocks")?
        .into_iter()
        .map(u64::from)
        .collect();
    // The blocks are read back through the device, so they are the image's verified bytes
    // (whatever is missing is fetched, as for any read). With O_DIRECT: buffered reads would
    // make the kernel read ahead around every block, fetching chunks nobody read and adding
    // their blocks to the device's block trace.
    let dev = open_direct(id)?;
    let mut block = Box::new(AlignedBlock([0; 4096]));
    let mut read = |at: u64, buf: &mut [u8]| {
        use std::os::unix::fs::FileExt;
        // Whole 4 KiB blocks at 4 KiB offsets (the device's size is a multiple of them); the
        // image's last block may be short.
        dev.read_exact_at(&mut block.0, at)?;
        buf.copy_from_slice(&block.0[..buf.len()]);
        Ok(())
    };
    let s = lazyblk_builder::build_prefetch_pack(
        image,
        &manifest,
        &blocks,
        &mut read,
        output,
        lazyblk_builder::BuildOptions::default().level,
    )?;
    // An extending pack leaves out the metadata pack's blocks: a store fetches that pack first.
    let after = match (&manifest.pack, s.pack.extends) {
        (Some(m), true) => format!(
            "; fetched after the image's metadata pack ({} blocks, {} bytes)",
            m.blocks.len(),
            m.stored_bytes()
        ),
        _ => String::new(),
    };
    println!(
        "{} blocks of 4 KiB ({} read since add) in {} frames, {} bytes, written to {} and {}{after}",
        s.pack.pack.blocks.len(),
        blocks.len(),
        s.pack.pack.frames.len(),
        s.pack.blob_size,
        s.pack_path.display(),
        s.blob_path.display()
    );
    println!(
        "publish both next to the manifest (as `{}` and `{}`); pin with `add --pack-digest {}`",
        lazyblk_format::PACK_FILE,
        s.pack.blob_name,
        s.id
    );
    println!("digest     {}", s.id);
    Ok(())
}

/// The manifest of `image` in the cache of device record `rec`, checked against its digest.
fn cached_manifest(
    rec: &daemon::Record,
    image: lazyblk_format::ImageId,
) -> Result<lazyblk_format::Manifest> {
    let mpath = rec.cache_root.join(image.hex()).join("manifest");
    let mbytes = std::fs::read(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
    if lazyblk_format::ImageId::of(&mbytes) != image {
        bail!("{} is not the manifest of {image}", mpath.display());
    }
    Ok(lazyblk_format::Manifest::decode(&mbytes)?)
}

/// The block device of device `id`, opened for O_DIRECT reads.
fn open_direct(id: u32) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let bdev = format!("/dev/ublkb{id}");
    std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&bdev)
        .with_context(|| format!("opening {bdev}"))
}
