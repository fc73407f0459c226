//! [`StoreOptions`]: what `lazyblk add` (and every other opener of a store) can tune.

use crate::prelude::*;

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
    /// Registry settings (credentials, mirrors, TLS) for images in OCI registries.
    pub registry: RegistryOptions,
    /// Range requests in flight at once.
    pub max_requests: usize,
    /// Largest coalesced range request.
    pub max_request_bytes: u64,
    /// Range requests in flight for the pack (the metadata pack or a prefetch pack) fetched at
    /// attach, and the largest of them ([`StoreOptions::pack_request_bytes`]). The pack streams
    /// in blob (= block) order, so a few requests in order deliver its front first, at the
    /// link's full rate: a file-system walk, which reads metadata in roughly block order,
    /// finds the blocks it needs arriving as it needs them. Many large requests at once would
    /// split the link between them and deliver every part of the pack at once, slowly.
    /// Three requests of 512 KiB keep a 100 Mbit/s link with 20 ms of round trip full.
    pub pack_requests: usize,
    /// The largest range request for the pack ([`StoreOptions::pack_requests`]).
    pub pack_request_bytes: u64,
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
    /// Async worker threads of the store's runtime. One is enough: requests are async, and
    /// decompression, verification and persisting run on its blocking pool, whose threads
    /// exist only while there is such work.
    pub fetch_threads: usize,
    /// Number of attempts at a chunk whose bytes fail verification before giving up.
    pub corrupt_attempts: u32,
    /// Keep at most this many bytes of fetched chunks; cold chunks are evicted (they can be
    /// fetched again). `None`: no limit.
    pub cache_limit: Option<u64>,
    /// Set the host cache limit of `cache_root` at open (`Some(0)` removes it): one limit for
    /// every cache under the root, least recently used across images, a chunk several caches
    /// hold counted once ([`crate::policy::hostlimit`]). A store honours the root's limit
    /// whether or not it set it.
    pub host_cache_limit: Option<u64>,
    /// How often a store takes part in the host limit (publishes its chunks' last uses, runs
    /// or applies a pass), while one is set.
    pub host_limit_period: Duration,
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
    /// Copy chunks that other caches under `cache_root` hold (verified against this
    /// manifest) instead of fetching them: the host-wide chunk index
    /// (`add --no-host-index` turns it off).
    pub host_index: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_root: PathBuf::from("/var/cache/lazyblk"),
            expected_id: None,
            expected_pack: None,
            http: HttpOptions::default(),
            registry: RegistryOptions::default(),
            max_requests: 8,
            max_request_bytes: 2 << 20,
            pack_requests: 3,
            pack_request_bytes: 512 << 10,
            readahead_bytes: 512 << 10,
            readahead_max_bytes: 4 << 20,
            io_deadline: Some(Duration::from_secs(300)),
            fetch_threads: 1,
            corrupt_attempts: 3,
            cache_limit: None,
            host_cache_limit: None,
            host_limit_period: Duration::from_secs(5),
            evict_grace: Duration::from_secs(10),
            background_requests: 2,
            use_prefetch_list: true,
            prefetch_pack: true,
            hydrate: false,
            hydrate_rate: None,
            host_index: true,
        }
    }
}

/// Threads that verify and store fetched chunks: two per core, at least 2, at most 16.
pub(crate) fn verify_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| (2 * n.get()).clamp(2, 16))
}

pub(crate) fn opts_background(o: &StoreOptions) -> usize {
    o.background_requests.max(1)
}
