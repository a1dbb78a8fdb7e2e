//! streamctl: simulate viewers, generate load and administer StreamGate sessions.
//!
//! The binary is a thin wrapper over [`run`]; each subcommand lives in its own module and returns
//! a report from [`report`], which is printed as text or JSON.
#![forbid(unsafe_code)]

pub mod args;
pub mod client;
pub mod load;
pub mod progress;
pub mod report;
pub mod simulate;
pub mod svg;

use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::args::{Cli, Command, Output};
use crate::client::{Client, Kick};
use crate::report::LoadReport;

/// Runs the command `cli` describes and prints its result on stdout.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // The pool must hold as many idle connections as load keeps in flight, or every burst would
    // pay for new connections.
    let pool = match &cli.command {
        Command::Load(load) => load.concurrency as usize,
        _ => 64,
    };
    let client = Client::new(&cli.endpoint, cli.timeout, pool)?;
    match &cli.command {
        Command::Simulate(args) => {
            if let Some(path) = &args.svg {
                check_writable_location(path)?;
            }
            let report = simulate::run(client, args, true).await?;
            if let Some(path) = &args.svg {
                std::fs::write(path, svg::render(&report)).with_context(|| {
                    format!("--svg {}: cannot write the picture", path.display())
                })?;
            }
            print(cli.output, &report, report::format_simulate)
        }
        Command::Load(args) => {
            let report = load::run(client, args, true).await?;
            print(cli.output, &report, report::format_load)
        }
        Command::Sessions(args) => {
            let client = Client::new(&cli.admin_endpoint, cli.timeout, pool)?;
            let list = client
                .sessions(&args.account)
                .await
                .map_err(|e| admin_error(&client, e))?;
            print(cli.output, &list, report::format_sessions)
        }
        Command::Kick(args) => {
            let id = &args.session_id;
            let client = Client::new(&cli.admin_endpoint, cli.timeout, pool)?;
            match client.kick(id).await.map_err(|e| admin_error(&client, e))? {
                Kick::Kicked => {
                    let result = serde_json::json!({ "sessionId": id, "kicked": true });
                    print(cli.output, &result, |_| format!("kicked session {id}\n"))
                }
                Kick::AlreadyGone(body) => bail!(
                    "session {id} was already cut ({})",
                    body.reason.as_deref().unwrap_or("gone")
                ),
                Kick::NotFound => bail!("no session {id} (404)"),
            }
        }
        Command::Compare(args) => {
            let baseline = read_report(&args.baseline, "--baseline")?;
            let candidate = read_report(&args.candidate, "--candidate")?;
            let comparison = report::compare(&baseline, &candidate);
            print(cli.output, &comparison, report::format_comparison)
        }
    }
}

/// Connection failures name the admin endpoint flag; other failures speak for themselves.
fn admin_error(client: &Client, error: client::ClientError) -> anyhow::Error {
    if error.transport_kind() == Some(client::TransportKind::Connect) {
        anyhow::anyhow!(
            "cannot reach the StreamGate admin API at {} (--admin-endpoint): {}; is the sidecar running, and is this its --admin-listen address?",
            client.base(),
            error.short()
        )
    } else {
        anyhow::anyhow!(error)
    }
}

fn read_report(path: &Path, flag: &str) -> anyhow::Result<LoadReport> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{flag} {}: not a `streamctl load --output json` report",
            path.display()
        )
    })
}

fn print<T: Serialize>(
    output: Output,
    value: &T,
    text: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Text => print!("{}", text(value)),
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// Fails before a run whose `--svg` picture could not be written: its folder must exist.
fn check_writable_location(path: &Path) -> anyhow::Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        bail!(
            "--svg {}: the folder {} does not exist",
            path.display(),
            folder.display()
        );
    }
    if path.is_dir() {
        bail!("--svg {}: is a folder, not a file", path.display());
    }
    Ok(())
}
