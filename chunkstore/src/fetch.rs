//! The fetch path: single flight (the inflight map and its waiters), grouping missing units into
//! coalesced runs, streamed range requests with retry and backoff until the IO deadline, and
//! completion (presence bits, persistence queue, waking the waiting reads). Verification of
//! what arrives is [`crate::verify`]; which chunks to ask for ahead of need is
//! [`crate::policy`].

use crate::prelude::*;

pub(crate) struct Waiter {
    pub(crate) remaining: AtomicUsize,
    pub(crate) error: Mutex<Option<BlockError>>,
    pub(crate) done: Mutex<Option<Completion>>,
}

impl Waiter {
    pub(crate) fn new(done: Completion) -> Arc<Waiter> {
        Arc::new(Waiter {
            remaining: AtomicUsize::new(1),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
        })
    }

    pub(crate) fn chunk_done(&self, err: Option<&BlockError>) {
        if let Some(e) = err {
            let mut slot = self.error.lock().expect("lock");
            if slot.is_none() {
                *slot = Some(e.duplicate());
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let err = self.error.lock().expect("lock").take();
            if let Some(done) = self.done.lock().expect("lock").take() {
                done(err.map_or(Ok(()), Err));
            }
        }
    }
}

/// A run of stored chunks fetched with one range request: `parts` are blob-adjacent, in blob
/// order, each one stored chunk (and the image chunks that share it).
pub(crate) struct Run {
    pub(crate) blob_offset: u64,
    pub(crate) len: u64,
    pub(crate) parts: Vec<(Entry, Vec<u64>)>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) background: bool,
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    let jittered = rand::thread_rng().gen_range(base / 2..=base);
    Duration::from_millis(jittered)
}

