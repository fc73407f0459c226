//! `lazyblk build`: cut a raw image (or an erofs image made from a directory) into a blob of
//! zstd chunks and a manifest, with a metadata pack for erofs images.

use crate::error::{Error, Result};
use lazyblk_format::{
    valid_blob_name, Encoding, Entry, ImageId, Manifest, MetaPack, PrefetchList, PrefetchPack,
    SharedBlob, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PACK_BLOCK, PACK_FILE, PREFETCH_FILE,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
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
    /// Stored size in all (compressed): the shared blobs and the own blob.
    pub blob_size: u64,
    /// Size of the own blob (the image's own chunks and its metadata pack).
    pub own_blob_size: u64,
    /// The shared blobs written (one per shared part with stored chunks), in blob order.
    pub shared: Vec<SharedBlob>,
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

/// One stretch of an image a build reads from a file (`lazyblk convert`'s layered layout:
/// the merged erofs metadata, then one stretch per source layer's file data).
#[derive(Clone, Debug)]
pub struct Part {
    /// The file its bytes come from (read from offset 0; bytes past its end read as zeros).
    pub path: PathBuf,
    /// Where it starts in the image: a multiple of the chunk size, after the previous part's
    /// end (the gap, if any, reads as zeros).
    pub offset: u64,
    /// Its length in the image. A shared part should end on a chunk boundary (zeros past
    /// its file's end), so that its last chunk is the same wherever it lands.
    pub len: u64,
    /// Its chunks go into a blob of their own, named after its stored bytes: the same part
    /// built at any offset of any image gives the same blob, stored once in a registry and
    /// fetched once on a host. Chunks of a shared part are deduplicated within the part
    /// only (so its blob depends on nothing else); the image's own chunks also reuse any
    /// earlier shared chunk.
    pub shared: bool,
}

/// The name of the shared blob whose stored bytes have BLAKE3 digest `digest`.
pub fn shared_blob_name(digest: &blake3::Hash) -> String {
    format!("data-{}", &digest.to_hex()[..32])
}

/// Reads an image made of parts.
struct Parts<'a> {
    parts: &'a [Part],
    files: Vec<File>,
    sizes: Vec<u64>,
}

impl Parts<'_> {
    /// Fill `buf` with the image's bytes at `at` (zeros in gaps and past a file's end).
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        buf.fill(0);
        let end = at + buf.len() as u64;
        for (i, p) in self.parts.iter().enumerate() {
            let (from, to) = (at.max(p.offset), end.min(p.offset + p.len));
            // Bytes of this part that the file holds.
            let to = to.min(p.offset + self.sizes[i]);
            if from < to {
                let dst = &mut buf[(from - at) as usize..(to - at) as usize];
                self.files[i].read_exact_at(dst, from - p.offset)?;
            }
        }
        Ok(())
    }
}

/// The blob one group of stored chunks goes to while building.
struct Group {
    tmp: PathBuf,
    out: BufWriter<File>,
    hash: blake3::Hasher,
    entries: Vec<Entry>,
    size: u64,
    seen: HashMap<[u8; 32], u32>,
}

/// Chunk `image` into `outdir/{manifest,<blob_name>}`. `progress` is called with bytes done.
pub fn build_image(
    image: &Path,
    outdir: &Path,
    opts: &BuildOptions,
    progress: impl FnMut(u64),
) -> Result<BuildSummary> {
    let len = std::fs::metadata(image)
        .map_err(|e| Error::io(image, e))?
        .len();
    let part = Part {
        path: image.to_path_buf(),
        offset: 0,
        len,
        shared: false,
    };
    build_parts(&[part], outdir, opts, progress)
}

