//! Rendering: the StreamingPolicies of a namespace become one policy file for its sidecars, and
//! each policy gets a verdict for its status. Pure functions, tested directly.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SecondsFormat, Utc};
use streamgate_policy::{
    API_VERSION, KIND, PolicyDocument, PolicyMetadata, PolicySpec, Window, render_policy_file,
};

/// Name of the ConfigMap the sidecars of a namespace mount.
pub const CONFIGMAP_NAME: &str = "streamgate-policies";
/// Key of the policy file in that ConfigMap.
pub const POLICY_FILE_KEY: &str = "policies.yaml";

/// One StreamingPolicy as the renderer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInput {
    /// `metadata.name`.
    pub name: String,
    /// The spec as stored.
    pub spec: PolicySpec,
    /// Being deleted: left out of the rendering.
    pub deleting: bool,
}

/// The status a policy should report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `Ready` condition status.
    pub ready: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What the user should know.
    pub message: String,
}

/// The result of rendering a namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendering {
    /// The policy file: the payload of the ConfigMap.
    pub policy_file: String,
    /// Names of the policies whose spec (current or last good) is in the file.
    pub rendered: BTreeSet<String>,
    /// Verdict per policy that is not being deleted.
    pub verdicts: BTreeMap<String, Verdict>,
    /// The next instant at which a policy's `activeFrom` / `activeUntil` window opens or closes:
    /// the namespace must be rendered again then, with no other event.
    pub next_boundary: Option<DateTime<Utc>>,
}

/// Reasons reported in the `Ready` condition.
pub mod reasons {
    /// The policy is in the namespace's policy file as written.
    pub const RENDERED: &str = "Rendered";
    /// Rendered, but another override names some of the same accounts.
    pub const OVERLAPPING_OVERRIDES: &str = "OverlappingOverrides";
    /// A default policy that another default policy shadows.
    pub const SHADOWED_DEFAULT: &str = "ShadowedDefault";
    /// The spec breaks a rule the schema cannot express; the last good version stays in force.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Valid, but its `activeFrom` is still ahead: not rendered yet.
    pub const SCHEDULED: &str = "Scheduled";
    /// Valid, but its `activeUntil` has passed: no longer rendered.
    pub const EXPIRED: &str = "Expired";
}

/// Parses a policy file previously rendered into the ConfigMap: name -> spec. Unreadable content
/// (someone edited the ConfigMap by hand) yields nothing; it is about to be overwritten anyway.
pub fn previous_specs(policy_file: &str) -> BTreeMap<String, PolicySpec> {
    use serde::Deserialize;
    let mut specs = BTreeMap::new();
    for document in serde_yaml::Deserializer::from_str(policy_file) {
        // After a syntax error the document iterator never ends: stop at the first one.
        let Ok(value) = serde_yaml::Value::deserialize(document) else {
            break;
        };
        if let Ok(doc) = serde_yaml::from_value::<PolicyDocument>(value)
            && doc.kind == KIND
            && doc.spec.validate().is_ok()
        {
            specs.insert(doc.metadata.name, doc.spec);
        }
    }
    specs
}

