//! Admission plugins: decide whether a request may be scheduled now.

pub mod probabilistic_admitter;

use llmsched_core::registry::Registry;

pub use probabilistic_admitter::ProbabilisticAdmitter;

/// Registers every admitter.
pub fn register(r: &mut Registry) {
    r.register(
        probabilistic_admitter::TYPE,
        probabilistic_admitter::factory,
    );
}
