//! [`ChunkStore`]: a verified, crash-consistent local cache of one image, and its public face.
//!
//! A cache directory per image (`<cache root>/<manifest sha256>/`) holds `manifest` (a copy),
//! `data` (a sparse file the size of the image, chunk `i` at offset `i * chunk_size`), `bitmap`
//! (see [`crate::bitmap`]), `meta.json` and `lock`; with a [prefetch pack](PrefetchPack) in
//! use, also the pack (`prefetch.pack`), which then decides the bitmap's layout.
//!
//! A miss runs: fetch (coalesced range request) -> verify (decompress, BLAKE3) -> `pwrite` into
//! `data` -> set the in-memory presence bit and wake waiters -> (group commit, on the persister
//! thread) `fdatasync(data)` -> set the on-disk bit -> `fdatasync(bitmap)`. A bit on disk
//! therefore only ever covers verified data that was durable before the bit was written. Misses
//! on the same chunk share one fetch (single-flight); misses on different chunks run in parallel
//! up to `max_requests` range requests.
//!
//! This file holds the shared state ([`Inner`]) and the store's lifetime (close, seal); the
//! steps of [`ChunkStore::open`] are in [`crate::open`], the fetch path in [`crate::fetch`] and
//! [`crate::verify`], the policies in [`crate::policy`], the persister in [`crate::persist`].

use crate::prelude::*;

/// Block size exposed to frontends; the data file is rounded up to it.
pub const BLOCK_SIZE: u32 = 4096;

pub(crate) struct Inner {
    pub(crate) id: ImageId,
    pub(crate) manifest: Manifest,
    pub(crate) dir: PathBuf,
    pub(crate) data_path: PathBuf,
    pub(crate) data: File,
    /// How `data` stands to the page cache (decided once, at open): on a disk, the ranges the
    /// store wrote (once durable) or read in bulk are dropped from it, since the kernel caches
    /// the device's blocks above the frontend already.
    pub(crate) page_cache: PageCachePolicy,
    pub(crate) device_size: u64,
    /// Presence of units: chunks `0..n`, then the metadata pack's frames `n..n + frames`.
    pub(crate) present: Arc<AtomicBits>,
    pub(crate) inflight: Mutex<HashMap<u64, Vec<Arc<Waiter>>>>,
    pub(crate) remote: Box<dyn Remote>,
    /// Slots of on-demand requests (misses and their readahead).
    pub(crate) requests: Arc<tokio::sync::Semaphore>,
    /// Slots of the published prefetch list.
    pub(crate) prefetch_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) opts: StoreOptions,
    pub(crate) stats: Stats,
    /// Group commit of presence bits ([`crate::persist`]).
    pub(crate) persist: Arc<Persister>,
    /// The on-disk bitmap (`None` once closed).
    pub(crate) bitmap: Arc<Mutex<Option<BitmapFile>>>,
    pub(crate) shutdown: AtomicBool,
    /// Set by [`ChunkStore::seal`]: no new fetch or eviction starts (checked under the
    /// `inflight` lock, and under the bitmap lock for evictions).
    pub(crate) sealed: AtomicBool,
    pub(crate) handle: tokio::runtime::Handle,
    /// Clock "referenced" bits for eviction.
    pub(crate) referenced: AtomicBits,
    /// Chunks accessed since open, and their first-access order (for `lazyblk trace`).
    pub(crate) accessed: AtomicBits,
    pub(crate) trace: Mutex<Vec<u32>>,
    /// Bytes of present non-zero chunks.
    pub(crate) cached_bytes: AtomicU64,
    /// Slots of hydration.
    pub(crate) background: Arc<tokio::sync::Semaphore>,
    pub(crate) background_done: AtomicBool,
    pub(crate) epoch: Instant,
    pub(crate) last_miss_ms: AtomicU64,
    pub(crate) prefetch_list: Option<Vec<u32>>,
    pub(crate) readahead: Mutex<Readahead>,
    /// Chunks whose first read starts the next readahead window of a stream.
    pub(crate) ra_trigger: AtomicBits,
    /// The 4 KiB blocks read since open (for `lazyblk trace --blocks`).
    pub(crate) touched: AtomicBits,
    /// Copies of this image's chunks in the other caches of the cache root (`None`: off).
    pub(crate) host_index: Option<HostIndex>,
    /// When each chunk was last used (read or stored), in [`now_ms`] milliseconds: the order of
    /// the host cache limit ([`crate::policy::hostlimit`]).
    pub(crate) atime: Box<[AtomicU64]>,
    /// A use was recorded since the atime file was last written.
    pub(crate) atime_dirty: AtomicBool,
    /// Evicted chunks waiting for their grace period before their bytes are punched.
    pub(crate) doomed: Doomed,
    /// Local copies are tried as reflinks first (cleared the first time the file system says
    /// it cannot: ext4, tmpfs).
    pub(crate) reflinks: AtomicBool,
}

