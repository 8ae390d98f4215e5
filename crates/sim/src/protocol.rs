//! The OpenAI-compatible protocol as vLLM speaks it: request parsing and validation, and the
//! exact bytes of vLLM's responses.
//!
//! # Streaming frames
//!
//! Frames are `data: <json>\n\n` with compact JSON whose field order and `null` fields are
//! those of vLLM's pydantic models as serialized by its serving code (vLLM `main`, files
//! `entrypoints/openai/completion/{protocol,serving}.py`,
//! `entrypoints/openai/chat_completion/{protocol,serving}.py`,
//! `entrypoints/serve/engine/protocol.py`):
//!
//! * completions, one chunk per token (`model_dump_json(exclude_unset=True)`, every choice
//!   field passed explicitly):
//!   `{"id":"cmpl-…","object":"text_completion","created":…,"model":"…","choices":[{"index":0,"text":" w","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}`;
//!   the last token's chunk carries `"finish_reason":"length"` (or `"stop"`);
//! * chat: first a role chunk
//!   `{"id":"chatcmpl-…","object":"chat.completion.chunk","created":…,"model":"…","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}`,
//!   then per token `…"choices":[{"index":0,"delta":{"content":"w"},"logprobs":null,"finish_reason":null,"token_ids":null}]}`;
//!   the last adds `"finish_reason":"length","stop_reason":null`;
//! * with `stream_options.include_usage` (true by default once `stream_options` is given, as in
//!   vLLM), a final `{"id":…,"object":…,"created":…,"model":…,"choices":[],"usage":{"prompt_tokens":P,"total_tokens":T,"completion_tokens":C,"prompt_tokens_details":{"cached_tokens":K}}}`
//!   (`exclude_none=True`); `continuous_usage_stats` adds `"usage":{"prompt_tokens":…,"total_tokens":…,"completion_tokens":…}`
//!   after `choices` in every chunk;
//! * then `data: [DONE]\n\n`.
//!
//! `prompt_tokens_details` is what vLLM reports with `--enable-prompt-tokens-details`; the
//! simulator turns it on by default.
//!
//! Generated text is one word of the [`SimTokenizer`] vocabulary per token, each preceded by a
//! space (chat: except the first), so the text re-tokenizes to exactly `completion_tokens`
//! tokens.
//!
//! Errors use vLLM's `{"error":{"message":…,"type":…,"param":…,"code":…}}`.

use bytes::{BufMut, BytesMut};
use http::StatusCode;
use llmsched_tokenizer::SimTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::FinishReason;
use crate::pd::KvTransferParams;

/// Which OpenAI endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// An error answered in vLLM's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// `param` field, if the error is about one.
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// An error with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// Names the offending parameter.
    pub fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    /// vLLM's error type name for the status.
    pub fn error_type(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "BadRequestError",
            401 => "UnauthorizedError",
            403 => "ForbiddenError",
            404 => "NotFoundError",
            408 => "RequestTimeoutError",
            413 => "PayloadTooLargeError",
            429 => "TooManyRequestsError",
            500 => "InternalServerError",
            501 => "NotImplementedError",
            503 => "ServiceUnavailableError",
            _ => "Error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Info<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: u16,
        }
        #[derive(Serialize)]
        struct Wrapper<'a> {
            error: Info<'a>,
        }
        serde_json::to_string(&Wrapper {
            error: Info {
                message: &self.message,
                kind: self.error_type(),
                param: self.param.as_deref(),
                code: self.status.as_u16(),
            },
        })
        .unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }
}

/// The prompt of a request, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A text prompt.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Chat messages `(role, content)`.
    Chat(Vec<(String, String)>),
}

