//! bps-runtime
#![allow(missing_docs)]
pub mod dtype;
pub mod sum;
