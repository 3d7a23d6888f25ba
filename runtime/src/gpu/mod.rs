//! GPU tensors: intra-node reduction over NVLink (NCCL), pinned staging, the inter-node
//! push/pull of each GPU's shard.
//!
//! Built with the `cuda` feature (CUDA driver and NCCL loaded at run time through cudarc, so a
//! build needs no toolkit and a binary starts on machines without a GPU); without it every GPU
//! call returns [`Error::Unsupported`](crate::Error::Unsupported).
//!
//! # The path of one GPU push_pull (one process per GPU, `L` GPUs per host, `N` hosts)
//! - `N = 1`: one NCCL all-reduce among the local GPUs; no server is involved.
//! - `N > 1`: the tensor is cut into the job's chunks; chunk `c` is owned by local rank
//!   `(tensor + c) mod L` (the host aggregator of the CPU path). Per chunk: NCCL reduce to its
//!   owner (LOCAL_REDUCE), device → pinned host copy on a copy stream (STAGE_OUT), push to the
//!   chunk's server and pull the sum of all hosts (PUSH/PULL, through the event loop as any
//!   chunk), pinned host → device (STAGE_IN), then NCCL broadcast from the owner (LOCAL_GATHER).
//!   Copies of one chunk overlap the network transfer of another.
//! - The order in which NCCL calls are made is agreed through the scheduler (every local rank
//!   says "ready", the scheduler says "go" to all of them in one order), so ranks that submit
//!   tensors in different orders do not deadlock.

use crate::dtype::DType;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub mod dmabuf;
#[cfg(feature = "cuda")]
pub use cuda::{nccl_version, probe, staging_bandwidth, DeviceMem, StagingFigures};
#[cfg(feature = "cuda")]
pub(crate) use cuda::{GpuEngine, GpuOp, Links, Shape};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub(crate) use stub::unsupported;
#[cfg(not(feature = "cuda"))]
pub use stub::{nccl_version, probe};

/// A tensor in GPU memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBuf {
    /// Device address (`CUdeviceptr`).
    pub ptr: u64,
    /// CUDA device ordinal the memory lives on.
    pub device: i32,
    /// Size in bytes.
    pub bytes: usize,
    /// Element type.
    pub dtype: DType,
    /// The CUDA stream (`CUstream`) whose work produces the data; bps waits for it before
    /// reading. 0 = the legacy default stream.
    pub stream: u64,
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal.
    pub index: i32,
    /// Marketing name.
    pub name: String,
    /// Memory in bytes.
    pub memory: u64,
    /// PCI bus id (`0000:1b:00.0`).
    pub pci_bus_id: String,
}

/// Whether this build has the CUDA path.
pub fn compiled() -> bool {
    cfg!(feature = "cuda")
}
