//! Helpers shared by the plugins: the `Plugin` boilerplate macro, parameter errors, Go
//! durations in parameters and the per-thread random number generator of the pickers.

use std::cell::RefCell;
use std::time::Duration;

use llmsched_core::registry::PluginError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer};

/// Implements [`llmsched_core::Plugin`] for a struct with a `name: String` field.
///
/// `impl_plugin!(Type, "type-name", as_scorer => Scorer, ...)` uses a constant type name;
/// `impl_plugin!(Type, field, ...)` reads a `type_name: &'static str` field.
macro_rules! impl_plugin {
    ($ty:ty, field $(, $role:ident => $tr:ident)* $(,)?) => {
        impl llmsched_core::Plugin for $ty {
            fn type_name(&self) -> &'static str {
                self.type_name
            }
            fn name(&self) -> &str {
                &self.name
            }
            $(
                fn $role(
                    self: std::sync::Arc<Self>,
                ) -> Option<std::sync::Arc<dyn llmsched_core::plugin::$tr>> {
                    Some(self)
                }
            )*
        }
    };
    ($ty:ty, $type_name:expr $(, $role:ident => $tr:ident)* $(,)?) => {
        impl llmsched_core::Plugin for $ty {
            fn type_name(&self) -> &'static str {
                $type_name
            }
            fn name(&self) -> &str {
                &self.name
            }
            $(
                fn $role(
                    self: std::sync::Arc<Self>,
                ) -> Option<std::sync::Arc<dyn llmsched_core::plugin::$tr>> {
                    Some(self)
                }
            )*
        }
    };
}
pub(crate) use impl_plugin;

/// A parameter value that is well-formed but not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidParameter(pub String);

impl From<InvalidParameter> for PluginError {
    fn from(e: InvalidParameter) -> Self {
        PluginError::Parameters(e.0)
    }
}

/// `Err(InvalidParameter)` with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => {
        Err($crate::common::InvalidParameter(format!($($arg)*)).into())
    };
}
pub(crate) use invalid;

/// Parses a plugin's `parameters`: like [`llmsched_core::registry::parse_params`], but only a
/// JSON object (or nothing / `null`) is accepted — serde would otherwise also read a struct
/// from an array, positionally.
pub(crate) fn params<T: serde::de::DeserializeOwned + Default>(
    parameters: Option<&serde_json::Value>,
) -> Result<T, PluginError> {
    match parameters {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Object(_)) => {
            llmsched_core::registry::parse_params(parameters)
        }
        Some(other) => Err(PluginError::Parameters(format!(
            "invalid type: expected an object of parameters, got {}",
            match other {
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(_) => "a string",
                _ => "an array",
            }
        ))),
    }
}

/// Deserializes an optional Go duration string (`"200ms"`, `"1m30s"`).
pub(crate) fn opt_go_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| llmsched_core::units::parse_go_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// Runs `f` with this thread's fast, non-cryptographic generator (seeded from the OS-seeded
/// thread RNG once per thread). Lock-free: no state is shared between threads.
pub(crate) fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|r| f(&mut r.borrow_mut()))
}

/// A uniform sample in [0, 1).
pub(crate) fn random_unit() -> f64 {
    with_rng(|r| r.random::<f64>())
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builders for endpoints, requests and scheduling contexts used by the unit tests.

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Instant;

    use llmsched_core::Plugin;
    use llmsched_core::cycle::CycleState;
    use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointMeta, EndpointMetrics};
    use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer};
    use llmsched_core::registry::{FactoryInput, PluginError, PluginHandle, Registry};
    use llmsched_core::request::{Headers, InferenceRequest};

    /// An endpoint `10.0.0.<id>:8000` named `pod-<id>` with fresh metrics.
    pub fn ep(id: u32) -> Arc<Endpoint> {
        ep_with(
            id,
            &[],
            EndpointMetrics {
                updated_at: Some(Instant::now()),
                ..Default::default()
            },
        )
    }

    /// An endpoint with labels and metrics.
    pub fn ep_with(id: u32, labels: &[(&str, &str)], metrics: EndpointMetrics) -> Arc<Endpoint> {
        let meta = EndpointMeta {
            name: format!("pod-{id}"),
            address: std::net::Ipv4Addr::from(0x0A00_0000 | (id & 0x00FF_FFFF)).into(),
            port: 8000,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        };
        let e = Arc::new(Endpoint::new(EndpointId(id), meta));
        e.set_metrics(metrics);
        e
    }

    /// Fresh metrics with a waiting queue, running count and KV usage.
    pub fn load(waiting: u32, running: u32, kv: f64) -> EndpointMetrics {
        EndpointMetrics {
            waiting_queue_size: waiting,
            running_requests: running,
            kv_cache_usage: kv,
            updated_at: Some(Instant::now()),
            ..Default::default()
        }
    }

    /// A request without body for `model`.
    pub fn request(model: &str) -> InferenceRequest {
        let mut r = InferenceRequest::new("req-1", Headers::new(), None);
        r.incoming_model = model.into();
        r.target_model = model.into();
        r
    }

    /// Runs a scorer over `eps` and returns its scores.
    pub fn scores(
        s: &dyn Scorer,
        req: &InferenceRequest,
        cycle: &CycleState,
        eps: &[Arc<Endpoint>],
    ) -> Vec<f64> {
        let cands: Vec<Candidate<'_>> = eps.iter().collect();
        let cx = SchedulingContext {
            request: req,
            cycle,
            now: Instant::now(),
        };
        let mut out = vec![0.0; cands.len()];
        s.score(&cx, &cands, &mut out);
        out
    }

    /// Builds a plugin through the default registry, as the config loader does.
    pub fn build(
        type_name: &str,
        params: Option<serde_json::Value>,
    ) -> Result<Arc<dyn Plugin>, PluginError> {
        build_with(type_name, params, &PluginHandle::default())
    }

    /// Builds a plugin through the default registry with a handle.
    pub fn build_with(
        type_name: &str,
        params: Option<serde_json::Value>,
        handle: &PluginHandle,
    ) -> Result<Arc<dyn Plugin>, PluginError> {
        let reg: Registry = crate::default_registry();
        let f = reg
            .factory(type_name)
            .map_err(|e| PluginError::Other(e.to_string()))?;
        f(FactoryInput {
            name: type_name,
            parameters: params.as_ref(),
            handle,
        })
    }

    /// The error message of a failed build.
    pub fn build_err(type_name: &str, params: serde_json::Value) -> String {
        match build(type_name, Some(params)) {
            Ok(_) => panic!("{type_name}: parameters should be rejected"),
            Err(e) => e.to_string(),
        }
    }

    /// Runs `plugin`'s pre-request hook as the director and a transport do: `pre_request`
    /// at routing time, then `after_dispatch` once the request is on its way.
    pub fn dispatch(
        plugin: &Arc<dyn Plugin>,
        request: &InferenceRequest,
        cycle: &CycleState,
        result: &llmsched_core::SchedulingResult,
    ) {
        let hook = plugin
            .clone()
            .as_pre_request()
            .expect("the plugin is a pre-request hook");
        hook.pre_request(request, cycle, result, &mut Vec::new());
        hook.after_dispatch(request, cycle, result);
    }

    /// Asserts two float slices are equal within 1e-9.
    pub fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }
}
