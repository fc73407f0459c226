//! Push (blobs: existence check, cross-repository mount, monolithic and chunked upload;
//! manifests), tag listing and referrers.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::debug;
use url::Url;

use crate::auth::pull_scope;
use crate::client::Client;
use crate::endpoints::{join, Endpoint};
use crate::error::{ErrorKind, RegistryError, Result};
use crate::manifest::{bare_media_type, digest_matches, sha256_digest, OCI_INDEX};
use crate::reference::{validate_digest, Reference};
use crate::transport::{exec, read_limited, status_error, Ctx};

/// Where a blob's bytes come from for [`Client::push_blob`].
#[derive(Clone, Debug)]
pub enum BlobSource {
    /// In memory.
    Bytes(Bytes),
    /// A file, read piece by piece (never wholly in memory when chunked).
    File(PathBuf),
}

/// What [`Client::push_blob`] had to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// The repository already had the blob (HEAD).
    Exists,
    /// Mounted from the `mount_from` repository without uploading.
    Mounted,
    /// Uploaded in one PUT.
    Uploaded,
    /// Uploaded in this many PATCH pieces.
    UploadedChunked(u64),
}

/// The slowest upload (bytes per second) a piece of `chunk_size` is given time for beyond
/// `request_timeout`.
pub(crate) const MIN_UPLOAD_RATE: u64 = 256 << 10;

fn push_scope(repo: &str, from: Option<&str>) -> String {
    match from {
        Some(f) if f != repo => format!("repository:{repo}:pull,push repository:{f}:pull"),
        _ => format!("repository:{repo}:pull,push"),
    }
}

impl Client {
    fn push_endpoint(&self, r: &Reference) -> Result<Endpoint> {
        let eps = self.ordered(r, |c| c.push)?;
        Ok(eps
            .into_iter()
            .find(|e| e.origin || e.caps.push)
            .expect("the origin is always listed"))
    }

