//! bps-scheduler (being written).
#![forbid(unsafe_code)]
