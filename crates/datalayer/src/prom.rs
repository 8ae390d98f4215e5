//! A strict, allocation-light parser for the Prometheus text exposition format (version 0.0.4,
//! what vLLM, SGLang, TensorRT-LLM and Triton serve on `/metrics`).
//!
//! # Why not a crate
//!
//! The candidates (`prometheus-parse`, `prometheus-http-query`'s parser, `openmetrics-parser`)
//! build an owned tree of every family, sample and label of the page (a vLLM page carries a few
//! hundred samples, mostly histogram buckets) with regular expressions or a parser generator,
//! and are lenient about malformed lines. The scraper runs this every 50 ms per endpoint and
//! needs five or so values, so this module instead:
//!
//! * validates **every** line (metric and label names, label-block syntax and escapes, the
//!   value, the optional timestamp, `# TYPE` lines), so a truncated body, an HTML error page
//!   or other garbage is rejected as a whole with the line number and an excerpt; and
//! * materializes only the samples of the wanted metric names, as borrowed slices of the
//!   body (a sample's labels stay as the raw label block and are decoded on demand), so a
//!   scrape allocates one small vector regardless of page size.
//!
//! Values follow the format: `NaN`, `+Inf` and `-Inf` are legal here; whether a value makes
//! sense for a gauge is decided by the extractor (see [`crate::mapping`]), which rejects
//! non-finite values with a clear error.
//!
//! Not supported, by design: OpenMetrics exemplars (` # {..}` after a value) and the quoted
//! UTF-8 metric names of Prometheus 3 (`{"name"}`); the scraper asks for text 0.0.4. The
//! OpenMetrics `# EOF` marker is accepted (it is a comment).

use std::borrow::Cow;
use std::fmt;

/// A malformed exposition body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}: `{excerpt}`")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
    /// The start of the offending line (at most 80 characters).
    pub excerpt: String,
}

/// One sample of a wanted metric, borrowing from the parsed body.
#[derive(Clone, PartialEq)]
pub struct Sample<'a> {
    /// Index of the metric name in the `wanted` list given to [`parse`].
    pub family: usize,
    /// The raw (still escaped) label block between the braces; empty when there is none.
    raw_labels: &'a str,
    /// The value (may be NaN or infinite).
    pub value: f64,
    /// The optional timestamp, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl fmt::Debug for Sample<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sample")
            .field("family", &self.family)
            .field("labels", &self.raw_labels)
            .field("value", &self.value)
            .field("timestamp_ms", &self.timestamp_ms)
            .finish()
    }
}

impl<'a> Sample<'a> {
    /// The labels, in page order, with values unescaped.
    pub fn labels(&self) -> LabelIter<'a> {
        LabelIter {
            rest: self.raw_labels,
        }
    }

    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<Cow<'a, str>> {
        self.labels().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Iterator over a sample's labels (`name`, unescaped value).
#[derive(Debug, Clone)]
pub struct LabelIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = (&'a str, Cow<'a, str>);

    fn next(&mut self) -> Option<Self::Item> {
        // The block was validated by `parse`, so this re-scan only has to find the pieces;
        // on any inconsistency it simply stops.
        let s = self.rest.trim_start_matches([' ', '\t', ',']);
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let eq = s.find('=')?;
        let name = s[..eq].trim_end_matches([' ', '\t']);
        let after = s[eq + 1..].trim_start_matches([' ', '\t']);
        let body = after.strip_prefix('"')?;
        let bytes = body.as_bytes();
        let mut i = 0;
        let mut escaped = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                b'"' => break,
                _ => i += 1,
            }
        }
        let raw = body.get(..i)?;
        self.rest = body.get(i + 1..).unwrap_or("");
        let value = if escaped {
            Cow::Owned(unescape(raw))
        } else {
            Cow::Borrowed(raw)
        };
        Some((name, value))
    }
}

fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts of what a parse saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// Lines in the body.
    pub lines: usize,
    /// Sample lines (of any metric).
    pub samples: usize,
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

fn is_label_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_label_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blanks(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_blank(b[i]) {
        i += 1;
    }
    i
}

