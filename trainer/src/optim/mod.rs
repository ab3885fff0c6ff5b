//! Optimizers over the trainable online variables, with state that checkpoints save.

mod adamw;
mod lars;
mod sgd;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

pub use adamw::AdamW;
pub use lars::Lars;
pub use sgd::Sgd;

use crate::config::{OptimConfig, OptimizerKind};
use crate::state::{StateDict, StateError};

/// True for parameters excluded from weight decay and LARS adaptation: biases and
/// BatchNorm parameters, i.e. every parameter of rank 1 (unless the config's
/// `decay_norm_and_bias` decays every parameter).
pub fn is_excluded(var: &Var) -> bool {
    var.rank() <= 1
}

/// Whether weight decay (and LARS's trust ratio) applies to `var` under `cfg`.
pub(crate) fn is_decayed(cfg: &OptimConfig, var: &Var) -> bool {
    cfg.decay_norm_and_bias || !is_excluded(var)
}

/// One of the supported optimizers.
pub enum Optimizer {
    /// LARS.
    Lars(Lars),
    /// AdamW.
    AdamW(AdamW),
    /// SGD with momentum.
    Sgd(Sgd),
}

impl Optimizer {
    /// An optimizer over `params` (name, variable), as the config says.
    pub fn new(cfg: &OptimConfig, params: Vec<(String, Var)>) -> Result<Self> {
        Ok(match cfg.optimizer {
            OptimizerKind::Lars => Optimizer::Lars(Lars::new(cfg, params)?),
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(cfg, params)?),
            OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new(cfg, params)?),
        })
    }

    /// Applies one update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        match self {
            Optimizer::Lars(o) => o.step(grads, lr),
            Optimizer::AdamW(o) => o.step(grads, lr),
            Optimizer::Sgd(o) => o.step(grads, lr),
        }
    }

    /// The state tensors by name (for checkpoints).
    pub fn state(&self) -> StateDict {
        match self {
            Optimizer::Lars(o) => o.state(),
            Optimizer::AdamW(o) => o.state(),
            Optimizer::Sgd(o) => o.state(),
        }
        .into()
    }

    /// Checks that `state` holds exactly the tensors of [`Optimizer::state`], each of its
    /// shape, without changing anything.
    pub fn check_state(&self, state: &StateDict) -> std::result::Result<(), StateError> {
        state.check_layout_of(&self.state())
    }

    /// Restores the state saved by [`Optimizer::state`], checked in full first
    /// ([`Optimizer::check_state`]): a refused state changes nothing.
    pub fn load_state(&mut self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.check_state(state)?;
        match self {
            Optimizer::Lars(o) => o.load_state(state),
            Optimizer::AdamW(o) => o.load_state(state),
            Optimizer::Sgd(o) => o.load_state(state),
        }?;
        Ok(())
    }
}

/// A parameter with one momentum buffer (LARS, SGD), zero at the start.
pub(crate) struct MomentumParam {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) momentum: Tensor,
    /// Weight decay (and LARS's trust ratio) apply: not a bias or normalisation
    /// parameter ([`is_excluded`]).
    pub(crate) decayed: bool,
}

impl MomentumParam {
    /// One per parameter of `params`, buffers at zero.
    pub(crate) fn all(cfg: &OptimConfig, params: Vec<(String, Var)>) -> Result<Vec<Self>> {
        params
            .into_iter()
            .map(|(name, var)| {
                Ok(MomentumParam {
                    momentum: var.zeros_like()?,
                    decayed: is_decayed(cfg, &var),
                    name,
                    var,
                })
            })
            .collect()
    }

    /// The buffers of `params`, named `<param>.momentum` (for checkpoints).
    pub(crate) fn state(params: &[Self]) -> Vec<(String, Tensor)> {
        params
            .iter()
            .map(|p| (format!("{}.momentum", p.name), p.momentum.clone()))
            .collect()
    }

    /// Restores the buffers saved by [`MomentumParam::state`].
    pub(crate) fn load_state(params: &mut [Self], state: &StateDict) -> Result<()> {
        for p in params {
            restore_tensor(state, &format!("{}.momentum", p.name), &mut p.momentum)?;
        }
        Ok(())
    }
}

/// Copies `state[name]` into `slot`, checking the shape.
pub(crate) fn restore_tensor(state: &StateDict, name: &str, slot: &mut Tensor) -> Result<()> {
    let t = state
        .get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state {name} is missing")))?;
    if t.dims() != slot.dims() {
        candle_core::bail!(
            "optimizer state {name} has shape {:?}, expected {:?}",
            t.dims(),
            slot.dims()
        );
    }
    *slot = t.to_device(slot.device())?;
    Ok(())
}
