//! TLS: rustls on the aws-lc-rs provider, ALPN h2 and http/1.1, and a self-signed certificate
//! generated on first start when none is configured.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// Writes `cert.pem` and `key.pem` into `dir` unless both exist; returns their paths.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let file_err = |path: &Path, e: std::io::Error| TlsError::File {
        path: path.to_owned(),
        msg: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(&key, ck.signing_key.serialize_pem().as_bytes())
        .map_err(|e| file_err(&key, e))?;
    std::fs::write(&cert, ck.cert.pem()).map_err(|e| file_err(&cert, e))?;
    tracing::warn!(cert = %cert.display(), "generated a self-signed TLS certificate; configure server.tls_cert for production");
    Ok((cert, key))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// The certificate rustls presents, re-read from its PEM files on `reload` (SIGHUP). New
/// handshakes get the new pair; open connections keep the one they started with.
#[derive(Debug)]
pub struct CertResolver {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

impl CertResolver {
    /// Loads the pair again; on any problem the old pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = load_pair(&self.cert, &self.key, &self.provider)?;
        *self.current.write() = Arc::new(ck);
        Ok(())
    }
}

fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let file_err = |path: &Path, msg: String| TlsError::File {
        path: path.to_owned(),
        msg,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| file_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no certificate found".into()));
    }
    let pk = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
    // Also refuses a key that does not belong to the certificate.
    CertifiedKey::from_der(certs, pk, provider).map_err(|e| file_err(key, e.to_string()))
}

/// The server configuration for a certificate chain and key in PEM files, and the resolver
/// that reloads them.
///
/// `post_quantum`: prefer the hybrid X25519MLKEM768 key exchange (rustls's default) when the
/// client offers it; otherwise offer only the classical groups (X25519, P-256, P-384), as
/// OpenSSL 3.0 servers do. The hybrid costs more CPU per handshake.
pub fn server_config(
    cert: &Path,
    key: &Path,
    post_quantum: bool,
) -> Result<(Arc<rustls::ServerConfig>, Arc<CertResolver>), TlsError> {
    // Explicit provider: a dev-dependency enabling ring must not make the builder ambiguous.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // Suites whose key schedule hashes with SHA-256 first (AES-128-GCM, then ChaCha20), the
    // SHA-384 ones last, whatever the client prefers: on x86 SHA-256 has instructions of its
    // own (SHA-NI) and SHA-384 does not, and the key schedule is most of a resumed handshake
    // (16 % of the server's CPU in new-connection runs with AES-256-GCM-SHA384, which rustls
    // clients list first). AES-128-GCM is TLS 1.3's mandatory suite.
    provider.cipher_suites.sort_by_key(|cs| {
        use rustls::CipherSuite as S;
        matches!(
            cs.suite(),
            S::TLS13_AES_256_GCM_SHA384
                | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
    if !post_quantum {
        use rustls::crypto::aws_lc_rs::kx_group;
        provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    }
    let provider = Arc::new(provider);
    let resolver = Arc::new(CertResolver {
        cert: cert.to_owned(),
        key: key.to_owned(),
        current: parking_lot::RwLock::new(Arc::new(load_pair(cert, key, &provider)?)),
        provider: provider.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    // One ticket per handshake (rustls sends two by default): a returning client needs one,
    // and each costs an encryption and a record.
    cfg.send_tls13_tickets = 1;
    // Stateless tickets (rotating keys) and a larger session cache, so that returning clients
    // resume instead of paying for a full handshake.
    cfg.ticketer =
        rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(64 * 1024);
    Ok((Arc::new(cfg), resolver))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that prefers AES-256-GCM-SHA384 (rustls's own order) gets AES-128-GCM-SHA256,
    /// and a session ticket that resumes.
    #[test]
    fn prefers_sha256_suites_and_its_ticket_resumes() {
        let dir = std::env::temp_dir().join(format!("keygate-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, key) = ensure_self_signed(&dir, &["localhost".into()]).unwrap();
        let (server, _) = server_config(&cert, &key, true).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        // Moves what `from` has to send into `to`.
        fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
            let mut buf = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                to.read_tls(&mut &buf[..]).unwrap();
                to.process_new_packets().unwrap();
            }
        }
        let handshake = || {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut c: rustls::Connection = rustls::ClientConnection::new(client.clone(), name)
                .unwrap()
                .into();
            let mut s: rustls::Connection = rustls::ServerConnection::new(server.clone())
                .unwrap()
                .into();
            for _ in 0..10 {
                pump(&mut c, &mut s);
                pump(&mut s, &mut c);
            }
            assert!(!c.is_handshaking() && !s.is_handshaking());
            (
                c.negotiated_cipher_suite().unwrap().suite(),
                c.handshake_kind(),
            )
        };
        let (suite, kind) = handshake();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        let (_, kind) = handshake();
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
