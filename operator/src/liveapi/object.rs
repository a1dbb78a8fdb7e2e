//! The `live.streamgate.dev/v1alpha1` resource as JSON: objects, lists, tables, `Status` errors,
//! discovery and OpenAPI documents. Pure functions of their inputs.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

/// API group of the live-session API.
pub const GROUP: &str = "live.streamgate.dev";
/// Its only version.
pub const VERSION: &str = "v1alpha1";
/// `GROUP/VERSION`.
pub const GROUP_VERSION: &str = "live.streamgate.dev/v1alpha1";
/// Resource (plural) name.
pub const RESOURCE: &str = "streamingsessions";
/// Kind.
pub const KIND: &str = "StreamingSession";
/// Short name for kubectl.
pub const SHORT_NAME: &str = "sgs";
/// Name of the schema in the OpenAPI document.
const SCHEMA: &str = "dev.streamgate.live.v1alpha1.StreamingSession";

/// A live session as the API shows it (what the store holds, plus the policy it falls under).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSession {
    /// Session id (40 hex digits): the object's name.
    pub id: String,
    /// Account.
    pub account: String,
    /// The player's stream id.
    pub stream_id: String,
    /// `active`, `revoked` or `expired`.
    pub state: String,
    /// Why it ended (`evicted`, `kicked`, `expired`), when it did.
    pub reason: Option<String>,
    /// Admission time, ms since the epoch (store clock).
    pub created_at_ms: i64,
    /// Expiry (active) or end (cut), ms since the epoch.
    pub expires_at_ms: i64,
    /// Name of the StreamingPolicy that applies to the account now, if known.
    pub policy: Option<String>,
    /// Where the session validators' check stands (`pending`, `allowed`, `denied`, `failed`);
    /// `None` when the namespace has no validators or the record is gone.
    pub validation: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn rfc3339_millis(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The session as a `StreamingSession` object in `namespace`.
pub fn to_object(session: &LiveSession, namespace: &str) -> Value {
    let mut status = json!({
        "state": session.state,
        "createdAt": rfc3339_millis(session.created_at_ms),
        "expiresAt": rfc3339_millis(session.expires_at_ms),
    });
    if let Some(reason) = &session.reason {
        status["reason"] = json!(reason);
    }
    if let Some(policy) = &session.policy {
        status["policy"] = json!(policy);
    }
    if let Some(validation) = &session.validation {
        status["validation"] = json!(validation);
    }
    json!({
        "apiVersion": GROUP_VERSION,
        "kind": KIND,
        "metadata": metadata(session, namespace),
        "spec": {"account": session.account, "streamId": session.stream_id},
        "status": status,
    })
}

fn metadata(session: &LiveSession, namespace: &str) -> Value {
    json!({
        "name": session.id,
        "namespace": namespace,
        // The id is unique for all time: it serves as the uid too.
        "uid": session.id,
        "creationTimestamp": rfc3339(session.created_at_ms),
    })
}

/// A `StreamingSessionList` page; `continue_token` is empty on the last page.
pub fn to_list(sessions: &[LiveSession], namespace: &str, continue_token: Option<&str>) -> Value {
    json!({
        "apiVersion": GROUP_VERSION,
        "kind": format!("{KIND}List"),
        "metadata": list_metadata(continue_token),
        "items": sessions.iter().map(|s| to_object(s, namespace)).collect::<Vec<_>>(),
    })
}

fn list_metadata(continue_token: Option<&str>) -> Value {
    match continue_token {
        Some(token) => json!({"continue": token}),
        None => json!({}),
    }
}

/// What `Accept` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Representation {
    /// The objects.
    Objects,
    /// A `meta.k8s.io/v1` Table (kubectl get).
    Table,
}

/// Reads the `Accept` header: a Table when any alternative is `as=Table` of `meta.k8s.io/v1`
/// (kubectl's first choice), else the objects.
pub fn representation(accept: Option<&str>) -> Representation {
    let wants_table = accept.unwrap_or_default().split(',').any(|alternative| {
        let params: Vec<&str> = alternative.split(';').map(str::trim).collect();
        params.contains(&"as=Table")
            && params.contains(&"g=meta.k8s.io")
            && params.contains(&"v=v1")
    });
    if wants_table {
        Representation::Table
    } else {
        Representation::Objects
    }
}

/// Kubernetes' short human durations: `45s`, `7m12s`, `3h5m`, `2d4h`.
pub fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10800 => format!("{}m", s / 60),
        10800..172800 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A `meta.k8s.io/v1` Table of `sessions` at `now_ms`: NAME, ACCOUNT, STREAM, STATE, AGE,
