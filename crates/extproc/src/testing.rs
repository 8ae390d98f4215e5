//! Test support (feature `test-util`): an Envoy stand-in, i.e. a real tonic client on
//! loopback speaking ext_proc the way Envoy's `FULL_DUPLEX_STREAMED` filter does, plus
//! helpers to read the EPP's answers. Used by this crate's tests and benches and by the
//! EPP's integration tests. Helpers panic on unexpected protocol states: they are for tests.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::{ExtProcOptions, TlsConfig, serve_ext_proc};
use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse, body_mutation,
    processing_request, processing_response,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value};
use llmsched_core::config::LoadedConfig;
use llmsched_core::endpoint::EndpointSource;
use llmsched_core::objectives::Objectives;
use llmsched_director::{Director, EppMetrics};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A running EPP (ext_proc only).
pub struct Epp {
    pub addr: SocketAddr,
    pub director: Arc<Director>,
    pub registry: Arc<Registry>,
    pub shutdown: CancellationToken,
    pub tls_ca: Option<Vec<u8>>,
}

impl Drop for Epp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct EppBuilder {
    config: Arc<LoadedConfig>,
    endpoints: Arc<dyn EndpointSource>,
    objectives: Option<Objectives>,
    tls: bool,
    options: ExtProcOptions,
}

pub fn epp(config: Arc<LoadedConfig>, endpoints: Arc<dyn EndpointSource>) -> EppBuilder {
    EppBuilder {
        config,
        endpoints,
        objectives: None,
        tls: false,
        options: ExtProcOptions::default(),
    }
}

impl EppBuilder {
    pub fn objectives(mut self, yaml: &str) -> Self {
        self.objectives = Some(llmsched_core::objectives::parse_manifests(yaml, "test").unwrap());
        self
    }

    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub fn options(mut self, options: ExtProcOptions) -> Self {
        self.options = options;
        self
    }

    pub async fn start(self) -> Epp {
        let mut registry = Registry::default();
        let metrics = EppMetrics::register(&mut registry, "test", "test");
        let director = Arc::new(
            Director::builder(self.config, self.endpoints)
                .metrics(metrics)
                .objectives(Arc::new(ArcSwap::from_pointee(
                    self.objectives.unwrap_or_default(),
                )))
                .build(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let tls = self.tls.then(|| TlsConfig::self_signed().unwrap());
        let tls_ca = tls.as_ref().map(|t| t.certificate_pem().to_vec());
        tokio::spawn(serve_ext_proc(
            listener,
            director.clone(),
            tls,
            None,
            self.options,
            shutdown.clone(),
        ));
        Epp {
            addr,
            director,
            registry: Arc::new(registry),
            shutdown,
            tls_ca,
        }
    }
}

impl Epp {
    pub async fn client(&self) -> ExternalProcessorClient<Channel> {
        let ep = match &self.tls_ca {
            Some(ca) => Endpoint::from_shared(format!("https://localhost:{}", self.addr.port()))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )
                .unwrap(),
            None => Endpoint::from_shared(format!("http://{}", self.addr)).unwrap(),
        };
        ExternalProcessorClient::new(ep.connect().await.unwrap())
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

/// One ext_proc stream, driven like Envoy.
pub struct Conv {
    pub tx: Option<mpsc::Sender<ProcessingRequest>>,
    pub rx: tonic::Streaming<ProcessingResponse>,
}

const WAIT: Duration = Duration::from_secs(20);

impl Conv {
    pub async fn open(client: &mut ExternalProcessorClient<Channel>) -> Conv {
        let (tx, rx) = mpsc::channel(256);
        let resp = client.process(ReceiverStream::new(rx)).await.unwrap();
        Conv {
            tx: Some(tx),
            rx: resp.into_inner(),
        }
    }

    pub async fn send(&self, m: ProcessingRequest) {
        self.tx.as_ref().unwrap().send(m).await.unwrap();
    }

    /// The next response; panics when the stream ends or errors (or after a generous
    /// guard time, so a hang fails instead of blocking the suite).
    pub async fn next(&mut self) -> ProcessingResponse {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => panic!("stream error: {s}"),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }

    /// The end of the stream: `Ok(())` for a clean close, the status otherwise.
    pub async fn end(&mut self) -> Result<(), tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(m))) => panic!("expected the end of the stream, got {m:?}"),
            Ok(Err(s)) => Err(s),
            Err(_) => panic!("stream did not end within {WAIT:?}"),
        }
    }

    /// Sends the request body in `chunks` pieces (last with end_of_stream).
    pub async fn send_body(&self, body: &[u8], chunks: usize) {
        let size = body.len().div_ceil(chunks.max(1)).max(1);
        let pieces: Vec<&[u8]> = if body.is_empty() {
            vec![&[][..]]
        } else {
            body.chunks(size).collect()
        };
        let n = pieces.len();
        for (i, p) in pieces.into_iter().enumerate() {
            self.send(body_msg(p, i + 1 == n)).await;
        }
    }

    /// Reads the body responses (request side) until end_of_stream; returns the body.
    pub async fn read_request_body(&mut self) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let r = self.next().await;
            let (body, eos) = request_body_chunk(&r).unwrap_or_else(|| panic!("not a body: {r:?}"));
            sizes.push(body.len());
            out.extend_from_slice(body);
            if eos {
                return (out, sizes);
            }
        }
    }
}

pub fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    HeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                value: String::new(),
                raw_value: v.as_bytes().to_vec(),
            })
            .collect(),
    }
}

