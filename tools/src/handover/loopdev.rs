//! Kernel loop devices for the hand-over: attach a file read-only with one `LOOP_CONFIGURE`
//! (Linux 5.8: backing file, flags, size and block size set together, so the device never
//! exists writable or at the wrong size), detach, and find which loop devices serve a file.
//!
//! Hand-rolled rather than the `loopdev-3` crate: that crate attaches with `LOOP_SET_FD` and then
//! `LOOP_SET_STATUS64` (two steps, the second one failing leaves a half-set-up device), and needs
//! a bindgen build of its own for four ioctls whose layout is a stable kernel ABI.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` (include/uapi/linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A loop device just attached; the returned file keeps it open, and so bound, until the
/// caller has handed it to a holder (the devices are attached with `LO_FLAGS_AUTOCLEAR`: they
/// detach themselves when their last opener closes them, so one whose attacher died before
/// anyone else opened it does not linger).
pub struct Attached {
    /// `/dev/loopN`.
    pub path: String,
    /// The open device.
    pub file: File,
}

/// Attach `backing` read-only, `size` bytes of it, as a loop device with `block_size`-byte
/// logical blocks. `direct_io`: read the backing file with O_DIRECT (no second page cache).
pub fn attach_read_only(
    backing: &Path,
    size: u64,
    block_size: u32,
    direct_io: bool,
) -> Result<Attached> {
    let data = File::open(backing).with_context(|| format!("opening {}", backing.display()))?;
    let len = data.metadata()?.len();
    if len < size {
        bail!(
            "{} is {len} bytes, shorter than the device ({size} bytes)",
            backing.display()
        );
    }
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .context("opening /dev/loop-control (load the loop module: `modprobe loop`)")?;
    let mut last = None;
    for _ in 0..10 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            bail!("LOOP_CTL_GET_FREE: {}", std::io::Error::last_os_error());
        }
        let path = format!("/dev/loop{n}");
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .open(&path)
            .with_context(|| format!("opening {path}"))?;
        let mut flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        if direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        let mut name = [0u8; 64];
        let b = backing.as_os_str().as_encoded_bytes();
        let k = b.len().min(63);
        name[..k].copy_from_slice(&b[..k]);
        let cfg = LoopConfig {
            fd: data.as_raw_fd() as u32,
            block_size,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: size,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: flags,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: `cfg` is a `struct loop_config` laid out as the kernel's, valid for the call;
        // the kernel only reads it, and takes its own reference to the backing file.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok(Attached { path, file: dev });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            bail!("LOOP_CONFIGURE {path} over {}: {e}", backing.display());
        }
        // Another process took this device between GET_FREE and CONFIGURE: take the next.
        last = Some(e);
    }
    bail!("no free loop device after 10 tries: {last:?}")
}

/// Detach the loop device `dev` (`/dev/loopN`). While something still holds it open the
/// kernel detaches it at the last close instead.
pub fn detach(dev: &str) -> Result<()> {
    let f = File::open(dev).with_context(|| format!("opening {dev}"))?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENXIO) {
            bail!("detaching {dev}: {e}");
        }
    }
    Ok(())
}

/// The file the loop device `dev` (`/dev/loopN` or `loopN`) serves, if it is bound.
pub fn backing_file(dev: &str) -> Option<PathBuf> {
    let n = dev.trim_start_matches("/dev/");
    let s = std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Every bound loop device serving `file` (compared by path), as `/dev/loopN`.
pub fn serving(file: &Path) -> Vec<String> {
    let want = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("loop") && backing_file(&n).is_some_and(|b| b == want || b == file) {
                out.push(format!("/dev/{n}"));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_structs_have_the_kernel_layout() {
        // include/uapi/linux/loop.h: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        assert_eq!(std::mem::offset_of!(LoopConfig, info), 8);
    }
}
