//! An OCI distribution registry client for lazyblk.
//!
//! **What it owns**: talking to registries that speak the [OCI distribution spec] (and Docker's
//! registry API v2): parsing image references; credentials (Docker's `config.json` with `auths`,
//! `credHelpers`, `credsStore`; a `--creds-file`); authentication (anonymous, Basic, Bearer
//! tokens from `WWW-Authenticate` challenges, cached per host and scope, refreshed before they
//! expire and again on a 401 in the middle of a read, one fetch shared by concurrent requests);
//! resolving manifests (media type, size limit and digest checked); ranged, streamed blob reads
//! that follow redirects to object storage itself (no `Authorization` to another origin, the
//! final URL remembered per blob and dropped when it fails); mirrors (`--mirror` and containerd's
//! `hosts.toml`) with per-mirror health and backoff; push (existence check, cross-repository
//! mount, monolithic and chunked upload, manifests); tag lists and referrers; links between images
//! ([`link`]: a manifest pushed as a referrer of its `subject`, found again from the subject).
//!
//! **What it must not touch**: it knows nothing of lazyblk's cache, chunk store or manifest
//! format. It moves bytes and descriptors; the caller verifies blob content (BLAKE3 per chunk)
//! and tells the client when a blob did not verify ([`Client::report_bad_blob`]) so the mirror
//! that served it is skipped. It prints nothing (logs go to `tracing`) and never puts a secret
//! in a log, an error or a `Debug` output: secrets live in [`Secret`], and errors name only
//! *where* credentials come from ([`CredentialSource::describe`]).
//!
//! **Errors**: one type, [`RegistryError`], whose [`ErrorClass`] says whether a retry may help
//! and whose `Display` is one line naming the registry, the repository and the tag or digest.
//!
//! **Crates**: `reqwest` (rustls, system roots plus `ca_file`) with its redirect policy off;
//! `oci-spec` for the manifest/index/descriptor types; `docker_credential` for Docker's config and
//! credential helpers (it supports `auths`, `credHelpers` and `credsStore` and reads from a
//! caller-given reader, so the path is ours; its errors are re-worded here because a helper's
//! output may hold secrets); `toml` for `hosts.toml`. `oci-client` is deliberately not used: its
//! blob API cannot remember a per-blob redirect, skip a failed mirror, or refresh a token in the
//! middle of a ranged read, which is the whole point of the range path here.
//!
//! **Credentials file** (`--creds-file`, [`CredentialSource::CredsFile`]): either JSON in
//! Docker's `config.json` format (`{"auths": {"host:port": {"auth": "<base64 user:pass>"}}}`, or
//! `username`/`password`, `identitytoken`; `credHelpers`, `credsStore`), or a single line
//! `user:password` used for every registry.
//!
//! **Plain HTTP**: `localhost`, `127.0.0.0/8` and `::1` default to plain HTTP (containerd's
//! rule), everything else to HTTPS unless [`ClientOptions::plain_http`] says otherwise.
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` are honoured; loopback never goes through a proxy.
//!
//! [OCI distribution spec]: https://github.com/opencontainers/distribution-spec

mod auth;
mod blobs;
pub mod challenge;
mod client;
pub mod creds;
mod endpoints;
pub mod error;
pub mod hosts;
pub mod link;
pub mod manifest;
mod proxy;
mod push;
pub mod reference;
mod resolve;
mod transport;

pub use challenge::{parse_challenges, Challenge};
pub use client::{Client, ClientOptions};
pub use creds::{CredentialSource, Secret};
pub use endpoints::EndpointStatus;
pub use error::{ErrorClass, ErrorKind, RegistryError, Result};
pub use link::{Link, ReferrerPush};
pub use manifest::{parse_manifest, select_platform, Manifest, Platform};
pub use oci_spec::image::Descriptor;
pub use push::{BlobSource, PushOutcome};
pub use reference::Reference;
pub use resolve::Resolved;
pub use transport::MAX_REDIRECTS;
