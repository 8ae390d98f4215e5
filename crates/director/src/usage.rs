//! Token usage from model-server responses, and the response model-name rewrite.
//!
//! * Non-streaming bodies are one JSON document: `usage.{prompt_tokens, completion_tokens,
//!   total_tokens}` and `usage.prompt_tokens_details.cached_tokens` (Responses/Conversations
//!   API: `input_tokens` / `output_tokens` / `input_tokens_details.cached_tokens`). A body
//!   that is not JSON yields no usage.
//! * Streaming bodies are server-sent events. [`SseUsageScanner`] is fed the chunks as they
//!   pass and reassembles lines across chunk boundaries (a `data:` line may be split anywhere,
//!   even inside the `data:` prefix). Only lines that mention `"usage"` are parsed, so the
//!   per-token chunks cost a byte scan, not a JSON parse. `data: [DONE]` is skipped. The last
//!   usage seen wins: vLLM sends it once on the final chunk, and with
//!   `continuous_usage_stats` every chunk carries cumulative counts, so the last is the total.
//!   The Responses API's `response.completed` event (usage nested under `response`) counts too.

use std::borrow::Cow;

use llmsched_core::request::Usage;
use serde::Deserialize;

/// Longest partial SSE line kept between chunks; longer lines are dropped (usage lines are
/// a few hundred bytes, so nothing of interest is lost).
const MAX_PARTIAL_LINE: usize = 1 << 20;

#[derive(Debug, Default, Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<f64>,
    #[serde(default)]
    completion_tokens: Option<f64>,
    #[serde(default)]
    total_tokens: Option<f64>,
    #[serde(default)]
    input_tokens: Option<f64>,
    #[serde(default)]
    output_tokens: Option<f64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    // The reference reads this (misspelled) key; accept it as well.
    #[serde(default)]
    prompt_token_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
}

#[derive(Debug, Default, Deserialize)]
struct NestedResponse {
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Debug, Default, Deserialize)]
struct Doc {
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    response: Option<NestedResponse>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

fn count(v: Option<f64>) -> Option<u64> {
    v.filter(|x| x.is_finite() && *x >= 0.0).map(|x| x as u64)
}

/// Usage as parsed, with whether the server reported cached tokens at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedUsage {
    /// The counts.
    pub usage: Usage,
    /// True when `*_tokens_details.cached_tokens` was present.
    pub cached_reported: bool,
}

impl RawUsage {
    fn into_usage(self) -> ParsedUsage {
        let prompt = count(self.prompt_tokens).or(count(self.input_tokens));
        let completion = count(self.completion_tokens).or(count(self.output_tokens));
        let cached = self
            .prompt_tokens_details
            .or(self.prompt_token_details)
            .or(self.input_tokens_details)
            .and_then(|d| count(d.cached_tokens));
        let prompt = prompt.unwrap_or(0);
        let completion = completion.unwrap_or(0);
        ParsedUsage {
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                // Saturating: the counts come from the model server (a forged or garbled
                // 1e300 saturates to u64::MAX instead of overflowing).
                total_tokens: count(self.total_tokens).unwrap_or(prompt.saturating_add(completion)),
                cached_tokens: cached.unwrap_or(0),
            },
            cached_reported: cached.is_some(),
        }
    }
}

