//! The snapshotter: the `containerd_snapshots::Snapshotter` implementation over the metadata
//! store, the directory layout and the remote-snapshot handshake.
//!
//! Every call runs synchronously on one of tokio's blocking threads (`Inner`'s methods), so
//! the metadata writes (fsync) and [`LazyImages`] calls never stall the async runtime. Locks:
//! one per lazy image (held across attach/release and the metadata change that depends on
//! them), then the metadata lock; never the other way round. `find` runs without any lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Usage};
use tracing::{debug, info, warn};

use crate::filter::Filter;
use crate::meta::{Kind, MetaStore, Remote, Snapshot};
use crate::mounts::{mounts, Shape};
use crate::{
    Error, Lazy, LazyImage, LABEL_IMAGE_LAYERS, LABEL_LAYER_DIGEST, LABEL_LAZY_IMAGE,
    LABEL_SNAPSHOT_REF,
};

#[derive(Default)]
struct ImageState {
    attached: bool,
}

pub(crate) struct Inner {
    root: PathBuf,
    lazy: Lazy,
    meta: Mutex<MetaStore>,
    images: Mutex<HashMap<String, Arc<Mutex<ImageState>>>>,
    /// One placeholder unpacked at a time.
    materializing: Mutex<()>,
    index_off: bool,
    root_dev: u64,
    _lock: File,
}

/// The snapshotter service (`containerd_snapshots::Snapshotter`) over one root.
#[derive(Clone)]
pub struct Snapshotter {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn mkdir(path: &Path, mode: u32) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(Error::io(format!("mkdir {}", path.display()), e)),
    }
}

