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
[ -n "$2" ] && ip netns del "$2" 2>/dev/null
rm -rf "$dir"
"#;

/// The address the aggregation mode's network namespace gives its loopback device: Endpoints
/// may not point at 127.0.0.0/8, so exposed servers get this one (TEST-NET-1, never routed).
pub const EXTENSION_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The user the API server's front-proxy client certificate names: what an extension API
/// server finds in `requestheader-allowed-names`.
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// A running etcd + kube-apiserver on 127.0.0.1 with an admin kubeconfig.
///
/// Dropping it (or [`ControlPlane::stop`]) stops both processes and removes its files; if the
/// test process dies first, a watchdog process does the same.
pub struct ControlPlane {
    dir: PathBuf,
    /// The network namespace etcd and kube-apiserver run in (aggregation mode only).
    netns: Option<String>,
    /// The next port [`ControlPlane::expose`] listens on inside the namespace.
    next_exposed_port: std::sync::atomic::AtomicU16,
    kubeconfig_path: PathBuf,
    server: String,
    binaries: Binaries,
    procs: Mutex<Option<Processes>>,
}

struct Processes {
    etcd: Child,
    apiserver: Child,
    watchdog: Child,
    /// Forwarders between the host and the namespace (aggregation mode only).
    forwarders: Vec<Child>,
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
        Self::start_with_mode(binaries, false).await
    }

    /// Starts a control plane with the aggregation layer: a front-proxy CA and client
    /// certificate with the `--requestheader-*` flags, and `--enable-aggregator-routing` so the
    /// API server dials an APIService's endpoint addresses itself (there is no kube-proxy).
    ///
    /// etcd and kube-apiserver run inside a network namespace created for them (needs root and
    /// `ip`, `nsenter`, `socat`): Endpoints may not name loopback addresses, so the namespace's
    /// loopback device also carries [`EXTENSION_ADDRESS`], where [`ControlPlane::expose`] makes
    /// a server of the test reachable. The API server is forwarded to the host's 127.0.0.1 as
    /// usual, so kubectl, helm and clients work unchanged. The namespace is deleted on stop.
    pub async fn start_aggregated() -> Result<Self> {
        Self::start_with_mode(Binaries::locate()?, true).await
    }

    async fn start_with_mode(binaries: Binaries, aggregation: bool) -> Result<Self> {
        crate::install_crypto_provider();
        // Free ports are picked by binding and releasing them, so another process can take one
        // before etcd or kube-apiserver binds it; start again on fresh ports when that happens.
        let mut attempt = 1;
        loop {
            match Self::start_once(binaries.clone(), aggregation).await {
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

    async fn start_once(binaries: Binaries, aggregation: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("streamgate-testenv-")
            .tempdir()
            .context("creating a temporary directory")?
            .keep();
        let netns = aggregation.then(new_netns_name);

        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("streamgate-testenv-watchdog")
            .arg(&dir)
            .arg(netns.as_deref().unwrap_or(""))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the watchdog (sh)")?;
        let watchdog_stdin = watchdog.stdin.take().expect("piped stdin");

        let mut starting = Starting {
            dir: dir.clone(),
            netns: netns.clone(),
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
                let forwarders = children.collect();
                Ok(Self {
                    dir,
                    netns,
                    next_exposed_port: std::sync::atomic::AtomicU16::new(8443),
                    kubeconfig_path,
                    server,
                    binaries,
                    procs: Mutex::new(Some(Processes {
                        etcd,
                        apiserver,
                        watchdog,
                        forwarders,
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

    /// The network namespace the control plane runs in (aggregation mode), e.g. for
    /// `nsenter --net=/run/netns/NAME`.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Makes a TCP server listening on the host's `127.0.0.1:host_port` reachable from the API
    /// server at the returned address ([`EXTENSION_ADDRESS`] and a port of its own) inside the
    /// control plane's network namespace: what an Endpoints object of an APIService (or a
    /// webhook Service) can name. Bytes pass through unchanged, TLS included. Aggregation mode
    /// only; the forwarders stop with the control plane.
    pub async fn expose(&self, host_port: u16) -> Result<SocketAddr> {
        let netns = self
            .netns
            .as_deref()
            .ok_or_else(|| anyhow!("expose needs a control plane started with start_aggregated"))?;
        let port = self
            .next_exposed_port
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = self.dir.join(format!("expose-{port}.sock"));
        // Host side: the unix socket (shared by both network namespaces) to the host's port.
        let mut host = Command::new("socat");
        host.arg("-d")
            .arg("-d")
            .arg(format!(
                "UNIX-LISTEN:{},fork,unlink-early",
                socket.display()
            ))
            .arg(format!("TCP:127.0.0.1:{host_port}"));
        self.spawn_forwarder(host, &format!("expose-{port}-host"))
            .await?;
        // Namespace side: the extension address to the unix socket.
        let mut inner = nsenter(netns, "socat");
        inner
            .arg("-d")
            .arg("-d")
            .arg(format!(
                "TCP-LISTEN:{port},bind={EXTENSION_ADDRESS},fork,reuseaddr"
            ))
            .arg(format!("UNIX-CONNECT:{}", socket.display()));
        self.spawn_forwarder(inner, &format!("expose-{port}-netns"))
            .await?;
        Ok(SocketAddr::from((EXTENSION_ADDRESS, port)))
    }

    /// Starts a socat forwarder, registers it with the watchdog and waits until it listens.
    async fn spawn_forwarder(&self, cmd: Command, name: &str) -> Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        {
            let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
            let procs = procs
                .as_mut()
                .ok_or_else(|| anyhow!("the control plane is stopped"))?;
            let child = spawn_logged(cmd, &log_path)?;
            writeln!(procs.watchdog_stdin, "{}", child.id())
                .context("telling the watchdog about a process")?;
            procs.forwarders.push(child);
        }
        wait_for_log_line(&log_path, "listening on", Duration::from_secs(10)).await
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
            for forwarder in &mut p.forwarders {
                terminate(forwarder);
            }
            terminate(&mut p.apiserver);
            terminate(&mut p.etcd);
            // Our children are reaped now; stop the watchdog before it signals their (free) pids.
            let _ = p.watchdog.kill();
            let _ = p.watchdog.wait();
            drop(p.watchdog_stdin);
            if let Some(netns) = &self.netns {
                delete_netns(netns);
            }
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
    netns: Option<String>,
    watchdog: Option<(Child, ChildStdin)>,
    /// etcd, then kube-apiserver, then (aggregation mode) the API server's forwarders.
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
            if let Some(netns) = &self.netns {
                delete_netns(netns);
            }
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
        // The aggregation layer's own CA: extension API servers trust requests carrying the
        // user in headers only from a client certificate it signed.
        let front_proxy_ca = Ca::new("streamgate-testenv-front-proxy-ca")?;
        let front_proxy = front_proxy_ca.client(FRONT_PROXY_CLIENT, None)?;
        let files = [
            ("front-proxy-ca.crt", front_proxy_ca.cert_pem()),
            ("front-proxy-client.crt", front_proxy.cert_pem),
            ("front-proxy-client.key", front_proxy.key_pem),
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

        if let Some(netns) = &self.netns {
            create_netns(netns)?;
        }
        let netns = self.netns.clone();
        let in_netns = |program: &Path| match &netns {
            Some(netns) => nsenter(netns, program),
            None => Command::new(program),
        };

        // etcd
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd = in_netns(&bins.etcd);
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
        if self.netns.is_none() {
            wait_for_etcd(&mut self.children[0], etcd_client, &dir).await?;
        } // else unreachable from here: kube-apiserver's /readyz below checks etcd too.

        // kube-apiserver
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let p = |name: &str| dir.join(name).display().to_string();
        let mut apiserver = in_netns(&bins.kube_apiserver);
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
        if self.netns.is_some() {
            apiserver
                .arg(format!(
                    "--requestheader-client-ca-file={}",
                    p("front-proxy-ca.crt")
                ))
                .arg(format!(
                    "--requestheader-allowed-names={FRONT_PROXY_CLIENT}"
                ))
                .arg("--requestheader-username-headers=X-Remote-User")
                .arg("--requestheader-group-headers=X-Remote-Group")
                .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
                .arg(format!(
                    "--proxy-client-cert-file={}",
                    p("front-proxy-client.crt")
                ))
                .arg(format!(
                    "--proxy-client-key-file={}",
                    p("front-proxy-client.key")
                ))
                // No kube-proxy: dial an APIService's endpoint addresses, not its cluster IP.
                .arg("--enable-aggregator-routing=true");
        }
        self.spawn(apiserver, "kube-apiserver")?;
        if let Some(netns) = &self.netns {
            // The host reaches the API server through a unix socket, which both network
            // namespaces share; it listens on the same port number on the host's loopback.
            let socket = dir.join("apiserver.sock");
            let mut inner = nsenter(netns, "socat");
            inner
                .arg("-d")
                .arg("-d")
                .arg(format!(
                    "UNIX-LISTEN:{},fork,unlink-early",
                    socket.display()
                ))
                .arg(format!("TCP:127.0.0.1:{apiserver_port}"));
            self.spawn(inner, "apiserver-forwarder-netns")?;
            wait_for_log_line(
                &dir.join("apiserver-forwarder-netns.log"),
                "listening on",
                Duration::from_secs(10),
            )
            .await?;
            let mut host = Command::new("socat");
            host.arg("-d")
                .arg("-d")
                .arg(format!(
                    "TCP-LISTEN:{apiserver_port},bind=127.0.0.1,fork,reuseaddr"
                ))
                .arg(format!("UNIX-CONNECT:{}", socket.display()));
            self.spawn(host, "apiserver-forwarder-host")?;
            wait_for_log_line(
                &dir.join("apiserver-forwarder-host.log"),
                "listening on",
                Duration::from_secs(10),
            )
            .await?;
        }

        let kubeconfig_path = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig_path, &server, &dir)?;
        wait_for_apiserver(&mut self.children[1], &kubeconfig_path, &dir).await?;
        Ok((kubeconfig_path, server))
    }

    fn spawn(&mut self, cmd: Command, name: &str) -> Result<()> {
        let child = spawn_logged(cmd, &self.dir.join(format!("{name}.log")))?;
        let (_, stdin) = self.watchdog.as_mut().expect("watchdog");
        let pid = child.id();
        self.children.push(child);
        writeln!(stdin, "{pid}").context("telling the watchdog about a process")?;
        Ok(())
    }
}

/// Runs `cmd` with stdout and stderr into `log_path`.
fn spawn_logged(mut cmd: Command, log_path: &Path) -> Result<Child> {
    let log = std::fs::File::create(log_path).context("creating a log file")?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))
}

/// A network namespace name unique on this machine while this process lives.
fn new_netns_name() -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("sgtest-{}-{n}", std::process::id())
}

/// `program` run inside the network namespace `netns` (nsenter execs it: same pid).
fn nsenter(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Creates the network namespace with its loopback device up, carrying [`EXTENSION_ADDRESS`].
fn create_netns(netns: &str) -> Result<()> {
    let ip = |args: &[&str]| -> Result<()> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("running ip (iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip {} failed (aggregation mode needs root): {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    ip(&["netns", "add", netns])?;
    let address = format!("{EXTENSION_ADDRESS}/32");
    let configured = ip(&["-n", netns, "link", "set", "lo", "up"])
        .and_then(|()| ip(&["-n", netns, "addr", "add", &address, "dev", "lo"]));
    if configured.is_err() {
        delete_netns(netns);
    }
    configured
}

fn delete_netns(netns: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", netns])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits until `needle` appears in the log file (socat -d -d says "listening on").
async fn wait_for_log_line(path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|text| text.contains(needle)) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "no {needle:?} in {} within {timeout:?}:\n{}",
                path.display(),
                log_tail(path, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
