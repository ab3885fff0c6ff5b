//! The training step: the shared network, the objective, the optimizer.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use crate::TrainError;
use crate::checkpoint;
use crate::config::TrainerConfig;
use crate::device::open_for_rank;
use crate::embedding::EmbeddingStats;
use crate::kernels::profile::phase;
use crate::model::{Compute, Network, reinit, sorted, trainable};
use crate::objective::{Objective, ObjectiveStats};
use crate::optim::Optimizer;
use crate::pretrained::InitReport;
use crate::schedule;
use crate::state::{RestoreError, StateDict, StateError, StateOrigin, StatePart, TrainerState};

/// What one step measured without reading the device (its loss stays there: see
/// [`Trainer::read_health`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    /// Steps done after this one.
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// The objective's own figures (τ of an EMA target or key encoder).
    #[serde(flatten)]
    pub objective: ObjectiveStats,
}

/// The loss of the steps since the last [`Trainer::read_health`], as the host reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Health {
    /// The last step's loss (NaN before the first step); its scale per method: see
    /// [`crate::objective`].
    pub loss: f32,
    /// The first step (1-based, as [`StepStats::step`]) since the last read whose loss
    /// was NaN or infinite.
    pub non_finite_at: Option<u64>,
}

/// The device side of [`Health`]: kept up by a few device ops per step, read at log
/// steps and before checkpoints, never per step.
struct DeviceHealth {
    /// The last step's loss, f32 scalar.
    loss: Tensor,
    /// Steps done, i64 scalar, counted on the device (no upload per step).
    step: Tensor,
    /// The first step with a non-finite loss since the last read, `i64::MAX` for none.
    first_non_finite: Tensor,
    /// 1 (i64), and `i64::MAX`, on the device.
    one: Tensor,
    none: Tensor,
}

impl DeviceHealth {
    fn new(device: &Device, step: u64) -> candle_core::Result<Self> {
        let none = Tensor::new(i64::MAX, device)?;
        Ok(DeviceHealth {
            loss: Tensor::new(f32::NAN, device)?,
            step: Tensor::new(step as i64, device)?,
            first_non_finite: none.clone(),
            one: Tensor::new(1i64, device)?,
            none,
        })
    }

    /// Takes in the loss of the step just done.
    fn record(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let loss = loss.detach().to_dtype(DType::F32)?;
        self.step = (&self.step + &self.one)?;
        // 0·x is NaN exactly when x is NaN or ±∞, and NaN ≠ NaN.
        let d = loss.affine(0.0, 0.0)?;
        let bad = d.ne(&d)?;
        let at = bad.where_cond(&self.step, &self.none)?;
        self.first_non_finite = self.first_non_finite.minimum(&at)?;
        self.loss = loss;
        Ok(())
    }
}

/// The online variables (shared network and the objective's trained heads), the
/// objective, the optimizer and the step counter.
///
/// Data-parallel (several processes, [`crate::dist`]): forward and backward on this
/// rank's share of the global batch (BatchNorm synced, cross-sample terms gathered),
/// the gradients averaged over the ranks, then the optimizer and the objective's
/// after-step work, identical on every rank.
pub struct Trainer {
    cfg: TrainerConfig,
    device: Device,
    online: VarMap,
    network: Network,
    objective: Objective,
    optimizer: Optimizer,
    step: u64,
    batch_size: usize,
    /// The last step's embeddings, for [`Trainer::embedding_stats`].
    embeddings: Option<Tensor>,
    /// The loss and the non-finite flag on the device.
    health: DeviceHealth,
    /// The trainable variables in name order, as every rank averages their gradients.
    reduced: Vec<Var>,
}

