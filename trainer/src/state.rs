//! Named-tensor state, apart from any file format: PyTorch's `state_dict` idea. The
//! trainer, the objectives, the optimizers and evaluation hand their state over as a
//! [`StateDict`] and take it back with [`StateDict::restore_vars`] (or their own
//! `load_state`), checked in full before anything is set; the checkpoint module is only
//! the IO of it.
//!
//! [`TrainerState`] is a whole trainer's state in those terms (what a checkpoint holds).
//!
//! Near a leaf: it knows candle and the plain-data config, nothing else of the crate.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var};

use crate::config::{Method, TrainerConfig};

/// A trainer's whole state apart from any file format: what it was made with, its step,
/// and three named-tensor states. [`crate::Trainer::state`] gives it,
/// [`crate::Trainer::restore`] takes it back; [`crate::checkpoint`] writes and reads it.
#[derive(Debug, Clone)]
pub struct TrainerState {
    /// What the state was made with: checked against a trainer before it is restored.
    pub origin: StateOrigin,
    /// Optimizer steps done.
    pub step: u64,
    /// The online variables (`encoder.*`, `projector.*`, the objective's trained heads),
    /// BatchNorm's running statistics and `num_batches_tracked` included.
    pub online: StateDict,
    /// The objective's own state ([`crate::Objective::state`]).
    pub objective: StateDict,
    /// The optimizer's state ([`crate::optim::Optimizer::state`]).
    pub optimizer: StateDict,
}

/// The settings a [`TrainerState`] was made with, those a restore must match.
#[derive(Debug, Clone, PartialEq)]
pub struct StateOrigin {
    /// The objective.
    pub method: Method,
    /// Batch size the schedules were scaled for.
    pub batch_size: usize,
    /// The whole trainer config.
    pub config: TrainerConfig,
}

/// Which part of a [`TrainerState`] a restore refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatePart {
    /// The settings it was made with ([`StateOrigin`]).
    Origin,
    /// [`TrainerState::online`].
    Online,
    /// [`TrainerState::objective`].
    Objective,
    /// [`TrainerState::optimizer`].
    Optimizer,
}

/// A refused [`crate::Trainer::restore`]: the part, and what did not fit. Nothing was
/// changed then.
#[derive(Debug, thiserror::Error)]
#[error("{part:?} state: {error}")]
pub struct RestoreError {
    /// The part refused.
    pub part: StatePart,
    /// Why.
    #[source]
    pub error: StateError,
}

/// What does not fit when a state is restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state holds another number of tensors than the model.
    #[error("{found} tensors, the model has {expected}")]
    TensorCount {
        /// Tensors in the state.
        found: usize,
        /// Tensors of the model.
        expected: usize,
    },
    /// A tensor of the model is not in the state.
    #[error("{0} is missing")]
    MissingTensor(String),
    /// A tensor has another shape than the model's.
    #[error("{name} has shape {found:?}, the model has {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape in the state.
        found: Vec<usize>,
        /// The model's.
        expected: Vec<usize>,
    },
    /// A tensor's value is out of its range (e.g. a memory's pointer).
    #[error("{name}: {reason}")]
    Value {
        /// The tensor.
        name: String,
        /// Why.
        reason: String,
    },
    /// Made with another setting than this run's (a memory's size).
    #[error("was made with {what} {theirs}, this run has {ours}")]
    Mismatch {
        /// The setting's key (`msf.bank_size`, …).
        what: &'static str,
        /// The state's value.
        theirs: String,
        /// This run's.
        ours: String,
    },
    /// A tensor operation failed while setting the state (the device).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Tensors by name, sorted by name. Cloning shares the tensors' storage.
#[derive(Debug, Clone, Default)]
pub struct StateDict(BTreeMap<String, Tensor>);

impl StateDict {
    /// An empty state.
    pub fn new() -> Self {
        StateDict::default()
    }

