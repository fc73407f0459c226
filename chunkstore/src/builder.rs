//! Cut a raw image into chunks: the blob and the manifest (`lazyblk build`), and for erofs
//! images a metadata pack: the blocks holding the file-system metadata, stored a second time,
//! densely, at the end of the blob ([`crate::format::MetaPack`]).

use crate::error::{Error, Result};
use crate::format::{
    valid_blob_name, Encoding, Entry, ImageId, Manifest, MetaPack, PrefetchList, PrefetchPack,
    DEFAULT_PACK_FRAME_BLOCKS, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PACK_BLOCK, PACK_FILE,
    PREFETCH_FILE,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
    /// [`crate::erofs::metadata_extents`]); no pack for other images.
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
            chunk_size: crate::format::DEFAULT_CHUNK_SIZE,
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

/// Which side of [`write_pack_frames`] failed.
enum PackWriteError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Store the image blocks `blocks` (ascending) in frames of [`DEFAULT_PACK_FRAME_BLOCKS`]:
/// each frame's raw blocks, read with `read(offset, buf)`, compressed (or raw when that does
/// not help) and written to `out`, the first at blob offset `blob_off`.
fn write_pack_frames(
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
/// 4 KiB blocks `blocks` (any order; duplicates and blocks beyond the image are dropped) plus
/// the blocks of the manifest's own metadata pack, read with `read(offset, buf)` (from the
/// raw image, or a device serving it). Writes `path` and its blob next to it, named after it
/// with `.blob` appended. The blocks are not verified here: `read` must serve the image.
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
    let mut all: Vec<u32> = blocks
        .iter()
        .copied()
        .filter(|&b| b < image_blocks && b <= u64::from(u32::MAX))
        .map(|b| b as u32)
        .chain(manifest.pack.iter().flat_map(|p| p.blocks.iter().copied()))
        .collect();
    all.sort_unstable();
    all.dedup();
    if all.is_empty() {
        return Err(Error::Invalid(
            "no blocks for a prefetch pack (nothing was read, and the image has no metadata pack)"
                .into(),
        ));
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

/// If `input` is an erofs image, the 4 KiB blocks holding its file-system metadata. `None`
/// for other images, and (with a warning) when the walk fails: the pack is an optimization,
/// never a reason to fail a build.
fn erofs_metadata_blocks(input: &File, image: &Path, image_size: u64) -> Option<Vec<u64>> {
    let mut head = [0u8; 2048];
    let head = &mut head[..image_size.min(2048) as usize];
    if let Err(e) = input.read_exact_at(head, 0) {
        tracing::warn!("{}: no metadata pack: {e}", image.display());
        return None;
    }
    if !crate::erofs::is_erofs(head) {
        return None;
    }
    let mut read_at = |offset, buf: &mut [u8]| input.read_exact_at(buf, offset);
    let extents = match crate::erofs::metadata_extents(&mut read_at, image_size) {
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

/// Flush the blob written to `tmp`, make it durable and move it to `path`.
fn publish_blob(blob: BufWriter<File>, tmp: &Path, path: &Path) -> Result<()> {
    let file = blob
        .into_inner()
        .map_err(|e| Error::io(tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))
}

/// Write `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ChunkRef;

    #[test]
    fn dedup_zero_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let mut data = vec![0u8; 4096 * 5 + 123];
        data[..4096].fill(1); // chunk 0
        data[4096 * 2..4096 * 3].fill(1); // chunk 2 == chunk 0
        for (i, b) in data[4096 * 3..4096 * 4].iter_mut().enumerate() {
            *b = (i * 31 % 256) as u8;
        }
        data[4096 * 5..].fill(3); // short tail
        std::fs::write(&img, &data).unwrap();
        let opts = BuildOptions {
            chunk_size: 4096,
            ..Default::default()
        };
        let s = build_image(&img, &dir.path().join("out"), &opts, |_| {}).unwrap();
        assert_eq!(s.chunks, 6);
        assert_eq!(s.zero_chunks, 2);
        assert_eq!(s.unique_chunks, 3);
        let m = Manifest::decode(&std::fs::read(&s.manifest_path).unwrap()).unwrap();
        assert_eq!(m.map[0], m.map[2]);
        assert_eq!(m.chunk(1), ChunkRef::Zero);
        assert_eq!(m.chunk_len(5), 123);
        assert_eq!(std::fs::metadata(&s.blob_path).unwrap().len(), m.blob_size);
        assert_eq!(ImageId::of(&std::fs::read(&s.manifest_path).unwrap()), s.id);
    }

    /// Every block of the pack decodes, from the blob, to the image's bytes at that block.
    fn check_pack(s: &BuildSummary, image: &[u8]) -> MetaPack {
        let m = Manifest::decode(&std::fs::read(&s.manifest_path).unwrap()).unwrap();
        assert!(m.entries_contiguous());
        let blob = std::fs::read(&s.blob_path).unwrap();
        let p = m.pack.clone().expect("a metadata pack");
        for (f, e) in p.frames.iter().enumerate() {
            let stored = &blob[e.blob_offset as usize..][..e.stored_len as usize];
            let raw = match e.encoding {
                Encoding::Raw => stored.to_vec(),
                Encoding::Zstd => zstd::bulk::decompress(stored, 1 << 22).unwrap(),
            };
            assert_eq!(raw.len() as u64, p.frame_raw_len(f, m.image_size));
            assert_eq!(*blake3::hash(&raw).as_bytes(), e.digest);
            let mut at = 0;
            for &b in &p.blocks[p.frame_positions(f)] {
                let off = b as usize * PACK_BLOCK as usize;
                let want = &image[off..(off + PACK_BLOCK as usize).min(image.len())];
                assert_eq!(&raw[at..at + want.len()], want, "block {b}");
                at += want.len();
            }
        }
        assert_eq!(s.pack_blocks, p.blocks.len() as u64);
        assert_eq!(s.pack_bytes, p.stored_bytes());
        p
    }

    #[test]
    fn erofs_image_gets_a_metadata_pack() {
        use crate::erofs::tests::{mkfs, noise, Reader};
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("d/e")).unwrap();
        for i in 0..20 {
            std::fs::write(tree.join(format!("d/f{i}")), noise(i, 20_000)).unwrap();
        }
        std::fs::write(tree.join("d/e/g"), b"g").unwrap();
        let img = dir.path().join("img");
        let bytes = mkfs(&tree, &img, &["-T0", "--all-root"]).expect("mkfs.erofs");
        let out = dir.path().join("out");
        let opts = BuildOptions {
            chunk_size: 16384,
            ..Default::default()
        };
        // A list recorded for another image is removed by the build.
        std::fs::create_dir_all(&out).unwrap();
        let other = PrefetchList {
            image: ImageId([9; 32]),
            chunks: vec![0],
        };
        std::fs::write(out.join(PREFETCH_FILE), other.encode()).unwrap();
        let s = build_image(&img, &out, &opts, |_| {}).unwrap();
        assert!(!out.join(PREFETCH_FILE).exists());
        let p = check_pack(&s, &bytes);
        assert_eq!(p.blocks[0], 0, "the superblock is in the pack");
        assert!(s.pack_blocks < s.image_size / PACK_BLOCK / 4, "{s:?}");
        assert!(
            s.pack_chunks >= 1 && s.pack_chunks <= s.unique_chunks,
            "{s:?}"
        );
        let r = Reader::new(&bytes);
        let root = r.inode(r.root);
        let mut wanted = vec![root.pos as u64 / PACK_BLOCK];
        wanted.extend(
            r.blocks(&root)
                .iter()
                .map(|(at, _)| *at as u64 / PACK_BLOCK),
        );
        for b in wanted {
            assert!(
                p.covers(b, b).is_some(),
                "block {b} of the root is not in the pack"
            );
        }
        // No file data: the 20 KB files' full data blocks are not in the pack.
        let child = |dir: &crate::erofs::tests::RInode, name: &[u8]| {
            let e = r.entries(dir);
            r.inode(e.iter().find(|e| e.0 == name).expect("entry").1)
        };
        let f0 = child(&child(&root, b"d"), b"f0");
        for (at, data) in r.blocks(&f0) {
            let b = at as u64 / PACK_BLOCK;
            if data.len() as u64 == PACK_BLOCK {
                assert!(p.covers(b, b).is_none(), "data block at {at}");
            }
        }

        // Without the option there is no pack; the same image otherwise.
        let opts = BuildOptions {
            metadata_pack: PackBlocks::Off,
            ..opts
        };
        let s2 = build_image(&img, &out, &opts, |_| {}).unwrap();
        assert_eq!(s2.pack_blocks, 0);
        assert_eq!(s2.blob_size, s.blob_size - s.pack_bytes);
        let m = Manifest::decode(&std::fs::read(&s2.manifest_path).unwrap()).unwrap();
        assert!(m.pack.is_none());

        // A raw image: no pack.
        std::fs::write(&img, noise(1, 50_000)).unwrap();
        let s = build_image(&img, &out, &BuildOptions::default(), |_| {}).unwrap();
        assert_eq!(s.pack_blocks, 0);
    }

    #[test]
    fn explicit_pack_blocks_of_any_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let data: Vec<u8> = (0..4096 * 9 + 700).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let opts = BuildOptions {
            chunk_size: 8192,
            metadata_pack: PackBlocks::Blocks(vec![9, 3, 3, 0, 4, 99, 1 << 40]),
            ..Default::default()
        };
        let s = build_image(&img, &dir.path().join("out"), &opts, |_| {}).unwrap();
        let p = check_pack(&s, &data);
        assert_eq!(
            p.blocks,
            vec![0, 3, 4, 9],
            "sorted, deduplicated, inside the image"
        );
        assert_eq!(s.pack_chunks, 4, "chunks 0, 1, 2 and 4");
        assert_eq!(s.pack_extra_blocks, 0);

        // Extra blocks (a recorded workload's) join the pack, counted apart.
        let opts = BuildOptions {
            extra_pack_blocks: vec![4, 5, 7, 7, 1 << 30],
            ..opts
        };
        let s = build_image(&img, &dir.path().join("out2"), &opts, |_| {}).unwrap();
        let p = check_pack(&s, &data);
        assert_eq!(p.blocks, vec![0, 3, 4, 5, 7, 9]);
        assert_eq!(s.pack_extra_blocks, 2);
        // ... also without a pack of their own.
        let opts = BuildOptions {
            metadata_pack: PackBlocks::Off,
            ..opts
        };
        let s = build_image(&img, &dir.path().join("out3"), &opts, |_| {}).unwrap();
        assert_eq!(check_pack(&s, &data).blocks, vec![4, 5, 7]);
    }

    #[test]
    fn broken_erofs_image_builds_without_a_pack() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        // an erofs superblock whose root inode is beyond the image
        let mut data = vec![0u8; 8192];
        data[1024..1028].copy_from_slice(&crate::erofs::MAGIC.to_le_bytes());
        data[1036] = 12;
        data[1038..1040].copy_from_slice(&u16::MAX.to_le_bytes());
        std::fs::write(&img, &data).unwrap();
        let s = build_image(
            &img,
            &dir.path().join("out"),
            &BuildOptions::default(),
            |_| {},
        )
        .unwrap();
        assert_eq!(s.pack_blocks, 0);
    }

    #[test]
    fn rejects_bad_chunk_size() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, b"x").unwrap();
        let opts = BuildOptions {
            chunk_size: 5000,
            ..Default::default()
        };
        let e = build_image(&img, dir.path(), &opts, |_| {}).unwrap_err();
        assert!(e.to_string().contains("chunk size"), "{e}");
    }
}
