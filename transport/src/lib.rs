//! bps-transport: how bytes move between bps processes.
//!
//! This crate holds the [`Transport`] contract, its backends and the pieces every backend
//! shares:
//!
//! * [`Net`], the transport that carries every link of a process: `tcp` lanes on mio (several
//!   connections per peer), `shm` rings for peers on the same host ([`shm`]), and an in-process
//!   `loopback` link for messages a process sends itself. The backend of a peer is chosen once,
//!   when it is added, from the ordered list `shm` (same host) → `tcp`, or forced by
//!   configuration.
//! * [`codec`], the versioned wire format, bounded before anything is allocated.
//! * [`cq`], the lock-free completion queue through which the runtime tells the framework that
//!   an operation finished.
//!
//! What it does not do: it knows nothing of tensors, keys, servers or scheduling (`runtime`
//! sees both this crate and `scheduler`; this crate depends on neither).
//!
//! # The contract
//!
//! * Non-blocking: [`Transport::try_send`] and [`Transport::try_write_imm`] never block; a full
//!   queue is [`Error::Busy`] (back-pressure), not a failure. [`Transport::poll`] blocks at most
//!   for the timeout it is given.
//! * Memory is registered once ([`Transport::register`]) and named by a token; a peer that was
//!   told a token and an offset may write into that region with `try_write_imm`, which lands the
//!   payload straight in the region (RDMA's WRITE_WITH_IMM semantics; TCP and shm carry it in a
//!   frame). The receiver sees [`Event::WriteReceived`] with the 32-bit immediate.
//! * Small two-sided messages ([`Transport::try_send`]) carry control traffic.
//!
//! # Example
//!
//! ```
//! use bps_transport::{Net, NetConfig, PeerId, Transport, Event};
//! let mut net = Net::bind(NetConfig::new(PeerId(0), "127.0.0.1:0".parse().unwrap())).unwrap();
//! let me = net.local_addr();
//! net.add_peer(PeerId(0), me).unwrap();          // a process may talk to itself (loopback)
//! net.try_send(PeerId(0), 0, b"hello").unwrap();
//! let mut events = Vec::new();
//! net.poll(&mut events, Some(std::time::Duration::from_secs(1))).unwrap();
//! assert!(events.iter().any(|e| matches!(e, Event::Message { data, .. } if data == b"hello")));
//! ```
#![warn(missing_docs)]

pub mod auth;
pub mod codec;
pub mod cq;
mod error;
mod net;
mod primitive;
mod regcache;
pub mod shm;
// rdma: the RDMA verbs backend (feature `rdma`; a stub without it).
pub mod rdma;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::{Error, Result};
pub use net::{local_host_id, Net, NetConfig};
pub use regcache::RegistrationCache;

/// A process in the job, as numbered by the runtime (its index in the address book).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The kind of link that carries a peer's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkKind {
    /// The process itself: messages and writes are delivered in memory.
    Loopback,
    /// Shared-memory rings to a process on the same host.
    Shm,
    /// TCP connections (several lanes).
    Tcp,
    /// RDMA verbs: an RC queue pair per peer, bootstrapped over tcp (feature `rdma`, see [`rdma`]).
    Rdma,
}

impl LinkKind {
    /// Lower-case name as used in `BPS_TRANSPORT`.
    pub fn name(self) -> &'static str {
        match self {
            LinkKind::Loopback => "loopback",
            LinkKind::Shm => "shm",
            LinkKind::Tcp => "tcp",
            LinkKind::Rdma => "rdma",
        }
    }
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a peer can be reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    /// Its TCP listening address.
    pub tcp: SocketAddr,
    /// Its Unix socket for shared-memory links, if it accepts them.
    pub unix: Option<PathBuf>,
    /// Identity of its host (boot id and network namespace): equal means "same host".
    pub host: String,
}

/// A registered memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// The token peers name when they write into it.
    pub token: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// Where a one-sided write lands on the peer: a region it announced, at an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteSlice {
    /// The peer's region token.
    pub token: u64,
    /// Byte offset into it.
    pub offset: u64,
}

