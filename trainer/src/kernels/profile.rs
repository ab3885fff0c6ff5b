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
/// Per phase of the step: seconds in all, and seconds inside our timed ops.
static PHASES: Mutex<Vec<(&'static str, f64, f64)>> = Mutex::new(Vec::new());
/// The phase running now (an index into `PHASES`), if any.
static CURRENT: Mutex<Option<usize>> = Mutex::new(None);

/// Time spent in one phase of the step (forward and loss, backward, the optimizer, the
/// objective's after-step), and how much of it was inside our timed ops.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    /// The phase, e.g. `backward`.
    pub phase: String,
    /// Wall seconds of the phase, the device synchronised before and after.
    pub seconds: f64,
    /// Of those, the seconds inside our ops (each also counted in its [`OpTime`]).
    pub in_ops_seconds: f64,
}

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

/// The phases' times gathered since the last call, and a fresh start.
pub fn take_phases() -> Vec<PhaseTime> {
    let mut phases = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *phases)
        .into_iter()
        .map(|(phase, seconds, in_ops_seconds)| PhaseTime {
            phase: phase.to_owned(),
            seconds,
            in_ops_seconds,
        })
        .collect()
}

/// Runs `f`, one phase of the step, timed under `phase` when profiling is on; the ops
/// timed inside it are counted as its `in_ops_seconds`. Phases do not nest.
pub(crate) fn phase<R>(
    phase: &'static str,
    device: &Device,
    f: impl FnOnce() -> std::result::Result<R, crate::TrainError>,
) -> std::result::Result<R, crate::TrainError> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let index = {
        let mut phases = PHASES.lock().unwrap_or_else(|e| e.into_inner());
        match phases.iter().position(|(name, ..)| *name == phase) {
            Some(i) => i,
            None => {
                phases.push((phase, 0.0, 0.0));
                phases.len() - 1
            }
        }
    };
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(index);
    let start = Instant::now();
    let out = f();
    let synced = device.synchronize();
    let secs = start.elapsed().as_secs_f64();
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    PHASES.lock().unwrap_or_else(|e| e.into_inner())[index].1 += secs;
    let out = out?;
    synced?;
    Ok(out)
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
    if let Some(i) = *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) {
        PHASES.lock().unwrap_or_else(|e| e.into_inner())[i].2 += secs;
    }
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
