//! What a client of a migrating VM feels: pings every few milliseconds and a TCP stream
//! through the guest's echo service for the whole migration; the longest gap between ping
//! replies is the blackout, and the stream must come through whole.
//!
//! Used by `livemig bench-blackout` (run where a client would be, e.g. in a network namespace
//! behind the same switch as the VM) and the Linux-guest tests.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BlackoutOptions {
    /// The VM's address.
    pub target: Ipv4Addr,
    /// The guest's TCP echo port (None: pings only).
    pub echo_port: Option<u16>,
    /// Between two pings (and two stream writes).
    pub interval: Duration,
    /// How long to measure.
    pub duration: Duration,
    /// Bytes the stream writes per interval.
    pub stream_chunk: usize,
}

/// What the client saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlackoutReport {
    /// Pings sent.
    pub sent: u64,
    /// Distinct pings answered.
    pub received: u64,
    /// Pings never answered.
    pub lost: u64,
    /// The longest time between two consecutive replies, ms (the blackout); a silence from
    /// the last reply to the end of the run counts too (up to the last ping sent).
    pub longest_gap_ms: f64,
    /// When that gap began (the last reply before it), Unix time in ms.
    pub gap_start_unix_ms: f64,
    /// When it ended (the first reply after it), Unix time in ms; 0: it never did (no reply
    /// came after it: the target went silent for good).
    pub gap_end_unix_ms: f64,
    /// When the last reply came (0: none came), Unix time in ms.
    pub last_reply_unix_ms: f64,
    /// When each reply came, in order, Unix time in ms (e.g. to find the first reply after a
    /// moment the client did not know of, such as the destination's resume).
    pub reply_times_unix_ms: Vec<f64>,
    /// When the first ping went out, Unix time in ms.
    pub first_ping_unix_ms: f64,
    /// When the first reply came (0: none came), Unix time in ms.
    pub first_reply_unix_ms: f64,
    /// Pings sent before the gap began that were never answered (the path's own loss).
    pub lost_before_gap: u64,
    /// Pings sent after the gap ended that were never answered.
    pub lost_after_gap: u64,
    /// The TCP stream, if one ran.
    pub tcp: Option<StreamReport>,
}

/// The TCP stream through the guest's echo service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    /// The connection lasted, no reset, every byte echoed back in order.
    pub survived: bool,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Bytes read back (and checked).
    pub bytes_echoed: u64,
    /// The longest time without a byte coming back, ms.
    pub longest_stall_ms: f64,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// When bytes never came back: the client socket's TCP state at the end (`TCP_INFO`):
    /// whether the client still had data unacknowledged and how far its retransmission timer
    /// had backed off (segments lost towards the guest), or had nothing in flight (the guest
    /// held the bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_info: Option<String>,
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with identifier `id` and sequence number `seq`.
fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"livemig!");
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// A raw ICMP socket (needs root or CAP_NET_RAW).
fn icmp_socket() -> Result<OwnedFd> {
    // SAFETY: socket(2) has no memory effects; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw ICMP socket (needs root)");
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval from the pointer, valid for the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

fn send_to(fd: &OwnedFd, target: Ipv4Addr, packet: &[u8]) {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(target).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the packet and address live across the call; a lost ping is what we measure.
    unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
}

/// Pings and streams for `o.duration`; returns what the client saw.
pub fn measure(o: &BlackoutOptions) -> Result<BlackoutReport> {
    if o.interval.is_zero() || o.duration.is_zero() {
        bail!("interval and duration must be positive");
    }
    let fd = Arc::new(icmp_socket()?);
    let id = (std::process::id() & 0xffff) as u16;
    let stop = Arc::new(AtomicBool::new(false));
    let replies: Arc<Mutex<Vec<(u16, f64)>>> = Arc::default();
    let receiver = {
        let (fd, stop, replies) = (fd.clone(), stop.clone(), replies.clone());
        let target = o.target;
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: recv writes at most buf.len() bytes into buf.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 28 {
                    continue;
                }
                let b = &buf[..n as usize];
                let ihl = usize::from(b[0] & 0xf) * 4;
                let from = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
                let Some(icmp) = b.get(ihl..ihl + 8) else {
                    continue;
                };
                if from == target && icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
                    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
                    replies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((seq, unix_ms()));
                }
            }
        })
    };
    let stream = o.echo_port.map(|port| {
        let (stop, target, interval, chunk) = (stop.clone(), o.target, o.interval, o.stream_chunk);
        std::thread::spawn(move || stream(target, port, interval, chunk, stop))
    });
    let start = Instant::now();
    let mut sent = 0u64;
    let mut sent_at = Vec::new();
    while start.elapsed() < o.duration {
        send_to(&fd, o.target, &echo_request(id, sent as u16));
        sent_at.push(unix_ms());
        sent += 1;
        let next = o.interval * sent as u32;
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    // Late replies, then the stream's drain.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    let tcp = stream.and_then(|s| s.join().ok());
    let replies = std::mem::take(&mut *replies.lock().unwrap_or_else(|p| p.into_inner()));
    let mut r = summarise(&sent_at, replies);
    r.tcp = tcp;
    Ok(r)
}

