//! The builder's tests: images read back through the manifest, packs against the erofs walker.

use crate::*;
use lazyblk_format::erofs::testing::{mkfs, noise, RInode, Reader};
use lazyblk_format::{
    ChunkRef, Encoding, ImageId, Manifest, MetaPack, PrefetchList, PACK_BLOCK, PREFETCH_FILE,
};

#[test]
fn dedup_zero_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let mut data = vec![0u8; 4096 * 5 + 123];
    data[..4096].fill(1); // chunk 0
    data[4096 * 2..4096 * 3].fill(1); // chunk 2 == chunk 0
    for (i, b) in data[4096 * 3..4096 * 4].iter_mut().enumerate() {
        *b = (i * 31 % 256) as u8;
    }
    data[4096 * 5..].fill(3); // short tail
    std::fs::write(&img, &data).unwrap();
    let opts = BuildOptions {
        chunk_size: 4096,
        ..Default::default()
    };
    let s = build_image(&img, &dir.path().join("out"), &opts, |_| {}).unwrap();
    assert_eq!(s.chunks, 6);
    assert_eq!(s.zero_chunks, 2);
    assert_eq!(s.unique_chunks, 3);
    let m = Manifest::decode(&std::fs::read(&s.manifest_path).unwrap()).unwrap();
    assert_eq!(m.map[0], m.map[2]);
    assert_eq!(m.chunk(1), ChunkRef::Zero);
    assert_eq!(m.chunk_len(5), 123);
    assert_eq!(std::fs::metadata(&s.blob_path).unwrap().len(), m.blob_size);
    assert_eq!(ImageId::of(&std::fs::read(&s.manifest_path).unwrap()), s.id);
}

/// Every block of the pack decodes, from the blob, to the image's bytes at that block.
fn check_pack(s: &BuildSummary, image: &[u8]) -> MetaPack {
    let m = Manifest::decode(&std::fs::read(&s.manifest_path).unwrap()).unwrap();
    assert!(m.entries_contiguous());
    let blob = std::fs::read(&s.blob_path).unwrap();
    let p = m.pack.clone().expect("a metadata pack");
    for (f, e) in p.frames.iter().enumerate() {
        let stored = &blob[e.blob_offset as usize..][..e.stored_len as usize];
        let raw = match e.encoding {
            Encoding::Raw => stored.to_vec(),
            Encoding::Zstd => zstd::bulk::decompress(stored, 1 << 22).unwrap(),
        };
        assert_eq!(raw.len() as u64, p.frame_raw_len(f, m.image_size));
        assert_eq!(*blake3::hash(&raw).as_bytes(), e.digest);
        let mut at = 0;
        for &b in &p.blocks[p.frame_positions(f)] {
            let off = b as usize * PACK_BLOCK as usize;
            let want = &image[off..(off + PACK_BLOCK as usize).min(image.len())];
            assert_eq!(&raw[at..at + want.len()], want, "block {b}");
            at += want.len();
        }
    }
    assert_eq!(s.pack_blocks, p.blocks.len() as u64);
    assert_eq!(s.pack_bytes, p.stored_bytes());
    p
}

