//! A real single-node cluster (control plane, containerd, kubelet, kube-proxy, CoreDNS) inside a
//! network namespace of its own, run by `testenv/node-run`.
//!
//! The node's processes, pods and Service IPs are only reachable inside that namespace: the
//! API server is forwarded to the host's loopback for kubectl, helm and [`kube::Client`], and
//! [`Node::in_netns`] runs a command inside the namespace for everything else (curl, streamctl).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::binaries::Binaries;

/// How long the node may take to come up (control plane, images, kubelet Ready). Generous: on a
/// 2-core CI machine it starts while other test binaries may still be compiling.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// The images and binaries `testenv/images` wrote.
#[derive(Clone, Debug)]
pub struct NodeImages {
    /// Directory with `IMAGE.tar` archives and `bin/`.
    pub dir: PathBuf,
    /// Tag of the project's images (the workspace version).
    pub tag: String,
}

impl NodeImages {
    /// From `$STREAMGATE_NODE_IMAGES` (set by `eval "$(testenv/images)"`).
    pub fn locate() -> Result<Self> {
        let dir = std::env::var_os("STREAMGATE_NODE_IMAGES")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| {
                anyhow!(
                    "STREAMGATE_NODE_IMAGES is not set: run `eval \"$(testenv/build-node)\"; eval \"$(testenv/images)\"` first"
                )
            })?;
        let tag = std::env::var("STREAMGATE_IMAGE_TAG")
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
        if !dir.join("streamgate-sidecar.tar").is_file() {
            bail!(
                "{} holds no streamgate-sidecar.tar: run testenv/images",
                dir.display()
            );
        }
        Ok(Self { dir, tag })
    }

    /// Every archive in the directory.
    pub fn archives(&self) -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        v.sort();
        Ok(v)
    }

    /// The image reference of one of the project's images, e.g. `streamgate-sidecar`.
    pub fn image(&self, name: &str) -> String {
        format!("localhost/streamgate/{name}:{}", self.tag)
    }

    /// A binary the images were made from (`streamctl`, ...), to run inside the namespace.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }
}

/// What `testenv/node-run` reported once the node was Ready.
#[derive(Clone, Debug)]
struct NodeEnv {
    kubeconfig: PathBuf,
    netns: PathBuf,
    holder_pid: u32,
    cgroup: String,
    pids: Vec<u32>,
}

fn parse_env(text: &str) -> Result<NodeEnv> {
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| {
                l.strip_prefix("export ")?
                    .strip_prefix(key)?
                    .strip_prefix('=')
            })
            .map(|v| v.trim_matches('"').to_string())
            .next()
            .ok_or_else(|| anyhow!("node env has no {key}"))
    };
    Ok(NodeEnv {
        kubeconfig: get("KUBECONFIG")?.into(),
        netns: get("STREAMGATE_NODE_NETNS")?.into(),
        holder_pid: get("STREAMGATE_NODE_HOLDER_PID")?.parse()?,
        cgroup: get("STREAMGATE_NODE_CGROUP")?,
        pids: get("STREAMGATE_NODE_PIDS")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?,
    })
}

/// A running single-node cluster. Dropping it (or [`Node::stop`]) tears it down completely:
/// processes, pods, network namespace, cgroups and files. If the test process dies first,
/// `node-run` sees its stdin close and does the same.
pub struct Node {
    dir: PathBuf,
    env: NodeEnv,
    binaries: Binaries,
    images: NodeImages,
    run: Mutex<Option<(Child, ChildStdin)>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("dir", &self.dir)
            .field("netns", &self.env.netns)
            .finish_non_exhaustive()
    }
}

/// `testenv/node-run` in this source tree.
fn node_run_script() -> PathBuf {
    crate::workspace_root().join("testenv/node-run")
}

