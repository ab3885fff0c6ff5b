//! The optional `[monitor]`: kNN accuracy of the online encoder on a small labelled
//! dataset every N steps, logged with the other metrics.

use std::collections::BTreeSet;
use std::path::PathBuf;

use byol_ingest::{Dataset, NoProgress};
use byol_trainer::Trainer;
use byol_trainer::eval::{Encoder, Features, KnnConfig, Preprocess, extract, knn_accuracy};
use byol_trainer::input::InputSpec;
use serde::Deserialize;

use crate::RunError;

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
    /// occurs in the train set. Images are preprocessed as the views are (`input`: their
    /// size, normalisation and filter), after the evaluation's centre crop.
    pub fn open(cfg: &MonitorConfig, input: &InputSpec) -> Result<Self, RunError> {
        if cfg.every_steps == 0 || cfg.k == 0 {
            return Err(RunError::Monitor(
                "every_steps and k must be at least 1".into(),
            ));
        }
        let open = |path: &PathBuf| {
            Dataset::open(path).map_err(|e| {
                RunError::Monitor(format!("cannot open dataset {}: {e}", path.display()))
            })
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
            return Err(RunError::Monitor(format!(
                "the test set {} has class(es) {missing:?} that the train set {} \
                 lacks: kNN cannot predict them",
                cfg.test.display(),
                cfg.train.display()
            )));
        }
        Ok(Monitor {
            train,
            test,
            cfg: cfg.clone(),
            pre: Preprocess::for_input(input),
        })
    }

    /// True when the monitor measures after `step`.
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.cfg.every_steps)
    }

    /// kNN top-1 of the trainer's current online encoder (BatchNorm in eval mode).
    /// Corrupt records are skipped and counted.
    pub fn measure(&self, trainer: &Trainer) -> Result<Measurement, RunError> {
        let encoder = Encoder::from_trainer(trainer)?;
        let features = |ds: &Dataset| -> Result<Features, RunError> {
            let f = extract(&encoder, ds, &self.pre, 256, &NoProgress)?;
            if f.is_empty() {
                return Err(RunError::Monitor(format!(
                    "{} has no labelled images",
                    ds.dir().display()
                )));
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
fn labelled_classes(ds: &Dataset) -> Result<BTreeSet<String>, RunError> {
    let classes = &ds.manifest().classes;
    let names: BTreeSet<String> = ds
        .samples()
        .filter_map(|s| s.label)
        .filter_map(|l| classes.get(l as usize).cloned())
        .collect();
    if names.is_empty() {
        return Err(RunError::Monitor(format!(
            "{} has no labelled images (kNN needs class labels: ImageFolder \
             layout or IDX with a labels file)",
            ds.dir().display()
        )));
    }
    Ok(names)
}
