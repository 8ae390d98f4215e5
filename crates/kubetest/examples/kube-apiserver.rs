//! Runs the test API server for manual use:
//!
//! ```sh
//! cargo run -p llmsched-kubetest --example kube-apiserver -- --port 6443 --tls --token admin \
//!     --kubeconfig /tmp/kubetest.kubeconfig --inference-kinds
//! KUBECONFIG=/tmp/kubetest.kubeconfig kubectl get pods -A
//! ```
//!
//! It is not a real kube-apiserver (none can run on this machine); it speaks the real REST
//! and watch protocol so kubectl and kube-rs work against it unchanged.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use llmsched_kubetest::{ResourceKind, TestApiServer, objects};

#[derive(Parser, Debug)]
#[command(about = "A Kubernetes API server for tests (llmsched-kubetest), on 127.0.0.1")]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Serve HTTPS with a throw-away CA (written into the kubeconfig).
    #[arg(long)]
    tls: bool,
    /// Require this bearer token (the admin token, also written into the kubeconfig).
    #[arg(long)]
    token: Option<String>,
    /// Write a kubeconfig for the server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Default namespace of the kubeconfig's context.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Serve the InferencePool / InferenceObjective / InferenceModelRewrite kinds.
    #[arg(long)]
    inference_kinds: bool,
    /// Seed N ready pods `vllm-<i>` labelled app=vllm with IPs 127.0.0.(10+i) in --namespace.
    #[arg(long, default_value_t = 0)]
    pods: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut b = TestApiServer::builder().port(args.port).tls(args.tls);
    if let Some(t) = &args.token {
        b = b.require_token(t);
    }
    let server = b.start().await.context("starting the server")?;
    if args.inference_kinds {
        server.register_inference_extension_kinds();
    }
    for i in 0..args.pods {
        let ip = format!("127.0.0.{}", 10 + u16::from(i));
        server
            .create(
                &ResourceKind::pods(),
                objects::pod(
                    &args.namespace,
                    &format!("vllm-{i}"),
                    &[("app", "vllm")],
                    &ip,
                    true,
                ),
            )
            .map_err(|s| anyhow::anyhow!("seeding pods: {s}"))?;
    }
    if let Some(path) = &args.kubeconfig {
        server
            .kubeconfig()
            .namespace(&args.namespace)
            .write(path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("kubeconfig: {}", path.display());
    }
    println!("serving {}", server.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