    /// Send to `url`: through `send_authed` when it is the endpoint's origin, else without the
    /// registry's credentials. In total `request_timeout`, plus one second per
    /// [`MIN_UPLOAD_RATE`] bytes of body (a stalled upload is only caught by a total limit:
    /// `read_timeout` does not watch writes).
    #[allow(clippy::too_many_arguments)]
    async fn send_upload(
        &self,
        ep: &Endpoint,
        scope: &str,
        ctx: &Ctx,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<reqwest::Response> {
        let limit = self.inner.opts.request_timeout
            + Duration::from_secs(body.len() as u64 / MIN_UPLOAD_RATE);
        let mk = {
            let (url, headers) = (url.clone(), headers.clone());
            move |c: &reqwest::Client| {
                c.request(method.clone(), url.clone())
                    .headers(headers.clone())
                    .body(body.clone())
                    .timeout(limit)
            }
        };
        if url.origin() == ep.base.origin() {
            Ok(self.send_authed(ep, scope, ctx, &mk).await?.0)
        } else {
            exec(mk(&ep.http), None, ctx).await
        }
    }

    /// Push blob `digest` (`size` bytes from `source`) to `r`'s repository: nothing when the
    /// repository has it; a cross-repository mount from `mount_from` (same registry) when given
    /// and the registry agrees (falling back to an upload on 202); else one PUT up to
    /// `chunk_size` bytes, PATCH pieces of `chunk_size` above.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        source: BlobSource,
        mount_from: Option<&str>,
    ) -> Result<PushOutcome> {
        validate_digest(digest)?;
        if let BlobSource::Bytes(b) = &source {
            if b.len() as u64 != size {
                return Err(RegistryError::invalid(format!(
                    "blob {digest}: {} bytes given, size says {size}",
                    b.len()
                )));
            }
        }
        if let Some(f) = mount_from {
            crate::reference::validate_repository(f)?;
        }
        let ep = self.push_endpoint(r)?;
        let repo = r.repository();
        let scope = push_scope(repo, mount_from);
        let ctx = Ctx::new(&ep, repo, "blob", digest);
        // 1. Already there?
        let url = join(&ep, &format!("{repo}/blobs/{digest}"), &ctx)?;
        let head = self
            .send_following(&ep, &scope, &ctx, Method::HEAD, url, HeaderMap::new(), None)
            .await?;
        match head.status() {
            s if s.is_success() => {
                debug!(repo, digest, "blob exists");
                return Ok(PushOutcome::Exists);
            }
            StatusCode::NOT_FOUND => {}
            _ => return Err(status_error(head, &ctx).await),
        }
        // 2. Mount, or open an upload session.
        let mut url = join(&ep, &format!("{repo}/blobs/uploads/"), &ctx)?;
        if let Some(from) = mount_from {
            url.query_pairs_mut()
                .append_pair("mount", digest)
                .append_pair("from", from);
        }
        let resp = self
            .send_upload(
                &ep,
                &scope,
                &ctx,
                Method::POST,
                &url,
                HeaderMap::new(),
                Bytes::new(),
            )
            .await?;
        let mut loc = match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => {
                debug!(repo, digest, from = mount_from, "blob mounted");
                return Ok(PushOutcome::Mounted);
            }
            StatusCode::ACCEPTED => location(&resp, &url, &ctx)?,
            _ => return Err(status_error(resp, &ctx).await),
        };
        // 3. Upload.
        let chunk = self.inner.opts.chunk_size.max(1);
        let octet = || {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h
        };
        let outcome = if size <= chunk {
            let body = read_source(&source, 0, size, &ctx).await?;
            if let Some(actual) = digest_matches(digest, &body) {
                return Err(ctx.err(
                    ErrorKind::DigestMismatch,
                    format!("blob {digest}: source hashes to {actual}"),
                ));
            }
            let mut put = loc.clone();
            put.query_pairs_mut().append_pair("digest", digest);
            let resp = self
                .send_upload(&ep, &scope, &ctx, Method::PUT, &put, octet(), body)
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(put_error(resp, &ctx).await);
            }
            PushOutcome::Uploaded
        } else {
            let mut at = 0u64;
            let mut pieces = 0u64;
            while at < size {
                let n = chunk.min(size - at);
                let body = read_source(&source, at, n, &ctx).await?;
                let mut h = octet();
                h.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("{at}-{}", at + n - 1)).expect("ascii"),
                );
                let resp = self
                    .send_upload(&ep, &scope, &ctx, Method::PATCH, &loc, h, body)
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(status_error(resp, &ctx).await);
                }
                loc = location(&resp, &loc, &ctx)?;
                at += n;
                pieces += 1;
            }
            let mut put = loc.clone();
            put.query_pairs_mut().append_pair("digest", digest);
            let resp = self
                .send_upload(
                    &ep,
                    &scope,
                    &ctx,
                    Method::PUT,
                    &put,
                    HeaderMap::new(),
                    Bytes::new(),
                )
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(put_error(resp, &ctx).await);
            }
            PushOutcome::UploadedChunked(pieces)
        };
        debug!(repo, digest, size, ?outcome, "blob pushed");
        Ok(outcome)
    }

    /// Push a manifest under `reference` (a tag, or its digest) with `media_type`. Returns its
    /// digest (`sha256:<hex>` of `bytes`), checked against the registry's
    /// `Docker-Content-Digest`.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String> {
        Ok(self.put_manifest(r, reference, media_type, bytes).await?.0)
    }

    /// [`Client::push_manifest`], and the `OCI-Subject` header of the answer (a registry with
    /// the referrers API sends it when the manifest has a `subject`).
    pub(crate) async fn put_manifest(
        &self,
        r: &Reference,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(String, Option<String>)> {
        let digest = sha256_digest(&bytes);
        if reference.contains(':') {
            validate_digest(reference)?;
            if reference != digest {
                return Err(RegistryError::invalid(format!(
                    "manifest hashes to {digest}, not {reference}"
                )));
            }
        } else if !crate::reference::valid_tag(reference) {
            return Err(RegistryError::invalid(format!("invalid tag {reference:?}")));
        }
        let ep = self.push_endpoint(r)?;
        let repo = r.repository();
        let what = if reference.contains(':') {
            format!("digest {reference}")
        } else {
            format!("tag {reference:?}")
        };
        let ctx = Ctx::new(&ep, repo, "manifest", what);
        let url = join(&ep, &format!("{repo}/manifests/{reference}"), &ctx)?;
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type)
                .map_err(|_| RegistryError::invalid(format!("bad media type {media_type:?}")))?,
        );
        let resp = self
            .send_upload(
                &ep,
                &push_scope(repo, None),
                &ctx,
                Method::PUT,
                &url,
                h,
                bytes,
            )
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(put_error(resp, &ctx).await);
        }
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if d.starts_with("sha256:") && d != digest {
                return Err(ctx.err(
                    ErrorKind::DigestMismatch,
                    format!("registry stored the manifest as {d}, expected {digest}"),
                ));
            }
        }
        let subject = resp
            .headers()
            .get("oci-subject")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((digest, subject))
    }

    /// All tags of `r`'s repository (following `Link: <..>; rel="next"` pages).
    pub async fn list_tags(&self, r: &Reference) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Tags {
            tags: Option<Vec<String>>,
        }
        let mut last = None;
        'eps: for ep in self.ordered(r, |c| c.resolve)? {
            let ctx = Ctx::new(&ep, r.repository(), "tags", "");
            let mut url = join(&ep, &format!("{}/tags/list", r.repository()), &ctx)?;
            url.query_pairs_mut().append_pair("n", "1000");
            let mut out = Vec::new();
            for _ in 0..10_000 {
                let res = async {
                    let resp = self
                        .send_following(
                            &ep,
                            &pull_scope(r.repository()),
                            &ctx,
                            Method::GET,
                            url.clone(),
                            HeaderMap::new(),
                            None,
                        )
                        .await?;
                    if !resp.status().is_success() {
                        return Err(status_error(resp, &ctx).await);
                    }
                    let next = next_link(resp.headers(), &url);
                    let body = read_limited(resp, 16 << 20, &ctx).await?;
                    let t: Tags = serde_json::from_slice(&body).map_err(|e| {
                        ctx.err(ErrorKind::Protocol, format!("tags list: invalid JSON: {e}"))
                    })?;
                    Ok((t.tags.unwrap_or_default(), next))
                }
                .await;
                match res {
                    Ok((tags, next)) => {
                        out.extend(tags);
                        match next {
                            Some(n) => url = n,
                            None => {
                                self.mark_up(&ep);
                                return Ok(out);
                            }
                        }
                    }
                    Err(e) if !ep.origin => {
                        self.mark_down(&ep, &e);
                        last = Some(e);
                        continue 'eps;
                    }
                    Err(e) => return Err(e),
                }
            }
            return Err(ctx.err(ErrorKind::Protocol, "tags list: more than 10000 pages"));
        }
        Err(last.unwrap_or_else(|| RegistryError::invalid("no endpoint")))
    }

    /// The manifests that refer to `digest` (their `subject`), optionally only those of
    /// `artifact_type`: the OCI 1.1 referrers API, or when the registry lacks it (404), the
    /// referrers tag schema (an index tagged `sha256-<hex>`). Empty when there are none.
    pub async fn referrers(
        &self,
        r: &Reference,
        digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        validate_digest(digest)?;
        let ep = self
            .ordered(r, |c| c.pull)?
            .pop()
            .expect("the origin is always listed");
        let ctx = Ctx::new(&ep, r.repository(), "referrers of", digest);
        let mut url = join(&ep, &format!("{}/referrers/{digest}", r.repository()), &ctx)?;
        if let Some(a) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", a);
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let resp = self
            .send_following(
                &ep,
                &pull_scope(r.repository()),
                &ctx,
                Method::GET,
                url,
                h,
                None,
            )
            .await?;
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(bare_media_type);
        let index = if status.is_success() && ct.as_deref() == Some(OCI_INDEX) {
            let body = read_limited(resp, self.inner.opts.manifest_limit, &ctx).await?;
            serde_json::from_slice::<ImageIndex>(&body).map_err(|e| {
                ctx.err(
                    ErrorKind::Protocol,
                    format!("referrers of {digest}: invalid index: {e}"),
                )
            })?
        } else if matches!(status.as_u16(), 200..=299 | 400 | 404 | 405 | 501) {
            // No referrers API: the tag schema.
            let tag = crate::link::referrers_tag(digest)?;
            let tr = r.with_tag(&tag)?;
            match self.resolve(&tr).await {
                Ok(res) if crate::manifest::is_index(&res.media_type) => {
                    serde_json::from_slice::<ImageIndex>(&res.bytes).map_err(|e| {
                        ctx.err(
                            ErrorKind::Protocol,
                            format!("referrers tag {tag:?}: invalid index: {e}"),
                        )
                    })?
                }
                Ok(res) => {
                    return Err(ctx.err(
                        ErrorKind::MediaType,
                        format!(
                            "referrers tag {tag:?} is a {} (want an index)",
                            res.media_type
                        ),
                    ))
                }
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        } else {
            return Err(status_error(resp, &ctx).await);
        };
        Ok(index
            .manifests()
            .iter()
            .filter(|d| {
                artifact_type.is_none_or_eq(d.artifact_type().as_ref().map(|a| a.to_string()))
            })
            .cloned()
            .collect())
    }
}

