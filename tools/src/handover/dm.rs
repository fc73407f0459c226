//! The device-mapper side of the hand-over, through the `devicemapper` crate (the Stratis
//! project's binding of the DM ioctls): a read-only `linear` device over one whole block device,
//! its table swapped by load + suspend + resume.
//!
//! The crate synchronises with udev only when udev runs (`/run/udev/control`); without it (the
//! test guest, containers) the ioctls are used as they are, and the `/dev/mapper/<name>` node,
//! which udev would make, is made here from the device number.

use anyhow::{anyhow, bail, Context, Result};
use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A block device number.
pub type DevNo = (u32, u32);

/// What the kernel says about a dm device.
#[derive(Clone, Copy, Debug)]
pub struct Info {
    /// Its own device number (`/dev/dm-N`).
    pub devno: DevNo,
    /// Suspended: IO to it is held.
    pub suspended: bool,
    /// Openers (a mount counts as one).
    pub open_count: i32,
}

/// An open `/dev/mapper/control`.
pub struct Dm(DM);

fn name(n: &str) -> Result<&DmName> {
    DmName::new(n).map_err(|e| anyhow!("bad device-mapper name {n:?}: {e}"))
}

fn linear(dev: DevNo, sectors: u64) -> Vec<(u64, u64, String, String)> {
    vec![(
        0,
        sectors,
        "linear".to_string(),
        format!("{}:{} 0", dev.0, dev.1),
    )]
}

impl Dm {
    /// Open the control device.
    pub fn open() -> Result<Dm> {
        DM::new().map(Dm).map_err(|e| {
            anyhow!(
                "device-mapper is not usable: {e} (load it with `modprobe dm-mod`; run as root)"
            )
        })
    }

    /// Whether a dm device of this name exists.
    pub fn exists(&self, n: &str) -> bool {
        name(n).is_ok_and(|nm| self.0.device_info(&DevId::Name(nm)).is_ok())
    }

    /// The kernel's view of device `n`.
    pub fn info(&self, n: &str) -> Result<Info> {
        let i = self
            .0
            .device_info(&DevId::Name(name(n)?))
            .with_context(|| format!("device-mapper device {n}"))?;
        let d = i.device();
        Ok(Info {
            devno: (d.major, d.minor),
            suspended: i.flags().contains(DmFlags::DM_SUSPEND),
            open_count: i.open_count(),
        })
    }

    /// Create `n`: a read-only linear map of the whole of `dev` (`sectors` long), live.
    pub fn create_linear(&self, n: &str, dev: DevNo, sectors: u64) -> Result<DevNo> {
        let nm = name(n)?;
        self.0
            .device_create(nm, None, DmOptions::default())
            .with_context(|| format!("creating the device-mapper device {n}"))?;
        let r = self
            .load_linear(n, dev, sectors)
            .and_then(|()| self.resume(n))
            .and_then(|()| self.info(n));
        match r {
            Ok(i) => Ok(i.devno),
            Err(e) => {
                let _ = self.0.device_remove(&DevId::Name(nm), DmOptions::default());
                Err(e)
            }
        }
    }

    /// Load a read-only linear map of `dev` into `n`'s inactive table slot.
    pub fn load_linear(&self, n: &str, dev: DevNo, sectors: u64) -> Result<()> {
        self.0
            .table_load(
                &DevId::Name(name(n)?),
                &linear(dev, sectors),
                DmOptions::default().set_flags(DmFlags::DM_READONLY),
            )
            .with_context(|| format!("loading a table into {n}"))?;
        Ok(())
    }

    /// Drop `n`'s inactive table (and the devices it holds open).
    pub fn clear_inactive(&self, n: &str) -> Result<()> {
        self.0
            .table_clear(&DevId::Name(name(n)?))
            .with_context(|| format!("clearing the inactive table of {n}"))?;
        Ok(())
    }

