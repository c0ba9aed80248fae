//! The destination state machine: accept a source, build the VM skeleton, receive pages into
//! guest RAM, apply device state, resume on commit.
//!
//! Nothing is resumed before the source's Commit; any failure before it discards the VM and
//! its RAM. Every address received is checked against the declared layout by the transport
//! before a byte is written, and guest RAM closes to the source when its device state
//! arrives: TCP receivers are stopped and joined, RDMA access is revoked, before anything
//! here reads or runs on that RAM.
//!
//! A migration is a `Session` taken through its phases, one room each: `accept` (connections
//! greeted concurrently, each within its deadline, until a source proves the key; strangers
//! are refused and logged, never end the wait), `handshake` (versions, key, configuration,
//! limits, the VM skeleton), `channels` (accepting the data
//! plane: TCP data connections or RDMA queue pairs, behind `channels::IncomingPlane`),
//! `receive` (the TCP receivers and their round barrier) and `switchover` (device state,
//! Prepared, Commit, resume).

mod accept;
mod channels;
pub use channels::{register_reserved, RdmaRegistration};
mod handshake;
mod receive;
pub use receive::Hashing;
mod switchover;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::defaults;
use crate::memory::GuestRam;
use crate::protocol::Message;
use crate::session::{Control, MigrationError};
use crate::storage::incoming::IncomingStorage;
use crate::vm::{MigratableVm, VmConfig, VmError};

use crate::auth::Key;

/// Builds a VM skeleton for a source's configuration over received RAM; refuses machines or
/// configurations it cannot run.
///
/// The third argument is where this migration put the VM's disks (`(disk id, path)`: the
/// copies of a shared-nothing migration); they take precedence over the factory's own
/// mapping. Incoming VMs open their disks without locking them: the migration takes the
/// locks at the switchover.
pub type VmFactory<'a> =
    &'a dyn Fn(&VmConfig, GuestRam, &DiskPlacement) -> Result<Arc<dyn MigratableVm>, VmError>;

/// Where a migration put a VM's disks: `(disk id, path)`.
pub type DiskPlacement = [(String, std::path::PathBuf)];

/// Admits a migration whose configuration was agreed, before anything is built (a host's limit
/// of simultaneous migrations): the guard it returns is held until the migration ends; an
/// error is the reason the source is refused with.
pub type Admit = Box<dyn FnOnce(&VmConfig) -> Result<Box<dyn std::any::Any>, String> + Send>;

/// Called once the VM runs here, before the source is told how far the guest got (so by the
/// time the source's `migrate` returns, whoever asks this host finds the VM running).
pub type OnResumed = Box<dyn FnOnce(Arc<dyn MigratableVm>) + Send>;

/// Options of an incoming migration.
#[derive(Default)]
pub struct IncomingOptions {
    /// A control connection a host agent accepted: greeted as the source, while the
    /// listener takes only this session's data connections, its port named to the source
    /// (protocol 3 and later).
    pub control: Option<std::net::TcpStream>,
    /// Called before the VM is built.
    pub admit: Option<Admit>,
    /// Called once the VM runs here (see [`OnResumed`]).
    pub on_resumed: Option<OnResumed>,
    /// RAM reserved and faulted in ahead of time (like QEMU's `-mem-prealloc` on an
    /// `-incoming` VM). Used when its layout matches the incoming one.
    pub reserved: Option<GuestRam>,
    /// The reserved RAM registered for RDMA writes ahead (see [`register_reserved`]): used
    /// when an RDMA migration lands in the reserved RAM on that device.
    pub reserved_rdma: Option<RdmaRegistration>,
    /// Longest wait for the source during handshake and switchover (data may flow for much
    /// longer during pre-copy); zero means the default.
    pub timeout: Duration,
    /// How long to watch the guest's counter after resume before reporting.
    pub progress_wait: Duration,
    /// Pre-shared key; None accepts only sources without one (`--no-auth`).
    pub key: Option<Key>,
    /// Largest RAM an incoming VM may declare (0: this host's physical memory).
    pub max_ram_bytes: u64,
    /// RDMA devices to take RDMA migrations on, one per rail (default: the device with an
    /// address in the source's subnet, else the first active device).
    pub rdma_devices: Vec<String>,
    /// Where disk copies go when the source names no directory.
    pub storage_dir: Option<std::path::PathBuf>,
    /// How the VM's NICs are announced after resume (`count` 0: not at all).
    pub announce: crate::announce::AnnounceSettings,
    /// Where the decision about each migration (resumed here, or discarded) is recorded
    /// durably before it is acted on, as `ID.json` (None: not recorded). With it, a source
    /// left in "outcome unknown" is settled by `livemig resolve`.
    pub decisions: Option<std::path::PathBuf>,
    /// Where TCP receivers hash the pages they land (default: by the host's cores).
    pub receiver_hashing: Hashing,
}

