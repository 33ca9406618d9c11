//! TLS: rustls on the aws-lc-rs provider, ALPN h2 and http/1.1, and a self-signed certificate
//! generated on first start when none is configured.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The server configuration for a certificate chain and key in PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::File {
            path: cert.to_owned(),
            msg: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: cert.to_owned(),
            msg: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        path: key.to_owned(),
        msg: e.to_string(),
    })?;
    // Explicit provider: a dev-dependency enabling ring must not make the builder ambiguous.
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
