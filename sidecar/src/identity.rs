//! Viewer identity: verifies the `Authorization: Bearer` JWT of a `/streaming` request against
//! the namespace's ViewerAuthentication and says who the viewer is.
//!
//! [`decide`] is the whole decision, a pure function of the compiled configuration, the request's
//! header and query account, and the time. [`Authenticator`] keeps the compiled configuration in
//! step with the policy in force (the policy file reloads swap it), and, for a hand-written
//! policy file, fetches `jwksUri` key sets itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio_util::sync::CancellationToken;

use crate::engine::Policies;
use crate::policy::PolicySet;
use crate::policy::viewer_auth::{AuthMode, ClaimMapping, JwtAlgorithm, ViewerAuth};

/// How often the `jwksUri` fetcher looks for key sets that are due.
pub const JWKS_POLL: Duration = Duration::from_secs(1);

/// A verified viewer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The account, from the token's account claim.
    pub account: String,
    /// The stream limit the token claims (limit or tier claim, capped), if any.
    pub claimed_limit: Option<u32>,
    /// The token's issuer.
    pub issuer: String,
    /// When the token expires (seconds since the epoch).
    pub expires_at: i64,
}

/// Who is asking, as the `/streaming` handlers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viewer {
    /// The account the request acts for.
    pub account: String,
    /// The verified identity, when the account comes from a token.
    pub identity: Option<Identity>,
}

/// Why a request is refused before anything is stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 401 `unauthenticated`: no token where one is required, or a check failed (named).
    #[error("{0}")]
    Unauthenticated(String),
    /// 403 `account_mismatch`: the query's account is not the token's.
    #[error("the account parameter {query:?} is not the token's account {token:?}")]
    AccountMismatch {
        /// The token's account.
        token: String,
        /// The query's account.
        query: String,
    },
    /// 503 `auth_unavailable`: no key was ever loaded for the token's issuer; fails closed.
    #[error("{0}")]
    Unavailable(String),
    /// No token and no `account` parameter (400 `invalid_request`).
    #[error("parameter `account` is required without a bearer token")]
    MissingAccount,
}

/// The family a key belongs to, from its JWK type: which algorithms it can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    Ec,
    Ed,
    Hmac,
}

fn family_of(alg: Algorithm) -> KeyFamily {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => KeyFamily::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => KeyFamily::Ec,
        Algorithm::EdDSA => KeyFamily::Ed,
        _ => KeyFamily::Rsa,
    }
}

fn algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        JwtAlgorithm::HS256 => Algorithm::HS256,
    }
}

struct CompiledKey {
    kid: Option<String>,
    /// The JWK's own `alg`, when it names one: then only that algorithm may use it.
    alg: Option<String>,
    family: KeyFamily,
    key: DecodingKey,
}

struct CompiledRule {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: i64,
    keys: Vec<CompiledKey>,
}

/// A ViewerAuthentication with its keys parsed, ready to verify tokens.
pub struct Verifier {
    mode: AuthMode,
    rules: Vec<CompiledRule>,
    claims: ClaimMapping,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.mode)
            .field(
                "issuers",
                &self.rules.iter().map(|r| &r.issuer).collect::<Vec<_>>(),
            )
            .field("keys", &self.key_count())
            .finish()
    }
}

/// Parses a JWKS; keys this verifier cannot use (unknown types, bad encodings) are left out
/// and logged, so one odd key does not take the others down.
fn compile_keys(jwks: &str, allow_hmac: bool) -> Vec<CompiledKey> {
    // Key by key: one key of a type or algorithm this library does not know must not take the
    // whole set down.
    let keys = match serde_json::from_str::<serde_json::Value>(jwks) {
        Ok(value) => value
            .get("keys")
            .and_then(|k| k.as_array())
            .cloned()
            .unwrap_or_default(),
        Err(error) => {
            tracing::warn!(%error, "a JWKS could not be parsed; none of its keys is in force");
            return Vec::new();
        }
    };
    keys.into_iter()
        .filter_map(|value| {
            let jwk: Jwk = match serde_json::from_value(value) {
                Ok(jwk) => jwk,
                Err(error) => {
                    tracing::warn!(%error, "a JWK could not be read; it is ignored");
                    return None;
                }
            };
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
                AlgorithmParameters::EllipticCurve(_) => KeyFamily::Ec,
                AlgorithmParameters::OctetKeyPair(_) => KeyFamily::Ed,
                AlgorithmParameters::OctetKey(_) if allow_hmac => KeyFamily::Hmac,
                AlgorithmParameters::OctetKey(_) => {
                    tracing::warn!(kid = ?jwk.common.key_id,
                        "a symmetric key outside a Secret is ignored");
                    return None;
                }
            };
            match DecodingKey::from_jwk(&jwk) {
                Ok(key) => Some(CompiledKey {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm.map(|a| format!("{a:?}")),
                    family,
                    key,
                }),
                Err(error) => {
                    tracing::warn!(kid = ?jwk.common.key_id, %error, "a JWK could not be used");
                    None
                }
            }
        })
        .collect()
}

