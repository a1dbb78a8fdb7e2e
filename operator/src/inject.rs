//! The injection decision: a Pod and the operator's sidecar settings in, either a JSON patch that
//! adds the StreamGate sidecar or a named reason not to. Pure, tested directly; the webhook
//! (`crate::webhook`) only moves AdmissionReviews in and out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube_quantity::ParsedQuantity;
use serde_json::{Value, json};

use crate::render::{CONFIGMAP_NAME, POLICY_FILE_KEY};

/// Name of the injected container; its presence marks a pod as injected.
pub const SIDECAR_NAME: &str = "streamgate-sidecar";
/// Name of the volume holding the namespace's policy file.
pub const POLICY_VOLUME: &str = "streamgate-policies";
/// Where the policy ConfigMap is mounted. A directory mount, not subPath: only directory
/// mounts see ConfigMap updates, and the sidecar hot-reloads the file.
pub const POLICY_DIR: &str = "/etc/streamgate/policies";
/// Name of the volume holding the namespace's playback token keys (the operator's Secret).
pub const KEYS_VOLUME: &str = "streamgate-playback-keys";
/// Where the playback key Secret is mounted: a directory mount, so the kubelet's updates (key
/// rotation) reach the sidecar, which reloads the file.
pub const KEYS_DIR: &str = "/etc/streamgate/playback-keys";
/// Name of the sidecar's container port (probes refer to it).
pub const PORT_NAME: &str = "streamgate";
/// Name of the sidecar's metrics port: the chart's PodMonitor scrapes it by this name.
pub const METRICS_PORT_NAME: &str = "sg-metrics";
/// Port of the sidecar's `/metrics` listener in injected pods.
pub const METRICS_PORT: u16 = 9091;
/// The sidecar's admin listener in the pod: loopback only, so no other pod (and no viewer)
/// reaches it; operators use `kubectl port-forward`.
pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Label the injector puts on every pod it injects; the chart's PodMonitor selects on it.
pub const INJECTED_LABEL: &str = "streamgate.dev/injected";

/// Annotations and labels the injector reads or writes.
pub mod annotations {
    /// Namespace label or pod annotation: `enabled` opts in; on a pod `disabled` opts out.
    pub const INJECT: &str = "streamgate.dev/inject";
    /// Written on injected pods: the operator version that injected the sidecar.
    pub const INJECTED: &str = "streamgate.dev/injected";
    /// Overrides the sidecar's CPU request.
    pub const CPU_REQUEST: &str = "streamgate.dev/sidecar-cpu-request";
    /// Overrides the sidecar's CPU limit.
    pub const CPU_LIMIT: &str = "streamgate.dev/sidecar-cpu-limit";
    /// Overrides the sidecar's memory request.
    pub const MEMORY_REQUEST: &str = "streamgate.dev/sidecar-memory-request";
    /// Overrides the sidecar's memory limit.
    pub const MEMORY_LIMIT: &str = "streamgate.dev/sidecar-memory-limit";
    /// Port of the application in the pod: the sidecar proxies to `http://127.0.0.1:PORT`.
    pub const UPSTREAM_PORT: &str = "streamgate.dev/upstream-port";
    /// `"false"` stops binding playback tokens to the viewer's network (IPv4 /24, IPv6 /64),
    /// for viewers behind carrier-grade NAT; `"true"` (the default) binds them.
    pub const PLAYBACK_BIND_NETWORK: &str = "streamgate.dev/playback-bind-network";
}

/// Value of the `streamgate.dev/inject` label/annotation that opts in.
pub const ENABLED: &str = "enabled";
/// Value of the `streamgate.dev/inject` annotation that opts out.
pub const DISABLED: &str = "disabled";

/// Where the sidecar gets its store URL from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSource {
    /// The URL itself (no credentials in it): `memory`, `redis://host:6379`, ...
    Url(String),
    /// A key of a Secret in the pod's namespace, for URLs that carry credentials.
    Secret {
        /// Secret name.
        name: String,
        /// Key holding the URL.
        key: String,
    },
}

/// Default resources of the sidecar (Kubernetes quantities); `None` leaves a value unset.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SidecarResources {
    /// CPU request, e.g. `50m`.
    pub cpu_request: Option<String>,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory request, e.g. `32Mi`.
    pub memory_request: Option<String>,
    /// Memory limit.
    pub memory_limit: Option<String>,
}

