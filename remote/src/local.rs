//! A blob on a local path (or a network file system mounted locally).

use crate::{BlobInfo, BoxFuture, Remote, RemoteError};
use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Reads ranges of a local file.
pub struct LocalRemote {
    path: PathBuf,
    served: AtomicU64,
}

impl LocalRemote {
    /// A remote for `path`.
    pub fn new(path: PathBuf) -> Self {
        LocalRemote {
            path,
            served: AtomicU64::new(0),
        }
    }
}

impl Remote for LocalRemote {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    /// Local files count under the one origin `file://` (no path: one series per store).
    fn served(&self) -> Vec<crate::ServedBytes> {
        vec![crate::ServedBytes {
            origin: "file://".to_string(),
            mirror: false,
            bytes: self.served.load(Ordering::Relaxed),
        }]
    }

    fn probe(&self) -> BoxFuture<'_, Result<BlobInfo, RemoteError>> {
        Box::pin(async move {
            let meta = std::fs::metadata(&self.path)
                .map_err(|e| RemoteError::permanent(self.location(), e.to_string()))?;
            Ok(BlobInfo {
                size: meta.len(),
                etag: None,
            })
        })
    }

    fn read_range_with<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mut (dyn FnMut(Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        let path = self.path.clone();
        Box::pin(async move {
            let loc = path.display().to_string();
            let bytes = tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path)
                    .map_err(|e| RemoteError::permanent(&loc, e.to_string()))?;
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset).map_err(|e| {
                    RemoteError::permanent(&loc, format!("read {offset}+{len}: {e}"))
                })?;
                Ok::<_, RemoteError>(Bytes::from(buf))
            })
            .await
            .map_err(|e| RemoteError::transient("local read", e.to_string()))??;
            self.served.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            sink(bytes);
            Ok(())
        })
    }
}
