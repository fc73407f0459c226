//! `lazyblk export`: the whole verified raw image of a running device, written by its daemon.

use crate::daemon;
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Duration;

/// Run `lazyblk export`: the daemon of device `id` writes its image to `output`.
pub fn run(state: &Path, id: u32, output: &Path) -> Result<()> {
    lazyblk_ublk::device_state(id)?;
    let out = std::path::absolute(output)?;
    let r = daemon::control(
        state,
        id,
        &format!("export {}", out.display()),
        Duration::from_secs(24 * 3600),
    )?;
    if r != "ok" {
        bail!("export of device {id}: {}", r.trim_start_matches("error: "));
    }
    println!("wrote {}", out.display());
    Ok(())
}