/// What the operator was configured to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarConfig {
    /// The operator's own namespace: never injected.
    pub operator_namespace: String,
    /// Other namespaces never injected (by default `kube-system`, `kube-public`,
    /// `kube-node-lease`), also when the webhook configuration's selector lets a pod through.
    pub excluded_namespaces: BTreeSet<String>,
    /// Sidecar image.
    pub image: String,
    /// `imagePullPolicy` of the sidecar.
    pub image_pull_policy: String,
    /// Port of the sidecar's session API (`STREAMGATE_LISTEN=0.0.0.0:PORT`).
    pub port: u16,
    /// Store URL or where to read it.
    pub store: StoreSource,
    /// Replicas every store change waits for before a sidecar answers (Redis WAIT); 0: none.
    pub store_wait_replicas: u32,
    /// Default resources; pod annotations may override each.
    pub resources: SidecarResources,
    /// UID (and GID) the sidecar runs as; non-zero so `runAsNonRoot` can be verified.
    pub run_as_user: i64,
    /// Written into the `streamgate.dev/injected` annotation.
    pub version: String,
}

impl SidecarConfig {
    /// Checks the operator-level settings, so a bad flag fails at startup rather than
    /// producing pods the API server rejects.
    pub fn validate(&self) -> Result<(), String> {
        resolve_resources(&self.resources, &BTreeMap::new())?;
        if self.port == 0 {
            return Err("the sidecar port must be 1-65535".into());
        }
        if self.run_as_user <= 0 {
            return Err("the sidecar must run as a non-root UID (> 0)".into());
        }
        if let StoreSource::Url(url) = &self.store
            && url_has_credentials(url)
        {
            return Err(
                "the sidecar store URL contains credentials; put it in a Secret and use --sidecar-store-secret instead (pod specs are readable by many)".into(),
            );
        }
        Ok(())
    }
}

/// Whether a store URL carries a user or password (`redis://user:pass@host`).
pub fn url_has_credentials(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

/// The request as the injector sees it besides the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodContext {
    /// Namespace the pod is created in.
    pub namespace: String,
    /// The namespace carries `streamgate.dev/inject=enabled` (the webhook configuration routes
    /// such namespaces to a path of their own, so the webhook needs no read access to Namespaces).
    pub namespace_opted_in: bool,
}

/// Why a pod is admitted unchanged. The names are metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The pod already has the sidecar (e.g. a re-submitted injected pod spec).
    AlreadyInjected,
    /// `streamgate.dev/inject: disabled` on the pod.
    OptedOut,
    /// Neither the namespace label nor the pod annotation asks for injection.
    NotOptedIn,
    /// The pod is in the operator's own namespace.
    OperatorNamespace,
    /// The pod uses the host's network: the sidecar's port would clash across pods.
    HostNetwork,
    /// The pod is in a namespace excluded from injection (`kube-system`, `kube-public`, ...).
    ExcludedNamespace,
    /// The request is not a Pod CREATE with an object (the webhook configuration should not send
    /// these; admitted unchanged).
    Unsupported,
}

impl SkipReason {
    /// Every reason, for documentation and tests.
    pub const ALL: [SkipReason; 7] = [
        Self::AlreadyInjected,
        Self::OptedOut,
        Self::NotOptedIn,
        Self::OperatorNamespace,
        Self::HostNetwork,
        Self::ExcludedNamespace,
        Self::Unsupported,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AlreadyInjected => "AlreadyInjected",
            Self::OptedOut => "OptedOut",
            Self::NotOptedIn => "NotOptedIn",
            Self::OperatorNamespace => "OperatorNamespace",
            Self::HostNetwork => "HostNetwork",
            Self::ExcludedNamespace => "ExcludedNamespace",
            Self::Unsupported => "Unsupported",
        }
    }
}

/// The injector's decision for one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Apply this patch to the pod.
    Inject(json_patch::Patch),
    /// Admit the pod unchanged.
    Skip(SkipReason),
    /// The pod asks for injection with annotation values that cannot be honoured: deny it with
    /// this message rather than inject garbage or silently run without the limiter.
    Reject(String),
}

