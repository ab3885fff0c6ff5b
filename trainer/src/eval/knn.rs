//! Weighted kNN on frozen features: cosine similarity between l2-normalised features,
//! the k most similar training images vote for their class with weight
//! `exp(similarity / temperature)`, top-1.

use candle_core::{Device, Tensor};

use super::linear::accuracy;
use super::{EvalError, Features};

/// Settings of the kNN classifier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnConfig {
    /// Neighbours (clamped to the training size).
    pub k: usize,
    /// Vote weight `exp(sim / temperature)`.
    pub temperature: f32,
}

impl Default for KnnConfig {
    /// k = 200, temperature 0.1 (the usual protocol).
    fn default() -> Self {
        KnnConfig {
            k: 200,
            temperature: 0.1,
        }
    }
}

fn normalized(values: &[f32], dim: usize) -> Vec<f32> {
    let mut out = values.to_vec();
    for row in out.chunks_exact_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

/// Predicted class of each row of `test` (row-major, `dim` values per row) from the
/// labelled rows of `train`; ties go to the lower class index.
pub fn knn_predict(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    dim: usize,
    classes: usize,
    cfg: KnnConfig,
) -> Result<Vec<u32>, EvalError> {
    let n = train_labels.len();
    if dim == 0 || n == 0 || train.len() != n * dim || !test.len().is_multiple_of(dim) {
        return Err(EvalError::Input(format!(
            "kNN: {} training values for {n} labels, {} test values, dimension {dim}",
            train.len(),
            test.len()
        )));
    }
    if let Some(l) = train_labels.iter().find(|&&l| l as usize >= classes) {
        return Err(EvalError::Input(format!(
            "kNN: label {l} is outside {classes} classes"
        )));
    }
    if cfg.k == 0 || cfg.temperature.is_nan() || cfg.temperature <= 0.0 {
        return Err(EvalError::Input(format!(
            "kNN: k = {} and temperature {} must be positive",
            cfg.k, cfg.temperature
        )));
    }
    let k = cfg.k.min(n);
    let bank = Tensor::from_vec(normalized(train, dim), (n, dim), &Device::Cpu)?
        .t()?
        .contiguous()?;
    let queries = normalized(test, dim);
    let mut predicted = Vec::with_capacity(test.len() / dim);
    let mut order: Vec<usize> = Vec::with_capacity(n);
    let mut votes = vec![0f64; classes];
    // Bounded memory: similarities for 256 test rows at a time.
    for chunk in queries.chunks(256 * dim) {
        let m = chunk.len() / dim;
        let q = Tensor::from_slice(chunk, (m, dim), &Device::Cpu)?;
        let sims = crate::host::vec1::<f32>(&q.matmul(&bank)?.flatten_all()?)?;
        for row in sims.chunks_exact(n) {
            order.clear();
            order.extend(0..n);
            if k < n {
                order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
            }
            votes.fill(0.0);
            for &j in &order[..k] {
                votes[train_labels[j] as usize] += f64::from((row[j] / cfg.temperature).exp());
            }
            let best = votes
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (c, &v)| if v > b.1 { (c, v) } else { b },
                );
            predicted.push(best.0 as u32);
        }
    }
    Ok(predicted)
}

/// kNN top-1 accuracy of `test` against `train` (labels must share classes, see
/// [`Features::align_to`]).
pub fn knn_accuracy(train: &Features, test: &Features, cfg: KnnConfig) -> Result<f64, EvalError> {
    if train.dim != test.dim || test.is_empty() {
        return Err(EvalError::Input(format!(
            "kNN: train features have {} dimensions, test features {} ({} test rows)",
            train.dim,
            test.dim,
            test.len()
        )));
    }
    let classes = train
        .classes
        .len()
        .max(train.labels.iter().max().map_or(0, |&l| l as usize + 1))
        .max(test.labels.iter().max().map_or(0, |&l| l as usize + 1));
    let predicted = knn_predict(
        &train.values,
        &train.labels,
        &test.values,
        train.dim,
        classes,
        cfg,
    )?;
    Ok(accuracy(&predicted, &test.labels))
}
