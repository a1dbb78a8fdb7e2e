//! The Redis store: sessions shared by any number of sidecars, on Redis standalone or Cluster.
//!
//! Each operation is one Lua function (see `lua/`, which documents the key layout, KEYS and ARGV),
//! so every decision is one round trip and atomic per account. The functions form one Redis
//! function library, named by a hash of its code, loaded once (`FUNCTION LOAD`, on every master
//! of a Cluster) and called with `FCALL`; it is loaded again when Redis answers that a function
//! is missing (after a restart without persistence or `FUNCTION FLUSH`). Unlike a script sent
//! by SHA, a library defines its helpers once at load, not on every call. Time is the
//! Redis server's clock. Cuts are published on a channel that every sidecar subscribes to, so each
//! learns of evictions and kicks made elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, RedisError, Value};
use tokio::sync::{OnceCell, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{
    HeartbeatOutcome, KickOutcome, OpenOutcome, OpenRequest, SessionPage, SessionStore, StoreError,
    Touched,
};
use crate::admission::OverLimit;
use crate::clock::Clock;
use crate::media::{MAX_NETWORKS_KEPT, NetworkKey, StreamClaim, StreamHolder};
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
    /// A master and its replicas watched by Redis Sentinel: the master is asked of the
    /// sentinels, and asked again when it stops answering (failover).
    Sentinel(SentinelTarget),
}

/// A `redis-sentinel://[USER:PASSWORD@]MASTER@HOST:PORT[,HOST:PORT...][/DB]` store.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// The master's name in the sentinels' configuration.
    pub master: String,
    /// The sentinels (`HOST`, `PORT`).
    pub sentinels: Vec<(String, u16)>,
    /// User name for the Redis servers (not the sentinels).
    pub username: Option<String>,
    /// Password for the Redis servers (not the sentinels).
    pub password: Option<String>,
    /// Database number on the master.
    pub db: i64,
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelTarget")
            .field("master", &self.master)
            .field("sentinels", &self.sentinels)
            .field("username", &self.username.as_ref().map(|_| "***"))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

impl SentinelTarget {
    /// Parses what follows `redis-sentinel://`.
    fn parse(rest: &str) -> Result<Self, String> {
        let usage =
            "expected redis-sentinel://[USER:PASSWORD@]MASTER@HOST:PORT[,HOST:PORT...][/DB]";
        let (before, hosts_and_db) = rest
            .rsplit_once('@')
            .ok_or_else(|| format!("{usage}: the master name is missing"))?;
        // The master name never holds '@'; a password may.
        let (credentials, master) = match before.rsplit_once('@') {
            Some((credentials, master)) => (Some(credentials), master),
            None => (None, before),
        };
        if master.is_empty() {
            return Err(format!("{usage}: the master name is empty"));
        }
        let (username, password) = match credentials {
            None => (None, None),
            Some(credentials) => {
                let (user, password) = credentials.split_once(':').unwrap_or(("", credentials));
                let decode = |v: &str| {
                    percent_decode(v).ok_or_else(|| format!("{usage}: bad percent-encoding"))
                };
                (
                    (!user.is_empty()).then(|| decode(user)).transpose()?,
                    (!password.is_empty())
                        .then(|| decode(password))
                        .transpose()?,
                )
            }
        };
        let (hosts, db) = match hosts_and_db.split_once('/') {
            Some((hosts, "")) => (hosts, 0),
            Some((hosts, db)) => (
                hosts,
                db.parse::<i64>()
                    .ok()
                    .filter(|db| *db >= 0)
                    .ok_or_else(|| format!("{usage}: database {db:?} is not a number"))?,
            ),
            None => (hosts_and_db, 0),
        };
        let sentinels = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                let (host, port) = h
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{usage}: sentinel {h:?} has no port"))?;
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{usage}: sentinel {h:?} has a bad port"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(format!("{usage}: sentinel {h:?} has no host"));
                }
                Ok((host.to_string(), port))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if sentinels.is_empty() {
            return Err(format!("{usage}: at least one sentinel is needed"));
        }
        Ok(Self {
            master: master.to_string(),
            sentinels,
            username,
            password,
            db,
        })
    }

    /// A client that asks the sentinels for the current master.
    fn client(&self) -> redis::RedisResult<SentinelClient> {
        let addrs = self
            .sentinels
            .iter()
            .map(|(host, port)| redis::ConnectionAddr::Tcp(host.clone(), *port));
        let mut builder =
            SentinelClientBuilder::new(addrs, &self.master, SentinelServerType::Master)?
                .set_client_to_redis_db(self.db);
        if let Some(username) = &self.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = &self.password {
            builder = builder.set_client_to_redis_password(password);
        }
        builder.build()
    }
}

impl SentinelTarget {
    /// `redis://[USER:PASSWORD@]HOST:PORT/DB` of the current master, as the sentinels name it
    /// (checked to be a master).
    pub async fn master_url(&self) -> Result<String, String> {
        let mut client = self.client().map_err(|e| e.to_string())?;
        let master = tokio::time::timeout(Duration::from_secs(2), client.async_get_client())
            .await
            .map_err(|_| format!("Redis Sentinel master {:?}: timed out", self.master))?
            .map_err(|e| format!("Redis Sentinel master {:?}: {e}", self.master))?;
        let address = master.get_connection_info().addr().to_string();
        let encode = |v: &str| -> String {
            v.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        let credentials = match (&self.username, &self.password) {
            (None, None) => String::new(),
            (user, password) => format!(
                "{}:{}@",
                encode(user.as_deref().unwrap_or("")),
                encode(password.as_deref().unwrap_or(""))
            ),
        };
        Ok(format!("redis://{credentials}{address}/{}", self.db))
    }
}

/// `%XX` escapes decoded (credentials in URLs), or `None` if malformed.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl RedisTarget {
    /// Parses a `--store` value: `redis://…` or `redis-cluster://HOST:PORT[,HOST:PORT…]`
    /// (credentials, if any, before the first host apply to every node).
    pub fn parse(value: &str) -> Result<Self, String> {
        if let Some(rest) = value.strip_prefix("redis-sentinel://") {
            return SentinelTarget::parse(rest).map(Self::Sentinel);
        }
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
        Err(
            "expected redis://HOST:PORT[/DB], redis-cluster://HOST:PORT[,HOST:PORT...] or \
             redis-sentinel://MASTER@HOST:PORT[,HOST:PORT...][/DB]"
                .into(),
        )
    }

