//! Data-parallel training across processes: the process group (rank, world size) and
//! the collectives the step needs, on MPI (`mpirun`, Slurm's `srun`) behind the `mpi`
//! feature. No collective is our own: MPI reduces, gathers and broadcasts.
//!
//! A process started by a launcher (one that sets `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE` or
//! `PMIX_RANK`) joins the launcher's world on [`init`]; any other process is a world of
//! one, where every collective is the identity and nothing is ever sent.
//!
//! The collectives run on host buffers: the tensors of a CPU run are already there. On
//! GPUs, one per rank, the `nccl` feature all-reduces the gradients on the device
//! instead (the `nccl` module, its id broadcast over MPI); synced BatchNorm's
//! per-channel vectors still go through the host there.
//!
//! Every rank must call the same collectives in the same order: the step (forward,
//! backward, gradient all-reduce) is the same program on every rank, and the run loop's
//! decisions are rank 0's, broadcast ([`ProcessGroup::broadcast_u64`]).

#[cfg(feature = "nccl")]
pub mod nccl;

#[cfg(feature = "mpi")]
use std::sync::Mutex;
use std::sync::OnceLock;

use candle_core::{CustomOp1, Layout, Shape, Tensor};

/// Environment variables a launcher sets, with the world size or a rank: OpenMPI's
/// `mpirun`, MPICH/Hydra and Slurm's PMI, PMIx (Slurm `srun --mpi=pmix`).
const LAUNCHER_ENV: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// Gradients are all-reduced in flat buffers of up to this many bytes (PyTorch DDP's
/// default bucket size, 25 MiB): few collectives, bounded extra memory.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Why the process group cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Launched by an MPI launcher, but built without MPI.
    #[error(
        "launched by an MPI launcher ({var} is set), but this byol was built without the `mpi` feature: rebuild with `--features mpi`, or run it without mpirun"
    )]
    NotBuilt {
        /// The launcher's variable that was found.
        var: &'static str,
    },
    /// MPI could not be initialised (already finalised, or the launcher's environment
    /// is broken).
    #[error("MPI could not be initialised")]
    Init,
}

/// Seconds this process spent in data-parallel synchronisation since it started, by
/// purpose (waiting for a slower rank included: that is what it costs the step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncTimes {
    /// Averaging the gradients: copies to and from the flat buckets and the all-reduces.
    pub gradients: f64,
    /// Synced BatchNorm's reductions, forward and backward.
    pub batch_norm: f64,
    /// Everything else: gathers of cross-sample terms, the run's decisions, health.
    pub other: f64,
}

/// Nanoseconds per [`SyncTimes`] field.
#[derive(Debug, Default)]
struct SyncClock {
    gradients: std::sync::atomic::AtomicU64,
    batch_norm: std::sync::atomic::AtomicU64,
    other: std::sync::atomic::AtomicU64,
}

/// Runs `f`, adding its wall time to `counter`.
fn timed<T>(counter: &std::sync::atomic::AtomicU64, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    counter.fetch_add(
        start.elapsed().as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    out
}

/// The processes training one model: this one's rank and the world size.
#[derive(Debug)]
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    clock: SyncClock,
    /// Serialises every MPI call (MPI runs with `MPI_THREAD_SERIALIZED`).
    #[cfg(feature = "mpi")]
    lock: Mutex<()>,
}

static GROUP: OnceLock<ProcessGroup> = OnceLock::new();
/// The MPI environment, finalised by [`finalize`].
#[cfg(feature = "mpi")]
static UNIVERSE: Mutex<Option<mpi::environment::Universe>> = Mutex::new(None);

/// Joins the launcher's world (MPI), or sets up a world of one when no launcher started
/// this process. Idempotent: later calls return the same group.
///
/// Errors: [`DistError::NotBuilt`] when a launcher started this process but MPI is not
/// built in (N copies of one run would otherwise train side by side);
/// [`DistError::Init`] when MPI cannot start.
pub fn init() -> Result<&'static ProcessGroup, DistError> {
    if let Some(g) = GROUP.get() {
        return Ok(g);
    }
    let launcher = LAUNCHER_ENV
        .into_iter()
        .find(|v| std::env::var_os(v).is_some());
    let group = match launcher {
        None => ProcessGroup::single(),
        #[cfg(feature = "mpi")]
        Some(_) => {
            use mpi::traits::Communicator;
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or(DistError::Init)?;
            let world = universe.world();
            let group = ProcessGroup {
                rank: world.rank() as usize,
                world: world.size() as usize,
                clock: SyncClock::default(),
                lock: Mutex::new(()),
            };
            *UNIVERSE.lock().unwrap() = Some(universe);
            group
        }
        #[cfg(not(feature = "mpi"))]
        Some(var) => return Err(DistError::NotBuilt { var }),
    };
    Ok(GROUP.get_or_init(|| group))
}

