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

use crate::engine::Policies;

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
pub const EXPOSED_HEADERS: [&str; 6] = [
    "x-streamgate-dry-run",
    "x-streamgate-degraded",
    "x-streamgate-token",
    "x-streamgate-token-expires-at",
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
/// it in `Origin` (no path, no trailing slash). The same rule as the policy's `allowedOrigins`.
pub fn validate_origin(origin: &str) -> Result<(), OriginError> {
    crate::policy::check_origin(origin).map_err(|problem| OriginError {
        origin: origin.to_string(),
        problem,
    })
}

/// Whether `origin` (the request's `Origin` header) is in `allowed`. Hosts compare
/// case-insensitively; `*` allows any origin.
pub fn origin_allowed<S: AsRef<str>>(origin: &str, allowed: &[S]) -> bool {
    allowed
        .iter()
        .any(|a| a.as_ref() == "*" || a.as_ref().eq_ignore_ascii_case(origin))
}

/// Answers whether an origin is allowed, asked on every request.
type OriginCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Where the allowed origins come from.
#[derive(Clone)]
pub struct AllowedOrigins {
    fixed: Arc<Vec<String>>,
    dynamic: Option<OriginCheck>,
}

impl AllowedOrigins {
    /// A fixed list (the command-line flag).
    pub fn fixed(origins: Vec<String>) -> Self {
        Self {
            fixed: Arc::new(origins),
            dynamic: None,
        }
    }

    /// Also allows the origins of the namespace's default policy (`spec.allowedOrigins`), read
    /// on every request so that a policy reload applies at once.
    pub fn with_policy(self, policies: Policies) -> Self {
        self.with_dynamic(move |origin| {
            origin_allowed(origin, &policies.load().default_policy().allowed_origins)
        })
    }

    /// Also allows what `allows` says, asked on every request.
    pub fn with_dynamic(mut self, allows: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.dynamic = Some(Arc::new(allows));
        self
    }

    /// Whether `origin` is allowed now.
    pub fn allows(&self, origin: &str) -> bool {
        origin_allowed(origin, &self.fixed)
            || self.dynamic.as_ref().is_some_and(|dynamic| dynamic(origin))
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
            .with_dynamic(move |origin| origin_allowed(origin, &source.lock().unwrap()));
        assert!(origins.allows("http://a.test"));
        assert!(!origins.allows("http://b.test"));
        current.lock().unwrap().push("http://b.test".into());
        assert!(origins.allows("http://b.test"));
    }
}
