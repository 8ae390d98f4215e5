//! TLS for the sidecar's listener (`--secure-proxy`, on by default as in the reference):
//! `tls.crt` / `tls.key` from `--cert-path`, or a self-signed certificate generated at start
//! (names `localhost`, `127.0.0.1`, `::1`). ALPN offers `h2` and `http/1.1`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::SidecarError;

/// Certificate file inside `--cert-path`.
pub const CERT_FILE: &str = "tls.crt";
/// Key file inside `--cert-path`.
pub const KEY_FILE: &str = "tls.key";

fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, SidecarError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| SidecarError::Tls(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(SidecarError::Tls(
            "certificate: no CERTIFICATE block found".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| SidecarError::Tls(format!("private key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SidecarError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| SidecarError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// `tls.crt` and `tls.key` from `dir`.
pub fn from_cert_dir(dir: &Path) -> Result<tokio_rustls::TlsAcceptor, SidecarError> {
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read(&p)
            .map_err(|e| SidecarError::Tls(format!("cannot read {}: {e}", p.display())))
    };
    let cfg = server_config(&read(CERT_FILE)?, &read(KEY_FILE)?)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// A freshly generated self-signed certificate.
pub fn self_signed() -> Result<tokio_rustls::TlsAcceptor, SidecarError> {
    let err = |e: rcgen::Error| SidecarError::Tls(format!("self-signed certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let cfg = server_config(cert.pem().as_bytes(), key.serialize_pem().as_bytes())?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_builds_and_bad_dirs_say_why() {
        assert!(self_signed().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let e = from_cert_dir(dir.path()).err().unwrap().to_string();
        assert!(e.contains("tls.crt"), "{e}");
        std::fs::write(dir.path().join(CERT_FILE), "junk").unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "junk").unwrap();
        let e = from_cert_dir(dir.path()).err().unwrap().to_string();
        assert!(e.contains("CERTIFICATE"), "{e}");
    }
}
