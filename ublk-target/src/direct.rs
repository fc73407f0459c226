//! Reads of a source file on a disk around the page cache (`O_DIRECT`).
//!
//! The kernel already caches the device's blocks above ublk (the file system's pages of the
//! mounted image, the block device's own page cache): reading the cache file buffered would keep
//! a second copy of every block read. So for each source file on a disk (not tmpfs or ramfs,
//! where the page cache is the file) the device opens a second, read-only descriptor with
//! `O_DIRECT` once at start, probes it with one aligned read, and uses it for every present
//! read whose offset, length and buffer meet the file's direct-IO alignment; any other read
//! (and any the file system refuses with `EINVAL`) goes through the buffered descriptor.
//!
//! Writes stay buffered (the store `pwrite`s fetched chunks). A direct read of a range that is
//! still dirty in the page cache sees the written data: Linux writes dirty pages of the range
//! back before a direct read (`kiocb_write_and_wait`); the tests check that.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// A read-only `O_DIRECT` descriptor of a source file and its alignment rules.
#[derive(Debug)]
pub(crate) struct Direct {
    pub(crate) file: File,
    /// Required alignment of file offsets and lengths.
    pub(crate) offset_align: u32,
    /// Required alignment of buffer addresses.
    pub(crate) mem_align: u32,
}

/// Alignment assumed when `statx` does not report `STATX_DIOALIGN` (kernels before 6.1, file
/// systems that do not fill it): a page, which ublk's 4 KiB-block IOs and page-aligned buffers
/// meet, and which covers any logical block size up to it.
const FALLBACK_ALIGN: u32 = 4096;

impl Direct {
    /// Open `fd`'s file again with `O_DIRECT` and check it reads; `None` (with one log line)
    /// when the file system does not allow it, so that reads stay buffered.
    pub(crate) fn open(fd: RawFd) -> Option<Direct> {
        let (offset_align, mem_align) = match dio_align(fd) {
            Some((0, _)) => {
                tracing::info!(
                    "fd {fd}: the file system does not support O_DIRECT; the cache file is read through the page cache"
                );
                return None;
            }
            Some((o, m)) => (o.max(1), m.max(1)),
            None => (FALLBACK_ALIGN, FALLBACK_ALIGN),
        };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{fd}"))
        {
            Ok(f) => f,
            Err(e) => {
                tracing::info!(
                    "fd {fd}: opening it with O_DIRECT: {e}; the cache file is read through the page cache"
                );
                return None;
            }
        };
        let d = Direct {
            file,
            offset_align,
            mem_align,
        };
        // One aligned read at 0 (past the end of an empty file is a 0-byte success).
        let n = offset_align.max(mem_align).max(512) as usize;
        let buf = AlignedBuf::new(n, mem_align.max(512) as usize);
        // SAFETY: `buf` owns `n` writable bytes for the duration of the call.
        let r = unsafe { libc::pread(d.file.as_raw_fd(), buf.ptr.cast(), n, 0) };
        if r < 0 {
            tracing::info!(
                "fd {fd}: an O_DIRECT read failed ({}); the cache file is read through the page cache",
                std::io::Error::last_os_error()
            );
            return None;
        }
        tracing::debug!("fd {fd}: present reads use O_DIRECT (alignment: offset {offset_align}, memory {mem_align})");
        Some(d)
    }

    /// Whether a read of `len` bytes at `offset` into `ptr` can go to the direct descriptor.
    pub(crate) fn fits(&self, offset: u64, len: usize, ptr: *const u8) -> bool {
        fits(self.offset_align, self.mem_align, offset, len, ptr as usize)
    }
}

/// The alignment rule of direct IO: offset and length multiples of `offset_align`, the buffer
/// address a multiple of `mem_align`, and something to read.
fn fits(offset_align: u32, mem_align: u32, offset: u64, len: usize, addr: usize) -> bool {
    let (oa, ma) = (u64::from(offset_align.max(1)), mem_align.max(1) as usize);
    len > 0
        && offset.is_multiple_of(oa)
        && (len as u64).is_multiple_of(oa)
        && addr.is_multiple_of(ma)
}