/// Usage of one JSON document (a whole non-streaming body or one SSE event); `None` when the
/// text is not JSON or carries no usage.
pub fn usage_from_json(text: &[u8]) -> Option<ParsedUsage> {
    let doc: Doc = serde_json::from_slice(text).ok()?;
    if let Some(u) = doc.usage {
        return Some(u.into_usage());
    }
    if doc.kind.as_deref() == Some("response.completed") {
        return doc.response?.usage.map(RawUsage::into_usage);
    }
    None
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle, 0).is_some()
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() || from > hay.len() - needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = from;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(off) => {
                let at = i + off;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

/// Incremental usage extraction from a server-sent-event stream.
///
/// Lines longer than the line limit ([`MAX_PARTIAL_LINE`] by default) are skipped whole,
/// however the stream is cut into chunks, so the partial line it keeps between chunks never
/// exceeds the limit.
#[derive(Debug)]
pub struct SseUsageScanner {
    partial: Vec<u8>,
    overflowed: bool,
    usage: Option<ParsedUsage>,
    max_line: usize,
}

impl Default for SseUsageScanner {
    fn default() -> Self {
        Self::with_line_limit(MAX_PARTIAL_LINE)
    }
}

impl SseUsageScanner {
    /// A fresh scanner.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh scanner skipping lines longer than `max_line` bytes (without the line end).
    pub fn with_line_limit(max_line: usize) -> Self {
        Self {
            partial: Vec::new(),
            overflowed: false,
            usage: None,
            max_line,
        }
    }

    /// Bytes held for a line not finished yet (at most the line limit).
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// The last usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage.map(|p| p.usage)
    }

    /// The last usage seen so far, with whether cached tokens were reported.
    pub fn parsed(&self) -> Option<ParsedUsage> {
        self.usage
    }

    /// Feeds the next chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let piece = &rest[..nl];
            if self.partial.is_empty() && !self.overflowed {
                // A line over the limit is skipped here too, as it is when it arrives in
                // pieces: the result must not depend on where the chunks were cut.
                if piece.len() <= self.max_line {
                    self.line(piece);
                }
            } else {
                // The line's end may take it over the limit too.
                if !self.overflowed && self.partial.len() + piece.len() <= self.max_line {
                    self.partial.extend_from_slice(piece);
                    let line = std::mem::take(&mut self.partial);
                    self.line(&line);
                    self.partial = line;
                }
                self.partial.clear();
                self.overflowed = false;
            }
            rest = &rest[nl + 1..];
        }
        if !rest.is_empty() && !self.overflowed {
            if self.partial.len() + rest.len() > self.max_line {
                self.partial.clear();
                self.overflowed = true;
            } else {
                self.partial.extend_from_slice(rest);
            }
        }
    }

    /// Ends the stream: a final line without a newline is processed too.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() && !self.overflowed {
            let line = std::mem::take(&mut self.partial);
            self.line(&line);
        }
        self.partial.clear();
        self.overflowed = false;
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" || !contains(data, b"\"usage\"") {
            return;
        }
        if let Some(u) = usage_from_json(data) {
            self.usage = Some(u);
        }
    }
}

/// Rewrites `"model":"<from>"` (and `"model": "<from>"`) to the same with `<to>`, as the
/// reference does on responses so clients see the model name they asked for. Borrowed (no
/// copy) when nothing matches.
#[derive(Debug, Clone)]
pub struct ModelNameRewriter {
    patterns: [(Vec<u8>, Vec<u8>); 2],
}

impl ModelNameRewriter {
    /// A rewriter from `from` (the target model) to `to` (the requested one); `None` when the
    /// names are equal or either is empty (nothing to do).
    pub fn new(from: &str, to: &str) -> Option<Self> {
        if from.is_empty() || to.is_empty() || from == to {
            return None;
        }
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
        let (qf, qt) = (q(from), q(to));
        Some(Self {
            patterns: [
                (
                    format!("\"model\":{qf}").into_bytes(),
                    format!("\"model\":{qt}").into_bytes(),
                ),
                (
                    format!("\"model\": {qf}").into_bytes(),
                    format!("\"model\": {qt}").into_bytes(),
                ),
            ],
        })
    }

    /// `body` with every occurrence rewritten (the compact form first, as the reference).
    pub fn apply<'a>(&self, body: &'a [u8]) -> Cow<'a, [u8]> {
        for (from, to) in &self.patterns {
            if let Some(out) = replace_all(body, from, to) {
                return Cow::Owned(out);
            }
        }
        Cow::Borrowed(body)
    }
}