fn excerpt(line: &str) -> String {
    const MAX: usize = 80;
    if line.len() <= MAX {
        return line.to_string();
    }
    let mut end = MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

const TYPES: [&str; 9] = [
    "counter",
    "gauge",
    "histogram",
    "summary",
    "untyped",
    // OpenMetrics types, harmless to accept in a comment.
    "unknown",
    "info",
    "stateset",
    "gaugehistogram",
];

/// Parses `text`, appending to `out` the samples whose metric name is in `wanted` (with the
/// index of the name in `wanted`). Every line is validated; the first malformed line fails
/// the whole body (and `out` should then be discarded).
pub fn parse<'a, S: AsRef<str>>(
    text: &'a str,
    wanted: &[S],
    out: &mut Vec<Sample<'a>>,
) -> Result<ParseStats, ParseError> {
    let mut stats = ParseStats::default();
    for (idx, raw_line) in text.split('\n').enumerate() {
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        stats.lines = idx + 1;
        let fail = |message: String| ParseError {
            line: idx + 1,
            message,
            excerpt: excerpt(line),
        };
        let b = line.as_bytes();
        let start = skip_blanks(b, 0);
        if start == b.len() {
            continue;
        }
        if b[start] == b'#' {
            parse_comment(&line[start + 1..]).map_err(fail)?;
            continue;
        }
        stats.samples += 1;
        let parsed = parse_sample(line, start).map_err(fail)?;
        if let Some(family) = wanted.iter().position(|w| w.as_ref() == parsed.name) {
            out.push(Sample {
                family,
                raw_labels: parsed.raw_labels,
                value: parsed.value,
                timestamp_ms: parsed.timestamp_ms,
            });
        }
    }
    Ok(stats)
}

fn parse_comment(rest: &str) -> Result<(), String> {
    let mut parts = rest.trim_start_matches([' ', '\t']).splitn(3, [' ', '\t']);
    let keyword = parts.next().unwrap_or("");
    if keyword != "HELP" && keyword != "TYPE" {
        return Ok(()); // a free-form comment (or `# EOF`)
    }
    let name = parts.next().unwrap_or("");
    if !valid_metric_name(name) {
        return Err(format!("invalid metric name '{name}' in # {keyword}"));
    }
    if keyword == "TYPE" {
        let ty = parts.next().unwrap_or("").trim_matches([' ', '\t']);
        if !TYPES.contains(&ty) {
            return Err(format!("unknown metric type '{ty}' for {name}"));
        }
    }
    Ok(())
}

fn valid_metric_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && is_name_start(b[0]) && b[1..].iter().all(|&c| is_name_char(c))
}

struct ParsedSample<'a> {
    name: &'a str,
    raw_labels: &'a str,
    value: f64,
    timestamp_ms: Option<i64>,
}

fn parse_sample(line: &str, start: usize) -> Result<ParsedSample<'_>, String> {
    let b = line.as_bytes();
    let mut i = start;
    if !is_name_start(b[i]) {
        return Err("expected a metric name".into());
    }
    while i < b.len() && is_name_char(b[i]) {
        i += 1;
    }
    let name = &line[start..i];
    let name_end = i;
    i = skip_blanks(b, i);
    let mut raw_labels = "";
    let mut had_labels = false;
    if i < b.len() && b[i] == b'{' {
        let open = i;
        i = parse_label_block(b, i + 1)?;
        raw_labels = &line[open + 1..i - 1];
        had_labels = true;
        i = skip_blanks(b, i);
    }
    if i == b.len() {
        return Err(format!("missing value for {name}"));
    }
    if !had_labels && i == name_end {
        return Err(format!(
            "invalid character '{}' in metric name",
            char_at(line, i)
        ));
    }
    let value_start = i;
    while i < b.len() && !is_blank(b[i]) {
        i += 1;
    }
    let token = &line[value_start..i];
    let value = parse_value(token).ok_or_else(|| format!("invalid value '{token}' for {name}"))?;
    i = skip_blanks(b, i);
    let mut timestamp_ms = None;
    if i < b.len() {
        let ts_start = i;
        while i < b.len() && !is_blank(b[i]) {
            i += 1;
        }
        let token = &line[ts_start..i];
        timestamp_ms = Some(
            token
                .parse::<i64>()
                .map_err(|_| format!("invalid timestamp '{token}' for {name}"))?,
        );
        i = skip_blanks(b, i);
        if i < b.len() {
            return Err(format!("unexpected text after the timestamp of {name}"));
        }
    }
    Ok(ParsedSample {
        name,
        raw_labels,
        value,
        timestamp_ms,
    })
}

fn char_at(line: &str, i: usize) -> char {
    line.get(i..).and_then(|s| s.chars().next()).unwrap_or('?')
}

/// Parses labels after `{`; returns the index just past the closing `}`.
fn parse_label_block(b: &[u8], mut i: usize) -> Result<usize, String> {
    loop {
        i = skip_blanks(b, i);
        match b.get(i) {
            None => return Err("unterminated label set".into()),
            Some(b'}') => return Ok(i + 1),
            Some(&c) if is_label_start(c) => {}
            Some(_) => return Err("expected a label name".into()),
        }
        let name_start = i;
        while i < b.len() && is_label_char(b[i]) {
            i += 1;
        }
        // Label names are ASCII; only decoded for error messages.
        let name_bytes = &b[name_start..i];
        let name = || String::from_utf8_lossy(name_bytes);
        i = skip_blanks(b, i);
        if b.get(i) != Some(&b'=') {
            return Err(format!("expected '=' after label name '{}'", name()));
        }
        i = skip_blanks(b, i + 1);
        if b.get(i) != Some(&b'"') {
            return Err(format!(
                "expected '\"' to open the value of label '{}'",
                name()
            ));
        }
        i += 1;
        loop {
            // Jump to the next quote or backslash (a tight loop over the value).
            let Some(off) = b[i..].iter().position(|&c| c == b'"' || c == b'\\') else {
                return Err(format!("unterminated value of label '{}'", name()));
            };
            i += off;
            if b[i] == b'"' {
                i += 1;
                break;
            }
            match b.get(i + 1) {
                Some(b'\\' | b'"' | b'n') => i += 2,
                _ => {
                    return Err(format!("invalid escape sequence in label '{}'", name()));
                }
            }
        }
        i = skip_blanks(b, i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Ok(i + 1),
            None => return Err("unterminated label set".into()),
            Some(_) => return Err(format!("expected ',' or '}}' after label '{}'", name())),
        }
    }
}

