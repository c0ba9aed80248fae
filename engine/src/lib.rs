//! livemig engine: VMs, dirty tracking, the page scheduler, the migration protocol and the
//! source and destination state machines.
//!
//! # Map
//!
//! | module | owns |
//! |---|---|
//! | [`vm`] | the [`vm::MigratableVm`] contract and the VMMs: the KVM mini VMM ([`vm::kvm`]), the built-in test guest, the memory-only VM |
//! | [`devices`] | the device seam: [`devices::MigratableDevice`] (versioned state sections, quiesce, dirty pages) and the [`devices::DeviceManager`] |
//! | [`memory`] | guest RAM: memfd-backed regions mapped with vm-memory, the RAM layout |
//! | [`dirty`] | dirty bitmaps and their extents |
//! | [`scheduler`] | the page-scheduler core: extents → chunks → channels, round barriers, for every transport |
//! | [`convergence`] | bandwidth and dirty-rate estimates, predicted downtime, the stop decision |
//! | [`protocol`] | wire messages, their encoding, versions |
//! | [`source`], [`destination`] | the two state machines (DESIGN §5's switchover invariants) |
//! | [`session`] | what both sides share: the control connection, errors, the report |
//! | [`control`] | the VM process's control socket: typed requests, replies, events, a client |
//! | [`storage`] | disks that move with the VM: shared-storage lock handover, shared-nothing copies (disk blocks as extents on a storage channel, dirty-block rounds, active mirroring) |
//! | [`announce`] | the network follows the VM: RARP from every NIC's MAC and the guest's own announcement after resume |
//! | [`auth`], [`digest`] | the pre-shared-key handshake; RAM digests compared before resume |
//! | [`defaults`] | defaults and limits, defined once |
//!
//! Arrows point one way: the CLI → this crate → `livemig_transport`, which moves extents of
//! registered memory and knows nothing of VMs or rounds.
//!
//! # Example: migrate a VM within one process
//!
//! A memory-only VM (no KVM needed) migrated over loopback TCP to a destination thread:
//!
//! ```
//! use std::sync::atomic::AtomicBool;
//! use std::sync::Arc;
//! use livemig_engine::destination::{self, IncomingOptions};
//! use livemig_engine::source::{self, MigrateOptions};
//! use livemig_engine::vm::memory_only::MemoryVm;
//! use livemig_engine::vm::{MigratableVm, VmSpec};
//!
//! let spec = VmSpec { memory_mib: 16, ..VmSpec::default() };
//! let vm = MemoryVm::launch(&spec, |_ram| {}).unwrap();
//! let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let to = listener.local_addr().unwrap().to_string();
//! let dest = std::thread::spawn(move || {
//!     let factory = |config: &livemig_engine::vm::VmConfig, ram, _disks: &[_]| {
//!         Ok(Arc::new(MemoryVm::new_incoming(config, ram)?) as Arc<dyn MigratableVm>)
//!     };
//!     destination::receive(&listener, IncomingOptions::default(), &factory).unwrap()
//! });
//! let report =
//!     source::migrate(&vm, &to, &MigrateOptions::default(), &AtomicBool::new(false), &mut |_| {})
//!         .unwrap();
//! assert!(report.digest_match);
//! let incoming = dest.join().unwrap();
//! assert_eq!(incoming.vm.config().layout, vm.config().layout);
//! ```

/// Implements `name()`, `NAMES`, `Display` and `FromStr` for a fieldless enum from one table
/// of `Variant => "name"` pairs, so the CLI, the control socket and reports spell it alike.
#[macro_export]
#[doc(hidden)]
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value's name.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// The value's name.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?} (one of: {})",
                        $what,
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }
    };
}

pub mod announce;
pub mod auth;
pub mod control;
pub mod convergence;
pub mod defaults;
pub mod destination;
pub mod devices;
pub mod digest;
pub mod dirty;
pub mod memory;
pub mod protocol;
pub mod scheduler;
pub mod session;
pub mod source;
pub mod storage;
pub mod tls;
pub mod vm;
