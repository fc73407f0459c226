//! Test helper binary: `gen-tree <dir> [--seed N] [--scale N]`, `digest-tree <dir>`,
//! `par-read`, `serve` (a fault-injecting HTTP server) and `token-registry` (a Docker registry
//! with token auth and its issuer, for the guest suites) and `cri-pull` (a CRI `PullImage` call
//! to containerd: crictl is not in Debian) and `scrape` (GET /metrics over a unix socket, as
//! another user if asked, read back strictly; curl is not in the guest).

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
    /// GET /metrics from the unix socket SOURCE (`-`: exposition text on standard input),
    /// check it is valid text format and print it, or with `--value` the value of the one
    /// sample of that name with the `--label`s. Connects as `--as-uid` (and the same gid) when
    /// given, to check who may.
    Scrape {
        source: PathBuf,
        #[arg(long)]
        as_uid: Option<u32>,
        #[arg(long)]
        value: Option<String>,
        /// `NAME=VALUE`
        #[arg(long)]
        label: Vec<String>,
    },
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
        Cmd::Scrape {
            source,
            as_uid,
            value,
            label,
        } => scrape(&source, as_uid, value.as_deref(), &label),
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

/// `lazyblk-testkit scrape`.
fn scrape(
    source: &std::path::Path,
    as_uid: Option<u32>,
    value: Option<&str>,
    labels: &[String],
) -> Result<()> {
    use anyhow::{bail, Context};
    use std::io::{Read, Write};
    if let Some(uid) = as_uid {
        // SAFETY: plain system calls on integers; a failure is checked.
        let r = unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(uid) != 0 {
                -1
            } else {
                libc::setuid(uid)
            }
        };
        if r != 0 {
            bail!("becoming uid {uid}: {}", std::io::Error::last_os_error());
        }
    }
    let text = if source.as_os_str() == "-" {
        let mut t = String::new();
        std::io::stdin().read_to_string(&mut t)?;
        t
    } else {
        let mut c = std::os::unix::net::UnixStream::connect(source)
            .with_context(|| format!("connect {}", source.display()))?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: lazyblk\r\n\r\n")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        let Some((head, body)) = out.split_once("\r\n\r\n") else {
            bail!("no HTTP response from {}", source.display());
        };
        if !head.starts_with("HTTP/1.1 200 ") {
            bail!(
                "{}: {}",
                source.display(),
                head.lines().next().unwrap_or("")
            );
        }
        body.to_string()
    };
    let samples = lazyblk_metrics::parse_text(&text)?;
    let Some(name) = value else {
        print!("{text}");
        return Ok(());
    };
    let want: Vec<(&str, &str)> = labels
        .iter()
        .map(|l| l.split_once('=').context("--label is NAME=VALUE"))
        .collect::<Result<_>>()?;
    let v = lazyblk_metrics::expose::value(&samples, name, &want)
        .with_context(|| format!("no single sample {name} with {want:?}"))?;
    println!("{v}");
    Ok(())
}
