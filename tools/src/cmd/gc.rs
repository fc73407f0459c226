//! `lazyblk gc`: remove the caches of images that no running daemon uses.

use anyhow::Result;
use std::path::Path;

/// Run `lazyblk gc` on the cache root `cache_dir` (`dry_run`: only list).
pub fn run(cache_dir: &Path, dry_run: bool) -> Result<()> {
    let mut freed = 0;
    for e in lazyblk_chunkstore::gc(cache_dir, &[], dry_run)? {
        let what = if e.in_use {
            "in use, kept"
        } else if e.removed {
            freed += e.bytes;
            "removed"
        } else {
            "would be removed"
        };
        println!("{:>12} bytes  {}  {what}", e.bytes, e.dir.display());
    }
    println!("freed {freed} bytes");
    Ok(())
}
