//! Set-up of an outgoing migration: the transport decision, the control connection,
//! versions, mutual proof of the key, the VM's configuration. The VM is untouched here: any
//! failure leaves it running as it was.

use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::channels::{self, RdmaDevice};
use super::{MigrateOptions, Session, Tally, TransportChoice};
use crate::auth;
use crate::protocol::{
    Message, FEATURE_LANDED, FEATURE_RAILS, FEATURE_RDMA, FEATURE_ROUND_COUNTS, FEATURE_SEALED,
    VERSION,
};
use crate::session::{random_u64, Control, MigrationError};
use crate::storage::outgoing::OutgoingStorage;
use crate::vm::MigratableVm;

/// Opens a TCP connection to the destination `to` (any of its addresses).
pub(super) fn connect(
    to: &str,
    opts: &MigrateOptions,
    what: &str,
) -> Result<TcpStream, MigrationError> {
    let err = |source| MigrationError::Connect {
        addr: to.to_string(),
        source,
    };
    let addrs: Vec<_> = to.to_socket_addrs().map_err(err)?.collect();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no address for {what}"),
    );
    for a in addrs {
        match TcpStream::connect_timeout(&a, opts.timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

impl<'a> Session<'a> {
    /// Everything up to the first page: transport, handshake, configuration, data plane.
    pub(super) fn open(
        vm: &'a dyn MigratableVm,
        to: &'a str,
        opts: &'a MigrateOptions,
        cancel: &'a AtomicBool,
    ) -> Result<Session<'a>, MigrationError> {
        let t0 = Instant::now();
        // The transport is chosen before connecting: asking for RDMA without a usable device
        // fails here, before the destination hears of this migration.
        let peer_ip: Option<IpAddr> = to
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| a.ip());
        let storage = OutgoingStorage::new(vm.disks(), opts.storage, opts.active_mirror)
            .map_err(MigrationError::Storage)?;
        let (mut rdma, mut detail) = channels::plan_transport(opts, peer_ip)?;
        if storage.copying() && rdma.is_some() {
            // Disk copies travel on a TCP storage lane beside the pages; one scheduler drives
            // one kind of transport.
            if opts.transport == TransportChoice::Rdma {
                return Err(MigrationError::TransportUnavailable(
                    "--storage copy sends disk blocks over TCP: use --transport tcp or auto \
                     (or --storage shared)"
                        .into(),
                ));
            }
            rdma = None;
            detail = "auto: tcp (disk copies travel over TCP)".into();
        }

        let mut greeting = hello(
            to,
            opts,
            match &rdma {
                Some(r) if rails(r) > 1 => FEATURE_RDMA | FEATURE_RAILS,
                Some(_) => FEATURE_RDMA,
                None => 0,
            } | FEATURE_ROUND_COUNTS
                | FEATURE_LANDED,
        )?;
        let features = greeting.features;
        let ctl = &mut greeting.ctl;
        if rdma.is_some() && features & FEATURE_RDMA == 0 {
            if opts.transport == TransportChoice::Rdma {
                let reason = "the destination cannot take RDMA (no usable RDMA device there, or \
                              a livemig built without RDMA): use --transport tcp or auto";
                let _ = ctl.send(&Message::Refuse {
                    reason: reason.into(),
                });
                return Err(MigrationError::TransportUnavailable(reason.into()));
            }
            rdma = None;
            detail = "auto: tcp (the destination has no usable RDMA device)".into();
        }
        #[cfg(feature = "rdma")]
        if let Some(r) = rdma.as_mut().filter(|r| r.len() > 1) {
            if features & FEATURE_RAILS == 0 {
                r.truncate(1);
                detail = format!(
                    "{detail}; one rail only: the destination's livemig predates multi-rail RDMA"
                );
            }
        }
        let (mut ctl, token) = greeting.authenticate()?;
        ctl.send(&Message::Config {
            vm: vm.config(),
            channels: opts.channels_for(rdma.is_some()),
            token,
        })?;
        ctl.send(&storage.message(opts.storage_dir.as_deref().unwrap_or("")))?;
        // A destination behind a host agent names its own port for the data connections.
        let mut data_to = to.to_string();
        loop {
            match ctl.recv(
                Some(opts.timeout),
                "waiting for the destination to allocate RAM",
            )? {
                Message::Ready => break,
                Message::DataPort { port } if ctl.version() >= 3 => {
                    let mut a =
                        ctl.stream()
                            .peer_addr()
                            .map_err(|source| MigrationError::Connect {
                                addr: to.to_string(),
                                source,
                            })?;
                    a.set_port(port);
                    data_to = a.to_string();
                }
                m => return Err(ctl.unexpected(&m, "waiting for Ready")),
            }
        }
        let counted = features & FEATURE_ROUND_COUNTS != 0;
        let landed = features & FEATURE_LANDED != 0;
        let (sched, plane, d) = open_plane(
            &mut ctl,
            vm,
            &data_to,
            opts,
            (token, counted, landed),
            rdma,
            &storage,
        )?;
        if !d.is_empty() {
            detail = format!("{detail}; {d}");
        }
        Ok(Session {
            vm,
            opts,
            cancel,
            ctl,
            sched,
            plane,
            detail,
            t0,
            setup: t0.elapsed(),
            tally: Tally::default(),
            storage,
            id: crate::session::migration_id(token),
        })
    }
}

