//! A lazily made connection to the master of a [`RedisTarget`], for the small readers and writers
//! beside the session store (the validation ledger and its readers): made on first use, each
//! call bounded by a timeout, errors classified like the store's, and on Sentinel dropped when
//! the master stops answering as one, so the next call asks the sentinels again.

use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use crate::redis_store::classify;
use crate::{RedisTarget, StoreError};

/// One call: a plain command or a script invocation.
pub enum RedisCall<'a> {
    /// A command.
    Plain(redis::Cmd),
    /// A script (EVALSHA, loaded on NOSCRIPT).
    Script(redis::ScriptInvocation<'a>),
}

impl RedisCall<'_> {
    async fn run(&self, c: &mut impl ConnectionLike) -> redis::RedisResult<Value> {
        match self {
            RedisCall::Plain(cmd) => cmd.query_async(c).await,
            RedisCall::Script(invocation) => invocation.invoke_async(c).await,
        }
    }
}

#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// See the module documentation.
pub struct LazyRedis {
    target: RedisTarget,
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<Connection>>,
}

impl LazyRedis {
    /// A connection to `target` (its master), made on first use; each call waits at most
    /// `timeout`.
    pub fn new(target: RedisTarget, timeout: Duration) -> Self {
        Self {
            target,
            timeout,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    async fn connection(&self) -> Result<Connection, StoreError> {
        let mut current = self.connection.lock().await;
        if let Some(connection) = current.as_ref() {
            return Ok(connection.clone());
        }
        let connect_timeout = self.timeout.max(Duration::from_secs(1));
        let connect = async {
            let standalone = |url: String| async move {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(self.timeout))
                    .set_connection_timeout(Some(connect_timeout))
                    .set_number_of_retries(2);
                Ok::<_, redis::RedisError>(Connection::Standalone(
                    ConnectionManager::new_with_config(redis::Client::open(url)?, config).await?,
                ))
            };
            match &self.target {
                RedisTarget::Standalone(url) => standalone(url.clone()).await,
                // The master: replicas may lag behind.
                RedisTarget::Sentinel(sentinel) => {
                    let url = sentinel
                        .master_url()
                        .await
                        .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
                    standalone(url).await
                }
                RedisTarget::Cluster(nodes) => {
                    let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                        .response_timeout(self.timeout)
                        .connection_timeout(connect_timeout)
                        .retries(2)
                        .build()?;
                    Ok(Connection::Cluster(client.get_async_connection().await?))
                }
            }
        };
        let connected = match tokio::time::timeout(connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(classify(&e)),
            Err(_) => return Err(StoreError::TimedOut("cannot connect to Redis".into())),
        };
        *current = Some(connected.clone());
        Ok(connected)
    }

    /// Runs `call`, waiting at most the timeout.
    pub async fn run(&self, call: RedisCall<'_>) -> Result<Value, StoreError> {
        let connection = self.connection().await?;
        let answer = async {
            match connection {
                Connection::Standalone(mut c) => call.run(&mut c).await,
                Connection::Cluster(mut c) => call.run(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // A failed-over master refuses writes (READONLY) or is gone: ask the sentinels
                // again next time.
                let error = classify(&e);
                if matches!(self.target, RedisTarget::Sentinel(_))
                    && matches!(error, StoreError::Unavailable(_))
                {
                    *self.connection.lock().await = None;
                }
                Err(error)
            }
            Err(_) => Err(StoreError::TimedOut(format!(
                "Redis did not answer within {:?}",
                self.timeout
            ))),
        }
    }
}
