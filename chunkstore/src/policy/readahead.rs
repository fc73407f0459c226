//! Readahead: a few sequential streams whose windows double while the reader uses them and
//! halve when it skips, each with a trigger chunk that starts the next window early.

use crate::prelude::*;

/// One sequential reader seen by the readahead logic.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stream {
    /// Last chunk scheduled for this stream.
    pub(crate) end: u64,
    /// Current window, in chunks (0: unused slot).
    pub(crate) window: u64,
    /// Chunk whose first read schedules the next window (asynchronous readahead).
    pub(crate) trigger: u64,
}

/// Readahead state: a few concurrent sequential streams, replaced round robin.
#[derive(Default)]
pub(crate) struct Readahead {
    pub(crate) streams: [Stream; 4],
    pub(crate) victim: usize,
}

impl Inner {
    /// The first and the largest readahead window in chunks (the options' bytes rounded up to
    /// whole chunks; the first is 0 when readahead is off).
    pub(crate) fn readahead_windows(&self) -> (u64, u64) {
        let chunk = u64::from(self.manifest.chunk_size);
        let base = self.opts.readahead_bytes.div_ceil(chunk);
        (
            base,
            self.opts.readahead_max_bytes.div_ceil(chunk).max(base),
        )
    }

    /// Chunks to read ahead of a miss on `first..=last` (reserved in flight).
    ///
    /// A miss that continues a stream (it lands in or right after the stream's last window)
    /// doubles the stream's window up to `readahead_max_bytes`; any other miss starts a new
    /// stream with `readahead_bytes`. Each window carries a trigger chunk: the first read of it
    /// schedules the next window ([`Inner::on_trigger`]), so a sequential reader finds its
    /// chunks present instead of missing once per window.
    pub(crate) fn readahead_after_miss(&self, first: u64, last: u64) -> Vec<u64> {
        let (base, max) = self.readahead_windows();
        let n = self.manifest.chunk_count();
        if base == 0 || last + 1 >= n {
            return Vec::new();
        }
        let (from, to) = {
            let mut ra = self.readahead.lock().expect("lock");
            let cont = ra
                .streams
                .iter()
                .position(|s| s.window > 0 && first <= s.end + 1 && first + 2 * s.window > s.end);
            let (slot, stream) = match cont {
                Some(i) => {
                    let s = ra.streams[i];
                    let window = self.next_window(s.window, s.end + 1, base, max);
                    let from = s.end.max(last) + 1;
                    let end = (from + window - 1).min(n - 1);
                    (
                        i,
                        Stream {
                            end,
                            window,
                            trigger: from,
                        },
                    )
                }
                None => {
                    let i = ra.victim;
                    ra.victim = (i + 1) % ra.streams.len();
                    let end = (last + base).min(n - 1);
                    let trigger = last + 1 + base / 2;
                    (
                        i,
                        Stream {
                            end,
                            window: base,
                            trigger,
                        },
                    )
                }
            };
            ra.streams[slot] = stream;
            let from = if cont.is_some() {
                stream.trigger
            } else {
                last + 1
            };
            if from > stream.end {
                return Vec::new();
            }
            if stream.trigger <= stream.end {
                self.ra_trigger.set(stream.trigger);
            }
            (from, stream.end)
        };
        self.reserve_missing(from, to)
    }

    /// The window after one of `window` chunks ending before `end`: twice as large (up to
    /// `max`) if the reader read at least half of the chunks in it, else half as large (down to
    /// `base`). A reader that skips most of what it passes (every tenth file of a tree) keeps a
    /// small window instead of pulling in the whole image; a sequential one grows it.
    pub(crate) fn next_window(&self, window: u64, end: u64, base: u64, max: u64) -> u64 {
        let read = (end.saturating_sub(window)..end)
            .filter(|&c| self.accessed.get(c))
            .count() as u64;
        if 2 * read >= window {
            (window * 2).min(max)
        } else {
            (window / 2).max(base)
        }
    }

    /// A read reached `chunk`, the trigger of a stream's window: schedule the next window,
    /// twice as large (up to `readahead_max_bytes`) if the reader used the last one.
    pub(crate) fn on_trigger(self: &Arc<Self>, chunk: u64) {
        let n = self.manifest.chunk_count();
        let (base, max) = self.readahead_windows();
        let (from, to) = {
            let mut ra = self.readahead.lock().expect("lock");
            let Some(s) = ra
                .streams
                .iter_mut()
                .find(|s| s.window > 0 && s.trigger == chunk)
            else {
                return;
            };
            if s.end + 1 >= n {
                return;
            }
            let window = self.next_window(s.window, chunk, base, max);
            let from = s.end + 1;
            let to = (s.end + window).min(n - 1);
            *s = Stream {
                end: to,
                window,
                trigger: from,
            };
            self.ra_trigger.set(from);
            (from, to)
        };
        let todo = self.reserve_missing(from, to);
        self.schedule(todo, true, false);
    }
}
