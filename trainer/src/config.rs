//! Training settings: the `[model]`, `[optim]`, `[train]` and objective (`[byol]`) tables
//! of the config file.

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Encoder depth (torchvision layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// BasicBlocks 2-2-2-2, output `8 * width`.
    Resnet18,
    /// Bottlenecks 3-4-6-3, output `32 * width`.
    Resnet50,
}

/// Normalisation inside the projector and predictor MLPs (between their two linear
/// layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadNorm {
    /// BatchNorm (BYOL, Grill et al. 2020).
    #[default]
    Batch,
    /// GroupNorm of [`HEAD_GROUPS`] groups after a weight-standardised linear layer (Wu &
    /// He 2018; Qiao et al. 2019), with no batch statistics ("BYOL works even without
    /// batch statistics", Richemond et al. 2020).
    GroupWs,
    /// No normalisation: Linear → ReLU → Linear.
    None,
}

/// Groups of the heads' GroupNorm ([`HeadNorm::GroupWs`]; Wu & He 2018's default).
pub const HEAD_GROUPS: usize = 32;

/// The networks: encoder, projector and predictor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Encoder architecture.
    pub arch: Arch,
    /// Channels of the first stage (torchvision: 64); later stages 2x, 4x, 8x.
    pub width: usize,
    /// Small-image stem: 3x3 conv stride 1, no max-pool (for 32-64 px images).
    pub small_stem: bool,
    /// Hidden size of the projector MLP.
    pub projector_hidden: usize,
    /// Output size of projector and predictor.
    pub projection_dim: usize,
    /// Hidden size of the predictor MLP.
    pub predictor_hidden: usize,
    /// BatchNorm running-statistics momentum (PyTorch convention).
    pub bn_momentum: f64,
    /// BatchNorm epsilon.
    pub bn_eps: f64,
    /// Normalisation inside the projector and predictor.
    pub head_norm: HeadNorm,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Resnet50,
            width: 64,
            small_stem: false,
            projector_hidden: 4096,
            projection_dim: 256,
            predictor_hidden: 4096,
            bn_momentum: 0.1,
            bn_eps: 1e-5,
            head_norm: HeadNorm::Batch,
        }
    }
}

impl ModelConfig {
    /// ResNet-18 with the small-image stem and smaller heads, for 32 px data.
    pub fn small(width: usize) -> Self {
        ModelConfig {
            arch: Arch::Resnet18,
            width,
            small_stem: true,
            projector_hidden: 1024,
            projection_dim: 128,
            predictor_hidden: 1024,
            ..ModelConfig::default()
        }
    }

    /// Feature size of the encoder output.
    pub fn feature_dim(&self) -> usize {
        match self.arch {
            Arch::Resnet18 => 8 * self.width,
            Arch::Resnet50 => 32 * self.width,
        }
    }
}

/// Optimizer choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// LARS, as in the BYOL paper.
    Lars,
    /// AdamW (Loshchilov & Hutter 2019), for small experiments.
    Adamw,
    /// SGD with momentum (PyTorch's `torch.optim.SGD`, Nesterov optional).
    Sgd,
}

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay to 0 at `total_steps` (BYOL's τ follows its cosine to 1).
    Cosine,
    /// Constant after warm-up; τ stays at `[byol] tau_base` (open-ended runs).
    Constant,
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// LARS, AdamW or SGD.
    pub optimizer: OptimizerKind,
    /// Learning rate at batch 256; the run uses `base_lr * batch / 256`.
    pub base_lr: f64,
    /// Weight decay (not applied to biases and BatchNorm parameters).
    pub weight_decay: f64,
    /// Momentum of LARS and SGD.
    pub momentum: f64,
    /// Nesterov momentum for SGD (PyTorch's `nesterov=True`).
    pub nesterov: bool,
    /// LARS trust coefficient η.
    pub trust_coefficient: f64,
    /// AdamW β1, β2, ε.
    pub adam_betas: [f64; 2],
    /// AdamW ε.
    pub adam_eps: f64,
    /// Linear warm-up from 0, in steps.
    pub warmup_steps: u64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Deprecated: BYOL's EMA coefficient, now `[byol] tau_base`. Still read (see
    /// [`TrainerConfig::resolve_deprecated`]), so older config files and checkpoints load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau_base: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            optimizer: OptimizerKind::Lars,
            base_lr: 0.2,
            weight_decay: 1.5e-6,
            momentum: 0.9,
            nesterov: false,
            trust_coefficient: 1e-3,
            adam_betas: [0.9, 0.999],
            adam_eps: 1e-8,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            tau_base: None,
        }
    }
}

