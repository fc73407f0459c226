//! Metrics and socket permissions of the devices (`lazyblk-metrics` does the format and the
//! HTTP): each daemon's control socket and its metrics socket `<id>.metrics.sock` beside it
//! (plus `add --metrics-addr`), both 0600 (0660 with `--socket-group`), served from the
//! daemon's one control thread, which polls all of them; and `lazyblk metrics` for the host,
//! which gathers every daemon's counters over its control socket.

use crate::daemon;
use anyhow::{bail, Context, Result};
use lazyblk_chunkstore::{ChunkStore, StatsSnapshot};
use lazyblk_metrics::{Device, Listen, Listener};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Weak;

/// Who may reach a device's sockets, and an optional TCP address for its metrics.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SocketArgs {
    /// Make the device's control and metrics sockets mode 0660 owned by this group (a name or
    /// a gid), for an unprivileged monitoring agent; by default they are 0600, root only.
    #[arg(long, value_name = "NAME|GID")]
    pub socket_group: Option<String>,
    /// Also serve the device's metrics (HTTP GET /metrics) on this TCP address, `ADDR:PORT`.
    /// Whoever reaches the address can read them: use a loopback or management address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,
}

impl SocketArgs {
    /// The group's id, when one was given.
    pub fn gid(&self) -> Result<Option<u32>> {
        group(self.socket_group.as_deref())
    }

    /// The same settings as `add` flags (kept in the device record for `recover`).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(g) = &self.socket_group {
            v.extend(["--socket-group".to_string(), g.clone()]);
        }
        if let Some(a) = &self.metrics_addr {
            v.extend(["--metrics-addr".to_string(), a.to_string()]);
        }
        v
    }
}

fn group(g: Option<&str>) -> Result<Option<u32>> {
    g.map(|g| {
        lazyblk_blocksource::fsutil::group_id(g).with_context(|| format!("--socket-group {g}"))
    })
    .transpose()
}

/// The metrics socket of device `id`, beside its control socket.
pub fn socket_path(state: &Path, id: u32) -> PathBuf {
    state.join(format!("{id}.metrics.sock"))
}

