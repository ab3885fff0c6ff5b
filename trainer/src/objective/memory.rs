//! A FIFO memory of unit embeddings: MSF's memory bank, MoCo's queue of keys.
//!
//! A ring of `capacity` rows on the device: [`Memory::push`] writes a batch at the
//! pointer, evicting the oldest entries first. Until the ring has been filled once, only
//! the filled rows are read (the daemon's dataset starts small).

use candle_core::{DType, Device, Result, Tensor};

use crate::state::{StateDict, StateError};

/// How full a memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryFill {
    /// Entries holding an embedding.
    pub filled: usize,
    /// Entries it holds when full (its config size).
    pub capacity: usize,
}

/// A ring of `capacity` embeddings of `dim` features.
pub struct Memory {
    /// The config key of its size (`msf.bank_size`, `mocov2.queue_size`), for errors.
    key: &'static str,
    /// `(capacity, dim)` f32; rows `filled..` are zeros and never read.
    entries: Tensor,
    /// Row the next push writes first.
    pointer: usize,
    /// Rows holding an embedding (at most `capacity`).
    filled: usize,
}

impl Memory {
    /// An empty memory of `capacity` rows of `dim` features on `device`; `key` names its
    /// size in the config.
    pub fn new(key: &'static str, capacity: usize, dim: usize, device: &Device) -> Result<Self> {
        Ok(Memory {
            key,
            entries: Tensor::zeros((capacity, dim), DType::F32, device)?,
            pointer: 0,
            filled: 0,
        })
    }