/// Decides what to do with `pod`.
pub fn plan(pod: &Pod, ctx: &PodContext, config: &SidecarConfig) -> Plan {
    if ctx.namespace == config.operator_namespace {
        return Plan::Skip(SkipReason::OperatorNamespace);
    }
    if config.excluded_namespaces.contains(&ctx.namespace) {
        return Plan::Skip(SkipReason::ExcludedNamespace);
    }
    if is_injected(pod) {
        return Plan::Skip(SkipReason::AlreadyInjected);
    }
    let empty = BTreeMap::new();
    let pod_annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let opted_in = match pod_annotations.get(annotations::INJECT).map(String::as_str) {
        Some(DISABLED) => return Plan::Skip(SkipReason::OptedOut),
        Some(ENABLED) => true,
        Some(other) => {
            return Plan::Reject(format!(
                "annotation {}: {other:?} is neither {ENABLED:?} nor {DISABLED:?}",
                annotations::INJECT
            ));
        }
        None => ctx.namespace_opted_in,
    };
    if !opted_in {
        return Plan::Skip(SkipReason::NotOptedIn);
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Plan::Skip(SkipReason::HostNetwork);
    }
    let resources = match resolve_resources(&config.resources, pod_annotations) {
        Ok(resources) => resources,
        Err(message) => return Plan::Reject(message),
    };
    let upstream = match upstream_port(pod_annotations, config.port) {
        Ok(port) => port,
        Err(message) => return Plan::Reject(message),
    };
    let bind_network = match pod_annotations
        .get(annotations::PLAYBACK_BIND_NETWORK)
        .map(|v| v.trim())
    {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Plan::Reject(format!(
                "annotation {}: {other:?} is neither \"true\" nor \"false\"",
                annotations::PLAYBACK_BIND_NETWORK
            ));
        }
    };
    for name in [POLICY_VOLUME, KEYS_VOLUME] {
        if spec
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|volumes| volumes.iter().any(|v| v.name == name))
        {
            return Plan::Reject(format!(
                "the pod already has a volume named {name:?}, which the StreamGate sidecar needs; rename it or opt out with {}: {DISABLED}",
                annotations::INJECT
            ));
        }
    }

    let mut container = sidecar_container(config, resources, upstream);
    if let Some(bind) = bind_network {
        container
            .env
            .get_or_insert_with(Vec::new)
            .push(env("STREAMGATE_PLAYBACK_BIND_NETWORK", bind.to_string()));
    }
    let volume = policy_volume();
    let mut ops = Vec::new();
    match &pod.metadata.annotations {
        None => ops.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": { annotations::INJECTED: config.version },
        })),
        Some(_) => ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape(annotations::INJECTED)),
            "value": config.version,
        })),
    }
    match &pod.metadata.labels {
        None => ops.push(json!({
            "op": "add",
            "path": "/metadata/labels",
            "value": { INJECTED_LABEL: "true" },
        })),
        Some(_) => ops.push(json!({
            "op": "add",
            "path": format!("/metadata/labels/{}", escape(INJECTED_LABEL)),
            "value": "true",
        })),
    }
    match spec.and_then(|s| s.volumes.as_ref()) {
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]})),
        Some(_) => ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume})),
    }
    ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": keys_volume()}));
    // First among the init containers, so later init containers can already use it.
    match spec.and_then(|s| s.init_containers.as_ref()) {
        None => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}))
        }
        Some(_) => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}))
        }
    }
    let patch = serde_json::from_value(Value::Array(ops))
        .expect("the operations built above are valid JSON patch operations");
    Plan::Inject(patch)
}

/// Whether the pod already carries the sidecar (by container name, or the injected annotation).
pub fn is_injected(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotations::INJECTED));
    let has_container = pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_NAME)
    });
    annotated || has_container
}

