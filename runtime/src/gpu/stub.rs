//! Without the `cuda` feature: every GPU call says so.

use super::{DeviceBuf, GpuInfo};
use crate::Error;

/// The GPUs of this machine: none in a build without CUDA.
///
/// # Errors
/// Always: this build has no CUDA support.
pub fn probe() -> Result<Vec<GpuInfo>, String> {
    Err("this build has no CUDA support (build bps-runtime with the `cuda` feature)".into())
}

pub(crate) fn unsupported(_buf: &DeviceBuf) -> Error {
    Error::Unsupported(
        "GPU tensors need a build with the `cuda` feature (this one has none)".into(),
    )
}

/// NCCL's version: none in a build without CUDA.
///
/// # Errors
/// Always: this build has no CUDA support.
pub fn nccl_version() -> Result<i32, String> {
    Err("this build has no CUDA support (build bps-runtime with the `cuda` feature)".into())
}