/// A sample value: a decimal float, `NaN`, `+Inf`, `-Inf` (any case, as Go's parser).
fn parse_value(token: &str) -> Option<f64> {
    // Rust's float syntax matches Go's `ParseFloat` for everything exporters write (decimal,
    // exponent, `NaN`, `Inf`/`+Inf`/`-Inf`/`Infinity` in any case); the token holds no blanks.
    token.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all<'a>(text: &'a str, wanted: &[&str]) -> Result<Vec<Sample<'a>>, ParseError> {
        let mut out = Vec::new();
        parse(text, wanted, &mut out)?;
        Ok(out)
    }

    #[test]
    fn parses_wanted_samples_with_labels_and_timestamps() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
                    # TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
                    vllm:num_requests_running{model_name=\"m\",} 7 1700000000000\n\
                    other_metric 1e3\n\
                    vllm:num_requests_waiting{engine=\"1\",model_name=\"a \\\"q\\\" \\\\ \\n\"} +Inf\n";
        let s = parse_all(
            text,
            &["vllm:num_requests_running", "vllm:num_requests_waiting"],
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].family, 1);
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[0].label("engine").as_deref(), Some("0"));
        assert_eq!(s[0].label("model_name").as_deref(), Some("m"));
        assert_eq!(s[0].label("nope"), None);
        assert_eq!(s[1].family, 0);
        assert_eq!(s[1].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(s[1].labels().count(), 1);
        assert!(s[2].value.is_infinite());
        assert_eq!(
            s[2].label("model_name").as_deref(),
            Some("a \"q\" \\ \n"),
            "escapes decoded"
        );
    }

    #[test]
    fn accepts_format_corner_cases() {
        let text = "\r\n  # free comment\nm 1\r\nm{} 2\nm  {a=\"\"}\t3\nm NaN\nm -Inf\n# EOF\n";
        let s = parse_all(text, &["m"]).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[1].labels().count(), 0);
        assert_eq!(s[2].label("a").as_deref(), Some(""));
        assert!(s[3].value.is_nan());
        assert_eq!(s[4].value, f64::NEG_INFINITY);
    }

    #[test]
    fn rejects_garbage_with_line_and_excerpt() {
        let cases = [
            (
                "<html><body>502 Bad Gateway</body></html>",
                1,
                "metric name",
            ),
            ("m 1\nm{a=\"x\"", 2, "unterminated"),
            ("m 1\nm{a=\"x", 2, "unterminated value"),
            ("m{a=x} 1", 1, "expected '\"'"),
            ("m{a} 1", 1, "expected '='"),
            ("m{1a=\"x\"} 1", 1, "label name"),
            ("m{a=\"\\t\"} 1", 1, "escape"),
            ("m", 1, "missing value"),
            ("m{a=\"b\"}", 1, "missing value"),
            ("m 1 2 3", 1, "after the timestamp"),
            ("m 1 notatime", 1, "invalid timestamp"),
            ("m abc", 1, "invalid value"),
            ("m-x 1", 1, "invalid character '-'"),
            ("# TYPE m histogramm\nm 1", 1, "unknown metric type"),
            ("# HELP 1m help", 1, "invalid metric name"),
            ("m 1\nm {a=\"b\"} 1 2\n\u{0}\u{1}", 3, "metric name"),
        ];
        for (text, line, needle) in cases {
            let e = parse_all(text, &["m"]).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn excerpt_is_capped_on_a_char_boundary() {
        let long = format!("{}é 1", "€".repeat(100));
        let e = parse_all(&long, &["m"]).unwrap_err();
        assert!(e.excerpt.chars().count() <= 81, "{}", e.excerpt);
        assert!(e.excerpt.ends_with('…'));
    }

    #[test]
    fn unwanted_lines_are_validated_but_not_collected() {
        let text = "a 1\nb{x=\"y\"} 2\n";
        let mut out = Vec::new();
        let stats = parse(text, &["c"], &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(stats.samples, 2);
        assert_eq!(stats.lines, 3);
    }
}