fn replace_all(hay: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let mut at = find(hay, from, 0)?;
    let mut out = Vec::with_capacity(hay.len() + to.len().saturating_sub(from.len()) * 2);
    let mut copied = 0;
    loop {
        out.extend_from_slice(&hay[copied..at]);
        out.extend_from_slice(to);
        copied = at + from.len();
        match find(hay, from, copied) {
            Some(next) => at = next,
            None => break,
        }
    }
    out.extend_from_slice(&hay[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE_LINE: &str = r#"data: {"id":"x","object":"text_completion","choices":[],"usage":{"prompt_tokens":7,"total_tokens":17,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":4}}}"#;

    fn stream() -> String {
        format!(
            "data: {{\"id\":\"x\",\"choices\":[{{\"text\":\"hi\"}}],\"usage\":null}}\n\n{USAGE_LINE}\n\ndata: [DONE]\n\n"
        )
    }

    #[test]
    fn json_usage_both_api_styles() {
        let p = usage_from_json(
            br#"{"object":"chat.completion","usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8,"prompt_tokens_details":{"cached_tokens":2}}}"#,
        )
        .unwrap();
        assert!(p.cached_reported);
        let u = p.usage;
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                total_tokens: 8,
                cached_tokens: 2
            }
        );
        let u = usage_from_json(
            br#"{"object":"response","usage":{"input_tokens":31,"output_tokens":9,"input_tokens_details":{"cached_tokens":16}}}"#,
        )
        .unwrap()
        .usage;
        assert_eq!((u.prompt_tokens, u.completion_tokens), (31, 9));
        assert_eq!((u.total_tokens, u.cached_tokens), (40, 16));
        let u = usage_from_json(
            br#"{"type":"response.completed","response":{"usage":{"input_tokens":2,"output_tokens":3,"total_tokens":5}}}"#,
        )
        .unwrap();
        assert_eq!(u.usage.total_tokens, 5);
        assert!(!u.cached_reported);
        assert!(usage_from_json(b"not json").is_none());
        assert!(usage_from_json(br#"{"choices":[]}"#).is_none());
        assert!(usage_from_json(br#"{"usage":null}"#).is_none());
    }

    #[test]
    fn sse_usage_survives_every_split_point() {
        let s = stream();
        let bytes = s.as_bytes();
        for split in 0..bytes.len() {
            let mut sc = SseUsageScanner::new();
            sc.feed(&bytes[..split]);
            sc.feed(&bytes[split..]);
            sc.finish();
            let u = sc
                .usage()
                .unwrap_or_else(|| panic!("no usage at split {split}"));
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
                (7, 10, 4)
            );
        }
        // Byte by byte.
        let mut sc = SseUsageScanner::new();
        for b in bytes {
            sc.feed(std::slice::from_ref(b));
        }
        assert_eq!(sc.usage().map(|u| u.total_tokens), Some(17));
    }

    #[test]
    fn sse_last_usage_wins_and_crlf_and_no_space() {
        let mut sc = SseUsageScanner::new();
        sc.feed(b"data:{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\r\n\r\n");
        sc.feed(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n");
        assert_eq!(sc.usage().map(|u| u.completion_tokens), Some(2));
        // An unterminated last line counts at finish.
        sc.feed(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":3}}");
        assert_eq!(sc.usage().map(|u| u.completion_tokens), Some(2));
        sc.finish();
        assert_eq!(sc.usage().map(|u| u.completion_tokens), Some(3));
    }

    #[test]
    fn sse_ignores_garbage_and_overlong_lines() {
        let mut sc = SseUsageScanner::new();
        sc.feed(b"event: ping\n: comment\ndata: {broken \"usage\"\n");
        let big = vec![b'a'; MAX_PARTIAL_LINE + 10];
        sc.feed(&big);
        sc.feed(b"\"usage\":{\"prompt_tokens\":9}}\n");
        assert!(sc.usage().is_none());
        sc.feed(b"data: {\"usage\":{\"prompt_tokens\":9}}\n");
        assert_eq!(sc.usage().map(|u| u.prompt_tokens), Some(9));
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        // Found by the property tests: prompt + completion overflowed (a panic in debug
        // builds, a wrapped total in release).
        let p = usage_from_json(br#"{"usage":{"prompt_tokens":1e300,"completion_tokens":1e300}}"#)
            .unwrap();
        assert_eq!(p.usage.prompt_tokens, u64::MAX);
        assert_eq!(p.usage.total_tokens, u64::MAX);
    }

    #[test]
    fn lines_over_the_limit_are_skipped_however_they_arrive() {
        // Found by the property tests: a long line was parsed when it arrived whole, or when
        // its last piece took it over the limit, but skipped when its pieces went over first.
        let line = b"data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n";
        let limit = line.len() - 2;
        for cut in 0..line.len() {
            let mut sc = SseUsageScanner::with_line_limit(limit);
            sc.feed(&line[..cut]);
            sc.feed(&line[cut..]);
            sc.finish();
            assert_eq!(sc.usage(), None, "cut at {cut}");
            assert!(sc.buffered() <= limit);
        }
        let mut sc = SseUsageScanner::with_line_limit(line.len() - 1);
        sc.feed(line);
        assert_eq!(sc.usage().map(|u| u.prompt_tokens), Some(5), "at the limit");
    }

    #[test]
    fn model_name_rewrite() {
        assert!(ModelNameRewriter::new("a", "a").is_none());
        assert!(ModelNameRewriter::new("", "a").is_none());
        let r = ModelNameRewriter::new("base-v2", "base").unwrap();
        let body = br#"{"model":"base-v2","x":{"model":"base-v2"},"m":"base-v2"}"#;
        assert_eq!(
            &*r.apply(body),
            br#"{"model":"base","x":{"model":"base"},"m":"base-v2"}"#
        );
        let spaced = br#"{"model": "base-v2", "n": 1}"#;
        assert_eq!(&*r.apply(spaced), br#"{"model": "base", "n": 1}"#);
        let other = br#"{"model":"other"}"#;
        assert!(matches!(r.apply(other), Cow::Borrowed(_)));
    }
}