/// EXPIRES, and (priority 1, shown by `-o wide`) POLICY and VALIDATION.
pub fn to_table(
    sessions: &[LiveSession],
    namespace: &str,
    continue_token: Option<&str>,
    now_ms: i64,
) -> Value {
    let column = |name: &str, type_: &str, format: &str, priority: u8, description: &str| json!({"name": name, "type": type_, "format": format, "priority": priority, "description": description});
    let rows: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "cells": [
                    s.id,
                    s.account,
                    s.stream_id,
                    s.state,
                    human_duration(now_ms - s.created_at_ms),
                    human_duration(s.expires_at_ms - now_ms),
                    s.policy.clone().unwrap_or_else(|| "<unknown>".into()),
                    s.validation.clone().unwrap_or_else(|| "<none>".into()),
                ],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": metadata(s, namespace),
                },
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata(continue_token),
        "columnDefinitions": [
            column("Name", "string", "name", 0, "Session id."),
            column("Account", "string", "", 0, "Account the session counts against."),
            column("Stream", "string", "", 0, "The player's stream id."),
            column("State", "string", "", 0, "active, revoked or expired."),
            column("Age", "string", "", 0, "Time since admission."),
            column("Expires", "string", "", 0, "Time left without a heartbeat."),
            column("Policy", "string", "", 1, "The StreamingPolicy that applies to the account."),
            column("Validation", "string", "", 1, "Session validators' verdict: pending, allowed, denied or failed (<none> without validators)."),
        ],
        "rows": rows,
    })
}

/// A `metav1.Status` failure.
pub fn status(code: u16, reason: &str, message: &str, name: Option<&str>) -> Value {
    let mut value = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(name) = name {
        value["details"] = json!({"name": name, "group": GROUP, "kind": RESOURCE});
    }
    value
}

/// The field selector `spec.account=ID` (also `==`); `Err` names what is not supported.
pub fn account_selector(selector: &str) -> Result<Option<String>, String> {
    let mut account = None;
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, value) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .filter(|(field, _)| !field.ends_with('!'))
            .ok_or_else(|| {
                format!("field selector {term:?}: only spec.account=VALUE is supported")
            })?;
        match field.trim() {
            "spec.account" => account = Some(value.trim().to_string()),
            other => {
                return Err(format!(
                    "field label not supported: {other} (streamingsessions support spec.account)"
                ));
            }
        }
    }
    Ok(account)
}

fn group_value() -> Value {
    let version = json!({"groupVersion": GROUP_VERSION, "version": VERSION});
    json!({"name": GROUP, "versions": [version], "preferredVersion": version})
}

/// `GET /apis`.
pub fn api_group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_value()]})
}

/// `GET /apis/live.streamgate.dev`.
pub fn api_group() -> Value {
    let mut group = group_value();
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    group
}

/// `GET /apis/live.streamgate.dev/v1alpha1`.
pub fn api_resource_list() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [{
            "name": RESOURCE,
            "singularName": "streamingsession",
            "namespaced": true,
            "kind": KIND,
            "verbs": ["delete", "get", "list"],
            "shortNames": [SHORT_NAME],
            "categories": ["streamgate"],
        }],
    })
}

/// `GET /openapi/v3`: where the group-version document is.
pub fn openapi_v3_index() -> Value {
    let hash = format!(
        "{:016x}",
        fnv1a(openapi_v3_document().to_string().as_bytes())
    );
    json!({"paths": {
        format!("apis/{GROUP_VERSION}"): {
            "serverRelativeURL": format!("/openapi/v3/apis/{GROUP_VERSION}?hash={hash}"),
        }
    }})
}

/// A stable hash for the document's URL (clients cache by it); not for security.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3)
    })
}

