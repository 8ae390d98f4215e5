//! Rewrites `usage.prompt_tokens_details.cached_tokens` in the decoder's answer to the prefill
//! replica's value, as the reference sidecar does for NIXL: the decoder reports everything it
//! did not compute (the transferred prompt) as cached, while the cache hit that matters to a
//! client is the prefill replica's.
//!
//! JSON bodies are rewritten whole; SSE streams line by line as complete lines arrive (only
//! `data:` lines whose JSON has a `usage` object change; `[DONE]` and other lines pass).
//! Where the number is present it is replaced in place, keeping vLLM's field order; a missing
//! or `null` `prompt_tokens_details` is filled in.

use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};

const FIELD: &[u8] = b"\"cached_tokens\":";

/// Replaces the digits after the only `"cached_tokens":` of `s`, if there is exactly one
/// followed by an integer.
fn replace_in_place(s: &[u8], cached: u64) -> Option<Vec<u8>> {
    let first = s.windows(FIELD.len()).position(|w| w == FIELD)?;
    let after = first + FIELD.len();
    if s[after..].windows(FIELD.len()).any(|w| w == FIELD) {
        return None;
    }
    let digits = s[after..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() + 8);
    out.extend_from_slice(&s[..after]);
    out.extend_from_slice(cached.to_string().as_bytes());
    out.extend_from_slice(&s[after + digits..]);
    Some(out)
}

/// The JSON document `body` with its usage's cached tokens set to `cached`; `None` when it is
/// not JSON or has no `usage` object (leave it as it is).
pub fn rewrite_json(body: &[u8], cached: u64) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let usage = v.get_mut("usage")?.as_object_mut()?;
    match usage.get("prompt_tokens_details") {
        Some(Value::Object(d)) if d.get("cached_tokens").is_some_and(Value::is_u64) => {
            if d.get("cached_tokens").and_then(Value::as_u64) == Some(cached) {
                return Some(body.to_vec());
            }
            if let Some(out) = replace_in_place(body, cached) {
                return Some(out);
            }
            usage.insert(
                "prompt_tokens_details".into(),
                json!({ "cached_tokens": cached }),
            );
        }
        Some(Value::Object(_)) => {
            if let Some(Value::Object(d)) = usage.get_mut("prompt_tokens_details") {
                d.insert("cached_tokens".into(), json!(cached));
            }
        }
        _ => {
            usage.insert(
                "prompt_tokens_details".into(),
                json!({ "cached_tokens": cached }),
            );
        }
    }
    serde_json::to_vec(&v).ok()
}

/// Rewrites one SSE line (with its line ending).
fn rewrite_line(line: &[u8], cached: u64) -> Option<Vec<u8>> {
    let trimmed_len = line
        .iter()
        .rposition(|b| *b != b'\n' && *b != b'\r')
        .map_or(0, |p| p + 1);
    let (content, ending) = line.split_at(trimmed_len);
    let data = content.strip_prefix(b"data: ".as_slice())?;
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    let json = rewrite_json(data, cached)?;
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(ending);
    Some(out)
}

/// Streaming rewriter for an SSE body.
#[derive(Debug)]
pub struct SseRewriter {
    cached: u64,
    pending: BytesMut,
}

impl SseRewriter {
    /// A rewriter setting cached tokens to `cached`.
    pub fn new(cached: u64) -> Self {
        Self {
            cached,
            pending: BytesMut::new(),
        }
    }

    /// Feeds a chunk; returns the complete lines it finished (rewritten), possibly empty.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let Some(last_nl) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return Bytes::new();
        };
        let complete = self.pending.split_to(last_nl + 1);
        let mut out = BytesMut::with_capacity(complete.len() + 16);
        for line in complete.split_inclusive(|b| *b == b'\n') {
            match rewrite_line(line, self.cached) {
                Some(l) => out.extend_from_slice(&l),
                None => out.extend_from_slice(line),
            }
        }
        out.freeze()
    }

    /// The rest of the stream (an unterminated last line), rewritten if it is a data line.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        match rewrite_line(&rest, self.cached) {
            Some(l) => Bytes::from(l),
            None => rest.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_get_the_prefill_cached_tokens_in_place() {
        let body = br#"{"id":"x","usage":{"prompt_tokens":200,"total_tokens":220,"completion_tokens":20,"prompt_tokens_details":{"cached_tokens":199}},"kv_transfer_params":null}"#;
        let out = rewrite_json(body, 16).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":"x","usage":{"prompt_tokens":200,"total_tokens":220,"completion_tokens":20,"prompt_tokens_details":{"cached_tokens":16}},"kv_transfer_params":null}"#
        );
        // Missing or null details are filled in.
        for body in [
            br#"{"usage":{"prompt_tokens":3}}"#.as_slice(),
            br#"{"usage":{"prompt_tokens":3,"prompt_tokens_details":null}}"#.as_slice(),
            br#"{"usage":{"prompt_tokens":3,"prompt_tokens_details":{}}}"#.as_slice(),
        ] {
            let v: Value = serde_json::from_slice(&rewrite_json(body, 5).unwrap()).unwrap();
            assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 5);
            assert_eq!(v["usage"]["prompt_tokens"], 3);
        }
        assert!(rewrite_json(b"{not json", 1).is_none());
        assert!(rewrite_json(br#"{"usage":null}"#, 1).is_none());
        assert!(rewrite_json(br#"{"choices":[]}"#, 1).is_none());
    }

    #[test]
    fn text_that_mentions_cached_tokens_is_not_touched() {
        let body = br#"{"choices":[{"text":"\"cached_tokens\":5"}],"usage":{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":9}}}"#;
        let v: Value = serde_json::from_slice(&rewrite_json(body, 2).unwrap()).unwrap();
        assert_eq!(v["choices"][0]["text"], "\"cached_tokens\":5");
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    }

    #[test]
    fn sse_lines_are_rewritten_across_chunk_boundaries() {
        let stream = "data: {\"choices\":[{\"text\":\" a\"}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":200,\"total_tokens\":203,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":199}}}\n\n\
                      data: [DONE]\n\n";
        let want = stream.replace("\"cached_tokens\":199", "\"cached_tokens\":0");
        for split in [1, 7, 40, 100, stream.len()] {
            let mut r = SseRewriter::new(0);
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(split) {
                out.extend_from_slice(&r.push(chunk));
            }
            out.extend_from_slice(&r.finish());
            assert_eq!(String::from_utf8(out).unwrap(), want, "split {split}");
        }
        // A complete line is released at once; a partial one waits.
        let mut r = SseRewriter::new(0);
        assert_eq!(
            &r.push(b"data: {\"a\":1}\n\ndata: {\"b\"")[..],
            &b"data: {\"a\":1}\n\n"[..]
        );
        assert_eq!(&r.finish()[..], b"data: {\"b\"");
    }
}
