//! containerd's filter syntax (`github.com/containerd/containerd/filters`) for `List`, as far as
//! snapshots use it:
//!
//! ```text
//! filters   := filter*                      (several strings: any may match, "or")
//! filter    := selector ( "," selector )*   (all must match, "and"; "" matches everything)
//! selector  := fieldpath ( op value )?      (no op: the field is present)
//! fieldpath := field ( "." field )*
//! field     := quoted | [A-Za-z0-9_]+
//! op        := "==" | "!=" | "@="           (equal, not equal, contains)
//! value     := quoted | [^\s,"]+
//! quoted    := a Go double-quoted string ("\"", "\\", "\n", "\x41", "\u00e9", ...)
//! ```
//!
//! Whitespace between tokens is ignored. The fields are containerd's `adaptSnapshot`: `name`,
//! `parent` (always present, possibly empty: `parent==""` matches a snapshot without a
//! parent), `kind` (`view`, `active`, `committed`) and `labels.<key>` (the rest of the path,
//! joined by `.`, is the key: `labels."containerd.io/snapshot.ref"==sha256:...`). An unknown
//! field matches nothing, as in containerd. The regular-expression operator `~=` is refused with
//! InvalidArgument (neither containerd's metadata layer nor its GC sends it), as is anything
//! that does not parse. This is what containerd sends after a remote Prepare answered
//! ALREADY_EXISTS: `labels."containerd.io/snapshot.ref"==<chain id>,parent=="<parent>"`.

use std::fmt;

use crate::meta::Snapshot;
use crate::Error;

/// The comparison of a selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// No operator: the field is present.
    Present,
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `@=`: the value contains the string.
    Contains,
}

/// One `fieldpath op value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// The field path, unquoted.
    pub fieldpath: Vec<String>,
    /// The comparison.
    pub op: Op,
    /// The value, unquoted (empty for [`Op::Present`]).
    pub value: String,
}

/// Parsed filters: any of the alternatives, each of which needs all its selectors.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parse the `filters` of a List request. No filters (or only empty ones) match everything.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Filter, Error> {
        let mut any = Vec::new();
        for f in filters {
            let all = parse_one(f.as_ref())
                .map_err(|e| Error::InvalidArgument(format!("filter {:?}: {e}", f.as_ref())))?;
            any.push(all);
        }
        Ok(Filter { any })
    }

    /// Whether the snapshot `name` matches.
    pub fn matches(&self, name: &str, snap: &Snapshot) -> bool {
        if self.any.is_empty() {
            return true;
        }
        self.any
            .iter()
            .any(|all| all.iter().all(|s| s.matches(name, snap)))
    }
}

impl Selector {
    fn matches(&self, name: &str, snap: &Snapshot) -> bool {
        let (value, present) = field(&self.fieldpath, name, snap);
        match self.op {
            Op::Present => present,
            Op::Equal => present && value == self.value,
            Op::NotEqual => value != self.value,
            Op::Contains => value.contains(self.value.as_str()),
        }
    }
}

fn field<'a>(path: &[String], name: &'a str, snap: &'a Snapshot) -> (&'a str, bool) {
    match path.first().map(String::as_str) {
        Some("name") if path.len() == 1 => (name, true),
        Some("parent") if path.len() == 1 => (&snap.parent, true),
        Some("kind") if path.len() == 1 => (snap.kind.as_str(), true),
        Some("labels") if path.len() > 1 => match snap.labels.get(&path[1..].join(".")) {
            Some(v) => (v, true),
            None => ("", false),
        },
        _ => ("", false),
    }
}

struct Scanner<'a> {
    s: &'a str,
    pos: usize,
}

