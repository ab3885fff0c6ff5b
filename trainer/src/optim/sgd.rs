//! SGD with momentum, as PyTorch's `torch.optim.SGD` (dampening 0):
//! `g ← g + wd·w; b ← m·b + g; w ← w − lr·(g + m·b)` with Nesterov, `w ← w − lr·b`
//! without; weight decay not applied to biases and BatchNorm parameters.

use crate::state::StateDict;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::MomentumParam;
use crate::config::OptimConfig;

/// SGD with per-parameter momentum buffers (zero at the start, so the first step's
/// buffer is the gradient, as PyTorch's).
pub struct Sgd {
    params: Vec<MomentumParam>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
}

impl Sgd {
    /// SGD over `params` with the config's momentum, Nesterov flag and weight decay.
    pub fn new(cfg: &OptimConfig, params: Vec<(String, Var)>) -> Result<Self> {
        let params = MomentumParam::all(cfg, params)?;
        Ok(Sgd {
            params,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
        })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else {
                continue;
            };
            // Detached, so no buffer records the ops of the previous step (see LARS).
            let w = p.var.as_tensor().detach();
            let mut g = g.detach();
            if p.decayed && self.weight_decay != 0.0 {
                g = (g + (&w * self.weight_decay)?)?;
            }
            p.momentum = ((&p.momentum * self.momentum)? + &g)?;
            let update = if self.nesterov {
                (g + (&p.momentum * self.momentum)?)?
            } else {
                p.momentum.clone()
            };
            p.var.set(&(&w - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Momentum buffers, named `<param>.momentum`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        MomentumParam::state(&self.params)
    }

    /// Restores momentum buffers.
    pub fn load_state(&mut self, state: &StateDict) -> Result<()> {
        MomentumParam::load_state(&mut self.params, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(nesterov: bool) -> (Vec<f32>, Vec<f32>) {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1f32, -2.], [3., 0.5]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0], &dev).unwrap()).unwrap();
        let cfg = OptimConfig {
            momentum: 0.9,
            nesterov,
            weight_decay: 0.1,
            ..OptimConfig::default()
        };
        let mut opt = Sgd::new(
            &cfg,
            vec![
                ("fc.weight".into(), w.clone()),
                ("fc.bias".into(), b.clone()),
            ],
        )
        .unwrap();
        // Loss Σw² + Σb²: gradients 2w and 2b.
        for _ in 0..2 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap()
                + b.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        }
        let flat = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        (flat(&w), flat(&b))
    }

    /// Two steps against the formula, element by element (`m` 0.9, `wd` 0.1 on the
    /// weight only, `lr` 0.1): step 1 `g1 = 2w0 + 0.1·w0`, `b1 = g1`; step 2 likewise
    /// from `w1`, `b2 = 0.9·b1 + g2`.
    #[test]
    fn steps_match_the_formula() {
        for nesterov in [false, true] {
            let (w, b) = run(nesterov);
            let expect = |x0: f64, wd: f64| -> f32 {
                let g1 = 2.0 * x0 + wd * x0;
                let m1 = g1;
                let u1 = if nesterov { g1 + 0.9 * m1 } else { m1 };
                let x1 = x0 - 0.1 * u1;
                let g2 = 2.0 * x1 + wd * x1;
                let m2 = 0.9 * m1 + g2;
                let u2 = if nesterov { g2 + 0.9 * m2 } else { m2 };
                (x1 - 0.1 * u2) as f32
            };
            for (got, x0) in w.iter().zip([1.0, -2.0, 3.0, 0.5]) {
                let want = expect(x0, 0.1);
                assert!(
                    (got - want).abs() < 1e-6,
                    "nesterov {nesterov}: {got} vs {want}"
                );
            }
            for (got, x0) in b.iter().zip([0.5, -1.0]) {
                let want = expect(x0, 0.0);
                assert!(
                    (got - want).abs() < 1e-6,
                    "bias, nesterov {nesterov}: {got} vs {want}"
                );
            }
        }
    }
}
