//! `lazyblk gc`: remove the caches of images that no running daemon uses.

use anyhow::Result;
use std::path::Path;

/// Run `lazyblk gc` on the cache root `cache_dir` (`dry_run`: only list), with the device
/// records in `state`.
pub fn run(state: &Path, cache_dir: &Path, dry_run: bool) -> Result<()> {
    let mut freed = 0;
    let mut shared = 0;
    // Handed-over caches: a loop device serves them, no daemon holds their lock.
    let keep = crate::cmd::handover::gc_keep(state, cache_dir);
    for e in lazyblk_chunkstore::gc(cache_dir, &keep, dry_run)? {
        let handed_over = e
            .dir
            .file_name()
            .and_then(|n| lazyblk_format::ImageId::parse(&n.to_string_lossy()).ok())
            .is_some_and(|id| keep.contains(&id));
        let what = if e.in_use {
            "in use, kept"
        } else if handed_over {
            "handed over to the kernel, kept"
        } else if e.removed {
            freed += e.bytes;
            "removed"
        } else {
            "would be removed"
        };
        println!(
            "{:>12} bytes  {}  {what}; {} chunks ({} bytes) also in a cache that stays",
            e.bytes,
            e.dir.display(),
            e.shared_chunks,
            e.shared_bytes
        );
        if e.removed {
            shared += e.shared_bytes;
        }
    }
    println!("freed {freed} bytes ({shared} bytes of them another cache still holds: an image of a removed cache copies them locally, not from the network)");
    Ok(())
}

/// `lazyblk gc --host-cache-limit`: set the cache root's limit (0 removes it) and run a pass
/// now: cold chunks of caches no daemon holds are dropped here, running daemons drop theirs at
/// their next round. Caches handed over to the kernel are never touched.
pub fn host_limit(state: &Path, cache_dir: &Path, limit: u64) -> Result<()> {
    use lazyblk_chunkstore::policy::hostlimit;
    let keep = crate::cmd::handover::gc_keep(state, cache_dir);
    if limit == 0 {
        hostlimit::set_host_limit(cache_dir, None)?;
        let u = hostlimit::host_usage(cache_dir, &keep);
        println!(
            "host cache limit removed; {} caches hold {} bytes ({} counted once)",
            u.caches, u.held_bytes, u.unique_bytes
        );
        return Ok(());
    }
    hostlimit::set_host_limit(cache_dir, Some(limit))?;
    let p = hostlimit::enforce(cache_dir, limit, &keep)?;
    let u = &p.usage;
    println!(
        "host cache limit {limit} bytes: {} caches held {} bytes, {} counted once (shared chunks once; {} bytes pinned)",
        u.caches, u.held_bytes, u.unique_bytes, u.pinned_bytes
    );
    match &p.cutoff {
        None => println!("under the limit: nothing dropped"),
        Some(c) => println!(
            "dropped {} bytes counted once (chunks last used at or before {} ms); {} chunks ({} bytes) from caches no daemon holds, the running daemons drop theirs within their next round",
            p.dropped_unique_bytes, c.atime_ms, p.idle_chunks, p.idle_bytes
        ),
    }
    Ok(())
}
