//! `lazyblk build`: cut a raw image (or an erofs image made from a directory) into a blob of
//! zstd chunks and a manifest, with a metadata pack for erofs images.

use crate::error::{Error, Result};
use lazyblk_format::{
    valid_blob_name, Encoding, Entry, ImageId, Manifest, MetaPack, PrefetchList, PrefetchPack,
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PACK_BLOCK, PACK_FILE, PREFETCH_FILE,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::pack::{write_pack_frames, PackWriteError};
use crate::publish::{publish_blob, write_atomic};

/// Build options.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Chunk size in bytes (power of two).
    pub chunk_size: u32,
    /// zstd level.
    pub level: i32,
    /// File name of the blob inside the output directory.
    pub blob_name: String,
    /// Which blocks go into the metadata pack.
    pub metadata_pack: PackBlocks,
    /// More 4 KiB blocks for the pack, on top of `metadata_pack`'s: the blocks a recorded
    /// workload read (`lazyblk trace --blocks`), so that it finds them all after a few
    /// requests. Blocks beyond the image are ignored.
    pub extra_pack_blocks: Vec<u64>,
}

/// Which blocks of the image a build stores in the metadata pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackBlocks {
    /// For an erofs image, every block holding file-system metadata (found by walking it,
    /// [`lazyblk_format::erofs::metadata_extents`]); no pack for other images.
    Erofs,
    /// No pack.
    Off,
    /// These 4 KiB image block numbers (any order, duplicates and blocks beyond the image
    /// ignored): for other file systems, and for tests.
    Blocks(Vec<u64>),
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: lazyblk_format::DEFAULT_CHUNK_SIZE,
            level: 9,
            blob_name: "blob".into(),
            metadata_pack: PackBlocks::Erofs,
            extra_pack_blocks: Vec::new(),
        }
    }
}

/// What a build produced.
#[derive(Clone, Debug)]
pub struct BuildSummary {
    /// The image identity.
    pub id: ImageId,
    /// Path of the manifest written.
    pub manifest_path: PathBuf,
    /// Path of the blob written.
    pub blob_path: PathBuf,
    /// Raw image size.
    pub image_size: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// All-zero chunks (not stored).
    pub zero_chunks: u64,
    /// Unique stored chunks.
    pub unique_chunks: u64,
    /// Blob size (compressed).
    pub blob_size: u64,
    /// Manifest size.
    pub manifest_size: u64,
    /// 4 KiB blocks in the metadata pack (0: no pack).
    pub pack_blocks: u64,
    /// Stored (compressed) bytes of the metadata pack, included in `blob_size`.
    pub pack_bytes: u64,
    /// Stored chunks the pack's blocks are spread over in the image: what a client without
    /// the pack would fetch to read all of them.
    pub pack_chunks: u64,
    /// Blocks in the pack only because `extra_pack_blocks` named them.
    pub pack_extra_blocks: u64,
}

/// Name of the manifest file in a build output directory.
pub const MANIFEST_FILE: &str = "manifest";

