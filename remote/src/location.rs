//! Where a manifest or blob lives.

use crate::registry::{RegistryLocation, MANIFEST_FILE};
use lazyblk_registry::Reference;

/// Where a manifest or blob lives: a local path, an HTTP(S) URL, or a file of an image in an
/// OCI registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local file.
    Path(std::path::PathBuf),
    /// An http:// or https:// URL.
    Url(String),
    /// A file of a lazyblk image in an OCI registry.
    Registry(RegistryLocation),
}

impl Location {
    /// Parse a command-line argument: an `http://` or `https://` URL; else a local path when
    /// it is one (it exists, or starts with `/`, `./` or `../`); else a Docker-style image
    /// reference `[host[:port]/]repo[:tag|@digest]` when it names a registry host (a first
    /// component with `.` or `:`, or `localhost`) or a tag or digest; else a local path (so a
    /// mistyped relative path is reported as a missing file, not looked up on Docker Hub).
    pub fn parse(s: &str) -> Location {
        if s.starts_with("http://") || s.starts_with("https://") {
            return Location::Url(s.to_string());
        }
        let path = std::path::Path::new(s);
        let pathlike = s.starts_with('/') || s.starts_with("./") || s.starts_with("../");
        if pathlike || path.exists() {
            return Location::Path(s.into());
        }
        let first = s.split('/').next().unwrap_or("");
        let names_host = s.contains('/') && (first.contains(['.', ':']) || first == "localhost");
        let last = s.rsplit('/').next().unwrap_or(s);
        if names_host || last.contains([':', '@']) {
            if let Ok(reference) = Reference::parse(s) {
                return Location::Registry(RegistryLocation {
                    reference,
                    name: MANIFEST_FILE.to_string(),
                });
            }
        }
        Location::Path(s.into())
    }

    /// The location of `name` next to this one (in the same directory).
    pub fn sibling(&self, name: &str) -> Location {
        match self {
            Location::Path(p) => Location::Path(
                p.parent()
                    .map(|d| d.join(name))
                    .unwrap_or_else(|| name.into()),
            ),
            Location::Url(u) => {
                let base = u.split(['?', '#']).next().unwrap_or(u);
                let dir = match base.rfind('/') {
                    Some(i) if i > base.find("://").map_or(0, |j| j + 2) => &base[..=i],
                    _ => base,
                };
                let sep = if dir.ends_with('/') { "" } else { "/" };
                Location::Url(format!("{dir}{sep}{name}"))
            }
            Location::Registry(r) => Location::Registry(RegistryLocation {
                reference: r.reference.clone(),
                name: name.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Url(u) => write!(f, "{u}"),
            Location::Registry(r) => write!(f, "{r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_locations() {
        assert_eq!(
            Location::parse("http://h:1/a/b/manifest?x=1").sibling("blob"),
            Location::Url("http://h:1/a/b/blob".into())
        );
        assert_eq!(
            Location::parse("http://h:1").sibling("blob"),
            Location::Url("http://h:1/blob".into())
        );
        assert_eq!(
            Location::parse("/x/y/manifest").sibling("blob"),
            Location::Path("/x/y/blob".into())
        );
        let Location::Registry(r) = Location::parse("127.0.0.1:5000/a/b:v1").sibling("blob") else {
            panic!("not a registry location");
        };
        assert_eq!((r.reference.repository(), r.name.as_str()), ("a/b", "blob"));
    }

    #[test]
    fn arguments_are_urls_paths_or_references() {
        let reg = |s: &str| matches!(Location::parse(s), Location::Registry(_));
        assert!(reg("localhost:5000/img:v1"));
        assert!(reg("registry.example/team/img"));
        assert!(reg("img:latest"));
        assert!(reg("127.0.0.1:5000/img@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"));
        assert!(!reg("out/manifest"), "a relative path stays a path");
        assert!(!reg("./img:v1"));
        assert!(!reg("/abs/img:v1"));
        assert!(matches!(Location::parse("https://h/m"), Location::Url(_)));
    }
}
