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

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest accepted key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

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
    /// The key is too short.
    #[error("the key has {0} bytes; at least {MIN_KEY_LEN} are needed")]
    TooShort(usize),
}

/// A pre-shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from raw bytes (surrounding whitespace trimmed).
    pub fn new(bytes: &[u8]) -> Result<Key, KeyError> {
        let t = bytes.trim_ascii();
        if t.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(t.len()));
        }
        Ok(Key(t.to_vec()))
    }

    /// A key read from a file.
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Key::new(&bytes)
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
        let k = Key::new(b"0123456789abcdef").unwrap();
        let other = Key::new(b"0123456789abcdeX").unwrap();
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
        assert!(Key::new(b"short").is_err());
        assert_eq!(Key::generate().len(), 64);
    }
}
