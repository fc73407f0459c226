//! What the commands know about a ublk device: whether it is a lazyblk device, its record
//! (from the state directory, else from the kernel's copy), and whether its daemon is alive.

use crate::daemon;
use std::path::Path;

/// Whether device `id` is served by lazyblk (the kernel holds our target data for it).
pub fn is_ours(id: u32) -> bool {
    matches!(lazyblk_ublk::device_state(id), Ok((_, Some(v))) if v.get(lazyblk_ublk::TARGET_NAME).is_some())
}

/// Whether process `pid` exists and is neither a zombie (`Z`) nor dead (`X`: being reaped, the
/// moment between its parent's wait and its `/proc` entry going away).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_state(&s))
        .is_some_and(|st| !matches!(st, 'Z' | 'X' | 'x'))
}

/// The state letter of a `/proc/<pid>/stat` line (field 3).
fn stat_state(stat: &str) -> Option<char> {
    stat_field(stat, 3)?.chars().next()
}

/// Field `n` (from 1, as in proc(5); `n` >= 3) of a `/proc/<pid>/stat` line. The fields from 3
/// on follow the command name, which is in parentheses and may itself hold `) `, so the last
/// `)` ends it.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(n.checked_sub(3)?)
}

/// The record of device `id`: the state directory's, else the copy the kernel keeps.
pub fn record_of(state: &Path, id: u32) -> Option<daemon::Record> {
    daemon::read_record(state, id).or_else(|| {
        let (_, data) = lazyblk_ublk::device_state(id).ok()?;
        serde_json::from_value(data?.get(lazyblk_ublk::TARGET_NAME)?.clone()).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::{pid_alive, stat_state};

    #[test]
    fn the_state_is_read_after_the_last_parenthesis() {
        assert_eq!(stat_state("913 (lazyblk) S 886 913"), Some('S'));
        assert_eq!(stat_state("913 (a) Z (b)) X 1 2"), Some('X'));
        assert_eq!(stat_state("913 (lazyblk) Z 1"), Some('Z'));
        assert_eq!(stat_state("garbage"), None);
        let fields: Vec<String> = (4..=21).map(|i| format!("f{i}")).collect();
        let line = format!("913 (a) b) S {}", fields.join(" "));
        assert_eq!(super::stat_field(&line, 20), Some("f20"));
        assert_eq!(super::stat_field(&line, 3), Some("S"));
        assert_eq!(super::stat_field(&line, 22), None);
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
