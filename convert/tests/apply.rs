//! `Tree::apply_layer` with hand-built tar layers: every OCI change semantic, and every hostile
//! layer refused with one line and nothing written outside the tree (a sentinel directory and
//! file next to the tree stay as they were).

use lazyblk_convert::{ApplyOptions, Error, Tree};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tar::{EntryType, Header};

/// A layer under construction.
struct L {
    b: tar::Builder<Vec<u8>>,
}

#[derive(Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

const M: Meta = Meta {
    mode: 0o644,
    uid: 0,
    gid: 0,
    mtime: 1_600_000_000,
};

impl L {
    fn new() -> L {
        L {
            b: tar::Builder::new(Vec::new()),
        }
    }

    /// An entry with raw (unchecked) path and link name bytes.
    fn raw(
        &mut self,
        path: &[u8],
        t: EntryType,
        data: &[u8],
        link: Option<&[u8]>,
        m: Meta,
    ) -> &mut Self {
        let mut h = Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..path.len()].copy_from_slice(path);
            if let Some(l) = link {
                g.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_entry_type(t);
        h.set_size(data.len() as u64);
        h.set_mode(m.mode);
        h.set_uid(m.uid);
        h.set_gid(m.gid);
        h.set_mtime(m.mtime);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.raw(path.as_bytes(), EntryType::Regular, data, None, M)
    }

    fn file_m(&mut self, path: &str, data: &[u8], m: Meta) -> &mut Self {
        self.raw(path.as_bytes(), EntryType::Regular, data, None, m)
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.raw(
            path.as_bytes(),
            EntryType::Directory,
            b"",
            None,
            Meta { mode: 0o755, ..M },
        )
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(
            path.as_bytes(),
            EntryType::Symlink,
            b"",
            Some(target.as_bytes()),
            Meta { mode: 0o777, ..M },
        )
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(
            path.as_bytes(),
            EntryType::Link,
            b"",
            Some(target.as_bytes()),
            M,
        )
    }

    fn pax(&mut self, kv: &[(&str, &[u8])]) -> &mut Self {
        self.b.append_pax_extensions(kv.iter().copied()).unwrap();
        self
    }

    fn bytes(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

/// A temp dir with `tree/` (the work tree) and, beside it, `sentinel/` (holding `file`) that no
/// layer may touch.
struct Fixture {
    _t: tempfile::TempDir,
    base: PathBuf,
    tree: Tree,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with(ApplyOptions::default())
    }

    fn with(opts: ApplyOptions) -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().to_path_buf();
        fs::create_dir(base.join("tree")).unwrap();
        fs::create_dir(base.join("sentinel")).unwrap();
        fs::write(base.join("sentinel/file"), b"keep").unwrap();
        let tree = Tree::open(&base.join("tree"), opts).unwrap();
        Fixture { _t: t, base, tree }
    }

    fn root(&self) -> PathBuf {
        self.base.join("tree")
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    fn apply(&self, layer: &[u8]) -> Result<lazyblk_convert::LayerStats, Error> {
        self.tree.apply_layer("t", layer)
    }

    /// The sentinel is as it was and nothing else appeared beside the tree.
    fn untouched(&self) {
        let names: Vec<_> = fs::read_dir(self.base.join("sentinel"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["file"], "sentinel changed");
        let f = self.base.join("sentinel/file");
        assert_eq!(fs::read(&f).unwrap(), b"keep");
        let md = fs::metadata(&f).unwrap();
        assert_eq!(md.nlink(), 1, "the sentinel got a hardlink");
        assert_eq!(md.mode() & 0o7777, 0o644);
        let mut beside: Vec<_> = fs::read_dir(&self.base)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        beside.sort();
        assert_eq!(beside, ["sentinel", "tree"]);
        assert!(!Path::new("/evil").exists() && !Path::new("/tmp/evil").exists());
    }

    /// Applying `layer` is refused with one line mentioning `want`, nothing written outside.
    fn refused(&self, layer: &[u8], want: &str) {
        let e = self.apply(layer).expect_err("must be refused");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "more than one line: {msg}");
        assert!(msg.contains(want), "{msg:?} does not say {want:?}");
        self.untouched();
    }
}

fn meta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap()
}

