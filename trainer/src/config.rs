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

/// How the encoder's convolution weights start (every convolution is followed by
/// BatchNorm, so the choice sets their scale, and with it SGD's effective step on them,
/// lr / ‖w‖², until weight decay brings the norms together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvInit {
    /// Kaiming normal, fan-out, ReLU gain: std √(2 / (k²·c_out)) (He et al. 2015; what
    /// `torchvision.models.resnet*()` sets).
    #[default]
    KaimingNormalFanOut,
    /// PyTorch's `nn.Conv2d` default, Kaiming uniform with a = √5:
    /// U(−1/√(k²·c_in), 1/√(k²·c_in)), 2.4× smaller at c_in = c_out (what a ResNet
    /// written on bare `nn.Conv2d`, as in lightly's and solo-learn's small-image
    /// benchmarks, starts from).
    PytorchDefault,
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
    /// Initialisation of the encoder's convolutions.
    pub conv_init: ConvInit,
    /// Every BatchNorm normalises with the whole data-parallel batch's statistics (not a
    /// file setting: the trainer sets it from `train.sync_bn` when more than one process
    /// trains).
    #[serde(skip)]
    pub synced_bn: bool,
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
            conv_init: ConvInit::KaimingNormalFanOut,
            synced_bn: false,
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
    /// Weight decay (not applied to biases and BatchNorm parameters unless
    /// `decay_norm_and_bias`).
    pub weight_decay: f64,
    /// Apply weight decay (and LARS's trust ratio) to biases and normalisation
    /// parameters too, as a plain `torch.optim` optimizer over `model.parameters()`
    /// does. Off by default: BYOL's LARS (Grill et al. 2020, appendix C) and most
    /// self-supervised recipes exclude them.
    pub decay_norm_and_bias: bool,
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
            decay_norm_and_bias: false,
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
    /// Mean shift (MSF, Koohpayegani et al. 2021): BYOL's heads and a memory bank of
    /// target embeddings, regressing to the mean of the k nearest, `[msf]`.
    Msf,
    /// SimSiam (Chen & He 2021): a bottleneck predictor and stop-gradient, no target,
    /// `[simsiam]`.
    Simsiam,
    /// SimCLR (Chen et al. 2020): NT-Xent over the batch's 2N − 2 negatives, `[simclr]`.
    Simclr,
    /// Barlow Twins (Zbontar et al. 2021): the cross-correlation matrix towards the
    /// identity, `[barlow_twins]`.
    BarlowTwins,
    /// MoCo v2 (Chen et al. 2020): a momentum key encoder and a queue of keys, `[mocov2]`.
    Mocov2,
}

impl Method {
    /// Every method, in the order of the docs.
    pub const ALL: [Method; 6] = [
        Method::Byol,
        Method::Msf,
        Method::Simsiam,
        Method::Simclr,
        Method::BarlowTwins,
        Method::Mocov2,
    ];

    /// The config value, e.g. `byol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Byol => "byol",
            Method::Msf => "msf",
            Method::Simsiam => "simsiam",
            Method::Simclr => "simclr",
            Method::BarlowTwins => "barlow_twins",
            Method::Mocov2 => "mocov2",
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
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
                format!("unknown method {s:?} (known: {})", known.join(", "))
            })
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

/// MSF's settings (`[msf]`; Koohpayegani et al. 2021, their ImageNet defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MsfConfig {
    /// Neighbours k whose mean the online prediction regresses to (k = 1 is BYOL's
    /// one-direction loss).
    pub k: usize,
    /// Memory bank size: target embeddings kept, oldest evicted first.
    pub bank_size: usize,
    /// EMA coefficient of the target (the paper's momentum 0.99).
    pub tau: f64,
    /// τ follows the learning rate's cosine to 1 as BYOL's does (the paper keeps it
    /// constant).
    pub tau_cosine: bool,
}

impl Default for MsfConfig {
    fn default() -> Self {
        MsfConfig {
            k: 5,
            bank_size: 1_024_000,
            tau: 0.99,
            tau_cosine: false,
        }
    }
}

/// SimSiam's settings (`[simsiam]`; Chen & He 2021).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSiamConfig {
    /// The predictor's bottleneck: its hidden size is `projection_dim / bottleneck`
    /// (the paper's 2048 → 512 → 2048 is 4).
    pub bottleneck: usize,
    /// The projections end in a BatchNorm without affine parameters (the paper's
    /// projector ends in BN).
    pub output_bn: bool,
}

impl Default for SimSiamConfig {
    fn default() -> Self {
        SimSiamConfig {
            bottleneck: 4,
            output_bn: true,
        }
    }
}

/// SimCLR's settings (`[simclr]`; Chen et al. 2020).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimClrConfig {
    /// NT-Xent temperature (the paper's ImageNet value 0.1; 0.5 for CIFAR-10).
    pub temperature: f64,
}

impl Default for SimClrConfig {
    fn default() -> Self {
        SimClrConfig { temperature: 0.1 }
    }
}

/// Barlow Twins' settings (`[barlow_twins]`; Zbontar et al. 2021).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BarlowTwinsConfig {
    /// λ: weight of the off-diagonal (redundancy-reduction) term (the paper's 5e-3).
    pub lambda: f64,
}

impl Default for BarlowTwinsConfig {
    fn default() -> Self {
        BarlowTwinsConfig { lambda: 5e-3 }
    }
}