/// A validated generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// Endpoint.
    pub api: Api,
    /// `model` field.
    pub model: Option<String>,
    /// The prompt.
    pub input: Input,
    /// `max_tokens` (or `max_completion_tokens`), if given.
    pub max_tokens: Option<usize>,
    /// `min_tokens`.
    pub min_tokens: usize,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats`.
    pub continuous_usage: bool,
    /// `ignore_eos`.
    pub ignore_eos: bool,
    /// `cache_salt`.
    pub cache_salt: Option<String>,
    /// `seed`.
    pub seed: Option<u64>,
    /// Chat: `add_generation_prompt` (default true).
    pub add_generation_prompt: bool,
    /// `kv_transfer_params` (P/D disaggregation, vLLM's KV connector API), as sent.
    pub kv_transfer_params: Option<Value>,
}

#[derive(Deserialize)]
struct RawStreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

#[derive(Deserialize)]
struct RawRequest {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    min_tokens: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<RawStreamOptions>,
    ignore_eos: Option<bool>,
    n: Option<i64>,
    cache_salt: Option<String>,
    seed: Option<i64>,
    echo: Option<bool>,
    logprobs: Option<Value>,
    prompt_logprobs: Option<Value>,
    use_beam_search: Option<bool>,
    add_generation_prompt: Option<bool>,
    kv_transfer_params: Option<Value>,
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|u| u32::try_from(u).ok())
}

fn parse_prompt(v: Option<Value>) -> Result<Input, ApiError> {
    let empty = || {
        ApiError::bad_request("Either prompt or prompt_embeds must be provided and non-empty.")
            .with_param("prompt")
    };
    match v {
        None | Some(Value::Null) => Err(empty()),
        Some(Value::String(s)) if s.is_empty() => Err(empty()),
        Some(Value::String(s)) => Ok(Input::Text(s)),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(empty());
            }
            if items.iter().all(Value::is_number) {
                return items
                    .iter()
                    .map(|t| {
                        token_id(t).ok_or_else(|| {
                            ApiError::bad_request(format!("invalid token id {t} in prompt"))
                                .with_param("prompt")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Input::Tokens);
            }
            if items.len() > 1 {
                return Err(ApiError::bad_request(
                    "llmsched-sim serves one prompt per request; send a list of prompts as separate requests",
                )
                .with_param("prompt"));
            }
            match items.into_iter().next() {
                Some(Value::String(s)) if !s.is_empty() => Ok(Input::Text(s)),
                Some(inner @ Value::Array(_)) => parse_prompt(Some(inner)),
                _ => Err(ApiError::bad_request(
                    "prompt must be a string, a list of token ids, or a list with one of them",
                )
                .with_param("prompt")),
            }
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "prompt must be a string or a list of token ids, got {}",
            json_kind(&other)
        ))
        .with_param("prompt")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_messages(v: Option<Value>) -> Result<Input, ApiError> {
    let Some(Value::Array(items)) = v else {
        return Err(ApiError::bad_request(match v {
            None | Some(Value::Null) => "Field required: messages".to_string(),
            Some(other) => format!("messages must be a list, got {}", json_kind(&other)),
        })
        .with_param("messages"));
    };
    if items.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.into_iter().enumerate() {
        let Value::Object(mut obj) = m else {
            return Err(
                ApiError::bad_request(format!("messages[{i}] must be an object"))
                    .with_param("messages"),
            );
        };
        let role = match obj.remove("role") {
            Some(Value::String(r)) => r,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role is required and must be a string"
                ))
                .with_param("messages"));
            }
        };
        let content = match obj.remove("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match p.get("text").and_then(Value::as_str) {
                        Some(t) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(t);
                        }
                        None => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}].content: only text parts are supported"
                            ))
                            .with_param("messages"));
                        }
                    }
                }
                text
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].content must be a string or a list of parts, got {}",
                    json_kind(&other)
                ))
                .with_param("messages"));
            }
        };
        out.push((role, content));
    }
    Ok(Input::Chat(out))
}

/// Parses and validates a `/v1/completions` or `/v1/chat/completions` body.
pub fn parse_request(api: Api, body: &[u8]) -> Result<GenRequest, ApiError> {
    let raw: RawRequest = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::bad_request(format!("JSON decode error: {e}"))
        } else {
            ApiError::bad_request(format!("Invalid request: {e}"))
        }
    })?;
    let input = match api {
        Api::Completions => parse_prompt(raw.prompt)?,
        Api::Chat => parse_messages(raw.messages)?,
    };
    if let Some(n) = raw.n
        && n != 1
    {
        return Err(
            ApiError::bad_request(format!("llmsched-sim only supports n=1, got n={n}"))
                .with_param("n"),
        );
    }
    if raw.use_beam_search == Some(true) {
        return Err(
            ApiError::bad_request("beam search is not supported by llmsched-sim")
                .with_param("use_beam_search"),
        );
    }
    if raw.echo == Some(true) {
        return Err(
            ApiError::bad_request("echo is not supported by llmsched-sim").with_param("echo"),
        );
    }
    let wants_logprobs = match &raw.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(_) => true,
    };
    if wants_logprobs || !matches!(raw.prompt_logprobs, None | Some(Value::Null)) {
        return Err(
            ApiError::bad_request("logprobs are not supported by llmsched-sim")
                .with_param("logprobs"),
        );
    }
    let max_tokens = match api {
        Api::Completions => raw.max_tokens,
        Api::Chat => raw.max_completion_tokens.or(raw.max_tokens),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m < 1 => {
            return Err(
                ApiError::bad_request(format!("max_tokens must be at least 1, got {m}."))
                    .with_param("max_tokens"),
            );
        }
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
    };
    let min_tokens = match raw.min_tokens {
        None => 0,
        Some(m) if m < 0 => {
            return Err(ApiError::bad_request(format!(
                "min_tokens must be greater than or equal to 0, got {m}."
            ))
            .with_param("min_tokens"));
        }
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
    };
    let stream = raw.stream.unwrap_or(false);
    if raw.stream_options.is_some() && !stream {
        return Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.",
        )
        .with_param("stream_options"));
    }
    let (include_usage, continuous_usage) = match &raw.stream_options {
        Some(o) => (
            o.include_usage.unwrap_or(true),
            o.continuous_usage_stats.unwrap_or(false),
        ),
        None => (false, false),
    };
    Ok(GenRequest {
        api,
        model: raw.model,
        input,
        max_tokens,
        min_tokens,
        stream,
        include_usage,
        continuous_usage,
        ignore_eos: raw.ignore_eos.unwrap_or(false),
        cache_salt: raw.cache_salt,
        seed: raw.seed.map(|s| u64::from_ne_bytes(s.to_ne_bytes())),
        add_generation_prompt: raw.add_generation_prompt.unwrap_or(true),
        kv_transfer_params: raw.kv_transfer_params,
    })
}

/// Writes the word of token `id`: a leading space unless `first_chat`.
pub fn push_word(
    out: &mut BytesMut,
    words: &SimTokenizer,
    id: u32,
    first_chat: bool,
    s: &mut String,
) {
    s.clear();
    if !first_chat {
        s.push(' ');
    }
    words.write_word(id, s);
    out.put_slice(s.as_bytes());
}

/// Pre-formatted pieces of one stream's frames.
#[derive(Debug, Clone)]
pub struct StreamFormat {
    api: Api,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":[`
    head: String,
    /// `{"id":…,"object":…,"created":…,"model":…` (for the usage chunk)
    envelope: String,
    prompt_tokens: usize,
    include_usage: bool,
    continuous_usage: bool,
    prompt_details: bool,
    scratch: String,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

