//! The Redis store: sessions shared by any number of sidecars, on Redis standalone or Cluster.
//!
//! Each operation is one Lua script (see `lua/`, which documents the key layout, KEYS and ARGV),
//! so every decision is one round trip and atomic per account. Scripts are sent by SHA and
//! re-sent whole when Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`). Time is the
//! Redis server's clock. Cuts are published on a channel that every sidecar subscribes to, so each
//! learns of evictions and kicks made elsewhere.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Script, ScriptInvocation, Value};
use tokio::sync::{OnceCell, broadcast};

use super::{HeartbeatOutcome, KickOutcome, OpenOutcome, OpenRequest, SessionStore, StoreError};
use crate::admission::OverLimit;
use crate::policy::{Mode, OnLimitExceeded};
use crate::session::{EndReason, Revocation, SessionId, SessionRecord, SessionState, account_tag};

/// Channel on which cuts are published.
pub const REVOCATION_CHANNEL: &str = "streamgate:revocations";
/// Revocation notices buffered for slow subscribers before they start missing some.
const REVOCATION_BUFFER: usize = 16_384;

/// Where the Redis store connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis server: `redis://[:PASSWORD@]HOST:PORT[/DB]`.
    Standalone(String),
    /// A Redis Cluster, from its seed nodes (each `redis://[:PASSWORD@]HOST:PORT`).
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Parses a `--store` value: `redis://…` or `redis-cluster://HOST:PORT[,HOST:PORT…]`
    /// (credentials, if any, before the first host apply to every node).
    pub fn parse(value: &str) -> Result<Self, String> {
        if let Some(rest) = value.strip_prefix("redis-cluster://") {
            let (credentials, hosts) = match rest.rsplit_once('@') {
                Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
                None => (String::new(), rest),
            };
            let nodes: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{credentials}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err("redis-cluster:// needs at least one HOST:PORT".into());
            }
            for node in &nodes {
                redis::Client::open(node.as_str()).map_err(|e| format!("{node}: {e}"))?;
            }
            return Ok(Self::Cluster(nodes));
        }
        if value.starts_with("redis://") {
            redis::Client::open(value).map_err(|e| e.to_string())?;
            return Ok(Self::Standalone(value.to_string()));
        }
        Err("expected redis://HOST:PORT[/DB] or redis-cluster://HOST:PORT[,HOST:PORT...]".into())
    }

    fn urls(&self) -> Vec<String> {
        match self {
            Self::Standalone(url) => vec![url.clone()],
            Self::Cluster(nodes) => nodes.clone(),
        }
    }
}

#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Scripts {
    open: Script,
    heartbeat: Script,
    end: Script,
    list: Script,
    get: Script,
    kick: Script,
}

impl Scripts {
    fn load() -> Self {
        let with_common =
            |body: &str| Script::new(&format!("{}\n{body}", include_str!("lua/common.lua")));
        Self {
            open: with_common(include_str!("lua/open.lua")),
            heartbeat: with_common(include_str!("lua/heartbeat.lua")),
            end: with_common(include_str!("lua/end.lua")),
            list: with_common(include_str!("lua/list.lua")),
            get: with_common(include_str!("lua/get.lua")),
            kick: with_common(include_str!("lua/kick.lua")),
        }
    }
}

/// The Redis store. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: RedisTarget,
    timeout: Duration,
    connection: OnceCell<Connection>,
    scripts: Scripts,
    /// Identifies this process's notices, so it does not count its own cuts twice.
    origin: String,
    revocations: broadcast::Sender<Revocation>,
}

/// The keys of one account.
struct AccountKeys {
    /// `sg:{TAG}:`
    tag_prefix: String,
    /// `sg:{TAG}:a:HEXACCOUNT:`
    account_prefix: String,
}

impl AccountKeys {
    fn new(account: &str) -> Self {
        let tag_prefix = tag_prefix(account_tag(account));
        let hex: String = account.bytes().map(|b| format!("{b:02x}")).collect();
        let account_prefix = format!("{tag_prefix}a:{hex}:");
        Self {
            tag_prefix,
            account_prefix,
        }
    }

