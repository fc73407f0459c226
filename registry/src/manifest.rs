//! Manifest media types, decoding (OCI and Docker schema 2, image and index/list) and platform
//! selection from an index.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

use crate::error::{ErrorKind, RegistryError, Result};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The media types [`crate::Client::resolve`] accepts, in preference order.
pub const ACCEPTED: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Whether `mt` is an index (OCI index or Docker manifest list).
pub fn is_index(mt: &str) -> bool {
    mt == OCI_INDEX || mt == DOCKER_LIST
}

/// The media type without parameters (`; charset=...`), lowercased.
pub(crate) fn bare_media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    /// An image (or artifact) manifest: config and layers.
    Image(Box<ImageManifest>),
    /// An index / manifest list: one descriptor per platform (or referrer).
    Index(Box<ImageIndex>),
}

/// Decode `bytes` as a manifest of `media_type` (one of [`ACCEPTED`]). When the document has a
/// `mediaType` field it must agree with `media_type`.
pub fn parse_manifest(media_type: &str, bytes: &[u8]) -> Result<Manifest> {
    let mt = bare_media_type(media_type);
    if !ACCEPTED.contains(&mt.as_str()) {
        return Err(RegistryError::new(
            ErrorKind::MediaType,
            "",
            None,
            format!("unsupported manifest media type {mt:?}"),
        ));
    }
    let bad = |e: String| {
        RegistryError::new(
            ErrorKind::Protocol,
            "",
            None,
            format!("invalid {mt} document: {e}"),
        )
    };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if let Some(field) = v.get("mediaType") {
        if field.as_str() != Some(mt.as_str()) {
            return Err(RegistryError::new(
                ErrorKind::MediaType,
                "",
                None,
                format!("manifest says mediaType {field} but was served as {mt:?}"),
            ));
        }
    }
    if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(bad("schemaVersion is not 2".into()));
    }
    if is_index(&mt) {
        serde_json::from_value(v)
            .map(Manifest::Index)
            .map_err(|e| bad(e.to_string()))
    } else {
        serde_json::from_value(v)
            .map(Manifest::Image)
            .map_err(|e| bad(e.to_string()))
    }
}

/// Go's names for some architectures (`uname -m` style names map to them).
fn normalize_arch(a: &str) -> &str {
    match a {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i686" | "i386" => "386",
        a => a,
    }
}

