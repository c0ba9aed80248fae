//! Set-up of an incoming migration: versions, mutual proof of the key before any state is
//! read, the VM's configuration and this host's limits, then the VM skeleton and its RAM.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::channels::{open_rdma, RdmaDevice};
use super::{refuse, Session, VmFactory};
use crate::auth;
use crate::memory::{GuestRam, Populate};
use crate::protocol::{
    negotiate, Message, FEATURE_LANDED, FEATURE_PROBE, FEATURE_RAILS, FEATURE_RDMA,
    FEATURE_ROUND_COUNTS, FEATURE_SEALED,
};
use crate::session::{Control, MigrationError};
use crate::storage::incoming::IncomingStorage;
use crate::vm::{MigratableVm, VmConfig, VmError};

/// What the handshake settled.
pub(super) struct Agreed {
    /// The source's VM.
    pub(super) config: VmConfig,
    /// Data channels the source will open.
    pub(super) channels: u16,
    /// Session token the data channels must present.
    pub(super) token: u64,
    /// The RDMA device, when RDMA was agreed.
    pub(super) rdma: Option<RdmaDevice>,
}

/// The VM skeleton and its RAM.
pub(super) struct Built {
    pub(super) vm: Arc<dyn MigratableVm>,
    pub(super) ram: GuestRam,
    pub(super) used_reserved_ram: bool,
    populating: Arc<AtomicBool>,
    populate: Option<JoinHandle<()>>,
}

impl Built {
    /// Stops faulting RAM in ahead of the receivers (the migration is over either way).
    pub(super) fn stop_populating(&mut self) {
        self.populating.store(false, Ordering::Relaxed);
        if let Some(p) = self.populate.take() {
            let _ = p.join();
        }
    }
}

/// What a greeting needs of this destination's options.
#[derive(Clone)]
pub(super) struct GreetOptions {
    pub(super) key: Option<auth::Key>,
    pub(super) rdma_devices: Vec<String>,
    pub(super) timeout: std::time::Duration,
}

/// A source that completed Hello, Welcome and Auth: it proved the key (or neither side has
/// one).
pub(super) struct Greeted {
    pub(super) ctl: Control,
    /// The session token its Config must carry (keyed sessions).
    pub(super) expected_token: Option<u64>,
    pub(super) rdma: Option<RdmaDevice>,
    /// TCP round markers carry page counts ([`FEATURE_ROUND_COUNTS`]).
    pub(super) round_counts: bool,
}

/// Hello, Welcome and Auth on a fresh connection, all within one deadline (`timeout`), frames
/// capped to what a greeting needs. A peer that fails is refused with a reason.
pub(super) fn greet(stream: TcpStream, g: &GreetOptions) -> Result<Greeted, MigrationError> {
    let deadline = Instant::now() + g.timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut stream = stream;
    let _ = stream.set_write_timeout(Some(g.timeout));
    // Certificates: a TLS handshake keys this session (a pre-shared key is the key).
    let key = match g.key.as_ref().and_then(auth::Key::tls) {
        Some(id) => {
            let secret = id
                .accept(&mut stream, left())
                .map_err(|e| MigrationError::Refused {
                    peer: stream
                        .peer_addr()
                        .map_or_else(|_| "unknown peer".into(), |a| a.to_string()),
                    reason: format!("refused the source: {e}"),
                })?;
            Some(auth::Key::from_secret(&secret))
        }
        None => g.key.clone(),
    };
    let mut ctl = Control::new(stream);
    let nonce_d = auth::nonce();
    // A source that does not offer to seal a session this side wants sealed is refused once
    // it proved its key (so a missing key is what it hears first): `unsealed_source`.
    let round_counts;
    let (nonce_s, rdma, unsealed_source) = match ctl.recv(Some(left()), "waiting for Hello")? {
        Message::Hello {
            min_version,
            max_version,
            nonce,
            features,
        } => {
            let version = match negotiate(min_version, max_version) {
                Ok(v) => v,
                Err(r) => return Err(refuse(&mut ctl, r)),
            };
            ctl.set_version(version);
            let wants_seal = key.as_ref().is_some_and(auth::Key::seals);
            let seal = wants_seal && features & FEATURE_SEALED != 0;
            let proof = key
                .as_ref()
                .map(|k| k.destination_proof(&nonce, &nonce_d))
                .unwrap_or([0; 32]);
            let rdma = if features & FEATURE_RDMA != 0 {
                open_rdma(&g.rdma_devices, &ctl)
            } else {
                None
            };
            round_counts = features & FEATURE_ROUND_COUNTS != 0;
            ctl.send(&Message::Welcome {
                version,
                features: if rdma.is_some() {
                    FEATURE_RDMA | (features & FEATURE_RAILS)
                } else {
                    0
                } | if seal { FEATURE_SEALED } else { 0 }
                    | if round_counts {
                        FEATURE_ROUND_COUNTS
                    } else {
                        0
                    }
                    | (features & (FEATURE_PROBE | FEATURE_LANDED)),
                nonce: nonce_d,
                proof,
            })?;
            (nonce, rdma, wants_seal && !seal)
        }
        m => return Err(ctl.unexpected(&m, "waiting for Hello")),
    };
    let proof = match ctl.recv(Some(left()), "waiting for the source's key proof")? {
        Message::Auth { proof } => proof,
        m => return Err(ctl.unexpected(&m, "waiting for Auth")),
    };
    let expected_token =
        match &key {
            None => None,
            Some(k) if auth::proofs_equal(&proof, &k.source_proof(&nonce_s, &nonce_d)) => {
                Some(k.session_token(&nonce_s, &nonce_d))
            }
            Some(_) => return Err(refuse(
                &mut ctl,
                if proof == [0; 32] {
                    "authentication failed: the source has no key (this destination requires one)"
                } else {
                    "authentication failed: the source's key does not match this destination's"
                }
                .into(),
            )),
        };
    if unsealed_source {
        return Err(refuse(
            &mut ctl,
            "the source does not encrypt the session (an older livemig, or --encrypt off \
             there); this destination requires it: use --encrypt off on both sides only on a \
             trusted link"
                .into(),
        ));
    }
    ctl.authenticated();
    if let Some(k) = key.as_ref().filter(|k| k.seals()) {
        let keys = k.session_keys(&nonce_s, &nonce_d, &ctl.transcript());
        ctl.seal(keys, auth::Direction::ToSource);
    }
    Ok(Greeted {
        ctl,
        expected_token,
        rdma,
        round_counts,
    })
}

