//! Health of the embeddings: the collapse indicator and the effective rank, computed at
//! log steps on one batch of online projections `(n, d)`.

use candle_core::{D, DType, Result, Tensor};
use serde::Serialize;

use crate::loss::collapse_indicator;

/// RankMe's ε, added to each normalised singular value (Garrido et al. 2023).
const RANK_EPS: f64 = 1e-7;

/// The two figures of a batch of embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EmbeddingStats {
    /// Std over the batch of the l2-normalised embeddings, averaged over dimensions,
    /// × √d: about 1 healthy, → 0 collapsed ([`collapse_indicator`]).
    pub collapse: f32,
    /// Effective rank in [1, min(n, d)] ([`effective_rank`]): how many directions the
    /// batch spreads over; a dimensional collapse shows here before the indicator moves.
    pub effective_rank: f32,
}

impl EmbeddingStats {
    /// Both figures of `z` `(n, d)` (read back to the host).
    pub fn of(z: &Tensor) -> Result<Self> {
        Ok(EmbeddingStats {
            collapse: collapse_indicator(z)?,
            effective_rank: effective_rank(z)? as f32,
        })
    }
}

/// Effective rank of `z` `(n, d)` (Roy & Vetterli 2007, as RankMe uses it, Garrido et al.
/// 2023): `exp(−Σ p_k·ln p_k)` with `p_k = σ_k / Σσ + 1e-7` over the singular values
/// `σ_k` of `z`. The singular values are the square roots of the eigenvalues of the Gram
/// matrix `zᵀz` `(d, d)`, found in f64 by nalgebra's symmetric eigensolver. 1 for a
/// rank-one batch, `d` for one spread evenly over every direction.
pub fn effective_rank(z: &Tensor) -> Result<f64> {
    let z = z.detach().to_dtype(DType::F32)?;
    let d = z.dim(D::Minus1)?;
    let gram: Vec<f32> = crate::host::vec1(&z.t()?.matmul(&z)?.flatten_all()?)?;
    let gram = nalgebra::DMatrix::from_iterator(d, d, gram.into_iter().map(f64::from));
    let singular: Vec<f64> = gram
        .symmetric_eigenvalues()
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .collect();
    let total: f64 = singular.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return Ok(if total == 0.0 { 1.0 } else { f64::NAN });
    }
    let entropy: f64 = singular
        .iter()
        .map(|s| {
            let p = s / total + RANK_EPS;
            -p * p.ln()
        })
        .sum();
    Ok(entropy.exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn effective_rank_counts_equal_directions() {
        let dev = Device::Cpu;
        // Rows along 3 orthogonal axes with equal energy: rank 3.
        let mut rows = vec![0f32; 6 * 8];
        for i in 0..6 {
            rows[i * 8 + i % 3] = if i < 3 { 1.0 } else { -1.0 };
        }
        let z = Tensor::from_vec(rows, (6, 8), &dev).unwrap();
        let r = effective_rank(&z).unwrap();
        assert!((r - 3.0).abs() < 1e-3, "{r}");
        // One direction: rank 1.
        let z = Tensor::new(&[[1f32, 2.0], [2.0, 4.0], [-1.0, -2.0]], &dev).unwrap();
        let r = effective_rank(&z).unwrap();
        assert!((r - 1.0).abs() < 1e-3, "{r}");
        // Unequal energies (singular values 3 and 1): exp(H(0.75, 0.25)) ≈ 1.7548.
        let z = Tensor::new(&[[3f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let r = effective_rank(&z).unwrap();
        let h: f64 = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!((r - h.exp()).abs() < 1e-5, "{r} vs {}", h.exp());
        // Gaussian rows in 16 dimensions: close to 16.
        let z = Tensor::randn(0f32, 1.0, (4096, 16), &dev).unwrap();
        let r = effective_rank(&z).unwrap();
        assert!((15.0..=16.0).contains(&r), "{r}");
    }
}
