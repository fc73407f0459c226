//! lazyblk's formats: the bytes that `lazyblk build` writes and the chunk store reads.
//!
//! * [`manifest`]: the manifest (the chunk table of an image; one encoder, one fuzzed decoder)
//!   and [`ImageId`], the SHA-256 of its bytes that names the image.
//! * [`metapack`]: the metadata pack section (scattered 4 KiB blocks stored densely in frames).
//! * [`lists`]: prefetch lists (chunks in first-access order) and block lists.
//! * [`prefetch_pack`]: a workload's blocks in a blob of their own, next to an image.
//! * [`erofs`]: where an erofs image keeps its file-system metadata.
//!
//! This crate owns encoding and decoding only: no IO, no network, no cache. Every decoder
//! takes untrusted bytes, checks each length before it trusts it and is fuzzed
//! (`fuzz/fuzz_targets/`). It depends on nothing else of lazyblk; the builder and the chunk
//! store both depend on it, so the writer and the reader can never disagree.

mod codec;
pub mod erofs;
pub mod error;
pub mod id;
pub mod lists;
pub mod manifest;
pub mod metapack;
pub mod prefetch_pack;

pub use error::{Error, Result};
pub use id::ImageId;
pub use lists::{BlockList, PrefetchList, BLOCK_LIST_MAGIC, PREFETCH_FILE, PREFETCH_MAGIC};
pub use manifest::{
    valid_blob_name, ChunkRef, Encoding, Entry, Manifest, SharedBlob, DEFAULT_CHUNK_SIZE,
    DEFAULT_PACK_FRAME_BLOCKS, ENTRY_LEN, HEADER_LEN, MAGIC, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES,
    MAX_PACK_FRAME_BLOCKS, MAX_SHARED_BLOBS, MIN_CHUNK_SIZE, PACK_BLOCK, VERSION,
};
pub use metapack::MetaPack;
pub use prefetch_pack::{PrefetchPack, PACK_FILE, PACK_MAGIC};
