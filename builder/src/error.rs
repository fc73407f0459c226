//! The builder's error type.

use std::path::PathBuf;

/// What can go wrong while building or publishing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option or input out of range (chunk size, block list, blob name...).
    #[error("{0}")]
    Invalid(String),
    /// Encoding or decoding a format failed (a stale file that does not decode, say).
    #[error(transparent)]
    Format(#[from] lazyblk_format::Error),
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

impl Error {
    /// An IO error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
