//! Playback tokens: the short-lived credential media requests carry instead of the session id.
//!
//! A token binds one session (its id, account and stream), optionally the client's network
//! (IPv4 /24, IPv6 /64), an expiry, and the id of the key that signed it:
//!
//! ```text
//! v1.<key id>.<payload: base64url of JSON {sid, acc, str, net?, exp}>.<HMAC-SHA256: base64url>
//! ```
//!
//! The MAC covers everything before the last dot. Keys are symmetric and per namespace: every
//! sidecar of a namespace mints and verifies with the same key set (a Secret the operator
//! manages and rotates, see [`streamgate_policy::playback_keys`]); they never leave the cluster.
//! During a rotation two keys verify; one signs.
//!
//! [`mint`] and [`verify`] are pure (time and the client address are arguments) and tested
//! directly; the key ring is loaded and reloaded at the edges ([`KeyRing::load`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use streamgate_policy::playback_keys::PlaybackKeySet;

use crate::session::SessionId;

/// Token format version: the first dot-separated field.
pub const VERSION: &str = "v1";
/// Shortest secret a key may have.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest token [`verify`] looks at; longer input is refused before any work.
pub const MAX_TOKEN_LEN: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// The client network a token is bound to: the /24 of an IPv4 address, the /64 of an IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    /// The first three octets of an IPv4 address.
    V4([u8; 3]),
    /// The first eight bytes of an IPv6 address.
    V6([u8; 8]),
}

impl Network {
    /// The network of `ip`. An IPv4-mapped IPv6 address counts as the IPv4 address it maps, so
    /// a dual-stack listener sees one client as one network.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                Self::V4([a, b, c])
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::of(IpAddr::V4(v4)),
                None => {
                    let o = v6.octets();
                    Self::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }

    /// The network as the session store records it ([`crate::store::media::NetworkKey`]): the
    /// /64's eight bytes, or `0:0:0:0:0:a:b:c` for the /24 `a.b.c.0`.
    pub fn key(self) -> crate::store::media::NetworkKey {
        match self {
            Self::V4([a, b, c]) => [0, 0, 0, 0, 0, a, b, c],
            Self::V6(bytes) => bytes,
        }
    }

    /// Parses the form [`Network`]'s `Display` writes (`203.0.113.0/24`, `2001:db8::/64`).
    pub fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = text.split_once('/')?;
        let ip: IpAddr = address.parse().ok()?;
        let network = Self::of(ip);
        // Only the canonical form: a network address with its fixed prefix length.
        (network.to_string() == text && (prefix == "24" || prefix == "64")).then_some(network)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4([a, b, c]) => write!(f, "{a}.{b}.{c}.0/24"),
            Self::V6(bytes) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(bytes);
                write!(f, "{}/64", std::net::Ipv6Addr::from(full))
            }
        }
    }
}

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The session the token is for.
    pub session: SessionId,
    /// The session's account.
    pub account: String,
    /// The session's stream id.
    pub stream_id: String,
    /// The client network it may be used from; `None`: any (network binding off).
    pub network: Option<Network>,
    /// Expiry, seconds since the Unix epoch: valid while `now < expires_at`.
    pub expires_at: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    sid: String,
    acc: String,
    #[serde(rename = "str")]
    stream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<String>,
    exp: i64,
}

/// Why a token is refused. The messages are safe to show to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format.
    #[error("the playback token is malformed")]
    Malformed,
    /// Signed with a key this sidecar does not hold (never issued here, or rotated out).
    #[error("the playback token's key is unknown (rotated out?); heartbeat for a new token")]
    UnknownKey,
    /// The MAC does not match: forged or altered.
    #[error("the playback token's signature is invalid")]
    BadSignature,
    /// Past its expiry.
    #[error("the playback token has expired; heartbeat for a new token")]
    Expired,
    /// Used from another client network than the one it was issued to.
    #[error("the playback token was issued to another network")]
    WrongNetwork,
}

impl TokenError {
    /// The reason as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::WrongNetwork => "wrong_network",
        }
    }

    /// Every reason, for metrics with a fixed label set.
    pub const ALL: [TokenError; 5] = [
        Self::Malformed,
        Self::UnknownKey,
        Self::BadSignature,
        Self::Expired,
        Self::WrongNetwork,
    ];
}

