//! ViewerAuthentication rendering: each rule's keys resolved (inline, read from a Secret,
//! fetched from `jwksUri` and refreshed) into the namespace's policy file, so sidecars verify
//! tokens with no Kubernetes API access and no egress; and the status each resource reports.
//!
//! The choices ([`render_viewer_auth`], [`desired_status`]) are pure and tested directly; the
//! Secret reads and the fetches are at the edge ([`resolve_rule`], [`JwksCache`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use streamgate_policy::viewer_auth::{self, EMPTY_JWKS, JwtRule, ViewerAuthenticationSpec};
use streamgate_policy::{API_VERSION, PolicyMetadata, ViewerAuthDocument};

use crate::crd::{PolicyCondition, ViewerAuthentication, ViewerAuthenticationStatus};

/// How often a rule whose keys come from a Secret is read again (a Secret change has no watch:
/// the operator may only `get` Secrets, never list or watch them).
pub const SECRET_REFRESH: Duration = Duration::from_secs(60);
/// How soon a failed `jwksUri` fetch is retried.
pub const FETCH_RETRY: Duration = Duration::from_secs(10);

/// Reasons of the `Ready` condition.
pub mod reasons {
    /// Every rule's keys are resolved and rendered.
    pub const KEYS_LOADED: &str = "KeysLoaded";
    /// A `jwksUri` fetch failed; the last good key set stays in force.
    pub const STALE_KEYS: &str = "StaleKeys";
    /// Some rule has no key (never fetched, Secret unreadable): its tokens get 503.
    pub const KEYS_UNAVAILABLE: &str = "KeysUnavailable";
    /// Another ViewerAuthentication of the namespace is in force.
    pub const SUPERSEDED: &str = "Superseded";
    /// The spec breaks a rule the schema cannot express; it is not rendered.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// One rule's keys as resolved now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleKeys {
    /// The JWKS in force for the rule, if any.
    pub jwks: Option<String>,
    /// What went wrong getting it this time, if anything (with `jwks` set: stale).
    pub error: Option<String>,
    /// When a `jwksUri` set was last fetched successfully.
    pub fetched_at: Option<DateTime<Utc>>,
}

/// What the resource should report, and what the namespace's file should hold for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRendering {
    /// The document for the policy file; `None` when not rendered.
    pub document: Option<ViewerAuthDocument>,
    /// `Ready` status.
    pub ready: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What the user should know.
    pub message: String,
    /// Key ids in force.
    pub key_ids: Vec<String>,
    /// Latest successful `jwksUri` fetch.
    pub last_fetch: Option<DateTime<Utc>>,
}

/// Renders the namespace's ViewerAuthentication in force (`name`, `spec`) with its rules'
/// resolved keys, in rule order.
pub fn render_viewer_auth(
    name: &str,
    spec: &ViewerAuthenticationSpec,
    keys: &[RuleKeys],
) -> AuthRendering {
    if let Err(error) = spec.validate() {
        return AuthRendering {
            document: None,
            ready: false,
            reason: reasons::INVALID_SPEC,
            message: format!("{error}; not applied"),
            key_ids: Vec::new(),
            last_fetch: None,
        };
    }
    let mut key_ids = Vec::new();
    let mut missing = Vec::new();
    let mut stale = Vec::new();
    let mut resolved = Vec::new();
    for (i, (rule, got)) in spec.jwt_rules.iter().zip(keys).enumerate() {
        let ids = got
            .jwks
            .as_deref()
            .and_then(|j| viewer_auth::key_ids(j).ok())
            .unwrap_or_default();
        match (&got.jwks, &got.error) {
            (Some(_), None) if !ids.is_empty() => {}
            (Some(_), Some(error)) if !ids.is_empty() => {
                stale.push(format!("jwtRules[{i}] ({}): {error}", rule.issuer))
            }
            (_, error) => missing.push(format!(
                "jwtRules[{i}] ({}): {}",
                rule.issuer,
                error.as_deref().unwrap_or("the key set has no key")
            )),
        }
        key_ids.extend(ids);
        resolved.push(
            got.jwks
                .clone()
                .filter(|j| viewer_auth::key_ids(j).is_ok())
                .unwrap_or_else(|| EMPTY_JWKS.to_string()),
        );
    }
    let (ready, reason, message) = if !missing.is_empty() {
        (
            false,
            reasons::KEYS_UNAVAILABLE,
            format!(
                "no keys for {}; tokens of that issuer are refused with 503 auth_unavailable",
                missing.join("; ")
            ),
        )
    } else if !stale.is_empty() {
        (
            true,
            reasons::STALE_KEYS,
            format!(
                "fetching failed, the last good key set stays in force: {}",
                stale.join("; ")
            ),
        )
    } else {
        (
            true,
            reasons::KEYS_LOADED,
            format!(
                "{} key(s) of {} issuer(s) rendered into the sidecar configuration",
                key_ids.len(),
                spec.jwt_rules.len()
            ),
        )
    };
    AuthRendering {
        document: Some(ViewerAuthDocument {
            api_version: API_VERSION.into(),
            kind: viewer_auth::KIND.into(),
            metadata: PolicyMetadata {
                name: name.to_string(),
                namespace: None,
            },
            spec: spec.clone(),
            resolved_jwks: Some(resolved),
        }),
        ready,
        reason,
        message,
        key_ids,
        last_fetch: keys.iter().filter_map(|k| k.fetched_at).max(),
    }
}

