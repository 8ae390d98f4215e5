//! Header helpers shared by every transport: the request id, system-owned headers and the
//! control headers the director reads.

use llmsched_core::request::{Headers, header};

/// Returns the request's `x-request-id`, generating a UUID v4 (and inserting it into
/// `headers`, so it is echoed to the model server) when the client sent none or an empty one.
pub fn ensure_request_id(headers: &mut Headers) -> String {
    if let Some(id) = headers.get(header::REQUEST_ID).filter(|v| !v.is_empty()) {
        return id.to_string();
    }
    let id = uuid::Uuid::new_v4().to_string();
    headers.insert(header::REQUEST_ID, id.clone());
    id
}

/// Headers the EPP owns and never echoes back (one definition, in core).
pub use llmsched_core::request::header::is_system_owned;

/// True when a `content-type` value announces a server-sent-event stream.
pub fn is_event_stream(content_type: &str) -> bool {
    content_type
        .to_ascii_lowercase()
        .contains("text/event-stream")
}

/// Parses a latency-objective header value (milliseconds); junk and negatives count as absent.
pub(crate) fn parse_ms(v: Option<&str>) -> Option<f64> {
    v.and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|x| x.is_finite() && *x >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_kept_or_generated() {
        let mut h: Headers = [("X-Request-Id", "abc")].into_iter().collect();
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = Headers::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h.get("x-request-id"), Some(id.as_str()));
        let mut h: Headers = [("x-request-id", "")].into_iter().collect();
        let id = ensure_request_id(&mut h);
        assert!(!id.is_empty());
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn system_owned_headers() {
        for h in [
            ":path",
            "Content-Length",
            "x-gateway-destination-endpoint",
            "x-gateway-destination-endpoint-served",
            "x-llm-d-inference-objective",
            "x-gateway-inference-objective",
            "x-llm-d-model-name-rewrite",
            "x-gateway-model-name-rewrite",
            "x-llm-d-inference-fairness-id",
            "x-gateway-inference-fairness-id",
        ] {
            assert!(is_system_owned(h), "{h}");
        }
        for h in ["content-type", "x-request-id", "authorization", "host"] {
            assert!(!is_system_owned(h), "{h}");
        }
    }

    #[test]
    fn event_stream_and_ms() {
        assert!(is_event_stream("text/event-stream; charset=utf-8"));
        assert!(is_event_stream("Text/Event-Stream"));
        assert!(!is_event_stream("application/json"));
        assert_eq!(parse_ms(Some(" 250 ")), Some(250.0));
        assert_eq!(parse_ms(Some("-1")), None);
        assert_eq!(parse_ms(Some("soon")), None);
        assert_eq!(parse_ms(None), None);
    }
}