/// The keys a sidecar mints and verifies with.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRing {
    signing: String,
    keys: BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for KeyRing {
    // Secrets stay out of logs and panics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("signing", &self.signing)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A key file that cannot be used; the message names the problem.
#[derive(Debug, thiserror::Error)]
#[error("playback key file {path}: {problem}")]
pub struct KeyFileError {
    path: String,
    problem: String,
}

fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl KeyRing {
    /// One random key, id `local`: for a sidecar without a key file (standalone). Tokens it
    /// mints are valid on this process only, until it restarts.
    pub fn generate() -> Self {
        let secret: [u8; 32] = rand::random();
        Self {
            signing: "local".into(),
            keys: BTreeMap::from([("local".to_string(), secret.to_vec())]),
        }
    }

    /// A ring of `keys` (id, secret) signing with `signing`.
    pub fn new(signing: &str, keys: Vec<(String, Vec<u8>)>) -> Result<Self, String> {
        let keys: BTreeMap<String, Vec<u8>> = keys.into_iter().collect();
        for (id, secret) in &keys {
            if !valid_key_id(id) {
                return Err(format!(
                    "key id {id:?} must be 1-32 characters of A-Z a-z 0-9 - _"
                ));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "key {id:?} is {} bytes; at least {MIN_SECRET_BYTES} are needed",
                    secret.len()
                ));
            }
        }
        if !keys.contains_key(signing) {
            return Err(format!("the signing key {signing:?} is not among the keys"));
        }
        Ok(Self {
            signing: signing.to_string(),
            keys,
        })
    }

    /// The ring a key set (the operator's Secret, or a hand-written file) describes.
    pub fn from_key_set(set: &PlaybackKeySet) -> Result<Self, String> {
        let keys = set
            .keys
            .iter()
            .map(|k| {
                STANDARD
                    .decode(k.secret.trim())
                    .map(|secret| (k.id.clone(), secret))
                    .map_err(|e| format!("key {:?}: secret is not base64: {e}", k.id))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(&set.signing, keys)
    }

    /// Reads a key file (JSON or YAML of a [`PlaybackKeySet`]).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let error = |problem: String| KeyFileError {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let set: PlaybackKeySet = serde_yaml::from_str(&text).map_err(|e| error(e.to_string()))?;
        Self::from_key_set(&set).map_err(error)
    }

    /// Id of the key that signs.
    pub fn signing_key_id(&self) -> &str {
        &self.signing
    }

    /// Ids of the keys that verify.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    fn mac(&self, id: &str) -> Option<HmacSha256> {
        let secret = self.keys.get(id)?;
        Some(HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }
}

/// Signs `claims` with the ring's signing key.
pub fn mint(ring: &KeyRing, claims: &Claims) -> String {
    let payload = Payload {
        sid: claims.session.to_string(),
        acc: claims.account.clone(),
        stream: claims.stream_id.clone(),
        net: claims.network.map(|n| n.to_string()),
        exp: claims.expires_at,
    };
    let json = serde_json::to_vec(&payload).expect("the payload serializes");
    let signed = format!(
        "{VERSION}.{}.{}",
        ring.signing,
        URL_SAFE_NO_PAD.encode(json)
    );
    let mut mac = ring
        .mac(&ring.signing)
        .expect("the signing key is in the ring");
    mac.update(signed.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{tag}")
}

/// Checks `token` at `now` (seconds since the epoch) for a request from `client`: format, key,
/// signature (in constant time), expiry, and, when the token carries a network, that `client`
/// is in it. Returns what the token says.
pub fn verify(
    ring: &KeyRing,
    token: &str,
    now: i64,
    client: Option<IpAddr>,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let mut fields = signed.split('.');
    let (Some(version), Some(key_id), Some(payload), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(TokenError::Malformed);
    };
    if version != VERSION {
        return Err(TokenError::Malformed);
    }
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac = ring.mac(key_id).ok_or(TokenError::UnknownKey)?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    // Only signed bytes are parsed from here on.
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let payload: Payload = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    let session: SessionId = payload.sid.parse().map_err(|()| TokenError::Malformed)?;
    let network = match &payload.net {
        Some(text) => Some(Network::parse(text).ok_or(TokenError::Malformed)?),
        None => None,
    };
    if now >= payload.exp {
        return Err(TokenError::Expired);
    }
    if let Some(bound) = network
        && client.map(Network::of) != Some(bound)
    {
        return Err(TokenError::WrongNetwork);
    }
    Ok(Claims {
        session,
        account: payload.acc,
        stream_id: payload.stream,
        network,
        expires_at: payload.exp,
    })
}

/// The playback token an `Authorization` header carries as its bearer credential, if it carries
/// one (GET and DELETE `/streaming` accept it, so a player need not refresh its identity token
/// mid-stream). `None` for anything else, a viewer's JWT included: a JWT's first part is
/// base64url JSON (`eyJ...`), never `v1`.
pub fn playback_bearer(authorization: &str) -> Option<&str> {
    let (scheme, credential) = authorization.trim().split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && credential.starts_with("v1.")).then_some(credential)
}

