//! Local-file helpers shared by the stores behind block sources (the chunk cache, the
//! copy-on-write layer) and the frontends that read their files: locks, holes, atomic small
//! files, how a file stands to the page cache ([`page_cache_policy`], [`drop_cached`]), and the
//! one way lazyblk binds a unix socket that only root (or one group) may reach
//! ([`bind_private_socket`]: the daemons' control and metrics sockets, the snapshotter's socket).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Environment variable that brings back the double caching of a cache file on a disk (read
/// through the page cache and never dropped from it), for `bench/pagecache.sh` only: it
/// measures that behaviour side by side with the default in one guest boot. Set to `1`.
pub const DOUBLE_CACHE_ENV: &str = "LAZYBLK_BENCH_DOUBLE_CACHE";

/// How a file behind a block source stands to the page cache, decided once per file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageCachePolicy {
    /// On tmpfs or ramfs the page cache *is* the file: read it buffered, never drop anything
    /// (`POSIX_FADV_DONTNEED` ignores such files anyway, and there is no second copy).
    InMemory,
    /// On a disk: the kernel already caches the device's blocks above the frontend, so the
    /// file's own pages would be a second copy. Frontends read it around the page cache
    /// (`O_DIRECT`) and the store drops the ranges it wrote (once durable) or read.
    Bypass,
    /// On a disk, but read through the page cache and kept there (double caching): only when
    /// [`DOUBLE_CACHE_ENV`] is `1`, for the benchmark.
    Buffered,
}

impl PageCachePolicy {
    /// Whether ranges written or read by the store should be dropped from the page cache.
    pub fn drops(self) -> bool {
        self == PageCachePolicy::Bypass
    }
}

/// The page-cache policy for `fd` (see [`PageCachePolicy`]).
pub fn page_cache_policy(fd: RawFd) -> PageCachePolicy {
    if in_memory(fd) {
        PageCachePolicy::InMemory
    } else if std::env::var(DOUBLE_CACHE_ENV).is_ok_and(|v| v == "1") {
        PageCachePolicy::Buffered
    } else {
        PageCachePolicy::Bypass
    }
}

/// Whether `fd` is a file in memory (tmpfs, ramfs): its page cache is the file itself.
pub fn in_memory(fd: RawFd) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is valid for one `statfs` write; it is read only when the call succeeded
    // (a bad descriptor is an error return, not undefined behaviour).
    let ok = unsafe { libc::fstatfs(fd, st.as_mut_ptr()) } == 0;
    if !ok {
        return false;
    }
    // SAFETY: fstatfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // ramfs has no constant in libc. (`f_type`'s integer type differs between architectures.)
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    #[allow(clippy::unnecessary_cast)]
    let (kind, tmpfs) = (st.f_type as i64, libc::TMPFS_MAGIC as i64);
    kind == tmpfs || kind == RAMFS_MAGIC
}

