//! containerd's registry host configuration (`<hosts_dir>/<host>/hosts.toml`) and the ordered
//! list of endpoints (mirrors, then the origin) a reference is fetched from.

use std::path::{Path, PathBuf};

use url::Url;

use crate::error::{RegistryError, Result};

/// containerd's default `hosts_dir`.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// What an endpoint may be used for (containerd's `capabilities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve tags to digests.
    pub resolve: bool,
    /// Push.
    pub push: bool,
}

impl Capabilities {
    /// pull, resolve and push.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
    /// pull and resolve (a mirror).
    pub const MIRROR: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: false,
    };
}

/// One host from a `hosts.toml` (or a `--mirror`), before clients are built for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// The API root: `scheme://host[:port]/<prefix>/v2/` (or the given path with `override_path`),
    /// always ending in `/`.
    pub api_base: Url,
    /// What it may be used for.
    pub capabilities: Capabilities,
    /// Skip TLS verification for this host.
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files) for this host.
    pub ca: Vec<PathBuf>,
}

/// A parsed `hosts.toml`: the `[host."..."]` entries in file order, then the `server` (origin)
/// if one is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostsFile {
    /// Mirrors, in the order they are tried.
    pub hosts: Vec<HostConfig>,
    /// The `server` entry: replaces the default origin URL.
    pub server: Option<HostConfig>,
}

/// The API root for a base URL like `http://mirror:5000` or `https://m/prefix`: `/v2/` is added
/// after the path unless `override_path`.
pub fn api_base(base: &str, override_path: bool) -> Result<Url> {
    let mut u = Url::parse(base)
        .map_err(|e| RegistryError::invalid(format!("invalid registry URL {base:?}: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(RegistryError::invalid(format!(
            "invalid registry URL {base:?}: want http(s)://host[:port][/path]"
        )));
    }
    u.set_query(None);
    u.set_fragment(None);
    let mut path = u.path().trim_end_matches('/').to_string();
    if !override_path {
        path.push_str("/v2");
    }
    path.push('/');
    u.set_path(&path);
    Ok(u)
}

/// Parse a `hosts.toml`. `dir` is the directory holding it (relative `ca` paths are relative to
/// it).
pub fn parse_hosts_toml(text: &str, dir: &Path, what: &str) -> Result<HostsFile> {
    let bad = |why: String| RegistryError::invalid(format!("{what}: {why}"));
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
    let entry = |url: &str, t: &toml::Table, default_caps: Capabilities| -> Result<HostConfig> {
        let override_path = match t.get("override_path") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(format!("{url}: override_path must be a boolean")))?,
        };
        let capabilities = match t.get("capabilities") {
            None => default_caps,
            Some(v) => {
                let list = v
                    .as_array()
                    .ok_or_else(|| bad(format!("{url}: capabilities must be a list")))?;
                let mut c = Capabilities {
                    pull: false,
                    resolve: false,
                    push: false,
                };
                for x in list {
                    match x.as_str() {
                        Some("pull") => c.pull = true,
                        Some("resolve") => c.resolve = true,
                        Some("push") => c.push = true,
                        _ => return Err(bad(format!("{url}: unknown capability {x:?}"))),
                    }
                }
                c
            }
        };
        let skip_verify = match t.get("skip_verify") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(format!("{url}: skip_verify must be a boolean")))?,
        };
        let ca = match t.get("ca") {
            None => Vec::new(),
            Some(toml::Value::String(s)) => vec![dir.join(s)],
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(|s| dir.join(s))
                        .ok_or_else(|| bad(format!("{url}: ca must be strings")))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad(format!("{url}: ca must be a string or a list"))),
        };
        Ok(HostConfig {
            api_base: api_base(url, override_path).map_err(|e| bad(e.to_string()))?,
            capabilities,
            skip_verify,
            ca,
        })
    };
    let mut out = HostsFile::default();
    if let Some(s) = table.get("server") {
        let s = s
            .as_str()
            .ok_or_else(|| bad("server must be a string".into()))?;
        out.server = Some(entry(s, &table, Capabilities::ALL)?);
    }
    if let Some(h) = table.get("host") {
        let h = h
            .as_table()
            .ok_or_else(|| bad("host must be a table of [host.\"URL\"] entries".into()))?;
        for (url, t) in h {
            let t = t
                .as_table()
                .ok_or_else(|| bad(format!("host {url:?} must be a table")))?;
            out.hosts.push(entry(url, t, Capabilities::ALL)?);
        }
    }
    Ok(out)
}

