//! Data producers: compute per-request data before scheduling.

pub mod approx_prefix_cache_producer;

use llmsched_core::registry::Registry;

pub use approx_prefix_cache_producer::ApproxPrefixCacheProducer;

/// Registers every producer.
pub fn register(r: &mut Registry) {
    r.register(
        approx_prefix_cache_producer::TYPE,
        approx_prefix_cache_producer::factory,
    );
}
