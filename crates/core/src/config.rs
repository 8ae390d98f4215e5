//! `EndpointPickerConfig`: the reference EPP's configuration file, loaded into a plugin graph.
//!
//! Accepted exactly as users write it for llm-d (both `apiVersion`s). Loading follows the
//! reference's rules:
//!
//! * each `plugins[]` entry is built by its type's factory; `name` defaults to `type`;
//!   duplicate names, unknown types and bad `parameters` are errors;
//! * no `schedulingProfiles` ⇒ one profile `default` with every filter, scorer and picker, in
//!   declaration order;
//! * a scorer referenced without `weight` gets weight 1;
//! * a profile without a picker gets the first declared picker, else a `max-score-picker`;
//! * no profile handler and exactly one profile ⇒ `single-profile-handler`;
//! * the parser is `requestHandler.parsers[0]`, else the older top-level `parser`, else
//!   `openai-parser`;
//! * the saturation detector is `saturationDetector.pluginRef`, else `utilization-detector`;
//! * a plugin that names other plugins in its parameters (a P/D handler's decider) resolves
//!   them once every entry is built, so the named entry may come later in `plugins[]`;
//! * every plugin implementing a request-control hook (data producer, admitter, pre-request,
//!   response hooks, endpoint listener) is wired in, whether or not a profile names it;
//! * with the `flowControl` gate, a priority band's `fairnessPolicyRef` / `orderingPolicyRef`
//!   names a declared plugin (which may carry parameters and serve several bands); unset, it
//!   is `global-strict-fairness-policy` / `fcfs-ordering-policy`, instantiated under the type
//!   name unless a plugin of that name is declared. llmsched also accepts an undeclared
//!   policy *type* name (instantiated the same way, with default parameters), which the
//!   reference would reject as an unknown plugin.
//!
//! Errors name the source (file or `--config-text`), the plugin and the bad field.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::flowcontrol::{FairnessPolicy, OrderingPolicy};
use crate::metrics::{PluginTimer, point};
use crate::plugin::{
    Admitter, DataProducer, EndpointListener, Parser, Picker, Plugin, PreRequest, ProfileHandler,
    ResponseHooks, SaturationDetector,
};
use crate::registry::{FactoryInput, PluginHandle, Registry};
use crate::scheduler::{Scheduler, SchedulerProfile};
use crate::units::{parse_go_duration, parse_quantity};

/// The `apiVersion`s accepted.
pub const API_VERSIONS: [&str; 2] = [
    "inference.networking.x-k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
];
/// The `kind`.
pub const KIND: &str = "EndpointPickerConfig";

/// The configuration used when none is given: the reference's default scorers (queue,
/// kv-cache-utilization, approximate prefix-cache) plus `active-request-scorer`, which reads
/// the EPP's own in-flight counts instead of metrics scraped every 50 ms, so load is balanced
/// on what was dispatched a moment ago rather than on what the engines reported a refresh
/// ago. Weights: prefix-cache 3, active-request 3, queue 1, kv-cache-utilization 1.
///
/// Why not the reference's default (queue 2, kv 2, prefix 3, [`REFERENCE_DEFAULT_CONFIG_YAML`]):
/// with only scraped signals, min-max-normalized, a replica holding a popular prefix keeps
/// winning while it is overloaded (the queue scorer can move at most 2 of the prefix scorer's
/// 3 points) and every request in a refresh interval sees the same stale queues. On
/// guide-mini-heavy (`scripts/compare-routers.sh`, 4 simulated replicas, real time) the
/// reference default served 47.6 req/s at TTFT p90 2.57 s when offered 80 req/s, and 49.1
/// req/s at 5.59 s when offered 96; this default serves 60.6 req/s at 0.17 s and 65.7 req/s at
/// 0.25 s, ahead of SGLang's and vllm-router's cache-aware policies (58.4 / 62.4 req/s at
/// 0.18 / 0.25 s), with the same prefix-cache hit rate.
pub const DEFAULT_CONFIG_YAML: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: active-request-scorer
    weight: 3
";

/// The reference EPP's default configuration (queue 2, kv-cache-utilization 2,
/// prefix-cache 3), which the seed guide deploys; also shipped as
/// `config/epp/reference-default.yaml` for users who want the reference's exact decisions.
pub const REFERENCE_DEFAULT_CONFIG_YAML: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
";

/// Feature gates llmsched implements.
pub const SUPPORTED_FEATURE_GATES: [&str; 2] = ["flowControl", "prepareDataPlugins"];

