//! Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny 2021): the cross-correlation matrix
//! of the two views' batch-standardised projections is driven towards the identity,
//!
//! `C = z̃1ᵀ·z̃2 / N`, `L = Σ_i (1 − C_ii)² + λ·Σ_{i ≠ j} C_ij²`, λ `[barlow_twins] lambda`
//!
//! (the paper's formula as written, summed over the d×d matrix with no further scale;
//! solo-learn multiplies it by a `scale_loss`, the authors' first code by 1/32).

use candle_core::{DType, Result, Tensor};

use crate::config::TrainerConfig;
use crate::dist::gather_rows;
use crate::loss::batch_standardize;
use crate::model::Network;
use crate::objective::Outcome;

/// ε of the batch standardisation (PyTorch BatchNorm1d's default, as the paper's code).
const STANDARDIZE_EPS: f64 = 1e-5;

/// Barlow Twins: no heads beyond the shared projector, no state.
pub struct BarlowTwins {
    lambda: f64,
}

impl BarlowTwins {
    /// Barlow Twins with `[barlow_twins] lambda`.
    pub fn new(cfg: &TrainerConfig) -> Self {
        BarlowTwins {
            lambda: cfg.barlow_twins.lambda,
        }
    }

    /// Both views through the network; the redundancy-reduction loss.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        let z1 = network.forward_t(v1, true)?;
        let z2 = network.forward_t(v2, true)?;
        // Data-parallel: the cross-correlation of the whole batch, on every rank.
        let (g1, g2) = (gather_rows(&z1)?, gather_rows(&z2)?);
        Ok(Outcome {
            loss: barlow_twins_loss(&g1, &g2, self.lambda)?,
            embeddings: z1.detach(),
            keys: None,
        })
    }
}

/// The Barlow Twins loss of two batches of projections `(n, d)`.
pub fn barlow_twins_loss(z1: &Tensor, z2: &Tensor, lambda: f64) -> Result<Tensor> {
    let n = z1.dim(0)?;
    let d = z1.dim(1)?;
    let a = batch_standardize(&z1.to_dtype(DType::F32)?, STANDARDIZE_EPS)?;
    let b = batch_standardize(&z2.to_dtype(DType::F32)?, STANDARDIZE_EPS)?;
    let c = (a.t()?.matmul(&b)? / n as f64)?;
    let eye = Tensor::eye(d, DType::F32, c.device())?;
    let diagonal = (&c * &eye)?.sum(1)?;
    let on = diagonal.affine(1.0, -1.0)?.sqr()?.sum_all()?;
    let off = (c.sqr()?.sum_all()? - diagonal.sqr()?.sum_all()?)?;
    on + (off * lambda)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn barlow_twins_matches_its_formula_on_a_hand_computed_batch() {
        let dev = Device::Cpu;
        // Two samples: each column standardises to (−1, 1) or (1, −1) (ε aside).
        let z1 = Tensor::new(&[[1f32, 5.0], [3.0, 1.0]], &dev).unwrap();
        let z2 = Tensor::new(&[[0f32, 0.0], [2.0, 4.0]], &dev).unwrap();
        // z̃1 = [[−1, 1], [1, −1]], z̃2 = [[−1, −1], [1, 1]] (scaled by 1/sqrt(1 + ε/var)).
        // C = z̃1ᵀ z̃2 / 2 = [[1, 1], [−1, −1]]·s.
        let s1 = |var: f64| (var / (var + 1e-5)).sqrt();
        let (a0, a1, b0, b1) = (s1(1.0), s1(4.0), s1(1.0), s1(4.0));
        let c = [[a0 * b0, a0 * b1], [-a1 * b0, -a1 * b1]];
        let lambda = 0.25;
        let want = (1.0 - c[0][0]).powi(2)
            + (1.0 - c[1][1]).powi(2)
            + lambda * (c[0][1].powi(2) + c[1][0].powi(2));
        let got = barlow_twins_loss(&z1, &z2, lambda)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
    }
}
