//! `lazyblk push`: publish a build directory to an OCI registry as a lazyblk artifact
//! (`docs/FORMAT.md`, "In an OCI registry"), and `trace --pack --push`: the same image with a
//! new prefetch pack, as a new manifest over the same blobs.
//!
//! The manifest is written as JSON with sorted keys (not through `oci-spec`'s builder, whose
//! annotations are a `HashMap` and would serialize in a different order each time), so pushing
//! the same directory twice gives the same manifest digest. It is checked by decoding it with
//! `oci-spec` (through the registry client's parser) before it is sent.

use crate::error::{Error, Result};
use lazyblk_format::{
    ImageId, Manifest, PrefetchList, PrefetchPack, MAX_MANIFEST_BYTES, PACK_FILE, PREFETCH_FILE,
};
use lazyblk_registry::link::{CREATED, SOURCE_INDEX, SOURCE_MANIFEST, SOURCE_REPOSITORY};
use lazyblk_registry::{BlobSource, Client, PushOutcome, Reference, ReferrerPush};
use lazyblk_remote::registry::{
    lazyblk_files, ARTIFACT_TYPE, IMAGE_ID, MEDIA_BLOB, MEDIA_CONFIG, MEDIA_MANIFEST, MEDIA_PACK,
    MEDIA_PACK_BLOB, MEDIA_PREFETCH, TITLE,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Media type of the OCI manifest lazyblk pushes.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A converted image's source config (`lazyblk convert`), published beside the image so
/// runtimes find its entrypoint, env, cmd, user and working directory.
pub const IMAGE_CONFIG_FILE: &str = "image-config.json";
/// Its media type (the OCI image config's).
pub const MEDIA_IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// One file of a published image.
#[derive(Clone, Debug)]
pub struct File {
    /// Its name (the layer's title).
    pub name: String,
    /// Its media type.
    pub media_type: &'static str,
    /// `sha256:<hex>` of its bytes.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Where its bytes are (empty: already in the registry, published with the image).
    pub path: PathBuf,
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushSummary {
    /// The lazyblk image id.
    pub image: ImageId,
    /// Digest of the OCI manifest pushed.
    pub digest: String,
    /// Each file and what the registry needed.
    pub files: Vec<(File, PushOutcome)>,
}

fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

fn file(dir: &Path, name: &str, media_type: &'static str) -> Result<File> {
    file_at(dir.join(name), name, media_type)
}

/// The file at `path`, published as `name`.
fn file_at(path: PathBuf, name: &str, media_type: &'static str) -> Result<File> {
    let (digest, size) = sha256_file(&path)?;
    Ok(File {
        name: name.to_string(),
        media_type,
        digest,
        size,
        path,
    })
}

/// The files of the build directory `dir` to publish: the manifest and its blob, and the
/// prefetch list and prefetch pack (with its blob) when they are there and belong to the image,
/// and a converted image's source config ([`IMAGE_CONFIG_FILE`]).
pub fn build_dir_files(dir: &Path) -> Result<(ImageId, Manifest, Vec<File>)> {
    let mpath = dir.join(crate::MANIFEST_FILE);
    let bytes = std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?;
    let id = ImageId::of(&bytes);
    let m = Manifest::decode(&bytes)?;
    let mut files = vec![
        file(dir, crate::MANIFEST_FILE, MEDIA_MANIFEST)?,
        file(dir, &m.blob_name, MEDIA_BLOB)?,
    ];
    // A converted image's layers, each a blob of its own that other images share (the
    // registry keeps one copy: the bytes, so the digest, are the same).
    for b in &m.shared {
        files.push(file(dir, &b.name, MEDIA_BLOB)?);
    }
    if let Ok(b) = std::fs::read(dir.join(PREFETCH_FILE)) {
        PrefetchList::decode(&b, &id, m.chunk_count())
            .map_err(|e| Error::Invalid(format!("{}: {e}", dir.join(PREFETCH_FILE).display())))?;
        files.push(file(dir, PREFETCH_FILE, MEDIA_PREFETCH)?);
    }
    if dir.join(PACK_FILE).exists() {
        files.extend(pack_files(&dir.join(PACK_FILE), &id, &m)?);
    }
    if dir.join(IMAGE_CONFIG_FILE).exists() {
        files.push(file(dir, IMAGE_CONFIG_FILE, MEDIA_IMAGE_CONFIG)?);
    }
    Ok((id, m, files))
}

/// The prefetch pack at `ppath` and its blob (next to it, under the name the pack gives),
/// checked against the image `id`, published as `prefetch.pack` and that name.
fn pack_files(ppath: &Path, id: &ImageId, m: &Manifest) -> Result<Vec<File>> {
    let b = std::fs::read(ppath).map_err(|e| Error::io(ppath, e))?;
    let p = PrefetchPack::decode(&b, id, m.image_size)
        .map_err(|e| Error::Invalid(format!("{}: {e}", ppath.display())))?;
    let dir = ppath.parent().unwrap_or(Path::new("."));
    Ok(vec![
        file_at(ppath.to_path_buf(), PACK_FILE, MEDIA_PACK)?,
        file(dir, &p.blob_name, MEDIA_PACK_BLOB)?,
    ])
}

/// The config blob: what the image is, for tools that look (deterministic bytes).
fn config(id: &ImageId, m: &Manifest) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "image": id.to_string(),
        "imageSize": m.image_size,
        "chunkSize": m.chunk_size,
        "blobSize": m.blob_size,
        "chunks": m.chunk_count(),
    }))
    .expect("json")
}