    /// The config key of its size (`msf.bank_size`, `mocov2.queue_size`).
    pub fn key(&self) -> &'static str {
        self.key
    }

    /// Rows it holds when full.
    pub fn capacity(&self) -> usize {
        self.entries.dims()[0]
    }

    /// Rows holding an embedding.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Filled rows and capacity.
    pub fn fill(&self) -> MemoryFill {
        MemoryFill {
            filled: self.filled,
            capacity: self.capacity(),
        }
    }

    /// The filled rows `(filled, dim)`, in slot order (not age order).
    pub fn entries(&self) -> Result<Tensor> {
        self.entries.narrow(0, 0, self.filled)
    }

    /// The rows the memory will hold once `keys` `(n, dim)` are pushed: `keys` first,
    /// then the older entries that survive the push. [`Memory::push`] leaves exactly
    /// these rows (in slot order).
    pub fn after_push(&self, keys: &Tensor) -> Result<Tensor> {
        let (n, cap) = (keys.dim(0)?, self.capacity());
        let keys = keys.to_dtype(DType::F32)?;
        if n >= cap {
            return keys.narrow(0, n - cap, cap);
        }
        let survivors = if self.filled + n <= cap {
            self.entries.narrow(0, 0, self.filled)?
        } else {
            self.ring((self.pointer + n) % cap, cap - n)?
        };
        Tensor::cat(&[&keys, &survivors], 0)
    }

    /// `len` rows from slot `start`, wrapping around the end.
    fn ring(&self, start: usize, len: usize) -> Result<Tensor> {
        let cap = self.capacity();
        if start + len <= cap {
            return self.entries.narrow(0, start, len);
        }
        let head = self.entries.narrow(0, start, cap - start)?;
        let tail = self.entries.narrow(0, 0, len - (cap - start))?;
        Tensor::cat(&[&head, &tail], 0)
    }

    /// Writes `keys` `(n, dim)` at the pointer, wrapping, so the oldest entries go first.
    pub fn push(&mut self, keys: &Tensor) -> Result<()> {
        let (n, cap) = (keys.dim(0)?, self.capacity());
        let keys = keys.detach().to_dtype(DType::F32)?;
        let keys = if n > cap {
            keys.narrow(0, n - cap, cap)?
        } else {
            keys
        };
        let n = n.min(cap);
        // In place (a bank can be a gigabyte): nothing holds the ring's storage across a
        // push. Views from `entries` live in one step's graph, which is done by then;
        // `state` is serialised at once by the checkpoint writer; `load_state` and `new`
        // give the ring storage of its own.
        let first = n.min(cap - self.pointer);
        let entries = &self.entries;
        entries.slice_set(&keys.narrow(0, 0, first)?.contiguous()?, 0, self.pointer)?;
        if n > first {
            entries.slice_set(&keys.narrow(0, first, n - first)?.contiguous()?, 0, 0)?;
        }
        self.pointer = (self.pointer + n) % cap;
        self.filled = (self.filled + n).min(cap);
        Ok(())
    }

    /// Its state as `<prefix>entries` `(capacity, dim)`, `<prefix>pointer` and
    /// `<prefix>filled` (int64 scalars).
    pub fn state(&self, prefix: &str) -> Result<StateDict> {
        let device = self.entries.device();
        Ok(vec![
            (format!("{prefix}entries"), self.entries.clone()),
            (
                format!("{prefix}pointer"),
                Tensor::new(self.pointer as i64, device)?,
            ),
            (
                format!("{prefix}filled"),
                Tensor::new(self.filled as i64, device)?,
            ),
        ]
        .into())
    }

    /// Checks [`Memory::state`]'s tensors in `state` and returns its pointer and count.
    ///
    /// Errors: a tensor missing, a pointer or count out of range (damage); entries of
    /// another size than this run's (a [`StateError::Mismatch`] naming the key).
    pub fn check_state(
        &self,
        prefix: &str,
        state: &StateDict,
    ) -> std::result::Result<(usize, usize), StateError> {
        let get = |name: &str| {
            let name = format!("{prefix}{name}");
            state.get(&name).ok_or(StateError::MissingTensor(name))
        };
        let entries = get("entries")?;
        if entries.dims() != self.entries.dims() {
            return Err(StateError::Mismatch {
                what: self.key,
                theirs: format!("{:?}", entries.dims()),
                ours: format!("{:?}", self.entries.dims()),
            });
        }
        let scalar = |name: &str| -> std::result::Result<usize, StateError> {
            let v = crate::host::scalar::<i64>(&get(name)?.to_dtype(DType::I64)?)?;
            usize::try_from(v).map_err(|_| StateError::Value {
                name: format!("{prefix}{name}"),
                reason: format!("{v} is negative"),
            })
        };
        let (pointer, filled, cap) = (scalar("pointer")?, scalar("filled")?, self.capacity());
        if filled > cap || pointer >= cap || (filled < cap && pointer != filled) {
            return Err(StateError::Value {
                name: format!("{prefix}pointer"),
                reason: format!(
                    "pointer {pointer} and filled {filled} do not describe a ring of {cap}"
                ),
            });
        }
        Ok((pointer, filled))
    }

    /// Restores [`Memory::state`] from `state`, checked first ([`Memory::check_state`]):
    /// a refused state changes nothing.
    pub fn load_state(
        &mut self,
        prefix: &str,
        state: &StateDict,
    ) -> std::result::Result<(), StateError> {
        let (pointer, filled) = self.check_state(prefix, state)?;
        let entries = &state
            .get(&format!("{prefix}entries"))
            .expect("checked above");
        self.entries = entries
            .to_device(self.entries.device())?
            .to_dtype(DType::F32)?
            .copy()?;
        self.pointer = pointer;
        self.filled = filled;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(m: &Memory) -> Vec<f32> {
        m.entries()
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn keys(values: &[f32]) -> Tensor {
        let n = values.len();
        let v: Vec<f32> = values.iter().flat_map(|&x| [x, -x]).collect();
        Tensor::from_vec(v, (n, 2), &Device::Cpu).unwrap()
    }

    fn sorted(t: &Tensor) -> Vec<f32> {
        let mut v: Vec<f32> = t
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        v.sort_by(f32::total_cmp);
        v
    }

    #[test]
    fn push_fills_then_evicts_oldest_first() {
        let mut m = Memory::new("test.size", 5, 2, &Device::Cpu).unwrap();
        m.push(&keys(&[1.0, 2.0])).unwrap();
        assert_eq!(rows(&m), [1.0, 2.0], "only the filled rows are read");
        m.push(&keys(&[3.0, 4.0])).unwrap();
        assert_eq!(m.filled(), 4);
        // Wraps: 5 fills the last slot, 6 replaces 1 (the oldest).
        let after = m.after_push(&keys(&[5.0, 6.0])).unwrap();
        m.push(&keys(&[5.0, 6.0])).unwrap();
        assert_eq!(rows(&m), [6.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(sorted(&after), sorted(&m.entries().unwrap()));
        // Full: 7, 8, 9 replace 2, 3, 4.
        let after = m.after_push(&keys(&[7.0, 8.0, 9.0])).unwrap();
        m.push(&keys(&[7.0, 8.0, 9.0])).unwrap();
        assert_eq!(rows(&m), [6.0, 7.0, 8.0, 9.0, 5.0]);
        assert_eq!(sorted(&after), sorted(&m.entries().unwrap()));
        // The second feature travelled with its row.
        let second: Vec<f32> = m
            .entries()
            .unwrap()
            .narrow(1, 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(second, [-6.0, -7.0, -8.0, -9.0, -5.0]);
    }

    #[test]
    fn a_push_larger_than_the_memory_keeps_its_newest_rows() {
        let mut m = Memory::new("test.size", 2, 2, &Device::Cpu).unwrap();
        m.push(&keys(&[1.0])).unwrap();
        let after = m.after_push(&keys(&[2.0, 3.0, 4.0])).unwrap();
        m.push(&keys(&[2.0, 3.0, 4.0])).unwrap();
        assert_eq!(sorted(&after), [3.0, 4.0]);
        assert_eq!(sorted(&m.entries().unwrap()), [3.0, 4.0]);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let mut m = Memory::new("test.size", 3, 2, &Device::Cpu).unwrap();
        m.push(&keys(&[1.0, 2.0])).unwrap();
        let state = m.state("bank.").unwrap();
        let mut r = Memory::new("test.size", 3, 2, &Device::Cpu).unwrap();
        r.load_state("bank.", &state).unwrap();
        m.push(&keys(&[3.0, 4.0])).unwrap();
        r.push(&keys(&[3.0, 4.0])).unwrap();
        assert_eq!(rows(&r), rows(&m));
        assert_eq!(rows(&r), [4.0, 2.0, 3.0]);

        let mut other = Memory::new("test.size", 4, 2, &Device::Cpu).unwrap();
        let e = other.load_state("bank.", &state).unwrap_err();
        assert!(e.to_string().contains("test.size"), "{e}");
        let mut bad = state.clone();
        bad.insert("bank.pointer", Tensor::new(7i64, &Device::Cpu).unwrap());
        let e = r.load_state("bank.", &bad).unwrap_err();
        assert!(e.to_string().contains("bank.pointer"), "{e}");
        assert_eq!(rows(&r), [4.0, 2.0, 3.0], "nothing changed on a refusal");
    }
}
