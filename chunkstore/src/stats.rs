//! The store's counters and what opening found: [`StatsSnapshot`], [`OpenReport`], and the
//! fetch latency histogram ([`LatencyHistogram`], fixed buckets of lock-free counters).

use crate::prelude::*;

/// Upper bounds, in microseconds, of the fetch latency histogram's buckets (one more bucket,
/// +Inf, holds the rest). From 1 ms (a LAN range read) to 10 s (retries near a deadline).
pub const FETCH_LATENCY_BOUNDS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// A histogram of range request latencies with fixed buckets: one atomic counter per bucket
/// (not cumulative), plus the sum and the count, so recording is three relaxed adds.
#[derive(Default)]
pub(crate) struct LatencyHistogram {
    buckets: [AtomicU64; FETCH_LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    /// Record one request that took `us` microseconds.
    pub(crate) fn observe(&self, us: u64) {
        let i = FETCH_LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_us: FETCH_LATENCY_BOUNDS_US.to_vec(),
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A copy of a latency histogram: `counts[i]` requests took at most `bounds_us[i]` (and more
/// than the bound before); the last count, one past the bounds, is the +Inf bucket. Counts are
/// per bucket, not cumulative (an exporter adds them up).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, in microseconds, ascending.
    pub bounds_us: Vec<u64>,
    /// Requests per bucket (`bounds_us.len() + 1` of them; the last is +Inf).
    pub counts: Vec<u64>,
    /// Sum of all latencies in microseconds.
    pub sum_us: u64,
    /// Requests observed.
    pub count: u64,
}

/// Bytes fetched from one origin (`scheme://host[:port]`, never a path or credentials).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginBytes {
    /// `scheme://host[:port]` (`file://` for local files).
    pub origin: String,
    /// A registry mirror (else the image's own server).
    pub mirror: bool,
    /// Bytes received from it by range reads.
    pub bytes: u64,
}

/// Counters, readable while the store runs.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) misses: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) bytes_fetched: AtomicU64,
    pub(crate) chunks_fetched: AtomicU64,
    pub(crate) verify_failures: AtomicU64,
    pub(crate) failed_ios: AtomicU64,
    pub(crate) fetch_micros_total: AtomicU64,
    pub(crate) fetch_micros_max: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) host_evicted: AtomicU64,
    pub(crate) verify_micros: AtomicU64,
    pub(crate) persist_micros: AtomicU64,
    pub(crate) background_chunks: AtomicU64,
    pub(crate) local_copies: AtomicU64,
    pub(crate) local_copy_bytes: AtomicU64,
    pub(crate) local_copy_stale: AtomicU64,
    pub(crate) local_reflinks: AtomicU64,
    pub(crate) fetch_latency: LatencyHistogram,
}

/// A point-in-time copy of the store's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Image identity.
    pub image: String,
    /// Reads served without fetching: filled in by the frontend, which sees every read (the
    /// store only sees the ones that miss); 0 from [`ChunkStore::stats`].
    pub hits: u64,
    /// Reads that had to wait for a fetch.
    pub misses: u64,
    /// Range requests sent (including retries).
    pub requests: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Compressed bytes received.
    pub bytes_fetched: u64,
    /// Chunks fetched and verified.
    pub chunks_fetched: u64,
    /// Chunks whose bytes failed verification.
    pub verify_failures: u64,
    /// Reads failed back to the frontend.
    pub failed_ios: u64,
    /// Mean range request latency in microseconds.
    pub fetch_latency_us_mean: u64,
    /// Max range request latency in microseconds.
    pub fetch_latency_us_max: u64,
    /// Chunks present (including all-zero chunks).
    pub present_chunks: u64,
    /// Chunks in the image.
    pub total_chunks: u64,
    /// Bytes of fetched (non-zero) chunks held in the cache.
    pub cached_bytes: u64,
    /// The cache limit in bytes (0: none).
    pub cache_limit: u64,
    /// Chunks evicted to stay under the limit (this store's or the host's).
    pub evicted_chunks: u64,
    /// Of those, chunks evicted to keep the cache root under the host cache limit.
    #[serde(default)]
    pub host_evicted_chunks: u64,
    /// Chunks fetched by prefetch or hydration.
    pub background_chunks: u64,
    /// Background work (prefetch list, hydration) has finished.
    pub background_done: bool,
    /// Frames of the image's metadata pack (0: the image has none).
    #[serde(default)]
    pub pack_frames: u64,
    /// Pack frames present.
    #[serde(default)]
    pub pack_frames_present: u64,
    /// Digest of the prefetch pack in use (its frames are then the pack frames counted
    /// above, in place of the metadata pack's).
    #[serde(default)]
    pub prefetch_pack: Option<String>,
    /// Range request latencies (every request, retries included).
    #[serde(default)]
    pub fetch_latency: HistogramSnapshot,
    /// Bytes received per origin and mirror (their sum is about `bytes_fetched`; reads at
    /// open, of the manifest and its companions, are not in either).
    #[serde(default)]
    pub fetched_by_origin: Vec<OriginBytes>,
    /// Chunks copied from another cache on this host (the host-wide chunk index) instead of
    /// fetched, each verified against this image's manifest.
    #[serde(default)]
    pub local_copies: u64,
    /// Raw bytes of those chunks.
    #[serde(default)]
    pub local_copy_bytes: u64,
    /// Host index entries found stale (the other cache's bytes short or not matching the
    /// digest, or its files gone) and dropped; those chunks were fetched instead. Not counted
    /// in `verify_failures`, which is about bytes from the network.
    #[serde(default)]
    pub local_copy_stale: u64,
    /// Of the local copies, the chunks that share the other cache's extents (a reflink,
    /// `FICLONERANGE`, on XFS or btrfs) instead of taking disk space of their own.
    #[serde(default)]
    pub local_reflinks: u64,
    /// Where the misses' time went: range requests, summed over requests (headers and
    /// body; several run at once, so this can exceed the wall time), in microseconds.
    #[serde(default)]
    pub network_us_total: u64,
    /// Decompressing, hashing and writing fetched chunks (the blocking pool, summed).
    #[serde(default)]
    pub verify_us_total: u64,
    /// Making them durable: `fdatasync` of the data and of the bitmap (group commits).
    #[serde(default)]
    pub persist_us_total: u64,
    /// What the reads that missed waited, summed over them (the frontend fills it in; 0 from
    /// [`ChunkStore::stats`]).
    #[serde(default)]
    pub miss_wait_us_total: u64,
    /// How long the attach took, step by step (the daemon fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<AttachTimes>,
}