// A valid VFS_CAP_REVISION_2 `security.capability`: effective, CAP_NET_BIND_SERVICE (bit 10).
const CAP: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn every_kind_of_entry_with_its_metadata() {
    let f = Fixture::new();
    let mut l = L::new();
    l.raw(
        b"./",
        EntryType::Directory,
        b"",
        None,
        Meta { mode: 0o755, ..M },
    );
    l.dir("etc/");
    l.file_m(
        "etc/passwd",
        b"root:x:0:0\n",
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_234_567_890,
        },
    );
    l.file_m(
        "bin/su",
        b"\x7fELF",
        Meta {
            mode: 0o4755,
            uid: 0,
            gid: 0,
            ..M
        },
    );
    l.raw(
        b"tmp/",
        EntryType::Directory,
        b"",
        None,
        Meta { mode: 0o1777, ..M },
    );
    l.file_m(
        "home/u/own",
        b"mine",
        Meta {
            mode: 0o600,
            uid: 1000,
            gid: 1001,
            ..M
        },
    );
    l.pax(&[
        ("SCHILY.xattr.user.k", b"v\0\xff"),
        ("SCHILY.xattr.security.capability", &CAP),
    ]);
    l.file_m("bin/ping", b"ping", Meta { mode: 0o755, ..M });
    l.pax(&[("mtime", b"1500000000.25")]);
    l.file("frac", b"x");
    l.symlink("etc/link", "../bin/su");
    l.symlink("abs", "/etc/shadow");
    l.hardlink("bin/su2", "bin/su");
    l.raw(
        b"dev/null",
        EntryType::Char,
        b"",
        None,
        Meta { mode: 0o666, ..M },
    );
    l.raw(
        b"dev/fifo",
        EntryType::Fifo,
        b"",
        None,
        Meta { mode: 0o620, ..M },
    );
    let mut blk = Header::new_gnu();
    blk.set_path("dev/loop9").unwrap();
    blk.set_entry_type(EntryType::Block);
    blk.set_device_major(7).unwrap();
    blk.set_device_minor(9).unwrap();
    blk.set_mode(0o660);
    blk.set_uid(0);
    blk.set_gid(0);
    blk.set_mtime(0);
    blk.set_size(0);
    blk.set_cksum();
    l.b.append(&blk, &b""[..]).unwrap();
    let s = f.apply(&l.bytes()).unwrap();
    assert_eq!(
        (s.files, s.symlinks, s.hardlinks, s.nodes),
        (5, 2, 1, 3),
        "{s:?}"
    );

    assert_eq!(fs::read(f.p("etc/passwd")).unwrap(), b"root:x:0:0\n");
    assert_eq!(meta(&f.p("etc/passwd")).mtime(), 1_234_567_890);
    assert_eq!(meta(&f.p("bin/su")).mode() & 0o7777, 0o4755);
    assert_eq!(meta(&f.p("tmp")).mode() & 0o7777, 0o1777);
    let own = meta(&f.p("home/u/own"));
    assert_eq!(
        (own.uid(), own.gid(), own.mode() & 0o7777),
        (1000, 1001, 0o600)
    );
    // Implicit parents: 0755.
    assert_eq!(meta(&f.p("home/u")).mode() & 0o7777, 0o755);
    assert_eq!(
        xattr::get(f.p("bin/ping"), "user.k").unwrap().unwrap(),
        b"v\0\xff"
    );
    assert_eq!(
        xattr::get(f.p("bin/ping"), "security.capability")
            .unwrap()
            .unwrap(),
        CAP
    );
    let fr = meta(&f.p("frac"));
    assert_eq!((fr.mtime(), fr.mtime_nsec()), (1_500_000_000, 250_000_000));
    assert_eq!(
        fs::read_link(f.p("etc/link")).unwrap(),
        Path::new("../bin/su")
    );
    assert_eq!(fs::read_link(f.p("abs")).unwrap(), Path::new("/etc/shadow"));
    assert_eq!(meta(&f.p("bin/su2")).ino(), meta(&f.p("bin/su")).ino());
    assert_eq!(meta(&f.p("bin/su")).nlink(), 2);
    let null = meta(&f.p("dev/null"));
    assert!(null.file_type().is_char_device());
    assert_eq!(null.mode() & 0o7777, 0o666);
    assert!(meta(&f.p("dev/fifo")).file_type().is_fifo());
    assert_eq!(meta(&f.p("dev/fifo")).mode() & 0o7777, 0o620);
    let lo = meta(&f.p("dev/loop9"));
    assert!(lo.file_type().is_block_device());
    assert_eq!(lo.rdev(), libc::makedev(7, 9));
    // Directory mtimes are set after their children were written.
    assert_eq!(meta(&f.p("etc")).mtime(), M.mtime as i64);
    f.untouched();
}

