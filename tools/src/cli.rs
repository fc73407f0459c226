//! The command line: `Cli`, its global options and the `Cmd` subcommands with their flags (clap
//! definitions only; each command runs in its module, see `main.rs`).

use crate::cmd::add;
use crate::cmd::convert;
use crate::cmd::snapshotter;
use crate::cmd::vhost;
use crate::registry_args::RegistryArgs;
use crate::store_args::StoreArgs;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lazyblk",
    version,
    about = "Lazy block devices: erofs images served on demand through ublk"
)]
pub struct Cli {
    /// Directory for daemon records and control sockets.
    #[arg(
        long,
        global = true,
        env = "LAZYBLK_STATE_DIR",
        default_value = "/run/lazyblk"
    )]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Make a chunked image from a directory (via mkfs.erofs) or a raw image file.
    Build {
        /// A directory tree or a raw image (erofs or any disk image).
        input: PathBuf,
        /// Output directory (gets `manifest` and `blob`).
        #[arg(short, long)]
        output: PathBuf,
        /// Chunk size in KiB (power of two, 4..65536).
        #[arg(long, default_value_t = lazyblk_format::DEFAULT_CHUNK_SIZE / 1024)]
        chunk_kib: u32,
        /// zstd level.
        #[arg(long, default_value_t = 9)]
        level: i32,
        /// Keep the intermediate erofs image (when building from a directory) at this path.
        #[arg(long)]
        keep_image: Option<PathBuf>,
        /// Do not store the metadata pack (a second, dense copy of the 4 KiB blocks holding an
        /// erofs image's inodes, directories and xattrs, fetched first at every `add`).
        #[arg(long)]
        no_metadata_pack: bool,
        /// Also store in the pack the blocks of this block list (`lazyblk trace --blocks`,
        /// recorded on an earlier build of the same image): a workload that reads them then
        /// finds them all after a few requests, at block rather than chunk granularity.
        #[arg(long)]
        pack_blocks: Option<PathBuf>,
        /// Then push the output directory to this image reference (as `lazyblk push`).
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Publish a build directory (`manifest`, its blob, and `prefetch` / `prefetch.pack` when
    /// there) to an OCI registry as a lazyblk image; prints the manifest digest. Blobs the
    /// registry has are not sent again.
    Push {
        /// The build directory (`lazyblk build -o`).
        dir: PathBuf,
        /// Where to: `[host[:port]/]repo[:tag]` (tag `latest` when none).
        reference: String,
        /// Mount the blobs from this repository of the same registry when it has them (no
        /// upload).
        #[arg(long, value_name = "REPO")]
        mount_from: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Convert a container image (registry, `oci:DIR`, `docker-archive:FILE`) into one erofs
    /// image of its flattened layers and push it as a lazyblk image, with the source config.
    Convert(convert::ConvertArgs),
    /// Read an image through the chunk store (no kernel device needed).
    Cat {
        /// Manifest path or URL.
        manifest: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Start offset.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read (default: to the end of the image).
        #[arg(long)]
        length: Option<u64>,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Serve an image as /dev/ublkbN (with `--handover`: a loop or dm device over it); prints
    /// the device path once it is live.
    Add(add::AddArgs),
    /// Record which chunks a running device has read (first-access order) into a prefetch list;
    /// publish it next to the manifest as `prefetch` and `add` fetches those chunks first.
    /// With `--pack`, write the blocks read instead into a prefetch pack (`prefetch.pack` and
    /// its blob): `add` then fetches just those blocks, in a few requests.
    Trace {
        /// Device id.
        id: u32,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Only the trace: do not append the rest of the list the image was published with.
        #[arg(long)]
        trace_only: bool,
        /// Write the 4 KiB blocks read since `add` instead (a block list, ascending), for
        /// `lazyblk build --pack-blocks`: the rebuilt image stores them in its pack.
        #[arg(long, conflicts_with = "trace_only")]
        blocks: bool,
        /// Write a prefetch pack: the 4 KiB blocks read since `add` that are not in the
        /// image's metadata pack (fetched first, before the pack's own frames), read back
        /// from the device and stored densely in `<OUTPUT>.blob`,
        /// described by `<OUTPUT>`. Publish both next to the manifest (`OUTPUT` named
        /// `prefetch.pack`). Prints the pack's digest for `add --pack-digest`. Not for a
        /// writable device (its blocks may not be the image's).
        #[arg(long, conflicts_with_all = ["trace_only", "blocks"])]
        pack: bool,
        /// With `--pack`: push the pack to this image reference (the device's image in a
        /// registry), as a new manifest over the image's blobs under the same tag.
        #[arg(long, value_name = "REF", requires = "pack")]
        push: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Write the whole verified raw image of a running device to a file (fetching what is
    /// missing). For an image that is not attached, use `lazyblk cat -o`.
    Export {
        /// Device id.
        id: u32,
        /// Output file.
        output: PathBuf,
    },
    /// Remove the caches of images that no running daemon uses; each line also says how many
    /// of the cache's chunks a cache that stays holds too (an image of a removed cache copies
    /// those locally, not from the network). With `--host-cache-limit`, remove nothing whole:
    /// set the cache root's limit and bring it under it now (least recently used chunks
    /// first across every image, a chunk several caches hold counted once).
    Gc {
        /// Cache root.
        #[arg(long, env = "LAZYBLK_CACHE_DIR", default_value = "/var/cache/lazyblk")]
        cache_dir: PathBuf,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Set the host cache limit of the cache root (e.g. 20G; 0 removes it) and enforce it
        /// instead of removing caches.
        #[arg(long, value_parser = crate::store_args::parse_size, conflicts_with = "dry_run")]
        host_cache_limit: Option<u64>,
    },
    /// List lazyblk devices.
    List,
    /// The host's metrics in the Prometheus text format: every device's series (labels
    /// `device`, `image`; `lazyblk_up 0` for one whose daemon does not answer) and
    /// `lazyblk_host_*` totals. Printed once, or served with `--listen`.
    Metrics {
        /// Serve them (HTTP GET /metrics) on `unix:PATH` (a socket 0600, root only) or
        /// `tcp:ADDR:PORT` until killed.
        #[arg(long, value_name = "unix:PATH|tcp:ADDR:PORT")]
        listen: Option<lazyblk_metrics::Listen>,
        /// With `--listen unix:PATH`: make the socket 0660 owned by this group (name or gid).
        #[arg(long, value_name = "NAME|GID")]
        socket_group: Option<String>,
    },
    /// Counters of a device.
    Status {
        /// Device id.
        id: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete a device (its cache is kept).
    Del {
        /// Device id.
        id: Option<u32>,
        /// Every lazyblk device.
        #[arg(long)]
        all: bool,
    },
    /// Restart the daemon of a device whose daemon died (or was detached), without unmounting
    /// anything. Waits until the kernel has parked the device's IO.
    Recover {
        /// Device id.
        id: u32,
        /// Stay in the foreground.
        #[arg(long)]
        foreground: bool,
        /// Run the new daemon under a supervisor (see `add --supervise`).
        #[arg(long)]
        supervise: bool,
        /// Seconds to wait for the kernel to notice a dead daemon (up to the block layer's IO
        /// timeout, 30 s, when every IO of a queue was waiting in the dead daemon).
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Stop a device's daemon without stopping the device (for an upgrade): the daemon stops
    /// fetching, makes its cache durable and clean, and exits; the kernel parks the device's IO
    /// until `lazyblk recover` (from any binary) takes over.
    Detach {
        /// Device id.
        id: u32,
        /// Seconds to wait for the kernel to park the device's IO.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Hand a device added with `--handover` over to the kernel now (its image must be
    /// complete): its loop device is switched to the cache file (or its dm device to a
    /// read-only loop device of it), the ublk device is deleted and the daemon exits. Read-only
    /// images only.
    Handover {
        /// Device id.
        id: u32,
    },
    /// Check a cache directory without changing it: every chunk its bitmap claims present must
    /// match the manifest's digest. Exits non-zero on any bad chunk.
    VerifyCache {
        /// The cache directory of one image (`<cache root>/<sha256 hex>`).
        dir: PathBuf,
    },
    /// Serve an image to a VM as a vhost-user-blk device (qemu `vhost-user-blk-pci`), lazily;
    /// `--writable` keeps the guest's writes in a local copy-on-write layer.
    Vhost(vhost::VhostArgs),
    /// Write a writable disk's current contents (the image under its COW layer) to a raw file.
    ExportCow(vhost::ExportArgs),
    /// containerd's remote snapshotter (a `proxy_plugins` entry of type `snapshot`): a CRI pull
    /// of an image with a lazy version (`lazyblk convert`) attaches that instead of unpacking
    /// layers; other images get ordinary overlay snapshots. Runs until SIGTERM.
    Snapshotter(snapshotter::SnapshotterArgs),
}
