//! Self-supervised objectives, one file per method. The trainer owns the shared network
//! (encoder + projector), the optimizer and the step; an objective owns everything else
//! of its method:
//! - its config table (`[byol]`, `[msf]`, …) and its heads: trained ones (a predictor)
//!   built in the online variables, so the optimizer updates them, and untrained state
//!   (an EMA target, a queue, a memory bank) of its own;
//! - its loss on the two views ([`Objective::loss`]);
//! - what it does after the optimizer step ([`Objective::after_step`]: an EMA update, an
//!   enqueue);
//! - its checkpoint state ([`Objective::state`], [`Objective::load_state`]) and its own
//!   figures ([`ObjectiveStats`]).
//!
//! The set is closed (an enum, like [`crate::optim::Optimizer`]): adding a method is a
//! file here, a variant, and a [`crate::config::Method`].
//!
//! Loss scales differ between libraries by factors of 2; each file states its
//! convention. BYOL's loss is in [0, 8] (both directions summed), MSF's in [0, 4] (one
//! direction), SimSiam's in [−1, 1], SimCLR's and MoCo v2's are cross-entropies (nats),
//! Barlow Twins' is summed over the d×d correlation matrix.

pub mod barlow_twins;
pub mod byol;
pub mod ema;
pub mod memory;
pub mod mocov2;
pub mod msf;
pub mod simclr;
pub mod simsiam;

use candle_core::{Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

pub use barlow_twins::BarlowTwins;
pub use byol::Byol;
pub use memory::{Memory, MemoryFill};
pub use mocov2::MocoV2;
pub use msf::Msf;
pub use simclr::SimClr;
pub use simsiam::SimSiam;

use crate::config::{Method, TrainerConfig};
use crate::model::{Compute, Mlp, Network};
use crate::state::{StateDict, StateError};

/// What an objective computed on one batch of two views.
pub struct Outcome {
    /// The scalar loss to differentiate.
    pub loss: Tensor,
    /// Online projections `(n, projection_dim)` of the first view, detached: the
    /// embeddings the collapse indicator and effective rank are computed on.
    pub embeddings: Tensor,
    /// Unit embeddings `(n, projection_dim)` for the objective's memory (MSF's targets,
    /// MoCo's keys), pushed by [`Objective::after_step`] once the step is taken.
    pub keys: Option<Tensor>,
}

/// A method's own figures of a step (each field only where the method has it).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ObjectiveStats {
    /// EMA coefficient of the target or key encoder (BYOL, MSF, MoCo v2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
}

/// One of the supported objectives.
pub enum Objective {
    /// BYOL (Grill et al. 2020).
    Byol(Byol),
    /// Mean shift (Koohpayegani et al. 2021).
    Msf(Msf),
    /// SimSiam (Chen & He 2021).
    SimSiam(SimSiam),
    /// SimCLR (Chen et al. 2020).
    SimClr(SimClr),
    /// Barlow Twins (Zbontar et al. 2021).
    BarlowTwins(BarlowTwins),
    /// MoCo v2 (Chen et al. 2020).
    MocoV2(MocoV2),
}

impl Objective {
    /// The objective `cfg.train.method` names, its trained heads built under `online`
    /// (before the online variables are initialised).
    pub fn new(cfg: &TrainerConfig, compute: Compute, online: VarBuilder) -> Result<Self> {
        Ok(match cfg.train.method {
            Method::Byol => Objective::Byol(Byol::new(cfg, compute, online)?),
            Method::Msf => Objective::Msf(Msf::new(cfg, compute, online)?),
            Method::Simsiam => Objective::SimSiam(SimSiam::new(cfg, compute, online)?),
            Method::Simclr => Objective::SimClr(SimClr::new(cfg)),
            Method::BarlowTwins => Objective::BarlowTwins(BarlowTwins::new(cfg)),
            Method::Mocov2 => Objective::MocoV2(MocoV2::new(cfg, compute, online)?),
        })
    }

    /// The method.
    pub fn method(&self) -> Method {
        match self {
            Objective::Byol(_) => Method::Byol,
            Objective::Msf(_) => Method::Msf,
            Objective::SimSiam(_) => Method::Simsiam,
            Objective::SimClr(_) => Method::Simclr,
            Objective::BarlowTwins(_) => Method::BarlowTwins,
            Objective::MocoV2(_) => Method::Mocov2,
        }
    }

