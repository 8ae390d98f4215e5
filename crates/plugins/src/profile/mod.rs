//! Profile handlers: decide which scheduling profiles run and which result is primary.

pub mod single_profile_handler;

use llmsched_core::registry::Registry;

pub use single_profile_handler::SingleProfileHandler;

/// Registers every profile handler.
pub fn register(r: &mut Registry) {
    r.register(
        single_profile_handler::TYPE,
        single_profile_handler::factory,
    );
}
