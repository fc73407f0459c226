//! The device daemon: owns a chunk store and a ublk device, a control socket for `status`,
//! `stop` and `detach`, and a record in the state directory for `list` and `recover`.

use anyhow::{Context, Result};
use lazyblk_blocksource::BlockSource;
use lazyblk_chunkstore::{ChunkStore, Location, StatsSnapshot, StoreOptions};
use lazyblk_format::ImageId;
use lazyblk_ublk::FetchGate;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
    /// Pid of the supervisor that restarts this daemon when it dies (`add --supervise`).
    #[serde(default)]
    pub supervisor: Option<u32>,
    /// The COW layer of a writable device (`add --writable`).
    #[serde(default)]
    pub cow: Option<PathBuf>,
    /// The store settings of `add` as flags (cache dir, deadline, request limits, readahead,
    /// cache limit, hydration, prefetch), so `recover` and the supervisor keep them.
    #[serde(default)]
    pub store_args: Vec<String>,
    /// The hand-over to the kernel of a device added with `--handover` (`handover.rs`).
    #[serde(default)]
    pub handover: Option<crate::handover::Handover>,
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

/// Every device record in `state`, by id.
pub fn records(state: &Path) -> Vec<Record> {
    let Ok(rd) = std::fs::read_dir(state) else {
        return Vec::new();
    };
    let mut out: Vec<Record> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            let id = n.strip_suffix(".json")?.parse::<u32>().ok()?;
            read_record(state, id)
        })
        .collect();
    out.sort_by_key(|r| r.id);
    out
}

