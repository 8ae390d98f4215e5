//! The plugin registry: factories keyed by the reference's type names.
//!
//! A factory turns a configuration entry (`type`, `name`, `parameters`) into a plugin
//! instance. Parameters arrive as JSON (YAML is converted) and are parsed by each plugin into
//! its own `#[serde(deny_unknown_fields)]` struct with [`parse_params`], so an unknown or
//! mistyped parameter is an error that names the field.
//!
//! Types the reference has but llmsched does not implement yet are registered as
//! *unsupported*: configuring one is an error saying so, not an "unknown type".

use std::any::{Any, TypeId};
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::endpoint::EndpointSource;
use crate::metrics::SchedulerMetrics;
use crate::plugin::Plugin;

/// Error from a plugin factory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// A parameter is missing, unknown or invalid; the message names it.
    #[error("parameters: {0}")]
    Parameters(String),
    /// Anything else that prevents building the plugin.
    #[error("{0}")]
    Other(String),
}

/// Parses a plugin's parameters into `T` (`None`/`null` gives `T::default()`).
///
/// Declare `T` with `#[serde(deny_unknown_fields, rename_all = "camelCase")]` and defaults.
pub fn parse_params<T: DeserializeOwned + Default>(
    params: Option<&serde_json::Value>,
) -> Result<T, PluginError> {
    match params {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(v) => {
            crate::objectives::from_value_with_path(v.clone()).map_err(PluginError::Parameters)
        }
    }
}

/// Services the runtime offers to plugins, looked up by type (e.g. a tokio runtime handle,
/// a tokenizer cache). Keeps this crate free of I/O dependencies.
#[derive(Default, Clone)]
pub struct Extensions {
    map: BTreeMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.len())
            .finish()
    }
}

impl Extensions {
    /// Adds a service.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// Looks a service up.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref())
    }
}

/// What a factory gets besides its parameters.
#[derive(Clone)]
pub struct PluginHandle {
    /// Scheduler and prefix-indexer metrics.
    pub metrics: Arc<SchedulerMetrics>,
    /// Current endpoints, when the runtime has a data layer.
    pub endpoints: Option<Arc<dyn EndpointSource>>,
    /// Runtime services.
    pub extensions: Extensions,
}

impl std::fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHandle")
            .field("extensions", &self.extensions)
            .finish()
    }
}

impl Default for PluginHandle {
    fn default() -> Self {
        Self {
            metrics: Arc::new(SchedulerMetrics::default()),
            endpoints: None,
            extensions: Extensions::default(),
        }
    }
}

/// Input of a factory.
#[derive(Debug, Clone, Copy)]
pub struct FactoryInput<'a> {
    /// Instance name.
    pub name: &'a str,
    /// `parameters` of the entry.
    pub parameters: Option<&'a serde_json::Value>,
    /// Runtime handle.
    pub handle: &'a PluginHandle,
}

/// Builds a plugin from its configuration.
pub type Factory = fn(FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError>;

#[derive(Clone)]
enum Entry {
    Supported(Factory),
    Alias(&'static str),
    Unsupported(&'static str),
}

/// Plugin factories by type name.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, Entry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

/// Error resolving a type name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// Not a type anyone knows.
    #[error("unknown plugin type '{0}'")]
    Unknown(String),
    /// A reference type llmsched does not implement.
    #[error("plugin type '{0}' is not supported by llmsched yet: {1}")]
    Unsupported(String, &'static str),
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `factory` under `type_name`.
    pub fn register(&mut self, type_name: &'static str, factory: Factory) {
        self.entries.insert(type_name, Entry::Supported(factory));
    }

    /// Registers `alias` as another name of `type_name`.
    pub fn register_alias(&mut self, alias: &'static str, type_name: &'static str) {
        self.entries.insert(alias, Entry::Alias(type_name));
    }

    /// Marks a reference type as not implemented, with a reason shown to the user.
    pub fn register_unsupported(&mut self, type_name: &'static str, reason: &'static str) {
        self.entries.insert(type_name, Entry::Unsupported(reason));
    }

    /// The factory of `type_name` (aliases resolved).
    pub fn factory(&self, type_name: &str) -> Result<Factory, LookupError> {
        let mut name = type_name;
        for _ in 0..4 {
            match self.entries.get(name) {
                Some(Entry::Supported(f)) => return Ok(*f),
                Some(Entry::Alias(target)) => name = target,
                Some(Entry::Unsupported(reason)) => {
                    return Err(LookupError::Unsupported(type_name.to_string(), reason));
                }
                None => break,
            }
        }
        Err(LookupError::Unknown(type_name.to_string()))
    }

    /// True when `type_name` can be built.
    pub fn supports(&self, type_name: &str) -> bool {
        self.factory(type_name).is_ok()
    }

    /// Every supported type name (aliases included), sorted.
    pub fn supported_types(&self) -> Vec<&'static str> {
        self.entries
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Unsupported(_)))
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase", default)]
    struct P {
        block_size: u32,
    }

    #[test]
    fn unknown_parameters_are_named() {
        let ok: P = parse_params(Some(&serde_json::json!({"blockSize": 16}))).unwrap();
        assert_eq!(ok.block_size, 16);
        let none: P = parse_params(None).unwrap();
        assert_eq!(none, P::default());
        let err = parse_params::<P>(Some(&serde_json::json!({"blockSise": 16}))).unwrap_err();
        assert!(err.to_string().contains("blockSise"), "{err}");
        let err = parse_params::<P>(Some(&serde_json::json!({"blockSize": "x"}))).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn aliases_and_unsupported_types() {
        fn f(_: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
            Err(PluginError::Other("not built in this test".into()))
        }
        let mut r = Registry::new();
        r.register("label-selector-filter", f);
        r.register_alias("by-label-selector", "label-selector-filter");
        r.register_unsupported("disagg-profile-handler", "P/D disaggregation is planned");
        assert!(r.supports("by-label-selector"));
        assert_eq!(
            r.factory("nope").unwrap_err(),
            LookupError::Unknown("nope".into())
        );
        let e = r.factory("disagg-profile-handler").unwrap_err().to_string();
        assert!(e.contains("not supported by llmsched yet"), "{e}");
        assert_eq!(
            r.supported_types(),
            vec!["by-label-selector", "label-selector-filter"]
        );
    }

    #[test]
    fn extensions_by_type() {
        let mut x = Extensions::default();
        x.insert(42u64);
        assert_eq!(x.get::<u64>(), Some(&42));
        assert!(x.get::<u32>().is_none());
    }
}