impl Trainer {
    /// A fresh trainer (weights from `cfg.train.seed`) for batches of `batch_size`.
    ///
    /// Errors: a setting out of range ([`TrainError::Config`], naming the key); the
    /// device cannot be opened.
    pub fn new(mut cfg: TrainerConfig, batch_size: usize) -> Result<Self, TrainError> {
        if let Some(warning) = cfg.resolve_deprecated()? {
            tracing::warn!("{warning}");
        }
        cfg.validate()?;
        if batch_size < 2 {
            return Err(TrainError::Config {
                key: "loader.batch_size",
                reason: "BatchNorm needs at least 2 images per batch".into(),
            });
        }
        if let Some(m) = cfg.memory().filter(|m| m.size < batch_size) {
            return Err(TrainError::Config {
                key: m.key,
                reason: format!(
                    "{} entries cannot hold one batch of {batch_size} (loader.batch_size)",
                    m.size
                ),
            });
        }
        // Data-parallel: every BatchNorm (and SimSiam's output BN) over the global batch.
        cfg.model.synced_bn = cfg.train.sync_bn && crate::dist::group().world() > 1;
        let device = open_for_rank(&cfg.train.device, crate::dist::local_rank())?;
        #[cfg(feature = "nccl")]
        if crate::dist::nccl::init(crate::dist::group(), &device)? {
            tracing::info!("data-parallel: gradients all-reduced through NCCL");
        }
        crate::kernels::set_tf32(cfg.train.tf32);
        let compute = Compute::new(cfg.train.kernels, cfg.train.precision);
        let online = VarMap::new();
        let vb = VarBuilder::from_varmap(&online, DType::F32, &device);
        let network = Network::new(&cfg.model, compute, vb.clone())?;
        let mut objective = Objective::new(&cfg, compute, vb)?;
        // Each variable's initial values depend on the seed and its name only.
        reinit(&online, cfg.train.seed, cfg.model.conv_init)?;
        objective.start(&online)?;
        let optimizer = Optimizer::new(&cfg.optim, trainable(&online))?;
        let health = DeviceHealth::new(&device, 0)?;
        let reduced = trainable(&online).into_iter().map(|(_, v)| v).collect();
        Ok(Trainer {
            cfg,
            device,
            online,
            network,
            objective,
            optimizer,
            step: 0,
            batch_size,
            embeddings: None,
            health,
            reduced,
        })
    }

    /// Starts the encoder from the pretrained weights at `path` (see
    /// [`crate::pretrained`]): the online encoder's variables, BatchNorm statistics
    /// included, are set from the file; the projector and the objective's heads keep
    /// their fresh initialisation, and an EMA target or key encoder starts again as a
    /// copy of the online network. Call it before the first step.
    ///
    /// Errors: the file is unreadable or does not fit the model ([`TrainError::Init`],
    /// naming the first tensor that does not fit); nothing is changed then.
    pub fn start_from(&mut self, path: &std::path::Path) -> Result<InitReport, TrainError> {
        let file = crate::pretrained::read_weights(path)?;
        let encoder: Vec<(String, Var)> = sorted(&self.online)
            .into_iter()
            .filter_map(|(n, v)| Some((n.strip_prefix("encoder.")?.to_owned(), v)))
            .collect();
        let report = crate::pretrained::load_encoder(&file, &encoder, &self.cfg.model)?;
        self.objective.start(&self.online)?;
        Ok(report)
    }

    /// Sets the length of the cosine schedules (`train.total_steps`), e.g. once a
    /// wall-clock budget has been turned into steps.
    pub fn set_total_steps(&mut self, steps: u64) {
        self.cfg.train.total_steps = steps.max(1);
    }

    /// The config the trainer was built with (deprecated keys resolved).
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shared network (encoder + projector).
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The objective.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// Online variables sorted by name: the network's (`encoder.*`, `projector.*`) and
    /// the objective's trained heads (BYOL: `predictor.*`).
    pub fn online_named(&self) -> Vec<(String, Var)> {
        sorted(&self.online)
    }

    /// The online variables themselves (for an objective's after-step work in checks).
    pub fn online_vars(&self) -> &VarMap {
        &self.online
    }