/// The raw configuration document.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPickerConfig {
    /// `inference.networking.x-k8s.io/v1alpha1` or `llm-d.ai/v1alpha1`.
    pub api_version: String,
    /// `EndpointPickerConfig`.
    pub kind: String,
    /// Kubernetes-style metadata (ignored).
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Experimental features.
    #[serde(default)]
    pub feature_gates: Vec<String>,
    /// Plugin instances.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Profiles.
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
    /// Saturation detector.
    #[serde(default)]
    pub saturation_detector: Option<PluginRef>,
    /// Data-layer sources.
    #[serde(default)]
    pub data_layer: Option<DataLayerSpec>,
    /// Flow control (with the `flowControl` feature gate).
    #[serde(default)]
    pub flow_control: Option<FlowControlSpec>,
    /// Older parser selection.
    #[serde(default)]
    pub parser: Option<PluginRef>,
    /// Newer parser selection.
    #[serde(default)]
    pub request_handler: Option<RequestHandlerSpec>,
    /// A profile handler declared outside `plugins` (the form of the reference's SLO-aware P/D
    /// sample); loaded as one more `plugins[]` entry.
    #[serde(default)]
    pub profile_handler: Option<PluginSpec>,
}

/// One `plugins[]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Registered type name.
    #[serde(rename = "type", default)]
    pub type_name: String,
    /// Instance name (defaults to the type).
    #[serde(default)]
    pub name: Option<String>,
    /// Type-specific parameters.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

/// One `schedulingProfiles[]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    /// Profile name.
    #[serde(default)]
    pub name: String,
    /// Plugins of the profile.
    #[serde(default)]
    pub plugins: Vec<ProfilePluginRef>,
}

/// A plugin in a profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfilePluginRef {
    /// Name of a `plugins[]` entry.
    #[serde(default)]
    pub plugin_ref: String,
    /// Scorer weight (default 1).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// `{pluginRef: name}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginRef {
    /// Name of a `plugins[]` entry.
    #[serde(default)]
    pub plugin_ref: String,
}

/// `requestHandler`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestHandlerSpec {
    /// Parsers; the first is used.
    #[serde(default)]
    pub parsers: Vec<PluginRef>,
}

/// `dataLayer`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataLayerSpec {
    /// Inject the default metrics source (default true).
    #[serde(default)]
    pub inject_defaults: Option<bool>,
    /// Sources and their extractors.
    #[serde(default)]
    pub sources: Vec<DataLayerSource>,
    /// Discovery plugin.
    #[serde(default)]
    pub discovery: Option<PluginRef>,
}

/// A data-layer source.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataLayerSource {
    /// Source plugin.
    #[serde(default)]
    pub plugin_ref: String,
    /// Extractor plugins.
    #[serde(default)]
    pub extractors: Vec<PluginRef>,
}

/// An integer or a Kubernetes quantity string.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum QuantityValue {
    /// A plain integer.
    Int(u64),
    /// A quantity such as `1Gi`.
    Str(String),
}

impl QuantityValue {
    fn resolve(&self) -> Result<u64, String> {
        match self {
            QuantityValue::Int(v) => Ok(*v),
            QuantityValue::Str(s) => parse_quantity(s).map_err(|e| e.to_string()),
        }
    }
}

/// `flowControl`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowControlSpec {
    /// Global byte cap.
    #[serde(default)]
    pub max_bytes: Option<QuantityValue>,
    /// Global request cap.
    #[serde(default)]
    pub max_requests: Option<QuantityValue>,
    /// Default TTL of a queued request (Go duration).
    #[serde(default, rename = "defaultRequestTTL")]
    pub default_request_ttl: Option<String>,
    /// Template for unlisted priorities.
    #[serde(default)]
    pub default_priority_band: Option<PriorityBandSpec>,
    /// Explicit bands.
    #[serde(default)]
    pub priority_bands: Vec<PriorityBandSpec>,
    /// Usage-limit policy plugin.
    #[serde(default)]
    pub usage_limit_policy_plugin_ref: Option<String>,
}

/// One priority band.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorityBandSpec {
    /// Priority level.
    #[serde(default)]
    pub priority: i32,
    /// Byte cap.
    #[serde(default)]
    pub max_bytes: Option<QuantityValue>,
    /// Request cap.
    #[serde(default)]
    pub max_requests: Option<QuantityValue>,
    /// Fairness policy: a declared plugin's name, or a fairness policy type (default
    /// `global-strict-fairness-policy`).
    #[serde(default)]
    pub fairness_policy_ref: Option<String>,
    /// Ordering policy: a declared plugin's name, or an ordering policy type (default
    /// `fcfs-ordering-policy`).
    #[serde(default)]
    pub ordering_policy_ref: Option<String>,
}

/// Flow control settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowControlSettings {
    /// Global byte cap.
    pub max_bytes: Option<u64>,
    /// Global request cap.
    pub max_requests: Option<u64>,
    /// Default TTL (`None`: until the client gives up).
    pub default_request_ttl: Option<Duration>,
    /// Explicit bands, highest priority first.
    pub bands: Vec<PriorityBand>,
    /// Template for other priorities.
    pub default_band: PriorityBand,
}

/// A resolved priority band.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorityBand {
    /// Priority.
    pub priority: i32,
    /// Byte cap.
    pub max_bytes: Option<u64>,
    /// Request cap.
    pub max_requests: Option<u64>,
    /// Which flow is served next (`fairnessPolicyRef`, default
    /// `global-strict-fairness-policy`).
    pub fairness: PolicyRef<dyn FairnessPolicy>,
    /// Order within a flow (`orderingPolicyRef`, default `fcfs-ordering-policy`).
    pub ordering: PolicyRef<dyn OrderingPolicy>,
}