    /// Suspend `n`: waits for the IO in flight through its table, holds new IO. The file system
    /// is not frozen (`DM_SKIP_LOCKFS`): the device is read-only, there is nothing to flush.
    pub fn suspend(&self, n: &str) -> Result<()> {
        self.0
            .device_suspend(
                &DevId::Name(name(n)?),
                DmOptions::default().set_flags(DmFlags::DM_SUSPEND | DmFlags::DM_SKIP_LOCKFS),
            )
            .with_context(|| format!("suspending {n}"))?;
        Ok(())
    }

    /// Resume `n`, making its inactive table (if one is loaded) the active one.
    pub fn resume(&self, n: &str) -> Result<()> {
        self.0
            .device_suspend(&DevId::Name(name(n)?), DmOptions::default())
            .with_context(|| format!("resuming {n}"))?;
        Ok(())
    }

    /// The device a one-target linear table of `n` maps (`inactive`: the loaded one).
    pub fn target(&self, n: &str, inactive: bool) -> Result<Option<DevNo>> {
        let mut flags = DmFlags::DM_STATUS_TABLE;
        if inactive {
            flags |= DmFlags::DM_QUERY_INACTIVE_TABLE;
        }
        let (_, table) = self
            .0
            .table_status(
                &DevId::Name(name(n)?),
                DmOptions::default().set_flags(flags),
            )
            .with_context(|| format!("reading the table of {n}"))?;
        Ok(match table.as_slice() {
            [(_, _, kind, params)] if kind == "linear" => params
                .split_whitespace()
                .next()
                .and_then(|d| d.split_once(':'))
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))),
            _ => None,
        })
    }

    /// Remove `n` (retried while it is briefly busy).
    pub fn remove(&self, n: &str) -> Result<()> {
        self.0
            .device_remove(&DevId::Name(name(n)?), DmOptions::default())
            .with_context(|| format!("removing the device-mapper device {n}"))?;
        Ok(())
    }
}

/// `/dev/mapper/<n>`.
pub fn node_path(n: &str) -> PathBuf {
    Path::new("/dev/mapper").join(n)
}

/// Make sure `/dev/mapper/<n>` is the block device `devno`: udev makes it when it runs (give
/// it a moment), else make it here.
pub fn make_node(n: &str, devno: DevNo) -> Result<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let p = node_path(n);
    let udev = Path::new("/run/udev/control").exists();
    let t0 = Instant::now();
    while udev && !p.exists() && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Ok(m) = std::fs::metadata(&p) {
        if m.file_type().is_block_device()
            && devno_of_rdev(std::os::unix::fs::MetadataExt::rdev(&m)) == devno
        {
            return Ok(p);
        }
        std::fs::remove_file(&p).with_context(|| format!("replacing {}", p.display()))?;
    }
    std::fs::create_dir_all("/dev/mapper").context("creating /dev/mapper")?;
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; mknod reads nothing else.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFBLK | 0o660,
            libc::makedev(devno.0, devno.1),
        )
    };
    if r != 0 {
        bail!(
            "making {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(p)
}

/// Remove `/dev/mapper/<n>` if it is still there (udev removes it when it runs).
pub fn remove_node(n: &str) {
    let _ = std::fs::remove_file(node_path(n));
}

fn devno_of_rdev(rdev: u64) -> DevNo {
    (libc::major(rdev), libc::minor(rdev))
}

/// The device number of the block device `name` (`ublkb0`, `loop3`), from sysfs.
pub fn devno_of(block: &str) -> Result<DevNo> {
    let p = format!("/sys/class/block/{block}/dev");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    let (a, b) = s.trim().split_once(':').context("bad dev file")?;
    Ok((a.parse()?, b.parse()?))
}

/// Where the block device `devno` is mounted (from `/proc/self/mountinfo`), if anywhere.
pub fn mount_point(devno: DevNo) -> Option<String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = format!("{}:{}", devno.0, devno.1);
    mi.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(2) == Some(&want.as_str())).then(|| f.get(4).unwrap_or(&"?").to_string())
    })
}
