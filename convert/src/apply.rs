//! Applying one layer (a tar stream) onto a work tree with the OCI image spec's semantics
//! ("Representing changes": whiteouts, opaque directories), safely.
//!
//! **Semantics**, entry by entry in stream order:
//! * `D/.wh.N` removes `D/N` of the *lower* layers (and everything under it); `D/.wh..wh..opq`
//!   removes every lower entry in `D`. An entry this layer wrote (or a directory on the way to
//!   one) is never removed by a whiteout of the same layer, before or after it: "entries of the
//!   same layer win". A whiteout under a path that is not a directory (this layer made it a
//!   file) has nothing to remove. Other `.wh..wh.*` names (aufs' bookkeeping) are ignored.
//! * An entry whose path exists replaces it, unless both are directories (then the directory is
//!   kept, with its children, and takes the entry's metadata). So a file becomes a directory
//!   and back.
//! * Missing parent directories are created (0755, root). Files, directories, symlinks,
//!   hardlinks, character and block devices and fifos are made with their mode (all 12 bits),
//!   owner, xattrs (`SCHILY.xattr.*`, `security.capability` included: set after the owner,
//!   since a chown clears it) and mtime (directories' at the end of the layer, after their
//!   children were written). A hardlink shares its target's inode and metadata.
//! * File data is written with runs of zero 4 KiB blocks left as holes (GNU sparse entries are
//!   expanded by the tar reader and come out sparse again). A tree opened with
//!   [`Tree::open_with_regions`] keeps no file data: each layer's goes to a *region* file of its
//!   own, every file at the next 4 KiB boundary in the layer's stream order, and the tree's file
//!   only gets its length; [`Regions`] says where each inode's data is (what
//!   [`crate::erofs`] points the image's files at). A region depends on its layer's bytes
//!   only, so it is the same in every image that has the layer.
//!
//! **Safety**: every path is split into plain components: an absolute path, a `..` component
//! or a NUL is refused; `.` and empty components are dropped. Then the walk opens each parent
//! with `O_NOFOLLOW | O_DIRECTORY` from the root's descriptor (module `at`): a parent that is a
//! symlink is refused (whether it points inside or outside), a parent that is a file is
//! refused. The last component is created with `O_EXCL`/`mkdirat`/`symlinkat`/`mknodat`/`linkat`
//! in that parent and its metadata set without following it. A hardlink's target goes through
//! the same walk (so it is inside the tree, reached without a symlink) and is linked itself,
//! never followed. So whatever a layer holds, every file-system call lands inside the tree.
//! Limits: the decompressed stream and the expanded file data of a layer are each bounded by
//! `max_layer_bytes`, its entries by `max_layer_entries`; past them the layer is refused with one
//! line.

use crate::at::{os, Dir, Kind, Name};
use crate::error::{one_line, Error, Result};
use crate::layer::{Counted, Meter};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tar::EntryType;
use tracing::{debug, warn};

/// Limits and choices for applying layers.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Most bytes one layer may expand to (its decompressed tar stream, and separately the file
    /// data it writes, sparse files counted at their full size).
    pub max_layer_bytes: u64,
    /// Most entries (tar headers) in one layer.
    pub max_layer_entries: u64,
    /// Set owners from the layer (`lchown`; needs root). Off: everything is the caller's.
    pub keep_owners: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_layer_bytes: 64 << 30,
            max_layer_entries: 4_000_000,
            keep_owners: true,
        }
    }
}

/// What one layer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries (tar headers) read.
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories made or updated.
    pub dirs: u64,
    /// Symlinks made.
    pub symlinks: u64,
    /// Hardlinks made.
    pub hardlinks: u64,
    /// Devices and fifos made.
    pub nodes: u64,
    /// Whiteouts (`.wh.<name>`) seen.
    pub whiteouts: u64,
    /// Opaque markers seen.
    pub opaque: u64,
    /// File data bytes written (holes included).
    pub file_bytes: u64,
    /// Bytes of the decompressed tar stream.
    pub tar_bytes: u64,
    /// `sha256:<hex>` of the decompressed tar stream (what a config's `diff_ids` lists).
    pub diff_id: String,
}

/// Why an entry failed: refused (unsafe or impossible) or an IO error.
enum Fail {
    Refuse(String),
    Io(String, io::Error),
    Limit(&'static str, u64, &'static str),
}

