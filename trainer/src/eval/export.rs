//! The online encoder as a torchvision ResNet `state_dict` in safetensors: names
//! without the `encoder.` prefix, torchvision's shapes, and the BatchNorm
//! `num_batches_tracked` counters (int64 scalars) torchvision keeps; no `fc`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::{Encoder, EvalError};
use crate::input::InputSpec;

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

/// The safetensors metadata key holding the encoder's [`InputSpec`] as JSON.
pub const INPUT_METADATA_KEY: &str = "byol.input";

/// Writes [`torchvision_state`] to `out` (temp file, fsync, rename); `input`, the
/// preprocessing the encoder was trained with, goes into the file's metadata under
/// [`INPUT_METADATA_KEY`]. Returns the number of tensors written.
pub fn export_encoder(
    encoder: &Encoder,
    input: Option<&InputSpec>,
    out: &Path,
) -> Result<usize, EvalError> {
    let tensors = torchvision_state(encoder)?;
    let metadata = input.map(|i| {
        HashMap::from([(
            INPUT_METADATA_KEY.to_owned(),
            serde_json::to_string(i).expect("an InputSpec serialises"),
        )])
    });
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| EvalError::Input(format!("serialising {}: {e}", out.display())))?;
    byol_ingest::fsutil::write_atomic(out, &bytes).map_err(|source| EvalError::Io {
        path: out.to_owned(),
        source,
    })?;
    Ok(tensors.len())
}
