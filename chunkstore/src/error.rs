//! The chunk store's error type.

use lazyblk_blocksource::BlockError;
use std::path::PathBuf;

/// Everything that can go wrong in the chunk store (format and remote errors included).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bytes that do not decode: a manifest, a prefetch list or pack.
    #[error(transparent)]
    Format(#[from] lazyblk_format::Error),
    /// The manifest does not have the digest it was asked for.
    #[error("manifest digest mismatch: expected {expected}, got {actual}")]
    ManifestDigest {
        /// Digest asked for.
        expected: String,
        /// Digest of the bytes read.
        actual: String,
    },
    /// The blob does not match what the manifest names.
    #[error("blob {location} does not match the manifest: {detail}")]
    BlobMismatch {
        /// Where the blob is.
        location: String,
        /// What differs.
        detail: String,
    },
    /// A chunk's bytes do not hash to the digest in the manifest.
    #[error("chunk {index} failed verification: {detail}")]
    ChunkCorrupt {
        /// Chunk index.
        index: u64,
        /// What was wrong.
        detail: String,
    },
    /// A metadata pack frame's bytes do not hash to the digest in the manifest.
    #[error("metadata pack frame {frame} failed verification: {detail}")]
    PackCorrupt {
        /// Frame index.
        frame: u64,
        /// What was wrong.
        detail: String,
    },
    /// Fetching from the remote failed.
    #[error(transparent)]
    Remote(#[from] lazyblk_remote::RemoteError),
    /// The cache directory is unusable.
    #[error("cache {path}: {detail}")]
    Cache {
        /// File or directory concerned.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The disk holding the cache is full.
    #[error("disk full while writing the cache file {0}")]
    DiskFull(PathBuf),
    /// An IO deadline expired.
    #[error("IO deadline of {secs}s expired: {last}")]
    Deadline {
        /// The deadline.
        secs: u64,
        /// The last error seen while retrying.
        last: String,
    },
    /// Invalid argument given by the caller.
    #[error("{0}")]
    Invalid(String),
    /// The store is shutting down.
    #[error("the chunk store is shutting down")]
    ShuttingDown,
    /// Local IO on a named file failed.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an IO error with the path it concerns; ENOSPC becomes [`Error::DiskFull`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            Error::DiskFull(path)
        } else {
            Error::Io { path, source }
        }
    }

    /// The positive errno for a block frontend.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::DiskFull(_) => libc::ENOSPC,
            Error::Invalid(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }

    /// The virtio-blk status byte for this error.
    pub fn virtio_status(&self) -> u8 {
        lazyblk_blocksource::virtio_status::IOERR
    }
}

impl From<Error> for BlockError {
    fn from(e: Error) -> BlockError {
        match e {
            Error::Deadline { .. } => BlockError::TimedOut(e.to_string()),
            Error::ShuttingDown => BlockError::ShuttingDown,
            Error::Io { source, .. } => BlockError::Io(source),
            other => BlockError::Unavailable(other.to_string()),
        }
    }
}
