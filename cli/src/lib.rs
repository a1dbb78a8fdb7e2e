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
pub mod token;
pub mod validator;

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
        Command::Token(command) => run_token(command),
        Command::Validator(args) => validator::run(args).await,
        Command::Compare(args) => {
            let baseline = read_report(&args.baseline, "--baseline")?;
            let candidate = read_report(&args.candidate, "--candidate")?;
            let comparison = report::compare(&baseline, &candidate);
            print(cli.output, &comparison, report::format_comparison)
        }
    }
}

/// `streamctl token`: no sidecar involved.
fn run_token(command: &args::TokenCommand) -> anyhow::Result<()> {
    match command {
        args::TokenCommand::Keygen(args) => {
            let key = token::TestKey::generate(args.alg, &args.kid)?;
            std::fs::create_dir_all(&args.out_dir)
                .with_context(|| format!("--out-dir {}: cannot create", args.out_dir.display()))?;
            let key_path = args.out_dir.join(format!("{}.key.pem", args.kid));
            let jwks_path = args.out_dir.join("jwks.json");
            write_private(&key_path, &key.private_pem())
                .with_context(|| format!("--out-dir: cannot write {}", key_path.display()))?;
            std::fs::write(&jwks_path, token::jwks(&[&key]))
                .with_context(|| format!("--out-dir: cannot write {}", jwks_path.display()))?;
            println!("{}", key_path.display());
            println!("{}", jwks_path.display());
            Ok(())
        }
        args::TokenCommand::Mint(args) => {
            let pem = std::fs::read_to_string(&args.key)
                .with_context(|| format!("--key {}: cannot read", args.key.display()))?;
            let key = token::TestKey::from_pem(args.alg, &args.kid, &pem)
                .with_context(|| format!("--key {}", args.key.display()))?;
            let claims = token::claims(
                &args.issuer,
                &args.sub,
                args.audience.as_deref(),
                args.ttl.as_secs() as i64,
                &args.claims,
            )?;
            println!("{}", key.sign(&claims)?);
            Ok(())
        }
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
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