impl Inner {
    /// The pack frames (as units, a frame once per block of it) that serve the part of the
    /// read `offset..offset + len` that lies in chunk `c`, if that part lies wholly in
    /// metadata pack blocks. No allocation: `locate` asks on the read path.
    pub(crate) fn pack_units(
        &self,
        c: u64,
        offset: u64,
        len: u64,
    ) -> Option<impl Iterator<Item = u64> + '_> {
        let p = self.manifest.pack.as_ref()?;
        let start = offset.max(self.manifest.chunk_offset(c));
        let end =
            (offset + len).min(self.manifest.chunk_offset(c) + u64::from(self.manifest.chunk_size));
        let pos = p.covers(start / PACK_BLOCK, (end - 1) / PACK_BLOCK)?;
        let n = self.manifest.chunk_count();
        Some(pos.map(move |i| n + p.frame_of(i) as u64))
    }

    /// The stored entry behind a unit (`None` for an all-zero chunk).
    pub(crate) fn unit_entry(&self, u: u64) -> Option<Entry> {
        let n = self.manifest.chunk_count();
        if u >= n {
            return self
                .manifest
                .pack
                .as_ref()
                .map(|p| p.frames[(u - n) as usize]);
        }
        match self.manifest.chunk(u) {
            ChunkRef::Stored(e) => Some(*e),
            ChunkRef::Zero => None,
        }
    }

    pub(crate) fn fetch(self: &Arc<Self>, offset: u64, len: u64, done: Completion) {
        self.fetch_via(offset, len, done, true)
    }

    /// [`Inner::fetch`]; `frames`: whether a part of a missing chunk may be served by pack
    /// frames.
    pub(crate) fn fetch_via(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        done: Completion,
        frames: bool,
    ) {
        if let Err(e) = check_range(self.device_size, offset, len) {
            return done(Err(e));
        }
        if len == 0 || self.manifest.chunk_count() == 0 {
            return done(Ok(()));
        }
        let (first, last) = self.chunk_range(offset, len);
        if self.all_present(first, last) {
            return done(Ok(()));
        }
        // The units this read waits for: each missing chunk, or, where the read's part of a
        // missing chunk lies wholly in metadata pack blocks, the pack frames holding that part
        // (a metadata read never pulls in a chunk of file data, nor starts a readahead).
        let mut need: Vec<u64> = Vec::new();
        let mut chunk_miss: Option<(u64, u64)> = None;
        for i in first..=last {
            if self.present.get(i) {
                continue;
            }
            match frames.then(|| self.pack_units(i, offset, len)).flatten() {
                Some(units) => need.extend(units.filter(|&u| !self.present.get(u))),
                None => {
                    need.push(i);
                    chunk_miss = Some(chunk_miss.map_or((i, i), |(lo, _)| (lo, i)));
                }
            }
        }
        need.sort_unstable();
        need.dedup();
        if need.is_empty() {
            return done(Ok(()));
        }
        if self.shutdown.load(Ordering::Relaxed) || self.sealed.load(Ordering::SeqCst) {
            return done(Err(BlockError::ShuttingDown));
        }
        // Pack frames that cannot be had (corrupt, or a prefetch pack's blob replaced on the
        // server while its pinned copy stays in the cache) must not fail a read the chunks
        // can serve: the read is tried once more through the chunks alone. Not after a
        // deadline or an IO error: the chunks come from the same server and disk.
        let n = self.manifest.chunk_count();
        let done: Completion = if need.iter().any(|&u| u >= n) {
            let this = self.clone();
            Box::new(move |r| match r {
                Err(BlockError::Unavailable(e)) => {
                    tracing::warn!(
                        "pack frames for the read {offset}+{len} failed ({e}); reading its chunks instead"
                    );
                    this.fetch_via(offset, len, done, false);
                }
                r => done(r),
            })
        } else {
            done
        };
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.last_miss_ms
            .store(self.ms_since_open().max(1), Ordering::Relaxed);
        if let Some((lo, hi)) = chunk_miss {
            self.note_access(lo, hi);
        }
        let waiter = Waiter::new(done);
        let mut todo = Vec::new();
        {
            let mut inflight = self.inflight.lock().expect("lock");
            if self.sealed.load(Ordering::SeqCst) {
                // Sealed since the check above: `seal` may already have seen nothing in flight.
                drop(inflight);
                return waiter.chunk_done(Some(&BlockError::ShuttingDown));
            }
            for u in need {
                if self.present.get(u) {
                    continue;
                }
                waiter.remaining.fetch_add(1, Ordering::Relaxed);
                match inflight.entry(u) {
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        o.get_mut().push(waiter.clone())
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(vec![waiter.clone()]);
                        todo.push(u);
                    }
                }
            }
        }
        // The readahead goes into the same coalesced requests, after the demanded chunks in
        // blob order; `fetch_run` completes each chunk as soon as its own bytes are in, so the
        // readahead does not delay the read that missed.
        if let Some((lo, hi)) = chunk_miss {
            todo.extend(self.readahead_after_miss(lo, hi));
        }
        self.schedule(todo, true, false);
        waiter.chunk_done(None);
    }

    /// Reserve (mark in flight) the missing chunks in `from..=to`.
    pub(crate) fn reserve_missing(&self, from: u64, to: u64) -> Vec<u64> {
        let mut inflight = self.inflight.lock().expect("lock");
        if self.sealed.load(Ordering::SeqCst) {
            return Vec::new();
        }
        (from..=to)
            .filter(|&c| {
                !self.present.get(c) && {
                    match inflight.entry(c) {
                        std::collections::hash_map::Entry::Occupied(_) => false,
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(Vec::new());
                            true
                        }
                    }
                }
            })
            .collect()
    }

    /// Group chunks (already reserved in flight) into coalesced range requests and start them.
    pub(crate) fn schedule(
        self: &Arc<Self>,
        chunks: Vec<u64>,
        with_deadline: bool,
        background: bool,
    ) {
        for run in self.make_runs(chunks, with_deadline, background) {
            let inner = self.clone();
            self.handle
                .spawn(async move { inner.fetch_run(run, None).await });
        }
    }

    /// Group chunks (already reserved in flight) into runs of blob-adjacent stored chunks of
    /// at most `max_request_bytes`; all-zero chunks complete at once.
    pub(crate) fn make_runs(
        &self,
        chunks: Vec<u64>,
        with_deadline: bool,
        background: bool,
    ) -> Vec<Run> {
        self.make_runs_of(
            chunks,
            with_deadline,
            background,
            self.opts.max_request_bytes,
        )
    }

    /// [`Inner::make_runs`] with runs of at most `max_bytes` (a single larger unit is still
    /// one run).
    pub(crate) fn make_runs_of(
        &self,
        chunks: Vec<u64>,
        with_deadline: bool,
        background: bool,
        max_bytes: u64,
    ) -> Vec<Run> {
        let mut by_offset: BTreeMap<u64, (Entry, Vec<u64>)> = BTreeMap::new();
        for c in chunks {
            match self.unit_entry(c) {
                Some(e) => by_offset
                    .entry(e.blob_offset)
                    .or_insert((e, vec![]))
                    .1
                    .push(c),
                None => self.complete(&[c], None),
            }
        }
        let deadline = if with_deadline {
            self.opts.io_deadline.map(|d| Instant::now() + d)
        } else {
            None
        };
        let mut runs: Vec<Run> = Vec::new();
        for (off, (e, cs)) in by_offset {
            let len = u64::from(e.stored_len);
            match runs.last_mut() {
                Some(r) if r.blob_offset + r.len == off && r.len + len <= max_bytes => {
                    r.len += len;
                    r.parts.push((e, cs));
                }
                _ => runs.push(Run {
                    blob_offset: off,
                    len,
                    parts: vec![(e, cs)],
                    deadline,
                    background,
                }),
            }
        }
        runs
    }

    /// Fetch a run: the parts another cache on this host holds are copied from it
    /// ([`crate::hostindex`]), the rest fetched from the network, one request slot (the
    /// `permit`, else an on-demand one) for the run's requests one after the other.
    pub(crate) async fn fetch_run(self: Arc<Self>, run: Run, permit: Option<OwnedSemaphorePermit>) {
        let runs = self.copy_local(run).await;
        if runs.is_empty() {
            return;
        }
        let _permit = match permit {
            Some(p) => p,
            None => match self.requests.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => {
                    for r in &runs {
                        self.fail_rest(r, &vec![false; r.parts.len()], Error::ShuttingDown);
                    }
                    return;
                }
            },
        };
        for r in runs {
            self.fetch_remote(r).await;
        }
    }

    /// Fetch a run with one streamed range request. Each part is verified and stored (on a
    /// blocking thread, off the async workers) and its chunks completed as soon as its own
    /// bytes have arrived, so the first chunk of a long run is ready after one round trip plus
    /// its own transfer. A retry asks only for the parts not yet stored.
    async fn fetch_remote(self: &Arc<Self>, run: Run) {
        let run = Arc::new(run);
        let mut done = vec![false; run.parts.len()];
        let mut attempt = 0u32;
        let mut corrupt = 0u32;
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return self.fail_rest(&run, &done, Error::ShuttingDown);
            }
            let (Some(lo), Some(hi)) =
                (done.iter().position(|d| !d), done.iter().rposition(|d| !d))
            else {
                return;
            };
            let start = run.parts[lo].0.blob_offset;
            let end = run.parts[hi].0.blob_offset + u64::from(run.parts[hi].0.stored_len);
            let t0 = Instant::now();
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut jobs = Vec::new();
            let got = {
                let mut buf = BytesMut::new();
                let mut next = lo;
                let (this, parts, skip) = (self, &run, &done);
                let mut sink = |piece: Bytes| {
                    this.stats
                        .bytes_fetched
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&piece);
                    while next <= hi && buf.len() >= parts.parts[next].0.stored_len as usize {
                        let bytes = buf.split_to(parts.parts[next].0.stored_len as usize);
                        if !skip[next] {
                            let (inner, r, i) = (this.clone(), parts.clone(), next);
                            let job = this
                                .handle
                                .spawn_blocking(move || inner.store_part_ranked(&r, i, &bytes));
                            jobs.push((i, job));
                        }
                        next += 1;
                    }
                };
                self.remote
                    .read_range_with(start, end - start, &mut sink)
                    .await
            };
            let micros = t0.elapsed().as_micros() as u64;
            self.stats
                .fetch_micros_total
                .fetch_add(micros, Ordering::Relaxed);
            self.stats
                .fetch_micros_max
                .fetch_max(micros, Ordering::Relaxed);
            self.stats.fetch_latency.observe(micros);
            let mut fatal = None;
            let mut bad = None;
            for (i, job) in jobs {
                match job.await {
                    Ok(Ok(())) => done[i] = true,
                    Ok(Err(e @ (Error::ChunkCorrupt { .. } | Error::PackCorrupt { .. }))) => {
                        bad = Some(e)
                    }
                    Ok(Err(e)) => fatal = Some(e),
                    Err(e) => fatal = Some(Error::Invalid(format!("store task failed: {e}"))),
                }
            }
            if let Some(e) = fatal {
                return self.fail_rest(&run, &done, e);
            }
            if done.iter().all(|d| *d) {
                return;
            }
            let err = if let Some(e) = bad {
                self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                self.remote.report_corrupt();
                corrupt += 1;
                tracing::warn!("{e} (attempt {corrupt} of {})", self.opts.corrupt_attempts);
                if corrupt >= self.opts.corrupt_attempts {
                    return self.fail_rest(&run, &done, e);
                }
                e.to_string()
            } else {
                match got {
                    Err(e) if e.is_transient() => {
                        tracing::warn!("transient fetch failure, will retry: {e}");
                        e.to_string()
                    }
                    Err(e) => return self.fail_rest(&run, &done, e.into()),
                    Ok(()) => "the range ended early".to_string(),
                }
            };
            let pause = backoff(attempt);
            if let Some(d) = run.deadline {
                if Instant::now() + pause >= d {
                    let secs = self.opts.io_deadline.map_or(0, |d| d.as_secs());
                    let left = done.iter().filter(|d| !**d).count();
                    tracing::error!("giving up on {left} chunk(s) after {secs}s: {err}");
                    return self.fail_rest(&run, &done, Error::Deadline { secs, last: err });
                }
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            tokio::time::sleep(pause).await;
        }
    }

    /// Fail the chunks of the parts of `run` not yet stored.
    pub(crate) fn fail_rest(&self, run: &Run, done: &[bool], e: Error) {
        if !matches!(e, Error::ShuttingDown) {
            tracing::error!(
                "fetch of blob range {}+{} failed: {e}",
                run.blob_offset,
                run.len
            );
        }
        let be: BlockError = e.into();
        let chunks: Vec<u64> = run
            .parts
            .iter()
            .zip(done)
            .filter(|(_, d)| !**d)
            .flat_map(|((_, c), _)| c.iter().copied())
            .collect();
        self.complete(&chunks, Some(&be));
    }

    /// Finish chunks: mark present (on success), queue persistence, wake waiters.
    pub(crate) fn complete(&self, chunks: &[u64], err: Option<&BlockError>) {
        self.complete_as(chunks, err, true)
    }

    /// [`Inner::complete`]; `fetched`: count the chunks as fetched (not for local copies).
    pub(crate) fn complete_as(&self, chunks: &[u64], err: Option<&BlockError>, fetched: bool) {
        if err.is_none() {
            let n = self.manifest.chunk_count();
            let mut bytes = 0u64;
            let mut frames = 0;
            let now = now_ms();
            for &c in chunks {
                self.touch(c, now);
                let was = self.present.test_and_set(c);
                if c < n && self.opts.cache_limit.is_some() {
                    // A second chance on the clock: the read that waited for this chunk has
                    // not touched it yet, and must find it present.
                    self.referenced.set(c);
                }
                if c >= n {
                    frames += 1;
                } else if !was && self.manifest.chunk(c) != ChunkRef::Zero {
                    bytes += u64::from(self.manifest.chunk_len(c));
                }
            }
            self.cached_bytes.fetch_add(bytes, Ordering::Relaxed);
            if fetched {
                self.stats
                    .chunks_fetched
                    .fetch_add(chunks.len() as u64 - frames, Ordering::Relaxed);
            }
            self.persist.queue(&self.handle, chunks);
        }
        let waiters: Vec<Arc<Waiter>> = {
            let mut inflight = self.inflight.lock().expect("lock");
            chunks
                .iter()
                .flat_map(|c| inflight.remove(c).unwrap_or_default())
                .collect()
        };
        if err.is_some() {
            self.stats
                .failed_ios
                .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        }
        for w in waiters {
            w.chunk_done(err);
        }
    }
}
