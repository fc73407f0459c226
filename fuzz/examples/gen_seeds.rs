//! Write seed corpora for the fuzz targets from real data:
//! `cargo run --example gen_seeds -- <corpus dir>` (run from `fuzz/`, or with
//! `--manifest-path fuzz/Cargo.toml`).
//!
//! * `manifest/`: manifests written by `builder::build_image` (the code behind `lazyblk build`)
//!   for small raw images mixing zero, duplicate, compressible and incompressible chunks.
//! * `bitmap/`: bitmap files written by a real `ChunkStore` that read some chunks from such an
//!   image, once while open (dirty) and once after a clean close, each prefixed with the chunk
//!   count and image id the `bitmap` target expects (see `fuzz_targets/bitmap.rs`).
//! * `prefetch/`: prefetch lists for that image (`PrefetchList::encode`), with the same prefix.
//! * `block_list/`: the block list of the blocks those reads touched (`ChunkStore::block_trace`).
//! * `prefetch_pack/`: a prefetch pack of those blocks (`builder::build_prefetch_pack`, the code
//!   behind `lazyblk trace --pack`), prefixed with the image size and id.
//! * `erofs/`: small erofs images made by `mkfs.erofs` (erofs-utils): plain, with extended
//!   inodes, xattrs and a multi-block directory, lz4-compressed, and with chunk-based files.
//!
//! Every seed is decoded once here, so a seed that stopped being valid fails loudly.

use lazyblk_blocksource::BlockSource;
use lazyblk_chunkstore::bitmap::{self, Trust};
use lazyblk_builder::{build_image, build_prefetch_pack, BuildOptions, PackBlocks};
use lazyblk_format::{BlockList, ImageId, Manifest, PrefetchList, PrefetchPack};
use lazyblk_chunkstore::{ChunkStore, Location, StoreOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Deterministic bytes that zstd cannot shrink.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A raw image of `cs`-byte chunks: noise, zero, text, a duplicate of each, more noise, zero,
/// and a short tail of `tail` bytes (`tail_noise` picks incompressible or compressible).
fn image(cs: usize, tail: usize, tail_noise: bool) -> Vec<u8> {
    let text: Vec<u8> = b"lazyblk fuzz seed, compressible text. "
        .iter()
        .copied()
        .cycle()
        .take(cs)
        .collect();
    let mut img = Vec::new();
    img.extend(noise(1, cs)); // 0: raw
    img.extend(vec![0u8; cs]); // 1: zero
    img.extend(&text); // 2: zstd
    img.extend(noise(1, cs)); // 3: duplicate of 0
    img.extend(&text); // 4: duplicate of 2
    img.extend(noise(2, cs)); // 5: raw
    img.extend(vec![0u8; cs]); // 6: zero
    if tail_noise {
        img.extend(noise(3, tail));
    } else {
        img.extend(&text[..tail]);
    }
    img
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
    println!("  {}/{name} ({} bytes)", dir.display(), bytes.len());
}

/// Build `raw` with `chunk_size`; return the manifest path and bytes.
fn build(work: &Path, name: &str, raw: &[u8], chunk_size: u32) -> (PathBuf, Vec<u8>) {
    build_with(work, name, raw, chunk_size, PackBlocks::Erofs)
}

/// [`build`] with the metadata pack of `pack`.
fn build_with(
    work: &Path,
    name: &str,
    raw: &[u8],
    chunk_size: u32,
    pack: PackBlocks,
) -> (PathBuf, Vec<u8>) {
    let img = work.join(format!("{name}.img"));
    std::fs::write(&img, raw).expect("write image");
    let out = work.join(name);
    let opts = BuildOptions {
        chunk_size,
        metadata_pack: pack,
        ..Default::default()
    };
    let s = build_image(&img, &out, &opts, |_| {}).expect("build image");
    let bytes = std::fs::read(&s.manifest_path).expect("read manifest");
    let m = Manifest::decode(&bytes).expect("built manifest decodes");
    assert_eq!(m.encode(), bytes);
    (s.manifest_path, bytes)
}

fn bitmap_seed(dir: &Path, name: &str, file: &[u8], id: ImageId, chunks: u64, want: Trust) {
    let d = bitmap::decode(file, &id, chunks).expect("real bitmap decodes");
    assert_eq!(d.trust, want, "{name}");
    let mut seed = chunks.to_le_bytes().to_vec();
    seed.extend_from_slice(&id.0);
    seed.extend_from_slice(file);
    write(dir, name, &seed);
}

/// Make an erofs image of the tree `populate` writes, with `mkfs.erofs` and `opts`; check that
/// the metadata walk accepts it.
fn erofs_seed(work: &Path, dir: &Path, name: &str, opts: &[&str], populate: impl Fn(&Path)) {
    let tree = work.join(format!("{name}.tree"));
    std::fs::create_dir_all(&tree).expect("create tree");
    populate(&tree);
    let img = work.join(format!("{name}.img"));
    let st = Command::new("mkfs.erofs")
        // fixed time and UUID: the same tree gives the same bytes
        .args(["--quiet", "-T0", "-U6c617a79-626c-6b00-8000-00000000e0f5"])
        .args(opts)
        .arg(&img)
        .arg(&tree)
        .status()
        .expect("run mkfs.erofs (install erofs-utils)");
    assert!(st.success(), "mkfs.erofs {opts:?} failed");
    let bytes = std::fs::read(&img).expect("read image");
    let mut read_at = |off: u64, buf: &mut [u8]| {
        let at = off as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok(())
    };
    lazyblk_format::erofs::metadata_extents(&mut read_at, bytes.len() as u64)
        .expect("the metadata walk accepts a real erofs image");
    write(dir, name, &bytes);
}

fn put(tree: &Path, path: &str, data: &[u8]) {
    let p = tree.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).expect("mkdir");
    std::fs::write(p, data).expect("write file");
}

