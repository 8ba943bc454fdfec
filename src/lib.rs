//! modelforge: a declarative model-assembly build system.
//!
//! Data flows one way: `recipe` (TOML, validated once) → `plan` (what each output tensor is made
//! of) → `exec` (streams tensors through the `backend`) → `output` (an atomic, deterministic
//! Hugging Face model directory). `io` reads and writes the file formats the stages share.

// Diagnostics carry the recipe's source so that they can quote it; they are large, and only on
// the path that ends the program.
#![allow(clippy::result_large_err)]

pub mod cli;

pub(crate) mod backend;
pub(crate) mod exec;
pub(crate) mod inspect;
pub(crate) mod io;
pub(crate) mod output;
pub(crate) mod plan;
pub(crate) mod recipe;

use cli::{Cli, Command};

/// Runs one command. Every failure comes back as a report that says what is wrong, where and
/// what to do about it; `main` prints it and exits non-zero.
pub fn run(cli: Cli) -> miette::Result<()> {
    match cli.command {
        Command::Build(args) => exec::build(&args),
        Command::Inspect(args) => inspect::inspect(&args),
    }
}
