//! Links between images (OCI 1.1): a manifest whose `subject` names another manifest is one of
//! its *referrers*.
//!
//! [`Client::push_referrer`] pushes such a manifest (by digest) so that its subject's referrers
//! list it: a registry with the referrers API indexes it itself and says so (`OCI-Subject` in
//! the answer to the push); for one without (distribution 2.8, Debian's `docker-registry`) the
//! client keeps the *referrers tag schema*: an image index tagged `sha256-<hex of the subject's
//! digest>` in the subject's repository, read, merged ([`merge_referrer`]: other entries kept
//! as they are, one entry per digest) and written back, then read again to check the entry
//! stayed (another writer may have replaced the index in between; tried three times).
//!
//! [`Client::find_referrer`] goes the other way: from a reference (a tag or a digest; an index
//! is resolved to one platform's manifest) to the newest referrer of one artifact type, checked
//! (its manifest exists and its `subject` is the digest it was listed under) and returned as a
//! pinned reference in the source's repository. Referrers of the index itself count when they
//! name the platform manifest in [`SOURCE_MANIFEST`].
//!
//! Links name digests, and repositories only in annotations ([`SOURCE_REPOSITORY`]), never a
//! registry host: a link holds when the registry is mirrored, copied or moved.

use bytes::Bytes;
use oci_spec::image::Descriptor;
use serde_json::{json, Map, Value};
use tracing::debug;

use crate::client::Client;
use crate::error::{ErrorKind, RegistryError, Result};
use crate::manifest::{is_index, parse_manifest, sha256_digest, OCI_INDEX};
use crate::reference::{validate_digest, Reference};
use crate::Platform;

/// When a manifest was made (RFC 3339, UTC: `2025-01-02T03:04:05Z`); the newest referrer wins.
pub const CREATED: &str = "org.opencontainers.image.created";
/// The repository (no host) of the image a manifest was made from.
pub const SOURCE_REPOSITORY: &str = "io.lazyblk.source.repository";
/// The digest of the (platform) manifest a manifest was made from.
pub const SOURCE_MANIFEST: &str = "io.lazyblk.source.manifest";
/// The digest of the index that platform manifest was picked from, if any.
pub const SOURCE_INDEX: &str = "io.lazyblk.source.index";

/// The referrers tag schema's tag for `digest`: `<alg>-<hex>`, the hex cut to 64 characters.
pub fn referrers_tag(digest: &str) -> Result<String> {
    validate_digest(digest)?;
    let (alg, hex) = digest
        .split_once(':')
        .expect("a validated digest has a ':'");
    Ok(format!("{alg}-{}", &hex[..hex.len().min(64)]))
}

/// What [`Client::push_referrer`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferrerPush {
    /// The manifest's digest.
    pub digest: String,
    /// Its subject's digest.
    pub subject: String,
    /// Whether the referrers tag schema index was written (the registry did not answer with
    /// `OCI-Subject`); `false`: the registry's referrers API lists it.
    pub fallback: bool,
}

/// A referrer found by [`Client::find_referrer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The referrer, pinned: the source's registry and repository, `@` its digest (no tag).
    pub reference: Reference,
    /// The digest it refers to (its `subject`): the platform manifest, or the index.
    pub subject: String,
    /// The platform manifest the source resolved to.
    pub manifest: String,
    /// The index the source resolved through, when it was one.
    pub index: Option<String>,
    /// Its [`CREATED`] annotation, as listed.
    pub created: Option<String>,
}

fn bad(what: &str, detail: impl std::fmt::Display) -> RegistryError {
    RegistryError::new(ErrorKind::Protocol, "", None, format!("{what}: {detail}"))
}

