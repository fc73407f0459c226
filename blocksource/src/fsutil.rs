//! Local-file helpers shared by the stores behind block sources (the chunk cache, the
//! copy-on-write layer).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

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
