//! bps-runtime (being assembled)
#![allow(missing_docs)]
mod api;
pub mod config;
pub mod dtype;
mod error;
pub mod gpu;
mod mem;
pub mod node;
pub mod proto;
pub mod sched;
pub mod sum;
pub mod topo;
pub use api::{init, run_server, Bps, Element, Handle, Pending, PendingInto, PushPullOpts};
pub use bps_transport::auth::Secret;
pub use config::{Config, Role};
pub use dtype::DType;
pub use error::{Error, Result};
pub use gpu::DeviceBuf;
pub use sched::{run_scheduler, Scheduler};