/// A migrated VM, running on the destination.
pub struct Incoming {
    /// The VM, resumed.
    pub vm: Arc<dyn MigratableVm>,
    /// Pages received in all rounds.
    pub pages_received: u64,
    /// Whether the reserved RAM was used.
    pub used_reserved_ram: bool,
    /// Guest counter movement seen after resume.
    pub progress_after_resume: u64,
    /// The destination's share of the downtime, step by step.
    pub steps: SwitchoverSteps,
}

/// The destination's steps of the switchover, in milliseconds, from the device state's
/// arrival to the guest running here.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SwitchoverSteps {
    /// The final round's last pages landing and the data channels closing.
    pub land_ms: f64,
    /// Disks: copies verified and named, or shared images locked.
    pub storage_ms: f64,
    /// The RAM digest.
    pub digest_ms: f64,
    /// Checking and restoring vCPU and device state.
    pub restore_ms: f64,
    /// Writing the decision to resume durably.
    pub record_ms: f64,
    /// Starting the vCPUs and devices.
    pub resume_ms: f64,
}

/// Receives one migration on `listener`.
pub fn receive(
    listener: &TcpListener,
    opts: IncomingOptions,
    factory: VmFactory<'_>,
) -> Result<Incoming, MigrationError> {
    let mut opts = opts;
    let g = handshake::GreetOptions {
        key: opts.key.clone(),
        rdma_devices: opts.rdma_devices.clone(),
        timeout: if opts.timeout.is_zero() {
            defaults::TIMEOUT
        } else {
            opts.timeout
        },
    };
    let agent = opts.control.is_some();
    let greeted = match opts.control.take() {
        Some(stream) => accept::greet_one(stream, &g)?.ok_or(MigrationError::ProbeServed)?,
        None => accept::first_source(listener, &g)?,
    };
    let (expected_token, rdma) = (greeted.expected_token, greeted.rdma);
    let admit = opts.admit.take();
    let mut s = Session::new(greeted.ctl, opts);
    s.round_counts = greeted.round_counts;
    info!(peer = s.ctl.peer(), "incoming migration");
    let agreed = s.agree(expected_token, rdma)?;
    if agent {
        let v = s.ctl.version();
        if v < 3 {
            return Err(s.refuse(format!(
                "this host's migration agent takes sources of protocol 3 or later (this source: \
                 protocol {v}); run `livemig receive` on it for an older source"
            )));
        }
        s.data_port = Some(
            listener
                .local_addr()
                .map_err(|source| MigrationError::Connect {
                    addr: "the data listener".into(),
                    source,
                })?
                .port(),
        );
    }
    let _admitted = match admit {
        Some(admit) => Some(admit(&agreed.config).map_err(|reason| s.refuse(reason))?),
        None => None,
    };
    s.id = crate::session::migration_id(agreed.token);
    s.prepare_record()?;
    let mut built = s.build_vm(&agreed, factory)?;
    let vm = built.vm.clone();
    let result = s
        .accept_plane(listener, &agreed, &built)
        .and_then(|mut plane| {
            let r = s.switchover(&vm, &mut *plane);
            plane.close();
            r.map(|()| plane.pages())
        });
    built.stop_populating();
    let pages_received = match result {
        Ok(p) => p,
        Err(e) => {
            vm.shutdown();
            return Err(e);
        }
    };
    if let Some(hook) = s.opts.on_resumed.take() {
        hook(vm.clone());
    }
    let progress_after_resume = s.report_progress(&*vm);
    Ok(Incoming {
        vm,
        pages_received,
        used_reserved_ram: built.used_reserved_ram,
        progress_after_resume,
        steps: s.steps,
    })
}

