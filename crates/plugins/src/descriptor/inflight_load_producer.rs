//! `inflight-load-producer`: accepted for compatibility; llmsched always tracks each
//! endpoint's in-flight requests and tokens itself (`Endpoint::dispatch` / `complete`, done
//! by the director), which is what this reference plugin provides to `active-request-scorer`,
//! `token-load-scorer` and `concurrency-detector`.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::registry::{FactoryInput, PluginError};

use super::Descriptor;
use crate::common::params;
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "inflight-load-producer";

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(Descriptor::new(TYPE, i.name)))
}
