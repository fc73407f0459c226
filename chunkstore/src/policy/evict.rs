//! Eviction under `--cache-limit`: a clock (second chance) over present chunks, run by the
//! maintenance thread; bits are cleared (memory, then disk) before the bytes are punched, and
//! only after a grace period. The host-wide limit ([`crate::policy::hostlimit`]) evicts by the
//! same path.

use crate::prelude::*;

/// Keep the cache under its limit: clock (second chance) over present chunks. An evicted
/// chunk leaves the in-memory bitmap first (new reads fetch it again), then the on-disk bitmap
/// (made durable), and only after `evict_grace` is its space punched out of the data file, and
/// only if it was not fetched again meanwhile ([`Inner::evict`], [`Inner::punch_due`]).
pub(crate) fn maintenance(inner: &Inner, bitmap: &Mutex<Option<BitmapFile>>) {
    let n = inner.manifest.chunk_count();
    let mut hand = 0u64;
    while !inner.shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let Some(limit) = inner.opts.cache_limit else {
            continue;
        };
        if inner.cached_bytes.load(Ordering::Relaxed) > limit && n > 0 {
            // The whole pass holds the bitmap lock: either `seal` marks the bitmap clean after
            // it (and writes its cleared bits), or the pass sees the store sealed and evicts
            // nothing.
            let mut bm = bitmap.lock().expect("lock");
            if inner.sealed.load(Ordering::SeqCst) {
                continue;
            }
            let target = limit - limit / 10;
            let mut scanned = 0u64;
            let mut chosen = Vec::new();
            let mut left = inner.cached_bytes.load(Ordering::Relaxed);
            while left > target && scanned < 2 * n {
                let c = hand;
                hand = (hand + 1) % n;
                scanned += 1;
                if !inner.present.get(c) || inner.manifest.chunk(c) == ChunkRef::Zero {
                    continue;
                }
                if inner.referenced.get(c) {
                    inner.referenced.clear(c);
                    continue;
                }
                left = left.saturating_sub(u64::from(inner.manifest.chunk_len(c)));
                chosen.push(c);
            }
            inner.evict(&mut bm, chosen);
        }
        inner.punch_due();
    }
    inner.punch_due();
}
