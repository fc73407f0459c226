//! lazyblk's chunk store: a verified, crash-consistent local cache of one image that fetches
//! missing chunks on demand, and implements [`lazyblk_blocksource::BlockSource`] for the
//! frontends.
//!
//! It owns presence (the in-memory bits and the on-disk [`bitmap`]), verification, the write
//! ordering and single flight; it reads bytes through the [`lazyblk_remote::Remote`] trait
//! (never HTTP details) and decodes with `lazyblk-format` (never its own parser). It must not
//! know about devices, daemons or the command line.
//!
//! Modules, one role each:
//! * [`store`]: [`ChunkStore`], its shared state and lifetime (close, seal, export).
//! * [`open`]: opening as named steps: manifest, cache directory, companions (blob probe,
//!   prefetch list, prefetch pack), bitmap validation or repair, then the running store.
//! * [`cache`]: the cache directory's layout and its validation (re-verify, carry bits over).
//! * [`fetch`]: single flight, coalesced runs, streamed range requests, retry, completion.
//! * [`verify`]: decompress, check the digest, write the data file.
//! * [`policy`]: what to fetch ahead (readahead, prefetch, hydration) and what to evict.
//! * [`persist`]: the group-commit persister of presence bits.
//! * [`hostindex`]: the host-wide chunk index: copies of this image's chunks in the other
//!   caches under the same cache root, copied and verified instead of fetched.
//! * [`source`]: the [`lazyblk_blocksource::BlockSource`] implementation (the hot path).
//! * [`stats`], [`options`], [`gc`], [`bitmap`], [`bits`].

pub mod bitmap;
pub(crate) mod bits;
pub mod cache;
pub mod error;
pub(crate) mod fetch;
pub mod gc;
pub(crate) mod hostindex;
pub mod open;
pub mod options;
pub(crate) mod persist;
pub mod policy;
pub mod source;
pub mod stats;
pub mod store;
pub(crate) mod verify;

/// The imports the store's modules share.
mod prelude {
    pub(crate) use crate::bitmap::{BitmapFile, Trust};
    pub(crate) use crate::bits::AtomicBits;
    pub(crate) use crate::cache::*;
    pub(crate) use crate::error::{Error, Result};
    pub(crate) use crate::fetch::*;
    pub(crate) use crate::hostindex::*;
    pub(crate) use crate::options::*;
    pub(crate) use crate::persist::*;
    pub(crate) use crate::policy::evict::*;
    pub(crate) use crate::policy::hostlimit::*;
    pub(crate) use crate::policy::readahead::*;
    pub(crate) use crate::stats::*;
    pub(crate) use crate::store::*;
    pub(crate) use bitvec::prelude::*;
    pub(crate) use bytes::{Bytes, BytesMut};
    pub(crate) use lazyblk_blocksource::fsutil::PageCachePolicy;
    pub(crate) use lazyblk_blocksource::{
        check_range, BlockError, BlockSource, Completion, Geometry, Located,
    };
    pub(crate) use lazyblk_format::{
        ChunkRef, Encoding, Entry, ImageId, Manifest, PrefetchList, PrefetchPack,
        MAX_MANIFEST_BYTES, PACK_BLOCK, PACK_FILE, PREFETCH_FILE,
    };
    pub(crate) use lazyblk_remote::{
        BlobInfo, Concat, Connector, ErrorKind, HttpOptions, Location, RegistryOptions, Remote,
        RemoteError,
    };
    pub(crate) use rand::Rng;
    pub(crate) use serde::{Deserialize, Serialize};
    pub(crate) use std::collections::{BTreeMap, HashMap};
    pub(crate) use std::fs::File;
    pub(crate) use std::os::fd::AsRawFd;
    pub(crate) use std::os::unix::fs::FileExt;
    pub(crate) use std::path::{Path, PathBuf};
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use std::sync::{Arc, Condvar, Mutex};
    pub(crate) use std::time::{Duration, Instant};
    pub(crate) use tokio::sync::OwnedSemaphorePermit;
}

pub use cache::{frame_intact, CacheLayout};
pub use error::{Error, Result};
pub use gc::{gc, GcEntry};
pub use lazyblk_remote::{HttpOptions, Location, RegistryOptions};
pub use options::StoreOptions;
pub use stats::{
    AttachTimes, HistogramSnapshot, OpenReport, OriginBytes, StatsSnapshot, FETCH_LATENCY_BOUNDS_US,
};
pub use store::{ChunkStore, BLOCK_SIZE};
