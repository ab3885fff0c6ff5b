//! Losses shared by objectives (l2 normalisation, BYOL's regression loss, batch
//! standardisation) and the collapse indicator.

use candle_core::{D, Result, Tensor};

/// Rows of `x` scaled to unit l2 norm (ε-guarded like `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f32::MAX)?;
    x.broadcast_div(&norm)
}

/// Each column of `(n, d)` standardised over the batch: `(x − mean) / sqrt(var + eps)`
/// with the biased variance (BatchNorm in training mode without affine parameters, as
/// SimSiam's output BN and Barlow Twins' normalisation).
pub fn batch_standardize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(0)?)?;
    let var = centred.sqr()?.mean_keepdim(0)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `2 − 2·cos(p, z)` per row, averaged over the batch.
pub fn regression_loss(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    let cos = (l2_normalize(p)? * l2_normalize(z)?)?.sum(D::Minus1)?;
    (cos.affine(-2.0, 2.0))?.mean_all()
}

/// The symmetric loss: `L(p1, z2) + L(p2, z1)`, target projections detached.
pub fn byol_loss(
    p1: &Tensor,
    p2: &Tensor,
    z1_target: &Tensor,
    z2_target: &Tensor,
) -> Result<Tensor> {
    regression_loss(p1, &z2_target.detach())? + regression_loss(p2, &z1_target.detach())?
}

/// Std over the batch of l2-normalised projections, averaged over dimensions, times
/// √d: about 1 for a healthy representation, → 0 when it collapses.
pub fn collapse_indicator(z: &Tensor) -> Result<f32> {
    let d = z.dim(D::Minus1)? as f64;
    let zn = l2_normalize(&z.detach())?;
    let mean = zn.mean_keepdim(0)?;
    let var = zn.broadcast_sub(&mean)?.sqr()?.mean(0)?;
    let std = crate::host::scalar::<f32>(&var.sqrt()?.mean_all()?)?;
    Ok(std * d.sqrt() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn loss_matches_the_formula_on_hand_made_vectors() {
        let dev = Device::Cpu;
        // Row 0: same direction (cos 1 → 0); row 1: orthogonal (cos 0 → 2).
        let p = Tensor::new(&[[3f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let z = Tensor::new(&[[1f32, 0.0], [5.0, 0.0]], &dev).unwrap();
        let l = regression_loss(&p, &z).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - 1.0).abs() < 1e-6, "{l}");
        // Opposite directions: 4.
        let l = regression_loss(
            &p.neg().unwrap(),
            &Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &dev).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!((l - 4.0).abs() < 1e-6, "{l}");
        let s = byol_loss(&p, &p, &z, &z)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((s - 2.0).abs() < 1e-6, "sum of both directions: {s}");
    }

    #[test]
    fn collapse_indicator_is_zero_for_identical_rows() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 2.0, 3.0], [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], &dev).unwrap();
        assert!(collapse_indicator(&z).unwrap().abs() < 1e-6);
        let z = Tensor::randn(0f32, 1.0, (512, 64), &dev).unwrap();
        let c = collapse_indicator(&z).unwrap();
        assert!((0.9..1.1).contains(&c), "random directions: {c}");
    }
}
