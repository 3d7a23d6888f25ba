//! The scheduling core of bps: how gradients are cut, where each piece goes, and in which
//! order pieces leave.
//!
//! # What it does
//!
//! - [`partition()`] cuts a tensor into element-aligned [`Chunk`]s of about
//!   [`DEFAULT_PARTITION_BYTES`]; each chunk is named by a [`Key`] = ([`TensorId`],
//!   [`ChunkIndex`]).
//! - [`ServerAssigner`] gives every key one summation server ([`ServerIndex`]), balancing the
//!   bytes each server owns. It is deterministic: the same inputs give the same answers.
//! - [`CreditQueue`] is the queue of one pipeline [`Stage`]: items leave by [`Priority`]
//!   (FIFO among equals), and only while the bytes in flight stay within a credit
//!   ([`SchedulingConfig`]).
//!
//! # What it does not do
//!
//! No I/O, no threads, no clock and no unsafe code: it is a deterministic state machine. It
//! never moves tensor data, talks to a peer or reads the environment; the runtime
//! (`bps-runtime`) does, and passes in anything time-related. This crate knows nothing of
//! `bps-transport`, and `bps-transport` knows nothing of it.
//!
//! # Example
//!
//! ```
//! use bps_scheduler::{
//!     partition, CreditQueue, Key, Priority, SchedulingConfig, ServerAssigner, TensorId,
//! };
//!
//! let config = SchedulingConfig::from_partition_credit(1024, 2); // 2 KiB in flight
//! let mut servers = ServerAssigner::new(2)?;
//! let mut push: CreditQueue<Key> = CreditQueue::new(config.credit_bytes);
//!
//! // A 3 KiB tensor of f32 becomes three 1 KiB chunks, spread over both servers.
//! let tensor = TensorId(0);
//! let chunks = partition(3 * 1024, 4, config.partition_bytes)?;
//! let owners = servers.assign_tensor(tensor, &chunks);
//! assert_eq!(owners.len(), 3);
//! assert_eq!(servers.loads(), [2048, 1024]);
//!
//! for c in &chunks {
//!     push.push(Key::new(tensor, c.index), Priority(0), c.len as u64);
//! }
//! // Two chunks fit in the credit; the third waits until one is released.
//! let (first, bytes) = push.pop().expect("fits");
//! assert_eq!(first.to_string(), "t0.c0");
//! assert!(push.pop().is_some());
//! assert!(push.pop().is_none());
//! push.release(bytes);
//! assert_eq!(push.pop().map(|(k, _)| k.to_string()), Some("t0.c2".to_string()));
//! # Ok::<(), bps_scheduler::Error>(())
//! ```
#![forbid(unsafe_code)]

pub mod assign;
pub mod config;
pub mod error;
pub mod ids;
pub mod partition;
pub mod queue;
pub mod stage;

pub use assign::ServerAssigner;
pub use config::{SchedulingConfig, DEFAULT_CREDIT_PARTITIONS};
pub use error::Error;
pub use ids::{ChunkIndex, Key, Priority, ServerIndex, TensorId};
pub use partition::{
    adaptive_partition_bytes, chunk_bytes, partition, Chunk, ADAPTIVE_FLOOR_BYTES,
    DEFAULT_MIN_CHUNKS_PER_SERVER, DEFAULT_PARTITION_BYTES,
};
pub use queue::CreditQueue;
pub use stage::Stage;
