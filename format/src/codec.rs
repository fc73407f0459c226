//! Little-endian field helpers shared by the manifest and prefetch pack codecs.

use crate::error::Error;
use crate::manifest::{Encoding, Entry, RAW_FLAG};

pub(crate) fn bad(msg: impl Into<String>) -> Error {
    Error::Manifest(msg.into())
}

pub(crate) fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Digest, stored length and encoding of the 36-byte entry at `at`.
pub(crate) fn read_entry(b: &[u8], at: usize) -> ([u8; 32], u32, Encoding) {
    let digest: [u8; 32] = b[at..at + 32].try_into().expect("32 bytes");
    let word = le_u32(b, at + 32);
    let encoding = if word & RAW_FLAG != 0 {
        Encoding::Raw
    } else {
        Encoding::Zstd
    };
    (digest, word & !RAW_FLAG, encoding)
}

pub(crate) fn put_entry(out: &mut [u8], at: usize, e: &Entry) {
    out[at..at + 32].copy_from_slice(&e.digest);
    let word = e.stored_len
        | match e.encoding {
            Encoding::Zstd => 0,
            Encoding::Raw => RAW_FLAG,
        };
    out[at + 32..at + 36].copy_from_slice(&word.to_le_bytes());
}
