//! The optional `[monitor]` of `byol train`: kNN accuracy of the online encoder on a
//! small labelled dataset every N steps, logged with the other metrics.

use std::collections::BTreeSet;
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

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    /// kNN top-1 accuracy on the test set.
    pub accuracy: f64,
    /// Records of either dataset skipped because they are corrupt.
    pub skipped: usize,
}

impl Monitor {
    /// Opens both datasets and checks, before any step is trained, everything a
    /// measurement needs: both have labelled images, and every class of the test set
    /// occurs in the train set. Images are preprocessed to `size` (the views' size).
    pub fn open(cfg: &MonitorConfig, size: u32) -> anyhow::Result<Self> {
        if cfg.every_steps == 0 || cfg.k == 0 {
            anyhow::bail!("invalid [monitor]: every_steps and k must be at least 1");
        }
        let open = |path: &PathBuf| {
            Dataset::open(path)
                .with_context(|| format!("[monitor]: cannot open dataset {}", path.display()))
        };
        let (train, test) = (open(&cfg.train)?, open(&cfg.test)?);
        let train_classes = labelled_classes(&train)?;
        let test_classes = labelled_classes(&test)?;
        let missing: Vec<&str> = test_classes
            .iter()
            .filter(|c| !train_classes.contains(*c))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "[monitor]: the test set {} has class(es) {missing:?} that the train set {} \
                 lacks: kNN cannot predict them",
                cfg.test.display(),
                cfg.train.display()
            );
        }
        Ok(Monitor {
            train,
            test,
            cfg: cfg.clone(),
            pre: Preprocess::new(size),
        })
    }

    /// True when the monitor measures after `step`.
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.cfg.every_steps)
    }

    /// kNN top-1 of the trainer's current online encoder (BatchNorm in eval mode).
    /// Corrupt records are skipped and counted.
    pub fn measure(&self, trainer: &Trainer) -> anyhow::Result<Measurement> {
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
        Ok(Measurement {
            accuracy: knn_accuracy(&bank, &scored, knn)?,
            skipped: bank.skipped + scored.skipped,
        })
    }
}

/// Names of the classes that have at least one live sample in `ds`; an error naming
/// `[monitor]` and the dataset when it has none.
fn labelled_classes(ds: &Dataset) -> anyhow::Result<BTreeSet<String>> {
    let classes = &ds.manifest().classes;
    let names: BTreeSet<String> = ds
        .samples()
        .filter_map(|s| s.label)
        .filter_map(|l| classes.get(l as usize).cloned())
        .collect();
    if names.is_empty() {
        anyhow::bail!(
            "[monitor]: {} has no labelled images (kNN needs class labels: ImageFolder \
             layout or IDX with a labels file)",
            ds.dir().display()
        );
    }
    Ok(names)
}