/// What opening found in the cache.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenReport {
    /// The cache directory was created now.
    pub fresh: bool,
    /// Why an existing cache was discarded, if it was.
    pub discarded: Option<String>,
    /// Chunks re-verified because the cache was not closed cleanly.
    pub reverified: u64,
    /// Chunks found bad during re-verification (now fetched again on demand).
    pub dropped: u64,
    /// Open proceeded without reaching the remote (cache-only until it returns).
    pub offline: Option<String>,
    /// Digest of the prefetch pack in use, if any.
    #[serde(default)]
    pub prefetch_pack: Option<String>,
    /// For an image in a registry: the digest of the OCI manifest its reference resolved to
    /// (so the next daemon can pin it).
    #[serde(default)]
    pub resolved: Option<String>,
    /// How long each step of the open took (the store's part of [`AttachTimes`]).
    #[serde(default)]
    pub times: AttachTimes,
}

/// How long attaching a device took, step by step, in milliseconds: the store's open fills the
/// middle steps, the daemon the first and the last (`lazyblk status` shows them).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AttachTimes {
    /// From the start of the `lazyblk add` that spawned the daemon to the daemon's start (the
    /// CLI, fork and exec; 0 when not known, e.g. a daemon started by `recover`).
    pub exec_ms: u64,
    /// For an ordinary image: the spawning command's lookup of its lazy version in the
    /// registry (resolve, referrers); 0 for a lazyblk image.
    pub lazy_ms: u64,
    /// The daemon's own setup before it opens the store: its log, the kernel check, the
    /// state directory.
    pub setup_ms: u64,
    /// The store's runtime and HTTP client (TLS roots, connection pool).
    pub client_ms: u64,
    /// The manifest: fetched (for a registry reference: resolved, then fetched) or read from
    /// the cache's copy.
    pub manifest_ms: u64,
    /// Claiming the cache directory (its lock, its manifest copy).
    pub cache_dir_ms: u64,
    /// The blob's range probe, with the prefetch list and the prefetch pack in the same round
    /// trip when they did not go out with the manifest (a pinned manifest or pack).
    pub probe_ms: u64,
    /// The range probe of the prefetch pack's blob (0 without a pack).
    pub pack_probe_ms: u64,
    /// The data file and the bitmap: opened, re-verified or rebuilt.
    pub presence_ms: u64,
    /// The running store (its runtime, persister, background work).
    pub start_ms: u64,
    /// Between the open store and the device: the COW layer, the device record, signal
    /// handling, the first block for `--handover`.
    pub prepare_ms: u64,
    /// The ublk device: created, its queues started, live.
    pub device_ms: u64,
    /// All of it: from the start of `add` (or of the daemon when that is not known) to live.
    pub total_ms: u64,
}

