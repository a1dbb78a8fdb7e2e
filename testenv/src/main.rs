//! `streamgate-testenv up`: runs a test control plane in the foreground for development, until
//! SIGTERM or SIGINT. `testenv/up` and `testenv/down` wrap it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use streamgate_testenv::ControlPlane;
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: streamgate-testenv up --state-dir DIR

Starts etcd + kube-apiserver on loopback (binaries from testenv/build) and writes into DIR:
  kubeconfig  admin kubeconfig for kubectl, helm and kube-rs
  env         `export KUBECONFIG=...` and the binaries' directory, for `source`
  pids        this process, etcd and kube-apiserver
Runs until SIGTERM or SIGINT, then stops everything and removes those files.";

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let state_dir = match args.as_slice() {
        [cmd, flag, dir] if cmd == "up" && flag == "--state-dir" => PathBuf::from(dir),
        _ => bail!("{USAGE}"),
    };
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    // Register before starting so a signal during the (slow) start is not lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let cp = ControlPlane::start().await?;
    let kubeconfig = state_dir.join("kubeconfig");
    // Write-then-rename: testenv/up waits for the file to appear and must not read half of it.
    let tmp = state_dir.join("kubeconfig.tmp");
    std::fs::copy(cp.kubeconfig_path(), &tmp)?;
    let pids = std::iter::once(std::process::id())
        .chain(cp.pids())
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(state_dir.join("pids"), pids + "\n")?;
    std::fs::write(
        state_dir.join("env"),
        format!(
            "export KUBECONFIG={}\nexport STREAMGATE_K8S_BIN={}\n",
            kubeconfig.display(),
            cp.binaries().dir.display()
        ),
    )?;
    std::fs::rename(&tmp, &kubeconfig)?;
    println!("{}", kubeconfig.display());
    eprintln!(
        "streamgate-testenv: API server {} ready; kubeconfig {}",
        cp.server_url(),
        kubeconfig.display()
    );

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("streamgate-testenv: stopping");
    for name in ["kubeconfig", "env", "pids"] {
        let _ = std::fs::remove_file(state_dir.join(name));
    }
    cp.stop();
    Ok(())
}
