//! `passthrough-parser`: no parsing at all.
//!
//! The body is forwarded byte for byte ([`RequestBody::raw`]: no model, no prompt), so
//! scheduling uses load only (prefix scorers see no text) and no model rewrite applies.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::sync::Arc;

use bytes::Bytes;
use llmsched_core::Plugin;
use llmsched_core::error::InferenceError;
use llmsched_core::plugin::{ParseOutcome, Parser};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::{Headers, RequestBody};

use crate::common::{impl_plugin, params};
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "passthrough-parser";

/// The passthrough parser.
#[derive(Debug, Clone)]
pub struct PassthroughParser {
    name: String,
}

impl PassthroughParser {
    /// A parser named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(PassthroughParser::new(i.name)))
}

impl_plugin!(PassthroughParser, TYPE, as_parser => Parser);

impl Parser for PassthroughParser {
    fn parse_request(
        &self,
        body: Bytes,
        _headers: &Headers,
    ) -> Result<ParseOutcome, InferenceError> {
        Ok(ParseOutcome::Parsed(RequestBody::raw(body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsched_core::request::{ApiKind, Prompt};

    #[test]
    fn forwards_anything_unchanged() {
        let p = PassthroughParser::new(TYPE);
        for body in [
            &b"{\"model\":\"m\",\"prompt\":\"x\"}"[..],
            b"not json at all",
            b"",
        ] {
            let ParseOutcome::Parsed(b) = p
                .parse_request(Bytes::copy_from_slice(body), &Headers::new())
                .unwrap()
            else {
                panic!("skip")
            };
            assert_eq!(&b.raw[..], body);
            assert_eq!(b.api, ApiKind::Other);
            assert_eq!(b.model, "");
            assert_eq!(b.prompt, Prompt::None);
            assert_eq!(b.model_span, None);
        }
        assert!(
            crate::common::testutil::build_err(TYPE, serde_json::json!({"a": 1}))
                .contains("unknown field")
        );
    }
}