impl Scanner<'_> {
    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }
    fn skip_ws(&mut self) {
        let r = self.rest();
        self.pos += r.len() - r.trim_start().len();
    }
    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }
    fn eat(&mut self, t: &str) -> bool {
        if self.rest().starts_with(t) {
            self.pos += t.len();
            true
        } else {
            false
        }
    }
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &str {
        let start = self.pos;
        let n = self.rest().find(|c| !f(c)).unwrap_or(self.rest().len());
        self.pos += n;
        &self.s[start..self.pos]
    }

    fn quoted(&mut self) -> Result<String, String> {
        let at = self.pos;
        if !self.eat("\"") {
            return Err(format!("expected a quote at {at}"));
        }
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        loop {
            let Some((i, c)) = chars.next() else {
                return Err(format!("unterminated quote from {at}"));
            };
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\n' => return Err(format!("newline in the quote from {at}")),
                '\\' => {
                    let Some((_, e)) = chars.next() else {
                        return Err(format!("unterminated quote from {at}"));
                    };
                    let mut hex = |n: usize| -> Result<u32, String> {
                        let mut v = 0u32;
                        for _ in 0..n {
                            let d = chars
                                .next()
                                .and_then(|(_, c)| c.to_digit(16))
                                .ok_or_else(|| format!("bad hex escape in the quote from {at}"))?;
                            v = v * 16 + d;
                        }
                        Ok(v)
                    };
                    let ch = match e {
                        'a' => '\x07',
                        'b' => '\x08',
                        'f' => '\x0c',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        'v' => '\x0b',
                        '\\' => '\\',
                        '"' => '"',
                        // Go allows bytes here; only ASCII keeps the string valid UTF-8.
                        'x' => char::from_u32(hex(2)?)
                            .filter(char::is_ascii)
                            .ok_or_else(|| {
                                format!("non-ASCII \\x escape in the quote from {at}")
                            })?,
                        'u' => char::from_u32(hex(4)?)
                            .ok_or_else(|| format!("bad \\u escape in the quote from {at}"))?,
                        'U' => char::from_u32(hex(8)?)
                            .ok_or_else(|| format!("bad \\U escape in the quote from {at}"))?,
                        '0'..='7' => {
                            let mut v = e.to_digit(8).expect("octal digit");
                            for _ in 0..2 {
                                let d = chars.next().and_then(|(_, c)| c.to_digit(8)).ok_or_else(
                                    || format!("bad octal escape in the quote from {at}"),
                                )?;
                                v = v * 8 + d;
                            }
                            char::from_u32(v).filter(char::is_ascii).ok_or_else(|| {
                                format!("non-ASCII octal escape in the quote from {at}")
                            })?
                        }
                        other => {
                            return Err(format!("unknown escape \\{other} in the quote from {at}"))
                        }
                    };
                    out.push(ch);
                }
                c => out.push(c),
            }
        }
    }
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn is_value_char(c: char) -> bool {
    c != ',' && c != '"' && !c.is_whitespace() && !c.is_control()
}

fn parse_one(s: &str) -> Result<Vec<Selector>, String> {
    let mut sc = Scanner { s, pos: 0 };
    let mut out = Vec::new();
    sc.skip_ws();
    if sc.peek().is_none() {
        return Ok(out);
    }
    loop {
        sc.skip_ws();
        let mut fieldpath = Vec::new();
        loop {
            sc.skip_ws();
            let f = match sc.peek() {
                Some('"') => sc.quoted()?,
                Some(c) if is_field_char(c) => sc.take_while(is_field_char).to_string(),
                Some(c) => {
                    return Err(format!("unexpected {c:?} at {} (expected a field)", sc.pos))
                }
                None => return Err("expected a field at the end".into()),
            };
            fieldpath.push(f);
            sc.skip_ws();
            if !sc.eat(".") {
                break;
            }
        }
        sc.skip_ws();
        let op = if sc.eat("==") {
            Op::Equal
        } else if sc.eat("!=") {
            Op::NotEqual
        } else if sc.eat("@=") {
            Op::Contains
        } else if sc.rest().starts_with("~=") {
            return Err("regular expressions (~=) are not supported".into());
        } else {
            Op::Present
        };
        let value = if op == Op::Present {
            String::new()
        } else {
            sc.skip_ws();
            match sc.peek() {
                Some('"') => sc.quoted()?,
                Some(c) if is_value_char(c) => sc.take_while(is_value_char).to_string(),
                _ => return Err(format!("expected a value at {}", sc.pos)),
            }
        };
        out.push(Selector {
            fieldpath,
            op,
            value,
        });
        sc.skip_ws();
        match sc.peek() {
            None => return Ok(out),
            Some(',') => {
                sc.pos += 1;
            }
            Some(c) => return Err(format!("unexpected {c:?} at {}", sc.pos)),
        }
    }
}

/// `s` as a quoted string the parser reads back as `s` (for a field or a value).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\U{:08x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Prints the alternatives one per line, every field and value quoted: each line parses back
/// to the same selectors.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, all) in self.any.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            for (j, s) in all.iter().enumerate() {
                if j > 0 {
                    f.write_str(",")?;
                }
                for (k, p) in s.fieldpath.iter().enumerate() {
                    if k > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(&quote(p))?;
                }
                let op = match s.op {
                    Op::Present => continue,
                    Op::Equal => "==",
                    Op::NotEqual => "!=",
                    Op::Contains => "@=",
                };
                f.write_str(op)?;
                f.write_str(&quote(&s.value))?;
            }
        }
        Ok(())
    }
}

