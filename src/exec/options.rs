//! What a command asks of execution, in its own terms: the command line's arguments are
//! converted into these once, in `run`, so that nothing below depends on clap.
use std::path::PathBuf;

/// Where the cache is, and whether to trust its record of file digests.
#[derive(Clone, Debug, Default)]
pub struct CacheOptions {
    /// The cache directory; `None`: MODELFORGE_CACHE, else the workspace's `cache/`.
    pub dir: Option<PathBuf>,
    /// Hash every input in full instead of trusting unchanged size, inode and mtime.
    pub rehash: bool,
}

/// `modelforge build`.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub recipe: PathBuf,
    pub cache: CacheOptions,
    /// Schema files to know besides the shipped ones.
    pub arch: Vec<PathBuf>,
    /// Fail if the recipe or an input differs from the lock file.
    pub locked: bool,
    /// Flush cache objects and outputs to disk before recording them.
    pub fsync: bool,
    /// Print nothing but errors (and the JSON summary, with `json`).
    pub quiet: bool,
    /// Print the summary as JSON on standard output.
    pub json: bool,
    /// Refuse NaN and infinity in adapters and fused tensors (the default).
    pub check_finite: bool,
    /// Bytes of tensor blocks the engine may hold in flight.
    pub max_memory: Option<u64>,
    /// The shared remote cache's address (`--remote`, else MODELFORGE_REMOTE, else the
    /// workspace's `modelforge.toml`).
    pub remote: Option<String>,
    /// Upload what the build made to the remote.
    pub push: bool,
}

/// `modelforge push`.
#[derive(Clone, Debug)]
pub struct PushOptions {
    pub recipe: PathBuf,
    pub cache: CacheOptions,
    pub arch: Vec<PathBuf>,
    pub remote: Option<String>,
}

/// How `modelforge plan` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanFormat {
    Text,
    Json,
    Dot,
}

/// `modelforge plan`.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub recipe: PathBuf,
    pub cache: CacheOptions,
    pub arch: Vec<PathBuf>,
    pub format: PlanFormat,
}
