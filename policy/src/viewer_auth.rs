//! ViewerAuthentication: who a viewer is. The wire type shared with the operator's CRD and the
//! policy file, and the pure parts of identity: validation, reading the account and the claimed
//! stream limit from verified claims.
//!
//! Signature checking lives in the sidecar (it needs a crypto library); this module says what a
//! rule accepts and how verified claims map to an account and a limit.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::FieldError;

/// Kind of the ViewerAuthentication resource.
pub const KIND: &str = "ViewerAuthentication";

/// Default `refreshInterval` of a `jwksUri`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
/// Shortest `refreshInterval`: a JWKS endpoint is not polled more often.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// The JWKS a rendering gives a rule whose keys could not be loaded: no key, so tokens of that
/// rule's issuer get 503 `auth_unavailable` rather than being let in.
pub const EMPTY_JWKS: &str = r#"{"keys":[]}"#;

/// How viewers identify themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AuthMode {
    /// No identity: the account comes from the `account` query parameter (the prototype's API).
    Disabled,
    /// A bearer token when one is sent (then it must verify); otherwise the query's account.
    Optional,
    /// Every `/streaming` request needs a valid bearer token.
    #[default]
    Required,
}

/// A signature algorithm a rule accepts. `none` is not one of them, by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
    /// HMAC with SHA-256: a shared secret, so only with `jwksSecretRef`.
    HS256,
}

impl JwtAlgorithm {
    /// The name as it appears in a JWT header.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::RS384 => "RS384",
            JwtAlgorithm::RS512 => "RS512",
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::ES384 => "ES384",
            JwtAlgorithm::EdDSA => "EdDSA",
            JwtAlgorithm::HS256 => "HS256",
        }
    }
}

fn default_algorithms() -> Vec<JwtAlgorithm> {
    vec![
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ]
}
fn default_clock_skew() -> u32 {
    60
}
fn default_account_claim() -> String {
    "sub".into()
}

/// A key of a Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret, in the ViewerAuthentication's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key whose value is the JWKS JSON.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// One issuer the sidecars trust, and its keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` claim a token of this rule carries.
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,
    /// Accepted `aud` values; a token must name one of them. Empty: `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub audiences: Vec<String>,
    /// The JWKS (RFC 7517) as JSON text, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Absent rather than null in the schema, so CEL rules can test it with has().
    #[schemars(with = "String", length(max = 65536))]
    pub jwks: Option<String>,
    /// A Secret key holding the JWKS JSON (the only source that may carry HS256 secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "SecretKeyRef")]
    pub jwks_secret_ref: Option<SecretKeyRef>,
    /// An https URL serving the JWKS, fetched by the operator (or, standalone, the sidecar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(max = 2048), regex(pattern = r"^https://"))]
    pub jwks_uri: Option<String>,
    /// How often `jwksUri` is fetched again (`30s`, `10m`, `1h`). Default 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", regex(pattern = r"^[1-9][0-9]{0,5}(s|m|h)$"))]
    pub refresh_interval: Option<String>,
    /// Accepted signature algorithms. Default RS256, ES256, EdDSA.
    #[serde(default = "default_algorithms")]
    #[schemars(length(min = 1, max = 8))]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Tolerance for `exp` and `nbf`, in seconds.
    #[serde(default = "default_clock_skew")]
    #[schemars(range(max = 600))]
    pub clock_skew_seconds: u32,
}

impl JwtRule {
    /// `refreshInterval` as a duration (default 10 minutes, never below 10 seconds).
    pub fn refresh(&self) -> Duration {
        self.refresh_interval
            .as_deref()
            .and_then(parse_interval)
            .unwrap_or(DEFAULT_REFRESH)
            .max(MIN_REFRESH)
    }
}

/// Parses `30s`, `10m`, `1h`.
pub fn parse_interval(text: &str) -> Option<Duration> {
    let unit = match text.chars().last()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        _ => return None,
    };
    let number: u64 = text[..text.len() - 1].parse().ok()?;
    Some(Duration::from_secs(number.checked_mul(unit)?))
}

