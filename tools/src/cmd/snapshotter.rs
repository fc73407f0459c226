//! `lazyblk snapshotter --address SOCK --root DIR`: containerd's remote snapshotter
//! (`lazyblk-snapshotter` serves the gRPC API and keeps the snapshot tree); this module is its
//! lazyblk side, [`Devices`]: finding an image's lazy version in the registry (through the
//! referrers of the manifest containerd pulls), attaching it as one supervised ublk device per
//! image (`lazyblk add --supervise`, a process of its own, so a dying snapshotter never takes a
//! running container's device with it), mounting its erofs read-only, and releasing it.

use crate::cmd::add::spawn_daemon;
use crate::daemon::{self, Record};
use crate::device::pid_alive;
use crate::store_args::StoreArgs;
use anyhow::{Context, Result};
use clap::Args;
use lazyblk_registry::reference::Reference;
use lazyblk_registry::Platform;
use lazyblk_snapshotter::{
    LazyImage, LazyImages, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `lazyblk snapshotter`.
#[derive(Args)]
pub struct SnapshotterArgs {
    /// The unix socket containerd's `proxy_plugins` entry names (made mode 0600).
    #[arg(long, default_value = "/run/lazyblk/snapshotter.sock")]
    address: PathBuf,
    /// Metadata, upper directories and image mounts.
    #[arg(long, default_value = "/var/lib/lazyblk-snapshotter")]
    root: PathBuf,
    /// Log file of the image daemons it starts.
    #[arg(long, default_value = "/var/log/lazyblk/lazyblk.log")]
    log_file: PathBuf,
    /// The platform whose manifest's lazy version to use when containerd names an index.
    #[arg(long)]
    platform: Option<Platform>,
    /// Store settings of the devices it attaches (cache directory, deadlines, prefetch...) and
    /// the registry settings (credentials: Docker's config or `--creds-file`, since containerd
    /// passes none to snapshotters; mirrors; `--hosts-dir`).
    #[command(flatten)]
    store: StoreArgs,
}

/// Run the snapshotter until SIGTERM/SIGINT.
pub fn run(state: PathBuf, a: SnapshotterArgs) -> Result<()> {
    if a.store.pins_one_image() {
        anyhow::bail!(
            "--digest and --pack-digest pin one image; the snapshotter attaches many, each pinned to the manifest containerd pulled"
        );
    }
    lazyblk_ublk::check_kernel()?;
    let client = a.store.registry.client()?;
    let devices = Devices {
        state,
        store_args: a.store.to_args(),
        log: a.log_file,
        platform: a.platform.unwrap_or_else(Platform::host),
        client,
        found: Mutex::default(),
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        attach: Mutex::new(()),
    };
    lazyblk_snapshotter::serve(&a.address, &a.root, Arc::new(devices))
        .with_context(|| format!("the snapshotter on {}", a.address.display()))
}

/// How long a lookup's answer is kept (each layer of an image asks for the same one).
const FOUND_TTL: Duration = Duration::from_secs(60);

/// lazyblk's side of the snapshotter: registry lookups and devices.
struct Devices {
    state: PathBuf,
    store_args: Vec<String>,
    log: PathBuf,
    platform: Platform,
    client: lazyblk_registry::Client,
    /// Lookups by source manifest, with when they were made.
    found: Mutex<HashMap<String, (Instant, Option<LazyImage>)>>,
    rt: tokio::runtime::Runtime,
    /// One attach at a time (two layers' Prepares of one image must not start two devices).
    attach: Mutex<()>,
}

impl Devices {
    /// The record of the device serving `reference`, if any.
    fn record_for(&self, reference: &str) -> Option<Record> {
        let digest = reference.rsplit_once('@').map(|(_, d)| d)?;
        daemon::records(&self.state)
            .into_iter()
            .rfind(|r| r.manifest == reference || r.manifest.ends_with(&format!("@{digest}")))
    }

    /// `lazyblk <args>` of this binary, to completion; its output on failure.
    fn lazyblk(&self, args: &[String]) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let out = std::process::Command::new(exe)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .map_err(|e| format!("running lazyblk {}: {e}", args.join(" ")))?;
        if out.status.success() {
            return Ok(());
        }
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }

    /// A live device for `image`: the one its record names (recovered when its daemon died and
    /// no supervisor restarts it), else a new one (`lazyblk add --supervise`).
    fn device(&self, image: &LazyImage) -> Result<String, String> {
        if let Some(r) = self.record_for(&image.reference) {
            if Path::new(&r.bdev).exists() {
                let served = pid_alive(r.pid) || r.supervisor.is_some_and(pid_alive);
                if !served {
                    tracing::warn!(
                        "{}: the daemon of {} died; recovering",
                        image.reference,
                        r.bdev
                    );
                    self.lazyblk(&["recover".into(), r.id.to_string(), "--supervise".into()])
                        .map_err(|e| {
                            format!("recovering {} for {}: {e}", r.bdev, image.reference)
                        })?;
                }
                return Ok(r.bdev);
            }
        }
        let mut args = vec![
            "--state-dir".to_string(),
            self.state.display().to_string(),
            "add".into(),
            image.reference.clone(),
            "--supervise".into(),
            "--log-file".into(),
            self.log.display().to_string(),
        ];
        args.extend(self.store_args.iter().cloned());
        args.push("--foreground".into());
        let (_, bdev) = spawn_daemon(&args, &self.log)
            .map_err(|e| format!("attaching {}: {e:#}", image.reference))?;
        Ok(bdev)
    }
}

