//! `lazyblk convert`: a container image (from a registry, an `oci:` layout directory or a
//! `docker save` archive) flattened into one tree, then into one erofs image and a lazyblk
//! build directory.
//!
//! **What it owns**: reading source images ([`source`]: references and platform selection,
//! manifests, configs, layers verified by digest); layer streams ([`layer`]: gzip, zstd or plain
//! by media type and magic, byte limits, `diff_id`s); applying layers onto a work tree with the
//! OCI image spec's change semantics, safely ([`apply`], over the directory-relative calls of
//! [`at`]); the merged erofs metadata over per-layer data regions ([`erofs`]); and the
//! orchestration ([`convert()`]): layers → tree and regions → erofs metadata → the builder's
//! chunked image, each layer's region a blob shared with every image that has the layer, with
//! the source config kept as `image-config.json` beside it.
//!
//! **What it must not touch**: anything outside the work directory it is given (a layer can
//! never make it write elsewhere: see [`apply`]); caches, devices, the lazyblk format (that is
//! `lazyblk-builder`'s, called as a library); pushing (the caller pushes the build directory
//! with `lazyblk_builder::push`). It prints nothing: progress goes to a callback, logs to
//! `tracing`.
//!
//! **Errors**: one type, [`Error`]; each `Display` is one line naming the layer and the entry.

pub mod apply;
pub mod at;
pub mod convert;
pub mod erofs;
pub mod error;
pub mod layer;
pub mod source;

pub use apply::{ApplyOptions, LayerStats, Tree};
pub use convert::{
    convert, unpack, ConvertOptions, Converted, Progress, TreeStats, IMAGE_CONFIG_FILE,
};
pub use error::{Error, Result};
pub use source::{Platform, SourceRef};