/// How verified claims become an account and a stream limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimMapping {
    /// Claim holding the account (dots walk into objects: `user.id`). Default `sub`.
    #[serde(default = "default_account_claim")]
    #[schemars(length(min = 1, max = 256))]
    pub account: String,
    /// Claim holding the account's stream limit, an integer (like Brightcove's `climit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(min = 1, max = 256))]
    pub limit: Option<String>,
    /// Claim holding the account's tier, looked up in `tiers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", length(min = 1, max = 256))]
    pub tier: Option<String>,
    /// Tier name to stream limit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 100))]
    pub tiers: BTreeMap<String, u32>,
    /// The largest limit a token may claim; larger claims are capped to it. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "u32", range(min = 1, max = 10000))]
    pub max_claimed_limit: Option<u32>,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        Self {
            account: default_account_claim(),
            limit: None,
            tier: None,
            tiers: BTreeMap::new(),
            max_claimed_limit: None,
        }
    }
}

/// Why verified claims give no usable account.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimProblem {
    /// The account claim is absent or not a string or number.
    #[error("the token has no {0:?} claim with the account")]
    NoAccount(String),
    /// The account claim is not a valid account id.
    #[error("the token's {claim:?} claim is not a valid account: {problem}")]
    BadAccount {
        /// The claim.
        claim: String,
        /// What is wrong.
        problem: String,
    },
}

/// Looks up a dotted claim path (`user.id`) in a claims object.
pub fn claim_at<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if let Some(value) = claims.get(path) {
        return Some(value); // a claim whose own name has dots
    }
    path.split('.')
        .try_fold(claims, |value, part| value.get(part))
}

impl ClaimMapping {
    /// The account the verified `claims` name.
    pub fn account_of(&self, claims: &serde_json::Value) -> Result<String, ClaimProblem> {
        let account = match claim_at(claims, &self.account) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(ClaimProblem::NoAccount(self.account.clone())),
        };
        crate::id::check_id(&account).map_err(|p| ClaimProblem::BadAccount {
            claim: self.account.clone(),
            problem: p.to_string(),
        })?;
        Ok(account)
    }

    /// The stream limit the verified `claims` give: the `limit` claim if it is a positive
    /// integer, else the `tier` claim's entry in `tiers`; capped by `maxClaimedLimit`. `None`
    /// when the token claims nothing usable (then the namespace default applies).
    pub fn claimed_limit(&self, claims: &serde_json::Value) -> Option<u32> {
        let from_limit = self
            .limit
            .as_deref()
            .and_then(|path| claim_at(claims, path))
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .filter(|n| *n >= 1)
            .map(|n| n.min(u64::from(u32::MAX)) as u32);
        let from_tier = || {
            let path = self.tier.as_deref()?;
            let tier = claim_at(claims, path)?.as_str()?;
            self.tiers.get(tier).copied()
        };
        let cap = self.max_claimed_limit.unwrap_or(crate::MAX_STREAMS);
        from_limit.or_else(from_tier).map(|n| n.clamp(1, cap))
    }
}

/// The `spec` of a ViewerAuthentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ViewerAuthenticationSpec {
    /// `Disabled`, `Optional` or `Required` (default).
    #[serde(default)]
    pub mode: AuthMode,
    /// Trusted issuers and their keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub jwt_rules: Vec<JwtRule>,
    /// How claims map to the account and its limit.
    #[serde(default)]
    pub claims: ClaimMapping,
}

impl Default for ViewerAuthenticationSpec {
    fn default() -> Self {
        Self {
            mode: AuthMode::Required,
            jwt_rules: Vec::new(),
            claims: ClaimMapping::default(),
        }
    }
}

/// The `kid`s of a JWKS's keys (keys without one are listed as `-`), or what is wrong with it.
pub fn key_ids(jwks: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(jwks).map_err(|e| format!("is not JSON: {e}"))?;
    let keys = value
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("is not a JWKS: it has no \"keys\" array")?;
    Ok(keys
        .iter()
        .map(|k| {
            k.get("kid")
                .and_then(|v| v.as_str())
                .unwrap_or("-")
                .to_string()
        })
        .collect())
}