    /// Starts the state that derives from the initialised online variables (an EMA
    /// target or key encoder is a copy of the online network).
    pub fn start(&mut self, online: &VarMap) -> Result<()> {
        match self {
            Objective::Byol(o) => o.start(online),
            Objective::Msf(o) => o.start(online),
            Objective::MocoV2(o) => o.start(online),
            Objective::SimSiam(_) | Objective::SimClr(_) | Objective::BarlowTwins(_) => Ok(()),
        }
    }

    /// The loss on two batches of views `(n, 3, h, w)`, the shared `network` in training
    /// mode. Changes nothing but BatchNorm's running statistics: the memory takes the
    /// outcome's keys in [`Objective::after_step`].
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        match self {
            Objective::Byol(o) => o.loss(network, v1, v2),
            Objective::Msf(o) => o.loss(network, v1, v2),
            Objective::SimSiam(o) => o.loss(network, v1, v2),
            Objective::SimClr(o) => o.loss(network, v1, v2),
            Objective::BarlowTwins(o) => o.loss(network, v1, v2),
            Objective::MocoV2(o) => o.loss(network, v1, v2),
        }
    }

    /// The method's work after the optimizer step `step` (0-based): the EMA update of a
    /// target or key encoder, `keys` (from [`Outcome::keys`]) into its memory; and its
    /// figures.
    pub fn after_step(
        &mut self,
        online: &VarMap,
        cfg: &TrainerConfig,
        step: u64,
        keys: Option<&Tensor>,
    ) -> Result<ObjectiveStats> {
        match self {
            Objective::Byol(o) => o.after_step(online, cfg, step),
            Objective::Msf(o) => o.after_step(online, cfg, step, keys),
            Objective::MocoV2(o) => o.after_step(online, cfg, step, keys),
            Objective::SimSiam(_) | Objective::SimClr(_) | Objective::BarlowTwins(_) => {
                Ok(ObjectiveStats::default())
            }
        }
    }

    /// The method's memory (MSF's bank, MoCo's queue), if it has one.
    pub fn memory(&self) -> Option<&Memory> {
        match self {
            Objective::Msf(o) => Some(o.bank()),
            Objective::MocoV2(o) => Some(o.queue()),
            _ => None,
        }
    }

    /// The method's state for checkpoints (BYOL: the target as `target.*`; MSF: also
    /// `bank.*`; MoCo v2: `key.*` and `queue.*`; none for the others).
    pub fn state(&self) -> Result<StateDict> {
        match self {
            Objective::Byol(o) => Ok(o.state()),
            Objective::Msf(o) => o.state(),
            Objective::MocoV2(o) => o.state(),
            Objective::SimSiam(_) | Objective::SimClr(_) | Objective::BarlowTwins(_) => {
                Ok(StateDict::new())
            }
        }
    }

    /// Checks that `state` can be restored ([`Objective::load_state`]) without changing
    /// anything.
    ///
    /// Errors: a tensor missing or misshapen, or extra ones; a memory of another size than
    /// the config's (a mismatch naming its key); a memory's pointer out of range.
    pub fn check_state(&self, state: &StateDict) -> std::result::Result<(), StateError> {
        match self {
            Objective::Byol(o) => o.check_state(state),
            Objective::Msf(o) => o.check_state(state),
            Objective::MocoV2(o) => o.check_state(state),
            Objective::SimSiam(_) | Objective::SimClr(_) | Objective::BarlowTwins(_) => {
                state.check_vars(&[])
            }
        }
    }

    /// Restores [`Objective::state`], checked in full first
    /// ([`Objective::check_state`]): a refused state changes nothing.
    pub fn load_state(&mut self, state: &StateDict) -> std::result::Result<(), StateError> {
        match self {
            Objective::Byol(o) => o.load_state(state),
            Objective::Msf(o) => o.load_state(state),
            Objective::MocoV2(o) => o.load_state(state),
            Objective::SimSiam(_) | Objective::SimClr(_) | Objective::BarlowTwins(_) => {
                state.check_vars(&[])
            }
        }
    }
}

/// A predictor MLP `projection_dim → hidden → projection_dim` under
/// `online.pp("predictor")` (BYOL's and MSF's; SimSiam's bottleneck).
pub(crate) fn predictor(
    cfg: &TrainerConfig,
    hidden: usize,
    compute: Compute,
    online: &VarBuilder,
) -> Result<Mlp> {
    let d = cfg.model.projection_dim;
    Mlp::new(d, hidden, d, &cfg.model, compute, online.pp("predictor"))
}
