//! The chunk store flags shared by `add`, `cat`, `vhost` and `export-cow` (`StoreArgs`): size
//! parsing, the store options they give, and the same settings as `add` flags for the device
//! record.

use crate::daemon;
use crate::registry_args::RegistryArgs;
use anyhow::Result;
use clap::Args;
use lazyblk_chunkstore::StoreOptions;
use lazyblk_remote::HttpOptions;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Cache root (one directory per image inside).
    #[arg(long, env = "LAZYBLK_CACHE_DIR", default_value = "/var/cache/lazyblk")]
    cache_dir: PathBuf,
    /// Require the manifest to have this digest (sha256:...).
    #[arg(long)]
    digest: Option<String>,
    /// Use the prefetch pack published next to the manifest (`lazyblk trace --pack`) only if
    /// it has this digest (sha256:...), and fail without it. Without this flag a published
    /// pack is used only when `--digest` is not given either.
    #[arg(long)]
    pack_digest: Option<String>,
    /// Seconds a read may wait for a missing chunk while the remote is failing (0: forever).
    #[arg(long, default_value_t = 300)]
    io_deadline: u64,
    /// Range requests in flight.
    #[arg(long, default_value_t = 8)]
    max_requests: usize,
    /// Range requests in flight for the pack fetched at attach (the image's metadata pack or
    /// a prefetch pack). It streams in block order: a few requests in order deliver its front
    /// first.
    #[arg(long, default_value_t = 3)]
    pack_requests: usize,
    /// Largest range request for that pack (e.g. 512K).
    #[arg(long, value_parser = parse_size, default_value = "512K")]
    pack_request_size: u64,
    /// Bytes read ahead after a miss (the first window, rounded up to whole chunks; e.g. 512K;
    /// 0: no readahead).
    #[arg(long, value_parser = parse_size, default_value = "512K")]
    readahead: u64,
    /// Largest readahead window (e.g. 4M): sequential reads double the window up to it.
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    readahead_max: u64,
    /// Seconds one HTTP request may take (headers and body) before it is retried. For images
    /// in a registry it bounds every request but blob reads, which give up after 30 s without
    /// a byte.
    #[arg(long, default_value_t = 30)]
    http_timeout: u64,
    /// Keep at most this much fetched data in the cache (e.g. 512M, 2G); cold chunks are
    /// evicted and fetched again when needed.
    #[arg(long, value_parser = parse_size)]
    cache_limit: Option<u64>,
    /// Set one cache limit for the whole cache root (e.g. 20G; 0 removes it): every device
    /// under the root keeps the root under it together, least recently used chunks first
    /// across images, a chunk several caches hold counted once. It stays set for the root
    /// (`lazyblk gc --host-cache-limit` changes it); it is not part of the device record.
    #[arg(long, value_parser = parse_size)]
    host_cache_limit: Option<u64>,
    /// After the prefetch list, fetch every remaining chunk in the background (yielding to
    /// reads), so the image ends up needing no network.
    #[arg(long)]
    hydrate: bool,
    /// Hydration rate limit (bytes per second, e.g. 20M).
    #[arg(long, value_parser = parse_size)]
    hydrate_rate: Option<u64>,
    /// Fetch on demand only: neither the image's metadata pack nor the prefetch list
    /// published next to the manifest is fetched ahead (a read of metadata blocks still
    /// fetches the pack frame holding them).
    #[arg(long)]
    no_prefetch: bool,
    /// Fetch every chunk from the remote, never copying it from another image's cache under
    /// the same cache root (by default a chunk another cache holds is copied locally and
    /// verified against this image's manifest).
    #[arg(long)]
    no_host_index: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Parse `123`, `64K`, `512M`, `2G` (powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?}"))
}

impl StoreArgs {
    /// Whether these flags pin one image (`--digest`, `--pack-digest`): meaningless for a
    /// command that serves many, such as the snapshotter.
    pub fn pins_one_image(&self) -> bool {
        self.digest.is_some() || self.pack_digest.is_some()
    }