impl ViewerAuthenticationSpec {
    /// Checks the rules the schema states (the API server's CEL rules say the same), plus the
    /// inline JWKS's shape. Returns the first broken one.
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |field: String, message: String| {
            Err(FieldError {
                field: format!("spec.{field}"),
                message,
            })
        };
        if self.mode != AuthMode::Disabled && self.jwt_rules.is_empty() {
            return err(
                "jwtRules".into(),
                "at least one rule is needed unless mode is Disabled".into(),
            );
        }
        for (i, rule) in self.jwt_rules.iter().enumerate() {
            let sources = [
                rule.jwks.is_some(),
                rule.jwks_secret_ref.is_some(),
                rule.jwks_uri.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return err(
                    format!("jwtRules[{i}]"),
                    "needs exactly one of jwks, jwksSecretRef, jwksUri".into(),
                );
            }
            if rule.issuer.is_empty() {
                return err(format!("jwtRules[{i}].issuer"), "must not be empty".into());
            }
            if rule.algorithms.is_empty() {
                return err(
                    format!("jwtRules[{i}].algorithms"),
                    "must name at least one algorithm".into(),
                );
            }
            if rule.algorithms.contains(&JwtAlgorithm::HS256) && rule.jwks_secret_ref.is_none() {
                return err(
                    format!("jwtRules[{i}].algorithms"),
                    "HS256 is allowed only with jwksSecretRef (a shared secret must not sit in a \
                     readable object)"
                        .into(),
                );
            }
            if let Some(uri) = &rule.jwks_uri
                && !uri.starts_with("https://")
            {
                return err(
                    format!("jwtRules[{i}].jwksUri"),
                    "must be an https:// URL".into(),
                );
            }
            if let Some(interval) = &rule.refresh_interval
                && parse_interval(interval).is_none()
            {
                return err(
                    format!("jwtRules[{i}].refreshInterval"),
                    format!("must be a number and s, m or h (e.g. 10m), got {interval:?}"),
                );
            }
            if let Some(jwks) = &rule.jwks
                && let Err(problem) = key_ids(jwks)
            {
                return err(format!("jwtRules[{i}].jwks"), problem);
            }
        }
        if self.claims.max_claimed_limit == Some(0) {
            return err("claims.maxClaimedLimit".into(), "must be at least 1".into());
        }
        Ok(())
    }
}