    /// Number of trainable online parameters.
    pub fn parameter_count(&self) -> usize {
        self.trainable_named()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Trainable online variables (running statistics left out), sorted by name: what
    /// the optimizer updates.
    pub fn trainable_named(&self) -> Vec<(String, Var)> {
        trainable(&self.online)
    }

    /// The loss and gradients of one forward/backward on `(v1, v2)` with no update
    /// (BatchNorm's running statistics move, as in any training-mode forward): for
    /// checks and profiles.
    pub fn loss_and_grads(
        &self,
        v1: &Tensor,
        v2: &Tensor,
    ) -> Result<(Tensor, candle_core::backprop::GradStore), TrainError> {
        let outcome = self.objective.loss(&self.network, v1, v2)?;
        let grads = outcome.loss.backward()?;
        Ok((outcome.loss, grads))
    }

    /// The whole state (what a checkpoint writes): what it was made with, the step, and
    /// the online, objective and optimizer tensors. The tensors share the variables'
    /// storage: write them out before the next step.
    pub fn state(&self) -> Result<TrainerState, TrainError> {
        Ok(TrainerState {
            origin: StateOrigin {
                method: self.objective.method(),
                batch_size: self.batch_size,
                config: self.cfg.clone(),
            },
            step: self.step,
            online: StateDict::of_vars(&self.online_named()),
            objective: self.objective.state()?,
            optimizer: self.optimizer.state(),
        })
    }

    /// Refuses a state made with another method, model, memory size (`msf.bank_size`,
    /// `mocov2.queue_size`), SimSiam bottleneck, optimizer or batch size, naming the
    /// difference ([`StateError::Mismatch`]).
    pub fn check_fits(&self, origin: &StateOrigin) -> Result<(), StateError> {
        let mismatch = |what: &'static str, theirs: String, ours: String| {
            Err(StateError::Mismatch { what, theirs, ours })
        };
        let method = self.objective.method();
        if origin.method != method {
            return mismatch("method", origin.method.to_string(), method.to_string());
        }
        let (theirs, ours) = (&origin.config, &self.cfg);
        // The BatchNorm sync is how the step runs and the convolutions' init how the run
        // started, not what the model is: neither changes the state a checkpoint holds.
        let unsynced = |m: &crate::config::ModelConfig| crate::config::ModelConfig {
            synced_bn: false,
            conv_init: Default::default(),
            ..m.clone()
        };
        if unsynced(&theirs.model) != unsynced(&ours.model) {
            return mismatch(
                "model",
                format!("{:?}", theirs.model),
                format!("{:?}", ours.model),
            );
        }
        // The method's settings that shape its state (same method, checked above).
        if let (Some(t), Some(m)) = (theirs.memory(), ours.memory())
            && t.size != m.size
        {
            return mismatch(m.key, t.size.to_string(), m.size.to_string());
        }
        if method == crate::Method::Simsiam && theirs.simsiam.bottleneck != ours.simsiam.bottleneck
        {
            return mismatch(
                "simsiam.bottleneck",
                theirs.simsiam.bottleneck.to_string(),
                ours.simsiam.bottleneck.to_string(),
            );
        }
        if theirs.optim.optimizer != ours.optim.optimizer {
            return mismatch(
                "optimizer",
                format!("{:?}", theirs.optim.optimizer),
                format!("{:?}", ours.optim.optimizer),
            );
        }
        if origin.batch_size != self.batch_size {
            return mismatch(
                "batch size",
                origin.batch_size.to_string(),
                self.batch_size.to_string(),
            );
        }
        Ok(())
    }

    /// Restores a [`Trainer::state`]: the online variables, the objective's and the
    /// optimizer's state and the step. Every part is checked before anything is set
    /// ([`Trainer::check_fits`], then each part's names and shapes), so a refused state
    /// changes nothing.
    pub fn restore(&mut self, state: TrainerState) -> Result<(), RestoreError> {
        self.check_fits(&state.origin)
            .map_err(|error| RestoreError {
                part: StatePart::Origin,
                error,
            })?;
        self.restore_fitted(state)
    }

    /// [`Trainer::restore`] of a state whose origin was checked already.
    fn restore_fitted(&mut self, state: TrainerState) -> Result<(), RestoreError> {
        let at = |part: StatePart| move |error: StateError| RestoreError { part, error };
        let online = self.online_named();
        state
            .online
            .check_vars(&online)
            .map_err(at(StatePart::Online))?;
        self.objective
            .check_state(&state.objective)
            .map_err(at(StatePart::Objective))?;
        self.optimizer
            .check_state(&state.optimizer)
            .map_err(at(StatePart::Optimizer))?;
        // All checked: from here only the device can fail.
        state
            .online
            .restore_vars(&online)
            .map_err(at(StatePart::Online))?;
        self.objective
            .load_state(&state.objective)
            .map_err(at(StatePart::Objective))?;
        self.optimizer
            .load_state(&state.optimizer)
            .map_err(at(StatePart::Optimizer))?;
        self.step = state.step;
        self.health = DeviceHealth::new(&self.device, self.step)
            .map_err(|e| at(StatePart::Online)(e.into()))?;
        Ok(())
    }