#[test]
fn erofs_image_gets_a_metadata_pack() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("d/e")).unwrap();
    for i in 0..20 {
        std::fs::write(tree.join(format!("d/f{i}")), noise(i, 20_000)).unwrap();
    }
    std::fs::write(tree.join("d/e/g"), b"g").unwrap();
    let img = dir.path().join("img");
    let bytes = mkfs(&tree, &img, &["-T0", "--all-root"]).expect("mkfs.erofs");
    let out = dir.path().join("out");
    let opts = BuildOptions {
        chunk_size: 16384,
        ..Default::default()
    };
    // A list recorded for another image is removed by the build.
    std::fs::create_dir_all(&out).unwrap();
    let other = PrefetchList {
        image: ImageId([9; 32]),
        chunks: vec![0],
    };
    std::fs::write(out.join(PREFETCH_FILE), other.encode()).unwrap();
    let s = build_image(&img, &out, &opts, |_| {}).unwrap();
    assert!(!out.join(PREFETCH_FILE).exists());
    let p = check_pack(&s, &bytes);
    assert_eq!(p.blocks[0], 0, "the superblock is in the pack");
    assert!(s.pack_blocks < s.image_size / PACK_BLOCK / 4, "{s:?}");
    assert!(
        s.pack_chunks >= 1 && s.pack_chunks <= s.unique_chunks,
        "{s:?}"
    );
    let r = Reader::new(&bytes);
    let root = r.inode(r.root);
    let mut wanted = vec![root.pos as u64 / PACK_BLOCK];
    wanted.extend(
        r.blocks(&root)
            .iter()
            .map(|(at, _)| *at as u64 / PACK_BLOCK),
    );
    for b in wanted {
        assert!(
            p.covers(b, b).is_some(),
            "block {b} of the root is not in the pack"
        );
    }
    // No file data: the 20 KB files' full data blocks are not in the pack.
    let child = |dir: &RInode, name: &[u8]| {
        let e = r.entries(dir);
        r.inode(e.iter().find(|e| e.0 == name).expect("entry").1)
    };
    let f0 = child(&child(&root, b"d"), b"f0");
    for (at, data) in r.blocks(&f0) {
        let b = at as u64 / PACK_BLOCK;
        if data.len() as u64 == PACK_BLOCK {
            assert!(p.covers(b, b).is_none(), "data block at {at}");
        }
    }

    // Without the option there is no pack; the same image otherwise.
    let opts = BuildOptions {
        metadata_pack: PackBlocks::Off,
        ..opts
    };
    let s2 = build_image(&img, &out, &opts, |_| {}).unwrap();
    assert_eq!(s2.pack_blocks, 0);
    assert_eq!(s2.blob_size, s.blob_size - s.pack_bytes);
    let m = Manifest::decode(&std::fs::read(&s2.manifest_path).unwrap()).unwrap();
    assert!(m.pack.is_none());

    // A raw image: no pack.
    std::fs::write(&img, noise(1, 50_000)).unwrap();
    let s = build_image(&img, &out, &BuildOptions::default(), |_| {}).unwrap();
    assert_eq!(s.pack_blocks, 0);
}

#[test]
fn explicit_pack_blocks_of_any_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let data: Vec<u8> = (0..4096 * 9 + 700).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let opts = BuildOptions {
        chunk_size: 8192,
        metadata_pack: PackBlocks::Blocks(vec![9, 3, 3, 0, 4, 99, 1 << 40]),
        ..Default::default()
    };
    let s = build_image(&img, &dir.path().join("out"), &opts, |_| {}).unwrap();
    let p = check_pack(&s, &data);
    assert_eq!(
        p.blocks,
        vec![0, 3, 4, 9],
        "sorted, deduplicated, inside the image"
    );
    assert_eq!(s.pack_chunks, 4, "chunks 0, 1, 2 and 4");
    assert_eq!(s.pack_extra_blocks, 0);

    // Extra blocks (a recorded workload's) join the pack, counted apart.
    let opts = BuildOptions {
        extra_pack_blocks: vec![4, 5, 7, 7, 1 << 30],
        ..opts
    };
    let s = build_image(&img, &dir.path().join("out2"), &opts, |_| {}).unwrap();
    let p = check_pack(&s, &data);
    assert_eq!(p.blocks, vec![0, 3, 4, 5, 7, 9]);
    assert_eq!(s.pack_extra_blocks, 2);
    // ... also without a pack of their own.
    let opts = BuildOptions {
        metadata_pack: PackBlocks::Off,
        ..opts
    };
    let s = build_image(&img, &dir.path().join("out3"), &opts, |_| {}).unwrap();
    assert_eq!(check_pack(&s, &data).blocks, vec![4, 5, 7]);
}

#[test]
fn broken_erofs_image_builds_without_a_pack() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    // an erofs superblock whose root inode is beyond the image
    let mut data = vec![0u8; 8192];
    data[1024..1028].copy_from_slice(&lazyblk_format::erofs::MAGIC.to_le_bytes());
    data[1036] = 12;
    data[1038..1040].copy_from_slice(&u16::MAX.to_le_bytes());
    std::fs::write(&img, &data).unwrap();
    let s = build_image(
        &img,
        &dir.path().join("out"),
        &BuildOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(s.pack_blocks, 0);
}

#[test]
fn rejects_bad_chunk_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, b"x").unwrap();
    let opts = BuildOptions {
        chunk_size: 5000,
        ..Default::default()
    };
    let e = build_image(&img, dir.path(), &opts, |_| {}).unwrap_err();
    assert!(e.to_string().contains("chunk size"), "{e}");
}