/// How long a token lives: two heartbeat intervals, so one missed heartbeat does not stop
/// playback, and a cut viewer's leaked token dies soon.
pub fn lifetime_seconds(heartbeat_interval_seconds: u32) -> i64 {
    2 * i64::from(heartbeat_interval_seconds.max(1))
}

/// Default of the longest lifetime a token written into a playlist may have
/// (`--playlist-token-max-lifetime`): a long film, with room for pauses.
pub const DEFAULT_PLAYLIST_TOKEN_MAX_LIFETIME_SECONDS: i64 = 6 * 3600;

/// How long the token written into a playlist of `kind` lives, in seconds.
///
/// A player re-fetches a live media playlist every target duration and gets a fresh token each
/// time: the usual two heartbeat intervals do. It does not re-fetch what it loaded once: an
/// ended (VOD) media playlist, whose segments it fetches until the end, and a master playlist,
/// whose variants it may switch to (or, live, re-fetch) at any later time. Tokens written there
/// live for the content: twice an ended playlist's duration (room for pauses and seeking back)
/// on top of the usual lifetime, and a master playlist's for `max_lifetime_seconds`, which also
/// caps the former. Never shorter than the usual lifetime. What keeps such a token from
/// outliving its session is not its expiry but the store: every media request checks that the
/// session is active (see the proxy).
pub fn playlist_token_lifetime_seconds(
    kind: crate::hls::PlaylistKind,
    heartbeat_interval_seconds: u32,
    max_lifetime_seconds: i64,
) -> i64 {
    let usual = lifetime_seconds(heartbeat_interval_seconds);
    let cap = max_lifetime_seconds.max(usual);
    match kind {
        crate::hls::PlaylistKind::Live => usual,
        crate::hls::PlaylistKind::Master => cap,
        crate::hls::PlaylistKind::Ended { duration_seconds } => {
            // `as` saturates: an absurd duration becomes the cap, never a wrap.
            let content = (duration_seconds.max(0.0).ceil() as i64).saturating_mul(2);
            usual.saturating_add(content).min(cap)
        }
    }
}

/// Whether a token expiring at `expires_at` (seconds) may pass at `now_ms` while the store
/// cannot be asked (failurePolicy Open lets media through unverified). A token within the usual
/// lifetime (`usual_lifetime_seconds`) passes, as it always did: it was minted for a session
/// active that recently. A longer-lived one (written into a playlist) passes only if this
/// sidecar found its session active within the usual lifetime (`last_found_active_ms`), so that
/// it is worth no more than a usual token minted then: the playlist URL of a session that ended
/// before the outage does not come back to life during it.
pub fn honoured_without_store(
    expires_at: i64,
    now_ms: i64,
    usual_lifetime_seconds: i64,
    last_found_active_ms: Option<i64>,
) -> bool {
    let usual_ms = usual_lifetime_seconds.saturating_mul(1000);
    if expires_at.saturating_mul(1000).saturating_sub(now_ms) <= usual_ms {
        return true;
    }
    last_found_active_ms.is_some_and(|at| now_ms.saturating_sub(at) <= usual_ms)
}

/// Every reason a media request's credential is refused, as metric labels.
pub const REFUSAL_REASONS: [&str; 7] = [
    "missing",
    "session_id_not_accepted",
    "malformed",
    "unknown_key",
    "bad_signature",
    "expired",
    "wrong_network",
];

