//! Lock-free bit sets for the hot path: presence, referenced, accessed, readahead triggers.

use crate::prelude::*;

/// Lock-free presence bits for the hot path.
pub(crate) struct AtomicBits(Vec<AtomicU64>);

impl AtomicBits {
    pub(crate) fn new(n: u64) -> Self {
        AtomicBits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    pub(crate) fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }
    pub(crate) fn set(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
    }
    /// Set bit `i`; returns whether it was already set.
    pub(crate) fn test_and_set(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel) & (1 << (i % 64)) != 0
    }
    /// Clear bit `i`; returns whether it was set.
    pub(crate) fn test_and_clear(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel) & (1 << (i % 64))
            != 0
    }
    pub(crate) fn clear(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
    }
    /// Set bits `lo..=hi` (a word at a time, skipping words already set).
    pub(crate) fn set_range(&self, lo: u64, hi: u64) {
        let (wlo, whi) = (lo / 64, hi / 64);
        for w in wlo..=whi {
            let from = if w == wlo { lo % 64 } else { 0 };
            let to = if w == whi { hi % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - (to - from))) << from;
            let word = &self.0[w as usize];
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
    }
    /// The indices of the bits set, ascending.
    pub(crate) fn ones(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.0.iter().enumerate() {
            let mut v = w.load(Ordering::Relaxed);
            while v != 0 {
                out.push(i as u64 * 64 + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        }
        out
    }
    /// Bits set among `from..to`.
    pub(crate) fn count_range(&self, from: u64, to: u64) -> u64 {
        (from..to).filter(|&i| self.get(i)).count() as u64
    }
    /// Bits set below `n`.
    pub(crate) fn count_below(&self, n: u64) -> u64 {
        let full = (n / 64) as usize;
        let whole: u64 = self.0[..full]
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        whole + self.count_range(full as u64 * 64, n)
    }
}