impl Inner {
    /// The state of a store about to serve: the image `id` with the manifest `m` as the store
    /// uses it, its cache in `dir` with the presence `p` found there, reading `remote`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: ImageId,
        m: Manifest,
        dir: PathBuf,
        p: crate::open::Presence,
        remote: Box<dyn Remote>,
        opts: StoreOptions,
        handle: &tokio::runtime::Handle,
        prefetch_list: Option<Vec<u32>>,
        bitmap: BitmapFile,
    ) -> Result<Inner> {
        let n = m.chunk_count();
        let host_index = opts.host_index.then(|| HostIndex::new(&dir));
        // Present chunks were last used when the atime file (or the bitmap's mtime) says;
        // absent ones never.
        let atime = read_atimes(&dir, n)
            .0
            .into_iter()
            .enumerate()
            .map(|(i, t)| AtomicU64::new(if p.present.get(i as u64) { t } else { 0 }))
            .collect();
        let bitmap = Arc::new(Mutex::new(Some(bitmap)));
        let data_path = p.data_path;
        // A second descriptor of the data file for the persister's `fdatasync`.
        let data_fd = p.data.try_clone().map_err(|e| Error::io(&data_path, e))?;
        let present = Arc::new(p.present);
        let persist = Arc::new(Persister::new(
            data_fd,
            data_path.clone(),
            bitmap.clone(),
            present.clone(),
        ));
        Ok(Inner {
            id,
            manifest: m,
            dir,
            data_path,
            page_cache: lazyblk_blocksource::fsutil::page_cache_policy(p.data.as_raw_fd()),
            data: p.data,
            device_size: p.device_size,
            present,
            inflight: Mutex::new(HashMap::new()),
            remote,
            requests: Arc::new(tokio::sync::Semaphore::new(opts.max_requests.max(1))),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(opts.max_requests.max(1))),
            background: Arc::new(tokio::sync::Semaphore::new(opts_background(&opts))),
            opts,
            stats: Stats::default(),
            persist,
            bitmap,
            shutdown: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            handle: handle.clone(),
            referenced: AtomicBits::new(n),
            accessed: AtomicBits::new(n),
            trace: Mutex::new(Vec::new()),
            cached_bytes: AtomicU64::new(p.cached),
            background_done: AtomicBool::new(false),
            epoch: Instant::now(),
            last_miss_ms: AtomicU64::new(0),
            prefetch_list,
            readahead: Mutex::new(Readahead::default()),
            ra_trigger: AtomicBits::new(n),
            touched: AtomicBits::new(p.device_size / u64::from(BLOCK_SIZE)),
            host_index,
            reflinks: AtomicBool::new(true),
            atime,
            atime_dirty: AtomicBool::new(false),
            doomed: Doomed::default(),
        })
    }
}

/// A verified, crash-consistent local cache of one image, fetching missing chunks on demand.
pub struct ChunkStore {
    pub(crate) inner: Arc<Inner>,
    pub(crate) report: OpenReport,
    pub(crate) bitmap: Arc<Mutex<Option<BitmapFile>>>,
    pub(crate) maintenance: Option<std::thread::JoinHandle<()>>,
    pub(crate) runtime: Option<tokio::runtime::Runtime>,
    pub(crate) manifest_bytes: Vec<u8>,
    pub(crate) _lock: File,
}

impl ChunkStore {
    /// The image identity.
    pub fn id(&self) -> ImageId {
        self.inner.id
    }

    /// The manifest as the store uses it: with a prefetch pack in use, the pack's frames
    /// stand in for the metadata pack's (see [`PrefetchPack::apply`]).
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// The image's manifest as published (its SHA-256 is [`ChunkStore::id`]).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// What opening found.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Whether chunk `i` is present.
    pub fn chunk_present(&self, i: u64) -> bool {
        self.inner.present.get(i)
    }

    /// The chunks read since open, in first-access order (what `lazyblk trace` records).
    pub fn access_trace(&self) -> Vec<u32> {
        self.inner.trace.lock().expect("lock").clone()
    }

