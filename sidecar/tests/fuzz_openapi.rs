//! A property-based fuzzer driven by the sidecar's own OpenAPI documents (the viewer port's and
//! the admin listener's): every documented operation is called with parameters that follow their schema and with hostile ones (any
//! Unicode, empty, over-long, missing, repeated). Whatever it sends, the sidecar answers without
//! a 5xx, errors are the documented JSON, and a refused request stores nothing.

mod common;

use std::sync::OnceLock;

use proptest::prelude::*;
use reqwest::Method;
use serde_json::Value;

/// One documented operation: method, path template and its parameters.
#[derive(Clone, Debug)]
struct Operation {
    /// Documented by the admin listener (else by the viewer port).
    admin: bool,
    method: Method,
    path: String,
    parameters: Vec<Parameter>,
}

#[derive(Clone, Debug)]
struct Parameter {
    name: String,
    in_path: bool,
    max_length: Option<usize>,
}

fn operations() -> &'static [Operation] {
    static OPERATIONS: OnceLock<Vec<Operation>> = OnceLock::new();
    OPERATIONS.get_or_init(|| {
        let documents = [
            (false, streamgate_sidecar::api::openapi()),
            (true, streamgate_sidecar::api::admin_openapi()),
        ];
        let mut operations = Vec::new();
        for (admin, doc) in documents {
            let doc = serde_json::to_value(doc).unwrap();
            for (path, item) in doc["paths"].as_object().unwrap() {
                for (method, operation) in item.as_object().unwrap() {
                    let Ok(method) = method.to_uppercase().parse::<Method>() else {
                        continue;
                    };
                    let parameters = operation["parameters"]
                        .as_array()
                        .map(|ps| {
                            ps.iter()
                                .map(|p| Parameter {
                                    name: p["name"].as_str().unwrap().to_string(),
                                    in_path: p["in"] == "path",
                                    max_length: p["schema"]["maxLength"]
                                        .as_u64()
                                        .map(|n| n as usize),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    operations.push(Operation {
                        admin,
                        method,
                        path: path.clone(),
                        parameters,
                    });
                }
            }
        }
        assert!(operations.len() >= 9, "{operations:?}");
        operations
    })
}

/// A value for a parameter: mostly schema-shaped, often hostile.
fn value() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => "[\\x21-\\x7e]{1,40}".prop_map(Some),
        1 => "[0-9a-f]{40}".prop_map(Some),
        1 => any::<String>().prop_map(Some),
        1 => "[{}:%/?#&=. ]{0,8}".prop_map(Some),
        1 => Just(Some("x".repeat(129))),
        1 => Just(Some(String::new())),
        1 => Just(None),
    ]
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

struct Target {
    runtime: tokio::runtime::Runtime,
    sidecar: common::TestSidecar,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sidecar = runtime.block_on(common::TestSidecar::start(&common::default_policy(
            "  maxStreamsPerAccount: 2",
        )));
        Target { runtime, sidecar }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_documented_operation_answers_5xx(
        which in any::<prop::sample::Index>(),
        values in prop::collection::vec(value(), 4),
        repeat_first in any::<bool>(),
    ) {
        let operation = which.get(operations()).clone();
        let mut path = operation.path.clone();
        let mut query = Vec::new();
        let mut too_long = false;
        for (parameter, value) in operation.parameters.iter().zip(&values) {
            if parameter.in_path {
                // A path parameter is always there; an empty one is a different route.
                let value = value.clone().unwrap_or_else(|| "x".into());
                path = path.replace(&format!("{{{}}}", parameter.name), &encode(&value));
                too_long |= parameter.max_length.is_some_and(|max| value.chars().count() > max);
            } else if let Some(value) = value {
                query.push(format!("{}={}", parameter.name, encode(value)));
            }
        }
        if repeat_first && !query.is_empty() {
            query.push(query[0].clone());
        }
        let base = if operation.admin { &target().sidecar.admin } else { &target().sidecar.base };
        let url = if query.is_empty() {
            format!("{base}{path}")
        } else {
            format!("{base}{path}?{}", query.join("&"))
        };
        let t = target();
        let (status, body) = t.runtime.block_on(async {
            let response = t.sidecar.client.request(operation.method.clone(), &url).send().await.unwrap();
            let status = response.status().as_u16();
            let json = response
                .headers()
                .get("content-type")
                .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"));
            let text = response.text().await.unwrap_or_default();
            (status, json.then(|| serde_json::from_str::<Value>(&text).ok()).flatten())
        });
        prop_assert!(status < 500, "{} {url} answered {status}: {body:?}", operation.method);
        // The document's maxLength is what the sidecar enforces.
        prop_assert!(!too_long || (400..500).contains(&status), "{url} answered {status}");
        if status >= 400 && operation.method != Method::HEAD {
            let body = body.expect("errors are JSON");
            prop_assert!(body["error"].is_string() && body["message"].is_string(), "{body}");
        }
    }
}