/// Send one command line to a live daemon and return its one-line answer.
pub fn control(state: &Path, id: u32, cmd: &str, timeout: Duration) -> Result<String> {
    let mut s = UnixStream::connect(socket_path(state, id))
        .with_context(|| format!("device {id} has no running daemon"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// Ask a live daemon for its counters.
pub fn query_status(state: &Path, id: u32) -> Result<StatsSnapshot> {
    let line = control(state, id, "status", Duration::from_secs(5))?;
    serde_json::from_str(&line).context("bad status answer from the daemon")
}

/// What the daemon was asked to do.
pub struct DaemonArgs {
    pub manifest: String,
    pub store: StoreOptions,
    /// The same settings as `add` flags, kept in the device record.
    pub store_args: Vec<String>,
    pub ublk: lazyblk_ublk::Options,
    pub state_dir: PathBuf,
    pub log: Option<PathBuf>,
    /// Pid of the supervisor, when there is one.
    pub supervisor: Option<u32>,
    /// Writable through a COW layer (`add --writable`).
    pub cow: crate::cmd::vhost::CowArgs,
    /// Serve through a loop or dm device and hand over to the kernel once complete
    /// (`add --handover`), built as `handover_via` says.
    pub handover: bool,
    pub handover_via: crate::handover::Via,
    /// Who may reach the control and metrics sockets; a TCP address for the metrics.
    pub sockets: crate::metrics::SocketArgs,
    /// Where to write the ready line (`OK <id> <bdev>` or `ERR <message>`), after any number of
    /// `WARN <message>` lines about the state the daemon found.
    pub ready: Option<std::fs::File>,
}

fn say_ready(ready: &mut Option<std::fs::File>, line: &str) {
    if let Some(mut f) = ready.take() {
        let _ = writeln!(f, "{line}");
    }
}

/// Log a warning and pass it on to whoever waits for the ready line.
fn warn(ready: &Option<std::fs::File>, msg: &str) {
    tracing::warn!("{msg}");
    if let Some(mut f) = ready.as_ref() {
        let _ = writeln!(f, "WARN {msg}");
    }
}

/// What opening the cache found that the user should hear about (the store repaired it).
fn report_open(store: &ChunkStore, ready: &Option<std::fs::File>) {
    let rep = store.open_report();
    let dir = store.cache_dir().display();
    if let Some(why) = &rep.discarded {
        warn(
            ready,
            &format!("cache {dir} discarded, chunks will be fetched again: {why}"),
        );
    }
    if rep.dropped > 0 {
        warn(
            ready,
            &format!(
                "cache {dir}: {} of {} chunks the bitmap claimed present failed verification and will be fetched again",
                rep.dropped, rep.reverified
            ),
        );
    } else if rep.reverified > 0 {
        tracing::info!(
            "re-verified {} cached chunks (bitmap not closed cleanly), all good",
            rep.reverified
        );
    }
    if let Some(why) = &rep.offline {
        warn(
            ready,
            &format!("remote unreachable, serving from the cache until it returns: {why}"),
        );
    }
    // The store only writes its copy of the manifest into a new cache directory; make sure the
    // copy in an old one (used by `recover` and `verify-cache`) is this image's.
    let p = store.cache_dir().join("manifest");
    if std::fs::read(&p).map_or(true, |b| ImageId::of(&b) != store.id()) {
        let bytes = store.manifest_bytes();
        let fixed =
            ImageId::of(bytes) == store.id() && lazyblk_builder::write_atomic(&p, bytes).is_ok();
        warn(
            ready,
            &if fixed {
                format!("{} was not this image's manifest; rewritten", p.display())
            } else {
                format!(
                    "{} is not this image's manifest and could not be rewritten",
                    p.display()
                )
            },
        );
    }
}

/// Stop fetching (reads at the gate, then the store's readahead and background work), make
/// everything fetched so far durable and mark the bitmap cleanly closed, so the next daemon
/// trusts the cache without re-verifying it. The device is left as it is.
fn prepare_detach(id: u32, store: &ChunkStore, gate: &FetchGate) -> Result<()> {
    tracing::info!("detach: device {id} stops fetching");
    let waiting = gate.close(Duration::from_secs(10));
    if waiting > 0 {
        tracing::warn!(
            "detach: {waiting} read(s) still wait for the remote; the next daemon gets them again"
        );
    }
    store.seal(Duration::from_secs(5))?;
    Ok(())
}

/// The environment variable in which the command that spawns a daemon (`add`, `recover`) passes
/// its start time (microseconds since the epoch), for the `exec` step of [`AttachTimes`].
pub const T0_ENV: &str = "LAZYBLK_T0_US";

/// The environment variable in which that command passes how long it spent looking up the lazy
/// version of an ordinary image (milliseconds; the `lazy` step of [`AttachTimes`]).
pub const LAZY_MS_ENV: &str = "LAZYBLK_LAZY_MS";

static PROCESS_T0: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// How long the spawning command looked for the lazy version ([`LAZY_MS_ENV`]; 0 if it did not).
fn lazy_lookup_ms() -> u64 {
    std::env::var(LAZY_MS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Note when this process started (the first thing `main` does).
pub fn mark_process_start() {
    let _ = PROCESS_T0.set(std::time::SystemTime::now());
}

/// When this process became a daemon by a fork of the command that started it
/// ([`crate::spawn`]): its own start, for the attach times.
static FORK_T0: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// Note that this process is a fork that runs a daemon's command line (now).
pub fn mark_fork() {
    let _ = FORK_T0.set(std::time::SystemTime::now());
}

/// When this daemon's own work began: its fork, else its process start.
fn own_start() -> Option<std::time::SystemTime> {
    FORK_T0.get().or(PROCESS_T0.get()).copied()
}

/// This process's start, in microseconds since the epoch (for [`T0_ENV`]).
pub fn process_start_us() -> u64 {
    let t = *PROCESS_T0.get_or_init(std::time::SystemTime::now);
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// How long ago the attach began: at the start of the spawning command when it said so (and
/// that is plausible: under 10 minutes ago), else at this process's start.
fn attach_origin() -> std::time::SystemTime {
    let own = *PROCESS_T0.get_or_init(std::time::SystemTime::now);
    std::env::var(T0_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|us| std::time::UNIX_EPOCH + Duration::from_micros(us))
        .filter(|t| {
            own.duration_since(*t)
                .is_ok_and(|d| d < Duration::from_secs(600))
        })
        .unwrap_or(own)
}

/// The attach times of this daemon's device, once it is live (`status` shows them).
static ATTACH: std::sync::OnceLock<lazyblk_chunkstore::AttachTimes> = std::sync::OnceLock::new();

/// Run a device until it is stopped. Reports readiness (or the error) on `args.ready`.
pub fn run(mut args: DaemonArgs) -> Result<()> {
    let r = run_inner(&mut args);
    if let Err(e) = &r {
        say_ready(&mut args.ready, &format!("ERR {e:#}"));
    }
    r
}

fn run_inner(args: &mut DaemonArgs) -> Result<()> {
    let origin = attach_origin();
    let spawn_ms = own_start()
        .and_then(|t| t.duration_since(origin).ok())
        .map_or(0, |d| d.as_millis() as u64);
    // The spawning command's time, less its lookup of the lazy version (a step of its own).
    let lazy_ms = if spawn_ms > 0 {
        lazy_lookup_ms().min(spawn_ms)
    } else {
        0
    };
    let exec_ms = spawn_ms - lazy_ms;
    lazyblk_ublk::check_kernel()?;
    if args.handover {
        crate::handover::check_options(args.cow.writable, args.store.cache_limit)?;
    }
    if args.ublk.id.is_none() && !args.ublk.recover {
        // The ids of handed-over devices are free in the kernel but not ours to reuse.
        args.ublk.id = crate::handover::free_id(&args.state_dir);
    }
    if let (Some(id), false) = (args.ublk.id, args.ublk.recover) {
        lazyblk_ublk::check_id_free(id)?;
    }
    crate::metrics::ensure_state_dir(&args.state_dir)?;
    let sockets = args.sockets.clone();
    sockets.gid()?;
    let setup_ms = own_start()
        .and_then(|t| t.elapsed().ok())
        .map_or(0, |d| d.as_millis() as u64);
    let store = open_store(args)?;
    let t_prepare = std::time::Instant::now();
    let id = store.id();
    let cow_dir = args.cow.dir_for(&id.hex());
    let cow = open_cow(cow_dir.as_deref(), &store, &id)?;
    let mut record = device_record(args, &store, cow_dir);
    let mut ublk = args.ublk.clone();
    ublk.target_data = serde_json::to_value(&record)?;

    let dev_id = Arc::new(AtomicU32::new(u32::MAX));
    let stopping = Arc::new(AtomicBool::new(false));
    let rt = store.runtime();
    stop_on_signals(&rt, dev_id.clone(), stopping.clone())?;
    let state_dir = args.state_dir.clone();
    let ready = args.ready.take();
    // The control thread holds weak references only: the last strong one, dropped at the end
    // (`finish`), closes the cache's bitmap cleanly (the store's `Drop`).
    let st2 = Arc::downgrade(&store);
    let cow2 = cow.as_ref().map(Arc::downgrade);
    let dev2 = dev_id.clone();
    let stop2 = stopping.clone();
    let gate = ublk.gate.clone();
    let io_stats = ublk.stats.clone();
    let handover = args.handover;
    let via = args.handover_via;
    // The superblock, for `--handover-via auto` (erofs gets the loop stack).
    let mut first = vec![0u8; 4096.min(store.geometry().size as usize)];
    if handover && via == crate::handover::Via::Auto {
        if let Err(e) = store.read_at(0, &mut first) {
            anyhow::bail!("--handover: reading the start of the image: {e}");
        }
    }
    let mut times = store.open_report().times.clone();
    times.exec_ms = exec_ms;
    times.lazy_ms = lazy_ms;
    times.setup_ms = setup_ms;
    times.prepare_ms = t_prepare.elapsed().as_millis() as u64;
    let t_device = std::time::Instant::now();
    let (st3, stop3, dev_size) = (
        Arc::downgrade(&store),
        stopping.clone(),
        store.geometry().size,
    );
    let on_live = move |live: &lazyblk_ublk::LiveDevice| {
        times.device_ms = t_device.elapsed().as_millis() as u64;
        times.total_ms = origin.elapsed().map_or(0, |d| d.as_millis() as u64);
        tracing::info!("attach: {}", times.line());
        let _ = ATTACH.set(times.clone());
        dev2.store(live.id, Ordering::SeqCst);
        record.id = live.id;
        record.bdev = live.bdev.clone();
        let mut shown = live.bdev.clone();
        if handover {
            match crate::handover::setup(&state_dir, &mut record, &live.bdev, dev_size, via, &first)
            {
                Ok(dev) => shown = dev,
                Err(e) => {
                    tracing::error!("--handover: {e:#}");
                    let mut ready = ready;
                    say_ready(&mut ready, &format!("ERR --handover: {e:#}"));
                    stop2.store(true, Ordering::SeqCst);
                    let _ = lazyblk_ublk::stop(live.id);
                    return;
                }
            }
        }
        if !live.recoverable() {
            tracing::warn!(
                "the kernel did not accept UBLK_F_USER_RECOVERY: a daemon crash will fail IO"
            );
        }
        let rp = record_path(&state_dir, live.id);
        if let Err(e) = std::fs::write(&rp, serde_json::to_vec_pretty(&record).unwrap_or_default())
        {
            tracing::error!("writing {}: {e}", rp.display());
        }
        let control = Control {
            id: live.id,
            path: socket_path(&state_dir, live.id),
            metrics_path: crate::metrics::socket_path(&state_dir, live.id),
            store: st2,
            cow: cow2,
            stopping: stop2,
            gate,
            io_stats,
            serial: Mutex::new(()),
        };
        spawn_control(&rt, control, &state_dir, &sockets);
        if handover {
            let ctx = crate::handover::Ctx {
                state: state_dir.clone(),
                id: live.id,
                store: st3,
                stopping: stop3,
            };
            crate::handover::spawn(ctx, true);
        }
        let mut ready = ready;
        say_ready(&mut ready, &format!("OK {} {}", live.id, shown));
        tracing::info!("device {} live at {} for {}", live.id, shown, record.image);
    };
    let source: Arc<dyn BlockSource> = match &cow {
        Some(c) => c.clone(),
        None => store.clone(),
    };
    let served = lazyblk_ublk::serve(source, &ublk, on_live);
    let id_now = dev_id.load(Ordering::SeqCst);
    finish(&args.state_dir, id_now, &stopping, cow, store);
    served?;
    tracing::info!("device {id_now} stopped; cache kept");
    Ok(())
}

/// Open the chunk store, start its background work (prefetch list, hydration) at once, ahead of
/// the workload, and report what opening the cache found.
fn open_store(args: &DaemonArgs) -> Result<Arc<ChunkStore>> {
    let loc = Location::parse(&args.manifest);
    let store = Arc::new(ChunkStore::open(&loc, args.store.clone())?);
    store.start_default_background();
    report_open(&store, &args.ready);
    Ok(store)
}

/// The COW layer over `store` in `dir`, for a writable device.
fn open_cow(
    dir: Option<&Path>,
    store: &Arc<ChunkStore>,
    id: &ImageId,
) -> Result<Option<Arc<lazyblk_cow::Cow>>> {
    Ok(match dir {
        Some(d) => Some(Arc::new(
            lazyblk_cow::Cow::open(d, store.clone(), &id.to_string())
                .with_context(|| format!("opening the COW layer {}", d.display()))?,
        )),
        None => None,
    })
}

/// The record of the device (its id and block device are filled in once it is live).
fn device_record(args: &DaemonArgs, store: &ChunkStore, cow_dir: Option<PathBuf>) -> Record {
    let mut record = Record {
        id: 0,
        pid: std::process::id(),
        bdev: String::new(),
        image: store.id().to_string(),
        manifest: pinned_source(&args.manifest, store),
        cache_root: args.store.cache_root.clone(),
        queues: args.ublk.queues,
        depth: args.ublk.depth,
        io_deadline_secs: args.store.io_deadline.map_or(0, |d| d.as_secs()),
        log: args.log.clone(),
        supervisor: args.supervisor,
        cow: cow_dir,
        store_args: args.store_args.clone(),
        handover: None,
    };
    // `recover` and the supervisor bind the sockets the same way.
    if !record
        .store_args
        .iter()
        .any(|a| a == "--socket-group" || a == "--metrics-addr")
    {
        record.store_args.extend(args.sockets.to_args());
    }
    // The next daemon (`recover`, the supervisor) pins the manifest: it keeps the prefetch
    // pack in use only if that is pinned too.
    if let Some(pack) = &store.open_report().prefetch_pack {
        if !record.store_args.iter().any(|a| a == "--pack-digest") {
            record
                .store_args
                .extend(["--pack-digest".to_string(), pack.clone()]);
        }
    }
    record
}

/// Where the manifest came from, as the next daemon should read it: an image reference by tag
/// is pinned to the digest it resolved to, so `recover` serves the same image even if the tag
/// has moved since.
fn pinned_source(arg: &str, store: &ChunkStore) -> String {
    match (Location::parse(arg), &store.open_report().resolved) {
        (Location::Registry(r), Some(d)) if r.reference.digest().is_none() => r
            .reference
            .with_digest(d)
            .map_or_else(|_| arg.to_string(), |p| p.to_string()),
        _ => arg.to_string(),
    }
}

/// On SIGTERM or SIGINT, stop the device (`dev_id`, once it is live): `serve` then returns and
/// `run_inner` cleans up. A task on the store's runtime (no thread of its own).
fn stop_on_signals(
    rt: &tokio::runtime::Handle,
    dev_id: Arc<AtomicU32>,
    stopping: Arc<AtomicBool>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered now, so a signal that arrives before the task first runs is not lost.
    let _in_rt = rt.enter();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    rt.spawn(async move {
        let sig = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{sig}: stopping the device");
        stopping.store(true, Ordering::SeqCst);
        let id = dev_id.load(Ordering::SeqCst);
        if id != u32::MAX {
            if let Err(e) = lazyblk_ublk::stop(id) {
                tracing::error!("stopping device {id}: {e}");
            }
        }
    });
    Ok(())
}

/// After `serve` returned: delete the device if we stopped it, remove its socket and record,
/// flush the COW layer and the cache, and close the cache.
fn finish(
    state_dir: &Path,
    id_now: u32,
    stopping: &AtomicBool,
    cow: Option<Arc<lazyblk_cow::Cow>>,
    store: Arc<ChunkStore>,
) {
    if id_now != u32::MAX {
        // A stop we asked for ends the device; anything else (a crash of the kernel side) too.
        if stopping.load(Ordering::SeqCst) {
            let _ = lazyblk_ublk::delete(id_now);
        }
        let _ = std::fs::remove_file(socket_path(state_dir, id_now));
        let _ = std::fs::remove_file(crate::metrics::socket_path(state_dir, id_now));
        // A device handed over to the kernel lives on without a daemon: keep its record.
        if !crate::handover::finish(state_dir, id_now) {
            let _ = std::fs::remove_file(record_path(state_dir, id_now));
        }
    }
    if let Some(c) = cow {
        if let Err(e) = c.flush() {
            tracing::error!("COW layer: {e}");
        }
    }
    if let Err(e) = store.flush() {
        tracing::error!("{e}");
    }
    close_store(store);
}

/// Drop the last reference to the store so that it closes its bitmap cleanly and the next start
/// trusts the cache without re-verifying it. A control command in progress (holding a
/// temporary strong reference) gets a moment to finish.
fn close_store(mut store: Arc<ChunkStore>) {
    for _ in 0..250 {
        match Arc::try_unwrap(store) {
            Ok(s) => return drop(s),
            Err(s) => store = s,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!("the cache is still in use at exit; the next start re-verifies it");
}

/// What the control socket's commands act on. Weak references only: the last strong one,
/// dropped at the end (`finish`), closes the cache's bitmap cleanly.
struct Control {
    id: u32,
    path: PathBuf,
    metrics_path: PathBuf,
    store: Weak<ChunkStore>,
    cow: Option<Weak<lazyblk_cow::Cow>>,
    stopping: Arc<AtomicBool>,
    gate: Arc<FetchGate>,
    io_stats: Arc<lazyblk_ublk::IoStats>,
    /// Commands that change the device run one at a time (queries do not wait for them).
    serial: Mutex<()>,
}

/// Serve the control socket from a task on the store's runtime; each connection's command runs
/// on its blocking pool, so an idle device holds no thread for it.
fn spawn_control(
    rt: &tokio::runtime::Handle,
    control: Control,
    state: &Path,
    sockets: &crate::metrics::SocketArgs,
) {
    let path = control.path.clone();
    let (listener, metrics) = match crate::metrics::bind(state, control.id, sockets)
        .map(crate::metrics::Sockets::into_parts)
        .and_then(|(c, m)| {
            let _in_rt = rt.enter();
            Ok((tokio::net::UnixListener::from_std(c)?, m))
        }) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e:#}");
            return;
        }
    };
    let image = control
        .store
        .upgrade()
        .map(|s| s.id().to_string())
        .unwrap_or_default();
    let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(crate::metrics::render_device(
        control.id,
        image,
        control.store.clone(),
        control.io_stats.clone(),
    ));
    for m in metrics {
        let render = render.clone();
        let _in_rt = rt.enter();
        if let Err(e) = serve_metrics(m, render) {
            tracing::error!("metrics socket: {e}");
        }
    }
    let control = Arc::new(control);
    rt.spawn(async move {
        loop {
            let conn = match listener.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!("control socket {}: {e}", path.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(conn) = conn
                .into_std()
                .and_then(|c| c.set_nonblocking(false).map(|()| c))
            else {
                continue;
            };
            let control = control.clone();
            drop(tokio::task::spawn_blocking(move || control.serve(&conn)));
        }
    });
}

/// Answer the scrapes of one metrics listener from a task of the current runtime; each
/// connection is answered on its blocking pool (a scrape never waits behind a control command).
pub(crate) fn serve_metrics(
    l: lazyblk_metrics::Listener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    use lazyblk_metrics::Listener;
    fn answer<C: lazyblk_metrics::listen::Conn + Send + 'static>(
        c: C,
        render: Arc<dyn Fn() -> String + Send + Sync>,
    ) {
        drop(tokio::task::spawn_blocking(move || {
            if let Err(e) = lazyblk_metrics::listen::answer(Ok(c), &*render) {
                tracing::debug!("metrics scrape: {e}");
            }
        }));
    }
    /// Accept connections one after another and answer each.
    macro_rules! accept_loop {
        ($listener:expr) => {{
            let l = $listener;
            tokio::spawn(async move {
                loop {
                    let Ok((c, _)) = l.accept().await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if let Ok(c) = c.into_std() {
                        answer(c, render.clone());
                    }
                }
            })
        }};
    }
    match l {
        Listener::Unix(u, _) => drop(accept_loop!(tokio::net::UnixListener::from_std(u)?)),
        Listener::Tcp(t) => drop(accept_loop!(tokio::net::TcpListener::from_std(t)?)),
    }
    Ok(())
}

impl Control {
    /// Answer one connection's command line.
    fn serve(&self, conn: &UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut line = String::new();
        let mut r = BufReader::new(conn);
        if r.read_line(&mut line).is_err() {
            return;
        }
        let mut w = conn;
        // Gone once the device stopped and the daemon is closing its cache.
        let (Some(store), cow) = (
            self.store.upgrade(),
            self.cow.as_ref().and_then(Weak::upgrade),
        ) else {
            let _ = writeln!(w, "error: the daemon is stopping");
            return;
        };
        let query = matches!(line.trim(), "status" | "trace" | "blocks" | "published");
        let _serial = (!query).then(|| self.serial.lock().unwrap_or_else(|e| e.into_inner()));
        let (id, path, stopping, gate, io_stats) = (
            self.id,
            &self.path,
            &self.stopping,
            &self.gate,
            &self.io_stats,
        );
        match line.trim() {
            "status" => {
                let mut stats = crate::metrics::device_status(&store, io_stats);
                stats.attach = ATTACH.get().cloned();
                let s = serde_json::to_string(&stats).unwrap_or_default();
                let _ = writeln!(w, "{s}");
            }
            "stop" => {
                stopping.store(true, Ordering::SeqCst);
                let r = lazyblk_ublk::stop(id);
                let _ = writeln!(w, "{}", if r.is_ok() { "ok" } else { "error" });
            }
            "detach" => {
                // Exit without stopping the device: the kernel parks its IO (user recovery)
                // until `recover` starts a new daemon, which gets the unfinished reads again.
                // No unwinding: dropping the ublk control would delete the device.
                // The guest's acknowledged writes must be in the COW layer's bitmap first.
                if let Some(c) = &cow {
                    if let Err(e) = c.flush() {
                        tracing::error!("detach: COW layer flush: {e}");
                    }
                }
                match prepare_detach(id, &store, gate) {
                    Ok(()) => {
                        let _ = writeln!(w, "ok");
                    }
                    Err(e) => {
                        tracing::warn!("detach: {e:#}; the next daemon re-verifies the cache");
                        let _ = writeln!(w, "ok (the next daemon re-verifies the cache: {e:#})");
                    }
                }
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(&self.metrics_path);
                tracing::info!("detached from device {id}; `lazyblk recover {id}` reattaches it");
                // SAFETY: _exit ends the process at once; nothing is touched afterwards.
                unsafe { libc::_exit(0) };
            }
            "handover" => {
                drop(store);
                let answer = crate::handover::request(Duration::from_secs(120));
                let _ = writeln!(w, "{answer}");
            }
            "trace" => {
                let t = serde_json::to_string(&store.access_trace()).unwrap_or_default();
                let _ = writeln!(w, "{t}");
            }
            "blocks" => {
                let t = serde_json::to_string(&store.block_trace()).unwrap_or_default();
                let _ = writeln!(w, "{t}");
            }
            "published" => {
                let l = store.prefetch_list().unwrap_or_default();
                let t = serde_json::to_string(l).unwrap_or_default();
                let _ = writeln!(w, "{t}");
            }
            cmd if cmd.starts_with("export ") => {
                let out = PathBuf::from(&cmd["export ".len()..]);
                // A writable device exports what its guest sees (image + COW layer).
                let r = match &cow {
                    Some(c) => crate::cmd::vhost::export_source(&**c, &out),
                    None => store.export(&out).map_err(anyhow::Error::from),
                };
                match r {
                    Ok(()) => {
                        let _ = writeln!(w, "ok");
                    }
                    Err(e) => {
                        let _ = writeln!(w, "error: {e}");
                    }
                }
            }
            other => {
                let _ = writeln!(w, "unknown command {other:?}");
            }
        }
    }
}

/// Parse `sha256:...` when given.
pub fn parse_digest(s: Option<&str>) -> Result<Option<ImageId>> {
    s.map(|d| ImageId::parse(d).map_err(Into::into)).transpose()
}
