//! The RDMA backend of a build without feature `rdma`: the same public types, whose
//! constructors return `Error::Unsupported { feature: "rdma", .. }`, and an engine that declines
//! every RDMA offer (so a peer built with the feature falls back to tcp).

use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, RawFd};

use super::wire::{Endpoint, Handshake};
use super::{DeviceSummary, RdmaConfig, RdmaStats};
use crate::{Error, Event, LinkKind, PeerId, RemoteSlice, Result};

const WHY: &str = "this build has no RDMA backend (build bps-transport with feature `rdma`)";

fn unsupported() -> Error {
    Error::Unsupported {
        feature: "rdma",
        reason: WHY.into(),
    }
}

/// Uninhabited: values of the stub types cannot exist.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// See [`probe`](crate::rdma::probe) in a build with feature `rdma`.
///
/// # Errors
/// Always `Error::Unsupported { feature: "rdma", .. }`.
pub fn probe(_cfg: &RdmaConfig) -> Result<DeviceSummary> {
    Err(unsupported())
}

/// An opened RDMA device (not in this build).
#[derive(Clone, Debug)]
pub struct Context(Never);

impl Context {
    /// # Errors
    /// Always `Error::Unsupported { feature: "rdma", .. }`.
    pub fn open(_cfg: &RdmaConfig) -> Result<Context> {
        Err(unsupported())
    }
    /// The device in use.
    pub fn summary(&self) -> &DeviceSummary {
        match self.0 {}
    }
    /// Bytes registered.
    pub fn registered_bytes(&self) -> u64 {
        match self.0 {}
    }
    /// The completion channel's fd.
    pub fn channel_fd(&self) -> RawFd {
        match self.0 {}
    }
    /// Registers memory.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    ///
    /// # Safety
    /// As in a build with feature `rdma`.
    pub unsafe fn register(&self, _ptr: *mut u8, _len: usize) -> Result<MemoryRegion> {
        match self.0 {}
    }
    /// Registers device memory through its dma-buf.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    ///
    /// # Safety
    /// As in a build with feature `rdma`.
    pub unsafe fn register_dmabuf(
        &self,
        _fd: BorrowedFd<'_>,
        _offset: u64,
        _len: usize,
        _iova: u64,
    ) -> Result<MemoryRegion> {
        match self.0 {}
    }
    /// Creates a queue pair.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    pub fn create_qp(&self, _send_depth: u32, _recv_depth: u32) -> Result<QueuePair> {
        match self.0 {}
    }
}

/// A registered memory region (not in this build).
#[derive(Debug)]
pub struct MemoryRegion(Never);

impl MemoryRegion {
    /// Local key.
    pub fn lkey(&self) -> u32 {
        match self.0 {}
    }
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        match self.0 {}
    }
    /// Start address.
    pub fn addr(&self) -> u64 {
        match self.0 {}
    }
    /// Length.
    pub fn len(&self) -> usize {
        match self.0 {}
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        match self.0 {}
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        match self.0 {}
    }
}

/// A queue pair (not in this build).
#[derive(Debug)]
pub struct QueuePair(Never);

impl QueuePair {
    /// What the peer needs to connect.
    pub fn endpoint(&self) -> Endpoint {
        match self.0 {}
    }
    /// Connects.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    pub fn connect(&mut self, _remote: &Endpoint) -> Result<()> {
        match self.0 {}
    }
    /// Posts send requests.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    ///
    /// # Safety
    /// As in a build with feature `rdma`.
    pub unsafe fn post_send(&mut self, _wrs: &[WorkRequest]) -> Result<()> {
        match self.0 {}
    }
    /// Posts receive requests.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    ///
    /// # Safety
    /// As in a build with feature `rdma`.
    pub unsafe fn post_recv(&mut self, _bufs: &[(u64, u32, u64, u32)]) -> Result<()> {
        match self.0 {}
    }
    /// Polls completions.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    pub fn poll(&self, _out: &mut Vec<Completion>, _max: usize) -> Result<usize> {
        match self.0 {}
    }
    /// Arms the completion queue.
    ///
    /// # Errors
    /// Never returns (no value of this type exists).
    pub fn arm(&self) -> Result<()> {
        match self.0 {}
    }
}

/// A send work request (as in a build with feature `rdma`).
#[derive(Clone, Copy, Debug)]
pub enum WorkRequest {
    /// SEND.
    Send {
        /// Id.
        wr_id: u64,
        /// Local key.
        lkey: u32,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// RDMA WRITE.
    Write {
        /// Id.
        wr_id: u64,
        /// Local key.
        lkey: u32,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
        /// Remote key.
        rkey: u32,
        /// Remote address.
        remote_addr: u64,
    },
    /// RDMA WRITE_WITH_IMM.
    WriteImm {
        /// Id.
        wr_id: u64,
        /// Local key.
        lkey: u32,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
        /// Remote key.
        rkey: u32,
        /// Remote address.
        remote_addr: u64,
        /// Immediate.
        imm: u32,
    },
}

/// A work completion (as in a build with feature `rdma`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Id.
    pub wr_id: u64,
    /// Status.
    pub status: u32,
    /// Opcode.
    pub opcode: u32,
    /// Bytes received.
    pub byte_len: u32,
    /// Immediate.
    pub imm: Option<u32>,
}

