//! A front that gives a registry without one (distribution 2.8) the OCI 1.1 referrers API: a
//! manifest PUT with a `subject` is answered with `OCI-Subject` and remembered, and
//! `GET /v2/<repo>/referrers/<digest>` serves an index of the manifests remembered for it
//! (`artifactType` filter applied, `OCI-Filters-Applied` said). Everything else is relayed.

use super::http::{forward, HttpServer, Reply};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The referrers of each `(repository, subject digest)`, in push order.
pub type Referrers = Arc<Mutex<BTreeMap<(String, String), Vec<Value>>>>;

/// A running front.
pub struct ReferrersFront {
    /// The server.
    pub server: HttpServer,
    /// What it remembered.
    pub referrers: Referrers,
}

impl ReferrersFront {
    /// Front the registry on `registry_port`.
    pub fn start(registry_port: u16) -> ReferrersFront {
        let referrers: Referrers = Arc::default();
        let refs = referrers.clone();
        let server = HttpServer::start(move |req| {
            let path = req.path().to_string();
            let rest = path.strip_prefix("/v2/").unwrap_or("");
            if req.method == "GET" {
                if let Some((repo, digest)) = rest.rsplit_once("/referrers/") {
                    let want = req
                        .query()
                        .into_iter()
                        .find(|(k, _)| k == "artifactType")
                        .map(|(_, v)| v);
                    let list: Vec<Value> = refs
                        .lock()
                        .unwrap()
                        .get(&(repo.to_string(), digest.to_string()))
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|d| want.as_deref().is_none_or(|w| d["artifactType"] == w))
                        .collect();
                    let body = json!({
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": list,
                    });
                    let mut h = vec![("Content-Type", "application/vnd.oci.image.index.v1+json")];
                    if want.is_some() {
                        h.push(("OCI-Filters-Applied", "artifactType"));
                    }
                    return Reply::new(200, &h, serde_json::to_vec(&body).unwrap());
                }
            }
            let raw = forward(registry_port, &req);
            if req.method == "PUT"
                && rest.contains("/manifests/")
                && raw.starts_with(b"HTTP/1.1 201")
            {
                let repo = rest.rsplit_once("/manifests/").unwrap().0.to_string();
                let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
                if let Some(subject) = v.pointer("/subject/digest").and_then(Value::as_str) {
                    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&req.body)));
                    let mut d = json!({
                        "mediaType": v["mediaType"],
                        "digest": digest,
                        "size": req.body.len(),
                        "artifactType": v.get("artifactType").unwrap_or(&v["config"]["mediaType"]),
                    });
                    if let Some(a) = v.get("annotations") {
                        d["annotations"] = a.clone();
                    }
                    let mut m = refs.lock().unwrap();
                    let list = m.entry((repo, subject.to_string())).or_default();
                    list.retain(|e| e["digest"] != d["digest"]);
                    list.push(d);
                    // Add the header the spec asks for.
                    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                    let mut out = raw[..split].to_vec();
                    out.extend_from_slice(format!("\r\nOCI-Subject: {subject}").as_bytes());
                    out.extend_from_slice(&raw[split..]);
                    return Reply::Raw(out);
                }
            }
            Reply::Raw(raw)
        });
        ReferrersFront { server, referrers }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }
}
