//! The crate's one error type: what failed, against which registry/repository, and whether a retry
//! may help.

use std::fmt;

/// Whether retrying the same operation may succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying may help: connect errors, timeouts, resets, 5xx, 408, 429, truncated bodies.
    Transient,
    /// Retrying the same request will fail the same way: unknown repository/tag/blob, bad
    /// credentials, an untrusted TLS certificate, wrong media type, size limit, digest mismatch,
    /// redirect loop, bad input.
    Permanent,
}

/// What went wrong (finer than [`ErrorClass`]; each kind has one class, see [`ErrorKind::class`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// TCP/TLS connection could not be made, or was reset.
    Connect,
    /// The server's TLS certificate was not accepted (unknown issuer, wrong name, expired): a
    /// configuration problem (`ca_file`, `insecure`, `hosts.toml`), so not retried.
    Certificate,
    /// A connect or read timeout expired.
    Timeout,
    /// The body ended before the announced or requested length.
    Truncated,
    /// 5xx, 408 or 429 from the registry (or a mirror, token service, object store).
    Unavailable,
    /// 404: unknown repository, tag, manifest or blob.
    NotFound,
    /// 401/403 after a fresh authentication attempt: bad or missing credentials, or no access.
    Auth,
    /// The manifest's media type is not an OCI/Docker schema-2 manifest or index.
    MediaType,
    /// A manifest or blob is larger than the caller's limit.
    TooLarge,
    /// Content does not hash to the expected digest.
    DigestMismatch,
    /// More than 10 redirects.
    RedirectLoop,
    /// A malformed reference, digest, option, configuration or credentials file.
    Invalid,
    /// The server answered something the protocol does not allow (bad JSON, bad status, bad
    /// Content-Range, missing Location).
    Protocol,
}

impl ErrorKind {
    /// The retry class of this kind.
    pub fn class(self) -> ErrorClass {
        match self {
            ErrorKind::Connect
            | ErrorKind::Timeout
            | ErrorKind::Truncated
            | ErrorKind::Unavailable => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        }
    }
}

/// An error from the registry client. `Display` is one line naming the registry host and, where
/// known, the repository and the tag/digest; it never contains credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub struct RegistryError {
    kind: ErrorKind,
    host: String,
    repo: Option<String>,
    detail: String,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.host.is_empty() {
            write!(f, "registry {}: ", self.host)?;
        }
        if let Some(r) = &self.repo {
            write!(f, "repository {r:?}: ")?;
        }
        f.write_str(&self.detail)
    }
}

impl RegistryError {
    /// A new error. `host` may be empty (errors before any host is known, e.g. a bad reference);
    /// `detail` is flattened to one line.
    pub(crate) fn new(
        kind: ErrorKind,
        host: &str,
        repo: Option<&str>,
        detail: impl Into<String>,
    ) -> Self {
        RegistryError {
            kind,
            host: host.to_string(),
            repo: repo.map(str::to_string),
            detail: one_line(&detail.into()),
        }
    }

    /// An error that names no host or repository.
    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, "", None, detail)
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether a retry may help.
    pub fn class(&self) -> ErrorClass {
        self.kind.class()
    }

    /// Shorthand for `class() == Transient`.
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// The registry host (or mirror, token service) the error is about; empty when none.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The repository, when the error is about one.
    pub fn repository(&self) -> Option<&str> {
        self.repo.as_deref()
    }

    /// The same error with another kind.
    pub(crate) fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }
}

/// Collapse whitespace runs (newlines included) to one space and cap the length, so a server's
/// message can never break the one-line rule.
pub(crate) fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(400));
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.len() > 400 {
            let mut end = 400;
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push('…');
            break;
        }
    }
    out
}

/// Result with [`RegistryError`].
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_naming_host_and_repo() {
        let e = RegistryError::new(
            ErrorKind::NotFound,
            "127.0.0.1:5000",
            Some("foo/bar"),
            "manifest unknown\n(tag \"v1\")",
        );
        assert_eq!(
            e.to_string(),
            "registry 127.0.0.1:5000: repository \"foo/bar\": manifest unknown (tag \"v1\")"
        );
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(RegistryError::new(ErrorKind::Timeout, "h", None, "x").is_transient());
    }

    #[test]
    fn one_line_caps_length() {
        let s = "é".repeat(1000);
        let l = one_line(&s);
        assert!(l.len() <= 404 && !l.contains('\n'));
    }
}