impl StreamFormat {
    /// Frames for a stream with id `id` (already prefixed: `cmpl-…`/`chatcmpl-…`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        api: Api,
        id: &str,
        created: u64,
        model: &str,
        prompt_tokens: usize,
        include_usage: bool,
        continuous_usage: bool,
        prompt_details: bool,
    ) -> Self {
        let object = match api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        let envelope = format!(
            "{{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{}",
            json_str(id),
            json_str(model)
        );
        Self {
            api,
            head: format!("data: {envelope},\"choices\":["),
            envelope,
            prompt_tokens,
            include_usage,
            continuous_usage,
            prompt_details,
            scratch: String::with_capacity(16),
        }
    }

    fn running_usage(&self, out: &mut BytesMut, completion: usize) {
        if self.continuous_usage {
            out.put_slice(
                format!(
                    ",\"usage\":{{\"prompt_tokens\":{},\"total_tokens\":{},\"completion_tokens\":{completion}}}",
                    self.prompt_tokens,
                    self.prompt_tokens + completion
                )
                .as_bytes(),
            );
        }
    }

    /// The chat role chunk (no-op for completions).
    pub fn role_chunk(&self, out: &mut BytesMut) {
        if self.api != Api::Chat {
            return;
        }
        out.put_slice(self.head.as_bytes());
        out.put_slice(
            b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]",
        );
        self.running_usage(out, 0);
        out.put_slice(b",\"prompt_token_ids\":null,\"prompt_text\":null}\n\n");
    }

    /// The chunk of one token; `completion` counts tokens including this one.
    pub fn token_chunk(
        &mut self,
        out: &mut BytesMut,
        words: &SimTokenizer,
        id: u32,
        finish: Option<FinishReason>,
        completion: usize,
    ) {
        let mut scratch = std::mem::take(&mut self.scratch);
        out.put_slice(self.head.as_bytes());
        match self.api {
            Api::Completions => {
                out.put_slice(b"{\"index\":0,\"text\":\"");
                push_word(out, words, id, false, &mut scratch);
                out.put_slice(b"\",\"logprobs\":null,\"finish_reason\":");
                match finish {
                    Some(r) => {
                        out.put_u8(b'"');
                        out.put_slice(r.as_str().as_bytes());
                        out.put_u8(b'"');
                    }
                    None => out.put_slice(b"null"),
                }
                out.put_slice(
                    b",\"stop_reason\":null,\"prompt_token_ids\":null,\"token_ids\":null}]",
                );
            }
            Api::Chat => {
                out.put_slice(b"{\"index\":0,\"delta\":{\"content\":\"");
                push_word(out, words, id, completion == 1, &mut scratch);
                out.put_slice(b"\"},\"logprobs\":null,\"finish_reason\":");
                match finish {
                    Some(r) => {
                        out.put_u8(b'"');
                        out.put_slice(r.as_str().as_bytes());
                        out.put_slice(b"\",\"stop_reason\":null");
                    }
                    None => out.put_slice(b"null"),
                }
                out.put_slice(b",\"token_ids\":null}]");
            }
        }
        self.running_usage(out, completion);
        out.put_slice(b"}\n\n");
        self.scratch = scratch;
    }

    /// An error frame (vLLM's `data: {"error": …}` when a stream fails) and `[DONE]`.
    pub fn error_end(&self, out: &mut BytesMut, err: &ApiError) {
        out.put_slice(b"data: ");
        out.put_slice(err.body().as_bytes());
        out.put_slice(b"\n\ndata: [DONE]\n\n");
    }

    /// The final usage chunk (if requested) and `[DONE]`.
    pub fn end(&self, out: &mut BytesMut, completion: usize, cached: usize) {
        if self.include_usage {
            out.put_slice(b"data: ");
            out.put_slice(self.envelope.as_bytes());
            let details = if self.prompt_details {
                format!(",\"prompt_tokens_details\":{{\"cached_tokens\":{cached}}}")
            } else {
                String::new()
            };
            out.put_slice(
                format!(
                    ",\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"total_tokens\":{},\"completion_tokens\":{completion}{details}}}}}\n\n",
                    self.prompt_tokens,
                    self.prompt_tokens + completion
                )
                .as_bytes(),
            );
        }
        out.put_slice(b"data: [DONE]\n\n");
    }
}

