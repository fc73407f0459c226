//! `lazyblk vhost`: serve an image to a VM as a vhost-user-blk device, optionally writable
//! through a local copy-on-write layer; `lazyblk export-cow`: write a writable disk's current
//! contents (image + COW layer) to a file.

use crate::store_args::StoreArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use lazyblk_blocksource::{BlockSource, FileSource};
use lazyblk_chunkstore::{ChunkStore, Location};
use lazyblk_cow::Cow;
use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Default root of COW layers (one directory per image inside). Not under the cache root:
/// `gc` may delete cache directories, a COW layer holds the guest's data.
pub const DEFAULT_COW_ROOT: &str = "/var/lib/lazyblk/cow";

/// Where writes go.
#[derive(Args, Clone, Debug)]
pub struct CowArgs {
    /// Accept writes, into a persistent local copy-on-write layer (the image is never modified).
    #[arg(long)]
    pub writable: bool,
    /// The COW layer directory (default: <cow root>/<image sha256 hex>).
    #[arg(long, requires = "writable")]
    pub cow: Option<PathBuf>,
    /// Root of the default COW layer directories.
    #[arg(long, env = "LAZYBLK_COW_ROOT", default_value = DEFAULT_COW_ROOT)]
    pub cow_root: PathBuf,
}

impl CowArgs {
    /// The layer directory for image `hex`, when writable.
    pub fn dir_for(&self, hex: &str) -> Option<PathBuf> {
        self.writable
            .then(|| self.cow.clone().unwrap_or_else(|| self.cow_root.join(hex)))
    }
}

/// `lazyblk vhost`.
#[derive(Args)]
pub struct VhostArgs {
    /// Manifest path or URL (or use --raw).
    #[arg(required_unless_present = "raw")]
    manifest: Option<String>,
    /// The vhost-user socket to create (the VMM connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// Serve a local raw image file instead of a lazily fetched one (a baseline).
    #[arg(long, conflicts_with = "manifest")]
    raw: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    cow: CowArgs,
    /// Virtqueues (one thread each).
    #[arg(long, default_value_t = 2)]
    queues: u16,
    /// Largest virtqueue size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Exit after the first VM disconnects (default: wait for the next one).
    #[arg(long)]
    once: bool,
    /// Write the counters (JSON) here after each connection and at exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
}

/// Counters printed and written by `vhost`.
#[derive(Serialize, Default)]
struct Report {
    /// Image identity (or the raw file).
    image: String,
    /// Bytes of the device.
    device_bytes: u64,
    /// Bytes of the stored (compressed) blob.
    blob_bytes: u64,
    /// Bytes fetched from the remote since start.
    fetched_bytes: u64,
    /// Fraction of the blob fetched since start.
    fetched_fraction: f64,
    /// Chunks present in the cache / total.
    present_chunks: u64,
    /// Total chunks.
    total_chunks: u64,
    /// Guest reads / bytes / reads that waited for a fetch.
    reads: u64,
    read_bytes: u64,
    read_misses: u64,
    /// Guest writes / bytes / flushes / discards.
    writes: u64,
    write_bytes: u64,
    flushes: u64,
    discards: u64,
    /// Requests completed with an error.
    errors: u64,
    /// COW layer: blocks present / total, blocks copied up.
    cow_blocks: u64,
    cow_total_blocks: u64,
    cow_copied_up: u64,
    /// VM connections served.
    connections: u64,
}

struct Served {
    source: Arc<dyn BlockSource>,
    store: Option<Arc<ChunkStore>>,
    cow: Option<Arc<Cow>>,
    image: String,
}

