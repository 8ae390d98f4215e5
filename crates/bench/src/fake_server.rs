//! A minimal OpenAI-compatible streaming server for tests and the overhead self-test.
//!
//! It is deliberately small — not a simulator (that is `llmsched sim`): it answers
//! `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`, emits exactly
//! `max_tokens` one-word tokens after a fixed TTFT with a fixed gap between chunks, reports
//! `usage` (with `prompt_tokens_details.cached_tokens` from a toy prefix cache) and can inject
//! faults on every n-th request: HTTP 503, a body cut off mid-stream, a non-JSON `data:` line,
//! or a stream without `data: [DONE]`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, channel::Channel};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, std::io::Error>;

/// Behaviour of the fake server.
#[derive(Debug, Clone)]
pub struct FakeServerConfig {
    /// Model id listed by `/v1/models`.
    pub model: String,
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between chunks.
    pub itl: Duration,
    /// Tokens (words) per chunk.
    pub tokens_per_chunk: u32,
    /// Answer every n-th request (1-based) with HTTP 503.
    pub fail_every: Option<u64>,
    /// Cut every n-th stream off after half its tokens (connection error mid-body).
    pub truncate_every: Option<u64>,
    /// Insert a non-JSON `data:` line into every n-th stream.
    pub garbage_every: Option<u64>,
    /// End every n-th stream cleanly but without `data: [DONE]`.
    pub omit_done_every: Option<u64>,
    /// Words of the prompt used as the toy prefix-cache key (0 disables `cached_tokens`).
    pub cache_key_words: usize,
    /// Cached tokens are rounded down to this block size.
    pub cache_block: u64,
}

impl Default for FakeServerConfig {
    fn default() -> Self {
        Self {
            model: "fake-model".to_owned(),
            ttft: Duration::from_millis(5),
            itl: Duration::from_millis(1),
            tokens_per_chunk: 1,
            fail_every: None,
            truncate_every: None,
            garbage_every: None,
            omit_done_every: None,
            cache_key_words: 8,
            cache_block: 16,
        }
    }
}

/// Counters of a running fake server.
#[derive(Debug, Default)]
pub struct FakeStats {
    /// Completion requests received.
    pub requests: AtomicU64,
    /// Streams currently open.
    pub open_streams: AtomicU64,
    /// Most streams open at once.
    pub max_open_streams: AtomicU64,
}

struct State {
    cfg: FakeServerConfig,
    stats: Arc<FakeStats>,
    /// Cache key → last prompt seen with that key.
    cache: Mutex<HashMap<String, String>>,
}

