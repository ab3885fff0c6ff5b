//! Self-supervised objectives, one file per method. The trainer owns the shared network
//! (encoder + projector), the optimizer and the step; an objective owns everything else
//! of its method:
//! - its config table (`[byol]`, …) and its heads: trained ones (a predictor) built in
//!   the online variables, so the optimizer updates them, and untrained state (an EMA
//!   target, a queue, a memory bank) of its own;
//! - its loss on the two views ([`Objective::loss`]);
//! - what it does after the optimizer step ([`Objective::after_step`]: an EMA update, an
//!   enqueue);
//! - its checkpoint state ([`Objective::state`], [`Objective::load_state`]) and its own
//!   figures ([`ObjectiveStats`]).
//!
//! The set is closed (an enum, like [`crate::optim::Optimizer`]): adding a method is a
//! file here, a variant, and a [`crate::config::Method`].

pub mod byol;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

pub use byol::Byol;

use crate::TrainError;
use crate::config::{Method, TrainerConfig};
use crate::model::{Compute, Network};

/// What an objective computed on one batch of two views.
pub struct Outcome {
    /// The scalar loss to differentiate.
    pub loss: Tensor,
    /// Online projections `(n, projection_dim)` of the first view, detached: the
    /// embeddings the collapse indicator and effective rank are computed on.
    pub embeddings: Tensor,
}

/// A method's own figures of a step (each field only where the method has it).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ObjectiveStats {
    /// EMA coefficient of the target update (BYOL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
}

/// One of the supported objectives.
pub enum Objective {
    /// BYOL (Grill et al. 2020).
    Byol(Byol),
}

impl Objective {
    /// The objective `cfg.train.method` names, its trained heads built under `online`
    /// (before the online variables are initialised).
    pub fn new(cfg: &TrainerConfig, compute: Compute, online: VarBuilder) -> Result<Self> {
        Ok(match cfg.train.method {
            Method::Byol => Objective::Byol(Byol::new(cfg, compute, online)?),
        })
    }

    /// The method.
    pub fn method(&self) -> Method {
        match self {
            Objective::Byol(_) => Method::Byol,
        }
    }

    /// Starts the state that derives from the initialised online variables (BYOL's
    /// target is a copy of the online network).
    pub fn start(&mut self, online: &VarMap) -> Result<()> {
        match self {
            Objective::Byol(o) => o.start(online),
        }
    }

    /// The loss on two batches of views `(n, 3, h, w)`, the shared `network` in training
    /// mode.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        match self {
            Objective::Byol(o) => o.loss(network, v1, v2),
        }
    }

    /// The method's work after the optimizer step `step` (0-based) of `total_steps`
    /// (BYOL: the EMA update of the target), and its figures.
    pub fn after_step(
        &mut self,
        online: &VarMap,
        cfg: &TrainerConfig,
        step: u64,
    ) -> Result<ObjectiveStats> {
        match self {
            Objective::Byol(o) => o.after_step(online, cfg, step),
        }
    }

    /// The method's state for checkpoints (BYOL: the target network as `target.*`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        match self {
            Objective::Byol(o) => o.state(),
        }
    }

    /// Restores [`Objective::state`] from the tensors of the checkpoint file `file`.
    ///
    /// Errors: a tensor missing or misshapen, or extra ones ([`TrainError::Checkpoint`]).
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        file: &Path,
    ) -> std::result::Result<(), TrainError> {
        match self {
            Objective::Byol(o) => o.load_state(tensors, file),
        }
    }
}
