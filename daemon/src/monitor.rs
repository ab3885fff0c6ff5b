//! The optional `[monitor]` of `byol train`: kNN accuracy of the online encoder on a
//! small labelled dataset every N steps, logged with the other metrics.

use std::path::PathBuf;

use anyhow::Context;
use byol_ingest::{Dataset, NoProgress};
use byol_trainer::Trainer;
use byol_trainer::eval::{Encoder, Features, KnnConfig, Preprocess, extract, knn_accuracy};
use serde::Deserialize;

/// The `[monitor]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Labelled dataset whose features are the kNN memory bank.
    pub train: PathBuf,
    /// Labelled dataset that is classified and scored.
    pub test: PathBuf,
    /// Measure every this many steps.
    #[serde(default = "default_every")]
    pub every_steps: u64,
    /// Neighbours.
    #[serde(default = "default_k")]
    pub k: usize,
}

fn default_every() -> u64 {
    200
}

fn default_k() -> usize {
    200
}

/// The opened datasets and settings.
pub struct Monitor {
    cfg: MonitorConfig,
    train: Dataset,
    test: Dataset,
    pre: Preprocess,
}

impl Monitor {
    /// Opens both datasets; images are preprocessed to `size` (the views' size).
    pub fn open(cfg: &MonitorConfig, size: u32) -> anyhow::Result<Self> {
        if cfg.every_steps == 0 || cfg.k == 0 {
            anyhow::bail!("invalid [monitor]: every_steps and k must be at least 1");
        }
        let open = |path: &PathBuf| {
            Dataset::open(path)
                .with_context(|| format!("[monitor]: cannot open dataset {}", path.display()))
        };
        Ok(Monitor {
            train: open(&cfg.train)?,
            test: open(&cfg.test)?,
            cfg: cfg.clone(),
            pre: Preprocess::new(size),
        })
    }

    /// True when the monitor measures after `step`.
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.cfg.every_steps)
    }

    /// kNN top-1 of the trainer's current online encoder (BatchNorm in eval mode).
    pub fn measure(&self, trainer: &Trainer) -> anyhow::Result<f64> {
        let cfg = trainer.config();
        let encoder = Encoder::from_model(
            trainer.model(),
            &cfg.model,
            trainer.steps_done(),
            cfg.train.kernels,
            trainer.device(),
        )?;
        let features = |ds: &Dataset| -> anyhow::Result<Features> {
            let f = extract(&encoder, ds, &self.pre, 256, &NoProgress)
                .with_context(|| format!("[monitor]: features of {}", ds.dir().display()))?;
            if f.is_empty() {
                anyhow::bail!("[monitor]: {} has no labelled images", ds.dir().display());
            }
            Ok(f)
        };
        let bank = features(&self.train)?;
        let mut scored = features(&self.test)?;
        scored.align_to(&bank.classes)?;
        let knn = KnnConfig {
            k: self.cfg.k,
            ..KnnConfig::default()
        };
        Ok(knn_accuracy(&bank, &scored, knn)?)
    }
}
