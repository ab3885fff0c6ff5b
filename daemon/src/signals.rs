//! The signals of `byol train` and `byol daemon`, handled the same way on one thread:
//! the first SIGTERM or SIGINT asks the loop to stop after its step
//! ([`Controls::request_stop`]; the loop then checkpoints the last completed step through
//! `Run::finish`), a second one ends the process at once with status 128 + the signal.
//! The daemon adds SIGUSR1 (checkpoint now) and SIGHUP (reload the config).

use std::sync::Arc;

use anyhow::Context;
use byol_run::continuous::Controls;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

/// What a command does beside the shared stop.
#[derive(Default)]
pub struct Handlers {
    /// Called on the first SIGTERM/SIGINT, before the stop is requested (the daemon
    /// logs it, tells systemd and bounds the stop's time).
    pub on_stop: Option<Box<dyn Fn(i32) + Send>>,
    /// SIGUSR1 is handled: it requests a checkpoint after the current step.
    pub checkpoint_on_usr1: bool,
    /// SIGHUP is handled by this.
    pub on_reload: Option<Box<dyn FnMut() + Send>>,
}

/// Installs the handlers and starts the signal thread; dropping nothing stops it, the
/// returned handle closes it.
pub fn spawn(
    controls: Arc<Controls>,
    mut handlers: Handlers,
) -> anyhow::Result<signal_hook::iterator::Handle> {
    let mut wanted = vec![SIGTERM, SIGINT];
    if handlers.checkpoint_on_usr1 {
        wanted.push(SIGUSR1);
    }
    if handlers.on_reload.is_some() {
        wanted.push(SIGHUP);
    }
    let mut signals = signal_hook::iterator::Signals::new(&wanted)
        .context("cannot install the signal handlers")?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("byol-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match sig {
                    SIGTERM | SIGINT => {
                        if controls.stop_requested().is_some() {
                            eprintln!("second signal {sig}: exiting now");
                            std::process::exit(128 + sig);
                        }
                        if let Some(on_stop) = &handlers.on_stop {
                            on_stop(sig);
                        }
                        controls.request_stop(sig);
                    }
                    SIGUSR1 => {
                        tracing::info!(
                            event = "checkpoint_requested",
                            signal = sig,
                            "signal {sig}: checkpoint requested"
                        );
                        controls.request_checkpoint();
                    }
                    SIGHUP => {
                        if let Some(reload) = &mut handlers.on_reload {
                            reload();
                        }
                    }
                    _ => {}
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(handle)
}
