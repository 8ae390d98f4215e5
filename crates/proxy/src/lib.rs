//! # llmsched-proxy
//!
//! PLACEHOLDER API (being implemented): the built-in OpenAI-compatible proxy.

use std::sync::Arc;

use llmsched_director::Director;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A naive routing policy used instead of the scheduler, for comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Endpoints in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
}

/// Proxy settings.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Route with a baseline instead of the scheduler.
    pub baseline: Option<Baseline>,
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Not available in this build.
    #[error("the built-in proxy is not implemented yet")]
    Unavailable,
}

/// Serves the proxy on `listener` until `shutdown`.
pub async fn serve(
    _listener: TcpListener,
    _director: Arc<Director>,
    _options: ProxyOptions,
    _shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    Err(ProxyError::Unavailable)
}