/// Chunk the image made of `parts` into `outdir`: the manifest, the own blob
/// (`blob_name`: the chunks of the parts that are not shared, then the metadata pack) and a
/// blob per shared part ([`shared_blob_name`]). `progress` is called with image bytes done.
pub fn build_parts(
    parts: &[Part],
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
        || opts.blob_name.starts_with("data-")
    {
        return Err(Error::Invalid(format!(
            "invalid blob name {:?}",
            opts.blob_name
        )));
    }
    let cs = opts.chunk_size as usize;
    let mut prev_end = 0u64;
    for p in parts {
        if p.offset % cs as u64 != 0 || p.offset < prev_end {
            return Err(Error::Invalid(format!(
                "{}: part at {} is not chunk-aligned after the previous one",
                p.path.display(),
                p.offset
            )));
        }
        prev_end = p.offset + p.len;
    }
    let image = parts.first().map_or(Path::new("(empty)"), |p| &p.path);
    let mut files = Vec::with_capacity(parts.len());
    let mut sizes = Vec::with_capacity(parts.len());
    for p in parts {
        let f = File::open(&p.path).map_err(|e| Error::io(&p.path, e))?;
        sizes.push(f.metadata().map_err(|e| Error::io(&p.path, e))?.len());
        files.push(f);
    }
    let input = Parts {
        parts,
        files,
        sizes,
    };
    let image_size = prev_end;
    std::fs::create_dir_all(outdir).map_err(|e| Error::io(outdir, e))?;
    let blob_path = outdir.join(&opts.blob_name);
    let manifest_path = outdir.join(MANIFEST_FILE);
    // Group 0 is the own blob; group `k` the `k`-th shared part's.
    let group = |tmp: PathBuf| -> Result<Group> {
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Group {
            tmp,
            out: BufWriter::with_capacity(1 << 20, f),
            hash: blake3::Hasher::new(),
            entries: Vec::new(),
            size: 0,
            seen: HashMap::new(),
        })
    };
    let mut groups = vec![group(outdir.join(format!(".{}.tmp", opts.blob_name)))?];
    let mut group_of_part = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        if p.shared {
            group_of_part.push(groups.len());
            groups.push(group(outdir.join(format!(".data-{i}.tmp")))?);
        } else {
            group_of_part.push(0);
        }
    }
    let chunks = image_size.div_ceil(cs as u64);
    // Each chunk: 0 (zeros) or (group, 1-based entry in the group).
    let mut refs: Vec<(usize, u32)> = Vec::with_capacity(chunks as usize);
    // Any shared chunk stored so far, for the own chunks to reuse.
    let mut any_shared: HashMap<[u8; 32], (usize, u32)> = HashMap::new();
    let mut buf = vec![0u8; cs];
    let mut zero_chunks = 0;
    let mut compressor =
        zstd::bulk::Compressor::new(opts.level).map_err(|e| Error::io(image, e))?;
    let mut part = 0usize;
    for i in 0..chunks {
        let at = i * cs as u64;
        let len = (image_size - at).min(cs as u64) as usize;
        input
            .read_exact_at(&mut buf[..len], at)
            .map_err(|e| Error::io(&parts[part.min(parts.len() - 1)].path, e))?;
        while part + 1 < parts.len() && parts[part + 1].offset <= at {
            part += 1;
        }
        let data = &buf[..len];
        if data.iter().all(|&b| b == 0) {
            refs.push((0, 0));
            zero_chunks += 1;
            progress(at + len as u64);
            continue;
        }
        let g = group_of_part[part];
        let digest: [u8; 32] = blake3::hash(data).into();
        let reuse = match g {
            0 => groups[0]
                .seen
                .get(&digest)
                .map(|&k| (0, k))
                .or_else(|| any_shared.get(&digest).copied()),
            g => groups[g].seen.get(&digest).map(|&k| (g, k)),
        };
        if let Some(r) = reuse {
            refs.push(r);
        } else {
            let z = compressor.compress(data).map_err(|e| Error::io(image, e))?;
            let (bytes, encoding) = if z.len() < len {
                (&z[..], Encoding::Zstd)
            } else {
                (data, Encoding::Raw)
            };
            let gr = &mut groups[g];
            gr.out.write_all(bytes).map_err(|e| Error::io(&gr.tmp, e))?;
            gr.hash.update(bytes);
            gr.entries.push(Entry {
                digest,
                blob_offset: gr.size,
                stored_len: bytes.len() as u32,
                encoding,
            });
            gr.size += bytes.len() as u64;
            let k = gr.entries.len() as u32;
            gr.seen.insert(digest, k);
            if g != 0 {
                any_shared.entry(digest).or_insert((g, k));
            }
            refs.push((g, k));
        }
        progress(at + len as u64);
    }
    // Blob order: the shared blobs, in part order, then the own blob.
    let order: Vec<usize> = (1..groups.len()).chain([0]).collect();
    let mut entry_base = vec![0u32; groups.len()];
    let mut byte_base = vec![0u64; groups.len()];
    let (mut n, mut at) = (0u32, 0u64);
    for &g in &order {
        entry_base[g] = n;
        byte_base[g] = at;
        n += groups[g].entries.len() as u32;
        at += groups[g].size;
    }
    let map: Vec<u32> = refs
        .iter()
        .map(|&(g, k)| if k == 0 { 0 } else { entry_base[g] + k })
        .collect();
    let mut entries = Vec::with_capacity(n as usize);
    for &g in &order {
        entries.extend(groups[g].entries.iter().map(|e| Entry {
            blob_offset: e.blob_offset + byte_base[g],
            ..*e
        }));
    }
    let mut blob_off = at;
    let read = |at: u64, buf: &mut [u8]| input.read_exact_at(buf, at);
    let mut pack_list = match &opts.metadata_pack {
        PackBlocks::Off => None,
        PackBlocks::Erofs => erofs_metadata_blocks(&read, image, image_size),
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
    let own = &mut groups[0];
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
            let mut read = read;
            let p = write_pack_frames(
                blocks,
                image_size,
                &mut read,
                &mut compressor,
                &mut own.out,
                blob_off,
            )
            .map_err(|e| match e {
                PackWriteError::Read(e) => Error::io(image, e),
                PackWriteError::Write(e) => Error::io(&own.tmp, e),
            })?;
            blob_off += p.stored_bytes();
            (!p.blocks.is_empty()).then_some(p)
        }
        None => None,
    };
    let mut shared = Vec::new();
    let mut groups = groups.into_iter();
    let own = groups.next().expect("the own group");
    publish_blob(own.out, &own.tmp, &blob_path)?;
    for g in groups {
        let size = g.size;
        if size == 0 {
            drop(g.out);
            std::fs::remove_file(&g.tmp).map_err(|e| Error::io(&g.tmp, e))?;
            continue;
        }
        let name = shared_blob_name(&g.hash.finalize());
        publish_blob(g.out, &g.tmp, &outdir.join(&name))?;
        shared.push(SharedBlob { name, size });
    }
    let manifest = Manifest {
        image_size,
        chunk_size: opts.chunk_size,
        blob_size: blob_off,
        blob_name: opts.blob_name.clone(),
        shared,
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
        own_blob_size: manifest.own_blob_size(),
        shared: manifest.shared.clone(),
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
    read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    image: &Path,
    image_size: u64,
) -> Option<Vec<u64>> {
    let mut head = [0u8; 2048];
    let head = &mut head[..image_size.min(2048) as usize];
    if let Err(e) = read(0, head) {
        tracing::warn!("{}: no metadata pack: {e}", image.display());
        return None;
    }
    if !lazyblk_format::erofs::is_erofs(head) {
        return None;
    }
    let mut read_at = |offset, buf: &mut [u8]| read(offset, buf);
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