/// Create the state directory (0755) or check the one there: one that anyone may write to
/// would let anyone replace the sockets in it, so it is refused.
pub fn ensure_state_dir(state: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(state)
        .with_context(|| format!("creating the state directory {}", state.display()))?;
    let mode = std::fs::metadata(state)
        .with_context(|| format!("state directory {}", state.display()))?
        .permissions()
        .mode();
    if mode & 0o002 != 0 {
        bail!(
            "the state directory {} is world-writable (mode {:o}): anyone could replace its sockets; make it writable by root only",
            state.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// A device's counters as `lazyblk status` and its metrics show them: the store's, with the
/// hits the frontend saw (it sees every read, the store only the misses).
pub fn device_status(store: &ChunkStore, io: &lazyblk_ublk::IoStats) -> StatsSnapshot {
    let mut stats = store.stats();
    stats.hits = io.reads().saturating_sub(io.read_misses());
    stats.miss_wait_us_total = io.miss_wait_us();
    stats
}

/// What a device's metrics socket answers: its series, or only `lazyblk_up 0` once its store
/// is closing.
pub fn render_device(
    id: u32,
    image: String,
    store: Weak<ChunkStore>,
    io: std::sync::Arc<lazyblk_ublk::IoStats>,
) -> impl Fn() -> String {
    move || {
        let stats = store.upgrade().map(|s| device_status(&s, &io));
        lazyblk_metrics::encode(
            &[Device {
                id,
                image: image.clone(),
                stats,
            }],
            false,
        )
    }
}

/// A daemon's sockets: control, then metrics (unix, and TCP with `--metrics-addr`).
pub struct Sockets {
    control: UnixListener,
    metrics: Vec<Listener>,
}

/// Bind device `id`'s control and metrics sockets in `state` with the permissions of `args`.
pub fn bind(state: &Path, id: u32, args: &SocketArgs) -> Result<Sockets> {
    let gid = args.gid()?;
    let path = daemon::socket_path(state, id);
    let control = lazyblk_blocksource::fsutil::bind_private_socket(&path, gid)
        .with_context(|| format!("control socket {}", path.display()))?;
    let mut metrics = vec![Listener::bind(&Listen::Unix(socket_path(state, id)), gid)?];
    if let Some(a) = args.metrics_addr {
        metrics.push(Listener::bind(&Listen::Tcp(a), None)?);
    }
    control.set_nonblocking(true)?;
    for m in &metrics {
        m.set_nonblocking()?;
    }
    Ok(Sockets { control, metrics })
}

impl Sockets {
    /// The control listener and the metrics listeners, for a caller that serves them itself
    /// (the daemon, from tasks of its store's runtime).
    pub fn into_parts(self) -> (UnixListener, Vec<Listener>) {
        (self.control, self.metrics)
    }
}

/// Every device with a record in `state`: its counters from its daemon, or down.
pub fn host_devices(state: &Path) -> Vec<Device> {
    daemon::records(state)
        .into_iter()
        .map(|r| Device {
            id: r.id,
            stats: daemon::query_status(state, r.id).ok(),
            image: r.image,
        })
        .collect()
}

/// Run `lazyblk metrics`: print the host's metrics once, or with `listen` serve them (GET
/// /metrics) until killed.
pub fn run(state: &Path, listen: Option<Listen>, socket_group: Option<&str>) -> Result<()> {
    let render = || lazyblk_metrics::encode(&host_devices(state), true);
    let Some(at) = listen else {
        print!("{}", render());
        return Ok(());
    };
    if socket_group.is_some() && !matches!(at, Listen::Unix(_)) {
        bail!("--socket-group is for --listen unix:PATH");
    }
    let l = Listener::bind(&at, group(socket_group)?)?;
    eprintln!("lazyblk: serving the host's metrics on {at}");
    l.serve_forever(&render)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    fn scrape(p: &Path) -> String {
        let mut c = UnixStream::connect(p).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    /// The daemon's sockets: both 0600; scrapes of the metrics socket are answered by tasks
    /// of a runtime (`daemon::serve_metrics`), one after another.
    #[test]
    fn the_metrics_socket_is_private_and_answers_scrapes() {
        let d = tempfile::tempdir().unwrap();
        let s = bind(d.path(), 9, &SocketArgs::default()).unwrap();
        for p in [daemon::socket_path(d.path(), 9), socket_path(d.path(), 9)] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().mode() & 0o777,
                0o600,
                "{p:?}"
            );
        }
        let (_control, metrics) = s.into_parts();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let render: std::sync::Arc<dyn Fn() -> String + Send + Sync> =
            std::sync::Arc::new(|| "# TYPE x gauge\nx 1\n".to_string());
        {
            let _in_rt = rt.enter();
            for m in metrics {
                daemon::serve_metrics(m, render.clone()).unwrap();
            }
        }
        let mp = socket_path(d.path(), 9);
        for _ in 0..2 {
            let out = scrape(&mp);
            assert!(
                out.starts_with("HTTP/1.1 200 OK") && out.ends_with("x 1\n"),
                "{out}"
            );
        }
    }

    #[test]
    fn a_group_makes_both_sockets_0660_of_that_group() {
        let d = tempfile::tempdir().unwrap();
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let args = SocketArgs {
            socket_group: Some(gid.to_string()),
            metrics_addr: None,
        };
        let _s = bind(d.path(), 1, &args).unwrap();
        for p in [daemon::socket_path(d.path(), 1), socket_path(d.path(), 1)] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!((m.mode() & 0o777, m.gid()), (0o660, gid), "{p:?}");
        }
        assert_eq!(args.to_args(), ["--socket-group", &gid.to_string()]);
    }

    #[test]
    fn a_world_writable_state_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("state");
        ensure_state_dir(&s).unwrap();
        assert_eq!(std::fs::metadata(&s).unwrap().mode() & 0o777, 0o755);
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_state_dir(&s).unwrap_err().to_string();
        assert!(e.contains("world-writable") && e.contains("state"), "{e}");
    }

    /// A device whose daemon is gone is down, not an error.
    #[test]
    fn the_host_reports_a_dead_daemon_as_down() {
        let d = tempfile::tempdir().unwrap();
        let rec = serde_json::json!({
            "id": 4, "pid": 1, "bdev": "/dev/ublkb4", "image": "sha256:ab", "manifest": "m",
            "cache_root": "/c", "queues": 1, "depth": 1, "io_deadline_secs": 0, "log": null
        });
        std::fs::write(daemon::record_path(d.path(), 4), rec.to_string()).unwrap();
        let devs = host_devices(d.path());
        assert_eq!(devs.len(), 1);
        assert!(devs[0].stats.is_none());
        let text = lazyblk_metrics::encode(&devs, true);
        let s = lazyblk_metrics::parse_text(&text).unwrap();
        let up = lazyblk_metrics::expose::value(&s, "lazyblk_up", &[("device", "4")]);
        assert_eq!(up, Some(0.0));
    }
}
