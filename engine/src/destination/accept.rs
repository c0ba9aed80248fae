//! Who migrates here: connections to the listening port are greeted concurrently, each within
//! its own deadline, and the first source that proves the key takes the destination. A
//! stranger — garbage, a wrong key, a peer that trickles bytes or says nothing — is refused,
//! logged and forgotten; it never ends the wait, and never delays a real source.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tracing::{info, warn};

use super::handshake::{greet, serve_probe, GreetOptions, Greeted};
use crate::session::MigrationError;

/// Connections greeted at once; more are closed at once (and logged).
pub const MAX_GREETING: usize = 8;

/// The acceptor sleeps until a connection arrives or a greeting ends, at most this long.
const POLL: Duration = Duration::from_millis(100);

/// Waits until one of `fds` is readable (or has hung up), at most `limit`.
pub(super) fn wait_readable(fds: &[i32], limit: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures that poll may write.
    // An error (EINTR) only ends the wait early: the caller looks again.
    unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            limit.as_millis() as i32,
        )
    };
}

/// Accepts on `listener` until a source is greeted; strangers are refused and logged.
pub(super) fn first_source(
    listener: &TcpListener,
    g: &GreetOptions,
) -> Result<Greeted, MigrationError> {
    let connect_err = |source| MigrationError::Connect {
        addr: listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        source,
    };
    listener.set_nonblocking(true).map_err(connect_err)?;
    let (tx, rx) = mpsc::channel::<Greeted>();
    // A greeting that ends wakes the acceptor at once (a byte on this pair), as a connection
    // on the listener does: a source is never kept waiting by a polling interval.
    let (mut wake_rx, wake_tx) = UnixStream::pair().map_err(connect_err)?;
    wake_rx.set_nonblocking(true).map_err(connect_err)?;
    wake_tx.set_nonblocking(true).map_err(connect_err)?;
    let greeting = Arc::new(AtomicUsize::new(0));
    let won = loop {
        if let Ok(greeted) = rx.try_recv() {
            break Ok(greeted);
        }
        wait_readable(&[listener.as_raw_fd(), wake_rx.as_raw_fd()], POLL);
        let _ = wake_rx.read(&mut [0u8; 64]);
        if let Ok(greeted) = rx.try_recv() {
            break Ok(greeted);
        }
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Out of descriptors or a connection reset before it was accepted: the
            // listener itself is fine.
            Err(e) if is_transient(&e) => {
                warn!("accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => break Err(connect_err(e)),
        };
        if greeting.fetch_add(1, Ordering::SeqCst) >= MAX_GREETING {
            greeting.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, "closed a connection: {MAX_GREETING} connections are being greeted already");
            continue;
        }
        let Ok(mut wake) = wake_tx.try_clone() else {
            greeting.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, "closed a connection: cannot start its greeting");
            continue;
        };
        let (tx, g, count) = (tx.clone(), g.clone(), greeting.clone());
        let spawned = std::thread::Builder::new()
            .name("livemig-greet".into())
            .spawn(move || {
                let ok = stream.set_nonblocking(false).is_ok();
                match greet(stream, &g) {
                    Ok(mut greeted) if ok => match serve_probe(&mut greeted, g.timeout) {
                        // A link probe (`migrate --plan`): served, and the wait goes on.
                        Ok(true) => info!(%peer, "served a link probe"),
                        // Another source may have won meanwhile: this one's connection
                        // then closes.
                        Ok(false) => {
                            let _ = tx.send(greeted);
                        }
                        Err(e) => warn!(%peer, "refused a connection after its greeting: {e}"),
                    },
                    Ok(_) => {}
                    Err(e) => warn!(%peer, "refused a connection: {e}"),
                }
                count.fetch_sub(1, Ordering::SeqCst);
                // Full (the acceptor has not read the last wake-ups yet): it wakes anyway.
                let _ = wake.write(&[1]);
            });
        if let Err(e) = spawned {
            greeting.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, "closed a connection: cannot start its greeting: {e}");
        }
    };
    let _ = listener.set_nonblocking(false);
    won
}

/// Greets `stream`, a connection a host agent accepted for this destination. None: it was a
/// link probe, served.
pub(super) fn greet_one(
    stream: std::net::TcpStream,
    g: &GreetOptions,
) -> Result<Option<Greeted>, MigrationError> {
    let mut greeted = greet(stream, g)?;
    if serve_probe(&mut greeted, g.timeout)? {
        info!(peer = greeted.ctl.peer(), "served a link probe");
        return Ok(None);
    }
    Ok(Some(greeted))
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}
