//! StreamGate sidecar: the session engine, session stores, policy file and HTTP session API.
//!
//! The binary `streamgate-sidecar` is a thin wrapper over [`server::run`]. Tests and tools embed
//! the sidecar with [`server::Sidecar`].
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod breaker;
pub mod clock;
pub mod config;
pub mod connections;
pub mod cors;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod policy_watch;
pub mod proxy;
pub mod server;
pub mod session;
pub mod store;
pub mod validate;

/// The policy types, validation and resolution, from the `streamgate-policy` crate.
pub use streamgate_policy as policy;
