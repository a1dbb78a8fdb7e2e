//! An HTTPS server on 127.0.0.1 for webhooks that the test API server calls.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::certs::Ca;

/// Serves an [`axum::Router`] over TLS on a free `127.0.0.1` port, with a certificate from a
/// CA of its own, until dropped.
///
/// Register it with the API server as a webhook `clientConfig` of
/// `url: server.url("/path")` and `caBundle: server.ca_bundle()`.
/// Runs on the tokio runtime that started it (the test's).
pub struct HttpsServer {
    addr: SocketAddr,
    ca_pem: String,
    task: JoinHandle<()>,
}

impl HttpsServer {
    /// Starts serving `router`.
    pub async fn start(router: axum::Router) -> Result<Self> {
        crate::install_crypto_provider();
        let ca = Ca::new("streamgate-testenv-webhook-ca")?;
        let serving = ca.loopback_server()?;
        let certs = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the serving certificate")?;
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes())
            .context("parsing the serving key")?;
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("building the TLS configuration")?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(router.clone());
                tokio::spawn(async move {
                    // A failed handshake or connection only affects that one caller.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            ca_pem: ca.cert_pem(),
            task,
        })
    }

    /// The address served, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` followed by `path` (which should start with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// The PEM of the CA that signed the server's certificate: a webhook's `caBundle`.
    pub fn ca_bundle(&self) -> Vec<u8> {
        self.ca_pem.clone().into_bytes()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
