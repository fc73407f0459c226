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

/// Two blobs read as one: offsets below `split` from the first (the image's blob), the rest
/// from the second at `offset - split` (a prefetch pack's blob, whose frames the store places
/// after the image's). A range across the seam is read from both, in order.
pub struct Concat {
    first: Box<dyn Remote>,
    split: u64,
    second: Box<dyn Remote>,
    second_size: u64,
}

impl Concat {
    /// `first` (of `split` bytes) followed by `second` (of `second_size` bytes).
    pub fn new(
        first: Box<dyn Remote>,
        split: u64,
        second: Box<dyn Remote>,
        second_size: u64,
    ) -> Self {
        Concat {
            first,
            split,
            second,
            second_size,
        }
    }
}

impl Remote for Concat {
    fn location(&self) -> String {
        format!("{} + {}", self.first.location(), self.second.location())
    }

    fn probe(&self) -> BoxFuture<'_, Result<BlobInfo, RemoteError>> {
        Box::pin(async move {
            let (a, b) = tokio::join!(self.first.probe(), self.second.probe());
            let (a, b) = (a?, b?);
            if b.size != self.second_size {
                return Err(RemoteError::permanent(
                    self.second.location(),
                    format!("size is {} bytes, expected {}", b.size, self.second_size),
                ));
            }
            Ok(BlobInfo {
                size: a.size + b.size,
                etag: a.etag,
            })
        })
    }

    fn read_range_with<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mut (dyn FnMut(Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let end = offset + len;
            if offset < self.split {
                let head = end.min(self.split) - offset;
                self.first.read_range_with(offset, head, sink).await?;
            }
            if end > self.split {
                let from = offset.max(self.split);
                self.second
                    .read_range_with(from - self.split, end - from, sink)
                    .await?;
            }
            Ok(())
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
    fn concat_reads_across_the_seam_in_order() {
        let dir = std::env::temp_dir().join(format!("lazyblk-concat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), b"0123456789").unwrap();
        std::fs::write(dir.join("b"), b"abcdef").unwrap();
        let c = Concat::new(
            Box::new(LocalRemote::new(dir.join("a"))),
            10,
            Box::new(LocalRemote::new(dir.join("b"))),
            6,
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(&c.read_range(2, 3).await.unwrap()[..], b"234");
            assert_eq!(&c.read_range(8, 5).await.unwrap()[..], b"89abc");
            assert_eq!(&c.read_range(11, 5).await.unwrap()[..], b"bcdef");
            assert_eq!(c.probe().await.unwrap().size, 16);
            assert!(c.read_range(14, 3).await.is_err(), "past the second blob");
            let short = Concat::new(
                Box::new(LocalRemote::new(dir.join("a"))),
                10,
                Box::new(LocalRemote::new(dir.join("b"))),
                7,
            );
            let e = short.probe().await.unwrap_err();
            assert!(e.to_string().contains("expected 7"), "{e}");
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
