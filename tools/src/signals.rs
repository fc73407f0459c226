//! Shutdown on SIGTERM / SIGINT, shared by the daemons.

/// Run `on_signal(signal)` on a helper thread the first time SIGTERM or SIGINT arrives.
pub fn on_termination(on_signal: impl FnOnce(i32) + Send + 'static) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            on_signal(sig);
        }
    });
    Ok(())
}
