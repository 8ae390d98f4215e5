//! `openai-parser` (the default parser): reads OpenAI-style request bodies.
//!
//! ## What it reads
//!
//! The API is chosen from the request path (`:path`, else `x-original-path`, else
//! `x-forwarded-path`; query string and trailing `/` ignored) by suffix, in the reference's
//! order: `/conversations`, `/responses`, `/chat/completions`, `/completions`, `/embeddings`;
//! any other path means completions. Without a path header the API is inferred from the
//! fields (`messages` → chat, `prompt` → completions, `items` → conversations, `input` →
//! responses; none → completions).
//!
//! | API | required | prompt |
//! | --- | --- | --- |
//! | completions | `prompt`: non-empty string, string array or token-id array | `Text` / `Strings` / `TokenIds` |
//! | chat | `messages`: non-empty array of messages (content: string, parts, or null) | `Chat` (raw `messages` JSON kept for prefix hashing; text parts joined with a space) |
//! | responses | `input`: present | `Chat` (hash text = JSON of `[{instructions}, {tools}, {input}]` as received) |
//! | conversations | `items`: non-empty array | `Chat` (hash text = raw `items` JSON) |
//! | embeddings | `input`: as completions' `prompt` | `Text` / `Strings` / `TokenIds` |
//!
//! Also read: `model` (string; its byte span in the body is recorded so the director can
//! rewrite the model by splicing), `stream` (`true`), `cache_salt` (string),
//! `max_completion_tokens` / `max_tokens` / `max_output_tokens` (first present, non-negative
//! integer). A missing or non-string `model` leaves `model` empty: the director answers
//! `model not found in request body`, as the reference's director does.
//!
//! ## Errors (400, texts as the reference)
//!
//! * body not a JSON object: `error unmarshaling request bodyMap: <detail>`;
//! * required field missing, empty or mistyped (including a non-string `cache_salt`):
//!   `invalid completions request: must have prompt field`, `invalid chat completions
//!   request: must have valid messages field`, `invalid responses request: must have input
//!   field`, `invalid conversations request: must have items field`, `invalid embeddings
//!   request: must have input field`.
//!
//! ## Cost
//!
//! No DOM: one pass over the body deserializes the top level into borrowed raw slices
//! (`serde_json::value::RawValue`) and the prompt directly into its final strings; chat
//! messages are parsed a second time from their raw slice (which is also kept verbatim for
//! hashing). Unknown fields are skipped without allocation.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use llmsched_core::Plugin;
use llmsched_core::error::InferenceError;
use llmsched_core::plugin::{ParseOutcome, Parser};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::{ApiKind, ChatMessage, Headers, Prompt, RequestBody};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::common::{impl_plugin, params};
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "openai-parser";

/// Path headers, in order of preference.
pub const PATH_HEADERS: [&str; 3] = [":path", "x-original-path", "x-forwarded-path"];

/// The API a body addresses (conversations included, which [`ApiKind`] lacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiApi {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/responses`.
    Responses,
    /// `/v1/conversations`.
    Conversations,
    /// `/v1/embeddings`.
    Embeddings,
}

impl OpenAiApi {
    /// From a request path (reference rules; unknown paths are completions).
    pub fn from_path(path: &str) -> Self {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        if path.ends_with("/conversations") {
            OpenAiApi::Conversations
        } else if path.ends_with("/responses") {
            OpenAiApi::Responses
        } else if path.ends_with("/chat/completions") {
            OpenAiApi::ChatCompletions
        } else if path.ends_with("/embeddings") {
            OpenAiApi::Embeddings
        } else {
            OpenAiApi::Completions
        }
    }

    fn kind(self) -> ApiKind {
        match self {
            OpenAiApi::Completions => ApiKind::Completions,
            OpenAiApi::ChatCompletions => ApiKind::ChatCompletions,
            OpenAiApi::Responses => ApiKind::Responses,
            OpenAiApi::Embeddings => ApiKind::Embeddings,
            OpenAiApi::Conversations => ApiKind::Other,
        }
    }

    fn invalid(self) -> InferenceError {
        InferenceError::bad_request(match self {
            OpenAiApi::Completions => "invalid completions request: must have prompt field",
            OpenAiApi::ChatCompletions => {
                "invalid chat completions request: must have valid messages field"
            }
            OpenAiApi::Responses => "invalid responses request: must have input field",
            OpenAiApi::Conversations => "invalid conversations request: must have items field",
            OpenAiApi::Embeddings => "invalid embeddings request: must have input field",
        })
    }
}