impl PriorityBand {
    /// A band of `priority` with no caps of its own and the given policies.
    pub fn new(
        priority: i32,
        fairness: PolicyRef<dyn FairnessPolicy>,
        ordering: PolicyRef<dyn OrderingPolicy>,
    ) -> Self {
        Self {
            priority,
            max_bytes: None,
            max_requests: None,
            fairness,
            ordering,
        }
    }
}

/// The default `fairnessPolicyRef` (as the reference).
pub const DEFAULT_FAIRNESS_POLICY: &str = "global-strict-fairness-policy";
/// The default `orderingPolicyRef` (as the reference).
pub const DEFAULT_ORDERING_POLICY: &str = "fcfs-ordering-policy";

/// A policy plugin a band refers to. Two references are equal when they name the same
/// instance of the same type with the same parameters (so an unchanged configuration keeps
/// its flow controller, queues and policy state when it is loaded again).
pub struct PolicyRef<P: ?Sized> {
    /// Instance name.
    pub name: String,
    /// Registered type.
    pub type_name: &'static str,
    /// The instance's `parameters` as written.
    pub parameters: Option<serde_json::Value>,
    /// The policy.
    pub policy: Arc<P>,
}

impl<P: ?Sized> PolicyRef<P> {
    /// A reference to `policy` (a plugin built by its factory) with its parameters.
    pub fn new(
        plugin: &Arc<dyn Plugin>,
        parameters: Option<serde_json::Value>,
        policy: Arc<P>,
    ) -> Self {
        Self {
            name: plugin.name().to_string(),
            type_name: plugin.type_name(),
            parameters,
            policy,
        }
    }
}

impl<P: ?Sized> Clone for PolicyRef<P> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            type_name: self.type_name,
            parameters: self.parameters.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<P: ?Sized> PartialEq for PolicyRef<P> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.type_name == other.type_name
            && self.parameters == other.parameters
    }
}

impl<P: ?Sized> fmt::Debug for PolicyRef<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.type_name)
    }
}

/// Where the configuration came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config-file PATH`.
    File(String),
    /// `--config-text`.
    Text,
    /// The built-in default.
    Default,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "config file {p}"),
            ConfigSource::Text => f.write_str("--config-text"),
            ConfigSource::Default => f.write_str("built-in default config"),
        }
    }
}

/// A configuration that cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {detail}")]
pub struct ConfigError {
    /// Where the configuration came from.
    pub origin: ConfigSource,
    /// What is wrong, naming the plugin and field where there is one.
    pub detail: String,
}

/// A fully built configuration.
pub struct LoadedConfig {
    /// Every plugin instance by name, in declaration order (defaults appended).
    pub plugins: Vec<(String, Arc<dyn Plugin>)>,
    /// The scheduler.
    pub scheduler: Scheduler,
    /// The request parser.
    pub parser: Arc<dyn Parser>,
    /// Data producers, in declaration order.
    pub data_producers: Vec<(Arc<dyn DataProducer>, PluginTimer)>,
    /// Admission plugins.
    pub admitters: Vec<(Arc<dyn Admitter>, PluginTimer)>,
    /// Pre-request hooks.
    pub pre_request: Vec<(Arc<dyn PreRequest>, PluginTimer)>,
    /// Response hooks.
    pub response_hooks: Vec<Arc<dyn ResponseHooks>>,
    /// Endpoint membership listeners.
    pub endpoint_listeners: Vec<Arc<dyn EndpointListener>>,
    /// The saturation detector, when the registry provides one.
    pub saturation_detector: Option<Arc<dyn SaturationDetector>>,
    /// Enabled feature gates.
    pub feature_gates: BTreeSet<String>,
    /// Flow control, when the `flowControl` gate is on.
    pub flow_control: Option<FlowControlSettings>,
    /// The data-layer section as written.
    pub data_layer: Option<DataLayerSpec>,
    /// The document after defaults were applied.
    pub document: EndpointPickerConfig,
}

impl fmt::Debug for LoadedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedConfig")
            .field(
                "plugins",
                &self.plugins.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("scheduler", &self.scheduler)
            .field("parser", &self.parser.name())
            .field("feature_gates", &self.feature_gates)
            .finish()
    }
}

/// Parses a document without building anything.
pub fn parse_document(
    text: &str,
    source: &ConfigSource,
) -> Result<EndpointPickerConfig, ConfigError> {
    let fail = |detail: String| ConfigError {
        origin: source.clone(),
        detail,
    };
    if text.trim().is_empty() {
        return Err(fail("the configuration is empty".into()));
    }
    let doc: EndpointPickerConfig =
        serde_norway::from_str(text).map_err(|e| fail(e.to_string()))?;
    if !API_VERSIONS.contains(&doc.api_version.as_str()) {
        return Err(fail(format!(
            "apiVersion '{}' is not supported (expected one of: {})",
            doc.api_version,
            API_VERSIONS.join(", ")
        )));
    }
    if doc.kind != KIND {
        return Err(fail(format!("kind '{}' is not {KIND}", doc.kind)));
    }
    Ok(doc)
}

