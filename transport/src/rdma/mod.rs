//! The RDMA verbs backend (feature `rdma`).
//!
//! # What a link of kind [`LinkKind::Rdma`](crate::LinkKind::Rdma) is
//!
//! An RDMA link to a peer is the ordinary tcp link of [`Net`](crate::Net) (lanes, `Hello`,
//! optional HMAC handshake) used as the **bootstrap and liveness channel**, plus **one RC queue
//! pair** that carries *all* traffic once it is up:
//!
//! * **Negotiation, inside the tcp handshake.** The dialler (the lower id) creates its QP before
//!   dialling and puts an *offer* (`bps-rdma/2 offer qpn=… psn=… lid=… gid=… mtu=…`) in the
//!   otherwise unused `shm_path` field of lane 0's `Hello` (tcp acceptors ignore that field, so an
//!   offer costs nothing on the wire format). The acceptor answers — after the authentication
//!   handshake when the job has a secret — with a `Hello` frame of its own on lane 0 carrying
//!   `accept …` (its QP, already in RTS) or `decline <reason>` (no device, tcp forced, or a build
//!   without this feature: the stub declines too). On `accept` the dialler moves its QP to RTS and
//!   sends a `READY` message over the QP; `Event::Connected { kind: Rdma }` is reported when that
//!   message completed (dialler) or arrived (acceptor), i.e. once the QP path is proven both ways.
//!   On `decline` both sides keep the tcp link and report `Connected { kind: Tcp }`, with one log
//!   line saying why.
//! * **Two-sided messages move to SEND/RECV** on the QP (fragmented into `msg_chunk`-byte pieces
//!   into pre-posted receive buffers, reassembled in order). This is what keeps the contract's
//!   per-lane order between `try_send` and `try_write_imm` (the conformance test
//!   `send_then_write_in_order`): on one RC QP every SEND and WRITE_WITH_IMM consumes receive
//!   requests in posting order. Messages on tcp and writes on the QP could overtake each other.
//! * **A push is one RDMA WRITE_WITH_IMM** straight from the registered source into the peer's
//!   registered region (split into `max_msg_sz` pieces, the last one WITH_IMM). A completion
//!   carries no address, only the 32-bit immediate, so the immediate names a slot of a
//!   **destination table** the two ends of the link share: the first write to a destination
//!   `(token, offset, len, caller's immediate)` is preceded, in the same post, by a small
//!   `Define` SEND that sets a slot to it; every later write to the same destination — the
//!   steady state of push_pull, whose chunks go to the same server slot and answers to the same
//!   worker buffer every round — is the WRITE_WITH_IMM alone. The receiver looks the slot up on
//!   the `IBV_WC_RECV_RDMA_WITH_IMM` completion and reports `Event::WriteReceived` with the
//!   caller's immediate (RC delivers the definition before the write). The table holds 4096
//!   slots; past that, slots are reused round-robin (redefined before use, so still in order).
//!   The sender reports `Event::WriteDone` when the last WR of the write is retired.
//! * **Posting.** An operation is posted at once when its link's send queue is idle; while
//!   requests are in flight, operations queue and the next `Net::poll` posts all of them in one
//!   `ibv_post_send`. Only the last request of a post and every 32nd are signaled (selective
//!   signaling): the completion of a signaled request retires it and every unsignaled request
//!   before it (their send-queue entries, send buffers and `WriteDone`s), which is what keeps
//!   the send-queue accounting exact with fewer completions.
//! * **Tokens → (addr, rkey).** On the first write to a (peer, token) the sender asks the peer
//!   (`RESOLVE token`) and queues that write and everything after it; the owner answers
//!   `ANNOUNCE token addr rkey len` (registering the region with the NIC if it was not yet) and
//!   the answer is cached for the life of the link. A token the owner never issued closes the
//!   link (as tcp does), one it deregistered makes later writes to it complete without sending.
//! * **Registration cache.** A region is registered with the NIC once, on its first RDMA use (or
//!   at [`Transport::register`](crate::Transport::register) when `BPS_TRANSPORT=rdma` is forced);
//!   registering the same `(address, length)` again under a new token reuses the memory region
//!   (reference counted). [`RdmaStats::mr_registrations`] counts the `ibv_reg_mr` (and `ibv_reg_dmabuf_mr`) calls.
//! * **Liveness.** A dead peer is noticed by its tcp link (EOF / reset) as before; a queue pair
//!   error (retry exceeded, remote access error) drops the whole link with the verbs status in
//!   the `PeerLost` reason.
//!
//! # Completions: a poller thread, handed over without locks
//!
//! Each `Net` with a device runs one completion poller thread (`bps-rdma-cq`), started with its
//! first queue pair (a `Net` whose peers all use tcp or shm has none). It drains the
//! completion queue of every queue pair, busy-polling while completions come and for
//! [`RdmaConfig::busy_poll`] after the last one (yielding the CPU between rounds), then arms
//! the CQs and sleeps on the completion channel. What it polls goes into a bounded
//! single-producer / single-consumer ring of atomics; `Net::poll` takes it from there (no lock,
//! no system call) and turns it into events, reposts the consumed receive buffers in one call
//! and posts what was queued. The event loop is woken through its `mio::Waker` only when it
//! declared it was about to sleep (a flag both sides check around a fence), so a busy loop costs
//! the poller no system call. Send-queue accounting (what makes `Busy` deterministic) stays in
//! the event loop, which alone posts; the poller only reads CQs. See `poller.rs`.
//!
//! # Without the feature, or without a device
//!
//! Without feature `rdma` this module is a stub with the same public types: [`probe`] and
//! [`Context::open`] return `Error::Unsupported { feature: "rdma", .. }` and a `Net` declines
//! every RDMA offer. With the feature but no usable device, [`probe`] says why
//! (`libibverbs.so.1 not found`, `no RDMA device (ibv_get_device_list returned 0)`, a device name
//! that does not exist, no active port, a bad GID index) and `Net` falls back to tcp with one log
//! line.
//!
//! # GPUDirect
//!
//! [`gpudirect`] holds the choice between registering a GPU buffer through its dma-buf
//! (`ibv_reg_dmabuf_mr`) and staging it through pinned host memory, with the fallback reported
//! once.

