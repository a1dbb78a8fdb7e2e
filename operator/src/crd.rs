//! The StreamingPolicy custom resource (`streamgate.dev/v1alpha1`).
//!
//! The spec is the policy crate's [`PolicySpec`], flattened, so the YAML a user applies and the YAML a
//! sidecar reads with `--policy-file` have one definition. Rules that span fields are CEL rules,
//! checked by the API server before anything is stored.

use kube::CustomResource;
use kube::core::crd::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use streamgate_policy::PolicySpec;

/// Desired state: the sidecar's policy spec.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "streamgate.dev",
    version = "v1alpha1",
    kind = "StreamingPolicy",
    plural = "streamingpolicies",
    shortname = "sp",
    namespaced,
    status = "StreamingPolicyStatus",
    doc = "Per-account concurrent-stream limit for the streaming pods of a namespace.",
    validation = Rule::new("self.spec.sessionTTLSeconds >= 2 * self.spec.heartbeatIntervalSeconds")
        .message("spec.sessionTTLSeconds must be at least twice spec.heartbeatIntervalSeconds")
        .field_path(".spec.sessionTTLSeconds"),
    // Strings of format date-time are timestamps in CEL, so this compares instants, not text.
    validation = Rule::new("!has(self.spec.activeFrom) || !has(self.spec.activeUntil) || self.spec.activeFrom < self.spec.activeUntil")
        .message("spec.activeUntil must be later than spec.activeFrom")
        .field_path(".spec.activeUntil"),
    validation = Rule::new("!has(self.spec.allowedOrigins) || !has(self.spec.accounts) || size(self.spec.accounts) == 0")
        .message("spec.allowedOrigins applies to the namespace's default policy only (one without spec.accounts)")
        .field_path(".spec.allowedOrigins"),
    printcolumn = r#"{"name":"Limit","type":"integer","jsonPath":".spec.maxStreamsPerAccount"}"#,
    printcolumn = r#"{"name":"TTL","type":"integer","jsonPath":".spec.sessionTTLSeconds"}"#,
    printcolumn = r#"{"name":"Over-Limit","type":"string","jsonPath":".spec.onLimitExceeded"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","description":"Live sessions admitted under this policy, counted from the session store at most 30 s ago","jsonPath":".status.activeSessions"}"#,
    printcolumn = r#"{"name":"Active-From","type":"string","jsonPath":".spec.activeFrom"}"#,
    printcolumn = r#"{"name":"Active-Until","type":"string","jsonPath":".spec.activeUntil"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Validators","type":"string","description":"ValidatorsHealthy: False when a session validator has been failing (see the condition's message)","jsonPath":".status.conditions[?(@.type==\"ValidatorsHealthy\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct StreamingPolicySpec {
    /// The policy.
    #[serde(flatten)]
    pub policy: PolicySpec,
}

/// Observed state, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamingPolicyStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the policy is rendered into the namespace's sidecar configuration.
    /// `ValidatorsHealthy` (policies with validators): whether the session validators have been
    /// answering the sidecars, naming any that has been failing. One entry per type, each
    /// written by its own field manager.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<PolicyCondition>,
    /// Live sessions of accounts this policy applies to, counted from the namespace's session
    /// store every 30 s (a snapshot, not a transaction: absent on the embedded memory store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sessions: Option<u64>,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation the condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD as YAML, as committed in `crds/streamingpolicy.yaml`.
pub fn crd_yaml() -> String {
    let crd = StreamingPolicy::crd();
    format!(
        "# Generated by `cargo run -p streamgate-operator --bin crdgen`; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("the CRD serializes")
    )
}

/// Desired state of a ViewerAuthentication: who viewers are, for the sidecars of its namespace.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "streamgate.dev",
    version = "v1alpha1",
    kind = "ViewerAuthentication",
    plural = "viewerauthentications",
    shortname = "va",
    namespaced,
    status = "ViewerAuthenticationStatus",
    doc = "How the viewers of a namespace's streaming pods prove who they are (JWT bearer tokens).",
    validation = Rule::new("!has(self.spec.jwtRules) || self.spec.jwtRules.all(r, (has(r.jwks) ? 1 : 0) + (has(r.jwksSecretRef) ? 1 : 0) + (has(r.jwksUri) ? 1 : 0) == 1)")
        .message("each of spec.jwtRules needs exactly one of jwks, jwksSecretRef, jwksUri")
        .field_path(".spec.jwtRules"),
    validation = Rule::new("!has(self.spec.jwtRules) || self.spec.jwtRules.all(r, !has(r.algorithms) || !r.algorithms.exists(a, a == 'HS256') || has(r.jwksSecretRef))")
        .message("HS256 is allowed only with jwksSecretRef (a shared secret must not sit in a readable object)")
        .field_path(".spec.jwtRules"),
    validation = Rule::new("(has(self.spec.mode) && self.spec.mode == 'Disabled') || (has(self.spec.jwtRules) && size(self.spec.jwtRules) > 0)")
        .message("spec.jwtRules needs at least one rule unless spec.mode is Disabled")
        .field_path(".spec.jwtRules"),
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Keys","type":"string","jsonPath":".status.keyIds"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ViewerAuthenticationCrdSpec {
    /// The viewer authentication.
    #[serde(flatten)]
    pub auth: streamgate_policy::viewer_auth::ViewerAuthenticationSpec,
}

/// Observed state of a ViewerAuthentication, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ViewerAuthenticationStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the keys are resolved and rendered into the namespace's sidecar configuration.
    #[serde(default)]
    pub conditions: Vec<PolicyCondition>,
    /// Key ids in force, per rule in order (`-` for a key without a kid).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_ids: Vec<String>,
    /// When a `jwksUri` was last fetched successfully (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_jwks_fetch_time: Option<String>,
}

/// The ViewerAuthentication CRD as YAML, as committed in `crds/viewerauthentication.yaml`.
pub fn viewer_auth_crd_yaml() -> String {
    let crd = ViewerAuthentication::crd();
    format!(
        "# Generated by `cargo run -p streamgate-operator --bin crdgen -- viewerauthentication`; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("the CRD serializes")
    )
}
