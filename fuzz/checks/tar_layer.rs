//! `Tree::apply_layer` on arbitrary bytes (through `layer::decompress`, so gzip and zstd
//! streams too) into a fresh temp tree: never panics, and never writes outside the tree: a
//! sentinel directory beside it keeps exactly its one file, unchanged, with one link.

use lazyblk_convert::{layer, ApplyOptions, Tree};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};

static N: AtomicU64 = AtomicU64::new(0);

/// The check, on one input.
pub fn run(data: &[u8]) {
    let base = std::env::temp_dir().join(format!(
        "lazyblk-fuzz-tar.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(base.join("tree")).unwrap();
    std::fs::create_dir_all(base.join("sentinel")).unwrap();
    std::fs::write(base.join("sentinel/file"), b"keep").unwrap();
    let opts = ApplyOptions {
        max_layer_bytes: 4 << 20,
        max_layer_entries: 2000,
        keep_owners: true,
    };
    let tree = Tree::open(&base.join("tree"), opts).unwrap();
    if let Ok(r) = layer::decompress(data, None) {
        if let Err(e) = tree.apply_layer("fuzz", r) {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
    let names: Vec<_> = std::fs::read_dir(base.join("sentinel"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["file"]);
    let md = std::fs::metadata(base.join("sentinel/file")).unwrap();
    assert_eq!(md.nlink(), 1);
    assert_eq!(std::fs::read(base.join("sentinel/file")).unwrap(), b"keep");
    let mut beside: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    beside.sort();
    assert_eq!(beside, ["sentinel", "tree"]);
    if std::fs::remove_dir_all(&base).is_err() {
        // Not root: a layer can leave directories we may not enter or change.
        let _ = std::process::Command::new("chmod")
            .arg("-R")
            .arg("u+rwx")
            .arg(&base)
            .status();
        let _ = std::fs::remove_dir_all(&base);
    }
}
