//! Cut a raw image into chunks: the blob and the manifest (`lazyblk build`), and for erofs
//! images a prefetch list of the chunks holding the file-system metadata.

use crate::error::{Error, Result};
use crate::format::{
    valid_blob_name, Encoding, Entry, ImageId, Manifest, PrefetchList, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE, PREFETCH_FILE,
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
    /// For an erofs image, write `prefetch` ([`PREFETCH_FILE`]) listing the chunks that hold
    /// the file-system metadata, in the order a walk of the tree first needs them.
    pub metadata_prefetch: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: crate::format::DEFAULT_CHUNK_SIZE,
            level: 9,
            blob_name: "blob".into(),
            metadata_prefetch: true,
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
    /// Chunks in the metadata prefetch list written (0 when none was written).
    pub prefetch_chunks: u64,
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
        || [MANIFEST_FILE, PREFETCH_FILE].contains(&opts.blob_name.as_str())
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
    let blob_file = blob
        .into_inner()
        .map_err(|e| Error::io(&tmp_blob, e.into_error()))?;
    blob_file.sync_all().map_err(|e| Error::io(&tmp_blob, e))?;
    std::fs::rename(&tmp_blob, &blob_path).map_err(|e| Error::io(&blob_path, e))?;
    let manifest = Manifest {
        image_size,
        chunk_size: opts.chunk_size,
        blob_size: blob_off,
        blob_name: opts.blob_name.clone(),
        map,
        entries,
    };
    let bytes = manifest.encode();
    write_atomic(&manifest_path, &bytes)?;
    let id = ImageId::of(&bytes);
    let metadata = if opts.metadata_prefetch {
        erofs_metadata_chunks(&input, image, &manifest)
    } else {
        None
    };
    let prefetch_chunks = write_prefetch(&outdir.join(PREFETCH_FILE), id, &manifest, metadata)?;
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
        prefetch_chunks,
    })
}

/// If `input` is an erofs image, the stored chunks holding its file-system metadata in the
/// order a walk of the tree first needs them. `None` for other images, and (with a warning)
/// when the walk fails: the list is an optimization, never a reason to fail a build.
fn erofs_metadata_chunks(input: &File, image: &Path, manifest: &Manifest) -> Option<Vec<u32>> {
    let mut head = [0u8; 2048];
    let head = &mut head[..manifest.image_size.min(2048) as usize];
    if let Err(e) = input.read_exact_at(head, 0) {
        tracing::warn!("{}: no metadata prefetch list: {e}", image.display());
        return None;
    }
    if !crate::erofs::is_erofs(head) {
        return None;
    }
    let mut read_at = |offset, buf: &mut [u8]| input.read_exact_at(buf, offset);
    let extents = match crate::erofs::metadata_extents(&mut read_at, manifest.image_size) {
        Ok(extents) => extents,
        Err(e) => {
            tracing::warn!("{}: no metadata prefetch list: {e}", image.display());
            return None;
        }
    };
    let cs = u64::from(manifest.chunk_size);
    let mut listed = vec![false; manifest.map.len()];
    let mut chunks = Vec::new();
    for e in extents.iter().filter(|e| e.len > 0) {
        for c in e.offset / cs..=(e.end() - 1) / cs {
            let c = c as usize;
            // Extents lie inside the image; all-zero chunks need no fetch.
            if manifest.map.get(c).is_some_and(|&k| k != 0) && !listed[c] {
                listed[c] = true;
                chunks.push(c as u32);
            }
        }
    }
    Some(chunks)
}

/// Write `chunks` as the prefetch list at `path`, or with none, remove a list left there for
/// another image (a list recorded for this very image, e.g. by `lazyblk trace`, is kept).
/// Returns the number of chunks written.
fn write_prefetch(
    path: &Path,
    image: ImageId,
    manifest: &Manifest,
    chunks: Option<Vec<u32>>,
) -> Result<u64> {
    match chunks {
        Some(chunks) if !chunks.is_empty() => {
            let n = chunks.len() as u64;
            write_atomic(path, &PrefetchList { image, chunks }.encode())?;
            Ok(n)
        }
        _ => {
            let stale = match std::fs::read(path) {
                Ok(b) => PrefetchList::decode(&b, &image, manifest.chunk_count()).is_err(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(Error::io(path, e)),
            };
            if stale {
                std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
            }
            Ok(0)
        }
    }
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

    #[test]
    fn erofs_image_gets_a_metadata_prefetch_list() {
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
            chunk_size: 4096,
            ..Default::default()
        };
        let s = build_image(&img, &out, &opts, |_| {}).unwrap();
        let list = std::fs::read(out.join(PREFETCH_FILE)).expect("prefetch list written");
        let list = PrefetchList::decode(&list, &s.id, s.chunks).unwrap();
        assert_eq!(list.chunks.len() as u64, s.prefetch_chunks);
        assert_eq!(list.chunks[0], 0, "the superblock comes first");
        assert!(s.prefetch_chunks < s.chunks / 4, "{s:?}");
        let r = Reader::new(&bytes);
        let root = r.inode(r.root);
        let mut wanted = vec![root.pos / 4096];
        wanted.extend(r.blocks(&root).iter().map(|(at, _)| at / 4096));
        for c in wanted {
            assert!(
                list.chunks.contains(&(c as u32)),
                "chunk {c} of the root is not listed"
            );
        }

        // Without the option nothing is written, and the list for this image is kept.
        let opts = BuildOptions {
            metadata_prefetch: false,
            ..opts
        };
        let s = build_image(&img, &out, &opts, |_| {}).unwrap();
        assert_eq!(s.prefetch_chunks, 0);
        assert!(out.join(PREFETCH_FILE).exists());

        // A raw image: no list, and the erofs image's list is removed.
        std::fs::write(&img, noise(1, 50_000)).unwrap();
        let s = build_image(&img, &out, &BuildOptions::default(), |_| {}).unwrap();
        assert_eq!(s.prefetch_chunks, 0);
        assert!(!out.join(PREFETCH_FILE).exists());
    }

    #[test]
    fn broken_erofs_image_builds_without_a_list() {
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
        assert_eq!(s.prefetch_chunks, 0);
        assert!(!dir.path().join("out").join(PREFETCH_FILE).exists());
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
