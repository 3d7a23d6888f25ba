//! The CUDA path (feature `cuda`).

use super::{DeviceBuf, GpuInfo};
use crate::Error;

/// The GPUs of this machine, or why there are none usable.
///
/// # Errors
/// No CUDA driver library, a driver call failing, or no device.
pub fn probe() -> Result<Vec<GpuInfo>, String> {
    Err("the CUDA path is being built".into())
}

pub(crate) fn unsupported(_buf: &DeviceBuf) -> Error {
    Error::Unsupported("the CUDA path is being built".into())
}
