//! Helpers shared by the operator's integration tests that run the operator binary.

use std::process::Child;
use std::time::Duration;

use anyhow::{Context as _, Result};

/// Reads the operator's log from its piped stdout until it reports the address it serves health
/// and metrics on (it binds port 0, so no port is picked beforehand and hoped free), then keeps
/// draining the pipe in the background so the operator never blocks on it.
pub fn reported_metrics_addr(child: &mut Child) -> Result<std::net::SocketAddr> {
    use std::io::BufRead as _;
    let stdout = child
        .stdout
        .take()
        .context("the operator's stdout is piped")?;
    let (found, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("serving health and metrics")
                && let Some(at) = line.find("127.0.0.1:")
            {
                let rest = &line[at + "127.0.0.1:".len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let (Some(found), Ok(port)) = (found.take(), digits.parse::<u16>()) {
                    let _ = found.send(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
                }
            }
        }
    });
    reported
        .recv_timeout(Duration::from_secs(60))
        .context("the operator did not report its metrics address")
}
