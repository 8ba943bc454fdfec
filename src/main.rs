//! The `modelforge` binary: parse the command line, run, turn the outcome into an exit code.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = modelforge::cli::Cli::parse();
    match modelforge::run(cli) {
        Ok(()) if modelforge::stdout_failed() => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::FAILURE
        }
    }
}