/// Pick the manifest for `os`/`arch` (Go names; `x86_64`/`aarch64` are accepted) and, when
/// given, `variant` from an index (OCI index or Docker manifest list, `media_type`). `arm64` with
/// variant `v8` also matches entries without a variant. The first match in index order wins;
/// `None` when nothing matches.
pub fn select_platform(
    media_type: &str,
    index_bytes: &[u8],
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> Result<Option<Descriptor>> {
    let Manifest::Index(index) = parse_manifest(media_type, index_bytes)? else {
        return Err(RegistryError::new(
            ErrorKind::MediaType,
            "",
            None,
            format!("{media_type:?} is not an index (need {OCI_INDEX} or {DOCKER_LIST})"),
        ));
    };
    let arch = normalize_arch(arch);
    Ok(index
        .manifests()
        .iter()
        .find(|d| {
            let Some(p) = d.platform() else { return false };
            if p.os().to_string() != os || normalize_arch(&p.architecture().to_string()) != arch {
                return false;
            }
            match (variant, p.variant().as_deref()) {
                (None, _) => true,
                (Some(want), Some(have)) => want == have,
                (Some("v8"), None) => arch == "arm64",
                (Some(_), None) => false,
            }
        })
        .cloned())
}

/// The platform to pick from an index: `os/arch[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ... (`x86_64`/`aarch64` accepted).
    pub arch: String,
    /// `v8`, `v7`, ...
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            arch: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    /// This machine's: `linux` and the architecture this binary was built for (Go's name).
    pub fn host() -> Platform {
        Platform {
            os: "linux".into(),
            arch: normalize_arch(std::env::consts::ARCH).to_string(),
            variant: None,
        }
    }

    /// Its manifest in the index `index_bytes` of `media_type` ([`select_platform`]).
    pub fn select(&self, media_type: &str, index_bytes: &[u8]) -> Result<Option<Descriptor>> {
        select_platform(
            media_type,
            index_bytes,
            &self.os,
            &self.arch,
            self.variant.as_deref(),
        )
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Platform, String> {
        let p: Vec<&str> = s.split('/').collect();
        match p[..] {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.into(),
                arch: arch.into(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: os.into(),
                arch: arch.into(),
                variant: Some(v.into()),
            }),
            _ => Err(format!("{s:?} is not os/arch[/variant]")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Hash `bytes` with the digest's algorithm and compare: `None` when they match, else the
/// actual digest.
pub(crate) fn digest_matches(digest: &str, bytes: &[u8]) -> Option<String> {
    let actual = match digest.split_once(':') {
        Some(("sha512", _)) => format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes))),
        _ => sha256_digest(bytes),
    };
    (actual != digest).then_some(actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_check() {
        let d = sha256_digest(b"abc");
        assert_eq!(digest_matches(&d, b"abc"), None);
        assert!(digest_matches(&d, b"abd").is_some());
    }

    pub(crate) const INDEX: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.oci.image.index.v1+json",
      "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 10,
         "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
         "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 11,
         "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
         "platform": {"architecture": "arm", "os": "linux", "variant": "v7"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 12,
         "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333",
         "platform": {"architecture": "arm64", "os": "linux"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 13,
         "digest": "sha256:4444444444444444444444444444444444444444444444444444444444444444"}
      ]
    }"#;

    #[test]
    fn platform_selection() {
        let pick = |os, arch, v| {
            select_platform(OCI_INDEX, INDEX.as_bytes(), os, arch, v)
                .unwrap()
                .map(|d| d.size())
        };
        assert_eq!(pick("linux", "amd64", None), Some(10));
        assert_eq!(pick("linux", "x86_64", None), Some(10));
        assert_eq!(pick("linux", "arm", Some("v7")), Some(11));
        assert_eq!(pick("linux", "arm", Some("v6")), None);
        assert_eq!(pick("linux", "aarch64", Some("v8")), Some(12));
        assert_eq!(pick("windows", "amd64", None), None);
        // A Docker list is the same document with another media type.
        let list = INDEX.replace(OCI_INDEX, DOCKER_LIST);
        assert_eq!(
            select_platform(DOCKER_LIST, list.as_bytes(), "linux", "amd64", None)
                .unwrap()
                .map(|d| d.size()),
            Some(10)
        );
        // Served type and mediaType field disagree.
        let e = select_platform(DOCKER_LIST, INDEX.as_bytes(), "linux", "amd64", None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MediaType);
    }

    #[test]
    fn manifests() {
        let m = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
          "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":2,
            "digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},
          "layers":[]}"#;
        assert!(matches!(
            parse_manifest(DOCKER_MANIFEST, m.as_bytes()).unwrap(),
            Manifest::Image(_)
        ));
        // OCI manifests may leave mediaType out.
        let oci = m.replace(
            r#""mediaType":"application/vnd.docker.distribution.manifest.v2+json","#,
            "",
        );
        assert!(matches!(
            parse_manifest(
                "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
                oci.as_bytes()
            )
            .unwrap(),
            Manifest::Image(_)
        ));
        assert_eq!(
            parse_manifest("application/json", m.as_bytes())
                .unwrap_err()
                .kind(),
            ErrorKind::MediaType
        );
        assert_eq!(
            parse_manifest(OCI_MANIFEST, b"{").unwrap_err().kind(),
            ErrorKind::Protocol
        );
        assert_eq!(
            parse_manifest(OCI_MANIFEST, br#"{"schemaVersion":1}"#)
                .unwrap_err()
                .kind(),
            ErrorKind::Protocol
        );
        assert_eq!(
            parse_manifest(OCI_INDEX, m.as_bytes()).unwrap_err().kind(),
            ErrorKind::MediaType
        );
        assert!(select_platform(DOCKER_MANIFEST, m.as_bytes(), "linux", "amd64", None).is_err());
    }
}
