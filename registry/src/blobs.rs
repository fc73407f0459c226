//! Blob reads: size (HEAD), streamed ranged reads that resume and fall back from mirror to
//! origin, and small whole blobs verified against their digest.

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tracing::debug;

use crate::auth::pull_scope;
use crate::client::{lock, Client};
use crate::endpoints::{join, Endpoint};
use crate::error::{ErrorKind, RegistryError, Result};
use crate::manifest::digest_matches;
use crate::reference::{validate_digest, Reference};
use crate::transport::{net_error, read_limited, status_error, Ctx};

impl Client {
    /// The size of blob `digest` in `r`'s repository (HEAD).
    pub async fn blob_size(&self, r: &Reference, digest: &str) -> Result<u64> {
        validate_digest(digest)?;
        self.first_ok(self.ordered(r, |c| c.pull)?, r, |ep| async move {
            let ctx = Ctx::new(&ep, r.repository(), "blob", digest);
            let url = join(&ep, &format!("{}/blobs/{digest}", r.repository()), &ctx)?;
            let resp = self
                .send_following(
                    &ep,
                    &pull_scope(r.repository()),
                    &ctx,
                    Method::HEAD,
                    url,
                    HeaderMap::new(),
                    None,
                )
                .await?;
            if !resp.status().is_success() {
                return Err(status_error(resp, &ctx).await);
            }
            resp.headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    ctx.err(
                        ErrorKind::Protocol,
                        format!("blob {digest}: HEAD without Content-Length"),
                    )
                })
        })
        .await
    }

    /// Stream bytes `offset .. offset + len` of blob `digest` into `sink` as they arrive. A
    /// server that ignores `Range` (200 with the whole blob) is handled by skipping to `offset`.
    /// Mirrors are tried first; a mirror that fails is marked down and the read goes on at the
    /// next one (from where it stopped), then at the origin. The content is not verified: the
    /// caller does that, and calls [`Client::report_bad_blob`] when it does not verify. On error
    /// the sink has received a prefix of the range.
    pub async fn read_blob_range(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        self.read_blob_range_served(r, digest, offset, len, sink, &mut |_, _, _| {})
            .await
    }

    /// [`Client::read_blob_range`], also telling `served(origin, mirror, bytes)` how many bytes
    /// of the range each endpoint handed to `sink` (once per endpoint tried, after its try):
    /// `origin` is the endpoint's `scheme://host[:port]` (no path, no credentials).
    pub async fn read_blob_range_served(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
        served: &mut (dyn FnMut(&str, bool, u64) + Send),
    ) -> Result<()> {
        validate_digest(digest)?;
        if len == 0 {
            return Ok(());
        }
        if offset.checked_add(len).is_none() {
            return Err(RegistryError::invalid(format!(
                "blob {digest}: range {offset}+{len} overflows"
            )));
        }
        let mut done = 0u64;
        let mut last = None;
        for ep in self.ordered(r, |c| c.pull)? {
            let mut tries = 0;
            loop {
                let before = done;
                let got = self
                    .range_at(&ep, r, digest, offset, len, &mut done, sink)
                    .await;
                if done > before {
                    served(&ep.origin_key, !ep.origin, done - before);
                }
                match got {
                    Ok(()) => {
                        self.mark_up(&ep);
                        lock(&self.inner.served_by).insert(
                            (
                                r.registry().to_string(),
                                r.repository().to_string(),
                                digest.to_string(),
                            ),
                            ep.label.clone(),
                        );
                        return Ok(());
                    }
                    Err(e) => {
                        lock(&self.inner.redirects).remove(&(
                            ep.label.clone(),
                            r.repository().to_string(),
                            digest.to_string(),
                        ));
                        tries += 1;
                        // Progress then a transient failure: go on from where it stopped.
                        if e.is_transient() && done > before && tries < 4 {
                            debug!(endpoint = %ep.label, error = %e, done, "resuming range read");
                            continue;
                        }
                        if ep.origin {
                            return Err(e);
                        }
                        self.mark_down(&ep, &e);
                        last = Some(e);
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::invalid("no endpoint")))
    }

    #[allow(clippy::too_many_arguments)]
    async fn range_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
        done: &mut u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let start = offset + *done;
        let end = offset + len - 1;
        let ctx = Ctx::new(ep, r.repository(), "blob", digest);
        let url = join(ep, &format!("{}/blobs/{digest}", r.repository()), &ctx)?;
        let mut h = HeaderMap::new();
        h.insert(
            header::RANGE,
            HeaderValue::from_str(&format!("bytes={start}-{end}")).expect("ascii"),
        );
        let remember = Some((r.repository().to_string(), digest.to_string()));
        let mut resp = self
            .send_following(
                ep,
                &pull_scope(r.repository()),
                &ctx,
                Method::GET,
                url,
                h,
                remember,
            )
            .await?;
        let mut skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let got = cr
                    .strip_prefix("bytes ")
                    .and_then(|s| s.split(['-', '/']).next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if got != Some(start) {
                    return Err(ctx.err(
                        ErrorKind::Protocol,
                        format!("blob {digest}: asked for bytes {start}-{end}, got Content-Range {cr:?}"),
                    ));
                }
                0
            }
            StatusCode::OK => {
                debug!(endpoint = %ep.label, digest, "server ignored Range; skipping to the offset");
                start
            }
            _ => return Err(status_error(resp, &ctx).await),
        };
        let mut want = end + 1 - start;
        while want > 0 {
            match resp.chunk().await {
                Ok(Some(mut c)) => {
                    if skip > 0 {
                        let n = skip.min(c.len() as u64) as usize;
                        c = c.slice(n..);
                        skip -= n as u64;
                    }
                    if c.is_empty() {
                        continue;
                    }
                    let n = want.min(c.len() as u64) as usize;
                    sink(c.slice(..n));
                    *done += n as u64;
                    want -= n as u64;
                }
                Ok(None) => {
                    return Err(ctx.err(
                        ErrorKind::Truncated,
                        format!(
                            "blob {digest}: body ended {want} bytes short of bytes {start}-{end}"
                        ),
                    ))
                }
                Err(e) => return Err(net_error(e, &ctx)),
            }
        }
        Ok(())
    }

    /// A whole blob of at most `max` bytes, verified against its digest (a mirror serving wrong
    /// content is marked down and the next host tried).
    pub async fn get_blob(&self, r: &Reference, digest: &str, max: u64) -> Result<Bytes> {
        validate_digest(digest)?;
        self.first_ok(self.ordered(r, |c| c.pull)?, r, |ep| async move {
            let ctx = Ctx::new(&ep, r.repository(), "blob", digest);
            let url = join(&ep, &format!("{}/blobs/{digest}", r.repository()), &ctx)?;
            let remember = Some((r.repository().to_string(), digest.to_string()));
            let resp = self
                .send_following(
                    &ep,
                    &pull_scope(r.repository()),
                    &ctx,
                    Method::GET,
                    url,
                    HeaderMap::new(),
                    remember,
                )
                .await?;
            if !resp.status().is_success() {
                return Err(status_error(resp, &ctx).await);
            }
            let b = read_limited(resp, max, &ctx).await?;
            if let Some(actual) = digest_matches(digest, &b) {
                return Err(ctx.err(
                    ErrorKind::DigestMismatch,
                    format!("blob {digest}: content hashes to {actual}"),
                ));
            }
            Ok(b)
        })
        .await
    }
}
