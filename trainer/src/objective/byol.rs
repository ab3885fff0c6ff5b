//! BYOL (Grill et al. 2020): a predictor on the online projections, an EMA target
//! network (encoder + projector), and the symmetric regression loss
//! `L(p1, sg ξ2) + L(p2, sg ξ1)` with `L(p, z) = 2 − 2·cos(p, z)` (so in [0, 8]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::TrainError;
use crate::config::TrainerConfig;
use crate::loss::byol_loss;
use crate::model::{Compute, Mlp, Network, is_running_stat, sorted};
use crate::objective::{ObjectiveStats, Outcome};
use crate::schedule;

/// Prefix of the target's tensors in the checkpoint's objective state.
pub const TARGET_PREFIX: &str = "target.";

/// BYOL's heads: the predictor (trained, in the online variables as `predictor.*`) and
/// the EMA target (its own variables, `encoder.*` and `projector.*`).
pub struct Byol {
    predictor: Mlp,
    target_vars: VarMap,
    target: Network,
}

impl Byol {
    /// Builds the predictor under `online.pp("predictor")` and a target network on the
    /// same device (its weights set by [`Byol::start`]).
    pub fn new(cfg: &TrainerConfig, compute: Compute, online: VarBuilder) -> Result<Self> {
        let m = &cfg.model;
        let predictor = Mlp::new(
            m.projection_dim,
            m.predictor_hidden,
            m.projection_dim,
            m,
            compute,
            online.pp("predictor"),
        )?;
        let target_vars = VarMap::new();
        let target = Network::new(
            m,
            compute,
            VarBuilder::from_varmap(&target_vars, DType::F32, online.device()),
        )?;
        Ok(Byol {
            predictor,
            target_vars,
            target,
        })
    }

    /// The target starts as a copy of the online network.
    pub fn start(&mut self, online: &VarMap) -> Result<()> {
        let online = online.data().lock().unwrap();
        for (name, t) in self.target_named() {
            let o = online
                .get(&name)
                .expect("the target's names are a subset of the online network's");
            t.set(o.as_tensor())?;
        }
        Ok(())
    }

    /// The predictor.
    pub fn predictor(&self) -> &Mlp {
        &self.predictor
    }

    /// The target network.
    pub fn target(&self) -> &Network {
        &self.target
    }

    /// The target's variables sorted by name (`encoder.*`, `projector.*`).
    pub fn target_named(&self) -> Vec<(String, Var)> {
        sorted(&self.target_vars)
    }

    /// Each view through the online network and predictor, then through the target (each
    /// on its own, with its own BatchNorm statistics); the symmetric loss.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        let z1 = network.forward_t(v1, true)?;
        let p1 = self.predictor.forward_t(&z1, true)?;
        let z2 = network.forward_t(v2, true)?;
        let p2 = self.predictor.forward_t(&z2, true)?;
        // Detached at once, so the target's activations are freed layer by layer
        // instead of living (as part of its graph) until the end of the step.
        let t1 = self.target.forward_t(v1, true)?.detach();
        let t2 = self.target.forward_t(v2, true)?.detach();
        Ok(Outcome {
            loss: byol_loss(&p1, &p2, &t1, &t2)?,
            embeddings: z1.detach(),
        })
    }

    /// The EMA update after optimizer step `step`: `ξ ← τ·ξ + (1 − τ)·θ` for every
    /// trainable target variable (running statistics excluded), τ from `[byol] tau_base`
    /// on the learning rate's schedule ([`schedule::tau`]).
    pub fn after_step(
        &mut self,
        online: &VarMap,
        cfg: &TrainerConfig,
        step: u64,
    ) -> Result<ObjectiveStats> {
        let tau = schedule::tau(&cfg.optim, cfg.byol.tau_base, cfg.train.total_steps, step);
        self.update_target(online, tau)?;
        Ok(ObjectiveStats { tau: Some(tau) })
    }

    /// `ξ ← τ·ξ + (1 − τ)·θ` for every trainable target variable.
    pub fn update_target(&self, online: &VarMap, tau: f64) -> Result<()> {
        let online = online.data().lock().unwrap();
        for (name, t) in self.target_named() {
            if is_running_stat(&name) {
                continue;
            }
            let o = online.get(&name).expect("same names");
            let next = ((t.as_tensor() * tau)? + (o.as_tensor().detach() * (1.0 - tau))?)?;
            t.set(&next)?;
        }
        Ok(())
    }

    /// The target's tensors as `target.<name>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.target_named()
            .into_iter()
            .map(|(n, v)| (format!("{TARGET_PREFIX}{n}"), v.as_tensor().clone()))
            .collect()
    }

    /// Restores the target from `target.<name>` tensors.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        file: &Path,
    ) -> std::result::Result<(), TrainError> {
        let vars = self
            .target_named()
            .into_iter()
            .map(|(n, v)| (format!("{TARGET_PREFIX}{n}"), v))
            .collect();
        crate::checkpoint::restore_vars(vars, tensors, file)
    }
}
