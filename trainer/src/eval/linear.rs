//! The linear probe: features standardised and decorrelated with the training split's
//! statistics, a multinomial logistic regression fitted by accelerated gradient descent,
//! its L2 strength chosen on a seeded held-out part of the training split, then refitted
//! on the whole training split and scored on the test split.

use candle_core::{D, DType, Device, Tensor};
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use super::{EvalError, Features};

/// Per-dimension standardisation `(x - mean) / std` (a constant dimension keeps std 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl Standardizer {
    /// Mean and std of each column of the row-major `(n, dim)` `values`.
    pub fn fit(values: &[f32], dim: usize) -> Self {
        let n = (values.len() / dim.max(1)).max(1) as f64;
        let mut sum = vec![0f64; dim];
        let mut sq = vec![0f64; dim];
        for row in values.chunks_exact(dim) {
            for ((s, q), &x) in sum.iter_mut().zip(&mut sq).zip(row) {
                *s += f64::from(x);
                *q += f64::from(x) * f64::from(x);
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let inv_std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| {
                let var = (q / n - m * m).max(0.0);
                if var > 1e-12 {
                    (1.0 / var.sqrt()) as f32
                } else {
                    1.0
                }
            })
            .collect();
        Standardizer {
            mean: mean.iter().map(|&m| m as f32).collect(),
            inv_std,
        }
    }

    /// Standardises the rows of `values` in place.
    pub fn apply(&self, values: &mut [f32]) {
        for row in values.chunks_exact_mut(self.mean.len()) {
            for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.inv_std) {
                *x = (*x - m) * s;
            }
        }
    }
}

/// Standardisation followed by decorrelation: `x ↦ L⁻¹ · standardised(x)`, `L Lᵀ` the
/// Cholesky factor of the standardised training features' covariance (plus a small
/// ridge). Encoder features are strongly correlated; decorrelated, the probe's gradient
/// descent is well conditioned and converges in a few hundred steps instead of
/// stopping short of the optimum. The classifier stays linear in the features.
#[derive(Debug, Clone)]
pub struct Whitener {
    std: Standardizer,
    /// `(L⁻¹)ᵀ`, row-major `dim × dim`: rows are multiplied by it.
    inv_lt: Vec<f32>,
    dim: usize,
}

impl Whitener {
    /// Fits on the row-major `(n, dim)` training `values`.
    pub fn fit(values: &[f32], dim: usize) -> Result<Self, EvalError> {
        let std = Standardizer::fit(values, dim);
        let mut x = values.to_vec();
        std.apply(&mut x);
        let n = x.len() / dim.max(1);
        let xs = Tensor::from_vec(x, (n, dim), &Device::Cpu)?;
        let cov: Vec<f32> =
            crate::host::vec1(&(xs.t()?.matmul(&xs)? / n.max(1) as f64)?.flatten_all()?)?;
        let cov: Vec<f64> = cov.into_iter().map(f64::from).collect();
        // A ridge keeps constant or collinear dimensions from breaking the factorisation.
        let mut ridge = 1e-4;
        let l = loop {
            if let Some(l) = cholesky(&cov, dim, ridge) {
                break l;
            }
            ridge *= 10.0;
            if ridge > 1.0 {
                return Err(EvalError::Input(
                    "feature covariance is not positive definite".into(),
                ));
            }
        };
        let inv = lower_inverse(&l, dim);
        let mut inv_lt = vec![0f32; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                inv_lt[j * dim + i] = inv[i * dim + j] as f32;
            }
        }
        Ok(Whitener { std, inv_lt, dim })
    }

    /// Standardises and decorrelates the rows of `values`.
    pub fn apply(&self, values: &mut Vec<f32>) -> Result<(), EvalError> {
        self.std.apply(values);
        let n = values.len() / self.dim.max(1);
        let x = Tensor::from_slice(values, (n, self.dim), &Device::Cpu)?;
        let m = Tensor::from_slice(&self.inv_lt, (self.dim, self.dim), &Device::Cpu)?;
        *values = crate::host::vec1(&x.matmul(&m)?.flatten_all()?)?;
        Ok(())
    }
}