/// The OpenAI parser.
#[derive(Debug, Clone)]
pub struct OpenAiParser {
    name: String,
}

impl OpenAiParser {
    /// A parser named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(OpenAiParser::new(i.name)))
}

impl_plugin!(OpenAiParser, TYPE, as_parser => Parser);

impl Parser for OpenAiParser {
    fn parse_request(
        &self,
        body: Bytes,
        headers: &Headers,
    ) -> Result<ParseOutcome, InferenceError> {
        parse(body, headers).map(ParseOutcome::Parsed)
    }
}

/// Parses a body (see the module documentation).
pub fn parse(body: Bytes, headers: &Headers) -> Result<RequestBody, InferenceError> {
    let top: TopLevel<'_> = serde_json::from_slice(&body).map_err(|e| {
        InferenceError::bad_request(format!("error unmarshaling request bodyMap: {e}"))
    })?;
    let path = PATH_HEADERS
        .iter()
        .find_map(|h| headers.get(h).filter(|p| !p.is_empty()));
    let api = match path {
        Some(p) => OpenAiApi::from_path(p),
        None => top.infer_api(),
    };

    let cache_salt = match top.cache_salt {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(serde_json::from_str::<String>(raw.get()).map_err(|_| api.invalid())?)
            .filter(|s| !s.is_empty()),
    };

    let prompt = match api {
        OpenAiApi::Completions => text_prompt(top.prompt, api)?,
        OpenAiApi::Embeddings => text_prompt(top.input, api)?,
        OpenAiApi::ChatCompletions => {
            let raw = top.messages.ok_or_else(|| api.invalid())?;
            let messages = parse_messages(raw.get()).map_err(|_| api.invalid())?;
            if messages.is_empty() {
                return Err(api.invalid());
            }
            Prompt::Chat {
                messages,
                messages_json: raw.get().to_string(),
            }
        }
        OpenAiApi::Conversations => {
            let raw = top.items.ok_or_else(|| api.invalid())?;
            let items: Vec<&RawValue> =
                serde_json::from_str(raw.get()).map_err(|_| api.invalid())?;
            if items.is_empty() {
                return Err(api.invalid());
            }
            Prompt::Chat {
                messages: items
                    .iter()
                    .filter_map(|i| lenient_message(i.get()))
                    .collect(),
                messages_json: raw.get().to_string(),
            }
        }
        OpenAiApi::Responses => {
            let input = top
                .input_raw
                .filter(|r| r.get() != "null")
                .ok_or_else(|| api.invalid())?;
            responses_prompt(top.instructions, top.tools, input)
        }
    };

    let (model, model_span) = match top.model.and_then(|raw| {
        let s: String = serde_json::from_str(raw.get()).ok()?;
        Some((s, span_of(&body, raw)?))
    }) {
        Some((m, span)) => (m, Some(span)),
        None => (String::new(), None),
    };

    Ok(RequestBody {
        api: api.kind(),
        model,
        stream: top.stream,
        prompt,
        cache_salt,
        max_tokens: top.max_tokens,
        raw: body,
        model_span,
    })
}

/// Byte range of `raw` inside `body` (it borrows from it).
fn span_of(body: &[u8], raw: &RawValue) -> Option<Range<usize>> {
    let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(raw.get().len())?;
    (end <= body.len() && body.get(start..end) == Some(raw.get().as_bytes())).then_some(start..end)
}

fn text_prompt(v: Option<PromptValue>, api: OpenAiApi) -> Result<Prompt, InferenceError> {
    match v {
        Some(PromptValue::Text(s)) if !s.is_empty() => Ok(Prompt::Text(s)),
        Some(PromptValue::Strings(v)) if !v.is_empty() => Ok(Prompt::Strings(v)),
        Some(PromptValue::Tokens(v)) if !v.is_empty() => Ok(Prompt::TokenIds(v)),
        _ => Err(api.invalid()),
    }
}