/// Whether `dir` is a mount point: a mount point field of /proc/self/mountinfo (paths without
/// spaces or escapes, as the snapshotter's own mountpoints are).
fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} has a NUL", p.display()))
}

fn mount_erofs(dev: &str, dir: &Path) -> Result<(), String> {
    let (src, dst) = (cstr(Path::new(dev))?, cstr(dir)?);
    // SAFETY: the strings are NUL-terminated and live across the call; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"erofs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("mounting {dev} (erofs) on {}: {e}", dir.display()));
    }
    Ok(())
}

fn unmount(dir: &Path) -> Result<(), String> {
    let d = cstr(dir)?;
    // SAFETY: a NUL-terminated path living across the call.
    if unsafe { libc::umount2(d.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) {
        return Ok(()); // not mounted
    }
    // Busy (a reader still has it open): detach it; the device goes when the last user does.
    // SAFETY: as above.
    if unsafe { libc::umount2(d.as_ptr(), libc::MNT_DETACH) } == 0 {
        tracing::warn!("{} was busy ({e}): detached", dir.display());
        return Ok(());
    }
    Err(format!("unmounting {}: {e}", dir.display()))
}

/// The source image a layer's Prepare labels name: `cri.image-ref` pinned to
/// `cri.manifest-digest` (the manifest containerd pulled: a tag may have moved since).
fn source_of(labels: &HashMap<String, String>) -> Result<Option<Reference>, String> {
    let Some(image_ref) = labels.get(LABEL_IMAGE_REF) else {
        return Ok(None);
    };
    let r: Reference = image_ref
        .parse()
        .map_err(|e| format!("{image_ref}: not an image reference: {e}"))?;
    Ok(Some(match labels.get(LABEL_MANIFEST_DIGEST) {
        Some(d) => r
            .with_digest(d)
            .map_err(|e| format!("{image_ref}: the manifest digest {d:?}: {e}"))?,
        None => r,
    }))
}

impl LazyImages for Devices {
    fn find(&self, labels: &HashMap<String, String>) -> Result<Option<LazyImage>, String> {
        let Some(source) = source_of(labels)? else {
            return Ok(None);
        };
        let key = source.to_string();
        if let Some((t, hit)) = self.found.lock().unwrap().get(&key) {
            if t.elapsed() < FOUND_TTL {
                return Ok(hit.clone());
            }
        }
        let link = self
            .rt
            .block_on(lazyblk_remote::registry::find_lazy(
                &self.client,
                &source,
                &self.platform,
            ))
            .map_err(|e| format!("looking for the lazy version of {source}: {e}"))?;
        let hit = link.map(|l| {
            let reference = l.reference.to_string();
            let name = reference
                .rsplit_once("@sha256:")
                .map(|(_, h)| h.to_string())
                .unwrap_or_else(|| reference.replace(['/', ':', '@'], "_"));
            LazyImage { reference, name }
        });
        if let Some(h) = &hit {
            tracing::info!("{source}: lazy version {}", h.reference);
        }
        self.found
            .lock()
            .unwrap()
            .insert(key, (Instant::now(), hit.clone()));
        Ok(hit)
    }

    fn attach(&self, image: &LazyImage, mountpoint: &Path) -> Result<(), String> {
        let _one = self.attach.lock().unwrap();
        let dev = self.device(image)?;
        if is_mounted(mountpoint) {
            return Ok(());
        }
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| format!("creating {}: {e}", mountpoint.display()))?;
        mount_erofs(&dev, mountpoint)
    }

    fn materialize(&self, labels: &HashMap<String, String>, dir: &Path) -> Result<(), String> {
        let source = source_of(labels)?.ok_or("no image reference in the layer's labels")?;
        let layer = labels
            .get(LABEL_LAYER_DIGEST)
            .ok_or("no layer digest in the layer's labels")?;
        let work = dir.with_extension("layers");
        let _ = std::fs::remove_dir_all(&work);
        let src = lazyblk_convert::SourceRef::Registry(source.clone());
        let opts = lazyblk_convert::ApplyOptions::default();
        let got = self.rt.block_on(lazyblk_convert::unpack(
            &src,
            Some(&self.client),
            &self.platform,
            Some(layer),
            dir,
            &work,
            &opts,
            &mut |_| {},
        ));
        let _ = std::fs::remove_dir_all(&work);
        let (_, layers) = got.map_err(|e| format!("{source} up to layer {layer}: {e}"))?;
        tracing::info!("{source}: unpacked {} layers up to {layer}", layers.len());
        Ok(())
    }

    fn release(&self, image: &LazyImage, mountpoint: &Path) -> Result<(), String> {
        let _one = self.attach.lock().unwrap();
        unmount(mountpoint)?;
        if let Some(r) = self.record_for(&image.reference) {
            self.lazyblk(&["del".into(), r.id.to_string()])
                .map_err(|e| format!("deleting {} of {}: {e}", r.bdev, image.reference))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_digest_pin_is_refused_before_anything_starts() {
        let cli = crate::cli::Cli::try_parse_from([
            "lazyblk",
            "snapshotter",
            "--digest",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ])
        .unwrap();
        let crate::cli::Cmd::Snapshotter(a) = cli.cmd else {
            panic!("not the snapshotter");
        };
        let e = run(PathBuf::from("/nonexistent"), a).unwrap_err();
        assert!(e.to_string().contains("--digest"), "{e}");
    }

    #[test]
    fn the_source_is_pinned_to_the_manifest_containerd_pulled() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let labels: HashMap<String, String> = [
            (
                LABEL_IMAGE_REF.to_string(),
                "reg.test:5000/team/py:3.11".to_string(),
            ),
            (LABEL_MANIFEST_DIGEST.to_string(), d.clone()),
        ]
        .into();
        let r = source_of(&labels).unwrap().unwrap();
        assert_eq!(r.registry(), "reg.test:5000");
        assert_eq!(r.repository(), "team/py");
        assert_eq!(r.digest(), Some(d.as_str()));
        assert!(source_of(&HashMap::new()).unwrap().is_none());
        let bad: HashMap<String, String> =
            [(LABEL_IMAGE_REF.to_string(), "UPPER/Case:x".to_string())].into();
        assert!(source_of(&bad).unwrap_err().contains("UPPER/Case:x"));
    }
}