/// A manifest another one refers to (an OCI descriptor's three fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Its media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its size.
    pub size: u64,
}

/// What a converted image links to (`docs/FORMAT.md`, "Links to the source"): the image it
/// was made from, in the source's repository.
#[derive(Clone, Debug)]
pub struct SourceLink {
    /// The source's repository (the registry it is in, where the link is pushed; the
    /// manifests name only its repository path, never the host).
    pub repository: Reference,
    /// The platform manifest converted: the `subject`.
    pub manifest: Subject,
    /// The index it was picked from: a second referrer, of the index, is pushed.
    pub index: Option<Subject>,
    /// When the image was made (RFC 3339 UTC, [`rfc3339_utc`]): the newest link wins.
    pub created: String,
}

/// `t` as RFC 3339 in UTC to the second (`2025-01-02T03:04:05Z`).
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The OCI manifest of image `id` with `config` and `files` (sorted keys: deterministic).
pub fn oci_manifest(id: &ImageId, config: &[u8], files: &[File]) -> Vec<u8> {
    oci_manifest_linked(id, config, files, None)
}

/// [`oci_manifest`], and when `link` is given, its `subject` (the source's platform manifest,
/// or its index) and the source annotations ([`SOURCE_REPOSITORY`], [`SOURCE_MANIFEST`],
/// [`SOURCE_INDEX`], [`CREATED`]).
pub fn oci_manifest_linked(
    id: &ImageId,
    config: &[u8],
    files: &[File],
    link: Option<(&SourceLink, &Subject)>,
) -> Vec<u8> {
    let layers: Vec<_> = files
        .iter()
        .map(|f| {
            json!({
                "mediaType": f.media_type,
                "digest": f.digest,
                "size": f.size,
                "annotations": { TITLE: f.name, IMAGE_ID: id.to_string() },
            })
        })
        .collect();
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": format!("sha256:{}", hex::encode(Sha256::digest(config))),
            "size": config.len(),
        },
        "layers": layers,
        "annotations": { IMAGE_ID: id.to_string() },
    });
    if let Some((l, subject)) = link {
        m["subject"] = json!({
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        });
        let a = &mut m["annotations"];
        a[CREATED] = json!(l.created);
        a[SOURCE_REPOSITORY] = json!(l.repository.repository());
        a[SOURCE_MANIFEST] = json!(l.manifest.digest);
        if let Some(i) = &l.index {
            a[SOURCE_INDEX] = json!(i.digest);
        }
    }
    serde_json::to_vec_pretty(&m).expect("json")
}

