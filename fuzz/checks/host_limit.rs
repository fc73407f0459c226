//! The host cache limit's two file decoders on arbitrary bytes: a cache's `atime` file
//! (`hostlimit::decode_atime`) and the cache root's cutoff (`Cutoff::decode`). Input layout: the
//! first byte picks the decoder (even: atime, odd: cutoff); for the atime file the next 8 bytes
//! (LE) give the expected chunk count (modulo 2^20), the rest is the file. Neither may panic.
//! An accepted atime file has one time per chunk and re-encodes to a file that decodes the same;
//! an accepted cutoff re-encodes to exactly its bytes, its digests strictly ascending, and its
//! header alone decodes to the same generation and time.

use lazyblk_chunkstore::policy::hostlimit::{decode_atime, encode_atime, Cutoff};

/// The check, on one input.
pub fn run(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if sel % 2 == 0 {
        if rest.len() < 8 {
            return;
        }
        let chunks = u64::from_le_bytes(rest[..8].try_into().unwrap()) % (1 << 20);
        let file = &rest[8..];
        let Ok((times, pinned)) = decode_atime(file, chunks) else {
            return;
        };
        assert_eq!(times.len() as u64, chunks, "one time per chunk");
        let again = encode_atime(times.iter().copied(), pinned);
        assert_eq!(again.len(), file.len(), "re-encoded to another length");
        assert_eq!(decode_atime(&again, chunks), Ok((times, pinned)));
    } else {
        let header = Cutoff::decode(rest, true);
        let Ok(c) = Cutoff::decode(rest, false) else {
            return;
        };
        assert_eq!(c.encode(), rest, "a cutoff re-encodes to its bytes");
        assert!(c.ties.windows(2).all(|w| w[0] < w[1]), "digests ascending");
        let h = header.expect("the header of an accepted cutoff decodes");
        assert_eq!((h.generation, h.atime_ms), (c.generation, c.atime_ms));
    }
}
