//! Command-line flags. Values are checked while parsing, so a bad flag is reported by clap with the
//! flag's name and a non-zero exit before any request is sent.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Url;

/// streamctl: simulate viewers, generate load and administer StreamGate sessions.
#[derive(Clone, Debug, Parser)]
#[command(name = "streamctl", version, about)]
pub struct Cli {
    /// Base URL of the StreamGate session API (a sidecar, or its enforcing proxy).
    #[arg(
        long,
        global = true,
        env = "STREAMCTL_ENDPOINT",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL",
        value_parser = parse_endpoint
    )]
    pub endpoint: Url,

    /// Base URL of the sidecar's admin API (its `--admin-listen`, loopback by default; in a pod
    /// reach it with `kubectl port-forward pod/NAME 9090`). Used by `sessions` and `kick`.
    #[arg(
        long,
        global = true,
        env = "STREAMCTL_ADMIN_ENDPOINT",
        default_value = "http://127.0.0.1:9090",
        value_name = "URL",
        value_parser = parse_endpoint
    )]
    pub admin_endpoint: Url,

    /// Output format: human-readable text, or one JSON document on stdout.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: Output,

    /// Time limit of each HTTP request.
    #[arg(long, global = true, default_value = "10s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables and sentences for people.
    Text,
    /// One JSON document, for scripts and tests.
    Json,
}

/// The subcommands.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Play concurrent viewers: open, heartbeat, end; report who was admitted, refused or cut.
    Simulate(SimulateArgs),
    /// Open-loop load: a fixed request rate over many accounts; report throughput and latency.
    Load(LoadArgs),
    /// List an account's active sessions.
    Sessions(SessionsArgs),
    /// Kick (revoke) a session; its next heartbeat gets 410 `kicked`.
    Kick(KickArgs),
    /// Compare two `load --output json` reports (used by bench/run): throughput and latency ratios.
    Compare(CompareArgs),
    /// Test identity tokens: make a key pair and its JWKS, or mint a signed token.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Serve the SessionReview protocol: an example session validator (deny accounts or
    /// headers, answer late, fail a fraction of calls).
    Validator(ValidatorArgs),
}

/// `streamctl token` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Write a new private key (`KID.key.pem`) and the JWKS of its public key (`jwks.json`).
    Keygen(KeygenArgs),
    /// Print a signed JWT for a viewer.
    Mint(MintArgs),
}

/// Flags of `streamctl token keygen`.
#[derive(Clone, Debug, Args)]
pub struct KeygenArgs {
    /// Signature algorithm: RS256, ES256 or EdDSA.
    #[arg(long, default_value = "EdDSA")]
    pub alg: crate::token::KeyAlg,
    /// Key id, written into the JWKS and into the tokens it signs.
    #[arg(long, default_value = "test-key-1", value_parser = parse_id)]
    pub kid: String,
    /// Directory to write `KID.key.pem` and `jwks.json` into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// Flags of `streamctl token mint`.
#[derive(Clone, Debug, Args)]
pub struct MintArgs {
    /// The private key file `streamctl token keygen` wrote.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Its algorithm: RS256, ES256 or EdDSA.
    #[arg(long, default_value = "EdDSA")]
    pub alg: crate::token::KeyAlg,
    /// Its key id.
    #[arg(long, default_value = "test-key-1", value_parser = parse_id)]
    pub kid: String,
    /// The `iss` claim: a jwtRules[].issuer of the ViewerAuthentication.
    #[arg(long)]
    pub issuer: String,
    /// The `aud` claim.
    #[arg(long)]
    pub audience: Option<String>,
    /// The viewer's account (the `sub` claim).
    #[arg(long, value_parser = parse_id)]
    pub sub: String,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = parse_positive_duration)]
    pub ttl: Duration,
    /// Another claim, NAME=VALUE (a JSON value, e.g. climit=2, or a string); repeatable.
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    pub claims: Vec<String>,
}

/// Flags of `streamctl validator`.
#[derive(Clone, Debug, Args)]
pub struct ValidatorArgs {
    /// Address to serve SessionReviews on (any path; port 0 picks one and prints it).
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDRESS")]
    pub listen: std::net::SocketAddr,

