//! `lazyblk convert <src> <dst-ref>`: flatten a container image (registry reference, `oci:DIR`,
//! `docker-archive:FILE`) into one erofs tree with `lazyblk-convert`, then push the build
//! directory (with the source config as `image-config.json`) like `lazyblk push`. A registry
//! source is linked: the lazy image's `subject` is the source's platform manifest, and the
//! source's referrers list it (`lazyblk_builder::push_linked`), so `add <src>` finds it.

use crate::registry_args::RegistryArgs;
use anyhow::{Context, Result};
use clap::Args;
use lazyblk_convert::{ApplyOptions, ConvertOptions, Converted, Platform, Progress, SourceRef};
use std::io::IsTerminal;
use std::path::PathBuf;

/// `lazyblk convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// The image to convert: `[host[:port]/]repo[:tag|@digest]`, `oci:DIR[:TAG]` (an OCI layout)
    /// or `docker-archive:FILE` (`docker save`).
    src: String,
    /// Where to push the lazy image: `[host[:port]/]repo[:tag]`.
    dst: String,
    /// The platform to pick from an image index: `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    platform: Platform,
    /// Work directory (layers, the flattened tree, the erofs image, the build directory in
    /// `out/`); kept. Default: a fresh directory under $TMPDIR (or /var/tmp), removed at the end.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the default work directory.
    #[arg(long)]
    keep_work_dir: bool,
    /// Refuse a layer that expands past this many bytes (its tar stream, or its file data).
    #[arg(long, default_value_t = ApplyOptions::default().max_layer_bytes)]
    max_layer_bytes: u64,
    /// Refuse a layer with more entries than this.
    #[arg(long, default_value_t = ApplyOptions::default().max_layer_entries)]
    max_layer_entries: u64,
    /// Chunk size in KiB (power of two, 4..65536).
    #[arg(long, default_value_t = lazyblk_format::DEFAULT_CHUNK_SIZE / 1024)]
    chunk_kib: u32,
    /// zstd level.
    #[arg(long, default_value_t = 9)]
    level: i32,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Progress on stderr: a bar on a terminal, a line per step otherwise.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    sizes: Vec<u64>,
    phase: String,
}

impl Reporter {
    fn new() -> Reporter {
        Reporter {
            bar: None,
            sizes: Vec::new(),
            phase: String::new(),
        }
    }

    fn bar(&mut self, phase: String, len: u64, done: u64) {
        if !std::io::stderr().is_terminal() {
            if self.phase != phase {
                eprintln!("{phase}");
                self.phase = phase;
            }
            return;
        }
        if self.phase != phase {
            if let Some(b) = self.bar.take() {
                b.finish_and_clear();
            }
            let b = indicatif::ProgressBar::new(len);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:32} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("template"),
            );
            b.set_message(phase.clone());
            self.bar = Some(b);
            self.phase = phase;
        }
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    fn on(&mut self, p: Progress) {
        let n = self.sizes.len();
        match p {
            Progress::Opened { layers } => {
                self.sizes = layers.iter().map(|l| l.size).collect();
                let total: u64 = self.sizes.iter().sum();
                eprintln!("{} layers, {total} bytes", layers.len());
            }
            Progress::Fetch { index, done } => self.bar(
                format!("layer {}/{n}: fetch", index + 1),
                self.sizes[index],
                done,
            ),
            Progress::Apply { index, done } => self.bar(
                format!("layer {}/{n}: apply", index + 1),
                self.sizes[index],
                done,
            ),
            Progress::Applied { index, stats: s } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                self.phase.clear();
                eprintln!(
                    "layer {}/{n}: {} entries, {} files, {} dirs, {} links, {} whiteouts, {} opaque, {} bytes",
                    index + 1,
                    s.entries,
                    s.files,
                    s.dirs,
                    s.symlinks + s.hardlinks,
                    s.whiteouts,
                    s.opaque,
                    s.file_bytes
                );
            }
            Progress::Metadata => eprintln!("erofs metadata"),
            Progress::Build { done, total } => self.bar("chunking".into(), total, done),
        }
    }
}

fn summary(src: &str, c: &Converted, chunk_kib: u32) {
    let t = &c.tree;
    let b = &c.build;
    let stored: u64 = c.layers.iter().map(|(l, _)| l.size).sum();
    let tar: u64 = c.layers.iter().map(|(_, s)| s.tar_bytes).sum();
    let nonzero = b.chunks - b.zero_chunks;
    eprintln!("converted  {src} {}", c.manifest.digest);
    eprintln!(
        "layers     {} ({stored} bytes stored, {tar} bytes of tar)",
        c.layers.len()
    );
    eprintln!(
        "tree       {} files, {} dirs, {} symlinks, {} hardlinks, {} devices/fifos, {} bytes",
        t.files, t.dirs, t.symlinks, t.hardlinks, t.nodes, t.bytes
    );
    eprintln!("erofs      {} bytes", b.image_size);
    eprintln!(
        "chunks     {} x {chunk_kib} KiB: {} zero, {} unique, {} duplicates (stored once)",
        b.chunks,
        b.zero_chunks,
        b.unique_chunks,
        nonzero - b.unique_chunks
    );
    let layer_bytes: u64 = b.shared.iter().map(|s| s.size).sum();
    eprintln!(
        "blobs      {} bytes: {} layer data blobs of {layer_bytes} bytes (the same in every image with the layer), the image's own {} bytes (metadata)",
        b.blob_size,
        b.shared.len(),
        b.own_blob_size
    );
}

/// Run `lazyblk convert`.
pub fn run(a: ConvertArgs) -> Result<()> {
    let src = SourceRef::parse(&a.src)?;
    let (work, temp) = match &a.work_dir {
        Some(w) => (w.clone(), false),
        None => {
            let base = std::env::var_os("TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp"));
            let w = base.join(format!("lazyblk-convert.{}", std::process::id()));
            std::fs::create_dir(&w).with_context(|| format!("creating {}", w.display()))?;
            (w, !a.keep_work_dir)
        }
    };
    let opts = ConvertOptions {
        platform: a.platform.clone(),
        apply: ApplyOptions {
            max_layer_bytes: a.max_layer_bytes,
            max_layer_entries: a.max_layer_entries,
            ..ApplyOptions::default()
        },
        build: crate::cmd::build::options(a.chunk_kib, a.level, false, None)?,
    };
    let result = (|| -> Result<()> {
        let client = match src {
            SourceRef::Registry(_) => Some(a.registry.client()?),
            _ => None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut rep = Reporter::new();
        let c = rt
            .block_on(lazyblk_convert::convert(
                &src,
                client.as_ref(),
                &work,
                &opts,
                &mut |p| rep.on(p),
            ))
            .with_context(|| format!("converting {src}"))?;
        summary(&a.src, &c, a.chunk_kib);
        let created = lazyblk_builder::push::rfc3339_utc(std::time::SystemTime::now());
        match c.source_link(&src, created) {
            Some(link) => crate::cmd::push::push_linked_dir(&c.out_dir, &a.dst, &link, &a.registry),
            None => crate::cmd::push::push_dir(&c.out_dir, &a.dst, None, &a.registry),
        }
    })();
    if temp {
        let _ = std::fs::remove_dir_all(&work);
    } else if result.is_ok() {
        eprintln!(
            "work directory {} (build directory in out/)",
            work.display()
        );
    }
    result
}
