//! Publishing files: a blob or a small file appears whole under its final name or not at all.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

/// Flush the blob written to `tmp`, make it durable and move it to `path`.
pub(crate) fn publish_blob(blob: BufWriter<File>, tmp: &Path, path: &Path) -> Result<()> {
    let file = blob
        .into_inner()
        .map_err(|e| Error::io(tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))
}

/// Write `bytes` to `path` atomically ([`lazyblk_blocksource::fsutil::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    lazyblk_blocksource::fsutil::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
}
