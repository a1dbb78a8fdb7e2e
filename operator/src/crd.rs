//! Placeholder until the operator's CRD lands.
