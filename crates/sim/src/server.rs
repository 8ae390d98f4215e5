//! One replica's HTTP server: vLLM's OpenAI API, `/metrics`, LoRA management, and the extra
//! endpoints peer routers call.
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /v1/completions`, `POST /v1/chat/completions` | generation, streaming (SSE) or not |
//! | `GET /v1/models` | the base model and loaded LoRA adapters |
//! | `GET /health`, `/ping`, `/health_generate` | 200 |
//! | `GET /metrics` | Prometheus text ([`crate::metrics`]) |
//! | `POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter` | vLLM's runtime LoRA API |
//! | `POST /tokenize` | `{"count","max_model_len","tokens"}` |
//! | `GET /get_model_info`, `/get_server_info` | SGLang router probes |
//! | `POST`/`GET /flush_cache`, `POST /reset_prefix_cache` | clear the prefix cache |
//! | `GET /version` | simulator version |
//!
//! # Failure injection
//!
//! * `--failure-rate R --failure-statuses 503,429`: each generation request fails with
//!   probability R, with a status drawn from the list (503 by default);
//! * header `x-sim-return-error: <status>` (alias `x-return-error`, llm-d-inference-sim's name):
//!   fail this request with that status;
//! * header `x-sim-extra-latency-ms: <ms>`: delay this request by that many simulated
//!   milliseconds before it reaches the scheduler (adds to its TTFT).
//!
//! Error bodies are vLLM's `{"error":{"message","type","param","code"}}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Limited};
use llmsched_tokenizer::{ChatTemplate, SimTokenizer, Tokenizer};
use parking_lot::{Mutex, RwLock};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::clock::SimClock;
use crate::config::ReplicaConfig;
use crate::engine::{Emit, EngineCmd, EngineShared, FinishReason, KvRequest, LoraRef, NewRequest};
use crate::kvcache::salt_key;
use crate::metrics::{RenderInfo, render};
use crate::pd::{KvIntent, KvTransferParams, parse_kv_params};
use crate::protocol::{
    Api, ApiError, GenRequest, Input, PromptDetails, StreamFormat, Usage, full_response,
    parse_request, push_word,
};

/// A loaded LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Name used as `model` in requests.
    pub name: Arc<str>,
    /// Path given when loading (informational).
    pub path: String,
    /// vLLM's integer id.
    pub id: i64,
}

/// Loaded adapters.
#[derive(Debug, Default)]
pub struct LoraRegistry {
    adapters: Vec<LoraAdapter>,
    next_id: i64,
}

impl LoraRegistry {
    fn get(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.iter().find(|a| &*a.name == name)
    }

    /// Loads `name`; errors if it exists or `max` adapters are loaded.
    pub fn load(&mut self, name: &str, path: &str, max: usize) -> Result<(), ApiError> {
        if self.get(name).is_some() {
            return Err(ApiError::bad_request(format!(
                "The lora adapter '{name}' has already been loaded."
            )));
        }
        if self.adapters.len() >= max {
            return Err(ApiError::bad_request(format!(
                "Cannot load LoRA adapter '{name}': {max} adapters are loaded (max_cpu_loras); unload one first."
            )));
        }
        self.next_id += 1;
        self.adapters.push(LoraAdapter {
            name: name.into(),
            path: path.to_string(),
            id: self.next_id,
        });
        Ok(())
    }

    /// Unloads `name`.
    pub fn unload(&mut self, name: &str) -> Result<(), ApiError> {
        let before = self.adapters.len();
        self.adapters.retain(|a| &*a.name != name);
        if self.adapters.len() == before {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The lora adapter '{name}' cannot be found."),
            ));
        }
        Ok(())
    }
}

/// The text side of a replica: prompt tokenizer, vocabulary of generated words, chat template.
#[derive(Clone)]
pub struct Tokenizers {
    /// Prompt tokenizer.
    pub prompt: Arc<dyn Tokenizer>,
    /// Vocabulary of generated words.
    pub words: SimTokenizer,
    /// How chat messages become prompt text.
    pub chat: Arc<ChatTemplate>,
}

