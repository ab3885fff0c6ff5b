//! Pretrained weights for the encoder (`[train] init`): a PyTorch checkpoint (the zip
//! format `torch.save` writes since PyTorch 1.6) or a safetensors file, with torchvision's
//! ResNet names.
//!
//! - The format is told by the file's first bytes, not its name: a zip (`PK\x03\x04`) is
//!   read with candle's pickle reader, a legacy PyTorch file (a bare pickle) is refused
//!   with how to re-save it, a safetensors file is read as such.
//! - Wrappers are taken off: a `state_dict` (or `model`) entry of a PyTorch checkpoint,
//!   and name prefixes made of `module.` (DDP), `_orig_mod.` (`torch.compile`),
//!   `state_dict.`, `model.`, `encoder.` (ours, solo-learn) and `backbone.` (solo-learn,
//!   lightly): the prefix is the one in front of `conv1.weight`. Tensors outside it (a
//!   projector, a predictor, a classifier) and `fc.*` are left out.
//! - A one-channel `conv1.weight` (grayscale-trained weights) becomes three channels of a
//!   third each, so a gray image (R = G = B) gives the features the gray model gave.
//! - BatchNorm's running statistics and `num_batches_tracked` (int64) come with the
//!   weights; a file without `num_batches_tracked` (written before PyTorch 0.4.1)
//!   leaves those counters at 0, as PyTorch's own loader does.
//! - Every tensor is checked before any is set: a missing or misshapen one, or one of
//!   another architecture (a `layer3.6.*` of a deeper ResNet), refuses the file,
//!   naming the first (in name order) and what the model expects.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::TrainError;
use crate::config::{Arch, ModelConfig};

/// The first bytes of a zip archive (PyTorch's default checkpoint format).
pub const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";

/// Name components a wrapper puts in front of the encoder's names.
const WRAPPERS: [&str; 6] = [
    "module",
    "_orig_mod",
    "state_dict",
    "model",
    "encoder",
    "backbone",
];

/// Entries of a PyTorch checkpoint that may hold the `state_dict`, tried in turn when its
/// top level holds no tensors.
const STATE_KEYS: [&str; 3] = ["state_dict", "model", "module"];

/// The tensor whose prefix tells the wrapper.
const ANCHOR: &str = "conv1.weight";

/// Why a file of pretrained weights is refused ([`TrainError::Init`]).
#[derive(Debug, thiserror::Error)]
pub enum InitProblem {
    /// A PyTorch checkpoint in the legacy (pre-1.6, non-zip) format.
    #[error(
        "a PyTorch checkpoint in the legacy format (not a zip archive), which byol does not \
         read; re-save it with PyTorch 1.6 or later: `torch.save(torch.load(OLD), NEW)` \
         (the zip format, `_use_new_zipfile_serialization=True`)"
    )]
    LegacyPytorch,
    /// Neither a PyTorch zip checkpoint nor safetensors.
    #[error("neither a PyTorch checkpoint (.pth/.pt, zip format) nor a safetensors file")]
    UnknownFormat,
    /// The file does not parse.
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// No tensor in the file.
    #[error(
        "holds no tensors (for a PyTorch checkpoint: none at the top level, nor under {STATE_KEYS:?})"
    )]
    Empty,
    /// Several prefixes in front of `conv1.weight`: which encoder is meant is unclear.
    #[error("holds several encoders (conv1.weight under the prefixes {0:?}); keep one")]
    Ambiguous(Vec<String>),
    /// A tensor stored as a view into a larger storage, or strided.
    #[error(
        "{0} is stored as a view into a larger tensor, which byol does not read; re-save \
         the state_dict with every tensor cloned (`{{k: v.clone() for k, v in sd.items()}}`)"
    )]
    View(String),
    /// A tensor of the model is not in the file.
    #[error("{name} is missing; the model ({model}) expects it with shape {expected:?}")]
    Missing {
        /// The tensor (as the file would name it).
        name: String,
        /// Its shape in the model.
        expected: Vec<usize>,
        /// The model.
        model: String,
    },
    /// A tensor has another shape than the model's.
    #[error("{name} has shape {found:?}; the model ({model}) expects {expected:?}")]
    Shape {
        /// The tensor, as the file names it.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The model's.
        expected: Vec<usize>,
        /// The model.
        model: String,
    },
    /// An encoder tensor the model does not have (another depth or block).
    #[error("{name} is not a tensor of the model ({model}): weights of another architecture")]
    Unexpected {
        /// The tensor, as the file names it.
        name: String,
        /// The model.
        model: String,
    },
}

