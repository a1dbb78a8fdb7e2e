//! Where a namespace's live sessions are: the session store its sidecars use.
//!
//! The operator hands every injected sidecar the same store setting (`--sidecar-store URL`, or
//! `--sidecar-store-secret NAME` read from a Secret in the pod's namespace), so it finds a
//! namespace's store the same way: the URL itself, or that Secret in the namespace. Sidecars on
//! the embedded memory store keep sessions each to themselves: there is nothing shared to list.
//! Namespaces whose sidecars share one store URL see the same sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::http::StatusCode;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::object::LiveSession;
use crate::inject::StoreSource;

/// A store that could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// What a kick found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kick {
    /// Was active, now revoked with reason `kicked`.
    Kicked(LiveSession),
    /// Had ended already.
    AlreadyGone(LiveSession),
    /// No such session.
    NotFound,
}

/// The sessions of one store.
#[async_trait]
pub trait Sessions: Send + Sync {
    /// Active sessions in id order, after the id `after`, at most `limit`; with the id to
    /// continue after when more may follow.
    async fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<LiveSession>, Option<String>), SourceError>;

    /// One account's active sessions.
    async fn of_account(&self, account: &str) -> Result<Vec<LiveSession>, SourceError>;

    /// One session, active or recently ended; `None` if unknown (or not a session id).
    async fn get(&self, id: &str) -> Result<Option<LiveSession>, SourceError>;

    /// Kicks a session: the sidecars cut its stream on the store's revocation notice.
    async fn kick(&self, id: &str) -> Result<Kick, SourceError>;

    /// The session validators' state of each of `ids` in `namespace` (`pending`, `allowed`,
    /// `denied`, `failed`), in order; `None` where there is no record. Reading does not renew
    /// the records. Stores without a validation ledger have none.
    async fn validation(
        &self,
        _namespace: &str,
        ids: &[String],
    ) -> Result<Vec<Option<String>>, SourceError> {
        Ok(vec![None; ids.len()])
    }

    /// How each `(policy, validator)` of `namespace` has been answering lately, in order (the
    /// counts the sidecars keep next to the validation records). Stores without a validation
    /// ledger cannot say.
    async fn validator_health(
        &self,
        _namespace: &str,
        _validators: &[(String, String)],
    ) -> Result<Vec<streamgate_store::validator_health::ValidatorStats>, SourceError> {
        Err(SourceError("this store keeps no validator health".into()))
    }
}

/// Why a namespace's sessions cannot be read, as a `metav1.Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// HTTP status.
    pub code: StatusCode,
    /// `metav1.StatusReason`.
    pub reason: &'static str,
    /// For the user.
    pub message: String,
}

/// Finds a namespace's sessions.
#[async_trait]
pub trait SessionsResolver: Send + Sync {
    /// The sessions of the store `namespace`'s sidecars use.
    async fn for_namespace(&self, namespace: &str) -> Result<Arc<dyn Sessions>, Problem>;
}

/// Opens a store from its URL.
pub type Connect = dyn Fn(&str) -> Result<Arc<dyn Sessions>, String> + Send + Sync;

/// [`SessionsResolver`] from the operator's sidecar store setting; one connection per URL.
pub struct StoreResolver {
    client: Client,
    source: StoreSource,
    connect: Box<Connect>,
    open: Mutex<HashMap<String, Arc<dyn Sessions>>>,
}

impl StoreResolver {
    /// Resolves with `source` (the operator's `--sidecar-store*` flags), opening stores with
    /// `connect`.
    pub fn new(client: Client, source: StoreSource, connect: Box<Connect>) -> Self {
        Self {
            client,
            source,
            connect,
            open: Mutex::new(HashMap::new()),
        }
    }

    async fn url_for(&self, namespace: &str) -> Result<String, Problem> {
        match &self.source {
            StoreSource::Url(url) => Ok(url.clone()),
            StoreSource::Secret { name, key } => {
                let unavailable = |message: String| Problem {
                    code: StatusCode::SERVICE_UNAVAILABLE,
                    reason: "ServiceUnavailable",
                    message,
                };
                let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
                    .get_opt(name)
                    .await
                    .map_err(|e| {
                        unavailable(format!(
                            "cannot read Secret {namespace}/{name} (the sidecars' store URL): {e}"
                        ))
                    })?
                    .ok_or_else(|| {
                        unavailable(format!(
                            "namespace {namespace} has no Secret {name}: its sidecars have no store URL"
                        ))
                    })?;
                let bytes = secret
                    .data
                    .and_then(|mut data| data.remove(key))
                    .ok_or_else(|| {
                        unavailable(format!("Secret {namespace}/{name} has no key {key}"))
                    })?;
                String::from_utf8(bytes.0).map_err(|_| {
                    unavailable(format!("Secret {namespace}/{name} key {key} is not UTF-8"))
                })
            }
        }
    }
}

/// True for the embedded (per-sidecar) store.
pub fn is_memory(url: &str) -> bool {
    url.trim().eq_ignore_ascii_case("memory")
}