trait FilterEq {
    fn is_none_or_eq(&self, have: Option<String>) -> bool;
}

impl FilterEq for Option<&str> {
    fn is_none_or_eq(&self, have: Option<String>) -> bool {
        match self {
            None => true,
            Some(want) => have.as_deref() == Some(*want),
        }
    }
}

/// The upload `Location` of a response, absolute.
fn location(resp: &reqwest::Response, base: &Url, ctx: &Ctx) -> Result<Url> {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| base.join(l).ok())
        .ok_or_else(|| {
            ctx.err(
                ErrorKind::Protocol,
                format!(
                    "upload of {}: {} without a valid Location",
                    ctx.what,
                    resp.status()
                ),
            )
        })
}

/// A failed PUT: `DIGEST_INVALID` is a digest mismatch, `MANIFEST_INVALID` etc. permanent.
async fn put_error(resp: reqwest::Response, ctx: &Ctx) -> RegistryError {
    let status = resp.status();
    let e = status_error(resp, ctx).await;
    if status == StatusCode::BAD_REQUEST && e.to_string().to_ascii_lowercase().contains("digest") {
        return e.with_kind(ErrorKind::DigestMismatch);
    }
    e
}

/// `Link: <url>; rel="next"`, resolved against the current URL.
fn next_link(h: &HeaderMap, cur: &Url) -> Option<Url> {
    for v in h.get_all(header::LINK) {
        let v = v.to_str().ok()?;
        for part in v.split(',') {
            let (target, params) = part.split_once(';')?;
            let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
            if params.split(';').any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p == "rel=\"next\"" || p == "rel=next"
            }) {
                return cur.join(target).ok();
            }
        }
    }
    None
}