impl Filter {
    /// The alternatives (for tests and the fuzz target).
    pub fn alternatives(&self) -> &[Vec<Selector>] {
        &self.any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Kind;
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    fn snap(kind: Kind, parent: &str, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            id: 1,
            kind,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            remote: None,
        }
    }

    fn m(filters: &[&str], name: &str, s: &Snapshot) -> bool {
        Filter::parse(filters).unwrap().matches(name, s)
    }

    #[test]
    fn containerd_remote_lookup_filter() {
        let s = snap(
            Kind::Committed,
            "k8s.io/3/sha256:aa",
            &[("containerd.io/snapshot.ref", "sha256:bb")],
        );
        // What containerd's metadata layer sends (Go %q on the parent).
        let f = r#"labels."containerd.io/snapshot.ref"==sha256:bb,parent=="k8s.io/3/sha256:aa""#;
        assert!(m(&[f], "sha256:bb", &s));
        let f2 = r#"labels."containerd.io/snapshot.ref"==sha256:bb,parent=="other""#;
        assert!(!m(&[f2], "sha256:bb", &s));
        // The bottom layer: an empty parent, quoted.
        let bottom = snap(
            Kind::Committed,
            "",
            &[("containerd.io/snapshot.ref", "sha256:cc")],
        );
        let f3 = r#"labels."containerd.io/snapshot.ref"==sha256:cc,parent=="""#;
        assert!(m(&[f3], "sha256:cc", &bottom));
        assert!(!m(&[f3], "sha256:cc", &s));
    }

    #[test]
    fn fields_ops_and_or() {
        let s = snap(Kind::Active, "p", &[("a", "x1"), ("b.c", "y")]);
        assert!(m(&[], "n", &s));
        assert!(m(&[""], "n", &s));
        assert!(m(&["name==n"], "n", &s));
        assert!(!m(&["name==o"], "n", &s));
        assert!(m(&["name!=o"], "n", &s));
        assert!(m(&["kind==active"], "n", &s));
        assert!(!m(&["kind==committed"], "n", &s));
        assert!(m(&["parent==p"], "n", &s));
        assert!(m(&["labels.a"], "n", &s));
        assert!(!m(&["labels.zz"], "n", &s));
        assert!(
            m(&["labels.b.c==y"], "n", &s),
            "the rest of the path is the key"
        );
        assert!(m(&[r#"labels."b.c"==y"#], "n", &s));
        assert!(m(&["labels.a@=1"], "n", &s));
        assert!(m(&["labels.zz!=q"], "n", &s), "!= of an absent field holds");
        assert!(
            !m(&["labels.zz==\"\""], "n", &s),
            "== needs the field present"
        );
        assert!(m(&[" name == n , kind==active "], "n", &s));
        assert!(!m(&["name==n,kind==view"], "n", &s));
        assert!(
            m(&["name==x", "kind==active"], "n", &s),
            "several filters: or"
        );
        assert!(!m(&["name==x", "kind==view"], "n", &s));
        assert!(!m(&["unknown==1"], "n", &s), "unknown fields match nothing");
        assert!(m(&[r#"name=="\x6e""#], "n", &s));
        assert!(m(&[r#"name=="\u006e""#], "n", &s));
        assert!(m(&[r#"name=="\156""#], "n", &s));
    }

    #[test]
    fn bad_syntax_is_invalid_argument() {
        for bad in [
            "name==",
            "name=n",
            "==n",
            "name==n,",
            ",name==n",
            "name~=n.*",
            "labels.\"unterminated==x",
            "name==\"bad\\q\"",
            "name==a b",
            "labels.",
            "name==\"a\"b",
            "na-me==x",
        ] {
            assert!(
                matches!(Filter::parse(&[bad]), Err(Error::InvalidArgument(_))),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn display_parses_back() {
        let f =
            Filter::parse(&[r#"labels."k\"\\ey"=="v,al\n",name!=x,kind"#, "parent@=p"]).unwrap();
        let lines: Vec<String> = f.to_string().lines().map(String::from).collect();
        assert_eq!(Filter::parse(&lines).unwrap(), f);
    }
}
