//! `parse_challenges` (the registry client's `WWW-Authenticate` parser) on arbitrary text: it
//! must never panic, parameter names come out lowercase, and writing the parsed challenges back
//! (quoted values, escapes) parses to the same challenges.

use lazyblk_registry::challenge::{parse_challenges, Challenge};

fn write(cs: &[Challenge]) -> String {
    let mut out = Vec::new();
    for c in cs {
        let mut s = c.scheme.clone();
        let params: Vec<String> = c
            .params
            .iter()
            .map(|(n, v)| {
                if n.is_empty() {
                    v.clone()
                } else {
                    format!("{n}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                }
            })
            .collect();
        if !params.is_empty() {
            s.push(' ');
            s.push_str(&params.join(", "));
        }
        out.push(s);
    }
    out.join(", ")
}

/// The check, on one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let cs = parse_challenges(&text);
    for c in &cs {
        assert!(!c.scheme.is_empty(), "empty scheme from {text:?}");
        for (n, _) in &c.params {
            assert_eq!(n, &n.to_ascii_lowercase(), "parameter name not lowercased");
        }
        let _ = (c.is("bearer"), c.param("realm"));
    }
    let again = parse_challenges(&write(&cs));
    assert_eq!(again, cs, "written back as {:?}", write(&cs));
}
