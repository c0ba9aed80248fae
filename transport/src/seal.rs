//! Sealed records: AES-256-GCM over a stream, one key per connection and direction.
//!
//! A record is its ciphertext followed by a 16-byte tag. The nonce is the record's sequence
//! number on its key (little-endian, padded to 96 bits), so records cannot be replayed,
//! dropped or reordered without the next one failing to open; a key never sees a nonce twice.
//! What is not secret but must not change (a frame header) goes in as associated data.
//!
//! The keys come from the session's handshake (the engine derives one per connection and
//! direction); this module only seals and opens.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

use crate::TransportError;

/// Bytes of the tag after each record.
pub const TAG_LEN: usize = 16;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8; KEY_LEN]) -> LessSafeKey {
    // AES-256-GCM takes any 32 bytes as a key: `new` only fails on a wrong length.
    LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, bytes).unwrap_or_else(|_| unreachable!("32-byte key")),
    )
}

/// The sending half of a sealed connection.
pub struct Sealer {
    key: LessSafeKey,
    seq: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer(seq {})", self.seq)
    }
}

impl Sealer {
    /// A sealer with `key`, its first record numbered 0.
    pub fn new(key_bytes: &[u8; KEY_LEN]) -> Sealer {
        Sealer {
            key: key(key_bytes),
            seq: 0,
        }
    }

    /// Encrypts `buf` in place as the next record, binding `aad`; returns its tag.
    pub fn seal(&mut self, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let n = nonce(self.seq);
        self.seq += 1;
        // Sealing fails only for records beyond GCM's 64 GiB limit; ours are a few MiB.
        let tag = self
            .key
            .seal_in_place_separate_tag(n, Aad::from(aad), buf)
            .unwrap_or_else(|_| unreachable!("record within GCM's size limit"));
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        t
    }

    /// Appends `plain` sealed as the next record, tag included, to `out`.
    pub fn seal_append(&mut self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(plain);
        let tag = self.seal(aad, &mut out[at..]);
        out.extend_from_slice(&tag);
    }
}

/// The receiving half of a sealed connection.
pub struct Opener {
    key: LessSafeKey,
    seq: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener(seq {})", self.seq)
    }
}

impl Opener {
    /// An opener with `key`, expecting record 0 first.
    pub fn new(key_bytes: &[u8; KEY_LEN]) -> Opener {
        Opener {
            key: key(key_bytes),
            seq: 0,
        }
    }

    /// Decrypts the next record in place, checking `tag` and `aad`. On failure the buffer
    /// holds garbage and the connection must be dropped: the error names `peer`.
    pub fn open(
        &mut self,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
        peer: &str,
    ) -> Result<(), TransportError> {
        let n = nonce(self.seq);
        self.seq += 1;
        self.key
            .open_in_place_separate_tag(n, Aad::from(aad), Tag::from(*tag), buf, 0..)
            .map(|_| ())
            .map_err(|_| TransportError::Malformed {
                peer: peer.to_string(),
                reason: format!(
                    "record {} failed authentication: altered, replayed, reordered or not \
                     sealed with this session's key",
                    self.seq - 1
                ),
            })
    }

    /// Opens a record of `plain_len` bytes followed by its tag, as read into `rec`; returns
    /// the plaintext part.
    pub fn open_record<'a>(
        &mut self,
        aad: &[u8],
        rec: &'a mut [u8],
        peer: &str,
    ) -> Result<&'a mut [u8], TransportError> {
        if rec.len() < TAG_LEN {
            return Err(TransportError::Malformed {
                peer: peer.to_string(),
                reason: format!("sealed record of {} bytes has no tag", rec.len()),
            });
        }
        let (body, tag) = rec.split_at_mut(rec.len() - TAG_LEN);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag);
        self.open(aad, body, &t, peer)?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_open_in_order_and_nothing_altered_opens() {
        let k = [7u8; KEY_LEN];
        let mut s = Sealer::new(&k);
        let mut recs = Vec::new();
        for i in 0..3u8 {
            let mut r = Vec::new();
            s.seal_append(&[i], &[i; 40], &mut r);
            assert_ne!(&r[..40], &[i; 40]);
            recs.push(r);
        }
        let mut o = Opener::new(&k);
        for (i, r) in recs.iter().enumerate() {
            let mut r = r.clone();
            assert_eq!(
                o.open_record(&[i as u8], &mut r, "p").unwrap(),
                &[i as u8; 40]
            );
        }
        // Reordered, replayed, flipped, wrong associated data or key: refused.
        let cases: [(usize, usize, u8, [u8; KEY_LEN]); 5] = [
            (1, 0, 1, k),       // record 1 presented first
            (0, 0, 0, [8; 32]), // another key
            (0, 3, 0, k),       // a flipped ciphertext bit
            (0, 45, 0, k),      // a flipped tag bit
            (0, 0, 1, k),       // other associated data
        ];
        for (rec, flip, aad, key) in cases {
            let mut o = Opener::new(&key);
            let mut r = recs[rec].clone();
            if flip > 0 {
                r[flip] ^= 1;
            }
            let e = o.open_record(&[aad], &mut r, "p").unwrap_err().to_string();
            assert!(e.contains("failed authentication"), "{e}");
        }
        assert!(Opener::new(&k)
            .open_record(&[], &mut [0u8; 5], "p")
            .is_err());
    }
}
