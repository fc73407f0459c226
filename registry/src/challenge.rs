//! `WWW-Authenticate` parsing (RFC 9110 §11.6.1): several challenges, each a scheme followed by
//! either a token68 or comma-separated `name=value` parameters whose values are tokens or quoted
//! strings with `\` escapes.

/// One challenge: a scheme (`Bearer`, `Basic`, ...) and its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme, as sent (compare case-insensitively).
    pub scheme: String,
    /// Parameters in order; names lowercased.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (lowercase).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the scheme is `scheme` (case-insensitive).
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn is_token68(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~+/".contains(&c)
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
}

impl P<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> Option<String> {
        let st = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        (self.i > st).then(|| String::from_utf8_lossy(&self.s[st..self.i]).into_owned())
    }
    fn quoted(&mut self) -> Option<String> {
        // At '"'.
        self.i += 1;
        let mut v = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(String::from_utf8_lossy(&v).into_owned());
                }
                b'\\' => {
                    self.i += 1;
                    v.push(self.peek()?);
                    self.i += 1;
                }
                c => {
                    v.push(c);
                    self.i += 1;
                }
            }
        }
    }
    /// Skip to just after the next top-level comma (or the end), for error recovery.
    fn skip_item(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b',' => {
                    self.i += 1;
                    return;
                }
                b'"' => {
                    if self.quoted().is_none() {
                        self.i = self.s.len();
                    }
                }
                _ => self.i += 1,
            }
        }
    }
    /// Whether what follows (after optional whitespace) is `token BWS =`, i.e. a parameter rather
    /// than the scheme of the next challenge.
    fn at_param(&self) -> bool {
        let mut j = self.i;
        while self.s.get(j).is_some_and(|&c| c == b' ' || c == b'\t') {
            j += 1;
        }
        let st = j;
        while self.s.get(j).copied().is_some_and(is_tchar) {
            j += 1;
        }
        if j == st {
            return false;
        }
        while self.s.get(j).is_some_and(|&c| c == b' ' || c == b'\t') {
            j += 1;
        }
        self.s.get(j) == Some(&b'=')
    }
}

/// Parse a `WWW-Authenticate` header value into its challenges. Never fails: malformed pieces are
/// skipped, so the result holds whatever could be understood.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut p = P {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        // Leading empty list elements.
        loop {
            p.ws();
            if p.peek() == Some(b',') {
                p.i += 1;
            } else {
                break;
            }
        }
        if p.peek().is_none() {
            return out;
        }
        let Some(scheme) = p.token() else {
            p.skip_item();
            continue;
        };
        let mut ch = Challenge {
            scheme,
            params: Vec::new(),
        };
        // Between the scheme and its first parameter there must be whitespace.
        let had_space = matches!(p.peek(), Some(b' ' | b'\t'));
        p.ws();
        if had_space && !p.at_param() && p.peek().is_some_and(is_token68) {
            // token68: kept as a parameter with an empty name.
            let st = p.i;
            while p.peek().is_some_and(is_token68) {
                p.i += 1;
            }
            while p.peek() == Some(b'=') {
                p.i += 1;
            }
            ch.params.push((
                String::new(),
                String::from_utf8_lossy(&p.s[st..p.i]).into_owned(),
            ));
            p.ws();
            if p.peek() == Some(b',') {
                p.i += 1;
            } else if p.peek().is_some() {
                p.skip_item();
            }
            out.push(ch);
            continue;
        }
        if had_space {
            // Empty list elements before the first parameter ("Bearer ,, realm=..").
            let save = p.i;
            while matches!(p.peek(), Some(b',' | b' ' | b'\t')) {
                p.i += 1;
            }
            if !p.at_param() {
                p.i = save;
            }
            while p.at_param() {
                p.ws();
                let name = p.token().unwrap_or_default().to_ascii_lowercase();
                p.ws();
                p.i += 1; // '='
                p.ws();
                let value = match p.peek() {
                    Some(b'"') => p.quoted(),
                    _ => p.token(),
                };
                match value {
                    Some(v) => ch.params.push((name, v)),
                    None => {
                        // Unterminated quote or a missing value: drop this parameter.
                        p.skip_item();
                        continue;
                    }
                }
                p.ws();
                match p.peek() {
                    Some(b',') => {
                        p.i += 1;
                        // Empty elements between parameters.
                        loop {
                            p.ws();
                            if p.peek() == Some(b',') {
                                p.i += 1;
                            } else {
                                break;
                            }
                        }
                    }
                    None => break,
                    Some(_) => {
                        p.skip_item();
                    }
                }
            }
        } else if p.peek() == Some(b',') {
            p.i += 1;
        } else if p.peek().is_some() {
            p.skip_item();
        }
        out.push(ch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect()
    }

    #[test]
    fn bearer_registry() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert!(c[0].is("bearer"));
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/debian:pull"));
    }

    #[test]
    fn several_challenges_escapes_tokens() {
        let c = parse_challenges(
            r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple", Bearer realm = "x\\y" ,error="invalid_token""#,
        );
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(
            params(&c[0]),
            vec![
                ("realm", "apps"),
                ("type", "1"),
                ("title", "Login to \"apps\"")
            ]
        );
        assert_eq!(c[1].scheme, "Basic");
        assert_eq!(params(&c[1]), vec![("realm", "simple")]);
        assert_eq!(
            params(&c[2]),
            vec![("realm", "x\\y"), ("error", "invalid_token")]
        );
    }

    #[test]
    fn token68_and_bare_schemes() {
        let c = parse_challenges("Negotiate, NTLM abc+/==, Basic REALM=\"r\"");
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(c[0].scheme, "Negotiate");
        assert!(c[0].params.is_empty());
        assert_eq!(params(&c[1]), vec![("", "abc+/==")]);
        assert_eq!(c[2].param("realm"), Some("r"));
    }

    #[test]
    fn malformed_does_not_panic() {
        for s in [
            "",
            ",",
            "Bearer",
            "Bearer realm=",
            "Bearer realm=\"unterminated",
            "Bearer realm=\"a\\",
            "=\"x\"",
            "Bearer ,,, realm=\"a\",, service=b",
            "\"",
            "Basic realm=\"a\" junk, Bearer realm=\"b\"",
        ] {
            let _ = parse_challenges(s);
        }
        let c = parse_challenges("Bearer ,,, realm=\"a\",, service=b");
        assert_eq!(c.len(), 1);
        let c = parse_challenges("Basic realm=\"a\" junk, Bearer realm=\"b\"");
        assert_eq!(
            c.iter().map(|c| c.scheme.as_str()).collect::<Vec<_>>(),
            ["Basic", "Bearer"]
        );
        assert_eq!(c[1].param("realm"), Some("b"));
    }
}
