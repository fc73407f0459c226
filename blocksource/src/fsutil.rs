//! Local-file helpers shared by the stores behind block sources (the chunk cache, the
//! copy-on-write layer), and the one way lazyblk binds a unix socket that only root (or one
//! group) may reach ([`bind_private_socket`]: the daemons' control and metrics sockets, the
//! snapshotter's socket).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Open (creating it) `path` and take an exclusive, non-blocking `flock` on it. `Ok(None)` when
/// another open file description holds the lock (another process uses the directory). The lock
/// lasts as long as the returned file is open, and dies with the process.
pub fn lock_exclusive(path: &Path) -> std::io::Result<Option<File>> {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Deallocate `[off, off + len)` of `file` (reads return zeros), keeping the file size.
pub fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file descriptor we own; no memory is involved.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Write `bytes` to `path` through a temporary file next to it (`<path>.tmp`), fsync it, rename
/// it over `path` and fsync the directory: readers see the old file or the new one, never a
/// part of either.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Bind a unix socket at `path` reachable only by its owner (mode 0600), or, with `group`, by
/// that group too (0660, group-owned by `group`). The socket is bound under a temporary name in
/// the same directory, chmod-ed (and chown-ed) there, then renamed over `path`: there is no
/// moment at which `path` is a socket with looser permissions, and a stale socket (or any file)
/// at `path` is replaced atomically. Callers that must not replace a live server check first.
pub fn bind_private_socket(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("socket path {} has no file name", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let done = (|| {
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = group {
            std::os::unix::fs::lchown(&tmp, None, Some(gid))?;
        }
        std::fs::rename(&tmp, path)
    })();
    match done {
        Ok(()) => Ok(l),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The id of group `name_or_gid`: a number is taken as it is, a name is looked up (through
/// NSS, as `chgrp` does). An unknown name is an error naming it.
pub fn group_id(name_or_gid: &str) -> std::io::Result<u32> {
    if let Ok(gid) = name_or_gid.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no group named {name_or_gid:?}"),
        )
    };
    if name_or_gid.is_empty() || name_or_gid.as_bytes().contains(&0) {
        return Err(unknown());
    }
    let cname = std::ffi::CString::new(name_or_gid).map_err(|_| unknown())?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: all-zero bytes are a valid `group` (null pointers, zero gid); getgrnam_r only
        // writes into it and into `buf`, whose length we pass.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `cname` is NUL-terminated, `grp` and
        // `out` are live locals, `buf` is `buf.len()` writable bytes.
        let r = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        if out.is_null() {
            return Err(unknown());
        }
        return Ok(grp.gr_gid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};

    #[test]
    fn private_socket_is_0600_and_replaces_a_stale_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.sock");
        std::fs::write(&p, b"stale").unwrap();
        let l = bind_private_socket(&p, None).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o7777, 0o600);
        // No temporary name is left behind, and the socket answers.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        assert!(l.accept().is_ok());
    }

    #[test]
    fn private_socket_with_a_group_is_0660_and_group_owned() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.sock");
        // Our own group: chown to it works unprivileged too.
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let _l = bind_private_socket(&p, Some(gid)).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o660);
        assert_eq!(m.gid(), gid);
    }

    #[test]
    fn group_ids_by_number_and_name() {
        assert_eq!(group_id("1234").unwrap(), 1234);
        assert_eq!(group_id("root").unwrap(), 0);
        let e = group_id("no-such-group-lazyblk").unwrap_err();
        assert!(e.to_string().contains("no-such-group-lazyblk"), "{e}");
    }

    #[test]
    fn lock_is_exclusive_and_released_on_close() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let a = lock_exclusive(&p).unwrap().expect("first lock");
        assert!(
            lock_exclusive(&p).unwrap().is_none(),
            "second lock must fail"
        );
        drop(a);
        assert!(lock_exclusive(&p).unwrap().is_some());
    }

    #[test]
    fn punched_range_reads_zero() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 16384], 0).unwrap();
        punch_hole(&f, 4096, 8192).unwrap();
        let mut b = [1u8; 16384];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 7));
        assert!(b[4096..12288].iter().all(|&x| x == 0));
        assert!(b[12288..].iter().all(|&x| x == 7));
        assert_eq!(f.metadata().unwrap().len(), 16384);
    }
}
