//! The shared network of every objective: a ResNet encoder and its projector MLP, in
//! torchvision's layout and names. Objectives add their own heads (BYOL's predictor and
//! EMA target live in `objective::byol`); the network knows no objective.

mod init;
mod layers;
mod mlp;
mod resnet;

use candle_core::{Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

pub use init::{reinit, seeded_normal};
pub use layers::{Compute, Conv, Dense, Norm, max_pool_3x3_s2_p1};
pub use mlp::{Mlp, group_norm, standardize};
pub use resnet::ResNet;

use crate::config::ModelConfig;

/// Encoder → projector.
pub struct Network {
    /// The ResNet encoder; its pooled output is the representation.
    pub encoder: ResNet,
    /// The projector MLP.
    pub projector: Mlp,
}

impl Network {
    /// Builds the layers under `encoder.*` and `projector.*` of `vb`; `compute` selects
    /// the kernels and the precision of convolutions and products.
    pub fn new(cfg: &ModelConfig, compute: Compute, vb: VarBuilder) -> Result<Self> {
        Ok(Network {
            encoder: ResNet::new(cfg, compute, vb.pp("encoder"))?,
            projector: Mlp::new(
                cfg.feature_dim(),
                cfg.projector_hidden,
                cfg.projection_dim,
                cfg,
                compute,
                vb.pp("projector"),
            )?,
        })
    }

    /// Projections `(n, projection_dim)` of a batch `(n, 3, h, w)`; BatchNorm in training
    /// mode (batch statistics, running ones updated) when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.encoder.forward_t(x, train)?;
        self.projector.forward_t(&y, train)
    }
}

/// True for BatchNorm's running statistics (`running_mean`, `running_var`,
/// `num_batches_tracked`): state, neither optimised nor EMA-averaged.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

/// The variables of `map` sorted by name.
pub fn sorted(map: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The trainable variables of `map` (running statistics left out), sorted by name.
pub fn trainable(map: &VarMap) -> Vec<(String, Var)> {
    sorted(map)
        .into_iter()
        .filter(|(n, _)| !is_running_stat(n))
        .collect()
}
