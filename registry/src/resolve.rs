//! Resolving a reference to a verified manifest (media type, size limit, digests).

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::Method;
use tracing::debug;

use crate::auth::pull_scope;
use crate::client::Client;
use crate::endpoints::{join, Endpoint};
use crate::error::{ErrorKind, Result};
use crate::manifest::{bare_media_type, digest_matches, ACCEPTED};
use crate::reference::{validate_digest, Reference};
use crate::transport::{read_limited, status_error, Ctx};

/// A resolved manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Its digest (`sha256:<hex>`): the pinned one, or the hash of `bytes`.
    pub digest: String,
    /// Its media type (one of [`crate::manifest::ACCEPTED`]).
    pub media_type: String,
    /// The manifest bytes, exactly as served and verified.
    pub bytes: Bytes,
}

impl Client {
    /// Fetch the manifest `r` names (by digest when pinned, else by tag) and verify it: media
    /// type one of [`ACCEPTED`], at most `manifest_limit` bytes, SHA-256 equal to the pinned
    /// digest and to `Docker-Content-Digest` when sent. Mirrors with `resolve` (tags) or `pull`
    /// (digests) are tried first.
    pub async fn resolve(&self, r: &Reference) -> Result<Resolved> {
        let by_tag = r.digest().is_none();
        let eps = self.ordered(r, if by_tag { |c| c.resolve } else { |c| c.pull })?;
        self.first_ok(eps, r, |ep| async move { self.resolve_at(&ep, r).await })
            .await
    }

    async fn resolve_at(&self, ep: &Endpoint, r: &Reference) -> Result<Resolved> {
        let ctx = Ctx::new(ep, r.repository(), "manifest", r.what());
        let url = join(
            ep,
            &format!("{}/manifests/{}", r.repository(), r.manifest_ref()),
            &ctx,
        )?;
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_str(&ACCEPTED.join(", ")).expect("static header"),
        );
        let resp = self
            .send_following(
                ep,
                &pull_scope(r.repository()),
                &ctx,
                Method::GET,
                url,
                h,
                None,
            )
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(resp, &ctx).await);
        }
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(bare_media_type)
            .unwrap_or_default();
        if !ACCEPTED.contains(&ct.as_str()) {
            return Err(ctx.err(
                ErrorKind::MediaType,
                format!("manifest {}: unsupported media type {ct:?} (want an OCI or Docker schema-2 manifest or index)", r.what()),
            ));
        }
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| validate_digest(d).is_ok())
            .map(str::to_string);
        let bytes = read_limited(resp, self.inner.opts.manifest_limit, &ctx).await?;
        // The document's own mediaType, when present, must agree with the served type.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            if let Some(f) = v.get("mediaType").and_then(|m| m.as_str()) {
                if f != ct {
                    return Err(ctx.err(
                        ErrorKind::MediaType,
                        format!(
                            "manifest {}: served as {ct:?} but its mediaType is {f:?}",
                            r.what()
                        ),
                    ));
                }
            }
        } else {
            return Err(ctx.err(
                ErrorKind::Protocol,
                format!("manifest {}: not JSON", r.what()),
            ));
        }
        let expect = r.digest().map(str::to_string).or(header_digest.clone());
        let digest = match &expect {
            Some(d) => {
                if let Some(actual) = digest_matches(d, &bytes) {
                    let which = if r.digest().is_some() {
                        "pinned digest"
                    } else {
                        "Docker-Content-Digest"
                    };
                    return Err(ctx.err(
                        ErrorKind::DigestMismatch,
                        format!(
                            "manifest {}: content hashes to {actual}, not the {which} {d}",
                            r.what()
                        ),
                    ));
                }
                if let (Some(pinned), Some(hd)) = (r.digest(), &header_digest) {
                    if pinned.split(':').next() == hd.split(':').next() && pinned != hd {
                        return Err(ctx.err(
                            ErrorKind::DigestMismatch,
                            format!("manifest {}: Docker-Content-Digest is {hd}", r.what()),
                        ));
                    }
                }
                if d.starts_with("sha256:") {
                    d.clone()
                } else {
                    crate::manifest::sha256_digest(&bytes)
                }
            }
            None => crate::manifest::sha256_digest(&bytes),
        };
        debug!(reference = %r, digest, media_type = ct, bytes = bytes.len(), endpoint = %ep.label, "resolved");
        Ok(Resolved {
            digest,
            media_type: ct,
            bytes,
        })
    }
}
