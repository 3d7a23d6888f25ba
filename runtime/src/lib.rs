//! bps-runtime (being assembled)
#![allow(missing_docs)]
pub mod config;
pub mod dtype;
mod error;
mod mem;
pub mod node;
pub mod proto;
pub mod sched;
pub mod sum;
pub use error::{Error, Result};
