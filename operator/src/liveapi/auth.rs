//! Who is asking: the front-proxy (requestheader) authentication the API server's aggregation
//! layer uses, and authorization by SubjectAccessReview.
//!
//! The API server connects with a client certificate signed by the requestheader CA and names
//! the end user in headers. The CA, the allowed certificate names and the header names come from
//! the `extension-apiserver-authentication` ConfigMap in `kube-system`, which the API server
//! keeps current; headers are believed only on a connection whose certificate verified.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};
use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DistinguishedName, SignatureScheme};

use super::object::{GROUP, RESOURCE, VERSION};

/// Namespace and name of the ConfigMap the API server publishes its front-proxy settings in.
pub const AUTHENTICATION_CONFIGMAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");

/// The front-proxy settings of the `extension-apiserver-authentication` ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeaderConfig {
    /// PEM bundle of the CA that signs the API server's front-proxy client certificate.
    pub client_ca_pem: String,
    /// Common names the client certificate may carry (empty: any the CA signed).
    pub allowed_names: Vec<String>,
    /// Headers naming the user, first present wins.
    pub username_headers: Vec<String>,
    /// Headers naming the groups.
    pub group_headers: Vec<String>,
    /// Prefixes of headers carrying extra attributes.
    pub extra_headers_prefixes: Vec<String>,
}

impl RequestHeaderConfig {
    /// Reads the ConfigMap's data (lists are JSON arrays in strings); `Err` says what is missing.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let list = |key: &str| -> Result<Vec<String>, String> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(text) => serde_json::from_str(text).map_err(|e| format!("{key}: {e}")),
            }
        };
        let client_ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|pem| !pem.trim().is_empty())
            .cloned()
            .ok_or_else(|| {
                "no requestheader-client-ca-file: the API server runs without the aggregation \
                 layer's front proxy (--requestheader-client-ca-file)"
                    .to_string()
            })?;
        Ok(Self {
            client_ca_pem,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_headers_prefixes: list("requestheader-extra-headers-prefix")?,
        })
    }

    /// Reads the ConfigMap from the cluster.
    pub async fn load(client: &Client) -> anyhow::Result<Self> {
        let (namespace, name) = AUTHENTICATION_CONFIGMAP;
        let config_map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read ConfigMap {namespace}/{name}: {e}"))?;
        Self::from_data(&config_map.data.unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("ConfigMap {namespace}/{name}: {e}"))
    }

    /// The user the headers name; `None` when no username header is set.
    pub fn user(&self, headers: &HeaderMap) -> Option<UserInfo> {
        let first = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let username = self
            .username_headers
            .iter()
            .find_map(|h| first(h))
            .filter(|u| !u.is_empty())?
            .to_string();
        let groups = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()).iter())
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in headers {
            for prefix in &self.extra_headers_prefixes {
                let prefix = prefix.to_ascii_lowercase();
                if let Some(key) = name.as_str().strip_prefix(&prefix)
                    && let Ok(value) = value.to_str()
                {
                    // Keys are percent-encoded by the API server; decode the common escapes.
                    let key = percent_decode(key);
                    extra.entry(key).or_default().push(value.to_string());
                }
            }
        }
        Some(UserInfo {
            username,
            groups,
            extra,
        })
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The end user of a request, as the API server authenticated them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    /// User name.
    pub username: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (scopes, ...), passed on to the SubjectAccessReview.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The common name of a DER certificate's subject.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Verifies client certificates against the current requestheader CA (swapped when the
/// ConfigMap changes). Connections without a certificate are accepted (discovery and OpenAPI
/// need none); their requests carry no user and are refused by the resource handlers.
#[derive(Debug, Default)]
pub struct FrontProxyVerifier {
    current: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
}

impl FrontProxyVerifier {
    /// Trusts `ca_pem` from now on.
    pub fn set_ca(&self, ca_pem: &str) -> anyhow::Result<()> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
            let cert: CertificateDer<'static> = cert?;
            roots.add(cert)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .allow_unauthenticated()
        .build()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(verifier);
        Ok(())
    }

    fn current(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ClientCertVerifier for FrontProxyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would have to outlive the lock; the API server sends its certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.current() {
            Some(verifier) => verifier.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General(
                "the front-proxy CA is not loaded yet".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The Kubernetes verb of a request on the resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// Read one.
    Get,
    /// Read many.
    List,
    /// Watch (refused: not served).
    Watch,
    /// Kick.
    Delete,
}

impl Verb {
    /// As RBAC spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Delete => "delete",
        }
    }
}

/// Asks the API server whether `user` may `verb` streamingsessions (`name`) in `namespace`.
/// `Ok(Err(reason))` is a denial.
pub async fn authorize(
    client: &Client,
    user: &UserInfo,
    verb: Verb,
    namespace: &str,
    name: Option<&str>,
) -> Result<Result<(), String>, kube::Error> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.username.clone()),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                version: Some(VERSION.into()),
                resource: Some(RESOURCE.into()),
                verb: Some(verb.as_str().into()),
                namespace: Some(namespace.into()),
                name: name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = answer.status.unwrap_or_default();
    if status.allowed && !status.denied.unwrap_or(false) {
        Ok(Ok(()))
    } else {
        Ok(Err(status.reason.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RequestHeaderConfig {
        let data: BTreeMap<String, String> = [
            (
                "requestheader-client-ca-file",
                "-----BEGIN CERTIFICATE-----",
            ),
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
            (
                "requestheader-extra-headers-prefix",
                r#"["X-Remote-Extra-"]"#,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        RequestHeaderConfig::from_data(&data).unwrap()
    }

    #[test]
    fn reads_the_configmap_lists() {
        let c = config();
        assert_eq!(c.allowed_names, ["front-proxy-client"]);
        assert_eq!(c.username_headers, ["X-Remote-User"]);
        let missing = RequestHeaderConfig::from_data(&BTreeMap::new()).unwrap_err();
        assert!(missing.contains("requestheader-client-ca-file"));
    }

    #[test]
    fn user_groups_and_extra_come_from_the_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-remote-user", "alice".parse().unwrap());
        headers.append("x-remote-group", "ops".parse().unwrap());
        headers.append("x-remote-group", "system:authenticated".parse().unwrap());
        headers.insert("x-remote-extra-scopes%2Fa", "x".parse().unwrap());
        let user = config().user(&headers).unwrap();
        assert_eq!(user.username, "alice");
        assert_eq!(user.groups, ["ops", "system:authenticated"]);
        assert_eq!(user.extra["scopes/a"], ["x"]);
        assert_eq!(config().user(&HeaderMap::new()), None);
    }
}
