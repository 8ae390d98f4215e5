//! How model-server metrics are fetched: `http` or `https`, and for `https` how the server
//! is verified and whether a client certificate is presented.
//!
//! The settings come from `--model-server-metrics-scheme` and
//! `--model-server-metrics-https-insecure-skip-verify`, or from the configuration's
//! `metrics-data-source` parameters (`scheme`, `insecureSkipVerify`, `caCertPath`,
//! `clientCertPath`, `clientKeyPath`), exactly as the reference names them:
//!
//! | settings | server certificate |
//! |---|---|
//! | `insecureSkipVerify: true` (the reference's default) | accepted whatever it is (the handshake still checks the server holds its key) |
//! | `insecureSkipVerify: false`, `caCertPath` | must chain to a CA in that PEM bundle and name the endpoint's IP |
//! | `insecureSkipVerify: false`, no `caCertPath` | must chain to a system root (`/etc/ssl/certs`, `SSL_CERT_FILE`) |
//!
//! `clientCertPath` + `clientKeyPath` (both or neither) present a client certificate (mTLS).
//! The files are read once, when the configuration is loaded; a missing or malformed file is
//! a load error naming it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricsScheme {
    /// Plain HTTP (the default).
    #[default]
    Http,
    /// HTTPS, verified as [`ScrapeTls`] says.
    Https,
}

impl MetricsScheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricsScheme::Http => "http",
            MetricsScheme::Https => "https",
        }
    }

    /// Parses `http` or `https` (nothing else).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(MetricsScheme::Http),
            "https" => Some(MetricsScheme::Https),
            _ => None,
        }
    }
}

impl std::fmt::Display for MetricsScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TLS settings of `https` scraping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeTls {
    /// Accept any server certificate (`insecureSkipVerify`, default true as the reference).
    pub insecure_skip_verify: bool,
    /// PEM bundle of the CAs the server certificate must chain to (instead of the system's).
    pub ca_cert_path: Option<PathBuf>,
    /// PEM client certificate chain presented to the server (with `client_key_path`).
    pub client_cert_path: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_path: Option<PathBuf>,
}

impl Default for ScrapeTls {
    fn default() -> Self {
        Self {
            insecure_skip_verify: true,
            ca_cert_path: None,
            client_cert_path: None,
            client_key_path: None,
        }
    }
}

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeTlsError {
    /// A file cannot be read or holds no usable PEM data.
    #[error("{field} {path}: {detail}")]
    File {
        /// The parameter naming the file (`caCertPath`, `clientCertPath`, `clientKeyPath`).
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Only one of the client certificate and key is given.
    #[error("clientCertPath and clientKeyPath must be set together")]
    ClientPair,
    /// No root certificate could be loaded to verify servers.
    #[error(
        "insecureSkipVerify is false and no caCertPath is given, but no system root certificate could be loaded ({0}); set caCertPath"
    )]
    NoRoots(String),
    /// rustls refused the settings.
    #[error("TLS client settings: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ScrapeTlsError> {
    let fail = |detail: String| ScrapeTlsError::File {
        field,
        path: path.to_path_buf(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(fail("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn roots(tls: &ScrapeTls) -> Result<RootCertStore, ScrapeTlsError> {
    let mut store = RootCertStore::empty();
    match &tls.ca_cert_path {
        Some(path) => {
            for cert in read_certs("caCertPath", path)? {
                store.add(cert).map_err(|e| ScrapeTlsError::File {
                    field: "caCertPath",
                    path: path.clone(),
                    detail: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_string(), |e| e.to_string());
                return Err(ScrapeTlsError::NoRoots(why));
            }
        }
    }
    Ok(store)
}

/// The rustls client configuration of `tls` (reads the files it names).
pub fn client_config(tls: &ScrapeTls) -> Result<ClientConfig, ScrapeTlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                algorithms: provider.signature_verification_algorithms,
            }))
    } else {
        builder.with_root_certificates(roots(tls)?)
    };
    // ALPN is left to the connector (HTTP/1.1).
    let config = match (&tls.client_cert_path, &tls.client_key_path) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certs("clientCertPath", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ScrapeTlsError::File {
                field: "clientKeyPath",
                path: key.clone(),
                detail: format!("not a usable PEM private key: {e}"),
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => return Err(ScrapeTlsError::ClientPair),
    };
    Ok(config)
}

/// `insecureSkipVerify`: any certificate is accepted; the handshake signatures are still
/// checked, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// True when `error` or one of its sources is a TLS error (handshake, certificate).
pub(crate) fn is_tls_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // An `io::Error`'s `source()` skips the error it wraps: descend into it instead.
        cur = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = client_config(&ScrapeTls {
            insecure_skip_verify: false,
            ca_cert_path: Some(missing.clone()),
            ..ScrapeTls::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("caCertPath") && e.contains("nope.pem"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all").unwrap();
        let e = client_config(&ScrapeTls {
            insecure_skip_verify: false,
            ca_cert_path: Some(garbage),
            ..ScrapeTls::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = client_config(&ScrapeTls {
            client_cert_path: Some(missing.clone()),
            ..ScrapeTls::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("set together"), "{e}");
        let e = client_config(&ScrapeTls {
            client_cert_path: Some(missing.clone()),
            client_key_path: Some(missing),
            ..ScrapeTls::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("clientCertPath"), "{e}");
    }

    #[test]
    fn schemes() {
        assert_eq!(MetricsScheme::parse("https"), Some(MetricsScheme::Https));
        assert_eq!(MetricsScheme::parse("http"), Some(MetricsScheme::Http));
        assert_eq!(MetricsScheme::parse("HTTPS"), None);
        assert_eq!(MetricsScheme::Https.to_string(), "https");
    }
}
