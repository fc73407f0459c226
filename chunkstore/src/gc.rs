//! `lazyblk gc`: remove cache directories no running store holds.

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
}

/// Remove the caches under `cache_root` that no running store holds, except those of the
/// images in `keep`. With `dry_run`, only report.
pub fn gc(cache_root: &Path, keep: &[ImageId], dry_run: bool) -> Result<Vec<GcEntry>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(cache_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(cache_root, e)),
    };
    for e in rd.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(id) = ImageId::parse(&name) else {
            continue;
        };
        if !dir.join("manifest").exists() && !dir.join("bitmap").exists() {
            continue;
        }
        let bytes = disk_usage(&dir);
        let lock = lock_dir(&dir);
        let in_use = lock.is_err();
        let removed = !in_use && !dry_run && !keep.contains(&id);
        if removed {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        out.push(GcEntry {
            dir,
            bytes,
            in_use,
            removed,
        });
    }
    Ok(out)
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
