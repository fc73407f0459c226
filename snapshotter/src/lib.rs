//! The core of lazyblk's containerd remote snapshotter (`lazyblk snapshotter --address
//! --root`): containerd talks to it as a `proxy_plugins` entry of type `snapshot` over a unix
//! socket, with the gRPC service of the `containerd-snapshots` crate (the snapshots API of
//! containerd 1.6 and 2.x).
//!
//! **What it owns**: everything under `--root` and the socket at `--address`:
//!
//! ```text
//! <root>/lock               flock: one snapshotter per root
//! <root>/metadata.json      the snapshot tree (meta), rewritten atomically on every change
//! <root>/snapshots/<id>/fs  a local snapshot's tree (the overlay upper dir)
//! <root>/snapshots/<id>/work  overlay's work dir (active snapshots)
//! <root>/images/<name>/mnt  where a lazy image's flattened tree is made readable (attach)
//! ```
//!
//! **What it must not touch**: HTTP, registries, block devices, caches, lazyblk's formats. All
//! of that sits behind [`LazyImages`] (three blocking calls), which the `lazyblk` binary
//! implements; this crate only records which snapshot is served by which [`LazyImage`] and asks
//! for the image to be attached or released. It never mounts anything itself: it returns mount
//! descriptions that containerd performs.
//!
//! # The remote-snapshot handshake
//!
//! containerd's CRI plugin (with `disable_snapshot_annotations = false`) prepares each layer
//! with the label `containerd.io/snapshot.ref` = the layer's chain id and the
//! `containerd.io/snapshot/cri.*` labels (image reference, manifest digest, layer digest, and
//! `cri.image-layers`: the layer digests from this layer up to the top). Prepare asks
//! [`LazyImages::find`]; for a lazy image it attaches the image once (at
//! `<root>/images/<name>/mnt`), records a committed *remote* snapshot named by the chain id
//! with the Prepare's labels (so containerd's follow-up List with
//! `labels."containerd.io/snapshot.ref"==<chain id>,parent=="<parent>"` finds it) and answers
//! ALREADY_EXISTS: containerd downloads no layer. A layer is the image's *top* when
//! `cri.image-layers` has exactly one entry (containerd truncates that list at the label size
//! limit from the far end, so the top layer's list is never cut short).
//!
//! No `snapshot.ref` label, `find` = `Ok(None)`, `find` = `Err` (logged) or `attach` failing:
//! an ordinary active snapshot, which containerd fills from the tar layer and commits.
//!
//! # Mounts
//!
//! A lazy image is one flattened erofs tree of the whole root file system, so the layers of a
//! lazy image below its top are *placeholders* with no tree of their own. For a View or Active
//! snapshot the lower dirs are its ancestors' `fs` dirs, nearest first, up to the nearest
//! remote ancestor: when that is an image's top, the image's mountpoint is the last (lowest)
//! lower dir and the ancestors below it are not used (they are inside it). When the nearest
//! remote ancestor is a placeholder (another image whose top is that chain id was pulled after
//! the lazy one, and containerd skipped the layer because it already existed), that layer is
//! *materialized* first, once: [`LazyImages::materialize`] unpacks the image's layers from the
//! base up to it (flattened, with OCI semantics) into the placeholder's own `fs` directory
//! (`fs.partial` until done, then renamed and marked in the metadata), which is then the lowest
//! lower dir. When that fails (the registry is down), Prepare, View and Mounts fail with
//! UNAVAILABLE naming the snapshot and the image, and nothing is created.
//!
//! With no lower dir: a `bind` mount of the snapshot's own `fs` (`rbind`, `rw`; `ro` for a
//! View). Active with lowers: `overlay` with `workdir=`, `upperdir=`, `lowerdir=` (and
//! `index=off` where the kernel has the parameter, as containerd's overlayfs snapshotter does).
//! A View with one lower: a read-only bind of it; with more: `overlay` with only `lowerdir=`.
//!
//! # Restart and release
//!
//! At start every image whose top layer the metadata holds is attached again (errors are logged,
//! not fatal: the snapshots stay listed, and Mounts retries the attach). Only a top layer is
//! mounted from an image's device, so removing an image's top layer (containerd removes it
//! before the layers below) calls [`LazyImages::release`] and removes its mountpoint; its
//! placeholders need the registry, not the device, if they are ever materialized.
//!
//! # Usage
//!
//! Bytes (allocated blocks) and inodes of a local snapshot's `fs` dir, hard links counted once,
//! not crossing into other file systems. A remote snapshot reports 0 and 0: its bytes are the
//! image's cache, which belongs to the device layer and is shared by every snapshot of the
//! image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod filter;
#[cfg(test)]
mod grpc_tests;
pub mod meta;
mod mounts;
mod server;
mod service;
#[cfg(test)]
mod service_tests;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use server::{serve, serve_until};
pub use service::Snapshotter;

