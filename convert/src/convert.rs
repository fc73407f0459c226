//! The orchestration: open the source, apply its layers in order onto `work/rootfs` (file
//! data to one region per layer, `work/regions/<i>`), write the merged erofs metadata of the
//! tree pointing into the regions ([`crate::erofs`]), chunk metadata and regions into
//! `work/out` with the builder, each region a shared blob of its own, and keep the source
//! image's config beside it as [`IMAGE_CONFIG_FILE`].
//!
//! The work directory holds everything written: `layers/` (downloaded or extracted layers),
//! `rootfs/` (the tree, without file data), `regions/`, `meta.erofs`, `out/` (the build
//! directory to push). [`Converted::source_link`] is what the pushed image links to (the
//! source manifest as its OCI 1.1 `subject`, and the index it came from).

use crate::apply::{ApplyOptions, LayerStats, Tree};
use crate::error::{Error, Result};
use crate::layer;
use crate::source::{Image, LayerDesc, ManifestDesc, SourceRef};
use crate::Platform;
use lazyblk_builder::{build_parts, BuildOptions, BuildSummary, Part, SourceLink, Subject};
use lazyblk_registry::Client;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The name of the source image's OCI config in a converted build directory (published by
/// `lazyblk_builder::push` as a layer of that title, media type
/// `application/vnd.oci.image.config.v1+json`).
pub use lazyblk_builder::push::IMAGE_CONFIG_FILE;

/// What to convert and how.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// The platform to pick from an index.
    pub platform: Platform,
    /// Limits for applying layers.
    pub apply: ApplyOptions,
    /// How to chunk the erofs image.
    pub build: BuildOptions,
}

/// Progress reports, in order.
#[derive(Debug)]
pub enum Progress<'a> {
    /// The source is open: its layers and their stored size in all.
    Opened {
        /// The layers.
        layers: &'a [LayerDesc],
    },
    /// Layer `index` (0-based): fetched or checked this many stored bytes.
    Fetch {
        /// The layer.
        index: usize,
        /// Bytes so far.
        done: u64,
    },
    /// Layer `index`: applied this many stored bytes.
    Apply {
        /// The layer.
        index: usize,
        /// Bytes so far.
        done: u64,
    },
    /// Layer `index` is applied.
    Applied {
        /// The layer.
        index: usize,
        /// What it did.
        stats: &'a LayerStats,
    },
    /// Writing the erofs metadata of the tree.
    Metadata,
    /// Chunking the erofs image: bytes done of `total`.
    Build {
        /// Bytes done.
        done: u64,
        /// The image size.
        total: u64,
    },
}

/// The flattened tree, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Regular files (each inode once).
    pub files: u64,
    /// Directories (the root included).
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Names beyond the first of a hardlinked inode.
    pub hardlinks: u64,
    /// Devices, fifos, sockets.
    pub nodes: u64,
    /// Bytes of regular files (each inode once).
    pub bytes: u64,
}

/// What a conversion made.
#[derive(Debug)]
pub struct Converted {
    /// The source manifest used.
    pub manifest: ManifestDesc,
    /// The index it was picked from, when a registry source named one.
    pub index: Option<ManifestDesc>,
    /// The source layers, and what applying each did.
    pub layers: Vec<(LayerDesc, LayerStats)>,
    /// The source image's config (also at `out_dir/image-config.json`).
    pub config: Vec<u8>,
    /// The flattened tree.
    pub tree: TreeStats,
    /// The erofs metadata (the image's first stretch; the regions follow it).
    pub meta: PathBuf,
    /// Where the metadata and each layer's region lie in the image.
    pub layout: crate::erofs::Layout,
    /// The build directory (`manifest`, `blob`, `image-config.json`).
    pub out_dir: PathBuf,
    /// What the builder did.
    pub build: BuildSummary,
}

impl Converted {
    /// What the converted image links to when pushed (`lazyblk_builder::push_linked`): the
    /// source's platform manifest (and index) in its repository, made at `created` (RFC 3339
    /// UTC). `None` for an `oci:` layout or a `docker save` archive: they are in no registry.
    pub fn source_link(&self, src: &SourceRef, created: String) -> Option<SourceLink> {
        let SourceRef::Registry(r) = src else {
            return None;
        };
        let subject = |m: &ManifestDesc| Subject {
            media_type: m.media_type.clone(),
            digest: m.digest.clone(),
            size: m.size,
        };
        Some(SourceLink {
            repository: r.clone(),
            manifest: subject(&self.manifest),
            index: self.index.as_ref().map(subject),
            created,
        })
    }
}

/// Counts bytes read and reports them.
struct Reporting<'a, R> {
    inner: R,
    done: u64,
    report: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Reporting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.report)(self.done);
        Ok(n)
    }
}

