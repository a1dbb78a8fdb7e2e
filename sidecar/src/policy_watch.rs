//! Hot reload of the policy file.
//!
//! The file is polled and compared by content rather than watched with inotify: a Kubernetes
//! ConfigMap volume updates by swapping a symlink, which file watchers easily miss, and reading
//! a small file every couple of seconds costs nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::Policies;
use crate::metrics::Metrics;
use crate::policy::{PolicyError, PolicySet};

/// Watches one policy file and swaps in each valid new version.
pub struct PolicyWatcher {
    path: PathBuf,
    namespace: String,
    policies: Policies,
    metrics: Arc<Metrics>,
    last_seen: Option<Vec<u8>>,
}

/// What one check of the file did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The file did not change.
    Unchanged,
    /// A new valid policy is in force.
    Reloaded,
    /// The new file is invalid (or unreadable); the last good policy stays in force.
    Rejected(PolicyError),
}

impl PolicyWatcher {
    /// A watcher for `path`, whose current content is already loaded into `policies`.
    pub fn new(
        path: PathBuf,
        namespace: String,
        policies: Policies,
        metrics: Arc<Metrics>,
    ) -> Self {
        let last_seen = std::fs::read(&path).ok();
        Self {
            path,
            namespace,
            policies,
            metrics,
            last_seen,
        }
    }

    /// Checks the file once.
    pub fn check(&mut self) -> ReloadOutcome {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(source) => {
                // Report a vanished file once, not on every poll.
                if self.last_seen.take().is_none() {
                    return ReloadOutcome::Unchanged;
                }
                let error = PolicyError::Read {
                    path: self.path.display().to_string(),
                    source,
                };
                tracing::error!(%error, "policy file unreadable; keeping the last good policy");
                self.metrics.count_reload(false);
                return ReloadOutcome::Rejected(error);
            }
        };
        if self.last_seen.as_deref() == Some(bytes.as_slice()) {
            return ReloadOutcome::Unchanged;
        }
        self.last_seen = Some(bytes.clone());
        let text = String::from_utf8_lossy(&bytes);
        match PolicySet::from_yaml(&text, &self.path.display().to_string(), &self.namespace) {
            Ok(set) => {
                tracing::info!(
                    path = %self.path.display(),
                    policies = set.policies().len(),
                    default = %set.default_policy().source,
                    limit = set.default_policy().limit,
                    "policy reloaded"
                );
                self.policies.store(Arc::new(set));
                self.metrics.count_reload(true);
                ReloadOutcome::Reloaded
            }
            Err(error) => {
                tracing::error!(%error, "invalid policy file; keeping the last good policy");
                self.metrics.count_reload(false);
                ReloadOutcome::Rejected(error)
            }
        }
    }

    /// Checks the file every `interval` until `shutdown`.
    pub async fn run(mut self, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the file was just loaded
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.check();
        }
    }
}
