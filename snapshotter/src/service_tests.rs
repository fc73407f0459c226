//! The service without the socket: Prepare/View/Commit/Remove/Mounts/List/Usage/Cleanup, the
//! remote handshake with the fake, fallback, restart. No mounts are made: the returned mount
//! descriptions are checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use containerd_snapshots::api::types::Mount;

use crate::testing::{FakeImages, MARKER};
use crate::*;

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn open(root: &Path, fake: &Arc<FakeImages>) -> Snapshotter {
    Snapshotter::open(root, fake.clone()).unwrap()
}

const REF: &str = "registry.test/app:1";

fn img() -> LazyImage {
    LazyImage {
        reference: "registry.test/app-lazy@sha256:abcd".into(),
        name: "abcd".into(),
    }
}

/// The labels containerd's CRI plugin puts on layer `i` (0 = bottom) of `n` layers.
fn layer_labels(chain: &str, i: usize, n: usize) -> HashMap<String, String> {
    let layers: Vec<String> = (i..n).map(|j| format!("sha256:l{j}")).collect();
    let layer = format!("sha256:l{i}");
    labels(&[
        (LABEL_SNAPSHOT_REF, chain),
        (LABEL_IMAGE_REF, REF),
        (LABEL_MANIFEST_DIGEST, "sha256:m"),
        (LABEL_LAYER_DIGEST, &layer),
        (LABEL_IMAGE_LAYERS, &layers.join(",")),
    ])
}

