//! The request model: what the director and every plugin know about one inference request.
//!
//! A request is built in two steps. The transport (ext_proc or the built-in proxy) collects
//! [`Headers`]; a parser plugin turns the body into a [`RequestBody`]; the director then fills
//! in the [`InferenceRequest`] (target model after rewrites, objective priority, fairness id,
//! latency objectives) before scheduling.

use std::ops::Range;

use bytes::Bytes;

/// Header names of the EPP protocol (see `epp-protocol.md`).
pub mod header {
    /// Request id; generated when missing.
    pub const REQUEST_ID: &str = "x-request-id";
    /// Where Envoy must send the request: `ip:port[,ip:port...]`.
    pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";
    /// Subset-hint key inside `envoy.lb.subset_hint` filter metadata.
    pub const DESTINATION_ENDPOINT_SUBSET: &str = "x-gateway-destination-endpoint-subset";
    /// The endpoint that really served the request, reported by the gateway.
    pub const DESTINATION_ENDPOINT_SERVED: &str = "x-gateway-destination-endpoint-served";
    /// Dynamic-metadata namespace the destination is also written to.
    pub const ENVOY_LB_NAMESPACE: &str = "envoy.lb";
    /// Filter-metadata namespace of the subset hint.
    pub const SUBSET_HINT_NAMESPACE: &str = "envoy.lb.subset_hint";
    /// Marker header the EPP adds to responses.
    pub const WENT_INTO_RESP_HEADERS: &str = "x-went-into-resp-headers";
    /// Session affinity token (base64 of the endpoint's name).
    pub const SESSION_TOKEN: &str = "x-session-token";
    /// Prefill endpoint for P/D disaggregation.
    pub const PREFILLER_HOST_PORT: &str = "x-prefiller-host-port";

    /// Name of an InferenceObjective (new name, old name).
    pub const OBJECTIVE: (&str, &str) = (
        "x-llm-d-inference-objective",
        "x-gateway-inference-objective",
    );
    /// Target model to write into the body.
    pub const MODEL_NAME_REWRITE: (&str, &str) =
        ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite");
    /// Flow id for flow control.
    pub const FAIRNESS_ID: (&str, &str) = (
        "x-llm-d-inference-fairness-id",
        "x-gateway-inference-fairness-id",
    );
    /// Time-to-first-token objective in milliseconds.
    pub const SLO_TTFT_MS: (&str, &str) = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms");
    /// Time-per-output-token objective in milliseconds.
    pub const SLO_TPOT_MS: (&str, &str) = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms");

    /// Default fairness id.
    pub const DEFAULT_FAIRNESS_ID: &str = "default-flow";

    /// Headers the EPP owns and therefore never echoes back to the gateway: pseudo-headers,
    /// framing headers, the destination headers and both families of control headers.
    pub fn is_system_owned(name: &str) -> bool {
        const OWNED: [&str; 11] = [
            "content-length",
            "transfer-encoding",
            DESTINATION_ENDPOINT,
            DESTINATION_ENDPOINT_SERVED,
            DESTINATION_ENDPOINT_SUBSET,
            OBJECTIVE.0,
            OBJECTIVE.1,
            MODEL_NAME_REWRITE.0,
            MODEL_NAME_REWRITE.1,
            FAIRNESS_ID.0,
            FAIRNESS_ID.1,
        ];
        name.starts_with(':') || OWNED.iter().any(|h| h.eq_ignore_ascii_case(name))
    }
}

/// Request or response headers with lowercase names, in arrival order.
///
/// A small vector: real requests carry a handful of headers, and a linear scan beats hashing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    /// Empty headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Value of a control header given as `(new name, old name)`; the new name wins.
    /// Empty values count as absent.
    pub fn get_control(&self, names: (&str, &str)) -> Option<&str> {
        self.get(names.0)
            .filter(|v| !v.is_empty())
            .or_else(|| self.get(names.1).filter(|v| !v.is_empty()))
    }

    /// Sets `name` to `value`, replacing an existing value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let mut name = name.into();
        name.make_ascii_lowercase();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((name, value)),
        }
    }

    /// Removes `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let pos = self
            .entries
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(name))?;
        Some(self.entries.remove(pos).1)
    }

    /// All entries.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.insert(k, v);
        }
        h
    }
}

/// Which API the body addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/responses`.
    Responses,
    /// `/v1/embeddings`.
    Embeddings,
    /// Anything else, or not parsed (passthrough).
    Other,
}

/// One chat message, flattened to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`...
    pub role: String,
    /// Text content; multi-part content has its text parts joined with a space.
    pub content: String,
}

