//! Test helper binary: `gen-tree <dir> [--seed N] [--scale N]`, `digest-tree <dir>`,
//! `par-read`, `serve` (a fault-injecting HTTP server) and `token-registry` (a Docker registry
//! with token auth and its issuer, for the guest suites) and `cri-pull` (a CRI `PullImage` call
//! to containerd: crictl is not in Debian).

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "lazyblk test helpers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate the standard test tree.
    GenTree {
        /// Where.
        dir: PathBuf,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Multiplier for large file sizes.
        #[arg(long, default_value_t = 1)]
        scale: u64,
    },
    /// Print the digest of a tree (contents and metadata).
    DigestTree {
        /// Which.
        dir: PathBuf,
    },
    /// Read 4 KiB at each offset, all at once from one thread per offset (O_DIRECT).
    ParRead {
        /// Block device or file.
        dev: PathBuf,
        /// Byte offsets (multiples of 4096).
        offsets: Vec<u64>,
    },
    /// Serve a directory over HTTP with injected faults on requests for `--target`, until killed.
    Serve {
        /// Directory to serve.
        root: PathBuf,
        /// Path (relative to root) whose range requests get the faults.
        #[arg(long)]
        target: String,
        /// Fault: status<code>, reset, hang, truncate, ignore-range, flip, wrong-range, too-long,
        /// redirect-offhost, huge.
        #[arg(long)]
        fault: Option<lazyblk_tests::fault::Fault>,
        /// Inject into this many data requests (0: into every request, probes included).
        #[arg(long, default_value_t = 0)]
        count: u32,
        /// Write the chosen port here once listening.
        #[arg(long)]
        port_file: PathBuf,
    },
    /// Pull an image through containerd's CRI plugin (`runtime.v1.ImageService/PullImage`), as
    /// the kubelet does; prints the image id.
    CriPull {
        /// The image reference.
        image: String,
        /// containerd's socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        socket: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Run a Docker registry (`docker-registry`) with `auth: token` and its token issuer until
    /// killed; writes `host:port` of the registry to `--host-file` once it answers. The
    /// registry's config stays in `<dir>/config.yml`, so `docker-registry serve` restarts it
    /// after an outage.
    TokenRegistry {
        /// Storage and config directory.
        dir: PathBuf,
        /// The one user the issuer accepts.
        #[arg(long)]
        user: String,
        /// Its password.
        #[arg(long)]
        password: String,
        /// Token lifetime (and announced `expires_in`), seconds.
        #[arg(long, default_value_t = 60)]
        expires: u64,
        /// Where to write `host:port`.
        #[arg(long)]
        host_file: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::GenTree { dir, seed, scale } => lazyblk_tests::tree::generate(&dir, seed, scale),
        Cmd::DigestTree { dir } => {
            print!("{}", lazyblk_tests::tree::digest(&dir)?);
            Ok(())
        }
        Cmd::ParRead { dev, offsets } => {
            use std::os::unix::fs::{FileExt, OpenOptionsExt};
            let f = std::sync::Arc::new(
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&dev)?,
            );
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(offsets.len()));
            let hs: Vec<_> = offsets
                .into_iter()
                .map(|off| {
                    let (f, b) = (f.clone(), barrier.clone());
                    std::thread::spawn(move || -> std::io::Result<()> {
                        // O_DIRECT wants an aligned buffer: take a 4 KiB-aligned slice.
                        let mut raw = vec![0u8; 8192];
                        let at = raw.as_ptr().align_offset(4096);
                        b.wait();
                        f.read_exact_at(&mut raw[at..at + 4096], off)
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("reader thread")?;
            }
            Ok(())
        }
        Cmd::Serve {
            root,
            target,
            fault,
            count,
            port_file,
        } => {
            let srv = lazyblk_tests::fault::FaultServer::start(&root, &target);
            if let Some(f) = fault {
                if count == 0 {
                    srv.set_always(Some(f));
                } else {
                    for _ in 0..count {
                        srv.push(f.clone());
                    }
                }
            }
            std::fs::write(&port_file, srv.port.to_string())?;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Cmd::CriPull {
            image,
            socket,
            timeout,
        } => {
            let id = lazyblk_tests::cri::pull_image(
                &socket,
                &image,
                std::time::Duration::from_secs(timeout),
            )?;
            println!("{id}");
            Ok(())
        }
        Cmd::TokenRegistry {
            dir,
            user,
            password,
            expires,
            host_file,
        } => {
            let t = lazyblk_tests::registry::TokenRegistry::start(
                &dir,
                &user,
                &password,
                expires as i64,
                expires,
            );
            std::fs::write(&host_file, t.registry.host())?;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}
