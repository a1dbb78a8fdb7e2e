//! etcd + kube-apiserver on loopback, started the way controller-runtime's envtest starts them.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binaries::Binaries;
use crate::certs::{self, Ca};

/// How long etcd may take to answer `/health`.
const ETCD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long kube-apiserver may take to become ready. Generous: on a 2-core CI machine it starts
/// while cargo may still be compiling other test binaries.
const APISERVER_TIMEOUT: Duration = Duration::from_secs(180);

/// Kills etcd and kube-apiserver and removes the working directory once its stdin reaches EOF,
/// which happens when the process holding the write end exits in any way (even SIGKILL).
/// That is what stops the shared control plane: Rust runs no destructors for statics.
/// Ctrl-C (SIGINT to the whole process group) must not kill it before it has cleaned up.
/// SIGKILL rather than a graceful stop: the data is thrown away, and kube-apiserver can take
/// many seconds to shut down once etcd is gone.
const WATCHDOG_SCRIPT: &str = r#"
trap '' INT HUP
dir=$1
pids=
while read -r pid; do pids="$pids $pid"; done
alive() {
  for p in $pids; do
    [ -r "/proc/$p/stat" ] || continue
    read -r _ _ state _ < "/proc/$p/stat" 2>/dev/null || continue
    [ "$state" != Z ] && return 0
  done
  return 1
}
if [ -n "$pids" ]; then
  kill -KILL $pids 2>/dev/null
  i=0
  while alive && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
fi
rm -rf "$dir"
"#;

/// A running etcd + kube-apiserver on 127.0.0.1 with an admin kubeconfig.
///
/// Dropping it (or [`ControlPlane::stop`]) stops both processes and removes its files; if the
/// test process dies first, a watchdog process does the same.
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig_path: PathBuf,
    server: String,
    binaries: Binaries,
    procs: Mutex<Option<Processes>>,
}

struct Processes {
    etcd: Child,
    apiserver: Child,
    watchdog: Child,
    /// Write end of the watchdog's stdin: dropping it (process exit) triggers the cleanup.
    watchdog_stdin: ChildStdin,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("kubeconfig", &self.kubeconfig_path)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts a control plane of its own with the binaries from [`Binaries::locate`].
    ///
    /// Most tests should use [`crate::shared`] instead: one control plane per test binary.
    pub async fn start() -> Result<Self> {
        Self::start_with(Binaries::locate()?).await
    }

