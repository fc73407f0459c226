//! Read-only mappings of in-memory source files, for copying small reads out on the queue
//! thread.

/// A read-only shared mapping of a whole source file (as long as it was when the device
/// started), unmapped on drop.
///
/// Small reads of written ranges of an in-memory file are a `memcpy` out of it on the queue
/// thread, where a `pread` costs a system call per read: in the 2-vCPU benchmark guest that was
/// a third more 4k random reads per second. Only ranges the source vouches for are copied
/// ([`Located::written`](lazyblk_blocksource::Located::written)): a read fault on a hole of a
/// tmpfs file would allocate a page (or raise `SIGBUS` when the file system is full), and past
/// the end of the file raise `SIGBUS`; written data of a file that is not truncated has a page
/// to map. Files on disks are never mapped: a disk error there is `SIGBUS`, not `EIO`.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is read-only memory owned by this value; any thread may copy out of it,
// and it is unmapped only when the value is dropped.
unsafe impl Send for Mapping {}
// SAFETY: as above: shared access only ever reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map all of `fd` read-only; `None` when it is empty or cannot be mapped (reads then use
    /// `pread`).
    pub(crate) fn of(fd: i32) -> Option<Mapping> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `fd` is open for as long as the source lives, and `st` is valid for one
        // `stat` write; it is read only when the call succeeded.
        if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstat returned 0, so it filled `st`.
        let len = u64::try_from(unsafe { st.assume_init() }.st_size).ok()?;
        if len == 0 || usize::try_from(len).is_err() {
            return None;
        }
        // SAFETY: a new read-only shared mapping of `len` bytes of `fd` at an address the
        // kernel chooses; it aliases no Rust object, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::debug!(
                "mapping fd {fd}: {}; its reads use pread",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Mapping {
            ptr: std::ptr::NonNull::new(p.cast())?,
            len,
        })
    }

    /// Copy `buf.len()` bytes at `offset` into `buf`; `false` (nothing copied) when the range
    /// is not inside the mapping. The caller must know the range is written data of the file
    /// that does not change during the copy ([`Located::written`]).
    ///
    /// [`Located::written`]: lazyblk_blocksource::Located::written
    pub(crate) fn copy_out(&self, offset: u64, buf: &mut [u8]) -> bool {
        let inside = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.len);
        if !inside {
            return false;
        }
        // SAFETY: `offset..offset + buf.len()` lies inside the mapping (checked above), which
        // stays mapped while `self` lives; the source vouched that those bytes are written
        // data, so each page exists and no fault allocates or fails, and that nothing writes
        // them while they are located. `buf` is a distinct, writable Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `Mapping::of`, unmapped once here;
        // no copy can be running, since copies borrow `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Mapping;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn copies_inside_the_mapping_and_refuses_outside() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let m = Mapping::of(f.as_raw_fd()).expect("mapped");
        let mut buf = vec![0u8; 4096];
        assert!(m.copy_out(4096 + 100, &mut buf));
        assert_eq!(&buf[..], &data[4196..4196 + 4096]);
        assert!(m.copy_out(2 * 4096, &mut buf));
        assert_eq!(&buf[..], &data[2 * 4096..]);
        // Past the end (the mapping's length is the file's at mapping time), or overflowing.
        buf.fill(7);
        assert!(!m.copy_out(2 * 4096 + 1, &mut buf));
        assert!(!m.copy_out(u64::MAX - 10, &mut buf));
        assert!(buf.iter().all(|&b| b == 7), "nothing copied");
        // A file that grew later: its new bytes are not mapped, so not copied.
        f.write_all(&[1u8; 4096]).unwrap();
        assert!(!m.copy_out(3 * 4096, &mut buf));
    }

    #[test]
    fn an_empty_or_unmappable_file_has_no_mapping() {
        let f = tempfile::tempfile().unwrap();
        assert!(Mapping::of(f.as_raw_fd()).is_none());
        assert!(Mapping::of(-1).is_none());
    }
}
