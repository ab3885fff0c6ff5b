//! An exponential-moving-average copy of the shared network (encoder + projector): BYOL's
//! and MSF's target, MoCo's key encoder.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::TrainError;
use crate::config::ModelConfig;
use crate::model::{Compute, Network, is_running_stat, sorted};

/// A network whose weights follow the online network's by EMA; its own variables.
pub struct EmaNetwork {
    vars: VarMap,
    network: Network,
}

impl EmaNetwork {
    /// A network of the online one's shape on `device` (its weights set by
    /// [`EmaNetwork::start`]).
    pub fn new(cfg: &ModelConfig, compute: Compute, device: &Device) -> Result<Self> {
        let vars = VarMap::new();
        let network = Network::new(
            cfg,
            compute,
            VarBuilder::from_varmap(&vars, DType::F32, device),
        )?;
        Ok(EmaNetwork { vars, network })
    }

    /// Copies the online network (`encoder.*`, `projector.*` of `online`).
    pub fn start(&self, online: &VarMap) -> Result<()> {
        let online = online.data().lock().unwrap();
        for (name, t) in self.named() {
            let o = online
                .get(&name)
                .expect("the EMA network's names are a subset of the online network's");
            t.set(o.as_tensor())?;
        }
        Ok(())
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Its variables sorted by name (`encoder.*`, `projector.*`).
    pub fn named(&self) -> Vec<(String, Var)> {
        sorted(&self.vars)
    }

    /// `ξ ← τ·ξ + (1 − τ)·θ` for every trainable variable (running statistics are its
    /// own, from its own forwards).
    pub fn update(&self, online: &VarMap, tau: f64) -> Result<()> {
        let online = online.data().lock().unwrap();
        for (name, t) in self.named() {
            if is_running_stat(&name) {
                continue;
            }
            let o = online.get(&name).expect("same names");
            let next = ((t.as_tensor() * tau)? + (o.as_tensor().detach() * (1.0 - tau))?)?;
            t.set(&next)?;
        }
        Ok(())
    }

    /// Its tensors as `<prefix><name>`.
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.named()
            .into_iter()
            .map(|(n, v)| (format!("{prefix}{n}"), v.as_tensor().clone()))
            .collect()
    }

    /// Restores it from `<prefix><name>` tensors (exactly those: `tensors` holds no
    /// others).
    pub fn load_state(
        &self,
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
        file: &Path,
    ) -> std::result::Result<(), TrainError> {
        let vars = self
            .named()
            .into_iter()
            .map(|(n, v)| (format!("{prefix}{n}"), v))
            .collect();
        crate::checkpoint::restore_vars(vars, tensors, file)
    }
}