/// State shared by a replica's HTTP handlers.
pub struct ReplicaShared {
    /// Configuration.
    pub cfg: Arc<ReplicaConfig>,
    /// The cluster's clock.
    pub clock: SimClock,
    /// Commands to the engine.
    pub engine_tx: mpsc::UnboundedSender<EngineCmd>,
    /// Engine-side counters and metrics.
    pub engine: Arc<EngineShared>,
    /// Prompt tokenizer.
    pub tokenizer: Arc<dyn Tokenizer>,
    /// How chat messages become prompt text (the simulator's format, or the model's template).
    pub chat_template: Arc<ChatTemplate>,
    /// Vocabulary of generated words.
    pub words: SimTokenizer,
    /// Loaded adapters.
    pub loras: RwLock<LoraRegistry>,
    /// Next request id.
    pub next_id: AtomicU64,
    /// Randomness for ids and failure injection.
    pub rng: Mutex<SmallRng>,
    /// Bound address.
    pub addr: SocketAddr,
    /// Unix time the replica started.
    pub started_unix: u64,
}

impl std::fmt::Debug for ReplicaShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaShared")
            .field("addr", &self.addr)
            .field("model", &self.cfg.model)
            .finish()
    }
}

impl ReplicaShared {
    /// Shared state for a replica at `addr`.
    pub fn new(
        cfg: Arc<ReplicaConfig>,
        clock: SimClock,
        engine_tx: mpsc::UnboundedSender<EngineCmd>,
        engine: Arc<EngineShared>,
        text: Tokenizers,
        addr: SocketAddr,
    ) -> Result<Self, ApiError> {
        let mut loras = LoraRegistry::default();
        for (name, path) in &cfg.lora.modules {
            loras.load(name, path, cfg.lora.max_cpu_loras)?;
        }
        let seed = cfg.seed
            ^ u64::from(addr.port())
            ^ xxhash_rust::xxh3::xxh3_64(addr.ip().to_string().as_bytes());
        Ok(Self {
            started_unix: clock.unix_now() as u64,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            cfg,
            clock,
            engine_tx,
            engine,
            tokenizer: text.prompt,
            chat_template: text.chat,
            words: text.words,
            loras: RwLock::new(loras),
            next_id: AtomicU64::new(1),
            addr,
        })
    }
}

/// Response bodies: a complete buffer or an SSE stream.
pub enum SimBody {
    /// A complete body.
    Full(Option<Bytes>),
    /// A token stream.
    Sse(Box<SseStream>),
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Sse(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            SimBody::Full(b) => b.is_none(),
            SimBody::Sse(s) => s.finished,
        }
    }
}

/// Turns engine output into SSE frames; every token that is ready is written in one buffer.
pub struct SseStream {
    rx: mpsc::UnboundedReceiver<Emit>,
    fmt: StreamFormat,
    words: SimTokenizer,
    completion: usize,
    finished: bool,
    buf: BytesMut,
}

impl SseStream {
    fn on_token(&mut self, tok: u32, finish: Option<FinishReason>) {
        self.completion += 1;
        if self.completion == 1 {
            self.fmt.role_chunk(&mut self.buf);
        }
        self.fmt
            .token_chunk(&mut self.buf, &self.words, tok, finish, self.completion);
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.finished {
            return Poll::Ready(None);
        }
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Emit::Token(t))) => self.on_token(t, None),
                Poll::Ready(Some(Emit::Last(t, f))) => {
                    self.on_token(t, Some(f.reason));
                    self.fmt
                        .end(&mut self.buf, f.completion_tokens, f.cached_tokens);
                    self.finished = true;
                    break;
                }
                Poll::Ready(Some(Emit::Done(f))) => {
                    if f.reason == FinishReason::Error {
                        self.fmt.error_end(&mut self.buf, &kv_load_error());
                    } else {
                        self.fmt
                            .end(&mut self.buf, f.completion_tokens, f.cached_tokens);
                    }
                    self.finished = true;
                    break;
                }
                Poll::Ready(None) => {
                    self.finished = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if !self.buf.is_empty() {
            Poll::Ready(Some(self.buf.split().freeze()))
        } else if self.finished {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// What a request that ended with finish reason `error` answers (its remote KV could not be
/// loaded and the failure policy is `fail`).
fn kv_load_error() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal server error: the request's KV cache could not be loaded from the prefill replica (kv_load_failure_policy=fail)",
    )
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<SimBody> {
    let mut r = Response::new(SimBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<SimBody> {
    full(
        status,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn error(e: &ApiError) -> Response<SimBody> {
    full(e.status, "application/json", e.body())
}

fn detail(status: StatusCode, msg: &str) -> Response<SimBody> {
    #[derive(Serialize)]
    struct Detail<'a> {
        detail: &'a str,
    }
    json(status, &Detail { detail: msg })
}

async fn read_body(req: Request<hyper::body::Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {limit} bytes"),
                ))
            } else {
                Err(ApiError::bad_request(format!(
                    "cannot read request body: {e}"
                )))
            }
        }
    }
}