/// The `hosts.toml` for registry `host` in `dir` (`<dir>/<host>/hosts.toml`, else
/// `<dir>/_default/hosts.toml`), if there is one.
pub fn load_hosts(dir: &Path, host: &str) -> Result<Option<HostsFile>> {
    for name in [host, "_default"] {
        let d = dir.join(name);
        let p = d.join("hosts.toml");
        match std::fs::read_to_string(&p) {
            Ok(t) => return parse_hosts_toml(&t, &d, &p.display().to_string()).map(Some),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.kind() == std::io::ErrorKind::NotADirectory => {}
            Err(e) => return Err(RegistryError::invalid(format!("{}: {e}", p.display()))),
        }
    }
    Ok(None)
}

/// Whether `host` (as in a reference, maybe with a port) is loopback: containerd's rule for
/// plain HTTP by default.
pub fn is_loopback_host(host: &str) -> bool {
    if let Ok(a) = host.parse::<std::net::Ipv6Addr>() {
        return a.is_loopback();
    }
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    h == "localhost"
        || h == "::1"
        || h.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml() {
        let f = parse_hosts_toml(
            r#"
server = "https://registry-1.docker.io"

[host."http://mirror-b:5000"]
  capabilities = ["pull", "resolve"]
  skip_verify = true

[host."https://mirror-a/prefix"]
  capabilities = ["pull"]
  ca = ["ca.pem", "/abs/other.pem"]
  override_path = true

[host."https://all"]
"#,
            Path::new("/etc/containerd/certs.d/docker.io"),
            "test",
        )
        .unwrap();
        let s = f.server.unwrap();
        assert_eq!(s.api_base.as_str(), "https://registry-1.docker.io/v2/");
        assert_eq!(s.capabilities, Capabilities::ALL);
        // File order, not alphabetical.
        let urls: Vec<_> = f.hosts.iter().map(|h| h.api_base.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://mirror-b:5000/v2/",
                "https://mirror-a/prefix/",
                "https://all/v2/"
            ]
        );
        assert_eq!(f.hosts[0].capabilities, Capabilities::MIRROR);
        assert!(f.hosts[0].skip_verify);
        assert_eq!(
            f.hosts[1].capabilities,
            Capabilities {
                pull: true,
                resolve: false,
                push: false
            }
        );
        assert_eq!(
            f.hosts[1].ca,
            [
                PathBuf::from("/etc/containerd/certs.d/docker.io/ca.pem"),
                PathBuf::from("/abs/other.pem")
            ]
        );
        assert_eq!(f.hosts[2].capabilities, Capabilities::ALL);
    }

    #[test]
    fn hosts_toml_errors() {
        for bad in [
            "server = 1",
            "[host.\"ftp://x\"]",
            "[host.\"http://x\"]\ncapabilities = [\"fly\"]",
            "[host.\"http://x\"]\nskip_verify = \"yes\"",
            "not toml ===",
        ] {
            let e = parse_hosts_toml(bad, Path::new("/d"), "/d/hosts.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("/d/hosts.toml: ") && !e.contains('\n'),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn load_from_dir() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load_hosts(d.path(), "h:1").unwrap(), None);
        std::fs::create_dir_all(d.path().join("_default")).unwrap();
        std::fs::write(
            d.path().join("_default/hosts.toml"),
            "[host.\"http://dflt\"]\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("h:1")).unwrap();
        std::fs::write(d.path().join("h:1/hosts.toml"), "server = \"http://h:1\"\n").unwrap();
        assert_eq!(
            load_hosts(d.path(), "h:1")
                .unwrap()
                .unwrap()
                .server
                .unwrap()
                .api_base
                .as_str(),
            "http://h:1/v2/"
        );
        assert_eq!(
            load_hosts(d.path(), "other").unwrap().unwrap().hosts[0]
                .api_base
                .as_str(),
            "http://dflt/v2/"
        );
    }

    #[test]
    fn api_bases_and_loopback() {
        assert_eq!(
            api_base("http://127.0.0.1:8080", false).unwrap().as_str(),
            "http://127.0.0.1:8080/v2/"
        );
        assert_eq!(
            api_base("http://m/pre/", false).unwrap().as_str(),
            "http://m/pre/v2/"
        );
        assert!(api_base("127.0.0.1:8080", false).is_err());
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:99",
            "[::1]:5000",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1:5000", "localhost.example", "[::2]"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
