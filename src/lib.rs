//! modelforge: a declarative model-assembly build system.
//!
//! Data flows one way: `recipe` (TOML, validated once) → `plan` (what each output tensor is made
//! of, keyed by digests) → `exec` (what the `store` already holds, the rest computed by the
//! separate `modelforge-engine`, which alone links LibTorch) → `output` (an atomic,
//! deterministic Hugging Face model directory, and the `lock` file). `io` reads and writes the
//! file formats the stages share; `digest` gives digests their types.

// Diagnostics carry the recipe's source so that they can quote it; they are large, and only on
// the path that ends the program.
#![allow(clippy::result_large_err)]

/// Entry points for the micro-benchmarks in benches/; not a stable API.
#[doc(hidden)]
pub mod benching;
pub mod cli;
/// Entry points for the fuzz targets in fuzz/; not a stable API.
#[doc(hidden)]
pub mod fuzzing;

pub mod exec;
pub use modelforge_core::{digest, store};

pub(crate) mod arch;
pub(crate) mod inspect;
pub(crate) mod io;
pub(crate) mod lock;
pub(crate) mod output;
pub(crate) mod plan;
pub(crate) mod recipe;
pub(crate) mod verify;

use cli::{CacheCommand, Cli, Command};

/// Runs one command. Every failure comes back as a report that says what is wrong, where and
/// what to do about it; `main` prints it and exits non-zero.
pub fn run(cli: Cli) -> miette::Result<()> {
    match cli.command {
        Command::Build(args) => exec::build(&args),
        Command::Plan(args) => exec::plan(&args),
        Command::Verify(args) => exec::verify(&args),
        Command::Inspect(args) => inspect::inspect(&args),
        Command::Gc {
            cache,
            max_size,
            older_than,
        } => exec::gc(&cache, max_size, older_than),
        Command::Cache(CacheCommand::Stats { cache, json }) => exec::cache_stats(&cache, json),
        Command::Cache(CacheCommand::Verify {
            cache,
            repair,
            json,
        }) => exec::cache_verify(&cache, repair, json),
    }
}