use std::time::Duration;

pub mod gpudirect;
pub(crate) mod wire;

#[cfg(feature = "rdma")]
mod engine;
#[cfg(feature = "rdma")]
mod poller;
#[cfg(feature = "rdma")]
mod sys;
#[cfg(feature = "rdma")]
mod verbs;

#[cfg(not(feature = "rdma"))]
mod stub;

#[cfg(feature = "rdma")]
pub(crate) use engine::{Engine, Replay};
#[cfg(feature = "rdma")]
pub use verbs::{probe, Completion, Context, MemoryRegion, QueuePair, WorkRequest};

#[cfg(not(feature = "rdma"))]
pub use stub::{probe, Completion, Context, MemoryRegion, QueuePair, WorkRequest};
#[cfg(not(feature = "rdma"))]
pub(crate) use stub::{Engine, Replay};

pub use wire::Endpoint;

/// Whether this build has the verbs backend (feature `rdma`).
pub const COMPILED: bool = cfg!(feature = "rdma");

/// Tunables of the RDMA backend (a field of [`NetConfig`](crate::NetConfig)). The environment
/// names in brackets are the ones the runtime maps onto these fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Device name, e.g. `mlx5_0` or `rxe0` (`BPS_RDMA_DEVICE`). `None`: the first device with an
    /// active port.
    pub device: Option<String>,
    /// Port number, from 1 (`BPS_RDMA_PORT`). `None`: the device's first active port.
    pub port: Option<u8>,
    /// GID index (`BPS_RDMA_GID_INDEX`, as `BYTEPS_RDMA_GID_INDEX`). `None`: on RoCE the first
    /// RoCE v2 GID holding an IPv4-mapped address, else the first RoCE v2 GID, else 0.
    pub gid_index: Option<u32>,
    /// Send queue depth per peer, in work requests (`BPS_RDMA_SEND_DEPTH`, 8..=32768).
    pub send_depth: u32,
    /// Receive queue depth per peer: pre-posted receive buffers (`BPS_RDMA_RECV_DEPTH`, 8..=32768).
    pub recv_depth: u32,
    /// Largest payload sent inline in a work request (`BPS_RDMA_INLINE_BYTES`, 0..=1024).
    pub inline_bytes: u32,
    /// Size of each receive (and message send) buffer; longer messages are fragmented
    /// (`BPS_RDMA_MSG_CHUNK`, 256..=1 MiB). Pinned per peer: `(send_depth + recv_depth) × msg_chunk`.
    pub msg_chunk: u32,
    /// Upper bound of the bytes this process registers with the NIC, buffers of the links
    /// included (`BPS_RDMA_MAX_REGISTERED_BYTES`). `0`: the locked-memory limit
    /// (`ulimit -l`, RLIMIT_MEMLOCK), or no bound where that is unlimited or the process holds
    /// CAP_IPC_LOCK.
    pub max_registered_bytes: u64,
    /// How long the completion poller thread keeps polling the completion queues after the last
    /// completion (yielding the CPU in between) before it arms the completion channel and sleeps
    /// on it (`BPS_RDMA_BUSY_POLL_US`). Zero: sleep as soon as nothing is there.
    pub busy_poll: Duration,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            device: None,
            port: None,
            gid_index: None,
            send_depth: 256,
            recv_depth: 256,
            inline_bytes: 64,
            msg_chunk: 4096,
            max_registered_bytes: 0,
            busy_poll: Duration::from_micros(20),
        }
    }
}

