//! Pre-shared-key authentication of the control channel: mutual HMAC-SHA256
//! challenge–response, and the session token that binds data channels to it.
//!
//! ```text
//! source                                     destination
//!   Hello {.., nonce_s} ------------------------>
//!   <----- Welcome {.., nonce_d, proof_d = HMAC(k, "dest" | nonce_s | nonce_d)}
//!   checks proof_d (the destination knows k)
//!   Auth {proof_s = HMAC(k, "source" | nonce_d | nonce_s)} --->
//!                                              checks proof_s before reading any state
//! token = first 8 bytes of HMAC(k, "session" | nonce_s | nonce_d)
//! ```
//!
//! Each side proves knowledge of the key over fresh nonces chosen by the other, so neither a
//! stranger nor a replay gets past the handshake. Without a key on both sides (an explicit
//! `--no-auth`) proofs are zero and the token is random.
//!
//! Sealed sessions (both sides offer [`crate::protocol::FEATURE_SEALED`]; the default with a
//! key): every later control frame and every TCP data channel is AES-256-GCM, keyed per
//! connection and direction by [`SessionKeys`], derived from the key, both nonces and the
//! hash of every handshake frame (versions and features included), so a peer that tampered
//! with the handshake cannot open or forge anything after it.

use std::path::Path;

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::tls::TlsIdentity;

/// Shortest accepted key, in random bytes (written as twice as many hex digits).
pub const MIN_KEY_BYTES: usize = 32;
const MIN_KEY_DIGITS: usize = 2 * MIN_KEY_BYTES;

/// Errors loading a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// Path given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key is not long hex.
    #[error(
        "the key must be at least {MIN_KEY_BYTES} random bytes written as hex ({MIN_KEY_DIGITS} \
         or more hex digits, an even count; {0}); make one with `openssl rand -hex 32`"
    )]
    Weak(String),
    /// Others than its owner may read the key file.
    #[error(
        "key file {path} may be read by others (mode {mode:03o}): `chmod 600 {path}` and \
         consider the key disclosed"
    )]
    Exposed {
        /// Path given.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

/// A pre-shared key, and whether sessions keyed by it are sealed — or certificates, which
/// key each session with a secret from a TLS handshake ([`crate::tls`]).
#[derive(Clone)]
pub struct Key(Vec<u8>, bool, Option<Arc<TlsIdentity>>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from its hex text (surrounding whitespace trimmed). The proofs are keyed with
    /// the text itself, as every earlier version did, so a key file works across versions.
    pub fn new(text: &[u8]) -> Result<Key, KeyError> {
        let t = text.trim_ascii();
        if let Some(c) = t.iter().find(|c| !c.is_ascii_hexdigit()) {
            let what = if c.is_ascii_graphic() || *c == b' ' {
                format!("{:?} is not a hex digit", char::from(*c))
            } else {
                format!("byte 0x{c:02x} is not a hex digit")
            };
            return Err(KeyError::Weak(what));
        }
        if t.len() < MIN_KEY_DIGITS || t.len() % 2 != 0 {
            return Err(KeyError::Weak(format!("it has {} digits", t.len())));
        }
        Ok(Key(t.to_vec(), true, None))
    }

    /// Certificates instead of a pre-shared key: each session is keyed by a mutual TLS
    /// handshake (always sealed).
    pub fn certificates(id: TlsIdentity) -> Key {
        Key(Vec::new(), true, Some(Arc::new(id)))
    }

    /// The certificates, when sessions are keyed by TLS.
    pub fn tls(&self) -> Option<&TlsIdentity> {
        self.2.as_deref()
    }

    /// The key of one session, from the secret its TLS handshake exported.
    pub fn from_secret(secret: &[u8; 32]) -> Key {
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        Key(hex.into_bytes(), true, None)
    }

    /// The same key for sessions that authenticate but send everything after the handshake
    /// in clear (`--encrypt off`: trusted links only).
    pub fn unsealed(mut self) -> Key {
        self.1 = false;
        self
    }

    /// Whether sessions are sealed.
    pub fn seals(&self) -> bool {
        self.1
    }

    /// The keys of a sealed session whose handshake frames hash to `transcript`.
    pub fn session_keys(
        &self,
        nonce_s: &[u8; 32],
        nonce_d: &[u8; 32],
        transcript: &[u8; 32],
    ) -> SessionKeys {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac(b"seal", nonce_s, nonce_d))
            .unwrap_or_else(|_| unreachable_hmac());
        m.update(transcript);
        SessionKeys(m.finalize().into_bytes().into())
    }

    /// A key read from a file only its owner can read.
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| KeyError::Read {
            path: path.display().to_string(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.display().to_string(),
                mode,
            });
        }
        Key::new(&std::fs::read(path).map_err(read)?)
    }

    /// A fresh random key, as hex text.
    pub fn generate() -> String {
        (0..4)
            .map(|_| format!("{:016x}", crate::session::random_u64()))
            .collect()
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
        // HMAC accepts keys of any length.
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable_hmac());
        m.update(b"livemig v1 ");
        m.update(label);
        m.update(a);
        m.update(b);
        m.finalize().into_bytes().into()
    }

    /// The destination's proof.
    pub fn destination_proof(&self, nonce_s: &[u8; 32], nonce_d: &[u8; 32]) -> [u8; 32] {
        self.mac(b"destination", nonce_s, nonce_d)
    }

    /// The source's proof.
    pub fn source_proof(&self, nonce_s: &[u8; 32], nonce_d: &[u8; 32]) -> [u8; 32] {
        self.mac(b"source", nonce_d, nonce_s)
    }

    /// The session token data channels present.
    pub fn session_token(&self, nonce_s: &[u8; 32], nonce_d: &[u8; 32]) -> u64 {
        let m = self.mac(b"session", nonce_s, nonce_d);
        u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]])
    }
}

