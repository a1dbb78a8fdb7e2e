//! CORS for the session API and the enforcing proxy, so that a player page served from another
//! origin can open a session, read heartbeat answers and send its credential with media requests.
//!
//! Allowed origins come from `--cors-allowed-origins` (standalone use) and from the namespace's
//! policy, read on every request so a policy reload applies at once. The sidecar answers
//! preflights itself (they never reach the upstream), and its own answers, errors included, carry
//! the CORS headers: a page sees `session_gone` rather than an opaque network error. An origin
//! that is not allowed gets no CORS headers at all.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header, request};
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Headers a page may send: the identity token, the playback token, the session id, and `Range`
/// for players that fetch byte ranges.
pub const ALLOWED_HEADERS: [&str; 5] = [
    "authorization",
    "x-streamgate-token",
    "x-streamgate-session",
    "content-type",
    "range",
];

/// Headers a page may read: StreamGate's own answers' headers and `Retry-After` for backoff.
pub const EXPOSED_HEADERS: [&str; 5] = [
    "x-streamgate-dry-run",
    "x-streamgate-degraded",
    "x-streamgate-token",
    "x-streamgate-session",
    "retry-after",
];

/// How long a browser may cache a preflight answer (Chromium caps this at two hours).
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// A problem with an allowed-origin entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{origin:?}: {problem}")]
pub struct OriginError {
    origin: String,
    problem: &'static str,
}

/// Checks one allowed-origin entry: `*` (any origin) or `scheme://host[:port]`, as browsers send
/// it in `Origin` (no path, no trailing slash).
pub fn validate_origin(origin: &str) -> Result<(), OriginError> {
    let error = |problem| {
        Err(OriginError {
            origin: origin.to_string(),
            problem,
        })
    };
    if origin == "*" {
        return Ok(());
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return error("expected scheme://host[:port], e.g. https://player.example.com");
    };
    if !matches!(scheme, "http" | "https") {
        return error("the scheme must be http or https");
    }
    if rest.is_empty() {
        return error("the host is missing");
    }
    if rest.contains(['/', '?', '#']) {
        return error("an origin has no path, query or trailing slash");
    }
    if !rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    {
        return error("the host has characters an origin cannot have");
    }
    Ok(())
}

/// Whether `origin` (the request's `Origin` header) is in `allowed`. Hosts compare
/// case-insensitively; `*` allows any origin.
pub fn origin_allowed<S: AsRef<str>>(origin: &str, allowed: &[S]) -> bool {
    allowed
        .iter()
        .any(|a| a.as_ref() == "*" || a.as_ref().eq_ignore_ascii_case(origin))
}

/// Where the allowed origins come from.
#[derive(Clone)]
pub struct AllowedOrigins {
    fixed: Arc<Vec<String>>,
    dynamic: Option<Arc<dyn Fn() -> Vec<String> + Send + Sync>>,
}

impl AllowedOrigins {
    /// A fixed list (the command-line flag).
    pub fn fixed(origins: Vec<String>) -> Self {
        Self {
            fixed: Arc::new(origins),
            dynamic: None,
        }
    }

    /// Adds a list read on every request (the namespace policy's field, which reloads).
    pub fn with_dynamic(
        mut self,
        origins: impl Fn() -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.dynamic = Some(Arc::new(origins));
        self
    }

    /// Whether `origin` is allowed now.
    pub fn allows(&self, origin: &str) -> bool {
        origin_allowed(origin, &self.fixed)
            || self
                .dynamic
                .as_ref()
                .is_some_and(|dynamic| origin_allowed(origin, &dynamic()))
    }
}

/// `router` with CORS for `origins`: preflights answered here, CORS headers on every answer to an
/// allowed origin, none for any other.
pub fn apply(router: Router, origins: AllowedOrigins) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(
            move |origin: &HeaderValue, _: &request::Parts| {
                origin.to_str().is_ok_and(|origin| origins.allows(origin))
            },
        ))
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
        .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
        .max_age(PREFLIGHT_MAX_AGE);
    router
        .layer(cors)
        .layer(axum::middleware::map_response(strip_unless_allowed))
}

/// tower-http answers a preflight from any origin with the allowed methods and headers, and adds
/// the exposed headers to every answer; only `Access-Control-Allow-Origin` depends on the
/// origin. An origin that is not allowed should learn nothing, so without that header every
/// other CORS header goes too.
async fn strip_unless_allowed(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        let cors: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in cors {
            headers.remove(name);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port() {
        for good in [
            "*",
            "https://player.example.com",
            "http://127.0.0.1:8081",
            "http://[::1]:3000",
        ] {
            assert_eq!(validate_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "player.example.com",
            "https://player.example.com/",
            "https://player.example.com/path",
            "ftp://example.com",
            "https://",
            "https://exa mple.com",
            "null",
        ] {
            assert!(validate_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn origin_matching_is_exact_but_case_insensitive() {
        let allowed = ["https://player.example.com"];
        assert!(origin_allowed("https://player.example.com", &allowed));
        assert!(origin_allowed("https://Player.Example.com", &allowed));
        assert!(!origin_allowed("https://player.example.com:8443", &allowed));
        assert!(!origin_allowed("http://player.example.com", &allowed));
        assert!(!origin_allowed("https://evil-player.example.com", &allowed));
        assert!(!origin_allowed(
            "https://player.example.com.evil.test",
            &allowed
        ));
        assert!(origin_allowed("https://anything.test", &["*"]));
        assert!(!origin_allowed::<&str>("https://anything.test", &[]));
    }

    #[test]
    fn dynamic_origins_are_read_on_every_check() {
        let current = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let source = current.clone();
        let origins = AllowedOrigins::fixed(vec!["http://a.test".into()])
            .with_dynamic(move || source.lock().unwrap().clone());
        assert!(origins.allows("http://a.test"));
        assert!(!origins.allows("http://b.test"));
        current.lock().unwrap().push("http://b.test".into());
        assert!(origins.allows("http://b.test"));
    }
}
