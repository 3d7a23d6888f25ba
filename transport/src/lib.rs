//! bps-transport
#![allow(missing_docs)]
pub mod cq;
pub mod shm;