type R<T> = std::result::Result<T, Fail>;

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Fail + '_ {
    move |e| Fail::Io(what.to_string(), e)
}

/// The components of a path from a layer, or why it is refused. Empty: the root.
pub fn components(raw: &[u8]) -> std::result::Result<Vec<Name>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err("`..` in the path".into()),
            c => out.push(Name::new(c).ok_or_else(|| "NUL in the path".to_string())?),
        }
    }
    Ok(out)
}

fn key(comps: &[Name]) -> Vec<u8> {
    let mut k = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            k.push(b'/');
        }
        k.extend_from_slice(c.as_bytes());
    }
    k
}

/// Where a regular file's data is: in the region of layer `layer`, at `offset` (a multiple
/// of 4 KiB), `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    /// The layer (0: the base), which is its region's index.
    pub layer: usize,
    /// Offset in the region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The layers' file data, one region file per layer applied (`<dir>/<index>`).
#[derive(Debug, Default)]
pub struct Regions {
    dir: PathBuf,
    /// Each region's length (the last being written included).
    pub lens: Vec<u64>,
    /// The data of each regular file of the tree, by inode number.
    pub files: HashMap<u64, DataRef>,
    current: Option<std::fs::File>,
}

impl Regions {
    /// The region file of layer `i`.
    pub fn path(&self, i: usize) -> PathBuf {
        self.dir.join(i.to_string())
    }
}

/// A work tree that layers are applied onto.
pub struct Tree {
    root: Dir,
    opts: ApplyOptions,
    regions: Option<RefCell<Regions>>,
}

/// The state of one layer being applied.
struct Layer<'t> {
    tree: &'t Tree,
    /// Paths this layer wrote, and every directory on the way to them.
    touched: HashSet<Vec<u8>>,
    /// Directories whose mtime is set at the end, in the order they were seen.
    dir_times: Vec<(Vec<Name>, (i64, u32))>,
    /// The parent directory last walked to (entries come grouped by directory).
    cache: Option<(Vec<Name>, Dir)>,
    stats: LayerStats,
}

impl Tree {
    /// The tree rooted at the existing directory `root`.
    pub fn open(root: &Path, opts: ApplyOptions) -> Result<Tree> {
        let d = Dir::open_root(root).map_err(|e| Error::io(root, e))?;
        Ok(Tree {
            root: d,
            opts,
            regions: None,
        })
    }

    /// The tree rooted at `root`, whose layers' file data goes to region files in the new
    /// directory `regions` (see the module docs).
    pub fn open_with_regions(root: &Path, opts: ApplyOptions, regions: &Path) -> Result<Tree> {
        let mut t = Tree::open(root, opts)?;
        std::fs::create_dir(regions).map_err(|e| Error::io(regions, e))?;
        t.regions = Some(RefCell::new(Regions {
            dir: regions.to_path_buf(),
            ..Regions::default()
        }));
        Ok(t)
    }

    /// The regions written so far (`None` for a tree that keeps its data).
    pub fn into_regions(self) -> Option<Regions> {
        self.regions.map(RefCell::into_inner)
    }

