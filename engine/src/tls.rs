//! Certificates: mutual TLS 1.3 (rustls) keys a session instead of a pre-shared key.
//!
//! On the control connection, before livemig's own Hello, the source (client) and the
//! destination (server) run a TLS 1.3 handshake in which each presents a certificate signed
//! by the operators' CA (`--cert`, `--key`, `--ca`) and checks the other's. Both then export
//! 32 bytes of keying material from it (RFC 8446 §7.5), which serve as the session's
//! pre-shared key: the key proofs, the sealing of every control frame and every TCP data
//! channel ([`crate::auth`]) derive from it, so they are bound to that authenticated
//! handshake. TLS's own record layer is not used after the handshake (no session tickets are
//! sent); the destination says "go" with one byte once its side of the handshake is done, so
//! no livemig byte can be mistaken for TLS.
//!
//! [`throwaway_ca`] makes a CA and certificates for tests, the demo and first trials.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// The label of the exported keying material.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-livemig-session-key";

/// Errors of certificate authentication.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or parsed.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed (bad or unknown certificate, wrong name, a peer without TLS).
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// This host's certificate and key, and the CA it trusts for peers.
pub struct TlsIdentity {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(..)")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Loads a certificate chain and its private key (PEM) and the CA (PEM) that signs peers.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<TlsIdentity, TlsError> {
        let file_err = |what, path: &Path, reason: String| TlsError::File {
            what,
            path: path.display().to_string(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| file_err("certificate", cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(file_err("certificate", cert, "no certificate in it".into()));
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| file_err("private key", key, e.to_string()))?;
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| file_err("CA", ca, e.to_string()))?;
        for c in cas {
            roots
                .add(c)
                .map_err(|e| file_err("CA", ca, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(file_err("CA", ca, "no certificate in it".into()));
        }
        let roots = Arc::new(roots);
        let tls13 = &[&rustls::version::TLS13];
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| file_err("certificate", cert, e.to_string()))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), private.clone_key())
            .map_err(|e| file_err("certificate", cert, e.to_string()))?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| file_err("CA", ca, e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| file_err("certificate", cert, e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, private)
            .map_err(|e| file_err("certificate", cert, e.to_string()))?;
        // Nothing may follow the handshake on the wire but livemig's own frames.
        server.send_tls13_tickets = 0;
        Ok(TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The source's side: a TLS handshake with the destination named `host` on `stream`
    /// (within `timeout`); returns the session's exported secret.
    pub fn connect(
        &self,
        stream: &mut TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<[u8; 32], TlsError> {
        let peer = host.to_string();
        let fail = |reason: String| TlsError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| fail(format!("{host:?} is not a host name or address: {e}")))?;
        let mut conn =
            ClientConnection::new(self.client.clone(), name).map_err(|e| fail(e.to_string()))?;
        let _ = stream.set_read_timeout(Some(timeout));
        while conn.is_handshaking() {
            conn.complete_io(stream).map_err(|e| fail(e.to_string()))?;
        }
        while conn.wants_write() {
            conn.write_tls(stream).map_err(|e| fail(e.to_string()))?;
        }
        stream.flush().map_err(|e| fail(e.to_string()))?;
        let secret = conn
            .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .map_err(|e| fail(e.to_string()))?;
        // The destination's "go": its side is done, everything after is livemig's.
        let mut go = [0u8; 1];
        stream
            .read_exact(&mut go)
            .map_err(|e| fail(format!("no go from the destination: {e}")))?;
        if go != [GO] {
            return Err(fail(format!(
                "unexpected byte {:#04x} after the handshake",
                go[0]
            )));
        }
        Ok(secret)
    }

    /// The destination's side on a fresh connection (within `timeout`); returns the session's
    /// exported secret once the source's certificate checked out.
    pub fn accept(&self, stream: &mut TcpStream, timeout: Duration) -> Result<[u8; 32], TlsError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "unknown peer".to_string(), |a| a.to_string());
        let fail = |reason: String| TlsError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let mut conn =
            ServerConnection::new(self.server.clone()).map_err(|e| fail(e.to_string()))?;
        let deadline = std::time::Instant::now() + timeout;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(fail("timed out".into()));
            }
            let _ = stream.set_read_timeout(Some(left));
            conn.complete_io(stream).map_err(|e| fail(e.to_string()))?;
        }
        while conn.wants_write() {
            conn.write_tls(stream).map_err(|e| fail(e.to_string()))?;
        }
        let secret = conn
            .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .map_err(|e| fail(e.to_string()))?;
        stream
            .write_all(&[GO])
            .and_then(|()| stream.flush())
            .map_err(|e| fail(e.to_string()))?;
        Ok(secret)
    }
}

/// The byte the destination sends once its side of the handshake is done.
const GO: u8 = 0x4c;

/// A throwaway CA and, for each of `hosts`, a certificate it signed with that host's names
/// (host names or IP addresses) and key: `(ca.pem, [(cert.pem, key.pem)])`.
pub fn throwaway_ca(hosts: &[Vec<String>]) -> Result<(String, Vec<(String, String)>), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let err = |e: rcgen::Error| e.to_string();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "livemig throwaway CA");
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let mut out = Vec::new();
    for names in hosts {
        let mut p = CertificateParams::new(names.clone()).map_err(err)?;
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &ca, &ca_key).map_err(err)?;
        out.push((cert.pem(), key.serialize_pem()));
    }
    Ok((ca.pem(), out))
}