/// Loads a configuration: parse, instantiate plugins, apply defaults, validate, build.
pub fn load(
    text: &str,
    source: ConfigSource,
    registry: &Registry,
    handle: &PluginHandle,
) -> Result<LoadedConfig, ConfigError> {
    let doc = parse_document(text, &source)?;
    Loader {
        source,
        registry,
        handle,
        previous: None,
    }
    .build(doc)
}

/// [`load`], reusing the plugin instances of `previous` whose name, type and parameters are
/// unchanged (a reload): the instance is carried over as it is, with its state (the prefix
/// indexes, KV-event subscriptions, counters), instead of being built anew. Defaults added
/// by the loader (a `max-score-picker`, the `openai-parser`...) are reused the same way.
pub fn load_reusing(
    text: &str,
    source: ConfigSource,
    registry: &Registry,
    handle: &PluginHandle,
    previous: &LoadedConfig,
) -> Result<LoadedConfig, ConfigError> {
    let doc = parse_document(text, &source)?;
    Loader {
        source,
        registry,
        handle,
        previous: Some(previous),
    }
    .build(doc)
}

impl LoadedConfig {
    /// The instance named `name` if it was built from `type_name` with `parameters` (a
    /// declared plugin), or is a default the loader added under its type's name.
    fn reusable(
        &self,
        name: &str,
        type_name: &str,
        parameters: Option<&serde_json::Value>,
    ) -> Option<Arc<dyn Plugin>> {
        let (_, plugin) = self.plugins.iter().find(|(n, _)| n == name)?;
        let same = match self
            .document
            .plugins
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
        {
            Some(spec) => {
                spec.type_name == type_name
                    && spec.parameters.as_ref().filter(|v| !v.is_null())
                        == parameters.filter(|v| !v.is_null())
            }
            // Added by the loader: named after its type, without parameters.
            None => name == type_name && plugin.type_name() == type_name && parameters.is_none(),
        };
        same.then(|| plugin.clone())
    }
}

/// Loads [`DEFAULT_CONFIG_YAML`].
pub fn load_default(
    registry: &Registry,
    handle: &PluginHandle,
) -> Result<LoadedConfig, ConfigError> {
    load(DEFAULT_CONFIG_YAML, ConfigSource::Default, registry, handle)
}

struct Loader<'a> {
    source: ConfigSource,
    registry: &'a Registry,
    handle: &'a PluginHandle,
    /// On a reload, the configuration whose unchanged plugin instances are reused.
    previous: Option<&'a LoadedConfig>,
}

/// Plugin instances by name, in declaration order; defaults are appended as they are added.
#[derive(Default)]
struct Instances {
    list: Vec<(String, Arc<dyn Plugin>)>,
    by_name: HashMap<String, usize>,
    parameters: HashMap<String, serde_json::Value>,
}

impl Instances {
    fn get(&self, name: &str) -> Option<&Arc<dyn Plugin>> {
        self.by_name.get(name).map(|&i| &self.list[i].1)
    }

    fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn insert(&mut self, name: String, plugin: Arc<dyn Plugin>) -> usize {
        self.by_name.insert(name.clone(), self.list.len());
        self.list.push((name, plugin));
        self.list.len() - 1
    }

    /// The first plugin that has the role `cast` extracts.
    fn find<T: ?Sized>(&self, cast: impl Fn(Arc<dyn Plugin>) -> Option<Arc<T>>) -> Option<Arc<T>> {
        self.list.iter().find_map(|(_, p)| cast(p.clone()))
    }
}

/// The request-control hooks collected from every plugin.
struct Hooks {
    data_producers: Vec<(Arc<dyn DataProducer>, PluginTimer)>,
    admitters: Vec<(Arc<dyn Admitter>, PluginTimer)>,
    pre_request: Vec<(Arc<dyn PreRequest>, PluginTimer)>,
    response_hooks: Vec<Arc<dyn ResponseHooks>>,
    endpoint_listeners: Vec<Arc<dyn EndpointListener>>,
}

