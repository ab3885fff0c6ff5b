//! The frozen online encoder of a checkpoint (never the target, never the heads), or a
//! seeded random one of the same config: pooled features with BatchNorm in eval mode.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::EvalError;
use crate::checkpoint::{self, CheckpointMeta};
use crate::config::{Kernels, ModelConfig, Precision};
use crate::input::InputSpec;
use crate::model::{Compute, ResNet, reinit, sorted};

/// Prefix of the encoder's variables in the online network and in checkpoints.
const ENCODER_PREFIX: &str = "encoder.";

/// An encoder alone (no projector or predictor), in f32, for evaluation and export.
pub struct Encoder {
    vars: VarMap,
    resnet: ResNet,
    config: ModelConfig,
    device: Device,
}

impl Encoder {
    /// An untrained encoder of `cfg`, weights from `seed` (the same initialisation a
    /// training run with that seed starts from: each variable's values depend on the
    /// seed and its name only). Builds the encoder alone.
    pub fn random(
        cfg: &ModelConfig,
        seed: u64,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let enc = Self::unset(cfg, kernels, device)?;
        reinit(&enc.vars, seed, cfg.conv_init)?;
        Ok(enc)
    }

    /// The layers of an encoder of `cfg` whose weights the caller sets, every one (a
    /// checkpoint's, a live run's): the seeded initialisation would be thrown away.
    fn unset(cfg: &ModelConfig, kernels: Kernels, device: &Device) -> Result<Self, EvalError> {
        let vars = VarMap::new();
        // Evaluation runs in f32 whatever precision the run trained in.
        let compute = Compute::new(kernels, Precision::Fp32);
        let resnet = ResNet::new(
            cfg,
            compute,
            VarBuilder::from_varmap(&vars, DType::F32, device).pp("encoder"),
        )?;
        Ok(Encoder {
            vars,
            resnet,
            config: cfg.clone(),
            device: device.clone(),
        })
    }

    /// The online encoder of the checkpoint folder `path` (its `encoder.*` tensors only,
    /// whatever the method), with the checkpoint's meta.
    pub fn from_checkpoint(
        path: &Path,
        kernels: Kernels,
        device: &Device,
    ) -> Result<(Self, CheckpointMeta), EvalError> {
        let meta = checkpoint::read_meta(path)?;
        let enc = Self::unset(&meta.config.model, kernels, device)?;
        let mut tensors = checkpoint::load_online(path, &meta, device)?;
        tensors.retain(|name| name.starts_with(ENCODER_PREFIX));
        tensors
            .restore_vars(&sorted(&enc.vars))
            .map_err(|e| checkpoint::state_error(&path.join(checkpoint::ONLINE), e))?;
        Ok((enc, meta))
    }

    /// The encoder of a live online network as it is now (weights copied), e.g. to
    /// monitor a run while it trains; `online` holds its variables by name
    /// ([`crate::Trainer::online_named`]).
    pub fn from_online(
        online: &[(String, Var)],
        cfg: &ModelConfig,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let enc = Self::unset(cfg, kernels, device)?;
        let online: std::collections::HashMap<&str, &Var> =
            online.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for (name, var) in sorted(&enc.vars) {
            let source = online.get(name.as_str()).ok_or_else(|| {
                candle_core::Error::Msg(format!("the online network has no {name}"))
            })?;
            var.set(source.as_tensor())?;
        }
        Ok(enc)
    }

    /// The online encoder of `trainer` as it is now (weights copied, in f32).
    pub fn from_trainer(trainer: &crate::Trainer) -> Result<Self, EvalError> {
        let cfg = trainer.config();
        Self::from_online(
            &trainer.online_named(),
            &cfg.model,
            cfg.train.kernels,
            trainer.device(),
        )
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

    /// Pooled features `(n, feature_dim)` of images `(n, 3, h, w)`, BatchNorm in eval
    /// mode (running statistics; nothing is updated).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, EvalError> {
        Ok(self.resnet.forward_t(x, false)?.detach())
    }

    /// The encoder's tensors under their torchvision names (`encoder.` stripped),
    /// sorted by name; projector and predictor are left out.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = sorted(&self.vars)
            .into_iter()
            .filter_map(|(n, v)| {
                let name = n.strip_prefix(ENCODER_PREFIX)?.to_owned();
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

/// Command-line overrides of the preprocessing a checkpoint records (`None`: keep it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputOverrides {
    /// Input side in pixels.
    pub size: Option<u32>,
    /// Per-channel mean (R, G, B) of the [0, 1] values.
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation (R, G, B).
    pub std: Option<[f32; 3]>,
}

/// The preprocessing to evaluate a checkpoint's encoder with, and whether it came from
/// the checkpoint's record.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedInput {
    /// What the encoder is fed (the record, then the overrides).
    pub input: InputSpec,
    /// The checkpoint records its preprocessing (else ImageNet's was assumed).
    pub recorded: bool,
}

impl ResolvedInput {
    /// A warning for a checkpoint without a record whose normalisation was not given
    /// in full by the flags (`--mean` and `--std`): ImageNet's statistics are assumed.
    pub fn warning(&self, overrides: &InputOverrides) -> Option<String> {
        (!self.recorded && (overrides.mean.is_none() || overrides.std.is_none())).then(|| {
            "the checkpoint does not record the normalisation its encoder was trained with \
             (written before byol recorded it): ImageNet's mean and std are assumed; pass \
             --mean and --std if it was trained with others"
                .to_owned()
        })
    }
}

/// The preprocessing a checkpoint's encoder expects: its record
/// ([`CheckpointMeta::input`]: the views' size, normalisation and filter), or for a
/// checkpoint without one ImageNet's statistics at the recorded view size (else 32 px
/// with the small-image stem, 224 with ImageNet's); then `overrides`.
pub fn checkpoint_input(meta: &CheckpointMeta, overrides: &InputOverrides) -> ResolvedInput {
    let stem_default = if meta.config.model.small_stem {
        32
    } else {
        224
    };
    let (mut input, recorded) = meta.input_or_imagenet(stem_default);
    if let Some(size) = overrides.size {
        input.size = size;
    }
    if let Some(mean) = overrides.mean {
        input.mean = mean;
    }
    if let Some(std) = overrides.std {
        input.std = std;
    }
    ResolvedInput { input, recorded }
}
