//! Kernel loop devices for the hand-over: attach a file or block device read-only with one
//! `LOOP_CONFIGURE` (Linux 5.8: backing file, flags, size and block size set together, so the
//! device never exists writable or at the wrong size), switch a read-only one to another backing
//! file of the same size (`LOOP_CHANGE_FD`), detach, and find which loop devices serve a file.
//!
//! Hand-rolled rather than the `loopdev-3` crate: that crate attaches with `LOOP_SET_FD` and then
//! `LOOP_SET_STATUS64` (two steps, the second one failing leaves a half-set-up device), and needs
//! a bindgen build of its own for four ioctls whose layout is a stable kernel ABI.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CHANGE_FD: libc::c_ulong = 0x4C06;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
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

/// A loop device just attached; the returned file keeps it open. One attached with `autoclear`
/// (`LO_FLAGS_AUTOCLEAR`) stays bound only until its last opener closes it, so one whose
/// attacher died before it was handed to a holder does not linger.
pub struct Attached {
    /// `/dev/loopN`.
    pub path: String,
    /// The open device.
    pub file: File,
}

/// How to attach a loop device.
#[derive(Clone, Copy, Debug)]
pub struct Attach {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Read the backing file with O_DIRECT (no second page cache).
    pub direct_io: bool,
    /// Detach at the last close (`LO_FLAGS_AUTOCLEAR`).
    pub autoclear: bool,
}

/// Attach `backing` (a file or a block device) read-only, `size` bytes of it, as a loop device.
pub fn attach_read_only(backing: &Path, size: u64, how: Attach) -> Result<Attached> {
    let data = File::open(backing).with_context(|| format!("opening {}", backing.display()))?;
    let len = byte_size(&data).with_context(|| format!("the size of {}", backing.display()))?;
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
        let mut flags = LO_FLAGS_READ_ONLY;
        if how.autoclear {
            flags |= LO_FLAGS_AUTOCLEAR;
        }
        if how.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        let mut name = [0u8; 64];
        let b = backing.as_os_str().as_encoded_bytes();
        let k = b.len().min(63);
        name[..k].copy_from_slice(&b[..k]);
        let cfg = LoopConfig {
            fd: data.as_raw_fd() as u32,
            block_size: how.block_size,
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

/// The size in bytes of a regular file or a block device.
fn byte_size(f: &File) -> Result<u64> {
    let m = f.metadata()?;
    if !std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) {
        return Ok(m.len());
    }
    let mut n: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut n as *mut u64) };
    if r != 0 {
        bail!("BLKGETSIZE64: {}", std::io::Error::last_os_error());
    }
    Ok(n)
}

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Switch the read-only loop device `dev` to serve `backing` instead of what it serves now
/// (`LOOP_CHANGE_FD`: the kernel checks that both are the same size, freezes the device's
/// queue, so the IO in flight on the old backing completes first, swaps, and lets IO go on; a
/// file system mounted on it stays mounted). The device keeps its flags, O_DIRECT included.
pub fn change_backing(dev: &str, backing: &Path) -> Result<()> {
    let f = File::open(dev).with_context(|| format!("opening {dev}"))?;
    let data = File::open(backing).with_context(|| format!("opening {}", backing.display()))?;
    // SAFETY: LOOP_CHANGE_FD takes a file descriptor, valid for the call; the kernel takes its
    // own reference to the file.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            LOOP_CHANGE_FD,
            data.as_raw_fd() as libc::c_ulong,
        )
    };
    if r != 0 {
        bail!(
            "LOOP_CHANGE_FD {dev} to {}: {}",
            backing.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Switch the loop device `dev` to read its backing file with O_DIRECT or through the page
/// cache (`LOOP_SET_DIRECT_IO`; the kernel drains the IO in flight first).
pub fn set_direct_io(dev: &str, on: bool) -> Result<()> {
    let f = File::open(dev).with_context(|| format!("opening {dev}"))?;
    // SAFETY: LOOP_SET_DIRECT_IO takes an integer argument, no memory.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_DIRECT_IO, libc::c_ulong::from(on)) };
    if r != 0 {
        bail!(
            "LOOP_SET_DIRECT_IO {on} on {dev}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Whether the loop device `dev` reads its backing file with O_DIRECT.
pub fn direct_io(dev: &str) -> Option<bool> {
    let n = dev.trim_start_matches("/dev/");
    let s = std::fs::read_to_string(format!("/sys/block/{n}/loop/dio")).ok()?;
    Some(s.trim() == "1")
}

/// Whether something holds the block device `dev` exclusively (a mounted file system, a dm
/// table, an `O_EXCL` opener): the one open that the kernel refuses then.
pub fn claimed(dev: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
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
    lazyblk_blocksource::fsutil::loop_backing_file(dev)
}

/// Every bound loop device serving `file` (compared by path), as `/dev/loopN`.
pub fn serving(file: &Path) -> Vec<String> {
    lazyblk_blocksource::fsutil::loop_devices_serving(file)
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