    fn add_keys(&self, invocation: &mut ScriptInvocation<'_>) {
        for suffix in ["streams", "age", "exp", "cut"] {
            invocation.key(format!("{}{suffix}", self.account_prefix));
        }
        invocation.arg(&self.tag_prefix).arg(&self.account_prefix);
    }
}

fn tag_prefix(tag: u32) -> String {
    // The braces make this the Redis Cluster hash tag: every key of the account hashes alike.
    format!("sg:{{{tag:08x}}}:")
}

fn session_key(id: SessionId) -> String {
    format!("{}s:{id}", tag_prefix(id.tag))
}

impl RedisStore {
    /// A store for `target`; connects on first use, so a sidecar starts (unready) while Redis is
    /// down. `timeout` bounds every operation. Inside a Tokio runtime it also starts listening
    /// for other sidecars' revocations.
    pub fn new(target: RedisTarget, timeout: Duration) -> Self {
        let (revocations, _) = broadcast::channel(REVOCATION_BUFFER);
        let store = Self {
            inner: Arc::new(Inner {
                target,
                timeout,
                connection: OnceCell::new(),
                scripts: Scripts::load(),
                origin: format!("{:032x}", rand::random::<u128>()),
                revocations,
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(listen_for_revocations(Arc::downgrade(&store.inner)));
        }
        store
    }

    async fn connection(&self) -> Result<Connection, StoreError> {
        let timeout = self.inner.timeout;
        self.inner
            .connection
            .get_or_try_init(|| async {
                let connect = async {
                    match &self.inner.target {
                        RedisTarget::Standalone(url) => {
                            let client = redis::Client::open(url.as_str())?;
                            let config = ConnectionManagerConfig::new()
                                .set_response_timeout(Some(timeout))
                                .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
                                .set_number_of_retries(2)
                                .set_max_delay(Duration::from_millis(500));
                            let manager =
                                ConnectionManager::new_with_config(client, config).await?;
                            Ok::<_, redis::RedisError>(Connection::Standalone(manager))
                        }
                        RedisTarget::Cluster(nodes) => {
                            let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                                .response_timeout(timeout)
                                .connection_timeout(timeout.max(Duration::from_secs(1)))
                                .retries(2)
                                .build()?;
                            Ok(Connection::Cluster(client.get_async_connection().await?))
                        }
                    }
                };
                match tokio::time::timeout(timeout.max(Duration::from_secs(1)), connect).await {
                    Ok(Ok(connection)) => Ok(connection),
                    Ok(Err(e)) => Err(StoreError(format!("cannot connect to Redis: {e}"))),
                    Err(_) => Err(StoreError("cannot connect to Redis: timed out".into())),
                }
            })
            .await
            .cloned()
    }

    async fn run(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let connection = self.connection().await?;
        let call = async {
            match connection {
                Connection::Standalone(mut c) => invoke(invocation, &mut c).await,
                Connection::Cluster(mut c) => invoke(invocation, &mut c).await,
            }
        };
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError(format!("Redis: {e}"))),
            Err(_) => Err(StoreError(format!(
                "Redis did not answer within {:?}",
                self.inner.timeout
            ))),
        }
    }

    fn publish_local(&self, cut: impl IntoIterator<Item = SessionRecord>) {
        for session in cut {
            // No subscriber is not an error.
            let _ = self.inner.revocations.send(Revocation {
                session,
                local: true,
            });
        }
    }

    /// Runs a script that takes a session id (`get`, `kick`): KEYS the session's hash, ARGV
    /// the tag prefix, the id, origin and channel.
    async fn run_for_session(&self, script: &Script, id: SessionId) -> Result<Value, StoreError> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(session_key(id))
            .arg(tag_prefix(id.tag))
            .arg(id.to_string());
        self.origin_and_channel(&mut invocation);
        self.run(&invocation).await
    }

    fn origin_and_channel(&self, invocation: &mut ScriptInvocation<'_>) {
        invocation.arg(&self.inner.origin).arg(REVOCATION_CHANNEL);
    }
}

async fn invoke(
    invocation: &ScriptInvocation<'_>,
    connection: &mut impl ConnectionLike,
) -> redis::RedisResult<Value> {
    invocation.invoke_async(connection).await
}