/// This process's rank among the ranks on its node, as the launcher says
/// (`OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`, `SLURM_LOCALID`); `None` in a world
/// of one. Picks each rank's GPU ([`crate::device::open_for_rank`]).
pub fn local_rank() -> Option<usize> {
    if group().world() == 1 {
        return None;
    }
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The process group: the one [`init`] set up, or a world of one.
pub fn group() -> &'static ProcessGroup {
    GROUP.get_or_init(ProcessGroup::single)
}

/// Ends MPI at a normal exit (every rank must call it; nothing after it may use the
/// group). A no-op in a world of one.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    drop(UNIVERSE.lock().unwrap().take());
}

/// Ends every rank of the job at once after an error on this one (`MPI_Abort`): the
/// others would wait forever in their next collective. Returns in a world of one.
pub fn abort(code: i32) {
    #[cfg(feature = "mpi")]
    if group().world > 1 {
        use mpi::traits::Communicator;
        mpi::topology::SimpleCommunicator::world().abort(code);
    }
    let _ = code;
}

impl ProcessGroup {
    fn single() -> Self {
        ProcessGroup {
            rank: 0,
            world: 1,
            clock: SyncClock::default(),
            #[cfg(feature = "mpi")]
            lock: Mutex::new(()),
        }
    }

    /// This process's rank, `0..world`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Time spent synchronising so far (all zero in a world of one).
    pub fn sync_times(&self) -> SyncTimes {
        let secs = |c: &std::sync::atomic::AtomicU64| {
            c.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
        };
        SyncTimes {
            gradients: secs(&self.clock.gradients),
            batch_norm: secs(&self.clock.batch_norm),
            other: secs(&self.clock.other),
        }
    }