/// `GET /openapi/v3/apis/live.streamgate.dev/v1alpha1`: the schema `kubectl explain` reads.
pub fn openapi_v3_document() -> Value {
    let meta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";
    let reference =
        |name: &str| json!({"allOf": [{"$ref": format!("#/components/schemas/{name}")}]});
    let string = |description: &str| json!({"type": "string", "description": description});
    let time = |description: &str| json!({"type": "string", "format": "date-time", "description": description});
    let path = format!("/apis/{GROUP_VERSION}/namespaces/{{namespace}}/{RESOURCE}");
    // kubectl explain finds the kind of a resource from its operations' GVK.
    let operation = |description: &str| {
        json!({
            "description": description,
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-group-version-kind": {"group": GROUP, "version": VERSION, "kind": KIND},
        })
    };
    json!({
        "openapi": "3.0.0",
        "info": {"title": "StreamGate live sessions", "version": VERSION},
        "paths": {
            path.clone(): {"get": operation("list the namespace's live sessions")},
            format!("{path}/{{name}}"): {
                "get": operation("read a live session"),
                "delete": operation("kick the session (reason kicked): its stream is cut"),
            },
        },
        "components": {"schemas": {
            SCHEMA: {
                "type": "object",
                "description": "A live streaming session admitted by the StreamGate sidecars of the namespace, read from their shared session store. Deleting it kicks the session: its stream is cut.",
                "properties": {
                    "apiVersion": string("APIVersion defines the versioned schema of this representation of an object."),
                    "kind": string("Kind is a string value representing the REST resource this object represents."),
                    "metadata": reference(meta),
                    "spec": reference(&format!("{SCHEMA}Spec")),
                    "status": reference(&format!("{SCHEMA}Status")),
                },
                "x-kubernetes-group-version-kind": [{"group": GROUP, "version": VERSION, "kind": KIND}],
            },
            format!("{SCHEMA}Spec"): {
                "type": "object",
                "description": "Who is watching what.",
                "properties": {
                    "account": string("The account the session counts against."),
                    "streamId": string("The player's stream id, unique among the account's active sessions."),
                },
            },
            format!("{SCHEMA}Status"): {
                "type": "object",
                "description": "The session's state in the store.",
                "properties": {
                    "state": string("active, revoked or expired."),
                    "reason": string("Why the session ended: evicted, kicked or expired."),
                    "createdAt": time("When the session was admitted."),
                    "expiresAt": time("When the session expires without a heartbeat."),
                    "policy": string("The StreamingPolicy that applies to the account now."),
                    "validation": string("Where the session validators' check stands: pending, allowed, denied or failed; absent when the namespace has no validators."),
                },
            },
            meta: {
                "type": "object",
                "description": "Standard object metadata.",
                "properties": {
                    "name": string("The session id."),
                    "namespace": string("The namespace whose sidecars admitted the session."),
                    "uid": string("The session id."),
                    "creationTimestamp": time("When the session was admitted."),
                },
            },
        }},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, account: &str) -> LiveSession {
        LiveSession {
            id: id.into(),
            account: account.into(),
            stream_id: "tv".into(),
            state: "active".into(),
            reason: None,
            created_at_ms: 1_000_000,
            expires_at_ms: 1_090_000,
            policy: Some("gold".into()),
            validation: Some("allowed".into()),
        }
    }

    #[test]
    fn kubectl_accept_header_selects_a_table() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(representation(Some(kubectl)), Representation::Table);
        assert_eq!(
            representation(Some("application/json")),
            Representation::Objects
        );
        assert_eq!(representation(None), Representation::Objects);
        assert_eq!(
            representation(Some("application/json;as=Table;v=v1beta1;g=meta.k8s.io")),
            Representation::Objects
        );
    }

    #[test]
    fn table_has_the_columns_and_wide_policy() {
        let t = to_table(&[session("a1", "123")], "ns", Some("tok"), 1_030_000);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "Account",
                "Stream",
                "State",
                "Age",
                "Expires",
                "Policy",
                "Validation"
            ]
        );
        assert_eq!(t["columnDefinitions"][6]["priority"], 1);
        assert_eq!(t["columnDefinitions"][7]["priority"], 1);
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["a1", "123", "tv", "active", "30s", "60s", "gold", "allowed"])
        );
        let mut unvalidated = session("a2", "7");
        unvalidated.validation = None;
        let without = to_table(&[unvalidated], "ns", None, 1_030_000);
        assert_eq!(without["rows"][0]["cells"][7], "<none>");
        assert_eq!(t["rows"][0]["object"]["metadata"]["namespace"], "ns");
        assert_eq!(t["metadata"]["continue"], "tok");
    }

    #[test]
    fn object_has_spec_and_status() {
        let o = to_object(&session("a1", "123"), "ns");
        assert_eq!(o["spec"], json!({"account": "123", "streamId": "tv"}));
        assert_eq!(o["status"]["state"], "active");
        assert_eq!(o["status"]["policy"], "gold");
        assert_eq!(o["status"]["validation"], "allowed");
        let mut unvalidated = session("a2", "7");
        unvalidated.validation = None;
        let o = to_object(&unvalidated, "ns");
        assert!(
            o["status"].get("validation").is_none(),
            "omitted: no record"
        );
        assert_eq!(o["status"]["expiresAt"], "1970-01-01T00:18:10.000Z");
        assert!(o["status"].get("reason").is_none());
    }

    #[test]
    fn field_selector_takes_spec_account_only() {
        assert_eq!(account_selector("spec.account=123"), Ok(Some("123".into())));
        assert_eq!(account_selector("spec.account==7"), Ok(Some("7".into())));
        assert_eq!(account_selector(""), Ok(None));
        assert!(
            account_selector("spec.streamId=x")
                .unwrap_err()
                .contains("spec.streamId")
        );
        assert!(account_selector("spec.account!=1").is_err());
    }

    #[test]
    fn human_durations_read_like_kubectls() {
        assert_eq!(human_duration(45_000), "45s");
        assert_eq!(human_duration(432_000), "7m12s");
        assert_eq!(human_duration(-5), "0s");
        assert_eq!(human_duration(3 * 3600 * 1000 + 300_000), "3h5m");
    }

    #[test]
    fn openapi_names_the_kind_for_explain() {
        let doc = openapi_v3_document();
        let gvk = &doc["components"]["schemas"][SCHEMA]["x-kubernetes-group-version-kind"][0];
        assert_eq!(gvk["kind"], KIND);
        let list = &doc["paths"]["/apis/live.streamgate.dev/v1alpha1/namespaces/{namespace}/streamingsessions"];
        assert_eq!(list["get"]["x-kubernetes-group-version-kind"]["kind"], KIND);
        let index = openapi_v3_index();
        let url = index["paths"]["apis/live.streamgate.dev/v1alpha1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/apis/live.streamgate.dev/v1alpha1?hash="));
    }
}
