//! Cut a raw image into chunks: the blob and the manifest (`lazyblk build`).

use crate::error::{Error, Result};
use crate::format::{
    valid_blob_name, Encoding, Entry, ImageId, Manifest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
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
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: crate::format::DEFAULT_CHUNK_SIZE,
            level: 9,
            blob_name: "blob".into(),
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
    if !valid_blob_name(&opts.blob_name) || opts.blob_name == MANIFEST_FILE {
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
    Ok(BuildSummary {
        id: ImageId::of(&bytes),
        manifest_path,
        blob_path,
        image_size,
        chunks,
        zero_chunks,
        unique_chunks: manifest.entries.len() as u64,
        blob_size: blob_off,
        manifest_size: bytes.len() as u64,
    })
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
