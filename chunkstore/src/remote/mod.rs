//! Where blobs come from. The chunk store sees only the [`Remote`] trait.
//!
//! A remote reads byte ranges of one blob. Errors are classified [`Transient`](ErrorKind::Transient)
//! (worth retrying: timeouts, resets, 5xx, truncated bodies) or
//! [`Permanent`](ErrorKind::Permanent) (retrying cannot help: 404, no range support, a blob of
//! the wrong size).

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;

mod http;
mod local;
pub use http::{HttpOptions, HttpRemote};
pub use local::LocalRemote;

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

/// Where a manifest or blob lives: a local path or an HTTP(S) URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local file.
    Path(std::path::PathBuf),
    /// An http:// or https:// URL.
    Url(String),
}

impl Location {
    /// Parse a command-line argument.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("http://") || s.starts_with("https://") {
            Location::Url(s.to_string())
        } else {
            Location::Path(s.into())
        }
    }

    /// The location of `name` next to this one (in the same directory).
    pub fn sibling(&self, name: &str) -> Location {
        match self {
            Location::Path(p) => Location::Path(
                p.parent()
                    .map(|d| d.join(name))
                    .unwrap_or_else(|| name.into()),
            ),
            Location::Url(u) => {
                let base = u.split(['?', '#']).next().unwrap_or(u);
                let dir = match base.rfind('/') {
                    Some(i) if i > base.find("://").map_or(0, |j| j + 2) => &base[..=i],
                    _ => base,
                };
                let sep = if dir.ends_with('/') { "" } else { "/" };
                Location::Url(format!("{dir}{sep}{name}"))
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Url(u) => write!(f, "{u}"),
        }
    }
}

/// Opens remotes and reads small files with one HTTP client, so the requests of one store
/// (the manifest, the prefetch list, the blob's ranges) share its connection pool instead of
/// opening a connection each.
#[derive(Clone)]
pub struct Connector {
    client: reqwest::Client,
}

impl Connector {
    /// A connector with the HTTP settings `http`.
    pub fn new(http: &HttpOptions) -> Result<Self, RemoteError> {
        Ok(Connector {
            client: http::client(http)?,
        })
    }

    /// Open a [`Remote`] for a location.
    pub fn open_remote(&self, loc: &Location) -> Box<dyn Remote> {
        match loc {
            Location::Path(p) => Box::new(LocalRemote::new(p.clone())),
            Location::Url(u) => Box::new(HttpRemote::with_client(u, self.client.clone())),
        }
    }

    /// Read a whole (small) file: a manifest. Bounded to `max` bytes.
    pub async fn read_whole(&self, loc: &Location, max: u64) -> Result<Vec<u8>, RemoteError> {
        match loc {
            Location::Path(p) => {
                let name = p.display().to_string();
                let meta = std::fs::metadata(p)
                    .map_err(|e| RemoteError::permanent(&name, e.to_string()))?;
                if meta.len() > max {
                    return Err(RemoteError::permanent(
                        name,
                        format!("larger than {max} bytes"),
                    ));
                }
                std::fs::read(p).map_err(|e| RemoteError::permanent(name, e.to_string()))
            }
            Location::Url(u) => http::get_whole(&self.client, u, max).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_locations() {
        assert_eq!(
            Location::parse("http://h:1/a/b/manifest?x=1").sibling("blob"),
            Location::Url("http://h:1/a/b/blob".into())
        );
        assert_eq!(
            Location::parse("http://h:1").sibling("blob"),
            Location::Url("http://h:1/blob".into())
        );
        assert_eq!(
            Location::parse("/x/y/manifest").sibling("blob"),
            Location::Path("/x/y/blob".into())
        );
    }
}