async fn read_source(src: &BlobSource, at: u64, n: u64, ctx: &Ctx) -> Result<Bytes> {
    match src {
        BlobSource::Bytes(b) => Ok(b.slice(at as usize..(at + n) as usize)),
        BlobSource::File(p) => {
            let io = |e: std::io::Error| {
                ctx.err(
                    ErrorKind::Invalid,
                    format!("blob {}: reading {}: {e}", ctx.what, p.display()),
                )
            };
            let mut f = tokio::fs::File::open(p).await.map_err(io)?;
            f.seek(std::io::SeekFrom::Start(at)).await.map_err(io)?;
            let mut buf = vec![0u8; n as usize];
            f.read_exact(&mut buf).await.map_err(io)?;
            Ok(Bytes::from(buf))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header() {
        let cur = Url::parse("http://r:5000/v2/a/tags/list?n=2").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::LINK,
            HeaderValue::from_static("</v2/a/tags/list?last=b&n=2>; rel=\"next\""),
        );
        assert_eq!(
            next_link(&h, &cur).unwrap().as_str(),
            "http://r:5000/v2/a/tags/list?last=b&n=2"
        );
        assert_eq!(next_link(&HeaderMap::new(), &cur), None);
    }

    #[test]
    fn scopes() {
        assert_eq!(push_scope("a/b", None), "repository:a/b:pull,push");
        assert_eq!(
            push_scope("a/b", Some("c")),
            "repository:a/b:pull,push repository:c:pull"
        );
    }
}
