//! What the commands know about a ublk device: whether it is a lazyblk device, its record
//! (from the state directory, else from the kernel's copy), and whether its daemon is alive.

use crate::daemon;
use std::path::Path;

/// Whether device `id` is served by lazyblk (the kernel holds our target data for it).
pub fn is_ours(id: u32) -> bool {
    matches!(lazyblk_ublk::device_state(id), Ok((_, Some(v))) if v.get(lazyblk_ublk::TARGET_NAME).is_some())
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// The record of device `id`: the state directory's, else the copy the kernel keeps.
pub fn record_of(state: &Path, id: u32) -> Option<daemon::Record> {
    daemon::read_record(state, id).or_else(|| {
        let (_, data) = lazyblk_ublk::device_state(id).ok()?;
        serde_json::from_value(data?.get(lazyblk_ublk::TARGET_NAME)?.clone()).ok()
    })
}
