//! `Reference::parse` on arbitrary text: never panics; what it accepts prints (Display) to a
//! string that parses back to the same reference and prints the same again.

use lazyblk_registry::reference::{validate_repository, Reference};

/// The check, on one input.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = Reference::parse(s) else { return };
    let shown = r.to_string();
    let back = Reference::parse(&shown)
        .unwrap_or_else(|e| panic!("{s:?} printed as {shown:?}, which does not parse: {e}"));
    assert_eq!(back, r, "{s:?} -> {shown:?}");
    assert_eq!(back.to_string(), shown);
    assert!(validate_repository(r.repository()).is_ok());
    assert!(r.tag().is_some() || r.digest().is_some());
    assert!(!r.api_host().is_empty());
}
