//! The transport's error type.

use std::io;
use std::net::SocketAddr;

use crate::PeerId;

/// Everything that can go wrong in a transport call or on a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Back-pressure: the lane's send queue is full. Not a failure: retry after the next
    /// [`crate::Transport::poll`] (the caller parks the operation in its pending queue).
    #[error("send queue to peer {peer} is full (back-pressure; retry after poll)")]
    Busy {
        /// The peer whose queue is full.
        peer: PeerId,
    },
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done, e.g. "bind 127.0.0.1:9000" or "read from peer 3".
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The local address is taken by another process.
    #[error("cannot listen on {addr}: address already in use (pick another port, e.g. set DMLC_PS_ROOT_PORT / BPS_PORT, or stop the process holding it)")]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// A peer id was used that was never added with `add_peer` and never connected to us.
    #[error("unknown peer {peer}: it was never added (add_peer) and never connected")]
    UnknownPeer {
        /// The peer id.
        peer: PeerId,
    },
    /// A token that is not (or no longer) registered.
    #[error("memory token {token:#x} is not registered on this process")]
    UnknownToken {
        /// The token.
        token: u64,
    },
    /// A write would fall outside a registered region.
    #[error("write of {len} bytes at offset {offset} falls outside region {token:#x} of {region_len} bytes")]
    OutOfBounds {
        /// Region token.
        token: u64,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The region's length.
        region_len: u64,
    },
    /// The peer sent something that breaks the wire protocol; its connection is closed.
    #[error("protocol error from peer {peer}: {reason}")]
    Protocol {
        /// Who sent it.
        peer: PeerId,
        /// What was wrong.
        reason: String,
    },
    /// A frame could not be decoded.
    #[error(transparent)]
    Decode(#[from] crate::codec::DecodeError),
    /// The peer's connection is gone (EOF or reset).
    #[error("connection to peer {peer} lost: {reason}")]
    PeerLost {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A message too large for the control path.
    #[error("message of {len} bytes exceeds the control-message limit of {max} bytes")]
    MessageTooLarge {
        /// Its length.
        len: usize,
        /// The limit (BPS_MAX_MESSAGE_BYTES).
        max: usize,
    },
    /// The backend asked for is not available in this build or on this machine.
    #[error("transport backend {feature} is unsupported: {reason}")]
    Unsupported {
        /// The backend or feature.
        feature: &'static str,
        /// Why.
        reason: String,
    },
    /// Shared-memory set-up failed.
    #[error(transparent)]
    Shm(#[from] crate::shm::ShmError),
}

impl Error {
    /// True for [`Error::Busy`], the back-pressure signal.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy { .. })
    }

    pub(crate) fn io(op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }
}

/// Short form for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
