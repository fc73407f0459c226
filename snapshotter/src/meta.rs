//! The durable snapshot tree, modelled on containerd's `snapshots/storage`: every snapshot by
//! name with its id, kind, parent, labels and times, plus lazyblk's remote record.
//!
//! One small JSON file (`<root>/metadata.json`), rewritten whole on every change through
//! [`lazyblk_blocksource::fsutil::write_atomic`] (temp file, fsync, rename, fsync of the
//! directory): after a kill -9 at any point the file is either the old tree or the new one, and
//! a torn `metadata.tmp` is ignored (and removed) at the next open. The tree is small (a few
//! hundred snapshots: one per layer and container), so the whole-file rewrite is a few
//! kilobytes per call; containerd calls the snapshotter at layer and container granularity.
//!
//! Ids come from a persisted counter that only grows (and is pushed past any `snapshots/<id>`
//! directory found on disk at open, in case a crash left one behind before the counter was
//! written), so an id is never reused. Children counts are derived from the parent pointers at
//! open and kept up to date in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::{Error, LazyImage};

/// The file name of the metadata under the root.
pub const META_FILE: &str = "metadata.json";
const META_VERSION: u32 = 1;

/// What a snapshot is (containerd's `snapshots.Kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only view of its parent; never committed.
    View,
    /// A writable snapshot being filled (a layer being unpacked, a container's root).
    Active,
    /// Immutable; may be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A committed snapshot served from a lazy image instead of a directory of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// The image whose flattened tree holds this layer.
    pub image: LazyImage,
    /// Whether this layer is the image's top layer (its tree is the whole image); the layers
    /// below it are placeholders.
    pub top: bool,
    /// A placeholder whose flattened tree (its image's layers up to this one) was since
    /// unpacked into its own `fs` directory, because another image's snapshot needed it.
    #[serde(default)]
    pub materialized: bool,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Never reused; names the directory `snapshots/<id>`.
    pub id: u64,
    /// View, Active or Committed.
    pub kind: Kind,
    /// The parent's name; empty for none.
    #[serde(default)]
    pub parent: String,
    /// containerd's labels, kept as given.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: SystemTime,
    /// Last change (commit, label update).
    pub updated: SystemTime,
    /// Set for a remote (lazy) committed snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<Remote>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

/// The snapshot tree in memory, written through to [`META_FILE`] on every change.
#[derive(Debug)]
pub struct MetaStore {
    path: PathBuf,
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
    children: HashMap<String, usize>,
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl MetaStore {
    /// Open (or create) the store in `root`. `min_next_id` is a floor for the id counter (one
    /// past the largest id of a directory found on disk).
    pub fn open(root: &Path, min_next_id: u64) -> Result<MetaStore, Error> {
        let path = root.join(META_FILE);
        let tmp = path.with_extension("tmp");
        if tmp.exists() {
            // A write that did not reach its rename: the old file is the truth.
            tracing::warn!(path = %tmp.display(), "removing an unfinished metadata write");
            let _ = std::fs::remove_file(&tmp);
        }
        let disk = match std::fs::read(&path) {
            Ok(bytes) => {
                let d: OnDisk = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
                if d.version != META_VERSION {
                    return Err(Error::Corrupt {
                        path,
                        msg: format!("version {} (this build reads {META_VERSION})", d.version),
                    });
                }
                d
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OnDisk {
                version: META_VERSION,
                next_id: 1,
                snapshots: BTreeMap::new(),
            },
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let mut store = MetaStore {
            path,
            next_id: disk.next_id.max(min_next_id).max(1),
            snapshots: disk.snapshots,
            children: HashMap::new(),
        };
        for s in store.snapshots.values() {
            if s.id >= store.next_id {
                store.next_id = s.id + 1;
            }
            if !s.parent.is_empty() {
                *store.children.entry(s.parent.clone()).or_default() += 1;
            }
        }
        for (name, s) in &store.snapshots {
            if !s.parent.is_empty() && !store.snapshots.contains_key(&s.parent) {
                return Err(Error::Corrupt {
                    path: store.path.clone(),
                    msg: format!("snapshot {name:?} names a missing parent {:?}", s.parent),
                });
            }
        }
        Ok(store)
    }

    fn persist(&self) -> Result<(), Error> {
        let disk = OnDiskRef {
            version: META_VERSION,
            next_id: self.next_id,
            snapshots: &self.snapshots,
        };
        let bytes = serde_json::to_vec_pretty(&disk).expect("metadata serializes");
        lazyblk_blocksource::fsutil::write_atomic(&self.path, &bytes)
            .map_err(|e| Error::io(format!("write {}", self.path.display()), e))
    }

    /// The snapshot named `name`.
    pub fn get(&self, name: &str) -> Result<&Snapshot, Error> {
        self.snapshots
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("snapshot {name:?} does not exist")))
    }

    /// Whether a snapshot named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.snapshots.contains_key(name)
    }

