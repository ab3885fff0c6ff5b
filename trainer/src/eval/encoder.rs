//! The frozen online encoder of a checkpoint (never the target), or a seeded random one
//! of the same config: pooled features with BatchNorm in eval mode.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::EvalError;
use crate::checkpoint::{self, CheckpointMeta};
use crate::config::{Kernels, ModelConfig, Precision};
use crate::model::{ByolModel, Compute, Network, reinit, sorted};

/// The online network of a BYOL model, used only for its encoder.
pub struct Encoder {
    vars: VarMap,
    network: Network,
    config: ModelConfig,
    device: Device,
    bn_updates: u64,
}

impl Encoder {
    /// An untrained encoder of `cfg`, weights from `seed` (the same initialisation a
    /// training run with that seed starts from).
    pub fn random(
        cfg: &ModelConfig,
        seed: u64,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let vars = VarMap::new();
        // Evaluation runs in f32 whatever precision the run trained in.
        let compute = Compute::new(kernels, Precision::Fp32);
        let network = Network::new(
            cfg,
            true,
            compute,
            VarBuilder::from_varmap(&vars, DType::F32, device),
        )?;
        reinit(&vars, seed)?;
        Ok(Encoder {
            vars,
            network,
            config: cfg.clone(),
            device: device.clone(),
            bn_updates: 0,
        })
    }

    /// The online encoder of the checkpoint folder `path`, with the checkpoint's meta.
    pub fn from_checkpoint(
        path: &Path,
        kernels: Kernels,
        device: &Device,
    ) -> Result<(Self, CheckpointMeta), EvalError> {
        let meta = checkpoint::read_meta(path)?;
        let mut enc = Self::random(&meta.config.model, meta.config.train.seed, kernels, device)?;
        let file = path.join(checkpoint::ONLINE);
        let tensors = checkpoint::load_tensors(&file, &meta, device)?;
        checkpoint::restore_vars(sorted(&enc.vars), &tensors, &file)?;
        // Each step runs the online network in training mode on both views.
        enc.bn_updates = 2 * meta.step;
        Ok((enc, meta))
    }

    /// The online encoder of a live model as it is now (weights copied), e.g. to
    /// monitor a run while it trains; `steps` is the number of steps taken.
    pub fn from_model(
        model: &ByolModel,
        cfg: &ModelConfig,
        steps: u64,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let mut enc = Self::random(cfg, 0, kernels, device)?;
        let online: std::collections::HashMap<String, candle_core::Var> =
            model.online_named().into_iter().collect();
        for (name, var) in sorted(&enc.vars) {
            let source = online.get(&name).ok_or_else(|| {
                candle_core::Error::Msg(format!("the online network has no {name}"))
            })?;
            var.set(source.as_tensor())?;
        }
        enc.bn_updates = 2 * steps;
        Ok(enc)
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Size of the pooled representation.
    pub fn feature_dim(&self) -> usize {
        self.config.feature_dim()
    }

    /// Training-mode BatchNorm updates the weights have seen (2 per BYOL step).
    pub fn bn_updates(&self) -> u64 {
        self.bn_updates
    }

    /// Pooled features `(n, feature_dim)` of images `(n, 3, h, w)`, BatchNorm in eval
    /// mode (running statistics; nothing is updated).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, EvalError> {
        Ok(self.network.encoder.forward_t(x, false)?.detach())
    }

    /// The encoder's tensors under their torchvision names (`encoder.` stripped),
    /// sorted by name; projector and predictor are left out.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = sorted(&self.vars)
            .into_iter()
            .filter_map(|(n, v)| {
                let name = n.strip_prefix("encoder.")?.to_owned();
                Some((name, v.as_tensor().clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// The checkpoint folder `path` names: a checkpoint folder itself, or a run folder (its
/// newest checkpoint under `checkpoints/`), or a folder of checkpoints (its newest).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, EvalError> {
    if path.join(checkpoint::META).is_file() {
        return Ok(path.to_owned());
    }
    if !path.is_dir() {
        return Err(EvalError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such checkpoint or run folder",
            ),
        });
    }
    checkpoint::latest(&path.join(checkpoint::RUN_CHECKPOINTS_DIR))
        .or_else(|| checkpoint::latest(path))
        .ok_or_else(|| EvalError::Data {
            path: path.to_owned(),
            reason: "neither a checkpoint (no meta.json) nor a run folder with checkpoints".into(),
        })
}
