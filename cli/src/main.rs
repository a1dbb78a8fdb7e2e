//! `streamctl`: flags in, report out. Exit status 0 when the command ran (refusals and cuts are
//! results), 1 when it could not (e.g. the endpoint is unreachable), 2 for bad flags.

use std::process::ExitCode;

use clap::Parser;
use streamctl::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("streamctl: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(streamctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("streamctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}