impl Node {
    /// Starts a node with the images from [`NodeImages::locate`] imported.
    pub async fn start() -> Result<Self> {
        let images = NodeImages::locate()?;
        let binaries = Binaries::locate()?;
        let dir = tempfile::Builder::new()
            .prefix("streamgate-node-")
            .tempdir()
            .context("creating a temporary directory")?
            .keep();
        let mut cmd = Command::new("bash");
        cmd.arg(node_run_script())
            .arg(&dir)
            .args(images.archives()?)
            .env("STREAMGATE_NODE_WATCH_STDIN", "1")
            // A shared node is never dropped: node-run removes its files itself at the end.
            .env("STREAMGATE_NODE_REMOVE_STATE", "1")
            .env("STREAMGATE_K8S_BIN", &binaries.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.with_extension("log"))
                    .context("creating the node's log")?,
            ));
        let mut child = cmd.spawn().context("running testenv/node-run")?;
        let stdin = child.stdin.take().expect("piped stdin");
        let started = Instant::now();
        let log_path = dir.with_extension("log");
        loop {
            if dir.join("ready").exists() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                let mut log = String::new();
                let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut log));
                let _ = std::fs::remove_file(&log_path);
                bail!("testenv/node-run exited ({status}) before the node was Ready:\n{log}");
            }
            if started.elapsed() > START_TIMEOUT {
                drop(stdin);
                let _ = child.wait();
                bail!(
                    "the node was not Ready within {START_TIMEOUT:?}; log: {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let env = parse_env(&std::fs::read_to_string(dir.join("env"))?)?;
        Ok(Self {
            dir,
            env,
            binaries,
            images,
            run: Mutex::new(Some((child, stdin))),
        })
    }

    /// Admin kubeconfig (the API server forwarded to `https://127.0.0.1:PORT`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.env.kubeconfig
    }

    /// The node's working directory (logs in `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The images this node imported.
    pub fn images(&self) -> &NodeImages {
        &self.images
    }

    /// `/proc/PID/ns/net` of the node's network namespace.
    pub fn netns(&self) -> &Path {
        &self.env.netns
    }

    /// The node's cgroup, `/streamgate-node-ID`, in every hierarchy.
    pub fn cgroup(&self) -> &str {
        &self.env.cgroup
    }

    /// Process ids of the node's daemons and of the namespace holder.
    pub fn pids(&self) -> Vec<u32> {
        let mut p = self.env.pids.clone();
        p.push(self.env.holder_pid);
        p
    }

    /// A new admin client; one per test (per tokio runtime).
    pub async fn client(&self) -> Result<Client> {
        crate::install_crypto_provider();
        let kubeconfig = Kubeconfig::read_from(&self.env.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("loading the node's kubeconfig")?;
        Client::try_from(config).context("creating a kube client")
    }

    /// `kubectl` with `KUBECONFIG` set to this node.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.kubectl);
        cmd.env("KUBECONFIG", &self.env.kubeconfig);
        cmd
    }

    /// `helm` with `KUBECONFIG` set to this node and its own dirs kept in the node's directory.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.helm);
        cmd.env("KUBECONFIG", &self.env.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        cmd
    }

    /// `program` run inside the node's network namespace (where pod and Service IPs are
    /// routable); the mount namespace stays the host's, so host paths work as usual.
    pub fn in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.env.netns.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Stops the node and waits until it is torn down.
    pub fn stop(self) {}

    fn stop_inner(&self) {
        let taken = self.run.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((mut child, stdin)) = taken {
            // EOF on its stdin is the stop signal; it then tears everything down and exits.
            drop(stdin);
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(self.dir.with_extension("log"));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

static SHARED_NODE: tokio::sync::OnceCell<std::result::Result<Node, String>> =
    tokio::sync::OnceCell::const_new();

/// The node shared by every test in this test binary, started on first use and torn down
/// when the test binary exits (its `node-run` sees stdin close). If it cannot start, every
/// caller gets the reason as an error.
pub async fn shared_node() -> Result<&'static Node> {
    let started = SHARED_NODE
        .get_or_init(|| async { Node::start().await.map_err(|e| format!("{e:#}")) })
        .await;
    started
        .as_ref()
        .map_err(|e| anyhow!("the shared test node is not running: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_env_is_parsed() {
        let env = parse_env(
            "export KUBECONFIG=/t/kubeconfig\nexport STREAMGATE_NODE_NETNS=/proc/7/ns/net\n\
             export STREAMGATE_NODE_HOLDER_PID=7\nexport STREAMGATE_NODE_CGROUP=/streamgate-node-ab\n\
             export STREAMGATE_NODE_PIDS=\"8 9 10\"\n",
        )
        .unwrap();
        assert_eq!(env.holder_pid, 7);
        assert_eq!(env.pids, vec![8, 9, 10]);
        assert_eq!(env.cgroup, "/streamgate-node-ab");
        assert_eq!(env.netns, PathBuf::from("/proc/7/ns/net"));
    }
}