impl Verifier {
    /// Compiles `auth`, taking each rule's keys from `keys_for(rule index)` (inline, resolved by
    /// the operator, or fetched); `None` means not loaded (yet).
    pub fn compile(auth: &ViewerAuth, keys_for: impl Fn(usize) -> Option<String>) -> Self {
        let rules = auth
            .spec
            .jwt_rules
            .iter()
            .enumerate()
            .map(|(i, rule)| CompiledRule {
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                algorithms: rule.algorithms.iter().map(|a| algorithm(*a)).collect(),
                leeway: i64::from(rule.clock_skew_seconds),
                keys: keys_for(i)
                    .map(|jwks| compile_keys(&jwks, rule.jwks_secret_ref.is_some()))
                    .unwrap_or_default(),
            })
            .collect();
        Self {
            mode: auth.spec.mode,
            rules,
            claims: auth.spec.claims.clone(),
        }
    }

    /// The mode in force.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Keys in force, over all rules.
    pub fn key_count(&self) -> usize {
        self.rules.iter().map(|r| r.keys.len()).sum()
    }
}

fn unauthenticated(message: impl Into<String>) -> Refusal {
    Refusal::Unauthenticated(message.into())
}

/// The JSON of a token part, unverified: only to pick the rule and key to verify with.
fn peek(part: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// Verifies `token` against `verifier` at `now` (seconds since the epoch).
pub fn verify(verifier: &Verifier, token: &str, now: i64) -> Result<Identity, Refusal> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header_part, payload_part, _] = parts[..] else {
        return Err(unauthenticated(
            "format check failed: the bearer token is not a JWT (three dot-separated parts)",
        ));
    };
    let header = peek(header_part)
        .ok_or_else(|| unauthenticated("format check failed: the token's header is not JSON"))?;
    let alg_name = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(unauthenticated(
            "algorithm check failed: unsigned tokens (alg none) are never accepted",
        ));
    }
    let payload = peek(payload_part)
        .ok_or_else(|| unauthenticated("format check failed: the token's claims are not JSON"))?;
    let issuer = payload
        .get("iss")
        .and_then(|i| i.as_str())
        .ok_or_else(|| unauthenticated("issuer check failed: the token has no iss claim"))?;
    if verifier.rules.iter().all(|r| r.keys.is_empty()) {
        return Err(Refusal::Unavailable(
            "no verification key has been loaded yet; retry shortly".into(),
        ));
    }
    let rule = verifier
        .rules
        .iter()
        .find(|r| r.issuer == issuer)
        .ok_or_else(|| {
            unauthenticated(format!(
                "issuer check failed: issuer {issuer:?} is not trusted"
            ))
        })?;
    if rule.keys.is_empty() {
        return Err(Refusal::Unavailable(format!(
            "no verification key of issuer {issuer:?} has been loaded yet; retry shortly"
        )));
    }
    let alg: Algorithm = alg_name.parse().map_err(|_| {
        unauthenticated(format!(
            "algorithm check failed: {alg_name:?} is not an algorithm"
        ))
    })?;
    if !rule.algorithms.contains(&alg) {
        return Err(unauthenticated(format!(
            "algorithm check failed: {alg_name} is not accepted for issuer {issuer:?}"
        )));
    }
    let kid = header.get("kid").and_then(|k| k.as_str());
    // A key verifies only its own family's algorithms (so an RSA public key is never an HMAC
    // secret), and only its declared `alg` when it has one.
    let candidates: Vec<&CompiledKey> = rule
        .keys
        .iter()
        .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
        .filter(|k| k.family == family_of(alg))
        .filter(|k| k.alg.as_deref().is_none_or(|a| a == alg_name))
        .collect();
    if candidates.is_empty() {
        return Err(unauthenticated(match kid {
            Some(kid) => format!(
                "signature check failed: no {alg_name} key with kid {kid:?} is in force for issuer {issuer:?}"
            ),
            None => format!(
                "signature check failed: no {alg_name} key is in force for issuer {issuer:?}"
            ),
        }));
    }
    // The library checks the signature and the algorithm; the claims are checked below against
    // `now`, so this stays a function of its inputs.
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let verified = candidates
        .iter()
        .any(|k| jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &validation).is_ok());
    if !verified {
        return Err(unauthenticated(
            "signature check failed: the token's signature does not verify",
        ));
    }
    let exp = payload
        .get("exp")
        .and_then(|e| e.as_i64())
        .ok_or_else(|| unauthenticated("expiry check failed: the token has no exp claim"))?;
    if now > exp + rule.leeway {
        return Err(unauthenticated(format!(
            "expiry check failed: the token expired {}s ago",
            now - exp
        )));
    }
    if let Some(nbf) = payload.get("nbf").and_then(|n| n.as_i64())
        && now + rule.leeway < nbf
    {
        return Err(unauthenticated(format!(
            "not-before check failed: the token is valid only in {}s",
            nbf - now
        )));
    }
    if !rule.audiences.is_empty() {
        let audiences: Vec<&str> = match payload.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.as_str()],
            Some(serde_json::Value::Array(list)) => {
                list.iter().filter_map(|a| a.as_str()).collect()
            }
            _ => Vec::new(),
        };
        if !audiences
            .iter()
            .any(|a| rule.audiences.iter().any(|r| r == a))
        {
            return Err(unauthenticated(format!(
                "audience check failed: the token is not for {:?}",
                rule.audiences
            )));
        }
    }
    let account = verifier
        .claims
        .account_of(&payload)
        .map_err(|problem| unauthenticated(format!("account check failed: {problem}")))?;
    Ok(Identity {
        account,
        claimed_limit: verifier.claims.claimed_limit(&payload),
        issuer: issuer.to_string(),
        expires_at: exp,
    })
}

