//! The BYOL networks: an online network (encoder → projector → predictor) and its
//! EMA target (encoder → projector), each in its own `VarMap`.

mod init;
mod layers;
mod mlp;
mod resnet;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

pub use init::{reinit, seeded_normal};
pub use layers::{Compute, Conv, Dense, Norm};
pub use mlp::Mlp;
pub use resnet::ResNet;

use crate::config::{Kernels, ModelConfig, Precision};

/// Encoder → projector (→ predictor for the online network).
pub struct Network {
    /// The ResNet encoder; its pooled output is the representation.
    pub encoder: ResNet,
    /// The projector MLP.
    pub projector: Mlp,
    /// The predictor MLP (online network only).
    pub predictor: Option<Mlp>,
}

impl Network {
    /// Builds the networks' layers under `encoder.*`, `projector.*` and `predictor.*`;
    /// `compute` selects our CPU kernels and the precision of convolutions and products.
    pub fn new(
        cfg: &ModelConfig,
        with_predictor: bool,
        compute: Compute,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = cfg.feature_dim();
        let projector = Mlp::new(
            d,
            cfg.projector_hidden,
            cfg.projection_dim,
            cfg,
            compute,
            vb.pp("projector"),
        )?;
        let predictor = if with_predictor {
            Some(Mlp::new(
                cfg.projection_dim,
                cfg.predictor_hidden,
                cfg.projection_dim,
                cfg,
                compute,
                vb.pp("predictor"),
            )?)
        } else {
            None
        };
        Ok(Network {
            encoder: ResNet::new(cfg, compute, vb.pp("encoder"))?,
            projector,
            predictor,
        })
    }

    /// Projection `z` (and prediction `p` when there is a predictor) of a batch.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        let y = self.encoder.forward_t(x, train)?;
        let z = self.projector.forward_t(&y, train)?;
        let p = match &self.predictor {
            Some(q) => Some(q.forward_t(&z, train)?),
            None => None,
        };
        Ok((z, p))
    }
}

/// True for BatchNorm running statistics: state, neither optimised nor EMA-averaged.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// Online and target networks with their variables.
pub struct ByolModel {
    /// Variables of the online network (`encoder.*`, `projector.*`, `predictor.*`).
    pub online_vars: VarMap,
    /// Variables of the target network (`encoder.*`, `projector.*`).
    pub target_vars: VarMap,
    /// The online network.
    pub online: Network,
    /// The target network.
    pub target: Network,
}

impl ByolModel {
    /// Builds both networks with the default kernels (see [`ByolModel::with_kernels`]).
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::with_kernels(cfg, Kernels::Auto, seed, device)
    }

    /// Builds both networks; weights are initialised from `seed` (torchvision's schemes)
    /// and the target starts as a copy of the online network. `kernels` picks the
    /// convolution and BatchNorm implementation (ours or candle's, on any device).
    pub fn with_kernels(
        cfg: &ModelConfig,
        kernels: Kernels,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::with_compute(cfg, Compute::new(kernels, Precision::Fp32), seed, device)
    }

    /// [`ByolModel::with_kernels`] with the kernels and precision given as a [`Compute`].
    pub fn with_compute(
        cfg: &ModelConfig,
        compute: Compute,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let online_vars = VarMap::new();
        let target_vars = VarMap::new();
        let online = Network::new(
            cfg,
            true,
            compute,
            VarBuilder::from_varmap(&online_vars, DType::F32, device),
        )?;
        let target = Network::new(
            cfg,
            false,
            compute,
            VarBuilder::from_varmap(&target_vars, DType::F32, device),
        )?;
        reinit(&online_vars, seed)?;
        let model = ByolModel {
            online_vars,
            target_vars,
            online,
            target,
        };
        for (name, t) in model.target_named() {
            let o = model
                .online_var(&name)
                .expect("target names are a subset of online names");
            t.set(o.as_tensor())?;
        }
        Ok(model)
    }

    /// Online variables sorted by name.
    pub fn online_named(&self) -> Vec<(String, Var)> {
        sorted(&self.online_vars)
    }

    /// Target variables sorted by name.
    pub fn target_named(&self) -> Vec<(String, Var)> {
        sorted(&self.target_vars)
    }

    /// Trainable online variables (no running statistics), sorted by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.online_named()
            .into_iter()
            .filter(|(n, _)| !is_running_stat(n))
            .collect()
    }

    fn online_var(&self, name: &str) -> Option<Var> {
        self.online_vars.data().lock().unwrap().get(name).cloned()
    }

    /// EMA update of the target: `ξ ← τ·ξ + (1 − τ)·θ` for every trainable target
    /// variable (running statistics excluded).
    pub fn update_target(&self, tau: f64) -> Result<()> {
        for (name, t) in self.target_named() {
            if is_running_stat(&name) {
                continue;
            }
            let o = self.online_var(&name).expect("same names");
            let next = ((t.as_tensor() * tau)? + (o.as_tensor().detach() * (1.0 - tau))?)?;
            t.set(&next)?;
        }
        Ok(())
    }

    /// Number of trainable online parameters.
    pub fn parameter_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// The variables of `map` sorted by name.
pub(crate) fn sorted(map: &VarMap) -> Vec<(String, Var)> {
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
