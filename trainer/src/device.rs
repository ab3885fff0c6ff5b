//! Choosing the compute device from the config string.

use candle_core::Device;

use crate::TrainError;

/// A parsed device setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA when built in and available, CPU otherwise.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

/// The device of a data-parallel rank: with `auto` or `cuda` (no ordinal), the GPU of
/// its local rank on its node (`local_rank` modulo the GPUs present), so that each
/// rank has its own GPU where there are enough; an explicit `cuda:N`, or `cpu`, as
/// written. `local_rank` is `None` outside data-parallel training.
///
/// Errors: those of [`parse_device`] and [`open_device`].
pub fn open_for_rank(setting: &str, local_rank: Option<usize>) -> Result<Device, TrainError> {
    let spec = parse_device(setting)?;
    #[cfg(feature = "cuda")]
    if let Some(local) = local_rank
        && matches!(setting, "auto" | "cuda")
        && let Ok(count) = cudarc::driver::CudaContext::device_count()
        && count > 0
    {
        return open_device(DeviceSpec::Cuda(local % count as usize));
    }
    let _ = local_rank;
    open_device(spec)
}

/// Parses `auto`, `cpu` or `cuda:N` (`cuda` = `cuda:0`).
pub fn parse_device(s: &str) -> Result<DeviceSpec, TrainError> {
    match s {
        "auto" => Ok(DeviceSpec::Auto),
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| TrainError::Config {
                key: "train.device",
                reason: format!("{s:?} is not auto, cpu or cuda:N"),
            }),
    }
}

/// Opens the device a setting names; a CUDA device is set up for our step
/// (`kernels::tune_device`: event tracking, the memory pool's release threshold).
pub fn open_device(spec: DeviceSpec) -> Result<Device, TrainError> {
    let device = open_plain(spec)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        let settings = crate::kernels::tune_device(d)?;
        tracing::debug!(target: "byol::device", "{settings}");
    }
    Ok(device)
}

fn open_plain(spec: DeviceSpec) -> Result<Device, TrainError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(if cfg!(feature = "cuda") {
            Device::cuda_if_available(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        DeviceSpec::Cuda(n) if cfg!(feature = "cuda") => Ok(Device::new_cuda(n)?),
        DeviceSpec::Cuda(_) => Err(TrainError::Config {
            key: "train.device",
            reason: "this build has no CUDA support (build with --features cuda)".into(),
        }),
    }
}
