//! Incremental server-sent-events parsing and OpenAI chunk decoding.
//!
//! [`SseLines`] splits a byte stream into lines as frames arrive (a line may span frames) and
//! hands over the payload of every `data:` line without copying it unless it was split.
//! [`parse_chunk`] decodes one payload, borrowing the generated text from the input when it
//! has no escapes. Like inference-perf, payloads that are not JSON are skipped (and counted by
//! the caller), `data: [DONE]` ends the stream and `usage` objects are merged field by field.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};

/// Line splitter for an SSE byte stream.
#[derive(Debug, Default)]
pub struct SseLines {
    partial: Vec<u8>,
}

/// One `data:` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseData<'a> {
    /// A payload other than `[DONE]` (normally a JSON chunk).
    Payload(&'a [u8]),
    /// `data: [DONE]`.
    Done,
}

impl SseLines {
    /// A parser with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the body; `on_data` receives every complete `data:` line.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_data: impl FnMut(SseData<'_>)) {
        if !self.partial.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                None => {
                    self.partial.extend_from_slice(bytes);
                    return;
                }
                Some(i) => {
                    self.partial.extend_from_slice(&bytes[..i]);
                    let line = std::mem::take(&mut self.partial);
                    handle_line(&line, &mut on_data);
                    self.partial = line;
                    self.partial.clear();
                    bytes = &bytes[i + 1..];
                }
            }
        }
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            handle_line(&bytes[..i], &mut on_data);
            bytes = &bytes[i + 1..];
        }
        self.partial.extend_from_slice(bytes);
    }

    /// Bytes of an unterminated last line (non-empty means the stream stopped mid-line).
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

fn handle_line(line: &[u8], on_data: &mut impl FnMut(SseData<'_>)) {
    let Some(rest) = line.strip_prefix(b"data:") else {
        // Comments, `event:`, `id:`, `retry:` and blank separators carry nothing we use.
        return;
    };
    let payload = rest.trim_ascii();
    if payload.is_empty() {
        return;
    }
    if payload == b"[DONE]" {
        on_data(SseData::Done);
    } else {
        on_data(SseData::Payload(payload));
    }
}

/// Token usage reported by the server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: Option<u64>,
}

impl Usage {
    /// Overwrites fields present in `other` (inference-perf's `{**old, **new}`).
    pub fn merge(&mut self, other: &Usage) {
        if other.prompt_tokens.is_some() {
            self.prompt_tokens = other.prompt_tokens;
        }
        if other.completion_tokens.is_some() {
            self.completion_tokens = other.completion_tokens;
        }
        if other.cached_tokens.is_some() {
            self.cached_tokens = other.cached_tokens;
        }
    }
}

/// A decoded chunk (or a whole non-streamed response).
#[derive(Debug, Default)]
pub struct ParsedChunk<'a> {
    /// Generated text: `choices[0].text`, `choices[0].delta.content` or
    /// `choices[0].message.content`.
    pub text: Option<Cow<'a, str>>,
    /// The `usage` object, if any.
    pub usage: Option<Usage>,
}

/// Decodes one JSON payload.
pub fn parse_chunk(payload: &[u8]) -> Result<ParsedChunk<'_>, serde_json::Error> {
    let wire: WireChunk<'_> = serde_json::from_slice(payload)?;
    let text = wire.choices.0.and_then(|c| {
        c.text
            .or_else(|| c.delta.and_then(|d| d.content))
            .or_else(|| c.message.and_then(|m| m.content))
    });
    let usage = wire.usage.map(|u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
    });
    Ok(ParsedChunk { text, usage })
}

#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(borrow, default)]
    choices: FirstChoice<'a>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<WireDetails>,
}

#[derive(Deserialize)]
struct WireDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_opt_str")]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<WireContent<'a>>,
    #[serde(borrow, default)]
    message: Option<WireContent<'a>>,
}

#[derive(Deserialize)]
struct WireContent<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_opt_str")]
    content: Option<Cow<'a, str>>,
}

