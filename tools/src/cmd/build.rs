//! `lazyblk build`: make a chunked image (manifest and blob) from a directory, through
//! mkfs.erofs, or from a raw image file.

use anyhow::{bail, Context, Result};
use lazyblk_builder::{build_image, BuildOptions, BuildSummary, PackBlocks};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The build options of the `build` flags; reads the `--pack-blocks` block list.
pub fn options(
    chunk_kib: u32,
    level: i32,
    no_metadata_pack: bool,
    pack_blocks: Option<PathBuf>,
) -> Result<BuildOptions> {
    Ok(BuildOptions {
        chunk_size: chunk_kib.saturating_mul(1024),
        level,
        metadata_pack: if no_metadata_pack {
            PackBlocks::Off
        } else {
            PackBlocks::Erofs
        },
        extra_pack_blocks: match pack_blocks {
            Some(p) => {
                let b = std::fs::read(&p).with_context(|| format!("{}", p.display()))?;
                let l = lazyblk_format::BlockList::decode(&b)
                    .with_context(|| format!("{}", p.display()))?;
                l.blocks.into_iter().map(u64::from).collect()
            }
            None => Vec::new(),
        },
        ..Default::default()
    })
}

/// Run `lazyblk build`: `input` into `output`, keeping the intermediate erofs image at `keep`.
pub fn run(input: &Path, output: &Path, opts: BuildOptions, keep: Option<PathBuf>) -> Result<()> {
    let md = std::fs::metadata(input).with_context(|| format!("{}", input.display()))?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let (image, temp) = if md.is_dir() {
        make_erofs(input, output, keep)?
    } else {
        (input.to_path_buf(), false)
    };
    let size = std::fs::metadata(&image)?.len();
    let bar = progress_bar(size);
    let s = build_image(&image, output, &opts, |done| bar.set_position(done));
    bar.finish_and_clear();
    if temp {
        let _ = std::fs::remove_file(&image);
    }
    print_summary(input, &opts, &s?);
    Ok(())
}

/// Make an erofs image of the directory `input` with mkfs.erofs, at `keep` or else in a
/// temporary file in `output`; the image and whether it is temporary.
fn make_erofs(input: &Path, output: &Path, keep: Option<PathBuf>) -> Result<(PathBuf, bool)> {
    let temp = keep.is_none();
    let img = keep.unwrap_or_else(|| output.join(".image.erofs.tmp"));
    let st = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&img)
        .arg(input)
        .status()
        .context("running mkfs.erofs (install erofs-utils)")?;
    if !st.success() {
        bail!("mkfs.erofs failed on {}", input.display());
    }
    Ok((img, temp))
}

/// A progress bar over `size` bytes on a terminal, else a hidden one.
fn progress_bar(size: u64) -> indicatif::ProgressBar {
    if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// Print what the build of `input` made.
fn print_summary(input: &Path, opts: &BuildOptions, s: &BuildSummary) {
    let stored = s.chunks - s.zero_chunks;
    println!("image      {} ({} bytes)", image_name(input), s.image_size);
    println!(
        "chunks     {} x {} KiB: {} zero, {} stored, {} unique (dedup {:.2}x)",
        s.chunks,
        opts.chunk_size / 1024,
        s.zero_chunks,
        stored,
        s.unique_chunks,
        stored as f64 / s.unique_chunks.max(1) as f64
    );
    println!(
        "blob       {} bytes ({:.1}% of the image)",
        s.blob_size,
        100.0 * s.blob_size as f64 / s.image_size.max(1) as f64
    );
    println!("manifest   {} bytes", s.manifest_size);
    if s.pack_blocks > 0 {
        let meta = s.pack_blocks - s.pack_extra_blocks;
        let what = if s.pack_extra_blocks > 0 {
            format!(
                "{meta} of file-system metadata, {} more from --pack-blocks",
                s.pack_extra_blocks
            )
        } else {
            "the file-system metadata".to_string()
        };
        println!(
            "metadata   {} blocks of 4 KiB in the pack ({what}), spread over {} chunks ({:.1}% of the stored chunks); packed into {} bytes at the end of the blob, fetched first at `add`",
            s.pack_blocks,
            s.pack_chunks,
            100.0 * s.pack_chunks as f64 / stored.max(1) as f64,
            s.pack_bytes
        );
    }
    println!("digest     {}", s.id);
}

/// How the summary names the input.
fn image_name(p: &Path) -> String {
    p.display().to_string()
}
