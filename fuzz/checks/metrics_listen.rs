//! `--listen` addresses (`lazyblk_metrics::Listen`) and the metrics text reader
//! (`lazyblk_metrics::parse_text`) on arbitrary text: never panic; an address that parses
//! prints to one that parses back to the same; text the reader accepts re-read is the same.

use lazyblk_metrics::Listen;

/// The check, on one input.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(l) = s.parse::<Listen>() {
        let shown = l.to_string();
        let back: Listen = shown
            .parse()
            .unwrap_or_else(|e| panic!("{s:?} -> {shown:?}: {e}"));
        assert_eq!(back, l);
    }
    if let Ok(samples) = lazyblk_metrics::parse_text(s) {
        for x in &samples {
            assert!(!x.name.is_empty());
        }
        let again = lazyblk_metrics::parse_text(s).expect("deterministic");
        assert_eq!(again.len(), samples.len());
    }
}