/// Drop the clean page-cache pages of `[off, off + len)` of `fd` (`len` 0: to the end of the
/// file) with `POSIX_FADV_DONTNEED`. Dirty pages stay (write them back first: `fdatasync`);
/// so does a page another process has mapped. Only for files whose policy
/// [`drops`](PageCachePolicy::drops).
pub fn drop_cached(fd: RawFd, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: posix_fadvise on a descriptor; no memory is involved.
    match unsafe { libc::posix_fadvise(fd, o, l, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Sort byte ranges `(offset, len)` and merge the ones that touch or overlap, so a batch of
/// chunks becomes one [`drop_cached`] call per run of adjacent chunks. Empty ranges go.
pub fn coalesce(ranges: &mut Vec<(u64, u64)>) {
    ranges.retain(|&(_, l)| l > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(o, l) in ranges.iter() {
        match out.last_mut() {
            Some((po, pl)) if o <= *po + *pl => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    *ranges = out;
}

/// Bytes of `[off, off + len)` of `file` that are in the page cache now (`mincore` over a
/// mapping of the range, counted in pages). For tests and diagnostics.
pub fn resident_bytes(file: &File, off: u64, len: u64) -> std::io::Result<u64> {
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let start = off / page * page;
    let end = off + len;
    if end <= start {
        return Ok(0);
    }
    let map_len = (end - start) as usize;
    // SAFETY: a new read-only shared mapping at an address the kernel chooses; it aliases no
    // Rust object, is never dereferenced (only passed to mincore) and is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut vec = vec![0u8; map_len.div_ceil(page as usize)];
    // SAFETY: `p` is a mapping of `map_len` bytes made above and `vec` has one byte per page
    // of it, as mincore writes.
    let r = unsafe { libc::mincore(p, map_len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: exactly the mapping made above, unmapped once.
    unsafe { libc::munmap(p, map_len) };
    if r != 0 {
        return Err(err);
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page)
}

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

/// The file the loop device `dev` (`/dev/loopN` or `loopN`) serves, if it is bound (from
/// `/sys/block/loopN/loop/backing_file`).
pub fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    let n = dev.trim_start_matches("/dev/");
    let s = std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Every bound loop device serving `file` (compared by path), as `/dev/loopN`, sorted. A
/// cache whose data file a loop device serves (handed over to the kernel) must never be
/// punched or removed.
pub fn loop_devices_serving(file: &Path) -> Vec<String> {
    let want = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("loop")
                && loop_backing_file(&n).is_some_and(|b| b == want || b == file)
            {
                out.push(format!("/dev/{n}"));
            }
        }
    }
    out.sort();
    out
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
    fn coalesce_merges_touching_and_overlapping_ranges() {
        let mut r = vec![
            (8192, 4096),
            (0, 4096),
            (4096, 4096),
            (20000, 0),
            (16384, 100),
        ];
        coalesce(&mut r);
        assert_eq!(r, vec![(0, 12288), (16384, 100)]);
        let mut r = vec![(100, 50), (0, 1000), (2000, 10), (1000, 5)];
        coalesce(&mut r);
        assert_eq!(r, vec![(0, 1005), (2000, 10)]);
        let mut r = Vec::new();
        coalesce(&mut r);
        assert!(r.is_empty());
    }

    /// `drop_cached` really empties the page cache of a range written and synced on a disk
    /// file system, and leaves the rest; `resident_bytes` sees both. (Needs the temporary
    /// directory on a disk file system: on tmpfs the advice is ignored, and the test says so.)
    #[test]
    fn dropped_range_leaves_the_page_cache() {
        let f = tempfile::tempfile().unwrap();
        // Written 4 KiB at a time: a page-cache folio is never larger than the write that made
        // it, and DONTNEED drops only folios wholly inside the range (so the store drops whole
        // chunks, which it wrote whole).
        for i in 0..16 {
            f.write_all_at(&[3u8; 4096], i * 4096).unwrap();
        }
        f.sync_data().unwrap();
        assert_eq!(resident_bytes(&f, 0, 64 << 10).unwrap(), 64 << 10);
        if page_cache_policy(f.as_raw_fd()) == PageCachePolicy::InMemory {
            eprintln!("the temporary directory is in memory: drop_cached is not checked");
            return;
        }
        drop_cached(f.as_raw_fd(), 16 << 10, 32 << 10).unwrap();
        assert_eq!(resident_bytes(&f, 16 << 10, 32 << 10).unwrap(), 0);
        assert_eq!(resident_bytes(&f, 0, 16 << 10).unwrap(), 16 << 10);
        assert_eq!(resident_bytes(&f, 48 << 10, 16 << 10).unwrap(), 16 << 10);
        // The data is still there, read back from the disk.
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, 20 << 10).unwrap();
        assert!(b.iter().all(|&x| x == 3));
    }

    /// On tmpfs the page cache is the file: `drop_cached` must not (and does not) lose data.
    #[test]
    fn tmpfs_is_in_memory_and_keeps_its_data() {
        let Ok(d) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm here");
            return;
        };
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("f"))
            .unwrap();
        assert_eq!(page_cache_policy(f.as_raw_fd()), PageCachePolicy::InMemory);
        f.write_all_at(&[5u8; 8192], 0).unwrap();
        drop_cached(f.as_raw_fd(), 0, 0).unwrap();
        let mut b = [0u8; 8192];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 5));
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