/// The subject digest of the manifest `bytes` (of `media_type`), and the descriptor a
/// referrers index lists for it: media type, digest, size, `artifactType` (without one, the
/// config's media type, as the referrers API does) and its annotations.
pub fn referrer_entry(media_type: &str, bytes: &[u8]) -> Result<(String, Value)> {
    parse_manifest(media_type, bytes)?;
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad("referrer", e))?;
    let subject = v
        .pointer("/subject/digest")
        .and_then(Value::as_str)
        .ok_or_else(|| RegistryError::invalid("referrer: the manifest has no subject"))?;
    validate_digest(subject)?;
    let mut e = Map::new();
    e.insert("mediaType".into(), json!(media_type));
    e.insert("digest".into(), json!(sha256_digest(bytes)));
    e.insert("size".into(), json!(bytes.len()));
    if let Some(a) = v
        .get("artifactType")
        .or_else(|| v.pointer("/config/mediaType"))
        .and_then(Value::as_str)
    {
        e.insert("artifactType".into(), json!(a));
    }
    if let Some(a) = v.get("annotations").filter(|a| a.is_object()) {
        e.insert("annotations".into(), a.clone());
    }
    Ok((subject.to_string(), Value::Object(e)))
}

/// The referrers tag schema index `existing` (`None`: there is none yet) with `entry` added:
/// the other entries kept as they are (fields this client does not know included), an entry of
/// the same digest replaced. `None` when `existing` already lists `entry` exactly. The result
/// decodes as an OCI index.
pub fn merge_referrer(existing: Option<&[u8]>, entry: &Value) -> Result<Option<Vec<u8>>> {
    let digest = entry
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| RegistryError::invalid("referrer entry without a digest"))?;
    let mut index = match existing {
        None => json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
        Some(b) => serde_json::from_slice(b).map_err(|e| bad("referrers index", e))?,
    };
    let obj = index
        .as_object_mut()
        .ok_or_else(|| bad("referrers index", "not a JSON object"))?;
    match obj.get("mediaType") {
        None => {
            obj.insert("mediaType".into(), json!(OCI_INDEX));
        }
        Some(m) if m == OCI_INDEX => {}
        Some(m) => return Err(bad("referrers index", format!("mediaType {m}"))),
    }
    let manifests = obj
        .entry("manifests")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or_else(|| bad("referrers index", "manifests is not a list"))?;
    if manifests.iter().any(|m| m == entry) {
        return Ok(None);
    }
    manifests.retain(|m| m.get("digest").and_then(Value::as_str) != Some(digest));
    manifests.push(entry.clone());
    let out = serde_json::to_vec(&index).expect("json");
    parse_manifest(OCI_INDEX, &out)?;
    Ok(Some(out))
}

/// Whether the index `bytes` lists `digest`.
fn lists(bytes: &[u8], digest: &str) -> bool {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("manifests").and_then(Value::as_array).map(|m| {
                m.iter()
                    .any(|e| e.get("digest").and_then(Value::as_str) == Some(digest))
            })
        })
        .unwrap_or(false)
}

fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// `found` newest first: by the [`CREATED`] annotation (RFC 3339 UTC, compared as text; one
/// without counts as oldest), on a tie the one listed later first.
pub fn newest_first(found: &[Descriptor]) -> Vec<&Descriptor> {
    let mut v: Vec<(usize, &Descriptor)> = found.iter().enumerate().collect();
    v.sort_by(|(i, a), (j, b)| {
        annotation(b, CREATED)
            .cmp(&annotation(a, CREATED))
            .then(j.cmp(i))
    });
    v.into_iter().map(|(_, d)| d).collect()
}