/// Distinct client networks each session was used from recently, as this sidecar saw them, and
/// when each was last reported to the store, which counts them across every sidecar: a network
/// is reported when it is new to this sidecar and then at most every quarter window while it is
/// in use, so the store is asked a few times per window, not per request.
/// Bounded: at most [`SharingTracker::CAPACITY`] sessions are remembered; past that the least
/// recently seen is forgotten, in constant time (a sidecar seeing more sessions than that within
/// the sharing window must not pay per request for it).
#[derive(Debug)]
pub struct SharingTracker {
    sessions: lru::LruCache<SessionId, Vec<SeenNetwork>>,
}

#[derive(Debug)]
struct SeenNetwork {
    network: Network,
    seen_ms: i64,
    /// When this network was last reported to the store; `None`: not yet.
    reported_ms: Option<i64>,
}

/// What [`SharingTracker::observe`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Distinct networks this sidecar saw the session used from within the window.
    pub networks: usize,
    /// True when this use should be reported to the store.
    pub report: bool,
}

impl Default for SharingTracker {
    fn default() -> Self {
        Self::with_capacity(Self::CAPACITY)
    }
}

impl SharingTracker {
    /// Sessions remembered at most.
    pub const CAPACITY: usize = 100_000;

    /// A tracker remembering at most `capacity` sessions (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            sessions: lru::LruCache::new(
                std::num::NonZeroUsize::new(capacity).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
        }
    }

    /// Records that `session` was used from `network` at `now_ms`: how many distinct networks
    /// it was used from within the last `window_ms`, this one included, and whether this use
    /// is due to be reported to the store (a network not reported yet, or last reported a
    /// quarter window ago). With `defer_report` a due report is left to the session's next use
    /// here (an open: admissions stay one store call; the network counts once it is used).
    pub fn observe(
        &mut self,
        session: SessionId,
        network: Network,
        now_ms: i64,
        window_ms: i64,
        defer_report: bool,
    ) -> Observed {
        let seen = self.sessions.get_or_insert_mut(session, Vec::new);
        let last_report = seen
            .iter()
            .find(|s| s.network == network)
            .and_then(|s| s.reported_ms)
            .filter(|at| now_ms - at < window_ms / 4);
        let report = last_report.is_none() && !defer_report;
        seen.retain(|s| s.network != network && s.seen_ms > now_ms - window_ms);
        seen.push(SeenNetwork {
            network,
            seen_ms: now_ms,
            reported_ms: if report { Some(now_ms) } else { last_report },
        });
        Observed {
            networks: seen.len(),
            report,
        }
    }

    /// Forgets a session (it was revoked or ended).
    pub fn forget(&mut self, session: SessionId) {
        self.sessions.pop(&session);
    }

    /// Sessions remembered now.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when no session is remembered.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// A sidecar's playback token state: the key ring (replaced on key file reload), whether tokens
/// are bound to the client network, whether media requests must carry a token (rather than
/// the session id), and sharing detection's memory. Cheap to share (`Arc`).
pub struct Playback {
    keys: ArcSwap<KeyRing>,
    bind_network: AtomicBool,
    require_token: AtomicBool,
    playlist_token_max_lifetime_seconds: AtomicI64,
    sharing: Mutex<SharingTracker>,
}

impl fmt::Debug for Playback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Playback")
            .field("keys", &self.keys.load())
            .field("bind_network", &self.binds_network())
            .field("require_token", &self.requires_token())
            .finish_non_exhaustive()
    }
}

impl Playback {
    /// Playback state with `keys`, binding tokens to the client network, accepting session ids
    /// on media requests too (the prototype's behaviour).
    pub fn new(keys: KeyRing) -> Self {
        Self {
            keys: ArcSwap::from_pointee(keys),
            bind_network: AtomicBool::new(true),
            require_token: AtomicBool::new(false),
            playlist_token_max_lifetime_seconds: AtomicI64::new(
                DEFAULT_PLAYLIST_TOKEN_MAX_LIFETIME_SECONDS,
            ),
            sharing: Mutex::default(),
        }
    }

    /// The key ring in force.
    pub fn keys(&self) -> Arc<KeyRing> {
        self.keys.load_full()
    }

    /// Replaces the key ring (key file reload, rotation).
    pub fn set_keys(&self, keys: KeyRing) {
        self.keys.store(Arc::new(keys));
    }