impl Loader<'_> {
    fn err(&self, detail: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.source.clone(),
            detail: detail.into(),
        }
    }

    /// Builds the configuration, one rule of the module documentation per step.
    fn build(&self, mut doc: EndpointPickerConfig) -> Result<LoadedConfig, ConfigError> {
        let feature_gates = self.feature_gates(&doc)?;
        let mut plugins = self.instantiate_plugins(&mut doc)?;
        self.default_profile(&mut doc, &plugins);
        self.check_profile_references(&doc, &plugins)?;
        let default_picker = self.default_picker(&mut plugins)?;
        let handler = self.profile_handler(&doc, &mut plugins)?;
        let scheduler = self.scheduler(&mut doc, &plugins, &default_picker, handler)?;
        let parser = self.parser(&doc, &mut plugins)?;
        let saturation_detector = self.saturation_detector(&doc, &mut plugins)?;
        self.check_data_layer(&doc, &plugins)?;
        let flow_control = self.flow_control(&doc, &feature_gates, &mut plugins)?;
        let hooks = self.request_control_hooks(&plugins);
        Ok(LoadedConfig {
            plugins: plugins.list,
            scheduler,
            parser,
            data_producers: hooks.data_producers,
            admitters: hooks.admitters,
            pre_request: hooks.pre_request,
            response_hooks: hooks.response_hooks,
            endpoint_listeners: hooks.endpoint_listeners,
            saturation_detector,
            feature_gates,
            flow_control,
            data_layer: doc.data_layer.clone(),
            document: doc,
        })
    }

    /// Every gate must be one llmsched implements.
    fn feature_gates(&self, doc: &EndpointPickerConfig) -> Result<BTreeSet<String>, ConfigError> {
        for gate in &doc.feature_gates {
            if !SUPPORTED_FEATURE_GATES.contains(&gate.as_str()) {
                return Err(self.err(format!(
                    "featureGates: '{gate}' is unknown or not supported by llmsched (supported: {})",
                    SUPPORTED_FEATURE_GATES.join(", ")
                )));
            }
        }
        Ok(doc.feature_gates.iter().cloned().collect())
    }

    /// Builds each `plugins[]` entry with its type's factory; `name` defaults to `type`.
    fn instantiate_plugins(
        &self,
        doc: &mut EndpointPickerConfig,
    ) -> Result<Instances, ConfigError> {
        // A separately declared profile handler is one more entry.
        if let Some(spec) = doc.profile_handler.take() {
            doc.plugins.push(spec);
        }
        let mut plugins = Instances::default();
        for (i, spec) in doc.plugins.iter_mut().enumerate() {
            if spec.type_name.is_empty() {
                return Err(self.err(format!(
                    "plugins[{i}]{}: missing 'type'",
                    spec.name
                        .as_deref()
                        .map(|n| format!(" ('{n}')"))
                        .unwrap_or_default()
                )));
            }
            let name = spec
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| spec.type_name.clone());
            spec.name = Some(name.clone());
            if plugins.contains(&name) {
                return Err(self.err(format!("plugins[{i}]: duplicate plugin name '{name}'")));
            }
            let p = self.instantiate(&name, &spec.type_name, spec.parameters.as_ref())?;
            if let Some(params) = &spec.parameters {
                plugins.parameters.insert(name.clone(), params.clone());
            }
            plugins.insert(name, p);
        }
        // References between plugins (by instance name), once every entry exists.
        let lookup = |n: &str| plugins.get(n).cloned();
        for (name, p) in &plugins.list {
            p.resolve_references(&lookup)
                .map_err(|e| self.err(format!("plugin '{name}' (type {}): {e}", p.type_name())))?;
        }
        Ok(plugins)
    }

    fn instantiate(
        &self,
        name: &str,
        type_name: &str,
        parameters: Option<&serde_json::Value>,
    ) -> Result<Arc<dyn Plugin>, ConfigError> {
        if let Some(p) = self
            .previous
            .and_then(|prev| prev.reusable(name, type_name, parameters))
            .filter(|p| !p.holds_references())
        {
            return Ok(p);
        }
        let factory = self
            .registry
            .factory(type_name)
            .map_err(|e| self.err(format!("plugin '{name}': {e}")))?;
        factory(FactoryInput {
            name,
            parameters,
            handle: self.handle,
        })
        .map_err(|e| self.err(format!("plugin '{name}' (type {type_name}): {e}")))
    }

    /// Instantiates `type_name` under its own name unless a plugin of that name exists.
    fn add_default(
        &self,
        plugins: &mut Instances,
        type_name: &str,
    ) -> Result<Arc<dyn Plugin>, ConfigError> {
        if let Some(p) = plugins.get(type_name) {
            return Ok(p.clone());
        }
        let p = self.instantiate(type_name, type_name, None)?;
        plugins.insert(type_name.to_string(), p.clone());
        Ok(p)
    }

    /// No `schedulingProfiles` ⇒ one profile `default` with every filter, scorer and
    /// picker, in declaration order.
    fn default_profile(&self, doc: &mut EndpointPickerConfig, plugins: &Instances) {
        if !doc.scheduling_profiles.is_empty() {
            return;
        }
        let refs = plugins
            .list
            .iter()
            .filter(|(_, p)| {
                p.clone().as_filter().is_some()
                    || p.clone().as_scorer().is_some()
                    || p.clone().as_picker().is_some()
            })
            .map(|(n, _)| ProfilePluginRef {
                plugin_ref: n.clone(),
                weight: None,
            })
            .collect();
        doc.scheduling_profiles.push(ProfileSpec {
            name: "default".into(),
            plugins: refs,
        });
    }

    /// Profiles have unique names and reference declared plugins.
    fn check_profile_references(
        &self,
        doc: &EndpointPickerConfig,
        plugins: &Instances,
    ) -> Result<(), ConfigError> {
        let mut seen_profiles = BTreeSet::new();
        for (i, prof) in doc.scheduling_profiles.iter().enumerate() {
            if prof.name.is_empty() {
                return Err(self.err(format!("schedulingProfiles[{i}] is missing a name")));
            }
            if !seen_profiles.insert(prof.name.clone()) {
                return Err(self.err(format!(
                    "schedulingProfiles[{i}] has duplicate name '{}'",
                    prof.name
                )));
            }
            for (j, r) in prof.plugins.iter().enumerate() {
                if r.plugin_ref.is_empty() {
                    return Err(self.err(format!(
                        "schedulingProfiles[{}].plugins[{j}] is missing a 'pluginRef'",
                        prof.name
                    )));
                }
                if !plugins.contains(&r.plugin_ref) {
                    return Err(self.err(format!(
                        "schedulingProfiles[{}] references undefined plugin '{}'",
                        prof.name, r.plugin_ref
                    )));
                }
            }
        }
        Ok(())
    }

    /// The picker of profiles that name none: the first declared picker, else a
    /// `max-score-picker`.
    fn default_picker(
        &self,
        plugins: &mut Instances,
    ) -> Result<(String, Arc<dyn Picker>), ConfigError> {
        let declared = plugins
            .list
            .iter()
            .find_map(|(n, p)| p.clone().as_picker().map(|pk| (n.clone(), pk)));
        if let Some(found) = declared {
            return Ok(found);
        }
        let p = self.add_default(plugins, "max-score-picker")?;
        let pk = p
            .as_picker()
            .ok_or_else(|| self.err("default picker 'max-score-picker' is not a picker"))?;
        Ok(("max-score-picker".to_string(), pk))
    }

    /// The declared profile handler; none and one profile ⇒ `single-profile-handler`.
    fn profile_handler(
        &self,
        doc: &EndpointPickerConfig,
        plugins: &mut Instances,
    ) -> Result<Arc<dyn ProfileHandler>, ConfigError> {
        let handlers: Vec<(String, Arc<dyn ProfileHandler>)> = plugins
            .list
            .iter()
            .filter_map(|(n, p)| p.clone().as_profile_handler().map(|h| (n.clone(), h)))
            .collect();
        let profiles = doc.scheduling_profiles.len();
        let handler = match handlers.as_slice() {
            [] if profiles == 1 => self
                .add_default(plugins, "single-profile-handler")?
                .as_profile_handler()
                .ok_or_else(|| self.err("single-profile-handler is not a profile handler")),
            [] => Err(self.err(format!(
                "{profiles} scheduling profiles need a profile handler plugin; none is configured"
            ))),
            [(_, h)] => {
                if h.type_name() == "single-profile-handler" && profiles > 1 {
                    return Err(self.err(
                        "single-profile-handler cannot support multiple scheduling profiles",
                    ));
                }
                Ok(h.clone())
            }
            [(a, _), (b, _), ..] => Err(self.err(format!(
                "multiple profile handlers found ('{a}', '{b}'); only one is allowed"
            ))),
        }?;
        // The profiles the handler needs exist.
        let names: Vec<&str> = doc
            .scheduling_profiles
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        handler.check_profiles(&names).map_err(|e| {
            self.err(format!(
                "profile handler '{}' (type {}): {e}",
                handler.name(),
                handler.type_name()
            ))
        })?;
        Ok(handler)
    }

    /// Each profile's filters, weighted scorers (weight defaults to 1) and picker (the
    /// default picker when it names none), then the scheduler over them.
    fn scheduler(
        &self,
        doc: &mut EndpointPickerConfig,
        plugins: &Instances,
        default_picker: &(String, Arc<dyn Picker>),
        handler: Arc<dyn ProfileHandler>,
    ) -> Result<Scheduler, ConfigError> {
        let metrics = Some(self.handle.metrics.clone());
        let mut profiles = Vec::with_capacity(doc.scheduling_profiles.len());
        for prof in &mut doc.scheduling_profiles {
            let mut b = SchedulerProfile::builder(prof.name.clone(), metrics.clone());
            for r in &mut prof.plugins {
                let Some(p) = plugins.get(&r.plugin_ref) else {
                    return Err(self.err(format!(
                        "schedulingProfiles[{}] references undefined plugin '{}'",
                        prof.name, r.plugin_ref
                    )));
                };
                let mut used = false;
                if let Some(f) = p.clone().as_filter() {
                    b = b.filter(f);
                    used = true;
                }
                if let Some(s) = p.clone().as_scorer() {
                    let w = *r.weight.get_or_insert(1.0);
                    if !w.is_finite() || w < 0.0 {
                        return Err(self.err(format!(
                            "schedulingProfiles[{}]: weight of '{}' must be a non-negative number, got {w}",
                            prof.name, r.plugin_ref
                        )));
                    }
                    b = b.scorer(s, w);
                    used = true;
                }
                if let Some(pk) = p.clone().as_picker() {
                    if b.has_picker() {
                        return Err(self.err(format!(
                            "schedulingProfiles[{}]: more than one picker ('{}')",
                            prof.name, r.plugin_ref
                        )));
                    }
                    b = b.picker(pk);
                    used = true;
                }
                if !used && p.clone().as_profile_handler().is_none() {
                    // Hooks-only plugins (e.g. a data producer) may be listed in a profile;
                    // they run as request-control plugins.
                    tracing::debug!(plugin = %r.plugin_ref, profile = %prof.name, "plugin listed in a profile has no scheduling role");
                }
            }
            if !b.has_picker() {
                let (n, pk) = default_picker;
                b = b.picker(pk.clone());
                prof.plugins.push(ProfilePluginRef {
                    plugin_ref: n.clone(),
                    weight: None,
                });
            }
            let profile = b
                .build()
                .ok_or_else(|| self.err(format!("profile '{}' has no picker", prof.name)))?;
            profiles.push(profile);
        }
        Ok(Scheduler::new(profiles, handler, metrics))
    }

    /// `requestHandler.parsers[0]`, else the older top-level `parser`, else a declared
    /// parser, else `openai-parser`.
    fn parser(
        &self,
        doc: &EndpointPickerConfig,
        plugins: &mut Instances,
    ) -> Result<Arc<dyn Parser>, ConfigError> {
        let parser_ref = doc
            .request_handler
            .as_ref()
            .and_then(|rh| rh.parsers.first())
            .or(doc.parser.as_ref())
            .map(|r| r.plugin_ref.clone());
        if let Some(name) = parser_ref {
            let p = plugins
                .get(&name)
                .ok_or_else(|| self.err(format!("parser references undefined plugin '{name}'")))?;
            return p
                .clone()
                .as_parser()
                .ok_or_else(|| self.err(format!("plugin '{name}' is not a parser")));
        }
        if let Some(p) = plugins.find(|p| p.as_parser()) {
            return Ok(p);
        }
        self.add_default(plugins, "openai-parser")?
            .as_parser()
            .ok_or_else(|| self.err("openai-parser is not a parser"))
    }

    /// `saturationDetector.pluginRef`, else a declared detector, else `utilization-detector`
    /// when the registry has it.
    fn saturation_detector(
        &self,
        doc: &EndpointPickerConfig,
        plugins: &mut Instances,
    ) -> Result<Option<Arc<dyn SaturationDetector>>, ConfigError> {
        if let Some(r) = &doc.saturation_detector {
            if r.plugin_ref.is_empty() {
                return Err(self.err("saturationDetector: plugin reference is empty"));
            }
            let p = plugins.get(&r.plugin_ref).ok_or_else(|| {
                self.err(format!(
                    "saturation detector references undefined plugin '{}'",
                    r.plugin_ref
                ))
            })?;
            return p.clone().as_saturation_detector().map(Some).ok_or_else(|| {
                self.err(format!(
                    "plugin '{}' is not a saturation detector",
                    r.plugin_ref
                ))
            });
        }
        if let Some(d) = plugins.find(|p| p.as_saturation_detector()) {
            return Ok(Some(d));
        }
        if !self.registry.supports("utilization-detector") {
            return Ok(None);
        }
        Ok(self
            .add_default(plugins, "utilization-detector")?
            .as_saturation_detector())
    }

    /// `dataLayer` references declared plugins; discovery plugins are not supported.
    fn check_data_layer(
        &self,
        doc: &EndpointPickerConfig,
        plugins: &Instances,
    ) -> Result<(), ConfigError> {
        let Some(dl) = &doc.data_layer else {
            return Ok(());
        };
        if let Some(d) = &dl.discovery {
            return Err(self.err(format!(
                "dataLayer.discovery ('{}') is not supported by llmsched yet; use --endpoints or --endpoints-file",
                d.plugin_ref
            )));
        }
        for s in &dl.sources {
            for r in
                std::iter::once(&s.plugin_ref).chain(s.extractors.iter().map(|e| &e.plugin_ref))
            {
                if !plugins.contains(r) {
                    return Err(self.err(format!("dataLayer references undefined plugin '{r}'")));
                }
            }
        }
        Ok(())
    }

    /// Every plugin implementing a request-control hook is wired in, with its duration
    /// histogram.
    fn request_control_hooks(&self, plugins: &Instances) -> Hooks {
        let m = &self.handle.metrics;
        let timer = |pt: &str, p: &Arc<dyn Plugin>| m.plugin_timer(pt, p.type_name(), p.name());
        let mut hooks = Hooks {
            data_producers: Vec::new(),
            admitters: Vec::new(),
            pre_request: Vec::new(),
            response_hooks: Vec::new(),
            endpoint_listeners: Vec::new(),
        };
        for (_, p) in &plugins.list {
            if let Some(x) = p.clone().as_data_producer() {
                hooks
                    .data_producers
                    .push((x, timer(point::DATA_PRODUCER, p)));
            }
            if let Some(x) = p.clone().as_admitter() {
                hooks.admitters.push((x, timer(point::ADMIT_REQUEST, p)));
            }
            if let Some(x) = p.clone().as_pre_request() {
                hooks.pre_request.push((x, timer(point::PRE_REQUEST, p)));
            }
            if let Some(x) = p.clone().as_response_hooks() {
                hooks.response_hooks.push(x);
            }
            if let Some(x) = p.clone().as_endpoint_listener() {
                hooks.endpoint_listeners.push(x);
            }
        }
        hooks
    }

    /// The `flowControl` section, when the `flowControl` gate is on.
    fn flow_control(
        &self,
        doc: &EndpointPickerConfig,
        feature_gates: &BTreeSet<String>,
        plugins: &mut Instances,
    ) -> Result<Option<FlowControlSettings>, ConfigError> {
        if !feature_gates.contains("flowControl") {
            if doc.flow_control.is_some() {
                tracing::warn!(
                    "flowControl is configured but the 'flowControl' feature gate is off; it is not used"
                );
            }
            return Ok(None);
        }
        let default_spec = FlowControlSpec::default();
        let spec = doc.flow_control.as_ref().unwrap_or(&default_spec);
        if let Some(r) = &spec.usage_limit_policy_plugin_ref {
            return Err(self.err(format!(
                "flowControl.usageLimitPolicyPluginRef ('{r}') is not supported by llmsched yet"
            )));
        }
        let mut bands = Vec::with_capacity(spec.priority_bands.len());
        let mut seen = BTreeSet::new();
        for (i, b) in spec.priority_bands.iter().enumerate() {
            if !seen.insert(b.priority) {
                return Err(self.err(format!(
                    "flowControl.priorityBands[{i}]: duplicate priority {}",
                    b.priority
                )));
            }
            bands.push(self.priority_band(b, &format!("priorityBands[{i}]"), plugins)?);
        }
        bands.sort_by_key(|b| std::cmp::Reverse(b.priority));
        let default_band = self.priority_band(
            spec.default_priority_band
                .as_ref()
                .unwrap_or(&PriorityBandSpec::default()),
            "defaultPriorityBand",
            plugins,
        )?;
        let default_request_ttl = spec
            .default_request_ttl
            .as_deref()
            .map(|s| {
                parse_go_duration(s)
                    .map_err(|e| self.err(format!("flowControl.defaultRequestTTL: {e}")))
            })
            .transpose()?
            .filter(|d| !d.is_zero());
        Ok(Some(FlowControlSettings {
            max_bytes: self.quantity(&spec.max_bytes, "maxBytes")?,
            max_requests: self.quantity(&spec.max_requests, "maxRequests")?,
            default_request_ttl,
            bands,
            default_band,
        }))
    }

    fn quantity(&self, v: &Option<QuantityValue>, field: &str) -> Result<Option<u64>, ConfigError> {
        v.as_ref()
            .map(|v| {
                v.resolve()
                    .map_err(|e| self.err(format!("flowControl.{field}: {e}")))
            })
            .transpose()
    }

    fn priority_band(
        &self,
        b: &PriorityBandSpec,
        field: &str,
        plugins: &mut Instances,
    ) -> Result<PriorityBand, ConfigError> {
        let fairness = self.policy(
            plugins,
            &format!("flowControl.{field}.fairnessPolicyRef"),
            b.fairness_policy_ref.as_deref(),
            DEFAULT_FAIRNESS_POLICY,
            "a fairness policy",
            |p| p.as_fairness_policy(),
        )?;
        let ordering = self.policy(
            plugins,
            &format!("flowControl.{field}.orderingPolicyRef"),
            b.ordering_policy_ref.as_deref(),
            DEFAULT_ORDERING_POLICY,
            "an ordering policy",
            |p| p.as_ordering_policy(),
        )?;
        Ok(PriorityBand {
            priority: b.priority,
            max_bytes: self.quantity(&b.max_bytes, &format!("{field}.maxBytes"))?,
            max_requests: self.quantity(&b.max_requests, &format!("{field}.maxRequests"))?,
            fairness,
            ordering,
        })
    }

    /// Resolves a policy reference as the reference resolves `pluginRef`s: the declared
    /// plugin of that name; else (unset) the default type, instantiated under its own name
    /// when not declared, as the reference does for its default policies. llmsched also
    /// accepts any other policy *type* name that is not declared, instantiated the same way
    /// with its default parameters (older llmsched configurations name
    /// `round-robin-fairness-policy` or `edf-ordering-policy` without declaring them).
    fn policy<P: ?Sized>(
        &self,
        plugins: &mut Instances,
        field: &str,
        reference: Option<&str>,
        default_type: &str,
        kind: &str,
        cast: impl Fn(Arc<dyn Plugin>) -> Option<Arc<P>>,
    ) -> Result<PolicyRef<P>, ConfigError> {
        let name = reference.filter(|r| !r.is_empty()).unwrap_or(default_type);
        let plugin = match plugins.get(name) {
            Some(p) => p.clone(),
            None => match self.registry.factory(name) {
                Ok(_) => self.add_default(plugins, name)?,
                Err(e) => {
                    return Err(self.err(format!(
                        "{field}: '{name}' is not a declared plugin, and as a type: {e}"
                    )));
                }
            },
        };
        let policy = cast(plugin.clone()).ok_or_else(|| {
            self.err(format!(
                "{field}: plugin '{name}' (type {}) is not {kind}",
                plugin.type_name()
            ))
        })?;
        Ok(PolicyRef::new(
            &plugin,
            plugins.parameters.get(name).cloned(),
            policy,
        ))
    }
}
