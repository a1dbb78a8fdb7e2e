//! Session stores, from the `streamgate-store` crate, plus the sidecar's fleet-wide census of
//! live sessions on Redis (it groups counts by the policies the engine resolves).

pub use streamgate_store::*;

pub mod redis_count;
