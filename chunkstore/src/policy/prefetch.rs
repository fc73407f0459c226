//! Background fetching: the metadata or prefetch pack, the published prefetch list (with the
//! on-demand concurrency, in list order), and hydration (every chunk, rate-limited, yielding to
//! misses). It only chooses units; the fetch path does the rest.

use crate::prelude::*;

/// A hole between two chunks of a prefetch window is fetched too, so the two share one request,
/// when it stores at most this many bytes. Measured (bench run 20261122-064915): filling every
/// hole of up to 2 chunks made a W1 trace fetch 1,518 chunks for a list of 990 (35% of the
/// bytes wasted) on a link where 8 parallel requests hide the round trips anyway; only holes
/// that cost less than a few milliseconds of wire (all-zero or tiny chunks) are worth it.
pub(crate) const GAP_FILL_BYTES: u64 = 16 << 10;

impl ChunkStore {
    /// Start the background work the options ask for: the metadata pack or the prefetch pack
    /// in its place (`prefetch_pack`), then the published prefetch list (not with a prefetch
    /// pack), in order, then hydration when `hydrate` is set. Does nothing when there is none
    /// of them.
    pub fn start_default_background(&self) {
        let mut order: Vec<u64> = Vec::new();
        if self.inner.opts.prefetch_pack {
            order.extend(self.inner.manifest.frame_units());
        }
        // A prefetch pack brings the traced workload's blocks themselves; the chunk list (the
        // same kind of trace at chunk granularity) would then only add bytes and verification
        // CPU to the start it is meant to speed up, so it is left out (hydration, if asked
        // for, still fetches every chunk afterwards).
        if self.report.prefetch_pack.is_none() {
            order.extend(
                self.prefetch_list()
                    .into_iter()
                    .flatten()
                    .map(|&c| u64::from(c)),
            );
        } else if self.prefetch_list().is_some() {
            tracing::info!("prefetch pack in use: the published chunk list is not fetched ahead");
        }
        if !order.is_empty() || self.inner.opts.hydrate {
            self.start_background(order, self.inner.opts.hydrate, self.inner.opts.hydrate_rate);
        } else {
            self.inner.background_done.store(true, Ordering::SeqCst);
        }
    }

    /// Start background work: fetch `order` first, in order, then (with `hydrate`) every other
    /// missing chunk, at most `rate` bytes per second, always yielding to on-demand misses.
    /// `order` holds units: chunk indices, and `chunk_count + f` for frame `f` of the
    /// metadata pack.
    pub fn start_background(&self, order: Vec<u64>, hydrate: bool, rate: Option<u64>) {
        let inner = self.inner.clone();
        self.inner.handle.spawn(async move {
            inner.background_work(order, hydrate, rate).await;
        });
    }
}

impl Inner {
    /// Mark present the pack frames whose blocks all lie in present chunks: the data file
    /// already holds their verified bytes, so there is nothing to fetch (after a hydration, or
    /// a workload that read the chunks, a restart with the pack prefetch fetches nothing).
    pub(crate) fn adopt_frames(&self) {
        let Some(p) = &self.manifest.pack else {
            return;
        };
        let n = self.manifest.chunk_count();
        let cs = u64::from(self.manifest.chunk_size);
        let adopt: Vec<u64> = (0..p.frames.len())
            .filter(|&f| {
                !self.present.get(n + f as u64)
                    && p.frame_members(f)
                        .iter()
                        .all(|&b| self.present.get(u64::from(b) * PACK_BLOCK / cs))
            })
            .map(|f| n + f as u64)
            .collect();
        if !adopt.is_empty() {
            tracing::debug!("{} pack frames already present in the chunks", adopt.len());
            self.complete(&adopt, None);
        }
    }

