//! The format crate's error type.

/// A byte string that is not what it claims to be, or an argument out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The manifest bytes are not a valid lazyblk manifest.
    #[error("malformed manifest: {0}")]
    Manifest(String),
    /// The manifest uses a format version this build does not understand.
    #[error("unsupported manifest version {found} (this build reads version {supported})")]
    ManifestVersion {
        /// Version in the file.
        found: u32,
        /// Version understood here.
        supported: u32,
    },
    /// Invalid input: a malformed list, pack or erofs image, or a bad argument.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