    /// How many snapshots name `name` as their parent.
    pub fn children(&self, name: &str) -> usize {
        self.children.get(name).copied().unwrap_or(0)
    }

    /// Every snapshot, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.snapshots.iter()
    }

    /// The id the next [`MetaStore::create`] will use (for making its directory first).
    pub fn peek_id(&self) -> u64 {
        self.next_id
    }

    /// The chain from `name`'s parent up to the root, nearest first.
    pub fn ancestors(&self, name: &str) -> Result<Vec<(&String, &Snapshot)>, Error> {
        let mut out = Vec::new();
        let mut cur = &self.get(name)?.parent;
        while !cur.is_empty() {
            let (n, s) = self.snapshots.get_key_value(cur.as_str()).ok_or_else(|| {
                Error::NotFound(format!("parent snapshot {cur:?} does not exist"))
            })?;
            if out.len() > self.snapshots.len() {
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    msg: format!("the parents of {name:?} form a loop"),
                });
            }
            out.push((n, s));
            cur = &s.parent;
        }
        Ok(out)
    }

    fn check_new(&self, name: &str, parent: &str) -> Result<(), Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        if self.snapshots.contains_key(name) {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        if !parent.is_empty() {
            let p = self.snapshots.get(parent).ok_or_else(|| {
                Error::NotFound(format!("parent snapshot {parent:?} does not exist"))
            })?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent:?} is not a committed snapshot"
                )));
            }
        }
        Ok(())
    }

    /// Create a View or Active snapshot `name` over `parent` (empty: none), or, with `remote`,
    /// a committed remote one. The parent must be committed. Returns the new snapshot's id.
    pub fn create(
        &mut self,
        name: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        remote: Option<Remote>,
    ) -> Result<u64, Error> {
        self.check_new(name, parent)?;
        let id = self.next_id;
        let t = now();
        let snap = Snapshot {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: t,
            updated: t,
            remote,
        };
        self.next_id += 1;
        self.snapshots.insert(name.to_string(), snap);
        if !parent.is_empty() {
            *self.children.entry(parent.to_string()).or_default() += 1;
        }
        if let Err(e) = self.persist() {
            self.snapshots.remove(name);
            self.dec_child(parent);
            return Err(e);
        }
        Ok(id)
    }

    fn dec_child(&mut self, parent: &str) {
        if parent.is_empty() {
            return;
        }
        if let Some(c) = self.children.get_mut(parent) {
            *c -= 1;
            if *c == 0 {
                self.children.remove(parent);
            }
        }
    }

    /// Commit the active snapshot `key` as `name` (same id and directory, same parent, the
    /// given labels, new times), as containerd's `CommitActive`.
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<&Snapshot, Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        let active = self.get(key)?;
        if active.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        if self.snapshots.contains_key(name) {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        if self.children(key) > 0 {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} has children"
            )));
        }
        let old = self.snapshots.remove(key).expect("checked above");
        let t = now();
        let committed = Snapshot {
            id: old.id,
            kind: Kind::Committed,
            parent: old.parent.clone(),
            labels,
            created: t,
            updated: t,
            remote: None,
        };
        self.snapshots.insert(name.to_string(), committed);
        if let Err(e) = self.persist() {
            self.snapshots.remove(name);
            self.snapshots.insert(key.to_string(), old);
            return Err(e);
        }
        Ok(&self.snapshots[name])
    }

    /// Remove `key`; refused (FailedPrecondition) while it has children. Returns what it was.
    pub fn remove(&mut self, key: &str) -> Result<Snapshot, Error> {
        self.get(key)?;
        if self.children(key) > 0 {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?} with child"
            )));
        }
        let old = self.snapshots.remove(key).expect("checked above");
        self.dec_child(&old.parent);
        if let Err(e) = self.persist() {
            if !old.parent.is_empty() {
                *self.children.entry(old.parent.clone()).or_default() += 1;
            }
            self.snapshots.insert(key.to_string(), old);
            return Err(e);
        }
        Ok(old)
    }

    /// Mark the remote placeholder `name` as materialized (its `fs` directory holds its tree).
    pub fn set_materialized(&mut self, name: &str) -> Result<(), Error> {
        let s = self
            .snapshots
            .get_mut(name)
            .ok_or_else(|| Error::NotFound(format!("snapshot {name:?}")))?;
        let Some(r) = s.remote.as_mut() else {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {name:?} is not remote"
            )));
        };
        r.materialized = true;
        if let Err(e) = self.persist() {
            if let Some(r) = self.snapshots.get_mut(name).and_then(|s| s.remote.as_mut()) {
                r.materialized = false;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Update the labels of `name` (containerd's `UpdateInfo`): no field paths = replace the
    /// labels whole; `labels` = the same; `labels.<key>` = set that label from `labels`, or
    /// delete it when `labels` lacks it. Any other path is InvalidArgument.
    pub fn update(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<&Snapshot, Error> {
        let cur = self.get(name)?;
        let mut new_labels = cur.labels.clone();
        if fieldpaths.is_empty() {
            new_labels = labels;
        } else {
            for path in fieldpaths {
                if let Some(k) = path.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => new_labels.insert(k.to_string(), v.clone()),
                        None => new_labels.remove(k),
                    };
                } else if path == "labels" {
                    new_labels = labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {name:?}"
                    )));
                }
            }
        }
        let s = self.snapshots.get_mut(name).expect("checked above");
        let old = (std::mem::replace(&mut s.labels, new_labels), s.updated);
        s.updated = now();
        if let Err(e) = self.persist() {
            let s = self.snapshots.get_mut(name).expect("present");
            (s.labels, s.updated) = old;
            return Err(e);
        }
        Ok(&self.snapshots[name])
    }
}