/// The self-supervised objective (`[train] method`); each has its own table and file
/// under `objective/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// BYOL (Grill et al. 2020): predictor, EMA target, `[byol]`.
    #[default]
    Byol,
}

impl Method {
    /// The config value, e.g. `byol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Byol => "byol",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "byol" => Ok(Method::Byol),
            other => Err(format!("unknown method {other:?} (known: byol)")),
        }
    }
}

/// BYOL's own settings (`[byol]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ByolConfig {
    /// EMA coefficient τ of the target at step 0 (the paper's τ_base); it follows the
    /// learning-rate schedule's cosine to 1, or stays constant.
    pub tau_base: f64,
}

/// τ_base of the BYOL paper (Grill et al. 2020, section 3.2).
pub const BYOL_TAU_BASE: f64 = 0.996;

impl Default for ByolConfig {
    fn default() -> Self {
        ByolConfig {
            tau_base: BYOL_TAU_BASE,
        }
    }
}

/// Run settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The objective: `byol` (the only one for now).
    pub method: Method,
    /// `auto` (CUDA if built in and present, else CPU), `cpu`, or `cuda:N`.
    pub device: String,
    /// Seed of weight initialisation (the loader has its own seed).
    pub seed: u64,
    /// Steps of a cosine schedule (also the default length of `byol train`).
    pub total_steps: u64,
    /// Log a metrics line every this many steps.
    pub log_every: u64,
    /// Checkpoint every this many steps (0: never by steps).
    pub checkpoint_every_steps: u64,
    /// Checkpoint every this many minutes (0: never by time).
    pub checkpoint_every_minutes: f64,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Convolution and BatchNorm kernels: `auto` (ours, on CPU and CUDA) or `candle`
    /// (candle's everywhere: for comparison, and as a safety valve).
    pub kernels: Kernels,
    /// `fp32` or `bf16` (mixed precision).
    pub precision: Precision,
    /// Allow TF32 tensor cores for fp32 convolutions and matrix products on CUDA
    /// (faster, about 10 bits of mantissa). Off by default: fp32 is true fp32.
    pub tf32: bool,
}

/// Numeric precision of the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// Mixed precision: convolutions and matrix products in bfloat16; master weights,
    /// BatchNorm (statistics included), the loss, gradients and the optimizer in f32
    /// (as PyTorch's `autocast(dtype=torch.bfloat16)`).
    Bf16,
}

/// Which implementation runs convolution and BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Our kernels on every device: im2col + GEMM and fused BatchNorm on CPU; cuDNN
    /// convolutions and our BatchNorm and residual kernels on CUDA.
    #[default]
    Auto,
    /// candle's own ops on every device (the reference, and a safety valve).
    Candle,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Byol,
            device: "auto".into(),
            seed: 0,
            total_steps: 1000,
            log_every: 10,
            checkpoint_every_steps: 500,
            checkpoint_every_minutes: 30.0,
            keep_last: 3,
            kernels: Kernels::Auto,
            precision: Precision::Fp32,
            tf32: false,
        }
    }
}

/// Everything the trainer needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Networks.
    pub model: ModelConfig,
    /// Optimisation.
    pub optim: OptimConfig,
    /// Run.
    pub train: TrainConfig,
    /// BYOL's settings.
    pub byol: ByolConfig,
}

