//! Session validators: external SessionReview endpoints that check an admitted session
//! (entitlement, geo rights, fraud scoring...) and may have it revoked with reason `denied`.
//!
//! A validator is named in `spec.validators[]` of a StreamingPolicy. Its endpoint is a `url`, or a
//! `service` in the cluster like a Kubernetes webhook's `clientConfig`; [`ValidatorSpec::endpoint`]
//! turns a service into the URL a sidecar calls, so the operator renders a ready-to-use URL and a
//! hand-written policy file works the same way.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most validators one policy may name: each one is called for every admitted session.
pub const MAX_VALIDATORS: usize = 8;
/// Longest allowed `timeoutSeconds`.
pub const MAX_VALIDATOR_TIMEOUT_SECONDS: u32 = 30;
/// Default `timeoutSeconds`.
pub const DEFAULT_VALIDATOR_TIMEOUT_SECONDS: u32 = 5;
/// Longest allowed `revalidateSeconds` (one day).
pub const MAX_REVALIDATE_SECONDS: u32 = 86_400;

/// What a sidecar does when a validator cannot answer (timeout, connection refused, 5xx)
/// within its `timeoutSeconds`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ValidatorFailurePolicy {
    /// Keep the session: a validator's outage never cuts viewers (validation state `failed`).
    #[default]
    Allow,
    /// Revoke the session (reason `denied`, validation state `failed`).
    Revoke,
}

/// When the viewer learns the verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ValidatorMode {
    /// The open answers 201 at once; the check runs in the background and a denial cuts.
    #[default]
    Async,
    /// The open waits for the verdict (within `timeoutSeconds`); a denial answers 403 `denied`.
    Blocking,
}

fn default_timeout() -> u32 {
    DEFAULT_VALIDATOR_TIMEOUT_SECONDS
}
fn default_port() -> u16 {
    443
}

/// A Service in the cluster serving the SessionReview endpoint over HTTPS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// The Service's namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
    /// The Service's name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The Service's port (default 443).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The URL path of the endpoint (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), regex(pattern = r"^/[\x21-\x7e]*$"))]
    pub path: Option<String>,
}

/// One validator of a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.url) != has(self.service)", "message": "exactly one of url and service must be set"},
]))]
pub struct ValidatorSpec {
    /// Name, unique in the policy; a metric label and the `validator` of a denial.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The endpoint's URL (`http://` or `https://`). Exactly one of `url` and `service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Absent rather than null in the schema, so the CEL rule's has() means "set".
    #[schemars(
        with = "String",
        length(max = 2048),
        regex(pattern = r"^https?://[^\s]+$")
    )]
    pub url: Option<String>,
    /// A Service in the cluster, called at `https://NAME.NAMESPACE.svc:PORT/PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "ServiceReference")]
    pub service: Option<ServiceReference>,
    /// Base64 of the PEM certificates that sign the endpoint's serving certificate; absent:
    /// the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "byte"), length(max = 65536))]
    pub ca_bundle: Option<String>,
    /// How long one check may take, retries included (default 5).
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 30))]
    pub timeout_seconds: u32,
    /// What a check that gets no answer does to the session.
    #[serde(default)]
    pub failure_policy: ValidatorFailurePolicy,
    /// Check again this often while the session lives (e.g. a subscription cancelled
    /// mid-stream). Absent: checked once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub revalidate_seconds: Option<u32>,
    /// `Async` (default: the open answers at once) or `Blocking` (the open waits).
    #[serde(default)]
    pub mode: ValidatorMode,
}

impl ValidatorSpec {
    /// The URL a sidecar calls: `url`, or `https://NAME.NAMESPACE.svc:PORT/PATH` for a service.
    pub fn endpoint(&self) -> String {
        match (&self.url, &self.service) {
            (Some(url), _) => url.clone(),
            (None, Some(service)) => format!(
                "https://{}.{}.svc:{}{}",
                service.name,
                service.namespace,
                service.port,
                service.path.as_deref().unwrap_or("/")
            ),
            // Refused by `check_validators`; an empty URL fails every call (failurePolicy applies).
            (None, None) => String::new(),
        }
    }

    /// This validator with its `service` replaced by the URL it names: what the operator
    /// renders for sidecars, which cannot resolve Services themselves.
    pub fn resolved(&self) -> Self {
        Self {
            url: Some(self.endpoint()),
            service: None,
            ..self.clone()
        }
    }
}

