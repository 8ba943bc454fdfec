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

/// `print!` for what a command prints on standard output. A reader that stops reading
/// (`modelforge plan RECIPE | head`) is no error and no panic: what is left is dropped. Any other
/// failure to write (a full disk) is said once on standard error, and the command exits non-zero
/// ([`stdout_failed`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

static STDOUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn write_out(text: std::fmt::Arguments) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let written = std::io::stdout()
        .lock()
        .write_fmt(text)
        .and_then(|()| std::io::stdout().lock().flush());
    match written {
        Err(e)
            if e.kind() != std::io::ErrorKind::BrokenPipe
                && !STDOUT_FAILED.swap(true, Ordering::Relaxed) =>
        {
            eprintln!("modelforge: cannot write to standard output: {e}")
        }
        _ => {}
    }
}

/// Whether something the command printed could not be written (other than to a reader that
/// stopped reading).
pub fn stdout_failed() -> bool {
    STDOUT_FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

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
pub(crate) mod remote;
pub(crate) mod score;
pub(crate) mod settings;
pub(crate) mod verify;

use cli::{CacheCommand, Cli, Command};

/// Runs one command, its arguments converted once into what execution asks for. Every failure
/// comes back as a report that says what is wrong, where and what to do about it; `main` prints
/// it and exits non-zero.
pub fn run(cli: Cli) -> miette::Result<()> {
    let cache = |args: cli::CacheArgs| exec::CacheOptions {
        dir: args.cache,
        rehash: args.rehash,
    };
    match cli.command {
        Command::Build(args) => exec::build(&exec::BuildOptions {
            remote: settings::remote(args.remote, &args.recipe)?,
            recipe: args.recipe,
            cache: cache(args.cache),
            arch: args.arch,
            locked: args.locked,
            fsync: args.fsync,
            quiet: args.quiet,
            json: args.json,
            check_finite: !args.allow_non_finite,
            max_memory: args.max_memory,
            push: args.push,
        }),
        Command::Plan(args) => exec::plan(&exec::PlanOptions {
            recipe: args.recipe,
            cache: cache(args.cache),
            arch: args.arch,
            format: match args.format {
                cli::PlanFormat::Text => exec::PlanFormat::Text,
                cli::PlanFormat::Json => exec::PlanFormat::Json,
                cli::PlanFormat::Dot => exec::PlanFormat::Dot,
            },
        }),
        Command::Verify(args) => exec::verify(&args.recipe),
        Command::Push(args) => exec::push_built(&exec::PushOptions {
            remote: settings::remote(args.remote, &args.recipe)?,
            recipe: args.recipe,
            cache: cache(args.cache),
            arch: args.arch,
        }),
        Command::Inspect(args) => inspect::inspect(&args.path, args.json),
        Command::Score(args) => score::score(
            &args.model,
            args.adapter.as_deref(),
            &args.texts,
            args.device,
            args.json,
        ),
        Command::Gc {
            cache: dir,
            max_size,
            older_than,
        } => exec::gc(&cache(dir), max_size, older_than),
        Command::Cache(CacheCommand::Stats { cache: dir, json }) => {
            exec::cache_stats(&cache(dir), json)
        }
        Command::Cache(CacheCommand::Verify {
            cache: dir,
            repair,
            json,
        }) => exec::cache_verify(&cache(dir), repair, json),
    }
}
