//! Where credentials come from, and the secret wrapper that keeps them out of every log, error and
//! `Debug` output.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::error::{RegistryError, Result};

/// A secret string (password, identity token, bearer token). `Debug` and `Display` print
/// `<redacted>`; it is not `Serialize`. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for building a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// Where the client gets registry credentials.
#[derive(Clone, Debug, Default)]
pub enum CredentialSource {
    /// No credentials at all.
    Anonymous,
    /// Docker's config: the given `config.json`, or (`None`) `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`. `auths` (`auth` base64 `user:password`, or `username`/`password`,
    /// or `identitytoken`), `credHelpers` and `credsStore` (run `docker-credential-<name> get`).
    /// A missing file means anonymous.
    #[default]
    DockerConfig,
    /// A Docker config file at this path (same rules as [`CredentialSource::DockerConfig`]).
    DockerConfigFile(PathBuf),
    /// A credentials file (`--creds-file`): either JSON in Docker's `config.json` format (its
    /// `auths`, `credHelpers`, `credsStore`), or one line `user:password` used for every
    /// registry. A missing file is an error.
    CredsFile(PathBuf),
    /// One username and password for every registry.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
}

/// A credential for one registry host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    /// User name and password (Basic to the registry or to the token service).
    UserPass {
        /// User name (not treated as secret).
        username: String,
        /// Password.
        password: Secret,
    },
    /// An OAuth2 refresh token (Docker's `identitytoken`), exchanged at the token service.
    IdentityToken(Secret),
}

impl Credential {
    /// `Basic <base64(user:password)>`.
    pub(crate) fn basic_header(&self) -> Option<Secret> {
        match self {
            Credential::UserPass { username, password } => Some(Secret(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", password.expose()))
            ))),
            Credential::IdentityToken(_) => None,
        }
    }
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

impl CredentialSource {
    /// Where credentials come from, for logs and errors (`anonymous`,
    /// `docker-config:/root/.docker/config.json`, `creds-file:/etc/x`, `static`); never a secret.
    pub fn describe(&self) -> String {
        match self {
            CredentialSource::Anonymous => "anonymous".into(),
            CredentialSource::DockerConfig => match default_docker_config() {
                Some(p) => format!("docker-config:{}", p.display()),
                None => "docker-config:(no HOME)".into(),
            },
            CredentialSource::DockerConfigFile(p) => format!("docker-config:{}", p.display()),
            CredentialSource::CredsFile(p) => format!("creds-file:{}", p.display()),
            CredentialSource::Basic { .. } => "static".into(),
        }
    }

    /// The credential for registry `host` (as in the reference: `docker.io`, `host:port`), or
    /// `None` for anonymous. Blocking: reads files and may run a credential helper.
    pub(crate) fn lookup(&self, host: &str) -> Result<Option<Credential>> {
        match self {
            CredentialSource::Anonymous => Ok(None),
            CredentialSource::Basic { username, password } => Ok(Some(Credential::UserPass {
                username: username.clone(),
                password: password.clone(),
            })),
            CredentialSource::DockerConfig => match default_docker_config() {
                Some(p) => docker_config(&p, host, false, &self.describe()),
                None => Ok(None),
            },
            CredentialSource::DockerConfigFile(p) => {
                docker_config(p, host, false, &self.describe())
            }
            CredentialSource::CredsFile(p) => docker_config(p, host, true, &self.describe()),
        }
    }
}

/// The key Docker uses for a registry in `auths` and for credential helpers.
fn docker_key(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        h => h,
    }
}