/// After the greeting: serves a link probe (true: the connection is done) or leaves the
/// connection to the session (false: its first message put back, or — when reading it failed
/// — nothing read, so the session meets the failure itself). A first message that does not
/// decode is refused (an error). A probe's bytes are counted and
/// timed from the first to the last; every frame must come within `timeout`.
pub(super) fn serve_probe(
    greeted: &mut Greeted,
    timeout: Duration,
) -> Result<bool, MigrationError> {
    let ctl = &mut greeted.ctl;
    let bytes = match ctl.recv(Some(timeout), "waiting for Config") {
        Ok(Message::Probe { bytes }) => bytes,
        Ok(m) => {
            ctl.unread(m);
            return Ok(false);
        }
        // A message that arrived but makes no sense was consumed: refused here, with why.
        Err(e @ MigrationError::Protocol { .. }) => {
            let _ = ctl.send(&Message::Refuse {
                reason: e.to_string(),
            });
            return Err(e);
        }
        Err(_) => return Ok(false),
    };
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    while got < bytes {
        match ctl.recv(Some(timeout), "receiving a link probe")? {
            Message::ProbeData { data } => {
                first.get_or_insert_with(Instant::now);
                got += data.len() as u64;
            }
            m => return Err(ctl.unexpected(&m, "receiving a link probe")),
        }
    }
    let nanos = first.map_or(0, |t| t.elapsed().as_nanos() as u64);
    ctl.send(&Message::ProbeResult { bytes: got, nanos })?;
    Ok(true)
}

impl Session {
    /// Config, checked against this host's limits, and the storage plan, from a source that
    /// was greeted on this session's connection.
    pub(super) fn agree(
        &mut self,
        expected_token: Option<u64>,
        rdma: Option<RdmaDevice>,
    ) -> Result<Agreed, MigrationError> {
        let (config, channels, token) =
            match self.ctl.recv(Some(self.timeout), "waiting for Config")? {
                Message::Config {
                    vm,
                    channels,
                    token,
                } => (vm, channels, token),
                m => return Err(self.ctl.unexpected(&m, "waiting for Config")),
            };
        if expected_token.is_some_and(|t| t != token) {
            return Err(
                self.refuse("session token does not match the authenticated session".into())
            );
        }
        self.check_limits(&config)?;
        if self.ctl.version() >= 2 {
            self.storage_plan()?;
        }
        Ok(Agreed {
            config,
            channels,
            token,
            rdma,
        })
    }

