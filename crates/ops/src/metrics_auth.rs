//! The authentication/authorization seam of the `/metrics` server
//! (`--metrics-endpoint-auth`).
//!
//! The HTTP side lives here: the bearer token is taken from the `Authorization` header and a
//! request without one answers 401 before anything else happens. Deciding who the token
//! belongs to and whether that user may `get` the path is a [`MetricsAuthorizer`]'s job; the
//! Kubernetes implementation (TokenReview + SubjectAccessReview, cached) lives in
//! `llmsched-kube`, so this crate stays free of Kubernetes clients.
//!
//! Answers, as controller-runtime's authentication/authorization filter gives them:
//!
//! | situation                                        | status |
//! |--------------------------------------------------|--------|
//! | no/garbled bearer token, or token not authenticated | 401 |
//! | authenticated, but the user may not `get` the path  | 403 |
//! | the review itself failed (API server unreachable, RBAC of the EPP) | 500 |
//! | allowed                                          | the page |

use futures::future::BoxFuture;

/// What the `/metrics` server asks about a request that carries a bearer token.
#[derive(Debug, Clone, Copy)]
pub struct MetricsAuthRequest<'a> {
    /// The bearer token.
    pub token: &'a str,
    /// The HTTP method, lower-cased (`get`, `head`...), as the Kubernetes authorizer sees it.
    pub verb: &'a str,
    /// The request path (`/metrics`).
    pub path: &'a str,
}

/// The decision about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAuthDecision {
    /// Authenticated and allowed.
    Allowed {
        /// Who.
        user: String,
    },
    /// The token does not authenticate anyone (401).
    Unauthenticated,
    /// Authenticated, but not allowed (403).
    Denied {
        /// Who.
        user: String,
        /// The authorizer's reason, when it gave one.
        reason: String,
    },
}

/// A review could not be made (500).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsAuthError {
    /// Authenticating the token failed (not: the token was rejected).
    #[error("authentication failed: {0}")]
    Authentication(String),
    /// Authorizing the user failed (not: the user was denied).
    #[error("authorization for user {user} failed: {error}")]
    Authorization {
        /// Who.
        user: String,
        /// Why.
        error: String,
    },
}

/// Decides who a bearer token belongs to and whether they may read the metrics.
pub trait MetricsAuthorizer: Send + Sync + 'static {
    /// Reviews one request.
    fn authorize<'a>(
        &'a self,
        request: MetricsAuthRequest<'a>,
    ) -> BoxFuture<'a, Result<MetricsAuthDecision, MetricsAuthError>>;
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive),
/// `None` when the header is absent, of another scheme, or the token is empty.
pub fn bearer_token(header: Option<&http::HeaderValue>) -> Option<&str> {
    let value = header?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start();
    // A token has no whitespace inside; anything after one is not part of it.
    let token = token.split(char::is_whitespace).next()?;
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(v: &str) -> Option<String> {
        let h = http::HeaderValue::from_str(v).unwrap();
        bearer_token(Some(&h)).map(str::to_string)
    }

    #[test]
    fn bearer_tokens_are_parsed_like_kubernetes_does() {
        assert_eq!(tok("Bearer abc"), Some("abc".into()));
        assert_eq!(tok("bearer abc"), Some("abc".into()));
        assert_eq!(tok("BEARER  abc "), Some("abc".into()));
        assert_eq!(tok("Bearer abc extra"), Some("abc".into()));
        assert_eq!(tok("Bearer "), None);
        assert_eq!(tok("Bearer"), None);
        assert_eq!(tok("Basic dXNlcjpwdw=="), None);
        assert_eq!(tok("abc"), None);
        assert_eq!(bearer_token(None), None);
        let non_ascii = http::HeaderValue::from_bytes(b"Bearer \xff").unwrap();
        assert_eq!(bearer_token(Some(&non_ascii)), None);
    }
}
