//! The Redis store: sessions shared by any number of sidecars, on Redis standalone or Cluster.
//!
//! Each operation is one Lua script (see `lua/`, which documents the key layout, KEYS and ARGV),
//! so every decision is one round trip and atomic per account. Scripts are sent by SHA and
//! re-sent whole when Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`). Time is the
//! Redis server's clock. Cuts are published on a channel that every sidecar subscribes to, so each
//! learns of evictions and kicks made elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use futures::future::BoxFuture;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script, ScriptInvocation, Value};
use tokio::sync::{OnceCell, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{
    HeartbeatOutcome, KickOutcome, OpenOutcome, OpenRequest, SessionPage, SessionStore, StoreError,
    Touched,
};
use crate::admission::OverLimit;
use crate::clock::Clock;
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
                redis::Client::open(node.as_str())
                    .map_err(|e| format!("{}: {e}", redact_url(node)))?;
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

/// `url` with any password (and user name) replaced by `***`, for logs, errors and bodies.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((_, hosts)) => format!("{scheme}://***@{hosts}"),
        None => url.to_string(),
    }
}

impl std::fmt::Display for RedisTarget {
    /// The target as an operator may read it: without credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone(url) => f.write_str(&redact_url(url)),
            Self::Cluster(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                write!(f, "cluster {}", nodes.join(","))
            }
        }
    }
}

/// Sorts a Redis error into transient (failurePolicy applies) or fatal (never admit).
///
/// Transient: the server could not be asked or asked us to come back (I/O, timeouts, refused or
/// dropped connections, LOADING, MASTERDOWN, TRYAGAIN, CLUSTERDOWN, READONLY and BUSY during a
/// failover, cluster redirections that ran out of retries). Everything else — a script error, a
/// wrong type, OOM, NOSCRIPT after the re-send, a reply the client could not parse, an
/// authentication failure — is fatal. The detail stays in the error for the log; it never
/// reaches an HTTP body.
pub fn classify(error: &RedisError) -> StoreError {
    if error.is_timeout() {
        return StoreError::TimedOut(format!("Redis: {error}"));
    }
    let transient = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.code(),
            Some("LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY" | "BUSY")
        );
    if transient {
        StoreError::Unavailable(format!("Redis: {error}"))
    } else {
        StoreError::Fatal(format!("Redis: {error}"))
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
    touch: Script,
    adopt: Script,
    discard: Script,
}

impl Scripts {
    fn load() -> Self {
        // The shebang (Redis 7) makes Redis refuse a script while it is out of memory (OOM)
        // before it runs, instead of letting it write.
        let with_common = |body: &str| {
            Script::new(&format!(
                "#!lua\n{}\n{body}",
                include_str!("lua/common.lua")
            ))
        };
        Self {
            open: with_common(include_str!("lua/open.lua")),
            heartbeat: with_common(include_str!("lua/heartbeat.lua")),
            end: with_common(include_str!("lua/end.lua")),
            list: with_common(include_str!("lua/list.lua")),
            get: with_common(include_str!("lua/get.lua")),
            kick: with_common(include_str!("lua/kick.lua")),
            touch: with_common(include_str!("lua/touch.lua")),
            adopt: with_common(include_str!("lua/adopt.lua")),
            discard: with_common(include_str!("lua/discard.lua")),
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
    /// Whether the revocation subscription is established now.
    subscribed: watch::Sender<bool>,
    /// Tests only: "now" for the scripts instead of the Redis server's clock.
    clock: Option<Arc<dyn Clock>>,
    /// The Redis clock against this process's, for deadlines on the store's clock.
    offset: std::sync::Mutex<Option<ClockOffset>>,
    /// Opens whose caller gave up waiting (account, new session id, when to stop trying): the
    /// script may have run and admitted a session nobody was given; the background work
    /// discards it. Bounded by [`ABANDONED_CAPACITY`].
    abandoned: std::sync::Mutex<Vec<(String, SessionId, Instant)>>,
}

/// Abandoned opens remembered for discarding; past this, the oldest are forgotten (their
/// sessions expire by themselves after one TTL).
const ABANDONED_CAPACITY: usize = 10_000;
/// How often abandoned opens are discarded.
const DISCARD_INTERVAL: Duration = Duration::from_millis(200);

/// The Redis server's clock minus this process's, measured with TIME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClockOffset {
    /// Redis ms minus local ms, at the midpoint of the TIME round trip.
    offset_ms: i64,
    /// Half the round trip, plus one for the millisecond rounding: how wrong `offset_ms` may be.
    uncertainty_ms: i64,
}

impl ClockOffset {
    /// From a TIME answered at `redis_ms`, asked at `sent_ms` and received at `received_ms`.
    fn measure(sent_ms: i64, redis_ms: i64, received_ms: i64) -> Self {
        Self {
            offset_ms: redis_ms - (sent_ms + received_ms) / 2,
            uncertainty_ms: (received_ms - sent_ms + 1) / 2 + 1,
        }
    }

