//! Config parsing: every fixture in inference-perf's format loads; malformed configs fail with
//! an error naming the key.

use std::path::PathBuf;

use llmsched_bench::config::{
    ApiType, DataType, DistributionType, LengthSpec, LoadStage, LoadType, ServerType,
};
use llmsched_bench::{BenchConfig, BenchError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> BenchConfig {
    BenchConfig::from_file(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn parse_err(yaml: &str) -> String {
    match BenchConfig::from_yaml_str(yaml, Some("test.yaml")) {
        Ok(c) => panic!("expected an error, parsed {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_fixture_parses() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fixtures") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            BenchConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert_eq!(n, 11);
}

#[test]
fn sharegpt_constant_keeps_tolerated_sections_but_is_not_runnable() {
    let c = load("sharegpt_constant_prometheus.yaml");
    assert_eq!(c.load.kind, LoadType::Constant);
    assert!(c.api.streaming);
    assert_eq!(c.data.kind, DataType::ShareGpt);
    assert!(c.metrics.is_some() && c.tokenizer.is_some());
    assert_eq!(
        c.stages().expect("stages"),
        vec![LoadStage::Rate {
            rate: 2.0,
            duration: 60.0
        }]
    );
    let err = c.check_runnable().expect_err("shareGPT is unsupported");
    assert!(
        matches!(&err, BenchError::Unsupported { key, .. } if key == "data.type"),
        "{err}"
    );
}

#[test]
fn shared_prefix_aliases_and_defaults() {
    let c = load("shared_prefix_two_stages.yaml");
    c.check_runnable().expect("runnable");
    let sp = c.data.shared_prefix.as_ref().expect("shared_prefix");
    assert_eq!((sp.num_groups, sp.num_prompts_per_group), (4, 6));
    assert_eq!(sp.system_prompt_len, LengthSpec::Fixed(300));
    assert_eq!(c.load.interval, 5.0);
    assert!(!c.api.streaming, "streaming defaults to false");
    assert_eq!(c.api.kind, ApiType::Completion);
    let server = c.server.as_ref().expect("server");
    assert_eq!(server.kind, ServerType::Vllm);
    assert!(c.report.request_lifecycle.per_request);
    assert_eq!(c.report.request_lifecycle.percentiles.len(), 11);
    assert_eq!(c.stages().expect("stages").len(), 2);
}

#[test]
fn dumped_config_with_nulls_is_runnable() {
    let c = load("dumped_with_nulls.yaml");
    c.check_runnable().expect("runnable");
    assert_eq!(
        c.stages().expect("stages"),
        vec![
            LoadStage::Rate {
                rate: 5.0,
                duration: 30.0
            },
            LoadStage::Rate {
                rate: 9.0,
                duration: 30.0
            }
        ]
    );
    assert_eq!(c.load.max_in_flight(), Some(1600));
    assert_eq!(c.load.request_timeout, None);
}

#[test]
fn multi_turn_and_worker_cap() {
    let c = load("shared_prefix_multi_turn.yaml");
    c.check_runnable().expect("runnable");
    assert!(
        c.data
            .shared_prefix
            .as_ref()
            .expect("sp")
            .enable_multi_turn_chat
    );
    assert_eq!(c.load.max_in_flight(), Some(32));
}

#[test]
fn distributions_parse_with_their_shapes() {
    let c = load("shared_prefix_distributions.yaml");
    c.check_runnable().expect("runnable");
    let sp = c.data.shared_prefix.as_ref().expect("sp");
    assert_eq!(sp.seed, Some(7));
    match &sp.question_len {
        LengthSpec::Dist(d) => {
            assert_eq!(d.kind, DistributionType::SkewNormal);
            assert_eq!((d.min, d.max, d.mean, d.skew), (20, 900, 150.0, 1.5));
        }
        other => panic!("{other:?}"),
    }
    match &sp.output_len {
        LengthSpec::Dist(d) => assert_eq!(d.kind, DistributionType::Lognormal),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsupported_features_name_their_key() {
    let key_of = |name: &str| match load(name).check_runnable() {
        Err(BenchError::Unsupported { key, .. }) | Err(BenchError::ConfigInvalid { key, .. }) => {
            key
        }
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(key_of("chat_minimal.yaml"), "data.type");
    assert_eq!(key_of("circuit_breaker_timeout.yaml"), "data.type");
    assert_eq!(key_of("sweep.yaml"), "data.type");
    assert_eq!(key_of("concurrent_conversation_replay.yaml"), "data.type");
    assert_eq!(key_of("mock_server.yaml"), "data.type");

    let c = load("circuit_breaker_timeout.yaml");
    assert_eq!(c.load.request_timeout, Some(30.0));
    assert_eq!(c.load.circuit_breakers, vec!["timeouts".to_owned()]);

    let mut sweep = load("sweep.yaml");
    sweep.data.kind = DataType::SharedPrefix;
    sweep.data.shared_prefix = Some(Default::default());
    assert_eq!(
        match sweep.check_runnable() {
            Err(BenchError::Unsupported { key, .. }) => key,
            other => panic!("{other:?}"),
        },
        "load.sweep"
    );

    let c = load("concurrent_conversation_replay.yaml");
    assert_eq!(
        c.stages().expect("stages"),
        vec![
            LoadStage::Concurrent {
                num_requests: 50,
                concurrency: 5
            },
            LoadStage::Concurrent {
                num_requests: 100,
                concurrency: 10
            }
        ]
    );
}

#[test]
fn guide_mini_is_runnable_and_overridable() {
    let mut c = load("guide-mini.yaml");
    c.check_runnable().expect("runnable");
    assert_eq!(c.load.kind, LoadType::Poisson);
    let stages = c.stages().expect("stages");
    assert_eq!(stages.len(), 8);
    assert_eq!(
        stages.iter().map(LoadStage::num_requests).sum::<u64>(),
        1800
    );
    c.set_base_url("http://10.0.0.1:9999");
    assert_eq!(
        c.server.as_ref().expect("server").base_url,
        "http://10.0.0.1:9999"
    );
    // The effective config round-trips through YAML.
    let again =
        BenchConfig::from_yaml_str(&c.to_yaml_string().expect("yaml"), None).expect("reparse");
    assert_eq!(again.stages().expect("stages"), stages);
    assert_eq!(
        again.server.expect("server").base_url,
        "http://10.0.0.1:9999"
    );
}

#[test]
fn set_base_url_creates_a_missing_server_section() {
    let mut c = BenchConfig::from_yaml_str(
        "data: {type: shared_prefix, shared_prefix: {}}\nload: {type: poisson, stages: [{rate: 1, duration: 1}]}\n",
        None,
    )
    .expect("parse");
    assert!(
        matches!(c.check_runnable(), Err(BenchError::ConfigInvalid { key, .. }) if key == "server.base_url")
    );
    c.set_base_url("http://127.0.0.1:1234");
    c.check_runnable().expect("runnable once a server is set");
}

#[test]
fn empty_document_is_the_default_config() {
    let c = BenchConfig::from_yaml_str("# nothing here\n", None).expect("empty");
    assert_eq!(c.data.kind, DataType::Mock);
    assert_eq!(c.load.kind, LoadType::Constant);
    assert!(c.load.stages.is_empty());
}

#[test]
fn malformed_yaml_is_rejected() {
    let e = parse_err("load:\n  stages: [1, 2\n");
    assert!(e.contains("test.yaml"), "{e}");
    let e = parse_err("- just\n- a list\n");
    assert!(e.contains("mapping"), "{e}");
}

#[test]
fn wrong_types_name_the_key() {
    let e = parse_err("load:\n  type: poisson\n  stages:\n  - {rate: fast, duration: 2}\n");
    assert!(e.contains("load.stages[0].rate"), "{e}");
    let e = parse_err("api:\n  streaming: maybe\n");
    assert!(e.contains("api.streaming"), "{e}");
    let e = parse_err("data:\n  type: shared_prefix\n  shared_prefix:\n    question_len: -3\n");
    assert!(e.contains("data.shared_prefix.question_len"), "{e}");
    let e = parse_err("data:\n  type: shared_prefix\n  shared_prefix:\n    output_len: 2.5\n");
    assert!(e.contains("data.shared_prefix.output_len"), "{e}");
}

#[test]
fn unknown_values_and_keys_are_rejected() {
    let e = parse_err("load:\n  type: burst\n");
    assert!(e.contains("load.type") && e.contains("burst"), "{e}");
    let e = parse_err("data:\n  type: shared_prefix\n  shared_prefix:\n    sytem_prompt_len: 10\n");
    assert!(
        e.contains("data.shared_prefix") && e.contains("sytem_prompt_len"),
        "{e}"
    );
    let e = parse_err("loads:\n  type: constant\n");
    assert!(e.contains("loads"), "{e}");
    let e = parse_err("load:\n  stages:\n  - {rate: 1, duration: 1, burst: 3}\n");
    assert!(e.contains("load.stages[0]") && e.contains("burst"), "{e}");
    let e = parse_err("data:\n  shared_prefix:\n    question_len: {type: zipf}\n");
    assert!(e.contains("zipf"), "{e}");
}

#[test]
fn invalid_values_name_the_key() {
    let key = |yaml: &str| match BenchConfig::from_yaml_str(yaml, None) {
        Err(BenchError::ConfigInvalid { key, .. }) => key,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        key("load:\n  stages:\n  - {rate: 0, duration: 3}\n"),
        "load.stages[0].rate"
    );
    assert_eq!(
        key("load:\n  stages:\n  - {rate: 2}\n"),
        "load.stages[0].duration"
    );
    assert_eq!(
        key("load:\n  type: poisson\n  stages:\n  - {rate: 2, duration: 1, num_requests: 4}\n"),
        "load.stages[0].num_requests"
    );
    assert_eq!(
        key("load:\n  type: concurrent\n  stages:\n  - {num_requests: 4}\n"),
        "load.stages[0].concurrency_level"
    );
    assert_eq!(
        key("load:\n  type: concurrent\n  stages:\n  - {num_requests: 4, concurrency_level: 0}\n"),
        "load.stages[0].concurrency_level"
    );
    assert_eq!(key("load:\n  interval: -1\n"), "load.interval");
    assert_eq!(key("load:\n  request_timeout: 0\n"), "load.request_timeout");
    assert_eq!(key("data:\n  type: shared_prefix\n"), "data.shared_prefix");
    assert_eq!(
        key("data:\n  shared_prefix:\n    question_len: {type: normal, min: 50, max: 10}\n"),
        "data.shared_prefix.question_len"
    );
    assert_eq!(
        key("data:\n  shared_prefix:\n    num_groups: 0\n"),
        "data.shared_prefix.num_groups"
    );
    assert_eq!(
        key("report:\n  request_lifecycle:\n    percentiles: [50, 101]\n"),
        "report.request_lifecycle.percentiles[1]"
    );
    assert_eq!(key("server:\n  base_url: ''\n"), "server.base_url");
}

#[test]
fn missing_config_file_is_an_io_error() {
    let err = BenchConfig::from_file(&fixture("does-not-exist.yaml")).expect_err("missing");
    assert!(matches!(err, BenchError::Io { .. }));
    assert!(err.to_string().contains("does-not-exist.yaml"), "{err}");
}
