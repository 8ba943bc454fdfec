//! The command line. Doc comments here are the `--help` text.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Build large-language-model weights the way software is built: stack LoRA adapters into a
/// base model from a declarative recipe, exactly and reproducibly.
#[derive(Debug, Parser)]
#[command(name = "modelforge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the outputs a recipe declares.
    Build(BuildArgs),
    /// Describe a model or a PEFT adapter directory.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe (TOML). Relative paths inside it resolve against its folder.
    pub recipe: PathBuf,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary of the build on stdout.
    #[arg(long)]
    pub json: bool,
    /// Memory the build may use for tensors in flight, e.g. `512MB` or `4GiB` (default 64MiB).
    /// Larger budgets compute larger blocks of rows at once; the build's peak memory is this
    /// plus LibTorch's fixed overhead.
    #[arg(long, value_name = "SIZE", value_parser = crate::io::size::parse_size)]
    pub max_memory: Option<u64>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face model directory or a PEFT adapter directory.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