/// Who a `/streaming` request acts for: the whole identity decision.
///
/// `verifier` is the ViewerAuthentication in force (`None`: there is none, the prototype's
/// behaviour); `authorization` the `Authorization` header; `query_account` the `account`
/// parameter; `now` seconds since the epoch.
pub fn decide(
    verifier: Option<&Verifier>,
    authorization: Option<&str>,
    query_account: Option<&str>,
    now: i64,
) -> Result<Viewer, Refusal> {
    let from_query = || {
        query_account
            .map(|account| Viewer {
                account: account.to_string(),
                identity: None,
            })
            .ok_or(Refusal::MissingAccount)
    };
    let Some(verifier) = verifier.filter(|v| v.mode != AuthMode::Disabled) else {
        return from_query();
    };
    let Some(authorization) = authorization else {
        return match verifier.mode {
            AuthMode::Optional => from_query(),
            _ => Err(unauthenticated(
                "token check failed: a bearer token is required (Authorization: Bearer <token>)",
            )),
        };
    };
    let token = authorization
        .strip_prefix("Bearer ")
        .or_else(|| authorization.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            unauthenticated("token check failed: the Authorization header is not `Bearer <token>`")
        })?;
    let identity = verify(verifier, token, now)?;
    if let Some(query) = query_account
        && query != identity.account
    {
        return Err(Refusal::AccountMismatch {
            token: identity.account,
            query: query.to_string(),
        });
    }
    Ok(Viewer {
        account: identity.account.clone(),
        identity: Some(identity),
    })
}

/// The compiled ViewerAuthentication for the policy in force, rebuilt when the policy file is
/// reloaded or a fetched key set changes; and, for hand-written policy files, the `jwksUri`
/// fetcher.
pub struct Authenticator {
    policies: Policies,
    /// `jwksUri` -> the last key set fetched from it (hand-written files only).
    fetched: ArcSwap<HashMap<String, String>>,
    compiled: ArcSwap<Compiled>,
    due: Mutex<HashMap<String, Instant>>,
    client: reqwest::Client,
}

struct Compiled {
    set: Arc<PolicySet>,
    fetched: Arc<HashMap<String, String>>,
    verifier: Option<Arc<Verifier>>,
}