/// The rendering of a ViewerAuthentication that another one of its namespace supersedes.
pub fn superseded(in_force: &str) -> AuthRendering {
    AuthRendering {
        document: None,
        ready: false,
        reason: reasons::SUPERSEDED,
        message: format!(
            "one ViewerAuthentication per namespace is in force, the first by name: {in_force:?}"
        ),
        key_ids: Vec::new(),
        last_fetch: None,
    }
}

/// The status for `rendering`; the transition time moves only when the status flips.
pub fn desired_status(
    va: &ViewerAuthentication,
    rendering: &AuthRendering,
    now: &str,
) -> ViewerAuthenticationStatus {
    let generation = va.metadata.generation;
    let status = if rendering.ready { "True" } else { "False" };
    let previous = va
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.to_string(),
    };
    ViewerAuthenticationStatus {
        observed_generation: generation,
        conditions: vec![PolicyCondition {
            type_: "Ready".into(),
            status: status.into(),
            reason: rendering.reason.into(),
            message: rendering.message.clone(),
            last_transition_time,
            observed_generation: generation,
        }],
        key_ids: rendering.key_ids.clone(),
        last_jwks_fetch_time: rendering
            .last_fetch
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
    }
}

/// The resolved keys of the ViewerAuthentication a previous rendering holds, by name: kept when
/// a fetch fails after an operator restart.
pub fn previous_resolved(
    policy_file: &str,
) -> HashMap<String, (ViewerAuthenticationSpec, Vec<String>)> {
    use serde::Deserialize;
    let mut found = HashMap::new();
    for document in serde_yaml::Deserializer::from_str(policy_file) {
        let Ok(value) = serde_yaml::Value::deserialize(document) else {
            break;
        };
        if let Ok(doc) = serde_yaml::from_value::<ViewerAuthDocument>(value)
            && doc.kind == viewer_auth::KIND
            && let Some(resolved) = doc.resolved_jwks
        {
            found.insert(doc.metadata.name, (doc.spec, resolved));
        }
    }
    found
}

#[derive(Clone, Debug, Default)]
struct Fetched {
    jwks: Option<String>,
    fetched_at: Option<DateTime<Utc>>,
    error: Option<String>,
    due: Option<DateTime<Utc>>,
}

/// `jwksUri` key sets as last fetched, refreshed when due; the last good set is kept on errors.
pub struct JwksCache {
    client: reqwest::Client,
    entries: Mutex<HashMap<String, Fetched>>,
}

