//! The online encoder as a torchvision ResNet `state_dict` in safetensors: names
//! without the `encoder.` prefix, torchvision's shapes, and the BatchNorm
//! `num_batches_tracked` counters (int64 scalars) torchvision keeps; no `fc`.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::{Encoder, EvalError};
use crate::model::is_running_stat;

/// The tensors of the export, sorted by name: every encoder tensor under its
/// torchvision name, plus `<bn>.num_batches_tracked` for each BatchNorm (the number of
/// training-mode updates its running statistics had).
pub fn torchvision_state(encoder: &Encoder) -> Result<Vec<(String, Tensor)>, EvalError> {
    let mut out = Vec::new();
    for (name, t) in encoder.named_tensors() {
        if is_running_stat(&name)
            && let Some(bn) = name.strip_suffix(".running_mean")
        {
            let count = i64::try_from(encoder.bn_updates()).unwrap_or(i64::MAX);
            out.push((
                format!("{bn}.num_batches_tracked"),
                Tensor::new(count, &Device::Cpu)?,
            ));
        }
        out.push((name, t.to_device(&Device::Cpu)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes [`torchvision_state`] to `out` (temp file, fsync, rename); returns the
/// number of tensors written.
pub fn export_encoder(encoder: &Encoder, out: &Path) -> Result<usize, EvalError> {
    let tensors = torchvision_state(encoder)?;
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| EvalError::Input(format!("serialising {}: {e}", out.display())))?;
    byol_ingest::fsutil::write_atomic(out, &bytes).map_err(|source| EvalError::Io {
        path: out.to_owned(),
        source,
    })?;
    Ok(tensors.len())
}