    /// Apply the tar stream `tar` (already decompressed) as the layer `label` (for messages).
    pub fn apply_layer(&self, label: &str, tar: impl Read) -> Result<LayerStats> {
        if let Some(r) = &self.regions {
            let mut r = r.borrow_mut();
            let path = r.path(r.lens.len());
            let f = std::fs::File::create_new(&path).map_err(|e| Error::io(&path, e))?;
            r.current = Some(f);
            r.lens.push(0);
        }
        let meter = Rc::new(Meter::default());
        let counted = Counted::new(tar, self.opts.max_layer_bytes, meter.clone());
        let mut archive = tar::Archive::new(counted);
        let mut l = Layer {
            tree: self,
            touched: HashSet::new(),
            dir_times: Vec::new(),
            cache: None,
            stats: LayerStats::default(),
        };
        let limit_err = |what, limit, flag| Error::Limit {
            layer: label.to_string(),
            what,
            limit,
            flag,
        };
        let over = || limit_err("expanded size", self.opts.max_layer_bytes, "bytes");
        let bad_tar = |e: io::Error| {
            if meter.over.get() {
                over()
            } else {
                Error::Layer {
                    layer: label.to_string(),
                    why: one_line(&format!("not a valid tar stream: {e}")),
                }
            }
        };
        let entries = archive.entries().map_err(bad_tar)?;
        // Where the last entry's data ended: a stream that stops right there (no padding, no
        // end-of-archive blocks, as `umoci insert` 0.4.7 writes) ends cleanly, as it does for
        // Go's archive/tar; anything shorter is truncated.
        let mut last_end = None;
        for e in entries {
            let mut e = match e {
                Ok(e) => e,
                Err(err) if meter.eof.get() && last_end == Some(meter.bytes.get()) => {
                    debug!(layer = label, error = %err, "layer ends without end-of-archive blocks");
                    break;
                }
                Err(err) => return Err(bad_tar(err)),
            };
            let path: String = String::from_utf8_lossy(&e.path_bytes())
                .chars()
                .take(300)
                .collect();
            last_end = (e.header().entry_type() != EntryType::GNUSparse)
                .then(|| e.raw_file_position() + e.size());
            if let Err(f) = l.entry(&mut e) {
                return Err(match f {
                    Fail::Refuse(why) => Error::Refused {
                        layer: label.to_string(),
                        path,
                        why,
                    },
                    Fail::Io(..) if meter.over.get() => over(),
                    Fail::Io(what, err) => Error::Layer {
                        layer: label.to_string(),
                        why: one_line(&format!("{path:?}: {what}: {err}")),
                    },
                    Fail::Limit(what, limit, flag) => limit_err(what, limit, flag),
                });
            }
        }
        l.finish().map_err(|f| match f {
            Fail::Io(what, err) => Error::Layer {
                layer: label.to_string(),
                why: one_line(&format!("{what}: {err}")),
            },
            Fail::Refuse(why) => Error::Layer {
                layer: label.to_string(),
                why,
            },
            Fail::Limit(what, limit, flag) => limit_err(what, limit, flag),
        })?;
        if let Some(r) = &self.regions {
            let mut r = r.borrow_mut();
            let len = *r.lens.last().expect("a region per layer");
            let f = r.current.take().expect("a region per layer");
            let path = r.path(r.lens.len() - 1);
            f.set_len(len).map_err(|e| Error::io(&path, e))?;
        }
        let mut stats = l.stats;
        let counted = archive.into_inner();
        stats.diff_id = counted.finish().map_err(bad_tar)?;
        stats.tar_bytes = meter.bytes.get();
        Ok(stats)
    }
}

