//! Transport of the peer connections: TCP, TLS when the EPP serves TLS (`--secure-serving`,
//! the same certificate as ext_proc), hard limits on what an accepted connection may cost.
//!
//! Peers authenticate the server they dial in one of two ways:
//!
//! * **Pinned**: with `--cert-path`, every replica mounts the same certificate (one Kubernetes
//!   Secret), and a peer is accepted only when it presents exactly that certificate.
//! * **Encrypted only**: with the self-signed certificate each replica generates, there is
//!   nothing to verify against; the connection is encrypted and the certificate accepted, as
//!   the reference's gateway accepts the EPP's self-signed certificate.
//!
//! Without TLS (`--secure-serving=false`) peers talk plaintext gRPC.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::HaMetrics;

/// An accepted or dialled peer connection (plaintext or TLS).
pub struct PeerIo {
    inner: Box<dyn Io>,
    remote: Option<std::net::SocketAddr>,
    _permit: Option<ConnPermit>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

impl std::fmt::Debug for PeerIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerIo")
    }
}

impl AsyncRead for PeerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for PeerIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: self.remote,
        }
    }
}

/// Counts open accepted connections; released on drop.
struct ConnPermit(Arc<AtomicUsize>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Limits of the sync listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Open connections at most (peers are few; a flood is refused).
    pub max_connections: usize,
    /// A TLS handshake must finish within this time.
    pub handshake_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Accepted connections of the sync port, TLS-terminated when `tls` is given. Connections
/// beyond the limit are closed at once; failed or slow handshakes are dropped; each is
/// counted in `llmsched_ha_peer_errors_total`.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ListenerLimits,
    metrics: HaMetrics,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<PeerIo, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let open = Arc::new(AtomicUsize::new(0));
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (sock, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "ha: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::Relaxed) >= limits.max_connections {
                open.fetch_sub(1, Ordering::Relaxed);
                metrics.error("connection_limit");
                tracing::debug!(%peer, "ha: connection limit reached; closing");
                drop(sock);
                continue;
            }
            let permit = ConnPermit(open.clone());
            let _ = sock.set_nodelay(true);
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let io = match acceptor {
                    None => PeerIo {
                        inner: Box::new(sock),
                        remote: Some(peer),
                        _permit: Some(permit),
                    },
                    Some(acc) => {
                        match tokio::time::timeout(limits.handshake_timeout, acc.accept(sock)).await
                        {
                            Ok(Ok(tls)) => PeerIo {
                                inner: Box::new(tls),
                                remote: Some(peer),
                                _permit: Some(permit),
                            },
                            Ok(Err(e)) => {
                                metrics.error("handshake");
                                tracing::debug!(%peer, error = %e, "ha: TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                metrics.error("handshake");
                                tracing::debug!(%peer, "ha: TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let _ = tx.send(Ok(io)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// How this replica dials its peers.
#[derive(Debug, Clone)]
pub enum ClientTls {
    /// Plaintext gRPC (`--secure-serving=false`).
    Plaintext,
    /// TLS; the server's certificate is accepted when it is exactly `pinned` (DER), or
    /// whatever it is when `pinned` is `None` (encryption only).
    Tls {
        /// The certificate every replica serves (`--cert-path`), DER.
        pinned: Option<Vec<u8>>,
    },
}

impl ClientTls {
    /// TLS pinned to the first certificate of `pem` (the `tls.crt` every replica mounts).
    pub fn pinned_pem(pem: &[u8]) -> Result<Self, String> {
        let mut rd = std::io::BufReader::new(pem);
        let cert = rustls_pemfile::certs(&mut rd)
            .next()
            .ok_or_else(|| "no certificate in PEM".to_string())?
            .map_err(|e| format!("bad certificate PEM: {e}"))?;
        Ok(ClientTls::Tls {
            pinned: Some(cert.as_ref().to_vec()),
        })
    }

    fn connector(&self) -> Option<TlsConnector> {
        match self {
            ClientTls::Plaintext => None,
            ClientTls::Tls { pinned } => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let verifier = Arc::new(PeerVerifier {
                    pinned: pinned.clone(),
                    provider: provider.clone(),
                });
                let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .ok()?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth();
                cfg.alpn_protocols = vec![b"h2".to_vec()];
                Some(TlsConnector::from(Arc::new(cfg)))
            }
        }
    }
}

/// Accepts the pinned certificate only, or any certificate when nothing is pinned; checks
/// the handshake signatures either way.
#[derive(Debug)]
struct PeerVerifier {
    pinned: Option<Vec<u8>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pinned {
            Some(p) if p.as_slice() != end_entity.as_ref() => Err(rustls::Error::General(
                "peer certificate is not the pinned --cert-path certificate".into(),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a peer could not be dialled.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed or timed out.
    #[error("connect {addr}: {error}")]
    Connect {
        /// The address.
        addr: String,
        /// The error.
        error: String,
    },
    /// TLS failed.
    #[error("TLS handshake with {addr}: {error}")]
    Handshake {
        /// The address.
        addr: String,
        /// The error.
        error: String,
    },
    /// The gRPC channel could not be set up.
    #[error("gRPC channel to {addr}: {error}")]
    Channel {
        /// The address.
        addr: String,
        /// The error.
        error: String,
    },
}

impl DialError {
    /// Metric reason.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Connect { .. } => "connect",
            DialError::Handshake { .. } => "handshake",
            DialError::Channel { .. } => "channel",
        }
    }
}

/// Dials `addr` (`host:port`) and returns a gRPC channel over one connection.
pub async fn dial(
    addr: &str,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<tonic::transport::Channel, DialError> {
    let connector = tls.connector();
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .unwrap_or_default();
    let target = addr.to_string();
    // Connect first (so errors say what failed), then hand the stream to tonic.
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&target))
        .await
        .map_err(|_| DialError::Connect {
            addr: target.clone(),
            error: format!("timed out after {timeout:?}"),
        })?
        .map_err(|e| DialError::Connect {
            addr: target.clone(),
            error: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match connector {
        None => Box::new(tcp),
        Some(c) => {
            // Certificates are pinned or not verified (see the module docs): the name only
            // goes into SNI.
            let name = ServerName::try_from(host.clone()).unwrap_or(ServerName::IpAddress(
                std::net::IpAddr::from([127, 0, 0, 1]).into(),
            ));
            let tls = tokio::time::timeout(timeout, c.connect(name, tcp))
                .await
                .map_err(|_| DialError::Handshake {
                    addr: target.clone(),
                    error: format!("timed out after {timeout:?}"),
                })?
                .map_err(|e| DialError::Handshake {
                    addr: target.clone(),
                    error: e.to_string(),
                })?;
            Box::new(tls)
        }
    };
    let slot = Arc::new(parking_lot::Mutex::new(Some(PeerIo {
        inner: io,
        remote: None,
        _permit: None,
    })));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| DialError::Channel {
            addr: target.clone(),
            error: e.to_string(),
        })?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let t2 = target.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri: http::Uri| {
            let slot = slot.clone();
            let t2 = t2.clone();
            async move {
                // One connection per channel: a reconnect is a new dial by the caller.
                slot.lock().take().map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        format!("connection to {t2} closed"),
                    )
                })
            }
        }))
        .await
        .map_err(|e| DialError::Channel {
            addr: target,
            error: e.to_string(),
        })
}
