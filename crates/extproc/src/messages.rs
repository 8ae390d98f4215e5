//! Building and reading ext_proc protobuf messages, exactly as the reference EPP shapes them.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use llmsched_core::error::InferenceError;
use llmsched_core::request::{Headers, header};

/// Largest body chunk sent back to Envoy (some Envoy builds cap streamed chunks at 64 KiB;
/// the reference keeps a margin).
pub const BODY_BYTE_LIMIT: usize = 62_000;

/// The marker header the reference adds to every response.
pub const WENT_INTO_RESP_HEADERS: &str = header::WENT_INTO_RESP_HEADERS;

/// A `HeaderValueOption` setting `key` to `value` (as `raw_value`, like the reference).
pub fn set_header(key: impl Into<String>, value: impl Into<Vec<u8>>) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: String::new(),
            raw_value: value.into(),
        }),
        append: None,
        append_action: 0,
        keep_empty_value: false,
    }
}

/// Headers of an ext_proc headers message: lowercase names, `raw_value` preferred over
/// `value` (non-UTF-8 bytes replaced).
pub fn headers_from(map: Option<&HeaderMap>) -> Headers {
    let mut out = Headers::new();
    if let Some(map) = map {
        for h in &map.headers {
            let v = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            out.insert(h.key.as_str(), v);
        }
    }
    out
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": destination}}`.
pub fn destination_metadata(destination: &str) -> Struct {
    let mut inner = Struct::default();
    inner.fields.insert(
        header::DESTINATION_ENDPOINT.to_string(),
        string_value(destination),
    );
    let mut outer = Struct::default();
    outer.fields.insert(
        header::ENVOY_LB_NAMESPACE.to_string(),
        Value {
            kind: Some(value::Kind::StructValue(inner)),
        },
    );
    outer
}

/// The subset hint in `metadata_context.filter_metadata["envoy.lb.subset_hint"]
/// ["x-gateway-destination-endpoint-subset"]`: `None` when the namespace or key is absent
/// or the value is not a list (all endpoints), `Some(list)` otherwise (non-string entries are
/// skipped, as the reference does).
pub fn subset_hint(md: Option<&Metadata>) -> Option<Vec<String>> {
    let ns = md?.filter_metadata.get(header::SUBSET_HINT_NAMESPACE)?;
    let v = ns.fields.get(header::DESTINATION_ENDPOINT_SUBSET)?;
    let Some(value::Kind::ListValue(list)) = &v.kind else {
        return None;
    };
    Some(
        list.values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
    )
}

/// The endpoint the gateway reports as having served the request
/// (`envoy.lb` / `x-gateway-destination-endpoint-served`).
pub fn served_endpoint(md: Option<&Metadata>) -> Option<String> {
    let ns = md?.filter_metadata.get(header::ENVOY_LB_NAMESPACE)?;
    match &ns.fields.get(header::DESTINATION_ENDPOINT_SERVED)?.kind {
        Some(value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// The response to the request headers: clear the route cache, set the destination,
/// `Content-Length` (when there is a body) and every other header, plus the destination as
/// `envoy.lb` dynamic metadata.
pub fn request_headers_response(
    destination: &str,
    content_length: usize,
    set_headers: Vec<HeaderValueOption>,
) -> ProcessingResponse {
    let mut all = Vec::with_capacity(set_headers.len() + 2);
    all.push(set_header(header::DESTINATION_ENDPOINT, destination));
    if content_length > 0 {
        all.push(set_header("Content-Length", content_length.to_string()));
    }
    all.extend(set_headers);
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    clear_route_cache: true,
                    header_mutation: Some(HeaderMutation {
                        set_headers: all,
                        remove_headers: Vec::new(),
                    }),
                    ..Default::default()
                }),
            },
        )),
        dynamic_metadata: Some(destination_metadata(destination)),
        ..Default::default()
    }
}

/// The response to the response headers: `x-went-into-resp-headers: true` plus `set_headers`.
pub fn response_headers_response(set_headers: Vec<HeaderValueOption>) -> ProcessingResponse {
    let mut all = Vec::with_capacity(set_headers.len() + 1);
    all.push(set_header(WENT_INTO_RESP_HEADERS, "true"));
    all.extend(set_headers);
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: all,
                        remove_headers: Vec::new(),
                    }),
                    ..Default::default()
                }),
            },
        )),
        ..Default::default()
    }
}

fn streamed(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    }
}

/// Which direction a body travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The request body (to the model server).
    Request,
    /// The response body (to the client).
    Response,
}

/// `body` as streamed-body responses of at most [`BODY_BYTE_LIMIT`] bytes, the last with
/// `end_of_stream` when `end_of_stream`; an empty body gives one empty chunk. A body that fits
/// one response and owns its buffer alone (a chunk received from Envoy, or a rewritten one)
/// moves into it without a copy; larger bodies are copied piece by piece.
pub fn body_responses(
    direction: Direction,
    body: Bytes,
    end_of_stream: bool,
) -> impl Iterator<Item = ProcessingResponse> {
    let n = body.len().div_ceil(BODY_BYTE_LIMIT).max(1);
    // One piece: the buffer itself (moving it keeps it unshared, so no copy).
    let (mut whole, body) = if n == 1 {
        (Some(body), Bytes::new())
    } else {
        (None, body)
    };
    (0..n).map(move |i| {
        let piece = match whole.take() {
            Some(b) => Vec::from(b),
            None => {
                let start = i * BODY_BYTE_LIMIT;
                let end = (start + BODY_BYTE_LIMIT).min(body.len());
                body[start..end].to_vec()
            }
        };
        let chunk = streamed(piece, end_of_stream && i + 1 == n);
        let response = match direction {
            Direction::Request => processing_response::Response::RequestBody(chunk),
            Direction::Response => processing_response::Response::ResponseBody(chunk),
        };
        ProcessingResponse {
            response: Some(response),
            ..Default::default()
        }
    })
}

