//! Placeholder: filled in by the test control plane work.