/// A validated ViewerAuthentication, as the sidecar holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewerAuth {
    /// `metadata.name`.
    pub name: String,
    /// The validated spec.
    pub spec: ViewerAuthenticationSpec,
    /// The JWKS of each rule as the operator resolved them; `None` in a hand-written file.
    pub resolved_jwks: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping() -> ClaimMapping {
        ClaimMapping {
            account: "uid".into(),
            limit: Some("climit".into()),
            tier: Some("plan.tier".into()),
            tiers: BTreeMap::from([("basic".into(), 1), ("family".into(), 4)]),
            max_claimed_limit: Some(5),
        }
    }

    #[test]
    fn account_comes_from_the_configured_claim() {
        let m = mapping();
        assert_eq!(m.account_of(&json!({"uid": "alice"})).unwrap(), "alice");
        assert_eq!(m.account_of(&json!({"uid": 42})).unwrap(), "42");
        assert_eq!(
            m.account_of(&json!({"sub": "alice"})),
            Err(ClaimProblem::NoAccount("uid".into()))
        );
        assert!(matches!(
            m.account_of(&json!({"uid": "has space"})),
            Err(ClaimProblem::BadAccount { .. })
        ));
        let nested = ClaimMapping {
            account: "user.id".into(),
            ..ClaimMapping::default()
        };
        assert_eq!(
            nested.account_of(&json!({"user": {"id": "bob"}})).unwrap(),
            "bob"
        );
    }

    #[test]
    fn limit_claim_wins_over_tier_and_both_are_capped() {
        let m = mapping();
        assert_eq!(
            m.claimed_limit(&json!({"climit": 2, "plan": {"tier": "family"}})),
            Some(2)
        );
        assert_eq!(
            m.claimed_limit(&json!({"plan": {"tier": "family"}})),
            Some(4)
        );
        assert_eq!(
            m.claimed_limit(&json!({"plan": {"tier": "basic"}})),
            Some(1)
        );
        // Capped by maxClaimedLimit.
        assert_eq!(m.claimed_limit(&json!({"climit": 500})), Some(5));
        // Nothing usable: the namespace default applies.
        assert_eq!(m.claimed_limit(&json!({"plan": {"tier": "unknown"}})), None);
        assert_eq!(m.claimed_limit(&json!({"climit": 0})), None);
        assert_eq!(m.claimed_limit(&json!({"climit": -3})), None);
        assert_eq!(m.claimed_limit(&json!({})), None);
        // Without a cap, the largest limit a policy may set.
        let uncapped = ClaimMapping {
            max_claimed_limit: None,
            ..mapping()
        };
        assert_eq!(
            uncapped.claimed_limit(&json!({"climit": 99999999})),
            Some(10_000)
        );
    }

    fn rule() -> JwtRule {
        JwtRule {
            issuer: "https://id.example".into(),
            audiences: vec![],
            jwks: Some(EMPTY_JWKS.into()),
            jwks_secret_ref: None,
            jwks_uri: None,
            refresh_interval: None,
            algorithms: default_algorithms(),
            clock_skew_seconds: 60,
        }
    }

    fn spec_with(rule: JwtRule) -> ViewerAuthenticationSpec {
        ViewerAuthenticationSpec {
            jwt_rules: vec![rule],
            ..ViewerAuthenticationSpec::default()
        }
    }

    #[test]
    fn validation_names_the_broken_rule() {
        assert_eq!(spec_with(rule()).validate(), Ok(()));
        let two = JwtRule {
            jwks_uri: Some("https://id.example/jwks".into()),
            ..rule()
        };
        let e = spec_with(two).validate().unwrap_err();
        assert_eq!(e.field, "spec.jwtRules[0]");
        assert!(e.message.contains("exactly one"), "{e}");
        let none = JwtRule {
            jwks: None,
            ..rule()
        };
        assert!(spec_with(none).validate().is_err());
        let hs = JwtRule {
            algorithms: vec![JwtAlgorithm::HS256],
            ..rule()
        };
        let e = spec_with(hs).validate().unwrap_err();
        assert_eq!(e.field, "spec.jwtRules[0].algorithms");
        let http = JwtRule {
            jwks: None,
            jwks_uri: Some("http://id.example/jwks".into()),
            ..rule()
        };
        assert_eq!(
            spec_with(http).validate().unwrap_err().field,
            "spec.jwtRules[0].jwksUri"
        );
        let bad_jwks = JwtRule {
            jwks: Some("{}".into()),
            ..rule()
        };
        assert_eq!(
            spec_with(bad_jwks).validate().unwrap_err().field,
            "spec.jwtRules[0].jwks"
        );
        let e = ViewerAuthenticationSpec::default().validate().unwrap_err();
        assert_eq!(e.field, "spec.jwtRules");
        let disabled = ViewerAuthenticationSpec {
            mode: AuthMode::Disabled,
            ..ViewerAuthenticationSpec::default()
        };
        assert_eq!(disabled.validate(), Ok(()));
    }

    #[test]
    fn none_is_not_an_algorithm() {
        let parsed: Result<JwtAlgorithm, _> = serde_json::from_value(json!("none"));
        assert!(parsed.is_err());
    }

    #[test]
    fn refresh_intervals_parse_with_a_floor() {
        assert_eq!(parse_interval("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_interval("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_interval("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_interval("10"), None);
        assert_eq!(parse_interval("m"), None);
        let r = JwtRule {
            refresh_interval: Some("1s".into()),
            ..rule()
        };
        assert_eq!(r.refresh(), MIN_REFRESH);
        assert_eq!(rule().refresh(), DEFAULT_REFRESH);
    }

    #[test]
    fn key_ids_list_kids() {
        assert_eq!(
            key_ids(r#"{"keys":[{"kid":"a","kty":"OKP"},{"kty":"EC"}]}"#).unwrap(),
            ["a", "-"]
        );
        assert!(key_ids("[]").is_err());
    }
}