    /// The servers to subscribe on (none for Sentinel: the master is asked of the sentinels).
    fn urls(&self) -> Vec<String> {
        match self {
            Self::Standalone(url) => vec![url.clone()],
            Self::Cluster(nodes) => nodes.clone(),
            Self::Sentinel(_) => Vec::new(),
        }
    }
}

/// `url` with any password (and user name) replaced by `***`, for logs, errors and bodies.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        // The master's name is no secret; credentials, if any, come before it.
        Some((before, hosts)) if scheme == "redis-sentinel" => match before.rsplit_once('@') {
            Some((_, master)) => format!("{scheme}://***@{master}@{hosts}"),
            None => url.to_string(),
        },
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
            Self::Sentinel(target) => {
                let sentinels: Vec<String> = target
                    .sentinels
                    .iter()
                    .map(|(host, port)| format!("{host}:{port}"))
                    .collect();
                write!(
                    f,
                    "sentinel master {} via {} db {}",
                    target.master,
                    sentinels.join(","),
                    target.db
                )
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
    Sentinel(MasterConnection),
}

/// The connection to the master the sentinels named.
#[derive(Clone)]
struct MasterConnection {
    connection: MultiplexedConnection,
    /// `HOST:PORT` of the master.
    address: String,
    /// Which connection this is: a failure forgets only the connection it happened on.
    generation: u64,
}

/// The link to a Sentinel-watched master: asked of the sentinels on first use, and again when
/// the connection fails or the sentinels name another master (checked every
/// [`SENTINEL_WATCH_INTERVAL`] while the background work runs).
struct SentinelLink {
    target: SentinelTarget,
    client: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<MasterConnection>>,
    generations: std::sync::atomic::AtomicU64,
    /// The master's address as last connected to: the revocation subscription follows it.
    master: watch::Sender<String>,
}

/// How often the sentinels are asked whether the master changed.
const SENTINEL_WATCH_INTERVAL: Duration = Duration::from_millis(500);

impl SentinelLink {
    fn current(&self) -> Option<MasterConnection> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets connection `generation` (it failed, or the master moved): the next call asks
    /// the sentinels again.
    fn forget(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            *current = None;
        }
    }

    /// The connection to the master, asking the sentinels for it if there is none.
    async fn connect(&self, timeout: Duration) -> Result<MasterConnection, StoreError> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        // One discovery at a time: the lock is held while asking.
        let mut client = self.client.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let connect_timeout = timeout.max(Duration::from_secs(1));
        let discover = async {
            let master = client.async_get_client().await?;
            let address = master.get_connection_info().addr().to_string();
            let config = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(connect_timeout));
            let connection = master
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            Ok::<_, RedisError>((connection, address))
        };
        let (connection, address) = match tokio::time::timeout(connect_timeout, discover).await {
            Ok(Ok(found)) => found,
            // Whatever the sentinels said (no master known, master not answering ROLE as a
            // master yet), the store cannot be asked now: transient.
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "Redis Sentinel master {:?}: {e}",
                    self.target.master
                )));
            }
            Err(_) => {
                return Err(StoreError::TimedOut(format!(
                    "Redis Sentinel master {:?}: discovery timed out",
                    self.target.master
                )));
            }
        };
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let connected = MasterConnection {
            connection,
            address: address.clone(),
            generation,
        };
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(connected.clone());
        tracing::info!(master = %self.target.master, %address, "connected to the Redis master named by Sentinel");
        self.master.send_replace(address);
        Ok(connected)
    }

    /// The master's `HOST:PORT` according to the first sentinel that answers.
    async fn ask_master_address(&self, timeout: Duration) -> Option<String> {
        for (host, port) in &self.target.sentinels {
            let ask = async {
                let client = redis::Client::open(redis::ConnectionAddr::Tcp(host.clone(), *port))?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.target.master)
                    .query_async::<Option<(String, u16)>>(&mut connection)
                    .await
            };
            if let Ok(Ok(Some((host, port)))) = tokio::time::timeout(timeout, ask).await {
                return Some(format!("{host}:{port}"));
            }
        }
        None
    }
}

/// Asks the sentinels every [`SENTINEL_WATCH_INTERVAL`] which server is the master, and drops
/// the connection to a former one: a master that was stopped (not closed) keeps its clients'
/// connections open, so failures alone would not notice the failover.
async fn watch_sentinel_master(inner: Arc<Inner>, shutdown: CancellationToken) {
    let Some(link) = &inner.sentinel else {
        return;
    };
    let mut tick = tokio::time::interval(SENTINEL_WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(current) = link.current() else {
            continue;
        };
        let timeout = inner.timeout.max(Duration::from_millis(500));
        if let Some(address) = link.ask_master_address(timeout).await
            && address != current.address
        {
            tracing::warn!(master = %link.target.master, from = %current.address, to = %address,
                "Sentinel names a new master; reconnecting");
            link.forget(current.generation);
        }
    }
}

/// The store's operations, each a function of one Redis function library.
#[derive(Clone, Copy, Debug)]
enum Op {
    Open,
    Heartbeat,
    End,
    List,
    Get,
    Kick,
    Touch,
    Adopt,
    Discard,
    Network,
    Claim,
    Release,
}

impl Op {
    const ALL: [Op; 12] = [
        Op::Open,
        Op::Heartbeat,
        Op::End,
        Op::List,
        Op::Get,
        Op::Kick,
        Op::Touch,
        Op::Adopt,
        Op::Discard,
        Op::Network,
        Op::Claim,
        Op::Release,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Heartbeat => "heartbeat",
            Op::End => "end",
            Op::List => "list",
            Op::Get => "get",
            Op::Kick => "kick",
            Op::Touch => "touch",
            Op::Adopt => "adopt",
            Op::Discard => "discard",
            Op::Network => "network",
            Op::Claim => "claim",
            Op::Release => "release",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Op::Open => include_str!("lua/open.lua"),
            Op::Heartbeat => include_str!("lua/heartbeat.lua"),
            Op::End => include_str!("lua/end.lua"),
            Op::List => include_str!("lua/list.lua"),
            Op::Get => include_str!("lua/get.lua"),
            Op::Kick => include_str!("lua/kick.lua"),
            Op::Touch => include_str!("lua/touch.lua"),
            Op::Adopt => include_str!("lua/adopt.lua"),
            Op::Discard => include_str!("lua/discard.lua"),
            Op::Network => include_str!("lua/network.lua"),
            Op::Claim => include_str!("lua/claim.lua"),
            Op::Release => include_str!("lua/release.lua"),
        }
    }
}

