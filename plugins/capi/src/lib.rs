//! bps C ABI