impl Layer<'_> {
    /// The directory `comps` (the root when empty), walked without following a symlink; made
    /// (0755) when missing and `create`. `None`: it does not exist (and not `create`).
    fn walk(&mut self, comps: &[Name], create: bool) -> R<Option<Dir>> {
        self.walk_to(comps, create, false)
    }

    /// [`Self::walk`]; with `file_is_none`, a component that is a file (not a symlink) is `None`
    /// rather than refused (a whiteout under a path this layer made a file: nothing to remove).
    fn walk_to(&mut self, comps: &[Name], create: bool, file_is_none: bool) -> R<Option<Dir>> {
        if let Some((c, d)) = &self.cache {
            if c == comps {
                return d.try_clone().map(Some).map_err(io_err("dup"));
            }
        }
        let mut cur: Option<Dir> = None;
        for c in comps {
            let here = cur.as_ref().unwrap_or(&self.tree.root);
            let next = match here.open_dir(c) {
                Ok(d) => d,
                Err(e) => match here.kind(c).map_err(io_err("stat"))? {
                    None if create => {
                        here.mkdir(c, 0o755).map_err(io_err("mkdir"))?;
                        here.open_dir(c).map_err(io_err("open"))?
                    }
                    None => return Ok(None),
                    Some(Kind::Symlink) => {
                        return Err(Fail::Refuse(format!(
                            "its parent {:?} is a symlink (never followed)",
                            os(c.as_bytes())
                        )))
                    }
                    Some(Kind::Other) if file_is_none => return Ok(None),
                    Some(Kind::Other) => {
                        return Err(Fail::Refuse(format!(
                            "its parent {:?} is not a directory",
                            os(c.as_bytes())
                        )))
                    }
                    Some(Kind::Dir) => return Err(Fail::Io("open".into(), e)),
                },
            };
            cur = Some(next);
        }
        let d = match cur {
            Some(d) => d,
            None => self.tree.root.try_clone().map_err(io_err("dup"))?,
        };
        self.cache = Some((comps.to_vec(), d.try_clone().map_err(io_err("dup"))?));
        Ok(Some(d))
    }

    fn entry<Rd: Read>(&mut self, e: &mut tar::Entry<Rd>) -> R<()> {
        self.stats.entries += 1;
        if self.stats.entries > self.tree.opts.max_layer_entries {
            return Err(Fail::Limit(
                "entry count",
                self.tree.opts.max_layer_entries,
                "entries",
            ));
        }
        let etype = e.header().entry_type();
        if etype.is_pax_global_extensions() {
            return Ok(());
        }
        let comps = components(&e.path_bytes()).map_err(Fail::Refuse)?;
        let Some((name, parent)) = comps.split_last() else {
            return self.root_entry(e, etype);
        };
        if let Some(rest) = name.as_bytes().strip_prefix(b".wh.") {
            return self.whiteout(parent, rest);
        }
        // Mark the entry and the directories on the way as written by this layer.
        for i in (1..=comps.len()).rev() {
            if !self.touched.insert(key(&comps[..i])) {
                break;
            }
        }
        let dir = self.walk(parent, true)?.expect("created");
        match etype {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.prepare(&dir, name, false)?;
                let f = dir.create_file(name).map_err(io_err("create"))?;
                let n = match &self.tree.regions {
                    None => self.copy_sparse(e, &f, 0)?,
                    Some(r) => {
                        let mut r = r.borrow_mut();
                        let layer = r.lens.len() - 1;
                        let offset = r.lens[layer].div_ceil(4096) * 4096;
                        let region = r.current.as_ref().expect("a region per layer");
                        let n = self.copy_sparse(e, region, offset)?;
                        r.lens[layer] = offset + n;
                        let ino = f.metadata().map_err(io_err("stat"))?.ino();
                        r.files.insert(
                            ino,
                            DataRef {
                                layer,
                                offset,
                                len: n,
                            },
                        );
                        n
                    }
                };
                if n != e.size() {
                    return Err(Fail::Io(
                        format!("its data ends after {n} of {} bytes", e.size()),
                        io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                f.set_len(n).map_err(io_err("truncate"))?;
                drop(f);
                self.metadata(e, &dir, Some(name), false)?;
                self.stats.files += 1;
            }
            EntryType::Directory => {
                if !self.prepare(&dir, name, true)? {
                    dir.mkdir(name, 0o700).map_err(io_err("mkdir"))?;
                }
                self.metadata(e, &dir, Some(name), false)?;
                self.dir_times.push((comps.clone(), mtime(e)));
                self.stats.dirs += 1;
            }
            EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| Fail::Refuse("a symlink without a target".into()))?
                    .into_owned();
                self.prepare(&dir, name, false)?;
                dir.symlink(&target, name).map_err(io_err("symlink"))?;
                self.metadata(e, &dir, Some(name), true)?;
                self.stats.symlinks += 1;
            }
            EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| Fail::Refuse("a hardlink without a target".into()))?
                    .into_owned();
                let tcomps = components(&target)
                    .map_err(|w| Fail::Refuse(format!("hardlink target: {w}")))?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(Fail::Refuse("a hardlink to the root".into()));
                };
                if tcomps == comps {
                    return Ok(());
                }
                self.prepare(&dir, name, false)?;
                let tdir = match self.walk(tparent, false) {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        return Err(Fail::Refuse(format!(
                            "hardlink target {:?} does not exist",
                            os(&target)
                        )))
                    }
                    Err(Fail::Refuse(w)) => {
                        return Err(Fail::Refuse(format!("hardlink target: {w}")))
                    }
                    Err(f) => return Err(f),
                };
                match tdir.kind(tname).map_err(io_err("stat"))? {
                    None => {
                        return Err(Fail::Refuse(format!(
                            "hardlink target {:?} does not exist",
                            os(&target)
                        )))
                    }
                    Some(Kind::Dir) => {
                        return Err(Fail::Refuse(format!(
                            "hardlink target {:?} is a directory",
                            os(&target)
                        )))
                    }
                    Some(_) => {}
                }
                dir.link_from(&tdir, tname, name).map_err(io_err("link"))?;
                self.stats.hardlinks += 1;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let fmt = match etype {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let h = e.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                self.prepare(&dir, name, false)?;
                dir.mknod(name, fmt | 0o600, major, minor)
                    .map_err(io_err("mknod"))?;
                self.metadata(e, &dir, Some(name), false)?;
                self.stats.nodes += 1;
            }
            t => {
                return Err(Fail::Refuse(format!("unsupported tar entry type {t:?}")));
            }
        }
        Ok(())
    }

    /// The entry for the root itself (`./`): a directory's metadata, nothing else.
    fn root_entry<Rd: Read>(&mut self, e: &mut tar::Entry<Rd>, etype: EntryType) -> R<()> {
        if etype != EntryType::Directory {
            return Err(Fail::Refuse("the root must be a directory".into()));
        }
        let root = self.tree.root.try_clone().map_err(io_err("dup"))?;
        self.metadata(e, &root, None, false)?;
        self.dir_times.push((Vec::new(), mtime(e)));
        Ok(())
    }

    /// Clear the way for a new entry `name` in `dir`: a directory over a directory is kept
    /// (`true`); anything else there is removed.
    fn prepare(&mut self, dir: &Dir, name: &Name, new_is_dir: bool) -> R<bool> {
        match dir.kind(name).map_err(io_err("stat"))? {
            None => Ok(false),
            Some(Kind::Dir) if new_is_dir => Ok(true),
            Some(Kind::Dir) => {
                self.cache = None;
                dir.remove_all(name).map_err(io_err("remove"))?;
                Ok(false)
            }
            Some(_) => {
                dir.unlink(name).map_err(io_err("unlink"))?;
                Ok(false)
            }
        }
    }

    /// `parent/.wh.<rest>`: a whiteout, an opaque marker, or aufs bookkeeping.
    fn whiteout(&mut self, parent: &[Name], rest: &[u8]) -> R<()> {
        if rest == b".wh..opq" {
            self.stats.opaque += 1;
            let Some(dir) = self.walk_to(parent, false, true)? else {
                return Ok(());
            };
            for child in dir.names().map_err(io_err("readdir"))? {
                self.remove_lower(&dir, parent, &child)?;
            }
            return Ok(());
        }
        if rest.starts_with(b".wh.") {
            debug!(name = ?os(rest), "ignoring aufs metadata");
            return Ok(());
        }
        let Some(target) = Name::new(rest) else {
            return Err(Fail::Refuse(format!(
                "a whiteout of {:?} (not a plain name)",
                os(rest)
            )));
        };
        self.stats.whiteouts += 1;
        let Some(dir) = self.walk_to(parent, false, true)? else {
            return Ok(());
        };
        self.remove_lower(&dir, parent, &target)
    }

    /// Remove what the lower layers have at `dir/name` (`dir` is at `path`): all of it when
    /// this layer did not write there; else (a directory this layer wrote into) only the lower
    /// children, recursively.
    fn remove_lower(&mut self, dir: &Dir, path: &[Name], name: &Name) -> R<()> {
        let mut p = path.to_vec();
        p.push(name.clone());
        if !self.touched.contains(&key(&p)) {
            self.cache = None;
            return dir.remove_all(name).map_err(io_err("remove"));
        }
        if dir.kind(name).map_err(io_err("stat"))? == Some(Kind::Dir) {
            let sub = dir.open_dir(name).map_err(io_err("open"))?;
            for child in sub.names().map_err(io_err("readdir"))? {
                self.remove_lower(&sub, &p, &child)?;
            }
        }
        Ok(())
    }

    /// Copy an entry's data into `f` at `base`, leaving zero 4 KiB blocks as holes; the bytes
    /// copied.
    fn copy_sparse<Rd: Read>(
        &mut self,
        e: &mut tar::Entry<Rd>,
        f: &std::fs::File,
        base: u64,
    ) -> R<u64> {
        const BLOCK: usize = 4096;
        let mut buf = vec![0u8; 64 * BLOCK];
        let mut pos = 0u64;
        let limit = self.tree.opts.max_layer_bytes;
        loop {
            // Fill the buffer (so blocks stay aligned to the file's offsets).
            let mut n = 0;
            while n < buf.len() {
                match e.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(Fail::Io("reading the entry".into(), err)),
                }
            }
            if n == 0 {
                break;
            }
            self.stats.file_bytes += n as u64;
            if self.stats.file_bytes > limit {
                return Err(Fail::Limit("expanded size", limit, "bytes"));
            }
            for block in buf[..n].chunks(BLOCK) {
                if block.iter().any(|b| *b != 0) {
                    f.write_all_at(block, base + pos).map_err(io_err("write"))?;
                }
                pos += block.len() as u64;
            }
            if n < buf.len() {
                break;
            }
        }
        Ok(pos)
    }

    /// Owner, mode, xattrs and times of the entry just made at `dir/name` (`None`: `dir`).
    fn metadata<Rd: Read>(
        &mut self,
        e: &mut tar::Entry<Rd>,
        dir: &Dir,
        name: Option<&Name>,
        symlink: bool,
    ) -> R<()> {
        let h = e.header().clone();
        let mode = h.mode().map_err(io_err("mode"))? & 0o7777;
        if self.tree.opts.keep_owners {
            let uid = h.uid().map_err(io_err("uid"))?;
            let gid = h.gid().map_err(io_err("gid"))?;
            let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
                return Err(Fail::Refuse(format!("owner {uid}:{gid} out of range")));
            };
            dir.lchown(name, uid, gid).map_err(io_err("chown"))?;
        }
        if !symlink {
            dir.chmod_not_symlink(name, mode).map_err(io_err("chmod"))?;
        }
        let is_dir_or_file = matches!(
            h.entry_type(),
            EntryType::Directory
                | EntryType::Regular
                | EntryType::Continuous
                | EntryType::GNUSparse
        );
        let t = mtime(e);
        if let Some(exts) = e.pax_extensions().map_err(io_err("pax header"))? {
            for x in exts {
                let x = x.map_err(io_err("pax header"))?;
                let Some(k) = x.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                if k.is_empty() {
                    return Err(Fail::Refuse("an xattr without a name".into()));
                }
                match dir.set_xattr(name, k, x.value_bytes()) {
                    Ok(()) => {}
                    // user.* xattrs cannot be set on symlinks and devices.
                    Err(err)
                        if !is_dir_or_file
                            && matches!(
                                err.raw_os_error(),
                                Some(libc::EPERM) | Some(libc::EOPNOTSUPP)
                            ) =>
                    {
                        warn!(xattr = ?os(k), error = %err, "xattr not set");
                    }
                    Err(err) => {
                        return Err(Fail::Io(format!("setting xattr {:?}", os(k)), err));
                    }
                }
            }
        }
        if h.entry_type() != EntryType::Directory {
            dir.set_times(name, t, t).map_err(io_err("utimensat"))?;
        }
        Ok(())
    }

    /// Directory mtimes, children before parents.
    fn finish(&mut self) -> R<()> {
        let times = std::mem::take(&mut self.dir_times);
        for (comps, t) in times.into_iter().rev() {
            if let Some(d) = self.walk(&comps, false)? {
                d.set_times(None, t, t).map_err(io_err("utimensat"))?;
            }
        }
        Ok(())
    }
}

