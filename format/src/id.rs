//! The image identity: the SHA-256 of the manifest bytes.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fmt;

/// The identity of an image: the SHA-256 of its manifest bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageId(pub [u8; 32]);

impl ImageId {
    /// Digest of manifest bytes.
    pub fn of(manifest_bytes: &[u8]) -> ImageId {
        ImageId(Sha256::digest(manifest_bytes).into())
    }

    /// Lower-case hex without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse `sha256:<64 hex>` (the prefix is optional).
    pub fn parse(s: &str) -> Result<ImageId> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        let bytes = hex::decode(h)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| Error::Invalid(format!("not a sha256 digest: {s}")))?;
        Ok(ImageId(bytes))
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
