//! The store as a [`BlockSource`]: `locate` (is this range local: the non-blocking hot path,
//! which also records the block trace, the access order and readahead triggers) and `fetch`.

use crate::prelude::*;

impl Inner {
    /// Record a read of `offset..offset + len` (inside the device, `len` > 0) in the block trace.
    /// Called from `locate`, which every frontend asks first (and again after a fetch).
    pub(crate) fn note_blocks(&self, offset: u64, len: u64) {
        let b = u64::from(BLOCK_SIZE);
        self.touched.set_range(offset / b, (offset + len - 1) / b);
    }

    pub(crate) fn chunk_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = u64::from(self.manifest.chunk_size);
        let last_chunk = self.manifest.chunk_count().saturating_sub(1);
        let first = (offset / cs).min(last_chunk);
        let last = ((offset + len - 1) / cs).min(last_chunk);
        (first, last)
    }

    pub(crate) fn all_present(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|i| self.present.get(i))
    }

    /// Record a read of chunks `first..=last` (present or not), in one pass: first-access order
    /// for the trace, referenced bits for eviction, and the readahead triggers it reaches (a
    /// read that reaches a trigger starts the stream's next window, whether the chunk is
    /// present or still in flight).
    pub(crate) fn note_access(self: &Arc<Self>, first: u64, last: u64) {
        let now = now_ms();
        for i in first..=last {
            self.touch(i, now);
            if !self.accessed.get(i) && !self.accessed.test_and_set(i) {
                self.trace.lock().expect("lock").push(i as u32);
            }
            if self.opts.cache_limit.is_some() && !self.referenced.get(i) {
                self.referenced.set(i);
            }
            if self.ra_trigger.get(i) && self.ra_trigger.test_and_clear(i) {
                self.on_trigger(i);
            }
        }
    }
}

impl BlockSource for ChunkStore {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.inner.device_size,
            block_size: BLOCK_SIZE,
            read_only: true,
        }
    }

    fn locate(&self, offset: u64, len: u64) -> Option<Located> {
        let inner = &self.inner;
        check_range(inner.device_size, offset, len).ok()?;
        if len > 0 {
            inner.note_blocks(offset, len);
        }
        // Whether the range is all written data: stored chunks only (zero chunks are holes),
        // within the image (the device's last block may run past it, into a hole).
        let mut written = false;
        if len > 0 && inner.manifest.chunk_count() > 0 {
            let (first, last) = inner.chunk_range(offset, len);
            if inner.all_present(first, last) {
                inner.note_access(first, last);
                let m = &inner.manifest;
                written = offset + len <= m.image_size
                    && (first..=last).all(|i| m.chunk(i) != ChunkRef::Zero);
            } else {
                // A missing chunk's part of the read may be served by present pack frames.
                // Such reads are metadata: they are not traced and start no readahead.
                let served = (first..=last).all(|i| {
                    inner.present.get(i)
                        || inner
                            .pack_units(i, offset, len)
                            .is_some_and(|mut f| f.all(|u| inner.present.get(u)))
                });
                if !served {
                    return None;
                }
            }
        }
        // (A read served by pack frames is not vouched for: rare, and its chunk's other blocks
        // are holes.) Eviction takes a chunk out of `present` before it punches its bytes, and
        // only after `evict_grace`: a located range stays written for that long.
        Some(Located {
            fd: inner.data.as_raw_fd(),
            offset,
            written,
        })
    }

    fn files(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.inner.data.as_raw_fd()]
    }

    fn fetch(&self, offset: u64, len: u64, done: Completion) {
        self.inner.fetch(offset, len, done)
    }
}
