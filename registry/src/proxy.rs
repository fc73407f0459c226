//! Proxies from the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`), never for loopback.

use url::Url;

/// The proxy settings from the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`, or their
/// lowercase forms). Loopback hosts never go through a proxy (as in Go's net/http).
#[derive(Debug, Default, Clone)]
pub(crate) struct ProxyEnv {
    http: Option<Url>,
    https: Option<Url>,
    no_proxy: Vec<String>,
}

impl ProxyEnv {
    pub(crate) fn from_env() -> ProxyEnv {
        let get = |a: &str, b: &str| {
            std::env::var(a)
                .ok()
                .or_else(|| std::env::var(b).ok())
                .filter(|v| !v.is_empty())
        };
        Self::from_values(
            get("HTTP_PROXY", "http_proxy"),
            get("HTTPS_PROXY", "https_proxy"),
            get("NO_PROXY", "no_proxy"),
        )
    }

    pub(crate) fn from_values(
        http: Option<String>,
        https: Option<String>,
        no_proxy: Option<String>,
    ) -> ProxyEnv {
        let url = |s: String| {
            let s = if s.contains("://") {
                s
            } else {
                format!("http://{s}")
            };
            Url::parse(&s).ok()
        };
        ProxyEnv {
            http: http.and_then(url),
            https: https.and_then(url),
            no_proxy: no_proxy
                .unwrap_or_default()
                .split(',')
                .map(|e| {
                    e.trim()
                        .trim_start_matches("*.")
                        .trim_start_matches('.')
                        .to_ascii_lowercase()
                })
                .filter(|e| !e.is_empty())
                .collect(),
        }
    }

    pub(crate) fn proxy_for(&self, u: &Url) -> Option<Url> {
        let loopback = match u.host()? {
            url::Host::Domain(d) => {
                d.eq_ignore_ascii_case("localhost")
                    || d.to_ascii_lowercase().ends_with(".localhost")
            }
            url::Host::Ipv4(a) => a.is_loopback(),
            url::Host::Ipv6(a) => a.is_loopback(),
        };
        if loopback {
            return None;
        }
        let host = u
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = u.port_or_known_default();
        for e in &self.no_proxy {
            if e == "*" {
                return None;
            }
            let (eh, ep) = match e.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
                    (h, p.parse::<u16>().ok())
                }
                _ => (e.as_str(), None),
            };
            let eh = eh.trim_start_matches('[').trim_end_matches(']');
            if (host == eh || host.ends_with(&format!(".{eh}"))) && (ep.is_none() || ep == port) {
                return None;
            }
        }
        match u.scheme() {
            "https" => self.https.clone(),
            "http" => self.http.clone(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_skip_loopback_and_no_proxy() {
        let env = ProxyEnv::from_values(
            Some("http://proxy:3128".into()),
            Some("proxy:3129".into()),
            Some(" .internal.example, direct.example:443,*.wild.example".into()),
        );
        let p = |u: &str| {
            env.proxy_for(&Url::parse(u).unwrap())
                .map(|u| u.to_string())
        };
        assert_eq!(p("https://ghcr.io/v2/"), Some("http://proxy:3129/".into()));
        assert_eq!(p("http://ghcr.io/v2/"), Some("http://proxy:3128/".into()));
        for u in [
            "http://127.0.0.1:5000/v2/",
            "http://127.9.9.9/",
            "http://localhost:5000/",
            "http://[::1]:5000/",
            "https://a.internal.example/",
            "https://internal.example/",
            "https://direct.example/",
            "https://x.wild.example/",
        ] {
            assert_eq!(p(u), None, "{u}");
        }
        assert!(p("http://direct.example:8080/").is_some());
        let star = ProxyEnv::from_values(Some("http://p:1".into()), None, Some("*".into()));
        assert_eq!(star.proxy_for(&Url::parse("http://x/").unwrap()), None);
    }
}
