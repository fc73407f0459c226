//! Eviction under `--cache-limit`: a clock (second chance) over present chunks, run by the
//! maintenance thread; bits are cleared (memory, then disk) before the bytes are punched, and
//! only after a grace period.

use crate::prelude::*;

/// Keep the cache under its limit: clock (second chance) over present chunks. An evicted
/// chunk leaves the in-memory bitmap first (new reads fetch it again), then the on-disk bitmap
/// (made durable), and only after `evict_grace` is its space punched out of the data file, and
/// only if it was not fetched again meanwhile.
pub(crate) fn maintenance(inner: &Inner, bitmap: &Mutex<Option<BitmapFile>>) {
    let n = inner.manifest.chunk_count();
    let mut hand = 0u64;
    let mut doomed: std::collections::VecDeque<(u64, Instant)> = Default::default();
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
            let mut cleared = Vec::new();
            let mut scanned = 0u64;
            while inner.cached_bytes.load(Ordering::Relaxed) > target && scanned < 2 * n {
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
                let inflight = inner.inflight.lock().expect("lock");
                if inflight.contains_key(&c) {
                    continue;
                }
                inner.present.clear(c);
                drop(inflight);
                inner
                    .cached_bytes
                    .fetch_sub(u64::from(inner.manifest.chunk_len(c)), Ordering::Relaxed);
                inner.stats.evicted.fetch_add(1, Ordering::Relaxed);
                cleared.push(c);
            }
            if !cleared.is_empty() {
                if let Some(b) = bm.as_mut() {
                    if let Err(e) = b.update(&[], &cleared) {
                        tracing::error!("recording evictions: {e}");
                    }
                }
                let now = Instant::now();
                doomed.extend(cleared.into_iter().map(|c| (c, now)));
            }
        }
        while let Some(&(c, t)) = doomed.front() {
            if t.elapsed() < inner.opts.evict_grace && !inner.shutdown.load(Ordering::Relaxed) {
                break;
            }
            doomed.pop_front();
            let inflight = inner.inflight.lock().expect("lock");
            if inner.present.get(c) || inflight.contains_key(&c) {
                continue; // fetched again meanwhile: its bytes are live
            }
            for (off, len) in inner.punchable(c) {
                if let Err(e) = lazyblk_blocksource::fsutil::punch_hole(&inner.data, off, len) {
                    tracing::warn!("punching evicted chunk {c}: {e}");
                }
            }
        }
    }
}

impl Inner {
    /// The byte ranges of chunk `c` that eviction may punch out of the data file: all of it
    /// but the metadata pack's blocks, which stay (the pack is never evicted: it is small, and
    /// its frames' bits would otherwise have to follow every chunk they overlap).
    pub(crate) fn punchable(&self, c: u64) -> Vec<(u64, u64)> {
        let off = self.manifest.chunk_offset(c);
        let end = off + u64::from(self.manifest.chunk_len(c));
        let mut out = Vec::new();
        let mut at = off;
        if let Some(p) = &self.manifest.pack {
            for &b in &p.blocks[p.within(off / PACK_BLOCK, (end - 1) / PACK_BLOCK)] {
                let b_off = u64::from(b) * PACK_BLOCK;
                if b_off > at {
                    out.push((at, b_off - at));
                }
                at = b_off + PACK_BLOCK;
            }
        }
        if end > at {
            out.push((at, end - at));
        }
        out
    }
}