/// A running fake server; dropped or [`FakeServer::shutdown`] stops accepting.
pub struct FakeServer {
    addr: SocketAddr,
    stats: Arc<FakeStats>,
    stop: CancellationToken,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeServer {
    /// Binds `127.0.0.1` on a free port and serves on the current tokio runtime.
    pub async fn start(cfg: FakeServerConfig) -> std::io::Result<Self> {
        Self::start_on(0, cfg).await
    }

    /// Binds `127.0.0.1:port` (0 picks a free port) and serves on the current tokio runtime.
    pub async fn start_on(port: u16, cfg: FakeServerConfig) -> std::io::Result<Self> {
        // A deep accept queue: thousands of streams may connect within a second, and an
        // overflowing backlog turns into 1-s SYN retransmits on the client.
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
        let listener = socket.listen(8192)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(FakeStats::default());
        let state = Arc::new(State {
            cfg,
            stats: stats.clone(),
            cache: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        let stop_accept = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = stop_accept.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "fake server accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, stats, stop })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Live counters.
    pub fn stats(&self) -> &FakeStats {
        &self.stats
    }

    /// Stops accepting connections (open streams finish).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if method == Method::GET && path == "/v1/models" {
        return Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": [{"id": state.cfg.model, "object": "model"}]}),
        ));
    }
    let chat = match (method, path.as_str()) {
        (Method::POST, "/v1/completions") => false,
        (Method::POST, "/v1/chat/completions") => true,
        _ => {
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": {"message": format!("no route {path}")}}),
            ));
        }
    };
    let n = state.stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let every = |k: Option<u64>| k.is_some_and(|k| k > 0 && n.is_multiple_of(k));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": {"message": e.to_string()}}),
            ));
        }
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": {"message": "Invalid JSON: expecting value"}}),
        ));
    };
    if every(state.cfg.fail_every) {
        return Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": {"message": "fake server: injected overload", "code": 503}}),
        ));
    }
    let prompt: String = if chat {
        v.get("messages")
            .and_then(|m| m.as_array())
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| m.get("content").and_then(|c| c.as_str()))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    } else {
        v.get("prompt")
            .and_then(|p| p.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let prompt_tokens = prompt.split_ascii_whitespace().count() as u64;
    let cached = cached_tokens(&state, &prompt);
    let max_tokens = v.get("max_tokens").and_then(|m| m.as_u64()).unwrap_or(16);
    let stream = v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let usage = serde_json::json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": max_tokens,
        "total_tokens": prompt_tokens + max_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    });
    let model = state.cfg.model.clone();

    if !stream {
        tokio::time::sleep(state.cfg.ttft + state.cfg.itl * u32::try_from(max_tokens).unwrap_or(0))
            .await;
        let text = " tok".repeat(usize::try_from(max_tokens).unwrap_or(0));
        let choice = if chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        return Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"id": "fake", "model": model, "choices": [choice], "usage": usage}),
        ));
    }

    let (tx, body) = Channel::<Bytes, std::io::Error>::new(8);
    let job = StreamJob {
        cfg: state.cfg.clone(),
        chat,
        model,
        max_tokens,
        include_usage,
        usage,
        truncate: every(state.cfg.truncate_every),
        garbage: every(state.cfg.garbage_every),
        omit_done: every(state.cfg.omit_done_every),
    };
    let stats = state.stats.clone();
    tokio::spawn(async move {
        let open = stats.open_streams.fetch_add(1, Ordering::Relaxed) + 1;
        stats.max_open_streams.fetch_max(open, Ordering::Relaxed);
        // An error only means the client went away.
        let _ = job.run(tx).await;
        stats.open_streams.fetch_sub(1, Ordering::Relaxed);
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    Ok(r)
}

struct StreamJob {
    cfg: FakeServerConfig,
    chat: bool,
    model: String,
    max_tokens: u64,
    include_usage: bool,
    usage: serde_json::Value,
    truncate: bool,
    garbage: bool,
    omit_done: bool,
}

type Tx = http_body_util::channel::Sender<Bytes, std::io::Error>;

impl StreamJob {
    fn event(&self, text: &str, finish: Option<&str>) -> Bytes {
        let choice = if self.chat {
            serde_json::json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": finish})
        };
        self.wrap(&serde_json::json!([choice]), None)
    }

    fn wrap(&self, choices: &serde_json::Value, usage: Option<&serde_json::Value>) -> Bytes {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = serde_json::json!({"id": "fake", "object": object, "model": self.model, "choices": choices});
        if let Some(u) = usage {
            chunk["usage"] = u.clone();
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }

    async fn run(self, mut tx: Tx) -> Result<(), ()> {
        if self.chat {
            let role = serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
            tx.send_data(self.wrap(&role, None)).await.map_err(|_| ())?;
        }
        tokio::time::sleep(self.cfg.ttft).await;
        let per = u64::from(self.cfg.tokens_per_chunk.max(1));
        let mut sent = 0u64;
        while sent < self.max_tokens {
            if sent > 0 {
                tokio::time::sleep(self.cfg.itl).await;
            }
            if self.truncate && sent >= self.max_tokens / 2 {
                tx.abort(std::io::Error::other("fake server: injected truncation"));
                return Err(());
            }
            let k = per.min(self.max_tokens - sent);
            let text = " tok".repeat(usize::try_from(k).unwrap_or(0));
            sent += k;
            let finish = (sent == self.max_tokens).then_some("length");
            tx.send_data(self.event(&text, finish))
                .await
                .map_err(|_| ())?;
            if self.garbage && sent == k {
                tx.send_data(Bytes::from_static(b"data: this is not json\n\n"))
                    .await
                    .map_err(|_| ())?;
            }
        }
        if self.include_usage {
            let u = self.wrap(&serde_json::json!([]), Some(&self.usage));
            tx.send_data(u).await.map_err(|_| ())?;
        }
        if !self.omit_done {
            tx.send_data(Bytes::from_static(b"data: [DONE]\n\n"))
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }
}

/// Toy prefix cache: the leading words shared with the last prompt that had the same first
/// `cache_key_words` words, rounded down to `cache_block`.
fn cached_tokens(state: &State, prompt: &str) -> u64 {
    let k = state.cfg.cache_key_words;
    if k == 0 {
        return 0;
    }
    let key: String = prompt
        .split_ascii_whitespace()
        .take(k)
        .collect::<Vec<_>>()
        .join(" ");
    let mut cache = state.cache.lock().unwrap_or_else(PoisonError::into_inner);
    let shared = cache.get(&key).map_or(0, |prev| {
        prev.split_ascii_whitespace()
            .zip(prompt.split_ascii_whitespace())
            .take_while(|(a, b)| a == b)
            .count() as u64
    });
    cache.insert(key, prompt.to_owned());
    let block = state.cfg.cache_block.max(1);
    shared / block * block
}
