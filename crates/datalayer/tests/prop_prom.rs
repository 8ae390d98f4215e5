//! Property tests of the Prometheus text parser (pages come from model servers over the
//! network): arbitrary text never panics and a failure names a line of the page; generated
//! valid expositions (escaped label values, NaN/±Inf, timestamps, blanks, CRLF, comments)
//! parse back to exactly the samples written; the metric extraction on top never panics.
//!
//! Case count: `PROPTEST_CASES` (default 256 per property).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use llmsched_core::endpoint::EndpointMetrics;
use llmsched_datalayer::mapping::{EngineMapping, Extractor};
use llmsched_datalayer::prom::{Sample, parse};
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
struct GenSample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
    value_text: String,
    timestamp: Option<i64>,
    trailing_comma: bool,
    blanks: [String; 4],
}

fn metric_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_:][a-zA-Z0-9_:]{0,16}"
}

fn label_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,10}"
}

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        proptest::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('\n'),
                Just('{'),
                Just('}'),
                Just(','),
                Just('='),
                Just(' '),
                Just('é')
            ],
            0..8
        )
        .prop_map(String::from_iter),
    ]
}

fn blank() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof![Just(' '), Just('\t')], 0..3).prop_map(String::from_iter)
}

fn value() -> impl Strategy<Value = (f64, String)> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| (f, format!("{f}"))),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| (f, format!("{f:e}"))),
        any::<i32>().prop_map(|i| (f64::from(i), i.to_string())),
        Just((f64::NAN, "NaN".to_string())),
        Just((f64::INFINITY, "+Inf".to_string())),
        Just((f64::NEG_INFINITY, "-Inf".to_string())),
    ]
}

fn sample(names: Vec<String>) -> impl Strategy<Value = GenSample> {
    (
        proptest::sample::select(names),
        proptest::collection::vec((label_name(), label_value()), 0..4),
        value(),
        proptest::option::of(any::<i64>()),
        any::<bool>(),
        [blank(), blank(), blank(), blank()],
    )
        .prop_map(
            |(name, labels, (value, value_text), timestamp, trailing_comma, blanks)| GenSample {
                name,
                labels,
                value,
                value_text,
                timestamp,
                trailing_comma,
                blanks,
            },
        )
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl GenSample {
    fn render(&self) -> String {
        let [b0, b1, b2, b3] = &self.blanks;
        let mut s = format!("{b0}{}", self.name);
        if !self.labels.is_empty() || self.trailing_comma {
            s.push_str(b1);
            s.push('{');
            let parts: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}{b2}={b2}\"{}\"", escape(v)))
                .collect();
            s.push_str(&parts.join(","));
            if self.trailing_comma && !self.labels.is_empty() {
                s.push(',');
            }
            s.push('}');
        }
        // At least one blank between the name (or labels) and the value.
        s.push(' ');
        s.push_str(b3);
        s.push_str(&self.value_text);
        if let Some(t) = self.timestamp {
            s.push(' ');
            s.push_str(&t.to_string());
        }
        s.push_str(b3);
        s
    }
}

#[derive(Debug, Clone)]
struct Page {
    text: String,
    samples: Vec<GenSample>,
    wanted: Vec<String>,
}

fn page() -> impl Strategy<Value = Page> {
    proptest::collection::vec(metric_name(), 1..5)
        .prop_flat_map(|names| {
            (
                proptest::collection::vec(sample(names.clone()), 0..20),
                proptest::collection::vec(any::<bool>(), 0..20),
                any::<bool>(),
                proptest::sample::subsequence(names.clone(), 0..=names.len()),
                Just(names),
            )
        })
        .prop_map(|(samples, comments, crlf, wanted, names)| {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            for n in &names {
                text.push_str(&format!(
                    "# HELP {n} Help text with \\\\ and \"quotes\" and é.{nl}"
                ));
                text.push_str(&format!("# TYPE {n} gauge{nl}"));
            }
            for (i, s) in samples.iter().enumerate() {
                if comments.get(i).copied().unwrap_or(false) {
                    text.push_str(&format!("# a free comment {{not=\"a sample\"}} 1{nl}{nl}"));
                }
                text.push_str(&s.render());
                text.push_str(nl);
            }
            Page {
                text,
                samples,
                wanted,
            }
        })
}

fn same_value(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}", wanted in proptest::collection::vec(metric_name(), 0..3)) {
        let mut out = Vec::new();
        match parse(&text, &wanted, &mut out) {
            Ok(stats) => prop_assert!(stats.samples >= out.len()),
            Err(e) => {
                prop_assert!(e.line >= 1 && e.line <= text.split('\n').count(), "{e}");
                prop_assert!(e.excerpt.chars().count() <= 81);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_in_sample_lines_never_panic(lines in proptest::collection::vec("[a-z_:{}=\",\\\\ \t0-9.eE+-]{0,40}", 0..10)) {
        let text = lines.join("\n");
        let mut out = Vec::new();
        let _ = parse(&text, &["a", "b:c"], &mut out);
        for s in &out {
            let _ = s.labels().count();
        }
    }

    #[test]
    fn valid_pages_round_trip(p in page()) {
        let mut out: Vec<Sample<'_>> = Vec::new();
        let stats = parse(&p.text, &p.wanted, &mut out).unwrap_or_else(|e| panic!("{e}\n{}", p.text));
        prop_assert_eq!(stats.samples, p.samples.len());
        let expected: Vec<&GenSample> = p.samples.iter().filter(|s| p.wanted.contains(&s.name)).collect();
        prop_assert_eq!(out.len(), expected.len());
        for (got, want) in out.iter().zip(expected) {
            prop_assert_eq!(&p.wanted[got.family], &want.name);
            prop_assert!(same_value(got.value, want.value), "{} vs {}", got.value, want.value);
            prop_assert_eq!(got.timestamp_ms, want.timestamp);
            let labels: Vec<(String, String)> = got.labels().map(|(k, v)| (k.to_string(), v.into_owned())).collect();
            prop_assert_eq!(&labels, &want.labels);
            for (k, _) in &want.labels {
                // The first label of that name.
                let first = want.labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                let found = got.label(k).map(|v| v.into_owned());
                prop_assert_eq!(found, first);
            }
        }
    }

    #[test]
    fn extraction_never_panics(p in page(), garbage in "(?s).{0,80}") {
        let ex = Extractor::new("vllm", &EngineMapping::vllm());
        let text = format!("{}vllm:num_requests_waiting {}\n{}", p.text, p.samples.len(), garbage);
        let _ = ex.extract_text(&text, &EndpointMetrics::default(), Instant::now());
        let _ = ex.extract_text(&p.text, &EndpointMetrics::default(), Instant::now());
    }
}
