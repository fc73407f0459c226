//! The unix socket and the gRPC server.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::tonic::transport::Server;
use tracing::info;

use crate::{Error, LazyImages, Snapshotter};

/// Bind the socket at `address`, mode 0600, replacing a stale one
/// (`lazyblk_blocksource::fsutil::bind_private_socket`: bound under a temporary name, chmod,
/// renamed over `address`, so the socket is never reachable with looser permissions). A live server
/// at `address` (a connect succeeds) or a non-socket file there is an error.
fn bind(address: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    let dir = match address.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
    match std::fs::symlink_metadata(address) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(address).is_ok() {
                return Err(Error::InUse(format!(
                    "a server is listening on {}",
                    address.display()
                )));
            }
            info!(address = %address.display(), "replacing a stale socket");
        }
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "{} exists and is not a socket",
                address.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("stat {}", address.display()), e)),
    }
    let l = lazyblk_blocksource::fsutil::bind_private_socket(address, None)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Error::io(format!("bind {}", address.display()), e))?;
    Ok(l)
}

/// Serve the snapshots API on the unix socket `address` over `root` until `shutdown`
/// completes (async: call it inside a tokio runtime with the `net` driver). Opens the
/// snapshotter (attaching every lazy image the metadata names) on a blocking thread first;
/// removes the socket on the way out.
pub async fn serve_until(
    address: &Path,
    root: &Path,
    lazy: Arc<dyn LazyImages>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let r = root.to_path_buf();
    let snap = tokio::task::spawn_blocking(move || Snapshotter::open(&r, lazy))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let listener = tokio::net::UnixListener::from_std(bind(address)?)
        .map_err(|e| Error::io(format!("listen {}", address.display()), e))?;
    info!(address = %address.display(), root = %snap.root().display(), "snapshotter serving");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let served = Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(snap)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(address);
    info!(address = %address.display(), "snapshotter stopped");
    Ok(served?)
}

/// Serve until SIGINT or SIGTERM: blocking, on its own multi-threaded tokio runtime. What the
/// `lazyblk snapshotter --address --root` command calls.
pub fn serve(address: &Path, root: &Path, lazy: Arc<dyn LazyImages>) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("snapshotter")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the tokio runtime", e))?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| Error::io("install the SIGTERM handler", e))?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            info!("signal: shutting down");
        };
        serve_until(address, root, lazy, shutdown).await
    })
}
