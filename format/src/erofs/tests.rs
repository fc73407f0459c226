//! The walker's tests: listing the tree from an image in which every byte outside the extents
//! is zeroed must give the same result as listing the whole image.

use super::testing::*;
use super::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Whether user xattrs can be set on files under `dir`.
fn xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    std::fs::write(&probe, b"").expect("write probe");
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    std::fs::remove_file(&probe).expect("remove probe");
    ok
}

/// The large file's size: several 128 KiB chunks.
const LARGE: usize = (1 << 20) + 1000;

/// A tree with nested and empty directories, many small files, a large incompressible
/// file, a compressible file, symlinks, a hard link, a socket, a directory of 250 entries
/// spanning several blocks, and (where supported) shared and private xattrs.
fn sample_tree(root: &Path) {
    let d = |p: &str| std::fs::create_dir_all(root.join(p)).expect("mkdir");
    let f = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).expect("write");
    d("a/b/c/d");
    d("empty");
    d("big");
    d("many");
    for i in 0..40 {
        f(
            &format!("a/small{i}"),
            format!("small file {i}\n").as_bytes(),
        );
        f(&format!("a/b/mid{i}"), &noise(i, 3000 + 100 * i as usize));
    }
    f("a/b/c/d/deep", b"deep\n");
    f("big/large", &noise(99, LARGE));
    let text: Vec<u8> = b"compressible text, one line after another\n"
        .iter()
        .copied()
        .cycle()
        .take(300_000)
        .collect();
    f("big/text", &text);
    for i in 0..250 {
        f(
            &format!("many/entry-with-a-rather-long-name-{i:04}"),
            format!("{i}").as_bytes(),
        );
    }
    std::os::unix::fs::symlink("../small1", root.join("a/b/link")).expect("symlink");
    std::os::unix::fs::symlink("x".repeat(1500), root.join("a/longlink")).expect("symlink");
    std::fs::hard_link(root.join("a/small2"), root.join("a/b/c/hardlink")).expect("link");
    std::os::unix::net::UnixListener::bind(root.join("a/socket")).expect("socket");
    if xattrs_supported(root) {
        // mkfs.erofs shares an xattr that several inodes have: 40 of them, 4 KiB in all,
        // more than fits the superblock's block where erofs-utils 1.5 puts them.
        for i in 0..40 {
            for j in i..i + 3 {
                let path = root.join(format!("a/small{}", j % 40));
                let name = format!("user.shared{i}");
                xattr::set(path, name, &[i as u8; 100]).expect("xattr");
            }
        }
        xattr::set(root.join("a/b"), "user.dir", b"on a directory").expect("xattr");
        xattr::set(root.join("big/large"), "user.own", &[7; 100]).expect("xattr");
    }
}