/// Routes one request.
pub async fn handle(
    shared: Arc<ReplicaShared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<SimBody>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = match (method.clone(), path.as_str()) {
        (Method::POST, "/v1/completions") => generate(shared, req, Api::Completions).await,
        (Method::POST, "/v1/chat/completions") => generate(shared, req, Api::Chat).await,
        (Method::GET, "/health" | "/ping" | "/health_generate") | (Method::POST, "/ping") => {
            full(StatusCode::OK, "application/json", Bytes::new())
        }
        (Method::GET, "/v1/models") => models(&shared),
        (Method::GET, "/metrics") => metrics(&shared),
        (Method::POST, "/v1/load_lora_adapter") => load_lora(shared, req).await,
        (Method::POST, "/v1/unload_lora_adapter") => unload_lora(shared, req).await,
        (Method::POST, "/tokenize") => tokenize(shared, req).await,
        (Method::GET, "/get_model_info") => model_info(&shared),
        (Method::GET, "/get_server_info") => server_info(&shared),
        (Method::GET | Method::POST, "/flush_cache") | (Method::POST, "/reset_prefix_cache") => {
            if shared.engine_tx.send(EngineCmd::ResetPrefixCache).is_err() {
                error(&ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "engine stopped",
                ))
            } else {
                full(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    "Cache flushed.\n",
                )
            }
        }
        (Method::GET, "/version") => json(
            StatusCode::OK,
            &serde_json::json!({"version": concat!(env!("CARGO_PKG_VERSION"), "-llmsched-sim")}),
        ),
        (
            _,
            "/v1/completions"
            | "/v1/chat/completions"
            | "/health"
            | "/v1/models"
            | "/metrics"
            | "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter"
            | "/tokenize",
        ) => detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
        _ => detail(StatusCode::NOT_FOUND, "Not Found"),
    };
    tracing::trace!(%method, %path, status = %resp.status(), "request");
    Ok(resp)
}

