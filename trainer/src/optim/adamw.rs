//! AdamW (Loshchilov & Hutter 2019) for small experiments; weight decay is decoupled and
//! not applied to biases and BatchNorm parameters.

use crate::state::StateDict;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{is_decayed, restore_tensor};
use crate::config::OptimConfig;

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW with its first and second moments and step count.
pub struct AdamW {
    params: Vec<Param>,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    t: u64,
}

impl AdamW {
    /// AdamW over `params`.
    pub fn new(cfg: &OptimConfig, params: Vec<(String, Var)>) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                Ok(Param {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    decay: is_decayed(cfg, &var),
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            params,
            betas: cfg.adam_betas,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            t: 0,
        })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let [b1, b2] = self.betas;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else {
                continue;
            };
            // Detached, as in LARS: moments that recorded ops would chain every step's.
            let g = g.detach();
            let g = &g;
            p.m = ((&p.m * b1)? + (g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&p.m / c1)? / ((&p.v / c2)?.sqrt()? + self.eps)?)?;
            let w = &p.var.as_tensor().detach();
            let update = if p.decay {
                (update + (w * self.weight_decay)?)?
            } else {
                update
            };
            p.var.set(&(w - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments `<param>.m`, `<param>.v`, and the step count `step` (as a 1-element tensor).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut s: Vec<(String, Tensor)> = self
            .params
            .iter()
            .flat_map(|p| {
                [
                    (format!("{}.m", p.name), p.m.clone()),
                    (format!("{}.v", p.name), p.v.clone()),
                ]
            })
            .collect();
        let dev = self
            .params
            .first()
            .map_or(candle_core::Device::Cpu, |p| p.var.device().clone());
        s.push((
            "step".into(),
            Tensor::new(&[self.t as f64], &dev).expect("scalar tensor"),
        ));
        s
    }

    /// Restores moments and step count.
    pub fn load_state(&mut self, state: &StateDict) -> Result<()> {
        for p in &mut self.params {
            restore_tensor(state, &format!("{}.m", p.name), &mut p.m)?;
            restore_tensor(state, &format!("{}.v", p.name), &mut p.v)?;
        }
        let step = state
            .get("step")
            .ok_or_else(|| candle_core::Error::Msg("optimizer state step is missing".into()))?;
        self.t = crate::host::vec1::<f64>(step)?[0] as u64;
        Ok(())
    }
}