    /// Background work: the published prefetch list `order` first, then (with `hydrate`)
    /// every other chunk.
    ///
    /// The list predicts the workload's own first reads, so it is fetched with the on-demand
    /// concurrency and without pausing for misses. Hydration is the opposite: few slots, at
    /// most `rate` bytes per second, and it pauses while on-demand misses happen.
    pub(crate) async fn background_work(
        self: Arc<Self>,
        order: Vec<u64>,
        hydrate: bool,
        rate: Option<u64>,
    ) {
        let n = self.manifest.chunk_count();
        let units = self.manifest.unit_count();
        self.adopt_frames();
        // The pack's frames first, streamed in order with a few requests of their own
        // (`pack_requests`); then the chunk list, with the on-demand concurrency.
        let (frames, chunks): (Vec<u64>, Vec<u64>) = order
            .into_iter()
            .filter(|&c| c < units)
            .partition(|&u| u >= n);
        if !frames.is_empty() {
            let slots = self.opts.pack_requests.max(1);
            let sem = Arc::new(tokio::sync::Semaphore::new(slots));
            let max_run = self.opts.pack_request_bytes.max(1);
            self.fetch_list(&frames, &sem, slots, max_run, None, false)
                .await;
        }
        if !chunks.is_empty() {
            let slots = self.opts.max_requests.max(1);
            let max_run = self.opts.max_request_bytes;
            self.fetch_list(&chunks, &self.prefetch_slots, slots, max_run, None, false)
                .await;
        }
        if hydrate && !self.shutdown.load(Ordering::Relaxed) {
            let all: Vec<u64> = (0..n).collect();
            let slots = opts_background(&self.opts);
            let max_run = self.opts.max_request_bytes;
            self.fetch_list(&all, &self.background, slots, max_run, rate, true)
                .await;
        }
        self.background_done.store(true, Ordering::SeqCst);
        if hydrate && self.present.count_below(n) == n {
            tracing::info!("hydration complete: the image is fully present, no network needed");
        } else {
            tracing::info!("prefetch complete");
        }
    }

    /// Fetch the missing chunks of `list`, in list order a window at a time, with at most
    /// `nslots` requests of `slots` in flight, each of at most `max_run` bytes; returns when
    /// they have all finished.
    ///
    /// Within a window, chunks are fetched in chunk (= blob) order and holes of up to
    /// [`GAP_FILL_BYTES`] between two listed ones are fetched too: a few more bytes in
    /// the same request cost less than another round trip.
    pub(crate) async fn fetch_list(
        self: &Arc<Self>,
        list: &[u64],
        slots: &Arc<tokio::sync::Semaphore>,
        nslots: usize,
        max_run: u64,
        rate: Option<u64>,
        yield_to_misses: bool,
    ) {
        // A window is 64 chunks, or 8 MiB of image when chunks are smaller: small chunks would
        // otherwise leave fewer neighbours to coalesce with in each window.
        let window = (64usize).max(((8u64 << 20) / u64::from(self.manifest.chunk_size)) as usize);
        let t0 = Instant::now();
        let mut sent = 0u64;
        let mut pos = 0;
        while pos < list.len() {
            if self.shutdown.load(Ordering::Relaxed) {
                break;
            }
            if yield_to_misses {
                // Wait until no on-demand miss happened for 50 ms.
                loop {
                    let last = self.last_miss_ms.load(Ordering::Relaxed);
                    if last == 0 || self.ms_since_open().saturating_sub(last) >= 50 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let batch = {
                let mut inflight = self.inflight.lock().expect("lock");
                if self.sealed.load(Ordering::SeqCst) {
                    break;
                }
                let missing = |c: u64, inflight: &HashMap<u64, Vec<Arc<Waiter>>>| {
                    !self.present.get(c) && !inflight.contains_key(&c)
                };
                let mut want = Vec::with_capacity(window);
                while pos < list.len() && want.len() < window {
                    let c = list[pos];
                    pos += 1;
                    if missing(c, &inflight) {
                        want.push(c);
                    }
                }
                want.sort_unstable();
                want.dedup();
                let mut batch: Vec<u64> = Vec::with_capacity(want.len());
                for c in want {
                    if let Some(&prev) = batch.last() {
                        let hole = prev + 1..c;
                        let small = hole
                            .clone()
                            .try_fold(0u64, |acc, h| {
                                let b =
                                    acc + self.unit_entry(h).map_or(0, |e| u64::from(e.stored_len));
                                (b <= GAP_FILL_BYTES).then_some(b)
                            })
                            .is_some();
                        if small && hole.clone().all(|h| missing(h, &inflight)) {
                            batch.extend(hole);
                        }
                    }
                    batch.push(c);
                }
                for &c in &batch {
                    inflight.insert(c, Vec::new());
                }
                batch
            };
            for run in self.make_runs_of(batch, false, true, max_run) {
                // Sealed meanwhile: the rest of the window is released, not fetched.
                let permit = slots.clone().acquire_owned().await.ok();
                let Some(permit) = permit.filter(|_| !self.sealed.load(Ordering::SeqCst)) else {
                    // Reserved chunks must not be left without a fetch or an outcome.
                    let none = vec![false; run.parts.len()];
                    self.fail_rest(&run, &none, Error::ShuttingDown);
                    continue;
                };
                sent += run.len;
                let inner = self.clone();
                self.handle
                    .spawn(async move { inner.fetch_run(run, Some(permit)).await });
                if let Some(r) = rate.filter(|&r| r > 0) {
                    let due = Duration::from_secs_f64(sent as f64 / r as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        // Wait for the last requests.
        let _all = slots.acquire_many(nslots as u32).await;
    }
}