    /// These settings as `add` flags, for the device record: `recover` and the supervisor start
    /// the next daemon with exactly them. (`--digest` is left out: recovery pins the image.)
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--cache-dir".to_string(),
            self.cache_dir.display().to_string(),
            "--io-deadline".into(),
            self.io_deadline.to_string(),
            "--max-requests".into(),
            self.max_requests.to_string(),
            "--pack-requests".into(),
            self.pack_requests.to_string(),
            "--pack-request-size".into(),
            self.pack_request_size.to_string(),
            "--readahead".into(),
            self.readahead.to_string(),
            "--readahead-max".into(),
            self.readahead_max.to_string(),
            "--http-timeout".into(),
            self.http_timeout.to_string(),
        ];
        if let Some(l) = self.cache_limit {
            a.extend(["--cache-limit".into(), l.to_string()]);
        }
        if self.hydrate {
            a.push("--hydrate".into());
        }
        if let Some(r) = self.hydrate_rate {
            a.extend(["--hydrate-rate".into(), r.to_string()]);
        }
        if self.no_prefetch {
            a.push("--no-prefetch".into());
        }
        if self.no_host_index {
            a.push("--no-host-index".into());
        }
        if let Some(p) = &self.pack_digest {
            a.extend(["--pack-digest".into(), p.clone()]);
        }
        a.extend(self.registry.to_args());
        a
    }

    /// The chunk store options these flags give.
    pub fn options(&self) -> Result<StoreOptions> {
        Ok(StoreOptions {
            cache_root: self.cache_dir.clone(),
            expected_id: daemon::parse_digest(self.digest.as_deref())?,
            expected_pack: daemon::parse_digest(self.pack_digest.as_deref())?,
            http: HttpOptions {
                request_timeout: Duration::from_secs(self.http_timeout.max(1)),
                ..HttpOptions::default()
            },
            registry: self.registry.options(self.http_timeout),
            max_requests: self.max_requests,
            pack_requests: self.pack_requests,
            pack_request_bytes: self.pack_request_size,
            readahead_bytes: self.readahead,
            readahead_max_bytes: self.readahead_max,
            io_deadline: (self.io_deadline > 0).then(|| Duration::from_secs(self.io_deadline)),
            cache_limit: self.cache_limit,
            host_cache_limit: self.host_cache_limit,
            hydrate: self.hydrate,
            hydrate_rate: self.hydrate_rate,
            use_prefetch_list: !self.no_prefetch,
            prefetch_pack: !self.no_prefetch,
            host_index: !self.no_host_index,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Cmd};
    use clap::Parser;
    use lazyblk_registry::CredentialSource;

    fn store_of(argv: &[&str]) -> StoreArgs {
        match Cli::try_parse_from(argv).expect("parses").cmd {
            Cmd::Add(a) => a.store,
            _ => panic!("not add"),
        }
    }

    #[test]
    fn recorded_store_args_give_the_same_options() {
        let store = store_of(&[
            "lazyblk",
            "add",
            "http://h/img/manifest",
            "--cache-dir",
            "/c",
            "--cache-limit",
            "2G",
            "--hydrate",
            "--hydrate-rate",
            "20M",
            "--readahead",
            "1M",
            "--readahead-max",
            "8M",
            "--max-requests",
            "4",
            "--pack-requests",
            "2",
            "--pack-request-size",
            "1M",
            "--http-timeout",
            "9",
            "--io-deadline",
            "0",
            "--no-prefetch",
            "--no-host-index",
            "--plain-http",
            "--mirror",
            "http://m1:5000",
            "--mirror",
            "http://m2",
            "--hosts-dir",
            "/h",
            "--ca-file",
            "/ca.pem",
            "--creds-file",
            "/creds",
            "--insecure",
        ]);
        let mut argv = vec!["lazyblk", "add", "m"];
        let recorded = store.to_args();
        argv.extend(recorded.iter().map(String::as_str));
        let again = store_of(&argv);
        assert_eq!(again.to_args(), recorded);
        let (a, b) = (store.options().unwrap(), again.options().unwrap());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(b.cache_limit, Some(2 << 30));
        // The host limit belongs to the cache root, not to the device record.
        let host = store_of(&["lazyblk", "add", "m", "--host-cache-limit", "3G"]);
        assert_eq!(host.options().unwrap().host_cache_limit, Some(3 << 30));
        assert!(!host.to_args().iter().any(|a| a.contains("host")));
        assert_eq!(b.hydrate_rate, Some(20 << 20));
        assert!(b.hydrate && !b.use_prefetch_list && b.io_deadline.is_none());
        assert!(!b.host_index);
        assert_eq!(
            (b.readahead_bytes, b.readahead_max_bytes),
            (1 << 20, 8 << 20)
        );
        assert_eq!(b.max_requests, 4);
        assert_eq!((b.pack_requests, b.pack_request_bytes), (2, 1 << 20));
        assert_eq!(b.registry.mirrors, ["http://m1:5000", "http://m2"]);
        assert!(b.registry.insecure && b.registry.plain_http == Some(true));
        assert!(
            matches!(&b.registry.credentials, CredentialSource::CredsFile(p) if p == std::path::Path::new("/creds"))
        );
        // The defaults survive too.
        let d = store_of(&["lazyblk", "add", "m"]);
        let mut argv = vec!["lazyblk", "add", "m"];
        let rec = d.to_args();
        argv.extend(rec.iter().map(String::as_str));
        assert_eq!(
            format!("{:?}", store_of(&argv).options().unwrap()),
            format!("{:?}", d.options().unwrap())
        );
    }
}
