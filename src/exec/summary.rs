//! What a build did, for people (one line) and scripts (`--json`).
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::Resolution;
use crate::digest::FileDigest;

/// Output tensors by what the build did for them.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Nodes {
    pub total: usize,
    /// Computed by the engine in this build.
    pub computed: usize,
    /// Taken from the cache.
    pub reused: usize,
    /// Copied byte for byte from an input.
    pub copied: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    pub output: String,
    pub up_to_date: bool,
    pub device: String,
    pub nodes: Nodes,
    /// Tensors changed by at least one adapter.
    pub fused: usize,
    pub files: Vec<String>,
    pub bytes: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
    /// How the output differs in shape from the base (untied embeddings, a resized vocabulary).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Modules placed in another layer or tensor, skipped or dropped (see transfer.txt).
    pub transferred: usize,
    /// Peak resident memory of `modelforge` itself and of the engine (when it ran), in bytes.
    pub peak_rss: PeakRss,
    /// What the transfer report says of each carried adapter: how much of its deltas
    /// survived, how alike the bases are, and what to expect.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub carried: Vec<crate::plan::Carried>,
    /// Where the time went, in seconds (absent for an up-to-date build).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
    /// Shards of the previous output kept as they were (hard-linked, not written again).
    pub shards_kept: usize,
    /// Node results taken from the remote cache (`--remote`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled: Option<crate::remote::Transfer>,
    /// Node results uploaded to the remote cache (`--push`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushed: Option<crate::remote::Transfer>,
}

/// Seconds spent in each phase of a build.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Phases {
    /// Reading the recipe, opening and checking the inputs, hashing them (or trusting the stat
    /// cache), keying the nodes.
    pub resolve: f64,
    /// The engine computing what the cache lacked.
    pub engine: f64,
    /// Writing the output (from inputs and cache objects) into its staging directory.
    pub assemble: f64,
    /// Of `assemble`, the time spent waiting for the engine's next result.
    pub waiting: f64,
    /// Recording digests and removing the previous output, after the swap.
    pub commit: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct PeakRss {
    pub build: u64,
    pub engine: Option<u64>,
}

impl Summary {
    fn new(
        res: &Resolution,
        nodes: Nodes,
        files: Vec<String>,
        bytes: u64,
        elapsed: Duration,
    ) -> Self {
        Summary {
            output: res.recipe.primary_output().path.display().to_string(),
            up_to_date: false,
            device: res.device.to_string(),
            nodes,
            fused: res
                .plan
                .tensors
                .iter()
                .filter(|t| !t.deltas.is_empty())
                .count(),
            files,
            bytes,
            seconds: elapsed.as_secs_f64(),
            warnings: res.plan.warnings.clone(),
            notes: res.plan.notes.clone(),
            transferred: res.plan.transfer.iter().filter(|f| !f.is_plain()).count(),
            peak_rss: PeakRss {
                build: super::engine::own_peak_rss(),
                engine: None,
            },
            phases: None,
            carried: res.carried(),
            shards_kept: 0,
            pulled: None,
            pushed: None,
        }
    }

    pub fn built(
        res: &Resolution,
        nodes: Nodes,
        files: &[(PathBuf, FileDigest)],
        elapsed: Duration,
    ) -> Self {
        let names = files
            .iter()
            .filter_map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let bytes = files
            .iter()
            .filter_map(|(p, _)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        Summary::new(res, nodes, names, bytes, elapsed)
    }

    /// A build that took every output file from the remote cache, by the lock's digests,
    /// without reading an input or computing anything.
    pub fn from_remote(
        output: String,
        files: &[PathBuf],
        pulled: crate::remote::Transfer,
        elapsed: Duration,
    ) -> Self {
        Summary {
            output,
            up_to_date: false,
            device: "none".into(),
            nodes: Nodes {
                total: 0,
                computed: 0,
                reused: 0,
                copied: 0,
            },
            fused: 0,
            files: files
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
            bytes: pulled.bytes,
            seconds: elapsed.as_secs_f64(),
            warnings: Vec::new(),
            notes: Vec::new(),
            transferred: 0,
            peak_rss: PeakRss {
                build: super::engine::own_peak_rss(),
                engine: None,
            },
            phases: None,
            carried: Vec::new(),
            shards_kept: 0,
            pulled: Some(pulled),
            pushed: None,
        }
    }

    pub fn up_to_date(res: &Resolution, nodes: Nodes, elapsed: Duration) -> Self {
        let mut summary = Summary::new(res, nodes, Vec::new(), 0, elapsed);
        summary.up_to_date = true;
        summary
    }

    pub fn line(&self) -> String {
        if self.up_to_date {
            return format!("{} is up to date ({:.2}s)", self.output, self.seconds);
        }
        let transfer = match self.transferred {
            0 => String::new(),
            n => format!("; {n} adapter modules mapped, skipped or dropped (transfer.txt)"),
        };
        let transfer = transfer
            + &self
                .carried
                .iter()
                .map(|c| format!("; `{}`: {}", c.adapter, c.describe()))
                .collect::<String>();
        let kept = match self.shards_kept {
            0 => String::new(),
            1 => "; 1 shard unchanged, kept".into(),
            n => format!("; {n} shards unchanged, kept"),
        };
        let notes: String = self.notes.iter().map(|n| format!("; {n}")).collect();
        let remote = |what: &str, t: Option<crate::remote::Transfer>| match t {
            Some(t) if t.objects > 0 => format!(
                "; {} {what} the remote cache ({:.1} MB)",
                t.objects,
                t.bytes as f64 / 1e6
            ),
            _ => String::new(),
        };
        let remote = remote("pulled from", self.pulled) + &remote("pushed to", self.pushed);
        format!(
            "built {} in {:.2}s on {}: {} tensors ({} computed, {} from cache, {} copied), {:.1} MB in {} files{kept}{remote}{transfer}{notes}",
            self.output,
            self.seconds,
            self.device,
            self.nodes.total,
            self.nodes.computed,
            self.nodes.reused,
            self.nodes.copied,
            self.bytes as f64 / 1e6,
            self.files.len()
        )
    }
}
