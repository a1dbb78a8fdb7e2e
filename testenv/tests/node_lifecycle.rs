//! The single-node cluster leaves the machine as it found it: kernel settings, mounts, network,
//! packet filter rules, cgroups, processes and files, both while it runs and after it is torn
//! down. Needs root and the node's binaries and images (see tests/node.rs).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use streamgate_testenv::Node;

/// Kernel settings kubelet would change (it wants 1, 0, 10, 1).
const KUBELET_SYSCTLS: [&str; 4] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
];

#[derive(Debug, PartialEq, Eq)]
struct HostState {
    sysctls: Vec<String>,
    /// Mount points of the host's mount namespace.
    mounts: BTreeSet<String>,
    /// Network interfaces, addresses and routes of the host's namespace.
    links: String,
    addrs: String,
    routes: String,
    /// The host's packet filter rules.
    iptables: String,
    nft: String,
    /// Top-level cgroups of the pids hierarchy, other nodes' aside.
    cgroups: BTreeSet<String>,
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn host_state() -> Result<HostState> {
    let sysctls = KUBELET_SYSCTLS
        .iter()
        .map(|k| {
            std::fs::read_to_string(format!("/proc/sys/{k}")).map(|v| format!("{k}={}", v.trim()))
        })
        .collect::<std::io::Result<_>>()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect();
    let cgroups = std::fs::read_dir("/sys/fs/cgroup/pids")?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Another test binary's node may be tearing down meanwhile; this node's own subtree is
        // checked by name.
        .filter(|n| !n.starts_with("streamgate-node-"))
        .collect();
    // Counters change with traffic; compare the rules only.
    let iptables = output("iptables-save", &[])?
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(HostState {
        sysctls,
        mounts,
        links: output("ip", &["-o", "link"])?
            .lines()
            .map(|l| {
                l.split(" link/")
                    .next()
                    .unwrap_or(l)
                    .replace("state UP", "")
                    .replace("state DOWN", "")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        addrs: output("ip", &["-o", "addr"])?,
        routes: output("ip", &["route"])?,
        iptables,
        nft: output("nft", &["list", "tables"])?,
        cgroups,
    })
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test]
async fn the_node_changes_nothing_on_the_machine_and_leaves_nothing_behind() -> Result<()> {
    let before = host_state()?;
    let started = Instant::now();
    let node = Node::start().await?;
    eprintln!("node Ready in {:?}", started.elapsed());

    // While it runs, with pods on it (the chart is not needed: a plain pod).
    let mut apply = node.kubectl();
    apply
        .args([
            "run",
            "pause",
            "--restart=Never",
            "--image-pull-policy=Never",
        ])
        .arg("--image=localhost/streamgate/pause:testenv");
    let out = apply.output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut wait = node.kubectl();
    let out = wait
        .args([
            "wait",
            "pod/pause",
            "--for=condition=Ready",
            "--timeout=120s",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "pod not Ready: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let running_state = host_state()?;
    assert_eq!(
        running_state, before,
        "the machine changed while the node runs"
    );

    let pids = node.pids();
    let dir = node.dir().to_path_buf();
    let cgroup = node.cgroup().to_string();
    let netns_inode = std::fs::metadata(node.netns()).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    })?;
    assert!(pids.iter().all(|&p| running(p)));
    let t = Instant::now();
    node.stop();
    eprintln!("node torn down in {:?}", t.elapsed());

    for p in &pids {
        assert!(!running(*p), "pid {p} still runs");
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
    for h in std::fs::read_dir("/sys/fs/cgroup")? {
        let h = h?.path();
        assert!(
            !h.join(cgroup.trim_start_matches('/')).exists(),
            "cgroup {cgroup} left in {}",
            h.display()
        );
    }
    // No process is left in the node's network namespace (it is gone with its last process).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let in_ns: Vec<String> = std::fs::read_dir("/proc")?
            .filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::metadata(e.path().join("ns/net"))
                    .map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        m.ino() == netns_inode
                    })
                    .unwrap_or(false)
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if in_ns.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left in the node's network namespace: {in_ns:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        host_state()?,
        before,
        "the machine changed after the node was torn down"
    );
    assert!(!Path::new(&format!("/sys/fs/cgroup/pids{cgroup}")).exists());
    Ok(())
}
