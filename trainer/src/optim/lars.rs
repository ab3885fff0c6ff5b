//! LARS (You et al. 2017) as BYOL uses it:
//! `g ← g + wd·w; g ← g·η·‖w‖/‖g‖; μ ← m·μ + g; w ← w − lr·μ`, with biases and BatchNorm
//! parameters excluded from both the decay and the trust ratio (plain momentum SGD).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{is_excluded, restore_tensor};
use crate::config::OptimConfig;

struct Param {
    name: String,
    var: Var,
    momentum: Tensor,
    adapt: bool,
}

/// The LARS optimizer with per-parameter momentum buffers.
pub struct Lars {
    params: Vec<Param>,
    momentum: f64,
    weight_decay: f64,
    eta: f64,
}

impl Lars {
    /// LARS over `params` with the config's momentum, weight decay and trust coefficient.
    pub fn new(cfg: &OptimConfig, params: Vec<(String, Var)>) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                Ok(Param {
                    momentum: var.zeros_like()?,
                    adapt: !is_excluded(&var),
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
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
            let w = p.var.as_tensor();
            let g = if p.adapt {
                let g = (g + (w * self.weight_decay)?)?;
                let w_norm = w.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
                let g_norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
                let trust = if w_norm > 0.0 && g_norm > 0.0 {
                    self.eta * w_norm / g_norm
                } else {
                    1.0
                };
                (g * trust)?
            } else {
                g.clone()
            };
            p.momentum = ((&p.momentum * self.momentum)? + g)?;
            p.var.set(&(w - (&p.momentum * lr)?)?)?;
        }
        Ok(())
    }

    /// Momentum buffers, named `<param>.momentum`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (format!("{}.momentum", p.name), p.momentum.clone()))
            .collect()
    }

    /// Restores momentum buffers.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            restore_tensor(state, &format!("{}.momentum", p.name), &mut p.momentum)?;
        }
        Ok(())
    }
}
