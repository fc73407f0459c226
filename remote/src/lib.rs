//! Where blobs come from. The chunk store sees only the [`Remote`] trait.
//!
//! This crate owns the network and file access of lazyblk's images: the [`Remote`] trait, its
//! HTTP(S) and local-file implementations, [`Concat`] (an image's blob followed by a prefetch
//! pack's), [`Location`] (where a manifest lives) and the [`Connector`] that opens remotes of one
//! store over one connection pool, plus the rules for ranges, probes and error classification.
//! Images in OCI registries are one more kind of location ([`registry`]), read through
//! `lazyblk-registry`. It knows nothing of lazyblk's manifests, chunks or caches: it moves
//! bytes, and the chunk store verifies every one of them. Of lazyblk it depends on the registry
//! client only.
//!
//! A remote reads byte ranges of one blob. Errors are classified [`Transient`](ErrorKind::Transient)
//! (worth retrying: timeouts, resets, 5xx, truncated bodies) or
//! [`Permanent`](ErrorKind::Permanent) (retrying cannot help: 404, no range support, a blob of
//! the wrong size).

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;

mod concat;
mod connector;
mod http;
mod local;
mod location;
pub mod registry;
pub use concat::Concat;
pub use connector::Connector;
pub use http::{HttpOptions, HttpRemote};
pub use lazyblk_registry::ClientOptions as RegistryOptions;
pub use local::LocalRemote;
pub use location::Location;
pub use registry::{RegistryLocation, RegistryRemote};

#[cfg(test)]
mod served_tests {
    use super::*;

    #[test]
    fn origin_labels_hold_no_credentials_paths_or_queries() {
        assert_eq!(
            origin_label("https://user:secret@cdn.example:8443/a/b?token=t"),
            "https://cdn.example:8443"
        );
        assert_eq!(origin_label("http://h/x"), "http://h");
        assert_eq!(origin_label("not a url"), "unknown");
    }

    #[test]
    fn merge_sums_per_origin_and_kind() {
        let s = |o: &str, m, b| ServedBytes {
            origin: o.into(),
            mirror: m,
            bytes: b,
        };
        let mut v = vec![s("a", false, 1)];
        merge_served(
            &mut v,
            vec![s("a", false, 2), s("a", true, 3), s("b", false, 4)],
        );
        assert_eq!(v, vec![s("a", false, 3), s("a", true, 3), s("b", false, 4)]);
    }
}

/// Boxed future returned by [`Remote`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whether retrying may help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retry with backoff.
    Transient,
    /// Do not retry.
    Permanent,
}

/// A failed remote operation.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct RemoteError {
    /// Transient or permanent.
    pub kind: ErrorKind,
    /// What was being read.
    pub location: String,
    /// What happened.
    pub message: String,
}

impl RemoteError {
    /// A transient error.
    pub fn transient(location: impl Into<String>, message: impl Into<String>) -> Self {
        RemoteError {
            kind: ErrorKind::Transient,
            location: location.into(),
            message: message.into(),
        }
    }

    /// A permanent error.
    pub fn permanent(location: impl Into<String>, message: impl Into<String>) -> Self {
        RemoteError {
            kind: ErrorKind::Permanent,
            location: location.into(),
            message: message.into(),
        }
    }

    /// Whether a retry may help.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

/// What [`Remote::probe`] learnt about the blob.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlobInfo {
    /// Size of the blob in bytes.
    pub size: u64,
    /// Entity tag, when the server gives one.
    pub etag: Option<String>,
}

/// Bytes of range reads served by one origin (`scheme://host[:port]`: never a path, a query
/// or user info, which may hold credentials), as [`Remote::served`] reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedBytes {
    /// `scheme://host[:port]` of the server (`file://` for local files).
    pub origin: String,
    /// A registry mirror (else the image's own server).
    pub mirror: bool,
    /// Bytes handed to range-read sinks since the remote was made.
    pub bytes: u64,
}

/// The origin of `url` for [`ServedBytes`]: `scheme://host[:port]`, nothing else.
pub fn origin_label(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) if u.has_host() => u.origin().ascii_serialization(),
        _ => "unknown".to_string(),
    }
}

/// Add `more` into `into`, one entry per (origin, mirror).
pub fn merge_served(into: &mut Vec<ServedBytes>, more: Vec<ServedBytes>) {
    for m in more {
        match into
            .iter_mut()
            .find(|s| s.origin == m.origin && s.mirror == m.mirror)
        {
            Some(s) => s.bytes += m.bytes,
            None => into.push(m),
        }
    }
}

/// A source of byte ranges of one blob.
pub trait Remote: Send + Sync + 'static {
    /// Human-readable location, used in error messages.
    fn location(&self) -> String;

    /// Check that the blob exists and ranges work; report its size and ETag.
    fn probe(&self) -> BoxFuture<'_, Result<BlobInfo, RemoteError>>;

    /// Read exactly `len` bytes at `offset`, handing them to `sink` in order as they arrive
    /// (in pieces of any size), so a caller can use the start of a long range before its end
    /// is in. On an error, the pieces already handed over are valid bytes of the range.
    fn read_range_with<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mut (dyn FnMut(Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), RemoteError>>;

    /// The bytes last read did not verify (a chunk's digest did not match): a remote with
    /// several sources (registry mirrors) stops using the one that served them. Default:
    /// nothing to do.
    fn report_corrupt(&self) {}

    /// Bytes of range reads served so far, per origin (mirrors apart). Default: none known.
    fn served(&self) -> Vec<ServedBytes> {
        Vec::new()
    }

    /// Read exactly `len` bytes at `offset` into one buffer.
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, RemoteError>> {
        Box::pin(async move {
            let mut body = bytes::BytesMut::with_capacity(len as usize);
            let mut sink = |piece: Bytes| body.extend_from_slice(&piece);
            self.read_range_with(offset, len, &mut sink).await?;
            Ok(body.freeze())
        })
    }
}