/// What loading pretrained weights did.
#[derive(Debug, Clone, PartialEq)]
pub struct InitReport {
    /// The file.
    pub path: PathBuf,
    /// `pytorch` or `safetensors`.
    pub format: &'static str,
    /// The wrapper prefix taken off the names (`""` for none).
    pub prefix: String,
    /// Encoder tensors set.
    pub loaded: usize,
    /// Tensors of the file left out (`fc.*`, heads, anything outside the prefix).
    pub ignored: usize,
    /// `conv1.weight` was one-channel and was expanded to RGB.
    pub gray_expanded: bool,
    /// BatchNorm layers without `num_batches_tracked` in the file (left at 0).
    pub counters_missing: usize,
}

impl std::fmt::Display for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "encoder initialised from {} ({}, {} tensors",
            self.path.display(),
            self.format,
            self.loaded
        )?;
        if !self.prefix.is_empty() {
            write!(f, " under {:?}", self.prefix)?;
        }
        if self.ignored > 0 {
            write!(f, "; {} others left out", self.ignored)?;
        }
        if self.gray_expanded {
            write!(f, "; one-channel conv1 expanded to RGB")?;
        }
        if self.counters_missing > 0 {
            write!(
                f,
                "; {} BatchNorm counters missing, left at 0",
                self.counters_missing
            )?;
        }
        write!(f, ")")
    }
}

/// The tensors of a weights file, by the names the file gives them, on the CPU.
#[derive(Debug)]
pub struct WeightsFile {
    /// The file.
    pub path: PathBuf,
    /// `pytorch` or `safetensors`.
    pub format: &'static str,
    /// Its tensors.
    pub tensors: HashMap<String, Tensor>,
}

fn refuse(path: &Path, problem: InitProblem) -> TrainError {
    TrainError::Init {
        path: path.to_owned(),
        problem: Box::new(problem),
    }
}

/// Reads the tensors of `path`, a PyTorch zip checkpoint or a safetensors file (told by
/// its first bytes), onto the CPU.
///
/// Errors: the file cannot be read ([`TrainError::Io`]); a legacy PyTorch file, another
/// format, a file that does not parse, one without tensors, a tensor stored as a view
/// ([`TrainError::Init`]).
pub fn read_weights(path: &Path) -> Result<WeightsFile, TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]).map_err(io)? {
            0 => break,
            n => got += n,
        }
    }
    let head = &head[..got];
    let (format, tensors) = if head.starts_with(&ZIP_MAGIC) {
        ("pytorch", read_pth(path)?)
    } else if head.first() == Some(&0x80) {
        // A pickle (protocol 2+): what `torch.save` wrote before the zip format.
        return Err(refuse(path, InitProblem::LegacyPytorch));
    } else if head.len() == 9 && head[8] == b'{' {
        // safetensors: an 8-byte little-endian header length, then the JSON header.
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| refuse(path, InitProblem::Unreadable(e.to_string())))?;
        ("safetensors", tensors)
    } else {
        return Err(refuse(path, InitProblem::UnknownFormat));
    };
    if tensors.is_empty() {
        return Err(refuse(path, InitProblem::Empty));
    }
    Ok(WeightsFile {
        path: path.to_owned(),
        format,
        tensors,
    })
}

