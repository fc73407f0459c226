//! `Manifest::decode` on arbitrary bytes: it must never panic, and whatever it accepts must be
//! canonical (re-encoding gives back the exact input) and safe to walk chunk by chunk.

use lazyblk_format::{ChunkRef, Encoding, Manifest, PACK_BLOCK};

/// The check, on one input.
pub fn run(data: &[u8]) {
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
    let pack_bytes = m.pack.as_ref().map_or(0, |p| p.stored_bytes());
    assert_eq!(
        m.stored_bytes() + pack_bytes,
        m.blob_size,
        "entries and pack frames do not fill the blob"
    );
    if let Some(p) = &m.pack {
        assert!(!p.blocks.is_empty(), "an empty pack was accepted");
        assert!(
            p.blocks.windows(2).all(|w| w[0] < w[1]),
            "pack blocks not ascending"
        );
        assert!(
            u64::from(*p.blocks.last().unwrap()) < m.block_count(),
            "pack block beyond the image"
        );
        let mut seen = 0;
        for (f, e) in p.frames.iter().enumerate() {
            let pos = p.frame_positions(f);
            assert!(
                !pos.is_empty() && pos.start == seen,
                "frame {f}: positions {pos:?}"
            );
            seen = pos.end;
            assert_eq!(p.frame_of(pos.start), f);
            let raw = p.frame_raw_len(f, m.image_size);
            assert!(
                raw > 0 && raw <= pos.len() as u64 * PACK_BLOCK,
                "frame {f}: raw length {raw}"
            );
            if e.encoding == Encoding::Raw {
                assert_eq!(u64::from(e.stored_len), raw, "frame {f}: raw length");
            }
            let (first, last) = (p.blocks[pos.start], p.blocks[pos.end - 1]);
            let covered = p.covers(u64::from(first), u64::from(last));
            assert_eq!(
                covered.is_some(),
                u64::from(last - first) + 1 == pos.len() as u64,
                "frame {f}: covers"
            );
        }
        assert_eq!(seen, p.blocks.len(), "frames do not hold every block");
    }
}