    /// The current values of `vars` (shared storage: a later update of a variable may show
    /// through; copy before mutating the variables if the state must stay).
    pub fn of_vars(vars: &[(String, Var)]) -> Self {
        vars.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name)
    }

    /// Adds (or replaces) `name`.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.0.insert(name.into(), tensor);
    }

    /// Whether `name` is in the state.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names and tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Keeps the tensors whose name passes `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|n, _| keep(n));
    }

    /// Every name with `prefix` put in front.
    pub fn with_prefix(self, prefix: &str) -> Self {
        self.0
            .into_iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t))
            .collect()
    }

    /// Split into the tensors whose name starts with `prefix` (names kept whole) and the
    /// rest.
    pub fn split_prefix(&self, prefix: &str) -> (StateDict, StateDict) {
        let (with, rest): (BTreeMap<_, _>, BTreeMap<_, _>) = self
            .0
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .partition(|(n, _)| n.starts_with(prefix));
        (StateDict(with), StateDict(rest))
    }

    /// Checks that the state holds exactly the tensors `expected` names, each of its
    /// shape (the model's names and shapes, in name order).
    ///
    /// Errors, the first found: another count ([`StateError::TensorCount`]), a name
    /// missing ([`StateError::MissingTensor`]), a shape ([`StateError::Shape`]).
    pub fn check_layout<'a>(
        &self,
        expected: impl ExactSizeIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<(), StateError> {
        if expected.len() != self.len() {
            return Err(StateError::TensorCount {
                found: self.len(),
                expected: expected.len(),
            });
        }
        for (name, dims) in expected {
            let Some(t) = self.get(name) else {
                return Err(StateError::MissingTensor(name.to_owned()));
            };
            if t.dims() != dims {
                return Err(StateError::Shape {
                    name: name.to_owned(),
                    found: t.dims().to_vec(),
                    expected: dims.to_vec(),
                });
            }
        }
        Ok(())
    }

    /// [`StateDict::check_layout`] against another state's names and shapes.
    pub fn check_layout_of(&self, expected: &StateDict) -> Result<(), StateError> {
        self.check_layout(expected.0.iter().map(|(n, t)| (n.as_str(), t.dims())))
    }

    /// [`StateDict::check_layout`] against `vars`.
    pub fn check_vars(&self, vars: &[(String, Var)]) -> Result<(), StateError> {
        self.check_layout(vars.iter().map(|(n, v)| (n.as_str(), v.dims())))
    }

    /// Sets every variable of `vars` from the tensor of its name, after checking them all
    /// ([`StateDict::check_vars`]): a refused state changes no variable.
    pub fn restore_vars(&self, vars: &[(String, Var)]) -> Result<(), StateError> {
        self.check_vars(vars)?;
        for (name, var) in vars {
            var.set(&self.0[name])?;
        }
        Ok(())
    }

    /// Into `(name, tensor)` pairs in name order.
    pub fn into_named(self) -> Vec<(String, Tensor)> {
        self.0.into_iter().collect()
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        StateDict(iter.into_iter().collect())
    }
}

impl From<HashMap<String, Tensor>> for StateDict {
    fn from(tensors: HashMap<String, Tensor>) -> Self {
        tensors.into_iter().collect()
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, Tensor>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl From<Vec<(String, Tensor)>> for StateDict {
    fn from(tensors: Vec<(String, Tensor)>) -> Self {
        tensors.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn var(dims: &[usize], v: f32) -> Var {
        Var::from_tensor(&Tensor::full(v, dims, &Device::Cpu).unwrap()).unwrap()
    }

    fn value(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn a_refused_restore_sets_no_variable() {
        let vars = vec![
            ("a".to_owned(), var(&[2], 0.0)),
            ("b".to_owned(), var(&[3], 0.0)),
        ];
        // `a` fits and comes first; `b` does not: nothing may change.
        let state: StateDict = vec![
            (
                "a".to_owned(),
                Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "b".to_owned(),
                Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
            ),
        ]
        .into();
        assert!(matches!(
            state.restore_vars(&vars),
            Err(StateError::Shape { ref name, .. }) if name == "b"
        ));
        assert_eq!(value(&vars[0].1), [0.0, 0.0]);
        let missing: StateDict = vec![(
            "a".to_owned(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        )]
        .into();
        assert!(matches!(
            missing.restore_vars(&vars),
            Err(StateError::TensorCount {
                found: 1,
                expected: 2
            })
        ));
        let renamed: StateDict = vec![
            (
                "a".to_owned(),
                Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "c".to_owned(),
                Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
            ),
        ]
        .into();
        assert!(matches!(
            renamed.restore_vars(&vars),
            Err(StateError::MissingTensor(ref n)) if n == "b"
        ));
        assert_eq!(value(&vars[0].1), [0.0, 0.0]);
    }

    #[test]
    fn prefixes_split_and_join() {
        let t = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let s: StateDict = vec![("x".to_owned(), t.clone()), ("y".to_owned(), t)].into();
        let joined = {
            let mut j = s.clone().with_prefix("target.");
            j.insert(
                "bank.entries",
                Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            );
            j
        };
        let (target, rest) = joined.split_prefix("target.");
        assert_eq!(
            target.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ["target.x", "target.y"]
        );
        assert_eq!(
            rest.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ["bank.entries"]
        );
        assert!(target.check_layout_of(&s.with_prefix("target.")).is_ok());
    }
}
