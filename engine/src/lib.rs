//! livemig engine: VMs, dirty tracking, the page scheduler, the migration protocol and the
//! source and destination state machines.

pub mod dirty;
pub mod memory;
pub mod vm;
pub mod digest;
pub mod protocol;
pub mod scheduler;