fn open_served(
    manifest: Option<&str>,
    raw: Option<&Path>,
    store: &StoreArgs,
    cow: &CowArgs,
) -> Result<Served> {
    let (base, st, image, hex): (Arc<dyn BlockSource>, _, String, String) = match (manifest, raw) {
        (_, Some(p)) => {
            let f = FileSource::open(p, 4096, false)
                .with_context(|| format!("opening {}", p.display()))?;
            let name = format!("raw:{}", p.display());
            let hex = format!("raw-{:x}", fnv(&name));
            (Arc::new(f), None, name, hex)
        }
        (Some(m), None) => {
            let s = Arc::new(ChunkStore::open(&Location::parse(m), store.options()?)?);
            let id = s.id();
            (s.clone(), Some(s), id.to_string(), id.hex())
        }
        (None, None) => bail!("give a manifest or --raw"),
    };
    let (source, cow): (Arc<dyn BlockSource>, _) = match cow.dir_for(&hex) {
        Some(dir) => {
            let c = Arc::new(
                Cow::open(&dir, base, &image)
                    .with_context(|| format!("opening the COW layer {}", dir.display()))?,
            );
            tracing::info!("writes go to the COW layer {}", dir.display());
            (c.clone(), Some(c))
        }
        None => (base, None),
    };
    Ok(Served {
        source,
        store: st,
        cow,
        image,
    })
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn report(s: &Served, st: &lazyblk_vhost::Stats, connections: u64) -> Report {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut r = Report {
        image: s.image.clone(),
        device_bytes: s.source.geometry().size,
        reads: l(&st.reads),
        read_bytes: l(&st.read_bytes),
        read_misses: l(&st.read_misses),
        writes: l(&st.writes),
        write_bytes: l(&st.write_bytes),
        flushes: l(&st.flushes),
        discards: l(&st.discards),
        errors: l(&st.errors),
        connections,
        ..Default::default()
    };
    if let Some(store) = &s.store {
        let ss = store.stats();
        r.blob_bytes = store.manifest().blob_size;
        r.fetched_bytes = ss.bytes_fetched;
        r.fetched_fraction = ss.bytes_fetched as f64 / r.blob_bytes.max(1) as f64;
        r.present_chunks = ss.present_chunks;
        r.total_chunks = ss.total_chunks;
    }
    if let Some(c) = &s.cow {
        let cs = c.stats();
        r.cow_blocks = cs.present_blocks;
        r.cow_total_blocks = cs.total_blocks;
        r.cow_copied_up = cs.copied_up_blocks;
    }
    r
}

fn print_report(r: &Report, file: Option<&Path>) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "lazyblk vhost: reads {} ({:.1} MiB, {} waited for a fetch), writes {} ({:.1} MiB), flushes {}, discards {}, errors {}; fetched {:.1} MiB of a {:.1} MiB blob ({:.1}%), {} of {} chunks present; COW {} of {} blocks",
        r.reads,
        mib(r.read_bytes),
        r.read_misses,
        r.writes,
        mib(r.write_bytes),
        r.flushes,
        r.discards,
        r.errors,
        mib(r.fetched_bytes),
        mib(r.blob_bytes),
        100.0 * r.fetched_fraction,
        r.present_chunks,
        r.total_chunks,
        r.cow_blocks,
        r.cow_total_blocks,
    );
    if let Some(p) = file {
        let tmp = p.with_extension("tmp");
        let ok = std::fs::write(&tmp, serde_json::to_vec_pretty(r).unwrap_or_default())
            .and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = ok {
            tracing::error!("writing {}: {e}", p.display());
        }
    }
}