/// Lower-triangular `L` with `L Lᵀ = a + ridge·I` (row-major `d × d`), or `None` when the
/// matrix is not positive definite.
fn cholesky(a: &[f64], d: usize, ridge: f64) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = a[i * d + i] + ridge - dot;
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - dot) / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// Inverse of a lower-triangular matrix (row-major `d × d`), by forward substitution.
fn lower_inverse(l: &[f64], d: usize) -> Vec<f64> {
    let mut inv = vec![0f64; d * d];
    for col in 0..d {
        for i in col..d {
            let rhs = if i == col { 1.0 } else { 0.0 };
            let dot: f64 = (col..i).map(|k| l[i * d + k] * inv[k * d + col]).sum();
            inv[i * d + col] = (rhs - dot) / l[i * d + i];
        }
    }
    inv
}

/// A multinomial logistic regression: `softmax(x · W + b)`.
#[derive(Debug, Clone)]
pub struct LogisticRegression {
    dim: usize,
    classes: usize,
    /// `(dim + 1, classes)`, the last row is the bias.
    weights: Tensor,
    iterations: usize,
}

fn with_bias(x: &[f32], n: usize, dim: usize) -> Result<Tensor, EvalError> {
    let x = Tensor::from_slice(x, (n, dim), &Device::Cpu)?;
    let ones = Tensor::ones((n, 1), DType::F32, &Device::Cpu)?;
    Ok(Tensor::cat(&[&x, &ones], 1)?)
}

fn check(x: &[f32], labels: &[u32], dim: usize, classes: usize) -> Result<(), EvalError> {
    if dim == 0 || labels.is_empty() || x.len() != labels.len() * dim {
        return Err(EvalError::Input(format!(
            "{} values for {} labels of dimension {dim}",
            x.len(),
            labels.len()
        )));
    }
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(EvalError::Input(format!(
            "label {l} is outside {classes} classes"
        )));
    }
    Ok(())
}

impl LogisticRegression {
    /// Minimises mean cross-entropy + `l2 / 2 · ‖W‖²` (the bias is not penalised) over
    /// the row-major `(n, dim)` `x`, starting from zero, by Nesterov-accelerated
    /// gradient descent with step `1 / L` (L from the Böhning bound `½ λmax(XᵀX / n) +
    /// l2`) and gradient restarts; stops after `max_iters` or when the gradient norm
    /// falls under 1e-5. Deterministic.
    pub fn fit(
        x: &[f32],
        labels: &[u32],
        dim: usize,
        classes: usize,
        l2: f64,
        max_iters: usize,
    ) -> Result<Self, EvalError> {
        check(x, labels, dim, classes)?;
        if !(l2 >= 0.0 && l2.is_finite()) {
            return Err(EvalError::Input(format!("L2 strength {l2} must be >= 0")));
        }
        let n = labels.len();
        let xb = with_bias(x, n, dim)?;
        let xt = xb.t()?.contiguous()?;
        let mut onehot = vec![0f32; n * classes];
        for (i, &l) in labels.iter().enumerate() {
            onehot[i * classes + l as usize] = 1.0;
        }
        let y = Tensor::from_vec(onehot, (n, classes), &Device::Cpu)?;
        let mut mask = vec![1f32; (dim + 1) * classes];
        mask[dim * classes..].fill(0.0);
        let mask = (Tensor::from_vec(mask, (dim + 1, classes), &Device::Cpu)? * l2)?;
        let lipschitz = 0.5 * top_eigenvalue(&xb, &xt, n)? * 1.05 + l2;
        let step = 1.0 / lipschitz;
        let inv_n = 1.0 / n as f64;
        let grad = |w: &Tensor| -> Result<Tensor, EvalError> {
            let p = candle_nn::ops::softmax_last_dim(&xb.matmul(w)?)?;
            let g = (xt.matmul(&(p - &y)?)? * inv_n)?;
            Ok((g + (w * &mask)?)?)
        };
        let mut w = Tensor::zeros((dim + 1, classes), DType::F32, &Device::Cpu)?;
        let mut z = w.clone();
        let mut t = 1f64;
        let mut iterations = 0;
        while iterations < max_iters {
            let g = grad(&z)?;
            iterations += 1;
            if crate::host::scalar::<f32>(&g.sqr()?.sum_all()?)?.sqrt() < 1e-5 {
                w = z;
                break;
            }
            let next = (&z - (&g * step)?)?;
            let delta = (&next - &w)?;
            // Restart the momentum when it points uphill (O'Donoghue & Candès).
            if crate::host::scalar::<f32>(&(&g * &delta)?.sum_all()?)? > 0.0 {
                t = 1.0;
            }
            let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
            z = (&next + (&delta * ((t - 1.0) / t_next))?)?;
            w = next;
            t = t_next;
        }
        Ok(LogisticRegression {
            dim,
            classes,
            weights: w,
            iterations,
        })
    }