impl RdmaConfig {
    /// Clamps every field into its bounds (see the field docs).
    pub fn clamped(&self) -> RdmaConfig {
        RdmaConfig {
            device: self.device.clone().filter(|d| !d.is_empty()),
            port: self.port.filter(|p| *p >= 1),
            gid_index: self.gid_index,
            send_depth: self.send_depth.clamp(8, 32768),
            recv_depth: self.recv_depth.clamp(8, 32768),
            inline_bytes: self.inline_bytes.min(1024),
            msg_chunk: self.msg_chunk.clamp(256, 1 << 20),
            max_registered_bytes: self.max_registered_bytes,
            busy_poll: self.busy_poll.min(Duration::from_millis(10)),
        }
    }
}

/// What [`probe`] found: the device, port and GID a `Net` would use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Device name.
    pub device: String,
    /// Port number.
    pub port: u8,
    /// GID index in use.
    pub gid_index: u32,
    /// The GID (for RoCE, the IPv4/IPv6 address it stands for).
    pub gid: std::net::Ipv6Addr,
    /// `InfiniBand` or `Ethernet` (RoCE).
    pub link_layer: &'static str,
    /// LID of the port (InfiniBand).
    pub lid: u16,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// Largest message of one work request (`max_msg_sz`).
    pub max_msg_bytes: u64,
}

impl std::fmt::Display for DeviceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} port {} ({}, mtu {}), GID[{}] {}",
            self.device, self.port, self.link_layer, self.active_mtu, self.gid_index, self.gid
        )
    }
}

/// Counters of the RDMA backend of a `Net` (all zero without the feature).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdmaStats {
    /// `ibv_reg_mr` and `ibv_reg_dmabuf_mr` calls for regions of the application (link buffers
    /// not counted).
    pub mr_registrations: u64,
    /// `ibv_dereg_mr` calls for regions of the application (dma-buf regions included).
    pub mr_deregistrations: u64,
    /// Bytes registered now (link buffers included).
    pub registered_bytes: u64,
    /// Token resolutions asked of peers (first write to a (peer, token)).
    pub resolves_sent: u64,
    /// Writes posted (one per `try_write_imm` that went to the wire).
    pub writes_posted: u64,
    /// Messages posted.
    pub messages_posted: u64,
    /// Queue pairs created.
    pub queue_pairs: u64,
    /// `ibv_post_send` calls (each posts a batch of work requests).
    pub post_calls: u64,
    /// Work requests posted to send queues.
    pub send_requests: u64,
    /// Of those, the signaled ones (the others complete silently, retired by a later one).
    pub signaled_requests: u64,
    /// Destination-table definitions sent: writes whose (token, offset, len, immediate) the
    /// peer did not know yet. A write to a known destination is a single WRITE_WITH_IMM.
    pub dest_defines: u64,
    /// Completions handed from the poller thread to the event loop.
    pub completions: u64,
    /// Times the poller thread woke a sleeping event loop.
    pub poller_wakeups: u64,
    /// Times the poller thread slept on the completion channel.
    pub poller_sleeps: u64,
}