/// Pull an `n`-layer image as containerd does: Prepare each layer with its labels; on
/// ALREADY_EXISTS go on, else Commit (the tar would be applied in between). Returns the chain
/// ids.
fn pull(s: &Snapshotter, n: usize, tag: &str) -> (Vec<String>, usize) {
    let mut parent = String::new();
    let mut chains = Vec::new();
    let mut remote = 0;
    for i in 0..n {
        let chain = format!("sha256:{tag}c{i}");
        let key = format!("extract-{i} {chain}");
        match s.inner().prepare(&key, &parent, layer_labels(&chain, i, n)) {
            Err(Error::AlreadyExists(_)) => remote += 1,
            Ok(_) => s
                .inner()
                .commit(&chain, &key, layer_labels(&chain, i, n))
                .unwrap(),
            Err(e) => panic!("prepare {i}: {e}"),
        }
        // containerd then looks the layer up by its label and parent.
        let f = format!(r#"labels."containerd.io/snapshot.ref"=={chain},parent=={parent:?}"#);
        let found = s.inner().list(&[f]).unwrap();
        assert_eq!(found.len(), 1, "layer {i} found by containerd's filter");
        assert_eq!(found[0].name, chain);
        parent = chain.clone();
        chains.push(chain);
    }
    (chains, remote)
}

fn only(m: Vec<Mount>) -> Mount {
    assert_eq!(m.len(), 1);
    m.into_iter().next().unwrap()
}

fn lowerdir(m: &Mount) -> Vec<PathBuf> {
    let o = m
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("lowerdir");
    o.split(':').map(PathBuf::from).collect()
}

#[test]
fn local_snapshots_and_mount_shapes() {
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    let s = open(d.path(), &fake);
    let root = s.root().to_path_buf();
    let i = s.inner();
    let m = only(i.prepare("a", "", labels(&[])).unwrap());
    assert_eq!(m.r#type, "bind");
    assert_eq!(m.options, ["rw", "rbind"]);
    assert_eq!(PathBuf::from(&m.source), root.join("snapshots/1/fs"));
    assert!(root.join("snapshots/1/fs").is_dir() && root.join("snapshots/1/work").is_dir());
    std::fs::write(root.join("snapshots/1/fs/file"), vec![1u8; 10000]).unwrap();
    assert!(matches!(
        i.prepare("a", "", labels(&[])),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        i.prepare("x", "a", labels(&[])),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        i.prepare("x", "nope", labels(&[])),
        Err(Error::NotFound(_))
    ));
    i.commit("c1", "a", labels(&[("k", "v")])).unwrap();
    assert!(matches!(i.mounts("c1"), Err(Error::FailedPrecondition(_))));
    let u = i.usage("c1").unwrap();
    assert!(u.inodes == 2 && u.size >= 8192, "{u:?}");

    let m = only(i.prepare("b", "c1", labels(&[])).unwrap());
    assert_eq!(m.r#type, "overlay");
    assert!(m.options.contains(&format!(
        "upperdir={}",
        root.join("snapshots/2/fs").display()
    )));
    assert!(m.options.contains(&format!(
        "workdir={}",
        root.join("snapshots/2/work").display()
    )));
    assert_eq!(lowerdir(&m), [root.join("snapshots/1/fs")]);
    assert_eq!(i.mounts("b").unwrap(), vec![m]);
    i.commit("c2", "b", labels(&[])).unwrap();

    // Views: one lower = read-only bind; two = overlay of lowers only; none = ro bind of own.
    let m = only(i.view("v1", "c1", labels(&[])).unwrap());
    assert_eq!(
        (m.r#type.as_str(), m.options.clone()),
        ("bind", vec!["ro".into(), "rbind".into()])
    );
    assert_eq!(PathBuf::from(&m.source), root.join("snapshots/1/fs"));
    let m = only(i.view("v2", "c2", labels(&[])).unwrap());
    assert_eq!(m.r#type, "overlay");
    assert!(!m.options.iter().any(|o| o.starts_with("upperdir")));
    assert_eq!(
        lowerdir(&m),
        [root.join("snapshots/2/fs"), root.join("snapshots/1/fs")]
    );
    let m = only(i.view("v0", "", labels(&[])).unwrap());
    assert_eq!(m.options, ["ro", "rbind"]);
    assert!(matches!(
        i.commit("cv", "v1", labels(&[])),
        Err(Error::FailedPrecondition(_))
    ));

    // List and its filters.
    let names = |f: &[&str]| -> Vec<String> {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        let mut v: Vec<String> = i.list(&f).unwrap().into_iter().map(|x| x.name).collect();
        v.sort();
        v
    };
    assert_eq!(names(&[]), ["c1", "c2", "v0", "v1", "v2"]);
    assert_eq!(names(&["kind==committed"]), ["c1", "c2"]);
    assert_eq!(names(&["parent==c1"]), ["c2", "v1"]);
    assert_eq!(names(&["labels.k==v"]), ["c1"]);
    assert_eq!(names(&["name==v0", "name==v1"]), ["v0", "v1"]);
    assert!(matches!(
        i.list(&["name~=v".into()]),
        Err(Error::InvalidArgument(_))
    ));

    // Stat and Update.
    let st = i.stat("c1").unwrap();
    assert_eq!(st.kind, containerd_snapshots::Kind::Committed);
    assert_eq!(st.labels, labels(&[("k", "v")]));
    let mut upd = i.stat("c1").unwrap();
    upd.labels = labels(&[("containerd.io/gc.root", "x")]);
    let got = i
        .update(upd, Some(vec!["labels.containerd.io/gc.root".into()]))
        .unwrap();
    assert_eq!(
        got.labels,
        labels(&[("k", "v"), ("containerd.io/gc.root", "x")])
    );
    assert!(matches!(i.stat("zz"), Err(Error::NotFound(_))));

    // Remove: refused with children, leaves first; the directories go.
    assert!(matches!(i.remove("c1"), Err(Error::FailedPrecondition(_))));
    for k in ["v0", "v1", "v2", "c2", "c1"] {
        i.remove(k).unwrap();
    }
    assert!(!root.join("snapshots/1").exists() && !root.join("snapshots/2").exists());
    assert!(matches!(i.remove("c1"), Err(Error::NotFound(_))));
    // Ids are not reused after a restart either.
    drop(s);
    let s = open(d.path(), &fake);
    only(s.inner().prepare("n", "", labels(&[])).unwrap());
    assert_eq!(s.inner().stat("n").unwrap().name, "n");
    assert!(
        root.join("snapshots/6").is_dir(),
        "ids 1..=5 were used before"
    );
}

#[test]
fn remote_handshake_top_release_and_restart() {
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    fake.add(REF, img());
    let s = open(d.path(), &fake);
    let root = s.root().to_path_buf();
    let (chains, remote) = pull(&s, 3, "a");
    assert_eq!(remote, 3, "every layer answered ALREADY_EXISTS");
    assert_eq!(fake.count("attach "), 1, "one attach per image");
    let mnt = root.join("images/abcd/mnt");
    assert_eq!(
        std::fs::read_to_string(mnt.join(MARKER)).unwrap(),
        img().reference
    );
    // Remote snapshots keep containerd's labels, and say which image.
    let top = s.inner().stat(&chains[2]).unwrap();
    assert_eq!(top.kind, containerd_snapshots::Kind::Committed);
    assert_eq!(top.parent, chains[1]);
    assert_eq!(top.labels[LABEL_SNAPSHOT_REF], chains[2]);
    assert_eq!(top.labels[LABEL_LAZY_IMAGE], img().reference);
    assert_eq!(s.inner().usage(&chains[2]).unwrap().size, 0);
    // A second pull of the same image (another namespace): ALREADY_EXISTS at once.
    let again = s
        .inner()
        .prepare("k2/extract x", "", layer_labels(&chains[0], 0, 3));
    assert!(matches!(again, Err(Error::AlreadyExists(_))));

    // A container over the top: the image's mount is the only lower dir.
    let m = only(s.inner().prepare("ctr", &chains[2], labels(&[])).unwrap());
    assert_eq!(m.r#type, "overlay");
    assert_eq!(lowerdir(&m), vec![mnt.clone()]);
    // A view of the top: a read-only bind of the image.
    let v = only(s.inner().view("view", &chains[2], labels(&[])).unwrap());
    assert_eq!(
        (v.r#type.as_str(), PathBuf::from(&v.source)),
        ("bind", mnt.clone())
    );
    // An intermediate layer has no tree until it is unpacked; when that fails: a clear
    // error naming the layer and the image, nothing created.
    fake.materialize_fails.store(true, Ordering::SeqCst);
    match s.inner().prepare("ctr2", &chains[1], labels(&[])) {
        Err(Error::Unavailable(msg)) => {
            assert!(
                msg.contains(&chains[1]) && msg.contains(&img().reference),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.inner().stat("ctr2"), Err(Error::NotFound(_))));
    fake.materialize_fails.store(false, Ordering::SeqCst);

    // Restart: the image is attached again (registry down: find is not needed).
    drop(s);
    fake.find_down.store(true, Ordering::SeqCst);
    let s = open(d.path(), &fake);
    assert_eq!(fake.count("attach "), 2);
    assert_eq!(s.inner().list(&[]).unwrap().len(), 5);
    assert_eq!(
        lowerdir(&only(s.inner().mounts("ctr").unwrap())),
        vec![mnt.clone()]
    );

    // Removal: the image is released with its top layer (the only one mounted from it; the
    // placeholders below are unpacked from the registry if ever needed).
    for k in ["ctr", "view"] {
        s.inner().remove(k).unwrap();
        assert_eq!(fake.count("release "), 0);
    }
    s.inner().remove(&chains[2]).unwrap();
    assert_eq!(fake.count("release abcd"), 1);
    for k in [&chains[1], &chains[0]] {
        s.inner().remove(k).unwrap();
    }
    assert_eq!(fake.count("release abcd"), 1);
    assert!(!root.join("images/abcd").exists());
}

#[test]
fn fallback_paths() {
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    let s = open(d.path(), &fake);
    // No lazy image: ordinary snapshots, committed by containerd.
    let (_, remote) = pull(&s, 2, "n");
    assert_eq!(remote, 0);
    // No snapshot.ref label: find is not even asked.
    let calls = fake.calls().len();
    only(
        s.inner()
            .prepare("plain", "", labels(&[(LABEL_IMAGE_REF, REF)]))
            .unwrap(),
    );
    assert_eq!(fake.calls().len(), calls);
    // Registry down: fallback.
    fake.add(REF, img());
    fake.find_down.store(true, Ordering::SeqCst);
    let (_, remote) = pull(&s, 2, "d");
    assert_eq!(remote, 0);
    // Attach fails: fallback too.
    fake.find_down.store(false, Ordering::SeqCst);
    fake.attach_fails.store(true, Ordering::SeqCst);
    let (_, remote) = pull(&s, 2, "f");
    assert_eq!(remote, 0);
    // A name that is not a file name: fallback.
    fake.attach_fails.store(false, Ordering::SeqCst);
    fake.add(
        REF,
        LazyImage {
            reference: "x".into(),
            name: "../evil".into(),
        },
    );
    let (_, remote) = pull(&s, 1, "e");
    assert_eq!(remote, 0);
    assert_eq!(fake.count("attach ../evil"), 0);
}

#[test]
fn attach_failing_at_restart_is_not_fatal() {
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    fake.add(REF, img());
    let s = open(d.path(), &fake);
    let (chains, _) = pull(&s, 1, "r");
    only(s.inner().prepare("ctr", &chains[0], labels(&[])).unwrap());
    drop(s);
    fake.attach_fails.store(true, Ordering::SeqCst);
    let s = open(d.path(), &fake);
    assert_eq!(
        s.inner().list(&[]).unwrap().len(),
        2,
        "snapshots stay listed"
    );
    assert!(matches!(
        s.inner().mounts("ctr"),
        Err(Error::Unavailable(_))
    ));
    // The device is back: Mounts attaches it.
    fake.attach_fails.store(false, Ordering::SeqCst);
    only(s.inner().mounts("ctr").unwrap());
    // At the pull, at the restart, the failed Mounts, this one.
    assert_eq!(fake.count("attach "), 4);
}

#[test]
fn placeholder_reached_through_another_image_is_unpacked_once() {
    // Image B's layers are a prefix of lazy image A's: A pulled first (remote, B's top chain is
    // A's intermediate placeholder), then B: containerd finds B's top existing and skips it.
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    fake.add(REF, img());
    let s = open(d.path(), &fake);
    let (chains, _) = pull(&s, 3, "p");
    // A provider that cannot unpack: a clear error, nothing created.
    fake.materialize_fails
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = s
        .inner()
        .prepare("ctr-b", &chains[1], labels(&[]))
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(&chains[1]), "{err}");
    assert!(s.inner().stat("ctr-b").is_err());
    fake.materialize_fails
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // Now it unpacks the layers up to that one into the placeholder's own directory, the only
    // lower dir of B's container (nothing of A's top).
    let m = only(s.inner().prepare("ctr-b", &chains[1], labels(&[])).unwrap());
    let lowers = lowerdir(&m);
    assert_eq!(lowers.len(), 1, "{lowers:?}");
    let got = std::fs::read_to_string(lowers[0].join(crate::testing::MATERIALIZED)).unwrap();
    assert_eq!(got, "registry.test/app:1 sha256:m sha256:l1");
    assert_eq!(fake.count("materialize "), 2);
    // A second container over it, a restart: never unpacked again.
    s.inner()
        .prepare("ctr-b2", &chains[1], labels(&[]))
        .unwrap();
    drop(s);
    let s = open(d.path(), &fake);
    let m = only(s.inner().mounts("ctr-b").unwrap());
    assert_eq!(lowerdir(&m), lowers);
    assert_eq!(fake.count("materialize "), 2);
    // A's own container still sees A's whole tree.
    let m = only(s.inner().prepare("ctr-a", &chains[2], labels(&[])).unwrap());
    assert!(lowerdir(&m)[0].join(crate::testing::MARKER).exists());
    // Removing B's containers and the materialized layer removes its directory.
    for k in ["ctr-b", "ctr-b2", "ctr-a", &chains[2], &chains[1]] {
        s.inner().remove(k).unwrap();
    }
    assert!(!lowers[0].exists());
}

#[test]
fn same_chain_other_parent_falls_back() {
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    fake.add(REF, img());
    let s = open(d.path(), &fake);
    only(s.inner().prepare("base", "", labels(&[])).unwrap());
    s.inner().commit("p", "base", labels(&[])).unwrap();
    // A committed snapshot already named by the chain id, with a different parent.
    only(s.inner().prepare("k", "", labels(&[])).unwrap());
    s.inner().commit("sha256:x", "k", labels(&[])).unwrap();
    let r = s
        .inner()
        .prepare("extract", "p", layer_labels("sha256:x", 0, 1));
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(fake.count("find "), 0);
}

#[test]
fn cleanup_removes_unnamed_dirs_only() {
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    let s = open(d.path(), &fake);
    let root = s.root().to_path_buf();
    only(s.inner().prepare("keep", "", labels(&[])).unwrap());
    std::fs::create_dir_all(root.join("snapshots/999/fs/deep")).unwrap();
    std::fs::create_dir_all(root.join("snapshots/new-123")).unwrap();
    std::fs::create_dir_all(root.join("images/gone/mnt")).unwrap();
    s.inner().cleanup().unwrap();
    assert!(root.join("snapshots/1/fs").is_dir());
    assert!(!root.join("snapshots/999").exists());
    assert!(!root.join("snapshots/new-123").exists());
    assert!(!root.join("images/gone").exists());
    // A directory left by a crash keeps its id out of use after a restart.
    std::fs::create_dir_all(root.join("snapshots/50")).unwrap();
    drop(s);
    let s = open(d.path(), &fake);
    only(s.inner().prepare("next", "", labels(&[])).unwrap());
    assert!(root.join("snapshots/51/fs").is_dir());
}

#[test]
fn one_snapshotter_per_root() {
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    let _s = open(d.path(), &fake);
    assert!(matches!(
        Snapshotter::open(d.path(), fake.clone()),
        Err(Error::InUse(_))
    ));
}

/// Real overlay mounts of what Prepare returns, as root: a container over a lazy image's top
/// sees the image's files and writes into its own upper dir.
#[test]
fn real_overlay_over_a_lazy_image() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for mount(2)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeImages::new());
    fake.add(REF, img());
    let s = open(&d.path().join("root"), &fake);
    let (chains, _) = pull(&s, 2, "m");
    let m = only(s.inner().prepare("ctr", &chains[1], labels(&[])).unwrap());
    let target = d.path().join("rootfs");
    std::fs::create_dir(&target).unwrap();
    let c = |x: &str| std::ffi::CString::new(x).unwrap();
    let opts = c(&m.options.join(","));
    let (src, ty, tgt) = (c(&m.source), c(&m.r#type), c(&target.to_string_lossy()));
    // SAFETY: valid NUL-terminated strings that live across the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if r != 0 {
        eprintln!(
            "skipped: overlay mount failed: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let seen = std::fs::read_to_string(target.join("etc/os-release"));
    let wrote = std::fs::write(target.join("new"), b"x");
    // SAFETY: a path string as above.
    unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(seen.unwrap(), "ID=fake\n");
    wrote.unwrap();
    let upper = s.root().join("snapshots").join(
        PathBuf::from(
            m.options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap(),
        )
        .parent()
        .unwrap()
        .file_name()
        .unwrap(),
    );
    assert!(upper.join("fs/new").exists());
}
