//! `lazyblk gc`: remove cache directories no running store holds, and say how much of what
//! each cache holds another cache that stays also holds (the host-wide chunk index,
//! [`crate::hostindex`], copies such chunks locally instead of fetching them).

use crate::prelude::*;

/// One cache directory found by [`gc`].
#[derive(Clone, Debug)]
pub struct GcEntry {
    /// The directory.
    pub dir: PathBuf,
    /// Bytes it occupies on disk.
    pub bytes: u64,
    /// Whether a running store holds it (then it is kept).
    pub in_use: bool,
    /// Whether it was removed.
    pub removed: bool,
    /// Chunks it holds (durable bit set, not all-zero) whose digest a cache that stays after
    /// this run (in use, kept, or not removed; with `dry_run`, one that would stay) also holds.
    /// For a removed cache: what an image of it could copy locally again; for a kept one: bytes
    /// stored twice on this host.
    pub shared_chunks: u64,
    /// Raw bytes of those chunks.
    pub shared_bytes: u64,
}

/// Remove the caches under `cache_root` that no running store holds, except those of the
/// images in `keep`. With `dry_run`, only report.
pub fn gc(cache_root: &Path, keep: &[ImageId], dry_run: bool) -> Result<Vec<GcEntry>> {
    let rd = match std::fs::read_dir(cache_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(cache_root, e)),
    };
    let mut names: Vec<_> = rd.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    // First every cache's fate (the locks of those to remove are held until they are gone,
    // so no store opens one in between) and what it holds; then the sharing; then removal.
    struct Found {
        entry: GcEntry,
        stays: bool,
        held: Vec<([u8; 32], u32)>,
        _lock: Option<File>,
    }
    let mut found = Vec::new();
    for e in names {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(id) = ImageId::parse(&name) else {
            continue;
        };
        if !dir.join("manifest").exists() && !dir.join("bitmap").exists() {
            continue;
        }
        let bytes = disk_usage(&dir);
        let lock = lock_dir(&dir).ok();
        let in_use = lock.is_none();
        let goes = !in_use && !keep.contains(&id);
        found.push(Found {
            entry: GcEntry {
                dir: dir.clone(),
                bytes,
                in_use,
                removed: goes && !dry_run,
                shared_chunks: 0,
                shared_bytes: 0,
            },
            stays: !goes,
            held: held_chunks(&dir)
                .map(|(_, h)| h.into_iter().map(|(_, d, l)| (d, l)).collect())
                .unwrap_or_default(),
            _lock: lock,
        });
    }
    // Digest -> caches that stay holding it.
    let mut staying: HashMap<[u8; 32], u32> = HashMap::new();
    for f in found.iter().filter(|f| f.stays) {
        let mut own: Vec<[u8; 32]> = f.held.iter().map(|(d, _)| *d).collect();
        own.sort_unstable();
        own.dedup();
        for d in own {
            *staying.entry(d).or_default() += 1;
        }
    }
    let mut out = Vec::with_capacity(found.len());
    for mut f in found {
        let own = u32::from(f.stays);
        for (d, len) in &f.held {
            if staying.get(d).copied().unwrap_or(0) > own {
                f.entry.shared_chunks += 1;
                f.entry.shared_bytes += u64::from(*len);
            }
        }
        if f.entry.removed {
            std::fs::remove_dir_all(&f.entry.dir).map_err(|e| Error::io(&f.entry.dir, e))?;
        }
        out.push(f.entry);
    }
    Ok(out)
}

/// A chunk a cache holds: (chunk index, digest, raw length).
pub(crate) type HeldChunk = (u64, [u8; 32], u32);

/// The stored chunks the cache in `dir` holds by its on-disk bitmap, as (chunk index, digest,
/// length), and the image's chunk count; `None` when its manifest or bitmap cannot be read.
/// (`gc` and the host limit's passes read other caches this way.)
pub(crate) fn held_chunks(dir: &Path) -> Option<(u64, Vec<HeldChunk>)> {
    let (Ok(mb), Ok(bb)) = (
        std::fs::read(dir.join("manifest")),
        std::fs::read(dir.join("bitmap")),
    ) else {
        return None;
    };
    let (Ok(m), Ok(bits)) = (Manifest::decode(&mb), crate::bitmap::peek(&bb)) else {
        tracing::debug!("{}: manifest or bitmap unreadable", dir.display());
        return None;
    };
    let held = (0..m.chunk_count().min(bits.len() as u64))
        .filter(|&i| bits[i as usize])
        .filter_map(|i| match m.chunk(i) {
            ChunkRef::Stored(e) => Some((i, e.digest, m.chunk_len(i))),
            ChunkRef::Zero => None,
        })
        .collect();
    Some((m.chunk_count(), held))
}

pub(crate) fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}
