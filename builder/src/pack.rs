//! Writing pack frames: the metadata pack at the end of an image's blob, and prefetch packs
//! (`lazyblk trace --pack`) in a blob of their own.

use crate::error::{Error, Result};
use lazyblk_format::{
    valid_blob_name, Encoding, Entry, ImageId, Manifest, MetaPack, PrefetchPack,
    DEFAULT_PACK_FRAME_BLOCKS, PACK_BLOCK,
};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::publish::{publish_blob, write_atomic};

/// Which side of [`write_pack_frames`] failed.
pub(crate) enum PackWriteError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Store the image blocks `blocks` (ascending) in frames of [`DEFAULT_PACK_FRAME_BLOCKS`]:
/// each frame's raw blocks, read with `read(offset, buf)`, compressed (or raw when that does
/// not help) and written to `out`, the first at blob offset `blob_off`.
pub(crate) fn write_pack_frames(
    blocks: Vec<u32>,
    image_size: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    compressor: &mut zstd::bulk::Compressor<'_>,
    out: &mut dyn Write,
    mut blob_off: u64,
) -> std::result::Result<MetaPack, PackWriteError> {
    let mut p = MetaPack {
        blocks,
        frame_blocks: DEFAULT_PACK_FRAME_BLOCKS,
        frames: Vec::new(),
        merged: None,
    };
    let mut raw = Vec::with_capacity(DEFAULT_PACK_FRAME_BLOCKS as usize * PACK_BLOCK as usize);
    for f in 0..p.blocks.len().div_ceil(p.frame_blocks as usize) {
        raw.clear();
        for &b in &p.blocks[p.frame_positions(f)] {
            let at = u64::from(b) * PACK_BLOCK;
            let len = (image_size - at).min(PACK_BLOCK) as usize;
            let start = raw.len();
            raw.resize(start + len, 0);
            read(at, &mut raw[start..]).map_err(PackWriteError::Read)?;
        }
        let z = compressor.compress(&raw).map_err(PackWriteError::Write)?;
        let (bytes, encoding) = if z.len() < raw.len() {
            (&z[..], Encoding::Zstd)
        } else {
            (&raw[..], Encoding::Raw)
        };
        out.write_all(bytes).map_err(PackWriteError::Write)?;
        p.frames.push(Entry {
            digest: blake3::hash(&raw).into(),
            blob_offset: blob_off,
            stored_len: bytes.len() as u32,
            encoding,
        });
        blob_off += bytes.len() as u64;
    }
    Ok(p)
}

/// What [`build_prefetch_pack`] wrote.
#[derive(Clone, Debug)]
pub struct PackSummary {
    /// The pack's identity (`add --pack-digest`): the SHA-256 of the pack file.
    pub id: ImageId,
    /// The pack as written.
    pub pack: PrefetchPack,
    /// Where the pack file and its blob were written.
    pub pack_path: PathBuf,
    /// Path of the pack's blob.
    pub blob_path: PathBuf,
}

/// Write a [prefetch pack](PrefetchPack) for the image `manifest` (id `image`) holding the
/// 4 KiB blocks `blocks` (any order; duplicates and blocks beyond the image are dropped), read
/// with `read(offset, buf)` (from the raw image, or a device serving it). Writes `path` and
/// its blob next to it, named after it with `.blob` appended. The blocks are not verified
/// here: `read` must serve the image.
///
/// When the image has a metadata pack, the prefetch pack [extends](PrefetchPack::extends) it:
/// the metadata blocks are left out (they are fetched first, from the image's blob), so a
/// metadata read never waits behind the workload's data blocks. Without one, every block is
/// in the prefetch pack.
pub fn build_prefetch_pack(
    image: ImageId,
    manifest: &Manifest,
    blocks: &[u64],
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    path: &Path,
    level: i32,
) -> Result<PackSummary> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("{}: not a file name", path.display())))?;
    let blob_name = format!("{file_name}.blob");
    if !valid_blob_name(&blob_name) {
        return Err(Error::Invalid(format!(
            "{}: not a usable file name",
            path.display()
        )));
    }
    let image_blocks = manifest.block_count();
    let in_meta = |b: u32| {
        manifest
            .pack
            .as_ref()
            .is_some_and(|p| p.covers(b.into(), b.into()).is_some())
    };
    let mut all: Vec<u32> = blocks
        .iter()
        .copied()
        .filter(|&b| b < image_blocks && b <= u64::from(u32::MAX))
        .map(|b| b as u32)
        .filter(|&b| !in_meta(b))
        .collect();
    all.sort_unstable();
    all.dedup();
    if all.is_empty() {
        return Err(Error::Invalid(match manifest.pack {
            Some(_) => "no blocks for a prefetch pack: every block read is in the image's metadata pack already".into(),
            None => "no blocks for a prefetch pack: nothing was read".into(),
        }));
    }
    let blob_path = path.with_file_name(&blob_name);
    let tmp_blob = path.with_file_name(format!(".{blob_name}.tmp"));
    let mut blob = BufWriter::with_capacity(
        1 << 20,
        File::create(&tmp_blob).map_err(|e| Error::io(&tmp_blob, e))?,
    );
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(|e| Error::io(path, e))?;
    let p = write_pack_frames(
        all,
        manifest.image_size,
        read,
        &mut compressor,
        &mut blob,
        0,
    )
    .map_err(|e| match e {
        PackWriteError::Read(e) => Error::Invalid(format!("reading the image: {e}")),
        PackWriteError::Write(e) => Error::io(&tmp_blob, e),
    })?;
    publish_blob(blob, &tmp_blob, &blob_path)?;
    let pack = PrefetchPack {
        image,
        image_size: manifest.image_size,
        blob_name,
        blob_size: p.stored_bytes(),
        pack: p,
        extends: manifest.pack.is_some(),
    };
    let bytes = pack.encode();
    write_atomic(path, &bytes)?;
    Ok(PackSummary {
        id: ImageId::of(&bytes),
        pack,
        pack_path: path.to_path_buf(),
        blob_path,
    })
}
