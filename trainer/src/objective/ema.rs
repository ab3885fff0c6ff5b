//! An exponential-moving-average copy of the shared network (encoder + projector): BYOL's
//! and MSF's target, MoCo's key encoder; and that copy with a memory of its embeddings
//! (MSF's target and bank, MoCo's key encoder and queue).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::config::{ModelConfig, TrainerConfig};
use crate::model::{Compute, Network, is_running_stat, sorted};
use crate::objective::ObjectiveStats;
use crate::objective::memory::Memory;
use crate::state::{StateDict, StateError};

/// A network whose weights follow the online network's by EMA; its own variables.
///
/// Its forward records no graph: the network's layers hold *detached* views of the
/// trainable variables (the same storage, so the in-place EMA update, `start` and a
/// restore reach them), so no intermediate activation outlives the layer that made it.
/// With the variables themselves in the layers, candle would keep the whole forward's
/// activations alive until the output was detached (at ResNet-50, 224 px, batch 256:
/// about 32 GB in fp32). The BatchNorm running statistics stay variables, updated in
/// place by the network's own training-mode forwards.
pub struct EmaNetwork {
    vars: VarMap,
    network: Network,
}

impl EmaNetwork {
    /// A network of the online one's shape on `device` (its weights set by
    /// [`EmaNetwork::start`]).
    pub fn new(cfg: &ModelConfig, compute: Compute, device: &Device) -> Result<Self> {
        let vars = VarMap::new();
        // Built once on the variables (which creates them), then again on detached
        // views of the trainable ones.
        Network::new(
            cfg,
            compute,
            VarBuilder::from_varmap(&vars, DType::F32, device),
        )?;
        let views: HashMap<String, Tensor> = sorted(&vars)
            .into_iter()
            .map(|(name, var)| {
                let t = if is_running_stat(&name) {
                    var.as_tensor().clone()
                } else {
                    var.as_tensor().detach()
                };
                (name, t)
            })
            .collect();
        let network = Network::new(
            cfg,
            compute,
            VarBuilder::from_tensors(views, DType::F32, device),
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

    /// The update after optimizer step `step` (0-based) with the objective's τ
    /// ([`crate::schedule::tau_at`]); returns τ.
    pub fn after_step(&self, online: &VarMap, cfg: &TrainerConfig, step: u64) -> Result<f64> {
        let tau = crate::schedule::tau_at(cfg, cfg.train.total_steps, step)
            .expect("an objective with an EMA network has a tau");
        self.update(online, tau)?;
        Ok(tau)
    }

    /// Its tensors as `<prefix><name>`.
    pub fn state(&self, prefix: &str) -> StateDict {
        StateDict::of_vars(&self.named()).with_prefix(prefix)
    }

    /// Its variables named `<prefix><name>`.
    fn prefixed(&self, prefix: &str) -> Vec<(String, Var)> {
        self.named()
            .into_iter()
            .map(|(n, v)| (format!("{prefix}{n}"), v))
            .collect()
    }

    /// Checks that `state` holds exactly its `<prefix><name>` tensors, each of its shape.
    pub fn check_state(
        &self,
        prefix: &str,
        state: &StateDict,
    ) -> std::result::Result<(), StateError> {
        state.check_vars(&self.prefixed(prefix))
    }

    /// Restores it from `<prefix><name>` tensors (exactly those: `state` holds no
    /// others); checked in full first, so a refused state changes nothing.
    pub fn load_state(
        &self,
        prefix: &str,
        state: &StateDict,
    ) -> std::result::Result<(), StateError> {
        state.restore_vars(&self.prefixed(prefix))
    }
}

/// An EMA network and a memory of the unit embeddings it produced: MSF's target and bank,
/// MoCo v2's key encoder and queue. Checkpointed as `<network_prefix><name>` and
/// `<memory_prefix>{entries,pointer,filled}`.
pub struct EmaWithMemory {
    /// The EMA network.
    pub network: EmaNetwork,
    /// The memory (its size from [`TrainerConfig::memory`]).
    pub memory: Memory,
    network_prefix: &'static str,
    memory_prefix: &'static str,
}

impl EmaWithMemory {
    /// A network of the online one's shape (weights set by [`EmaNetwork::start`]) and an
    /// empty memory of the objective's size, on `device`.
    pub fn new(
        cfg: &TrainerConfig,
        compute: Compute,
        device: &Device,
        network_prefix: &'static str,
        memory_prefix: &'static str,
    ) -> Result<Self> {
        let size = cfg
            .memory()
            .expect("an objective with a memory has a memory size");
        Ok(EmaWithMemory {
            network: EmaNetwork::new(&cfg.model, compute, device)?,
            memory: Memory::new(size.key, size.size, cfg.model.projection_dim, device)?,
            network_prefix,
            memory_prefix,
        })
    }

    /// The EMA update, then the batch's `keys` into the memory.
    pub fn after_step(
        &mut self,
        online: &VarMap,
        cfg: &TrainerConfig,
        step: u64,
        keys: Option<&Tensor>,
    ) -> Result<ObjectiveStats> {
        let tau = self.network.after_step(online, cfg, step)?;
        if let Some(keys) = keys {
            self.memory.push(keys)?;
        }
        Ok(ObjectiveStats { tau: Some(tau) })
    }

    /// The network's and the memory's tensors.
    pub fn state(&self) -> candle_core::Result<StateDict> {
        let mut s = self.network.state(self.network_prefix);
        for (n, t) in self.memory.state(self.memory_prefix)? {
            s.insert(n, t);
        }
        Ok(s)
    }

    /// Checks [`EmaWithMemory::state`]'s tensors: the memory's first (another size is
    /// named as such), then the network's.
    pub fn check_state(&self, state: &StateDict) -> std::result::Result<(), StateError> {
        let (memory, network) = state.split_prefix(self.memory_prefix);
        self.memory.check_state(self.memory_prefix, &memory)?;
        self.network.check_state(self.network_prefix, &network)
    }

    /// Restores [`EmaWithMemory::state`], checked in full first
    /// ([`EmaWithMemory::check_state`]): a refused state changes nothing.
    pub fn load_state(&mut self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.check_state(state)?;
        let (memory, network) = state.split_prefix(self.memory_prefix);
        self.memory.load_state(self.memory_prefix, &memory)?;
        self.network.load_state(self.network_prefix, &network)
    }
}
