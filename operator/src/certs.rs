//! The webhook's serving certificate without manual steps.
//!
//! Self-issued mode (the default): a CA and a serving certificate live in one Secret in the
//! operator's namespace, so every replica serves the same certificate. Each replica checks the
//! Secret every [`CHECK_INTERVAL`]: creates it when missing, renews the serving certificate when a
//! third of its lifetime is left (or the host names changed), rolls the CA over the same way
//! (keeping the previous CA in the bundle until it expires), loads what the Secret holds, and
//! patches the MutatingWebhookConfiguration's `caBundle` when it differs. Writes use optimistic
//! concurrency, so replicas racing to create or renew settle on one version.
//!
//! Directory mode (cert-manager): the operator only serves `tls.crt`/`tls.key` from a mounted
//! directory and reloads them when they change; cert-manager's CA injector owns the caBundle.
//!
//! The decisions ([`renewal_due`], [`next_material`]) are pure and tested directly.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use backon::{ConstantBuilder, Retryable};
use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;

use crate::metrics::Metrics;

/// How often each replica re-checks the Secret and the caBundle.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// The CA lives this many times as long as the serving certificates it signs.
pub const CA_LIFETIME_FACTOR: u32 = 10;
/// Back-dating of `notBefore`, for clocks that run a little behind.
const CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);
const CA_NAME: &str = "streamgate-webhook-ca";

mod keys {
    pub const CERT: &str = "tls.crt";
    pub const KEY: &str = "tls.key";
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    pub const PREVIOUS_CA_CERT: &str = "ca-previous.crt";
    pub const CA_NOT_BEFORE: &str = "streamgate.dev/ca-not-before";
    pub const CA_NOT_AFTER: &str = "streamgate.dev/ca-not-after";
    pub const PREVIOUS_CA_NOT_AFTER: &str = "streamgate.dev/previous-ca-not-after";
    pub const CERT_NOT_BEFORE: &str = "streamgate.dev/cert-not-before";
    pub const CERT_NOT_AFTER: &str = "streamgate.dev/cert-not-after";
    pub const CERT_HOSTS: &str = "streamgate.dev/cert-hosts";
}

/// A CA and the serving certificate it signed, PEM, with their validity.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// CA certificate.
    pub ca_cert_pem: String,
    /// CA private key.
    pub ca_key_pem: String,
    /// CA validity start.
    pub ca_not_before: DateTime<Utc>,
    /// CA expiry.
    pub ca_not_after: DateTime<Utc>,
    /// The CA before the last rollover, trusted until it expires.
    pub previous_ca: Option<(String, DateTime<Utc>)>,
    /// Serving certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// Serving certificate validity start.
    pub cert_not_before: DateTime<Utc>,
    /// Serving certificate expiry.
    pub cert_not_after: DateTime<Utc>,
    /// Names and addresses the serving certificate is valid for.
    pub hosts: Vec<String>,
}

impl fmt::Debug for Material {
    // Keys stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("ca_not_after", &self.ca_not_after)
            .field("previous_ca", &self.previous_ca.as_ref().map(|(_, t)| t))
            .field("cert_not_after", &self.cert_not_after)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Material {
    /// What clients must trust: the current CA, plus the previous one until it expires.
    pub fn ca_bundle(&self) -> String {
        let mut bundle = self.ca_cert_pem.clone();
        if let Some((previous, _)) = &self.previous_ca {
            bundle.push_str(previous);
        }
        bundle
    }
}

/// Whether a certificate valid from `not_before` to `not_after` should be replaced at `now`:
/// when less than a third of its lifetime is left.
pub fn renewal_due(
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    let lifetime = not_after - not_before;
    now >= not_after - lifetime / 3
}

/// The material that should be in the Secret at `now`, or `None` when `existing` is fine.
pub fn next_material(
    existing: Option<&Material>,
    hosts: &[String],
    validity: Duration,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<Material>> {
    let validity = chrono::Duration::from_std(validity).context("certificate validity too long")?;
    let Some(existing) = existing else {
        let (ca_cert_pem, ca_key_pem, ca_not_before, ca_not_after) =
            new_ca(now, validity * CA_LIFETIME_FACTOR as i32)?;
        let mut material = Material {
            ca_cert_pem,
            ca_key_pem,
            ca_not_before,
            ca_not_after,
            previous_ca: None,
            cert_pem: String::new(),
            key_pem: String::new(),
            cert_not_before: now,
            cert_not_after: now,
            hosts: hosts.to_vec(),
        };
        issue_serving(&mut material, hosts, validity, now)?;
        return Ok(Some(material));
    };
    let mut next = existing.clone();
    let mut changed = false;
    if next
        .previous_ca
        .as_ref()
        .is_some_and(|(_, not_after)| *not_after <= now)
    {
        next.previous_ca = None;
        changed = true;
    }
    let ca_rolled = renewal_due(existing.ca_not_before, existing.ca_not_after, now);
    if ca_rolled {
        let (cert, key, not_before, not_after) = new_ca(now, validity * CA_LIFETIME_FACTOR as i32)?;
        next.previous_ca = (existing.ca_not_after > now)
            .then(|| (existing.ca_cert_pem.clone(), existing.ca_not_after));
        next.ca_cert_pem = cert;
        next.ca_key_pem = key;
        next.ca_not_before = not_before;
        next.ca_not_after = not_after;
        changed = true;
    }
    if ca_rolled
        || existing.hosts != hosts
        || renewal_due(existing.cert_not_before, existing.cert_not_after, now)
    {
        issue_serving(&mut next, hosts, validity, now)?;
        changed = true;
    }
    Ok(changed.then_some(next))
}

/// Sets the validity of `params` (rcgen speaks the `time` crate; chrono is used elsewhere).
fn set_validity(
    params: &mut CertificateParams,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
) -> anyhow::Result<()> {
    let since_epoch = |t: DateTime<Utc>| {
        u64::try_from(t.timestamp())
            .map(Duration::from_secs)
            .context("certificate time before 1970")
    };
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_before)?;
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_after)?;
    Ok(())
}