/// List a source tree like [`Reader::list`] lists an image.
fn list_tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Node>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("entry");
            let path = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let md = std::fs::symlink_metadata(e.path()).expect("stat");
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else {
                's'
            };
            let mut xattrs: Vec<_> = if ft.is_symlink() {
                Vec::new()
            } else {
                xattr::list(e.path())
                    .expect("listxattr")
                    .filter_map(|n| {
                        let n = n.to_string_lossy().into_owned();
                        let name = n.strip_prefix("user.")?.as_bytes().to_vec();
                        let value = xattr::get(e.path(), &n).ok()??;
                        Some((name, value))
                    })
                    .collect()
            };
            xattrs.sort();
            let target = if ft.is_symlink() {
                use std::os::unix::ffi::OsStrExt;
                let t = std::fs::read_link(e.path()).expect("readlink");
                t.as_os_str().as_bytes().to_vec()
            } else {
                Vec::new()
            };
            let size = if ft.is_file() || ft.is_symlink() {
                md.len()
            } else {
                0
            };
            out.insert(
                path.clone(),
                Node {
                    kind,
                    size,
                    target,
                    xattrs,
                },
            );
            if ft.is_dir() {
                walk(&e.path(), &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// `img` with every byte outside `extents` zeroed.
fn masked(img: &[u8], extents: &[Extent]) -> Vec<u8> {
    let mut out = vec![0u8; img.len()];
    for e in extents {
        let r = e.offset as usize..e.end() as usize;
        out[r.clone()].copy_from_slice(&img[r]);
    }
    out
}

/// Image offsets of the block-aligned blocks of `img` that hold a full block of `data`.
fn blocks_of(img: &[u8], data: &[u8]) -> Vec<usize> {
    let wanted: HashSet<&[u8]> = data.chunks_exact(4096).collect();
    (0..img.len() / 4096)
        .map(|b| b * 4096)
        .filter(|&at| wanted.contains(&img[at..at + 4096]))
        .collect()
}

fn covered(extents: &[Extent], at: usize, len: usize) -> bool {
    let (at, end) = (at as u64, (at + len) as u64);
    extents.iter().any(|e| e.offset < end && at < e.end())
}

/// `dump.erofs -e` of `path` in `img`: the inode and its file extents, as erofs-utils
/// reads them (through the block map or the compression indexes).
fn dump_extents(img: &Path, path: &str) -> String {
    let o = Command::new("dump.erofs")
        .args(["-e", &format!("--path={path}")])
        .arg(img)
        .output()
        .expect("run dump.erofs (erofs-utils)");
    assert!(o.status.success(), "dump.erofs {path}: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// The data layout of the inode at `path`.
fn layout_of(img: &[u8], path: &str) -> u16 {
    let r = Reader::new(img);
    let mut nid = r.root;
    for name in path.split('/') {
        let entries = r.entries(&r.inode(nid));
        nid = entries.iter().find(|e| e.0 == name.as_bytes()).unwrap().1;
    }
    r.inode(nid).layout
}

/// Build the sample tree with `opts` and check the extents: the listing survives masking,
/// matches the source tree, erofs-utils maps files the same in the masked image, and the
/// large file's data is not covered.
fn check_image(opts: &[&str]) -> Option<(Vec<u8>, Vec<Extent>)> {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    sample_tree(&tree);
    let img_path = dir.path().join("img");
    let img = mkfs(&tree, &img_path, opts)?;
    assert!(is_erofs(&img[..2048]));
    let extents = extents_of(&img).unwrap();
    for w in extents.windows(2) {
        assert!(
            w[0].end() < w[1].offset || w[1].end() <= w[0].offset || w[1].offset < w[0].offset,
            "unmerged adjacent extents {w:?}"
        );
    }
    assert!(extents
        .iter()
        .all(|e| e.len > 0 && e.end() <= img.len() as u64));

    let full = Reader::new(&img).list();
    assert_eq!(
        full,
        list_tree(&tree),
        "the test reader disagrees with the tree ({opts:?})"
    );
    let part = Reader::new(&masked(&img, &extents)).list();
    assert_eq!(part, full, "metadata outside the extents ({opts:?})");
    if xattrs_supported(dir.path()) {
        assert_eq!(full["/a/small0"].xattrs.len(), 3, "xattrs were not stored");
    }

    let masked_path = dir.path().join("masked");
    std::fs::write(&masked_path, masked(&img, &extents)).unwrap();
    for path in [
        "/big/large",
        "/big/text",
        "/a/b/mid7",
        "/many",
        "/a/longlink",
    ] {
        assert_eq!(
            dump_extents(&masked_path, path),
            dump_extents(&img_path, path),
            "{path} maps differently without the bytes outside the extents ({opts:?})"
        );
    }

    let large = std::fs::read(tree.join("big/large")).unwrap();
    let blocks = blocks_of(&img, &large);
    assert!(
        blocks.len() >= LARGE / 4096,
        "large file data not found ({opts:?})"
    );
    for at in blocks {
        assert!(
            !covered(&extents, at, 4096),
            "file data at {at} is listed ({opts:?})"
        );
    }

    let cs = 128 << 10;
    let chunks: HashSet<u64> = extents
        .iter()
        .flat_map(|e| e.offset / cs..=(e.end() - 1) / cs)
        .collect();
    let bytes: u64 = extents.iter().map(|e| e.len).sum();
    eprintln!(
        "mkfs.erofs {opts:?}: {} bytes, {} extents, {bytes} metadata bytes, \
         {} of {} chunks of 128 KiB",
        img.len(),
        extents.len(),
        chunks.len(),
        (img.len() as u64).div_ceil(cs)
    );
    Some((img, extents))
}

#[test]
fn erofs_plain_image() {
    let (img, _) = check_image(&["-T0", "--all-root"]).expect("mkfs.erofs");
    assert_eq!(layout_of(&img, "big/large"), u16::from(LAYOUT_FLAT_INLINE));
}

#[test]
fn erofs_extended_inodes() {
    // A uid beyond 16 bits needs the 64-byte inode.
    let (img, _) = check_image(&["-T0", "--force-uid=100000"]).expect("mkfs.erofs");
    let r = Reader::new(&img);
    assert_eq!(r.u16(r.inode(r.root).pos) & 1, 1, "not an extended inode");
}

#[test]
fn erofs_chunked_files() {
    let (img, _) = check_image(&["-T0", "--all-root", "--chunksize=65536"]).expect("mkfs.erofs");
    assert_eq!(layout_of(&img, "big/large"), u16::from(LAYOUT_CHUNK_BASED));
}

#[test]
fn erofs_compressed_images() {
    for z in ["-zlz4", "-zlz4hc"] {
        match check_image(&["-T0", "--all-root", z]) {
            Some((img, _)) => assert!(
                [LAYOUT_COMPRESSED_FULL, LAYOUT_COMPRESSED_COMPACT]
                    .map(u16::from)
                    .contains(&layout_of(&img, "big/text")),
                "{z}: the text file is not compressed"
            ),
            None => eprintln!("this mkfs.erofs cannot {z}: compressed layouts not tested"),
        }
    }
    // the 8-byte (non-compact) indexes
    if check_image(&["-T0", "--all-root", "-zlz4", "-Elegacy-compress"]).is_none() {
        eprintln!("this mkfs.erofs has no -Elegacy-compress: full indexes not tested");
    }
}

#[test]
fn erofs_is_erofs() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let img = mkfs(&tree, &dir.path().join("img"), &["-T0"]).unwrap();
    assert!(is_erofs(&img));
    assert!(!is_erofs(&img[..1100]));
    assert!(!is_erofs(&[0; 2048]));
    let e = metadata_extents(&mut reader(&[0; 4096]), 4096).unwrap_err();
    assert!(e.to_string().contains("erofs: bad superblock magic"), "{e}");
}

/// A small image for the corruption tests.
fn small_image(dir: &Path) -> Vec<u8> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::create_dir_all(tree.join("e")).unwrap();
    std::fs::write(tree.join("a/f"), b"file").unwrap();
    std::fs::write(tree.join("a/b/g"), noise(1, 9000)).unwrap();
    std::os::unix::fs::symlink("a/f", tree.join("l")).unwrap();
    mkfs(&tree, &dir.join("img"), &["-T0", "--all-root"]).unwrap()
}

#[test]
fn erofs_truncated_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_image(dir.path());
    assert!(extents_of(&img).is_ok());
    for len in (0..img.len()).step_by(97) {
        let _ = extents_of(&img[..len]);
    }
    // reads fail past the superblock
    let e = metadata_extents(&mut reader(&img[..2048]), img.len() as u64).unwrap_err();
    assert!(e.to_string().contains("reading"), "{e}");
}

#[test]
fn erofs_garbage_after_superblock() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_image(dir.path());
    for seed in 0..200 {
        let mut bad = img[..2048].to_vec();
        bad.extend(noise(seed, 64 << 10));
        let _ = extents_of(&bad);
        // garbage everywhere but the superblock
        let mut bad = noise(seed + 1000, img.len());
        bad[1024..1152].copy_from_slice(&img[1024..1152]);
        let _ = extents_of(&bad);
    }
}