    /// Restores the checkpoint at `path` (any of [`crate::checkpoint::READABLE_VERSIONS`]):
    /// its settings are checked against this trainer first, from the meta alone, then its
    /// tensors are read and restored ([`Trainer::restore`]).
    ///
    /// Errors: a checkpoint made with another method, model, optimizer or batch size
    /// ([`crate::CheckpointProblem::Mismatch`], naming the difference), or whose files fail
    /// their checksums or do not fit (naming the file); nothing is changed then.
    pub fn load_checkpoint(
        &mut self,
        path: &std::path::Path,
    ) -> Result<checkpoint::CheckpointMeta, TrainError> {
        let meta = checkpoint::read_meta(path)?;
        let origin = checkpoint::origin(&meta, path)?;
        self.check_fits(&origin)
            .map_err(|e| checkpoint::state_error(path, e))?;
        let state = checkpoint::read_state(path, &meta, origin, &self.device)?;
        self.restore_fitted(state)
            .map_err(|e| checkpoint::restore_error(path, &meta, e))?;
        Ok(meta)
    }

    /// Batch size the schedules are scaled for.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// One step on two views given as f32 NCHW slices of `size` x `size` images.
    pub fn step(
        &mut self,
        view1: &[f32],
        view2: &[f32],
        size: usize,
    ) -> Result<StepStats, TrainError> {
        let n = view1.len() / (3 * size * size);
        let shape = (n, 3, size, size);
        let v1 = Tensor::from_slice(view1, shape, &self.device)?;
        let v2 = Tensor::from_slice(view2, shape, &self.device)?;
        self.step_tensors(&v1, &v2)
    }

    /// One step on two batches of views `(n, 3, h, w)`.
    pub fn step_tensors(&mut self, v1: &Tensor, v2: &Tensor) -> Result<StepStats, TrainError> {
        let lr = schedule::learning_rate(
            &self.cfg.optim,
            self.batch_size,
            self.cfg.train.total_steps,
            self.step,
        );
        // Each phase is timed apart by `byol bench step --profile` (nothing otherwise).
        let device = self.device.clone();
        let outcome = phase("forward and loss", &device, || {
            Ok(self.objective.loss(&self.network, v1, v2)?)
        })?;
        let mut grads = phase("backward", &device, || Ok(outcome.loss.backward()?))?;
        // Data-parallel: the mean of every rank's gradients (BatchNorm statistics were
        // synced in forward and backward; a world of one does nothing here).
        let group = crate::dist::group();
        if group.reduces_gradients() {
            phase("gradient all-reduce", &device, || {
                Ok(group.average_gradients(&mut grads, &self.reduced)?)
            })?;
        }
        phase("optimizer", &device, || {
            Ok(self.optimizer.step(&grads, lr)?)
        })?;
        let objective = phase("after-step (EMA, memory)", &device, || {
            Ok(self.objective.after_step(
                &self.online,
                &self.cfg,
                self.step,
                outcome.keys.as_ref(),
            )?)
        })?;
        self.step += 1;
        self.embeddings = Some(outcome.embeddings);
        self.health.record(&outcome.loss)?;
        Ok(StepStats {
            step: self.step,
            lr,
            objective,
        })
    }

    /// Reads the last step's loss and whether a step since the last read had a
    /// non-finite loss (then clears that flag): two device-to-host reads. Call it at log
    /// steps and before a checkpoint, so a diverged state is never saved.
    ///
    /// Data-parallel, every rank must call it at the same step: the loss is the mean of
    /// the ranks' losses, the first non-finite step the earliest of any rank.
    pub fn read_health(&mut self) -> Result<Health, TrainError> {
        let loss = crate::host::scalar::<f32>(&self.health.loss)?;
        let first = crate::host::scalar::<i64>(&self.health.first_non_finite)?;
        self.health.first_non_finite = self.health.none.clone();
        let group = crate::dist::group();
        let (loss, first) = if group.world() > 1 {
            let all = group.all_gather_f64(&[f64::from(loss), first as f64]);
            let mean = all.iter().step_by(2).sum::<f64>() / group.world() as f64;
            let first = all
                .iter()
                .skip(1)
                .step_by(2)
                .fold(f64::INFINITY, |a, &b| a.min(b));
            let first = if first >= i64::MAX as f64 {
                i64::MAX
            } else {
                first as i64
            };
            (mean as f32, first)
        } else {
            (loss, first)
        };
        Ok(Health {
            loss,
            non_finite_at: (first != i64::MAX).then_some(first as u64),
        })
    }

    /// Collapse indicator and effective rank of the last step's embeddings (the online
    /// projections of its first view); `None` before the first step. Reads the device:
    /// call it at log steps only.
    pub fn embedding_stats(&self) -> Result<Option<EmbeddingStats>, TrainError> {
        self.embeddings
            .as_ref()
            .map(|z| EmbeddingStats::of(z).map_err(TrainError::from))
            .transpose()
    }
}
