//! The chunk store: a verified, crash-consistent local cache of one image.
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

use crate::bitmap::{BitmapFile, Trust};
use crate::error::{Error, Result};
use crate::format::{
    ChunkRef, Encoding, Entry, ImageId, Manifest, PrefetchPack, PACK_BLOCK, PACK_FILE,
};
use crate::remote::{Concat, Connector, HttpOptions, Location, Remote, RemoteError};
use bitvec::prelude::*;
use bytes::{Bytes, BytesMut};
use lazyblk_blocksource::{check_range, BlockError, BlockSource, Completion, Geometry, Located};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

/// Block size exposed to frontends; the data file is rounded up to it.
pub const BLOCK_SIZE: u32 = 4096;
/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Options of [`ChunkStore::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Directory holding one cache directory per image.
    pub cache_root: PathBuf,
    /// When set, the manifest must have this digest.
    pub expected_id: Option<ImageId>,
    /// When set, the [prefetch pack](PrefetchPack) published next to the manifest must have
    /// this digest (and must be there, or cached). Without it, a published pack is used only
    /// when the manifest is not pinned either (it is then trusted as far as the manifest is).
    pub expected_pack: Option<ImageId>,
    /// HTTP tunables.
    pub http: HttpOptions,
    /// Range requests in flight at once.
    pub max_requests: usize,
    /// Largest coalesced range request.
    pub max_request_bytes: u64,
    /// Bytes fetched ahead of a miss: the first readahead window, rounded up to whole chunks
    /// (0: no readahead). Reads that go on sequentially double the window, up to
    /// `readahead_max_bytes`. In bytes, not chunks, so a setting means the same on images of
    /// any chunk size.
    pub readahead_bytes: u64,
    /// Largest readahead window, in bytes (rounded up to whole chunks).
    pub readahead_max_bytes: u64,
    /// How long a read may wait for a missing chunk while the remote fails transiently;
    /// `None` retries forever.
    pub io_deadline: Option<Duration>,
    /// Fetcher threads.
    pub fetch_threads: usize,
    /// Number of attempts at a chunk whose bytes fail verification before giving up.
    pub corrupt_attempts: u32,
    /// Keep at most this many bytes of fetched chunks; cold chunks are evicted (they can be
    /// fetched again). `None`: no limit.
    pub cache_limit: Option<u64>,
    /// How long an evicted chunk's bytes stay readable before its space is reclaimed, so a read
    /// that located the chunk just before the eviction still reads valid data.
    pub evict_grace: Duration,
    /// Range requests in flight for hydration, on top of `max_requests`, so on-demand misses
    /// never queue behind it. (A published prefetch list predicts the workload's own misses
    /// and gets `max_requests` slots of its own.)
    pub background_requests: usize,
    /// Fetch the prefetch list published next to the manifest, if any.
    pub use_prefetch_list: bool,
    /// Fetch the image's metadata pack (if it has one) as soon as background work starts,
    /// ahead of the prefetch list. Without it, pack frames are still fetched on demand: a
    /// read that lies wholly in pack blocks always waits for (and is served from) the pack.
    pub prefetch_pack: bool,
    /// Background policy for [`ChunkStore::start_default_background`]: after the prefetch list,
    /// fetch every remaining chunk.
    pub hydrate: bool,
    /// Hydration rate limit in bytes per second (`None`: unlimited).
    pub hydrate_rate: Option<u64>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_root: PathBuf::from("/var/cache/lazyblk"),
            expected_id: None,
            expected_pack: None,
            http: HttpOptions::default(),
            max_requests: 8,
            max_request_bytes: 2 << 20,
            readahead_bytes: 512 << 10,
            readahead_max_bytes: 4 << 20,
            io_deadline: Some(Duration::from_secs(300)),
            fetch_threads: 2,
            corrupt_attempts: 3,
            cache_limit: None,
            evict_grace: Duration::from_secs(10),
            background_requests: 2,
            use_prefetch_list: true,
            prefetch_pack: true,
            hydrate: false,
            hydrate_rate: None,
        }
    }
}

/// Counters, readable while the store runs.
#[derive(Default)]
struct Stats {
    misses: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    bytes_fetched: AtomicU64,
    chunks_fetched: AtomicU64,
    verify_failures: AtomicU64,
    failed_ios: AtomicU64,
    fetch_micros_total: AtomicU64,
    fetch_micros_max: AtomicU64,
    evicted: AtomicU64,
    background_chunks: AtomicU64,
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
    /// Chunks evicted to stay under the limit.
    pub evicted_chunks: u64,
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
}

#[derive(Serialize, Deserialize, Default)]
struct Meta {
    manifest: String,
    blob: String,
    etag: Option<String>,
}

/// Lock-free presence bits for the hot path.
struct AtomicBits(Vec<AtomicU64>);

impl AtomicBits {
    fn new(n: u64) -> Self {
        AtomicBits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }
    fn set(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
    }
    /// Set bit `i`; returns whether it was already set.
    fn test_and_set(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel) & (1 << (i % 64)) != 0
    }
    /// Clear bit `i`; returns whether it was set.
    fn test_and_clear(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel) & (1 << (i % 64))
            != 0
    }
    fn clear(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
    }
    /// Set bits `lo..=hi` (a word at a time, skipping words already set).
    fn set_range(&self, lo: u64, hi: u64) {
        let (wlo, whi) = (lo / 64, hi / 64);
        for w in wlo..=whi {
            let from = if w == wlo { lo % 64 } else { 0 };
            let to = if w == whi { hi % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - (to - from))) << from;
            let word = &self.0[w as usize];
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
    }
    /// The indices of the bits set, ascending.
    fn ones(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.0.iter().enumerate() {
            let mut v = w.load(Ordering::Relaxed);
            while v != 0 {
                out.push(i as u64 * 64 + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        }
        out
    }
    /// Bits set among `from..to`.
    fn count_range(&self, from: u64, to: u64) -> u64 {
        (from..to).filter(|&i| self.get(i)).count() as u64
    }
    /// Bits set below `n`.
    fn count_below(&self, n: u64) -> u64 {
        let full = (n / 64) as usize;
        let whole: u64 = self.0[..full]
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        whole + self.count_range(full as u64 * 64, n)
    }
}

struct Waiter {
    remaining: AtomicUsize,
    error: Mutex<Option<BlockError>>,
    done: Mutex<Option<Completion>>,
}

impl Waiter {
    fn new(done: Completion) -> Arc<Waiter> {
        Arc::new(Waiter {
            remaining: AtomicUsize::new(1),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
        })
    }

    fn chunk_done(&self, err: Option<&BlockError>) {
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

#[derive(Default)]
struct Persist {
    pending: Vec<u64>,
    queued: u64,
    persisted: u64,
    shutdown: bool,
    last_error: Option<String>,
}

/// A run of stored chunks fetched with one range request: `parts` are blob-adjacent, in blob
/// order, each one stored chunk (and the image chunks that share it).
struct Run {
    blob_offset: u64,
    len: u64,
    parts: Vec<(Entry, Vec<u64>)>,
    deadline: Option<Instant>,
    background: bool,
}

/// A hole between two chunks of a prefetch window is fetched too, so the two share one request,
/// when it stores at most this many bytes. Measured (bench run 20261122-064915): filling every
/// hole of up to 2 chunks made a W1 trace fetch 1,518 chunks for a list of 990 (35% of the
/// bytes wasted) on a link where 8 parallel requests hide the round trips anyway; only holes
/// that cost less than a few milliseconds of wire (all-zero or tiny chunks) are worth it.
const GAP_FILL_BYTES: u64 = 16 << 10;

/// One sequential reader seen by the readahead logic.
#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// Last chunk scheduled for this stream.
    end: u64,
    /// Current window, in chunks (0: unused slot).
    window: u64,
    /// Chunk whose first read schedules the next window (asynchronous readahead).
    trigger: u64,
}

/// Readahead state: a few concurrent sequential streams, replaced round robin.
#[derive(Default)]
struct Readahead {
    streams: [Stream; 4],
    victim: usize,
}

struct Inner {
    id: ImageId,
    manifest: Manifest,
    dir: PathBuf,
    data_path: PathBuf,
    data: File,
    device_size: u64,
    /// Presence of units: chunks `0..n`, then the metadata pack's frames `n..n + frames`.
    present: AtomicBits,
    inflight: Mutex<HashMap<u64, Vec<Arc<Waiter>>>>,
    remote: Box<dyn Remote>,
    /// Slots of on-demand requests (misses and their readahead).
    requests: Arc<tokio::sync::Semaphore>,
    /// Slots of the published prefetch list.
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    opts: StoreOptions,
    stats: Stats,
    persist: Mutex<Persist>,
    persist_cv: Condvar,
    shutdown: AtomicBool,
    /// Set by [`ChunkStore::seal`]: no new fetch or eviction starts (checked under the
    /// `inflight` lock, and under the bitmap lock for evictions).
    sealed: AtomicBool,
    handle: tokio::runtime::Handle,
    /// Clock "referenced" bits for eviction.
    referenced: AtomicBits,
    /// Chunks accessed since open, and their first-access order (for `lazyblk trace`).
    accessed: AtomicBits,
    trace: Mutex<Vec<u32>>,
    /// Bytes of present non-zero chunks.
    cached_bytes: AtomicU64,
    /// Slots of hydration.
    background: Arc<tokio::sync::Semaphore>,
    background_done: AtomicBool,
    epoch: Instant,
    last_miss_ms: AtomicU64,
    prefetch_list: Option<Vec<u32>>,
    readahead: Mutex<Readahead>,
    /// Chunks whose first read starts the next readahead window of a stream.
    ra_trigger: AtomicBits,
    /// The 4 KiB blocks read since open (for `lazyblk trace --blocks`).
    touched: AtomicBits,
}

/// A verified, crash-consistent local cache of one image, fetching missing chunks on demand.
pub struct ChunkStore {
    inner: Arc<Inner>,
    report: OpenReport,
    bitmap: Arc<Mutex<Option<BitmapFile>>>,
    persister: Option<std::thread::JoinHandle<()>>,
    maintenance: Option<std::thread::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    manifest_bytes: Vec<u8>,
    _lock: File,
}

fn lock_dir(dir: &Path) -> Result<File> {
    let p = dir.join("lock");
    lazyblk_blocksource::fsutil::lock_exclusive(&p)
        .map_err(|e| Error::io(&p, e))?
        .ok_or_else(|| Error::Cache {
            path: dir.to_path_buf(),
            detail: "in use by another lazyblk process".into(),
        })
}

fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    let jittered = rand::thread_rng().gen_range(base / 2..=base);
    Duration::from_millis(jittered)
}

impl ChunkStore {
    /// Open (or create) the cache for the image whose manifest is at `manifest`.
    pub fn open(manifest: &Location, opts: StoreOptions) -> Result<ChunkStore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.fetch_threads.max(1))
            // Verifying and writing chunks (zstd + BLAKE3 + pwrite) runs on the blocking pool:
            // CPU-bound, so no more threads than a few per core (tokio's default is 512).
            .max_blocking_threads(verify_threads())
            .thread_name("lazyblk-fetch")
            .enable_all()
            .build()
            .map_err(|e| Error::io("tokio runtime", e))?;
        let mut report = OpenReport::default();
        // One client for the manifest, the prefetch list and the blob: one connection pool.
        let connector = Connector::new(&opts.http)?;

        // 1. The manifest: from the cache when its digest is pinned and cached, else the remote.
        let cached = opts.expected_id.and_then(|id| {
            let p = opts.cache_root.join(id.hex()).join("manifest");
            std::fs::read(p).ok().filter(|b| ImageId::of(b) == id)
        });
        let bytes = match cached {
            Some(b) => b,
            None => runtime
                .block_on(fetch_manifest(&connector, manifest))
                .map_err(|e| match e {
                    Error::Remote(r) => Error::Remote(RemoteError {
                        message: format!("cannot read the manifest: {}", r.message),
                        ..r
                    }),
                    other => other,
                })?,
        };
        let id = ImageId::of(&bytes);
        if let Some(want) = opts.expected_id {
            if want != id {
                return Err(Error::ManifestDigest {
                    expected: want.to_string(),
                    actual: id.to_string(),
                });
            }
        }
        let m = Manifest::decode(&bytes)?;

        // 2. The cache directory.
        let dir = opts.cache_root.join(id.hex());
        report.fresh = !dir.join("manifest").exists();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock = lock_dir(&dir)?;
        // The cached copy must be this image's manifest (a directory copied from another image
        // is repaired here; its bitmap and data are rejected below by the image id).
        let cached_ok = std::fs::read(dir.join("manifest")).is_ok_and(|b| b == bytes);
        if !cached_ok {
            if !report.fresh {
                tracing::warn!(
                    "{}: the cached manifest was not this image's; rewritten",
                    dir.display()
                );
            }
            crate::builder::write_atomic(&dir.join("manifest"), &bytes)?;
        }

        // 3. The blob.
        let blob_loc = manifest.sibling(&m.blob_name);
        let remote = connector.open_remote(&blob_loc);
        let meta_path = dir.join("meta.json");
        let old_meta: Option<Meta> = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut etag = old_meta.as_ref().and_then(|m| m.etag.clone());
        // An image of zeros has an empty blob: nothing will ever be fetched, and a range
        // probe of an empty file cannot succeed (servers answer 416), so do not probe.
        // The optional prefetch list is fetched at the same time (one round trip, not two).
        let list_loc = manifest.sibling(crate::format::PREFETCH_FILE);
        let list_max = 4 * m.chunk_count() + 64;
        // The prefetch pack too: pinned (and not already cached), or next to an unpinned
        // manifest when prefetching is on (without it, a copy the cache kept stays in use).
        let pack_loc = manifest.sibling(PACK_FILE);
        // The layout the cache was written with: its own copy of the pack it used, if any.
        let old = CacheLayout::of(&dir, id, &m);
        let pack_cached = old.pack.clone();
        let fetch_pack = match opts.expected_pack {
            Some(pin) => pack_cached.as_deref().map(ImageId::of) != Some(pin),
            None => opts.prefetch_pack && opts.expected_id.is_none(),
        };
        let (probed, list_bytes, pack_fetched) = runtime.block_on(async {
            let probe = async {
                if m.blob_size == 0 {
                    Ok(crate::remote::BlobInfo::default())
                } else {
                    remote.probe().await
                }
            };
            let list = async {
                if opts.use_prefetch_list {
                    Some(connector.read_whole(&list_loc, list_max).await)
                } else {
                    None
                }
            };
            let pack = async {
                if fetch_pack {
                    Some(
                        connector
                            .read_whole(&pack_loc, 40 * m.block_count() + 4096)
                            .await,
                    )
                } else {
                    None
                }
            };
            tokio::join!(probe, list, pack)
        });
        match probed {
            Ok(info) => {
                if info.size != m.blob_size {
                    return Err(Error::BlobMismatch {
                        location: remote.location(),
                        detail: format!(
                            "size is {} bytes, the manifest says {}",
                            info.size, m.blob_size
                        ),
                    });
                }
                if let (Some(old), Some(new)) = (&etag, &info.etag) {
                    if old != new {
                        tracing::warn!(
                            "blob {} has a new ETag ({old} -> {new}); chunks are still verified by digest",
                            remote.location()
                        );
                    }
                }
                etag = info.etag;
            }
            Err(e) if e.is_transient() && !report.fresh => {
                tracing::warn!(
                    "remote unreachable at open, serving from cache until it returns: {e}"
                );
                report.offline = Some(e.to_string());
            }
            Err(e) => return Err(e.into()),
        }
        let meta = Meta {
            manifest: manifest.to_string(),
            blob: blob_loc.to_string(),
            etag,
        };
        crate::builder::write_atomic(
            &meta_path,
            &serde_json::to_vec_pretty(&meta).expect("meta serializes"),
        )?;

        // The prefetch list published next to the manifest (optional).
        let prefetch_list = list_bytes
            .and_then(|fetched| load_prefetch(fetched, &list_loc, &dir, &id, m.chunk_count()));

        // The prefetch pack to use, whose frames follow the image's blob.
        let chosen = choose_pack(&opts, &m, id, &pack_loc, pack_fetched, pack_cached.clone())?;
        // Its blob is probed like the image's (not when offline: the cached copy serves).
        let chosen = chosen.map(|(bytes, p)| {
            let pack_blob = connector.open_remote(&pack_loc.sibling(&p.blob_name));
            (bytes, p, pack_blob)
        });
        let chosen = match chosen {
            Some((bytes, p, pack_blob)) if report.offline.is_none() => {
                let why = match runtime.block_on(pack_blob.probe()) {
                    Ok(info) if info.size == p.blob_size => None,
                    Ok(info) => Some(format!(
                        "{}: size is {} bytes, the pack says {}",
                        pack_blob.location(),
                        info.size,
                        p.blob_size
                    )),
                    Err(e) if e.is_transient() => None,
                    Err(e) => Some(e.to_string()),
                };
                match why {
                    None => Some((bytes, p, pack_blob)),
                    Some(why) if opts.expected_pack.is_some() => {
                        return Err(Error::Invalid(format!("prefetch pack blob {why}")))
                    }
                    Some(why) => {
                        tracing::warn!("not using the prefetch pack: its blob {why}");
                        None
                    }
                }
            }
            other => other,
        };
        let pack_id = chosen.as_ref().map(|(b, _, _)| ImageId::of(b));
        report.prefetch_pack = pack_id.map(|p| p.to_string());
        let (old_bitmap_id, old_m) = (old.bitmap_id, old.manifest);
        let pack_bytes = chosen.as_ref().map(|(b, _, _)| b.clone());
        // From here on `m` is the manifest as the store uses it: with the prefetch pack in
        // place of the metadata pack, its frames read through the concatenated remote.
        let (remote, m) = match chosen {
            Some((_, p, pack_blob)) => (
                Box::new(Concat::new(remote, m.blob_size, pack_blob, p.blob_size))
                    as Box<dyn Remote>,
                p.apply(&m),
            ),
            None => (remote, m),
        };
        let bitmap_id = cache_bitmap_id(id, pack_id);

        // 4. Data file and bitmap; repair rather than trust.
        let device_size = m.image_size.div_ceil(u64::from(BLOCK_SIZE)) * u64::from(BLOCK_SIZE);
        let data_path = dir.join("data");
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| Error::io(&data_path, e))?;
        let data_len = data.metadata().map_err(|e| Error::io(&data_path, e))?.len();
        let bitmap_path = dir.join("bitmap");
        let n = m.chunk_count();
        // The bitmap holds a bit per unit: chunks, then the metadata pack's frames.
        let units = m.unit_count();
        let opened = if report.fresh || !bitmap_path.exists() {
            None
        } else if data_len != device_size {
            report.discarded = Some(format!(
                "data file is {data_len} bytes, expected {device_size}"
            ));
            None
        } else {
            match BitmapFile::open(&bitmap_path, old_bitmap_id, old_m.unit_count()) {
                Ok(x) => Some(x),
                Err(e) => {
                    report.discarded = Some(e.to_string());
                    None
                }
            }
        };
        if let Some(why) = &report.discarded {
            tracing::warn!("discarding the cache in {}: {why}", dir.display());
        }
        let mut created = false;
        let mut bitmap = match opened {
            Some((b, Trust::Clean)) => b,
            Some((mut b, Trust::Verify)) => {
                let (bits, checked, bad) = reverify(&old_m, &data, b.bits());
                report.reverified = checked;
                report.dropped = bad;
                if bad > 0 {
                    tracing::warn!("{bad} of {checked} cached chunks and pack frames failed re-verification; they will be fetched again");
                }
                b.replace(bits)?;
                b
            }
            None => {
                created = true;
                data.set_len(0)
                    .and_then(|_| data.set_len(device_size))
                    .map_err(|e| Error::io(&data_path, e))?;
                BitmapFile::create(&bitmap_path, bitmap_id, units)?
            }
        };
        // Another prefetch pack than the cache was written with (or none, or a first one):
        // carry the bits over to the new layout, then keep a copy of the pack that decides it.
        // (A crash in between leaves a bitmap whose id does not match the pack copy: the
        // next open discards the cache, it never misreads it.)
        if pack_cached != pack_bytes {
            if !created {
                let bits = carry_bits(&old_m, bitmap.bits(), &m);
                bitmap = BitmapFile::create(&bitmap_path, bitmap_id, units)?;
                bitmap.replace(bits)?;
            }
            let copy = dir.join(PACK_FILE);
            match &pack_bytes {
                Some(b) => crate::builder::write_atomic(&copy, b)?,
                None => std::fs::remove_file(&copy).map_err(|e| Error::io(&copy, e))?,
            }
        }
        if data_len != device_size && report.discarded.is_none() {
            data.set_len(device_size)
                .map_err(|e| Error::io(&data_path, e))?;
        }
        let present = AtomicBits::new(units);
        for i in 0..units {
            if bitmap.bits()[i as usize] || (i < n && m.chunk(i) == ChunkRef::Zero) {
                present.set(i);
            }
        }
        // Zero chunks are holes in the sparse file; record them so the bitmap tells the truth.
        let zeros: Vec<u64> = (0..n)
            .filter(|&i| m.chunk(i) == ChunkRef::Zero && !bitmap.bits()[i as usize])
            .collect();
        bitmap.update(&zeros, &[])?;
        let cached: u64 = (0..n)
            .filter(|&i| present.get(i) && m.chunk(i) != ChunkRef::Zero)
            .map(|i| u64::from(m.chunk_len(i)))
            .sum();

        let opts_copy = opts.clone();
        let inner = Arc::new(Inner {
            id,
            manifest: m,
            dir: dir.clone(),
            data_path,
            data,
            device_size,
            present,
            inflight: Mutex::new(HashMap::new()),
            remote,
            requests: Arc::new(tokio::sync::Semaphore::new(opts.max_requests.max(1))),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(opts.max_requests.max(1))),
            opts,
            stats: Stats::default(),
            persist: Mutex::new(Persist::default()),
            persist_cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            handle: runtime.handle().clone(),
            referenced: AtomicBits::new(n),
            accessed: AtomicBits::new(n),
            trace: Mutex::new(Vec::new()),
            cached_bytes: AtomicU64::new(cached),
            background: Arc::new(tokio::sync::Semaphore::new(opts_background(&opts_copy))),
            background_done: AtomicBool::new(false),
            epoch: Instant::now(),
            last_miss_ms: AtomicU64::new(0),
            prefetch_list,
            readahead: Mutex::new(Readahead::default()),
            ra_trigger: AtomicBits::new(n),
            touched: AtomicBits::new(device_size / u64::from(BLOCK_SIZE)),
        });
        let bitmap = Arc::new(Mutex::new(Some(bitmap)));
        let persister = {
            let inner = inner.clone();
            let bitmap = bitmap.clone();
            std::thread::Builder::new()
                .name("lazyblk-persist".into())
                .spawn(move || persister(&inner, &bitmap))
                .map_err(|e| Error::io("persister thread", e))?
        };
        let maintenance = {
            let inner = inner.clone();
            let bitmap = bitmap.clone();
            std::thread::Builder::new()
                .name("lazyblk-evict".into())
                .spawn(move || maintenance(&inner, &bitmap))
                .map_err(|e| Error::io("maintenance thread", e))?
        };
        Ok(ChunkStore {
            inner,
            report,
            bitmap,
            persister: Some(persister),
            maintenance: Some(maintenance),
            runtime: Some(runtime),
            manifest_bytes: bytes,
            _lock: lock,
        })
    }

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
            background_chunks: s.background_chunks.load(Ordering::Relaxed),
            background_done: self.inner.background_done.load(Ordering::Relaxed),
            pack_frames: self.inner.manifest.frame_count(),
            pack_frames_present: {
                let f = self.inner.manifest.frame_units();
                self.inner.present.count_range(f.start, f.end)
            },
            prefetch_pack: self.report.prefetch_pack.clone(),
        }
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
            f.write_all(&buf[..n]).map_err(|e| Error::io(out, e))?;
            at += n as u64;
        }
        let file = f.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(out, e))
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
        {
            let mut p = inner.persist.lock().expect("lock");
            p.shutdown = true;
            inner.persist_cv.notify_all();
        }
        if let Some(h) = self.persister.take() {
            let _ = h.join();
        }
        let ok = inner.persist.lock().expect("lock").last_error.is_none();
        if let Some(b) = self.bitmap.lock().expect("lock").take() {
            if ok && inner.data.sync_data().is_ok() {
                if let Err(e) = b.close_clean() {
                    tracing::warn!("closing the bitmap: {e}");
                }
            }
        }
    }
}

async fn fetch_manifest(connector: &Connector, loc: &Location) -> Result<Vec<u8>> {
    let mut attempt = 0;
    loop {
        match connector.read_whole(loc, MAX_MANIFEST_BYTES).await {
            Ok(b) => return Ok(b),
            Err(e) if e.is_transient() && attempt < 3 => {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Re-hash every unit (chunk or pack frame) `claimed` says is present; return the bits that
/// hold, checked, bad.
fn reverify(
    m: &Manifest,
    data: &File,
    claimed: &BitSlice<u8, Lsb0>,
) -> (BitVec<u8, Lsb0>, u64, u64) {
    let list: Vec<u64> = claimed.iter_ones().map(|i| i as u64).collect();
    let good = Mutex::new(bitvec![u8, Lsb0; 0; claimed.len()]);
    let bad = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    std::thread::scope(|s| {
        for part in list.chunks(list.len().div_ceil(threads).max(1)) {
            let (good, bad) = (&good, &bad);
            s.spawn(move || {
                let mut buf = vec![0u8; m.chunk_size as usize];
                let n = m.chunk_count();
                for &i in part {
                    let ok = if i >= n {
                        frame_intact(m, data, (i - n) as usize)
                    } else {
                        match m.chunk(i) {
                            ChunkRef::Zero => true,
                            ChunkRef::Stored(e) => {
                                let len = m.chunk_len(i) as usize;
                                data.read_exact_at(&mut buf[..len], m.chunk_offset(i))
                                    .is_ok()
                                    && *blake3::hash(&buf[..len]).as_bytes() == e.digest
                            }
                        }
                    };
                    if ok {
                        good.lock().expect("lock").set(i as usize, true);
                    } else {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    (
        good.into_inner().expect("lock"),
        list.len() as u64,
        bad.into_inner(),
    )
}

/// Whether the blocks of metadata pack frame `f` in the data file `data` of a cache hash to the
/// frame's digest (false for a frame the manifest does not have, or a short read).
pub fn frame_intact(m: &Manifest, data: &File, f: usize) -> bool {
    let Some(p) = m.pack.as_ref().filter(|p| f < p.frames.len()) else {
        return false;
    };
    let mut h = blake3::Hasher::new();
    let mut block = vec![0u8; PACK_BLOCK as usize];
    for &b in &p.blocks[p.frame_positions(f)] {
        let at = u64::from(b) * PACK_BLOCK;
        let len = (m.image_size - at).min(PACK_BLOCK) as usize;
        if data.read_exact_at(&mut block[..len], at).is_err() {
            return false;
        }
        h.update(&block[..len]);
    }
    *h.finalize().as_bytes() == p.frames[f].digest
}

/// How the cache directory of an image is laid out.
pub struct CacheLayout {
    /// The manifest as the store used it: with the prefetch pack it kept a copy of (in place
    /// of the metadata pack), if any. Its [`Manifest::unit_count`] is the bitmap's bit count.
    pub manifest: Manifest,
    /// The id the bitmap is bound to.
    pub bitmap_id: ImageId,
    /// The copy of the prefetch pack, as kept.
    pub pack: Option<Vec<u8>>,
}

impl CacheLayout {
    /// The layout of the cache in `dir` of the image `id` with manifest `m` (a pack copy that
    /// does not decode for this image counts as none: the bitmap, bound to the pack's digest,
    /// then no longer matches, and the store discards it).
    pub fn of(dir: &Path, id: ImageId, m: &Manifest) -> CacheLayout {
        let pack = std::fs::read(dir.join(PACK_FILE)).ok();
        let decoded = pack.as_deref().and_then(|b| {
            PrefetchPack::decode(b, &id, m.image_size)
                .ok()
                .map(|p| (ImageId::of(b), p))
        });
        CacheLayout {
            manifest: match &decoded {
                Some((_, p)) => p.apply(m),
                None => m.clone(),
            },
            bitmap_id: cache_bitmap_id(id, decoded.map(|(pid, _)| pid)),
            pack,
        }
    }
}

/// The id a cache's bitmap is bound to: the image's, or with a prefetch pack in use (which
/// adds units and decides what the frame bits mean) a digest of both.
fn cache_bitmap_id(image: ImageId, pack: Option<ImageId>) -> ImageId {
    match pack {
        None => image,
        Some(p) => ImageId::of(&[image.0, p.0].concat()),
    }
}

/// Presence bits of a cache kept with the manifest `old` carried over to `new`, the same
/// image with another pack: chunk bits as they are; a frame of `new` is present when each of
/// its blocks lies in a present chunk or in a present frame of `old`.
fn carry_bits(old: &Manifest, old_bits: &BitSlice<u8, Lsb0>, new: &Manifest) -> BitVec<u8, Lsb0> {
    let n = new.chunk_count() as usize;
    let mut bits = bitvec![u8, Lsb0; 0; new.unit_count() as usize];
    bits[..n].copy_from_bitslice(&old_bits[..n]);
    let Some(p) = &new.pack else {
        return bits;
    };
    let cs = u64::from(new.chunk_size);
    let block_present = |b: u32| {
        let b = u64::from(b);
        old_bits[(b * PACK_BLOCK / cs) as usize]
            || old.pack.as_ref().is_some_and(|op| {
                op.covers(b, b)
                    .is_some_and(|pos| old_bits[n + op.frame_of(pos.start)])
            })
    };
    for f in 0..p.frames.len() {
        if p.blocks[p.frame_positions(f)]
            .iter()
            .all(|&b| block_present(b))
        {
            bits.set(n + f, true);
        }
    }
    bits
}

/// The prefetch pack to use, as raw bytes and decoded: the one `fetched` from `loc`, else the
/// cache's copy, if it belongs to this image and is trusted (it has the digest
/// `opts.expected_pack` asks for; without one, only next to an unpinned manifest). A pinned
/// pack that is neither there nor cached is an error; an unpinned one that is not usable is
/// skipped with a warning (it only makes reads faster).
fn choose_pack(
    opts: &StoreOptions,
    m: &Manifest,
    id: ImageId,
    loc: &Location,
    fetched: Option<std::result::Result<Vec<u8>, RemoteError>>,
    cached: Option<Vec<u8>>,
) -> Result<Option<(Vec<u8>, PrefetchPack)>> {
    let accept = |b: &[u8]| -> std::result::Result<PrefetchPack, String> {
        let p = PrefetchPack::decode(b, &id, m.image_size).map_err(|e| e.to_string())?;
        match opts.expected_pack {
            Some(pin) if ImageId::of(b) != pin => Err(format!(
                "its digest is {}, --pack-digest asks for {pin}",
                ImageId::of(b)
            )),
            None if opts.expected_id.is_some() => {
                Err("the manifest is pinned and the pack is not (give its digest)".into())
            }
            _ => Ok(p),
        }
    };
    let mut why = None;
    match fetched {
        Some(Ok(b)) => match accept(&b) {
            Ok(p) => return Ok(Some((b, p))),
            Err(e) => why = Some(e),
        },
        Some(Err(e))
            if e.kind == crate::remote::ErrorKind::Permanent && opts.expected_pack.is_none() =>
        {
            tracing::debug!("no prefetch pack at {loc}: {e}");
        }
        Some(Err(e)) => why = Some(e.to_string()),
        None => {}
    }
    // Fall back to the cache's copy when nothing usable was fetched (offline, unpublished,
    // or a new pack that is not acceptable).
    if let Some(b) = cached {
        if let Ok(p) = accept(&b) {
            if let Some(w) = &why {
                tracing::warn!("prefetch pack at {loc}: {w}; using the cached copy");
            }
            return Ok(Some((b, p)));
        }
    }
    match (why, opts.expected_pack) {
        (Some(w), Some(_)) => Err(Error::Invalid(format!("prefetch pack {loc}: {w}"))),
        (None, Some(_)) => Err(Error::Invalid(format!(
            "prefetch pack {loc}: not fetched and not in the cache"
        ))),
        (Some(w), None) => {
            tracing::warn!("ignoring the prefetch pack at {loc}: {w}");
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

/// Threads that verify and store fetched chunks: two per core, at least 2, at most 16.
fn verify_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| (2 * n.get()).clamp(2, 16))
}

fn opts_background(o: &StoreOptions) -> usize {
    o.background_requests.max(1)
}

/// The optional prefetch list next to the manifest, as `fetched` from `loc` (falling back to
/// the cached copy when it could not be fetched).
fn load_prefetch(
    fetched: std::result::Result<Vec<u8>, RemoteError>,
    loc: &Location,
    dir: &Path,
    id: &ImageId,
    chunk_count: u64,
) -> Option<Vec<u32>> {
    let cached = dir.join(crate::format::PREFETCH_FILE);
    let bytes = match fetched {
        Ok(b) => {
            let _ = crate::builder::write_atomic(&cached, &b);
            b
        }
        Err(e) => {
            tracing::debug!("no prefetch list at {loc}: {e}");
            std::fs::read(&cached).ok()?
        }
    };
    match crate::format::PrefetchList::decode(&bytes, id, chunk_count) {
        Ok(p) => {
            tracing::info!("prefetch list: {} chunks", p.chunks.len());
            Some(p.chunks)
        }
        Err(e) => {
            tracing::warn!("ignoring the prefetch list at {loc}: {e}");
            None
        }
    }
}

/// Keep the cache under its limit: clock (second chance) over present chunks. An evicted
/// chunk leaves the in-memory bitmap first (new reads fetch it again), then the on-disk bitmap
/// (made durable), and only after `evict_grace` is its space punched out of the data file, and
/// only if it was not fetched again meanwhile.
fn maintenance(inner: &Inner, bitmap: &Mutex<Option<BitmapFile>>) {
    let n = inner.manifest.chunk_count();
    let mut hand = 0u64;
    let mut doomed: std::collections::VecDeque<(u64, Instant)> = Default::default();
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
            let mut cleared = Vec::new();
            let mut scanned = 0u64;
            while inner.cached_bytes.load(Ordering::Relaxed) > target && scanned < 2 * n {
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
                let inflight = inner.inflight.lock().expect("lock");
                if inflight.contains_key(&c) {
                    continue;
                }
                inner.present.clear(c);
                drop(inflight);
                inner
                    .cached_bytes
                    .fetch_sub(u64::from(inner.manifest.chunk_len(c)), Ordering::Relaxed);
                inner.stats.evicted.fetch_add(1, Ordering::Relaxed);
                cleared.push(c);
            }
            if !cleared.is_empty() {
                if let Some(b) = bm.as_mut() {
                    if let Err(e) = b.update(&[], &cleared) {
                        tracing::error!("recording evictions: {e}");
                    }
                }
                let now = Instant::now();
                doomed.extend(cleared.into_iter().map(|c| (c, now)));
            }
        }
        while let Some(&(c, t)) = doomed.front() {
            if t.elapsed() < inner.opts.evict_grace && !inner.shutdown.load(Ordering::Relaxed) {
                break;
            }
            doomed.pop_front();
            let inflight = inner.inflight.lock().expect("lock");
            if inner.present.get(c) || inflight.contains_key(&c) {
                continue; // fetched again meanwhile: its bytes are live
            }
            for (off, len) in inner.punchable(c) {
                if let Err(e) = lazyblk_blocksource::fsutil::punch_hole(&inner.data, off, len) {
                    tracing::warn!("punching evicted chunk {c}: {e}");
                }
            }
        }
    }
}

/// One cache directory found by [`gc`].
#[derive(Clone, Debug)]
pub struct GcEntry {
    /// The directory.
    pub dir: PathBuf,
    /// Bytes it occupies on disk.
    pub bytes: u64,
    /// Whether a running store holds it (then it is kept).
    pub in_use: bool,
    /// Whether it was removed.
    pub removed: bool,
}

/// Remove the caches under `cache_root` that no running store holds, except those of the
/// images in `keep`. With `dry_run`, only report.
pub fn gc(cache_root: &Path, keep: &[ImageId], dry_run: bool) -> Result<Vec<GcEntry>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(cache_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(cache_root, e)),
    };
    for e in rd.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(id) = ImageId::parse(&name) else {
            continue;
        };
        if !dir.join("manifest").exists() && !dir.join("bitmap").exists() {
            continue;
        }
        let bytes = disk_usage(&dir);
        let lock = lock_dir(&dir);
        let in_use = lock.is_err();
        let removed = !in_use && !dry_run && !keep.contains(&id);
        if removed {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        out.push(GcEntry {
            dir,
            bytes,
            in_use,
            removed,
        });
    }
    Ok(out)
}

fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn persister(inner: &Inner, bitmap: &Mutex<Option<BitmapFile>>) {
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
    /// The byte ranges of chunk `c` that eviction may punch out of the data file: all of it
    /// but the metadata pack's blocks, which stay (the pack is never evicted: it is small, and
    /// its frames' bits would otherwise have to follow every chunk they overlap).
    fn punchable(&self, c: u64) -> Vec<(u64, u64)> {
        let off = self.manifest.chunk_offset(c);
        let end = off + u64::from(self.manifest.chunk_len(c));
        let mut out = Vec::new();
        let mut at = off;
        if let Some(p) = &self.manifest.pack {
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

    /// The pack frames (as units) that serve the part of the read `offset..offset + len` that
    /// lies in chunk `c`, if that part lies wholly in metadata pack blocks.
    fn pack_units(&self, c: u64, offset: u64, len: u64) -> Option<std::ops::RangeInclusive<u64>> {
        let p = self.manifest.pack.as_ref()?;
        let start = offset.max(self.manifest.chunk_offset(c));
        let end =
            (offset + len).min(self.manifest.chunk_offset(c) + u64::from(self.manifest.chunk_size));
        let pos = p.covers(start / PACK_BLOCK, (end - 1) / PACK_BLOCK)?;
        let n = self.manifest.chunk_count();
        Some(n + p.frame_of(pos.start) as u64..=n + p.frame_of(pos.end - 1) as u64)
    }

    /// Mark present the pack frames whose blocks all lie in present chunks: the data file
    /// already holds their verified bytes, so there is nothing to fetch (after a hydration, or
    /// a workload that read the chunks, a restart with the pack prefetch fetches nothing).
    fn adopt_frames(&self) {
        let Some(p) = &self.manifest.pack else {
            return;
        };
        let n = self.manifest.chunk_count();
        let cs = u64::from(self.manifest.chunk_size);
        let adopt: Vec<u64> = (0..p.frames.len())
            .filter(|&f| {
                !self.present.get(n + f as u64)
                    && p.blocks[p.frame_positions(f)]
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

    /// The stored entry behind a unit (`None` for an all-zero chunk).
    fn unit_entry(&self, u: u64) -> Option<Entry> {
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

    /// Record a read of `offset..offset + len` (inside the device, `len` > 0) in the block trace.
    /// Called from `locate`, which every frontend asks first (and again after a fetch).
    fn note_blocks(&self, offset: u64, len: u64) {
        let b = u64::from(BLOCK_SIZE);
        self.touched.set_range(offset / b, (offset + len - 1) / b);
    }

    fn chunk_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = u64::from(self.manifest.chunk_size);
        let last_chunk = self.manifest.chunk_count().saturating_sub(1);
        let first = (offset / cs).min(last_chunk);
        let last = ((offset + len - 1) / cs).min(last_chunk);
        (first, last)
    }

    fn all_present(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|i| self.present.get(i))
    }

    /// Record a read of chunks `first..=last` (present or not), in one pass: first-access order
    /// for the trace, referenced bits for eviction, and the readahead triggers it reaches (a
    /// read that reaches a trigger starts the stream's next window, whether the chunk is
    /// present or still in flight).
    fn note_access(self: &Arc<Self>, first: u64, last: u64) {
        for i in first..=last {
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

    fn ms_since_open(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Background work: the published prefetch list `order` first, then (with `hydrate`)
    /// every other chunk.
    ///
    /// The list predicts the workload's own first reads, so it is fetched with the on-demand
    /// concurrency and without pausing for misses. Hydration is the opposite: few slots, at
    /// most `rate` bytes per second, and it pauses while on-demand misses happen.
    async fn background_work(self: Arc<Self>, order: Vec<u64>, hydrate: bool, rate: Option<u64>) {
        let n = self.manifest.chunk_count();
        let units = self.manifest.unit_count();
        self.adopt_frames();
        let order: Vec<u64> = order.into_iter().filter(|&c| c < units).collect();
        if !order.is_empty() {
            let slots = self.opts.max_requests.max(1);
            self.fetch_list(&order, &self.prefetch_slots, slots, None, false)
                .await;
        }
        if hydrate && !self.shutdown.load(Ordering::Relaxed) {
            let all: Vec<u64> = (0..n).collect();
            let slots = opts_background(&self.opts);
            self.fetch_list(&all, &self.background, slots, rate, true)
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
    /// `nslots` requests of `slots` in flight; returns when they have all finished.
    ///
    /// Within a window, chunks are fetched in chunk (= blob) order and holes of up to
    /// [`GAP_FILL_BYTES`] between two listed ones are fetched too: a few more bytes in
    /// the same request cost less than another round trip.
    async fn fetch_list(
        self: &Arc<Self>,
        list: &[u64],
        slots: &Arc<tokio::sync::Semaphore>,
        nslots: usize,
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
            for run in self.make_runs(batch, false, true) {
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

    fn flush(&self) -> Result<()> {
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

    fn fetch(self: &Arc<Self>, offset: u64, len: u64, done: Completion) {
        self.fetch_via(offset, len, done, true)
    }

    /// [`Inner::fetch`]; `frames`: whether a part of a missing chunk may be served by pack
    /// frames.
    fn fetch_via(self: &Arc<Self>, offset: u64, len: u64, done: Completion, frames: bool) {
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
    fn reserve_missing(&self, from: u64, to: u64) -> Vec<u64> {
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

    /// The first and the largest readahead window in chunks (the options' bytes rounded up to
    /// whole chunks; the first is 0 when readahead is off).
    fn readahead_windows(&self) -> (u64, u64) {
        let chunk = u64::from(self.manifest.chunk_size);
        let base = self.opts.readahead_bytes.div_ceil(chunk);
        (
            base,
            self.opts.readahead_max_bytes.div_ceil(chunk).max(base),
        )
    }

    /// Chunks to read ahead of a miss on `first..=last` (reserved in flight).
    ///
    /// A miss that continues a stream (it lands in or right after the stream's last window)
    /// doubles the stream's window up to `readahead_max_bytes`; any other miss starts a new
    /// stream with `readahead_bytes`. Each window carries a trigger chunk: the first read of it
    /// schedules the next window ([`Inner::on_trigger`]), so a sequential reader finds its
    /// chunks present instead of missing once per window.
    fn readahead_after_miss(&self, first: u64, last: u64) -> Vec<u64> {
        let (base, max) = self.readahead_windows();
        let n = self.manifest.chunk_count();
        if base == 0 || last + 1 >= n {
            return Vec::new();
        }
        let (from, to) = {
            let mut ra = self.readahead.lock().expect("lock");
            let cont = ra
                .streams
                .iter()
                .position(|s| s.window > 0 && first <= s.end + 1 && first + 2 * s.window > s.end);
            let (slot, stream) = match cont {
                Some(i) => {
                    let s = ra.streams[i];
                    let window = self.next_window(s.window, s.end + 1, base, max);
                    let from = s.end.max(last) + 1;
                    let end = (from + window - 1).min(n - 1);
                    (
                        i,
                        Stream {
                            end,
                            window,
                            trigger: from,
                        },
                    )
                }
                None => {
                    let i = ra.victim;
                    ra.victim = (i + 1) % ra.streams.len();
                    let end = (last + base).min(n - 1);
                    let trigger = last + 1 + base / 2;
                    (
                        i,
                        Stream {
                            end,
                            window: base,
                            trigger,
                        },
                    )
                }
            };
            ra.streams[slot] = stream;
            let from = if cont.is_some() {
                stream.trigger
            } else {
                last + 1
            };
            if from > stream.end {
                return Vec::new();
            }
            if stream.trigger <= stream.end {
                self.ra_trigger.set(stream.trigger);
            }
            (from, stream.end)
        };
        self.reserve_missing(from, to)
    }

    /// The window after one of `window` chunks ending before `end`: twice as large (up to
    /// `max`) if the reader read at least half of the chunks in it, else half as large (down to
    /// `base`). A reader that skips most of what it passes (every tenth file of a tree) keeps a
    /// small window instead of pulling in the whole image; a sequential one grows it.
    fn next_window(&self, window: u64, end: u64, base: u64, max: u64) -> u64 {
        let read = (end.saturating_sub(window)..end)
            .filter(|&c| self.accessed.get(c))
            .count() as u64;
        if 2 * read >= window {
            (window * 2).min(max)
        } else {
            (window / 2).max(base)
        }
    }

    /// A read reached `chunk`, the trigger of a stream's window: schedule the next window,
    /// twice as large (up to `readahead_max_bytes`) if the reader used the last one.
    fn on_trigger(self: &Arc<Self>, chunk: u64) {
        let n = self.manifest.chunk_count();
        let (base, max) = self.readahead_windows();
        let (from, to) = {
            let mut ra = self.readahead.lock().expect("lock");
            let Some(s) = ra
                .streams
                .iter_mut()
                .find(|s| s.window > 0 && s.trigger == chunk)
            else {
                return;
            };
            if s.end + 1 >= n {
                return;
            }
            let window = self.next_window(s.window, chunk, base, max);
            let from = s.end + 1;
            let to = (s.end + window).min(n - 1);
            *s = Stream {
                end: to,
                window,
                trigger: from,
            };
            self.ra_trigger.set(from);
            (from, to)
        };
        let todo = self.reserve_missing(from, to);
        self.schedule(todo, true, false);
    }

    /// Group chunks (already reserved in flight) into coalesced range requests and start them.
    fn schedule(self: &Arc<Self>, chunks: Vec<u64>, with_deadline: bool, background: bool) {
        for run in self.make_runs(chunks, with_deadline, background) {
            let inner = self.clone();
            self.handle
                .spawn(async move { inner.fetch_run(run, None).await });
        }
    }

    /// Group chunks (already reserved in flight) into runs of blob-adjacent stored chunks of
    /// at most `max_request_bytes`; all-zero chunks complete at once.
    fn make_runs(&self, chunks: Vec<u64>, with_deadline: bool, background: bool) -> Vec<Run> {
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
                Some(r)
                    if r.blob_offset + r.len == off
                        && r.len + len <= self.opts.max_request_bytes =>
                {
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

    /// Fetch a run with one streamed range request. Each part is verified and stored (on a
    /// blocking thread, off the async workers) and its chunks completed as soon as its own
    /// bytes have arrived, so the first chunk of a long run is ready after one round trip plus
    /// its own transfer. A retry asks only for the parts not yet stored.
    async fn fetch_run(self: Arc<Self>, run: Run, permit: Option<OwnedSemaphorePermit>) {
        let run = Arc::new(run);
        let mut done = vec![false; run.parts.len()];
        let _permit = match permit {
            Some(p) => p,
            None => match self.requests.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return self.fail_rest(&run, &done, Error::ShuttingDown),
            },
        };
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
                let (this, parts, skip) = (&self, &run, &done);
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
                                .spawn_blocking(move || inner.store_part(&r, i, &bytes));
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
    fn fail_rest(&self, run: &Run, done: &[bool], e: Error) {
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

    /// Verify part `i` of a run (its stored bytes), write it into the data file and complete
    /// its units. Runs on a blocking thread.
    fn store_part(&self, run: &Run, i: usize, stored: &[u8]) -> Result<()> {
        let (e, units) = &run.parts[i];
        let n = self.manifest.chunk_count();
        let missing: Vec<u64> = units
            .iter()
            .copied()
            .filter(|&c| !self.present.get(c))
            .collect();
        if let Some(&first) = missing.first() {
            let (want, corrupt): (usize, Box<dyn Fn(String) -> Error>) = if first >= n {
                let f = first - n;
                let p = self
                    .manifest
                    .pack
                    .as_ref()
                    .expect("units past the chunks are frames");
                (
                    p.frame_raw_len(f as usize, self.manifest.image_size) as usize,
                    Box::new(move |detail| Error::PackCorrupt { frame: f, detail }),
                )
            } else {
                (
                    self.manifest.chunk_len(first) as usize,
                    Box::new(move |detail| Error::ChunkCorrupt {
                        index: first,
                        detail,
                    }),
                )
            };
            with_plain(e.encoding, stored, want, |plain| {
                let plain = plain.map_err(|err| corrupt(format!("zstd: {err}")))?;
                if plain.len() != want {
                    return Err(corrupt(format!("{} bytes, expected {want}", plain.len())));
                }
                let got = blake3::hash(plain);
                if *got.as_bytes() != e.digest {
                    return Err(corrupt(format!(
                        "digest mismatch: expected blake3:{}, got blake3:{}",
                        hex::encode(e.digest),
                        got.to_hex()
                    )));
                }
                for &c in &missing {
                    if c >= n {
                        self.write_frame(c - n, plain)?;
                    } else {
                        self.data
                            .write_all_at(plain, self.manifest.chunk_offset(c))
                            .map_err(|err| Error::io(&self.data_path, err))?;
                    }
                }
                Ok(())
            })?;
        }
        if run.background {
            let chunks = units.iter().filter(|&&u| u < n).count();
            self.stats
                .background_chunks
                .fetch_add(chunks as u64, Ordering::Relaxed);
        }
        self.complete(units, None);
        Ok(())
    }

    /// Write the verified raw bytes of pack frame `f` to its blocks' places in the data file,
    /// one write per run of adjacent blocks.
    fn write_frame(&self, f: u64, raw: &[u8]) -> Result<()> {
        let p = self.manifest.pack.as_ref().expect("a pack");
        let blocks = &p.blocks[p.frame_positions(f as usize)];
        let size = self.manifest.image_size;
        let mut at = 0usize;
        let mut k = 0;
        while k < blocks.len() {
            let mut j = k + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            let off = u64::from(blocks[k]) * PACK_BLOCK;
            let len = ((u64::from(blocks[j - 1]) + 1) * PACK_BLOCK).min(size) - off;
            self.data
                .write_all_at(&raw[at..at + len as usize], off)
                .map_err(|err| Error::io(&self.data_path, err))?;
            at += len as usize;
            k = j;
        }
        Ok(())
    }

    /// Finish chunks: mark present (on success), queue persistence, wake waiters.
    fn complete(&self, chunks: &[u64], err: Option<&BlockError>) {
        if err.is_none() {
            let n = self.manifest.chunk_count();
            let mut bytes = 0u64;
            let mut frames = 0;
            for &c in chunks {
                let was = self.present.test_and_set(c);
                if c >= n {
                    frames += 1;
                } else if !was && self.manifest.chunk(c) != ChunkRef::Zero {
                    bytes += u64::from(self.manifest.chunk_len(c));
                }
            }
            self.cached_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.stats
                .chunks_fetched
                .fetch_add(chunks.len() as u64 - frames, Ordering::Relaxed);
            let mut p = self.persist.lock().expect("lock");
            p.pending.extend_from_slice(chunks);
            p.queued += 1;
            self.persist_cv.notify_all();
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

thread_local! {
    /// This thread's zstd decompression context and output buffer, reused for every chunk it
    /// verifies: creating a context per chunk cost ~10% of the CPU of reading a whole image at
    /// 32 KiB chunks (it allocates and initialises ~100 KiB), and a fresh 128 KiB output buffer
    /// per chunk is an mmap plus page faults.
    static PLAIN: std::cell::RefCell<Option<(zstd::bulk::Decompressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Call `f` with the raw bytes of a stored chunk or frame of `want` bytes: `stored` itself when
/// it is raw, else its decompression into this thread's buffer (an error when the zstd frame is
/// malformed or holds more than `want` bytes). `f` must not decompress in turn.
fn with_plain<R>(
    encoding: Encoding,
    stored: &[u8],
    want: usize,
    f: impl FnOnce(std::io::Result<&[u8]>) -> R,
) -> R {
    if encoding == Encoding::Raw {
        return f(Ok(stored));
    }
    PLAIN.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match zstd::bulk::Decompressor::new() {
                Ok(d) => *slot = Some((d, Vec::new())),
                Err(err) => return f(Err(err)),
            }
        }
        let (ctx, buf) = slot.as_mut().expect("set above");
        buf.clear();
        buf.reserve(want);
        match ctx.decompress_to_buffer(stored, buf) {
            Ok(_) => f(Ok(buf)),
            Err(err) => f(Err(err)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_of(encoding: Encoding, stored: &[u8], want: usize) -> std::io::Result<Vec<u8>> {
        with_plain(encoding, stored, want, |p| p.map(<[u8]>::to_vec))
    }

    #[test]
    fn the_reused_decompressor_checks_every_frame_on_its_own() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let small = &big[..5000];
        let z_big = zstd::bulk::compress(&big, 3).unwrap();
        let z_small = zstd::bulk::compress(small, 3).unwrap();
        // Raw bytes pass through untouched.
        assert_eq!(plain_of(Encoding::Raw, small, 5000).unwrap(), small);
        // A large frame first leaves a large buffer behind...
        assert_eq!(plain_of(Encoding::Zstd, &z_big, big.len()).unwrap(), big);
        // ...which must not let a frame larger than `want` through as `want` bytes: it either
        // fails or comes back at its real length (which the caller rejects).
        if let Ok(p) = plain_of(Encoding::Zstd, &z_big, 5000) {
            assert_eq!(p.len(), big.len());
        }
        // A malformed frame is an error, and the context still works afterwards.
        let mut broken = z_small.clone();
        broken.truncate(broken.len() / 2);
        assert!(plain_of(Encoding::Zstd, &broken, 5000).is_err());
        assert!(plain_of(Encoding::Zstd, b"not zstd at all", 5000).is_err());
        assert_eq!(plain_of(Encoding::Zstd, &z_small, 5000).unwrap(), small);
        // A frame shorter than `want` comes back short (the caller rejects the length).
        assert_eq!(
            plain_of(Encoding::Zstd, &z_small, 9000).unwrap().len(),
            5000
        );
    }
}