    /// True on rank 0, the one that decides, writes under the run folder and logs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Element-wise sum over all ranks, in place.
    pub fn all_reduce_sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if self.world > 1 {
            self.all_reduce_sum(values);
        }
        let _ = values;
    }

    /// Element-wise sum over all ranks, in place.
    pub fn all_reduce_sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if self.world > 1 {
            self.all_reduce_sum(values);
        }
        let _ = values;
    }

    /// Every rank's `local` (all of the same length), in rank order.
    pub fn all_gather_f32(&self, local: &[f32]) -> Vec<f32> {
        #[cfg(feature = "mpi")]
        if self.world > 1 {
            return timed(&self.clock.other, || self.all_gather(local));
        }
        local.to_vec()
    }

    /// Every rank's `local` (all of the same length), in rank order.
    pub fn all_gather_f64(&self, local: &[f64]) -> Vec<f64> {
        #[cfg(feature = "mpi")]
        if self.world > 1 {
            return timed(&self.clock.other, || self.all_gather(local));
        }
        local.to_vec()
    }

    /// Rank 0's `values`, on every rank (the run loop's decisions).
    pub fn broadcast_u64(&self, values: &mut [u64]) {
        #[cfg(feature = "mpi")]
        if self.world > 1 {
            timed(&self.clock.other, || self.broadcast(values));
        }
        let _ = values;
    }

    /// Rank 0's `bytes`, on every rank (resized to rank 0's length).
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        #[cfg(feature = "mpi")]
        if self.world > 1 {
            let mut len = [bytes.len() as u64];
            self.broadcast_u64(&mut len);
            bytes.resize(len[0] as usize, 0);
            timed(&self.clock.other, || self.broadcast(&mut bytes[..]));
        }
        let _ = bytes;
    }

    /// Rank 0's `values`, on every rank (untimed: synced BatchNorm times its own).
    pub fn broadcast_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if self.world > 1 {
            self.broadcast(values);
        }
        let _ = values;
    }

    #[cfg(feature = "mpi")]
    fn broadcast<T: mpi::datatype::Equivalence>(&self, values: &mut [T]) {
        use mpi::traits::{Communicator, Root};
        let _serial = self.lock.lock().unwrap();
        mpi::topology::SimpleCommunicator::world()
            .process_at_rank(0)
            .broadcast_into(values);
    }

    #[cfg(feature = "mpi")]
    fn all_reduce_sum<T: mpi::datatype::Equivalence + Copy>(&self, values: &mut [T]) {
        use mpi::collective::SystemOperation;
        use mpi::traits::CommunicatorCollectives;
        let send = values.to_vec();
        let _serial = self.lock.lock().unwrap();
        mpi::topology::SimpleCommunicator::world().all_reduce_into(
            &send[..],
            values,
            SystemOperation::sum(),
        );
    }

    #[cfg(feature = "mpi")]
    fn all_gather<T: mpi::datatype::Equivalence + Copy + Default>(&self, local: &[T]) -> Vec<T> {
        use mpi::traits::CommunicatorCollectives;
        let mut all = vec![T::default(); local.len() * self.world];
        let _serial = self.lock.lock().unwrap();
        mpi::topology::SimpleCommunicator::world().all_gather_into(local, &mut all[..]);
        all
    }

    /// True when the step must reduce its gradients: several ranks, or NCCL set up
    /// (a world of one through NCCL, as a check of that path).
    pub fn reduces_gradients(&self) -> bool {
        #[cfg(feature = "nccl")]
        if nccl::get().is_some() {
            return true;
        }
        self.world > 1
    }

    /// The mean over ranks of every gradient in `grads` of `vars`, in place: the
    /// gradients are flattened into buckets of up to [`BUCKET_BYTES`], each all-reduced
    /// once (through NCCL on the device when the `nccl` feature set it up, otherwise MPI on
    /// host buffers). A variable without a gradient counts as zeros (every rank must
    /// reduce the same buffers). A no-op in a world of one.
    ///
    /// Errors: a gradient cannot be read or rebuilt.
    pub fn average_gradients(
        &self,
        grads: &mut candle_core::backprop::GradStore,
        vars: &[candle_core::Var],
    ) -> candle_core::Result<()> {
        #[cfg(feature = "nccl")]
        if let Some(comm) = nccl::get()
            && vars.first().is_some_and(|v| v.device().is_cuda())
        {
            return timed(&self.clock.gradients, || {
                self.average_on_device(comm, grads, vars)
            });
        }
        if self.world == 1 {
            return Ok(());
        }
        timed(&self.clock.gradients, || self.average_buckets(grads, vars))
    }

    /// [`ProcessGroup::average_gradients`] through NCCL: each bucket concatenated on the
    /// device, all-reduced there, scaled and split back; nothing goes to the host.
    #[cfg(feature = "nccl")]
    fn average_on_device(
        &self,
        comm: &'static nccl::DeviceComm,
        grads: &mut candle_core::backprop::GradStore,
        vars: &[candle_core::Var],
    ) -> candle_core::Result<()> {
        let scale = 1.0 / self.world as f64;
        for bucket in buckets(vars) {
            let flat: Vec<Tensor> = bucket
                .iter()
                .map(|var| match grads.get(var.as_tensor()) {
                    Some(g) => g.to_dtype(candle_core::DType::F32)?.flatten_all(),
                    None => Tensor::zeros(var.elem_count(), candle_core::DType::F32, var.device()),
                })
                .collect::<candle_core::Result<_>>()?;
            let summed = comm
                .all_reduce_sum(&Tensor::cat(&flat, 0)?)?
                .affine(scale, 0.0)?;
            let mut at = 0;
            for var in bucket {
                let n = var.elem_count();
                let g = summed
                    .narrow(0, at, n)?
                    .reshape(var.shape())?
                    .to_dtype(var.dtype())?;
                grads.insert(var.as_tensor(), g);
                at += n;
            }
        }
        Ok(())
    }

    /// [`ProcessGroup::average_gradients`]'s work, in a world of several.
    fn average_buckets(
        &self,
        grads: &mut candle_core::backprop::GradStore,
        vars: &[candle_core::Var],
    ) -> candle_core::Result<()> {
        let scale = 1.0 / self.world as f32;
        for bucket in buckets(vars) {
            let len = bucket.iter().map(|v| v.elem_count()).sum();
            let mut flat = Vec::with_capacity(len);
            for var in bucket {
                match grads.get(var.as_tensor()) {
                    Some(g) => flat.extend(crate::host::vec1::<f32>(
                        &g.to_dtype(candle_core::DType::F32)?.flatten_all()?,
                    )?),
                    None => flat.resize(flat.len() + var.elem_count(), 0.0),
                }
            }
            self.all_reduce_sum_f32(&mut flat);
            let mut at = 0;
            for var in bucket {
                let n = var.elem_count();
                let mean: Vec<f32> = flat[at..at + n].iter().map(|v| v * scale).collect();
                let g = Tensor::from_vec(mean, var.shape(), var.device())?.to_dtype(var.dtype())?;
                grads.insert(var.as_tensor(), g);
                at += n;
            }
        }
        Ok(())
    }

    /// Every rank's rows of `x (n, d)`, in rank order: `(world · n, d)`. Differentiable:
    /// the gradient of this rank's rows is the sum over ranks of their gradients for
    /// them (each rank computes the same loss over the gathered rows, and the step
    /// averages the parameter gradients over ranks). The identity in a world of one.
    pub fn all_gather_rows(&'static self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.world == 1 {
            return Ok(x.clone());
        }
        let op = AllGatherRows { group: self };
        if x.device().is_cuda() {
            // Through the host (the embeddings are small: n × d), both ways.
            return crate::host::to_cpu(&x.contiguous()?)?
                .apply_op1(op)?
                .to_device(x.device());
        }
        x.contiguous()?.apply_op1(op)
    }
}

