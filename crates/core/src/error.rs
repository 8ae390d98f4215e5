//! The EPP's error model: a code, mapped to an HTTP status, plus a message.
//!
//! Every error that reaches a client (through Envoy's `ImmediateResponse` or the built-in
//! proxy) is an [`InferenceError`]; its body text is `inference error: <Code> - <message>`,
//! exactly as the reference EPP writes it.

use std::fmt;

/// Error codes of the reference EPP and the HTTP status each maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request body is malformed or lacks a required field.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 413: the request body is larger than the EPP accepts (`--max-request-body-bytes`).
    /// llmsched's own code: the reference EPP buffers bodies without a limit; its
    /// light-weight EPP ends the stream with gRPC `ResourceExhausted` and llm-d's coordinator
    /// answers HTTP 413, which is what a client can act on (429 would invite a retry).
    PayloadTooLarge,
    /// 429: no capacity to serve the request now.
    ResourceExhausted,
    /// 500.
    Internal,
    /// 503: no endpoint can serve the request.
    ServiceUnavailable,
}

impl ErrorCode {
    /// HTTP status code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::ResourceExhausted => 429,
            ErrorCode::Internal => 500,
            ErrorCode::ServiceUnavailable => 503,
        }
    }

    /// The code's name as the reference spells it (also the `error_code` metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::ResourceExhausted => "ResourceExhausted",
            ErrorCode::Internal => "Internal",
            ErrorCode::ServiceUnavailable => "ServiceUnavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Value of the `x-llm-d-request-dropped-reason` header on flow-control rejections.
pub const REQUEST_DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";

/// An error returned to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inference error: {code} - {message}")]
pub struct InferenceError {
    /// The error's code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// Extra response headers (e.g. the dropped-reason header of flow control).
    pub headers: Vec<(String, String)>,
}

impl InferenceError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 413: a request body over `limit` bytes.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 429.
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ResourceExhausted, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// 503.
    pub fn service_unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ServiceUnavailable, message)
    }

    /// HTTP status code.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// The response body: `inference error: <Code> - <message>`.
    pub fn body(&self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_status_follow_the_reference_format() {
        let e = InferenceError::bad_request("model not found in request body");
        assert_eq!(e.http_status(), 400);
        assert_eq!(
            e.body(),
            "inference error: BadRequest - model not found in request body"
        );
        let all = [
            (ErrorCode::BadRequest, 400),
            (ErrorCode::Unauthorized, 401),
            (ErrorCode::Forbidden, 403),
            (ErrorCode::NotFound, 404),
            (ErrorCode::PayloadTooLarge, 413),
            (ErrorCode::ResourceExhausted, 429),
            (ErrorCode::Internal, 500),
            (ErrorCode::ServiceUnavailable, 503),
        ];
        for (code, status) in all {
            assert_eq!(code.http_status(), status);
            assert!(
                InferenceError::new(code, "x")
                    .body()
                    .contains(code.as_str())
            );
        }
    }
}