/// The prompt of a request, as sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Prompt {
    /// No prompt (passthrough parser, or an API without one).
    #[default]
    None,
    /// A completions prompt given as one string.
    Text(String),
    /// A completions prompt given as an array of strings.
    Strings(Vec<String>),
    /// A completions prompt given as token ids.
    TokenIds(Vec<u32>),
    /// Chat messages.
    Chat {
        /// Messages flattened to text.
        messages: Vec<ChatMessage>,
        /// The raw JSON text of the `messages` array, as received.
        messages_json: String,
    },
}

impl Prompt {
    /// The text the approximate prefix scorer hashes: the prompt for completions (string
    /// arrays joined with a space), the JSON of `messages` for chat, nothing otherwise.
    pub fn prefix_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match self {
            Prompt::Text(s) => Some(Cow::Borrowed(s)),
            Prompt::Strings(v) => Some(Cow::Owned(v.join(" "))),
            Prompt::Chat { messages_json, .. } => Some(Cow::Borrowed(messages_json)),
            Prompt::TokenIds(_) | Prompt::None => None,
        }
    }

    /// Rough length in bytes of the prompt text (0 for token ids and none).
    pub fn text_len(&self) -> usize {
        match self {
            Prompt::Text(s) => s.len(),
            Prompt::Strings(v) => v.iter().map(|s| s.len() + 1).sum(),
            Prompt::Chat { messages_json, .. } => messages_json.len(),
            Prompt::TokenIds(_) | Prompt::None => 0,
        }
    }
}

/// A parsed request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBody {
    /// Which API.
    pub api: ApiKind,
    /// The `model` field ("" when the parser does not read it).
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// The prompt.
    pub prompt: Prompt,
    /// `cache_salt`, which isolates prefix caches.
    pub cache_salt: Option<String>,
    /// `max_tokens` / `max_completion_tokens`.
    pub max_tokens: Option<u64>,
    /// The body exactly as received.
    pub raw: Bytes,
    /// Byte range in `raw` of the top-level `model` value (the JSON string, quotes included),
    /// so the model can be rewritten by splicing instead of re-serializing the whole body.
    pub model_span: Option<Range<usize>>,
}

impl RequestBody {
    /// An unparsed body (passthrough): forwarded unchanged, scheduled on load only.
    pub fn raw(raw: Bytes) -> Self {
        Self {
            api: ApiKind::Other,
            model: String::new(),
            stream: false,
            prompt: Prompt::None,
            cache_salt: None,
            max_tokens: None,
            raw,
            model_span: None,
        }
    }

    /// The body to forward with `model` set to `target`. Zero-copy when nothing changes;
    /// otherwise one splice of the `model` value (the rest of the body is untouched).
    pub fn with_model(&self, target: &str) -> Bytes {
        let Some(span) = self.model_span.clone() else {
            return self.raw.clone();
        };
        if target == self.model || span.end > self.raw.len() || span.start > span.end {
            return self.raw.clone();
        }
        let quoted = match serde_json::to_string(target) {
            Ok(q) => q,
            Err(_) => return self.raw.clone(),
        };
        let mut out = Vec::with_capacity(self.raw.len() + quoted.len());
        out.extend_from_slice(&self.raw[..span.start]);
        out.extend_from_slice(quoted.as_bytes());
        out.extend_from_slice(&self.raw[span.end..]);
        Bytes::from(out)
    }
}

/// Latency objectives a client may send as headers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SloTargets {
    /// Time to first token, milliseconds.
    pub ttft_ms: Option<f64>,
    /// Time per output token, milliseconds.
    pub tpot_ms: Option<f64>,
}

/// Everything the scheduler and plugins know about one request.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    /// `x-request-id` (generated when the client sent none).
    pub request_id: String,
    /// Request headers (lowercase names).
    pub headers: Headers,
    /// The model the client asked for.
    pub incoming_model: String,
    /// The model the request is sent as (after rewrites); equals `incoming_model` otherwise.
    pub target_model: String,
    /// The parsed body; `None` for header-only requests.
    pub body: Option<RequestBody>,
    /// InferenceObjective name, when the client sent one.
    pub objective: Option<String>,
    /// Priority from the objective (0 when none); negative means sheddable.
    pub priority: i32,
    /// Flow id for flow control.
    pub fairness_id: String,
    /// Latency objectives.
    pub slo: SloTargets,
    /// Body size in bytes.
    pub size_bytes: usize,
}

impl InferenceRequest {
    /// A request built from a body and headers, before rewrites and objectives apply.
    pub fn new(request_id: impl Into<String>, headers: Headers, body: Option<RequestBody>) -> Self {
        let model = body.as_ref().map(|b| b.model.clone()).unwrap_or_default();
        let size_bytes = body.as_ref().map_or(0, |b| b.raw.len());
        Self {
            request_id: request_id.into(),
            headers,
            target_model: model.clone(),
            incoming_model: model,
            body,
            objective: None,
            priority: 0,
            fairness_id: header::DEFAULT_FAIRNESS_ID.to_string(),
            slo: SloTargets::default(),
            size_bytes,
        }
    }

