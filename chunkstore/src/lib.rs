//! lazyblk's chunk store: the image format, the remotes, and a verified, crash-consistent local
//! cache that fetches missing chunks on demand.
//!
//! * [`format`]: the manifest (one encoder, one fuzzed decoder) and the image identity.
//! * [`builder`]: cut a raw image into a blob of zstd chunks plus a manifest (and, for erofs
//!   images, a prefetch list of the file-system metadata found by [`erofs`]).
//! * [`remote`]: where blobs come from (HTTP range requests, local paths), behind a trait.
//! * [`bitmap`]: the persistent presence bitmap.
//! * [`store`]: [`ChunkStore`], which implements [`lazyblk_blocksource::BlockSource`].

pub mod bitmap;
pub mod builder;
pub mod erofs;
pub mod error;
pub mod format;
pub mod remote;
pub mod store;

pub use error::{Error, Result};
pub use format::{ImageId, Manifest};
pub use remote::Location;
pub use store::{gc, ChunkStore, GcEntry, OpenReport, StatsSnapshot, StoreOptions};