    /// Gradient evaluations the fit took.
    pub fn iterations(&self) -> usize {
        self.iterations
    }

    /// The fitted parameters, row-major `(dim + 1, classes)`: the weights, then the
    /// bias as the last row.
    pub fn weights(&self) -> Result<Vec<f32>, EvalError> {
        Ok(crate::host::vec1(&self.weights.flatten_all()?)?)
    }

    /// Most probable class of each row of `x`.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<u32>, EvalError> {
        if !x.len().is_multiple_of(self.dim) {
            return Err(EvalError::Input(format!(
                "{} values are not rows of {}",
                x.len(),
                self.dim
            )));
        }
        let n = x.len() / self.dim;
        if n == 0 {
            return Ok(Vec::new());
        }
        let logits = with_bias(x, n, self.dim)?.matmul(&self.weights)?;
        Ok(crate::host::vec1::<u32>(&logits.argmax(D::Minus1)?)?)
    }

    /// Fraction of rows of `x` predicted as their label.
    pub fn accuracy(&self, x: &[f32], labels: &[u32]) -> Result<f64, EvalError> {
        check(x, labels, self.dim, self.classes)?;
        Ok(accuracy(&self.predict(x)?, labels))
    }
}

/// Largest eigenvalue of `XᵀX / n` by power iteration.
fn top_eigenvalue(xb: &Tensor, xt: &Tensor, n: usize) -> Result<f64, EvalError> {
    let d = xb.dim(1)?;
    // A fixed, non-degenerate start vector.
    let start: Vec<f32> = (0..d).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
    let mut v = Tensor::from_vec(start, (d, 1), &Device::Cpu)?;
    let mut lambda = 0f64;
    for _ in 0..50 {
        let u = (xt.matmul(&xb.matmul(&v)?)? / n as f64)?;
        let norm = f64::from(crate::host::scalar::<f32>(&u.sqr()?.sum_all()?)?.sqrt());
        if norm == 0.0 {
            return Ok(1.0);
        }
        let v_norm = f64::from(crate::host::scalar::<f32>(&v.sqr()?.sum_all()?)?.sqrt());
        lambda = norm / v_norm;
        v = (u / norm)?;
    }
    Ok(lambda.max(1e-6))
}

/// Fraction of equal entries.
pub(crate) fn accuracy(predicted: &[u32], labels: &[u32]) -> f64 {
    let right = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    right as f64 / labels.len().max(1) as f64
}

/// Settings of [`linear_probe`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// L2 strengths tried on the held-out part.
    pub l2_grid: Vec<f64>,
    /// Fraction of the training split held out for the search.
    pub holdout: f64,
    /// Gradient steps per fit.
    pub max_iters: usize,
    /// Seed of the held-out split.
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            l2_grid: vec![1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
            holdout: 0.1,
            max_iters: 300,
            seed: 0,
        }
    }
}

/// What [`linear_probe`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeResult {
    /// Top-1 accuracy on the test split.
    pub accuracy: f64,
    /// Top-1 accuracy on the training split (the refitted classifier).
    pub train_accuracy: f64,
    /// The chosen L2 strength.
    pub l2: f64,
    /// Held-out accuracy of each L2 strength tried.
    pub search: Vec<(f64, f64)>,
}

/// Rows `idx` of the row-major `values` (`dim` per row) and their labels.
fn rows(values: &[f32], labels: &[u32], dim: usize, idx: &[usize]) -> (Vec<f32>, Vec<u32>) {
    let mut x = Vec::with_capacity(idx.len() * dim);
    for &i in idx {
        x.extend_from_slice(&values[i * dim..(i + 1) * dim]);
    }
    (x, idx.iter().map(|&i| labels[i]).collect())
}

