//! A fake [`LazyImages`] for tests: images by `cri.image-ref`, attach = a directory with known
//! files, and switches for a registry that is down and an attach that fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::{LazyImage, LazyImages, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST};

/// The file [`FakeImages::attach`] writes into a mountpoint: the image's reference.
pub const MARKER: &str = "lazy-image";

/// The file [`FakeImages::materialize`] writes: `<image ref> <manifest> <layer>` of the labels.
pub const MATERIALIZED: &str = "materialized";

/// A fake lazy-image provider.
#[derive(Default)]
pub struct FakeImages {
    images: Mutex<HashMap<String, LazyImage>>,
    /// `find` fails (the registry is down).
    pub find_down: AtomicBool,
    /// `attach` fails.
    pub attach_fails: AtomicBool,
    /// `materialize` fails.
    pub materialize_fails: AtomicBool,
    calls: Mutex<Vec<String>>,
}

impl FakeImages {
    /// No images.
    pub fn new() -> FakeImages {
        FakeImages::default()
    }

    /// Serve `image` for Prepares whose `cri.image-ref` label is `image_ref`.
    pub fn add(&self, image_ref: &str, image: LazyImage) {
        self.images
            .lock()
            .unwrap()
            .insert(image_ref.to_string(), image);
    }

    /// The calls so far, as `find <ref>`, `attach <name>`, `release <name>`,
    /// `materialize <layer>`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// How many calls start with `prefix` (`"attach "`, `"release img"`...).
    pub fn count(&self, prefix: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
}

impl LazyImages for FakeImages {
    fn find(&self, labels: &HashMap<String, String>) -> Result<Option<LazyImage>, String> {
        let r = labels.get(LABEL_IMAGE_REF).cloned().unwrap_or_default();
        self.log(format!("find {r}"));
        if self.find_down.load(Ordering::SeqCst) {
            return Err("registry down".into());
        }
        Ok(self.images.lock().unwrap().get(&r).cloned())
    }

    fn attach(&self, image: &LazyImage, mountpoint: &Path) -> Result<(), String> {
        self.log(format!("attach {}", image.name));
        if self.attach_fails.load(Ordering::SeqCst) {
            return Err("no device".into());
        }
        let w = |p: PathBuf, b: &str| std::fs::write(p, b).map_err(|e| e.to_string());
        w(mountpoint.join(MARKER), &image.reference)?;
        std::fs::create_dir_all(mountpoint.join("etc")).map_err(|e| e.to_string())?;
        w(mountpoint.join("etc/os-release"), "ID=fake\n")
    }

    fn materialize(&self, labels: &HashMap<String, String>, dir: &Path) -> Result<(), String> {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        self.log(format!("materialize {}", get(LABEL_LAYER_DIGEST)));
        if self.materialize_fails.load(Ordering::SeqCst) {
            return Err("no registry".into());
        }
        let what = format!(
            "{} {} {}",
            get(LABEL_IMAGE_REF),
            get(LABEL_MANIFEST_DIGEST),
            get(LABEL_LAYER_DIGEST)
        );
        std::fs::write(dir.join(MATERIALIZED), what).map_err(|e| e.to_string())
    }

    fn release(&self, image: &LazyImage, mountpoint: &Path) -> Result<(), String> {
        self.log(format!("release {}", image.name));
        for p in ["etc/os-release", "etc", MARKER] {
            let p = mountpoint.join(p);
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
        }
        Ok(())
    }
}