/// Convert `src` (`client` for a registry source) in the work directory `work` (created if
/// missing; `rootfs/` and `out/` in it must not exist yet).
pub async fn convert(
    src: &SourceRef,
    client: Option<&Client>,
    work: &Path,
    opts: &ConvertOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Converted> {
    std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    let rootfs = work.join("rootfs");
    let out_dir = work.join("out");
    let regions_dir = work.join("regions");
    for p in [&rootfs, &out_dir, &regions_dir] {
        if p.exists() {
            return Err(Error::Source(format!(
                "{} already exists: give an empty work directory",
                p.display()
            )));
        }
    }
    std::fs::create_dir(&rootfs).map_err(|e| Error::io(&rootfs, e))?;
    let tree = Tree::open_with_regions(&rootfs, opts.apply.clone(), &regions_dir)?;
    let (img, tree, layers) =
        apply_layers(src, client, &opts.platform, None, tree, work, progress).await?;
    let regions = tree.into_regions().expect("opened with regions");
    let tree_stats = count_tree(&rootfs)?;
    progress(Progress::Metadata);
    let meta = work.join("meta.erofs");
    let cs = u64::from(opts.build.chunk_size);
    let layout = crate::erofs::write_image(&rootfs, &regions, cs, volume_uuid(&layers), &meta)?;
    let mut parts = vec![Part {
        path: meta.clone(),
        offset: 0,
        len: layout.meta_len,
        shared: false,
    }];
    for (i, &len) in regions.lens.iter().enumerate() {
        if len > 0 {
            parts.push(Part {
                path: regions.path(i),
                offset: layout.region_offsets[i],
                len: len.next_multiple_of(cs),
                shared: true,
            });
        }
    }
    let total = layout.image_size;
    let build = build_parts(&parts, &out_dir, &opts.build, |done| {
        progress(Progress::Build { done, total })
    })?;
    lazyblk_builder::write_atomic(&out_dir.join(IMAGE_CONFIG_FILE), &img.config)?;
    Ok(Converted {
        manifest: img.manifest.clone(),
        index: img.index.clone(),
        layers,
        config: img.config.clone(),
        tree: tree_stats,
        meta,
        layout,
        out_dir,
        build,
    })
}

/// The volume UUID of an image made of these layers: from their `diff_id`s, so a conversion
/// gives the same bytes again.
fn volume_uuid(layers: &[(LayerDesc, LayerStats)]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    for (_, s) in layers {
        h.update(s.diff_id.as_bytes());
    }
    let mut u = [0u8; 16];
    u.copy_from_slice(&h.finalize().as_bytes()[..16]);
    u
}

/// Count the tree under `root` (symlinks not followed).
pub fn count_tree(root: &Path) -> Result<TreeStats> {
    let mut s = TreeStats {
        dirs: 1,
        ..TreeStats::default()
    };
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let md = e.metadata().map_err(|err| Error::io(e.path(), err))?;
            let ft = md.file_type();
            if ft.is_dir() {
                s.dirs += 1;
                stack.push(e.path());
            } else if ft.is_symlink() {
                s.symlinks += 1;
            } else if ft.is_file() {
                if md.nlink() > 1 && !seen.insert(md.ino()) {
                    s.hardlinks += 1;
                } else {
                    s.files += 1;
                    s.bytes += md.len();
                }
            } else {
                s.nodes += 1;
            }
        }
    }
    Ok(s)
}

/// Apply the layers of `src` (`client` for a registry source; an index resolved for
/// `platform`), base first, onto the existing directory `rootfs` with OCI semantics, each
/// checked against its digest and its `diff_id`: all of them, or with `upto` (a layer digest)
/// the base up to that layer. Layers are downloaded into `work/layers/`. The image opened, and
/// each layer applied with its statistics.
#[allow(clippy::too_many_arguments)]
pub async fn unpack(
    src: &SourceRef,
    client: Option<&Client>,
    platform: &Platform,
    upto: Option<&str>,
    rootfs: &Path,
    work: &Path,
    apply: &ApplyOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(Image, Vec<(LayerDesc, LayerStats)>)> {
    let tree = Tree::open(rootfs, apply.clone())?;
    let (img, _, layers) = apply_layers(src, client, platform, upto, tree, work, progress).await?;
    Ok((img, layers))
}

/// [`unpack`] onto `tree`, given back with the image and each layer's statistics.
async fn apply_layers(
    src: &SourceRef,
    client: Option<&Client>,
    platform: &Platform,
    upto: Option<&str>,
    tree: Tree,
    work: &Path,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(Image, Tree, Vec<(LayerDesc, LayerStats)>)> {
    let img = Image::open(src, client, platform, work).await?;
    if !img.diff_ids.is_empty() && img.diff_ids.len() != img.layers.len() {
        return Err(Error::Source(format!(
            "{src}: the config lists {} diff_ids for {} layers",
            img.diff_ids.len(),
            img.layers.len()
        )));
    }
    progress(Progress::Opened {
        layers: &img.layers,
    });
    let count = match upto {
        None => img.layers.len(),
        Some(d) => {
            1 + img
                .layers
                .iter()
                .position(|l| l.digest == d)
                .ok_or_else(|| Error::Source(format!("{src}: no layer {d}")))?
        }
    };
    let mut layers = Vec::new();
    for (i, l) in img.layers.iter().enumerate().take(count) {
        let label = format!("{}/{} ({})", i + 1, img.layers.len(), l.digest);
        let path = img
            .fetch_layer(i, work, &mut |done| {
                progress(Progress::Fetch { index: i, done })
            })
            .await?;
        let declared = layer::from_media_type(&l.media_type).map_err(|why| Error::Layer {
            layer: label.clone(),
            why,
        })?;
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut report = |done| progress(Progress::Apply { index: i, done });
        let r = Reporting {
            inner: f,
            done: 0,
            report: &mut report,
        };
        let tar = layer::decompress(r, declared).map_err(|why| Error::Layer {
            layer: label.clone(),
            why,
        })?;
        let stats = tree.apply_layer(&label, tar)?;
        if let Some(want) = img.diff_ids.get(i) {
            if *want != stats.diff_id {
                return Err(Error::Digest {
                    what: format!("layer {label}: uncompressed (diff_id)"),
                    expected: want.clone(),
                    actual: stats.diff_id.clone(),
                });
            }
        }
        progress(Progress::Applied {
            index: i,
            stats: &stats,
        });
        layers.push((l.clone(), stats));
    }
    Ok((img, tree, layers))
}
