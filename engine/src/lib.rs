//! livemig engine: VMs, dirty tracking, the page scheduler, the migration protocol and the
//! source and destination state machines.

pub mod auth;
pub mod convergence;
pub mod destination;
pub mod digest;
pub mod dirty;
pub mod memory;
pub mod protocol;
pub mod scheduler;
pub mod session;
pub mod source;
pub mod vm;