fn header_str<'a>(req: &'a Request<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Turns the request's input into token ids: chat messages are rendered with the replica's
/// chat template first (`llmsched_tokenizer::chat`, shared with the precise prefix scorer, so
/// both sides produce the same tokens).
fn tokenize_input(
    shared: &ReplicaShared,
    input: Input,
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let text = match input {
        Input::Tokens(t) => return Ok(t),
        Input::Text(t) => t,
        Input::Chat(m) => shared
            .chat_template
            .render(
                m.iter().map(|(r, c)| (r.as_str(), c.as_str())),
                add_generation_prompt,
            )
            .map_err(|e| ApiError::bad_request(e.to_string()).with_param("messages"))?,
    };
    shared
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where a request without `ignore_eos` stops: a geometric draw with the configured mean.
fn eos_position(seed: u64, mean: u32, min_tokens: usize) -> Option<usize> {
    if mean == 0 {
        return None;
    }
    let u = (splitmix(seed ^ 0xE05) >> 11) as f64 / (1u64 << 53) as f64;
    let k = (-(1.0 - u).ln() * f64::from(mean)).ceil().max(1.0) as usize;
    Some(k.max(min_tokens.max(1)))
}

async fn generate(
    shared: Arc<ReplicaShared>,
    req: Request<hyper::body::Incoming>,
    api: Api,
) -> Response<SimBody> {
    if let Some(v) = header_str(&req, "x-sim-return-error").or(header_str(&req, "x-return-error")) {
        let status = v
            .trim()
            .parse::<u16>()
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| s.is_client_error() || s.is_server_error());
        return match status {
            Some(s) => error(&ApiError::new(
                s,
                format!("Injected failure (x-sim-return-error: {})", s.as_u16()),
            )),
            None => error(&ApiError::bad_request(format!(
                "x-sim-return-error must be a 4xx or 5xx status, got {v:?}"
            ))),
        };
    }
    let extra_ms = match header_str(&req, "x-sim-extra-latency-ms") {
        None => 0.0,
        Some(v) => match v.trim().parse::<f64>() {
            Ok(ms) if ms.is_finite() && ms >= 0.0 => ms,
            _ => {
                return error(&ApiError::bad_request(format!(
                    "x-sim-extra-latency-ms must be a non-negative number, got {v:?}"
                )));
            }
        },
    };
    let request_id = header_str(&req, "x-request-id").map(str::to_string);
    let arrival = shared.clock.now();
    let created = shared.clock.unix_now() as u64;
    let body = match read_body(req, shared.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let parsed: GenRequest = match parse_request(api, &body) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    drop(body);

    let cfg = &shared.cfg;
    // `kv_transfer_params` must be an object or null (vLLM's request model); it is acted on
    // only with the NIXL connector on, ignored otherwise as by vLLM without a connector.
    let kv_intent = match parse_kv_params(parsed.kv_transfer_params.as_ref()) {
        Ok(i) if cfg.pd.connector => i,
        Ok(_) => KvIntent::None,
        Err(m) => return error(&ApiError::bad_request(m).with_param("kv_transfer_params")),
    };
    let (lora, model_name) = match parsed.model.as_deref() {
        None => (None, cfg.model.clone()),
        Some(m) if m == cfg.model => (None, cfg.model.clone()),
        Some(m) => match shared.loras.read().get(m) {
            Some(a) if cfg.lora.enabled => (
                Some(LoraRef {
                    id: a.id,
                    name: a.name.clone(),
                }),
                m.to_string(),
            ),
            _ => {
                return error(
                    &ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("The model `{m}` does not exist."),
                    )
                    .with_param("model"),
                );
            }
        },
    };

    let prompt = match tokenize_input(&shared, parsed.input, parsed.add_generation_prompt) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    if prompt.is_empty() {
        return error(&ApiError::bad_request("The prompt has no tokens.").with_param("prompt"));
    }
    let max_len = cfg.max_model_len;
    if prompt.len() >= max_len {
        return error(
            &ApiError::bad_request(format!(
                "This model's maximum context length is {max_len} tokens. However, your request has {} input tokens. Please reduce the length of the input messages.",
                prompt.len()
            ))
            .with_param("input_tokens"),
        );
    }
    let max_tokens = match parsed.max_tokens {
        Some(m) if m > max_len - prompt.len() => {
            return error(
                &ApiError::bad_request(format!(
                    "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum context length is {max_len} tokens and your request has {} input tokens ({m} > {max_len} - {}).",
                    prompt.len(),
                    prompt.len()
                ))
                .with_param("max_tokens"),
            );
        }
        Some(m) => m,
        None => match api {
            Api::Completions => 16.min(max_len - prompt.len()),
            Api::Chat => max_len - prompt.len(),
        },
    };

    if cfg.failure.rate > 0.0 {
        let mut rng = shared.rng.lock();
        if rng.random::<f64>() < cfg.failure.rate {
            let status = if cfg.failure.statuses.is_empty() {
                503
            } else {
                cfg.failure.statuses[rng.random_range(0..cfg.failure.statuses.len())]
            };
            drop(rng);
            let s = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error(&ApiError::new(
                s,
                format!("Injected failure (--failure-rate), status {status}"),
            ));
        }
    }
    if cfg.max_waiting > 0 && shared.engine.queued.load(Ordering::Relaxed) >= cfg.max_waiting {
        return error(&ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "The server is overloaded: {} requests are waiting (max {}). Retry later.",
                shared.engine.queued.load(Ordering::Relaxed),
                cfg.max_waiting
            ),
        ));
    }

    let seed = parsed.seed.unwrap_or_else(|| {
        let mut bytes = Vec::with_capacity(prompt.len() * 4);
        for t in &prompt {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_64(&bytes)
    });
    let eos_at = if parsed.ignore_eos {
        None
    } else {
        eos_position(seed, cfg.eos_mean_tokens, parsed.min_tokens).filter(|&k| k < max_tokens)
    };
    let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match (&request_id, api) {
        (Some(r), Api::Completions) => format!("cmpl-{r}"),
        (Some(r), Api::Chat) => format!("chatcmpl-{r}"),
        (None, _) => {
            let r: u128 = shared.rng.lock().random();
            match api {
                Api::Completions => format!("cmpl-{r:032x}"),
                Api::Chat => format!("chatcmpl-{r:032x}"),
            }
        }
    };
    let prompt_tokens = prompt.len();

    let delay = cfg.frontend.latency(prompt_tokens) + extra_ms / 1000.0;
    if delay > 0.0 {
        tokio::time::sleep(shared.clock.wall_duration(delay)).await;
    }
    let (kv, kv_rx) = match kv_intent {
        KvIntent::None => (KvRequest::None, None),
        KvIntent::RemoteDecode => {
            let (t, r) = oneshot::channel();
            (KvRequest::RemoteDecode(t), Some(r))
        }
        KvIntent::RemotePrefill(remote) => (KvRequest::RemotePrefill(remote), None),
        KvIntent::Invalid(why) => {
            tracing::warn!(%why, "Got invalid KVTransferParams; this request will not utilize KVTransfer");
            (KvRequest::None, None)
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    shared.engine.queued.fetch_add(1, Ordering::Relaxed);
    let cmd = EngineCmd::Add(Box::new(NewRequest {
        id: n,
        prompt,
        max_tokens,
        eos_at,
        lora,
        salt: salt_key(parsed.cache_salt.as_deref()),
        arrival,
        seed,
        tx,
        kv,
    }));
    if shared.engine_tx.send(cmd).is_err() {
        shared.engine.queued.fetch_sub(1, Ordering::Relaxed);
        return error(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is shutting down",
        ));
    }

    let fmt = StreamFormat::new(
        api,
        &id,
        created,
        &model_name,
        prompt_tokens,
        parsed.include_usage,
        parsed.continuous_usage,
        cfg.prompt_tokens_details,
    );
    if parsed.stream {
        let mut r = Response::new(SimBody::Sse(Box::new(SseStream {
            rx,
            fmt,
            words: shared.words,
            completion: 0,
            finished: false,
            buf: BytesMut::with_capacity(512),
        })));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        return r;
    }
    collect_full(
        shared,
        rx,
        kv_rx,
        api,
        &id,
        created,
        &model_name,
        prompt_tokens,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn collect_full(
    shared: Arc<ReplicaShared>,
    mut rx: mpsc::UnboundedReceiver<Emit>,
    kv_rx: Option<oneshot::Receiver<Option<KvTransferParams>>>,
    api: Api,
    id: &str,
    created: u64,
    model: &str,
    prompt_tokens: usize,
) -> Response<SimBody> {
    let mut text = BytesMut::new();
    let mut scratch = String::new();
    let mut count = 0usize;
    let finish = loop {
        match rx.recv().await {
            Some(Emit::Token(t)) => {
                count += 1;
                push_word(
                    &mut text,
                    &shared.words,
                    t,
                    api == Api::Chat && count == 1,
                    &mut scratch,
                );
            }
            Some(Emit::Last(t, f)) => {
                count += 1;
                push_word(
                    &mut text,
                    &shared.words,
                    t,
                    api == Api::Chat && count == 1,
                    &mut scratch,
                );
                break f;
            }
            Some(Emit::Done(f)) => break f,
            None => {
                return error(&ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the engine stopped before the request finished",
                ));
            }
        }
    };
    if finish.reason == FinishReason::Error {
        return error(&kv_load_error());
    }
    // Sent by the engine before the last token, so it is here now.
    let kv = kv_rx.and_then(|mut r| r.try_recv().ok()).flatten();
    let text = String::from_utf8_lossy(&text);
    let usage = Usage {
        prompt_tokens,
        total_tokens: prompt_tokens + finish.completion_tokens,
        completion_tokens: finish.completion_tokens,
        prompt_tokens_details: shared.cfg.prompt_tokens_details.then_some(PromptDetails {
            cached_tokens: finish.cached_tokens,
        }),
    };
    full(
        StatusCode::OK,
        "application/json",
        full_response(
            api,
            id,
            created,
            model,
            &text,
            finish.reason,
            usage,
            kv.as_ref(),
        ),
    )
}

#[derive(Serialize)]
struct Permission {
    id: String,
    object: &'static str,
    created: u64,
    allow_create_engine: bool,
    allow_sampling: bool,
    allow_logprobs: bool,
    allow_search_indices: bool,
    allow_view: bool,
    allow_fine_tuning: bool,
    organization: &'static str,
    group: Option<()>,
    is_blocking: bool,
}

#[derive(Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: String,
    parent: Option<String>,
    max_model_len: Option<usize>,
    permission: Vec<Permission>,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelCard>,
}

fn models(shared: &ReplicaShared) -> Response<SimBody> {
    let created = shared.started_unix;
    let perm = |i: usize| Permission {
        id: format!(
            "modelperm-{:032x}",
            xxhash_rust::xxh3::xxh3_128(format!("{}{i}", shared.addr).as_bytes())
        ),
        object: "model_permission",
        created,
        allow_create_engine: false,
        allow_sampling: true,
        allow_logprobs: true,
        allow_search_indices: false,
        allow_view: true,
        allow_fine_tuning: false,
        organization: "*",
        group: None,
        is_blocking: false,
    };
    let mut data = vec![ModelCard {
        id: shared.cfg.model.clone(),
        object: "model",
        created,
        owned_by: "vllm",
        root: shared.cfg.model.clone(),
        parent: None,
        max_model_len: Some(shared.cfg.max_model_len),
        permission: vec![perm(0)],
    }];
    if shared.cfg.lora.enabled {
        for (i, a) in shared.loras.read().adapters.iter().enumerate() {
            data.push(ModelCard {
                id: a.name.to_string(),
                object: "model",
                created,
                owned_by: "vllm",
                root: a.path.clone(),
                parent: Some(shared.cfg.model.clone()),
                max_model_len: None,
                permission: vec![perm(i + 1)],
            });
        }
    }
    json(
        StatusCode::OK,
        &ModelList {
            object: "list",
            data,
        },
    )
}

fn metrics(shared: &ReplicaShared) -> Response<SimBody> {
    let m = shared.engine.metrics.lock().clone();
    let text = render(
        &m,
        &RenderInfo {
            model: &shared.cfg.model,
            num_gpu_blocks: shared.cfg.num_gpu_blocks,
            block_size: shared.cfg.block_size,
            max_lora: shared.cfg.lora.enabled.then_some(shared.cfg.lora.max_loras),
            role: shared.cfg.pd.role.as_str(),
            kv_connector: shared.cfg.pd.connector,
        },
    );
    full(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        text,
    )
}

async fn json_body(
    shared: &ReplicaShared,
    req: Request<hyper::body::Incoming>,
) -> Result<serde_json::Value, ApiError> {
    let body = read_body(req, shared.cfg.max_body_bytes).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("JSON decode error: {e}")))
}

