//! The device daemon: owns a chunk store and a ublk device, a control socket for `status` and
//! `del`, and a record in the state directory for `list` and `recover`.

use anyhow::{Context, Result};
use lazyblk_blocksource::BlockSource;
use lazyblk_chunkstore::{ChunkStore, ImageId, Location, StatsSnapshot, StoreOptions};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Everything needed to (re)start the daemon of a device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Device id.
    pub id: u32,
    /// Daemon pid.
    pub pid: u32,
    /// Block device path.
    pub bdev: String,
    /// Image identity.
    pub image: String,
    /// Where the manifest was read from.
    pub manifest: String,
    /// Cache root.
    pub cache_root: PathBuf,
    /// Hardware queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// IO deadline in seconds (0: none).
    pub io_deadline_secs: u64,
    /// Daemon log file.
    pub log: Option<PathBuf>,
}

/// Paths in the state directory.
pub fn record_path(state: &Path, id: u32) -> PathBuf {
    state.join(format!("{id}.json"))
}

/// Control socket path.
pub fn socket_path(state: &Path, id: u32) -> PathBuf {
    state.join(format!("{id}.sock"))
}

/// Read a device's record.
pub fn read_record(state: &Path, id: u32) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(record_path(state, id)).ok()?).ok()
}

/// Ask a live daemon for its counters.
pub fn query_status(state: &Path, id: u32) -> Result<StatsSnapshot> {
    let mut s = UnixStream::connect(socket_path(state, id))
        .with_context(|| format!("device {id} has no running daemon"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).context("bad status answer from the daemon")
}

/// What the daemon was asked to do.
pub struct DaemonArgs {
    pub manifest: String,
    pub store: StoreOptions,
    pub ublk: lazyblk_ublk::Options,
    pub state_dir: PathBuf,
    pub log: Option<PathBuf>,
    /// Where to write the one ready line (`OK <id> <bdev>` or `ERR <message>`).
    pub ready: Option<std::fs::File>,
}

fn say_ready(ready: &mut Option<std::fs::File>, line: &str) {
    if let Some(mut f) = ready.take() {
        let _ = writeln!(f, "{line}");
    }
}

/// Run a device until it is stopped. Reports readiness (or the error) on `args.ready`.
pub fn run(mut args: DaemonArgs) -> Result<()> {
    let r = run_inner(&mut args);
    if let Err(e) = &r {
        say_ready(&mut args.ready, &format!("ERR {e:#}"));
    }
    r
}

fn run_inner(args: &mut DaemonArgs) -> Result<()> {
    lazyblk_ublk::check_kernel()?;
    if let (Some(id), false) = (args.ublk.id, args.ublk.recover) {
        lazyblk_ublk::check_id_free(id)?;
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let loc = Location::parse(&args.manifest);
    let store = Arc::new(ChunkStore::open(&loc, args.store.clone())?);
    let rep = store.open_report();
    if let Some(why) = &rep.discarded {
        tracing::warn!("cache discarded: {why}");
    }
    if rep.reverified > 0 {
        tracing::info!(
            "re-verified {} cached chunks after an unclean stop, dropped {}",
            rep.reverified,
            rep.dropped
        );
    }
    let id = store.id();
    let mut record = Record {
        id: 0,
        pid: std::process::id(),
        bdev: String::new(),
        image: id.to_string(),
        manifest: args.manifest.clone(),
        cache_root: args.store.cache_root.clone(),
        queues: args.ublk.queues,
        depth: args.ublk.depth,
        io_deadline_secs: args.store.io_deadline.map_or(0, |d| d.as_secs()),
        log: args.log.clone(),
    };
    let mut ublk = args.ublk.clone();
    ublk.target_data = serde_json::to_value(&record)?;

    let dev_id = Arc::new(AtomicU32::new(u32::MAX));
    let stopping = Arc::new(AtomicBool::new(false));
    // Signals: stop the device; `serve` then returns and we clean up.
    {
        let (dev_id, stopping) = (dev_id.clone(), stopping.clone());
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!("signal {sig}: stopping the device");
                stopping.store(true, Ordering::SeqCst);
                let id = dev_id.load(Ordering::SeqCst);
                if id != u32::MAX {
                    if let Err(e) = lazyblk_ublk::stop(id) {
                        tracing::error!("stopping device {id}: {e}");
                    }
                }
            }
        });
    }
    let state_dir = args.state_dir.clone();
    let ready = args.ready.take();
    let st2 = store.clone();
    let dev2 = dev_id.clone();
    let stop2 = stopping.clone();
    let on_live = move |live: &lazyblk_ublk::LiveDevice| {
        dev2.store(live.id, Ordering::SeqCst);
        record.id = live.id;
        record.bdev = live.bdev.clone();
        if !live.recoverable() {
            tracing::warn!("the kernel did not accept UBLK_F_USER_RECOVERY: a daemon crash will fail IO");
        }
        let rp = record_path(&state_dir, live.id);
        if let Err(e) = std::fs::write(&rp, serde_json::to_vec_pretty(&record).unwrap_or_default()) {
            tracing::error!("writing {}: {e}", rp.display());
        }
        spawn_control(&state_dir, live.id, st2, stop2);
        let mut ready = ready;
        say_ready(&mut ready, &format!("OK {} {}", live.id, live.bdev));
        tracing::info!("device {} live at {} for {}", live.id, live.bdev, record.image);
    };
    let source: Arc<dyn BlockSource> = store.clone();
    let served = lazyblk_ublk::serve(source, &ublk, on_live);
    let id_now = dev_id.load(Ordering::SeqCst);
    if id_now != u32::MAX {
        // A stop we asked for ends the device; anything else (a crash of the kernel side) too.
        if stopping.load(Ordering::SeqCst) {
            let _ = lazyblk_ublk::delete(id_now);
        }
        let _ = std::fs::remove_file(socket_path(&args.state_dir, id_now));
        let _ = std::fs::remove_file(record_path(&args.state_dir, id_now));
    }
    if let Err(e) = store.flush() {
        tracing::error!("{e}");
    }
    drop(store);
    served?;
    tracing::info!("device {id_now} stopped; cache kept");
    Ok(())
}

fn spawn_control(state: &Path, id: u32, store: Arc<ChunkStore>, stopping: Arc<AtomicBool>) {
    let path = socket_path(state, id);
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("control socket {}: {e}", path.display());
            return;
        }
    };
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            let mut r = BufReader::new(&conn);
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut w = &conn;
            match line.trim() {
                "status" => {
                    let s = serde_json::to_string(&store.stats()).unwrap_or_default();
                    let _ = writeln!(w, "{s}");
                }
                "stop" => {
                    stopping.store(true, Ordering::SeqCst);
                    let r = lazyblk_ublk::stop(id);
                    let _ = writeln!(w, "{}", if r.is_ok() { "ok" } else { "error" });
                }
                other => {
                    let _ = writeln!(w, "unknown command {other:?}");
                }
            }
        }
    });
}

/// Parse `sha256:...` when given.
pub fn parse_digest(s: Option<&str>) -> Result<Option<ImageId>> {
    s.map(|d| ImageId::parse(d).map_err(Into::into)).transpose()
}