/// The function library: `lua/common.lua` once, then one function per [`Op`] wrapping its file.
pub struct Library {
    /// What `FUNCTION LOAD` is given.
    pub code: String,
    /// The function names, in [`Op::ALL`] order.
    functions: Vec<String>,
}

impl Library {
    /// The library of this build. Its name and its functions' names carry a hash of the code,
    /// so sidecars of different versions sharing one Redis each call their own functions.
    pub fn new() -> Self {
        use sha2::{Digest, Sha256};
        let common = include_str!("lua/common.lua");
        let mut hasher = Sha256::new();
        hasher.update(common);
        for op in Op::ALL {
            hasher.update(op.body());
        }
        let version: String = hasher.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // A library registers functions without flags: Redis then treats them as writing and
        // refuses them while it is out of memory (OOM), before they run.
        let mut code = format!("#!lua name=streamgate_{version}\n{common}\n");
        let mut functions = Vec::new();
        for op in Op::ALL {
            let name = format!("sg_{}_{version}", op.name());
            code.push_str(&format!(
                "redis.register_function('{name}', function(keys, args)\nKEYS, ARGV = keys, args\n{}\nend)\n",
                op.body()
            ));
            functions.push(name);
        }
        Self { code, functions }
    }

    /// The name of `op`'s function.
    fn function(&self, op: Op) -> &str {
        &self.functions[op as usize]
    }

    /// An `FCALL` of `op` on the hash `key`.
    fn call(&self, op: Op, key: String) -> Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(self.function(op)).arg(1).arg(key);
        cmd
    }
}

