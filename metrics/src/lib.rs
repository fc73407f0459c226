//! lazyblk's Prometheus metrics.
//!
//! * [`expose`]: the text exposition (format 0.0.4, encoded by `prometheus-client`) of the
//!   chunk stores' counters ([`lazyblk_chunkstore::StatsSnapshot`]), per device (labels
//!   `device`, `image`) and, for the host, with `lazyblk_host_*` totals; and [`expose::parse_text`],
//!   a strict reader of that format for tests and checks.
//! * [`http`]: the one request this crate answers, `GET /metrics` over HTTP/1.x, answered
//!   minimally (one request per connection, `Connection: close`): what Prometheus and
//!   `curl --unix-socket` speak. No server framework: a request head of at most 8 KiB is read
//!   and parsed by hand (fuzzed).
//! * [`listen`]: `unix:PATH` and `tcp:ADDR:PORT` addresses and their listeners; unix sockets are
//!   bound 0600 (0660 with a group) through `lazyblk_blocksource::fsutil::bind_private_socket`.
//!
//! It reads counters and serves them; it never counts anything itself (the chunk store and the
//! frontends do) and knows nothing of devices beyond their id and image.

pub mod expose;
pub mod http;
pub mod listen;

pub use expose::{encode, parse_text, Device, Sample};
pub use http::{parse_request, serve_connection, Request};
pub use listen::{Listen, Listener};

/// What can go wrong here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--listen` address that is not `unix:PATH` or `tcp:ADDR:PORT`.
    #[error("bad listen address {addr:?}: {why} (expected unix:PATH or tcp:ADDR:PORT)")]
    Listen {
        /// The address given.
        addr: String,
        /// What is wrong with it.
        why: String,
    },
    /// An HTTP request this server does not understand.
    #[error("bad HTTP request: {0}")]
    Request(String),
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Text that is not valid Prometheus exposition format.
    #[error("bad metrics text, line {line}: {why}")]
    Text {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
