//! Whiteouts and opaque directories: two layers built from `arbitrary` operations over a tiny
//! name space (so names collide, and `..`, `.wh.` names and symlinks show up), applied in turn.
//! Never panics, never writes outside the tree, and when the upper layer applies: no `.wh.`
//! name is left in the tree, a whiteout's target is gone unless the upper layer wrote it, and an
//! opaque directory holds only what the upper layer wrote in it.

use arbitrary::Arbitrary;
use lazyblk_convert::{ApplyOptions, Tree};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use tar::{EntryType, Header};

static N: AtomicU64 = AtomicU64::new(0);

const NAMES: [&str; 8] = ["a", "b", "c", "..", ".", ".wh.a", ".wh..wh..opq", ".wh.."];

#[derive(Arbitrary, Debug)]
enum Kind {
    File,
    Dir,
    Symlink(u8),
    Hardlink(u8, u8),
    Whiteout,
    Opaque,
}

#[derive(Arbitrary, Debug)]
struct Op {
    dir: u8,
    name: u8,
    kind: Kind,
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    lower: Vec<Op>,
    upper: Vec<Op>,
}

fn name(i: u8) -> &'static str {
    NAMES[i as usize % NAMES.len()]
}

/// `dir` picks a parent among "", "a", "b", "a/b"; the op's path.
fn path(dir: u8, n: &str) -> String {
    match dir % 4 {
        0 => n.to_string(),
        1 => format!("a/{n}"),
        2 => format!("b/{n}"),
        _ => format!("a/b/{n}"),
    }
}

fn header(path: &str, t: EntryType, link: Option<&str>) -> Header {
    let mut h = Header::new_gnu();
    let g = h.as_gnu_mut().unwrap();
    g.name[..path.len()].copy_from_slice(path.as_bytes());
    if let Some(l) = link {
        g.linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_entry_type(t);
    h.set_size(0);
    h.set_mode(if t == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

/// The layer's bytes, the paths it writes, its whiteout targets and its opaque directories.
fn layer(ops: &[Op]) -> (Vec<u8>, HashSet<String>, Vec<String>, Vec<String>) {
    let mut b = tar::Builder::new(Vec::new());
    let (mut wrote, mut wh, mut opq) = (HashSet::new(), Vec::new(), Vec::new());
    for op in ops.iter().take(64) {
        let n = name(op.name);
        let (p, t, link) = match &op.kind {
            Kind::File => (path(op.dir, n), EntryType::Regular, None),
            Kind::Dir => (path(op.dir, n), EntryType::Directory, None),
            Kind::Symlink(t) => (
                path(op.dir, n),
                EntryType::Symlink,
                Some(["..", "/", "a", "../.."][*t as usize % 4].to_string()),
            ),
            Kind::Hardlink(d, t) => (path(op.dir, n), EntryType::Link, Some(path(*d, name(*t)))),
            Kind::Whiteout => {
                wh.push(path(op.dir, n));
                (path(op.dir, &format!(".wh.{n}")), EntryType::Regular, None)
            }
            Kind::Opaque => {
                opq.push(path(op.dir, ""));
                (path(op.dir, ".wh..wh..opq"), EntryType::Regular, None)
            }
        };
        if !p.contains(".wh.") {
            wrote.insert(p.trim_end_matches('/').to_string());
        }
        let h = header(&p, t, link.as_deref());
        b.append(&h, &b""[..]).unwrap();
    }
    (b.into_inner().unwrap(), wrote, wh, opq)
}

/// Whether `rel` exists in the tree as a tree path: every parent on the way a real directory
/// (never through a symlink, as the applier walks), the last component of any kind.
fn exists_nofollow(root: &std::path::Path, rel: &str) -> bool {
    let comps: Vec<&str> = rel.split('/').collect();
    let mut cur = root.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Err(_) => return false,
            Ok(m) if i + 1 < comps.len() && !m.is_dir() => return false,
            Ok(_) => {}
        }
    }
    true
}

fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        }
    }
}

/// The check, on one input.
pub fn run(input: Input) {
    let base = std::env::temp_dir().join(format!(
        "lazyblk-fuzz-wh.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let root = base.join("tree");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(base.join("sentinel")).unwrap();
    let tree = Tree::open(&root, ApplyOptions::default()).unwrap();
    let (lower, ..) = layer(&input.lower);
    let _ = tree.apply_layer("lower", &lower[..]);
    let (upper, wrote, wh, opq) = layer(&input.upper);
    if tree.apply_layer("upper", &upper[..]).is_ok() {
        let mut all = Vec::new();
        walk(&root, &root, &mut all);
        for p in &all {
            assert!(
                !p.split('/').any(|c| c.starts_with(".wh.")),
                "{p} left in {all:?}"
            );
        }
        for w in &wh {
            let written =
                wrote.contains(w) || wrote.iter().any(|x| x.starts_with(&format!("{w}/")));
            if !written && !w.split('/').any(|c| c == ".." || c == "." || c.is_empty()) {
                assert!(
                    !exists_nofollow(&root, w),
                    "{w} survived its whiteout: {all:?}"
                );
            }
        }
        for d in &opq {
            let d = d.trim_end_matches('/');
            for p in &all {
                let inside = if d.is_empty() {
                    !p.is_empty()
                } else {
                    p.starts_with(&format!("{d}/"))
                };
                if inside {
                    let up = wrote.contains(p.as_str())
                        || wrote.iter().any(|x| x.starts_with(&format!("{p}/")));
                    assert!(up, "{p} survived the opaque {d:?}: {all:?}");
                }
            }
        }
    }
    assert_eq!(std::fs::read_dir(base.join("sentinel")).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&base);
}