impl Completion {
    /// Opcode of a receive completion for a WRITE_WITH_IMM.
    pub const RECV_RDMA_WITH_IMM: u32 = 129;
    /// Opcode of a receive completion for a SEND.
    pub const RECV: u32 = 128;
    /// Status of a request flushed because its QP went to the error state.
    pub const FLUSHED: u32 = 5;
    /// Whether it succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == 0
    }
    /// Whether it is a receive completion.
    pub fn is_recv(&self) -> bool {
        self.opcode & 128 != 0
    }
    /// The status in words.
    pub fn status_str(&self) -> String {
        format!("status {}", self.status)
    }
}

/// An operation handed back to `Net` (never, in this build).
#[allow(dead_code)]
pub(crate) enum Replay {
    Send {
        lane: u32,
        data: Vec<u8>,
    },
    Write {
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
    },
}

/// The engine of a build without RDMA: claims no peer and declines offers.
pub(crate) struct Engine;

#[allow(clippy::unused_self)]
impl Engine {
    pub(crate) fn new(
        _cfg: &RdmaConfig,
        force: Option<LinkKind>,
        _queue_depth: usize,
        _max_msg: usize,
        _waker: std::sync::Arc<mio::Waker>,
    ) -> Engine {
        if force == Some(LinkKind::Rdma) {
            tracing::warn!("rdma: {WHY}; BPS_TRANSPORT=rdma falls back to tcp");
        }
        Engine
    }
    pub(crate) fn stats(&self) -> RdmaStats {
        RdmaStats::default()
    }
    pub(crate) fn add_peer(&mut self, _peer: PeerId, _dialler: bool) {}
    pub(crate) fn claims(&self, _peer: PeerId) -> bool {
        false
    }
    pub(crate) fn is_up(&self, _peer: PeerId) -> bool {
        false
    }
    pub(crate) fn offer(&mut self, _peer: PeerId) -> Option<String> {
        None
    }
    pub(crate) fn awaits_reply(&self, _peer: PeerId) -> bool {
        false
    }
    pub(crate) fn on_reply(
        &mut self,
        _peer: PeerId,
        _reply: &str,
    ) -> std::result::Result<(), String> {
        Err("an RDMA answer, but no RDMA offer was made".into())
    }
    pub(crate) fn on_attach(&mut self, _peer: PeerId, offer: Option<&str>) -> Option<String> {
        offer
            .filter(|o| Handshake::is_handshake(o))
            .map(|_| Handshake::Decline(WHY.into()).encode())
    }
    pub(crate) fn take_replay(&mut self) -> Vec<(PeerId, Vec<Replay>)> {
        Vec::new()
    }
    pub(crate) fn take_lost(&mut self) -> Vec<(PeerId, String)> {
        Vec::new()
    }
    pub(crate) fn lose(&mut self, _peer: PeerId, _reason: &str) {}
    pub(crate) fn register(&mut self, _token: u64, _ptr: *mut u8, _len: usize) -> Result<()> {
        Ok(())
    }
    pub(crate) fn deregister(&mut self, _token: u64) {}
    /// # Safety
    /// Nothing is registered in this build.
    pub(crate) unsafe fn register_dmabuf(
        &mut self,
        _token: u64,
        _fd: BorrowedFd<'_>,
        _offset: u64,
        _len: usize,
        _iova: u64,
    ) -> Result<()> {
        Err(Error::Unsupported {
            feature: "rdma",
            reason: format!(
                "{WHY}: device memory (a dma-buf) can only be registered with an RDMA device"
            ),
        })
    }
    pub(crate) fn is_dmabuf(&self, _token: u64) -> bool {
        false
    }
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_write_dmabuf(
        &mut self,
        _peer: PeerId,
        _lane: u32,
        _src: u64,
        _src_offset: u64,
        _len: u64,
        _dst: RemoteSlice,
        _imm: u32,
        _wr_id: u64,
        _link: Option<LinkKind>,
    ) -> Option<Result<()>> {
        None
    }
    pub(crate) fn try_send(
        &mut self,
        _peer: PeerId,
        _lane: u32,
        _msg: &[u8],
    ) -> Option<Result<()>> {
        None
    }
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_write_imm(
        &mut self,
        _peer: PeerId,
        _lane: u32,
        _src: u64,
        _src_offset: u64,
        _len: u64,
        _dst: RemoteSlice,
        _imm: u32,
        _wr_id: u64,
    ) -> Option<Result<()>> {
        None
    }
    pub(crate) fn poll(&mut self, _out: &mut VecDeque<Event>) {}
    pub(crate) fn prepare_sleep(&mut self) -> bool {
        true
    }
}