fn str_field<'a>(v: &'a serde_json::Value, name: &str) -> Result<&'a str, ApiError> {
    v.get(name)
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("Field required: {name}")).with_param(name))
}

async fn load_lora(
    shared: Arc<ReplicaShared>,
    req: Request<hyper::body::Incoming>,
) -> Response<SimBody> {
    if !shared.cfg.lora.enabled {
        return error(&ApiError::bad_request(
            "LoRA is not enabled on this server (start it with --enable-lora)",
        ));
    }
    let v = match json_body(&shared, req).await {
        Ok(v) => v,
        Err(e) => return error(&e),
    };
    let (name, path) = match (str_field(&v, "lora_name"), str_field(&v, "lora_path")) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(e), _) | (_, Err(e)) => return error(&e),
    };
    if name == shared.cfg.model {
        return error(&ApiError::bad_request(format!(
            "The lora adapter name '{name}' is the base model's name."
        )));
    }
    match shared
        .loras
        .write()
        .load(name, path, shared.cfg.lora.max_cpu_loras)
    {
        Ok(()) => full(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            format!("Success: LoRA adapter '{name}' added successfully."),
        ),
        Err(e) => error(&e),
    }
}

async fn unload_lora(
    shared: Arc<ReplicaShared>,
    req: Request<hyper::body::Incoming>,
) -> Response<SimBody> {
    if !shared.cfg.lora.enabled {
        return error(&ApiError::bad_request(
            "LoRA is not enabled on this server (start it with --enable-lora)",
        ));
    }
    let v = match json_body(&shared, req).await {
        Ok(v) => v,
        Err(e) => return error(&e),
    };
    let name = match str_field(&v, "lora_name") {
        Ok(n) => n,
        Err(e) => return error(&e),
    };
    match shared.loras.write().unload(name) {
        Ok(()) => full(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            format!("Success: LoRA adapter '{name}' removed successfully."),
        ),
        Err(e) => error(&e),
    }
}