fn responses_prompt(
    instructions: Option<&RawValue>,
    tools: Option<&RawValue>,
    input: &RawValue,
) -> Prompt {
    fn present(r: Option<&RawValue>) -> Option<&RawValue> {
        r.filter(|r| r.get() != "null")
    }
    let mut json = String::with_capacity(input.get().len() + 64);
    json.push('[');
    let mut messages = Vec::new();
    if let Some(i) = present(instructions) {
        json.push_str("{\"instructions\":");
        json.push_str(i.get());
        json.push_str("},");
        if let Ok(s) = serde_json::from_str::<String>(i.get()) {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s,
            });
        }
    }
    if let Some(t) = present(tools) {
        json.push_str("{\"tools\":");
        json.push_str(t.get());
        json.push_str("},");
    }
    json.push_str("{\"input\":");
    json.push_str(input.get());
    json.push_str("}]");
    if let Ok(s) = serde_json::from_str::<String>(input.get()) {
        messages.push(ChatMessage {
            role: "user".into(),
            content: s,
        });
    } else if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(input.get()) {
        messages.extend(items.iter().filter_map(|i| lenient_message(i.get())));
    }
    Prompt::Chat {
        messages,
        messages_json: json,
    }
}

/// The top level of a body: only the fields the scheduler needs, borrowed.
#[derive(Default)]
struct TopLevel<'a> {
    model: Option<&'a RawValue>,
    stream: bool,
    prompt: Option<PromptValue>,
    messages: Option<&'a RawValue>,
    /// `input` as a prompt (embeddings).
    input: Option<PromptValue>,
    /// `input` raw (responses).
    input_raw: Option<&'a RawValue>,
    instructions: Option<&'a RawValue>,
    tools: Option<&'a RawValue>,
    items: Option<&'a RawValue>,
    cache_salt: Option<&'a RawValue>,
    max_tokens: Option<u64>,
    max_tokens_rank: u8,
}

impl TopLevel<'_> {
    fn infer_api(&self) -> OpenAiApi {
        if self.messages.is_some() {
            OpenAiApi::ChatCompletions
        } else if self.prompt.is_some() {
            OpenAiApi::Completions
        } else if self.items.is_some() {
            OpenAiApi::Conversations
        } else if self.input_raw.is_some() {
            OpenAiApi::Responses
        } else {
            OpenAiApi::Completions
        }
    }
}

