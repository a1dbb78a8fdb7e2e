//! Wiring: policy + store + engine + HTTP server, with graceful shutdown.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::Router;
use tokio::net::TcpListener;

use crate::api;
use crate::config::{Config, StoreSpec};
use crate::engine::{Engine, Policies};
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::policy_watch::PolicyWatcher;
use crate::proxy::Proxy;
use crate::store::{MemoryStore, RedisStore, SessionStore};

/// A sidecar's engine and HTTP application, ready to serve.
#[derive(Clone)]
pub struct Sidecar {
    engine: Engine,
    proxy: Option<Arc<Proxy>>,
}

impl Sidecar {
    /// A sidecar on the embedded store.
    pub fn in_memory(policies: PolicySet) -> Self {
        Self::with_store(Arc::new(MemoryStore::new()), policies)
    }

    /// A sidecar on `store`.
    pub fn with_store(store: Arc<dyn SessionStore>, policies: PolicySet) -> Self {
        let policies: Policies = Arc::new(ArcSwap::from_pointee(policies));
        Self {
            engine: Engine::new(store, policies, Arc::new(Metrics::new())),
            proxy: None,
        }
    }

    /// Turns on the enforcing proxy in front of `upstream`.
    pub fn with_upstream(mut self, upstream: reqwest::Url) -> Self {
        self.proxy = Some(Proxy::new(self.engine.clone(), upstream));
        self
    }

    /// The enforcing proxy, when on.
    pub fn proxy(&self) -> Option<&Arc<Proxy>> {
        self.proxy.as_ref()
    }

    /// The session engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The HTTP application.
    pub fn router(&self) -> Router {
        api::router(self.engine.clone(), self.proxy.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then lets in-flight requests finish.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// Runs the sidecar as configured until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let policies = match &config.policy_file {
        Some(path) if config.policy_file_optional && !path.exists() => {
            tracing::warn!(path = %path.display(),
                "policy file not there yet: the built-in default applies until it appears");
            PolicySet::default()
        }
        Some(path) => PolicySet::load(path, &config.namespace)?,
        None => PolicySet::default(),
    };
    let default = policies.default_policy();
    tracing::info!(
        policy = %default.source,
        limit = default.limit,
        ttl_seconds = default.ttl_seconds,
        on_limit_exceeded = ?default.on_limit_exceeded,
        mode = ?default.mode,
        overrides = policies.policies().iter().filter(|p| !p.spec.accounts.is_empty()).count(),
        namespace = %config.namespace,
        "policy loaded"
    );
    let store: Arc<dyn SessionStore> = match StoreSpec::parse(&config.store)? {
        StoreSpec::Memory => Arc::new(MemoryStore::new()),
        StoreSpec::Redis(target) => Arc::new(RedisStore::new(target, config.store_timeout)),
    };
    let mut sidecar = Sidecar::with_store(store, policies);
    if let Some(upstream) = &config.upstream {
        tracing::info!(%upstream, "enforcing proxy on: media requests need an active session");
        sidecar = sidecar.with_upstream(upstream.clone());
    }
    if let Some(path) = &config.policy_file {
        let watcher = PolicyWatcher::new(
            path.clone(),
            config.namespace.clone(),
            sidecar.engine().policies().clone(),
            sidecar.engine().metrics().clone(),
        );
        tokio::spawn(watcher.run(config.policy_reload_interval));
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, store = %config.store, "serving the session API");

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stopping_tx.send(());
    };
    let serve = sidecar.serve(listener, shutdown);
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result?,
        () = async {
            let _ = stopping_rx.await;
            tokio::time::sleep(config.shutdown_timeout).await;
        } => {
            tracing::warn!(timeout = ?config.shutdown_timeout, "in-flight requests did not finish in time");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
