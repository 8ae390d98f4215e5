//! The command line: argument parsing as the `llmsched` binary will mount it, and the run →
//! compare → plot workflow against a fake server.

use std::path::PathBuf;

use clap::Parser;
use llmsched_bench::cli::{self, Args, Command, CompareArgs, PlotArgs, RunArgs};
use llmsched_bench::fake_server::{FakeServer, FakeServerConfig};
use llmsched_bench::{BenchError, SavedRun};

/// Mirrors how the binary nests `bench` under `llmsched`.
#[derive(Parser, Debug)]
struct Top {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    Bench(Args),
}

fn parse(args: &[&str]) -> Result<Args, clap::Error> {
    let mut v = vec!["llmsched", "bench"];
    v.extend_from_slice(args);
    Top::try_parse_from(v).map(|t| match t.cmd {
        Sub::Bench(a) => a,
    })
}

#[test]
fn run_flags_without_a_subcommand() {
    let a = parse(&[
        "--config",
        "w.yaml",
        "--base-url",
        "http://h:1",
        "-o",
        "out",
        "--label",
        "ours",
        "--time-scale",
        "10",
        "--seed",
        "3",
        "--no-progress",
        "--max-in-flight",
        "64",
        "--per-request",
    ])
    .expect("parse");
    assert!(a.command.is_none());
    assert_eq!(a.run.config, Some(PathBuf::from("w.yaml")));
    assert_eq!(a.run.base_url.as_deref(), Some("http://h:1"));
    assert_eq!(a.run.output, Some(PathBuf::from("out")));
    assert_eq!(a.run.time_scale, 10.0);
    assert_eq!(a.run.seed, Some(3));
    assert_eq!(a.run.max_in_flight, Some(64));
    assert!(a.run.no_progress && a.run.per_request);
}

#[test]
fn subcommands_parse() {
    let a = parse(&["run", "-c", "w.yaml"]).expect("run");
    assert!(matches!(
        a.command,
        Some(Command::Run(RunArgs {
            config: Some(_),
            ..
        }))
    ));
    let a = parse(&[
        "compare",
        "a",
        "b",
        "--labels",
        "k8s,llmd",
        "--stage",
        "2",
        "--markdown",
    ])
    .expect("compare");
    match a.command {
        Some(Command::Compare(c)) => {
            assert_eq!(c.labels, Some(vec!["k8s".to_owned(), "llmd".to_owned()]));
            assert_eq!(c.stage, Some(2));
            assert!(c.markdown);
        }
        other => panic!("{other:?}"),
    }
    let a = parse(&["plot", "a", "b", "c", "-o", "p.svg"]).expect("plot");
    assert!(matches!(a.command, Some(Command::Plot(PlotArgs { ref dirs, .. })) if dirs.len() == 3));
    let a = parse(&["selftest", "--streams", "10"]).expect("selftest");
    assert!(
        matches!(a.command, Some(Command::Selftest(ref s)) if s.streams == 10 && s.tokens == 200)
    );
}

#[test]
fn usage_errors() {
    assert!(
        parse(&[]).is_err(),
        "--config is required without a subcommand"
    );
    assert!(parse(&["--time-scale", "fast", "-c", "x"]).is_err());
    assert!(parse(&["compare", "only-one"]).is_err());
    assert!(parse(&["plot", "a"]).is_err(), "plot needs --output");
    assert!(
        parse(&["--config", "x", "compare", "a", "b"]).is_err(),
        "flags and subcommands conflict"
    );
}

#[test]
fn default_output_dir_looks_like_inference_perf() {
    let d = cli::default_output_dir();
    let name = d.to_string_lossy();
    assert!(name.starts_with("reports-"), "{name}");
    assert_eq!(name.len(), "reports-YYYYMMDD-HHMMSS".len(), "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_compare_and_plot_workflow() {
    let server = FakeServer::start(FakeServerConfig::default())
        .await
        .expect("server");
    let tmp = tempfile::tempdir().expect("tmp");
    let config_path = tmp.path().join("w.yaml");
    std::fs::write(
        &config_path,
        "api: {type: completion, streaming: true}\n\
         server: {model_name: fake-model, base_url: 'http://127.0.0.1:9'}\n\
         data:\n  type: shared_prefix\n  shared_prefix: {num_groups: 2, num_prompts_per_group: 2, \
         system_prompt_len: 16, question_len: 4, output_len: 3}\n\
         load:\n  type: poisson\n  stages: [{rate: 4, duration: 1}, {rate: 8, duration: 1}]\n",
    )
    .expect("write config");
    let mut dirs = Vec::new();
    for label in ["rr", "ours"] {
        let out = tmp.path().join(label);
        cli::run(Args {
            command: None,
            run: RunArgs {
                config: Some(config_path.clone()),
                base_url: Some(server.base_url()),
                output: Some(out.clone()),
                time_scale: 4.0,
                no_progress: true,
                ..RunArgs::default()
            },
        })
        .await
        .expect("run");
        let saved = SavedRun::load(&out).expect("saved");
        assert_eq!(saved.label, label, "label defaults to the folder name");
        assert_eq!(saved.stages.len(), 2);
        assert_eq!(saved.summary.as_ref().expect("summary").successes.count, 12);
        dirs.push(out);
    }

    let md = tmp.path().join("table.md");
    cli::run(Args {
        command: Some(Command::Compare(CompareArgs {
            dir_a: dirs[0].clone(),
            dir_b: dirs[1].clone(),
            labels: Some(vec!["k8s".into(), "llmd".into()]),
            stage: Some(1),
            markdown: true,
            output: Some(md.clone()),
        })),
        run: RunArgs::default(),
    })
    .await
    .expect("compare");
    let table = std::fs::read_to_string(&md).expect("table");
    assert!(
        table.contains("| Metric") && table.contains("Δ (llmd - k8s)"),
        "{table}"
    );

    let svg = tmp.path().join("plots/p.svg");
    cli::run(Args {
        command: Some(Command::Plot(PlotArgs {
            dirs: dirs.clone(),
            output: svg.clone(),
            labels: None,
        })),
        run: RunArgs::default(),
    })
    .await
    .expect("plot");
    let text = std::fs::read_to_string(&svg).expect("svg");
    assert!(text.contains("rr mean") && text.contains("ours mean"));

    // Wrong label count and a missing stage are usage errors, not panics.
    let err = cli::run(Args {
        command: Some(Command::Compare(CompareArgs {
            dir_a: dirs[0].clone(),
            dir_b: dirs[1].clone(),
            labels: Some(vec!["one".into()]),
            stage: None,
            markdown: false,
            output: None,
        })),
        run: RunArgs::default(),
    })
    .await
    .expect_err("labels");
    assert!(matches!(err, BenchError::Usage(_)), "{err}");
    let err = cli::run(Args {
        command: Some(Command::Compare(CompareArgs {
            dir_a: dirs[0].clone(),
            dir_b: dirs[1].clone(),
            labels: None,
            stage: Some(9),
            markdown: false,
            output: None,
        })),
        run: RunArgs::default(),
    })
    .await
    .expect_err("stage");
    assert!(err.to_string().contains("stage_9"), "{err}");

    // A config error surfaces with its key.
    std::fs::write(&config_path, "load:\n  type: burst\n").expect("write");
    let err = cli::run(Args {
        command: None,
        run: RunArgs {
            config: Some(config_path.clone()),
            no_progress: true,
            ..RunArgs::default()
        },
    })
    .await
    .expect_err("bad config");
    assert!(err.to_string().contains("load.type"), "{err}");
}
