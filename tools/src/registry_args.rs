//! The registry flags shared by every command that reads or writes images in OCI registries
//! (`add`, `cat`, `vhost`, `push`, `build --push`, `trace --pack --push`), the registry client
//! options they give, and the same settings as flags for the device record (paths only, never a
//! secret).

use clap::Args;
use lazyblk_registry::CredentialSource;
use lazyblk_remote::RegistryOptions;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Clone, Debug, Default)]
pub struct RegistryArgs {
    /// Images in a registry: talk plain HTTP to it (`localhost` and `127.0.0.1` do anyway;
    /// other hosts use HTTPS without this flag).
    #[arg(long)]
    pub plain_http: bool,
    /// Images in a registry: a mirror to try before the registry (repeatable, tried in order),
    /// e.g. `http://mirror:5000`. A mirror that fails is skipped for a while.
    #[arg(long = "mirror", value_name = "URL")]
    mirrors: Vec<String>,
    /// Images in a registry: containerd's hosts directory (`<dir>/<host>/hosts.toml`:
    /// mirrors, CAs, plain HTTP) [default: /etc/containerd/certs.d].
    #[arg(long, value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
    /// Images in a registry: extra CA certificates (PEM) trusted beside the system roots.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Images in a registry: do not verify TLS certificates (only when asked; never for
    /// anything else).
    #[arg(long)]
    insecure: bool,
    /// Images in a registry: read credentials from this file (Docker's `config.json` format,
    /// or one line `user:password`) instead of `$DOCKER_CONFIG/config.json` /
    /// `~/.docker/config.json`. Only the path is recorded, never a secret.
    #[arg(long, value_name = "FILE")]
    creds_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// These settings as flags, for the device record.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.plain_http {
            a.push("--plain-http".into());
        }
        for m in &self.mirrors {
            a.extend(["--mirror".into(), m.clone()]);
        }
        for (flag, p) in [
            ("--hosts-dir", &self.hosts_dir),
            ("--ca-file", &self.ca_file),
            ("--creds-file", &self.creds_file),
        ] {
            if let Some(p) = p {
                a.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        if self.insecure {
            a.push("--insecure".into());
        }
        a
    }

    /// The registry client settings these flags give.
    pub fn options(&self, http_timeout: u64) -> RegistryOptions {
        RegistryOptions {
            plain_http: self.plain_http.then_some(true),
            mirrors: self.mirrors.clone(),
            hosts_dir: self.hosts_dir.clone(),
            ca_file: self.ca_file.clone(),
            insecure: self.insecure,
            credentials: match &self.creds_file {
                Some(p) => CredentialSource::CredsFile(p.clone()),
                None => CredentialSource::DockerConfig,
            },
            request_timeout: Duration::from_secs(http_timeout.max(1)),
            ..RegistryOptions::default()
        }
    }

    /// A registry client with these settings.
    pub fn client(&self) -> anyhow::Result<lazyblk_registry::Client> {
        Ok(lazyblk_registry::Client::new(self.options(30))?)
    }
}