/// JSON pointer escaping of one path segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The sidecar's resources after pod annotation overrides, validated.
fn resolve_resources(
    defaults: &SidecarResources,
    pod_annotations: &BTreeMap<String, String>,
) -> Result<SidecarResources, String> {
    let pick = |default: &Option<String>, key: &str| -> Result<Option<String>, String> {
        match pod_annotations.get(key) {
            Some(value) => {
                check_quantity(value).map_err(|problem| format!("annotation {key}: {problem}"))?;
                Ok(Some(value.clone()))
            }
            None => {
                if let Some(value) = default {
                    check_quantity(value)
                        .map_err(|problem| format!("default for {key}: {problem}"))?;
                }
                Ok(default.clone())
            }
        }
    };
    let resolved = SidecarResources {
        cpu_request: pick(&defaults.cpu_request, annotations::CPU_REQUEST)?,
        cpu_limit: pick(&defaults.cpu_limit, annotations::CPU_LIMIT)?,
        memory_request: pick(&defaults.memory_request, annotations::MEMORY_REQUEST)?,
        memory_limit: pick(&defaults.memory_limit, annotations::MEMORY_LIMIT)?,
    };
    // The API server rejects a request above its limit with a message that does not mention
    // StreamGate: say which values clash instead.
    for (what, request, limit) in [
        ("cpu", &resolved.cpu_request, &resolved.cpu_limit),
        ("memory", &resolved.memory_request, &resolved.memory_limit),
    ] {
        if let (Some(request), Some(limit)) = (request, limit)
            && parse_quantity(request) > parse_quantity(limit)
        {
            return Err(format!(
                "sidecar {what} request {request} is above its limit {limit} (set streamgate.dev/sidecar-{what}-request / -limit consistently)"
            ));
        }
    }
    Ok(resolved)
}

/// The upstream port annotation, if any: 1-65535 and not the sidecar's own port.
fn upstream_port(
    pod_annotations: &BTreeMap<String, String>,
    sidecar_port: u16,
) -> Result<Option<u16>, String> {
    let Some(value) = pod_annotations.get(annotations::UPSTREAM_PORT) else {
        return Ok(None);
    };
    match value.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!(
            "annotation {}: {value:?} is not a port number (1-65535)",
            annotations::UPSTREAM_PORT
        )),
        Ok(port) if port == sidecar_port => Err(format!(
            "annotation {}: {port} is the sidecar's own port",
            annotations::UPSTREAM_PORT
        )),
        Ok(port) => Ok(Some(port)),
    }
}

/// Checks that `value` is a positive Kubernetes quantity.
pub fn check_quantity(value: &str) -> Result<(), String> {
    match parse_quantity(value) {
        Some(q) if q > ParsedQuantity::default() => Ok(()),
        Some(_) => Err(format!("{value:?} must be positive")),
        None => Err(format!(
            "{value:?} is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1G)"
        )),
    }
}

/// Parses a Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1e3`) with `kube_quantity`, which
/// follows the API server's grammar and compares exactly across suffixes.
pub fn parse_quantity(value: &str) -> Option<ParsedQuantity> {
    // kube_quantity reads a missing number as zero ("Mi" parses as 0Mi); the API server refuses it.
    let unsigned = value.strip_prefix(['+', '-']).unwrap_or(value);
    let number_len = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    if !unsigned[..number_len].contains(|c: char| c.is_ascii_digit()) {
        return None;
    }
    ParsedQuantity::try_from(value).ok()
}

