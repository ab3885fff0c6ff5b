//! The systemd notify protocol (sd-notify): READY=1 once resumed, WATCHDOG=1 from the
//! training loop, STATUS= with the step, loss and speed, STOPPING=1 on a stop. Every
//! call is a no-op outside systemd (no `NOTIFY_SOCKET`).
//!
//! The watchdog proves that the training loop's thread is alive: WATCHDOG=1 is sent only
//! from its events (a step, or a heartbeat every [`Notifier::ping_every`] while it waits
//! for data or is paused), never from a timer of its own. A loop stuck in a step, a
//! checkpoint or a lock stops the pings, and systemd restarts the service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Set once STOPPING=1 is sent: later progress no longer replaces the stop's status.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Talks to the service manager.
pub struct Notifier {
    ready: bool,
    /// A quarter of the watchdog interval, when systemd set one (`WATCHDOG_USEC`).
    ping_every: Option<Duration>,
    last_ping: Option<Instant>,
}

impl Notifier {
    /// A notifier for this process (the watchdog interval read from the environment).
    pub fn from_env() -> Self {
        Notifier {
            ready: false,
            ping_every: sd_notify::watchdog_enabled().map(|d| d / 4),
            last_ping: None,
        }
    }

    /// READY=1 with a status, once.
    pub fn ready(&mut self, status: &str) {
        if !self.ready {
            self.ready = true;
            send(&[NotifyState::Ready, NotifyState::Status(status)]);
        }
    }

    /// STATUS=`status` (not after STOPPING=1).
    pub fn status(&self, status: &str) {
        if !STOPPING.load(Ordering::SeqCst) {
            send(&[NotifyState::Status(status)]);
        }
    }

    /// How often WATCHDOG=1 is sent: a quarter of the watchdog interval, so a ping
    /// arrives within half of it (systemd's advice) even when the loop's tick lags.
    /// `None` without a watchdog.
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    /// WATCHDOG=1 once ready, at most every [`Notifier::ping_every`].
    pub fn alive(&mut self) {
        let Some(every) = self.ping_every.filter(|_| self.ready) else {
            return;
        };
        if self.last_ping.is_none_or(|t| t.elapsed() >= every) {
            self.last_ping = Some(Instant::now());
            send(&[NotifyState::Watchdog]);
        }
    }
}

/// STOPPING=1 with a status.
pub fn stopping(status: &str) {
    STOPPING.store(true, Ordering::SeqCst);
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
