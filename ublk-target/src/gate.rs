//! The fetch gate: lets a daemon stop fetching (for a planned hand-over to a new daemon) while
//! the device stays live.
//!
//! While the gate is open, reads of missing data call [`BlockSource::fetch`] as usual. Once it is
//! closed, a read that would have to fetch is parked instead: it is never completed by this
//! daemon, so after the daemon exits the kernel re-issues it to the next one
//! (`UBLK_F_USER_RECOVERY_REISSUE`). Reads of data already present are still served until the
//! process exits.
//!
//! [`BlockSource::fetch`]: lazyblk_blocksource::BlockSource::fetch

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// See the module documentation. Shared by all queues of a device.
#[derive(Debug, Default)]
pub struct FetchGate {
    closed: AtomicBool,
    /// Reads between "decided to fetch" and "got the outcome".
    fetching: AtomicUsize,
}

/// Held by a read while it waits for a fetch.
pub(crate) struct Fetching<'a>(&'a FetchGate);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.fetching.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FetchGate {
    /// Queue thread: register a read that needs a fetch; `None` once the gate is closed.
    pub(crate) fn enter(&self) -> Option<Fetching<'_>> {
        // Count first, then look: `close` stores first, then counts (both SeqCst), so either we
        // see the gate closed or `close` sees us and waits.
        self.fetching.fetch_add(1, Ordering::SeqCst);
        let guard = Fetching(self);
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        Some(guard)
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Close the gate and wait up to `timeout` for the reads that are waiting for a fetch to get
    /// their outcome. Returns how many are still waiting (0: drained): those complete if their
    /// fetch ends before the process exits, else the kernel re-issues them to the next daemon.
    pub fn close(&self, timeout: Duration) -> usize {
        self.closed.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        loop {
            let n = self.fetching.load(Ordering::SeqCst);
            if n == 0 || t0.elapsed() >= timeout {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
