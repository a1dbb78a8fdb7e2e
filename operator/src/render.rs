//! Rendering: the StreamingPolicies of a namespace become one policy file for its sidecars, and
//! each policy gets a verdict for its status. Pure functions, tested directly.

use std::collections::{BTreeMap, BTreeSet};

use streamgate_sidecar::policy::{
    API_VERSION, KIND, PolicyDocument, PolicyMetadata, PolicySpec, render_policy_file,
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
            && doc.spec.validate().is_ok()
        {
            specs.insert(doc.metadata.name, doc.spec);
        }
    }
    specs
}

/// Renders the policies of `namespace`. `previous` holds the specs of the last rendering, so an
/// invalid edit keeps the last good version in force.
pub fn render(
    namespace: &str,
    policies: &[PolicyInput],
    previous: &BTreeMap<String, PolicySpec>,
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
            spec: spec.clone(),
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
    }
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
    use streamgate_sidecar::policy::{OnLimitExceeded, PolicySet};

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
        let r = render("media", &[input("default", 2, &[]), vip], &BTreeMap::new());
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
        );
        let b = render(
            "ns",
            &[input("a", 3, &["x"]), input("b", 2, &[])],
            &BTreeMap::new(),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn deleting_policies_are_left_out() {
        let mut gone = input("gone", 1, &[]);
        gone.deleting = true;
        let r = render("ns", &[gone, input("kept", 4, &["a"])], &BTreeMap::new());
        assert!(!r.policy_file.contains("gone"));
        assert_eq!(r.rendered, BTreeSet::from(["kept".to_string()]));
        assert!(!r.verdicts.contains_key("gone"));
    }

    #[test]
    fn an_invalid_spec_keeps_the_last_good_version() {
        let good = input("default", 3, &[]);
        let previous = previous_specs(
            &render("ns", std::slice::from_ref(&good), &BTreeMap::new()).policy_file,
        );
        let bad = input("default", 3, &["has space"]);
        let r = render("ns", std::slice::from_ref(&bad), &previous);
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
        let r = render("ns", &[bad], &BTreeMap::new());
        assert!(r.rendered.is_empty());
        assert!(r.verdicts["default"].message.contains("not applied"));
    }

    #[test]
    fn overlapping_overrides_are_reported_on_both() {
        let r = render(
            "ns",
            &[input("gold", 5, &["a", "b"]), input("silver", 2, &["b"])],
            &BTreeMap::new(),
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
        );
        assert!(r.verdicts["alpha"].ready);
        assert_eq!(r.verdicts["zeta"].reason, reasons::SHADOWED_DEFAULT);
        assert!(!r.verdicts["zeta"].ready);
    }

    #[test]
    fn hand_edited_garbage_is_ignored_as_previous() {
        assert!(previous_specs("{{{ not yaml").is_empty());
    }
}
