//! StreamGate sidecar: the session engine, policy file and HTTP session API over the session
//! stores of `streamgate-store`.
//!
//! The binary `streamgate-sidecar` is a thin wrapper over [`server::run`]. Tests and tools embed
//! the sidecar with [`server::Sidecar`].
#![forbid(unsafe_code)]

pub mod api;
pub mod breaker;
pub mod config;
pub mod connections;
pub mod cors;
pub mod engine;
pub mod error;
pub mod hls;
pub mod identity;
pub mod metrics;
pub mod playback;
pub mod policy_watch;
pub mod proxy;
pub mod server;
pub mod store;
pub mod validation;

/// The policy types, validation and resolution, from the `streamgate-policy` crate.
pub use streamgate_policy as policy;
/// Sessions, admission and identifier checks, from the `streamgate-store` crate.
pub use streamgate_store::{admission, clock, session, validate};
