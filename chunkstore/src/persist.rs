//! The persister: group commit of presence bits. `fdatasync(data)`, then the bits that cover it
//! in the bitmap file, then `fdatasync(bitmap)`: a bit on disk only ever covers durable,
//! verified data. On a disk, the batch's ranges are then dropped from the page cache: they are
//! clean after the `fdatasync`, and the kernel caches the device's blocks above the frontend
//! already (the frontend reads `data` with `O_DIRECT`).

use crate::prelude::*;

#[derive(Default)]
pub(crate) struct Persist {
    pub(crate) pending: Vec<u64>,
    pub(crate) queued: u64,
    pub(crate) persisted: u64,
    pub(crate) shutdown: bool,
    pub(crate) last_error: Option<String>,
}

pub(crate) fn persister(inner: &Inner, bitmap: &Mutex<Option<BitmapFile>>) {
    loop {
        let (batch, upto) = {
            let mut p = inner.persist.lock().expect("lock");
            while p.pending.is_empty() && !p.shutdown {
                p = inner.persist_cv.wait(p).expect("lock");
            }
            if p.pending.is_empty() {
                return;
            }
            (std::mem::take(&mut p.pending), p.queued)
        };
        // Data first, then the bits that cover it.
        let r = inner
            .data
            .sync_data()
            .map_err(|e| Error::io(&inner.data_path, e))
            .inspect(|_| inner.drop_units(&batch))
            .and_then(|_| match bitmap.lock().expect("lock").as_mut() {
                Some(b) => b.update(&batch, &[]),
                None => Ok(()),
            });
        let mut p = inner.persist.lock().expect("lock");
        if let Err(e) = r {
            tracing::error!("persisting presence bits failed (chunks will be fetched again after a restart): {e}");
            p.last_error = Some(e.to_string());
        }
        p.persisted = upto;
        inner.persist_cv.notify_all();
    }
}

impl Inner {
    /// The byte ranges of `data` that units (chunks `0..n`, then pack frames) occupy, sorted
    /// and merged: one range per run of adjacent chunks or pack blocks.
    pub(crate) fn unit_ranges(&self, units: &[u64]) -> Vec<(u64, u64)> {
        let m = &self.manifest;
        let n = m.chunk_count();
        let mut r = Vec::with_capacity(units.len());
        for &u in units {
            if u < n {
                r.push((m.chunk_offset(u), u64::from(m.chunk_len(u))));
            } else if let Some(p) = m
                .pack
                .as_ref()
                .filter(|p| ((u - n) as usize) < p.frames.len())
            {
                for &b in &p.blocks[p.frame_positions((u - n) as usize)] {
                    let at = u64::from(b) * PACK_BLOCK;
                    r.push((at, PACK_BLOCK.min(m.image_size.saturating_sub(at))));
                }
            }
        }
        lazyblk_blocksource::fsutil::coalesce(&mut r);
        r
    }

    /// Drop the (durable, so clean) pages of `units` from the page cache when `data` is on a
    /// disk.
    pub(crate) fn drop_units(&self, units: &[u64]) {
        if self.page_cache.drops() {
            for (off, len) in self.unit_ranges(units) {
                self.drop_cached(off, len);
            }
        }
    }

    /// Drop `[off, off + len)` of `data` from the page cache when it is on a disk (a failure
    /// costs memory only: logged at debug level).
    pub(crate) fn drop_cached(&self, off: u64, len: u64) {
        if self.page_cache.drops() {
            if let Err(e) =
                lazyblk_blocksource::fsutil::drop_cached(self.data.as_raw_fd(), off, len)
            {
                tracing::debug!(
                    "dropping {off}+{len} of {} from the page cache: {e}",
                    self.data_path.display()
                );
            }
        }
    }

    pub(crate) fn flush(&self) -> Result<()> {
        let mut p = self.persist.lock().expect("lock");
        let target = p.queued;
        while p.persisted < target && !p.shutdown {
            p = self.persist_cv.wait(p).expect("lock");
        }
        match &p.last_error {
            Some(e) => Err(Error::Cache {
                path: self.dir.clone(),
                detail: format!("persisting presence bits failed: {e}"),
            }),
            None => Ok(()),
        }
    }
}