fn docker_config(
    path: &Path,
    host: &str,
    creds_file: bool,
    what: &str,
) -> Result<Option<Credential>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !creds_file => return Ok(None),
        Err(e) => {
            return Err(RegistryError::invalid(format!(
                "cannot read credentials {what}: {e}"
            )))
        }
    };
    if creds_file && !text.trim_start().starts_with('{') {
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        return match line.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Some(Credential::UserPass {
                username: u.to_string(),
                password: Secret::new(p),
            })),
            _ => Err(RegistryError::invalid(format!(
                "credentials {what}: expected one line \"user:password\" or Docker config JSON"
            ))),
        };
    }
    use docker_credential::{CredentialRetrievalError as E, DockerCredential as D};
    match docker_credential::get_credential_from_reader(text.as_bytes(), docker_key(host)) {
        Ok(D::UsernamePassword(username, password)) => {
            Ok(Some(Credential::UserPass { username, password: Secret(password) }))
        }
        Ok(D::IdentityToken(t)) => Ok(Some(Credential::IdentityToken(Secret(t)))),
        Err(E::NoCredentialConfigured) => Ok(None),
        // A helper that has nothing stored for this host: anonymous, as Docker does.
        Err(E::HelperFailure { stdout, .. }) if stdout.contains("credentials not found") => Ok(None),
        // Never show the helper's output: it may hold secrets.
        Err(E::HelperFailure { helper, .. }) => {
            Err(RegistryError::invalid(format!("credentials {what}: {helper} get failed for {host}")))
        }
        Err(E::HelperCommunicationError) => Err(RegistryError::invalid(format!(
            "credentials {what}: cannot run the credential helper (docker-credential-<name> on PATH) for {host}"
        ))),
        Err(E::MalformedHelperResponse) => Err(RegistryError::invalid(format!(
            "credentials {what}: the credential helper's answer for {host} is malformed"
        ))),
        Err(E::ConfigReadError) => Err(RegistryError::invalid(format!("credentials {what}: not valid JSON"))),
        Err(e @ (E::CredentialDecodingError | E::CredentialMismatchError | E::ConfigNotFound)) => {
            Err(RegistryError::invalid(format!("credentials {what}: entry for {host}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn up(u: &str, p: &str) -> Option<Credential> {
        Some(Credential::UserPass {
            username: u.into(),
            password: Secret::new(p),
        })
    }

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        let c = up("bob", "hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let src = CredentialSource::Basic {
            username: "bob".into(),
            password: s,
        };
        assert!(!format!("{src:?} {}", src.describe()).contains("hunter2"));
    }

    #[test]
    fn docker_config_auths() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths": {{
                    "127.0.0.1:5000": {{"auth": "{b64}"}},
                    "https://index.docker.io/v1/": {{"username": "hub", "password": "pw"}},
                    "ghcr.io": {{"identitytoken": "idtok"}}
                }}}}"#
            ),
        )
        .unwrap();
        let src = CredentialSource::DockerConfigFile(p.clone());
        assert_eq!(src.lookup("127.0.0.1:5000").unwrap(), up("alice", "s3cret"));
        assert_eq!(src.lookup("docker.io").unwrap(), up("hub", "pw"));
        assert_eq!(
            src.lookup("ghcr.io").unwrap(),
            Some(Credential::IdentityToken(Secret::new("idtok")))
        );
        assert_eq!(src.lookup("other:1").unwrap(), None);
        assert_eq!(src.describe(), format!("docker-config:{}", p.display()));
        // Missing Docker config: anonymous. Missing creds file: an error.
        let missing = d.path().join("nope.json");
        assert_eq!(
            CredentialSource::DockerConfigFile(missing.clone())
                .lookup("x")
                .unwrap(),
            None
        );
        let e = CredentialSource::CredsFile(missing.clone())
            .lookup("x")
            .unwrap_err();
        assert!(e.to_string().contains("creds-file:"), "{e}");
        std::fs::write(&p, "{not json").unwrap();
        assert!(src.lookup("x").is_err());
    }

    #[test]
    fn creds_file_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        std::fs::write(&p, "bob:pa:ss\n").unwrap();
        let src = CredentialSource::CredsFile(p.clone());
        assert_eq!(src.lookup("any:1").unwrap(), up("bob", "pa:ss"));
        std::fs::write(&p, "nocolon\n").unwrap();
        let e = src.lookup("any").unwrap_err().to_string();
        assert!(e.contains("user:password") && !e.contains("nocolon"), "{e}");
        let b64 = base64::engine::general_purpose::STANDARD.encode("u:p");
        std::fs::write(&p, format!(r#"{{"auths":{{"h:1":{{"auth":"{b64}"}}}}}}"#)).unwrap();
        assert_eq!(src.lookup("h:1").unwrap(), up("u", "p"));
    }

    /// `credHelpers` and `credsStore` through a fake `docker-credential-test` on PATH. The only
    /// test in this crate that changes the environment.
    #[test]
    fn credential_helpers() {
        let d = tempfile::tempdir().unwrap();
        let helper = d.path().join("docker-credential-test");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\ncase \"$host\" in\n\
             helped:1) echo '{\"ServerURL\":\"helped:1\",\"Username\":\"hu\",\"Secret\":\"hs\"}' ;;\n\
             token:1) echo '{\"ServerURL\":\"token:1\",\"Username\":\"<token>\",\"Secret\":\"tk\"}' ;;\n\
             broken:1) echo 'topsecret-output'; exit 1 ;;\n\
             *) echo 'credentials not found in native keychain'; exit 1 ;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        std::env::set_var("PATH", format!("{}:{path}", d.path().display()));
        let p = d.path().join("config.json");
        std::fs::write(&p, r#"{"credHelpers": {"helped:1": "test", "token:1": "test", "broken:1": "test"}, "credsStore": "test"}"#)
            .unwrap();
        let src = CredentialSource::DockerConfigFile(p);
        assert_eq!(src.lookup("helped:1").unwrap(), up("hu", "hs"));
        assert_eq!(
            src.lookup("token:1").unwrap(),
            Some(Credential::IdentityToken(Secret::new("tk")))
        );
        // credsStore is asked for hosts without a credHelpers entry; "not found" is anonymous.
        assert_eq!(src.lookup("unknown:1").unwrap(), None);
        let e = src.lookup("broken:1").unwrap_err().to_string();
        assert!(
            e.contains("docker-credential-test") && !e.contains("topsecret"),
            "{e}"
        );
    }
}