impl JwksCache {
    /// A cache fetching with `client`.
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            entries: Mutex::default(),
        }
    }

    /// The key set of `uri`, fetched now if due (every `refresh`; sooner after a failure).
    /// `seed` is a set from a previous rendering, used until a fetch succeeds. Returns the keys
    /// and when to come back.
    pub async fn get(
        &self,
        uri: &str,
        refresh: Duration,
        seed: Option<&str>,
        now: DateTime<Utc>,
    ) -> (RuleKeys, DateTime<Utc>) {
        let entry = self
            .entries
            .lock()
            .expect("jwks cache lock")
            .get(uri)
            .cloned()
            .unwrap_or_default();
        let entry = if entry.due.is_none_or(|due| due <= now) {
            let mut next = entry.clone();
            match fetch(&self.client, uri).await {
                Ok(jwks) => {
                    if entry.jwks.as_ref() != Some(&jwks) {
                        tracing::info!(%uri, "fetched a new JWKS");
                    }
                    next.jwks = Some(jwks);
                    next.fetched_at = Some(now);
                    next.error = None;
                    next.due = Some(now + refresh);
                }
                Err(error) => {
                    tracing::warn!(%uri, %error, "JWKS fetch failed; keeping the last good set");
                    if next.jwks.is_none() {
                        next.jwks = seed.map(str::to_string);
                    }
                    next.error = Some(format!("fetching {uri} failed: {error}"));
                    next.due = Some(now + FETCH_RETRY.min(refresh));
                }
            }
            self.entries
                .lock()
                .expect("jwks cache lock")
                .insert(uri.to_string(), next.clone());
            next
        } else {
            entry
        };
        (
            RuleKeys {
                jwks: entry.jwks,
                error: entry.error,
                fetched_at: entry.fetched_at,
            },
            entry.due.unwrap_or(now + refresh),
        )
    }
}

async fn fetch(client: &reqwest::Client, uri: &str) -> Result<String, String> {
    let response = client
        .get(uri)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let text = response.text().await.map_err(|e| format!("{e}"))?;
    viewer_auth::key_ids(&text).map_err(|p| format!("the answer {p}"))?;
    Ok(text)
}

/// Resolves one rule's keys. Returns them and when they should be looked at again (`None`:
/// only when the resource changes).
pub async fn resolve_rule(
    client: &Client,
    namespace: &str,
    rule: &JwtRule,
    cache: &JwksCache,
    seed: Option<&str>,
    now: DateTime<Utc>,
) -> (RuleKeys, Option<DateTime<Utc>>) {
    if let Some(jwks) = &rule.jwks {
        return (
            RuleKeys {
                jwks: Some(jwks.clone()),
                error: None,
                fetched_at: None,
            },
            None,
        );
    }
    if let Some(reference) = &rule.jwks_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let result = match secrets.get_opt(&reference.name).await {
            Ok(Some(secret)) => secret
                .data
                .as_ref()
                .and_then(|d| d.get(&reference.key))
                .ok_or_else(|| {
                    format!("Secret {:?} has no key {:?}", reference.name, reference.key)
                })
                .and_then(|bytes| {
                    String::from_utf8(bytes.0.clone()).map_err(|_| {
                        format!(
                            "Secret {:?} key {:?} is not UTF-8",
                            reference.name, reference.key
                        )
                    })
                })
                .and_then(|text| {
                    viewer_auth::key_ids(&text).map(|_| text).map_err(|p| {
                        format!("Secret {:?} key {:?} {p}", reference.name, reference.key)
                    })
                }),
            Ok(None) => Err(format!("Secret {:?} not found", reference.name)),
            Err(kube::Error::Api(status)) if status.code == 403 => Err(format!(
                "the operator may not read Secret {:?} (see the chart's viewerAuthentication.secretNames)",
                reference.name
            )),
            Err(error) => Err(format!("reading Secret {:?}: {error}", reference.name)),
        };
        let recheck = now + SECRET_REFRESH;
        return match result {
            Ok(jwks) => (
                RuleKeys {
                    jwks: Some(jwks),
                    error: None,
                    fetched_at: None,
                },
                Some(recheck),
            ),
            Err(error) => (
                RuleKeys {
                    jwks: None,
                    error: Some(error),
                    fetched_at: None,
                },
                Some(recheck),
            ),
        };
    }
    if let Some(uri) = &rule.jwks_uri {
        let (keys, due) = cache.get(uri, rule.refresh(), seed, now).await;
        return (keys, Some(due));
    }
    (
        RuleKeys {
            jwks: None,
            error: Some("no key source".into()),
            fetched_at: None,
        },
        None,
    )
}