impl AttachTimes {
    /// One line: `812 ms (exec 31, manifest 105, ..., other 40 ms each)`: steps of 0 ms are
    /// left out; `other` is the rest of the total (what no step covers).
    pub fn line(&self) -> String {
        let named = self.exec_ms
            + self.lazy_ms
            + self.setup_ms
            + self.client_ms
            + self.manifest_ms
            + self.cache_dir_ms
            + self.probe_ms
            + self.pack_probe_ms
            + self.presence_ms
            + self.start_ms
            + self.prepare_ms
            + self.device_ms;
        let steps = [
            ("exec", self.exec_ms),
            ("lazy version", self.lazy_ms),
            ("setup", self.setup_ms),
            ("client", self.client_ms),
            ("manifest", self.manifest_ms),
            ("cache dir", self.cache_dir_ms),
            ("probe+list+pack", self.probe_ms),
            ("pack probe", self.pack_probe_ms),
            ("presence", self.presence_ms),
            ("store start", self.start_ms),
            ("prepare", self.prepare_ms),
            ("device", self.device_ms),
            ("other", self.total_ms.saturating_sub(named)),
        ];
        let parts: Vec<String> = steps
            .iter()
            .filter(|(_, ms)| *ms > 0)
            .map(|(n, ms)| format!("{n} {ms}"))
            .collect();
        format!("{} ms ({} ms each)", self.total_ms, parts.join(", "))
    }
}

impl ChunkStore {
    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        let req = s.requests.load(Ordering::Relaxed);
        StatsSnapshot {
            image: self.inner.id.to_string(),
            hits: 0,
            misses: s.misses.load(Ordering::Relaxed),
            requests: req,
            retries: s.retries.load(Ordering::Relaxed),
            bytes_fetched: s.bytes_fetched.load(Ordering::Relaxed),
            chunks_fetched: s.chunks_fetched.load(Ordering::Relaxed),
            verify_failures: s.verify_failures.load(Ordering::Relaxed),
            failed_ios: s.failed_ios.load(Ordering::Relaxed),
            fetch_latency_us_mean: s.fetch_micros_total.load(Ordering::Relaxed) / req.max(1),
            fetch_latency_us_max: s.fetch_micros_max.load(Ordering::Relaxed),
            present_chunks: self
                .inner
                .present
                .count_below(self.inner.manifest.chunk_count()),
            total_chunks: self.inner.manifest.chunk_count(),
            cached_bytes: self.inner.cached_bytes.load(Ordering::Relaxed),
            cache_limit: self.inner.opts.cache_limit.unwrap_or(0),
            evicted_chunks: s.evicted.load(Ordering::Relaxed),
            host_evicted_chunks: s.host_evicted.load(Ordering::Relaxed),
            network_us_total: s.fetch_micros_total.load(Ordering::Relaxed),
            verify_us_total: s.verify_micros.load(Ordering::Relaxed),
            persist_us_total: s.persist_micros.load(Ordering::Relaxed),
            miss_wait_us_total: 0,
            background_chunks: s.background_chunks.load(Ordering::Relaxed),
            background_done: self.inner.background_done.load(Ordering::Relaxed),
            pack_frames: self.inner.manifest.frame_count(),
            pack_frames_present: {
                let f = self.inner.manifest.frame_units();
                self.inner.present.count_range(f.start, f.end)
            },
            prefetch_pack: self.report.prefetch_pack.clone(),
            fetch_latency: s.fetch_latency.snapshot(),
            fetched_by_origin: self
                .inner
                .remote
                .served()
                .into_iter()
                .map(|o| OriginBytes {
                    origin: o.origin,
                    mirror: o.mirror,
                    bytes: o.bytes,
                })
                .collect(),
            local_copies: s.local_copies.load(Ordering::Relaxed),
            local_copy_bytes: s.local_copy_bytes.load(Ordering::Relaxed),
            local_copy_stale: s.local_copy_stale.load(Ordering::Relaxed),
            local_reflinks: s.local_reflinks.load(Ordering::Relaxed),
            attach: None,
        }
    }
}

#[cfg(test)]
mod attach_tests {
    use super::AttachTimes;

    #[test]
    fn the_attach_line_names_each_step_and_the_rest() {
        let t = AttachTimes {
            exec_ms: 30,
            manifest_ms: 100,
            device_ms: 150,
            total_ms: 300,
            ..Default::default()
        };
        assert_eq!(
            t.line(),
            "300 ms (exec 30, manifest 100, device 150, other 20 ms each)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_whose_bound_is_not_below_it() {
        let h = LatencyHistogram::default();
        for us in [0, 1_000, 1_001, 7_000, 10_000_000, 10_000_001, u64::MAX / 4] {
            h.observe(us);
        }
        let s = h.snapshot();
        assert_eq!(s.counts.len(), FETCH_LATENCY_BOUNDS_US.len() + 1);
        assert_eq!(s.counts[0], 2, "0 and 1000 us are <= 1 ms");
        assert_eq!(s.counts[1], 1, "1001 us is in (1 ms, 2.5 ms]");
        assert_eq!(s.counts[3], 1, "7 ms is in (5 ms, 10 ms]");
        assert_eq!(s.counts[12], 1, "10 s is in the last finite bucket");
        assert_eq!(s.counts[13], 2, "beyond 10 s: +Inf");
        assert_eq!(s.count, 7);
        assert_eq!(s.counts.iter().sum::<u64>(), s.count);
    }
}