/// The report of pings sent at `sent_at` (Unix ms, sequence number = index) and `replies`
/// (sequence number, Unix ms), the stream aside.
fn summarise(sent_at: &[f64], mut replies: Vec<(u16, f64)>) -> BlackoutReport {
    let sent = sent_at.len() as u64;
    replies.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut seqs: Vec<u16> = replies.iter().map(|r| r.0).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut r = BlackoutReport {
        sent,
        received: seqs.len() as u64,
        lost: sent.saturating_sub(seqs.len() as u64),
        first_ping_unix_ms: sent_at.first().copied().unwrap_or(0.0),
        first_reply_unix_ms: replies.first().map(|r| r.1).unwrap_or(0.0),
        last_reply_unix_ms: replies.last().map(|r| r.1).unwrap_or(0.0),
        reply_times_unix_ms: replies.iter().map(|r| r.1).collect(),
        ..BlackoutReport::default()
    };
    for w in replies.windows(2) {
        let gap = w[1].1 - w[0].1;
        if gap > r.longest_gap_ms {
            r.longest_gap_ms = gap;
            r.gap_start_unix_ms = w[0].1;
            r.gap_end_unix_ms = w[1].1;
        }
    }
    // A silence that lasted to the end is a gap that never closed: the worst of all — from
    // the last reply, or from the first ping where none came back at all (a guest that no
    // ping reached is not a blackout of zero; one such run read 0 ms in a median).
    if let (Some(&first), Some(&end)) = (sent_at.first(), sent_at.last()) {
        let last = replies.last().map_or(first, |r| r.1);
        if end - last > r.longest_gap_ms {
            r.longest_gap_ms = end - last;
            r.gap_start_unix_ms = last;
            r.gap_end_unix_ms = 0.0;
        }
    }
    // (Sequence numbers wrap at 65536 pings: 11 minutes at 10 ms.)
    for (i, &t) in sent_at.iter().enumerate() {
        if seqs.binary_search(&(i as u16)).is_err() {
            if t < r.gap_start_unix_ms {
                r.lost_before_gap += 1;
            } else if r.gap_end_unix_ms > 0.0 && t > r.gap_end_unix_ms {
                r.lost_after_gap += 1;
            }
        }
    }
    r
}

