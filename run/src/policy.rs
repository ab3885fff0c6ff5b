//! When to checkpoint and how many checkpoints to keep (the IO is
//! `byol_trainer::checkpoint`'s).

use std::time::Duration;

use byol_trainer::TrainConfig;

/// Checkpoint cadence and retention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointPolicy {
    /// Checkpoint after this many steps since the last one (0: never by steps).
    pub every_steps: u64,
    /// Checkpoint when this many minutes passed since the last one (0: never by time).
    pub every_minutes: f64,
    /// Checkpoints kept (the newest); at least 1.
    pub keep_last: usize,
}

impl CheckpointPolicy {
    /// The policy of a `[train]` table (`checkpoint_every_steps`,
    /// `checkpoint_every_minutes`, `keep_last`).
    pub fn from_train(t: &TrainConfig) -> Self {
        CheckpointPolicy {
            every_steps: t.checkpoint_every_steps,
            every_minutes: t.checkpoint_every_minutes,
            keep_last: t.keep_last.max(1),
        }
    }

    /// True when a checkpoint is due `steps` steps and `elapsed` time after the last.
    pub fn due(&self, steps: u64, elapsed: Duration) -> bool {
        let by_steps = self.every_steps > 0 && steps >= self.every_steps;
        let by_time =
            self.every_minutes > 0.0 && elapsed.as_secs_f64() >= self.every_minutes * 60.0;
        steps > 0 && (by_steps || by_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_by_steps_or_by_time_and_never_without_a_new_step() {
        let p = CheckpointPolicy {
            every_steps: 5,
            every_minutes: 1.0,
            keep_last: 2,
        };
        assert!(!p.due(4, Duration::from_secs(59)));
        assert!(p.due(5, Duration::ZERO));
        assert!(p.due(1, Duration::from_secs(60)));
        assert!(!p.due(0, Duration::from_secs(600)));
        let never = CheckpointPolicy {
            every_steps: 0,
            every_minutes: 0.0,
            keep_last: 1,
        };
        assert!(!never.due(1_000_000, Duration::from_secs(1_000_000)));
    }
}