/// MoCo v2's settings (`[mocov2]`; Chen, Fan, Girshick & He 2020).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MocoV2Config {
    /// Queue size K: keys kept as negatives, oldest evicted first.
    pub queue_size: usize,
    /// InfoNCE temperature.
    pub temperature: f64,
    /// EMA coefficient m of the key encoder (constant).
    pub tau: f64,
}

impl Default for MocoV2Config {
    fn default() -> Self {
        MocoV2Config {
            queue_size: 65_536,
            temperature: 0.2,
            tau: 0.999,
        }
    }
}

/// Run settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The objective: `byol`, `msf`, `simsiam`, `simclr`, `barlow_twins` or `mocov2`.
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
    /// Data-parallel training: BatchNorm statistics over the whole global batch, in
    /// forward and backward, in every network (BYOL's cross-replica BatchNorm). No
    /// effect in one process.
    pub sync_bn: bool,
    /// Pretrained weights the encoder starts from (`None`: seeded random init): a
    /// PyTorch checkpoint (zip format) or a safetensors file with torchvision's names
    /// ([`crate::pretrained`]). The heads start fresh and an EMA target copies the
    /// loaded encoder. Applied only when a run starts without checkpoints
    /// ([`crate::Trainer::start_from`]); a resume ignores it, so changing or removing it
    /// never stops a resume. Recorded in every checkpoint's `config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<std::path::PathBuf>,
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
            sync_bn: true,
            init: None,
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
    /// MSF's settings.
    pub msf: MsfConfig,
    /// SimSiam's settings.
    pub simsiam: SimSiamConfig,
    /// SimCLR's settings.
    pub simclr: SimClrConfig,
    /// Barlow Twins' settings.
    pub barlow_twins: BarlowTwinsConfig,
    /// MoCo v2's settings.
    pub mocov2: MocoV2Config,
}

/// An objective's memory of past embeddings (MSF's bank, MoCo's queue): its config key
/// and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize {
    /// The key, e.g. `msf.bank_size`.
    pub key: &'static str,
    /// Entries.
    pub size: usize,
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

    /// The objective's memory of past embeddings, if it has one.
    pub fn memory(&self) -> Option<MemorySize> {
        match self.train.method {
            Method::Msf => Some(MemorySize {
                key: "msf.bank_size",
                size: self.msf.bank_size,
            }),
            Method::Mocov2 => Some(MemorySize {
                key: "mocov2.queue_size",
                size: self.mocov2.queue_size,
            }),
            _ => None,
        }
    }

    /// How the objective's memory fits `records` live records: `Ok(None)` when it fits
    /// (or there is none), `Ok(Some(warning))` when it holds 90% of them or more (its
    /// entries then repeat the same images within a few epochs), an error naming the key
    /// when it is larger (a run over a fixed dataset; the daemon, whose dataset grows,
    /// uses only the filled entries until it fills).
    pub fn check_memory_fits(&self, records: usize) -> Result<Option<String>, TrainError> {
        let Some(m) = self.memory() else {
            return Ok(None);
        };
        if m.size > records {
            return Err(TrainError::Config {
                key: m.key,
                reason: format!(
                    "{} entries is more than the dataset's {records} live records (each \
                     image would be in it more than once): set it below {} (90% of \
                     them), as configs/{}.toml does for larger datasets",
                    m.size,
                    records * 9 / 10,
                    self.train.method
                ),
            });
        }
        Ok((m.size * 10 >= records * 9).then(|| {
            format!(
                "{} = {} is within 10% of the dataset's {records} live records: its entries \
                 are mostly the same images' older embeddings",
                m.key, m.size
            )
        }))
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
        self.validate_objectives()?;
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

    /// Checks every objective's table (all of them, so a bad value is found before a
    /// run switches to its method).
    fn validate_objectives(&self) -> Result<(), TrainError> {
        let bad = |key: &'static str, reason: String| Err(TrainError::Config { key, reason });
        let unit = |key: &'static str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                bad(key, format!("{v} is outside [0, 1]"))
            }
        };
        let positive = |key: &'static str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                bad(key, format!("{v} must be positive"))
            }
        };
        unit("byol.tau_base", self.byol.tau_base)?;
        let msf = &self.msf;
        unit("msf.tau", msf.tau)?;
        if msf.bank_size == 0 {
            return bad("msf.bank_size", "must be at least 1".into());
        }
        if msf.k == 0 || msf.k > msf.bank_size {
            return bad(
                "msf.k",
                format!(
                    "{} must be between 1 and msf.bank_size ({})",
                    msf.k, msf.bank_size
                ),
            );
        }
        let s = &self.simsiam;
        if s.bottleneck == 0 || s.bottleneck > self.model.projection_dim {
            return bad(
                "simsiam.bottleneck",
                format!(
                    "{} must be between 1 and model.projection_dim ({})",
                    s.bottleneck, self.model.projection_dim
                ),
            );
        }
        positive("simclr.temperature", self.simclr.temperature)?;
        let l = self.barlow_twins.lambda;
        if !(l >= 0.0 && l.is_finite()) {
            return bad("barlow_twins.lambda", format!("{l} must be at least 0"));
        }
        let moco = &self.mocov2;
        positive("mocov2.temperature", moco.temperature)?;
        unit("mocov2.tau", moco.tau)?;
        if moco.queue_size == 0 {
            return bad("mocov2.queue_size", "must be at least 1".into());
        }
        Ok(())
    }
}
