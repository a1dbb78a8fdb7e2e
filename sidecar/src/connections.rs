//! Serving HTTP/1.1 with bounded connections: the sidecar sits in front of viewers, so a slow
//! or idle client must not be able to pin its memory or file descriptors.
//!
//! - A request head must arrive within `header_read_timeout` of the connection becoming ready
//!   for it (accepted, or its previous response finished) once its first byte is in; a
//!   connection that sends nothing is closed after `idle_timeout`.
//! - At most `max_connections` are open. When a new connection arrives at the limit, the
//!   connection that has been waiting longest for a request (idle or half-sent; never one with a
//!   request or response in flight) is closed to make room, so health checks and real viewers
//!   get through while an attacker's sockets are shed. Only if every connection is busy is the
//!   new one refused.
//! - Heads are bounded in size (`max_header_bytes`) and count (`max_headers`): larger ones get
//!   431 from hyper.
//!
//! Hand-written over hyper's connection API because no kept crate does this: hyper's own
//! header-read timer also closes idle keep-alive connections on the same deadline, axum::serve
//! and axum-server expose neither timeouts nor limits, and tower's concurrency limits count
//! requests, not sockets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Limits on connections and request heads.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Time to send a complete request head, from the first byte's arrival window.
    pub header_read_timeout: Duration,
    /// Time a connection may wait for its next request without sending a byte.
    pub idle_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Largest request head in bytes (at least 8192, hyper's minimum).
    pub max_header_bytes: usize,
    /// Most header fields in a request.
    pub max_headers: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 768,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
        }
    }
}

/// What the watchdog knows of one connection.
struct Activity {
    /// Requests whose response (body included) is not finished.
    in_flight: AtomicUsize,
    /// Bytes read from the socket so far.
    bytes_read: AtomicU64,
    /// When the connection last became ready for a request, and how many bytes had been read.
    ready_since: Mutex<(Instant, u64)>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            bytes_read: AtomicU64::new(0),
            ready_since: Mutex::new((Instant::now(), 0)),
        }
    }

    fn ready_since(&self) -> (Instant, u64) {
        *self.ready_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            let bytes = self.bytes_read.load(Ordering::SeqCst);
            *self.ready_since.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), bytes);
        }
    }

    /// Whether the connection waits for a request (idle or half-sent), and since when.
    fn waiting_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| self.ready_since().0)
    }

    /// Whether the watchdog should close the connection now.
    fn overdue(&self, limits: &ConnectionLimits, now: Instant) -> bool {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let (since, bytes_then) = self.ready_since();
        let waited = now.saturating_duration_since(since);
        let started_a_head = self.bytes_read.load(Ordering::SeqCst) > bytes_then;
        if started_a_head {
            waited >= limits.header_read_timeout
        } else {
            waited >= limits.idle_timeout
        }
    }
}

/// A socket that counts what it reads, so the watchdog can tell idle from half-sent.
struct CountingIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity
                .bytes_read
                .fetch_add(read as u64, Ordering::SeqCst);
        }
        result
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that tells its connection's [`Activity`] when it is done (or dropped).
struct TrackedBody {
    inner: Body,
    activity: Option<Arc<Activity>>,
}

impl TrackedBody {
    fn finish(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.request_finished();
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Open connections, for shedding at the limit.
#[derive(Default)]
struct Registry {
    next: u64,
    open: HashMap<u64, (Arc<Activity>, CancellationToken)>,
}

impl Registry {
    /// Closes the connection waiting longest for a request; false if every one is busy.
    fn shed_one(&mut self) -> bool {
        let victim = self
            .open
            .iter()
            .filter_map(|(key, (activity, _))| activity.waiting_since().map(|at| (at, *key)))
            .min();
        match victim.and_then(|(_, key)| self.open.remove(&key)) {
            Some((_, close)) => {
                close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes, then lets requests in
/// flight finish (each connection is told to close after its current response) and returns
/// when every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry: Arc<Mutex<Registry>> = Arc::default();
    let connections = TaskTracker::new();
    let stopping = CancellationToken::new();
    let shutdown = shutdown;
    tokio::pin!(shutdown);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => {
                stopping.cancel();
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let activity = Arc::new(Activity::new());
        let close = CancellationToken::new();
        let key = {
            let mut registry = registry.lock().unwrap_or_else(|p| p.into_inner());
            if registry.open.len() >= limits.max_connections && !registry.shed_one() {
                tracing::warn!(
                    max = limits.max_connections,
                    "connection limit reached with every connection busy; refusing one"
                );
                continue; // dropping the stream closes it
            }
            registry.next += 1;
            let key = registry.next;
            registry.open.insert(key, (activity.clone(), close.clone()));
            key
        };
        let io = TokioIo::new(CountingIo {
            inner: stream,
            activity: activity.clone(),
        });
        let service = {
            let app = app.clone();
            let activity = activity.clone();
            hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let app = app.clone();
                let activity = activity.clone();
                async move {
                    activity.request_started();
                    request.extensions_mut().insert(ConnectInfo(peer));
                    let response = app.oneshot(request.map(Body::new)).await;
                    let response = match response {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    Ok::<Response<TrackedBody>, Infallible>(response.map(|inner| TrackedBody {
                        inner,
                        activity: Some(activity),
                    }))
                }
            })
        };
        let connection = http.serve_connection(io, service);
        let registry = registry.clone();
        let stopping = stopping.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let check = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
                .clamp(Duration::from_millis(20), Duration::from_secs(1));
            let mut watchdog = tokio::time::interval(check);
            let mut draining = false;
            loop {
                tokio::select! {
                    _ = connection.as_mut() => break,
                    () = close.cancelled() => break,
                    () = stopping.cancelled(), if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    _ = watchdog.tick() => {
                        if activity.overdue(&limits, Instant::now()) {
                            break;
                        }
                    }
                }
            }
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .open
                .remove(&key);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The peer address type the router sees in [`ConnectInfo`].
pub type Peer = ConnectInfo<SocketAddr>;