#[test]
fn zeros_stay_holes_and_gnu_sparse_files_expand() {
    let f = Fixture::new();
    // A sparse source file: 4 KiB data, a hole to 8 MiB, 4 KiB data.
    let src = f.base.join("sparse.src");
    {
        let mut s = fs::File::create(&src).unwrap();
        s.write_all(&[1u8; 4096]).unwrap();
        s.set_len((8 << 20) + 4096).unwrap();
        use std::io::{Seek, SeekFrom};
        s.seek(SeekFrom::Start(8 << 20)).unwrap();
        s.write_all(&[2u8; 4096]).unwrap();
    }
    let mut l = L::new();
    l.b.sparse(true);
    l.b.append_path_with_name(&src, "sparse").unwrap();
    l.file("zeros", &vec![0u8; 1 << 20]);
    let bytes = l.bytes();
    fs::remove_file(&src).unwrap();
    assert!(
        bytes.len() < (2 << 20),
        "the sparse file went in sparse: {}",
        bytes.len()
    );
    f.apply(&bytes).unwrap();
    let data = fs::read(f.p("sparse")).unwrap();
    assert_eq!(data.len(), (8 << 20) + 4096);
    assert!(data[..4096].iter().all(|b| *b == 1));
    assert!(data[4096..8 << 20].iter().all(|b| *b == 0));
    assert!(data[8 << 20..].iter().all(|b| *b == 2));
    assert!(
        meta(&f.p("sparse")).blocks() * 512 < (1 << 20),
        "holes kept"
    );
    assert_eq!(fs::read(f.p("zeros")).unwrap().len(), 1 << 20);
    assert!(
        meta(&f.p("zeros")).blocks() * 512 < 64 << 10,
        "zeros became a hole"
    );
}

#[test]
fn whiteouts_delete_lower_entries() {
    let f = Fixture::new();
    f.apply(
        &L::new()
            .file("a/x", b"x")
            .file("a/y", b"y")
            .file("b/deep/z", b"z")
            .file("c", b"c")
            .bytes(),
    )
    .unwrap();
    let s = f
        .apply(
            &L::new()
                .file("a/.wh.x", b"")
                .file(".wh.b", b"")
                .file(".wh.nothing", b"")
                .bytes(),
        )
        .unwrap();
    assert_eq!(s.whiteouts, 3);
    assert!(!f.p("a/x").exists());
    assert!(f.p("a/y").exists());
    assert!(!f.p("b").exists());
    assert!(f.p("c").exists());
    // The whiteout files themselves are never created.
    assert!(!f.p("a/.wh.x").exists());
    f.untouched();
}

