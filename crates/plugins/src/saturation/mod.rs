//! Saturation detectors: estimate how saturated the pool is (drives shedding of sheddable
//! requests and flow control) and, as filters, drop saturated endpoints.

pub mod concurrency_detector;
pub mod utilization_detector;

use llmsched_core::registry::Registry;

pub use concurrency_detector::ConcurrencyDetector;
pub use utilization_detector::UtilizationDetector;

/// Registers every detector.
pub fn register(r: &mut Registry) {
    r.register(utilization_detector::TYPE, utilization_detector::factory);
    r.register(concurrency_detector::TYPE, concurrency_detector::factory);
}
