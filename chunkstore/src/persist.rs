//! The persister: group commit of presence bits. `fdatasync(data)`, then the bits that cover it
//! in the bitmap file, then `fdatasync(bitmap)`: a bit on disk only ever covers durable,
//! verified data.
//!
//! Rounds run on the store's blocking pool, started by the first completion that finds none
//! running ([`Persister::queue`]); a round takes everything pending, so completions that arrive
//! during its `fdatasync` share the next one (group commit), and an idle store holds no thread
//! for it.
//!
//! On a disk, a batch's ranges are then dropped from the page cache: they are clean after the
//! `fdatasync`, and the kernel caches the device's blocks above the frontend already (the
//! frontend reads `data` with `O_DIRECT`).

use crate::prelude::*;

#[derive(Default)]
pub(crate) struct Persist {
    pub(crate) pending: Vec<u64>,
    pub(crate) queued: u64,
    pub(crate) persisted: u64,
    pub(crate) shutdown: bool,
    pub(crate) last_error: Option<String>,
    /// A persist round is running (or spawned): completions only add to `pending`.
    pub(crate) running: bool,
}

/// What persist rounds need, shared with the tasks that run them.
pub(crate) struct Persister {
    pub(crate) state: Mutex<Persist>,
    pub(crate) cv: Condvar,
    /// The store's data file (another descriptor of it).
    data: File,
    data_path: PathBuf,
    /// The on-disk bitmap (`None` once closed).
    bitmap: Arc<Mutex<Option<BitmapFile>>>,
    /// The store's in-memory presence bits.
    present: Arc<AtomicBits>,
    /// The store, once running: its page-cache policy and unit ranges (a weak reference: the
    /// store holds this persister).
    pub(crate) owner: std::sync::OnceLock<std::sync::Weak<Inner>>,
}

impl Persister {
    pub(crate) fn new(
        data: File,
        data_path: PathBuf,
        bitmap: Arc<Mutex<Option<BitmapFile>>>,
        present: Arc<AtomicBits>,
    ) -> Persister {
        Persister {
            state: Mutex::new(Persist::default()),
            cv: Condvar::new(),
            data,
            data_path,
            bitmap,
            present,
            owner: std::sync::OnceLock::new(),
        }
    }

    /// Queue `units` (just written and verified) for their on-disk bits, and start a persist
    /// round on `rt`'s blocking pool unless one is running.
    pub(crate) fn queue(self: &Arc<Self>, rt: &tokio::runtime::Handle, units: &[u64]) {
        let mut p = self.state.lock().expect("lock");
        p.pending.extend_from_slice(units);
        p.queued += 1;
        if p.running || p.shutdown {
            return;
        }
        p.running = true;
        drop(p);
        let me = self.clone();
        // A runtime that is shutting down drops the task unstarted; the store's `Drop` then
        // persists what is pending itself (`close`).
        drop(rt.spawn_blocking(move || me.rounds()));
    }

    /// Persist rounds until nothing is pending.
    fn rounds(&self) {
        loop {
            let (batch, upto) = {
                let mut p = self.state.lock().expect("lock");
                if p.pending.is_empty() {
                    p.running = false;
                    self.cv.notify_all();
                    return;
                }
                (std::mem::take(&mut p.pending), p.queued)
            };
            let t0 = Instant::now();
            let r = self.persist(&batch);
            if let Some(inner) = self.owner.get().and_then(std::sync::Weak::upgrade) {
                inner
                    .stats
                    .persist_micros
                    .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            let mut p = self.state.lock().expect("lock");
            if let Err(e) = r {
                tracing::error!("persisting presence bits failed (chunks will be fetched again after a restart): {e}");
                p.last_error = Some(e.to_string());
            }
            p.persisted = p.persisted.max(upto);
            self.cv.notify_all();
        }
    }

    /// The units of `batch` still present in memory, checked under the bitmap lock: eviction
    /// clears a unit's in-memory bit and then its on-disk bit under that lock, so a batch queued
    /// before an eviction must not set the on-disk bit again afterwards (it would then outlive
    /// the punched bytes, and a clean close would make it trusted).
    fn still_present(&self, batch: &[u64]) -> Vec<u64> {
        batch
            .iter()
            .copied()
            .filter(|&u| self.present.get(u))
            .collect()
    }

    /// Data first, then the bits that cover it.
    fn persist(&self, batch: &[u64]) -> Result<()> {
        self.data
            .sync_data()
            .map_err(|e| Error::io(&self.data_path, e))?;
        if let Some(inner) = self.owner.get().and_then(std::sync::Weak::upgrade) {
            inner.drop_units(batch);
        }
        match self.bitmap.lock().expect("lock").as_mut() {
            Some(b) => b.update(&self.still_present(batch), &[]),
            None => Ok(()),
        }
    }

    /// At close: no new round starts; wait for a running one (it may still be on the blocking
    /// pool after the runtime's shutdown timed out), then persist what is left on this thread.
    pub(crate) fn close(&self) {
        let mut p = self.state.lock().expect("lock");
        p.shutdown = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("a persist round did not end at close; the next start re-verifies");
                p.last_error = Some("a persist round did not end at close".into());
                return;
            }
            p = self.cv.wait_timeout(p, left).expect("lock").0;
        }
        p.running = true;
        drop(p);
        self.rounds();
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
                for &b in p.frame_members((u - n) as usize) {
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
        let mut p = self.persist.state.lock().expect("lock");
        let target = p.queued;
        while p.persisted < target && !p.shutdown {
            p = self.persist.cv.wait(p).expect("lock");
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