    /// Whether new tokens are bound to the client network.
    pub fn binds_network(&self) -> bool {
        self.bind_network.load(Ordering::Relaxed)
    }

    /// Binds new tokens to the client network (`true`), or not (carrier-grade NAT, where one
    /// viewer's requests come from changing networks).
    pub fn set_bind_network(&self, bind: bool) {
        self.bind_network.store(bind, Ordering::Relaxed);
    }

    /// Whether media requests must carry a playback token. `false`: the session id
    /// (`X-StreamGate-Session`, `session`) is accepted too, as in the prototype.
    pub fn requires_token(&self) -> bool {
        self.require_token.load(Ordering::Relaxed)
    }

    /// The single switch viewer authentication drives: `true` when viewers are authenticated
    /// (a session id alone no longer opens media), `false` when it is disabled.
    pub fn set_require_token(&self, require: bool) {
        self.require_token.store(require, Ordering::Relaxed);
    }

    /// The longest lifetime of a token written into a playlist, in seconds (see
    /// [`playlist_token_lifetime_seconds`]).
    pub fn playlist_token_max_lifetime_seconds(&self) -> i64 {
        self.playlist_token_max_lifetime_seconds
            .load(Ordering::Relaxed)
    }

    /// Sets the longest lifetime of a token written into a playlist (`--playlist-token-max-lifetime`).
    pub fn set_playlist_token_max_lifetime_seconds(&self, seconds: i64) {
        self.playlist_token_max_lifetime_seconds
            .store(seconds.max(0), Ordering::Relaxed);
    }

    /// A token for `session` of `account`/`stream_id`, for a client at `client`, valid for two
    /// heartbeat intervals from `now` (seconds). Returns the token and its expiry (seconds).
    pub fn mint_for(
        &self,
        session: SessionId,
        account: &str,
        stream_id: &str,
        heartbeat_interval_seconds: u32,
        client: Option<IpAddr>,
        now: i64,
    ) -> (String, i64) {
        self.mint_lasting(
            session,
            account,
            stream_id,
            lifetime_seconds(heartbeat_interval_seconds),
            client,
            now,
        )
    }

    /// Like [`Playback::mint_for`], valid for `lifetime_seconds` from `now`.
    pub fn mint_lasting(
        &self,
        session: SessionId,
        account: &str,
        stream_id: &str,
        lifetime_seconds: i64,
        client: Option<IpAddr>,
        now: i64,
    ) -> (String, i64) {
        let expires_at = now.saturating_add(lifetime_seconds);
        let claims = Claims {
            session,
            account: account.to_string(),
            stream_id: stream_id.to_string(),
            network: if self.binds_network() {
                client.map(Network::of)
            } else {
                None
            },
            expires_at,
        };
        (mint(&self.keys.load(), &claims), expires_at)
    }

    /// Verifies `token` with the keys in force (see [`verify`]).
    pub fn verify(
        &self,
        token: &str,
        now: i64,
        client: Option<IpAddr>,
    ) -> Result<Claims, TokenError> {
        verify(&self.keys.load(), token, now, client)
    }

    /// Records a use of `session` from `client` (see [`SharingTracker::observe`]).
    pub fn observe_network(
        &self,
        session: SessionId,
        client: IpAddr,
        now_ms: i64,
        window_seconds: u32,
        defer_report: bool,
    ) -> Observed {
        self.lock_sharing().observe(
            session,
            Network::of(client),
            now_ms,
            i64::from(window_seconds) * 1000,
            defer_report,
        )
    }

    /// Forgets what sharing detection knew of `session`.
    pub fn forget(&self, session: SessionId) {
        self.lock_sharing().forget(session);
    }

