//! The persister: group commit of presence bits. `fdatasync(data)`, then the bits that cover it
//! in the bitmap file, then `fdatasync(bitmap)`: a bit on disk only ever covers durable,
//! verified data.

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
            .and_then(|_| match bitmap.lock().expect("lock").as_mut() {
                Some(b) => b.update(&still_present(inner, batch), &[]),
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

/// The units of `batch` still present in memory, checked under the bitmap lock: eviction
/// clears a unit's in-memory bit and then its on-disk bit under that lock, so a batch queued
/// before an eviction must not set the on-disk bit again afterwards (it would then outlive
/// the punched bytes, and a clean close would make it trusted).
pub(crate) fn still_present(inner: &Inner, mut batch: Vec<u64>) -> Vec<u64> {
    batch.retain(|&u| inner.present.get(u));
    batch
}

impl Inner {
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