fn compile_for(set: &Arc<PolicySet>, fetched: &Arc<HashMap<String, String>>) -> Compiled {
    let verifier = set.viewer_auth().map(|auth| {
        Arc::new(Verifier::compile(auth, |i| {
            let rule = &auth.spec.jwt_rules[i];
            if let Some(resolved) = &auth.resolved_jwks {
                return resolved.get(i).cloned();
            }
            if let Some(jwks) = &rule.jwks {
                return Some(jwks.clone());
            }
            // A Secret cannot be read without the operator: never loaded, fails closed.
            rule.jwks_uri
                .as_ref()
                .and_then(|uri| fetched.get(uri).cloned())
        }))
    });
    Compiled {
        set: set.clone(),
        fetched: fetched.clone(),
        verifier,
    }
}

impl Authenticator {
    /// An authenticator following `policies`, fetching `jwksUri` with `client`.
    pub fn new(policies: Policies, client: reqwest::Client) -> Self {
        let fetched = Arc::new(HashMap::new());
        let compiled = compile_for(&policies.load_full(), &fetched);
        Self {
            policies,
            fetched: ArcSwap::new(fetched),
            compiled: ArcSwap::from_pointee(compiled),
            due: Mutex::new(HashMap::new()),
            client,
        }
    }

    /// The verifier for the policy in force now (`None`: no ViewerAuthentication).
    pub fn verifier(&self) -> Option<Arc<Verifier>> {
        let set = self.policies.load_full();
        let fetched = self.fetched.load_full();
        let current = self.compiled.load();
        if Arc::ptr_eq(&current.set, &set) && Arc::ptr_eq(&current.fetched, &fetched) {
            return current.verifier.clone();
        }
        let compiled = compile_for(&set, &fetched);
        let verifier = compiled.verifier.clone();
        self.compiled.store(Arc::new(compiled));
        verifier
    }

    /// Decides who a request acts for, now.
    pub fn decide(
        &self,
        authorization: Option<&str>,
        query_account: Option<&str>,
    ) -> Result<Viewer, Refusal> {
        let verifier = self.verifier();
        decide(
            verifier.as_deref(),
            authorization,
            query_account,
            chrono::Utc::now().timestamp(),
        )
    }

    /// Fetches every `jwksUri` of a hand-written policy file that is due. On an error the last
    /// good set stays. Returns how many sets changed.
    pub async fn refresh_due(&self) -> usize {
        let set = self.policies.load_full();
        let Some(auth) = set.viewer_auth() else {
            return 0;
        };
        if auth.resolved_jwks.is_some() {
            return 0; // rendered by the operator, which fetched them
        }
        let mut changed = 0;
        for rule in &auth.spec.jwt_rules {
            let Some(uri) = &rule.jwks_uri else { continue };
            let now = Instant::now();
            let is_due = self
                .due
                .lock()
                .expect("due lock")
                .get(uri)
                .is_none_or(|at| *at <= now);
            if !is_due {
                continue;
            }
            let fetched = fetch_jwks(&self.client, uri).await;
            let retry = match &fetched {
                Ok(_) => rule.refresh(),
                // A set never loaded is retried soon; a loaded one is kept meanwhile.
                Err(_) => Duration::from_secs(5).min(rule.refresh()),
            };
            self.due
                .lock()
                .expect("due lock")
                .insert(uri.clone(), now + retry);
            match fetched {
                Ok(jwks) => {
                    let current = self.fetched.load_full();
                    if current.get(uri) != Some(&jwks) {
                        let mut next = (*current).clone();
                        next.insert(uri.clone(), jwks);
                        self.fetched.store(Arc::new(next));
                        changed += 1;
                        tracing::info!(%uri, "JWKS fetched");
                    }
                }
                Err(error) => {
                    tracing::warn!(%uri, %error, "JWKS fetch failed; keeping the last good set")
                }
            }
        }
        changed
    }

    /// Refreshes `jwksUri` key sets every `interval` until `shutdown`.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.refresh_due().await;
        }
    }
}

/// Fetches a JWKS and checks it is one.
pub async fn fetch_jwks(client: &reqwest::Client, uri: &str) -> anyhow::Result<String> {
    let response = client
        .get(uri)
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()?;
    let text = response.text().await?;
    crate::policy::viewer_auth::key_ids(&text).map_err(|p| anyhow::anyhow!("the answer {p}"))?;
    Ok(text)
}