fn reg(e: lazyblk_registry::RegistryError) -> Error {
    Error::Invalid(e.to_string())
}

/// How [`push_files`] pushes the manifest.
#[derive(Clone, Copy)]
enum As<'a> {
    /// Under `r`'s tag (or digest), without a link.
    Plain,
    /// Under `r`'s tag (or digest), with the link's `subject`.
    Linked(&'a SourceLink, &'a Subject),
    /// By digest, as a referrer of the subject ([`Client::push_referrer`]).
    Referrer(&'a SourceLink, &'a Subject),
}

/// Push `files` and the manifest of image `id` to `r` (its tag, or its digest when it has
/// one; none: `latest`): blobs the repository has are skipped, blobs of `mount_from` (another
/// repository of the same registry) are mounted.
#[allow(clippy::too_many_arguments)]
async fn push_files(
    client: &Client,
    r: &Reference,
    id: ImageId,
    m: &Manifest,
    files: Vec<File>,
    mount_from: Option<&str>,
    how: As<'_>,
    progress: &(dyn Fn(&File, PushOutcome) + Sync),
) -> Result<(PushSummary, Option<ReferrerPush>)> {
    let cfg = config(&id, m);
    let manifest = oci_manifest_linked(
        &id,
        &cfg,
        &files,
        match how {
            As::Plain => None,
            As::Linked(l, s) | As::Referrer(l, s) => Some((l, s)),
        },
    );
    // Check what we send decodes as what we read back.
    lazyblk_files(r, OCI_MANIFEST, &manifest).map_err(Error::Invalid)?;
    let cfg_digest = format!("sha256:{}", hex::encode(Sha256::digest(&cfg)));
    client
        .push_blob(
            r,
            &cfg_digest,
            cfg.len() as u64,
            BlobSource::Bytes(cfg.into()),
            None,
        )
        .await
        .map_err(reg)?;
    let mut out = Vec::new();
    for f in files {
        let o = if f.path.as_os_str().is_empty() {
            // Already published with the image: it must still be there.
            let size = client.blob_size(r, &f.digest).await.map_err(reg)?;
            if size != f.size {
                return Err(Error::Invalid(format!(
                    "{r}: blob {} ({}) is {size} bytes, its descriptor says {}",
                    f.digest, f.name, f.size
                )));
            }
            PushOutcome::Exists
        } else {
            client
                .push_blob(
                    r,
                    &f.digest,
                    f.size,
                    BlobSource::File(f.path.clone()),
                    mount_from,
                )
                .await
                .map_err(reg)?
        };
        progress(&f, o);
        out.push((f, o));
    }
    let (digest, referrer) = if let As::Referrer(..) = how {
        let p = client
            .push_referrer(r, OCI_MANIFEST, manifest.into())
            .await
            .map_err(reg)?;
        (p.digest.clone(), Some(p))
    } else {
        let tag = r
            .digest()
            .map(str::to_string)
            .unwrap_or_else(|| r.tag().unwrap_or("latest").to_string());
        let d = client
            .push_manifest(r, &tag, OCI_MANIFEST, manifest.into())
            .await
            .map_err(reg)?;
        (d, None)
    };
    Ok((
        PushSummary {
            image: id,
            digest,
            files: out,
        },
        referrer,
    ))
}

/// `lazyblk push <dir> <ref>`: publish the build directory `dir`.
pub async fn push(
    client: &Client,
    dir: &Path,
    r: &Reference,
    mount_from: Option<&str>,
    progress: &(dyn Fn(&File, PushOutcome) + Sync),
) -> Result<PushSummary> {
    let (id, m, files) = build_dir_files(dir)?;
    Ok(
        push_files(client, r, id, &m, files, mount_from, As::Plain, progress)
            .await?
            .0,
    )
}

