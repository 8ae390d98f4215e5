//! # llmsched-epp
//!
//! The `llmsched epp` subcommand: the reference EPP's flags ([`args`]) and the composition
//! root ([`run`]) that wires the data layer, the director, the ext_proc, health and metrics
//! servers and, in standalone mode, the built-in proxy.

pub mod args;
pub mod data_sources;
mod ha;
mod proxy;
pub mod reload;
pub mod run;

pub use args::{
    Args, ArgsError, Discovery, HaMode, LogSettings, TimeEncoding, ZapEncoder, ZapLevel,
};
pub use run::{EppError, EppHandle, run, start};