/// Renders the policies of `namespace` as they stand at `now`. `previous` holds the specs of the
/// last rendering, so an invalid edit keeps the last good version in force. Policies outside
/// their `activeFrom` / `activeUntil` window are left out.
pub fn render(
    namespace: &str,
    policies: &[PolicyInput],
    previous: &BTreeMap<String, PolicySpec>,
    now: DateTime<Utc>,
) -> Rendering {
    let mut live: Vec<&PolicyInput> = policies.iter().filter(|p| !p.deleting).collect();
    live.sort_by(|a, b| a.name.cmp(&b.name));

    let mut verdicts = BTreeMap::new();
    let mut in_force: Vec<(String, PolicySpec)> = Vec::new();
    for policy in &live {
        match policy.spec.validate() {
            Ok(()) => in_force.push((policy.name.clone(), policy.spec.clone())),
            Err(error) => {
                let kept = previous.get(&policy.name);
                let message = match kept {
                    Some(_) => {
                        format!("{error}; the last valid version of this policy stays in force")
                    }
                    None => format!("{error}; this policy is not applied"),
                };
                if let Some(spec) = kept {
                    in_force.push((policy.name.clone(), spec.clone()));
                }
                verdicts.insert(
                    policy.name.clone(),
                    Verdict {
                        ready: false,
                        reason: reasons::INVALID_SPEC,
                        message,
                    },
                );
            }
        }
    }

    // Out of their window: reported, not rendered. The rendered ones keep their window, so a
    // sidecar also stops applying an override at `activeUntil` before the re-rendered file
    // reaches it.
    let next_boundary = in_force
        .iter()
        .filter_map(|(_, spec)| spec.next_boundary_after(now))
        .min();
    in_force.retain(|(name, spec)| {
        let verdict = match spec.window_at(now) {
            Window::Active => return true,
            Window::Scheduled(from) => Verdict {
                ready: false,
                reason: reasons::SCHEDULED,
                message: format!("not in force before activeFrom {}", rfc3339(from)),
            },
            Window::Expired(until) => Verdict {
                ready: false,
                reason: reasons::EXPIRED,
                message: format!("no longer in force since activeUntil {}", rfc3339(until)),
            },
        };
        verdicts.entry(name.clone()).or_insert(verdict);
        false
    });

    // The first default by name applies, as in the sidecar.
    let defaults: Vec<&String> = in_force
        .iter()
        .filter(|(_, spec)| spec.accounts.is_empty())
        .map(|(name, _)| name)
        .collect();
    if let Some((winner, shadowed)) = defaults.split_first() {
        for name in shadowed {
            verdicts.entry((*name).clone()).or_insert(Verdict {
                ready: false,
                reason: reasons::SHADOWED_DEFAULT,
                message: format!(
                    "policy {winner:?} is also a default policy (no accounts) and applies, being first by name; give this policy accounts or delete one of them"
                ),
            });
        }
    }

    // Overrides naming the same account: the lowest limit wins; both are told.
    let mut by_account: BTreeMap<&str, Vec<(&String, u32)>> = BTreeMap::new();
    for (name, spec) in &in_force {
        for account in &spec.accounts {
            by_account
                .entry(account.as_str())
                .or_default()
                .push((name, spec.max_streams_per_account));
        }
    }
    let mut overlaps: BTreeMap<&String, Vec<String>> = BTreeMap::new();
    for (account, claimants) in &by_account {
        if claimants.len() < 2 {
            continue;
        }
        let (winner, limit) = claimants
            .iter()
            .min_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
            .expect("at least two claimants");
        for (name, _) in claimants {
            let others: Vec<&str> = claimants
                .iter()
                .filter(|(other, _)| other != name)
                .map(|(other, _)| other.as_str())
                .collect();
            overlaps.entry(name).or_default().push(format!(
                "account {account:?} is also named by {} (the lower limit, {limit} from {winner:?}, applies)",
                others.join(", ")
            ));
        }
    }
    for (name, notes) in overlaps {
        verdicts.entry(name.clone()).or_insert(Verdict {
            ready: true,
            reason: reasons::OVERLAPPING_OVERRIDES,
            message: notes.join("; "),
        });
    }

    for (name, spec) in &in_force {
        verdicts.entry(name.clone()).or_insert(Verdict {
            ready: true,
            reason: reasons::RENDERED,
            message: format!(
                "in force for the sidecars of namespace {namespace}: {}",
                describe(spec)
            ),
        });
    }

    let documents: Vec<PolicyDocument> = in_force
        .iter()
        .map(|(name, spec)| PolicyDocument {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: PolicyMetadata {
                name: name.clone(),
                namespace: Some(namespace.to_string()),
            },
            spec: with_resolved_validators(spec),
        })
        .collect();
    let policy_file = format!(
        "# Rendered by streamgate-operator from the StreamingPolicies of namespace {namespace}.\n{}",
        render_policy_file(&documents).expect("policy documents serialize")
    );
    Rendering {
        policy_file,
        rendered: in_force.into_iter().map(|(name, _)| name).collect(),
        verdicts,
        next_boundary,
    }
}

