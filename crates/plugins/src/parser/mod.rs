//! Request parsers: turn a request body into a [`llmsched_core::RequestBody`].

pub mod openai_parser;
pub mod passthrough_parser;

use llmsched_core::registry::Registry;

pub use openai_parser::OpenAiParser;
pub use passthrough_parser::PassthroughParser;

/// Registers every parser.
pub fn register(r: &mut Registry) {
    r.register(openai_parser::TYPE, openai_parser::factory);
    r.register(passthrough_parser::TYPE, passthrough_parser::factory);
}