impl TrainerConfig {
    /// Moves the deprecated `[optim] tau_base` into `[byol] tau_base`, returning a warning
    /// to show when it was set. Both set to different values is an error naming both.
    pub fn resolve_deprecated(&mut self) -> Result<Option<String>, TrainError> {
        let Some(tau) = self.optim.tau_base.take() else {
            return Ok(None);
        };
        if self.byol.tau_base != BYOL_TAU_BASE && self.byol.tau_base != tau {
            return Err(TrainError::Config {
                key: "optim.tau_base",
                reason: format!(
                    "{tau} contradicts byol.tau_base {} (optim.tau_base is deprecated: keep \
                     only byol.tau_base)",
                    self.byol.tau_base
                ),
            });
        }
        self.byol.tau_base = tau;
        Ok(Some(
            "[optim] tau_base is deprecated: write it as [byol] tau_base".to_owned(),
        ))
    }

    /// τ_base of the objective's EMA target (`[byol] tau_base`); `None` for an objective
    /// without one.
    pub fn tau_base(&self) -> Option<f64> {
        match self.train.method {
            Method::Byol => Some(self.byol.tau_base),
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |key: &'static str, reason: String| Err(TrainError::Config { key, reason });
        let m = &self.model;
        if m.width == 0
            || m.projector_hidden == 0
            || m.projection_dim == 0
            || m.predictor_hidden == 0
        {
            return bad("model", "width and MLP sizes must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&m.bn_momentum) {
            return bad(
                "model.bn_momentum",
                format!("{} is outside [0, 1]", m.bn_momentum),
            );
        }
        if m.bn_eps.is_nan() || m.bn_eps <= 0.0 {
            return bad("model.bn_eps", "must be positive".into());
        }
        let o = &self.optim;
        if !(o.base_lr > 0.0 && o.base_lr.is_finite()) {
            return bad("optim.base_lr", format!("{} must be positive", o.base_lr));
        }
        if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            return bad("optim.weight_decay", "must be at least 0".into());
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return bad(
                "optim.momentum",
                format!("{} is outside [0, 1)", o.momentum),
            );
        }
        if o.trust_coefficient.is_nan() || o.trust_coefficient <= 0.0 {
            return bad("optim.trust_coefficient", "must be positive".into());
        }
        if let Some(tau) = o.tau_base.filter(|t| !(0.0..=1.0).contains(t)) {
            return bad("optim.tau_base", format!("{tau} is outside [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.byol.tau_base) {
            return bad(
                "byol.tau_base",
                format!("{} is outside [0, 1]", self.byol.tau_base),
            );
        }
        if m.head_norm == HeadNorm::GroupWs
            && (!m.projector_hidden.is_multiple_of(HEAD_GROUPS)
                || !m.predictor_hidden.is_multiple_of(HEAD_GROUPS))
        {
            return bad(
                "model.head_norm",
                format!(
                    "group_ws needs projector_hidden and predictor_hidden divisible by \
                     {HEAD_GROUPS} (they are {} and {})",
                    m.projector_hidden, m.predictor_hidden
                ),
            );
        }
        if o.nesterov && o.optimizer == OptimizerKind::Sgd && o.momentum == 0.0 {
            return bad(
                "optim.nesterov",
                "Nesterov momentum needs optim.momentum above 0".into(),
            );
        }
        if o.adam_betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad(
                "optim.adam_betas",
                format!("{:?} must be in [0, 1)", o.adam_betas),
            );
        }
        let t = &self.train;
        if t.total_steps == 0 {
            return bad("train.total_steps", "must be at least 1".into());
        }
        if o.warmup_steps >= t.total_steps && o.schedule == Schedule::Cosine {
            return bad(
                "optim.warmup_steps",
                format!(
                    "{} leaves no cosine phase before total_steps {}",
                    o.warmup_steps, t.total_steps
                ),
            );
        }
        if t.log_every == 0 {
            return bad("train.log_every", "must be at least 1".into());
        }
        if t.keep_last == 0 {
            return bad("train.keep_last", "must be at least 1".into());
        }
        crate::device::parse_device(&t.device)?;
        Ok(())
    }
}
