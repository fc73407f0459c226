//! `Manifest::decode` on arbitrary bytes: it must never panic, and whatever it accepts must be
//! canonical (re-encoding gives back the exact input) and safe to walk chunk by chunk.
#![no_main]

use lazyblk_chunkstore::format::{ChunkRef, Encoding, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    let enc = m.encode();
    if enc != data {
        let at = enc.iter().zip(data).position(|(a, b)| a != b);
        panic!(
            "accepted manifest does not re-encode to its input: input {} bytes, encoding {} bytes, first difference at {at:?}",
            data.len(),
            enc.len()
        );
    }
    let mut end = 0u64;
    for i in 0..m.chunk_count() {
        let len = m.chunk_len(i);
        assert!(len > 0 && len <= m.chunk_size, "chunk {i}: length {len}");
        assert_eq!(m.chunk_offset(i), end, "chunk {i}: offset");
        end += u64::from(len);
        match m.chunk(i) {
            ChunkRef::Zero => {}
            ChunkRef::Stored(e) => {
                assert!(e.stored_len > 0, "chunk {i}: empty entry");
                assert!(
                    e.blob_offset
                        .checked_add(u64::from(e.stored_len))
                        .is_some_and(|x| x <= m.blob_size),
                    "chunk {i}: entry beyond the blob"
                );
                if e.encoding == Encoding::Raw {
                    assert_eq!(e.stored_len, len, "chunk {i}: raw entry length");
                }
            }
        }
    }
    assert_eq!(end, m.image_size, "chunks do not cover the image exactly");
    assert!(
        m.entries_contiguous(),
        "decoded entries are not back to back"
    );
    assert_eq!(
        m.stored_bytes(),
        m.blob_size,
        "entries do not fill the blob"
    );
});