/// The spec as sidecars get it: a validator's `service` becomes the URL it names, since
/// sidecars have no Kubernetes API access to resolve it.
fn with_resolved_validators(spec: &PolicySpec) -> PolicySpec {
    PolicySpec {
        validators: spec
            .validators
            .iter()
            .map(streamgate_policy::ValidatorSpec::resolved)
            .collect(),
        ..spec.clone()
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn describe(spec: &PolicySpec) -> String {
    let scope = if spec.accounts.is_empty() {
        "every account".to_string()
    } else {
        format!("{} account(s)", spec.accounts.len())
    };
    format!(
        "{scope} limited to {} stream(s), {:?} over the limit, {:?}",
        spec.max_streams_per_account, spec.on_limit_exceeded, spec.mode
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamgate_policy::{OnLimitExceeded, PolicySet};

    fn now() -> DateTime<Utc> {
        at("2030-01-01T12:00:00Z")
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().into()
    }

    fn input(name: &str, limit: u32, accounts: &[&str]) -> PolicyInput {
        PolicyInput {
            name: name.into(),
            spec: PolicySpec {
                max_streams_per_account: limit,
                accounts: accounts.iter().map(|a| a.to_string()).collect(),
                ..PolicySpec::default()
            },
            deleting: false,
        }
    }

    #[test]
    fn renders_a_file_the_sidecar_enforces() {
        let mut vip = input("vip", 10, &["vip-1"]);
        vip.spec.on_limit_exceeded = OnLimitExceeded::EvictOldest;
        let r = render(
            "media",
            &[input("default", 2, &[]), vip],
            &BTreeMap::new(),
            now(),
        );
        let set = PolicySet::from_yaml(&r.policy_file, "rendered", "media").unwrap();
        assert_eq!(set.resolve("anyone").limit, 2);
        assert_eq!(set.resolve("vip-1").limit, 10);
        assert_eq!(
            set.resolve("vip-1").on_limit_exceeded,
            OnLimitExceeded::EvictOldest
        );
        assert!(
            r.verdicts
                .values()
                .all(|v| v.ready && v.reason == reasons::RENDERED)
        );
        // Another namespace's sidecars ignore it.
        let other = PolicySet::from_yaml(&r.policy_file, "rendered", "elsewhere").unwrap();
        assert_eq!(other.resolve("anyone").source, "built-in");
    }

    #[test]
    fn rendering_is_deterministic_whatever_the_input_order() {
        let a = render(
            "ns",
            &[input("b", 2, &[]), input("a", 3, &["x"])],
            &BTreeMap::new(),
            now(),
        );
        let b = render(
            "ns",
            &[input("a", 3, &["x"]), input("b", 2, &[])],
            &BTreeMap::new(),
            now(),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn deleting_policies_are_left_out() {
        let mut gone = input("gone", 1, &[]);
        gone.deleting = true;
        let r = render(
            "ns",
            &[gone, input("kept", 4, &["a"])],
            &BTreeMap::new(),
            now(),
        );
        assert!(!r.policy_file.contains("gone"));
        assert_eq!(r.rendered, BTreeSet::from(["kept".to_string()]));
        assert!(!r.verdicts.contains_key("gone"));
    }

    #[test]
    fn an_invalid_spec_keeps_the_last_good_version() {
        let good = input("default", 3, &[]);
        let previous = previous_specs(
            &render("ns", std::slice::from_ref(&good), &BTreeMap::new(), now()).policy_file,
        );
        let bad = input("default", 3, &["has space"]);
        let r = render("ns", std::slice::from_ref(&bad), &previous, now());
        let verdict = &r.verdicts["default"];
        assert!(!verdict.ready);
        assert_eq!(verdict.reason, reasons::INVALID_SPEC);
        assert!(
            verdict.message.contains("spec.accounts[0]"),
            "{}",
            verdict.message
        );
        assert!(verdict.message.contains("last valid version"));
        let set = PolicySet::from_yaml(&r.policy_file, "r", "ns").unwrap();
        assert_eq!(
            set.resolve("has space").limit,
            3,
            "the good version is in force"
        );
        assert_eq!(set.policies()[0].spec, good.spec);

        // Never valid: not applied at all.
        let r = render("ns", &[bad], &BTreeMap::new(), now());
        assert!(r.rendered.is_empty());
        assert!(r.verdicts["default"].message.contains("not applied"));
    }

    #[test]
    fn overlapping_overrides_are_reported_on_both() {
        let r = render(
            "ns",
            &[input("gold", 5, &["a", "b"]), input("silver", 2, &["b"])],
            &BTreeMap::new(),
            now(),
        );
        for name in ["gold", "silver"] {
            let v = &r.verdicts[name];
            assert!(v.ready);
            assert_eq!(v.reason, reasons::OVERLAPPING_OVERRIDES);
            assert!(v.message.contains("\"b\""), "{}", v.message);
            assert!(v.message.contains("2 from \"silver\""), "{}", v.message);
        }
        let set = PolicySet::from_yaml(&r.policy_file, "r", "ns").unwrap();
        assert_eq!(set.resolve("b").limit, 2);
        assert_eq!(set.resolve("a").limit, 5);
    }

    #[test]
    fn a_second_default_is_reported_as_shadowed() {
        let r = render(
            "ns",
            &[input("zeta", 9, &[]), input("alpha", 1, &[])],
            &BTreeMap::new(),
            now(),
        );
        assert!(r.verdicts["alpha"].ready);
        assert_eq!(r.verdicts["zeta"].reason, reasons::SHADOWED_DEFAULT);
        assert!(!r.verdicts["zeta"].ready);
    }

    #[test]
    fn overrides_outside_their_window_are_left_out_and_reported() {
        let windowed = |name: &str, from: Option<&str>, until: Option<&str>| {
            let mut p = input(name, 7, &["x"]);
            p.spec.active_from = from.map(at);
            p.spec.active_until = until.map(at);
            p
        };
        let policies = [
            input("default", 2, &[]),
            windowed("later", Some("2030-01-02T00:00:00Z"), None),
            windowed("past", None, Some("2030-01-01T11:00:00Z")),
            windowed(
                "now",
                Some("2030-01-01T11:00:00Z"),
                Some("2030-01-01T13:00:00Z"),
            ),
        ];
        let r = render("ns", &policies, &BTreeMap::new(), now());
        assert_eq!(
            r.rendered,
            BTreeSet::from(["default".to_string(), "now".to_string()])
        );
        assert_eq!(r.verdicts["later"].reason, reasons::SCHEDULED);
        assert!(!r.verdicts["later"].ready);
        assert!(r.verdicts["later"].message.contains("2030-01-02T00:00:00Z"));
        assert_eq!(r.verdicts["past"].reason, reasons::EXPIRED);
        assert!(r.verdicts["now"].ready);
        // "now" ends before "later" starts.
        assert_eq!(r.next_boundary, Some(at("2030-01-01T13:00:00Z")));
        let set = PolicySet::from_yaml(&r.policy_file, "r", "ns").unwrap();
        assert_eq!(set.resolve_at("x", now()).limit, 7);
        // The rendered override carries its window: the sidecar lapses it on time by itself.
        assert_eq!(set.resolve_at("x", at("2030-01-01T13:00:00Z")).limit, 2);

        // At the boundary, a new rendering drops it and schedules the next boundary.
        let r = render(
            "ns",
            &policies,
            &BTreeMap::new(),
            at("2030-01-01T13:00:00Z"),
        );
        assert_eq!(r.verdicts["now"].reason, reasons::EXPIRED);
        assert_eq!(r.next_boundary, Some(at("2030-01-02T00:00:00Z")));
        assert_eq!(r.rendered, BTreeSet::from(["default".to_string()]));
    }

    #[test]
    fn hand_edited_garbage_is_ignored_as_previous() {
        assert!(previous_specs("{{{ not yaml").is_empty());
    }
}