    /// The 4 KiB blocks read since open, ascending (what `lazyblk trace --blocks` records: the
    /// blocks a workload needs, for `lazyblk build --pack-blocks`).
    pub fn block_trace(&self) -> Vec<u32> {
        self.inner
            .touched
            .ones()
            .into_iter()
            .map(|b| b as u32)
            .collect()
    }

    /// The prefetch list published with the image, if one was found.
    pub fn prefetch_list(&self) -> Option<&[u32]> {
        self.inner.prefetch_list.as_deref()
    }

    /// Write the whole image (fetching what is missing, verified) to `out`, then fsync it.
    pub fn export(&self, out: &Path) -> Result<()> {
        use std::io::Write;
        let mut f = std::io::BufWriter::with_capacity(
            4 << 20,
            File::create(out).map_err(|e| Error::io(out, e))?,
        );
        let size = self.inner.manifest.image_size;
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(buf.len() as u64) as usize;
            BlockSource::read_at(self, at, &mut buf[..n])
                .map_err(|e| Error::Invalid(format!("reading the image at {at}: {e}")))?;
            self.inner.drop_cached(at, n as u64);
            f.write_all(&buf[..n]).map_err(|e| Error::io(out, e))?;
            at += n as u64;
        }
        let file = f.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(out, e))?;
        // The copy's pages are clean now; on a disk, do not keep a second image in memory.
        if lazyblk_blocksource::fsutil::page_cache_policy(file.as_raw_fd()).drops() {
            let _ = lazyblk_blocksource::fsutil::drop_cached(file.as_raw_fd(), 0, 0);
        }
        Ok(())
    }

    /// Wait until every chunk fetched so far is durable and recorded in the on-disk bitmap.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Hand the cache over while the store stays open (`lazyblk detach` does this before the
    /// next daemon opens it): stop fetching and evicting for good, let the fetches under way
    /// land (for at most `drain`), make everything durable and mark the on-disk bitmap clean,
    /// so that the next process trusts the cache without re-verifying it.
    ///
    /// Afterwards present data still reads; a miss fails with `ShuttingDown`. A fetch still
    /// under way after `drain` (an outage) that lands later sets its bit in place: the
    /// checksum then no longer matches and the next open re-verifies, which is safe. Returns
    /// how many units were still in flight when the bitmap was marked clean (0: drained).
    pub fn seal(&self, drain: Duration) -> Result<usize> {
        let inner = &self.inner;
        inner.sealed.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        let in_flight = loop {
            let n = inner.inflight.lock().expect("lock").len();
            if n == 0 || t0.elapsed() >= drain {
                break n;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if in_flight > 0 {
            tracing::warn!(
                "seal: {in_flight} chunk(s) still in flight after {drain:?}; if they land, the next open re-verifies the cache"
            );
        }
        self.inner.flush()?;
        self.inner
            .data
            .sync_data()
            .map_err(|e| Error::io(&self.inner.data_path, e))?;
        if let Some(b) = self.bitmap.lock().expect("lock").as_mut() {
            b.mark_clean()?;
        }
        Ok(in_flight)
    }

    /// The store's async runtime (one worker thread by default), for a daemon's own small tasks
    /// (its control socket, signals): a device then needs no thread of its own for them.
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.inner.handle.clone()
    }

    /// Path of the data file (present chunks at their image offsets).
    pub fn data_path(&self) -> &Path {
        &self.inner.data_path
    }
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.shutdown.store(true, Ordering::SeqCst);
        if let Some(h) = self.maintenance.take() {
            let _ = h.join();
        }
        inner.punch_due();
        if matches!(host_limit(inner.cache_root()), Ok(Some(_))) {
            inner.publish_atimes(!inner.dir.join(ATIME_FILE).exists());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        // Fail whatever still waits.
        let waiters: Vec<_> = inner
            .inflight
            .lock()
            .expect("lock")
            .drain()
            .flat_map(|(_, w)| w)
            .collect();
        for w in waiters {
            w.chunk_done(Some(&BlockError::ShuttingDown));
        }
        // The last persist round (on the runtime's blocking pool, which outlives a shutdown
        // that timed out) ends, then whatever is still pending is written here.
        inner.persist.close();
        let ok = inner
            .persist
            .state
            .lock()
            .expect("lock")
            .last_error
            .is_none();
        if let Some(b) = self.bitmap.lock().expect("lock").take() {
            if ok && inner.data.sync_data().is_ok() {
                if let Err(e) = b.close_clean() {
                    tracing::warn!("closing the bitmap: {e}");
                }
            }
        }
    }
}

impl Inner {
    pub(crate) fn ms_since_open(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}