/// Linear probe: standardise and decorrelate with the training split's statistics
/// ([`Whitener`]), choose the L2
/// strength on a seeded held-out `cfg.holdout` of the training split, refit on all of
/// it, report top-1 on `test` (whose labels must already share `train`'s classes, see
/// [`Features::align_to`]).
pub fn linear_probe(
    train: &Features,
    test: &Features,
    cfg: &ProbeConfig,
) -> Result<ProbeResult, EvalError> {
    if train.dim != test.dim {
        return Err(EvalError::Input(format!(
            "train features have {} dimensions, test features {}",
            train.dim, test.dim
        )));
    }
    if train.len() < 2 || test.is_empty() || cfg.l2_grid.is_empty() {
        return Err(EvalError::Input(format!(
            "the linear probe needs at least 2 training and 1 test image and an L2 grid \
             ({} and {} given)",
            train.len(),
            test.len()
        )));
    }
    if !(cfg.holdout > 0.0 && cfg.holdout < 1.0) {
        return Err(EvalError::Input(format!(
            "held-out fraction {} is outside (0, 1)",
            cfg.holdout
        )));
    }
    let classes = train
        .classes
        .len()
        .max(train.labels.iter().max().map_or(0, |&l| l as usize + 1));
    let white = Whitener::fit(&train.values, train.dim)?;
    // Seeded Fisher-Yates permutation; the first part is held out.
    let n = train.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let n_val = ((n as f64 * cfg.holdout).round() as usize).clamp(1, n - 1);
    // The training split is whitened once; the held-out search and the refit share it.
    let mut x = train.values.clone();
    white.apply(&mut x)?;
    let (xv, yv) = rows(&x, &train.labels, train.dim, &order[..n_val]);
    let (xf, yf) = rows(&x, &train.labels, train.dim, &order[n_val..]);
    let mut search = Vec::new();
    let mut best = (f64::NEG_INFINITY, cfg.l2_grid[0]);
    // Strongest first: on a tie the more regularised classifier wins.
    let mut grid = cfg.l2_grid.clone();
    grid.sort_by(|a, b| b.total_cmp(a));
    for &l2 in &grid {
        let model = LogisticRegression::fit(&xf, &yf, train.dim, classes, l2, cfg.max_iters)?;
        let acc = model.accuracy(&xv, &yv)?;
        tracing::debug!(
            l2,
            held_out_accuracy = acc,
            iterations = model.iterations(),
            "probe"
        );
        search.push((l2, acc));
        if acc > best.0 {
            best = (acc, l2);
        }
    }
    let l2 = best.1;
    let model = LogisticRegression::fit(&x, &train.labels, train.dim, classes, l2, cfg.max_iters)?;
    let train_accuracy = model.accuracy(&x, &train.labels)?;
    let mut xt = test.values.clone();
    white.apply(&mut xt)?;
    if let Some(l) = test.labels.iter().find(|&&l| l as usize >= classes) {
        return Err(EvalError::Input(format!(
            "test label {l} is outside the {classes} training classes"
        )));
    }
    let accuracy = accuracy(&model.predict(&xt)?, &test.labels);
    Ok(ProbeResult {
        accuracy,
        train_accuracy,
        l2,
        search,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitened_features_have_identity_covariance() {
        // Three strongly correlated dimensions and a constant one.
        let n = 400;
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut x = Vec::new();
        for _ in 0..n {
            let (a, b, c) = (next(), next(), next());
            x.extend([a, a + 0.1 * b, 3.0 * a - 0.05 * b + 0.2 * c + 10.0, 5.0]);
        }
        let w = Whitener::fit(&x, 4).unwrap();
        let mut y = x.clone();
        w.apply(&mut y).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let c: f32 = y.chunks_exact(4).map(|r| r[i] * r[j]).sum::<f32>() / n as f32;
                let want = if i == j { 1.0 } else { 0.0 };
                // The ridge shrinks near-collinear directions a little.
                assert!((c - want).abs() < 0.05, "cov[{i}][{j}] = {c}");
            }
        }
        assert!(
            y.chunks_exact(4).all(|r| r[3].abs() < 1e-6),
            "a constant dimension stays 0"
        );
    }

    #[test]
    fn triangular_helpers_invert() {
        let a = [4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
        let l = cholesky(&a, 3, 0.0).unwrap();
        let inv = lower_inverse(&l, 3);
        for i in 0..3 {
            for j in 0..3 {
                let llt: f64 = (0..3).map(|k| l[i * 3 + k] * l[j * 3 + k]).sum();
                assert!((llt - a[i * 3 + j]).abs() < 1e-12);
                let id: f64 = (0..3).map(|k| l[i * 3 + k] * inv[k * 3 + j]).sum();
                assert!((id - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2, 0.0).is_none());
    }
}