    /// The prompt, if any.
    pub fn prompt(&self) -> &Prompt {
        static NONE: Prompt = Prompt::None;
        self.body.as_ref().map_or(&NONE, |b| &b.prompt)
    }

    /// `cache_salt` of the body.
    pub fn cache_salt(&self) -> Option<&str> {
        self.body.as_ref().and_then(|b| b.cache_salt.as_deref())
    }

    /// True when the client asked for a streamed response.
    pub fn is_streaming(&self) -> bool {
        self.body.as_ref().is_some_and(|b| b.stream)
    }

    /// The body to forward (model rewritten to `target_model`); empty for header-only requests.
    pub fn forward_body(&self) -> Bytes {
        self.body
            .as_ref()
            .map(|b| b.with_model(&self.target_model))
            .unwrap_or_default()
    }
}

/// Token usage reported by the model server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// `usage.total_tokens`.
    pub total_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
}

/// What the response hooks see of a response.
#[derive(Debug, Clone, Default)]
pub struct ResponseInfo {
    /// HTTP status from the model server.
    pub status: u16,
    /// `content-type: text/event-stream`.
    pub streaming: bool,
    /// Response headers from the model server.
    pub headers: Headers,
    /// Headers the hooks want added to the response sent to the client.
    pub headers_to_set: Vec<(String, String)>,
    /// Usage, once known.
    pub usage: Option<Usage>,
    /// Bytes of response body seen so far.
    pub body_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(raw: &str, model: &str) -> RequestBody {
        let start = raw.find(&format!("\"{model}\"")).unwrap();
        RequestBody {
            api: ApiKind::Completions,
            model: model.into(),
            stream: false,
            prompt: Prompt::Text("hi".into()),
            cache_salt: None,
            max_tokens: None,
            raw: Bytes::copy_from_slice(raw.as_bytes()),
            model_span: Some(start..start + model.len() + 2),
        }
    }

    #[test]
    fn model_rewrite_splices_only_the_model_value() {
        let raw = r#"{"model": "a", "prompt": "the model a", "n": 1}"#;
        let b = body(raw, "a");
        let out = b.with_model("llama/\"b\"");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "llama/\"b\"");
        assert_eq!(v["prompt"], "the model a");
        assert_eq!(v["n"], 1);
        // Unchanged model: the very same bytes.
        assert_eq!(b.with_model("a"), b.raw);
    }

    #[test]
    fn control_headers_prefer_the_new_name() {
        let h: Headers = [
            ("X-Gateway-Model-Name-Rewrite", "old"),
            ("x-llm-d-model-name-rewrite", "new"),
        ]
        .into_iter()
        .collect();
        assert_eq!(h.get_control(header::MODEL_NAME_REWRITE), Some("new"));
        let h: Headers = [("x-gateway-model-name-rewrite", "old")]
            .into_iter()
            .collect();
        assert_eq!(h.get_control(header::MODEL_NAME_REWRITE), Some("old"));
        let h: Headers = [("x-llm-d-model-name-rewrite", "")].into_iter().collect();
        assert_eq!(h.get_control(header::MODEL_NAME_REWRITE), None);
    }

    #[test]
    fn system_owned_headers_cover_both_control_families() {
        for h in [
            ":path",
            "Content-Length",
            "x-gateway-destination-endpoint",
            "x-gateway-destination-endpoint-served",
            "x-llm-d-model-name-rewrite",
            "X-Gateway-Model-Name-Rewrite",
            "x-gateway-inference-objective",
            "x-llm-d-inference-fairness-id",
        ] {
            assert!(header::is_system_owned(h), "{h}");
        }
        for h in [
            "x-request-id",
            "authorization",
            "x-session-token",
            "content-type",
        ] {
            assert!(!header::is_system_owned(h), "{h}");
        }
    }

    #[test]
    fn headers_are_case_insensitive_and_replace() {
        let mut h = Headers::new();
        h.insert("Content-Type", "a");
        h.insert("content-type", "b");
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("CONTENT-TYPE"), Some("b"));
        assert_eq!(h.remove("Content-type").as_deref(), Some("b"));
        assert!(h.is_empty());
    }

    #[test]
    fn prefix_text_per_prompt_kind() {
        assert_eq!(Prompt::Text("x".into()).prefix_text().unwrap(), "x");
        assert_eq!(
            Prompt::Strings(vec!["a".into(), "b".into()])
                .prefix_text()
                .unwrap(),
            "a b"
        );
        assert!(Prompt::TokenIds(vec![1]).prefix_text().is_none());
        let chat = Prompt::Chat {
            messages: vec![],
            messages_json: "[{\"role\":\"user\"}]".into(),
        };
        assert_eq!(chat.prefix_text().unwrap(), "[{\"role\":\"user\"}]");
    }
}