/// Subscribes to the revocation channel and forwards other sidecars' notices, reconnecting
/// with backoff for as long as the store exists.
async fn listen_for_revocations(inner: std::sync::Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(store) = inner.upgrade() else {
            return;
        };
        let urls = store.target.urls();
        let origin = store.origin.clone();
        let sender = store.revocations.clone();
        drop(store); // hold no strong reference while waiting on the network
        for url in urls {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                continue;
            };
            let Ok(Ok(mut pubsub)) =
                tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()).await
            else {
                continue;
            };
            if pubsub.subscribe(REVOCATION_CHANNEL).await.is_err() {
                continue;
            }
            tracing::debug!(%url, "listening for revocations");
            backoff = Duration::from_millis(100);
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                match parse_notice(&payload) {
                    Some((from, session)) if from != origin => {
                        let _ = sender.send(Revocation {
                            session,
                            local: false,
                        });
                    }
                    Some(_) => {}
                    None => tracing::warn!(payload, "unreadable revocation notice"),
                }
                if sender.receiver_count() == 0 && inner.strong_count() == 0 {
                    return;
                }
            }
            tracing::warn!(%url, "revocation subscription lost; resubscribing");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Parses `origin TAB id TAB account TAB stream TAB state TAB reason TAB created TAB expires TAB ttl`.
fn parse_notice(payload: &str) -> Option<(String, SessionRecord)> {
    let fields: Vec<&str> = payload.split('\t').collect();
    let [
        origin,
        id,
        account,
        stream,
        state,
        reason,
        created,
        expires,
        ttl,
    ] = fields[..]
    else {
        return None;
    };
    let record = SessionRecord {
        id: id.parse().ok()?,
        account: account.to_string(),
        stream_id: stream.to_string(),
        state: parse_state(state)?,
        reason: parse_reason(reason),
        created_at_ms: created.parse().ok()?,
        expires_at_ms: expires.parse().ok()?,
        ttl_ms: ttl.parse().ok()?,
    };
    Some((origin.to_string(), record))
}

fn parse_state(state: &str) -> Option<SessionState> {
    match state {
        "active" => Some(SessionState::Active),
        "revoked" => Some(SessionState::Revoked),
        "expired" => Some(SessionState::Expired),
        _ => None,
    }
}

fn parse_reason(reason: &str) -> Option<EndReason> {
    match reason {
        "evicted" => Some(EndReason::Evicted),
        "kicked" => Some(EndReason::Kicked),
        "expired" => Some(EndReason::Expired),
        _ => None,
    }
}