/// Chunk `image` into `outdir/{manifest,<blob_name>}`. `progress` is called with bytes done.
pub fn build_image(
    image: &Path,
    outdir: &Path,
    opts: &BuildOptions,
    mut progress: impl FnMut(u64),
) -> Result<BuildSummary> {
    if !opts.chunk_size.is_power_of_two()
        || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size)
    {
        return Err(Error::Invalid(format!(
            "chunk size must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}, got {}",
            opts.chunk_size
        )));
    }
    if !valid_blob_name(&opts.blob_name)
        || [MANIFEST_FILE, PREFETCH_FILE, PACK_FILE].contains(&opts.blob_name.as_str())
    {
        return Err(Error::Invalid(format!(
            "invalid blob name {:?}",
            opts.blob_name
        )));
    }
    let mut input = File::open(image).map_err(|e| Error::io(image, e))?;
    let image_size = input.metadata().map_err(|e| Error::io(image, e))?.len();
    std::fs::create_dir_all(outdir).map_err(|e| Error::io(outdir, e))?;
    let blob_path = outdir.join(&opts.blob_name);
    let manifest_path = outdir.join(MANIFEST_FILE);
    let tmp_blob = outdir.join(format!(".{}.tmp", opts.blob_name));
    let mut blob = BufWriter::with_capacity(
        1 << 20,
        File::create(&tmp_blob).map_err(|e| Error::io(&tmp_blob, e))?,
    );
    let cs = opts.chunk_size as usize;
    let chunks = image_size.div_ceil(cs as u64);
    let mut map = Vec::with_capacity(chunks as usize);
    let mut entries: Vec<Entry> = Vec::new();
    let mut seen: HashMap<[u8; 32], u32> = HashMap::new();
    let mut buf = vec![0u8; cs];
    let mut blob_off = 0u64;
    let mut zero_chunks = 0;
    let mut compressor =
        zstd::bulk::Compressor::new(opts.level).map_err(|e| Error::io(image, e))?;
    for i in 0..chunks {
        let len = (image_size - i * cs as u64).min(cs as u64) as usize;
        input
            .read_exact(&mut buf[..len])
            .map_err(|e| Error::io(image, e))?;
        let data = &buf[..len];
        if data.iter().all(|&b| b == 0) {
            map.push(0);
            zero_chunks += 1;
        } else {
            let digest: [u8; 32] = blake3::hash(data).into();
            if let Some(&k) = seen.get(&digest) {
                map.push(k);
            } else {
                let z = compressor.compress(data).map_err(|e| Error::io(image, e))?;
                let (bytes, encoding) = if z.len() < len {
                    (&z[..], Encoding::Zstd)
                } else {
                    (data, Encoding::Raw)
                };
                blob.write_all(bytes).map_err(|e| Error::io(&tmp_blob, e))?;
                entries.push(Entry {
                    digest,
                    blob_offset: blob_off,
                    stored_len: bytes.len() as u32,
                    encoding,
                });
                blob_off += bytes.len() as u64;
                let k = entries.len() as u32;
                seen.insert(digest, k);
                map.push(k);
            }
        }
        progress((i * cs as u64 + len as u64).min(image_size));
    }
    let mut pack_list = match &opts.metadata_pack {
        PackBlocks::Off => None,
        PackBlocks::Erofs => erofs_metadata_blocks(&input, image, image_size),
        PackBlocks::Blocks(b) => Some(b.clone()),
    };
    let mut pack_extra_blocks = 0;
    if !opts.extra_pack_blocks.is_empty() {
        let base: std::collections::HashSet<u64> = pack_list.iter().flatten().copied().collect();
        let mut extra: Vec<u64> = opts
            .extra_pack_blocks
            .iter()
            .copied()
            .filter(|b| !base.contains(b) && *b < image_size.div_ceil(PACK_BLOCK))
            .collect();
        extra.sort_unstable();
        extra.dedup();
        pack_extra_blocks = extra.len() as u64;
        pack_list.get_or_insert_with(Vec::new).extend(extra);
    }
    let mut pack_chunks = 0;
    let pack = match pack_list {
        Some(mut blocks) => {
            blocks.retain(|&b| b < image_size.div_ceil(PACK_BLOCK) && b <= u64::from(u32::MAX));
            blocks.sort_unstable();
            blocks.dedup();
            let mut chunks: Vec<u64> = blocks
                .iter()
                .map(|&b| b * PACK_BLOCK / cs as u64)
                .filter(|&c| map[c as usize] != 0)
                .collect();
            chunks.dedup();
            pack_chunks = chunks.len() as u64;
            let blocks: Vec<u32> = blocks.into_iter().map(|b| b as u32).collect();
            let mut read = |at: u64, buf: &mut [u8]| input.read_exact_at(buf, at);
            let p = write_pack_frames(
                blocks,
                image_size,
                &mut read,
                &mut compressor,
                &mut blob,
                blob_off,
            )
            .map_err(|e| match e {
                PackWriteError::Read(e) => Error::io(image, e),
                PackWriteError::Write(e) => Error::io(&tmp_blob, e),
            })?;
            blob_off += p.stored_bytes();
            (!p.blocks.is_empty()).then_some(p)
        }
        None => None,
    };
    publish_blob(blob, &tmp_blob, &blob_path)?;
    let manifest = Manifest {
        image_size,
        chunk_size: opts.chunk_size,
        blob_size: blob_off,
        blob_name: opts.blob_name.clone(),
        map,
        entries,
        pack,
    };
    let bytes = manifest.encode();
    write_atomic(&manifest_path, &bytes)?;
    let id = ImageId::of(&bytes);
    // The build writes no prefetch list of its own (the pack holds the metadata); one
    // recorded for this very image by `lazyblk trace` is kept.
    remove_stale_prefetch(&outdir.join(PREFETCH_FILE), id, &manifest)?;
    remove_stale_pack(&outdir.join(PACK_FILE), id, &manifest)?;
    Ok(BuildSummary {
        id,
        manifest_path,
        blob_path,
        image_size,
        chunks,
        zero_chunks,
        unique_chunks: manifest.entries.len() as u64,
        blob_size: blob_off,
        manifest_size: bytes.len() as u64,
        pack_blocks: manifest.pack.as_ref().map_or(0, |p| p.blocks.len() as u64),
        pack_bytes: manifest.pack.as_ref().map_or(0, MetaPack::stored_bytes),
        pack_chunks,
        pack_extra_blocks,
    })
}