    /// Deny sessions of this account (repeatable).
    #[arg(long, value_name = "ACCOUNT", value_parser = parse_id)]
    pub deny_account: Vec<String>,

    /// Deny sessions whose review carries this request header with this value (repeatable),
    /// e.g. `x-viewer-country=XX`. Only headers the sidecar forwards are seen.
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_header_rule)]
    pub deny_header: Vec<(String, String)>,

    /// Message of a denial, shown to the viewer.
    #[arg(
        long,
        default_value = "denied by streamctl validator",
        value_name = "TEXT"
    )]
    pub message: String,

    /// Answer every review after this long.
    #[arg(long, default_value = "0s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub delay: Duration,

    /// Answer this fraction of calls (0 to 1) with 503 and no verdict.
    #[arg(long, default_value = "0", value_name = "FRACTION", value_parser = parse_fraction)]
    pub fail_fraction: f64,
}

/// Parses `NAME=VALUE` of `--deny-header`.
pub fn parse_header_rule(value: &str) -> Result<(String, String), String> {
    let (name, header_value) = value
        .split_once('=')
        .ok_or("expected NAME=VALUE, e.g. x-viewer-country=XX")?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(format!("{name:?} is not a header name"));
    }
    Ok((name.to_ascii_lowercase(), header_value.to_string()))
}

/// Parses a fraction between 0 and 1.
pub fn parse_fraction(value: &str) -> Result<f64, String> {
    let fraction: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if !(0.0..=1.0).contains(&fraction) {
        return Err(format!("must be between 0 and 1, got {fraction}"));
    }
    Ok(fraction)
}

/// Flags of `streamctl simulate`.
#[derive(Clone, Debug, Args)]
pub struct SimulateArgs {
    /// Account all viewers share. Without it every viewer gets its own random account.
    #[arg(long, value_parser = parse_id)]
    pub account: Option<String>,

    /// Number of concurrent viewers.
    #[arg(long, default_value = "5", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub streams: u32,

    /// How long viewers watch before ending their sessions.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Duration,

    /// Heartbeat this often instead of the interval the sidecar advertises (for quick demos).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// Also pull this media path (e.g. `/live`) through the sidecar's enforcing proxy with each
    /// viewer's session, and report when a viewer's stream is cut.
    #[arg(long, value_name = "PATH", value_parser = parse_media_path)]
    pub media: Option<String>,

    /// Delay between viewer starts, so that viewers open in order (0s: all at once).
    #[arg(long, default_value = "100ms", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub stagger: Duration,

    /// Also draw the run as a timeline picture (SVG) into FILE: one lane per viewer with its
    /// admission, heartbeats and refusal or cut.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
}

/// A media path: starts with `/`.
pub fn parse_media_path(value: &str) -> Result<String, String> {
    if value.starts_with('/') && !value.contains(char::is_whitespace) {
        Ok(value.to_string())
    } else {
        Err("expected a path starting with / (e.g. /live or /hls/index.m3u8)".into())
    }
}

/// Flags of `streamctl load`.
#[derive(Clone, Debug, Args)]
pub struct LoadArgs {
    /// Requests per second to send, whatever the responses do (open loop), e.g. `2000` or `2000/s`.
    #[arg(long, default_value = "1000/s", value_name = "N/s", value_parser = parse_rate)]
    pub rate: f64,

    /// How long to send requests.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Duration,

    /// Number of distinct accounts the viewers belong to.
    #[arg(long, default_value = "10000", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub accounts: u64,

    /// Heartbeats each viewer sends between its open and its end.
    #[arg(long, default_value = "4", value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub heartbeats: u32,

    /// Time between a viewer's consecutive requests (open, heartbeats, end).
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub heartbeat_interval: Duration,

    /// Most requests in flight at once; when all are busy, sends are late and the lateness counts
    /// as latency.
    #[arg(long, default_value = "256", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
}

/// Flags of `streamctl sessions`.
#[derive(Clone, Debug, Args)]
pub struct SessionsArgs {
    /// The account.
    #[arg(value_parser = parse_id)]
    pub account: String,
}