/// A script reply that does not have the documented shape: a bug, reported as a store error.
fn malformed(what: &str, value: &Value) -> StoreError {
    StoreError(format!("unexpected Redis reply to {what}: {value:?}"))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn items(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

/// `{id, account, stream, state, reason, created, expires, ttl}` or nil.
fn session(value: &Value) -> Option<Option<SessionRecord>> {
    if matches!(value, Value::Nil) {
        return Some(None);
    }
    let f = items(value)?;
    let [id, account, stream, state, reason, created, expires, ttl] = f else {
        return None;
    };
    Some(Some(SessionRecord {
        id: text(id)?.parse().ok()?,
        account: text(account)?,
        stream_id: text(stream)?,
        state: parse_state(&text(state)?)?,
        reason: parse_reason(&text(reason)?),
        created_at_ms: int(created)?,
        expires_at_ms: int(expires)?,
        ttl_ms: int(ttl)?,
    }))
}

fn sessions(value: &Value) -> Option<Vec<SessionRecord>> {
    items(value)?.iter().map(|v| session(v).flatten()).collect()
}

/// Splits a reply `{kind, ..., expired}` into its kind, its fields and the expired sessions.
fn reply<'a>(
    what: &str,
    value: &'a Value,
) -> Result<(String, &'a [Value], Vec<SessionRecord>), StoreError> {
    let parts = items(value).ok_or_else(|| malformed(what, value))?;
    let (Some(kind), Some(last)) = (parts.first().and_then(text), parts.last()) else {
        return Err(malformed(what, value));
    };
    let expired = sessions(last).ok_or_else(|| malformed(what, value))?;
    Ok((kind, &parts[1..parts.len() - 1], expired))
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn open(&self, request: &OpenRequest<'_>) -> Result<OpenOutcome, StoreError> {
        let keys = AccountKeys::new(request.account);
        let id = SessionId::for_account(request.account);
        let mut invocation = self.inner.scripts.open.prepare_invoke();
        keys.add_keys(&mut invocation);
        invocation
            .arg(request.account)
            .arg(request.stream_id)
            .arg(id.to_string())
            .arg(request.limit)
            .arg(request.ttl_ms)
            .arg(match request.on_limit {
                OnLimitExceeded::RejectNew => "reject",
                OnLimitExceeded::EvictOldest => "evict",
            })
            .arg(match request.mode {
                Mode::Enforce => "enforce",
                Mode::DryRun => "dryrun",
            });
        self.origin_and_channel(&mut invocation);
        let value = self.run(&invocation).await?;
        let bad = || malformed("open", &value);
        let (kind, fields, expired) = reply("open", &value)?;
        self.publish_local(expired);
        let count = fields.first().and_then(int).ok_or_else(bad)? as u32;
        let outcome = match (kind.as_str(), fields) {
            ("renewed", [_, s]) => OpenOutcome::Renewed {
                session: session(s).flatten().ok_or_else(bad)?,
                active: count,
            },
            ("admitted", [_, s, evicted, dry_run]) => {
                let evicted = sessions(evicted).ok_or_else(bad)?;
                self.publish_local(evicted.iter().cloned());
                let dry_run = match text(dry_run).as_deref() {
                    Some("refuse") => Some(OverLimit::Refuse),
                    // Count before admission = count after, since nothing was evicted.
                    Some("evict") => Some(OverLimit::Evict(
                        (count as usize).saturating_sub(request.limit as usize),
                    )),
                    _ => None,
                };
                OpenOutcome::Admitted {
                    session: session(s).flatten().ok_or_else(bad)?,
                    evicted,
                    active: count,
                    dry_run,
                }
            }
            ("refused", [_, active]) => OpenOutcome::Refused {
                active: sessions(active).ok_or_else(bad)?,
            },
            _ => return Err(bad()),
        };
        Ok(outcome)
    }

    async fn heartbeat(
        &self,
        account: &str,
        stream_id: &str,
        ttl_ms: i64,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let keys = AccountKeys::new(account);
        let mut invocation = self.inner.scripts.heartbeat.prepare_invoke();
        keys.add_keys(&mut invocation);
        invocation.arg(stream_id).arg(ttl_ms);
        self.origin_and_channel(&mut invocation);
        let value = self.run(&invocation).await?;
        let bad = || malformed("heartbeat", &value);
        let (kind, fields, expired) = reply("heartbeat", &value)?;
        self.publish_local(expired);
        Ok(match (kind.as_str(), fields) {
            ("renewed", [count, s]) => HeartbeatOutcome::Renewed {
                session: session(s).flatten().ok_or_else(bad)?,
                active: int(count).ok_or_else(bad)? as u32,
            },
            ("gone", [_, s]) => HeartbeatOutcome::Gone(session(s).flatten().ok_or_else(bad)?),
            ("notfound", _) => HeartbeatOutcome::NotFound,
            _ => return Err(bad()),
        })
    }

    async fn end(
        &self,
        account: &str,
        stream_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let keys = AccountKeys::new(account);
        let mut invocation = self.inner.scripts.end.prepare_invoke();
        keys.add_keys(&mut invocation);
        invocation.arg(stream_id);
        self.origin_and_channel(&mut invocation);
        let value = self.run(&invocation).await?;
        let bad = || malformed("end", &value);
        let (kind, fields, expired) = reply("end", &value)?;
        self.publish_local(expired);
        match (kind.as_str(), fields) {
            ("ended", [s]) => Ok(session(s).flatten()),
            ("none", _) => Ok(None),
            _ => Err(bad()),
        }
    }

    async fn list(&self, account: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let keys = AccountKeys::new(account);
        let mut invocation = self.inner.scripts.list.prepare_invoke();
        keys.add_keys(&mut invocation);
        self.origin_and_channel(&mut invocation);
        let value = self.run(&invocation).await?;
        let parts = items(&value).ok_or_else(|| malformed("list", &value))?;
        let [active, expired] = parts else {
            return Err(malformed("list", &value));
        };
        self.publish_local(sessions(expired).ok_or_else(|| malformed("list", &value))?);
        sessions(active).ok_or_else(|| malformed("list", &value))
    }

    async fn get(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let value = self.run_for_session(&self.inner.scripts.get, id).await?;
        let parts = items(&value).ok_or_else(|| malformed("get", &value))?;
        let [found, expired] = parts else {
            return Err(malformed("get", &value));
        };
        self.publish_local(sessions(expired).ok_or_else(|| malformed("get", &value))?);
        session(found).ok_or_else(|| malformed("get", &value))
    }

    async fn kick(&self, id: SessionId) -> Result<KickOutcome, StoreError> {
        let value = self.run_for_session(&self.inner.scripts.kick, id).await?;
        let bad = || malformed("kick", &value);
        let (kind, fields, expired) = reply("kick", &value)?;
        self.publish_local(expired);
        Ok(match (kind.as_str(), fields) {
            ("kicked", [s]) => {
                let kicked = session(s).flatten().ok_or_else(bad)?;
                self.publish_local([kicked.clone()]);
                KickOutcome::Kicked(kicked)
            }
            ("gone", [s]) => KickOutcome::AlreadyGone(session(s).flatten().ok_or_else(bad)?),
            ("notfound", _) => KickOutcome::NotFound,
            _ => return Err(bad()),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let connection = self.connection().await?;
        let ping = async {
            let cmd = redis::cmd("PING");
            match connection {
                Connection::Standalone(mut c) => cmd.query_async::<String>(&mut c).await,
                Connection::Cluster(mut c) => {
                    // PING every master: a cluster with a master down cannot serve its slots.
                    c.route_command(
                        cmd,
                        redis::cluster_routing::RoutingInfo::MultiNode((
                            redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                            Some(redis::cluster_routing::ResponsePolicy::AllSucceeded),
                        )),
                    )
                    .await
                    .map(|_| "PONG".to_string())
                }
            }
        };
        match tokio::time::timeout(self.inner.timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError(format!("Redis: {e}"))),
            Err(_) => Err(StoreError(format!(
                "Redis did not answer PING within {:?}",
                self.inner.timeout
            ))),
        }
    }

    async fn active_sessions(&self) -> Result<Option<u64>, StoreError> {
        // A fleet-wide count would need a global key outside every account's slot; the
        // per-account counts are what admission relies on.
        Ok(None)
    }

    fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379/2"),
            Ok(RedisTarget::Standalone("redis://127.0.0.1:6379/2".into()))
        );
        assert_eq!(
            RedisTarget::parse("redis-cluster://:pw@127.0.0.1:7001,127.0.0.1:7002"),
            Ok(RedisTarget::Cluster(vec![
                "redis://:pw@127.0.0.1:7001".into(),
                "redis://:pw@127.0.0.1:7002".into()
            ]))
        );
        assert!(RedisTarget::parse("redis-cluster://").is_err());
        assert!(RedisTarget::parse("memcached://x").is_err());
    }

    #[test]
    fn account_keys_hide_caller_characters_and_share_a_hash_tag() {
        let keys = AccountKeys::new("{x}:y");
        let tag = format!("{:08x}", account_tag("{x}:y"));
        assert_eq!(keys.tag_prefix, format!("sg:{{{tag}}}:"));
        assert_eq!(keys.account_prefix, format!("sg:{{{tag}}}:a:7b787d3a79:"));
        // The only braces in any key are the store's own hash tag.
        assert_eq!(keys.account_prefix.matches('{').count(), 1);
        let id = SessionId::for_account("{x}:y");
        assert!(session_key(id).starts_with(&keys.tag_prefix));
    }

    #[test]
    fn notices_round_trip() {
        let payload = format!(
            "o\t{}\t{{a}}:b\ts1\trevoked\tkicked\t1\t2\t3",
            SessionId::for_account("{a}:b")
        );
        let (origin, record) = parse_notice(&payload).unwrap();
        assert_eq!(origin, "o");
        assert_eq!(record.account, "{a}:b");
        assert_eq!(record.reason, Some(EndReason::Kicked));
        assert_eq!(
            (record.created_at_ms, record.expires_at_ms, record.ttl_ms),
            (1, 2, 3)
        );
        assert!(parse_notice("garbage").is_none());
    }
}
