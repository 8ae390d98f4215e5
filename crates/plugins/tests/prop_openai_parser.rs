//! Property tests of `openai-parser` (request bodies come from any client): arbitrary bytes
//! never panic, and for generated valid bodies the parser finds the model exactly where it
//! is written, so the director's model splice gives a body whose re-parse has the new model
//! and whose every other byte is the original's.
//!
//! Case count: `PROPTEST_CASES` (default 256 per property).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use llmsched_core::request::{Headers, Prompt};
use llmsched_plugins::parser::openai_parser::parse;
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

/// Any string, control characters, quotes, backslashes and astral characters included.
fn any_string(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter),
        proptest::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('/'),
                Just('\n'),
                Just('\u{0}'),
                Just('\u{1f}'),
                Just('é'),
                Just('😀'),
                Just('m'),
                Just(':'),
            ],
            0..max
        )
        .prop_map(String::from_iter),
    ]
}

/// The JSON literal of `s`, each character written plainly or as `\uXXXX` (surrogate pairs
/// for astral characters) as `escape` says: clients and SDKs differ in what they escape.
fn json_literal(s: &str, escape: &[bool]) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        let forced = escape
            .get(i % escape.len().max(1))
            .copied()
            .unwrap_or(false);
        let must = c == '"' || c == '\\' || (c as u32) < 0x20;
        if forced || must {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{:04x}", u));
            }
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// Blanks JSON allows between tokens.
fn ws() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![Just(' '), Just('\n'), Just('\t'), Just('\r')],
        0..3,
    )
    .prop_map(String::from_iter)
}