async fn tokenize(
    shared: Arc<ReplicaShared>,
    req: Request<hyper::body::Incoming>,
) -> Response<SimBody> {
    let v = match json_body(&shared, req).await {
        Ok(v) => v,
        Err(e) => return error(&e),
    };
    let api = if v.get("messages").is_some() {
        Api::Chat
    } else {
        Api::Completions
    };
    let (input, add_generation_prompt) = match parse_request(api, v.to_string().as_bytes()) {
        Ok(p) => (p.input, p.add_generation_prompt),
        Err(e) => return error(&e),
    };
    match tokenize_input(&shared, input, add_generation_prompt) {
        Ok(tokens) => json(
            StatusCode::OK,
            &serde_json::json!({
                "count": tokens.len(),
                "max_model_len": shared.cfg.max_model_len,
                "tokens": tokens,
                "token_strs": null,
            }),
        ),
        Err(e) => error(&e),
    }
}

fn model_info(shared: &ReplicaShared) -> Response<SimBody> {
    json(
        StatusCode::OK,
        &serde_json::json!({
            "model_path": shared.cfg.model,
            "tokenizer_path": shared.cfg.model,
            "is_generation": true,
        }),
    )
}

fn server_info(shared: &ReplicaShared) -> Response<SimBody> {
    let c = &shared.cfg;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "model_path": c.model,
            "served_model_name": c.model,
            "engine": "llmsched-sim",
            "profile": c.profile,
            "max_total_num_tokens": c.num_gpu_blocks * c.block_size,
            "page_size": c.block_size,
            "max_running_requests": c.max_num_seqs,
            "chunked_prefill_size": c.max_num_batched_tokens,
            "context_length": c.max_model_len,
            "time_scale": c.time_scale,
            "role": c.pd.role.as_str(),
            "kv_connector": if c.pd.connector { "NixlConnector" } else { "none" },
            "version": concat!(env!("CARGO_PKG_VERSION"), "-llmsched-sim"),
        }),
    )
}

