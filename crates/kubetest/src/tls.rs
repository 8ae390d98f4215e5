//! A throw-away CA and a serving certificate for `localhost`, `127.0.0.1` and `::1`.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::Error;

/// The CA (which clients trust through `certificate-authority-data`) and the server config.
pub(crate) struct TlsMaterial {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

pub(crate) fn generate(extra_sans: &[String]) -> Result<TlsMaterial, Error> {
    let err = |e: rcgen::Error| Error::Tls(e.to_string());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubetest-ca");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;

    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "kubernetes.default.svc".to_string(),
    ];
    sans.extend(extra_sans.iter().cloned());
    let mut leaf = rcgen::CertificateParams::new(sans).map_err(err)?;
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    let leaf_key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = leaf.signed_by(&leaf_key, &ca).map_err(err)?;

    let chain = vec![
        CertificateDer::from(cert.der().to_vec()),
        CertificateDer::from(ca.der().to_vec()),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| Error::Tls(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    })
}