/// The name of a ViewerAuthentication.
pub fn name_of(va: &ViewerAuthentication) -> String {
    va.name_any()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ViewerAuthenticationCrdSpec;
    use streamgate_policy::viewer_auth::SecretKeyRef;

    fn spec(rules: Vec<JwtRule>) -> ViewerAuthenticationSpec {
        ViewerAuthenticationSpec {
            jwt_rules: rules,
            ..ViewerAuthenticationSpec::default()
        }
    }

    fn uri_rule() -> JwtRule {
        serde_json::from_value(serde_json::json!({
            "issuer": "https://id.test", "jwksUri": "https://id.test/jwks"
        }))
        .unwrap()
    }

    fn secret_rule() -> JwtRule {
        JwtRule {
            jwks_uri: None,
            jwks_secret_ref: Some(SecretKeyRef {
                name: "keys".into(),
                key: "jwks.json".into(),
            }),
            issuer: "https://other.test".into(),
            ..uri_rule()
        }
    }

    const JWKS: &str = r#"{"keys":[{"kid":"k1","kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#;

    fn keys(jwks: Option<&str>, error: Option<&str>) -> RuleKeys {
        RuleKeys {
            jwks: jwks.map(str::to_string),
            error: error.map(str::to_string),
            fetched_at: None,
        }
    }

    #[test]
    fn loaded_stale_and_missing_keys_are_told_apart() {
        let s = spec(vec![uri_rule(), secret_rule()]);
        let loaded =
            render_viewer_auth("va", &s, &[keys(Some(JWKS), None), keys(Some(JWKS), None)]);
        assert_eq!((loaded.ready, loaded.reason), (true, reasons::KEYS_LOADED));
        assert_eq!(loaded.key_ids, ["k1", "k1"]);
        let doc = loaded.document.unwrap();
        assert_eq!(doc.resolved_jwks.unwrap(), [JWKS, JWKS]);
        assert_eq!(doc.spec, s, "the spec is rendered as written");

        let stale = render_viewer_auth(
            "va",
            &s,
            &[
                keys(Some(JWKS), Some("fetching failed: HTTP 500")),
                keys(Some(JWKS), None),
            ],
        );
        assert_eq!((stale.ready, stale.reason), (true, reasons::STALE_KEYS));
        assert!(stale.message.contains("HTTP 500"), "{}", stale.message);
        assert_eq!(stale.document.unwrap().resolved_jwks.unwrap()[0], JWKS);

        let missing = render_viewer_auth(
            "va",
            &s,
            &[
                keys(Some(JWKS), None),
                keys(None, Some("Secret \"keys\" not found")),
            ],
        );
        assert_eq!(
            (missing.ready, missing.reason),
            (false, reasons::KEYS_UNAVAILABLE)
        );
        assert!(missing.message.contains("not found"), "{}", missing.message);
        // Rendered anyway, with no key for that rule: its tokens fail closed.
        assert_eq!(
            missing.document.unwrap().resolved_jwks.unwrap()[1],
            EMPTY_JWKS
        );
    }

    #[test]
    fn status_keeps_the_transition_time_and_reports_keys_and_fetch_time() {
        let mut va = ViewerAuthentication::new(
            "va",
            ViewerAuthenticationCrdSpec {
                auth: spec(vec![uri_rule()]),
            },
        );
        va.metadata.generation = Some(2);
        let mut rendering = render_viewer_auth("va", &va.spec.auth, &[keys(Some(JWKS), None)]);
        rendering.last_fetch = Some("2030-01-01T00:00:00Z".parse().unwrap());
        let first = desired_status(&va, &rendering, "t1");
        assert_eq!(first.observed_generation, Some(2));
        assert_eq!(first.key_ids, ["k1"]);
        assert_eq!(
            first.last_jwks_fetch_time.as_deref(),
            Some("2030-01-01T00:00:00Z")
        );
        va.status = Some(first.clone());
        assert_eq!(
            desired_status(&va, &rendering, "t2"),
            first,
            "no change, no write"
        );
        let gone = render_viewer_auth("va", &va.spec.auth, &[keys(None, Some("down"))]);
        let flipped = desired_status(&va, &gone, "t3");
        assert_eq!(flipped.conditions[0].status, "False");
        assert_eq!(flipped.conditions[0].last_transition_time, "t3");
    }

    #[test]
    fn a_rendered_file_gives_back_its_resolved_keys() {
        let s = spec(vec![uri_rule()]);
        let rendering = render_viewer_auth("va", &s, &[keys(Some(JWKS), None)]);
        let file = streamgate_policy::render_viewer_auth(&rendering.document.unwrap()).unwrap();
        let previous = previous_resolved(&file);
        assert_eq!(previous["va"], (s, vec![JWKS.to_string()]));
        // And a sidecar reads it.
        let set = streamgate_policy::PolicySet::from_yaml(&file, "rendered", "ns").unwrap();
        assert_eq!(
            set.viewer_auth().unwrap().resolved_jwks.as_ref().unwrap()[0],
            JWKS
        );
    }
}