/// Run `lazyblk vhost`.
pub fn run(a: VhostArgs) -> Result<()> {
    let served = open_served(a.manifest.as_deref(), a.raw.as_deref(), &a.store, &a.cow)?;
    if let Some(s) = &served.store {
        // The published prefetch list and --hydrate, as for `add`.
        s.start_default_background();
    }
    let geo = served.source.geometry();
    let opts = lazyblk_vhost::Options {
        queues: a.queues,
        queue_size: a.queue_size,
        serial: format!("lazyblk-{}", served.image.trim_start_matches("sha256:")),
    };
    if let Some(d) = a.socket.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut server = lazyblk_vhost::Server::bind(&a.socket)?;
    let stats = Arc::new(lazyblk_vhost::Stats::default());
    let stopper = lazyblk_vhost::Stopper::default();
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (stopper, stopping, socket) = (stopper.clone(), stopping.clone(), a.socket.clone());
        crate::signals::on_termination(move |sig| {
            tracing::info!("signal {sig}: stopping");
            stopping.store(true, Ordering::SeqCst);
            stopper.stop();
            // Wake an accept() waiting for a VMM.
            let _ = std::os::unix::net::UnixStream::connect(&socket);
        })?;
    }
    println!(
        "listening on {} for {} ({} bytes, {}, {} queues)",
        a.socket.display(),
        served.image,
        geo.size,
        if geo.read_only {
            "read-only"
        } else {
            "writable"
        },
        a.queues
    );
    std::io::stdout().flush()?;
    let mut connections = 0;
    let result = loop {
        if stopping.load(Ordering::SeqCst) {
            break Ok(());
        }
        let r = server.serve_one(served.source.clone(), &opts, &stats, &stopper);
        connections += 1;
        // A clean point: make the guest's writes durable even if it never flushed.
        if let Err(e) = served.source.flush() {
            tracing::error!("flush: {e}");
        }
        if let Some(s) = &served.store {
            if let Err(e) = s.flush() {
                tracing::error!("cache flush: {e}");
            }
        }
        print_report(
            &report(&served, &stats, connections),
            a.stats_file.as_deref(),
        );
        if let Err(e) = r {
            break Err(e.into());
        }
        if a.once {
            break Ok(());
        }
    };
    let _ = std::fs::remove_file(&a.socket);
    drop(served);
    result
}

/// Write everything `src` holds to `out` as a sparse raw file (all-zero blocks are holes).
pub fn export_source(src: &dyn BlockSource, out: &Path) -> Result<()> {
    let size = src.geometry().size;
    let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(0)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        src.read_at(at, &mut buf[..n])
            .with_context(|| format!("reading {at}+{n}"))?;
        for (i, blk) in buf[..n].chunks(4096).enumerate() {
            if blk.iter().any(|&b| b != 0) {
                f.write_all_at(blk, at + (i * 4096) as u64)?;
            }
        }
        at += n as u64;
    }
    f.set_len(size)?;
    f.sync_all()?;
    Ok(())
}

/// `lazyblk export-cow`.
#[derive(Args)]
pub struct ExportArgs {
    /// Manifest path or URL of the image under the layer.
    manifest: String,
    #[command(flatten)]
    store: StoreArgs,
    /// The COW layer directory (default: <cow root>/<image sha256 hex>).
    #[arg(long)]
    cow: Option<PathBuf>,
    /// Root of the default COW layer directories.
    #[arg(long, env = "LAZYBLK_COW_ROOT", default_value = DEFAULT_COW_ROOT)]
    cow_root: PathBuf,
    /// Output raw image (sparse: all-zero blocks are holes).
    #[arg(short, long)]
    output: PathBuf,
}

/// Run `lazyblk export-cow`: the guest's current view, image blocks fetched as needed.
pub fn export(a: ExportArgs) -> Result<()> {
    let cow = CowArgs {
        writable: true,
        cow: a.cow.clone(),
        cow_root: a.cow_root.clone(),
    };
    let hex = ChunkStore::open(&Location::parse(&a.manifest), a.store.options()?)?
        .id()
        .hex();
    let dir = cow.dir_for(&hex).expect("writable");
    if !dir.join("bitmap").exists() {
        bail!("{} is not a COW layer (no bitmap)", dir.display());
    }
    let served = open_served(Some(&a.manifest), None, &a.store, &cow)?;
    let size = served.source.geometry().size;
    export_source(&*served.source, &a.output)?;
    let c = served.cow.as_ref().map(|c| c.stats()).unwrap_or_default();
    println!(
        "exported {} bytes to {} ({} of {} blocks from the COW layer {})",
        size,
        a.output.display(),
        c.present_blocks,
        c.total_blocks,
        dir.display()
    );
    Ok(())
}
