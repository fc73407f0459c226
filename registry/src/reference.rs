//! Docker-style image references: `[host[:port]/]repo[:tag][@sha256:hex]`.

use std::fmt;
use std::str::FromStr;

use crate::error::{RegistryError, Result};

/// The registry name Docker uses when a reference has no host.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Longest repository name the distribution spec allows.
const NAME_MAX: usize = 255;

/// A parsed, normalized image reference. Without a host it is Docker Hub's (`docker.io`, with
/// `library/` before a one-component repository); without a tag or digest the tag is `latest`.
/// `Display` prints the normalized form, which parses back to the same value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parse a reference.
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |why: &str| RegistryError::invalid(format!("invalid reference {s:?}: {why}"));
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                validate_digest(d)
                    .map_err(|_| bad("bad digest (want sha256:<64 hex> or sha512:<128 hex>)"))?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name_tag.rfind('/');
        let (name, tag) = match name_tag.rfind(':') {
            Some(c) if last_slash.is_none_or(|sl| c > sl) => {
                (&name_tag[..c], Some(&name_tag[c + 1..]))
            }
            _ => (name_tag, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(bad("bad tag (want [A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"));
            }
        }
        let (registry, repo) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                if !valid_host(first) {
                    return Err(bad("bad registry host"));
                }
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        validate_repository(&repository).map_err(|_| {
            bad("bad repository (lowercase components [a-z0-9]+ joined by '.', '_', '__' or dashes, separated by '/')")
        })?;
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry name as written (`docker.io` for Docker Hub), with its port if any.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host (and port) to talk to: `registry-1.docker.io` for Docker Hub.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path, e.g. `library/debian`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The pinned digest, if any.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What to ask `/v2/<repo>/manifests/` for: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository, pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: &str) -> Result<Reference> {
        validate_digest(digest)?;
        Ok(Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        })
    }

    /// The same repository pinned to `digest`, without a tag (`host/repo@sha256:...`).
    pub fn pinned(&self, digest: &str) -> Result<Reference> {
        validate_digest(digest)?;
        Ok(Reference {
            tag: None,
            digest: Some(digest.to_string()),
            ..self.clone()
        })
    }

    /// The same repository with `tag` and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference> {
        if !valid_tag(tag) {
            return Err(RegistryError::invalid(format!("invalid tag {tag:?}")));
        }
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// `tag "v1"` or `digest sha256:...`, for error messages.
    pub(crate) fn what(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("digest {d}"),
            (None, Some(t)) => format!("tag {t:?}"),
            (None, None) => "tag \"latest\"".into(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Reference> {
        Reference::parse(s)
    }
}

/// Check a digest: `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`.
pub fn validate_digest(d: &str) -> Result<()> {
    let ok = match d.split_once(':') {
        Some(("sha256", h)) => h.len() == 64 && is_lower_hex(h),
        Some(("sha512", h)) => h.len() == 128 && is_lower_hex(h),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(RegistryError::invalid(format!(
            "invalid digest {:?}",
            crate::error::one_line(d)
        )))
    }
}

fn is_lower_hex(h: &str) -> bool {
    h.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Check a repository name against the distribution spec grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
pub fn validate_repository(repo: &str) -> Result<()> {
    if !repo.is_empty() && repo.len() <= NAME_MAX && repo.split('/').all(valid_component) {
        Ok(())
    } else {
        Err(RegistryError::invalid(format!(
            "invalid repository name {:?}",
            crate::error::one_line(repo)
        )))
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+", followed by an alphanumeric.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// `host[:port]`: dot-separated labels (`[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?`) or a bracketed
/// IPv6 address, then an optional numeric port.
pub(crate) fn valid_host(h: &str) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(p) => ("x", Some(p)),
                None => return false,
            },
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u32>().map_or(true, |n| n > 65535)
        {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("debian");
        assert_eq!(
            (r.registry(), r.api_host(), r.repository(), r.tag()),
            (
                "docker.io",
                DOCKER_HUB_API,
                "library/debian",
                Some("latest")
            )
        );
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");
        let r = p("foo/bar:v1");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("docker.io", "foo/bar", Some("v1"))
        );
        assert_eq!(p("index.docker.io/debian").repository(), "library/debian");
        assert_eq!(
            p("docker.io/debian:12").to_string(),
            "docker.io/library/debian:12"
        );
    }

    #[test]
    fn hosts() {
        let r = p("127.0.0.1:5000/foo/bar:v1");
        assert_eq!(
            (r.registry(), r.api_host(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "127.0.0.1:5000", "foo/bar", Some("v1"))
        );
        assert_eq!(p("localhost/x").registry(), "localhost");
        assert_eq!(p("localhost:5000/x").registry(), "localhost:5000");
        assert_eq!(p("ghcr.io/a/b").registry(), "ghcr.io");
        assert_eq!(p("[::1]:5000/a").registry(), "[::1]:5000");
        assert_eq!(p("[::1]/a").registry(), "[::1]");
        // A first component without '.' or ':' is part of the repository.
        assert_eq!(p("myhost/a").registry(), "docker.io");
        assert_eq!(p("myhost/a").repository(), "myhost/a");
    }

    #[test]
    fn digests() {
        let r = p(&format!("127.0.0.1:5000/foo@{D}"));
        assert_eq!((r.tag(), r.digest(), r.manifest_ref()), (None, Some(D), D));
        let r = p(&format!("foo:v2@{D}"));
        assert_eq!(
            (r.tag(), r.digest(), r.manifest_ref()),
            (Some("v2"), Some(D), D)
        );
        assert_eq!(r.to_string(), format!("docker.io/library/foo:v2@{D}"));
        assert_eq!(r.what(), format!("digest {D}"));
        assert_eq!(p("a/b:c").what(), "tag \"c\"");
    }

    #[test]
    fn rejects() {
        for s in [
            "",
            "Foo",
            "foo/Bar",
            "foo//bar",
            "foo/",
            "/foo",
            "foo:",
            "foo:-x",
            "foo:a/b",
            "foo@sha256:abc",
            "foo@md5:0123",
            "a..b",
            "a.-b",
            "-a",
            "a-",
            "a___b",
            "host:99999/a",
            "host:/a",
            "[::1/a",
            "[zz]/a",
            "a@",
            "a b",
            "a:b c",
            "ex-.com/a",
        ] {
            assert!(Reference::parse(s).is_err(), "{s:?} should be rejected");
        }
        let long = "a".repeat(256);
        assert!(Reference::parse(&format!("ex.com/{long}")).is_err());
        assert!(Reference::parse(&format!("a:{}", "t".repeat(129))).is_err());
        assert!(Reference::parse(&format!("a:{}", "t".repeat(128))).is_ok());
        // Separators the grammar allows.
        for s in ["a.b", "a_b", "a__b", "a-b", "a---b", "a/b.c/d-e__f"] {
            assert!(Reference::parse(s).is_ok(), "{s:?}");
        }
        let e = Reference::parse("foo/Bar").unwrap_err().to_string();
        assert!(e.contains("foo/Bar") && !e.contains('\n'), "{e}");
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,2}"
    }

    proptest! {
        #[test]
        fn display_round_trips(
            host in prop::option::of(prop_oneof![
                "[a-z0-9]{1,6}\\.[a-z]{2,4}",
                "[a-z]{1,6}(\\.[a-z]{1,4})?:[1-9][0-9]{0,3}",
                Just("localhost".to_string()),
                Just("[::1]:5000".to_string()),
            ]),
            comps in prop::collection::vec(component(), 1..4),
            tag in prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
            digest in prop::option::of("[0-9a-f]{64}"),
        ) {
            // Without a host, a first component with a '.' would be read as one.
            prop_assume!(host.is_some() || !comps[0].contains('.'));
            let mut s = String::new();
            if let Some(h) = &host { s.push_str(h); s.push('/'); }
            s.push_str(&comps.join("/"));
            if let Some(t) = &tag { s.push(':'); s.push_str(t); }
            if let Some(d) = &digest { s.push_str("@sha256:"); s.push_str(d); }
            let r = Reference::parse(&s).unwrap();
            prop_assert_eq!(Reference::parse(&r.to_string()).unwrap(), r.clone());
            if host.is_some() { prop_assert_eq!(r.repository(), comps.join("/")); }
            prop_assert_eq!(r.tag().map(str::to_string), tag.clone().or(if digest.is_none() { Some("latest".into()) } else { None }));
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            if let Ok(r) = Reference::parse(&s) {
                prop_assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
            }
        }
    }
}
