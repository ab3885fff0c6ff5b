//! Seeded weight initialisation (candle's CPU generator cannot be seeded), following
//! torchvision and PyTorch defaults. Each variable's values depend only on the seed and
//! the variable's name, never on creation order.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::is_running_stat;
use crate::config::ConvInit;

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, then mixed with the seed.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    byol_augment::rng::mix64(seed ^ byol_augment::rng::mix64(h))
}

fn uniform(rng: &mut Xoshiro256PlusPlus) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn normal(rng: &mut Xoshiro256PlusPlus) -> f64 {
    // Box-Muller; 1 - u keeps the logarithm finite.
    let (u1, u2) = (1.0 - uniform(rng), uniform(rng));
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `n` standard-normal values from `seed` (synthetic inputs for benchmarks and checks).
pub fn seeded_normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n).map(|_| normal(&mut rng) as f32).collect()
}

/// Re-initialises every variable of `vars` from `seed`:
/// convolutions (4-d weights `[c_out, c_in, k, k]`): as `conv_init` says
/// ([`ConvInit`]);
/// linear weights and biases: U(−1/√fan_in, 1/√fan_in) (PyTorch `nn.Linear`);
/// BatchNorm: weight 1, bias 0, running mean 0, running variance 1, batches tracked 0.
pub fn reinit(vars: &VarMap, seed: u64, conv_init: ConvInit) -> Result<()> {
    let data = vars.data().lock().unwrap();
    for (name, var) in data.iter() {
        let dims = var.dims().to_vec();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(name_seed(seed, name));
        let n = var.elem_count();
        if var.dtype() != candle_core::DType::F32 {
            // Counters (BatchNorm's `num_batches_tracked`) start at 0.
            var.set(&var.zeros_like()?)?;
            continue;
        }
        let values: Vec<f32> = if is_running_stat(name) {
            vec![
                if name.ends_with("running_var") {
                    1.0
                } else {
                    0.0
                };
                n
            ]
        } else if dims.len() == 4 {
            let kernel = (dims[2] * dims[3]) as f64;
            match conv_init {
                ConvInit::KaimingNormalFanOut => {
                    let std = (2.0 / (dims[0] as f64 * kernel)).sqrt();
                    (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
                }
                ConvInit::PytorchDefault => {
                    let bound = 1.0 / (dims[1] as f64 * kernel).sqrt();
                    (0..n)
                        .map(|_| ((uniform(&mut rng) * 2.0 - 1.0) * bound) as f32)
                        .collect()
                }
            }
        } else if dims.len() == 2 {
            let bound = 1.0 / (dims[1] as f64).sqrt();
            (0..n)
                .map(|_| ((uniform(&mut rng) * 2.0 - 1.0) * bound) as f32)
                .collect()
        } else if let Some(fan_in) = linear_fan_in(&data, name) {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| ((uniform(&mut rng) * 2.0 - 1.0) * bound) as f32)
                .collect()
        } else {
            vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n]
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// For the bias of a linear layer, the fan-in of its weight.
fn linear_fan_in(
    data: &std::collections::HashMap<String, candle_core::Var>,
    name: &str,
) -> Option<usize> {
    let weight = format!("{}.weight", name.strip_suffix(".bias")?);
    let w = data.get(&weight)?;
    (w.dims().len() == 2).then(|| w.dims()[1])
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{Init, VarBuilder};

    use super::*;

    /// A `[c_out, c_in, 3, 3]` convolution weight after `reinit` with `conv_init`: its
    /// values, flattened.
    fn conv_values(c_out: usize, c_in: usize, conv_init: ConvInit) -> Vec<f32> {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        vb.get_with_hints((c_out, c_in, 3, 3), "conv.weight", Init::Const(0.0))
            .unwrap();
        reinit(&vars, 7, conv_init).unwrap();
        let w = vars.data().lock().unwrap()["conv.weight"]
            .as_tensor()
            .clone();
        w.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn std(v: &[f32]) -> f64 {
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        (v.iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64)
            .sqrt()
    }

    #[test]
    fn convolutions_start_at_the_scale_their_init_names() {
        // 64 out, 32 in: fan-out 576, fan-in 288.
        let fan_out = kaiming_normal_std(64, 3);
        let w = conv_values(64, 32, ConvInit::KaimingNormalFanOut);
        assert!(
            (std(&w) / fan_out - 1.0).abs() < 0.03,
            "{} vs {fan_out}",
            std(&w)
        );

        let bound = 1.0 / (32.0f64 * 9.0).sqrt();
        let w = conv_values(64, 32, ConvInit::PytorchDefault);
        assert!(w.iter().all(|&x| f64::from(x).abs() <= bound));
        // U(-b, b) has std b / √3.
        let expected = bound / 3f64.sqrt();
        assert!(
            (std(&w) / expected - 1.0).abs() < 0.03,
            "{} vs {expected}",
            std(&w)
        );
        // Same seed and name, different init: different values.
        assert_ne!(w, conv_values(64, 32, ConvInit::KaimingNormalFanOut));
    }

    fn kaiming_normal_std(c_out: usize, k: usize) -> f64 {
        (2.0 / (c_out * k * k) as f64).sqrt()
    }
}