/// Flags of `streamctl kick`.
#[derive(Clone, Debug, Args)]
pub struct KickArgs {
    /// The session id, as `streamctl sessions` shows it.
    #[arg(value_name = "SESSION_ID", value_parser = parse_session_id)]
    pub session_id: String,
}

/// Flags of `streamctl compare`.
#[derive(Clone, Debug, Args)]
pub struct CompareArgs {
    /// Report of the reference run (e.g. the bare HTTP handler).
    #[arg(long, value_name = "FILE")]
    pub baseline: PathBuf,

    /// Report of the measured run (e.g. the sidecar).
    #[arg(long, value_name = "FILE")]
    pub candidate: PathBuf,
}

/// An absolute `http` or `https` URL without query or fragment.
pub fn parse_endpoint(value: &str) -> Result<Url, String> {
    let url = Url::parse(value)
        .map_err(|e| format!("not a URL ({e}); expected e.g. http://127.0.0.1:8080"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, got {:?}; write the scheme, e.g. http://127.0.0.1:8080",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or fragment".into());
    }
    Ok(url)
}

/// A duration greater than zero, such as `30s`, `500ms` or `2m`.
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|e| format!("{e}; expected e.g. 30s, 500ms or 2m"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

/// A rate in requests per second: `N`, `N/s` or `N/m`; fractional values are allowed.
pub fn parse_rate(value: &str) -> Result<f64, String> {
    let trimmed = value.trim();
    let (number, per_seconds) = if let Some(n) = trimmed.strip_suffix("/s") {
        (n, 1.0)
    } else if let Some(n) = trimmed.strip_suffix("/m") {
        (n, 60.0)
    } else {
        (trimmed, 1.0)
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| "expected a number of requests per second, e.g. 500 or 500/s".to_string())?;
    let rate = n / per_seconds;
    if !rate.is_finite() || rate <= 0.0 {
        return Err("must be greater than zero".into());
    }
    if rate > 1_000_000.0 {
        return Err("must be at most 1000000/s".into());
    }
    Ok(rate)
}

/// An account or stream id as the sidecar accepts it: 1–128 visible ASCII characters.
pub fn parse_id(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("must be visible ASCII characters (no spaces)".into());
    }
    Ok(value.to_string())
}

/// A session id: hexadecimal digits (128 bits or more), normalised to lowercase. The exact length is
/// the sidecar's business; this only catches what cannot be an id at all.
pub fn parse_session_id(value: &str) -> Result<String, String> {
    if (32..=128).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(
            "must be a session id: 32 or more hexadecimal digits, as `streamctl sessions` shows"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert!(parse_endpoint("http://127.0.0.1:8080").is_ok());
        assert!(parse_endpoint("https://gate.example/prefix/").is_ok());
        assert!(parse_endpoint("localhost:8080").is_err()); // parsed as scheme "localhost"
        assert!(parse_endpoint("not a url").is_err());
        assert!(parse_endpoint("ftp://host").is_err());
        assert!(parse_endpoint("http://host/?x=1").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("500"), Ok(500.0));
        assert_eq!(parse_rate("500/s"), Ok(500.0));
        assert_eq!(parse_rate("60/m"), Ok(1.0));
        assert_eq!(parse_rate("0.5/s"), Ok(0.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-3").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("NaN").is_err());
        assert!(parse_rate("2000000").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_positive_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("soon").is_err());
    }

    #[test]
    fn ids() {
        assert!(parse_id("123").is_ok());
        assert!(parse_id("").is_err());
        assert!(parse_id("a b").is_err());
        assert!(parse_id(&"x".repeat(129)).is_err());
        assert_eq!(
            parse_session_id("6F1C0F9E2A9B4D8C8E7F00112233AABB").as_deref(),
            Ok("6f1c0f9e2a9b4d8c8e7f00112233aabb")
        );
        assert!(parse_session_id(&"a".repeat(40)).is_ok());
        assert!(parse_session_id("xyz").is_err());
        assert!(parse_session_id(&"g".repeat(32)).is_err());
    }
}