/// `vars` in buckets of consecutive variables of up to [`BUCKET_BYTES`] of f32 gradients
/// (a larger variable is a bucket of its own).
fn buckets(vars: &[candle_core::Var]) -> Vec<&[candle_core::Var]> {
    let per_bucket = BUCKET_BYTES / 4;
    let mut out = Vec::new();
    let mut start = 0;
    while start < vars.len() {
        let mut end = start;
        let mut len = 0;
        while end < vars.len() && (end == start || len + vars[end].elem_count() <= per_bucket) {
            len += vars[end].elem_count();
            end += 1;
        }
        out.push(&vars[start..end]);
        start = end;
    }
    out
}

/// Every rank's rows of `x (n, d)` as f32, in rank order (see
/// [`ProcessGroup::all_gather_rows`]): what an objective's cross-sample term is computed
/// over, so that N processes equal one process with the whole batch.
pub fn gather_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    group().all_gather_rows(&x.to_dtype(candle_core::DType::F32)?)
}

/// This rank's rows of `all (world · n, d)`, gathered by [`gather_rows`].
pub fn own_rows(all: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    all.narrow(0, group().rank() * n, n)
}

/// The differentiable row gather (see [`ProcessGroup::all_gather_rows`]).
struct AllGatherRows {
    group: &'static ProcessGroup,
}

impl CustomOp1 for AllGatherRows {
    fn name(&self) -> &'static str {
        "byol-all-gather-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        let x = crate::kernels::contiguous_f32(storage, layout, self.name())?;
        let (n, d) = layout.shape().dims2()?;
        let all = self.group.all_gather_f32(x);
        Ok((
            candle_core::CpuStorage::F32(all),
            (n * self.group.world, d).into(),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, d) = arg.dims2()?;
        let mut g =
            crate::host::vec1::<f32>(&grad.to_dtype(candle_core::DType::F32)?.flatten_all()?)?;
        self.group.all_reduce_sum_f32(&mut g);
        let mine = g[self.group.rank * n * d..(self.group.rank + 1) * n * d].to_vec();
        Ok(Some(Tensor::from_vec(mine, (n, d), arg.device())?))
    }
}

/// Synced BatchNorm's reductions over the group (see [`crate::kernels::CrossReplica`]).
impl crate::kernels::CrossReplica for ProcessGroup {
    fn broadcast(&self, values: &mut [f32]) {
        timed(&self.clock.batch_norm, || self.broadcast_f32(values));
    }

    fn sum(&self, values: &mut [f64]) {
        timed(&self.clock.batch_norm, || self.all_reduce_sum_f64(values));
    }

    fn world(&self) -> usize {
        self.world
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets hold consecutive variables up to the size limit, a larger variable alone,
    /// and every variable once, in order.
    #[test]
    fn gradients_are_bucketed_in_order_up_to_the_limit() {
        let per = BUCKET_BYTES / 4;
        let sizes = [3, per - 4, 5, per + 10, 1, 2];
        let vars: Vec<candle_core::Var> = sizes
            .iter()
            .map(|&n| {
                candle_core::Var::zeros(n, candle_core::DType::F32, &candle_core::Device::Cpu)
                    .unwrap()
            })
            .collect();
        let lens: Vec<Vec<usize>> = buckets(&vars)
            .iter()
            .map(|b| b.iter().map(|v| v.elem_count()).collect())
            .collect();
        assert_eq!(
            lens,
            vec![vec![3, per - 4], vec![5], vec![per + 10], vec![1, 2]]
        );
    }

    /// Outside a launcher the group is a world of one, whose collectives change nothing.
    #[test]
    fn a_world_of_one_changes_nothing() {
        let g = group();
        assert_eq!((g.rank(), g.world(), g.is_main()), (0, 1, true));
        let mut v = [1.5f32, -2.0];
        g.all_reduce_sum_f32(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(g.all_gather_f64(&[3.0]), vec![3.0]);
        let mut w = [7u64];
        g.broadcast_u64(&mut w);
        assert_eq!(w, [7]);
        assert!(!g.reduces_gradients());
    }
}
