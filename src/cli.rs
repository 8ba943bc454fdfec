//! The command line. Doc comments here are the `--help` text.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Build large-language-model weights the way software is built: stack LoRA adapters into a
/// base model from a declarative recipe, exactly, incrementally and reproducibly.
#[derive(Debug, Parser)]
#[command(name = "modelforge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the outputs a recipe declares, reusing every cached result.
    Build(BuildArgs),
    /// Show what a build would do, and why, without doing it.
    Plan(PlanArgs),
    /// Re-hash a recipe's output and compare it with the lock file.
    Verify(VerifyArgs),
    /// Upload the node results a recipe's build uses, from the local cache, to the remote
    /// cache (what `build --push` does after building).
    Push(PushArgs),
    /// Describe a model or a PEFT adapter directory.
    Inspect(InspectArgs),
    /// How likely a model finds each text of a file: its log-likelihood, by the model's own
    /// tokenizer and forward pass (LLaMA, Mistral, Qwen2 and Phi-3 families).
    Score(ScoreArgs),
    /// Remove cache entries: unused for longer than `--older-than`, then the least recently
    /// used until the cache fits in `--max-size`.
    Gc {
        #[command(flatten)]
        cache: CacheArgs,
        /// Largest size the cache may keep, e.g. `20GB`.
        #[arg(long, value_parser = crate::io::size::parse_size)]
        max_size: Option<u64>,
        /// Remove what no build used for this long, e.g. `30d`, `12h`.
        #[arg(long, value_parser = crate::store::parse_duration)]
        older_than: Option<Duration>,
    },
    /// Inspect the cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Objects, actions and file digests in the cache, and their size.
    Stats {
        #[command(flatten)]
        cache: CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object and check every action; exits non-zero if an object's bytes do
    /// not match its digest.
    Verify {
        #[command(flatten)]
        cache: CacheArgs,
        /// Remove damaged objects and the actions that point at them (the next build
        /// recomputes them).
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where the cache is, and whether to trust its record of file digests.
#[derive(Debug, Args, Clone, Default)]
pub struct CacheArgs {
    /// The cache directory (default: MODELFORGE_CACHE, else `cache/` at the top of the
    /// recipe's workspace, the nearest folder above it with `.git` or `cache/`).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Hash every input in full instead of trusting unchanged size, inode and mtime.
    #[arg(long)]
    pub rehash: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe (TOML). Relative paths inside it resolve against its folder.
    pub recipe: PathBuf,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// An architecture schema (TOML, like those in arch/) to know besides the shipped ones;
    /// repeatable. A schema named like a shipped one replaces it.
    #[arg(long = "arch", value_name = "FILE")]
    pub arch: Vec<PathBuf>,
    /// Fail if the recipe or any input differs from the lock file.
    #[arg(long)]
    pub locked: bool,
    /// Flush cache objects and the output's weights to disk before they are recorded or
    /// replace the previous output, so that they survive a power loss (slower: everything
    /// written waits for the disk).
    #[arg(long)]
    pub fsync: bool,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary of the build on stdout.
    #[arg(long)]
    pub json: bool,
    /// Fuse adapters holding NaN or infinity, and write fused tensors that hold them, instead of
    /// failing (both are errors by default).
    #[arg(long)]
    pub allow_non_finite: bool,
    /// Memory the engine may use for tensors in flight, e.g. `512MB` or `4GiB` (default 64MiB).
    /// Larger budgets compute larger blocks of rows at once; the engine's peak memory is this
    /// plus LibTorch's fixed overhead.
    #[arg(long, value_name = "SIZE", value_parser = crate::io::size::parse_size)]
    pub max_memory: Option<u64>,
    /// A shared remote cache, `s3://BUCKET/PREFIX` (configured by the standard AWS variables:
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP)
    /// or `file:///DIR`; default MODELFORGE_REMOTE, else `[remote] url` in the workspace's
    /// `modelforge.toml` (the nearest above the recipe). What the local cache lacks is pulled from
    /// it before anything is computed; it is never written without `--push`.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Upload what this build made (and pulled) to the remote cache.
    #[arg(long)]
    pub push: bool,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// An architecture schema to know besides the shipped ones; repeatable.
    #[arg(long = "arch", value_name = "FILE")]
    pub arch: Vec<PathBuf>,
    /// The remote cache, `s3://BUCKET/PREFIX` or `file:///DIR`; default MODELFORGE_REMOTE, else
    /// `[remote] url` in the workspace's `modelforge.toml`.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// An architecture schema (TOML, like those in arch/) to know besides the shipped ones;
    /// repeatable. A schema named like a shipped one replaces it.
    #[arg(long = "arch", value_name = "FILE")]
    pub arch: Vec<PathBuf>,
    /// How to print the plan.
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    pub format: PlanFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
    Dot,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The recipe whose output and lock file to compare.
    pub recipe: PathBuf,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A Hugging Face model directory with its tokenizer.json.
    pub model: PathBuf,
    /// A UTF-8 file of texts, one per line (empty lines are skipped).
    #[arg(long)]
    pub texts: PathBuf,
    /// A PEFT LoRA adapter of the model, added to its weights as they are read (as
    /// `merge_and_unload` would merge it).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Where to compute: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: modelforge_core::job::Device,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face model directory or a PEFT adapter directory.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
