//! The control plane leaves no processes behind: neither when dropped nor when the process
//! that started it is killed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use streamgate_testenv::ControlPlane;

/// Whether `pid` is a live process (a zombie waiting for init to reap it is not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(pids: &[u32], dir: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while pids.iter().any(|&p| running(p)) || dir.exists() {
        if start.elapsed() > timeout {
            let alive: Vec<_> = pids.iter().filter(|&&p| running(p)).collect();
            bail!(
                "after {timeout:?}: still running {alive:?}, {} exists: {}",
                dir.display(),
                dir.exists()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[tokio::test]
async fn dropping_a_control_plane_stops_its_processes() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let pids = cp.pids();
    let dir = cp.dir().to_path_buf();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| running(p)));
    assert_eq!(
        cp.client().await?.apiserver_version().await?.git_version,
        "v1.37.2"
    );
    drop(cp);
    wait_gone(&pids, &dir, Duration::from_secs(1))
}

/// What stops the shared control plane when a test binary exits: its watchdog.
#[test]
fn killing_the_owner_lets_the_watchdog_stop_everything() -> Result<()> {
    let state = tempfile::tempdir()?;
    let mut owner = Command::new(env!("CARGO_BIN_EXE_streamgate-testenv"))
        .arg("up")
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;

    let pids_file = state.path().join("kubeconfig");
    let start = Instant::now();
    while !pids_file.exists() {
        if let Some(status) = owner.try_wait()? {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut owner.stderr.take().unwrap(), &mut err)?;
            bail!("streamgate-testenv up exited ({status}): {err}");
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = owner.kill();
            bail!("streamgate-testenv up was not ready within 180s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids: Vec<u32> = std::fs::read_to_string(state.path().join("pids"))?
        .lines()
        .skip(1) // the owner itself
        .map(|l| l.parse().context("pid"))
        .collect::<Result<_>>()?;
    assert_eq!(pids.len(), 2);
    let kubeconfig = std::fs::read_to_string(&pids_file)?;
    let cp_dir = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority: "))
        .and_then(|ca| Path::new(ca).parent().map(Path::to_path_buf))
        .context("no certificate-authority path in the kubeconfig")?;
    assert!(pids.iter().all(|&p| running(p)));

    owner.kill()?; // SIGKILL: no destructor runs
    owner.wait()?;
    wait_gone(&pids, &cp_dir, Duration::from_secs(10))
}

/// A control plane that cannot start fails with the reason, quoting the failing process's log.
#[tokio::test]
async fn a_failing_api_server_is_reported_with_its_log() -> Result<()> {
    let real = streamgate_testenv::Binaries::locate()?;
    let fake = tempfile::tempdir()?;
    let script = fake.path().join("kube-apiserver");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'E0101 fake kube-apiserver: cannot start' >&2\nexit 3\n",
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let bins = streamgate_testenv::Binaries {
        kube_apiserver: script,
        ..real
    };
    let err = ControlPlane::start_with(bins)
        .await
        .expect_err("a kube-apiserver that exits at once cannot make a control plane");
    let msg = format!("{err:#}");
    assert!(msg.contains("kube-apiserver exited"), "{msg}");
    assert!(msg.contains("fake kube-apiserver: cannot start"), "{msg}");
    Ok(())
}
