//! TLS for the ext_proc port: on by default with a self-signed certificate generated at
//! start (the reference does the same), or `tls.crt` / `tls.key` from `--cert-path`, reloaded
//! when they change with `--enable-cert-reload` (checked every second, settled for 250 ms as
//! the reference's debounce; a broken pair is logged and the previous one kept).
//!
//! The handshake is done here with rustls (ALPN `h2`) so certificates can be swapped without
//! restarting the listener.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// File names inside `--cert-path`.
pub const CERT_FILE: &str = "tls.crt";
/// File names inside `--cert-path`.
pub const KEY_FILE: &str = "tls.key";

/// A TLS setup that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM data is not a usable certificate chain or private key.
    #[error("{0}")]
    Pem(String),
    /// Generating the self-signed certificate failed.
    #[error("failed to create self signed certificate - {0}")]
    SelfSigned(String),
    /// rustls rejected the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Swappable certificate.
#[derive(Debug)]
struct Resolver {
    current: arc_swap::ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(
            "certificate: no CERTIFICATE block found".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Pem(format!("private key: {e}")))?;
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

/// Server-side TLS settings for the ext_proc listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    resolver: Arc<Resolver>,
    server: Arc<rustls::ServerConfig>,
    cert_pem: Vec<u8>,
    reload_dir: Option<PathBuf>,
}

impl TlsConfig {
    fn build(
        cert_pem: Vec<u8>,
        key_pem: &[u8],
        reload_dir: Option<PathBuf>,
    ) -> Result<Self, TlsError> {
        let ck = certified_key(&cert_pem, key_pem)?;
        let resolver = Arc::new(Resolver {
            current: arc_swap::ArcSwap::from_pointee(ck),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            resolver,
            server: Arc::new(server),
            cert_pem,
            reload_dir,
        })
    }

    /// A freshly generated self-signed certificate (ECDSA P-256, organization
    /// `Inference Ext`, names `localhost`, `127.0.0.1`, `::1`, server-auth usage).
    pub fn self_signed() -> Result<Self, TlsError> {
        let (cert, key) = generate_self_signed()?;
        Self::build(cert.into_bytes(), key.as_bytes(), None)
    }

    /// Certificate and key given as PEM.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        Self::build(cert_pem.to_vec(), key_pem, None)
    }

    /// `tls.crt` and `tls.key` from `dir`; with `reload`, [`crate::serve_ext_proc`] watches
    /// them and swaps in new pairs.
    pub fn from_cert_dir(dir: &Path, reload: bool) -> Result<Self, TlsError> {
        let (cert, key) = read_pair(dir)?;
        Self::build(cert, &key, reload.then(|| dir.to_path_buf()))
    }

    /// The current certificate chain as PEM (as loaded or generated).
    pub fn certificate_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The rustls server configuration.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// Starts the reload watcher when configured; ends with `shutdown`.
    pub(crate) fn spawn_reloader(&self, shutdown: CancellationToken) {
        let Some(dir) = self.reload_dir.clone() else {
            return;
        };
        let resolver = self.resolver.clone();
        tokio::spawn(async move {
            let mut last = stamps(&dir);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = stamps(&dir);
                if now == last {
                    continue;
                }
                // Let writers finish (a secret update rewrites both files).
                tokio::time::sleep(Duration::from_millis(250)).await;
                last = stamps(&dir);
                match read_pair(&dir).and_then(|(c, k)| certified_key(&c, &k)) {
                    Ok(ck) => {
                        resolver.current.store(Arc::new(ck));
                        tracing::info!(path = %dir.display(), "reloaded TLS certificate");
                    }
                    Err(e) => {
                        tracing::error!(path = %dir.display(), error = %e, "failed to reload TLS certificate; keeping the previous one");
                    }
                }
            }
        });
    }
}

fn stamps(dir: &Path) -> [Option<(SystemTime, u64)>; 2] {
    [CERT_FILE, KEY_FILE].map(|f| {
        std::fs::metadata(dir.join(f))
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
}

fn read_pair(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |f: &str| {
        let path = dir.join(f);
        std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
    };
    Ok((read(CERT_FILE)?, read(KEY_FILE)?))
}

/// Generates a self-signed certificate and key, as PEM.
pub fn generate_self_signed() -> Result<(String, String), TlsError> {
    let err = |e: rcgen::Error| TlsError::SelfSigned(e.to_string());
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Inference Ext");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_and_pem_round_trip() {
        let (c, k) = generate_self_signed().unwrap();
        assert!(c.starts_with("-----BEGIN CERTIFICATE-----"));
        let t = TlsConfig::from_pem(c.as_bytes(), k.as_bytes()).unwrap();
        assert_eq!(t.server_config().alpn_protocols, vec![b"h2".to_vec()]);
        assert!(TlsConfig::self_signed().is_ok());
    }

    #[test]
    fn broken_files_are_reported_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = TlsConfig::from_cert_dir(dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("tls.crt"), "{e}");
        std::fs::write(dir.path().join(CERT_FILE), "junk").unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "junk").unwrap();
        let e = TlsConfig::from_cert_dir(dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        let (c, _) = generate_self_signed().unwrap();
        let (_, other_key) = generate_self_signed().unwrap();
        std::fs::write(dir.path().join(CERT_FILE), &c).unwrap();
        std::fs::write(dir.path().join(KEY_FILE), &other_key).unwrap();
        assert!(
            TlsConfig::from_cert_dir(dir.path(), false).is_err(),
            "mismatched key"
        );
    }
}