fn erofs_seeds(work: &Path, dir: &Path) {
    let text = |len| -> Vec<u8> {
        b"erofs seed text. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    };
    erofs_seed(work, dir, "plain", &["--all-root"], |t| {
        put(t, "dir/file", b"hello\n");
        put(t, "dir/sub/longer", &text(300));
        std::fs::create_dir(t.join("empty")).expect("mkdir");
        std::os::unix::fs::symlink("dir/file", t.join("link")).expect("symlink");
    });
    erofs_seed(
        work,
        dir,
        "extended-xattr-bigdir",
        &["--force-uid=100000"],
        |t| {
            for i in 0..200 {
                put(
                    t,
                    &format!("many/name-number-{i}"),
                    format!("{i}").as_bytes(),
                );
            }
            // Shared (several inodes) and inline xattrs, where the file system allows user xattrs.
            for i in 0..4 {
                let _ = xattr_set(
                    &t.join(format!("many/name-number-{i}")),
                    "user.shared",
                    b"v",
                );
            }
            let _ = xattr_set(&t.join("many"), "user.own", b"on a directory");
        },
    );
    erofs_seed(work, dir, "lz4", &["--all-root", "-zlz4"], |t| {
        put(t, "d/text", &text(40_000));
        put(t, "d/noise", &noise(4, 2000));
        std::os::unix::fs::symlink("d/text", t.join("l")).expect("symlink");
    });
    erofs_seed(
        work,
        dir,
        "chunked",
        &["--all-root", "--chunksize=4096"],
        |t| {
            put(t, "d/noise", &noise(5, 12_000));
            put(t, "d/small", b"small");
        },
    );
}

/// `setfattr`: keeps the example free of an xattr dependency.
fn xattr_set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let st = Command::new("setfattr")
        .arg("-n")
        .arg(name)
        .arg("-v")
        .arg(String::from_utf8_lossy(value).as_ref())
        .arg(path)
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("setfattr failed"))
    }
}

