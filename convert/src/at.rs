//! Directory-relative file-system calls (`openat`, `mkdirat`, `unlinkat`, `linkat`, ...): the
//! only code in the crate that touches the work tree. Every call names one plain component
//! (no `/`, not `.` or `..`: [`Name`]) relative to an open directory, and none follows a
//! symlink in that component: directories are opened with `O_NOFOLLOW | O_DIRECTORY`, files are
//! created with `O_CREAT | O_EXCL | O_NOFOLLOW`, metadata is set with `AT_SYMLINK_NOFOLLOW` or on
//! an entry known not to be a symlink, xattrs with `lsetxattr` on `/proc/self/fd/<dir>/<name>`
//! (the directory by its descriptor, the last component not followed). So no path can leave the
//! directory a walk started from.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One path component that is safe to use relative to a directory: not empty, not `.` or
/// `..`, no `/` and no NUL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name(CString);

impl Name {
    /// `s` as a component, or `None` when it is not a plain one.
    pub fn new(s: &[u8]) -> Option<Name> {
        if s.is_empty() || s == b"." || s == b".." || s.contains(&b'/') {
            return None;
        }
        CString::new(s).ok().map(Name)
    }

    fn c(&self) -> &CStr {
        &self.0
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// What an entry is (`fstatat` without following).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (file, device, fifo, socket).
    Other,
}

/// The result of a libc call returning -1 on error.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Take ownership of a descriptor `open`/`openat` just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor that a successful open/openat just returned, so it
    // is open and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An open directory of the work tree.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Open the directory at `path` (the work tree's root; the caller's own path, trusted).
    pub fn open_root(path: &Path) -> io::Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call; open returns a
        // new descriptor or -1.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(Dir { fd: owned(fd) })
    }

    /// Another descriptor of the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The sub-directory `name`, never through a symlink (`ELOOP`/`ENOTDIR` when `name` is one).
    pub fn open_dir(&self, name: &Name) -> io::Result<Dir> {
        // SAFETY: `self.fd` is an open directory and `name` a valid C string; openat returns a
        // new descriptor or -1.
        let fd = cvt(unsafe {
            libc::openat(
                self.raw(),
                name.c().as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        Ok(Dir { fd: owned(fd) })
    }

    /// What `name` is, without following it; `None` when it does not exist.
    pub fn kind(&self, name: &Name) -> io::Result<Option<Kind>> {
        Ok(self.stat(name)?.map(|st| match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }))
    }

    /// `fstatat(name, AT_SYMLINK_NOFOLLOW)`; `None` when it does not exist.
    pub fn stat(&self, name: &Name) -> io::Result<Option<libc::stat>> {
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable `stat`; the descriptor and string are valid.
        let r = unsafe {
            libc::fstatat(
                self.raw(),
                name.c().as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        match cvt(r) {
            Ok(_) => Ok(Some(st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `mkdirat(name, mode)`.
    pub fn mkdir(&self, name: &Name, mode: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::mkdirat(self.raw(), name.c().as_ptr(), mode as libc::mode_t) })?;
        Ok(())
    }

    /// Create the regular file `name` (it must not exist: `O_EXCL`, and `O_NOFOLLOW`), mode 0600
    /// until the caller sets the real one.
    pub fn create_file(&self, name: &Name) -> io::Result<File> {
        // SAFETY: valid descriptor and C string; the mode argument is passed as the variadic
        // `mode_t` open expects with O_CREAT.
        let fd = cvt(unsafe {
            libc::openat(
                self.raw(),
                name.c().as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        })?;
        Ok(File::from(owned(fd)))
    }

    /// `symlinkat(target, self, name)`: the target is stored, never resolved.
    pub fn symlink(&self, target: &[u8], name: &Name) -> io::Result<()> {
        let t = CString::new(target).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: valid C strings and descriptor.
        cvt(unsafe { libc::symlinkat(t.as_ptr(), self.raw(), name.c().as_ptr()) })?;
        Ok(())
    }

    /// `linkat(from_dir, from, self, name, 0)`: a hardlink to `from` itself (a symlink there is
    /// linked, not followed: no `AT_SYMLINK_FOLLOW`).
    pub fn link_from(&self, from_dir: &Dir, from: &Name, name: &Name) -> io::Result<()> {
        // SAFETY: valid descriptors and C strings; flags 0.
        cvt(unsafe {
            libc::linkat(
                from_dir.raw(),
                from.c().as_ptr(),
                self.raw(),
                name.c().as_ptr(),
                0,
            )
        })?;
        Ok(())
    }

    /// `mknodat(name, mode, dev)` (`mode` includes the file type: `S_IFCHR`, `S_IFBLK`, `S_IFIFO`).
    pub fn mknod(&self, name: &Name, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let dev = libc::makedev(major, minor);
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::mknodat(self.raw(), name.c().as_ptr(), mode as libc::mode_t, dev) })?;
        Ok(())
    }

    /// Remove the non-directory `name`.
    pub fn unlink(&self, name: &Name) -> io::Result<()> {
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::unlinkat(self.raw(), name.c().as_ptr(), 0) })?;
        Ok(())
    }

    /// Remove the empty directory `name`.
    pub fn rmdir(&self, name: &Name) -> io::Result<()> {
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::unlinkat(self.raw(), name.c().as_ptr(), libc::AT_REMOVEDIR) })?;
        Ok(())
    }

    /// Remove `name` and, when it is a directory, everything under it (each level opened
    /// without following symlinks: a symlink is removed, never entered). Absent: nothing to do.
    pub fn remove_all(&self, name: &Name) -> io::Result<()> {
        match self.kind(name)? {
            None => Ok(()),
            Some(Kind::Dir) => {
                let d = self.open_dir(name)?;
                for child in d.names()? {
                    d.remove_all(&child)?;
                }
                drop(d);
                self.rmdir(name)
            }
            Some(_) => self.unlink(name),
        }
    }

    /// The names in this directory (`.` and `..` left out).
    pub fn names(&self) -> io::Result<Vec<Name>> {
        // Listing through /proc/self/fd reads the directory this descriptor holds: no path
        // from the tree is resolved.
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.proc_path())? {
            if let Some(n) = Name::new(e?.file_name().as_bytes()) {
                out.push(n);
            }
        }
        Ok(out)
    }

    fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.raw())
    }

    /// `fchownat(name, uid, gid, AT_SYMLINK_NOFOLLOW)`; `None` is this directory itself.
    pub fn lchown(&self, name: Option<&Name>, uid: u32, gid: u32) -> io::Result<()> {
        let (p, flags) = self.target(name);
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::fchownat(self.raw(), p.as_ptr(), uid, gid, flags) })?;
        Ok(())
    }

    /// `fchmodat(name, mode)`: only for entries the caller knows are not symlinks (it just
    /// created them as files, directories or nodes). `None` is this directory itself.
    pub fn chmod_not_symlink(&self, name: Option<&Name>, mode: u32) -> io::Result<()> {
        let (p, _) = self.target(name);
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::fchmodat(self.raw(), p.as_ptr(), mode as libc::mode_t, 0) })?;
        Ok(())
    }

    /// Set atime and mtime of `name` (`utimensat` with `AT_SYMLINK_NOFOLLOW`); `None` is this
    /// directory itself. Times are (seconds, nanoseconds).
    pub fn set_times(
        &self,
        name: Option<&Name>,
        atime: (i64, u32),
        mtime: (i64, u32),
    ) -> io::Result<()> {
        let (p, flags) = self.target(name);
        let ts = |(s, ns): (i64, u32)| libc::timespec {
            tv_sec: s as libc::time_t,
            tv_nsec: ns.min(999_999_999) as _,
        };
        let times = [ts(atime), ts(mtime)];
        // SAFETY: `times` is an array of two valid timespecs; valid descriptor and C string.
        cvt(unsafe { libc::utimensat(self.raw(), p.as_ptr(), times.as_ptr(), flags) })?;
        Ok(())
    }

    /// Set the xattr `key` of `name` (`None`: this directory) to `value`, without following a
    /// symlink at `name`.
    pub fn set_xattr(&self, name: Option<&Name>, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut path = self.proc_path().into_bytes();
        if let Some(n) = name {
            path.push(b'/');
            path.extend_from_slice(n.as_bytes());
        }
        let p = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let k = CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: valid C strings; `value` is a readable buffer of `value.len()` bytes.
        cvt(unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                k.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })?;
        Ok(())
    }

    /// (path, flags) for a `*at` call on `name`, or on this directory itself.
    fn target<'a>(&self, name: Option<&'a Name>) -> (&'a CStr, libc::c_int) {
        match name {
            Some(n) => (n.c(), libc::AT_SYMLINK_NOFOLLOW),
            None => (c".", libc::AT_SYMLINK_NOFOLLOW),
        }
    }
}

/// `s` as an `OsStr` (for messages).
pub fn os(s: &[u8]) -> &OsStr {
    OsStr::from_bytes(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_everything_but_plain_components() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            assert!(Name::new(bad).is_none(), "{bad:?}");
        }
        assert!(Name::new(b"...").is_some());
        assert!(Name::new(b".wh.x").is_some());
    }

    #[test]
    fn open_dir_does_not_follow_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", t.path().join("link")).unwrap();
        let d = Dir::open_root(t.path()).unwrap();
        assert!(d.open_dir(&Name::new(b"real").unwrap()).is_ok());
        assert!(d.open_dir(&Name::new(b"link").unwrap()).is_err());
        assert_eq!(
            d.kind(&Name::new(b"link").unwrap()).unwrap(),
            Some(Kind::Symlink)
        );
    }

    #[test]
    fn remove_all_removes_a_symlink_not_its_target() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("d")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("d/out")).unwrap();
        let d = Dir::open_root(&tree).unwrap();
        d.remove_all(&Name::new(b"d").unwrap()).unwrap();
        assert!(!tree.join("d").exists());
        assert!(outside.join("keep").exists());
    }
}