    /// The deadline on the Redis clock of a call started at `started_ms` (local) that gives up
    /// after `timeout_ms`: early by the uncertainty, so a script never runs after its caller
    /// gave up.
    fn deadline(self, started_ms: i64, timeout_ms: i64) -> i64 {
        started_ms + timeout_ms + self.offset_ms - self.uncertainty_ms
    }
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

/// SCAN pattern of session keys (narrowed further by [`session_id_of_key`]).
const SESSION_KEY_PATTERN: &str = "sg:{????????}:s:*";

/// The session id a key of [`session_key`]'s shape holds; `None` for any other key.
fn session_id_of_key(key: &str) -> Option<SessionId> {
    let id: SessionId = key
        .strip_prefix("sg:{")?
        .split_once("}:s:")?
        .1
        .parse()
        .ok()?;
    (session_key(id) == key).then_some(id)
}

/// The masters' addresses in `CLUSTER NODES` output (`ID HOST:PORT@CPORT FLAGS ...`).
fn cluster_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            let addr = fields.get(1)?.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
}

impl RedisStore {
    /// The ids of every session key (active or cut), by SCAN on the server or on every master
    /// of a cluster.
    async fn scan_session_ids(&self) -> Result<Vec<SessionId>, StoreError> {
        let connection = self.connection().await?;
        let scan = async {
            let mut ids = Vec::new();
            match connection {
                Connection::Standalone(c) => {
                    scan_node(&mut ids, |cmd| {
                        let mut c = c.clone();
                        async move { cmd.query_async::<(u64, Vec<String>)>(&mut c).await }
                    })
                    .await?;
                }
                Connection::Cluster(c) => {
                    let nodes: String = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query_async(&mut c.clone())
                        .await?;
                    for (host, port) in cluster_masters(&nodes) {
                        scan_node(&mut ids, |cmd| {
                            let mut c = c.clone();
                            let host = host.clone();
                            async move {
                                let reply = c
                                    .route_command(
                                        cmd,
                                        redis::cluster_routing::RoutingInfo::SingleNode(
                                            redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                                                host,
                                                port,
                                            },
                                        ),
                                    )
                                    .await?;
                                redis::from_redis_value::<(u64, Vec<String>)>(reply)
                                    .map_err(RedisError::from)
                            }
                        })
                        .await?;
                    }
                }
            }
            Ok::<_, RedisError>(ids)
        };
        // A full walk takes longer than one script: allow it ten operation timeouts.
        let budget = self.inner.timeout * 10;
        match tokio::time::timeout(budget, scan).await {
            Ok(Ok(ids)) => Ok(ids),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(StoreError::TimedOut(format!(
                "Redis did not finish scanning session keys within {budget:?}"
            ))),
        }
    }

    /// A store for `target`; connects on first use, so a sidecar starts (unready) while Redis is
    /// down. `timeout` bounds every operation. Other sidecars' revocations are heard only while
    /// the owner runs [`SessionStore::background`].
    pub fn new(target: RedisTarget, timeout: Duration) -> Self {
        Self::build(target, timeout, None)
    }

    /// A store whose scripts take "now" from `clock` instead of the Redis server's clock, for
    /// tests and simulations that move time by hand. Never for production: sidecars with
    /// different clocks would disagree.
    pub fn with_clock(target: RedisTarget, timeout: Duration, clock: Arc<dyn Clock>) -> Self {
        Self::build(target, timeout, Some(clock))
    }