/// A JSON value (as text), nested a little.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::to_string(&f).unwrap()),
        (
            any_string(12),
            proptest::collection::vec(any::<bool>(), 1..4)
        )
            .prop_map(|(s, e)| json_literal(&s, &e)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec((any_string(6), inner), 0..4).prop_map(|kv| {
                let fields: Vec<String> = kv
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", json_literal(k, &[false])))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// Keys of extra fields: anything but the keys the parser reads.
fn extra_key() -> impl Strategy<Value = String> {
    any_string(10).prop_filter("not a parsed key", |k| {
        ![
            "model",
            "stream",
            "prompt",
            "messages",
            "input",
            "instructions",
            "tools",
            "items",
            "cache_salt",
            "max_completion_tokens",
            "max_tokens",
            "max_output_tokens",
        ]
        .contains(&k.as_str())
    })
}

#[derive(Debug, Clone)]
struct Generated {
    body: String,
    model: String,
    /// The model's literal as written (the last `model` key's).
    model_literal: String,
    prompt: String,
}

/// A completions body: the model (optionally after an earlier, overridden `model` key), a
/// string prompt and extra fields in random order, with random blanks.
fn completions_body() -> impl Strategy<Value = Generated> {
    (
        any_string(24),
        proptest::collection::vec(any::<bool>(), 1..5),
        // An empty prompt is a 400 (tested elsewhere).
        any_string(40).prop_filter("non-empty prompt", |p| !p.is_empty()),
        proptest::collection::vec((extra_key(), json_value()), 0..5),
        proptest::option::of(any_string(8)),
        any::<prop::sample::Index>(),
        proptest::collection::vec(ws(), 16),
    )
        .prop_map(|(model, esc, prompt, extras, earlier, pos, blanks)| {
            let model_literal = json_literal(&model, &esc);
            let mut fields: Vec<(String, String)> = extras
                .into_iter()
                .map(|(k, v)| (json_literal(&k, &[false]), v))
                .collect();
            fields.push(("\"prompt\"".into(), json_literal(&prompt, &[false])));
            // The model goes anywhere after an optional earlier `model` key.
            let at = pos.index(fields.len() + 1);
            fields.insert(at, ("\"model\"".into(), model_literal.clone()));
            if let Some(e) = earlier {
                fields.insert(0, ("\"model\"".into(), json_literal(&e, &[false])));
            }
            let mut body = String::from("{");
            for (i, (k, v)) in fields.iter().enumerate() {
                let b = |j: usize| blanks[(i * 4 + j) % blanks.len()].as_str();
                if i > 0 {
                    body.push(',');
                }
                body.push_str(b(0));
                body.push_str(k);
                body.push_str(b(1));
                body.push(':');
                body.push_str(b(2));
                body.push_str(v);
                body.push_str(b(3));
            }
            body.push('}');
            Generated {
                body,
                model,
                model_literal,
                prompt,
            }
        })
}

fn path(p: &str) -> Headers {
    [(":path", p)].into_iter().collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for h in [Headers::new(), path("/v1/chat/completions"), path("/v1/responses"), path("/v1/conversations"), path("/v1/embeddings")] {
            let _ = parse(Bytes::from(bytes.clone()), &h);
        }
    }

    #[test]
    fn mutated_valid_bodies_never_panic(
        g in completions_body(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut b = g.body.into_bytes();
        for (i, byte, op) in edits {
            if b.is_empty() { break; }
            let at = i.index(b.len());
            match op {
                0 => b[at] = byte,
                1 => b.insert(at, byte),
                _ => { b.truncate(at); }
            }
        }
        let _ = parse(Bytes::from(b), &path("/v1/completions"));
    }

    #[test]
    fn the_model_splice_changes_the_model_and_nothing_else(
        g in completions_body(),
        new_model in any_string(24),
    ) {
        let body = Bytes::from(g.body.clone());
        let parsed = parse(body.clone(), &path("/v1/completions")).unwrap();
        prop_assert_eq!(&parsed.model, &g.model);
        prop_assert_eq!(&parsed.prompt, &Prompt::Text(g.prompt.clone()));
        let span = parsed.model_span.clone().unwrap();
        prop_assert_eq!(&body[span.clone()], g.model_literal.as_bytes());

        let out = parsed.with_model(&new_model);
        if new_model == g.model {
            prop_assert_eq!(&out, &body);
            return Ok(());
        }
        let reparsed = parse(out.clone(), &path("/v1/completions")).unwrap();
        prop_assert_eq!(&reparsed.model, &new_model);
        prop_assert_eq!(&reparsed.prompt, &parsed.prompt);
        prop_assert_eq!(reparsed.stream, parsed.stream);
        prop_assert_eq!(reparsed.max_tokens, parsed.max_tokens);
        // Byte-identical outside the model's value.
        let new_span = reparsed.model_span.clone().unwrap();
        prop_assert_eq!(new_span.start, span.start);
        prop_assert_eq!(&out[..span.start], &body[..span.start]);
        prop_assert_eq!(&out[new_span.end..], &body[span.end..]);
        let literal: String = serde_json::from_slice(&out[new_span]).unwrap();
        prop_assert_eq!(literal, new_model);
    }

    #[test]
    fn chat_bodies_round_trip_too(
        model in any_string(16),
        esc in proptest::collection::vec(any::<bool>(), 1..4),
        contents in proptest::collection::vec(any_string(20), 1..4),
        new_model in any_string(16),
    ) {
        let messages: Vec<serde_json::Value> = contents
            .iter()
            .map(|c| serde_json::json!({"role": "user", "content": c}))
            .collect();
        let messages = serde_json::to_string(&messages).unwrap();
        let body = format!(
            "{{\"messages\": {messages}, \"model\" :{} , \"stream\":true}}",
            json_literal(&model, &esc)
        );
        let body = Bytes::from(body);
        let parsed = parse(body.clone(), &path("/v1/chat/completions")).unwrap();
        prop_assert_eq!(&parsed.model, &model);
        prop_assert!(parsed.stream);
        let out = parsed.with_model(&new_model);
        let reparsed = parse(out, &path("/v1/chat/completions")).unwrap();
        prop_assert_eq!(&reparsed.model, &new_model);
        prop_assert_eq!(&reparsed.prompt, &parsed.prompt);
        let Prompt::Chat { messages: m, .. } = &parsed.prompt else { panic!() };
        let got: Vec<&str> = m.iter().map(|m| m.content.as_str()).collect();
        let want: Vec<&str> = contents.iter().map(String::as_str).collect();
        prop_assert_eq!(got, want);
    }
}
