//! The block-source boundary of lazyblk.
//!
//! Frontends (the ublk target, the vhost-user-blk backend) are written against [`BlockSource`]
//! and nothing else: they never see HTTP, manifests, bitmaps or cache layout. A source exposes
//!
//! * its [`Geometry`] (size, logical block size, read-only flag);
//! * [`BlockSource::locate`]: a fast, non-blocking check that a byte range is fully local, and if
//!   so, a file descriptor and offset from which the frontend may read it directly (for ublk this
//!   read is issued on the queue's own io_uring, with no extra copy or thread hop), and whether
//!   the range is all written data (no holes), which may be copied from a memory mapping;
//! * [`BlockSource::fetch`]: make a range local, calling a [`Completion`] from any thread when
//!   done. Completions must be cheap: a frontend typically pushes a token into a queue and wakes
//!   its IO thread (see the ublk target's eventfd notifier);
//! * [`BlockSource::read_at`]: a blocking convenience built on the two above.
//!
//! Errors are one [`BlockError`] type with an errno and virtio-blk status mapping, so every
//! frontend reports failures the same way.

use std::os::fd::RawFd;
use std::sync::mpsc;

#[cfg(feature = "testing")]
pub mod testing;

mod file;
pub mod fsutil;
pub use file::FileSource;

/// Shape of a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes exposed to the frontend (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size in bytes (a power of two, at least 512).
    pub block_size: u32,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// A byte range that can be read directly from a local file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// File descriptor owned by the source; valid as long as the source is alive.
    pub fd: RawFd,
    /// Offset in `fd` of the first requested byte.
    pub offset: u64,
    /// The source vouches that every byte of the range is data it wrote to `fd` and does not
    /// change while it stays located (rewriting the same bytes is no change): no hole, nothing
    /// past the end of the file. A frontend may
    /// then copy it out of a shared memory mapping of `fd`, where a hole would allocate a page
    /// on a read fault (or fail it with `SIGBUS`). `false` is always safe.
    pub written: bool,
}

/// Errors a block source reports to a frontend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request lies (partly) beyond the end of the device.
    #[error("request {offset}+{len} is beyond the device size {size}")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A write or discard on a read-only source.
    #[error("the device is read-only")]
    ReadOnly,
    /// The operation is not supported by this source.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// Data could not be obtained (remote unreachable past the deadline, corrupt remote data...).
    #[error("{0}")]
    Unavailable(String),
    /// The deadline for an IO expired.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// The source is shutting down.
    #[error("the source is shutting down")]
    ShuttingDown,
    /// Local IO failed.
    #[error("local IO error: {0}")]
    Io(#[from] std::io::Error),
}

/// virtio-blk status codes (virtio spec 5.2.6).
pub mod virtio_status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
}

impl BlockError {
    /// The positive errno a block frontend should report (ublk completes with `-errno`).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::ReadOnly => libc::EROFS,
            BlockError::Unsupported(_) => libc::EOPNOTSUPP,
            BlockError::Unavailable(_) => libc::EIO,
            BlockError::TimedOut(_) => libc::EIO,
            BlockError::ShuttingDown => libc::EIO,
            BlockError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// The virtio-blk status byte for this error.
    pub fn virtio_status(&self) -> u8 {
        match self {
            BlockError::Unsupported(_) => virtio_status::UNSUPP,
            _ => virtio_status::IOERR,
        }
    }

    /// A copy of the error suitable for handing to several waiters.
    pub fn duplicate(&self) -> BlockError {
        match self {
            BlockError::OutOfRange { offset, len, size } => BlockError::OutOfRange {
                offset: *offset,
                len: *len,
                size: *size,
            },
            BlockError::ReadOnly => BlockError::ReadOnly,
            BlockError::Unsupported(s) => BlockError::Unsupported(s),
            BlockError::Unavailable(s) => BlockError::Unavailable(s.clone()),
            BlockError::TimedOut(s) => BlockError::TimedOut(s.clone()),
            BlockError::ShuttingDown => BlockError::ShuttingDown,
            BlockError::Io(e) => BlockError::Io(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// Called exactly once, from any thread, when a [`BlockSource::fetch`] finishes.
pub type Completion = Box<dyn FnOnce(Result<(), BlockError>) + Send + 'static>;

/// How many times a read fetches a range that a cache limit evicted again before it was read.
pub const FETCH_TRIES: u32 = 3;

/// A block device's worth of data, possibly not all local yet.
pub trait BlockSource: Send + Sync + 'static {
    /// Size and shape of the device.
    fn geometry(&self) -> Geometry;

    /// If `[offset, offset + len)` is entirely local, where to read it from. Never blocks.
    fn locate(&self, offset: u64, len: u64) -> Option<Located>;

    /// Every file descriptor [`BlockSource::locate`] can return. A frontend may register them
    /// with the kernel (io_uring fixed files) to save a file lookup per IO; they must stay open
    /// as long as the source lives. Empty (the default) means: nothing to register.
    fn files(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Make `[offset, offset + len)` local, then call `done`. `done` may run on the calling
    /// thread (when nothing is missing) or on a fetcher thread.
    fn fetch(&self, offset: u64, len: u64, done: Completion);

    /// Write `data` at `offset` (writable sources only).
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    /// Make previous writes durable.
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    /// Discard (or zero) a range (writable sources only).
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    /// Blocking read: fetch what is missing, then read from the local file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        check_range(self.geometry().size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // A source with a cache limit may evict a range between its fetch and this read:
        // fetch it again, a few times.
        let mut tries = 0;
        let loc = loop {
            if let Some(loc) = self.locate(offset, len) {
                break loc;
            }
            if tries == FETCH_TRIES {
                return Err(BlockError::Unavailable(format!(
                    "range {offset}+{len} not local after {FETCH_TRIES} successful fetches"
                )));
            }
            tries += 1;
            let (tx, rx) = mpsc::sync_channel(1);
            self.fetch(
                offset,
                len,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            rx.recv().map_err(|_| BlockError::ShuttingDown)??;
        };
        pread_exact_or_zero(loc.fd, buf, loc.offset)?;
        Ok(())
    }
}

/// Check that `[offset, offset+len)` lies within a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// `pread` until `buf` is full; bytes past the end of the file read as zeros.
pub fn pread_exact_or_zero(fd: RawFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the whole call,
        // and `fd` is a descriptor the caller guarantees is open.
        let n = unsafe {
            libc::pread(
                fd,
                rest.as_mut_ptr().cast(),
                rest.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            rest.fill(0);
            return Ok(());
        }
        done += n as usize;
    }
    Ok(())
}
