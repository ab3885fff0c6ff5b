//! BYOL (Grill et al. 2020): a predictor on the online projections, an EMA target
//! network (encoder + projector), and the symmetric regression loss
//! `L(p1, sg ξ2) + L(p2, sg ξ1)` with `L(p, z) = 2 − 2·cos(p, z)` (so in [0, 8]).

use candle_core::{Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::config::TrainerConfig;
use crate::loss::byol_loss;
use crate::model::{Compute, Mlp, Network};
use crate::objective::ema::EmaNetwork;
use crate::objective::{ObjectiveStats, Outcome, predictor};
use crate::state::{StateDict, StateError};

/// Prefix of the target's tensors in the checkpoint's objective state.
pub const TARGET_PREFIX: &str = "target.";

/// BYOL's heads: the predictor (trained, in the online variables as `predictor.*`) and
/// the EMA target (its own variables, `encoder.*` and `projector.*`).
pub struct Byol {
    predictor: Mlp,
    target: EmaNetwork,
}

impl Byol {
    /// Builds the predictor under `online.pp("predictor")` and a target network on the
    /// same device (its weights set by [`Byol::start`]).
    pub fn new(cfg: &TrainerConfig, compute: Compute, online: VarBuilder) -> Result<Self> {
        Ok(Byol {
            predictor: predictor(cfg, cfg.model.predictor_hidden, compute, &online)?,
            target: EmaNetwork::new(&cfg.model, compute, online.device())?,
        })
    }

    /// The target starts as a copy of the online network.
    pub fn start(&mut self, online: &VarMap) -> Result<()> {
        self.target.start(online)
    }

    /// The predictor.
    pub fn predictor(&self) -> &Mlp {
        &self.predictor
    }

    /// The target network.
    pub fn target(&self) -> &Network {
        self.target.network()
    }

    /// The target's variables sorted by name (`encoder.*`, `projector.*`).
    pub fn target_named(&self) -> Vec<(String, Var)> {
        self.target.named()
    }

    /// Each view through the online network and predictor, then through the target (each
    /// on its own, with its own BatchNorm statistics); the symmetric loss.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        let z1 = network.forward_t(v1, true)?;
        let p1 = self.predictor.forward_t(&z1, true)?;
        let z2 = network.forward_t(v2, true)?;
        let p2 = self.predictor.forward_t(&z2, true)?;
        // The target's forward records no graph (its layers hold detached weights:
        // `EmaNetwork`), so its activations are freed layer by layer; `detach` only
        // states that no gradient flows into it.
        let t1 = self.target().forward_t(v1, true)?.detach();
        let t2 = self.target().forward_t(v2, true)?.detach();
        Ok(Outcome {
            loss: byol_loss(&p1, &p2, &t1, &t2)?,
            embeddings: z1.detach(),
            keys: None,
        })
    }

    /// The EMA update after optimizer step `step`: `ξ ← τ·ξ + (1 − τ)·θ` for every
    /// trainable target variable (running statistics excluded), τ from `[byol] tau_base`
    /// on the learning rate's schedule ([`crate::schedule::tau_at`]).
    pub fn after_step(
        &mut self,
        online: &VarMap,
        cfg: &TrainerConfig,
        step: u64,
    ) -> Result<ObjectiveStats> {
        let tau = self.target.after_step(online, cfg, step)?;
        Ok(ObjectiveStats { tau: Some(tau) })
    }

    /// `ξ ← τ·ξ + (1 − τ)·θ` for every trainable target variable.
    pub fn update_target(&self, online: &VarMap, tau: f64) -> Result<()> {
        self.target.update(online, tau)
    }

    /// The target's tensors as `target.<name>`.
    pub fn state(&self) -> StateDict {
        self.target.state(TARGET_PREFIX)
    }

    /// Checks `target.<name>` tensors without changing anything.
    pub fn check_state(&self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.target.check_state(TARGET_PREFIX, state)
    }

    /// Restores the target from `target.<name>` tensors (checked in full first).
    pub fn load_state(&mut self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.target.load_state(TARGET_PREFIX, state)
    }
}