/// If `input` is an erofs image, the 4 KiB blocks holding its file-system metadata. `None`
/// for other images, and (with a warning) when the walk fails: the pack is an optimization,
/// never a reason to fail a build.
pub(crate) fn erofs_metadata_blocks(
    input: &File,
    image: &Path,
    image_size: u64,
) -> Option<Vec<u64>> {
    let mut head = [0u8; 2048];
    let head = &mut head[..image_size.min(2048) as usize];
    if let Err(e) = input.read_exact_at(head, 0) {
        tracing::warn!("{}: no metadata pack: {e}", image.display());
        return None;
    }
    if !lazyblk_format::erofs::is_erofs(head) {
        return None;
    }
    let mut read_at = |offset, buf: &mut [u8]| input.read_exact_at(buf, offset);
    let extents = match lazyblk_format::erofs::metadata_extents(&mut read_at, image_size) {
        Ok(extents) => extents,
        Err(e) => {
            tracing::warn!("{}: no metadata pack: {e}", image.display());
            return None;
        }
    };
    Some(
        extents
            .iter()
            .filter(|e| e.len > 0)
            .flat_map(|e| e.offset / PACK_BLOCK..=(e.end() - 1) / PACK_BLOCK)
            .collect(),
    )
}

/// Remove a prefetch list at `path` left there for another image (a list recorded for this
/// very image, e.g. by `lazyblk trace`, is kept).
fn remove_stale_prefetch(path: &Path, image: ImageId, manifest: &Manifest) -> Result<()> {
    let stale = match std::fs::read(path) {
        Ok(b) => PrefetchList::decode(&b, &image, manifest.chunk_count()).is_err(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(path, e)),
    };
    if stale {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Remove a prefetch pack at `path` (and its blob) made for another image.
fn remove_stale_pack(path: &Path, image: ImageId, manifest: &Manifest) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    if PrefetchPack::decode(&bytes, &image, manifest.image_size).is_ok() {
        return Ok(());
    }
    std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    let blob = path.with_file_name(format!("{PACK_FILE}.blob"));
    match std::fs::remove_file(&blob) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&blob, e)),
        _ => Ok(()),
    }
}