    /// Starts a control plane with the given binaries.
    pub async fn start_with(binaries: Binaries) -> Result<Self> {
        crate::install_crypto_provider();
        // Free ports are picked by binding and releasing them, so another process can take one
        // before etcd or kube-apiserver binds it; start again on fresh ports when that happens.
        let mut attempt = 1;
        loop {
            match Self::start_once(binaries.clone()).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    tracing::warn!("control plane lost a port race, retrying: {e:#}");
                    attempt += 1;
                }
                other => {
                    return other.context(format!(
                        "starting the test control plane (etcd + kube-apiserver from {})",
                        binaries.dir.display()
                    ));
                }
            }
        }
    }

    async fn start_once(binaries: Binaries) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("streamgate-testenv-")
            .tempdir()
            .context("creating a temporary directory")?
            .keep();

        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("streamgate-testenv-watchdog")
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the watchdog (sh)")?;
        let watchdog_stdin = watchdog.stdin.take().expect("piped stdin");

        let mut starting = Starting {
            dir: dir.clone(),
            watchdog: Some((watchdog, watchdog_stdin)),
            children: Vec::new(),
        };
        let result = starting.run(&binaries).await;
        match result {
            Ok((kubeconfig_path, server)) => {
                let (watchdog, watchdog_stdin) = starting.watchdog.take().expect("watchdog");
                let mut children = std::mem::take(&mut starting.children).into_iter();
                let etcd = children.next().expect("etcd");
                let apiserver = children.next().expect("apiserver");
                Ok(Self {
                    dir,
                    kubeconfig_path,
                    server,
                    binaries,
                    procs: Mutex::new(Some(Processes {
                        etcd,
                        apiserver,
                        watchdog,
                        watchdog_stdin,
                    })),
                })
            }
            // `starting` is dropped here and stops whatever did start.
            Err(e) => Err(e),
        }
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// An admin (system:masters) kubeconfig file for kubectl, helm and [`kube::Client`].
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The binaries this control plane runs, and the kubectl and helm that go with it.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// The directory holding certificates, logs and etcd's data; removed on stop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new admin client.
    ///
    /// Create one per test (per tokio runtime): a [`kube::Client`] belongs to the runtime it was
    /// made on, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> Result<Client> {
        crate::install_crypto_provider();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig_path)
            .with_context(|| format!("reading {}", self.kubeconfig_path.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("loading the test kubeconfig")?;
        Client::try_from(config).context("creating a kube client")
    }

    /// `kubectl` with `KUBECONFIG` set to this control plane; add arguments and run it.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig_path);
        cmd
    }

    /// `helm` with `KUBECONFIG` set to this control plane and its cache, config and data kept in
    /// the control plane's directory, away from the user's.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.helm);
        cmd.env("KUBECONFIG", &self.kubeconfig_path)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        cmd
    }

    /// The process ids of etcd and kube-apiserver (for tests that check they are gone).
    pub fn pids(&self) -> Vec<u32> {
        let procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        procs
            .as_ref()
            .map(|p| vec![p.etcd.id(), p.apiserver.id()])
            .unwrap_or_default()
    }

    /// The last lines of the API server's log, for failure messages.
    pub fn apiserver_log_tail(&self) -> String {
        log_tail(&self.dir.join("kube-apiserver.log"), 40)
    }

    /// Stops kube-apiserver and etcd, waits for them, and removes the directory.
    pub fn stop(self) {
        // Drop does the work; this name reads better at call sites.
    }

    fn stop_processes(&self) {
        let taken = self.procs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut p) = taken {
            terminate(&mut p.apiserver);
            terminate(&mut p.etcd);
            // Our children are reaped now; stop the watchdog before it signals their (free) pids.
            let _ = p.watchdog.kill();
            let _ = p.watchdog.wait();
            drop(p.watchdog_stdin);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_processes();
    }
}

/// Stops a child at once (see [`WATCHDOG_SCRIPT`] for why not gracefully) and reaps it.
fn terminate(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A control plane being started: on error (drop) it stops what did start.
struct Starting {
    dir: PathBuf,
    watchdog: Option<(Child, ChildStdin)>,
    /// etcd, then kube-apiserver.
    children: Vec<Child>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            terminate(child);
        }
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            drop(stdin);
            // Keep the logs of a failed start only when asked: the error already quotes them.
            if std::env::var_os("STREAMGATE_TESTENV_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }
}

impl Starting {
    /// Starts etcd and kube-apiserver; returns the kubeconfig path and the server URL.
    async fn run(&mut self, bins: &Binaries) -> Result<(PathBuf, String)> {
        let dir = self.dir.clone();
        let [etcd_client, etcd_peer, apiserver_port] = free_ports()?;

        // One CA both serves (kube-apiserver's certificate) and authenticates clients.
        let ca = Ca::new("streamgate-testenv-ca")?;
        let serving = ca.loopback_server()?;
        let admin = ca.client("admin", Some("system:masters"))?;
        let (sa_key, sa_pub) = certs::key_pair_pem()?;
        let files = [
            ("ca.crt", ca.cert_pem()),
            ("apiserver.crt", serving.cert_pem),
            ("apiserver.key", serving.key_pem),
            ("admin.crt", admin.cert_pem),
            ("admin.key", admin.key_pem),
            ("sa.key", sa_key),
            ("sa.pub", sa_pub),
        ];
        for (name, pem) in files {
            std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
        }

        // etcd
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd = Command::new(&bins.etcd);
        etcd.arg("--name=streamgate-testenv")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=streamgate-testenv={peer_url}"))
            // Test data is thrown away: skipping fsync makes every write much faster.
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        self.spawn(etcd, "etcd")?;
        wait_for_etcd(&mut self.children[0], etcd_client, &dir).await?;

        // kube-apiserver
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let p = |name: &str| dir.join(name).display().to_string();
        let mut apiserver = Command::new(&bins.kube_apiserver);
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={apiserver_port}"))
            .arg(format!("--cert-dir={}", p("apiserver-certs")))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--authorization-mode=RBAC")
            .arg("--allow-privileged=true")
            // No controller-manager creates service accounts, so pods could never be admitted.
            .arg("--disable-admission-plugins=ServiceAccount")
            // No default route here, and nothing should reconcile the kubernetes Service.
            .arg("--endpoint-reconciler-type=none");
        self.spawn(apiserver, "kube-apiserver")?;

        let kubeconfig_path = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig_path, &server, &dir)?;
        wait_for_apiserver(&mut self.children[1], &kubeconfig_path, &dir).await?;
        Ok((kubeconfig_path, server))
    }

    fn spawn(&mut self, mut cmd: Command, name: &str) -> Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).context("creating a log file")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("running {:?}", cmd.get_program()))?;
        let (_, stdin) = self.watchdog.as_mut().expect("watchdog");
        let pid = child.id();
        self.children.push(child);
        writeln!(stdin, "{pid}").context("telling the watchdog about a process")?;
        Ok(())
    }
}