fn ca_params(
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, not_before, not_after)?;
    Ok(params)
}

/// A new CA: (cert PEM, key PEM, notBefore, notAfter).
fn new_ca(
    now: DateTime<Utc>,
    lifetime: chrono::Duration,
) -> anyhow::Result<(String, String, DateTime<Utc>, DateTime<Utc>)> {
    let (not_before, not_after) = (now - CLOCK_SKEW, now + lifetime);
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = ca_params(not_before, not_after)?
        .self_signed(&key)
        .context("self-signing the CA certificate")?;
    Ok((cert.pem(), key.serialize_pem(), not_before, not_after))
}

/// Signs a new serving certificate for `hosts` with `material`'s CA.
fn issue_serving(
    material: &mut Material,
    hosts: &[String],
    validity: chrono::Duration,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let ca_key = KeyPair::from_pem(&material.ca_key_pem).context("reading the CA key")?;
    // The issuer is rebuilt from the same name and key: certificates it signs chain to the
    // stored CA certificate (same subject, same key identifier).
    let issuer = Issuer::new(
        ca_params(material.ca_not_before, material.ca_not_after)?,
        ca_key,
    );
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        hosts
            .first()
            .map(String::as_str)
            .unwrap_or("streamgate-webhook"),
    );
    params.distinguished_name = dn;
    for host in hosts {
        params.subject_alt_names.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.clone()
                    .try_into()
                    .with_context(|| format!("{host:?} is not a valid DNS name"))?,
            ),
        });
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (not_before, not_after) = (
        now - CLOCK_SKEW,
        (now + validity).min(material.ca_not_after),
    );
    set_validity(&mut params, not_before, not_after)?;
    let key = KeyPair::generate().context("generating the serving key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the serving certificate")?;
    material.cert_pem = cert.pem();
    material.key_pem = key.serialize_pem();
    material.cert_not_before = not_before;
    material.cert_not_after = not_after;
    material.hosts = hosts.to_vec();
    Ok(())
}