/// What [`push_linked`] did.
#[derive(Clone, Debug)]
pub struct LinkedPush {
    /// The push to the destination (its manifest has the source's platform manifest as its
    /// `subject`).
    pub pushed: PushSummary,
    /// The referrers made in the source's repository: of the platform manifest (the same
    /// manifest as `pushed`'s, by digest), and of the index when the source was one (a second
    /// manifest over the same blobs, whose `subject` is the index).
    pub links: Vec<ReferrerPush>,
}

/// `lazyblk convert`'s push: publish the build directory `dir` to `r` as [`push`] does, with
/// an OCI 1.1 `subject` naming the source's platform manifest and annotations naming the
/// source (`link`), and make the source's referrers list it: the same manifest is pushed by
/// digest into the source's repository (its blobs mounted from `r` when it is another
/// repository of the same registry, else uploaded; nothing when it is the same repository),
/// and the referrers tag schema index there updated when the registry has no referrers API.
/// When the source was an index, a second manifest with the index as its `subject` goes there
/// too, so both digests lead to the lazy image.
pub async fn push_linked(
    client: &Client,
    dir: &Path,
    r: &Reference,
    link: &SourceLink,
    progress: &(dyn Fn(&File, PushOutcome) + Sync),
) -> Result<LinkedPush> {
    let (id, m, files) = build_dir_files(dir)?;
    push_files_linked(client, r, id, &m, files, link, progress).await
}

/// [`push_linked`] of image `id`'s `files`: under `r`'s tag with the link's `subject`, then as
/// a referrer of each subject in the source's repository.
async fn push_files_linked(
    client: &Client,
    r: &Reference,
    id: ImageId,
    m: &Manifest,
    files: Vec<File>,
    link: &SourceLink,
    progress: &(dyn Fn(&File, PushOutcome) + Sync),
) -> Result<LinkedPush> {
    let how = As::Linked(link, &link.manifest);
    let (pushed, _) = push_files(client, r, id, m, files.clone(), None, how, progress).await?;
    let src = &link.repository;
    let mount = (src.registry() == r.registry() && src.repository() != r.repository())
        .then(|| r.repository());
    let quiet = &|_: &File, _: PushOutcome| {};
    let mut links = Vec::new();
    let subjects = std::iter::once(&link.manifest).chain(link.index.as_ref());
    for (i, subject) in subjects.enumerate() {
        let files = files.clone();
        let (s, p) = push_files(
            client,
            src,
            id,
            m,
            files,
            mount,
            As::Referrer(link, subject),
            quiet,
        )
        .await?;
        if i == 0 && s.digest != pushed.digest {
            return Err(Error::Invalid(format!(
                "{src}: the linked manifest is {}, not {} as pushed to {r}",
                s.digest, pushed.digest
            )));
        }
        links.push(p.expect("a referrer push reports its link"));
    }
    Ok(LinkedPush { pushed, links })
}