impl Default for Library {
    fn default() -> Self {
        Self::new()
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
    /// For a Sentinel target: the master, which may change (not kept in `connection`).
    sentinel: Option<SentinelLink>,
    /// Replicas that must acknowledge each store-changing decision (WAIT) before it is answered.
    wait_replicas: u32,
    library: Library,
    /// Identifies this process's notices, so it does not count its own cuts twice.
    origin: String,
    revocations: broadcast::Sender<Revocation>,
    /// Whether the revocation subscription is established now.
    subscribed: watch::Sender<bool>,
    /// Tests only: "now" for the scripts instead of the Redis server's clock.
    clock: Option<Arc<dyn Clock>>,
    /// The Redis clock against this process's, for deadlines on the store's clock.
    offset: std::sync::Mutex<Option<ClockOffset>>,
    /// Opens whose caller gave up waiting (account, stream, new session id, when to stop
    /// trying): the script may have run and admitted a session nobody was given; the
    /// background work discards it, unless an admission without the store claims its id
    /// ([`SessionStore::take_abandoned`]). Bounded by [`ABANDONED_CAPACITY`].
    abandoned: std::sync::Mutex<Vec<(String, String, SessionId, Instant)>>,
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

/// The key of the hash holding the sessions of the accounts with `tag` (see `lua/common.lua`);
/// the braces make it the Redis Cluster hash tag.
pub fn account_key(tag: u32) -> String {
    format!("sg{{{tag:08x}}}")
}

/// The 16 random bytes of a session id, as the store keys sessions by them.
fn id_bytes(id: SessionId) -> [u8; 16] {
    id.random.to_be_bytes()
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
    /// The sessions (active and tombstones) of every account hash, by SCAN on the server or on
    /// every master of a cluster, each hash read with HGETALL.
    async fn scan_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let connection = self.connection().await?;
        let scan = async {
            let mut sessions = Vec::new();
            match connection {
                Connection::Standalone(c) => {
                    scan_node(&mut sessions, |cmd| {
                        let mut c = c.clone();
                        async move { cmd.query_async::<Value>(&mut c).await }
                    })
                    .await?;
                }
                Connection::Sentinel(m) => {
                    scan_node(&mut sessions, |cmd| {
                        let mut c = m.connection.clone();
                        async move { cmd.query_async::<Value>(&mut c).await }
                    })
                    .await?;
                }
                Connection::Cluster(c) => {
                    let nodes: String = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query_async(&mut c.clone())
                        .await?;
                    for (host, port) in cluster_masters(&nodes) {
                        scan_node(&mut sessions, |cmd| {
                            let mut c = c.clone();
                            let host = host.clone();
                            // SCAN and HGETALL of keys found there both go to that master.
                            async move {
                                c.route_command(
                                    cmd,
                                    redis::cluster_routing::RoutingInfo::SingleNode(
                                        redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                                            host,
                                            port,
                                        },
                                    ),
                                )
                                .await
                            }
                        })
                        .await?;
                    }
                }
            }
            Ok::<_, RedisError>(sessions)
        };
        // A full walk takes longer than one call: allow it ten operation timeouts.
        let budget = self.inner.timeout * 10;
        match tokio::time::timeout(budget, scan).await {
            Ok(Ok(sessions)) => Ok(sessions),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(StoreError::TimedOut(format!(
                "Redis did not finish scanning account hashes within {budget:?}"
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

    /// Makes every store-changing decision wait until `replicas` replicas acknowledged it
    /// (Redis WAIT, bounded by the store timeout) before it is answered; a decision that fewer
    /// replicas acknowledged in time stays in the store but is answered
    /// [`StoreError::NotReplicated`] (503 with Retry-After), and an open's new session is
    /// discarded. Without it an asynchronous failover may lose the decisions of the last moments
    /// before it (see BENCHMARKS.md). Call before first use.
    pub fn wait_for_replicas(mut self, replicas: u32) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("wait_for_replicas is called before the store is shared")
            .wait_replicas = replicas;
        self
    }

    fn build(target: RedisTarget, timeout: Duration, clock: Option<Arc<dyn Clock>>) -> Self {
        let (revocations, _) = broadcast::channel(REVOCATION_BUFFER);
        let sentinel = match &target {
            RedisTarget::Sentinel(sentinel) => Some(SentinelLink {
                target: sentinel.clone(),
                // Parsing validated the target; building only copies it.
                client: tokio::sync::Mutex::new(
                    sentinel.client().expect("a parsed Sentinel target builds"),
                ),
                current: std::sync::Mutex::new(None),
                generations: std::sync::atomic::AtomicU64::new(0),
                master: watch::Sender::new(String::new()),
            }),
            _ => None,
        };
        Self {
            inner: Arc::new(Inner {
                target,
                timeout,
                connection: OnceCell::new(),
                sentinel,
                wait_replicas: 0,
                library: Library::new(),
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
                Connection::Sentinel(mut m) => {
                    cmd.query_async::<(i64, i64)>(&mut m.connection).await
                }
            }
        };
        let (secs, micros) = match tokio::time::timeout(self.inner.timeout, time).await {
            Ok(Ok(time)) => time,
            Ok(Err(e)) => return Err(self.failed(connection, &e)),
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
        if let Some(link) = &self.inner.sentinel {
            return link.connect(timeout).await.map(Connection::Sentinel);
        }
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
                        RedisTarget::Sentinel(_) => unreachable!("connected by SentinelLink"),
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

    async fn run(&self, call: &Cmd) -> Result<Value, StoreError> {
        let connection = self.connection().await?;
        self.run_on(&connection, call).await
    }

    /// Runs a function that changes the store, then waits for `--store-wait-replicas` replicas
    /// to acknowledge it, on the same connection (WAIT counts that connection's writes).
    async fn run_changing(&self, call: &Cmd) -> Result<Value, StoreError> {
        let connection = self.connection().await?;
        let value = self.run_on(&connection, call).await?;
        self.replicated(&connection).await?;
        Ok(value)
    }

    /// Waits until `wait_replicas` replicas acknowledged this connection's writes, at most the
    /// store timeout. Nothing to do without `--store-wait-replicas`.
    async fn replicated(&self, connection: &Connection) -> Result<(), StoreError> {
        let wanted = self.inner.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let timeout = self.inner.timeout;
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(wanted).arg(timeout.as_millis() as u64);
        let call = async {
            match connection.clone() {
                Connection::Standalone(mut c) => cmd.query_async::<i64>(&mut c).await,
                // Routed to every master, the fewest acknowledgements counting: conservative.
                Connection::Cluster(mut c) => cmd.query_async::<i64>(&mut c).await,
                Connection::Sentinel(mut m) => cmd.query_async::<i64>(&mut m.connection).await,
            }
        };
        // WAIT answers by itself after `timeout`; the margin is for the round trip.
        match tokio::time::timeout(timeout * 2, call).await {
            Ok(Ok(acknowledged)) if acknowledged >= i64::from(wanted) => Ok(()),
            Ok(Ok(acknowledged)) => Err(StoreError::NotReplicated(format!(
                "{acknowledged} of {wanted} Redis replicas acknowledged within {timeout:?}"
            ))),
            Ok(Err(e)) => Err(self.failed(connection, &e)),
            Err(_) => Err(StoreError::TimedOut(format!(
                "Redis did not answer WAIT within {:?}",
                timeout * 2
            ))),
        }
    }

    /// Classifies `error` from `connection`; a Sentinel master connection that failed is
    /// forgotten, so the next call asks the sentinels again.
    fn failed(&self, connection: &Connection, error: &RedisError) -> StoreError {
        let classified = classify(error);
        if let (Connection::Sentinel(master), Some(link), StoreError::Unavailable(_)) =
            (connection, &self.inner.sentinel, &classified)
        {
            link.forget(master.generation);
        }
        classified
    }

    async fn run_on(&self, connection: &Connection, call: &Cmd) -> Result<Value, StoreError> {
        let call = async {
            match connection.clone() {
                Connection::Standalone(mut c) => fcall(call, &self.inner.library, &mut c).await,
                Connection::Cluster(mut c) => fcall(call, &self.inner.library, &mut c).await,
                Connection::Sentinel(mut m) => {
                    fcall(call, &self.inner.library, &mut m.connection).await
                }
            }
        };
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failed(connection, &e)),
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

    /// Runs a function that takes a session id (`get`, `kick`): KEYS the hash of the id's tag,
    /// ARGV the id's random bytes, origin and channel. A call that `changes` the store waits
    /// for replicas like [`Self::run_changing`].
    async fn run_for_session(
        &self,
        op: Op,
        id: SessionId,
        changes: bool,
    ) -> Result<Value, StoreError> {
        self.run_for_session_with(op, id, changes, None).await
    }

    /// [`Self::run_for_session`] with one more ARGV after the id (the revocation's reason).
    async fn run_for_session_with(
        &self,
        op: Op,
        id: SessionId,
        changes: bool,
        extra: Option<&str>,
    ) -> Result<Value, StoreError> {
        let mut call = self.inner.library.call(op, account_key(id.tag));
        call.arg(&id_bytes(id)[..]);
        if let Some(extra) = extra {
            call.arg(extra);
        }
        self.origin_and_channel(&mut call);
        if changes {
            self.run_changing(&call).await
        } else {
            self.run(&call).await
        }
    }

    /// A call of `op` on `account`'s hash, its first ARGV the account.
    fn account_call(&self, op: Op, account: &str) -> Cmd {
        let mut call = self
            .inner
            .library
            .call(op, account_key(account_tag(account)));
        call.arg(account);
        call
    }

    /// The last ARGV of every function: origin and channel, then the test clock if any.
    fn origin_and_channel(&self, call: &mut Cmd) {
        call.arg(&self.inner.origin).arg(REVOCATION_CHANNEL);
        if let Some(clock) = &self.inner.clock {
            call.arg("__now__").arg(clock.now_ms());
        }
    }
}

/// SCANs one node to the end, reading every account hash found there into `sessions`; `send`
/// runs one command on that node.
async fn scan_node<F, Fut>(sessions: &mut Vec<SessionRecord>, send: F) -> Result<(), RedisError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: std::future::Future<Output = Result<Value, RedisError>>,
{
    let mut cursor = 0u64;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(ACCOUNT_KEY_PATTERN)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("hash");
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(send(cmd).await?)?;
        for key in keys {
            let mut read = redis::cmd("HGETALL");
            read.arg(key);
            let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::from_redis_value(send(read).await?)?;
            if let Some((_, found)) = decode_account_hash(&fields) {
                sessions.extend(found);
            }
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Sends `call`; loads the library and sends it once more if Redis does not know the function
/// (a restart without persistence, `FUNCTION FLUSH`, a new Cluster master).
async fn fcall<C>(call: &Cmd, library: &Library, connection: &mut C) -> redis::RedisResult<Value>
where
    C: redis::aio::ConnectionLike + Send,
{
    match call.query_async(connection).await {
        Err(e) if e.to_string().contains("Function not found") => {
            let mut load = redis::cmd("FUNCTION");
            load.arg("LOAD").arg("REPLACE").arg(&library.code);
            // On a Cluster the client sends FUNCTION LOAD to every master.
            load.query_async::<Value>(connection).await?;
            call.query_async(connection).await
        }
        other => other,
    }
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
    // Under Sentinel the subscription is on the master the data connection uses, and is made
    // again when that connection moves to another master.
    let mut master_moved = inner.sentinel.as_ref().map(|link| link.master.subscribe());
    while !shutdown.is_cancelled() {
        let url = match &inner.sentinel {
            Some(link) => match link.connect(inner.timeout).await {
                Ok(master) => format!("redis://{}", master.address),
                Err(_) => String::new(),
            },
            None => {
                next_url += 1;
                urls[(next_url - 1) % urls.len()].clone()
            }
        };
        let url = &url;
        if let Some(moved) = &mut master_moved {
            moved.mark_unchanged();
        }
        let subscribe = async {
            let client = match &inner.sentinel {
                // The master's own connection settings (credentials, database).
                Some(link) => link.client.lock().await.async_get_client().await?,
                None => redis::Client::open(url.as_str())?,
            };
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
            let master_moved = async {
                match &mut master_moved {
                    Some(moved) => {
                        let _ = moved.changed().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let message = tokio::select! {
                () = shutdown.cancelled() => break,
                () = master_moved => {
                    tracing::info!("the Redis master changed; resubscribing to revocations there");
                    break;
                }
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
        let lock = || {
            store
                .inner
                .abandoned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        // Each stays listed until discarded, so an admission without the store can still claim
        // it (take_abandoned) right up to its discard.
        let pending: Vec<(String, SessionId)> = {
            let mut abandoned = lock();
            let now = Instant::now();
            abandoned.retain(|(_, _, _, give_up)| now < *give_up);
            abandoned
                .iter()
                .map(|(account, _, id, _)| (account.clone(), *id))
                .collect()
        };
        for (account, id) in pending {
            if !lock().iter().any(|(_, _, listed, _)| *listed == id) {
                continue; // claimed meanwhile
            }
            match store.discard(&account, id).await {
                Ok(discarded) => {
                    lock().retain(|(_, _, listed, _)| *listed != id);
                    if discarded {
                        tracing::info!(account = %crate::session::fingerprint(&account),
                            "discarded a session admitted after its caller gave up");
                    }
                }
                // Tried again on the next tick; the rest would most likely fail alike.
                Err(_) => break,
            }
        }
    }
}

impl RedisStore {
    /// Discards session `id` of `account` if an abandoned open admitted it and nobody renewed it
    /// since. `true` if it was discarded.
    async fn discard(&self, account: &str, id: SessionId) -> Result<bool, StoreError> {
        let mut call = self.account_call(Op::Discard, account);
        call.arg(&id_bytes(id)[..]);
        self.origin_and_channel(&mut call);
        // Not waited for by replicas: a discard lost in a failover brings back only a session
        // nobody holds (which expires after one TTL), and waiting would stall the discards
        // while replicas lag.
        let value = self.run(&call).await?;
        let (kind, _, expired) = reply("discard", &value, |_| 0)?;
        self.publish_local(expired);
        match kind.as_str() {
            "discarded" => Ok(true),
            "kept" | "absent" => Ok(false),
            _ => Err(malformed("discard", &value)),
        }
    }
}

/// Glob matching the store's account hashes (braces are literal in Redis globs).
pub const ACCOUNT_KEY_PATTERN: &str = "sg{*";

/// The account and the sessions (active ones and tombstones) of one account hash, from its
/// `HGETALL` (see `lua/common.lua` for the encoding); `None` for a hash of another shape. For the
/// live-session count, tools and tests.
pub fn decode_account_hash(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<(String, Vec<SessionRecord>)> {
    let account = fields.iter().find(|(f, _)| f == b"@")?;
    let account = String::from_utf8(account.1.clone()).ok()?;
    let tag = account_tag(&account);
    let mut sessions = Vec::new();
    for (field, value) in fields {
        let Ok(random) = <[u8; 16]>::try_from(field.as_slice()) else {
            continue;
        };
        // An ended session's marker: no session.
        if value.first() == Some(&b'n') {
            continue;
        }
        if value.len() < 21 {
            return None;
        }
        let int = |range: std::ops::Range<usize>| {
            let bytes = &value[range];
            let mut n: i64 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
            for b in bytes {
                n = (n << 8) | i64::from(*b);
            }
            n
        };
        let uint = |range: std::ops::Range<usize>| {
            value[range]
                .iter()
                .fold(0i64, |n, b| (n << 8) | i64::from(*b))
        };
        let (state, reason) = match value[0] {
            b'a' => (SessionState::Active, None),
            b'e' => (SessionState::Revoked, Some(EndReason::Evicted)),
            b'k' => (SessionState::Revoked, Some(EndReason::Kicked)),
            b'd' => (SessionState::Revoked, Some(EndReason::Denied)),
            b's' => (SessionState::Revoked, Some(EndReason::Shared)),
            b'x' => (SessionState::Expired, Some(EndReason::Expired)),
            _ => return None,
        };
        sessions.push(SessionRecord {
            id: SessionId {
                random: u128::from_be_bytes(random),
                tag,
            },
            account: account.clone(),
            stream_id: String::from_utf8(value[21..].to_vec()).ok()?,
            state,
            reason,
            created_at_ms: int(5..11),
            expires_at_ms: int(11..17),
            ttl_ms: uint(17..21),
        });
    }
    Some((account, sessions))
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
        "shared" => Some(EndReason::Shared),
        "denied" => Some(EndReason::Denied),
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

/// `{raw id, account, stream, state, reason, created, expires, ttl}` or nil.
fn session(value: &Value) -> Option<Option<SessionRecord>> {
    if matches!(value, Value::Nil) {
        return Some(None);
    }
    let [Value::BulkString(raw), fields @ ..] = items(value)? else {
        return None;
    };
    // Stored by its random bytes; the tag is the account's, as when it was made.
    let id = SessionId {
        random: u128::from_be_bytes(raw.as_slice().try_into().ok()?),
        tag: account_tag(&text(fields.first()?)?),
    };
    record_of(id, fields).map(Some)
}

/// Session `id` from `{account, stream, state, reason, created, expires, ttl}`.
fn record_of(id: SessionId, fields: &[Value]) -> Option<SessionRecord> {
    let [account, stream, state, reason, created, expires, ttl] = fields else {
        return None;
    };
    Some(SessionRecord {
        id,
        account: text(account)?,
        stream_id: text(stream)?,
        state: parse_state(&text(state)?)?,
        reason: parse_reason(&text(reason)?),
        created_at_ms: int(created)?,
        expires_at_ms: int(expires)?,
        ttl_ms: int(ttl)?,
    })
}

/// The id of a session of `account` from the raw bytes a function returned.
fn renewed_id(raw: &Value, account: &str) -> Option<SessionId> {
    let Value::BulkString(raw) = raw else {
        return None;
    };
    Some(SessionId {
        random: u128::from_be_bytes(raw.as_slice().try_into().ok()?),
        tag: account_tag(account),
    })
}

/// The caller's own session as an open or heartbeat renewed or admitted it: active, renewed at
/// the server's `now` for `ttl_ms`; the reply carries only what the caller does not know.
fn own_session(
    id: SessionId,
    account: &str,
    stream_id: &str,
    created: &Value,
    now: &Value,
    ttl_ms: i64,
) -> Option<SessionRecord> {
    Some(SessionRecord {
        id,
        account: account.to_string(),
        stream_id: stream_id.to_string(),
        state: SessionState::Active,
        reason: None,
        created_at_ms: int(created)?,
        expires_at_ms: int(now)? + ttl_ms,
        ttl_ms,
    })
}

fn sessions(value: &Value) -> Option<Vec<SessionRecord>> {
    items(value)?.iter().map(|v| session(v).flatten()).collect()
}

/// Splits a reply `{kind, fields..., [expired]}` into its kind, its `fields(kind)` fields and
/// the expired sessions: a trailing list, which the functions leave out when they expired none
/// (an empty list costs Redis about as much to send as several fields).
fn reply<'a>(
    what: &str,
    value: &'a Value,
    fields: impl Fn(&str) -> usize,
) -> Result<(String, &'a [Value], Vec<SessionRecord>), StoreError> {
    let bad = || malformed(what, value);
    let parts = items(value).ok_or_else(bad)?;
    let kind = parts.first().and_then(text).ok_or_else(bad)?;
    let (own, expired) = own_and_expired(&parts[1..], fields(&kind)).ok_or_else(bad)?;
    Ok((kind, own, expired))
}

/// Splits reply items into the call's own `own_len` items and the expired sessions of the
/// trailing list, which the functions send only when there are any.
fn own_and_expired(parts: &[Value], own_len: usize) -> Option<(&[Value], Vec<SessionRecord>)> {
    match parts {
        own if own.len() == own_len => Some((own, Vec::new())),
        [own @ .., expired] if own.len() == own_len => Some((own, sessions(expired)?)),
        _ => None,
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn open(&self, request: &OpenRequest<'_>) -> Result<OpenOutcome, StoreError> {
        let started = chrono::Utc::now().timestamp_millis();
        let id = SessionId::for_account(request.account);
        let mut call = self.account_call(Op::Open, request.account);
        call.arg(request.stream_id)
            .arg(&id_bytes(id)[..])
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
        call.arg(self.deadline(started));
        self.origin_and_channel(&mut call);
        let value = match self.run_changing(&call).await {
            Ok(value) => value,
            // Not replicated in time: the admission stays on the master but nobody is given
            // it; discarded like an open whose caller gave up.
            // Unavailable too: a connection lost after the call was sent may have carried it.
            Err(
                error @ (StoreError::TimedOut(_)
                | StoreError::NotReplicated(_)
                | StoreError::Unavailable(_)),
            ) => {
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
                abandoned.push((
                    request.account.to_string(),
                    request.stream_id.to_string(),
                    id,
                    give_up,
                ));
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let bad = || malformed("open", &value);
        if let Value::Int(_) = value {
            // The account's first session, admitted with our id at the time the reply is.
            return Ok(OpenOutcome::Admitted {
                session: own_session(
                    id,
                    request.account,
                    request.stream_id,
                    &value,
                    &value,
                    request.ttl_ms,
                )
                .ok_or_else(bad)?,
                evicted: Vec::new(),
                active: 1,
                dry_run: None,
            });
        }
        let (kind, fields, expired) = reply("open", &value, |kind| match kind {
            "renewed" | "admitted" => 4,
            "refused" => 2,
            _ => 1,
        })?;
        self.publish_local(expired);
        let count = fields.first().and_then(int).ok_or_else(bad)? as u32;
        let own = |id: SessionId, created: &Value, now: &Value| {
            own_session(
                id,
                request.account,
                request.stream_id,
                created,
                now,
                request.ttl_ms,
            )
        };
        let outcome = match (kind.as_str(), fields) {
            ("renewed", [_, existing, created, now]) => OpenOutcome::Renewed {
                session: own(
                    renewed_id(existing, request.account).ok_or_else(bad)?,
                    created,
                    now,
                )
                .ok_or_else(bad)?,
                active: count,
            },
            ("admitted", [_, now, evicted, dry_run]) => {
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
                    session: own(id, now, now).ok_or_else(bad)?,
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
        let mut call = self.account_call(Op::Heartbeat, account);
        call.arg(stream_id).arg(ttl_ms);
        self.origin_and_channel(&mut call);
        let value = self.run_changing(&call).await?;
        let bad = || malformed("heartbeat", &value);
        let (kind, fields, expired) = reply("heartbeat", &value, |kind| match kind {
            "renewed" => 4,
            _ => 2,
        })?;
        self.publish_local(expired);
        Ok(match (kind.as_str(), fields) {
            ("renewed", [count, id, created, now]) => HeartbeatOutcome::Renewed {
                session: own_session(
                    renewed_id(id, account).ok_or_else(bad)?,
                    account,
                    stream_id,
                    created,
                    now,
                    ttl_ms,
                )
                .ok_or_else(bad)?,
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
        let mut call = self.account_call(Op::End, account);
        call.arg(stream_id);
        self.origin_and_channel(&mut call);
        let value = self.run_changing(&call).await?;
        let bad = || malformed("end", &value);
        let (kind, fields, expired) = reply("end", &value, |kind| match kind {
            "ended" => 4,
            _ => 1,
        })?;
        self.publish_local(expired);
        match (kind.as_str(), fields) {
            // The session as it was, active: the reply carries what the caller does not know.
            ("ended", [id, created, expires, ttl]) => Ok(Some(SessionRecord {
                id: renewed_id(id, account).ok_or_else(bad)?,
                account: account.to_string(),
                stream_id: stream_id.to_string(),
                state: SessionState::Active,
                reason: None,
                created_at_ms: int(created).ok_or_else(bad)?,
                expires_at_ms: int(expires).ok_or_else(bad)?,
                ttl_ms: int(ttl).ok_or_else(bad)?,
            })),
            ("none", _) => Ok(None),
            _ => Err(bad()),
        }
    }

    async fn list(&self, account: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let mut call = self.account_call(Op::List, account);
        self.origin_and_channel(&mut call);
        let value = self.run(&call).await?;
        let parts = items(&value).ok_or_else(|| malformed("list", &value))?;
        let [active, expired] = parts else {
            return Err(malformed("list", &value));
        };
        self.publish_local(sessions(expired).ok_or_else(|| malformed("list", &value))?);
        sessions(active).ok_or_else(|| malformed("list", &value))
    }

    async fn get(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let value = self.run_for_session(Op::Get, id, false).await?;
        let parts = items(&value).ok_or_else(|| malformed("get", &value))?;
        let [found, expired] = parts else {
            return Err(malformed("get", &value));
        };
        self.publish_local(sessions(expired).ok_or_else(|| malformed("get", &value))?);
        session(found).ok_or_else(|| malformed("get", &value))
    }

    async fn revoke(&self, id: SessionId, reason: EndReason) -> Result<KickOutcome, StoreError> {
        let value = self
            .run_for_session_with(Op::Kick, id, true, Some(reason.as_str()))
            .await?;
        let bad = || malformed("kick", &value);
        let (kind, fields, expired) = reply("kick", &value, |_| 1)?;
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
        let mut call = self.inner.library.call(Op::Touch, account_key(id.tag));
        call.arg(&id_bytes(id)[..]).arg(ttl_ms).arg(renew_after_ms);
        self.origin_and_channel(&mut call);
        let connection = self.connection().await?;
        let value = self.run_on(&connection, &call).await?;
        let bad = || malformed("touch", &value);
        // `{renewed, account, stream, state, reason, created, expires, ttl}` or `{0, nil}`, then
        // the expired sessions, only when there are any.
        let parts = items(&value).ok_or_else(bad)?;
        let own_len = if matches!(parts.get(1), Some(Value::Nil)) {
            2
        } else {
            8
        };
        let (answer, expired) = own_and_expired(parts, own_len).ok_or_else(bad)?;
        self.publish_local(expired);
        let [renewed, fields @ ..] = answer else {
            return Err(bad());
        };
        if let [Value::Nil] = fields {
            return Ok(None);
        }
        let session = record_of(id, fields).ok_or_else(bad)?;
        let renewed = int(renewed).ok_or_else(bad)? == 1;
        // Only a renewal changed the store.
        if renewed {
            self.replicated(&connection).await?;
        }
        Ok(Some(Touched { session, renewed }))
    }

    async fn note_network(
        &self,
        id: SessionId,
        network: NetworkKey,
        window_ms: i64,
        keep: u32,
    ) -> Result<Option<u32>, StoreError> {
        let mut call = self.inner.library.call(Op::Network, account_key(id.tag));
        call.arg(&id_bytes(id)[..])
            .arg(&network[..])
            .arg(window_ms)
            .arg(keep.clamp(1, MAX_NETWORKS_KEPT));
        self.origin_and_channel(&mut call);
        // Soft state: not waited for by replicas (see the trait).
        let value = self.run(&call).await?;
        let bad = || malformed("network", &value);
        let [networks, expired] = items(&value).ok_or_else(bad)? else {
            return Err(bad());
        };
        self.publish_local(sessions(expired).ok_or_else(bad)?);
        match networks {
            Value::Nil => Ok(None),
            other => Ok(Some(
                int(other)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)?,
            )),
        }
    }

    async fn claim_stream(
        &self,
        id: SessionId,
        holder: StreamHolder,
        max: u32,
        lease_ms: i64,
    ) -> Result<StreamClaim, StoreError> {
        let mut call = self.inner.library.call(Op::Claim, account_key(id.tag));
        call.arg(&id_bytes(id)[..])
            .arg(&holder[..])
            .arg(max)
            .arg(lease_ms);
        self.origin_and_channel(&mut call);
        let value = self.run(&call).await?;
        let (kind, fields, expired) = reply("claim", &value, |_| 1)?;
        self.publish_local(expired);
        let streams = fields
            .first()
            .and_then(int)
            .and_then(|n| u32::try_from(n).ok());
        Ok(match (kind.as_str(), streams) {
            ("held", Some(streams)) => StreamClaim::Held { streams },
            ("full", Some(streams)) => StreamClaim::Full { streams },
            ("gone", _) => StreamClaim::Gone,
            _ => return Err(malformed("claim", &value)),
        })
    }

    async fn release_stream(&self, id: SessionId, holder: StreamHolder) -> Result<(), StoreError> {
        let mut call = self.inner.library.call(Op::Release, account_key(id.tag));
        call.arg(&id_bytes(id)[..]).arg(&holder[..]);
        self.run(&call).await.map(drop)
    }

    async fn adopt(&self, record: &SessionRecord) -> Result<bool, StoreError> {
        let mut call = self.account_call(Op::Adopt, &record.account);
        call.arg(&record.stream_id)
            .arg(&id_bytes(record.id)[..])
            .arg(record.created_at_ms)
            .arg(record.ttl_ms);
        self.origin_and_channel(&mut call);
        let value = self.run_changing(&call).await?;
        let (kind, _, expired) = reply("adopt", &value, |_| 0)?;
        self.publish_local(expired);
        match kind.as_str() {
            "adopted" | "present" => Ok(true),
            "taken" | "ended" => Ok(false),
            _ => Err(malformed("adopt", &value)),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let connection = self.connection().await?;
        let ping = async {
            let cmd = redis::cmd("PING");
            match connection.clone() {
                Connection::Standalone(mut c) => cmd.query_async::<String>(&mut c).await,
                Connection::Sentinel(mut m) => cmd.query_async::<String>(&mut m.connection).await,
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
            Ok(Err(e)) => Err(self.failed(&connection, &e)),
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
        let now = self.inner.clock.as_ref().map_or_else(
            || chrono::Utc::now().timestamp_millis(),
            |clock| clock.now_ms(),
        );
        // Tombstones, and sessions overdue but not yet expired by a call, are left out: the
        // page lists live ones.
        let mut active: Vec<SessionRecord> = self
            .scan_sessions()
            .await?
            .into_iter()
            .filter(|r| r.is_active_at(now) && after.is_none_or(|a| r.id > a))
            .collect();
        active.sort_by_key(|r| r.id);
        active.dedup_by_key(|r| r.id);
        let more = active.len() > limit;
        active.truncate(limit);
        Ok(SessionPage {
            next_after: more.then(|| active.last().map(|r| r.id)).flatten(),
            sessions: active,
        })
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
                Connection::Sentinel(mut m) => cmd.query_async::<Value>(&mut m.connection).await,
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
        let watch_master = watch_sentinel_master(self.inner.clone(), shutdown.clone());
        let discard = discard_abandoned(self.clone(), shutdown);
        Some(Box::pin(async move {
            futures::join!(listen, watch_master, discard);
        }))
    }

    fn subscribed(&self) -> watch::Receiver<bool> {
        self.inner.subscribed.subscribe()
    }

    fn take_abandoned(&self, account: &str, stream_id: &str) -> Option<SessionId> {
        let mut abandoned = self
            .inner
            .abandoned
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let index = abandoned
            .iter()
            .rposition(|(a, s, _, _)| a == account && s == stream_id)?;
        Some(abandoned.remove(index).2)
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
    fn sentinel_targets_parse_with_credentials_master_and_database() {
        let Ok(RedisTarget::Sentinel(target)) = RedisTarget::parse(
            "redis-sentinel://app:p%40ss@w0rd@mymaster@10.0.0.1:26379,[::1]:26380/3",
        ) else {
            panic!("a Sentinel URL parses");
        };
        assert_eq!(target.master, "mymaster");
        assert_eq!(
            target.sentinels,
            vec![("10.0.0.1".to_string(), 26379), ("::1".to_string(), 26380)]
        );
        assert_eq!(target.username.as_deref(), Some("app"));
        assert_eq!(target.password.as_deref(), Some("p@ss@w0rd"));
        assert_eq!(target.db, 3);
        assert_eq!(
            redact_url("redis-sentinel://app:pw@mymaster@10.0.0.1:26379"),
            "redis-sentinel://***@mymaster@10.0.0.1:26379"
        );
        assert_eq!(
            redact_url("redis-sentinel://mymaster@10.0.0.1:26379"),
            "redis-sentinel://mymaster@10.0.0.1:26379"
        );
        // Neither the Debug nor the Display form shows the credentials.
        let shown = format!("{target:?} {}", RedisTarget::Sentinel(target.clone()));
        assert!(!shown.contains("p@ss") && !shown.contains("app"), "{shown}");

        let Ok(RedisTarget::Sentinel(plain)) =
            RedisTarget::parse("redis-sentinel://mymaster@127.0.0.1:26379")
        else {
            panic!("a Sentinel URL without credentials parses");
        };
        assert_eq!((plain.username, plain.password, plain.db), (None, None, 0));
    }

    #[test]
    fn an_abandoned_open_is_claimed_once_by_its_account_and_stream_and_then_not_discarded() {
        let store = RedisStore::new(
            RedisTarget::parse("redis://127.0.0.1:1").unwrap(),
            Duration::from_millis(100),
        );
        let (first, second) = (SessionId::for_account("a"), SessionId::for_account("a"));
        let later = Instant::now() + Duration::from_secs(60);
        store.inner.abandoned.lock().unwrap().extend([
            ("a".to_string(), "tv".to_string(), first, later),
            (
                "a".to_string(),
                "phone".to_string(),
                SessionId::for_account("a"),
                later,
            ),
            ("a".to_string(), "tv".to_string(), second, later),
        ]);
        assert_eq!(store.take_abandoned("b", "tv"), None);
        // The latest attempt of the stream first; each id is handed out once.
        assert_eq!(store.take_abandoned("a", "tv"), Some(second));
        assert_eq!(store.take_abandoned("a", "tv"), Some(first));
        assert_eq!(store.take_abandoned("a", "tv"), None);
        // Claimed ids are no longer listed for the discard.
        let listed: Vec<SessionId> = store
            .inner
            .abandoned
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, id, _)| *id)
            .collect();
        assert!(!listed.contains(&first) && !listed.contains(&second));
        assert_eq!(listed.len(), 1);
    }

    #[test]
    fn bad_sentinel_targets_say_what_is_wrong() {
        for (url, says) in [
            ("redis-sentinel://127.0.0.1:26379", "master name is missing"),
            ("redis-sentinel://@127.0.0.1:26379", "master name is empty"),
            ("redis-sentinel://m@", "at least one sentinel"),
            ("redis-sentinel://m@127.0.0.1", "has no port"),
            ("redis-sentinel://m@127.0.0.1:0", "bad port"),
            ("redis-sentinel://m@127.0.0.1:x", "bad port"),
            ("redis-sentinel://m@127.0.0.1:26379/x", "not a number"),
            (
                "redis-sentinel://u:%zz@m@127.0.0.1:26379",
                "percent-encoding",
            ),
        ] {
            let error = RedisTarget::parse(url).expect_err(url);
            assert!(error.contains(says), "{url}: {error}");
        }
    }

    #[test]
    fn cluster_masters_are_read_from_cluster_nodes() {
        let nodes = "a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
                     b2 127.0.0.1:7002@17002 slave a1 0 0 1 connected\n\
                     c3 127.0.0.1:7003@17003 master,fail - 0 0 3 connected\n";
        assert_eq!(cluster_masters(nodes), [("127.0.0.1".to_string(), 7001)]);
    }

    #[test]
    fn account_keys_hide_caller_characters_and_share_a_hash_tag() {
        let tag = account_tag("{x}:y");
        let key = account_key(tag);
        assert_eq!(key, format!("sg{{{tag:08x}}}"));
        // The key is the tag alone: nothing a caller chose steers the Cluster slot.
        assert_eq!(key.matches('{').count(), 1);
        // A session id finds its account's hash.
        let id = SessionId::for_account("{x}:y");
        assert_eq!(account_key(id.tag), key);
    }

    #[test]
    fn the_library_names_its_functions_by_its_code() {
        let library = Library::new();
        let name = library.function(Op::Open).to_string();
        let version = name.strip_prefix("sg_open_").unwrap();
        assert_eq!(version.len(), 12);
        assert!(
            library
                .code
                .starts_with(&format!("#!lua name=streamgate_{version}\n"))
        );
        for op in Op::ALL {
            assert!(
                library
                    .code
                    .contains(&format!("'{}'", library.function(op)))
            );
        }
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