impl Client {
    /// Push the manifest `bytes` (of `media_type`, with a `subject`) to `r`'s repository by its
    /// digest, and make sure its subject's referrers list it: the registry's referrers API when
    /// it acknowledges the subject (`OCI-Subject`), else the referrers tag schema index in that
    /// repository (module doc). The subject should be in the same repository.
    pub async fn push_referrer(
        &self,
        r: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<ReferrerPush> {
        let (subject, entry) = referrer_entry(media_type, &bytes)?;
        let digest = sha256_digest(&bytes);
        let (digest, acked) = self.put_manifest(r, &digest, media_type, bytes).await?;
        if acked.as_deref() == Some(subject.as_str()) {
            debug!(
                repo = r.repository(),
                digest, subject, "referrer indexed by the registry"
            );
            return Ok(ReferrerPush {
                digest,
                subject,
                fallback: false,
            });
        }
        let tag = referrers_tag(&subject)?;
        let tr = r.with_tag(&tag)?;
        let here = |detail: String| {
            RegistryError::new(
                ErrorKind::Protocol,
                r.registry(),
                Some(r.repository()),
                detail,
            )
        };
        for _ in 0..3 {
            let existing = self.referrers_index(&tr, &tag).await?;
            if let Some(merged) = merge_referrer(existing.as_deref(), &entry)
                .map_err(|e| here(format!("referrers tag {tag:?}: {e}")))?
            {
                self.push_manifest(&tr, &tag, OCI_INDEX, merged.into())
                    .await?;
            }
            // Another writer may have replaced the index since it was read.
            if self
                .referrers_index(&tr, &tag)
                .await?
                .is_some_and(|b| lists(&b, &digest))
            {
                debug!(
                    repo = r.repository(),
                    digest, tag, "referrer listed in the tag schema index"
                );
                return Ok(ReferrerPush {
                    digest,
                    subject,
                    fallback: true,
                });
            }
        }
        Err(here(format!(
            "referrers tag {tag:?}: {digest} is still not listed after three writes (another writer keeps replacing it)"
        )))
    }

    /// The referrers tag schema index at `tr` (tag `tag`), `None` when there is none.
    async fn referrers_index(&self, tr: &Reference, tag: &str) -> Result<Option<Bytes>> {
        match self.resolve(tr).await {
            Ok(res) if is_index(&res.media_type) => Ok(Some(res.bytes)),
            Ok(res) => Err(RegistryError::new(
                ErrorKind::MediaType,
                tr.registry(),
                Some(tr.repository()),
                format!(
                    "referrers tag {tag:?} is a {} (want an index)",
                    res.media_type
                ),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The newest referrer of `artifact_type` of the image `source` names (a tag or a digest;
    /// an index is resolved to its manifest for `platform`), looked up under the manifest's
    /// digest and then under the index's (entries there count only when their
    /// [`SOURCE_MANIFEST`] annotation is that manifest). Each candidate is checked, newest
    /// first: its manifest must exist in the repository and its `subject` be the digest it
    /// was listed under (a stale or wrong entry of a tag schema index is skipped). `None`:
    /// the image has no such referrer.
    pub async fn find_referrer(
        &self,
        source: &Reference,
        artifact_type: &str,
        platform: &Platform,
    ) -> Result<Option<Link>> {
        let got = self.resolve(source).await?;
        let (manifest, index) = if is_index(&got.media_type) {
            let name = |detail: String| {
                RegistryError::new(
                    ErrorKind::NotFound,
                    source.registry(),
                    Some(source.repository()),
                    detail,
                )
            };
            let d = platform
                .select(&got.media_type, &got.bytes)
                .map_err(|e| name(format!("{}: {e}", source.manifest_ref())).with_kind(e.kind()))?
                .ok_or_else(|| {
                    name(format!(
                        "{}: the index has no manifest for {platform}",
                        source.manifest_ref()
                    ))
                })?;
            (d.digest().to_string(), Some(got.digest))
        } else {
            (got.digest, None)
        };
        // Both lists at once: each is a request or two (the referrers API, then the tag
        // schema where the registry has no API), one round trip saved at every attach.
        let (of_manifest, of_index) = tokio::join!(
            self.referrers(source, &manifest, Some(artifact_type)),
            async {
                match &index {
                    Some(i) => Some(self.referrers(source, i, Some(artifact_type)).await),
                    None => None,
                }
            }
        );
        let mut lists = vec![(manifest.clone(), of_manifest?)];
        if let (Some(i), Some(of_index)) = (&index, of_index) {
            let of_index = of_index?;
            lists.push((
                i.clone(),
                of_index
                    .into_iter()
                    .filter(|d| annotation(d, SOURCE_MANIFEST) == Some(manifest.as_str()))
                    .collect(),
            ));
        }
        for (subject, found) in &lists {
            for d in newest_first(found) {
                let pinned = source.pinned(d.digest().as_ref())?;
                match self.resolve(&pinned).await {
                    Ok(res) => {
                        let v: Value = serde_json::from_slice(&res.bytes).unwrap_or_default();
                        let of = v.pointer("/subject/digest").and_then(Value::as_str);
                        let at = v.get("artifactType").and_then(Value::as_str);
                        if of != Some(subject.as_str()) || at != Some(artifact_type) {
                            debug!(%pinned, ?of, ?at, "listed referrer does not refer to {subject}; skipped");
                            continue;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        debug!(%pinned, "listed referrer is gone; skipped");
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                return Ok(Some(Link {
                    reference: pinned,
                    subject: subject.clone(),
                    manifest,
                    index,
                    created: annotation(d, CREATED).map(str::to_string),
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::OCI_MANIFEST;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn referrer(created: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x.test",
            "config": {"mediaType": "application/x.cfg", "size": 2,
              "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": D1, "size": 10},
            "annotations": {CREATED: created},
        }))
        .unwrap()
    }

    #[test]
    fn tags() {
        assert_eq!(
            referrers_tag(D1).unwrap(),
            format!("sha256-{}", "1".repeat(64))
        );
        let long = format!("sha512:{}", "a".repeat(128));
        assert_eq!(
            referrers_tag(&long).unwrap(),
            format!("sha512-{}", "a".repeat(64))
        );
        assert!(referrers_tag("sha256:nope").is_err());
    }

    #[test]
    fn entries() {
        let m = referrer("2025-01-01T00:00:00Z");
        let (subject, e) = referrer_entry(OCI_MANIFEST, &m).unwrap();
        assert_eq!(subject, D1);
        assert_eq!(e["digest"], sha256_digest(&m));
        assert_eq!(e["size"], m.len());
        assert_eq!(e["artifactType"], "application/x.test");
        assert_eq!(e["annotations"][CREATED], "2025-01-01T00:00:00Z");
        // No subject: not a referrer.
        let plain = String::from_utf8(m.clone())
            .unwrap()
            .replace("\"subject\"", "\"x\"");
        let err = referrer_entry(OCI_MANIFEST, plain.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("no subject"), "{err}");
    }

    #[test]
    fn merging_keeps_others_and_deduplicates() {
        let (_, a) = referrer_entry(OCI_MANIFEST, &referrer("2025-01-01T00:00:00Z")).unwrap();
        let (_, b) = referrer_entry(OCI_MANIFEST, &referrer("2025-02-01T00:00:00Z")).unwrap();
        let one = merge_referrer(None, &a).unwrap().unwrap();
        // Someone else's entry, with a field we do not know.
        let mut v: Value = serde_json::from_slice(&one).unwrap();
        v["manifests"].as_array_mut().unwrap().insert(
            0,
            json!({"mediaType": OCI_MANIFEST, "digest": D1, "size": 3, "x-other": true}),
        );
        let two = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            merge_referrer(Some(&two), &a).unwrap(),
            None,
            "already listed"
        );
        let three = merge_referrer(Some(&two), &b).unwrap().unwrap();
        let v: Value = serde_json::from_slice(&three).unwrap();
        let m = v["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0]["x-other"], true);
        assert!(lists(&three, a["digest"].as_str().unwrap()));
        // The same digest with new annotations replaces the entry.
        let mut a2 = a.clone();
        a2["annotations"]["k"] = json!("v");
        let four = merge_referrer(Some(&three), &a2).unwrap().unwrap();
        let v: Value = serde_json::from_slice(&four).unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 3);
        assert_eq!(v["manifests"][2]["annotations"]["k"], "v");
        // Not an index.
        for bad in [
            &b"[]"[..],
            b"{",
            br#"{"mediaType":"x"}"#,
            br#"{"manifests":{}}"#,
        ] {
            assert!(
                merge_referrer(Some(bad), &a).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn newest_wins() {
        let d = |digit: char, created: Option<&str>| {
            let mut v = json!({"mediaType": OCI_MANIFEST, "size": 1,
                "digest": format!("sha256:{}", digit.to_string().repeat(64))});
            if let Some(c) = created {
                v["annotations"] = json!({CREATED: c});
            }
            serde_json::from_value::<Descriptor>(v).unwrap()
        };
        let found = [
            d('1', Some("2025-03-01T00:00:00Z")),
            d('2', None),
            d('3', Some("2025-01-01T00:00:00Z")),
            d('4', Some("2025-03-01T00:00:00Z")),
            d('5', None),
        ];
        let order: Vec<String> = newest_first(&found)
            .iter()
            .map(|d| d.digest().to_string()[7..8].to_string())
            .collect();
        assert_eq!(order, ["4", "1", "3", "5", "2"]);
        assert!(newest_first(&[]).is_empty());
    }
}
