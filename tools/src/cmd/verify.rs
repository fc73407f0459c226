//! `lazyblk verify-cache`: check, without repairing anything, that every chunk the bitmap of a
//! cache directory claims present holds the verified bytes of the image.

use anyhow::{bail, Context, Result};
use lazyblk_chunkstore::bitmap::{self, Trust};
use lazyblk_chunkstore::{CacheLayout, BLOCK_SIZE};
use lazyblk_format::ChunkRef;
use lazyblk_format::{ImageId, Manifest};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Most bad chunks listed one per line.
const LIST_BAD: usize = 20;

/// Read-only check of the cache directory of one image (`<cache root>/<sha256 hex>`). Prints one
/// summary line; fails when a chunk the bitmap claims present is wrong, or when the manifest,
/// bitmap or data file cannot be what the store wrote.
pub fn verify_cache(dir: &Path) -> Result<()> {
    let mpath = dir.join("manifest");
    let mbytes = std::fs::read(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
    let id = ImageId::of(&mbytes);
    if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
        if name.len() == 64 && name != id.hex() {
            bail!(
                "{} is the manifest of {id}, not of the image this directory is named after",
                mpath.display()
            );
        }
    }
    let m = Manifest::decode(&mbytes).with_context(|| format!("decoding {}", mpath.display()))?;
    // With a prefetch pack the cache kept, its frames stand in for the metadata pack's.
    let layout = CacheLayout::of(dir, id, &m);
    let prefetch_pack = layout.bitmap_id != id;
    let m = layout.manifest;
    let n = m.chunk_count();
    let frames = m.frame_count();
    let bpath = dir.join("bitmap");
    let bbytes = match std::fs::read(&bpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "verify-cache {}: {id}: no bitmap, nothing claimed present",
                dir.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", bpath.display())),
    };
    // A bit per chunk, then a bit per pack frame.
    let decoded = bitmap::decode(&bbytes, &layout.bitmap_id, m.unit_count()).map_err(|why| {
        anyhow::anyhow!(
            "bitmap {} is unusable (the store would discard the cache): {why}",
            bpath.display()
        )
    })?;
    let dpath = dir.join("data");
    let data = File::open(&dpath).with_context(|| format!("opening {}", dpath.display()))?;
    let data_len = data.metadata()?.len();
    let want_len = m.image_size.div_ceil(u64::from(BLOCK_SIZE)) * u64::from(BLOCK_SIZE);

    let mut buf = vec![0u8; m.chunk_size as usize];
    let (mut claimed, mut zero, mut good) = (0u64, 0u64, 0u64);
    let (mut frames_claimed, mut frames_good) = (0u64, 0u64);
    let mut bad: Vec<(String, String)> = Vec::new();
    for i in decoded.bits.iter_ones().map(|i| i as u64) {
        if i >= n {
            frames_claimed += 1;
            let f = i - n;
            if lazyblk_chunkstore::frame_intact(&m, &data, f as usize) {
                frames_good += 1;
            } else {
                bad.push((
                    format!("pack frame {f}"),
                    "its blocks do not hash to the pack's digest".into(),
                ));
            }
            continue;
        }
        claimed += 1;
        let len = m.chunk_len(i) as usize;
        let at = m.chunk_offset(i);
        if let Err(e) = data.read_exact_at(&mut buf[..len], at) {
            bad.push((
                format!("chunk {i}"),
                format!("cannot read {len} bytes at {at}: {e}"),
            ));
            continue;
        }
        let problem = match m.chunk(i) {
            ChunkRef::Zero => {
                zero += 1;
                buf[..len]
                    .iter()
                    .any(|&b| b != 0)
                    .then(|| "a zero chunk that is not all zeros".to_string())
            }
            ChunkRef::Stored(e) => {
                let got = blake3::hash(&buf[..len]);
                (*got.as_bytes() != e.digest)
                    .then(|| format!("blake3 {} instead of the manifest's", got.to_hex()))
            }
        };
        match problem {
            Some(p) => bad.push((format!("chunk {i}"), p)),
            None => good += 1,
        }
    }
    let trust = match decoded.trust {
        Trust::Clean => "closed cleanly",
        Trust::Verify => "not closed cleanly",
    };
    let pack = if frames > 0 {
        let which = if prefetch_pack {
            "prefetch"
        } else {
            "metadata"
        };
        format!(
            ", {which} pack: {frames_claimed} of {frames} frames claimed, {frames_good} verified"
        )
    } else {
        String::new()
    };
    println!(
        "verify-cache {}: {id}: {n} chunks of {} KiB, bitmap {trust}: {claimed} claimed present ({zero} zero), {good} verified{pack}, {} bad",
        dir.display(),
        m.chunk_size / 1024,
        bad.len()
    );
    for (what, why) in bad.iter().take(LIST_BAD) {
        println!("bad {what}: {why}");
    }
    if !bad.is_empty() {
        bail!(
            "{} of the {} chunks and pack frames the bitmap claims present are bad",
            bad.len(),
            claimed + frames_claimed
        );
    }
    if data_len != want_len {
        bail!("data file {} is {data_len} bytes, expected {want_len} (the store would discard the cache)", dpath.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazyblk_blocksource::BlockSource;
    use lazyblk_builder::{build_image, BuildOptions, BuildSummary};
    use lazyblk_chunkstore::{ChunkStore, Location, StoreOptions};

    const CHUNK: usize = 64 << 10;

    /// A 1 MiB image (16 chunks): pseudo-random bytes, chunks 4..8 all zeros.
    fn image() -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut v: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        v[4 * CHUNK..8 * CHUNK].fill(0);
        v
    }

    fn patch(path: &Path, at: u64, bytes: &[u8]) {
        let f = File::options().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// Build [`image`] with `opts` into `tmp/www`; the manifest's location and the summary.
    fn build(tmp: &Path, opts: &BuildOptions) -> (Location, BuildSummary) {
        let raw = tmp.join("raw.img");
        std::fs::write(&raw, image()).unwrap();
        let www = tmp.join("www");
        let built = build_image(&raw, &www, opts, |_| {}).unwrap();
        let loc = Location::parse(&www.join("manifest").display().to_string());
        (loc, built)
    }

    #[test]
    fn passes_a_store_written_cache_and_catches_bad_claims() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = BuildOptions {
            chunk_size: CHUNK as u32,
            ..Default::default()
        };
        let (loc, built) = build(tmp.path(), &opts);
        let store_opts = StoreOptions {
            cache_root: tmp.path().join("cache"),
            ..Default::default()
        };
        let store = ChunkStore::open(&loc, store_opts).unwrap();
        // Chunks 0..3 and (zero) 4..8 present, the rest missing.
        let mut buf = vec![0u8; 2 * CHUNK];
        store.read_at(CHUNK as u64, &mut buf).unwrap();
        let dir = store.cache_dir().to_path_buf();
        drop(store);
        assert_eq!(dir.file_name().unwrap().to_str().unwrap(), built.id.hex());
        verify_cache(&dir).expect("a cache the store wrote verifies");

        let bitmap = dir.join("bitmap");
        let good_bits = std::fs::read(&bitmap).unwrap();
        let data = dir.join("data");

        // A damaged byte in a present stored chunk.
        patch(&data, CHUNK as u64 + 7, b"?");
        let e = verify_cache(&dir).unwrap_err().to_string();
        assert!(e.contains("1 of the"), "{e}");
        store_chunk_back(&data, 1);
        verify_cache(&dir).unwrap();

        // A zero chunk that holds data.
        patch(&data, 5 * CHUNK as u64, b"x");
        assert!(verify_cache(&dir).is_err());
        patch(&data, 5 * CHUNK as u64, b"\0");
        verify_cache(&dir).unwrap();

        // Bits claiming absent chunks.
        patch(&bitmap, bitmap::HEADER_LEN as u64, &[0xff, 0xff]);
        let e = verify_cache(&dir).unwrap_err().to_string();
        assert!(e.contains("bad"), "{e}");
        std::fs::write(&bitmap, &good_bits).unwrap();

        // Unusable bitmap, short data file, another image's manifest.
        std::fs::write(&bitmap, &good_bits[..good_bits.len() - 1]).unwrap();
        assert!(verify_cache(&dir).is_err());
        std::fs::write(&bitmap, &good_bits).unwrap();
        let len = std::fs::metadata(&data).unwrap().len();
        File::options()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(len - 4096)
            .unwrap();
        assert!(verify_cache(&dir).is_err());
        File::options()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(len)
            .unwrap();
        verify_cache(&dir).unwrap();
        let mut other = std::fs::read(dir.join("manifest")).unwrap();
        other.push(0);
        std::fs::write(dir.join("manifest"), other).unwrap();
        assert!(verify_cache(&dir).is_err());
    }

    #[test]
    fn checks_metadata_pack_frames() {
        use lazyblk_builder::PackBlocks;
        let tmp = tempfile::tempdir().unwrap();
        let opts = BuildOptions {
            chunk_size: CHUNK as u32,
            // blocks 17 and 200 (chunks 1 and 12), one frame
            metadata_pack: PackBlocks::Blocks(vec![17, 200]),
            ..Default::default()
        };
        let (loc, _) = build(tmp.path(), &opts);
        let store_opts = StoreOptions {
            cache_root: tmp.path().join("cache"),
            prefetch_pack: false,
            readahead_bytes: 0,
            ..Default::default()
        };
        let store = ChunkStore::open(&loc, store_opts).unwrap();
        let mut buf = vec![0u8; 4096];
        store.read_at(17 * 4096, &mut buf).unwrap(); // fetches the frame, not chunk 1
        assert_eq!(store.stats().pack_frames_present, 1);
        assert!(!store.chunk_present(1));
        let dir = store.cache_dir().to_path_buf();
        drop(store);
        verify_cache(&dir).expect("a cache with a pack frame verifies");
        patch(&dir.join("data"), 200 * 4096 + 9, b"!");
        let e = verify_cache(&dir).unwrap_err().to_string();
        assert!(
            e.contains("1 of the") && e.contains("chunks and pack frames"),
            "{e}"
        );
    }

    /// Put the image's bytes of chunk `i` back into the data file.
    fn store_chunk_back(data: &Path, i: usize) {
        let img = image();
        patch(data, (i * CHUNK) as u64, &img[i * CHUNK..(i + 1) * CHUNK]);
    }
}
