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

/// Opens the device a setting names.
pub fn open_device(spec: DeviceSpec) -> Result<Device, TrainError> {
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
