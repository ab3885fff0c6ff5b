//! The online encoder as a torchvision ResNet `state_dict` in safetensors: names
//! without the `encoder.` prefix, torchvision's shapes, and the BatchNorm
//! `num_batches_tracked` counters (int64 scalars) torchvision keeps; no `fc`.

use std::path::Path;

use candle_core::Tensor;

use super::{Encoder, EvalError};

/// The tensors of the export, sorted by name: every encoder tensor under its
/// torchvision name, `<bn>.num_batches_tracked` included (each BatchNorm's own count
/// of training-mode forwards).
pub fn torchvision_state(encoder: &Encoder) -> Result<Vec<(String, Tensor)>, EvalError> {
    encoder
        .named_tensors()
        .into_iter()
        .map(|(name, t)| Ok((name, crate::host::to_cpu(&t)?)))
        .collect()
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
