//! Optional timing of our ops by kind (`byol bench step --profile`): when enabled, each op
//! synchronises its device before and after it runs and adds the wall time to its kind.
//! Synchronising serialises the step, so a profiled step is slower than a plain one; the
//! split between kinds is what it is for. Off by default (then it costs one atomic load).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Result};
use serde::Serialize;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Seconds and calls per op kind, in order of first use.
static TOTALS: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

/// Time spent in one kind of op.
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    /// The op kind, e.g. `conv2d backward-data`.
    pub op: String,
    /// Wall seconds, the device synchronised before and after each call.
    pub seconds: f64,
    /// Calls.
    pub calls: u64,
}

/// Turns the timing on or off, process-wide.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The times gathered since the last call, and a fresh start.
pub fn take() -> Vec<OpTime> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *totals)
        .into_iter()
        .map(|(op, seconds, calls)| OpTime {
            op: op.to_owned(),
            seconds,
            calls,
        })
        .collect()
}

/// Runs `f`, timed under `op` when profiling is on.
pub(crate) fn timed<R>(
    op: &'static str,
    device: &Device,
    f: impl FnOnce() -> Result<R>,
) -> Result<R> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match totals.iter_mut().find(|(name, ..)| *name == op) {
        Some(entry) => {
            entry.1 += secs;
            entry.2 += 1;
        }
        None => totals.push((op, secs, 1)),
    }
    Ok(out)
}