    /// Storage (protocol 2): how the disks move; a copy is checked and prepared here, before
    /// any byte moves.
    fn storage_plan(&mut self) -> Result<(), MigrationError> {
        let (mode, directory, disks) =
            match self.ctl.recv(Some(self.timeout), "waiting for Storage")? {
                Message::Storage {
                    mode,
                    directory,
                    disks,
                } => (mode, directory, disks),
                m => return Err(self.ctl.unexpected(&m, "waiting for Storage")),
            };
        match IncomingStorage::prepare(mode, &directory, disks, self.opts.storage_dir.as_deref()) {
            Ok(s) => {
                self.storage = s;
                Ok(())
            }
            Err(e) => {
                let reason = format!("storage: {e}");
                let _ = self.ctl.send(&Message::Refuse {
                    reason: reason.clone(),
                });
                Err(MigrationError::Storage(e))
            }
        }
    }

    /// A peer cannot make this host allocate more than it is willing to host: the RAM (and
    /// the per-page hashes, 1/512 of it) is bounded before anything is allocated.
    fn check_limits(&mut self, config: &VmConfig) -> Result<(), MigrationError> {
        let max_ram = if self.opts.max_ram_bytes == 0 {
            host_memory_bytes()
        } else {
            self.opts.max_ram_bytes
        };
        if config.layout.total_bytes() > max_ram {
            let reason = format!(
                "the VM has {} MiB of RAM; this destination accepts at most {} MiB (see \
                 --max-memory-mib)",
                config.layout.total_bytes() >> 20,
                max_ram >> 20
            );
            let _ = self.ctl.send(&Message::Refuse {
                reason: reason.clone(),
            });
            return Err(MigrationError::Vm(VmError::InvalidSpec(reason)));
        }
        Ok(())
    }

    /// RAM (the reserved RAM when its layout matches) and the VM skeleton; answers Ready.
    pub(super) fn build_vm(
        &mut self,
        agreed: &Agreed,
        factory: VmFactory<'_>,
    ) -> Result<Built, MigrationError> {
        let layout = &agreed.config.layout;
        let (ram, used_reserved_ram) = match self.opts.reserved.take() {
            Some(r) if r.layout() == layout => (r, true),
            _ => (
                GuestRam::new(layout, Populate::Lazy).map_err(VmError::from)?,
                false,
            ),
        };
        let populating = Arc::new(AtomicBool::new(!used_reserved_ram));
        let populate = (!used_reserved_ram).then(|| spawn_populate(&ram, populating.clone()));
        let built_vm = factory(&agreed.config, ram.clone(), &self.storage.placement())
            .map_err(|e| {
                (
                    format!("destination cannot build the VM: {e}"),
                    MigrationError::Vm(e),
                )
            })
            .and_then(|vm| match self.storage.attach(vm.disks()) {
                Ok(()) => Ok(vm),
                Err(e) => {
                    vm.shutdown();
                    Err((format!("storage: {e}"), MigrationError::Storage(e)))
                }
            });
        let mut built = Built {
            vm: match built_vm {
                Ok(vm) => vm,
                Err((reason, err)) => {
                    populating.store(false, Ordering::Relaxed);
                    let _ = self.ctl.send(&Message::Refuse { reason });
                    return Err(err);
                }
            },
            ram,
            used_reserved_ram,
            populating,
            populate,
        };
        let port = self.data_port.map(|port| Message::DataPort { port });
        if let Err(e) = port
            .iter()
            .chain([&Message::Ready])
            .try_for_each(|m| self.ctl.send(m))
        {
            built.stop_populating();
            built.vm.shutdown();
            return Err(e);
        }
        Ok(built)
    }
}

/// Faults destination RAM in ahead of the receivers (MADV_POPULATE_WRITE), so they write into
/// populated pages instead of taking a fault per page.
fn spawn_populate(ram: &GuestRam, running: Arc<AtomicBool>) -> JoinHandle<()> {
    let regions: Vec<(usize, u64)> = ram
        .host_regions()
        .into_iter()
        .map(|(_, host, len)| (host as usize, len))
        .collect();
    let ram = ram.clone();
    std::thread::spawn(move || {
        const STEP: u64 = 32 << 20;
        for (host, len) in regions {
            let mut off = 0;
            while off < len && running.load(Ordering::Relaxed) {
                let n = STEP.min(len - off);
                // SAFETY: `host + off .. + n` lies inside a live mapping of `ram` (held by this
                // thread); MADV_POPULATE_WRITE only faults pages in, it does not change them.
                unsafe {
                    libc::madvise((host + off as usize) as *mut libc::c_void, n as usize, 23);
                }
                off += n;
            }
        }
        drop(ram);
    })
}

/// Physical memory of this host, in bytes (a conservative 1 GiB if it cannot be read).
fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kib| kib * 1024)
        .unwrap_or(1 << 30)
}
