//! StreamGate operator library: the StreamingPolicy CRD, its reconciler and the injection webhook.
pub mod crd;
