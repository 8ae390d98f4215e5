//! Descriptors: plugin types with no scheduling role that configurations declare and the
//! runtime reads (data-layer sources and extractors, the in-flight load producer). Their
//! factories validate the parameters
//! exactly (unknown fields are errors) and build a [`Descriptor`]; the runtime re-reads the
//! typed parameters from the loaded document with the `*Params` types of this module, e.g.
//! [`MetricsDataSourceParams::from_value`].

pub mod core_metrics_extractor;
pub mod inflight_load_producer;
pub mod metrics_data_source;

use llmsched_core::registry::Registry;

pub use core_metrics_extractor::{CoreMetricsExtractorParams, EngineConfig};
pub use metrics_data_source::MetricsDataSourceParams;

/// Registers every descriptor type.
pub fn register(r: &mut Registry) {
    r.register(metrics_data_source::TYPE, metrics_data_source::factory);
    r.register(
        core_metrics_extractor::TYPE,
        core_metrics_extractor::factory,
    );
    r.register(
        inflight_load_producer::TYPE,
        inflight_load_producer::factory,
    );
}

/// A plugin instance that only carries its (validated) configuration.
#[derive(Debug, Clone)]
pub struct Descriptor {
    type_name: &'static str,
    name: String,
}

impl Descriptor {
    /// A descriptor of `type_name` named `name`.
    pub fn new(type_name: &'static str, name: impl Into<String>) -> Self {
        Self {
            type_name,
            name: name.into(),
        }
    }
}

crate::common::impl_plugin!(Descriptor, field);
