//! `erofs::metadata_extents` on arbitrary bytes as the image (`lazyblk build` walks whatever
//! image it is given). It must never panic or hang, and whatever it returns must lie inside the
//! image: non-empty extents, each within the input, the first one the superblock's block.

use lazyblk_format::erofs::{is_erofs, metadata_extents, SUPERBLOCK_OFFSET};

/// The check, on one input.
pub fn run(data: &[u8]) {
    let size = data.len() as u64;
    let mut read_at = |offset: u64, buf: &mut [u8]| {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|at| data.get(at..at.checked_add(buf.len())?))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    };
    let Ok(extents) = metadata_extents(&mut read_at, size) else {
        return;
    };
    assert!(is_erofs(data), "accepted an image without the erofs magic");
    assert!(
        extents
            .first()
            .is_some_and(|e| e.offset == 0 && e.end() > SUPERBLOCK_OFFSET),
        "the superblock is not listed first: {:?}",
        extents.first()
    );
    for e in &extents {
        assert!(
            e.len > 0 && e.offset.checked_add(e.len).is_some_and(|end| end <= size),
            "extent {e:?} is outside the {size}-byte image"
        );
    }
}
