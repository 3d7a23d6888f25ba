//! The runtime's error type.

use std::time::Duration;

/// Everything the runtime reports. Every variant names what failed and, where one is involved,
/// the peer and the key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An environment variable or configuration value is not allowed.
    #[error("{var}={value:?} is not allowed: expected {allowed}")]
    Config {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What would be right.
        allowed: String,
    },
    /// A call's arguments are wrong.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The runtime is not initialised (call init first) or was shut down.
    #[error("bps is not initialised: call init() first")]
    NotInitialized,
    /// The runtime was shut down.
    #[error("bps was shut down")]
    ShutDown,
    /// A tensor is used inconsistently across workers or calls.
    #[error("tensor {name:?}: {reason}")]
    Mismatch {
        /// The tensor's name.
        name: String,
        /// What differs.
        reason: String,
    },
    /// A peer failed or disappeared.
    #[error("{what}: {peer} {reason}")]
    Peer {
        /// The operation that failed, with its key where there is one.
        what: String,
        /// The peer, e.g. "server 1 (127.0.0.1:41234)".
        peer: String,
        /// What happened.
        reason: String,
    },
    /// No progress within the timeout.
    #[error("{what}: no answer from {peer} within {timeout:?} (BPS_TIMEOUT)")]
    Timeout {
        /// The operation, with its key.
        what: String,
        /// Who did not answer.
        peer: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The rendezvous failed.
    #[error("rendezvous with scheduler {addr}: {reason}")]
    Rendezvous {
        /// Scheduler address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A transport error.
    #[error("transport: {0}")]
    Transport(String),
    /// Something this build or machine cannot do (e.g. GPU tensors without CUDA).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An operation abandoned by the runtime (e.g. its thread died).
    #[error("operation abandoned by the runtime")]
    Abandoned,
}

impl From<bps_transport::cq::Abandoned> for Error {
    fn from(_: bps_transport::cq::Abandoned) -> Self {
        Error::Abandoned
    }
}

impl From<bps_transport::Error> for Error {
    fn from(e: bps_transport::Error) -> Self {
        Error::Transport(e.to_string())
    }
}

impl From<bps_scheduler::Error> for Error {
    fn from(e: bps_scheduler::Error) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

/// Short form for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
