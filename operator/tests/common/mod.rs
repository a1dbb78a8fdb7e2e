//! Helpers shared by the operator's integration tests that run the operator binary.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context as _, Result};

/// Reads the operator's log from its piped stdout until it reports the address it serves health
/// and metrics on (it binds port 0, so no port is picked beforehand and hoped free), then keeps
/// draining the pipe in the background so the operator never blocks on it.
pub fn reported_metrics_addr(child: &mut Child) -> Result<SocketAddr> {
    Ok(reported_addrs(child, &["serving health and metrics"])?[0])
}

/// Reads the operator's log from its piped stdout until each of `messages` (a listener's start-up
/// line) has been logged with its loopback address; returns the addresses in the order of
/// `messages`. The pipe is drained in the background afterwards so the operator never blocks on it.
pub fn reported_addrs(child: &mut Child, messages: &[&'static str]) -> Result<Vec<SocketAddr>> {
    use std::io::BufRead as _;
    let stdout = child
        .stdout
        .take()
        .context("the operator's stdout is piped")?;
    let (found, reported) = std::sync::mpsc::channel();
    let wanted = messages.to_vec();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let Some(index) = wanted.iter().position(|message| line.contains(message)) else {
                continue;
            };
            if let Some(at) = line.find("127.0.0.1:") {
                let rest = &line[at + "127.0.0.1:".len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(port) = digits.parse::<u16>() {
                    let _ = found.send((index, SocketAddr::from(([127, 0, 0, 1], port))));
                }
            }
        }
    });
    let mut addrs: Vec<Option<SocketAddr>> = vec![None; messages.len()];
    while addrs.iter().any(Option::is_none) {
        let (index, addr) = reported
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("the operator did not report all of {messages:?}"))?;
        addrs[index] = Some(addr);
    }
    Ok(addrs.into_iter().flatten().collect())
}

/// Holds a loopback port bound but not listening, so connections to it are refused and no other
/// process can take it while the test runs (a port released after binding could be reused).
pub fn refusing_port() -> Result<(tokio::net::TcpSocket, u16)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let port = socket.local_addr()?.port();
    Ok((socket, port))
}