/// `lazyblk trace --pack --push <ref>`: the image `r` names (its manifest and blob, and a
/// published prefetch list and source config) with the prefetch pack at `pack` (and its blob next to it) in
/// place of any it had, pushed as a new manifest under `r`'s tag. The image's blobs are
/// already there and are not sent again. A converted image (one linked to its source: a
/// `subject` and the source annotations) keeps its link, made now: the new manifest is also
/// pushed as a referrer of the source, the newest, so that what finds the lazy version of the
/// source (the snapshotter, `add <source>`) finds the one with the pack.
pub async fn push_pack(
    client: &Client,
    pack: &Path,
    r: &Reference,
    progress: &(dyn Fn(&File, PushOutcome) + Sync),
) -> Result<PushSummary> {
    let got = client.resolve(r).await.map_err(reg)?;
    let published = lazyblk_files(r, &got.media_type, &got.bytes).map_err(Error::Invalid)?;
    let layer = |name: &str| published.files.get(name).cloned();
    let ml = layer(crate::MANIFEST_FILE).expect("lazyblk_files checks the manifest layer");
    let mbytes = client
        .get_blob(r, &ml.digest, MAX_MANIFEST_BYTES)
        .await
        .map_err(reg)?;
    let id = ImageId::of(&mbytes);
    let m = Manifest::decode(&mbytes)?;
    // The image's own files as published (not re-uploaded: the registry has them).
    let mut files = Vec::new();
    for (name, media_type) in [
        (crate::MANIFEST_FILE, MEDIA_MANIFEST),
        (m.blob_name.as_str(), MEDIA_BLOB),
        (PREFETCH_FILE, MEDIA_PREFETCH),
        (IMAGE_CONFIG_FILE, MEDIA_IMAGE_CONFIG),
    ] {
        if let Some(l) = layer(name) {
            files.push(File {
                name: name.to_string(),
                media_type,
                digest: l.digest,
                size: l.size,
                path: PathBuf::new(),
            });
        }
    }
    for b in &m.shared {
        let l = layer(&b.name).ok_or_else(|| {
            Error::Invalid(format!(
                "{r}: the image has no layer {:?} (a shared blob)",
                b.name
            ))
        })?;
        files.push(File {
            name: b.name.clone(),
            media_type: MEDIA_BLOB,
            digest: l.digest,
            size: l.size,
            path: PathBuf::new(),
        });
    }
    files.extend(pack_files(pack, &id, &m)?);
    match link_of(client, r, &got.bytes).await? {
        Some(link) => Ok(push_files_linked(client, r, id, &m, files, &link, progress)
            .await?
            .pushed),
        None => Ok(
            push_files(client, r, id, &m, files, None, As::Plain, progress)
                .await?
                .0,
        ),
    }
}

/// The link to its source that the lazyblk manifest `bytes` (pushed at `r`) carries, made anew
/// (`created` now), or `None` for an image that was not converted. The index's media type and
/// size, which the manifest names only by digest, are read from the source's repository.
async fn link_of(client: &Client, r: &Reference, bytes: &[u8]) -> Result<Option<SourceLink>> {
    let bad =
        |what: &str| Error::Invalid(format!("{r}: the manifest's link to its source: {what}"));
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let Some(subject) = v.get("subject") else {
        return Ok(None);
    };
    let text = |x: &serde_json::Value, k: &str| x.get(k).and_then(|s| s.as_str()).map(String::from);
    let manifest = Subject {
        media_type: text(subject, "mediaType").ok_or_else(|| bad("subject without mediaType"))?,
        digest: text(subject, "digest").ok_or_else(|| bad("subject without digest"))?,
        size: subject
            .get("size")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| bad("subject without size"))?,
    };
    let a = v.get("annotations").cloned().unwrap_or_default();
    let repo = text(&a, SOURCE_REPOSITORY).ok_or_else(|| bad("no source repository"))?;
    let repository = Reference::parse(&format!("{}/{repo}@{}", r.registry(), manifest.digest))
        .map_err(|e| bad(&format!("source repository {repo:?}: {e}")))?;
    let index = match text(&a, SOURCE_INDEX) {
        Some(d) => {
            let at = repository
                .with_digest(&d)
                .map_err(|e| bad(&format!("source index {d:?}: {e}")))?;
            let got = client.resolve(&at).await.map_err(reg)?;
            Some(Subject {
                media_type: got.media_type,
                digest: d,
                size: got.bytes.len() as u64,
            })
        }
        None => None,
    };
    Ok(Some(SourceLink {
        repository,
        manifest,
        index,
        created: rfc3339_utc(std::time::SystemTime::now()),
    }))
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps() {
        let at = |s| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
