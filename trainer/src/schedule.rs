//! Learning-rate and EMA schedules.

use crate::config::{Method, OptimConfig, Schedule, TrainerConfig};

/// Learning rate at `step` (0-based): `base_lr * batch / 256`, linear warm-up from 0 over
/// `warmup_steps`, then cosine decay to 0 at `total_steps` (or constant).
pub fn learning_rate(cfg: &OptimConfig, batch_size: usize, total_steps: u64, step: u64) -> f64 {
    let peak = cfg.base_lr * batch_size as f64 / 256.0;
    if step < cfg.warmup_steps {
        return peak * step as f64 / cfg.warmup_steps as f64;
    }
    match cfg.schedule {
        Schedule::Constant => peak,
        Schedule::Cosine => {
            let span = total_steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
            let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// EMA coefficient at `step` for `tau_base`: `1 − (1 − τ_base)·(cos(π·k/K) + 1)/2` for
/// the cosine schedule (Grill et al. 2020, section 3.2), `τ_base` for the constant one.
pub fn tau(cfg: &OptimConfig, tau_base: f64, total_steps: u64, step: u64) -> f64 {
    match cfg.schedule {
        Schedule::Constant => tau_base,
        Schedule::Cosine => {
            let progress = (step as f64 / total_steps.max(1) as f64).min(1.0);
            1.0 - (1.0 - tau_base) * ((std::f64::consts::PI * progress).cos() + 1.0) / 2.0
        }
    }
}

/// τ of the objective's EMA target after step `step` (0-based) of a run of
/// `total_steps` under `cfg`: BYOL's `tau_base` on the learning rate's schedule
/// ([`tau`]), MSF's `tau` (constant unless `tau_cosine`), MoCo v2's constant `tau`;
/// `None` for an objective without a target.
pub fn tau_at(cfg: &TrainerConfig, total_steps: u64, step: u64) -> Option<f64> {
    let cosine = |base| tau(&cfg.optim, base, total_steps, step);
    match cfg.train.method {
        Method::Byol => Some(cosine(cfg.byol.tau_base)),
        Method::Msf if cfg.msf.tau_cosine => Some(cosine(cfg.msf.tau)),
        Method::Msf => Some(cfg.msf.tau),
        Method::Mocov2 => Some(cfg.mocov2.tau),
        Method::Simsiam | Method::Simclr | Method::BarlowTwins => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> OptimConfig {
        OptimConfig {
            base_lr: 0.4,
            warmup_steps: 10,
            schedule,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn lr_at_key_steps() {
        let c = cfg(Schedule::Cosine);
        let lr = |s| learning_rate(&c, 512, 110, s);
        assert_eq!(lr(0), 0.0);
        assert!(
            (lr(5) - 0.4).abs() < 1e-12,
            "half of the peak 0.8 half-way through warm-up"
        );
        assert!((lr(10) - 0.8).abs() < 1e-12, "peak = base * 512 / 256");
        assert!((lr(60) - 0.4).abs() < 1e-12, "cosine half-way");
        assert!(lr(110).abs() < 1e-12);
        assert!(lr(500).abs() < 1e-12, "stays at 0 past the end");
        let c = cfg(Schedule::Constant);
        assert!((learning_rate(&c, 256, 110, 1_000_000) - 0.4).abs() < 1e-12);
    }

    #[test]
    fn tau_at_key_steps() {
        let c = cfg(Schedule::Cosine);
        assert!((tau(&c, 0.99, 100, 0) - 0.99).abs() < 1e-12);
        assert!((tau(&c, 0.99, 100, 50) - 0.995).abs() < 1e-12);
        assert!((tau(&c, 0.99, 100, 100) - 1.0).abs() < 1e-12);
        assert_eq!(tau(&cfg(Schedule::Constant), 0.99, 100, 77), 0.99);
    }
}