/// The label containerd sets on a layer's Prepare: the chain id the committed layer will have.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// The image reference the CRI plugin pulls (`containerd.io/snapshot/cri.image-ref`).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The manifest digest of that image.
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The digest of the layer being prepared.
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Comma-separated layer digests from this layer to the top (truncated at the label limit).
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Set on the remote snapshots this crate makes: the lazy image's pinned reference.
pub const LABEL_LAZY_IMAGE: &str = "containerd.io/snapshot/lazyblk.image";

/// A lazy (lazyblk) version of a container image.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LazyImage {
    /// Pinned reference of the lazy image (`repo@sha256:...`).
    pub reference: String,
    /// A stable, file-name-safe key (e.g. the manifest digest's hex): names
    /// `<root>/images/<name>` and identifies the image across restarts.
    pub name: String,
}

impl LazyImage {
    fn check_name(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || n == "."
            || n == ".."
            || n.len() > 200
            || n.contains(['/', '\0', ',', ':'])
        {
            return Err(format!("lazy image name {n:?} is not a file name"));
        }
        Ok(())
    }
}

/// What the snapshotter needs from lazyblk: find the lazy version of an image, make its tree
/// readable, and undo that. The calls block (they may talk to a registry or set up a device);
/// the service runs them on tokio's blocking threads.
pub trait LazyImages: Send + Sync + 'static {
    /// The lazy version of the image a layer's Prepare labels name ([`LABEL_IMAGE_REF`],
    /// [`LABEL_MANIFEST_DIGEST`], [`LABEL_LAYER_DIGEST`], [`LABEL_IMAGE_LAYERS`]). `Ok(None)`:
    /// there is none (fallback to unpacking). `Err`: could not tell (registry down): fallback,
    /// logged.
    fn find(&self, labels: &HashMap<String, String>) -> Result<Option<LazyImage>, String>;
    /// Make the image's tree readable at `mountpoint` (an existing empty directory): attach one
    /// device per image and mount its erofs there. Idempotent: also called at start for every
    /// image the metadata names, so it must work while the registry is down.
    fn attach(&self, image: &LazyImage, mountpoint: &Path) -> Result<(), String>;
    /// Undo [`LazyImages::attach`]: the image's top layer snapshot was removed.
    fn release(&self, image: &LazyImage, mountpoint: &Path) -> Result<(), String>;
    /// Unpack into `dir` (an existing empty directory) the flattened tree of an intermediate
    /// layer of a lazy image: the layers of the image its `labels` name (the placeholder's
    /// Prepare labels: [`LABEL_IMAGE_REF`], [`LABEL_MANIFEST_DIGEST`], [`LABEL_LAYER_DIGEST`])
    /// from the base up to that layer. Called when another image's snapshot stands on that
    /// layer (its chain id is that image's top, so containerd never unpacked it). The default
    /// cannot.
    fn materialize(&self, labels: &HashMap<String, String>, dir: &Path) -> Result<(), String> {
        let _ = (labels, dir);
        Err("this provider cannot unpack layers".into())
    }
}

/// The crate's error. Each kind maps to the gRPC code containerd's `errdefs` expects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NOT_FOUND.
    #[error("not found: {0}")]
    NotFound(String),
    /// ALREADY_EXISTS (also the answer that makes a Prepare a remote snapshot).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// FAILED_PRECONDITION.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// INVALID_ARGUMENT.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// UNAVAILABLE: a lazy image could not be attached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A file system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The metadata file does not decode.
    #[error("metadata {path}: {msg}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        msg: String,
    },
    /// Another snapshotter holds the root or serves the address.
    #[error("in use: {0}")]
    InUse(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] containerd_snapshots::tonic::transport::Error),
    /// A blocking task panicked or was cancelled.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Error> for containerd_snapshots::tonic::Status {
    fn from(e: Error) -> Self {
        use containerd_snapshots::tonic::Status;
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::Unavailable(_) => Status::unavailable(msg),
            _ => Status::internal(msg),
        }
    }
}

/// Shared by the service and the server.
pub(crate) type Lazy = Arc<dyn LazyImages>;
