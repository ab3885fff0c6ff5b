//! LARS (You et al. 2017) as BYOL uses it:
//! `g ← g + wd·w; g ← g·η·‖w‖/‖g‖; μ ← m·μ + g; w ← w − lr·μ`, with biases and BatchNorm
//! parameters excluded from both the decay and the trust ratio (plain momentum SGD).

use crate::state::StateDict;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::MomentumParam;
use crate::config::OptimConfig;

/// The LARS optimizer with per-parameter momentum buffers.
pub struct Lars {
    params: Vec<MomentumParam>,
    momentum: f64,
    weight_decay: f64,
    eta: f64,
}

impl Lars {
    /// LARS over `params` with the config's momentum, weight decay and trust coefficient.
    pub fn new(cfg: &OptimConfig, params: Vec<(String, Var)>) -> Result<Self> {
        let params = MomentumParam::all(cfg, params)?;
        Ok(Lars {
            params,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            eta: cfg.trust_coefficient,
        })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else {
                continue;
            };
            // Detached: an update computed from the tracked variable would record its
            // ops, and each step's momentum would hold the last one's (a chain that
            // kept every step's buffers alive: 165 MB a step at ResNet-18 / 64 px).
            let w = p.var.as_tensor().detach();
            let g = g.detach();
            let g = if p.decayed {
                let g = (g + (&w * self.weight_decay)?)?;
                // Trust ratio η‖w‖/‖g‖ where both norms are positive, else 1, computed
                // on the device: no host read-back per parameter.
                let w_norm = w.sqr()?.sum_all()?.sqrt()?;
                let g_norm = g.sqr()?.sum_all()?.sqrt()?;
                let both = (w_norm.gt(0.0)? * g_norm.gt(0.0)?)?;
                let ratio = ((w_norm * self.eta)? / g_norm)?;
                let trust = both.where_cond(&ratio, &ratio.ones_like()?)?;
                g.broadcast_mul(&trust)?
            } else {
                g
            };
            p.momentum = ((&p.momentum * self.momentum)? + g)?;
            p.var.set(&(&w - (&p.momentum * lr)?)?)?;
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

    /// The momentum buffers must not record ops: a tracked buffer holds the previous
    /// step's, and every step's buffers stay alive (a leak of a batch's activations
    /// per step, found by `byol bench step`).
    #[test]
    fn momentum_is_not_part_of_any_graph() {
        let w =
            Var::from_tensor(&Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap()).unwrap();
        let cfg = OptimConfig::default();
        let mut opt = Lars::new(&cfg, vec![("fc.weight".into(), w.clone())]).unwrap();
        for _ in 0..3 {
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1).unwrap();
        }
        let state = opt.state();
        assert!(!state[0].1.track_op(), "the momentum records ops");
        assert!(w.as_tensor().is_variable());
    }
}