/// The Secret that stores `material`.
pub fn to_secret(name: &str, namespace: &str, material: &Material) -> Secret {
    let mut data = BTreeMap::from([
        (
            keys::CERT.to_string(),
            ByteString(material.cert_pem.clone().into_bytes()),
        ),
        (
            keys::KEY.to_string(),
            ByteString(material.key_pem.clone().into_bytes()),
        ),
        (
            keys::CA_CERT.to_string(),
            ByteString(material.ca_cert_pem.clone().into_bytes()),
        ),
        (
            keys::CA_KEY.to_string(),
            ByteString(material.ca_key_pem.clone().into_bytes()),
        ),
    ]);
    let mut annotations = BTreeMap::from([
        (
            keys::CA_NOT_BEFORE.to_string(),
            material.ca_not_before.to_rfc3339(),
        ),
        (
            keys::CA_NOT_AFTER.to_string(),
            material.ca_not_after.to_rfc3339(),
        ),
        (
            keys::CERT_NOT_BEFORE.to_string(),
            material.cert_not_before.to_rfc3339(),
        ),
        (
            keys::CERT_NOT_AFTER.to_string(),
            material.cert_not_after.to_rfc3339(),
        ),
        (keys::CERT_HOSTS.to_string(), material.hosts.join(",")),
    ]);
    if let Some((pem, not_after)) = &material.previous_ca {
        data.insert(
            keys::PREVIOUS_CA_CERT.to_string(),
            ByteString(pem.clone().into_bytes()),
        );
        annotations.insert(
            keys::PREVIOUS_CA_NOT_AFTER.to_string(),
            not_after.to_rfc3339(),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            annotations: Some(annotations),
            labels: Some(BTreeMap::from([(
                crate::reconcile::MANAGED_BY_LABEL.to_string(),
                crate::reconcile::MANAGED_BY.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Reads material back from its Secret; `None` when anything is missing or unreadable (the
/// Secret is then rewritten).
pub fn from_secret(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let annotations = secret.metadata.annotations.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let time = |key: &str| {
        annotations
            .get(key)
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let previous_ca = match (
        text(keys::PREVIOUS_CA_CERT),
        time(keys::PREVIOUS_CA_NOT_AFTER),
    ) {
        (Some(pem), Some(t)) => Some((pem, t)),
        _ => None,
    };
    Some(Material {
        ca_cert_pem: text(keys::CA_CERT)?,
        ca_key_pem: text(keys::CA_KEY)?,
        ca_not_before: time(keys::CA_NOT_BEFORE)?,
        ca_not_after: time(keys::CA_NOT_AFTER)?,
        previous_ca,
        cert_pem: text(keys::CERT)?,
        key_pem: text(keys::KEY)?,
        cert_not_before: time(keys::CERT_NOT_BEFORE)?,
        cert_not_after: time(keys::CERT_NOT_AFTER)?,
        hosts: annotations
            .get(keys::CERT_HOSTS)?
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// Settings of the self-issued mode.
#[derive(Clone, Debug)]
pub struct SelfIssued {
    /// The operator's namespace (where the Secret lives).
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
    /// The MutatingWebhookConfiguration whose caBundle to keep current.
    pub webhook_configuration: String,
    /// Names and addresses for the serving certificate.
    pub hosts: Vec<String>,
    /// Serving certificate lifetime.
    pub validity: Duration,
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

/// Why one attempt at the Secret failed.
enum SecretError {
    /// Another replica wrote it between our read and our write: read again.
    Conflict,
    /// Anything else.
    Failed(anyhow::Error),
}

/// Makes the Secret hold valid material for `settings` and returns it.
pub async fn ensure_secret(client: &Client, settings: &SelfIssued) -> anyhow::Result<Material> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    // Another replica may win a race: re-read and go again, a few times.
    let result = (|| try_ensure_secret(&api, settings))
        .retry(
            ConstantBuilder::new()
                .with_delay(Duration::from_millis(100))
                .with_jitter()
                .with_max_times(4),
        )
        .when(|error| matches!(error, SecretError::Conflict))
        .await;
    match result {
        Ok(material) => Ok(material),
        Err(SecretError::Failed(error)) => Err(error),
        Err(SecretError::Conflict) => anyhow::bail!(
            "Secret {}/{} keeps changing under us; will retry",
            settings.namespace,
            settings.secret
        ),
    }
}

async fn try_ensure_secret(
    api: &Api<Secret>,
    settings: &SelfIssued,
) -> Result<Material, SecretError> {
    let what = || format!("Secret {}/{}", settings.namespace, settings.secret);
    let now = Utc::now();
    let current = api
        .get_opt(&settings.secret)
        .await
        .with_context(|| format!("cannot read {}", what()))
        .map_err(SecretError::Failed)?;
    let existing = current.as_ref().and_then(from_secret);
    let Some(next) = next_material(existing.as_ref(), &settings.hosts, settings.validity, now)
        .map_err(SecretError::Failed)?
    else {
        return Ok(existing.expect("next_material renews when nothing exists"));
    };
    let mut secret = to_secret(&settings.secret, &settings.namespace, &next);
    let written = match &current {
        None => api.create(&PostParams::default(), &secret).await,
        Some(current) => {
            secret.metadata.resource_version = current.metadata.resource_version.clone();
            api.replace(&settings.secret, &PostParams::default(), &secret)
                .await
        }
    };
    match written {
        Ok(_) => {
            tracing::info!(secret = %what(), not_after = %next.cert_not_after, hosts = ?next.hosts, "issued the webhook serving certificate");
            Ok(next)
        }
        Err(error) if is_conflict(&error) => Err(SecretError::Conflict),
        Err(error) => Err(SecretError::Failed(
            anyhow::Error::new(error).context(format!("cannot write {}", what())),
        )),
    }
}

/// Sets the caBundle of every webhook in `name` to `bundle` where it differs. Returns whether it
/// patched; a missing configuration is not an error (the chart may not have created it yet).
pub async fn sync_ca_bundle(client: &Client, name: &str, bundle: &str) -> anyhow::Result<bool> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    // A concurrent change (another replica, `helm upgrade`) fails the patch's `test`: re-read
    // and try again, twice.
    let result = (|| try_sync_ca_bundle(&api, name, bundle))
        .retry(
            ConstantBuilder::new()
                .with_delay(Duration::from_millis(100))
                .with_jitter()
                .with_max_times(2),
        )
        .when(|error| matches!(error, SyncError::Patch(error) if !is_forbidden(error)))
        .await;
    match result {
        Ok(patched) => Ok(patched),
        Err(SyncError::Patch(error)) => Err(error).with_context(|| {
            format!("cannot patch the caBundle of MutatingWebhookConfiguration {name}")
        }),
        Err(SyncError::Read(error)) => {
            Err(error).with_context(|| format!("cannot read MutatingWebhookConfiguration {name}"))
        }
    }
}

enum SyncError {
    Read(kube::Error),
    Patch(kube::Error),
}

fn is_forbidden(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 403)
}

async fn try_sync_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    bundle: &str,
) -> Result<bool, SyncError> {
    let Some(config) = api.get_opt(name).await.map_err(SyncError::Read)? else {
        tracing::warn!(
            configuration = name,
            "MutatingWebhookConfiguration not found; its caBundle will be set once it exists"
        );
        return Ok(false);
    };
    let wanted = ByteString(bundle.as_bytes().to_vec());
    // `test` on the resourceVersion: the indexes below are only right for this version.
    let mut ops = vec![json!({
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": config.metadata.resource_version,
    })];
    for (index, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
            ops.push(json!({
                "op": "add",
                "path": format!("/webhooks/{index}/clientConfig/caBundle"),
                "value": wanted,
            }));
        }
    }
    if ops.len() == 1 {
        return Ok(false);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .expect("test and add operations are valid JSON patch operations");
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(SyncError::Patch)?;
    tracing::info!(configuration = name, "patched the webhook caBundle");
    Ok(true)
}

/// One round of the self-issued mode: Secret, served certificate, caBundle.
pub async fn reconcile_once(
    client: &Client,
    settings: &SelfIssued,
    serving: &ServingCert,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let material = ensure_secret(client, settings).await?;
    serving.load(&material.cert_pem, &material.key_pem)?;
    metrics
        .webhook_cert_expiry
        .set(material.cert_not_after.timestamp());
    sync_ca_bundle(
        client,
        &settings.webhook_configuration,
        &material.ca_bundle(),
    )
    .await?;
    Ok(())
}

/// Runs the self-issued mode forever. A schedule rather than a retry loop (it runs every
/// [`CHECK_INTERVAL`] after a success too), so it stays a plain loop.
pub async fn run_self_issued(
    client: Client,
    settings: SelfIssued,
    serving: Arc<ServingCert>,
    metrics: Arc<Metrics>,
) {
    loop {
        let wait = match reconcile_once(&client, &settings, &serving, &metrics).await {
            Ok(()) => CHECK_INTERVAL,
            Err(error) => {
                tracing::warn!("webhook certificate: {error:#}");
                Duration::from_secs(5)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Loads `tls.crt`/`tls.key` from `dir` into `serving` once.
pub fn load_dir(dir: &Path, serving: &ServingCert) -> anyhow::Result<()> {
    let read = |name: &str| {
        let path: PathBuf = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    serving.load(&read(keys::CERT)?, &read(keys::KEY)?)
}

/// Reloads the certificate in `dir` forever (cert-manager renews it in place).
pub async fn run_from_dir(dir: PathBuf, serving: Arc<ServingCert>) {
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        if let Err(error) = load_dir(&dir, &serving) {
            tracing::warn!("webhook certificate: {error:#}");
        }
    }
}

/// The certificate the webhook serves, replaceable while serving (rustls asks on every
/// handshake).
#[derive(Default)]
pub struct ServingCert {
    current: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

impl ServingCert {
    /// Serves this certificate chain and key from the next handshake on (no-op when unchanged).
    pub fn load(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let fingerprint = format!("{cert_pem}{key_pem}");
        if self
            .current
            .read()
            .expect("lock poisoned")
            .as_ref()
            .is_some_and(|(f, _)| *f == fingerprint)
        {
            return Ok(());
        }
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the serving certificate")?;
        anyhow::ensure!(
            !certs.is_empty(),
            "no certificate in the serving certificate PEM"
        );
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parsing the serving key")?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .context("unsupported serving key type")?;
        let certified = Arc::new(CertifiedKey::new(certs, key));
        *self.current.write().expect("lock poisoned") = Some((fingerprint, certified));
        Ok(())
    }

    /// Whether a certificate has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.current.read().expect("lock poisoned").is_some()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .expect("lock poisoned")
            .as_ref()
            .map(|(_, key)| key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        vec!["streamgate-webhook.sg.svc".into(), "127.0.0.1".into()]
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn renewal_when_a_third_is_left() {
        let start = Utc::now();
        let end = start + chrono::Duration::days(90);
        assert!(!renewal_due(start, end, start));
        assert!(!renewal_due(start, end, start + chrono::Duration::days(59)));
        assert!(renewal_due(start, end, start + chrono::Duration::days(61)));
        assert!(renewal_due(start, end, end + chrono::Duration::days(1)));
    }

    #[test]
    fn creates_then_keeps_then_renews() {
        let now = Utc::now();
        let first = next_material(None, &hosts(), 90 * DAY, now)
            .unwrap()
            .unwrap();
        assert!(first.cert_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(first.hosts, hosts());
        assert!(first.ca_not_after > first.cert_not_after);
        // Fresh: nothing to do.
        assert_eq!(
            next_material(Some(&first), &hosts(), 90 * DAY, now).unwrap(),
            None
        );
        // Two thirds in: a new serving certificate from the same CA.
        let later = now + chrono::Duration::days(61);
        let renewed = next_material(Some(&first), &hosts(), 90 * DAY, later)
            .unwrap()
            .unwrap();
        assert_ne!(renewed.cert_pem, first.cert_pem);
        assert_eq!(renewed.ca_cert_pem, first.ca_cert_pem);
        assert_eq!(renewed.ca_bundle(), first.ca_bundle());
        // New host names: reissued.
        let other = vec!["other.sg.svc".to_string()];
        let reissued = next_material(Some(&first), &other, 90 * DAY, now)
            .unwrap()
            .unwrap();
        assert_eq!(reissued.hosts, other);
        assert_eq!(reissued.ca_cert_pem, first.ca_cert_pem);
    }

    #[test]
    fn ca_rollover_keeps_the_previous_ca_in_the_bundle_until_it_expires() {
        let now = Utc::now();
        let first = next_material(None, &hosts(), DAY, now).unwrap().unwrap();
        // CA lives 10 days: renewal due after ~6.7 days.
        let rollover = now + chrono::Duration::days(7);
        let rolled = next_material(Some(&first), &hosts(), DAY, rollover)
            .unwrap()
            .unwrap();
        assert_ne!(rolled.ca_cert_pem, first.ca_cert_pem);
        let bundle = rolled.ca_bundle();
        assert!(bundle.contains(&rolled.ca_cert_pem) && bundle.contains(&first.ca_cert_pem));
        // After the old CA expired it leaves the bundle.
        let expired = first.ca_not_after + chrono::Duration::hours(1);
        let pruned = next_material(Some(&rolled), &hosts(), DAY, expired)
            .unwrap()
            .unwrap();
        assert_eq!(pruned.previous_ca, None);
        assert_eq!(pruned.ca_cert_pem, rolled.ca_cert_pem);
    }

    #[test]
    fn secret_round_trip_and_loadable() {
        let material = next_material(None, &hosts(), DAY, Utc::now())
            .unwrap()
            .unwrap();
        let secret = to_secret("tls", "sg", &material);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let back = from_secret(&secret).unwrap();
        assert_eq!(back.cert_pem, material.cert_pem);
        assert_eq!(back.hosts, material.hosts);
        assert_eq!(
            back.ca_not_after.timestamp(),
            material.ca_not_after.timestamp()
        );
        let serving = ServingCert::default();
        assert!(!serving.is_loaded());
        serving.load(&back.cert_pem, &back.key_pem).unwrap();
        assert!(serving.is_loaded());
        assert!(!format!("{material:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn served_certificate_verifies_against_the_bundle() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::ServerName;
        let material = next_material(None, &hosts(), DAY, Utc::now())
            .unwrap()
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(material.ca_bundle().as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        for host in hosts() {
            let name = ServerName::try_from(host.clone()).unwrap();
            verifier
                .verify_server_cert(
                    &chain[0],
                    &[],
                    &name,
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{host}: {e}"));
        }
    }
}