fn policy_volume() -> Volume {
    Volume {
        name: POLICY_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: CONFIGMAP_NAME.into(),
            // A namespace without StreamingPolicies has no ConfigMap yet: start with the
            // built-in default policy instead of blocking the pod.
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn keys_volume() -> Volume {
    Volume {
        name: KEYS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(streamgate_policy::playback_keys::SECRET_NAME.into()),
            // The operator creates the Secret when it reconciles the namespace; a pod created
            // first starts with a key of its own and picks the Secret up when it appears.
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn sidecar_container(
    config: &SidecarConfig,
    resources: SidecarResources,
    upstream: Option<u16>,
) -> Container {
    let mut env_vars = vec![
        env("STREAMGATE_LISTEN", format!("0.0.0.0:{}", config.port)),
        env("STREAMGATE_ADMIN_LISTEN", ADMIN_LISTEN.to_string()),
        // Prometheus scrapes the pod's IP, so metrics listen beyond loopback.
        env(
            "STREAMGATE_METRICS_LISTEN",
            format!("0.0.0.0:{METRICS_PORT}"),
        ),
        match &config.store {
            StoreSource::Url(url) => env("STREAMGATE_STORE", url.clone()),
            StoreSource::Secret { name, key } => EnvVar {
                name: "STREAMGATE_STORE".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.clone(),
                        key: key.clone(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        },
        EnvVar {
            name: "STREAMGATE_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env(
            "STREAMGATE_POLICY_FILE",
            format!("{POLICY_DIR}/{POLICY_FILE_KEY}"),
        ),
        // The ConfigMap appears only once the namespace has a StreamingPolicy; until then the
        // sidecar enforces the built-in default and picks the file up when it arrives.
        env("STREAMGATE_POLICY_FILE_OPTIONAL", "true".to_string()),
        env(
            "STREAMGATE_PLAYBACK_KEYS_FILE",
            format!(
                "{KEYS_DIR}/{}",
                streamgate_policy::playback_keys::SECRET_KEY
            ),
        ),
    ];
    if config.store_wait_replicas > 0 {
        env_vars.push(env(
            "STREAMGATE_STORE_WAIT_REPLICAS",
            config.store_wait_replicas.to_string(),
        ));
    }
    if let Some(port) = upstream {
        env_vars.push(env(
            "STREAMGATE_UPSTREAM",
            format!("http://127.0.0.1:{port}"),
        ));
    }
    let quantities = |pairs: [(&str, Option<String>); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), Quantity(v))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        // A native sidecar: starts before the app containers and lives as long as the pod.
        restart_policy: Some("Always".into()),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some(PORT_NAME.into()),
                container_port: i32::from(config.port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(METRICS_PORT_NAME.into()),
                container_port: i32::from(METRICS_PORT),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // The app containers start once the session API answers.
        startup_probe: Some(http_probe("/healthz", 1, 30)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        resources: Some(ResourceRequirements {
            requests: quantities([
                ("cpu", resources.cpu_request),
                ("memory", resources.memory_request),
            ]),
            limits: quantities([
                ("cpu", resources.cpu_limit),
                ("memory", resources.memory_limit),
            ]),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(config.run_as_user),
            run_as_group: Some(config.run_as_user),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: POLICY_VOLUME.into(),
                mount_path: POLICY_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: KEYS_VOLUME.into(),
                mount_path: KEYS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SidecarConfig {
        SidecarConfig {
            operator_namespace: "streamgate-system".into(),
            excluded_namespaces: crate::config::DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|ns| ns.to_string())
                .collect(),
            image: "streamgate/streamgate-sidecar:test".into(),
            image_pull_policy: "IfNotPresent".into(),
            port: 8080,
            store: StoreSource::Url("redis://redis:6379".into()),
            store_wait_replicas: 0,
            resources: SidecarResources {
                cpu_request: Some("50m".into()),
                cpu_limit: Some("1".into()),
                memory_request: Some("32Mi".into()),
                memory_limit: Some("128Mi".into()),
            },
            run_as_user: 65532,
            version: "0.1.0".into(),
        }
    }

    fn ctx(opted_in: bool) -> PodContext {
        PodContext {
            namespace: "shop".into(),
            namespace_opted_in: opted_in,
        }
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn bare_pod() -> Pod {
        pod(json!({
            "metadata": {"name": "player"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        }))
    }

    /// Applies the plan's patch, panicking on anything but Inject.
    fn injected(p: &Pod, ctx: &PodContext, config: &SidecarConfig) -> Value {
        let Plan::Inject(patch) = plan(p, ctx, config) else {
            panic!("expected injection, got {:?}", plan(p, ctx, config));
        };
        let mut doc = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        doc
    }

    fn sidecar(doc: &Value) -> &Value {
        let found: Vec<&Value> = doc["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == SIDECAR_NAME)
            .collect();
        assert_eq!(found.len(), 1, "exactly one sidecar");
        found[0]
    }

    fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
    }

    #[test]
    fn injects_into_a_pod_without_init_containers_volumes_or_annotations() {
        let doc = injected(&bare_pod(), &ctx(true), &config());
        let c = sidecar(&doc);
        assert_eq!(c["restartPolicy"], "Always");
        assert_eq!(c["image"], "streamgate/streamgate-sidecar:test");
        assert_eq!(
            env_of(c, "STREAMGATE_LISTEN").unwrap()["value"],
            "0.0.0.0:8080"
        );
        assert_eq!(
            env_of(c, "STREAMGATE_STORE").unwrap()["value"],
            "redis://redis:6379"
        );
        assert_eq!(
            env_of(c, "STREAMGATE_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        assert_eq!(
            env_of(c, "STREAMGATE_POLICY_FILE").unwrap()["value"],
            "/etc/streamgate/policies/policies.yaml"
        );
        assert!(env_of(c, "STREAMGATE_UPSTREAM").is_none());
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["ports"][0]["containerPort"], 8080);
        assert_eq!(c["ports"][1]["name"], "sg-metrics");
        assert_eq!(c["ports"][1]["containerPort"], 9091);
        assert_eq!(
            env_of(c, "STREAMGATE_METRICS_LISTEN").unwrap()["value"],
            "0.0.0.0:9091"
        );
        // Admin routes stay on the pod's loopback; no container port exposes them.
        assert_eq!(
            env_of(c, "STREAMGATE_ADMIN_LISTEN").unwrap()["value"],
            "127.0.0.1:9090"
        );
        assert_eq!(doc["metadata"]["labels"]["streamgate.dev/injected"], "true");
        assert_eq!(c["resources"]["requests"]["cpu"], "50m");
        assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
        assert_eq!(c["volumeMounts"][0]["mountPath"], POLICY_DIR);
        assert!(c["volumeMounts"][0].get("subPath").is_none());
        assert_eq!(
            doc["spec"]["volumes"],
            json!([
                {"name": "streamgate-policies", "configMap": {"name": "streamgate-policies", "optional": true}},
                {"name": "streamgate-playback-keys", "secret": {"secretName": "streamgate-playback-keys", "optional": true}},
            ])
        );
        // The playback keys: the operator's Secret, a directory mount the kubelet updates.
        assert_eq!(c["volumeMounts"][1]["mountPath"], KEYS_DIR);
        assert!(c["volumeMounts"][1].get("subPath").is_none());
        assert_eq!(
            env_of(c, "STREAMGATE_PLAYBACK_KEYS_FILE").unwrap()["value"],
            "/etc/streamgate/playback-keys/keys.json"
        );
        assert!(env_of(c, "STREAMGATE_PLAYBACK_BIND_NETWORK").is_none());
        assert_eq!(
            doc["metadata"]["annotations"]["streamgate.dev/injected"],
            "0.1.0"
        );
        // The app container is untouched.
        assert_eq!(
            doc["spec"]["containers"],
            json!([{"name": "app", "image": "app:1"}])
        );
    }

    #[test]
    fn sidecar_passes_the_restricted_pod_security_standard() {
        let doc = injected(&bare_pod(), &ctx(true), &config());
        let sc = &sidecar(&doc)["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(sc["capabilities"].get("add").is_none());
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["privileged"], false);
        assert!(sc["runAsUser"].as_i64().unwrap() > 0);
    }

    #[test]
    fn appends_to_existing_init_containers_volumes_and_annotations() {
        let p = pod(json!({
            "metadata": {"name": "player", "annotations": {"a/b": "c"}, "labels": {"app": "player"}},
            "spec": {
                "initContainers": [{"name": "setup", "image": "setup:1"}],
                "containers": [{"name": "app", "image": "app:1"}],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        }));
        let doc = injected(&p, &ctx(true), &config());
        let inits = doc["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits.len(), 2);
        assert_eq!(inits[0]["name"], SIDECAR_NAME, "sidecar first");
        assert_eq!(inits[1]["name"], "setup");
        let volumes = doc["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 3);
        assert_eq!(volumes[0]["name"], "data");
        assert_eq!(volumes[1]["name"], POLICY_VOLUME);
        assert_eq!(volumes[2]["name"], KEYS_VOLUME);
        assert_eq!(doc["metadata"]["annotations"]["a/b"], "c");
        assert_eq!(
            doc["metadata"]["annotations"]["streamgate.dev/injected"],
            "0.1.0"
        );
        // The PodMonitor's selector label joins the pod's own labels.
        assert_eq!(
            doc["metadata"]["labels"],
            json!({"app": "player", "streamgate.dev/injected": "true"})
        );
    }

    #[test]
    fn the_network_binding_annotation_is_passed_on_or_refused() {
        let with = |value: &str| {
            pod(json!({
                "metadata": {"name": "p", "annotations": {"streamgate.dev/playback-bind-network": value}},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]}
            }))
        };
        let doc = injected(&with("false"), &ctx(true), &config());
        assert_eq!(
            env_of(sidecar(&doc), "STREAMGATE_PLAYBACK_BIND_NETWORK").unwrap()["value"],
            "false"
        );
        assert!(matches!(
            plan(&with("no"), &ctx(true), &config()),
            Plan::Reject(m) if m.contains("streamgate.dev/playback-bind-network") && m.contains("\"no\"")
        ));
        let clash = pod(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}],
                     "volumes": [{"name": "streamgate-playback-keys", "emptyDir": {}}]}
        }));
        assert!(matches!(
            plan(&clash, &ctx(true), &config()),
            Plan::Reject(m) if m.contains(KEYS_VOLUME)
        ));
    }

    #[test]
    fn injection_is_idempotent() {
        let once: Pod =
            serde_json::from_value(injected(&bare_pod(), &ctx(true), &config())).unwrap();
        assert_eq!(
            plan(&once, &ctx(true), &config()),
            Plan::Skip(SkipReason::AlreadyInjected)
        );
        // Also when only the container survived (annotations stripped by some tool).
        let mut stripped = once.clone();
        stripped.metadata.annotations = None;
        assert_eq!(
            plan(&stripped, &ctx(true), &config()),
            Plan::Skip(SkipReason::AlreadyInjected)
        );
    }

    #[test]
    fn opt_in_and_opt_out() {
        let annotated = |value: &str| {
            let mut p = bare_pod();
            p.metadata.annotations =
                Some([(annotations::INJECT.to_string(), value.to_string())].into());
            p
        };
        assert_eq!(
            plan(&bare_pod(), &ctx(false), &config()),
            Plan::Skip(SkipReason::NotOptedIn)
        );
        assert!(matches!(
            plan(&annotated("enabled"), &ctx(false), &config()),
            Plan::Inject(_)
        ));
        assert_eq!(
            plan(&annotated("disabled"), &ctx(true), &config()),
            Plan::Skip(SkipReason::OptedOut)
        );
        assert!(matches!(
            plan(&annotated("yes"), &ctx(true), &config()),
            Plan::Reject(m) if m.contains("streamgate.dev/inject")
        ));
    }

    #[test]
    fn never_touches_the_operator_namespace() {
        let c = PodContext {
            namespace: "streamgate-system".into(),
            namespace_opted_in: true,
        };
        assert_eq!(
            plan(&bare_pod(), &c, &config()),
            Plan::Skip(SkipReason::OperatorNamespace)
        );
    }

    #[test]
    fn never_touches_excluded_namespaces_such_as_kube_public() {
        for namespace in ["kube-system", "kube-public", "kube-node-lease"] {
            let c = PodContext {
                namespace: namespace.into(),
                namespace_opted_in: true,
            };
            let mut p = bare_pod();
            p.metadata.annotations = Some(BTreeMap::from([(
                annotations::INJECT.to_string(),
                ENABLED.to_string(),
            )]));
            assert_eq!(
                plan(&p, &c, &config()),
                Plan::Skip(SkipReason::ExcludedNamespace),
                "{namespace}"
            );
        }
    }

    #[test]
    fn skips_host_network_pods() {
        let mut p = bare_pod();
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(
            plan(&p, &ctx(true), &config()),
            Plan::Skip(SkipReason::HostNetwork)
        );
    }

    #[test]
    fn annotations_override_resources_and_set_the_upstream() {
        let mut p = bare_pod();
        p.metadata.annotations = Some(
            [
                (annotations::CPU_REQUEST, "100m"),
                (annotations::CPU_LIMIT, "2"),
                (annotations::MEMORY_REQUEST, "64Mi"),
                (annotations::MEMORY_LIMIT, "256Mi"),
                (annotations::UPSTREAM_PORT, "9000"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        let doc = injected(&p, &ctx(true), &config());
        let c = sidecar(&doc);
        assert_eq!(
            c["resources"],
            json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "2", "memory": "256Mi"}})
        );
        assert_eq!(
            env_of(c, "STREAMGATE_UPSTREAM").unwrap()["value"],
            "http://127.0.0.1:9000"
        );
    }

    #[test]
    fn bad_annotation_values_are_rejected_with_the_annotation_named() {
        for (key, value, expect) in [
            (
                annotations::CPU_REQUEST,
                "lots",
                "not a Kubernetes quantity",
            ),
            (annotations::MEMORY_LIMIT, "-1Mi", "positive"),
            (annotations::CPU_REQUEST, "4", "above its limit"),
            (annotations::UPSTREAM_PORT, "http", "not a port"),
            (annotations::UPSTREAM_PORT, "70000", "not a port"),
            (annotations::UPSTREAM_PORT, "8080", "sidecar's own port"),
        ] {
            let mut p = bare_pod();
            p.metadata.annotations = Some([(key.to_string(), value.to_string())].into());
            match plan(&p, &ctx(true), &config()) {
                Plan::Reject(message) => assert!(
                    message.contains(expect)
                        && (message.contains(key) || expect == "above its limit"),
                    "{key}={value}: {message}"
                ),
                other => panic!("{key}={value}: expected a rejection, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_clashing_volume_name_is_rejected() {
        let mut p = bare_pod();
        p.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: POLICY_VOLUME.into(),
            ..Default::default()
        }]);
        assert!(matches!(
            plan(&p, &ctx(true), &config()),
            Plan::Reject(m) if m.contains(POLICY_VOLUME)
        ));
    }

    #[test]
    fn store_url_from_a_secret() {
        let mut c = config();
        c.store = StoreSource::Secret {
            name: "streamgate-store".into(),
            key: "url".into(),
        };
        let doc = injected(&bare_pod(), &ctx(true), &c);
        let store = env_of(sidecar(&doc), "STREAMGATE_STORE").unwrap();
        assert!(store.get("value").is_none());
        assert_eq!(
            store["valueFrom"]["secretKeyRef"],
            json!({"name": "streamgate-store", "key": "url", "optional": false})
        );
    }

    #[test]
    fn store_wait_replicas_reach_the_sidecar_only_when_set() {
        let doc = injected(&bare_pod(), &ctx(true), &config());
        assert!(env_of(sidecar(&doc), "STREAMGATE_STORE_WAIT_REPLICAS").is_none());
        let mut c = config();
        c.store_wait_replicas = 1;
        let doc = injected(&bare_pod(), &ctx(true), &c);
        assert_eq!(
            env_of(sidecar(&doc), "STREAMGATE_STORE_WAIT_REPLICAS").unwrap()["value"],
            "1"
        );
    }

    #[test]
    fn config_validation() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.store = StoreSource::Url("redis://user:secret@redis:6379".into());
        assert!(c.validate().unwrap_err().contains("--sidecar-store-secret"));
        let mut c = config();
        c.resources.cpu_request = Some("fast".into());
        assert!(c.validate().is_err());
        assert!(!url_has_credentials("redis://redis:6379/0"));
        assert!(url_has_credentials("redis://:pw@redis:6379"));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100m"), parse_quantity("0.1"));
        assert_eq!(parse_quantity("1.5"), parse_quantity("1500m"));
        assert_eq!(parse_quantity("64Mi"), parse_quantity("65536Ki"));
        assert_eq!(parse_quantity("1G"), parse_quantity("1000M"));
        assert_eq!(parse_quantity("1e3"), parse_quantity("1k"));
        assert_eq!(parse_quantity(""), None);
        assert_eq!(parse_quantity("Mi"), None);
        assert_eq!(parse_quantity("1MB"), None);
        assert_eq!(parse_quantity("1-2"), None);
        assert!(parse_quantity("1Gi") > parse_quantity("1000Mi"));
        assert!(parse_quantity("100m") < parse_quantity("1"));
        assert!(check_quantity("0").is_err());
        assert!(check_quantity("-1").is_err());
        assert!(check_quantity("64Mi").is_ok());
    }

    #[test]
    fn skip_reason_names_are_distinct() {
        let names: std::collections::BTreeSet<_> =
            SkipReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), SkipReason::ALL.len());
    }
}