/// `(dio_offset_align, dio_mem_align)` of `fd` from `statx(STATX_DIOALIGN)`, `None` when the
/// kernel or file system does not report them. An offset alignment of 0 means the file does
/// not support direct IO.
fn dio_align(fd: RawFd) -> Option<(u32, u32)> {
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx of the descriptor itself (empty path with AT_EMPTY_PATH) into `st`, which is
    // valid for one write; read only when the call succeeded.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            st.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: statx returned 0, so it filled `st` (zeroed before: every field is initialised).
    let st = unsafe { st.assume_init() };
    (st.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some((st.stx_dio_offset_align, st.stx_dio_mem_align))
}

/// A zeroed heap buffer with a given alignment (for the probe read).
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, align.next_power_of_two())
            .expect("a small power-of-two alignment");
        // SAFETY: `layout` has a non-zero size (at least 512).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazyblk_blocksource::fsutil::{self, PageCachePolicy};
    use std::os::unix::fs::FileExt;

    #[test]
    fn alignment_rule() {
        let a = 4096usize;
        assert!(fits(4096, 4096, 0, 4096, a));
        assert!(fits(4096, 4096, 8192, 512 << 10, a * 3));
        assert!(!fits(4096, 4096, 512, 4096, a), "unaligned offset");
        assert!(!fits(4096, 4096, 4096, 4096 + 512, a), "unaligned length");
        assert!(!fits(4096, 4096, 4096, 4096, a + 512), "unaligned buffer");
        assert!(!fits(4096, 4096, 4096, 0, a), "nothing to read");
        // A 512-byte logical block size and a 4-byte memory alignment (what ext4 on a
        // virtio disk reports) let sector-aligned reads into any 4-byte aligned buffer go.
        assert!(fits(512, 4, 512, 1024, a + 4));
        assert!(!fits(512, 4, 512, 1024, a + 2));
        // Zero alignments (never reported for a usable file) do not divide by zero.
        assert!(fits(0, 0, 3, 5, 7));
    }

    fn on_disk() -> Option<tempfile::NamedTempFile> {
        let f = tempfile::NamedTempFile::new().unwrap();
        if fsutil::page_cache_policy(f.as_file().as_raw_fd()) == PageCachePolicy::InMemory {
            eprintln!("the temporary directory is in memory: the O_DIRECT tests need a disk");
            return None;
        }
        Some(f)
    }

    /// A direct read right after a buffered write, not yet synced, sees the new bytes; and
    /// direct reads leave nothing in the page cache.
    #[test]
    fn direct_read_after_buffered_write_sees_the_data_and_caches_nothing() {
        let Some(f) = on_disk() else { return };
        let f = f.as_file();
        f.set_len(1 << 20).unwrap();
        let d = Direct::open(f.as_raw_fd()).expect("O_DIRECT on the temporary directory");
        let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i % 253) as u8).collect();
        f.write_all_at(&data, 128 << 10).unwrap(); // dirty in the page cache
        let buf = AlignedBuf::new(256 << 10, 4096);
        // SAFETY: `buf` owns 256 KiB for the call.
        let got = unsafe { std::slice::from_raw_parts_mut(buf.ptr, 256 << 10) };
        assert!(d.fits(128 << 10, got.len(), got.as_ptr()));
        d.file.read_exact_at(got, 128 << 10).unwrap();
        assert_eq!(
            &got[..],
            &data[..],
            "the direct read sees the buffered write"
        );
        // Written back and dropped, a direct read brings nothing back into the page cache.
        f.sync_data().unwrap();
        fsutil::drop_cached(f.as_raw_fd(), 0, 0).unwrap();
        assert_eq!(fsutil::resident_bytes(f, 0, 1 << 20).unwrap(), 0);
        got.fill(0);
        d.file.read_exact_at(got, 128 << 10).unwrap();
        assert_eq!(&got[..], &data[..]);
        assert_eq!(
            fsutil::resident_bytes(f, 0, 1 << 20).unwrap(),
            0,
            "a direct read filled the page cache"
        );
        // The buffered descriptor does fill it (what the direct one avoids).
        f.read_exact_at(got, 128 << 10).unwrap();
        assert!(fsutil::resident_bytes(f, 0, 1 << 20).unwrap() >= 256 << 10);
        // An unaligned buffer does not fit (the kernel may refuse such a read with EINVAL).
        assert!(d.mem_align > 1 && !d.fits(4096, 4096, got[1..].as_ptr()));
        drop(buf);
    }

    #[test]
    fn a_bad_descriptor_has_no_direct_reads() {
        assert!(Direct::open(-1).is_none());
    }
}