/// The secret of a sealed session, from which every connection's keys derive.
#[derive(Clone)]
pub struct SessionKeys([u8; 32]);

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// Which way a connection's records travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the source to the destination.
    ToDestination,
    /// From the destination to the source.
    ToSource,
}

impl SessionKeys {
    /// The key of connection `conn` (0: control, 1 + i: data channel i) one way.
    pub fn key(&self, conn: u32, dir: Direction) -> [u8; 32] {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable_hmac());
        m.update(b"livemig record key ");
        m.update(&conn.to_le_bytes());
        m.update(&[dir as u8]);
        m.finalize().into_bytes().into()
    }
}

fn unreachable_hmac() -> Hmac<Sha256> {
    // Hmac::new_from_slice never fails: HMAC takes keys of every length.
    <Hmac<Sha256> as Mac>::new_from_slice(b"livemig").unwrap_or_else(|_| unreachable_hmac())
}

/// Constant-time comparison of two proofs.
pub fn proofs_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    for c in n.chunks_mut(8) {
        c.copy_from_slice(&crate::session::random_u64().to_le_bytes());
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_key_role_and_nonces() {
        let k = Key::new(Key::generate().as_bytes()).unwrap();
        let other = Key::new(Key::generate().as_bytes()).unwrap();
        let (s, d) = (nonce(), nonce());
        assert!(proofs_equal(
            &k.destination_proof(&s, &d),
            &k.destination_proof(&s, &d)
        ));
        assert!(!proofs_equal(
            &k.destination_proof(&s, &d),
            &other.destination_proof(&s, &d)
        ));
        assert!(!proofs_equal(
            &k.destination_proof(&s, &d),
            &k.source_proof(&s, &d)
        ));
        assert!(!proofs_equal(
            &k.destination_proof(&s, &d),
            &k.destination_proof(&d, &s)
        ));
        assert_ne!(k.session_token(&s, &d), other.session_token(&s, &d));
        assert_eq!(Key::generate().len(), 64);
        // Record keys differ by key, transcript, connection and direction.
        let t = [1u8; 32];
        let base = k.session_keys(&s, &d, &t).key(0, Direction::ToDestination);
        for other_key in [
            other
                .session_keys(&s, &d, &t)
                .key(0, Direction::ToDestination),
            k.session_keys(&s, &d, &[2; 32])
                .key(0, Direction::ToDestination),
            k.session_keys(&d, &s, &t).key(0, Direction::ToDestination),
            k.session_keys(&s, &d, &t).key(1, Direction::ToDestination),
            k.session_keys(&s, &d, &t).key(0, Direction::ToSource),
        ] {
            assert_ne!(base, other_key);
        }
    }

    #[test]
    fn keys_are_long_hex_in_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let hex = Key::generate();
        assert!(Key::new(format!("{hex}\n").as_bytes()).is_ok());
        for (bad, why) in [
            (&hex[..62], "62 digits"),
            (&hex[..63], "63 digits"),
            (
                "cafe babe cafe babe cafe babe cafe babe cafe babe cafe babe cafe babe",
                "' '",
            ),
            ("", "0 digits"),
        ] {
            let e = Key::new(bad.as_bytes()).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("openssl rand -hex 32"),
                "{bad:?}: {e}"
            );
        }
        let dir = std::env::temp_dir().join(format!("livemig-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        std::fs::write(&p, &hex).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Key::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("mode 640") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::from_file(&p).is_ok());
        assert!(matches!(
            Key::from_file(&dir.join("none")),
            Err(KeyError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
