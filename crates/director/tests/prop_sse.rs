//! Property tests of the usage accounting of streamed responses (server-sent events from a
//! model server): however the stream is cut into chunks, the scanner finds the same usage as
//! when it sees the stream in one piece, and that usage is the last one a line within the
//! line limit carried; arbitrary bytes never panic and the scanner never holds more than the
//! line limit between chunks. Non-streaming bodies (`usage_from_json`) never panic either.
//!
//! Case count: `PROPTEST_CASES` (default 256 per property).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use llmsched_director::usage::{ModelNameRewriter, SseUsageScanner, usage_from_json};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[derive(Debug, Clone)]
enum Event {
    /// `data: {..."usage":{...}}` with (prompt, completion, cached?) and padding text.
    Usage(u32, u32, Option<u32>, String, bool),
    /// A token chunk without usage.
    Token(String),
    Done,
    Comment(String),
    Named(String),
    Blank,
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('a'),
            Just(' '),
            Just('é'),
            Just('"'),
            Just('\\'),
            Just(':'),
            Just('u'),
        ],
        0..40,
    )
    .prop_map(String::from_iter)
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(any::<u32>()),
            text(),
            any::<bool>()
        )
            .prop_map(|(p, c, k, pad, space)| Event::Usage(p, c, k, pad, space)),
        text().prop_map(Event::Token),
        Just(Event::Done),
        text().prop_map(Event::Comment),
        text().prop_map(Event::Named),
        Just(Event::Blank),
    ]
}

impl Event {
    /// The line (without its end).
    fn line(&self) -> String {
        match self {
            Event::Usage(p, c, k, pad, space) => {
                let mut usage = serde_json::json!({"prompt_tokens": p, "completion_tokens": c});
                if let Some(k) = k {
                    usage["prompt_tokens_details"] = serde_json::json!({"cached_tokens": k});
                }
                let doc = serde_json::json!({"id": "x", "pad": pad, "choices": [], "usage": usage});
                format!("data:{}{doc}", if *space { " " } else { "" })
            }
            Event::Token(t) => {
                format!(
                    "data: {}",
                    serde_json::json!({"choices": [{"text": t}], "usage": null})
                )
            }
            Event::Done => "data: [DONE]".into(),
            Event::Comment(t) => format!(": {}", t.replace(['\n', '\r'], "")),
            Event::Named(t) => format!("event: {}", t.replace(['\n', '\r'], "")),
            Event::Blank => String::new(),
        }
    }
}

/// (prompt, completion, cached, cached reported).
type Seen = Option<(u64, u64, u64, bool)>;

/// A stream, the usage a correct scanner must report, and the line limit used.
fn stream() -> impl Strategy<Value = (Vec<u8>, Seen, usize)> {
    (
        proptest::collection::vec(event(), 0..12),
        any::<bool>(),
        prop_oneof![Just(1usize << 20), 60usize..400],
        any::<bool>(),
    )
        .prop_map(|(events, crlf, limit, final_newline)| {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut out = String::new();
            let mut expected = None;
            let n = events.len();
            for (i, e) in events.iter().enumerate() {
                let line = e.line();
                out.push_str(&line);
                let last = i + 1 == n;
                if !last || final_newline {
                    out.push_str(nl);
                }
                // The raw line the scanner sees before '\n' includes a '\r'.
                let raw_len = line.len() + usize::from(crlf && (!last || final_newline));
                if let Event::Usage(p, c, k, _, _) = e
                    && raw_len <= limit
                {
                    expected = Some((
                        u64::from(*p),
                        u64::from(*c),
                        k.map_or(0, u64::from),
                        k.is_some(),
                    ));
                }
            }
            (out.into_bytes(), expected, limit)
        })
}

fn scan(chunks: &[&[u8]], limit: usize) -> (Seen, usize) {
    let mut s = SseUsageScanner::with_line_limit(limit);
    let mut most = 0;
    for c in chunks {
        s.feed(c);
        most = most.max(s.buffered());
    }
    s.finish();
    let got = s.parsed().map(|p| {
        (
            p.usage.prompt_tokens,
            p.usage.completion_tokens,
            p.usage.cached_tokens,
            p.cached_reported,
        )
    });
    (got, most)
}

fn split<'a>(bytes: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for a in at {
        out.push(&bytes[prev..a]);
        prev = a;
    }
    out.push(&bytes[prev..]);
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn chunk_boundaries_do_not_change_the_usage(
        (bytes, expected, limit) in stream(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let (whole, _) = scan(&[&bytes], limit);
        let (chunked, most) = scan(&split(&bytes, &cuts), limit);
        prop_assert_eq!(whole, expected, "one chunk");
        prop_assert_eq!(chunked, expected, "{} chunks", cuts.len() + 1);
        prop_assert!(most <= limit, "held {most} bytes, limit {limit}");
        // Byte by byte too.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        prop_assert_eq!(scan(&singles, limit).0, expected, "byte by byte");
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8),
        limit in 1usize..300,
    ) {
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (_, most) = scan(&refs, limit);
        prop_assert!(most <= limit);
        for c in &chunks {
            let _ = usage_from_json(c);
        }
    }

    #[test]
    fn json_usage_never_panics_and_counts_are_non_negative(
        p in prop_oneof![any::<f64>(), (0u64..1_000_000).prop_map(|n| n as f64)],
        c in prop_oneof![any::<f64>(), (0u64..1_000_000).prop_map(|n| n as f64)],
        k in any::<f64>(),
    ) {
        let doc = format!(
            "{{\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":{}}}}}}}",
            serde_json::to_string(&p).unwrap(),
            serde_json::to_string(&c).unwrap(),
            serde_json::to_string(&k).unwrap(),
        );
        let u = usage_from_json(doc.as_bytes()).unwrap();
        if p.is_finite() && p >= 0.0 {
            // Exact for any realistic count (serde_json's default float parsing may be an
            // ulp off for values near 2^53, which no server sends).
            if p < 1.0e12 && p.fract() == 0.0 {
                prop_assert_eq!(u.usage.prompt_tokens, p as u64);
            }
        } else {
            prop_assert_eq!(u.usage.prompt_tokens, 0);
        }
        prop_assert!(u.usage.total_tokens >= u.usage.prompt_tokens.max(u.usage.completion_tokens));
    }

    #[test]
    fn the_response_model_rewrite_is_exact(
        from in "[a-z0-9/._-]{1,12}",
        to in "[A-Z0-9/._-]{1,12}",
        pieces in proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(2)], 0..8),
    ) {
        // Bodies made of the model field (compact or spaced) and other text: every
        // occurrence becomes the client's name, nothing else changes.
        prop_assume!(from != to);
        let r = ModelNameRewriter::new(&from, &to).unwrap();
        let qf = serde_json::to_string(&from).unwrap();
        let qt = serde_json::to_string(&to).unwrap();
        let mut body = String::new();
        let mut want = String::new();
        let spaced = pieces.first() == Some(&2);
        for p in &pieces {
            match (p, spaced) {
                (0, _) => { body.push_str("{\"x\":1},"); want.push_str("{\"x\":1},"); }
                (_, false) => { body.push_str(&format!("\"model\":{qf},")); want.push_str(&format!("\"model\":{qt},")); }
                (_, true) => { body.push_str(&format!("\"model\": {qf},")); want.push_str(&format!("\"model\": {qt},")); }
            }
        }
        prop_assert_eq!(String::from_utf8(r.apply(body.as_bytes()).into_owned()).unwrap(), want);
    }
}
