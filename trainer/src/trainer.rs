//! The BYOL training step.

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::TrainError;
use crate::config::TrainerConfig;
use crate::device::{open_device, parse_device};
use crate::loss::{byol_loss, collapse_indicator};
use crate::model::{ByolModel, Compute};
use crate::optim::Optimizer;
use crate::schedule;

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    /// Steps done after this one.
    pub step: u64,
    /// The symmetric BYOL loss (in [0, 8]).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// EMA coefficient used.
    pub tau: f64,
    /// Std of l2-normalised online projections × √d (≈1 healthy, → 0 collapsed).
    pub collapse: f32,
}

/// Online and target networks, optimizer, and the step counter.
///
/// The step is shaped for data parallelism: forward and backward on the local batch,
/// then (where a gradient all-reduce would go) the optimizer and the EMA update.
pub struct Trainer {
    cfg: TrainerConfig,
    device: Device,
    model: ByolModel,
    optimizer: Optimizer,
    step: u64,
    batch_size: usize,
}

impl Trainer {
    /// A fresh trainer (weights from `cfg.train.seed`) for batches of `batch_size`.
    pub fn new(cfg: TrainerConfig, batch_size: usize) -> Result<Self, TrainError> {
        cfg.validate()?;
        if batch_size < 2 {
            return Err(TrainError::Config {
                key: "loader.batch_size",
                reason: "BatchNorm needs at least 2 images per batch".into(),
            });
        }
        let device = open_device(parse_device(&cfg.train.device)?)?;
        crate::kernels::set_tf32(cfg.train.tf32);
        let model = ByolModel::with_compute(
            &cfg.model,
            Compute::new(cfg.train.kernels, cfg.train.precision),
            cfg.train.seed,
            &device,
        )?;
        let optimizer = Optimizer::new(&cfg.optim, model.trainable())?;
        Ok(Trainer {
            cfg,
            device,
            model,
            optimizer,
            step: 0,
            batch_size,
        })
    }

    /// Sets the length of the cosine schedules (`train.total_steps`), e.g. once a
    /// wall-clock budget has been turned into steps.
    pub fn set_total_steps(&mut self, steps: u64) {
        self.cfg.train.total_steps = steps.max(1);
    }

    /// The config the trainer was built with.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The networks.
    pub fn model(&self) -> &ByolModel {
        &self.model
    }

    pub(crate) fn parts_mut(&mut self) -> (&ByolModel, &mut Optimizer, &mut u64) {
        (&self.model, &mut self.optimizer, &mut self.step)
    }

    pub(crate) fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Batch size the schedules are scaled for.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// One step on two views given as f32 NCHW slices of `size` x `size` images.
    pub fn step(
        &mut self,
        view1: &[f32],
        view2: &[f32],
        size: usize,
    ) -> Result<StepStats, TrainError> {
        let n = view1.len() / (3 * size * size);
        let shape = (n, 3, size, size);
        let v1 = Tensor::from_slice(view1, shape, &self.device)?;
        let v2 = Tensor::from_slice(view2, shape, &self.device)?;
        self.step_tensors(&v1, &v2)
    }

    /// One step on two batches of views `(n, 3, h, w)`.
    pub fn step_tensors(&mut self, v1: &Tensor, v2: &Tensor) -> Result<StepStats, TrainError> {
        let total = self.cfg.train.total_steps;
        let lr = schedule::learning_rate(&self.cfg.optim, self.batch_size, total, self.step);
        let tau = schedule::tau(&self.cfg.optim, total, self.step);
        // Each view goes through each network on its own (its own BatchNorm statistics).
        let (z1, p1) = self.model.online.forward_t(v1, true)?;
        let (_, p2) = self.model.online.forward_t(v2, true)?;
        // Detached at once, so the target's activations are freed layer by layer
        // instead of living (as part of its graph) until the end of the step.
        let t1 = self.model.target.forward_t(v1, true)?.0.detach();
        let t2 = self.model.target.forward_t(v2, true)?.0.detach();
        let (p1, p2) = (
            p1.expect("online has a predictor"),
            p2.expect("online has a predictor"),
        );
        let loss = byol_loss(&p1, &p2, &t1, &t2)?;
        let grads = loss.backward()?;
        // Data-parallel training all-reduces `grads` (and syncs BatchNorm statistics) here.
        self.optimizer.step(&grads, lr)?;
        self.model.update_target(tau)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss: loss.to_scalar::<f32>()?,
            lr,
            tau,
            collapse: collapse_indicator(&z1)?,
        })
    }
}