fn main() {
    let corpus = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: gen_seeds <corpus dir>"),
    );
    let work = std::env::temp_dir().join(format!("lazyblk-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("create work dir");
    let mdir = corpus.join("manifest");
    let bdir = corpus.join("bitmap");

    println!("seeds:");
    let (m4k, bytes4k) = build(&work, "img4k", &image(4096, 123, true), 4096);
    write(&mdir, "built-4k-raw-tail", &bytes4k);
    let (_, b) = build(&work, "img4kz", &image(4096, 1000, false), 4096);
    write(&mdir, "built-4k-zstd-tail", &b);
    let (_, b) = build(&work, "img64k", &image(65536, 65536, true), 65536);
    write(&mdir, "built-64k-full-tail", &b);
    let (_, b) = build(&work, "empty", &[], 4096);
    write(&mdir, "built-empty", &b);
    let (_, b) = build_with(
        &work,
        "pack",
        &image(65536, 20000, false),
        16384,
        PackBlocks::Blocks(vec![0, 2, 3, 4, 9, 21]),
    );
    write(&mdir, "built-16k-metadata-pack", &b);

    // A real cache: read chunks 0, 2 and the tail through the store (no readahead, so only
    // those and the zero chunks are marked), flush (the bitmap is dirty while open), then close
    // cleanly.
    let id = ImageId::of(&bytes4k);
    let chunks = Manifest::decode(&bytes4k).unwrap().chunk_count();
    let opts = StoreOptions {
        cache_root: work.join("cache"),
        expected_id: Some(id),
        readahead_bytes: 0,
        use_prefetch_list: false,
        ..Default::default()
    };
    let store = ChunkStore::open(&Location::Path(m4k), opts).expect("open store");
    let mut buf = vec![0u8; 4096];
    for off in [0u64, 2 * 4096, 7 * 4096] {
        let n = (store.geometry().size - off).min(4096) as usize;
        store
            .read_at(off, &mut buf[..n])
            .expect("read through the store");
    }
    store.flush().expect("flush");
    // The blocks those reads touched, as `lazyblk trace --blocks` writes them.
    let blocks = BlockList {
        image: id,
        blocks: store.block_trace(),
    }
    .encode();
    BlockList::decode(&blocks).expect("block list decodes");
    write(&corpus.join("block_list"), "store-trace", &blocks);
    // Those blocks as a prefetch pack, read back through the store.
    let m = Manifest::decode(&bytes4k).unwrap();
    let traced: Vec<u64> = store.block_trace().into_iter().map(u64::from).collect();
    let mut read = |at: u64, buf: &mut [u8]| {
        store
            .read_at(at, buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    let pack_path = work.join("prefetch.pack");
    build_prefetch_pack(id, &m, &traced, &mut read, &pack_path, 3).expect("prefetch pack");
    let file = std::fs::read(&pack_path).expect("read the pack");
    PrefetchPack::decode(&file, &id, m.image_size).expect("prefetch pack decodes");
    let mut seed = m.image_size.to_le_bytes().to_vec();
    seed.extend_from_slice(&id.0);
    seed.extend_from_slice(&file);
    write(&corpus.join("prefetch_pack"), "store-trace", &seed);
    let bitmap_path = store.cache_dir().join("bitmap");
    let dirty = std::fs::read(&bitmap_path).expect("read bitmap");
    drop(store);
    let clean = std::fs::read(&bitmap_path).expect("read bitmap");
    bitmap_seed(&bdir, "store-dirty", &dirty, id, chunks, Trust::Verify);
    bitmap_seed(&bdir, "store-clean", &clean, id, chunks, Trust::Clean);

    let pdir = corpus.join("prefetch");
    for (name, list) in [("list-3", vec![7u32, 0, 2]), ("list-empty", vec![])] {
        let file = PrefetchList {
            image: id,
            chunks: list,
        }
        .encode();
        PrefetchList::decode(&file, &id, chunks).expect("prefetch list decodes");
        let mut seed = chunks.to_le_bytes().to_vec();
        seed.extend_from_slice(&id.0);
        seed.extend_from_slice(&file);
        write(&pdir, name, &seed);
    }

    erofs_seeds(&work, &corpus.join("erofs"));

    std::fs::remove_dir_all(&work).expect("remove work dir");
}