/// Asks the engine for a cache snapshot.
pub async fn snapshot(shared: &ReplicaShared) -> Option<crate::engine::CacheSnapshot> {
    let (tx, rx) = oneshot::channel();
    shared.engine_tx.send(EngineCmd::Snapshot(tx)).ok()?;
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_positions_are_deterministic_with_the_requested_mean() {
        assert_eq!(eos_position(1, 0, 0), None);
        let n = 20_000;
        let mean = (0..n)
            .map(|s| eos_position(s, 100, 0).unwrap_or(0) as f64)
            .sum::<f64>()
            / n as f64;
        assert!((mean - 100.0).abs() < 5.0, "{mean}");
        assert_eq!(eos_position(42, 100, 0), eos_position(42, 100, 0));
        assert!(eos_position(7, 1, 50).unwrap() >= 50);
    }

    #[test]
    fn lora_registry_limits_and_errors() {
        let mut r = LoraRegistry::default();
        r.load("a", "/p/a", 2).unwrap();
        assert!(
            r.load("a", "/p/a", 2)
                .unwrap_err()
                .message
                .contains("already")
        );
        r.load("b", "/p/b", 2).unwrap();
        assert!(
            r.load("c", "/p/c", 2)
                .unwrap_err()
                .message
                .contains("max_cpu_loras")
        );
        assert_eq!(r.get("b").unwrap().id, 2);
        r.unload("a").unwrap();
        assert_eq!(r.unload("a").unwrap_err().status, StatusCode::NOT_FOUND);
        r.load("c", "/p/c", 2).unwrap();
        assert_eq!(r.get("c").unwrap().id, 3);
    }
}