enum Field {
    Model,
    Stream,
    Prompt,
    Messages,
    Input,
    Instructions,
    Tools,
    Items,
    CacheSalt,
    /// `max_completion_tokens` (rank 3), `max_tokens` (2), `max_output_tokens` (1).
    MaxTokens(u8),
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "model" => Field::Model,
                    "stream" => Field::Stream,
                    "prompt" => Field::Prompt,
                    "messages" => Field::Messages,
                    "input" => Field::Input,
                    "instructions" => Field::Instructions,
                    "tools" => Field::Tools,
                    "items" => Field::Items,
                    "cache_salt" => Field::CacheSalt,
                    "max_completion_tokens" => Field::MaxTokens(3),
                    "max_tokens" => Field::MaxTokens(2),
                    "max_output_tokens" => Field::MaxTokens(1),
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for TopLevel<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = TopLevel<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel<'a>, A::Error> {
                let mut t = TopLevel::default();
                // Duplicate keys: the last one wins, as with Go's map decoding.
                while let Some(k) = map.next_key::<Field>()? {
                    match k {
                        Field::Model => t.model = Some(map.next_value()?),
                        Field::Stream => {
                            let raw: &RawValue = map.next_value()?;
                            t.stream = raw.get() == "true";
                        }
                        Field::Prompt => t.prompt = Some(map.next_value()?),
                        Field::Messages => t.messages = Some(map.next_value()?),
                        Field::Input => {
                            let raw: &'de RawValue = map.next_value()?;
                            t.input = serde_json::from_str(raw.get()).ok();
                            t.input_raw = Some(raw);
                        }
                        Field::Instructions => t.instructions = Some(map.next_value()?),
                        Field::Tools => t.tools = Some(map.next_value()?),
                        Field::Items => t.items = Some(map.next_value()?),
                        Field::CacheSalt => t.cache_salt = Some(map.next_value()?),
                        Field::MaxTokens(rank) => {
                            let raw: &RawValue = map.next_value()?;
                            if rank >= t.max_tokens_rank
                                && let Ok(n) = raw.get().parse::<u64>()
                            {
                                t.max_tokens = Some(n);
                                t.max_tokens_rank = rank;
                            }
                        }
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(t)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A completions prompt / embeddings input, read leniently: a value of the wrong shape is
/// recorded as `Invalid` instead of failing the whole body (it only matters for the API
/// that requires it).
#[derive(Debug, Clone, PartialEq)]
enum PromptValue {
    Text(String),
    Strings(Vec<String>),
    Tokens(Vec<u32>),
    Invalid,
}

/// One element of a prompt array.
enum Elem {
    Str(String),
    Token(Option<u32>),
    Other,
}

impl<'de> Deserialize<'de> for Elem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Elem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a token id")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Elem, E> {
                Ok(Elem::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Elem, E> {
                Ok(Elem::Str(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Elem, E> {
                Ok(Elem::Token(u32::try_from(v).ok()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Elem, E> {
                Ok(Elem::Token(u32::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Elem, E> {
                // A float is a token id only when it is an exact u32 (as the reference).
                let ok = v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v);
                Ok(Elem::Token(ok.then_some(v as u32)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Elem, E> {
                Ok(Elem::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Elem, E> {
                Ok(Elem::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Elem, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Elem::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Elem, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Elem::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for PromptValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptValue, E> {
                Ok(PromptValue::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptValue, E> {
                Ok(PromptValue::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<PromptValue, A::Error> {
                let mut out = match s.next_element::<Elem>()? {
                    None => return Ok(PromptValue::Strings(Vec::new())),
                    Some(Elem::Str(x)) => PromptValue::Strings(vec![x]),
                    Some(Elem::Token(Some(t))) => PromptValue::Tokens(vec![t]),
                    Some(_) => PromptValue::Invalid,
                };
                while let Some(e) = s.next_element::<Elem>()? {
                    match (&mut out, e) {
                        (PromptValue::Strings(v), Elem::Str(x)) => v.push(x),
                        (PromptValue::Tokens(v), Elem::Token(Some(t))) => v.push(t),
                        _ => out = PromptValue::Invalid,
                    }
                }
                Ok(out)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PromptValue, E> {
                Ok(PromptValue::Invalid)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<PromptValue, E> {
                Ok(PromptValue::Invalid)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PromptValue, E> {
                Ok(PromptValue::Invalid)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<PromptValue, E> {
                Ok(PromptValue::Invalid)
            }
            fn visit_unit<E: de::Error>(self) -> Result<PromptValue, E> {
                Ok(PromptValue::Invalid)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<PromptValue, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(PromptValue::Invalid)
            }
        }
        d.deserialize_any(V)
    }
}

/// A chat message as received (unknown fields ignored).
#[derive(Deserialize)]
struct MessageIn<'a> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(default)]
    content: Content,
}

/// Message content flattened to text: a string, or the text parts joined with a space.
#[derive(Default)]
struct Content(String);

/// A content part (unknown fields ignored).
#[derive(Deserialize)]
struct PartIn<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts or null")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Content, E> {
                Ok(Content(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
                Ok(Content(String::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Content, A::Error> {
                let mut text = String::new();
                while let Some(p) = s.next_element::<PartIn<'de>>()? {
                    if p.kind.as_deref() == Some("text")
                        && let Some(t) = p.text
                    {
                        if !text.is_empty() {
                            text.push(' ');
                        }
                        text.push_str(&t);
                    }
                }
                Ok(Content(text))
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_messages(raw: &str) -> Result<Vec<ChatMessage>, serde_json::Error> {
    let msgs: Vec<MessageIn<'_>> = serde_json::from_str(raw)?;
    Ok(msgs
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role.map(Cow::into_owned).unwrap_or_default(),
            content: m.content.0,
        })
        .collect())
}

fn lenient_message(raw: &str) -> Option<ChatMessage> {
    let m: MessageIn<'_> = serde_json::from_str(raw).ok()?;
    Some(ChatMessage {
        role: m.role.map(Cow::into_owned).unwrap_or_default(),
        content: m.content.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsched_core::request::InferenceRequest;

    fn path(p: &str) -> Headers {
        [(":path", p)].into_iter().collect()
    }

    fn ok(body: &str, headers: &Headers) -> RequestBody {
        match parse(Bytes::copy_from_slice(body.as_bytes()), headers) {
            Ok(b) => b,
            Err(e) => panic!("{body}: {e}"),
        }
    }

    fn err(body: &[u8], headers: &Headers) -> String {
        match parse(Bytes::copy_from_slice(body), headers) {
            Ok(b) => panic!("{:?} should fail: {b:?}", String::from_utf8_lossy(body)),
            Err(e) => {
                assert_eq!(e.http_status(), 400);
                e.message
            }
        }
    }

    #[test]
    fn completions_string_prompt() {
        let b = ok(
            r#"{"model":"llama","prompt":"Hello","stream":true,"max_tokens":128,"cache_salt":"s1","temperature":0.2}"#,
            &path("/v1/completions"),
        );
        assert_eq!(b.api, ApiKind::Completions);
        assert_eq!(b.model, "llama");
        assert_eq!(b.prompt, Prompt::Text("Hello".into()));
        assert!(b.stream);
        assert_eq!(b.max_tokens, Some(128));
        assert_eq!(b.cache_salt.as_deref(), Some("s1"));
        assert_eq!(&b.raw[b.model_span.clone().unwrap()], br#""llama""#);
    }

    #[test]
    fn prompt_arrays_and_token_ids() {
        let h = path("/v1/completions");
        assert_eq!(
            ok(r#"{"model":"m","prompt":["a","b c"]}"#, &h).prompt,
            Prompt::Strings(vec!["a".into(), "b c".into()])
        );
        assert_eq!(
            ok(r#"{"model":"m","prompt":[1,2,4294967295]}"#, &h).prompt,
            Prompt::TokenIds(vec![1, 2, u32::MAX])
        );
        // Integral floats are token ids, as in the reference.
        assert_eq!(
            ok(r#"{"model":"m","prompt":[7.0, 8]}"#, &h).prompt,
            Prompt::TokenIds(vec![7, 8])
        );
        for bad in [
            r#"{"model":"m","prompt":["a",1]}"#,
            r#"{"model":"m","prompt":[1,"a"]}"#,
            r#"{"model":"m","prompt":[1.5]}"#,
            r#"{"model":"m","prompt":[-1]}"#,
            r#"{"model":"m","prompt":[4294967296]}"#,
            r#"{"model":"m","prompt":[[1,2]]}"#,
            r#"{"model":"m","prompt":[]}"#,
            r#"{"model":"m","prompt":""}"#,
            r#"{"model":"m","prompt":null}"#,
            r#"{"model":"m","prompt":5}"#,
            r#"{"model":"m","prompt":{"text":"a"}}"#,
            r#"{"model":"m"}"#,
        ] {
            assert_eq!(
                err(bad.as_bytes(), &h),
                "invalid completions request: must have prompt field",
                "{bad}"
            );
        }
    }

    #[test]
    fn chat_messages_string_parts_and_null_content() {
        let body = r#"{"model":"m","messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"What is"},{"type":"image_url","image_url":{"url":"http://x"}},{"type":"text","text":"this?"}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"1"}]},
            {"role":"tool","content":"42","name":"calc"}
        ],"max_completion_tokens":9,"max_tokens":100}"#;
        let b = ok(body, &path("/v1/chat/completions"));
        assert_eq!(b.api, ApiKind::ChatCompletions);
        assert_eq!(b.max_tokens, Some(9), "max_completion_tokens wins");
        let Prompt::Chat {
            messages,
            messages_json,
        } = &b.prompt
        else {
            panic!("{:?}", b.prompt)
        };
        let flat: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            flat,
            vec![
                ("system", "Be brief."),
                ("user", "What is this?"),
                ("assistant", ""),
                ("tool", "42")
            ]
        );
        // The raw messages JSON, byte for byte as received.
        let start = body.find("[\n").unwrap();
        let end = body.find("],\"max_completion").unwrap() + 1;
        assert_eq!(messages_json, &body[start..end]);
        assert_eq!(b.prompt.prefix_text().unwrap(), &body[start..end]);
    }

    #[test]
    fn chat_errors() {
        let h = path("/v1/chat/completions");
        for bad in [
            r#"{"model":"m"}"#,
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","messages":null}"#,
            r#"{"model":"m","messages":"hi"}"#,
            r#"{"model":"m","messages":["hi"]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
            r#"{"model":"m","messages":[{"role":7,"content":"x"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"cache_salt":3}"#,
            // A prompt does not make a chat request valid.
            r#"{"model":"m","prompt":"x"}"#,
        ] {
            assert_eq!(
                err(bad.as_bytes(), &h),
                "invalid chat completions request: must have valid messages field",
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_json_is_the_reference_400() {
        let h = path("/v1/completions");
        for bad in [
            &b""[..],
            b"{",
            b"{\"model\":\"m\",\"prompt\":\"abc",
            b"{\"model\":\"m\",\"prompt\":\"a\"}}",
            b"[1,2]",
            b"\"just a string\"",
            b"{\"model\":\"m\" \"prompt\":\"a\"}",
            b"{\"model\":\"m\",\"prompt\":\"\xff\xfe\"}",
            b"nul",
        ] {
            let e = err(bad, &h);
            assert!(e.starts_with("error unmarshaling request bodyMap: "), "{e}");
        }
        // The 400 body as the gateway returns it.
        let e = parse(Bytes::from_static(b"{"), &h).unwrap_err();
        assert!(
            e.body()
                .starts_with("inference error: BadRequest - error unmarshaling request body")
        );
    }

    #[test]
    fn truncated_bodies_fail_at_every_cut() {
        let body = r#"{"model":"llama","messages":[{"role":"user","content":[{"type":"text","text":"hé\n\"x\""}]}],"stream":true}"#;
        let h = path("/v1/chat/completions");
        assert!(parse(Bytes::copy_from_slice(body.as_bytes()), &h).is_ok());
        for cut in 0..body.len() {
            assert!(
                parse(Bytes::copy_from_slice(&body.as_bytes()[..cut]), &h).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn model_with_escapes_splices_correctly() {
        let body =
            r#"{ "prompt": "the \"model\" is x", "model" : "org\/llama \"3\" \u00e9", "n": 1 }"#;
        let b = ok(body, &path("/v1/completions"));
        assert_eq!(b.model, "org/llama \"3\" é");
        let span = b.model_span.clone().unwrap();
        assert_eq!(&body[span], r#""org\/llama \"3\" \u00e9""#);
        let mut req = InferenceRequest::new("r", Headers::new(), Some(b));
        req.target_model = "new/\"model\" ✓".into();
        let out: serde_json::Value = serde_json::from_slice(&req.forward_body()).unwrap();
        assert_eq!(out["model"], "new/\"model\" ✓");
        assert_eq!(out["prompt"], "the \"model\" is x");
        assert_eq!(out["n"], 1);
    }

    #[test]
    fn unicode_and_escapes_in_prompts() {
        let b = ok(
            r#"{"model":"m","prompt":"naïve \ud83d\ude00 \"q\" \\ \n 日本語"}"#,
            &path("/v1/completions"),
        );
        assert_eq!(b.prompt, Prompt::Text("naïve 😀 \"q\" \\ \n 日本語".into()));
    }

    #[test]
    fn missing_or_non_string_model_is_left_to_the_director() {
        let h = path("/v1/completions");
        for body in [
            r#"{"prompt":"x"}"#,
            r#"{"model":null,"prompt":"x"}"#,
            r#"{"model":5,"prompt":"x"}"#,
            r#"{"model":{"a":1},"prompt":"x"}"#,
        ] {
            let b = ok(body, &h);
            assert_eq!(b.model, "");
            assert_eq!(b.model_span, None);
        }
        // Duplicate keys: the last wins.
        let b = ok(r#"{"model":"a","prompt":"x","model":"b"}"#, &h);
        assert_eq!(b.model, "b");
        assert_eq!(&b.raw[b.model_span.unwrap()], b"\"b\"");
    }

    #[test]
    fn api_from_path_and_from_fields() {
        assert_eq!(
            OpenAiApi::from_path("/v1/chat/completions?x=1"),
            OpenAiApi::ChatCompletions
        );
        assert_eq!(
            OpenAiApi::from_path("/v1/completions/"),
            OpenAiApi::Completions
        );
        assert_eq!(
            OpenAiApi::from_path("/v1/projects/p/locations/l/endpoints/openapi/chat/completions"),
            OpenAiApi::ChatCompletions
        );
        assert_eq!(OpenAiApi::from_path("/v1/responses"), OpenAiApi::Responses);
        assert_eq!(
            OpenAiApi::from_path("/v1/conversations"),
            OpenAiApi::Conversations
        );
        assert_eq!(
            OpenAiApi::from_path("/v1/embeddings"),
            OpenAiApi::Embeddings
        );
        assert_eq!(OpenAiApi::from_path("/v1/models"), OpenAiApi::Completions);
        // Fallback headers.
        let h: Headers = [("x-original-path", "/v1/embeddings")]
            .into_iter()
            .collect();
        assert_eq!(
            ok(r#"{"model":"m","input":"x"}"#, &h).api,
            ApiKind::Embeddings
        );
        // No path header: inferred from the fields.
        let none = Headers::new();
        assert_eq!(
            ok(
                r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
                &none
            )
            .api,
            ApiKind::ChatCompletions
        );
        assert_eq!(
            ok(r#"{"model":"m","prompt":"x"}"#, &none).api,
            ApiKind::Completions
        );
        assert_eq!(
            ok(r#"{"model":"m","input":"x"}"#, &none).api,
            ApiKind::Responses
        );
        assert_eq!(
            err(br#"{"model":"m"}"#, &none),
            "invalid completions request: must have prompt field"
        );
    }

    #[test]
    fn responses_conversations_embeddings() {
        let b = ok(
            r#"{"model":"m","instructions":"Be terse.","input":"Hi","tools":[{"type":"web"}],"max_output_tokens":5}"#,
            &path("/v1/responses"),
        );
        assert_eq!(b.api, ApiKind::Responses);
        assert_eq!(b.max_tokens, Some(5));
        assert_eq!(
            b.prompt.prefix_text().unwrap(),
            r#"[{"instructions":"Be terse."},{"tools":[{"type":"web"}]},{"input":"Hi"}]"#
        );
        let Prompt::Chat { messages, .. } = &b.prompt else {
            panic!()
        };
        assert_eq!(messages.len(), 2);
        assert_eq!(
            err(br#"{"model":"m"}"#, &path("/v1/responses")),
            "invalid responses request: must have input field"
        );
        assert_eq!(
            err(br#"{"model":"m","input":null}"#, &path("/v1/responses")),
            "invalid responses request: must have input field"
        );

        let b = ok(
            r#"{"items":[{"type":"message","role":"user","content":"hey"}]}"#,
            &path("/v1/conversations"),
        );
        assert_eq!(b.api, ApiKind::Other);
        assert_eq!(
            b.prompt.prefix_text().unwrap(),
            r#"[{"type":"message","role":"user","content":"hey"}]"#
        );
        assert_eq!(
            err(br#"{"items":[]}"#, &path("/v1/conversations")),
            "invalid conversations request: must have items field"
        );

        let h = path("/v1/embeddings");
        assert_eq!(
            ok(r#"{"model":"e","input":["a","b"]}"#, &h).prompt,
            Prompt::Strings(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            ok(r#"{"model":"e","input":[3,4]}"#, &h).prompt,
            Prompt::TokenIds(vec![3, 4])
        );
        assert_eq!(
            err(br#"{"model":"e","input":""}"#, &h),
            "invalid embeddings request: must have input field"
        );
    }

    #[test]
    fn lenient_optional_fields() {
        let h = path("/v1/completions");
        let b = ok(
            r#"{"model":"m","prompt":"x","stream":"yes","max_tokens":-1,"cache_salt":null}"#,
            &h,
        );
        assert!(!b.stream);
        assert_eq!(b.max_tokens, None);
        assert_eq!(b.cache_salt, None);
        assert_eq!(
            err(br#"{"model":"m","prompt":"x","cache_salt":["a"]}"#, &h),
            "invalid completions request: must have prompt field"
        );
    }

    #[test]
    fn huge_prompts() {
        let text = "token ".repeat(200_000);
        let body = format!(r#"{{"model":"m","prompt":"{text}"}}"#);
        let b = ok(&body, &path("/v1/completions"));
        assert_eq!(b.prompt.text_len(), text.len());
        let many: Vec<String> = (0..50_000).map(|i| i.to_string()).collect();
        let body = format!(r#"{{"model":"m","prompt":[{}]}}"#, many.join(","));
        let Prompt::TokenIds(ids) = ok(&body, &path("/v1/completions")).prompt else {
            panic!()
        };
        assert_eq!(ids.len(), 50_000);
        assert_eq!(ids[49_999], 49_999);
    }

    #[test]
    fn parser_plugin_and_parameters() {
        let p = crate::common::testutil::build(TYPE, None).unwrap();
        let parser = p.as_parser().unwrap();
        let out = parser
            .parse_request(
                Bytes::from_static(br#"{"model":"m","prompt":"x"}"#),
                &Headers::new(),
            )
            .unwrap();
        assert!(matches!(out, ParseOutcome::Parsed(b) if b.model == "m"));
        assert!(
            crate::common::testutil::build_err(TYPE, serde_json::json!({"strict": true}))
                .contains("unknown field")
        );
    }
}