/// Checks `spec.validators`: names, endpoints, bounds. Returns the field at fault and why.
pub fn check_validators(validators: &[ValidatorSpec]) -> Result<(), (String, String)> {
    if validators.len() > MAX_VALIDATORS {
        return Err((
            "validators".into(),
            format!(
                "at most {MAX_VALIDATORS} validators, got {}",
                validators.len()
            ),
        ));
    }
    for (i, v) in validators.iter().enumerate() {
        let field = |name: &str| format!("validators[{i}].{name}");
        if !is_dns_label(&v.name) {
            return Err((
                field("name"),
                "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit".into(),
            ));
        }
        if validators[..i].iter().any(|other| other.name == v.name) {
            return Err((field("name"), format!("{:?} is used twice", v.name)));
        }
        match (&v.url, &v.service) {
            (Some(_), Some(_)) | (None, None) => {
                return Err((
                    format!("validators[{i}]"),
                    "exactly one of url and service must be set".into(),
                ));
            }
            (Some(url), None) => {
                let rest = url
                    .strip_prefix("https://")
                    .or_else(|| url.strip_prefix("http://"));
                match rest {
                    Some(rest)
                        if !rest.is_empty()
                            && !rest.starts_with('/')
                            && url.len() <= 2048
                            && !url.chars().any(|c| c.is_whitespace() || c.is_control()) => {}
                    _ => {
                        return Err((
                            field("url"),
                            "must be an http:// or https:// URL with a host".into(),
                        ));
                    }
                }
            }
            (None, Some(service)) => {
                if !is_dns_label(&service.namespace) {
                    return Err((
                        field("service.namespace"),
                        "must be a namespace name".into(),
                    ));
                }
                if !is_dns_label(&service.name) {
                    return Err((field("service.name"), "must be a Service name".into()));
                }
                if service.port == 0 {
                    return Err((field("service.port"), "must be 1-65535".into()));
                }
                if let Some(path) = &service.path
                    && (!path.starts_with('/')
                        || path.len() > 256
                        || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)))
                {
                    return Err((
                        field("service.path"),
                        "must start with '/' and hold visible ASCII only".into(),
                    ));
                }
            }
        }
        if !(1..=MAX_VALIDATOR_TIMEOUT_SECONDS).contains(&v.timeout_seconds) {
            return Err((
                field("timeoutSeconds"),
                format!(
                    "must be between 1 and {MAX_VALIDATOR_TIMEOUT_SECONDS}, got {}",
                    v.timeout_seconds
                ),
            ));
        }
        if let Some(every) = v.revalidate_seconds
            && !(1..=MAX_REVALIDATE_SECONDS).contains(&every)
        {
            return Err((
                field("revalidateSeconds"),
                format!("must be between 1 and {MAX_REVALIDATE_SECONDS}, got {every}"),
            ));
        }
        if let Some(bundle) = &v.ca_bundle
            && (bundle.is_empty()
                || bundle.len() > 65536
                || !bundle
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')))
        {
            return Err((
                field("caBundle"),
                "must be the base64 of PEM certificates".into(),
            ));
        }
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ValidatorSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_match_the_contract() {
        let v = parse("{name: entitlement, url: 'http://127.0.0.1:1/review'}");
        assert_eq!(v.timeout_seconds, 5);
        assert_eq!(v.failure_policy, ValidatorFailurePolicy::Allow);
        assert_eq!(v.mode, ValidatorMode::Async);
        assert_eq!(v.revalidate_seconds, None);
        assert_eq!(check_validators(&[v]), Ok(()));
    }

    #[test]
    fn a_service_resolves_to_its_cluster_url() {
        let v = parse(
            "{name: geo, service: {namespace: checks, name: geo-svc, port: 8443, path: /review}}",
        );
        assert_eq!(v.endpoint(), "https://geo-svc.checks.svc:8443/review");
        let resolved = v.resolved();
        assert_eq!(
            (resolved.url.as_deref(), resolved.service),
            (Some("https://geo-svc.checks.svc:8443/review"), None)
        );
        let v = parse("{name: geo, service: {namespace: checks, name: geo-svc}}");
        assert_eq!(v.endpoint(), "https://geo-svc.checks.svc:443/");
    }

    #[test]
    fn the_example_policy_loads_with_its_service_resolved() {
        let set = crate::PolicySet::from_yaml(
            include_str!("../../examples/session-validators.yaml"),
            "examples/session-validators.yaml",
            "default",
        )
        .unwrap();
        let validators = &set.resolve("anyone").validators;
        assert_eq!(
            validators
                .iter()
                .map(|v| v.url.as_deref().unwrap())
                .collect::<Vec<_>>(),
            [
                "https://entitlement.checks.svc:8443/review",
                "http://fraud.checks.svc:8081/review"
            ]
        );
        assert_eq!(validators[1].mode, ValidatorMode::Blocking);
    }

    #[test]
    fn bad_validators_name_the_field() {
        let ok = "{name: a, url: 'https://v.example/r'}";
        for (list, field) in [
            (format!("[{ok}, {ok}]"), "validators[1].name"),
            ("[{name: a}]".into(), "validators[0]"),
            (
                "[{name: a, url: 'https://x/', service: {namespace: n, name: s}}]".into(),
                "validators[0]",
            ),
            ("[{name: a, url: 'ftp://x/'}]".into(), "validators[0].url"),
            ("[{name: a, url: 'https:///x'}]".into(), "validators[0].url"),
            (
                "[{name: A, url: 'https://x/'}]".into(),
                "validators[0].name",
            ),
            (
                "[{name: a, url: 'https://x/', timeoutSeconds: 0}]".into(),
                "validators[0].timeoutSeconds",
            ),
            (
                "[{name: a, url: 'https://x/', timeoutSeconds: 31}]".into(),
                "validators[0].timeoutSeconds",
            ),
            (
                "[{name: a, url: 'https://x/', revalidateSeconds: 0}]".into(),
                "validators[0].revalidateSeconds",
            ),
            (
                "[{name: a, url: 'https://x/', caBundle: 'not base64!'}]".into(),
                "validators[0].caBundle",
            ),
            (
                "[{name: a, service: {namespace: n, name: s, path: 'no-slash'}}]".into(),
                "validators[0].service.path",
            ),
        ] {
            let validators: Vec<ValidatorSpec> = serde_yaml::from_str(&list).unwrap();
            let (got, _) = check_validators(&validators).unwrap_err();
            assert_eq!(got, field, "{list}");
        }
        let many: Vec<ValidatorSpec> = (0..9)
            .map(|i| parse(&format!("{{name: v{i}, url: 'https://x/'}}")))
            .collect();
        assert_eq!(check_validators(&many).unwrap_err().0, "validators");
    }
}