#[test]
fn erofs_random_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_image(dir.path());
    let extents = extents_of(&img).unwrap();
    let meta: Vec<usize> = extents
        .iter()
        .flat_map(|e| e.offset as usize..e.end() as usize)
        .collect();
    let rnd = noise(7, 3 * 4000);
    let mut bad = img.clone();
    for i in 0..4000 {
        let pick = usize::from(rnd[3 * i]) << 8 | usize::from(rnd[3 * i + 1]);
        let at = meta[pick * meta.len() / 65536];
        bad[at] = rnd[3 * i + 2];
        let _ = extents_of(&bad);
        if i % 10 == 9 {
            bad.copy_from_slice(&img);
        }
    }
}

#[test]
fn erofs_directory_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_image(dir.path());
    let r = Reader::new(&img);
    let root = r.inode(r.root);
    let nid_of = |entries: &[(Vec<u8>, u64, usize)], name: &[u8]| {
        entries
            .iter()
            .find(|e| e.0 == name)
            .map(|e| (e.1, e.2))
            .unwrap()
    };
    let (a, a_dirent) = nid_of(&r.entries(&root), b"a");
    let (_, b_dirent) = nid_of(&r.entries(&r.inode(a)), b"b");
    let mut bad = img.clone();
    // "a/b" is "a" itself, and "a" is the root.
    bad[b_dirent..b_dirent + 8].copy_from_slice(&a.to_le_bytes());
    bad[a_dirent..a_dirent + 8].copy_from_slice(&r.root.to_le_bytes());
    extents_of(&bad).unwrap();
    // Every directory points at the same (root) data: visited once.
    let mut bad = img.clone();
    let (e, _) = nid_of(&r.entries(&root), b"e");
    let (ia, ie) = (r.inode(a).pos, r.inode(e).pos);
    bad[ia..ia + 32].copy_from_slice(&img[root.pos..root.pos + 32]);
    bad[ie..ie + 32].copy_from_slice(&img[root.pos..root.pos + 32]);
    let _ = extents_of(&bad);
}

#[test]
fn erofs_compact_index_len() {
    // 32-byte aligned start: no 4-byte head; 2-byte runs of 16, then 4-byte packs of 2.
    assert_eq!(compact_index_len(64, 0, true), 0);
    assert_eq!(compact_index_len(64, 1, true), 8);
    assert_eq!(compact_index_len(64, 16, true), 32);
    assert_eq!(compact_index_len(64, 19, true), 32 + 8 + 8);
    assert_eq!(compact_index_len(64, 19, false), 19 * 4 + 4);
    // 8 bytes past a boundary: six 4-byte entries first
    assert_eq!(compact_index_len(72, 6 + 16, true), 24 + 32);
    assert_eq!(compact_index_len(72, 3, true), 16);
}
