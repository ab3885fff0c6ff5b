//! GPU collectives through NCCL (the `nccl` feature): the gradient all-reduce on the
//! device, so a data-parallel CUDA step reads nothing back to the host for it. NCCL's
//! unique id is made by rank 0 and broadcast over MPI, as NCCL's docs prescribe.
//!
//! One NCCL rank per GPU: NCCL refuses two ranks on one device, so processes sharing
//! a GPU keep MPI's host collectives ([`init`] says which applies).

use std::sync::{Mutex, OnceLock};

use candle_core::{CudaStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, bail};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::ProcessGroup;

/// Environment variable that runs a world of one through NCCL too (a check of the
/// NCCL path on a machine with one GPU).
pub const NCCL_SINGLE_ENV: &str = "BYOL_NCCL_SINGLE";

/// The NCCL communicator of this process, serialised by a lock.
pub struct DeviceComm {
    comm: Mutex<Comm>,
    world: usize,
}

// SAFETY: the communicator is used only under its lock, one call at a time, from any
// thread (NCCL communicators may be used from any thread when calls are serialised).
unsafe impl Send for DeviceComm {}
// SAFETY: as above.
unsafe impl Sync for DeviceComm {}

impl std::fmt::Debug for DeviceComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceComm {{ world: {} }}", self.world)
    }
}

static COMM: OnceLock<DeviceComm> = OnceLock::new();

/// Sets up NCCL for `group` on `device` when it applies: a CUDA device, and either more
/// than one rank each on its own GPU, or a world of one with `BYOL_NCCL_SINGLE` set.
/// Returns whether NCCL carries the gradients (otherwise MPI's host collectives do).
///
/// Errors: NCCL cannot make its id or communicator (the library is missing, say).
pub fn init(group: &'static ProcessGroup, device: &Device) -> Result<bool> {
    if COMM.get().is_some() {
        return Ok(true);
    }
    let Device::Cuda(cuda) = device else {
        return Ok(false);
    };
    if group.world() == 1 && std::env::var_os(NCCL_SINGLE_ENV).is_none() {
        return Ok(false);
    }
    // One GPU per rank: gather (host, ordinal) and look for a repeat.
    let host = hostname_hash();
    let ordinal = cuda.cuda_stream().context().ordinal() as f64;
    let all = group.all_gather_f64(&[host, ordinal]);
    let mut places: Vec<(u64, u64)> = all
        .chunks(2)
        .map(|p| (p[0].to_bits(), p[1].to_bits()))
        .collect();
    let n = places.len();
    places.sort_unstable();
    places.dedup();
    if places.len() != n {
        tracing::warn!(
            "{} ranks share a GPU: NCCL needs one per rank, so the gradients go through MPI on the host",
            n - places.len() + 1
        );
        return Ok(false);
    }
    // Rank 0's unique id, broadcast as 16 words.
    let mut words = [0u64; 16];
    if group.is_main() {
        let id = Id::new().map_err(|e| candle_core::Error::Msg(format!("NCCL id: {e:?}")))?;
        for (w, chunk) in words.iter_mut().zip(id.internal().chunks(8)) {
            let bytes: Vec<u8> = chunk.iter().map(|&c| c as u8).collect();
            *w = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        }
    }
    group.broadcast_u64(&mut words);
    let mut internal = [0 as std::ffi::c_char; 128];
    for (i, w) in words.iter().enumerate() {
        for (j, b) in w.to_le_bytes().into_iter().enumerate() {
            internal[8 * i + j] = b as std::ffi::c_char;
        }
    }
    let comm = Comm::from_rank(
        cuda.cuda_stream(),
        group.rank(),
        group.world(),
        Id::uninit(internal),
    )
    .map_err(|e| candle_core::Error::Msg(format!("NCCL communicator: {e:?}")))?;
    let _ = COMM.set(DeviceComm {
        comm: Mutex::new(comm),
        world: group.world(),
    });
    Ok(true)
}

/// The communicator [`init`] set up, if NCCL applies.
pub fn get() -> Option<&'static DeviceComm> {
    COMM.get()
}

impl DeviceComm {
    /// The element-wise sum over ranks of the f32 CUDA tensor `x` (a new tensor).
    pub fn all_reduce_sum(&'static self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&AllReduce { comm: self })
    }
}

/// A stable number for this machine's name (two ranks on one host share a GPU only if
/// they also share the host), exact in an f64.
fn hostname_hash() -> f64 {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let hash = name.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash >> 12) as f64
}

/// The all-reduce as an op, so that it runs on the tensor's own CUDA storage.
struct AllReduce {
    comm: &'static DeviceComm,
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "byol-nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("the NCCL all-reduce takes CUDA tensors")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let src = storage.as_cuda_slice::<f32>()?;
        let src =
            src.slice(layout.start_offset()..layout.start_offset() + layout.shape().elem_count());
        let comm = self.comm.comm.lock().unwrap();
        let mut out = comm
            .stream()
            .alloc_zeros::<f32>(layout.shape().elem_count())
            .map_err(|e| candle_core::Error::Msg(format!("NCCL buffer: {e:?}")))?;
        comm.all_reduce(&src, &mut out, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, storage.device.clone()),
            layout.shape().clone(),
        ))
    }
}
