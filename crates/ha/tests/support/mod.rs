//! A replica for sync tests: the real approximate prefix scorer (built through the plugin
//! registry, as the EPP's config loader does) over four static endpoints, and the real sync
//! on a loopback port.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use llmsched_core::cycle::CycleState;
use llmsched_core::endpoint::{EndpointSource, StaticEndpoints};
use llmsched_core::plugin::{Plugin, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginHandle};
use llmsched_core::request::{Headers, InferenceRequest, Prompt, RequestBody};
use llmsched_core::scheduler::{ProfileRunResult, SchedulingResult};
use llmsched_ha::{
    FixedStates, HaConfig, HaHandle, HaMetrics, NamedState, PeerSet, StateSource, start,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The endpoints every replica routes to (same names on every replica).
pub const ENDPOINTS: [&str; 4] = [
    "10.0.0.1:8000",
    "10.0.0.2:8000",
    "10.0.0.3:8000",
    "10.0.0.4:8000",
];

pub struct Node {
    pub endpoints: Arc<StaticEndpoints>,
    pub plugin: Arc<dyn Plugin>,
    pub ha: HaHandle,
    pub registry: Registry,
    pub cancel: CancellationToken,
}

pub fn config(id: &str) -> HaConfig {
    HaConfig {
        replica_id: id.into(),
        bootstrap_timeout: Duration::from_secs(3),
        ..HaConfig::default()
    }
}

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

pub fn prefix_plugin(endpoints: &Arc<StaticEndpoints>) -> Arc<dyn Plugin> {
    prefix_plugin_with(
        endpoints,
        serde_json::json!({"blockSize": 4, "autoTune": false}),
    )
}

pub fn prefix_plugin_with(
    endpoints: &Arc<StaticEndpoints>,
    params: serde_json::Value,
) -> Arc<dyn Plugin> {
    let handle = PluginHandle {
        endpoints: Some(endpoints.clone() as Arc<dyn EndpointSource>),
        ..PluginHandle::default()
    };
    let registry = llmsched_plugins::default_registry();
    let f = registry.factory("prefix-cache-scorer").expect("registered");
    f(FactoryInput {
        name: "prefix-cache-scorer",
        parameters: Some(&params),
        handle: &handle,
    })
    .expect("builds")
}

impl Node {
    pub async fn start(cfg: HaConfig, listener: TcpListener, peers: Vec<String>) -> Node {
        Self::start_with(
            cfg,
            listener,
            peers,
            serde_json::json!({"blockSize": 4, "autoTune": false}),
        )
        .await
    }

    /// [`Self::start`] with the prefix scorer's parameters.
    pub async fn start_with(
        cfg: HaConfig,
        listener: TcpListener,
        peers: Vec<String>,
        params: serde_json::Value,
    ) -> Node {
        let addrs: Vec<SocketAddr> = ENDPOINTS.iter().map(|a| a.parse().unwrap()).collect();
        let endpoints = Arc::new(StaticEndpoints::from_addrs(&addrs));
        let plugin = prefix_plugin_with(&endpoints, params);
        let states: Arc<dyn StateSource> = Arc::new(FixedStates(vec![NamedState {
            name: "prefix-cache-scorer".into(),
            state: plugin.clone().as_replicated().expect("replicated"),
        }]));
        let mut registry = Registry::default();
        let metrics = HaMetrics::register(&mut registry);
        let cancel = CancellationToken::new();
        let ha = start(
            cfg,
            listener,
            PeerSet::fixed(peers),
            states,
            endpoints.clone(),
            metrics,
            cancel.clone(),
        )
        .expect("starts");
        Node {
            endpoints,
            plugin,
            ha,
            registry,
            cancel,
        }
    }

    pub fn addr(&self) -> String {
        self.ha.addr().to_string()
    }

    fn request(prompt: &str) -> InferenceRequest {
        let mut r = InferenceRequest::new("r", Headers::new(), None);
        r.incoming_model = "m".into();
        r.target_model = "m".into();
        r.body = Some(RequestBody {
            prompt: Prompt::Text(prompt.to_string()),
            ..RequestBody::raw(Bytes::new())
        });
        r
    }

    /// Routes `prompt` to endpoint `ep` (0..4) as the director does: produce, pre-request,
    /// after-dispatch.
    pub fn route(&self, prompt: &str, ep: usize) {
        self.route_with(&self.plugin, prompt, ep)
    }

    /// [`Self::route`] through another instance of the plugin (over the same endpoints).
    pub fn route_with(&self, plugin: &Arc<dyn Plugin>, prompt: &str, ep: usize) {
        let req = Self::request(prompt);
        let eps = &self.endpoints.0.endpoints;
        let cands: Vec<_> = eps.iter().collect();
        let mut cycle = CycleState::new();
        plugin
            .clone()
            .as_data_producer()
            .unwrap()
            .produce(&req, &mut cycle, &cands);
        let result = SchedulingResult {
            primary_profile: "default".into(),
            profiles: vec![(
                "default".into(),
                ProfileRunResult {
                    targets: vec![eps[ep].clone()],
                },
            )],
        };
        let hook = plugin.clone().as_pre_request().unwrap();
        hook.pre_request(&req, &cycle, &result, &mut Vec::new());
        hook.after_dispatch(&req, &cycle, &result);
    }

    /// The prefix scores this replica gives `prompt` on the four endpoints.
    pub fn scores(&self, prompt: &str) -> Vec<f64> {
        let req = Self::request(prompt);
        let eps = &self.endpoints.0.endpoints;
        let cands: Vec<_> = eps.iter().collect();
        let mut cycle = CycleState::new();
        self.plugin
            .clone()
            .as_data_producer()
            .unwrap()
            .produce(&req, &mut cycle, &cands);
        let cx = SchedulingContext {
            request: &req,
            cycle: &cycle,
            now: Instant::now(),
        };
        let mut out = vec![0.0; cands.len()];
        self.plugin
            .clone()
            .as_scorer()
            .unwrap()
            .score(&cx, &cands, &mut out);
        out
    }

    /// The value of a metric line starting with `prefix` (0 when absent).
    pub fn metric(&self, prefix: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.ha.shutdown().await;
    }
}

/// A prompt of `blocks` 4-character blocks, unique to `tag`.
pub fn prompt(tag: &str, blocks: usize) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < blocks * 4 {
        s.push_str(&format!("{tag}{i:03}|"));
        i += 1;
    }
    s.truncate(blocks * 4);
    s
}

/// Waits until `f` holds, for at most 30 s (generous: the machine may be loaded).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "llmsched_ha=debug".into()),
        )
        .with_test_writer()
        .try_init();
}