    fn lock_sharing(&self) -> std::sync::MutexGuard<'_, SharingTracker> {
        // Only map operations happen under this lock: a poisoned lock is still consistent.
        self.sharing.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reloads the key file into `playback` whenever it changes (a mounted Secret is updated by the
/// kubelet in place), until `shutdown`. A file that cannot be used keeps the keys in force and
/// is logged.
pub async fn watch_key_file(
    playback: Arc<Playback>,
    path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        match KeyRing::load(&path) {
            Ok(ring) => {
                tracing::info!(signing = ring.signing_key_id(),
                    keys = ?ring.key_ids().collect::<Vec<_>>(), "playback keys reloaded");
                playback.set_keys(ring);
            }
            Err(error) => {
                tracing::error!(%error, "playback keys not reloaded; the keys in force stay");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(id: &str, byte: u8) -> KeyRing {
        KeyRing::new(id, vec![(id.to_string(), vec![byte; 32])]).unwrap()
    }

    fn claims(network: Option<Network>) -> Claims {
        Claims {
            session: SessionId::for_account("acct"),
            account: "acct".into(),
            stream_id: "tv".into(),
            network,
            expires_at: 1_000,
        }
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let ring = ring("k1", 1);
        let claims = claims(None);
        let token = mint(&ring, &claims);
        assert!(token.starts_with("v1.k1."), "{token}");
        assert_eq!(verify(&ring, &token, 999, None), Ok(claims.clone()));
        assert_eq!(verify(&ring, &token, 1_000, None), Err(TokenError::Expired));
    }

    #[test]
    fn networks_are_the_ipv4_24_and_the_ipv6_64() {
        let net = |s: &str| Network::of(s.parse().unwrap());
        assert_eq!(net("203.0.113.7").to_string(), "203.0.113.0/24");
        assert_eq!(net("203.0.113.7"), net("203.0.113.250"));
        assert_ne!(net("203.0.113.7"), net("203.0.114.7"));
        assert_eq!(net("::ffff:203.0.113.9"), net("203.0.113.1"));
        assert_eq!(net("2001:db8:1:2:3::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(net("2001:db8:1:2:3::1"), net("2001:db8:1:2:ffff::9"));
        assert_ne!(net("2001:db8:1:2::1"), net("2001:db8:1:3::1"));
        for text in ["203.0.113.0/24", "2001:db8:1:2::/64"] {
            assert_eq!(Network::parse(text).unwrap().to_string(), text);
        }
        for text in [
            "203.0.113.5/24",
            "203.0.113.0/16",
            "nonsense",
            "2001:db8::/48",
        ] {
            assert_eq!(Network::parse(text), None, "{text}");
        }
    }

    #[test]
    fn a_bound_token_works_from_its_network_only() {
        let ring = ring("k1", 1);
        let claims = claims(Some(Network::of("198.51.100.20".parse().unwrap())));
        let token = mint(&ring, &claims);
        assert!(verify(&ring, &token, 0, ip("198.51.100.99")).is_ok());
        assert_eq!(
            verify(&ring, &token, 0, ip("198.51.101.20")),
            Err(TokenError::WrongNetwork)
        );
        assert_eq!(
            verify(&ring, &token, 0, None),
            Err(TokenError::WrongNetwork)
        );
        // An unbound token works from anywhere.
        let unbound = mint(&ring, &super::tests::claims(None));
        assert!(verify(&ring, &unbound, 0, ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn forged_and_altered_tokens_are_refused() {
        let ring = ring("k1", 1);
        let token = mint(&ring, &claims(Some(Network::V4([10, 0, 0]))));
        // Signed with another secret under the same key id.
        let forged = mint(&super::tests::ring("k1", 2), &claims(None));
        assert_eq!(
            verify(&ring, &forged, 0, None),
            Err(TokenError::BadSignature)
        );
        // The payload swapped for one without the network binding, the tag kept.
        let parts: Vec<&str> = token.split('.').collect();
        let unbound = mint(&ring, &claims(None));
        let unbound_payload = unbound.split('.').nth(2).unwrap();
        let spliced = format!("{}.{}.{}.{}", parts[0], parts[1], unbound_payload, parts[3]);
        assert_eq!(
            verify(&ring, &spliced, 0, None),
            Err(TokenError::BadSignature)
        );
        // A flipped bit in the tag.
        let mut tag = URL_SAFE_NO_PAD.decode(parts[3]).unwrap();
        tag[0] ^= 1;
        let flipped = format!(
            "{}.{}.{}.{}",
            parts[0],
            parts[1],
            parts[2],
            URL_SAFE_NO_PAD.encode(tag)
        );
        assert_eq!(
            verify(&ring, &flipped, 0, ip("10.0.0.1")),
            Err(TokenError::BadSignature)
        );
        for garbage in [
            "",
            "v1",
            "v1.k1.x",
            "v2.k1.e30.AAAA",
            "v1.k1.e30.!!",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert_eq!(
                verify(&ring, garbage, 0, None),
                Err(TokenError::Malformed),
                "{garbage}"
            );
        }
        assert_eq!(
            verify(
                &ring,
                &mint(&super::tests::ring("k9", 1), &claims(None)),
                0,
                None
            ),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn during_rotation_both_keys_verify_and_the_signing_one_signs() {
        let old = ring("old", 1);
        let token_old = mint(&old, &claims(None));
        let rotating = KeyRing::new(
            "new",
            vec![("old".into(), vec![1; 32]), ("new".into(), vec![2; 32])],
        )
        .unwrap();
        let token_new = mint(&rotating, &claims(None));
        assert!(token_new.starts_with("v1.new."));
        assert!(verify(&rotating, &token_old, 0, None).is_ok());
        assert!(verify(&rotating, &token_new, 0, None).is_ok());
        let rotated = ring("new", 2);
        assert_eq!(
            verify(&rotated, &token_old, 0, None),
            Err(TokenError::UnknownKey)
        );
        assert!(verify(&rotated, &token_new, 0, None).is_ok());
    }

    #[test]
    fn sharing_counts_distinct_networks_within_the_window() {
        let mut tracker = SharingTracker::default();
        let (a, b) = (SessionId::for_account("x"), SessionId::for_account("x"));
        let (home, phone, friend) = (
            Network::V4([1, 2, 3]),
            Network::V4([5, 6, 7]),
            Network::V6([9; 8]),
        );
        assert_eq!(tracker.observe(a, home, 0, 1_000, false).networks, 1);
        assert_eq!(
            tracker.observe(a, home, 10, 1_000, false).networks,
            1,
            "one network seen twice is one"
        );
        assert_eq!(tracker.observe(a, phone, 20, 1_000, false).networks, 2);
        assert_eq!(
            tracker.observe(b, friend, 30, 1_000, false).networks,
            1,
            "sessions are counted apart"
        );
        assert_eq!(tracker.observe(a, friend, 40, 1_000, false).networks, 3);
        // Later than the window after home's and phone's last use: only friend and home now.
        assert_eq!(tracker.observe(a, home, 1_025, 1_000, false).networks, 2);
        tracker.forget(a);
        assert_eq!(tracker.observe(a, phone, 1_030, 1_000, false).networks, 1);
    }

    #[test]
    fn sharing_forgets_the_least_recently_seen_session_when_full() {
        let mut tracker = SharingTracker::with_capacity(2);
        let ids: Vec<SessionId> = (0..3).map(|_| SessionId::for_account("x")).collect();
        let (home, phone) = (Network::V4([1, 2, 3]), Network::V4([5, 6, 7]));
        tracker.observe(ids[0], home, 0, 1_000, false);
        tracker.observe(ids[1], home, 10, 1_000, false);
        // ids[0] seen again: ids[1] is now the least recently seen, and goes for ids[2].
        tracker.observe(ids[0], phone, 20, 1_000, false);
        tracker.observe(ids[2], home, 30, 1_000, false);
        assert_eq!(tracker.len(), 2);
        assert_eq!(
            tracker.observe(ids[0], home, 40, 1_000, false).networks,
            2,
            "ids[0] kept its networks"
        );
        assert_eq!(
            tracker.observe(ids[1], phone, 50, 1_000, false).networks,
            1,
            "ids[1] was forgotten"
        );
    }

    #[test]
    fn a_network_is_reported_when_new_and_then_once_a_quarter_window() {
        let mut tracker = SharingTracker::default();
        let id = SessionId::for_account("x");
        let (home, phone) = (Network::V4([1, 2, 3]), Network::V4([5, 6, 7]));
        let reports = |tracker: &mut SharingTracker, network, at| {
            tracker.observe(id, network, at, 100_000, false).report
        };
        assert!(reports(&mut tracker, home, 0), "new here");
        assert!(!reports(&mut tracker, home, 1_000));
        assert!(!reports(&mut tracker, home, 24_999));
        assert!(
            reports(&mut tracker, phone, 25_000),
            "another network is new"
        );
        assert!(
            reports(&mut tracker, home, 25_000),
            "a quarter window since"
        );
        assert!(!reports(&mut tracker, home, 40_000));
        assert!(!reports(&mut tracker, phone, 49_999));
        assert!(reports(&mut tracker, phone, 50_000));
        // An open defers its report to the session's next use here.
        let office = Network::V4([9, 9, 9]);
        assert!(!tracker.observe(id, office, 60_000, 100_000, true).report);
        assert!(!tracker.observe(id, office, 61_000, 100_000, true).report);
        let next = tracker.observe(id, office, 62_000, 100_000, false);
        assert!(next.report, "reported on its first use after the open");
        assert_eq!(next.networks, 3);
    }

    #[test]
    fn a_playback_token_is_told_from_a_jwt_in_the_authorization_header() {
        let token = mint(&ring("k1", 1), &claims(None));
        assert_eq!(
            playback_bearer(&format!("Bearer {token}")),
            Some(token.as_str())
        );
        assert_eq!(
            playback_bearer(&format!("bearer  {token} ")),
            Some(token.as_str())
        );
        assert_eq!(
            playback_bearer("Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"),
            None
        );
        assert_eq!(playback_bearer(&format!("Basic {token}")), None);
        assert_eq!(playback_bearer("Bearer"), None);
    }

    #[test]
    fn playlist_tokens_live_for_what_the_player_will_not_fetch_again() {
        use crate::hls::PlaylistKind::{Ended, Live, Master};
        let six_hours = DEFAULT_PLAYLIST_TOKEN_MAX_LIFETIME_SECONDS;
        // Heartbeat every 30 s: the usual lifetime is 60 s.
        assert_eq!(playlist_token_lifetime_seconds(Live, 30, six_hours), 60);
        assert_eq!(
            playlist_token_lifetime_seconds(Master, 30, six_hours),
            six_hours
        );
        // A 4-minute VOD: the usual lifetime plus twice its duration.
        let vod = Ended {
            duration_seconds: 240.0,
        };
        assert_eq!(
            playlist_token_lifetime_seconds(vod, 30, six_hours),
            60 + 480
        );
        // Fractions round up.
        let short = Ended {
            duration_seconds: 0.2,
        };
        assert_eq!(playlist_token_lifetime_seconds(short, 1, six_hours), 2 + 2);
        // A film longer than the cap: the cap.
        let long = Ended {
            duration_seconds: 5.0 * 3600.0,
        };
        assert_eq!(
            playlist_token_lifetime_seconds(long, 30, six_hours),
            six_hours
        );
        assert_eq!(
            playlist_token_lifetime_seconds(
                Ended {
                    duration_seconds: f64::MAX
                },
                30,
                600
            ),
            600
        );
        // A cap below the usual lifetime never shortens a token.
        for kind in [Live, Master, vod] {
            assert_eq!(playlist_token_lifetime_seconds(kind, 30, 0), 60, "{kind:?}");
        }
    }

    #[test]
    fn without_the_store_a_long_lived_token_passes_only_for_a_session_found_active_lately() {
        let now_ms = 1_000_000_000;
        let now = now_ms / 1000;
        // A usual token (20 s): passes, found active or not.
        assert!(honoured_without_store(now + 20, now_ms, 20, None));
        // A playlist's token (10 min): only if found active within the last 20 s.
        assert!(!honoured_without_store(now + 600, now_ms, 20, None));
        assert!(honoured_without_store(
            now + 600,
            now_ms,
            20,
            Some(now_ms - 20_000)
        ));
        assert!(!honoured_without_store(
            now + 600,
            now_ms,
            20,
            Some(now_ms - 20_001)
        ));
        assert!(!honoured_without_store(
            i64::MAX,
            now_ms,
            20,
            Some(i64::MIN)
        ));
    }

    #[test]
    fn key_rings_refuse_weak_or_inconsistent_keys() {
        assert!(KeyRing::new("a", vec![("a".into(), vec![0; 31])]).is_err());
        assert!(KeyRing::new("b", vec![("a".into(), vec![0; 32])]).is_err());
        assert!(KeyRing::new("a.b", vec![("a.b".into(), vec![0; 32])]).is_err());
        let debug = format!("{:?}", ring("k1", 7));
        assert!(
            !debug.contains("7, 7"),
            "secrets must not be printed: {debug}"
        );
    }
}