/// An empty trailers response (request or response side).
pub fn trailers_response(direction: Direction) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(match direction {
            Direction::Request => processing_response::Response::RequestTrailers(t),
            Direction::Response => processing_response::Response::ResponseTrailers(t),
        }),
        ..Default::default()
    }
}

/// The `ImmediateResponse` for an error: its HTTP status, body
/// `inference error: <Code> - <message>` and extra headers (e.g. the dropped reason).
pub fn immediate_response(e: &InferenceError) -> ProcessingResponse {
    let headers = (!e.headers.is_empty()).then(|| HeaderMutation {
        set_headers: e
            .headers
            .iter()
            .map(|(k, v)| set_header(k.as_str(), v.as_bytes()))
            .collect(),
        remove_headers: Vec::new(),
    });
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(e.http_status()),
                }),
                headers,
                body: e.body().into_bytes(),
                grpc_status: None,
                details: String::new(),
            },
        )),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    fn md(ns: &str, key: &str, v: value::Kind) -> Metadata {
        let mut inner = Struct::default();
        inner.fields.insert(key.into(), Value { kind: Some(v) });
        let mut m = Metadata::default();
        m.filter_metadata.insert(ns.into(), inner);
        m
    }

    #[test]
    fn chunking_at_62000() {
        let body = Bytes::from(vec![7u8; 130_000]);
        let out: Vec<_> = body_responses(Direction::Request, body.clone(), true).collect();
        let sizes: Vec<(usize, bool)> = out
            .iter()
            .map(|r| match &r.response {
                Some(processing_response::Response::RequestBody(b)) => {
                    match &b
                        .response
                        .as_ref()
                        .unwrap()
                        .body_mutation
                        .as_ref()
                        .unwrap()
                        .mutation
                    {
                        Some(body_mutation::Mutation::StreamedResponse(s)) => {
                            (s.body.len(), s.end_of_stream)
                        }
                        _ => panic!(),
                    }
                }
                _ => panic!(),
            })
            .collect();
        assert_eq!(sizes, vec![(62_000, false), (62_000, false), (6_000, true)]);
        assert_eq!(
            body_responses(Direction::Response, Bytes::new(), true).count(),
            1
        );
        assert_eq!(
            body_responses(Direction::Response, body.slice(..62_000), false).count(),
            1
        );
    }

    #[test]
    fn a_body_that_fits_one_response_moves_into_it() {
        let chunk = vec![3u8; 10_000];
        let at = chunk.as_ptr();
        let out: Vec<_> = body_responses(Direction::Response, Bytes::from(chunk), false).collect();
        let Some(processing_response::Response::ResponseBody(b)) = &out[0].response else {
            panic!("{out:?}");
        };
        let Some(body_mutation::Mutation::StreamedResponse(s)) = &b
            .response
            .as_ref()
            .unwrap()
            .body_mutation
            .as_ref()
            .unwrap()
            .mutation
        else {
            panic!("{b:?}");
        };
        assert_eq!((s.body.len(), s.end_of_stream), (10_000, false));
        assert_eq!(
            s.body.as_ptr(),
            at,
            "the received buffer itself, not a copy"
        );
    }

    #[test]
    fn subset_hint_shapes() {
        assert_eq!(subset_hint(None), None);
        let list = |v: Vec<Value>| value::Kind::ListValue(ListValue { values: v });
        let m = md(
            "envoy.lb.subset_hint",
            "x-gateway-destination-endpoint-subset",
            list(vec![
                string_value("10.0.0.1:8000"),
                Value {
                    kind: Some(value::Kind::NumberValue(1.0)),
                },
            ]),
        );
        assert_eq!(
            subset_hint(Some(&m)),
            Some(vec!["10.0.0.1:8000".to_string()])
        );
        let m = md(
            "envoy.lb.subset_hint",
            "x-gateway-destination-endpoint-subset",
            list(vec![]),
        );
        assert_eq!(subset_hint(Some(&m)), Some(vec![]));
        let m = md(
            "envoy.lb.subset_hint",
            "x-gateway-destination-endpoint-subset",
            value::Kind::StringValue("10.0.0.1".into()),
        );
        assert_eq!(subset_hint(Some(&m)), None);
        let m = md(
            "envoy.lb",
            "x-gateway-destination-endpoint-served",
            value::Kind::StringValue("10.0.0.2:8000".into()),
        );
        assert_eq!(served_endpoint(Some(&m)).as_deref(), Some("10.0.0.2:8000"));
    }

    #[test]
    fn immediate_response_shape() {
        let e = InferenceError::resource_exhausted("x")
            .with_header("x-llm-d-request-dropped-reason", "rejected-saturated");
        let r = immediate_response(&e);
        let Some(processing_response::Response::ImmediateResponse(ir)) = r.response else {
            panic!()
        };
        assert_eq!(ir.status.unwrap().code, 429);
        assert_eq!(ir.body, b"inference error: ResourceExhausted - x");
        let h = &ir.headers.unwrap().set_headers[0];
        let hv = h.header.as_ref().unwrap();
        assert_eq!(hv.key, "x-llm-d-request-dropped-reason");
        assert_eq!(hv.raw_value, b"rejected-saturated");
    }
}