/// One incoming migration, from the accepted control connection on.
struct Session {
    ctl: Control,
    opts: IncomingOptions,
    timeout: Duration,
    /// The switchover's steps, as they are timed.
    steps: SwitchoverSteps,
    /// The VM's disks (copies are deleted with it unless the migration commits).
    storage: IncomingStorage,
    /// The migration's id ([`crate::session::migration_id`]).
    id: String,
    /// Its decision record, written ahead as pending.
    slot: Option<crate::session::RecordSlot>,
    /// TCP round markers carry page counts, checked at each barrier.
    round_counts: bool,
    /// The data connections' port, named to the source before Ready (behind a host agent).
    data_port: Option<u16>,
}

impl Session {
    fn new(ctl: Control, opts: IncomingOptions) -> Self {
        let timeout = if opts.timeout.is_zero() {
            defaults::TIMEOUT
        } else {
            opts.timeout
        };
        let _ = ctl.stream().set_write_timeout(Some(timeout));
        Session {
            ctl,
            opts,
            timeout,
            steps: SwitchoverSteps::default(),
            storage: IncomingStorage::none(),
            id: String::new(),
            slot: None,
            round_counts: false,
            data_port: None,
        }
    }

    /// Writes this migration's pending record ahead (when this destination keeps records);
    /// a folder where it cannot be written refuses the migration before any RAM moves.
    fn prepare_record(&mut self) -> Result<(), MigrationError> {
        let Some(dir) = self.opts.decisions.clone() else {
            return Ok(());
        };
        match crate::session::OutcomeRecord::prepare(&dir, &self.id) {
            Ok(slot) => {
                self.slot = Some(slot);
                Ok(())
            }
            Err(e) => Err(self.refuse(format!(
                "cannot keep a decision record in {}: {e}",
                dir.display()
            ))),
        }
    }

    /// Records `outcome` durably (when this destination keeps records).
    fn record(&mut self, outcome: crate::session::Outcome) -> std::io::Result<()> {
        let Some(slot) = self.slot.as_mut() else {
            return Ok(());
        };
        let path = slot.decide(outcome)?;
        info!(record = %path.display(), ?outcome, "decision recorded");
        Ok(())
    }

    /// Refuses the source with `reason` (sent to it) and returns the error to report here.
    fn refuse(&mut self, reason: String) -> MigrationError {
        refuse(&mut self.ctl, reason)
    }

    /// Resumed: makes disk copies durable, then tells the source how far the guest gets
    /// here (the source removes its images, if asked to, only after this report).
    fn report_progress(&mut self, vm: &dyn MigratableVm) -> u64 {
        if let Err(e) = self.storage.sync() {
            tracing::error!("{e}");
        }
        let base = vm.progress().unwrap_or(0);
        let deadline = Instant::now() + self.opts.progress_wait.max(Duration::from_millis(100));
        let mut delta = 0;
        while Instant::now() < deadline {
            delta = vm.progress().unwrap_or(base).saturating_sub(base);
            if delta >= 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.ctl.send(&Message::Progress { delta });
        delta
    }
}

/// Refuses the peer on `ctl` with `reason` (sent to it) and returns the error to report here.
fn refuse(ctl: &mut Control, reason: String) -> MigrationError {
    let _ = ctl.send(&Message::Refuse {
        reason: reason.clone(),
    });
    MigrationError::Refused {
        peer: ctl.peer().to_string(),
        reason: format!("refused the source: {reason}"),
    }
}