/// The tensors of a PyTorch zip checkpoint: its top-level dict, else the first of
/// [`STATE_KEYS`] that holds tensors.
fn read_pth(path: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    use candle_core::pickle::PthTensors;
    let unreadable = |e: candle_core::Error| refuse(path, InitProblem::Unreadable(e.to_string()));
    let mut pth = PthTensors::new(path, None).map_err(unreadable)?;
    for key in STATE_KEYS {
        if !pth.tensor_infos().is_empty() {
            break;
        }
        if let Ok(inner) = PthTensors::new(path, Some(key)) {
            pth = inner;
        }
    }
    let mut out = HashMap::new();
    for (name, info) in pth.tensor_infos() {
        // candle reads a tensor's bytes from the start of its storage only.
        if info.layout.start_offset() != 0 || !info.layout.is_contiguous() {
            return Err(refuse(path, InitProblem::View(name.clone())));
        }
        let t = pth
            .get(name)
            .map_err(unreadable)?
            .ok_or_else(|| refuse(path, InitProblem::Unreadable(format!("{name} vanished"))))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// The prefix in front of `conv1.weight` made only of [`WRAPPERS`] (`""` when the names
/// are bare or no such tensor is there).
fn wrapper_prefix(file: &WeightsFile) -> Result<String, TrainError> {
    let mut prefixes: Vec<String> = file
        .tensors
        .keys()
        .filter_map(|n| n.strip_suffix(ANCHOR))
        .filter(|p| {
            p.is_empty()
                || p.strip_suffix('.')
                    .is_some_and(|p| p.split('.').all(|c| WRAPPERS.contains(&c)))
        })
        .map(str::to_owned)
        .collect();
    prefixes.sort();
    match prefixes.len() {
        0 => Ok(String::new()),
        1 => Ok(prefixes.pop().expect("one")),
        _ => Err(refuse(&file.path, InitProblem::Ambiguous(prefixes))),
    }
}

/// True for names of a ResNet encoder's tensors (stem and stages): what another
/// architecture's file holds that the model may lack.
fn is_encoder_name(name: &str) -> bool {
    let first = name.split('.').next().unwrap_or("");
    first == "conv1" || first == "bn1" || first.starts_with("layer")
}

/// The model in words, for errors: `resnet50, width 64, ImageNet stem`.
pub fn describe_model(cfg: &ModelConfig) -> String {
    let arch = match cfg.arch {
        Arch::Resnet18 => "resnet18",
        Arch::Resnet50 => "resnet50",
    };
    let stem = if cfg.small_stem {
        "small-image stem (3x3 conv, no max-pool)"
    } else {
        "ImageNet stem (7x7/2 conv, max-pool)"
    };
    format!("{arch}, width {}, {stem}", cfg.width)
}

/// Sets the encoder variables `vars` (torchvision names: `conv1.weight`, ...) of a
/// model of `cfg` from `file`. Every tensor is checked first (names, shapes, the
/// architecture); nothing is set unless all fit.
///
/// Errors: [`TrainError::Init`] naming the first tensor that does not fit and what the
/// model expects; a tensor operation.
pub fn load_encoder(
    file: &WeightsFile,
    vars: &[(String, Var)],
    cfg: &ModelConfig,
) -> Result<InitReport, TrainError> {
    let path = &file.path;
    let model = describe_model(cfg);
    let prefix = wrapper_prefix(file)?;
    let mut ignored = 0;
    let mut ours: BTreeMap<&str, &Tensor> = BTreeMap::new();
    for (name, t) in &file.tensors {
        match name.strip_prefix(prefix.as_str()) {
            Some(n) if !n.starts_with("fc.") => {
                ours.insert(n, t);
            }
            _ => ignored += 1,
        }
    }
    let expected: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    // Encoder tensors of another architecture first (a deeper ResNet holds every tensor
    // of a shallower one), then anything else outside the model is left out.
    let mut extra = Vec::new();
    for name in ours.keys() {
        if !expected.contains_key(name) {
            if is_encoder_name(name) {
                return Err(refuse(
                    path,
                    InitProblem::Unexpected {
                        name: format!("{prefix}{name}"),
                        model,
                    },
                ));
            }
            extra.push(*name);
        }
    }
    for name in extra {
        ours.remove(name);
        ignored += 1;
    }
    let mut sorted: Vec<&(String, Var)> = vars.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut plan: Vec<(&Var, Tensor)> = Vec::with_capacity(sorted.len());
    let (mut gray_expanded, mut counters_missing) = (false, 0);
    for (name, var) in sorted {
        let Some(&t) = ours.get(name.as_str()) else {
            if name.ends_with(".num_batches_tracked") {
                counters_missing += 1;
                continue;
            }
            return Err(refuse(
                path,
                InitProblem::Missing {
                    name: format!("{prefix}{name}"),
                    expected: var.dims().to_vec(),
                    model,
                },
            ));
        };
        let mut t = t.clone();
        // Grayscale-trained weights: each RGB channel takes a third of the gray filter.
        if name == ANCHOR && t.rank() == 4 && t.dim(1)? == 1 && var.rank() == 4 && var.dim(1)? == 3
        {
            t = (t.to_dtype(DType::F32)?.repeat((1, 3, 1, 1))? / 3.0)?;
            gray_expanded = true;
        }
        if t.dims() != var.dims() {
            return Err(refuse(
                path,
                InitProblem::Shape {
                    name: format!("{prefix}{name}"),
                    found: t.dims().to_vec(),
                    expected: var.dims().to_vec(),
                    model,
                },
            ));
        }
        let t = t
            .to_dtype(var.dtype())?
            .to_device(var.device())?
            .contiguous()?;
        plan.push((var, t));
    }
    let loaded = plan.len();
    for (var, t) in plan {
        var.set(&t)?;
    }
    Ok(InitReport {
        path: path.clone(),
        format: file.format,
        prefix,
        loaded,
        ignored,
        gray_expanded,
        counters_missing,
    })
}

/// Checks that `path` holds weights for an encoder of `cfg` (read, mapped, every shape
/// checked) without training anything: what a run does before it writes to its folder.
///
/// Errors: as [`read_weights`] and [`load_encoder`].
pub fn check_file(path: &Path, cfg: &ModelConfig) -> Result<InitReport, TrainError> {
    let file = read_weights(path)?;
    let vars = candle_nn::VarMap::new();
    let compute = crate::model::Compute::new(crate::config::Kernels::Candle, Default::default());
    crate::model::ResNet::new(
        cfg,
        compute,
        candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )?;
    load_encoder(&file, &crate::model::sorted(&vars), cfg)
}
