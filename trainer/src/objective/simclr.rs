//! SimCLR (Chen, Kornblith, Norouzi & Hinton 2020): the NT-Xent loss. For each of the
//! 2N projections, its positive is the other view of the same image and its negatives
//! are the other 2N − 2 projections of the batch:
//!
//! `ℓ(i, j) = −log( exp(sim(z_i, z_j)/T) / Σ_{k ≠ i} exp(sim(z_i, z_k)/T) )`,
//! `L = (1/2N)·Σ_i ℓ(i, pos(i))`, `sim` the cosine, T `[simclr] temperature`
//!
//! (the paper's convention, averaged over all 2N anchors as solo-learn and lightly do).

use candle_core::{D, DType, Result, Tensor};

use crate::config::TrainerConfig;
use crate::dist::gather_rows;
use crate::loss::l2_normalize;
use crate::model::Network;
use crate::objective::Outcome;

/// SimCLR: no heads beyond the shared projector, no state.
pub struct SimClr {
    temperature: f64,
}

impl SimClr {
    /// SimCLR with `[simclr] temperature`.
    pub fn new(cfg: &TrainerConfig) -> Self {
        SimClr {
            temperature: cfg.simclr.temperature,
        }
    }

    /// Both views through the network; NT-Xent over the batch.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        let z1 = network.forward_t(v1, true)?;
        let z2 = network.forward_t(v2, true)?;
        // Data-parallel: every rank computes the loss over the whole batch's anchors.
        let (g1, g2) = (gather_rows(&z1)?, gather_rows(&z2)?);
        Ok(Outcome {
            loss: nt_xent(&g1, &g2, self.temperature)?,
            embeddings: z1.detach(),
            keys: None,
        })
    }
}

/// NT-Xent of two batches of projections `(n, d)` (row i of each is the same image) at
/// temperature `t`, averaged over the 2n anchors.
pub fn nt_xent(z1: &Tensor, z2: &Tensor, t: f64) -> Result<Tensor> {
    let n = z1.dim(0)?;
    let z = l2_normalize(&Tensor::cat(&[z1, z2], 0)?.to_dtype(DType::F32)?)?;
    let logits = (z.matmul(&z.t()?)? / t)?;
    // Each anchor's own similarity leaves the denominator.
    let diagonal = Tensor::eye(2 * n, DType::F32, z.device())?;
    let masked = (&logits + (diagonal * -1e9)?)?;
    // The positive of row i is row i + n (mod 2n): the same image's other view.
    let other = Tensor::cat(&[&z.narrow(0, n, n)?, &z.narrow(0, 0, n)?], 0)?;
    let positive = ((z * other)?.sum(D::Minus1)? / t)?;
    (log_sum_exp(&masked)? - positive)?.mean_all()
}

/// `log Σ_j exp(x_ij)` of each row of `(m, c)` logits, stable (the row's max taken out).
pub fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    (sum.log()? + max)?.squeeze(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nt_xent_matches_its_formula_on_a_hand_computed_batch() {
        let dev = Device::Cpu;
        // Two images of unit rows: z1 = [e0, e1], z2 = [(0.6, 0.8), −e0].
        let (c, s) = (0.6f32, 0.8f32);
        let z1 = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let z2 = Tensor::new(&[[c, s], [-1.0, 0.0]], &dev).unwrap();
        let t = 0.5;
        let got = nt_xent(&z1, &z2, t).unwrap().to_scalar::<f32>().unwrap() as f64;
        let rows = [[1.0, 0.0], [0.0, 1.0], [c as f64, s as f64], [-1.0, 0.0]];
        let dot = |a: [f64; 2], b: [f64; 2]| a[0] * b[0] + a[1] * b[1];
        let mut want = 0.0;
        for i in 0..4 {
            let pos = (i + 2) % 4;
            let denom: f64 = (0..4)
                .filter(|&k| k != i)
                .map(|k| (dot(rows[i], rows[k]) / t).exp())
                .sum();
            want += -((dot(rows[i], rows[pos]) / t).exp() / denom).ln();
        }
        want /= 4.0;
        assert!((got - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
    }
}
