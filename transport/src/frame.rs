//! Length-prefixed frames for control messages.
//!
//! A frame is an 8-byte little-endian header — `kind: u16`, `flags: u16` (must be 0),
//! `len: u32` — followed by `len` payload bytes. `kind == 0` is invalid. Readers pass a cap
//! and a frame longer than the cap is rejected before anything is allocated.

use std::io::{Read, Write};

use crate::TransportError;

/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 8;

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: u16, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too long"))?;
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&kind.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame of at most `max_len` payload bytes. `peer` names the peer in errors.
pub fn read_frame<R: Read>(
    r: &mut R,
    max_len: u32,
    peer: &str,
) -> Result<(u16, Vec<u8>), TransportError> {
    let mut hdr = [0u8; HEADER_LEN];
    read_exact(r, &mut hdr, peer, "reading a frame header")?;
    let (kind, flags, len) = parse_header(&hdr);
    let bad = |reason: String| TransportError::Malformed {
        peer: peer.to_string(),
        reason,
    };
    if kind == 0 {
        return Err(bad("frame kind 0 is invalid".into()));
    }
    if flags != 0 {
        return Err(bad(format!("frame flags {flags:#x} unknown")));
    }
    if len > max_len {
        return Err(bad(format!(
            "frame of {len} bytes exceeds the {max_len} byte cap"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact(r, &mut payload, peer, "reading a frame payload")?;
    Ok((kind, payload))
}

/// Splits a header into `(kind, flags, len)`.
pub fn parse_header(hdr: &[u8; HEADER_LEN]) -> (u16, u16, u32) {
    (
        u16::from_le_bytes([hdr[0], hdr[1]]),
        u16::from_le_bytes([hdr[2], hdr[3]]),
        u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
    )
}

pub(crate) fn read_exact<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    peer: &str,
    during: &'static str,
) -> Result<(), TransportError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Closed {
                peer: peer.to_string(),
                during,
            }
        } else {
            TransportError::Io {
                op: during,
                peer: peer.to_string(),
                source: e,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_caps() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 3, b"hello").unwrap();
        let (k, p) = read_frame(&mut buf.as_slice(), 16, "t").unwrap();
        assert_eq!((k, p.as_slice()), (3, &b"hello"[..]));
        assert!(matches!(
            read_frame(&mut buf.as_slice(), 4, "t"),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            read_frame(&mut &buf[..10], 16, "t"),
            Err(TransportError::Closed { .. })
        ));
        let mut zero = Vec::new();
        write_frame(&mut zero, 0, b"").unwrap();
        assert!(read_frame(&mut zero.as_slice(), 16, "t").is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_frame(&mut bytes.as_slice(), 1 << 20, "fuzz");
        }

        #[test]
        fn round_trips(kind in 1u16.., payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = Vec::new();
            write_frame(&mut buf, kind, &payload).unwrap();
            let (k, p) = read_frame(&mut buf.as_slice(), 256, "t").unwrap();
            prop_assert_eq!(k, kind);
            prop_assert_eq!(p, payload);
        }
    }
}
