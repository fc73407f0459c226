//! The crate's one error type. Every `Display` is one line (paths from layers are shown with
//! `{:?}` so a newline in a hostile name cannot break it).

use std::path::PathBuf;

/// What can go wrong while converting an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A layer tried something unsafe or impossible (a path out of the tree, through a
    /// symlink, a hardlink to outside, a whiteout of `..`, ...): refused, nothing applied past it.
    #[error("layer {layer}: refused {path:?}: {why}")]
    Refused {
        /// The layer's index (0 = the base) or its digest.
        layer: String,
        /// The entry's path as written in the layer.
        path: String,
        /// Why.
        why: String,
    },
    /// A layer expands past a configured limit (a tar bomb, or a limit set too low).
    #[error(
        "layer {layer}: {what} exceeds the limit of {limit} (raise it with --max-layer-{flag})"
    )]
    Limit {
        /// The layer.
        layer: String,
        /// What grew too large ("expanded size", "entry count").
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The flag's suffix (`bytes`, `entries`).
        flag: &'static str,
    },
    /// A blob's bytes do not match its digest.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// What was checked ("layer 2 (sha256:...)").
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// A layer is not a (well-formed) tar stream, or is compressed in a way we cannot read.
    #[error("layer {layer}: {why}")]
    Layer {
        /// The layer.
        layer: String,
        /// What is wrong.
        why: String,
    },
    /// The source image (its reference, layout, archive, manifest or config) is unusable.
    #[error("{0}")]
    Source(String),
    /// Talking to the registry failed.
    #[error(transparent)]
    Registry(#[from] lazyblk_registry::RegistryError),
    /// Building the chunked image failed.
    #[error(transparent)]
    Build(#[from] lazyblk_builder::Error),
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

/// `s` on one line and of bounded length: control characters escaped (messages of the tar
/// reader quote a hostile layer's bytes), cut after 300 characters.
pub(crate) fn one_line(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 300 {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