#[test]
fn a_whiteout_spares_entries_of_its_own_layer_before_or_after_it() {
    let f = Fixture::new();
    f.apply(&L::new().file("a", b"old").file("d/lower", b"l").bytes())
        .unwrap();
    // Whiteout first, then the new file (what image builders write): the new one stays.
    f.apply(&L::new().file(".wh.a", b"").file("a", b"new").bytes())
        .unwrap();
    assert_eq!(fs::read(f.p("a")).unwrap(), b"new");
    // The new entry first, then its whiteout: the same layer wins too.
    f.apply(
        &L::new()
            .file("a", b"newer")
            .file("d/mine", b"m")
            .file(".wh.a", b"")
            .file(".wh.d", b"")
            .bytes(),
    )
    .unwrap();
    assert_eq!(fs::read(f.p("a")).unwrap(), b"newer");
    assert!(f.p("d/mine").exists());
    assert!(
        !f.p("d/lower").exists(),
        "the lower child of a whited-out dir goes"
    );
}

#[test]
fn opaque_directories_hide_every_lower_entry() {
    for marker_first in [true, false] {
        let f = Fixture::new();
        f.apply(
            &L::new()
                .file("d/p", b"p")
                .file("d/q", b"q")
                .file("d/sub/r", b"r")
                .file("e/keep", b"k")
                .bytes(),
        )
        .unwrap();
        let mut l = L::new();
        if marker_first {
            l.file("d/.wh..wh..opq", b"");
        }
        l.file("d/new", b"n").file("d/sub/s", b"s");
        if !marker_first {
            l.file("d/.wh..wh..opq", b"");
        }
        let s = f.apply(&l.bytes()).unwrap();
        assert_eq!(s.opaque, 1);
        let mut names: Vec<_> = fs::read_dir(f.p("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["new", "sub"], "marker first: {marker_first}");
        assert!(f.p("d/sub/s").exists() && !f.p("d/sub/r").exists());
        assert!(f.p("e/keep").exists());
        assert!(!f.p("d/.wh..wh..opq").exists());
    }
}

#[test]
fn a_file_becomes_a_directory_and_back_and_links_span_layers() {
    let f = Fixture::new();
    f.apply(&L::new().file("f", b"file").file("base", b"shared").bytes())
        .unwrap();
    f.apply(
        &L::new()
            .dir("f/")
            .file("f/inner", b"i")
            .hardlink("again", "base")
            .bytes(),
    )
    .unwrap();
    assert!(meta(&f.p("f")).is_dir());
    assert_eq!(fs::read(f.p("f/inner")).unwrap(), b"i");
    assert_eq!(meta(&f.p("again")).ino(), meta(&f.p("base")).ino());
    assert_eq!(meta(&f.p("base")).nlink(), 2);
    // As umoci writes it: the file, then whiteouts of the directory's old children.
    f.apply(
        &L::new()
            .file("f", b"file again")
            .file("f/.wh.inner", b"")
            .bytes(),
    )
    .unwrap();
    assert!(meta(&f.p("f")).is_file());
    assert_eq!(fs::read(f.p("f")).unwrap(), b"file again");
    // A directory over a directory keeps its children and takes the new metadata.
    f.apply(&L::new().file("k/child", b"c").bytes()).unwrap();
    f.apply(
        &L::new()
            .raw(
                b"k/",
                EntryType::Directory,
                b"",
                None,
                Meta {
                    mode: 0o700,
                    uid: 5,
                    gid: 6,
                    ..M
                },
            )
            .bytes(),
    )
    .unwrap();
    assert!(f.p("k/child").exists());
    let k = meta(&f.p("k"));
    assert_eq!((k.mode() & 0o7777, k.uid(), k.gid()), (0o700, 5, 6));
    // A symlink replaced by a file: the file is made in the tree, the old target untouched.
    f.apply(&L::new().symlink("s", "../sentinel/file").bytes())
        .unwrap();
    f.apply(&L::new().file("s", b"plain").bytes()).unwrap();
    assert!(meta(&f.p("s")).is_file());
    f.untouched();
}

#[test]
fn paths_out_of_the_tree_are_refused() {
    let f = Fixture::new();
    f.refused(
        &L::new()
            .file("ok", b"")
            .raw(b"../sentinel/evil", EntryType::Regular, b"x", None, M)
            .bytes(),
        "`..`",
    );
    f.refused(
        &L::new()
            .raw(b"/tmp/evil", EntryType::Regular, b"x", None, M)
            .bytes(),
        "absolute",
    );
    f.refused(
        &L::new()
            .raw(b"a/../../evil", EntryType::Regular, b"x", None, M)
            .bytes(),
        "`..`",
    );
    f.refused(
        &L::new()
            .raw(b"../../evil/", EntryType::Directory, b"", None, M)
            .bytes(),
        "`..`",
    );
    // A newline in a hostile name still gives one line.
    f.refused(
        &L::new()
            .raw(b"../a\nb", EntryType::Regular, b"", None, M)
            .bytes(),
        "refused",
    );
}

#[test]
fn writes_through_symlinks_are_refused() {
    let f = Fixture::new();
    let sentinel = f.base.join("sentinel");
    // Relative and absolute symlinks out of the tree, then a write through each.
    f.refused(
        &L::new()
            .symlink("rel", "../sentinel")
            .file("rel/pwned", b"x")
            .bytes(),
        "symlink",
    );
    let abs = sentinel.to_str().unwrap().to_string();
    f.refused(
        &L::new()
            .symlink("abs", &abs)
            .file("abs/pwned", b"x")
            .bytes(),
        "symlink",
    );
    f.refused(
        &L::new().symlink("abs2", &abs).dir("abs2/pwned/").bytes(),
        "symlink",
    );
    f.refused(
        &L::new()
            .symlink("abs3", &abs)
            .symlink("abs3/pwned", "x")
            .bytes(),
        "symlink",
    );
    // In a later layer, over a directory replaced by a symlink.
    f.apply(&L::new().dir("d/").bytes()).unwrap();
    f.refused(
        &L::new().symlink("d", &abs).file("d/pwned", b"x").bytes(),
        "symlink",
    );
    // Even a symlink that points inside the tree is not followed.
    f.refused(
        &L::new()
            .dir("real/")
            .symlink("in", "real")
            .file("in/x", b"x")
            .bytes(),
        "symlink",
    );
    // Whiteouts and opaque markers through a symlink.
    f.refused(
        &L::new().symlink("w", &abs).file("w/.wh.file", b"").bytes(),
        "symlink",
    );
    f.refused(
        &L::new()
            .symlink("o", &abs)
            .file("o/.wh..wh..opq", b"")
            .bytes(),
        "symlink",
    );
    // A symlink in the last component is replaced, never written through.
    f.apply(
        &L::new()
            .symlink("last", &format!("{abs}/file"))
            .file("last", b"overwrite")
            .bytes(),
    )
    .unwrap();
    assert!(meta(&f.p("last")).is_file());
    f.untouched();
}

#[test]
fn hardlinks_out_of_the_tree_are_refused() {
    let f = Fixture::new();
    let outside = f.base.join("sentinel/file");
    f.refused(&L::new().hardlink("h", "../sentinel/file").bytes(), "`..`");
    f.refused(
        &L::new().hardlink("h", outside.to_str().unwrap()).bytes(),
        "absolute",
    );
    f.refused(
        &L::new()
            .symlink("s", f.base.join("sentinel").to_str().unwrap())
            .hardlink("h", "s/file")
            .bytes(),
        "symlink",
    );
    f.refused(&L::new().hardlink("h", "missing").bytes(), "does not exist");
    f.refused(
        &L::new().dir("dd/").hardlink("h", "dd").bytes(),
        "directory",
    );
    // A hardlink to a symlink links the symlink itself.
    f.apply(
        &L::new()
            .symlink("sl", outside.to_str().unwrap())
            .hardlink("h2", "sl")
            .bytes(),
    )
    .unwrap();
    assert!(meta(&f.p("h2")).file_type().is_symlink());
    f.untouched();
}

#[test]
fn whiteouts_of_dot_dot_and_friends_are_refused() {
    let f = Fixture::new();
    f.apply(&L::new().file("a/x", b"x").bytes()).unwrap();
    f.refused(&L::new().file("a/.wh..", b"").bytes(), "whiteout");
    f.refused(&L::new().file("a/.wh...", b"").bytes(), "whiteout");
    f.refused(&L::new().file("a/.wh.", b"").bytes(), "whiteout");
    f.refused(&L::new().file(".wh..", b"").bytes(), "whiteout");
    assert!(f.p("a/x").exists());
    // aufs bookkeeping is ignored.
    f.apply(
        &L::new()
            .file(".wh..wh.plnk", b"")
            .file(".wh..wh.aufs", b"")
            .bytes(),
    )
    .unwrap();
    assert!(f.p("a/x").exists());
}

#[test]
fn tar_bombs_hit_the_limits() {
    let f = Fixture::with(ApplyOptions {
        max_layer_bytes: 1 << 20,
        max_layer_entries: 100,
        keep_owners: true,
    });
    // 4 MiB of zeros, gzipped to a few KiB.
    let layer = L::new().file("bomb", &vec![0u8; 4 << 20]).bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 64 << 10);
    let tar = lazyblk_convert::layer::decompress(&gz[..], None).unwrap();
    let e = f.tree.apply_layer("1/1", tar).unwrap_err();
    assert!(matches!(e, Error::Limit { .. }), "{e}");
    assert!(e.to_string().contains("--max-layer-bytes"), "{e}");
    let mut many = L::new();
    for i in 0..150 {
        many.file(&format!("f{i}"), b"");
    }
    let e = f.apply(&many.bytes()).unwrap_err();
    assert!(e.to_string().contains("--max-layer-entries"), "{e}");
    f.untouched();
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let f = Fixture::new();
    let mut l = L::new().file("a", b"abc").bytes();
    l[100] ^= 0xff; // the mode field: bad checksum
    let e = f.apply(&l).unwrap_err();
    assert!(e.to_string().contains("not a valid tar"), "{e}");
    assert!(f.apply(&[0x41; 3000]).is_err());
    // The tar reader quotes bad fields: still one line.
    let mut l = L::new().file("a", b"abc").bytes();
    l[148..156].copy_from_slice(b"\n\r\x1b\n\n\n\n\n");
    let e = f.apply(&l).unwrap_err().to_string();
    assert!(
        !e.contains('\n') && !e.contains('\r') && !e.contains('\x1b'),
        "{e:?}"
    );
    // Unknown entry types are refused.
    let e = f
        .apply(
            &L::new()
                .raw(b"v", EntryType::new(b'V'), b"", None, M)
                .bytes(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("unsupported"), "{e}");
    f.untouched();
}

#[test]
fn the_root_entry_sets_the_root_and_cannot_be_a_file() {
    let f = Fixture::new();
    f.apply(
        &L::new()
            .raw(
                b"./",
                EntryType::Directory,
                b"",
                None,
                Meta {
                    mode: 0o750,
                    uid: 3,
                    gid: 4,
                    ..M
                },
            )
            .bytes(),
    )
    .unwrap();
    let r = meta(&f.root());
    assert_eq!((r.mode() & 0o7777, r.uid(), r.gid()), (0o750, 3, 4));
    f.refused(
        &L::new()
            .raw(b".", EntryType::Regular, b"x", None, M)
            .bytes(),
        "root",
    );
    fs::set_permissions(f.root(), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_stream_ending_right_after_the_last_data_is_accepted_a_shorter_one_is_not() {
    // What `umoci insert` 0.4.7 writes: no padding and no end-of-archive blocks.
    let mut l = L::new().file("a", b"first").file("b", b"last").bytes();
    let end = 512 * 3 + 4;
    l.truncate(end);
    let f = Fixture::new();
    f.apply(&l).unwrap();
    assert_eq!(fs::read(f.p("b")).unwrap(), b"last");
    // Cut inside the data: refused.
    let f = Fixture::new();
    let e = f.apply(&l[..end - 2]).unwrap_err();
    assert!(e.to_string().contains("\"b\""), "{e}");
}
