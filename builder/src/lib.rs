//! lazyblk's builder: the writing side of the format.
//!
//! * [`image`]: `lazyblk build`: cut a raw image into a blob of zstd chunks and a manifest, and
//!   for erofs images store the blocks holding the file-system metadata a second time, densely,
//!   at the end of the blob (the metadata pack, [`lazyblk_format::MetaPack`]), plus any blocks a
//!   block trace names (`--pack-blocks`).
//! * [`pack`]: writing pack frames, for the metadata pack and for prefetch packs
//!   (`lazyblk trace --pack`), published next to an unchanged image.
//! * [`publish`]: files appear whole under their final names, or not at all.
//! * [`push`]: a build directory published to an OCI registry as a lazyblk artifact, and a
//!   new prefetch pack published over an image already there.
//!
//! It writes local files and pushes to registries; it never reads a cache or a device (the
//! `trace --pack` command reads the device and hands the blocks here). Encoding is `lazyblk-format`'s, so what
//! is built is what the store decodes.

pub mod error;
pub mod image;
pub mod pack;
pub mod publish;
pub mod push;
#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use image::{
    build_image, build_parts, shared_blob_name, BuildOptions, BuildSummary, PackBlocks, Part,
    MANIFEST_FILE,
};
pub use pack::{build_prefetch_pack, PackSummary};
pub use publish::write_atomic;
pub use push::{push, push_linked, push_pack, LinkedPush, PushSummary, SourceLink, Subject};