#[async_trait]
impl SessionsResolver for StoreResolver {
    async fn for_namespace(&self, namespace: &str) -> Result<Arc<dyn Sessions>, Problem> {
        let url = self.url_for(namespace).await?;
        if is_memory(&url) {
            return Err(Problem {
                code: StatusCode::BAD_REQUEST,
                reason: "BadRequest",
                message: format!(
                    "the sidecars of namespace {namespace} use the embedded memory store: each \
                     sidecar keeps its own sessions and there is no shared state to list or kick; \
                     use a Redis store (chart value sidecar.store) to manage sessions here"
                ),
            });
        }
        if let Some(open) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&url)
        {
            return Ok(open.clone());
        }
        let sessions = (self.connect)(&url).map_err(|problem| Problem {
            code: StatusCode::SERVICE_UNAVAILABLE,
            reason: "ServiceUnavailable",
            message: format!("namespace {namespace}: the sidecars' session store: {problem}"),
        })?;
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url, sessions.clone());
        Ok(sessions)
    }
}

/// [`Sessions`] over a session store of the `streamgate-store` crate, and the validation records
/// the sidecars keep next to it.
pub struct StoreSessions {
    store: Arc<dyn streamgate_store::SessionStore>,
    validation: streamgate_store::validation_record::ValidationReader,
}

/// How long one store operation may take before the API answers 503.
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl StoreSessions {
    /// Opens the store a sidecar would for `url` (`redis://…`, `redis-cluster://…`).
    pub fn connect(url: &str) -> Result<Arc<dyn Sessions>, String> {
        let target = streamgate_store::RedisTarget::parse(url)?;
        let validation = streamgate_store::validation_record::ValidationReader::new(
            target.clone(),
            STORE_TIMEOUT,
        );
        let store = streamgate_store::RedisStore::new(target, STORE_TIMEOUT);
        Ok(Arc::new(Self {
            store: Arc::new(store),
            validation,
        }))
    }
}

fn live(record: streamgate_store::session::SessionRecord) -> LiveSession {
    use streamgate_store::session::SessionState;
    LiveSession {
        id: record.id.to_string(),
        account: record.account,
        stream_id: record.stream_id,
        state: match record.state {
            SessionState::Active => "active",
            SessionState::Revoked => "revoked",
            SessionState::Expired => "expired",
        }
        .into(),
        reason: record.reason.map(|r| r.as_str().to_string()),
        created_at_ms: record.created_at_ms,
        expires_at_ms: record.expires_at_ms,
        policy: None,
        validation: None,
    }
}

fn store_error(error: streamgate_store::StoreError) -> SourceError {
    SourceError(error.to_string())
}

#[async_trait]
impl Sessions for StoreSessions {
    async fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<LiveSession>, Option<String>), SourceError> {
        let after = match after {
            Some(id) => Some(
                id.parse()
                    .map_err(|()| SourceError(format!("{id:?} is not a session id")))?,
            ),
            None => None,
        };
        let page = self
            .store
            .list_all(after, limit)
            .await
            .map_err(store_error)?;
        Ok((
            page.sessions.into_iter().map(live).collect(),
            page.next_after.map(|id| id.to_string()),
        ))
    }

    async fn of_account(&self, account: &str) -> Result<Vec<LiveSession>, SourceError> {
        let mut sessions: Vec<LiveSession> = self
            .store
            .list(account)
            .await
            .map_err(store_error)?
            .into_iter()
            .map(live)
            .collect();
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(sessions)
    }

    async fn get(&self, id: &str) -> Result<Option<LiveSession>, SourceError> {
        let Ok(id) = id.parse() else {
            return Ok(None);
        };
        Ok(self.store.get(id).await.map_err(store_error)?.map(live))
    }

    async fn kick(&self, id: &str) -> Result<Kick, SourceError> {
        use streamgate_store::KickOutcome;
        let Ok(id) = id.parse() else {
            return Ok(Kick::NotFound);
        };
        Ok(match self.store.kick(id).await.map_err(store_error)? {
            KickOutcome::Kicked(record) => Kick::Kicked(live(record)),
            KickOutcome::AlreadyGone(record) => Kick::AlreadyGone(live(record)),
            KickOutcome::NotFound => Kick::NotFound,
        })
    }

    async fn validation(
        &self,
        namespace: &str,
        ids: &[String],
    ) -> Result<Vec<Option<String>>, SourceError> {
        let states = self
            .validation
            .states(namespace, ids)
            .await
            .map_err(store_error)?;
        Ok(states
            .into_iter()
            .map(|state| state.map(|s| s.as_str().to_string()))
            .collect())
    }

    async fn validator_health(
        &self,
        namespace: &str,
        validators: &[(String, String)],
    ) -> Result<Vec<streamgate_store::validator_health::ValidatorStats>, SourceError> {
        self.validation
            .validator_health(namespace, validators)
            .await
            .map_err(store_error)
    }
}