/// `Option<Cow<str>>` that borrows from the input when the string has no escapes (serde's own
/// `Option<Cow>` always allocates).
fn borrowed_opt_str<'de: 'a, 'a, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_str(self)
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
    }
    d.deserialize_option(V)
}

/// The first element of `choices` (the rest are skipped without allocating).
#[derive(Default)]
struct FirstChoice<'a>(Option<WireChoice<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = FirstChoice<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(FirstChoice(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(FirstChoice(None))
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                d.deserialize_seq(self)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first: Option<WireChoice<'a>> = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstChoice(first))
            }
        }
        deserializer.deserialize_option(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(frames: &[&[u8]]) -> (Vec<String>, usize) {
        let mut p = SseLines::new();
        let mut out = Vec::new();
        for f in frames {
            p.feed(f, |d| {
                out.push(match d {
                    SseData::Payload(b) => String::from_utf8_lossy(b).into_owned(),
                    SseData::Done => "[DONE]".to_owned(),
                })
            });
        }
        (out, p.pending())
    }

    #[test]
    fn splits_events_across_arbitrary_frame_boundaries() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: comment\nevent: x\ndata:{\"c\":3}\n\ndata: [DONE]\n\n";
        let expected = vec!["{\"a\":1}", "{\"b\":2}", "{\"c\":3}", "[DONE]"];
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            let (out, pending) = collect(&[a, b]);
            assert_eq!(out, expected, "split at {split}");
            assert_eq!(pending, 0);
        }
        // One byte at a time.
        let frames: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(collect(&frames).0, expected);
    }

    #[test]
    fn reports_an_unterminated_tail() {
        let (out, pending) = collect(&[b"data: {\"a\":1}\n\ndata: {\"b\""]);
        assert_eq!(out, vec!["{\"a\":1}"]);
        assert_eq!(pending, 10);
    }

    #[test]
    fn decodes_completion_chat_and_usage_chunks() {
        let c = parse_chunk(br#"{"id":"x","object":"text_completion","choices":[{"index":0,"text":" hello","finish_reason":null}]}"#)
            .expect("completion");
        assert!(matches!(c.text, Some(Cow::Borrowed(" hello"))));
        assert!(c.usage.is_none());

        let c = parse_chunk(br#"{"choices":[{"delta":{"content":"a\"b"}}]}"#).expect("chat");
        assert_eq!(c.text.as_deref(), Some("a\"b"));

        let c = parse_chunk(br#"{"choices":[{"delta":{"role":"assistant"}}]}"#).expect("role");
        assert!(c.text.is_none());

        let c = parse_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}"#,
        )
        .expect("usage");
        assert!(c.text.is_none());
        assert_eq!(
            c.usage,
            Some(Usage {
                prompt_tokens: Some(12),
                completion_tokens: Some(3),
                cached_tokens: Some(8)
            })
        );

        let c = parse_chunk(br#"{"choices":[{"message":{"content":"full"}}],"usage":{"prompt_tokens":2,"prompt_tokens_details":null}}"#)
            .expect("non-streamed chat");
        assert_eq!(c.text.as_deref(), Some("full"));
        assert_eq!(c.usage.and_then(|u| u.cached_tokens), None);

        let c = parse_chunk(br#"{"choices":null,"usage":null}"#).expect("nulls");
        assert!(c.text.is_none() && c.usage.is_none());

        assert!(parse_chunk(b"not json").is_err());
        assert!(parse_chunk(br#"{"choices":[{"text":1}]}"#).is_err());
    }

    #[test]
    fn usage_merge_keeps_earlier_fields() {
        let mut u = Usage {
            prompt_tokens: Some(5),
            completion_tokens: None,
            cached_tokens: Some(1),
        };
        u.merge(&Usage {
            prompt_tokens: None,
            completion_tokens: Some(7),
            cached_tokens: Some(2),
        });
        assert_eq!(
            u,
            Usage {
                prompt_tokens: Some(5),
                completion_tokens: Some(7),
                cached_tokens: Some(2)
            }
        );
    }
}
