//! Eviction under `--cache-limit`: a clock (second chance) over present chunks, run by the
//! maintenance thread; bits are cleared (memory, then disk) before the bytes are punched, and
//! only after a grace period. The host-wide limit ([`crate::policy::hostlimit`]) evicts by the
//! same path.

use crate::prelude::*;
use std::collections::VecDeque;

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

impl Inner {
    /// Take `chunks` out of the cache: the in-memory bit (a chunk in flight is skipped), the
    /// durable bit (fsynced), and its bytes later ([`Inner::punch_due`]). `bm` is the bitmap,
    /// locked by the caller for the whole eviction. Returns how many were evicted.
    pub(crate) fn evict(&self, bm: &mut Option<BitmapFile>, chunks: Vec<u64>) -> u64 {
        let mut cleared = Vec::with_capacity(chunks.len());
        for c in chunks {
            let inflight = self.inflight.lock().expect("lock");
            if inflight.contains_key(&c) || !self.present.get(c) {
                continue;
            }
            self.present.clear(c);
            drop(inflight);
            self.cached_bytes
                .fetch_sub(u64::from(self.manifest.chunk_len(c)), Ordering::Relaxed);
            cleared.push(c);
        }
        if cleared.is_empty() {
            return 0;
        }
        self.stats
            .evicted
            .fetch_add(cleared.len() as u64, Ordering::Relaxed);
        if let Some(b) = bm.as_mut() {
            if let Err(e) = b.update(&[], &cleared) {
                tracing::error!("recording evictions: {e}");
            }
        }
        let now = Instant::now();
        let n = cleared.len() as u64;
        self.doomed
            .lock()
            .expect("lock")
            .extend(cleared.into_iter().map(|c| (c, now)));
        n
    }

    /// Punch the evicted chunks whose grace period is over (all of them at shutdown), unless
    /// fetched again meanwhile.
    pub(crate) fn punch_due(&self) {
        loop {
            let c = {
                let mut d = self.doomed.lock().expect("lock");
                match d.front() {
                    Some(&(c, t))
                        if t.elapsed() >= self.opts.evict_grace
                            || self.shutdown.load(Ordering::Relaxed) =>
                    {
                        d.pop_front();
                        c
                    }
                    _ => return,
                }
            };
            let inflight = self.inflight.lock().expect("lock");
            if self.present.get(c) || inflight.contains_key(&c) {
                continue; // fetched again meanwhile: its bytes are live
            }
            for (off, len) in punchable(&self.manifest, c) {
                if let Err(e) = lazyblk_blocksource::fsutil::punch_hole(&self.data, off, len) {
                    tracing::warn!("punching evicted chunk {c}: {e}");
                }
            }
        }
    }
}

/// The doomed queue type of [`Inner`].
pub(crate) type Doomed = Mutex<VecDeque<(u64, Instant)>>;

/// The byte ranges of chunk `c` of `m` (the manifest as the store uses it) that eviction may
/// punch out of the data file: all of it but the metadata pack's blocks, which stay (the pack
/// is never evicted: it is small, and its frames' bits would otherwise have to follow every
/// chunk they overlap).
pub(crate) fn punchable(m: &Manifest, c: u64) -> Vec<(u64, u64)> {
    let off = m.chunk_offset(c);
    let end = off + u64::from(m.chunk_len(c));
    let mut out = Vec::new();
    let mut at = off;
    if let Some(p) = &m.pack {
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