/// `usage` of a response.
#[derive(Debug, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt + completion.
    pub total_tokens: usize,
    /// Completion tokens.
    pub completion_tokens: usize,
    /// Cached prompt tokens.
    pub prompt_tokens_details: Option<PromptDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Serialize)]
pub struct PromptDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'a str,
    stop_reason: Option<()>,
    token_ids: Option<()>,
    prompt_logprobs: Option<()>,
    prompt_token_ids: Option<()>,
}

#[derive(Serialize)]
struct CompletionResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    service_tier: Option<()>,
    system_fingerprint: Option<()>,
    usage: Usage,
    kv_transfer_params: Option<&'a KvTransferParams>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: Option<()>,
    audio: Option<()>,
    function_call: Option<()>,
    reasoning: Option<()>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: ChatMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'a str,
    stop_reason: Option<()>,
    token_ids: Option<()>,
}

#[derive(Serialize)]
struct ChatResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    service_tier: Option<()>,
    system_fingerprint: Option<()>,
    usage: Usage,
    prompt_logprobs: Option<()>,
    prompt_token_ids: Option<()>,
    kv_transfer_params: Option<&'a KvTransferParams>,
}

/// The body of a non-streaming response (vLLM's `model_dump()`: every field, `null`s included);
/// `kv` is what a prefill for a remote decoder returns as `kv_transfer_params`.
#[allow(clippy::too_many_arguments)]
pub fn full_response(
    api: Api,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: FinishReason,
    usage: Usage,
    kv: Option<&KvTransferParams>,
) -> String {
    let r = match api {
        Api::Completions => serde_json::to_string(&CompletionResponse {
            id,
            object: "text_completion",
            created,
            model,
            choices: [CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish.as_str(),
                stop_reason: None,
                token_ids: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage,
            kv_transfer_params: kv,
        }),
        Api::Chat => serde_json::to_string(&ChatResponse {
            id,
            object: "chat.completion",
            created,
            model,
            choices: [ChatChoice {
                index: 0,
                message: ChatMessage {
                    role: "assistant",
                    content: text,
                    refusal: None,
                    annotations: None,
                    audio: None,
                    function_call: None,
                    reasoning: None,
                },
                logprobs: None,
                finish_reason: finish.as_str(),
                stop_reason: None,
                token_ids: None,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage,
            prompt_logprobs: None,
            prompt_token_ids: None,
            kv_transfer_params: kv,
        }),
    };
    r.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &BytesMut) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn completion_frames_match_vllm_byte_for_byte() {
        let words = SimTokenizer::default();
        let mut f = StreamFormat::new(
            Api::Completions,
            "cmpl-abc",
            1700000000,
            "m/x",
            5,
            true,
            false,
            true,
        );
        let mut out = BytesMut::new();
        f.token_chunk(&mut out, &words, 0, None, 1);
        assert_eq!(
            s(&out),
            "data: {\"id\":\"cmpl-abc\",\"object\":\"text_completion\",\"created\":1700000000,\"model\":\"m/x\",\"choices\":[{\"index\":0,\"text\":\" a\",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null,\"prompt_token_ids\":null,\"token_ids\":null}]}\n\n"
        );
        out.clear();
        f.token_chunk(&mut out, &words, 27, Some(FinishReason::Length), 2);
        f.end(&mut out, 2, 3);
        assert_eq!(
            s(&out),
            "data: {\"id\":\"cmpl-abc\",\"object\":\"text_completion\",\"created\":1700000000,\"model\":\"m/x\",\"choices\":[{\"index\":0,\"text\":\" ab\",\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null,\"prompt_token_ids\":null,\"token_ids\":null}]}\n\n\
             data: {\"id\":\"cmpl-abc\",\"object\":\"text_completion\",\"created\":1700000000,\"model\":\"m/x\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":3}}}\n\n\
             data: [DONE]\n\n"
        );
    }

    #[test]
    fn chat_frames_match_vllm_byte_for_byte() {
        let words = SimTokenizer::default();
        let mut f = StreamFormat::new(Api::Chat, "chatcmpl-1", 5, "m", 4, false, true, true);
        let mut out = BytesMut::new();
        f.role_chunk(&mut out);
        f.token_chunk(&mut out, &words, 1, None, 1);
        f.token_chunk(&mut out, &words, 2, Some(FinishReason::Stop), 2);
        f.end(&mut out, 2, 0);
        let head = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[";
        let expected = format!(
            "{head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":{{\"prompt_tokens\":4,\"total_tokens\":4,\"completion_tokens\":0}},\"prompt_token_ids\":null,\"prompt_text\":null}}\n\n\
             {head}{{\"index\":0,\"delta\":{{\"content\":\"b\"}},\"logprobs\":null,\"finish_reason\":null,\"token_ids\":null}}],\"usage\":{{\"prompt_tokens\":4,\"total_tokens\":5,\"completion_tokens\":1}}}}\n\n\
             {head}{{\"index\":0,\"delta\":{{\"content\":\" c\"}},\"logprobs\":null,\"finish_reason\":\"stop\",\"stop_reason\":null,\"token_ids\":null}}],\"usage\":{{\"prompt_tokens\":4,\"total_tokens\":6,\"completion_tokens\":2}}}}\n\n\
             data: [DONE]\n\n"
        );
        assert_eq!(s(&out), expected);
    }

    #[test]
    fn every_frame_is_valid_json() {
        let words = SimTokenizer::default();
        for api in [Api::Completions, Api::Chat] {
            let mut f = StreamFormat::new(api, "id-\"q\"", 1, "we\"ird", 1, true, true, true);
            let mut out = BytesMut::new();
            f.role_chunk(&mut out);
            f.token_chunk(&mut out, &words, 9, Some(FinishReason::Length), 1);
            f.end(&mut out, 1, 0);
            for frame in s(&out).split("\n\n").filter(|f| !f.is_empty()) {
                let json = frame.strip_prefix("data: ").unwrap();
                if json != "[DONE]" {
                    serde_json::from_str::<Value>(json).unwrap();
                }
            }
        }
    }

    #[test]
    fn parsing_accepts_vllm_prompt_shapes() {
        let p = |b: &str| parse_request(Api::Completions, b.as_bytes());
        assert_eq!(
            p(r#"{"prompt":"a b"}"#).unwrap().input,
            Input::Text("a b".into())
        );
        assert_eq!(
            p(r#"{"prompt":[1,2]}"#).unwrap().input,
            Input::Tokens(vec![1, 2])
        );
        assert_eq!(
            p(r#"{"prompt":["x"]}"#).unwrap().input,
            Input::Text("x".into())
        );
        assert_eq!(
            p(r#"{"prompt":[[3]]}"#).unwrap().input,
            Input::Tokens(vec![3])
        );
        let r = p(r#"{"prompt":"x","stream":true,"stream_options":{}}"#).unwrap();
        assert!(r.include_usage && !r.continuous_usage);
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let p = |b: &str| parse_request(Api::Completions, b.as_bytes()).unwrap_err();
        assert!(p("{not json").message.contains("JSON decode error"));
        assert!(p(r#"{"model":"m"}"#).message.contains("prompt"));
        assert!(p(r#"{"prompt":""}"#).message.contains("non-empty"));
        assert!(p(r#"{"prompt":[-1]}"#).message.contains("token id"));
        assert!(p(r#"{"prompt":["a","b"]}"#).message.contains("one prompt"));
        assert!(
            p(r#"{"prompt":"x","max_tokens":0}"#)
                .message
                .contains("at least 1")
        );
        assert!(
            p(r#"{"prompt":"x","max_tokens":"ten"}"#)
                .message
                .contains("invalid type")
        );
        assert!(
            p(r#"{"prompt":"x","stream_options":{"include_usage":true}}"#)
                .message
                .contains("stream=True")
        );
        assert!(p(r#"{"prompt":"x","n":2}"#).message.contains("n=1"));
        assert!(
            p(r#"{"prompt":"x","logprobs":1}"#)
                .message
                .contains("logprobs")
        );
        let c = |b: &str| parse_request(Api::Chat, b.as_bytes()).unwrap_err();
        assert!(c(r#"{"model":"m"}"#).message.contains("messages"));
        assert!(c(r#"{"messages":[]}"#).message.contains("empty"));
        assert!(
            c(r#"{"messages":[{"content":"x"}]}"#)
                .message
                .contains("role")
        );
        let e = c(r#"{"messages":{}}"#);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.body().starts_with("{\"error\":{\"message\":"));
        assert!(
            e.body()
                .ends_with("\"type\":\"BadRequestError\",\"param\":\"messages\",\"code\":400}}")
        );
    }

    #[test]
    fn chat_content_parts_and_max_completion_tokens() {
        let r = parse_request(
            Api::Chat,
            br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"q"}]}],"max_completion_tokens":3,"max_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(
            r.input,
            Input::Chat(vec![
                ("system".into(), "s".into()),
                ("user".into(), "q".into())
            ])
        );
        assert_eq!(r.max_tokens, Some(3));
    }

    #[test]
    fn full_responses_keep_vllm_field_order() {
        let body = full_response(
            Api::Completions,
            "cmpl-1",
            2,
            "m",
            " a b",
            FinishReason::Length,
            Usage {
                prompt_tokens: 3,
                total_tokens: 5,
                completion_tokens: 2,
                prompt_tokens_details: Some(PromptDetails { cached_tokens: 0 }),
            },
            None,
        );
        assert_eq!(
            body,
            "{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":2,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\" a b\",\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null,\"token_ids\":null,\"prompt_logprobs\":null,\"prompt_token_ids\":null}],\"service_tier\":null,\"system_fingerprint\":null,\"usage\":{\"prompt_tokens\":3,\"total_tokens\":5,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":0}},\"kv_transfer_params\":null}"
        );
    }
}
