//! Cross-thread completion of parked IOs, woken through an eventfd polled on the queue's ring.

use libublk::io::UblkQueue;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;
use std::cell::RefCell;
use std::future::poll_fn;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::task::{Poll, Waker};

type Outcome = Result<(), i32>;

/// Per-queue mailbox: fetcher threads `post`, the queue thread `run`s the drain loop and the
/// parked tags `wait`.
pub struct Notifier {
    efd: OwnedFd,
    posted: Mutex<Vec<(u16, Outcome)>>,
    // Only touched on the queue thread (see the SAFETY argument on `Sync`).
    slots: Vec<RefCell<(Option<Outcome>, Option<Waker>)>>,
}

// SAFETY: `efd` and `posted` are thread-safe. `slots` is only accessed from `wait` and `run`,
// which are only called from the queue thread that owns the executor; other threads only call
// `post`, which touches `posted` and the eventfd.
unsafe impl Sync for Notifier {}
// SAFETY: as above; the RefCells are never accessed concurrently.
unsafe impl Send for Notifier {}

impl Notifier {
    /// A notifier for `depth` tags.
    pub fn new(depth: u16) -> std::io::Result<Notifier> {
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Notifier {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            posted: Mutex::new(Vec::with_capacity(depth as usize)),
            slots: (0..depth).map(|_| RefCell::new((None, None))).collect(),
        })
    }

    /// Any thread: report the outcome for `tag` and wake the queue thread.
    pub fn post(&self, tag: u16, r: Outcome) {
        self.posted.lock().expect("lock").push((tag, r));
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Queue thread: wait for the outcome posted for `tag`.
    pub async fn wait(&self, tag: u16) -> Outcome {
        poll_fn(|cx| {
            let mut slot = self.slots[tag as usize].borrow_mut();
            match slot.0.take() {
                Some(r) => Poll::Ready(r),
                None => {
                    slot.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Queue thread: keep a poll on the eventfd armed in the ring; on each wake, drain the posts.
    pub async fn run(&self, q: &UblkQueue<'_>) {
        loop {
            let sqe = io_uring::opcode::PollAdd::new(
                io_uring::types::Fd(self.efd.as_raw_fd()),
                libc::POLLIN as u32,
            )
            .build();
            let r = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await;
            if r.is_err() || q.is_stopping() {
                return;
            }
            let mut counter = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd we own.
            let _ = unsafe {
                libc::read(
                    self.efd.as_raw_fd(),
                    (&mut counter as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            let posted = std::mem::take(&mut *self.posted.lock().expect("lock"));
            for (tag, r) in posted {
                let waker = {
                    let mut slot = self.slots[tag as usize].borrow_mut();
                    slot.0 = Some(r);
                    slot.1.take()
                };
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
    }
}
