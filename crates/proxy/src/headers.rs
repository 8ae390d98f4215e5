//! Header handling of the proxy: what the director sees of a request (the same shape Envoy
//! gives the ext_proc server), what is forwarded upstream and what reaches the client.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use llmsched_core::request::{Headers, header as names};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus `expect` (the proxy has the whole body before
/// it connects upstream) and `proxy-connection`: never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in `Connection: a, b` are hop-by-hop too (rare: only then allocate).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

/// The request's headers as the director (and every plugin) sees them: lowercase names, the
/// pseudo-headers `:method`, `:path`, `:authority` and `:scheme` first, as Envoy sends them
/// over ext_proc, then every other header except hop-by-hop ones and `host` (which is the
/// `:authority`). A repeated header keeps its last value, as in the ext_proc path. Values
/// that are not UTF-8 are passed lossily.
pub(crate) fn director_headers(parts: &Parts) -> Headers {
    let mut h = Headers::new();
    h.insert(":method", parts.method.as_str());
    h.insert(
        ":path",
        parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
    );
    if let Some(a) = authority(parts) {
        h.insert(":authority", a);
    }
    h.insert(":scheme", "http");
    for (k, v) in &parts.headers {
        if k == header::HOST || HOP_BY_HOP.contains(k) || k == header::EXPECT {
            continue;
        }
        h.insert(k.as_str(), String::from_utf8_lossy(v.as_bytes()));
    }
    h
}

/// The request's authority: the URI's (HTTP/2, absolute-form) or the `host` header.
pub(crate) fn authority(parts: &Parts) -> Option<&str> {
    parts.uri.authority().map(|a| a.as_str()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

/// The subset hint carried by the `x-gateway-destination-endpoint-subset` request header:
/// a comma-separated list of `ip[:port]`. `None` when the header is absent; an empty value
/// is an empty list (which matches no endpoint, as an empty metadata list does).
pub(crate) fn subset_hint(headers: &HeaderMap) -> Option<Vec<String>> {
    let v = headers.get(names::DESTINATION_ENDPOINT_SUBSET)?;
    let s = String::from_utf8_lossy(v.as_bytes());
    Some(
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// Sets `name: value` when both are valid header tokens; invalid ones (a hook producing a
/// value with a newline, say) are skipped with a debug log rather than failing the request.
pub(crate) fn set(headers: &mut HeaderMap, name: &str, value: &str) {
    match (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        (Ok(n), Ok(v)) => {
            headers.insert(n, v);
        }
        _ => tracing::debug!(name, value, "skipping a header that is not valid HTTP"),
    }
}

/// Converts response headers for the response hooks (with `:status`, as Envoy reports them).
pub(crate) fn response_headers(status: u16, headers: &HeaderMap) -> Headers {
    let mut h = Headers::new();
    h.insert(":status", status.to_string());
    for (k, v) in headers {
        h.insert(k.as_str(), String::from_utf8_lossy(v.as_bytes()));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn director_sees_envoy_shaped_headers() {
        let p = parts(
            http::Request::post("/v1/completions?x=1")
                .header("Host", "gw:8081")
                .header("Content-Type", "application/json")
                .header("Connection", "keep-alive, x-hop")
                .header("x-hop", "1")
                .header("X-Request-Id", "abc")
                .body(())
                .unwrap(),
        );
        let h = director_headers(&p);
        assert_eq!(h.get(":method"), Some("POST"));
        assert_eq!(h.get(":path"), Some("/v1/completions?x=1"));
        assert_eq!(h.get(":authority"), Some("gw:8081"));
        assert_eq!(h.get(":scheme"), Some("http"));
        assert_eq!(h.get("content-type"), Some("application/json"));
        assert_eq!(h.get("x-request-id"), Some("abc"));
        assert_eq!(h.get("host"), None);
        assert_eq!(h.get("connection"), None);
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn subset_hint_header() {
        let mut h = HeaderMap::new();
        assert_eq!(subset_hint(&h), None);
        h.insert(
            names::DESTINATION_ENDPOINT_SUBSET,
            HeaderValue::from_static("10.0.0.1:8000, 10.0.0.2"),
        );
        assert_eq!(
            subset_hint(&h),
            Some(vec!["10.0.0.1:8000".to_string(), "10.0.0.2".to_string()])
        );
        h.insert(
            names::DESTINATION_ENDPOINT_SUBSET,
            HeaderValue::from_static(""),
        );
        assert_eq!(subset_hint(&h), Some(vec![]));
    }

    #[test]
    fn invalid_hook_headers_are_skipped() {
        let mut h = HeaderMap::new();
        set(&mut h, "x-ok", "1");
        set(&mut h, "bad name", "1");
        set(&mut h, "x-bad-value", "a\nb");
        assert_eq!(h.len(), 1);
        let r = response_headers(200, &h);
        assert_eq!(r.get(":status"), Some("200"));
        assert_eq!(r.get("x-ok"), Some("1"));
    }
}