/// The entry's mtime: a PAX `mtime` (with its fraction) when there, else the header's.
fn mtime<Rd: Read>(e: &mut tar::Entry<Rd>) -> (i64, u32) {
    if let Ok(Some(exts)) = e.pax_extensions() {
        for x in exts.flatten() {
            if x.key_bytes() == b"mtime" {
                if let Some(t) = parse_pax_time(x.value_bytes()) {
                    return t;
                }
            }
        }
    }
    let s = e.header().mtime().unwrap_or(0);
    (i64::try_from(s).unwrap_or(i64::MAX), 0)
}

/// `[-]seconds[.fraction]` as (seconds, nanoseconds).
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    let mut ns = 0u32;
    for (i, c) in frac.chars().take(9).enumerate() {
        ns += c.to_digit(10)? * 10u32.pow(8 - i as u32);
    }
    if secs < 0 && ns > 0 {
        return Some((secs - 1, 1_000_000_000 - ns));
    }
    Some((secs, ns))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn components_refuse_escapes() {
        assert!(components(b"/etc/passwd").is_err());
        assert!(components(b"a/../../b").is_err());
        assert!(components(b"..").is_err());
        assert_eq!(components(b"./a//b/./c/").unwrap().len(), 3);
        assert!(components(b"./").unwrap().is_empty());
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time(b"7"), Some((7, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