    fn build(target: RedisTarget, timeout: Duration, clock: Option<Arc<dyn Clock>>) -> Self {
        let (revocations, _) = broadcast::channel(REVOCATION_BUFFER);
        Self {
            inner: Arc::new(Inner {
                target,
                timeout,
                connection: OnceCell::new(),
                scripts: Scripts::load(),
                origin: format!("{:032x}", rand::random::<u128>()),
                revocations,
                subscribed: watch::Sender::new(false),
                clock,
                offset: std::sync::Mutex::new(None),
                abandoned: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// Measures the Redis clock against ours with TIME; keeps the measurement unless an earlier
    /// one was much tighter (a slow round trip says little).
    async fn measure_offset(&self, connection: &Connection) -> Result<(), StoreError> {
        let sent = chrono::Utc::now().timestamp_millis();
        let time = async {
            let cmd = redis::cmd("TIME");
            match connection.clone() {
                Connection::Standalone(mut c) => cmd.query_async::<(i64, i64)>(&mut c).await,
                Connection::Cluster(mut c) => cmd.query_async::<(i64, i64)>(&mut c).await,
            }
        };
        let (secs, micros) = match tokio::time::timeout(self.inner.timeout, time).await {
            Ok(Ok(time)) => time,
            Ok(Err(e)) => return Err(classify(&e)),
            Err(_) => return Err(StoreError::TimedOut("Redis did not answer TIME".into())),
        };
        let received = chrono::Utc::now().timestamp_millis();
        let measured = ClockOffset::measure(sent, secs * 1000 + micros / 1000, received);
        let mut offset = self.inner.offset.lock().unwrap_or_else(|p| p.into_inner());
        match *offset {
            Some(old) if measured.uncertainty_ms > old.uncertainty_ms.max(5) => {}
            _ => *offset = Some(measured),
        }
        Ok(())
    }

    /// The deadline (ms on the store's clock) to give a script started now; 0 (none) while the
    /// offset is unknown.
    fn deadline(&self, started_ms: i64) -> i64 {
        let timeout_ms = self.inner.timeout.as_millis() as i64;
        if let Some(clock) = &self.inner.clock {
            return clock.now_ms() + timeout_ms;
        }
        let offset = *self.inner.offset.lock().unwrap_or_else(|p| p.into_inner());
        offset.map_or(0, |o| o.deadline(started_ms, timeout_ms).max(1))
    }

    async fn connection(&self) -> Result<Connection, StoreError> {
        let connection = self.connect().await?;
        let unmeasured = self
            .inner
            .offset
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none();
        if unmeasured && self.inner.clock.is_none() {
            self.measure_offset(&connection).await?;
        }
        Ok(connection)
    }

    async fn connect(&self) -> Result<Connection, StoreError> {
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
                    Ok(Err(e)) => Err(classify(&e)),
                    Err(_) => Err(StoreError::TimedOut(
                        "cannot connect to Redis: timed out".into(),
                    )),
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
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(StoreError::TimedOut(format!(
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

    /// The last ARGV of every script: origin and channel, then the test clock if any.
    fn origin_and_channel(&self, invocation: &mut ScriptInvocation<'_>) {
        invocation.arg(&self.inner.origin).arg(REVOCATION_CHANNEL);
        if let Some(clock) = &self.inner.clock {
            invocation.arg("__now__").arg(clock.now_ms());
        }
    }
}

/// SCANs one node to the end, collecting session ids; `send` runs one SCAN command there.
async fn scan_node<F, Fut>(ids: &mut Vec<SessionId>, send: F) -> Result<(), RedisError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: std::future::Future<Output = Result<(u64, Vec<String>), RedisError>>,
{
    let mut cursor = 0u64;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(SESSION_KEY_PATTERN)
            .arg("COUNT")
            .arg(1000);
        let (next, keys) = send(cmd).await?;
        ids.extend(keys.iter().filter_map(|k| session_id_of_key(k)));
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

async fn invoke(
    invocation: &ScriptInvocation<'_>,
    connection: &mut impl ConnectionLike,
) -> redis::RedisResult<Value> {
    invocation.invoke_async(connection).await
}

/// Subscribes to the revocation channel and forwards other sidecars' notices until `shutdown`,
/// resubscribing with exponential backoff (backon) when the subscription is lost, and reports
/// in `inner.subscribed` whether it is established.
///
/// Kept by hand rather than on the redis crate's RESP3 push support: a RESP3 connection manager
/// resubscribes after a reconnect on its own, but tells nobody when the subscription is back,
/// and readiness and the tests need exactly that signal.
async fn listen_for_revocations(inner: Arc<Inner>, shutdown: CancellationToken) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times();
    let mut delays = backoff.build();
    let urls = inner.target.urls();
    let mut next_url = 0;
    while !shutdown.is_cancelled() {
        let url = &urls[next_url % urls.len()];
        next_url += 1;
        let subscribe = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(REVOCATION_CHANNEL).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            () = shutdown.cancelled() => break,
            subscribed = tokio::time::timeout(Duration::from_secs(2), subscribe) => subscribed,
        };
        let pubsub = match pubsub {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                tracing::debug!(target = %redact_url(url), %reason, "cannot subscribe to revocations");
                let delay = delays.next().unwrap_or(Duration::from_secs(2));
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        delays = backoff.build();
        inner.subscribed.send_replace(true);
        tracing::info!(target = %redact_url(url), "subscribed to revocations");
        let mut messages = pubsub.into_on_message();
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => break,
                message = messages.next() => message,
            };
            let Some(message) = message else {
                tracing::warn!(target = %redact_url(url), "revocation subscription lost; resubscribing");
                break;
            };
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            match parse_notice(&payload) {
                Some((from, session)) if from != inner.origin => {
                    let _ = inner.revocations.send(Revocation {
                        session,
                        local: false,
                    });
                }
                Some(_) => {}
                None => tracing::warn!("unreadable revocation notice"),
            }
        }
        inner.subscribed.send_replace(false);
    }
    inner.subscribed.send_replace(false);
}

/// Discards the sessions of opens whose callers gave up, every [`DISCARD_INTERVAL`], until
/// `shutdown`; one that cannot be discarded yet (store unreachable) is tried again until its TTL
/// has passed (then it has expired by itself).
async fn discard_abandoned(store: RedisStore, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(DISCARD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pending: Vec<_> = std::mem::take(
            &mut *store
                .inner
                .abandoned
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut retry = Vec::new();
        for (account, id, give_up) in pending {
            if Instant::now() >= give_up {
                continue;
            }
            match store.discard(&account, id).await {
                Ok(true) => {
                    tracing::info!(account = %crate::session::fingerprint(&account),
                        "discarded a session admitted after its caller gave up");
                }
                Ok(false) => {}
                Err(_) => retry.push((account, id, give_up)),
            }
        }
        if !retry.is_empty() {
            let mut abandoned = store
                .inner
                .abandoned
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            retry.append(&mut abandoned);
            *abandoned = retry;
        }
    }
}

impl RedisStore {
    /// Discards session `id` of `account` if an abandoned open admitted it and nobody renewed it
    /// since. `true` if it was discarded.
    async fn discard(&self, account: &str, id: SessionId) -> Result<bool, StoreError> {
        let keys = AccountKeys::new(account);
        let mut invocation = self.inner.scripts.discard.prepare_invoke();
        keys.add_keys(&mut invocation);
        invocation.arg(id.to_string());
        self.origin_and_channel(&mut invocation);
        let value = self.run(&invocation).await?;
        let (kind, _, expired) = reply("discard", &value)?;
        self.publish_local(expired);
        match kind.as_str() {
            "discarded" => Ok(true),
            "kept" | "absent" => Ok(false),
            _ => Err(malformed("discard", &value)),
        }
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

/// Why a Redis `maxmemory-policy` is unsafe for sessions, if it is.
///
/// Only `noeviction` keeps every session: an evicted account key forgets its sessions and the
/// account is admitted over its limit. `volatile-*` is no better here: every StreamGate key
/// carries a TTL (they expire by themselves), so `volatile-*` may evict any of them just like
/// `allkeys-*`.
pub fn eviction_problem(policy: &str) -> Result<(), String> {
    if policy.eq_ignore_ascii_case("noeviction") {
        return Ok(());
    }
    Err(format!(
        "Redis maxmemory-policy is {policy:?}: Redis may evict session keys when full and \
         accounts would be admitted over their limit; set maxmemory-policy noeviction \
         (StreamGate keys all carry TTLs, so volatile-* policies may evict them too)"
    ))
}

/// Every string in a reply, depth first, in order.
fn flatten_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|v| flatten_strings(v, out));
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                flatten_strings(k, out);
                flatten_strings(v, out);
            }
        }
        other => {
            if let Some(text) = text(other) {
                out.push(text);
            }
        }
    }
}

/// A script reply that does not have the documented shape: a bug, reported as a store error.
fn malformed(what: &str, value: &Value) -> StoreError {
    StoreError::Fatal(format!("unexpected Redis reply to {what}: {value:?}"))
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
        let started = chrono::Utc::now().timestamp_millis();
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
        // Measured before the call: the connection may be (re)made inside it.
        if self
            .inner
            .offset
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            self.connection().await?;
        }
        invocation.arg(self.deadline(started));
        self.origin_and_channel(&mut invocation);
        let value = match self.run(&invocation).await {
            Ok(value) => value,
            Err(error @ StoreError::TimedOut(_)) => {
                // The script may still have run before its deadline, its answer arriving too
                // late: a slot nobody holds. Discarded in the background unless renewed by then.
                let mut abandoned = self
                    .inner
                    .abandoned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if abandoned.len() >= ABANDONED_CAPACITY {
                    abandoned.remove(0);
                }
                let give_up = Instant::now() + Duration::from_millis(request.ttl_ms.max(0) as u64);
                abandoned.push((request.account.to_string(), id, give_up));
                return Err(error);
            }
            Err(error) => return Err(error),
        };
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
            ("late", _) => {
                return Err(StoreError::TimedOut(
                    "the open reached Redis after its caller gave up; refused there".into(),
                ));
            }
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

    async fn touch(
        &self,
        id: SessionId,
        ttl_ms: i64,
        renew_after_ms: i64,
    ) -> Result<Option<Touched>, StoreError> {
        let mut invocation = self.inner.scripts.touch.prepare_invoke();
        invocation
            .key(session_key(id))
            .arg(tag_prefix(id.tag))
            .arg(id.to_string())
            .arg(ttl_ms)
            .arg(renew_after_ms);
        self.origin_and_channel(&mut invocation);
        let value = self.run(&invocation).await?;
        let bad = || malformed("touch", &value);
        let [found, renewed, expired] = items(&value).ok_or_else(bad)? else {
            return Err(bad());
        };
        self.publish_local(sessions(expired).ok_or_else(bad)?);
        let renewed = int(renewed).ok_or_else(bad)? == 1;
        Ok(session(found)
            .ok_or_else(bad)?
            .map(|session| Touched { session, renewed }))
    }

    async fn adopt(&self, record: &SessionRecord) -> Result<bool, StoreError> {
        let keys = AccountKeys::new(&record.account);
        let mut invocation = self.inner.scripts.adopt.prepare_invoke();
        keys.add_keys(&mut invocation);
        invocation
            .arg(&record.account)
            .arg(&record.stream_id)
            .arg(record.id.to_string())
            .arg(record.created_at_ms)
            .arg(record.ttl_ms);
        self.origin_and_channel(&mut invocation);
        let value = self.run(&invocation).await?;
        let (kind, _, expired) = reply("adopt", &value)?;
        self.publish_local(expired);
        match kind.as_str() {
            "adopted" | "present" => Ok(true),
            "taken" => Ok(false),
            _ => Err(malformed("adopt", &value)),
        }
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
            Ok(Ok(_)) if self.inner.clock.is_none() => {
                let connection = self.connection().await?;
                self.measure_offset(&connection).await
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(StoreError::TimedOut(format!(
                "Redis did not answer PING within {:?}",
                self.inner.timeout
            ))),
        }
    }

    async fn list_all(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<SessionPage, StoreError> {
        let mut ids: Vec<SessionId> = self
            .scan_session_ids()
            .await?
            .into_iter()
            .filter(|id| after.is_none_or(|a| *id > a))
            .collect();
        ids.sort();
        ids.dedup();
        let now = self.inner.clock.as_ref().map_or_else(
            || chrono::Utc::now().timestamp_millis(),
            |clock| clock.now_ms(),
        );
        let mut page = SessionPage::default();
        for (index, id) in ids.iter().enumerate() {
            if page.sessions.len() == limit {
                page.next_after = index.checked_sub(1).map(|i| ids[i]);
                break;
            }
            // Cut (or gone since the scan) sessions are skipped: the page lists live ones.
            if let Some(record) = self.get(*id).await?
                && record.is_active_at(now)
            {
                page.sessions.push(record);
            }
        }
        Ok(page)
    }

    async fn active_sessions(&self) -> Result<Option<u64>, StoreError> {
        // A fleet-wide count would need a global key outside every account's slot; the
        // per-account counts are what admission relies on.
        Ok(None)
    }

    async fn check_config(&self) -> Result<(), String> {
        let connection = self.connection().await.map_err(|e| e.to_string())?;
        let get = async {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg("maxmemory-policy");
            match connection {
                Connection::Standalone(mut c) => cmd.query_async::<Value>(&mut c).await,
                // Every master: one evicting master loses the sessions of its slots.
                Connection::Cluster(mut c) => {
                    c.route_command(
                        cmd,
                        redis::cluster_routing::RoutingInfo::MultiNode((
                            redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                            None,
                        )),
                    )
                    .await
                }
            }
        };
        let reply = match tokio::time::timeout(self.inner.timeout, get).await {
            Ok(Ok(reply)) => reply,
            // Managed services may rename or forbid CONFIG: the operator vouches for it then
            // (documented); never blocks readiness on what cannot be read.
            Ok(Err(e))
                if matches!(e.code(), Some("NOPERM"))
                    || e.to_string().contains("unknown command") =>
            {
                tracing::warn!(error = %e, "cannot read maxmemory-policy; make sure it is noeviction");
                return Ok(());
            }
            // Slow is not down; the breaker and PING judge availability.
            Ok(Err(e)) if classify(&e).is_transient() => return Ok(()),
            Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(format!("cannot read maxmemory-policy: {}", classify(&e))),
        };
        let mut strings = Vec::new();
        flatten_strings(&reply, &mut strings);
        let policies = strings
            .windows(2)
            .filter(|w| w[0] == "maxmemory-policy")
            .map(|w| w[1].as_str());
        for policy in policies {
            eviction_problem(policy)?;
        }
        Ok(())
    }

    fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
    }

    fn background(&self, shutdown: CancellationToken) -> Option<BoxFuture<'static, ()>> {
        let listen = listen_for_revocations(self.inner.clone(), shutdown.clone());
        let discard = discard_abandoned(self.clone(), shutdown);
        Some(Box::pin(async move {
            futures::join!(listen, discard);
        }))
    }

    fn subscribed(&self) -> watch::Receiver<bool> {
        self.inner.subscribed.subscribe()
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
    fn session_keys_are_told_apart_from_account_keys() {
        let id = SessionId::for_account("123");
        assert_eq!(session_id_of_key(&session_key(id)), Some(id));
        let account = AccountKeys::new("123");
        assert_eq!(
            session_id_of_key(&format!("{}s:{id}", account.account_prefix)),
            None
        );
        assert_eq!(session_id_of_key("sg:{0000}:s:zz"), None);
        let nodes = "a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
                     b2 127.0.0.1:7002@17002 slave a1 0 0 1 connected\n\
                     c3 127.0.0.1:7003@17003 master,fail - 0 0 3 connected\n";
        assert_eq!(cluster_masters(nodes), [("127.0.0.1".to_string(), 7001)]);
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
    fn deadlines_on_the_redis_clock_are_early_by_the_uncertainty() {
        // Redis is 5 s ahead; TIME asked at 1000, answered at 6003 (Redis), received at 1006.
        let offset = ClockOffset::measure(1_000, 6_003, 1_006);
        assert_eq!(offset.offset_ms, 5_000);
        assert_eq!(offset.uncertainty_ms, 4);
        // A call started at 2000 that gives up after 100 ms: Redis must refuse after 7096.
        assert_eq!(offset.deadline(2_000, 100), 7_096);
    }

    #[test]
    fn only_noeviction_keeps_sessions() {
        assert_eq!(eviction_problem("noeviction"), Ok(()));
        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "volatile-ttl",
            "allkeys-random",
        ] {
            let problem = eviction_problem(policy).unwrap_err();
            assert!(
                problem.contains(policy) && problem.contains("noeviction"),
                "{problem}"
            );
        }
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(redact_url("redis://u:p@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        let cluster = RedisTarget::parse("redis-cluster://:pw@a:1,b:2").unwrap();
        assert_eq!(
            cluster.to_string(),
            "cluster redis://***@a:1,redis://***@b:2"
        );
        assert!(!format!("{cluster}").contains("pw"));
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