fn to_hash(l: &BTreeMap<String, String>) -> HashMap<String, String> {
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn info(name: &str, s: &Snapshot) -> Info {
    Info {
        kind: match s.kind {
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: name.to_string(),
        parent: s.parent.clone(),
        labels: to_hash(&s.labels),
        created_at: s.created,
        updated_at: s.updated,
    }
}

/// Whether the layer these labels describe is its image's top layer: `cri.image-layers` lists
/// the layers from this one to the top, so a single entry (this layer) is the top.
fn is_top(labels: &HashMap<String, String>) -> bool {
    let Some(layers) = labels.get(LABEL_IMAGE_LAYERS) else {
        return false;
    };
    let list: Vec<&str> = layers.split(',').filter(|s| !s.is_empty()).collect();
    match (list.as_slice(), labels.get(LABEL_LAYER_DIGEST)) {
        ([only], Some(d)) => only == d,
        ([_], None) => true,
        _ => false,
    }
}

/// What the lower dirs of a snapshot are.
enum Lower {
    Dir(PathBuf),
    Image(LazyImage),
    /// A placeholder not yet materialized (its name): see [`Inner::materialize`].
    Placeholder(String),
}

impl Inner {
    fn fs_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string()).join("fs")
    }
    fn work_dir(&self, id: u64) -> PathBuf {
        self.root
            .join("snapshots")
            .join(id.to_string())
            .join("work")
    }
    fn mountpoint(&self, image: &LazyImage) -> PathBuf {
        self.root.join("images").join(&image.name).join("mnt")
    }
    fn image_state(&self, name: &str) -> Arc<Mutex<ImageState>> {
        lock(&self.images)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Attach `image` unless it is; with its lock held by the caller.
    fn attach_locked(&self, st: &mut ImageState, image: &LazyImage) -> Result<(), String> {
        if st.attached {
            return Ok(());
        }
        image.check_name()?;
        let mnt = self.mountpoint(image);
        mkdir(&self.root.join("images").join(&image.name), 0o700).map_err(|e| e.to_string())?;
        mkdir(&mnt, 0o755).map_err(|e| e.to_string())?;
        self.lazy.attach(image, &mnt)?;
        info!(image = %image.reference, mountpoint = %mnt.display(), "lazy image attached");
        st.attached = true;
        Ok(())
    }

    fn ensure_attached(&self, image: &LazyImage) -> Result<(), Error> {
        let st = self.image_state(&image.name);
        let mut st = lock(&st);
        self.attach_locked(&mut st, image).map_err(|e| {
            Error::Unavailable(format!(
                "lazy image {} cannot be attached: {e}",
                image.reference
            ))
        })
    }

    /// The lower dirs a snapshot over `parent` gets, nearest first (see the crate docs).
    fn lowers(&self, meta: &MetaStore, parent: &str, of: &str) -> Result<Vec<Lower>, Error> {
        let mut out = Vec::new();
        let mut cur = parent.to_string();
        while !cur.is_empty() {
            let s = meta.get(&cur)?;
            match &s.remote {
                Some(r) if r.top => {
                    out.push(Lower::Image(r.image.clone()));
                    return Ok(out);
                }
                Some(r) if r.materialized => {
                    out.push(Lower::Dir(self.fs_dir(s.id)));
                    return Ok(out);
                }
                Some(_) => {
                    out.push(Lower::Placeholder(cur.clone()));
                    return Ok(out);
                }
                None => out.push(Lower::Dir(self.fs_dir(s.id))),
            }
            if out.len() > 4096 {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {of:?} has too many parents"
                )));
            }
            cur = s.parent.clone();
        }
        Ok(out)
    }

    /// Make the lazy image of `lowers` (the last one, if any) readable, and give the paths.
    fn resolve(&self, lowers: Vec<Lower>) -> Result<Vec<PathBuf>, Error> {
        lowers
            .into_iter()
            .map(|l| match l {
                Lower::Dir(p) => Ok(p),
                Lower::Image(img) => {
                    self.ensure_attached(&img)?;
                    Ok(self.mountpoint(&img))
                }
                Lower::Placeholder(name) => self.materialize(&name),
            })
            .collect()
    }

    /// The tree of the placeholder `name`, unpacked once into its `fs` directory
    /// ([`crate::LazyImages::materialize`]: its image's layers up to it, flattened), then
    /// marked in the metadata. Until that mark is durable, an `fs.partial` directory is all
    /// there is, removed and remade by the next attempt.
    fn materialize(&self, name: &str) -> Result<PathBuf, Error> {
        let _one = lock(&self.materializing);
        let (id, labels, image, done) = {
            let meta = lock(&self.meta);
            let s = meta.get(name)?;
            let r = s.remote.as_ref().ok_or_else(|| {
                Error::Internal(format!("snapshot {name:?} is not a placeholder"))
            })?;
            (
                s.id,
                to_hash(&s.labels),
                r.image.reference.clone(),
                r.materialized,
            )
        };
        let fs = self.fs_dir(id);
        if done {
            return Ok(fs);
        }
        let dir = self.root.join("snapshots").join(id.to_string());
        let partial = dir.join("fs.partial");
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_dir_all(&fs);
        mkdir(&dir, 0o700)?;
        mkdir(&partial, 0o755)?;
        info!(snapshot = name, image = %image, "unpacking a lazy image's intermediate layer for another image");
        self.lazy.materialize(&labels, &partial).map_err(|e| {
            let _ = std::fs::remove_dir_all(&partial);
            Error::Unavailable(format!(
                "snapshot {name:?} (a layer inside the lazy image {image}) could not be unpacked: {e}"
            ))
        })?;
        std::fs::rename(&partial, &fs).map_err(|e| Error::Io {
            context: format!("renaming {} to {}", partial.display(), fs.display()),
            source: e,
        })?;
        lock(&self.meta).set_materialized(name)?;
        Ok(fs)
    }

    fn build_mounts(&self, kind: Kind, id: u64, lowers: &[PathBuf]) -> Vec<Mount> {
        mounts(&Shape {
            kind,
            fs: &self.fs_dir(id),
            work: &self.work_dir(id),
            lowers,
            index_off: self.index_off,
        })
    }

    pub(crate) fn open(root: &Path, lazy: Lazy) -> Result<Inner, Error> {
        let root_s = root.to_string_lossy();
        if root_s.contains([',', ':']) {
            return Err(Error::InvalidArgument(format!(
                "root {root_s:?} must not contain ',' or ':' (overlay options)"
            )));
        }
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("mkdir {}", root.display()), e))?;
        let root = std::fs::canonicalize(root)
            .map_err(|e| Error::io(format!("resolve {}", root.display()), e))?;
        let lock_file = lazyblk_blocksource::fsutil::lock_exclusive(&root.join("lock"))
            .map_err(|e| Error::io(format!("lock {}", root.display()), e))?
            .ok_or_else(|| Error::InUse(format!("another snapshotter uses {}", root.display())))?;
        mkdir(&root.join("snapshots"), 0o700)?;
        mkdir(&root.join("images"), 0o700)?;
        let root_dev = std::fs::metadata(root.join("snapshots"))
            .map_err(|e| Error::io(format!("stat {}", root.display()), e))?
            .dev();
        // A crash between making a directory and recording it leaves the directory: keep its
        // id out of use.
        let mut floor = 1;
        for e in std::fs::read_dir(root.join("snapshots"))
            .map_err(|e| Error::io(format!("read {}/snapshots", root.display()), e))?
            .flatten()
        {
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                floor = floor.max(id.saturating_add(1));
            }
        }
        let meta = MetaStore::open(&root, floor)?;
        let inner = Inner {
            root,
            lazy,
            meta: Mutex::new(meta),
            images: Mutex::new(HashMap::new()),
            materializing: Mutex::new(()),
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            root_dev,
            _lock: lock_file,
        };
        inner.reattach();
        Ok(inner)
    }

    /// At start: attach every image the metadata names (errors logged, not fatal).
    fn reattach(&self) {
        let mut seen = HashSet::new();
        let images: Vec<LazyImage> = lock(&self.meta)
            .iter()
            .filter_map(|(_, s)| s.remote.as_ref().filter(|r| r.top).map(|r| r.image.clone()))
            .filter(|i| seen.insert(i.name.clone()))
            .collect();
        for image in images {
            let st = self.image_state(&image.name);
            let mut st = lock(&st);
            if let Err(e) = self.attach_locked(&mut st, &image) {
                warn!(image = %image.reference, error = %e,
                    "lazy image not attached at start (its snapshots stay; Mounts retries)");
            }
        }
    }

    pub(crate) fn stat(&self, key: &str) -> Result<Info, Error> {
        let meta = lock(&self.meta);
        Ok(info(key, meta.get(key)?))
    }

    pub(crate) fn update(&self, i: Info, paths: Option<Vec<String>>) -> Result<Info, Error> {
        let mut meta = lock(&self.meta);
        let labels: BTreeMap<_, _> = i.labels.into_iter().collect();
        let s = meta.update(&i.name, labels, paths.as_deref().unwrap_or(&[]))?;
        Ok(info(&i.name, s))
    }

    pub(crate) fn usage(&self, key: &str) -> Result<Usage, Error> {
        let (id, remote) = {
            let meta = lock(&self.meta);
            let s = meta.get(key)?;
            (s.id, s.remote.is_some())
        };
        if remote {
            return Ok(Usage::default());
        }
        let fs = self.fs_dir(id);
        let mut seen = HashSet::new();
        let mut u = Usage::default();
        du(&fs, self.root_dev, &mut seen, &mut u)
            .map_err(|e| Error::io(format!("usage of {}", fs.display()), e))?;
        Ok(u)
    }

    pub(crate) fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let (kind, id, lowers) = {
            let meta = lock(&self.meta);
            let s = meta.get(key)?;
            if s.kind == Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: mounts are for active and view snapshots"
                )));
            }
            (s.kind, s.id, self.lowers(&meta, &s.parent, key)?)
        };
        let lowers = self.resolve(lowers)?;
        Ok(self.build_mounts(kind, id, &lowers))
    }

    pub(crate) fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if let Some(target) = labels.get(LABEL_SNAPSHOT_REF).filter(|t| !t.is_empty()) {
            match self.try_remote(key, parent, target, &labels)? {
                true => {
                    return Err(Error::AlreadyExists(format!(
                        "target snapshot {target:?} (remote)"
                    )))
                }
                false => debug!(key, target = %target, "not a lazy layer: an ordinary snapshot"),
            }
        }
        self.create_local(key, parent, Kind::Active, labels)
    }

    pub(crate) fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create_local(key, parent, Kind::View, labels)
    }

    /// The remote-snapshot handshake. `Ok(true)`: the committed remote snapshot `target`
    /// exists now (answer ALREADY_EXISTS); `Ok(false)`: fall back to an ordinary snapshot.
    fn try_remote(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        labels: &HashMap<String, String>,
    ) -> Result<bool, Error> {
        {
            let meta = lock(&self.meta);
            if meta.contains(key) {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            if !parent.is_empty() {
                let p = meta.get(parent)?;
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )));
                }
            }
            if let Ok(t) = meta.get(target) {
                if t.kind == Kind::Committed && t.parent == parent {
                    return Ok(true);
                }
                warn!(target, parent, existing_parent = %t.parent,
                    "a snapshot named by the chain id exists with another parent or kind: fallback");
                return Ok(false);
            }
        }
        let image = match self.lazy.find(labels) {
            Ok(Some(image)) => image,
            Ok(None) => return Ok(false),
            Err(e) => {
                warn!(target, error = %e, "cannot tell whether a lazy image exists: fallback");
                return Ok(false);
            }
        };
        if let Err(e) = image.check_name() {
            warn!(target, error = %e, "fallback");
            return Ok(false);
        }
        let top = is_top(labels);
        let st = self.image_state(&image.name);
        let mut st = lock(&st);
        if let Err(e) = self.attach_locked(&mut st, &image) {
            warn!(image = %image.reference, error = %e, "lazy image cannot be attached: fallback");
            return Ok(false);
        }
        let mut meta = lock(&self.meta);
        let mut l: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        l.insert(LABEL_LAZY_IMAGE.into(), image.reference.clone());
        let reference = image.reference.clone();
        match meta.create(
            target,
            parent,
            Kind::Committed,
            l,
            Some(Remote {
                image,
                top,
                materialized: false,
            }),
        ) {
            Ok(_) => {
                info!(target, parent, image = %reference, top, "remote snapshot");
                Ok(true)
            }
            // Made by a concurrent Prepare of the same layer meanwhile.
            Err(Error::AlreadyExists(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn create_local(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        let lowers = {
            let meta = lock(&self.meta);
            if meta.contains(key) {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            if !parent.is_empty() && meta.get(parent)?.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent:?} is not a committed snapshot"
                )));
            }
            // Refuse before creating anything when there is no tree to mount.
            self.lowers(&meta, parent, key)?
        };
        // Attach a lazy image below (if not yet) outside the metadata lock.
        let lowers = self.resolve(lowers)?;
        let id = {
            let mut meta = lock(&self.meta);
            let id = meta.peek_id();
            let dir = self.root.join("snapshots").join(id.to_string());
            let made = (|| {
                mkdir(&dir, 0o700)?;
                mkdir(&dir.join("fs"), 0o755)?;
                if kind == Kind::Active {
                    mkdir(&dir.join("work"), 0o711)?;
                }
                Ok::<(), Error>(())
            })();
            // create checks again that the key is free and the parent is committed.
            let created = made
                .and_then(|()| meta.create(key, parent, kind, labels.into_iter().collect(), None));
            if let Err(e) = created {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            id
        };
        // The upper dir takes the owner of the tree below it, as containerd's overlayfs does.
        if kind == Kind::Active {
            if let Some(Ok(m)) = lowers.first().map(std::fs::metadata) {
                let _ = std::os::unix::fs::chown(self.fs_dir(id), Some(m.uid()), Some(m.gid()));
            }
        }
        Ok(self.build_mounts(kind, id, &lowers))
    }

    pub(crate) fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        let mut meta = lock(&self.meta);
        meta.commit(name, key, labels.into_iter().collect())?;
        Ok(())
    }

    pub(crate) fn remove(&self, key: &str) -> Result<(), Error> {
        let old = lock(&self.meta).remove(key)?;
        match &old.remote {
            None => {
                let dir = self.root.join("snapshots").join(old.id.to_string());
                if let Err(e) = self.remove_snapshot_dir(&dir) {
                    warn!(dir = %dir.display(), error = %e, "left for Cleanup");
                }
            }
            Some(r) => {
                if r.materialized {
                    let dir = self.root.join("snapshots").join(old.id.to_string());
                    if let Err(e) = self.remove_snapshot_dir(&dir) {
                        warn!(dir = %dir.display(), error = %e, "left for Cleanup");
                    }
                }
                self.release_if_unused(&r.image)
            }
        }
        Ok(())
    }

    /// Release `image` when no snapshot mounts it any more: only an image's top layer is
    /// mounted from its device (placeholders below it are unpacked from the registry when
    /// needed, and materialized ones have their own tree).
    fn release_if_unused(&self, image: &LazyImage) {
        let st = self.image_state(&image.name);
        let mut st = lock(&st);
        let used = lock(&self.meta).iter().any(|(_, s)| {
            s.remote
                .as_ref()
                .is_some_and(|r| r.top && r.image.name == image.name)
        });
        if used {
            return;
        }
        let mnt = self.mountpoint(image);
        if st.attached || mnt.exists() {
            match self.lazy.release(image, &mnt) {
                Ok(()) => {
                    st.attached = false;
                    info!(image = %image.reference, "lazy image released");
                    let _ = std::fs::remove_dir(&mnt);
                    let _ = std::fs::remove_dir(self.root.join("images").join(&image.name));
                }
                Err(e) => warn!(image = %image.reference, error = %e, "release failed"),
            }
        }
    }

    /// Remove a snapshot directory, never crossing into another file system (a mount on it).
    fn remove_snapshot_dir(&self, dir: &Path) -> std::io::Result<()> {
        for p in [dir.to_path_buf(), dir.join("fs")] {
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.dev() != self.root_dev => {
                    return Err(std::io::Error::other(format!(
                        "{} is on another file system (mounted?)",
                        p.display()
                    )))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub(crate) fn list(&self, filters: &[String]) -> Result<Vec<Info>, Error> {
        let f = Filter::parse(filters)?;
        let meta = lock(&self.meta);
        Ok(meta
            .iter()
            .filter(|(n, s)| f.matches(n, s))
            .map(|(n, s)| info(n, s))
            .collect())
    }

    /// Remove what no snapshot names: `snapshots/<x>` dirs and unused, released image dirs.
    pub(crate) fn cleanup(&self) -> Result<(), Error> {
        let (ids, used_images): (HashSet<String>, HashSet<String>) = {
            let meta = lock(&self.meta);
            (
                meta.iter().map(|(_, s)| s.id.to_string()).collect(),
                meta.iter()
                    .filter_map(|(_, s)| s.remote.as_ref().map(|r| r.image.name.clone()))
                    .collect(),
            )
        };
        let sdir = self.root.join("snapshots");
        for e in std::fs::read_dir(&sdir)
            .map_err(|e| Error::io(format!("read {}", sdir.display()), e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if ids.contains(&name) {
                continue;
            }
            // Ids are only taken under the metadata lock: recheck so a Prepare that made its
            // directory just now is left alone.
            let p = e.path();
            let live = lock(&self.meta)
                .iter()
                .any(|(_, s)| s.id.to_string() == name);
            if live {
                continue;
            }
            match self.remove_snapshot_dir(&p) {
                Ok(()) => info!(dir = %p.display(), "cleanup: removed"),
                Err(e) => warn!(dir = %p.display(), error = %e, "cleanup: not removed"),
            }
        }
        let idir = self.root.join("images");
        for e in std::fs::read_dir(&idir)
            .map_err(|e| Error::io(format!("read {}", idir.display()), e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if used_images.contains(&name) {
                continue;
            }
            let st = self.image_state(&name);
            let st = lock(&st);
            if st.attached {
                continue;
            }
            // remove_dir only: a mountpoint still mounted (a failed release) stays.
            let _ = std::fs::remove_dir(e.path().join("mnt"));
            match std::fs::remove_dir(e.path()) {
                Ok(()) => info!(dir = %e.path().display(), "cleanup: removed"),
                Err(err) => warn!(dir = %e.path().display(), error = %err, "cleanup: not removed"),
            }
        }
        Ok(())
    }
}

fn du(p: &Path, dev: u64, seen: &mut HashSet<(u64, u64)>, u: &mut Usage) -> std::io::Result<()> {
    let m = std::fs::symlink_metadata(p)?;
    if m.dev() != dev {
        return Ok(());
    }
    if seen.insert((m.dev(), m.ino())) {
        u.inodes += 1;
        u.size += (m.blocks() * 512) as i64;
    }
    if m.is_dir() {
        for e in std::fs::read_dir(p)? {
            du(&e?.path(), dev, seen, u)?;
        }
    }
    Ok(())
}

impl Snapshotter {
    /// Open the snapshotter over `root` (created if missing; locked against a second
    /// snapshotter), and attach every lazy image its metadata names. Blocking.
    pub fn open(root: &Path, lazy: Arc<dyn crate::LazyImages>) -> Result<Snapshotter, Error> {
        Ok(Snapshotter {
            inner: Arc::new(Inner::open(root, lazy)?),
        })
    }

    /// The root directory (canonical).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    #[cfg(test)]
    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

#[containerd_snapshots::tonic::async_trait]
impl containerd_snapshots::Snapshotter for Snapshotter {
    type Error = Error;

    async fn stat(&self, key: String) -> Result<Info, Error> {
        self.run(move |i| i.stat(&key)).await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Error> {
        self.run(move |i| i.update(info, fieldpaths)).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Error> {
        self.run(move |i| i.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        self.run(move |i| i.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.run(move |i| i.prepare(&key, &parent, labels)).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.run(move |i| i.view(&key, &parent, labels)).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        self.run(move |i| i.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), Error> {
        self.run(move |i| i.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Error> {
        self.run(|i| i.cleanup()).await
    }

    type InfoStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Info, Error>>>;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Error> {
        let infos = self.run(move |i| i.list(&filters)).await?;
        Ok(futures_util::stream::iter(
            infos.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }
}