/// Writes a counted byte pattern through the echo service and checks what comes back.
fn stream(
    target: Ipv4Addr,
    port: u16,
    interval: Duration,
    chunk: usize,
    stop: Arc<AtomicBool>,
) -> StreamReport {
    let mut rep = StreamReport::default();
    let conn = TcpStream::connect_timeout(
        &std::net::SocketAddr::V4(SocketAddrV4::new(target, port)),
        Duration::from_secs(3),
    );
    let mut w = match conn {
        Ok(c) => c,
        Err(e) => {
            rep.error = Some(format!("connect: {e}"));
            return rep;
        }
    };
    let _ = w.set_nodelay(true);
    // Writes give up now and then so a stuck connection cannot hold the writer past the end.
    let _ = w.set_write_timeout(Some(Duration::from_millis(200)));
    let Ok(mut r) = w.try_clone() else {
        rep.error = Some("cannot clone the stream".into());
        return rep;
    };
    let _ = r.set_read_timeout(Some(Duration::from_millis(100)));
    let written = Arc::new(AtomicU64::new(0));
    let writer_done = Arc::new(AtomicBool::new(false));
    // The reader tells the writer to give up (without stopping the pings).
    let failed = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, done, failed) = (written.clone(), writer_done.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut off = 0u64;
            let mut buf = vec![0u8; chunk];
            let t0 = Instant::now();
            let mut n = 0u32;
            let mut err = None;
            'outer: while !stop.load(Ordering::Relaxed) && !failed.load(Ordering::Relaxed) {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = ((off + i as u64) % 251) as u8;
                }
                let mut at = 0;
                while at < buf.len() {
                    match w.write(&buf[at..]) {
                        Ok(0) => {
                            err = Some("write: the connection was closed".into());
                            break 'outer;
                        }
                        Ok(k) => {
                            at += k;
                            off += k as u64;
                            written.store(off, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            if stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
                                break 'outer;
                            }
                        }
                        Err(e) => {
                            err = Some(format!("write: {e}"));
                            break 'outer;
                        }
                    }
                }
                n += 1;
                if let Some(wait) = (interval * n).checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            done.store(true, Ordering::Relaxed);
            err
        })
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut last = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if writer_done.load(Ordering::Relaxed) {
            let d = *drain_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
            if rep.bytes_echoed >= written.load(Ordering::Relaxed) || Instant::now() > d {
                break;
            }
        }
        match r.read(&mut buf) {
            Ok(0) => {
                rep.error = Some("the connection was closed".into());
                break;
            }
            Ok(n) => {
                for (i, &b) in buf[..n].iter().enumerate() {
                    if b != ((rep.bytes_echoed + i as u64) % 251) as u8 {
                        rep.error = Some(format!(
                            "byte {} came back wrong",
                            rep.bytes_echoed + i as u64
                        ));
                        break;
                    }
                }
                if rep.error.is_some() {
                    break;
                }
                rep.bytes_echoed += n as u64;
                let now = Instant::now();
                rep.longest_stall_ms = rep.longest_stall_ms.max((now - last).as_secs_f64() * 1e3);
                last = now;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                rep.error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    failed.store(true, Ordering::Relaxed);
    if rep.bytes_echoed < written.load(Ordering::Relaxed) {
        rep.tcp_info = tcp_info(&r);
    }
    let _ = r.shutdown(std::net::Shutdown::Both);
    if let Ok(Some(e)) = writer.join() {
        rep.error.get_or_insert(e);
    }
    rep.bytes_sent = written.load(Ordering::Relaxed);
    rep.survived = rep.error.is_none() && rep.bytes_echoed == rep.bytes_sent && rep.bytes_sent > 0;
    rep
}

/// The socket's `TCP_INFO`, the fields that tell where a stalled stream stands.
fn tcp_info(s: &TcpStream) -> Option<String> {
    livemig_transport::tcp::tcp_info(s).map(|(i, _)| {
        format!(
            "state={} ca_state={} retransmits={} backoff={} rto_ms={} unacked={} lost={} \
             total_retrans={} snd_cwnd={} last_data_sent_ms={} last_data_recv_ms={} \
             last_ack_recv_ms={}",
            i.tcpi_state,
            i.tcpi_ca_state,
            i.tcpi_retransmits,
            i.tcpi_backoff,
            i.tcpi_rto / 1000,
            i.tcpi_unacked,
            i.tcpi_lost,
            i.tcpi_total_retrans,
            i.tcpi_snd_cwnd,
            i.tcpi_last_data_sent,
            i.tcpi_last_data_recv,
            i.tcpi_last_ack_recv
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_info_tells_an_established_connection_and_what_it_has_in_flight() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_peer, _) = l.accept().unwrap();
        c.write_all(b"unread").unwrap();
        let info = tcp_info(&c).expect("TCP_INFO");
        assert!(info.starts_with("state=1 "), "{info}"); // TCP_ESTABLISHED
        assert!(info.contains(" retransmits=0 "), "{info}");
    }

    #[test]
    fn the_longest_silence_is_the_blackout_even_when_it_never_ends() {
        // Ten pings 10 ms apart, each answered 1 ms later, but 3..=5 lost: a 40 ms gap.
        let sent: Vec<f64> = (0..10).map(|i| 1000.0 + 10.0 * f64::from(i)).collect();
        let replies = |lost: &dyn Fn(u16) -> bool| -> Vec<(u16, f64)> {
            (0..10u16)
                .filter(|&i| !lost(i))
                .map(|i| (i, sent[usize::from(i)] + 1.0))
                .collect()
        };
        let r = summarise(&sent, replies(&|i| (3..=5).contains(&i)));
        assert_eq!((r.sent, r.received, r.lost), (10, 7, 3));
        assert_eq!(r.longest_gap_ms, 40.0);
        assert_eq!((r.gap_start_unix_ms, r.gap_end_unix_ms), (1021.0, 1061.0));
        assert_eq!((r.lost_before_gap, r.lost_after_gap), (0, 0));
        assert_eq!(r.last_reply_unix_ms, 1091.0);
        assert_eq!(r.reply_times_unix_ms.len(), 7);
        assert_eq!(r.reply_times_unix_ms[3], 1061.0);
        // Silent from ping 4 on: the gap never closed.
        let r = summarise(&sent, replies(&|i| i >= 4));
        assert_eq!(r.gap_start_unix_ms, 1031.0);
        assert_eq!(r.gap_end_unix_ms, 0.0, "never closed");
        assert_eq!(r.longest_gap_ms, 1090.0 - 1031.0);
        assert_eq!((r.lost_before_gap, r.lost_after_gap), (0, 0));
        // No reply at all: silent from the first ping to the last, never closed.
        let r = summarise(&sent, Vec::new());
        assert_eq!(
            (r.received, r.first_reply_unix_ms, r.last_reply_unix_ms),
            (0, 0.0, 0.0)
        );
        assert_eq!(r.longest_gap_ms, 1090.0 - 1000.0);
        assert_eq!((r.gap_start_unix_ms, r.gap_end_unix_ms), (1000.0, 0.0));
    }
}