/// Distinct free loopback ports, all held at once so they differ.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free loopback ports")?;
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

async fn wait_for_etcd(etcd: &mut Child, port: u16, dir: &Path) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = etcd.try_wait()? {
            bail!(
                "etcd exited ({status}) before it was healthy; its log:\n{}",
                log_tail(&dir.join("etcd.log"), 40)
            );
        }
        if let Ok(body) = http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "/health").await
            && body.starts_with("HTTP/1.1 200")
        {
            return Ok(());
        }
        if start.elapsed() > ETCD_TIMEOUT {
            bail!(
                "etcd did not answer /health within {ETCD_TIMEOUT:?}; its log:\n{}",
                log_tail(&dir.join("etcd.log"), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.1 GET on loopback returning the raw response; enough for etcd's /health.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| anyhow!("timed out"))?
}

async fn wait_for_apiserver(apiserver: &mut Child, kubeconfig: &Path, dir: &Path) -> Result<()> {
    let start = Instant::now();
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let mut last_error: String;
    loop {
        if let Some(status) = apiserver.try_wait()? {
            bail!(
                "kube-apiserver exited ({status}) before it was ready; its log:\n{}",
                log_tail(&dir.join("kube-apiserver.log"), 60)
            );
        }
        // Ready means /readyz passes and the bootstrap namespace `default` exists.
        let readyz = axum::http::Request::get("/readyz").body(Vec::new())?;
        match client.request_text(readyz).await {
            Ok(_) => match Api::<Namespace>::all(client.clone()).get("default").await {
                Ok(_) => return Ok(()),
                Err(e) => last_error = format!("namespace default: {e}"),
            },
            Err(e) => last_error = format!("/readyz: {e}"),
        }
        if start.elapsed() > APISERVER_TIMEOUT {
            bail!(
                "kube-apiserver was not ready within {APISERVER_TIMEOUT:?} (last: {last_error}); \
                 its log:\n{}",
                log_tail(&dir.join("kube-apiserver.log"), 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_kubeconfig(path: &Path, server: &str, dir: &Path) -> Result<()> {
    let p = |name: &str| dir.join(name).display().to_string();
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "streamgate-testenv",
            "cluster": { "server": server, "certificate-authority": p("ca.crt") },
        }],
        "users": [{
            "name": "admin",
            "user": { "client-certificate": p("admin.crt"), "client-key": p("admin.key") },
        }],
        "contexts": [{
            "name": "streamgate-testenv",
            "context": { "cluster": "streamgate-testenv", "user": "admin", "namespace": "default" },
        }],
        "current-context": "streamgate-testenv",
    });
    std::fs::write(path, serde_yaml::to_string(&doc)?).context("writing the kubeconfig")
}

/// The last `lines` lines of a log file, or a note that it could not be read.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(could not read {}: {e})", path.display()),
    }
}