#[derive(Serialize)]
struct OnDiskRef<'a> {
    version: u32,
    next_id: u64,
    snapshots: &'a BTreeMap<String, Snapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Reopen after every change: what is in memory is what is on disk.
    fn reopen(root: &Path, m: MetaStore) -> MetaStore {
        let before: Vec<_> = m.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        let next = m.peek_id();
        drop(m);
        let m = MetaStore::open(root, 0).unwrap();
        let after: Vec<_> = m.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        assert_eq!(before, after);
        assert_eq!(next, m.peek_id());
        m
    }

    #[test]
    fn tree_rules_and_durability() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let mut m = MetaStore::open(root, 0).unwrap();
        assert_eq!(
            m.create("a", "", Kind::Active, labels(&[]), None).unwrap(),
            1
        );
        let mut m2 = reopen(root, m);
        // An active snapshot cannot be a parent.
        assert!(matches!(
            m2.create("b", "a", Kind::Active, labels(&[]), None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            m2.create("b", "nope", Kind::Active, labels(&[]), None),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            m2.create("a", "", Kind::Active, labels(&[]), None),
            Err(Error::AlreadyExists(_))
        ));
        m2.commit("c1", "a", labels(&[("x", "1")])).unwrap();
        m = reopen(root, m2);
        assert!(matches!(m.get("a"), Err(Error::NotFound(_))));
        let c1 = m.get("c1").unwrap().clone();
        assert_eq!((c1.id, c1.kind), (1, Kind::Committed));
        assert_eq!(c1.labels, labels(&[("x", "1")]));

        assert_eq!(
            m.create("b", "c1", Kind::Active, labels(&[]), None)
                .unwrap(),
            2
        );
        assert_eq!(
            m.create("v", "c1", Kind::View, labels(&[]), None).unwrap(),
            3
        );
        m = reopen(root, m);
        assert_eq!(m.children("c1"), 2);
        // Commit: name taken, not active.
        assert!(matches!(
            m.commit("c1", "b", labels(&[])),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            m.commit("cv", "v", labels(&[])),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.commit("cx", "missing", labels(&[])),
            Err(Error::NotFound(_))
        ));
        m.commit("c2", "b", labels(&[])).unwrap();
        m = reopen(root, m);
        assert_eq!(m.get("c2").unwrap().parent, "c1");
        assert_eq!(m.children("c1"), 2);
        let anc: Vec<_> = m
            .ancestors("c2")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(anc, ["c1"]);
        // Remove with children: refused; leaves first works.
        assert!(matches!(m.remove("c1"), Err(Error::FailedPrecondition(_))));
        assert!(matches!(m.remove("zz"), Err(Error::NotFound(_))));
        m.remove("v").unwrap();
        m = reopen(root, m);
        m.remove("c2").unwrap();
        m = reopen(root, m);
        assert_eq!(m.children("c1"), 0);
        m.remove("c1").unwrap();
        m = reopen(root, m);
        assert_eq!(m.iter().count(), 0);
        // Ids are never reused, even with the tree empty.
        assert_eq!(
            m.create("n", "", Kind::Active, labels(&[]), None).unwrap(),
            4
        );
        let m = reopen(root, m);
        drop(m);
        // A floor from directories found on disk.
        let m = MetaStore::open(root, 10).unwrap();
        assert_eq!(m.peek_id(), 10);
    }

    #[test]
    fn update_field_paths() {
        let d = tempfile::tempdir().unwrap();
        let mut m = MetaStore::open(d.path(), 0).unwrap();
        m.create(
            "a",
            "",
            Kind::Active,
            labels(&[("k1", "v1"), ("k2", "v2")]),
            None,
        )
        .unwrap();
        let t0 = m.get("a").unwrap().updated;
        let s = m
            .update(
                "a",
                labels(&[("k1", "new"), ("k3", "v3")]),
                &["labels.k1".into(), "labels.k2".into()],
            )
            .unwrap();
        // k1 set, k2 deleted (absent from the given labels), k3 ignored (not in the paths).
        assert_eq!(s.labels, labels(&[("k1", "new")]));
        assert!(s.updated >= t0);
        let s = m
            .update("a", labels(&[("z", "1")]), &["labels".into()])
            .unwrap();
        assert_eq!(s.labels, labels(&[("z", "1")]));
        let s = m.update("a", labels(&[("y", "2")]), &[]).unwrap();
        assert_eq!(s.labels, labels(&[("y", "2")]));
        assert!(matches!(
            m.update("a", labels(&[]), &["parent".into()]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            m.update("b", labels(&[]), &[]),
            Err(Error::NotFound(_))
        ));
        let m = reopen(d.path(), m);
        assert_eq!(m.get("a").unwrap().labels, labels(&[("y", "2")]));
    }

    #[test]
    fn torn_temp_file_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let mut m = MetaStore::open(d.path(), 0).unwrap();
        m.create("a", "", Kind::Active, labels(&[]), None).unwrap();
        drop(m);
        // A crash in the middle of the next write: half a file under the temp name.
        let full = std::fs::read(d.path().join(META_FILE)).unwrap();
        std::fs::write(d.path().join("metadata.tmp"), &full[..full.len() / 2]).unwrap();
        let m = MetaStore::open(d.path(), 0).unwrap();
        assert!(m.contains("a"));
        assert!(!d.path().join("metadata.tmp").exists());
        // A corrupt main file is an error, never an empty tree.
        drop(m);
        std::fs::write(d.path().join(META_FILE), b"{\"vers").unwrap();
        assert!(matches!(
            MetaStore::open(d.path(), 0),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn remote_record_survives() {
        let d = tempfile::tempdir().unwrap();
        let mut m = MetaStore::open(d.path(), 0).unwrap();
        let remote = Remote {
            image: LazyImage {
                reference: "r/x@sha256:00".into(),
                name: "00".into(),
            },
            top: true,
            materialized: false,
        };
        m.create("c", "", Kind::Committed, labels(&[]), Some(remote.clone()))
            .unwrap();
        let m = reopen(d.path(), m);
        assert_eq!(m.get("c").unwrap().remote.as_ref(), Some(&remote));
    }
}