/// A control connection after Hello and Welcome: what the destination offered, before either
/// side proved its key.
pub(super) struct Greeting {
    pub(super) ctl: Control,
    /// Feature bits the destination accepted.
    pub(super) features: u64,
    key: Option<auth::Key>,
    seal: bool,
    nonce_s: [u8; 32],
    nonce_d: [u8; 32],
    proof_d: [u8; 32],
}

/// Connects to `to` (TLS first with certificates), offers `features` (and sealing when the
/// key seals) in Hello and reads Welcome.
pub(super) fn hello(
    to: &str,
    opts: &MigrateOptions,
    features: u64,
) -> Result<Greeting, MigrationError> {
    let mut stream = connect(to, opts, "control")?;
    let _ = stream.set_write_timeout(Some(opts.timeout));
    // Certificates: a TLS handshake keys this session (a pre-shared key is the key).
    let key = match opts.key.as_ref().and_then(auth::Key::tls) {
        Some(id) => {
            let host = host_of(to);
            let secret = id.connect(&mut stream, host, opts.timeout).map_err(|e| {
                MigrationError::Refused {
                    peer: to.to_string(),
                    reason: e.to_string(),
                }
            })?;
            Some(auth::Key::from_secret(&secret))
        }
        None => opts.key.clone(),
    };
    let mut ctl = Control::new(stream);
    let nonce_s = auth::nonce();
    let seal = key.as_ref().is_some_and(auth::Key::seals);
    ctl.send(&Message::Hello {
        min_version: VERSION,
        max_version: VERSION,
        features: features | if seal { FEATURE_SEALED } else { 0 },
        nonce: nonce_s,
    })?;
    match ctl.recv(Some(opts.timeout), "waiting for Welcome")? {
        Message::Welcome {
            nonce,
            proof,
            features,
            ..
        } => Ok(Greeting {
            ctl,
            features,
            key,
            seal,
            nonce_s,
            nonce_d: nonce,
            proof_d: proof,
        }),
        m => Err(ctl.unexpected(&m, "waiting for Welcome")),
    }
}

impl Greeting {
    /// Both sides prove the key; the session is sealed when agreed. Returns the control
    /// connection and the session token.
    pub(super) fn authenticate(self) -> Result<(Control, u64), MigrationError> {
        let Greeting {
            mut ctl,
            features,
            key,
            seal,
            nonce_s,
            nonce_d,
            proof_d,
        } = self;
        let token = authenticate(&mut ctl, key.as_ref(), &nonce_s, &nonce_d, &proof_d)?;
        // Checked once both proved their keys, so a missing key is what a peer hears first.
        if seal && features & FEATURE_SEALED == 0 {
            let reason = "the destination does not encrypt the session (an older livemig, or \
                          --encrypt off there); this source requires it: use --encrypt off \
                          on both sides only on a trusted link";
            let _ = ctl.send(&Message::Refuse {
                reason: reason.into(),
            });
            return Err(MigrationError::Refused {
                peer: ctl.peer().to_string(),
                reason: format!("refused the destination: {reason}"),
            });
        }
        ctl.authenticated();
        if let Some(k) = key.as_ref().filter(|_| seal) {
            let keys = k.session_keys(&nonce_s, &nonce_d, &ctl.transcript());
            ctl.seal(keys, auth::Direction::ToDestination);
        }
        Ok((ctl, token))
    }
}

/// The data plane over RDMA (when agreed) or TCP.
fn open_plane(
    ctl: &mut Control,
    vm: &dyn MigratableVm,
    to: &str,
    opts: &MigrateOptions,
    tcp: (u64, bool, bool),
    rdma: Option<RdmaDevice>,
    storage: &OutgoingStorage,
) -> Result<channels::Plane, MigrationError> {
    match rdma {
        Some(dev) => channels::open_rdma(ctl, vm, &dev, opts),
        None => channels::open_tcp(vm, to, opts, tcp, ctl.keys(), storage),
    }
}

/// Rails of an opened RDMA plan.
#[cfg(feature = "rdma")]
fn rails(r: &RdmaDevice) -> usize {
    r.len()
}
#[cfg(not(feature = "rdma"))]
fn rails(r: &RdmaDevice) -> usize {
    match *r {}
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The destination proves the key first; only then does the source prove it. Returns the
/// session token the data channels present.
fn authenticate(
    ctl: &mut Control,
    key: Option<&auth::Key>,
    nonce_s: &[u8; 32],
    nonce_d: &[u8; 32],
    proof_d: &[u8; 32],
) -> Result<u64, MigrationError> {
    let refuse = |ctl: &mut Control, reason: &str| {
        let _ = ctl.send(&Message::Refuse {
            reason: reason.into(),
        });
        MigrationError::Refused {
            peer: ctl.peer().to_string(),
            reason: format!("refused the destination: {reason}"),
        }
    };
    match key {
        Some(k) => {
            if !auth::proofs_equal(proof_d, &k.destination_proof(nonce_s, nonce_d)) {
                return Err(refuse(
                    ctl,
                    if *proof_d == [0; 32] {
                        "authentication failed: the destination has no key (this source requires one)"
                    } else {
                        "authentication failed: the destination's key does not match this source's"
                    },
                ));
            }
            ctl.send(&Message::Auth {
                proof: k.source_proof(nonce_s, nonce_d),
            })?;
            Ok(k.session_token(nonce_s, nonce_d))
        }
        None => {
            if *proof_d != [0; 32] {
                return Err(refuse(
                    ctl,
                    "authentication failed: the destination requires a key and this source has none",
                ));
            }
            ctl.send(&Message::Auth { proof: [0; 32] })?;
            Ok(random_u64())
        }
    }
}