/// What [`Transport::poll`] reports.
#[derive(Debug)]
pub enum Event {
    /// Every lane to the peer is up.
    Connected {
        /// The peer.
        peer: PeerId,
        /// The link that carries it.
        kind: LinkKind,
    },
    /// A two-sided message arrived.
    Message {
        /// From whom.
        peer: PeerId,
        /// On which lane.
        lane: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A local write finished: its source memory may be reused.
    WriteDone {
        /// The peer written to.
        peer: PeerId,
        /// The caller's id of the write.
        wr_id: u64,
    },
    /// A peer wrote into one of our regions; the bytes are in place.
    WriteReceived {
        /// The writer.
        peer: PeerId,
        /// The immediate it sent.
        imm: u32,
        /// The region written.
        token: u64,
        /// Where in it.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// The peer's link failed (EOF, reset, protocol error). Nothing more will arrive from it.
    PeerLost {
        /// The peer.
        peer: PeerId,
        /// Why.
        error: Error,
    },
}

/// Wakes a thread blocked in [`Transport::poll`] from any other thread.
#[derive(Clone, Debug)]
pub struct Waker(Arc<mio::Waker>);

impl Waker {
    /// Wake the poller. Errors are ignored: a failed wake can only mean the poller is gone.
    pub fn wake(&self) {
        let _ = self.0.wake();
    }
}

/// The non-blocking transport contract every backend implements.
pub trait Transport {
    /// This process's id.
    fn local_peer(&self) -> PeerId;
    /// Tell the transport where a peer is; links are set up in the background.
    ///
    /// # Errors
    /// When the backend forced by configuration cannot reach that peer.
    fn add_peer(&mut self, peer: PeerId, addr: PeerAddr) -> Result<()>;
    /// Register memory so peers can write into it and so it can be written from.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid (allocated, not moved) until [`Transport::deregister`] is
    /// called with the returned token. While a peer may write into it (after its token was
    /// announced) the caller must not read or write it except after an
    /// [`Event::WriteReceived`] for the bytes in question; while a write from it is in flight
    /// (until [`Event::WriteDone`]) the caller must not modify it.
    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region>;
    /// Forget a region. Writes still arriving for it are discarded. Writes *from* it that are
    /// still queued keep reading it until their [`Event::WriteDone`] (or until the peer's link
    /// is dropped, e.g. with [`Net::disconnect`]): keep the memory valid until then.
    fn deregister(&mut self, token: u64) -> Result<()>;
    /// Send a small message. Copies `msg`; never blocks.
    ///
    /// # Errors
    /// [`Error::Busy`] when the lane's queue is full; [`Error::PeerLost`] /
    /// [`Error::UnknownPeer`]; [`Error::MessageTooLarge`].
    fn try_send(&mut self, peer: PeerId, lane: u32, msg: &[u8]) -> Result<()>;
    /// Write `len` bytes of registered region `src` (from `src_offset`) into the peer's region
    /// `dst`, delivering `imm` with it. Completes with [`Event::WriteDone`] carrying `wr_id`.
    /// Frames on one lane arrive in order.
    ///
    /// # Errors
    /// As [`Transport::try_send`], plus [`Error::UnknownToken`] / [`Error::OutOfBounds`] for
    /// `src` (and, on the loopback link, for `dst`, which is checked at once).
    #[allow(clippy::too_many_arguments)]
    fn try_write_imm(
        &mut self,
        peer: PeerId,
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
    ) -> Result<()>;
    /// Make progress and report what happened. Blocks at most `timeout` (None: until something
    /// happens) when there is nothing to report.
    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> Result<()>;
    /// A handle that wakes [`Transport::poll`] from another thread.
    fn waker(&self) -> Waker;
    /// The link that carries a peer, once chosen.
    fn link_kind(&self, peer: PeerId) -> Option<LinkKind>;
}