pub fn subset_metadata(hint: &[&str]) -> Metadata {
    let mut inner = Struct::default();
    inner.fields.insert(
        "x-gateway-destination-endpoint-subset".into(),
        Value {
            kind: Some(value::Kind::ListValue(ListValue {
                values: hint
                    .iter()
                    .map(|s| Value {
                        kind: Some(value::Kind::StringValue(s.to_string())),
                    })
                    .collect(),
            })),
        },
    );
    let mut m = Metadata::default();
    m.filter_metadata
        .insert("envoy.lb.subset_hint".into(), inner);
    m
}

pub fn served_metadata(hostport: &str) -> Metadata {
    let mut inner = Struct::default();
    inner.fields.insert(
        "x-gateway-destination-endpoint-served".into(),
        Value {
            kind: Some(value::Kind::StringValue(hostport.into())),
        },
    );
    let mut m = Metadata::default();
    m.filter_metadata.insert("envoy.lb".into(), inner);
    m
}

pub fn headers_msg(headers: &[(&str, &str)], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(header_map(headers)),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn with_metadata(mut m: ProcessingRequest, md: Metadata) -> ProcessingRequest {
    m.metadata_context = Some(md);
    m
}

pub fn body_msg(chunk: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestBody(HttpBody {
            body: chunk.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn request_trailers_msg() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestTrailers(
            HttpTrailers::default(),
        )),
        ..Default::default()
    }
}

pub fn response_headers_msg(headers: &[(&str, &str)], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseHeaders(HttpHeaders {
            headers: Some(header_map(headers)),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn response_body_msg(chunk: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseBody(HttpBody {
            body: chunk.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn response_trailers_msg() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseTrailers(
            HttpTrailers::default(),
        )),
        ..Default::default()
    }
}

/// A headers response (request or response side): `(clear_route_cache, set headers)`.
pub fn headers_of(r: &ProcessingResponse) -> Option<(bool, Vec<(String, String)>)> {
    let hr = match r.response.as_ref()? {
        processing_response::Response::RequestHeaders(h) => h,
        processing_response::Response::ResponseHeaders(h) => h,
        _ => return None,
    };
    let c = hr.response.as_ref()?;
    let set = c
        .header_mutation
        .as_ref()
        .map(|m| {
            m.set_headers
                .iter()
                .filter_map(|o| o.header.as_ref())
                .map(|h| {
                    let v = if h.raw_value.is_empty() {
                        h.value.clone()
                    } else {
                        String::from_utf8_lossy(&h.raw_value).into_owned()
                    };
                    (h.key.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default();
    Some((c.clear_route_cache, set))
}

pub fn is_request_headers(r: &ProcessingResponse) -> bool {
    matches!(
        r.response,
        Some(processing_response::Response::RequestHeaders(_))
    )
}

pub fn is_response_headers(r: &ProcessingResponse) -> bool {
    matches!(
        r.response,
        Some(processing_response::Response::ResponseHeaders(_))
    )
}

pub fn get<'a>(set: &'a [(String, String)], key: &str) -> Option<&'a str> {
    set.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// `envoy.lb / x-gateway-destination-endpoint` from the dynamic metadata.
pub fn metadata_destination(r: &ProcessingResponse) -> Option<String> {
    let md = r.dynamic_metadata.as_ref()?;
    let Some(value::Kind::StructValue(s)) = &md.fields.get("envoy.lb")?.kind else {
        return None;
    };
    match &s.fields.get("x-gateway-destination-endpoint")?.kind {
        Some(value::Kind::StringValue(v)) => Some(v.clone()),
        _ => None,
    }
}

fn streamed(
    c: &envoy_types::pb::envoy::service::ext_proc::v3::BodyResponse,
) -> Option<(&[u8], bool)> {
    match c
        .response
        .as_ref()?
        .body_mutation
        .as_ref()?
        .mutation
        .as_ref()?
    {
        body_mutation::Mutation::StreamedResponse(s) => Some((&s.body, s.end_of_stream)),
        _ => None,
    }
}

pub fn request_body_chunk(r: &ProcessingResponse) -> Option<(&[u8], bool)> {
    match r.response.as_ref()? {
        processing_response::Response::RequestBody(b) => streamed(b),
        _ => None,
    }
}

pub fn response_body_chunk(r: &ProcessingResponse) -> Option<(&[u8], bool)> {
    match r.response.as_ref()? {
        processing_response::Response::ResponseBody(b) => streamed(b),
        _ => None,
    }
}

/// `(status, body, headers)` of an immediate response.
pub fn immediate(r: &ProcessingResponse) -> Option<(i32, String, Vec<(String, String)>)> {
    match r.response.as_ref()? {
        processing_response::Response::ImmediateResponse(ir) => Some((
            ir.status.as_ref().map_or(0, |s| s.code),
            String::from_utf8_lossy(&ir.body).into_owned(),
            ir.headers
                .as_ref()
                .map(|m| {
                    m.set_headers
                        .iter()
                        .filter_map(|o| o.header.as_ref())
                        .map(|h| {
                            (
                                h.key.clone(),
                                String::from_utf8_lossy(&h.raw_value).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )),
        _ => None,
    }
}

/// Waits (yielding, no fixed sleep) until `cond` holds; panics after a generous guard.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("condition never held: {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Default request headers of a completion POST.
pub fn post(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut h = vec![
        (":method", "POST"),
        (":path", "/v1/completions"),
        (":authority", "gateway"),
        (":scheme", "http"),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(extra);
    h
}
