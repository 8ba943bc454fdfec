//! Execution: decides which tensors the cache already holds, has the engine compute the rest,
//! and assembles the output from inputs and cache objects. A build whose recipe, inputs and
//! outputs all match the lock file does nothing at all.
mod assemble;
mod cache;
mod changes;
mod effect;
mod engine;
mod error;
mod options;
mod record;
mod resolution;
pub use modelforge_core::{job, rotary};
mod summary;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use modelforge_core::node::Node;

use crate::digest::FileDigest;
use crate::lock::{self, Lock};
use crate::plan::Status;
use crate::recipe::Recipe;

pub use cache::{cache_stats, cache_verify, gc};
pub(crate) use engine::score;
pub(crate) use error::{output_error, write_error, ExecError};
pub use options::{BuildOptions, CacheOptions, PlanFormat, PlanOptions, PushOptions};
pub(crate) use resolution::{open_store, recipe_dir, Resolution};
pub(crate) use summary::{Nodes, Phases, Summary};

/// Memory for tensors in flight when `--max-memory` is not given: blocks of about 0.8M
/// elements, large enough for BLAS to run at speed; measured peak RSS of the engine on a
/// 1.3 GB bf16 model is about 210 MB, 115 MB of which is LibTorch itself.
const DEFAULT_BUDGET: u64 = 64 << 20;

/// `modelforge build`.
pub fn build(args: &BuildOptions) -> miette::Result<()> {
    let started = Instant::now();
    if let (true, Some(url)) = (args.locked, &args.remote) {
        if let Some(summary) = from_lock(args, url, started)? {
            return report(args, &summary);
        }
    }
    let mut phases = Phases::default();
    let lock_path = lock::path_for(&args.recipe);
    let previous = Lock::read(&lock_path).and_then(Result::ok);
    // A build that most likely computes (its recipe is not its lock's, or it must hash its
    // inputs) starts its engine first, so that LibTorch loads (about 0.2 s) while the build
    // resolves; one that turns out not to be needed is killed before it reads a job.
    let mut spawned = None;
    let res = Resolution::new(
        &args.recipe,
        &args.cache,
        &args.arch,
        args.check_finite,
        previous.as_ref().map(|lock| lock.recipe),
        || spawned = engine::Spawned::new().ok(),
    )?;
    phases.resolve = started.elapsed().as_secs_f64();
    // What killed builds left: a staged lock, staged outputs, or a replaced output whose
    // removal was interrupted. (A no-op build would otherwise never clear them.)
    crate::io::atomic::remove_abandoned_beside(&lock_path);
    for output in res.recipe.output_dirs() {
        crate::io::atomic::remove_abandoned_beside(&output.path);
    }
    if args.locked {
        check_locked(&res, &lock_path, previous.as_ref())?;
    }
    if !args.quiet {
        for warning in &res.plan.warnings {
            eprintln!("warning: {warning}");
        }
    }
    let remote = match &args.remote {
        Some(url) => Some(crate::remote::Remote::open(url).map_err(remote_error)?),
        None if args.push => {
            return Err(remote_error(crate::remote::RemoteError::Address(
                "(none: --push needs --remote URL or MODELFORGE_REMOTE)".into(),
            )))
        }
        None => None,
    };
    let copied = res
        .plan
        .tensors
        .iter()
        .filter(|t| res.graph.fused(&t.out.name).is_none())
        .count();
    if previous
        .as_ref()
        .is_some_and(|lock| res.up_to_date(lock, args.cache.rehash))
    {
        let nodes = Nodes {
            total: res.plan.tensors.len(),
            computed: 0,
            reused: res.plan.tensors.len() - copied,
            copied,
        };
        // What the output's report says of the examples, measured when it was built.
        effect::recorded(&res);
        let mut summary = Summary::up_to_date(&res, nodes, started.elapsed());
        if let (Some(remote), true) = (&remote, args.push) {
            summary.pushed = Some(push(&res, remote)?);
        }
        return report(args, &summary);
    }
    // What the local cache lacks, from the remote first.
    let pulled = remote.as_ref().map(|remote| pull(&res, remote, args.quiet));

    // Shards whose bytes would not change stay as the previous output has them.
    let shards = &res.shards;
    let shard_keys = record::shard_keys(&res, shards);
    let kept = record::kept_shards(&res, shards, &shard_keys, args.cache.rehash);

    let (staged, computed, engine_peak) =
        compute_and_write(&res, args, &kept, &mut phases, spawned)?;
    let shards_kept = staged.kept;
    // The lock, staged beside its place; then the outputs and the lock go into place together.
    let dir = recipe_dir(&res.recipe);
    let files = staged.files.clone();
    let outputs: BTreeMap<String, FileDigest> = files
        .iter()
        .map(|(path, digest)| (crate::plan::pathdiff(path, &dir), *digest))
        .collect();
    let lock = Lock {
        version: lock::VERSION,
        modelforge: env!("CARGO_PKG_VERSION").to_owned(),
        recipe: res.recipe_digest,
        resolved: res.resolved(),
        inputs: res.input_digests(),
        outputs,
    };
    let staged_lock = match previous.as_ref() == Some(&lock) {
        true => None,
        false => Some(
            crate::io::atomic::StagedFile::new(&lock_path, lock.to_toml().as_bytes(), true)
                .map_err(output_error(&lock_path))?,
        ),
    };
    let previous_outputs = staged.commit(staged_lock)?;
    let commit_started = Instant::now();

    // Remember the outputs' digests (their inodes are final now) and this build's keys.
    for (path, digest) in &files {
        let _ = res.store.record_file_digest(path, *digest);
    }
    let record = record::BuildRecord::new(&res, shards, &shard_keys, &files);
    let _ = record.write(&res.store, &res.recipe.primary_output().path);
    // The slow part last: removing the previous outputs.
    drop(previous_outputs);
    phases.commit = commit_started.elapsed().as_secs_f64();

    let nodes = Nodes {
        total: res.plan.tensors.len(),
        computed,
        reused: (res.plan.tensors.len() - copied).saturating_sub(computed),
        copied,
    };
    let mut summary = Summary::built(&res, nodes, &files, started.elapsed());
    summary.peak_rss.engine = (engine_peak > 0).then_some(engine_peak);
    summary.phases = Some(phases);
    summary.shards_kept = shards_kept;
    summary.pulled = pulled;
    if let (Some(remote), true) = (&remote, args.push) {
        summary.pushed = Some(push(&res, remote)?);
    }
    report(args, &summary)
}

/// Pulls what the build needs and the local cache lacks from the remote, saying what could
/// not be used: a damaged object (computed here instead) or a remote that cannot be read
/// (everything computed here).
fn pull(res: &Resolution, remote: &crate::remote::Remote, quiet: bool) -> crate::remote::Transfer {
    let lacking = lacking(res);
    let keys: Vec<crate::digest::NodeKey> = lacking.iter().map(|k| k.key).collect();
    let pulled = remote.pull(&res.store, &keys);
    if !quiet {
        for key in &pulled.damaged {
            let name = lacking
                .iter()
                .find(|k| k.key == *key)
                .map_or("", |k| &k.name);
            eprintln!(
                "warning: the remote cache's object for `{name}` (node {}) does not match its digest; it was not used and is computed here",
                key.hex()
            );
        }
        if let Some(why) = &pulled.unreachable {
            eprintln!(
                "warning: the remote cache `{}` cannot be read ({why}); what it lacks is computed here",
                remote.url()
            );
        }
    }
    pulled.transfer
}

/// `modelforge push`: the node results the recipe's build uses, from the local cache to the
/// remote.
pub fn push_built(args: &PushOptions) -> miette::Result<()> {
    let Some(url) = &args.remote else {
        return Err(remote_error(crate::remote::RemoteError::Address(
            "(none: give --remote URL or MODELFORGE_REMOTE)".into(),
        )));
    };
    let remote = crate::remote::Remote::open(url).map_err(remote_error)?;
    let res = Resolution::new(&args.recipe, &args.cache, &args.arch, false, None, || {})?;
    let pushed = push(&res, &remote)?;
    eprintln!(
        "pushed {} objects ({:.1} MB) to {}",
        pushed.objects,
        pushed.bytes as f64 / 1e6,
        remote.url()
    );
    Ok(())
}

/// `build --locked --remote` where the lock's inputs are not on this machine: every output file
/// the lock records, fetched from the remote by its digest and checked against it, then renamed
/// into place together. No input is read and the engine never starts. `None` when the inputs
/// are here (the build proceeds as usual) or there is no lock to go by.
fn from_lock(args: &BuildOptions, url: &str, started: Instant) -> miette::Result<Option<Summary>> {
    let lock_path = lock::path_for(&args.recipe);
    let Some(Ok(lock)) = Lock::read(&lock_path) else {
        return Ok(None);
    };
    let dir = args.recipe.parent().map(Path::to_owned).unwrap_or_default();
    let here = |shown: &String| match crate::io::hf_cache::path_of(shown) {
        Some(path) => path.exists(),
        None => dir.join(shown).exists(),
    };
    if lock.inputs.keys().all(here) {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&args.recipe).map_err(|source| ExecError::Remote {
        message: format!("cannot read `{}`: {source}", args.recipe.display()),
    })?;
    if FileDigest::of(text.as_bytes()) != lock.recipe {
        return Err(ExecError::Locked {
            lock: lock_path,
            what: "the recipe changed".into(),
            src: miette::NamedSource::new(args.recipe.display().to_string(), text.into()),
            span: None,
        }
        .into());
    }
    let remote = crate::remote::Remote::open(url).map_err(remote_error)?;
    let files: Vec<(FileDigest, std::path::PathBuf)> = lock
        .outputs
        .iter()
        .map(|(shown, digest)| (*digest, dir.join(shown)))
        .collect();
    let (staged, pulled) = remote.fetch_files(&files).map_err(|e| ExecError::Remote {
        message: format!(
            "the inputs of `{}` are not here, and its outputs cannot be taken from the remote cache `{}`: {e}",
            args.recipe.display(),
            remote.url()
        ),
    })?;
    for file in staged {
        let path = file.target().to_owned();
        file.commit().map_err(output_error(&path))?;
    }
    let paths: Vec<std::path::PathBuf> = files.into_iter().map(|(_, p)| p).collect();
    let output = paths
        .first()
        .and_then(|p| p.parent())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Ok(Some(Summary::from_remote(
        output,
        &paths,
        pulled,
        started.elapsed(),
    )))
}

/// Pushes every node result this build uses that the local cache holds, and the output files
/// the lock records (so that a machine with the recipe and its lock alone can fetch them).
fn push(
    res: &Resolution,
    remote: &crate::remote::Remote,
) -> Result<crate::remote::Transfer, miette::Report> {
    let nodes = push_nodes(res, remote)?;
    let dir = recipe_dir(&res.recipe);
    let files: Vec<(std::path::PathBuf, FileDigest)> =
        match Lock::read(&lock::path_for(&res.recipe.path)) {
            Some(Ok(lock)) => lock
                .outputs
                .iter()
                .map(|(shown, digest)| (dir.join(shown), *digest))
                .collect(),
            _ => Vec::new(),
        };
    let outputs = remote.push_files(&files).map_err(remote_error)?;
    Ok(crate::remote::Transfer {
        objects: nodes.objects + outputs.objects,
        bytes: nodes.bytes + outputs.bytes,
    })
}

/// Pushes every node result this build uses that the local cache holds.
fn push_nodes(
    res: &Resolution,
    remote: &crate::remote::Remote,
) -> Result<crate::remote::Transfer, miette::Report> {
    let keys: Vec<crate::digest::NodeKey> = needed(res).iter().map(|k| k.key).collect();
    remote.push(&res.store, &keys).map_err(remote_error)
}

fn remote_error(e: crate::remote::RemoteError) -> miette::Report {
    ExecError::Remote {
        message: e.to_string(),
    }
    .into()
}

/// Has the engine compute what the cache lacks while the outputs are written into staging,
/// once more if a cached object turns out damaged. Returns the staged outputs, how many
/// tensors were computed and the engine's peak memory.
fn compute_and_write(
    res: &Resolution,
    args: &BuildOptions,
    kept: &std::collections::HashMap<String, FileDigest>,
    phases: &mut Phases,
    mut spawned: Option<engine::Spawned>,
) -> miette::Result<(assemble::Staged, usize, u64)> {
    let shards = &res.shards;
    let budget = args.max_memory.unwrap_or(DEFAULT_BUDGET);
    let mut computed = 0;
    let mut evicted = Vec::new();
    let mut engine_peak = 0;
    let staged = loop {
        let tasks = tasks(res);
        computed += tasks
            .iter()
            .filter(|t| matches!(t.node, Node::Fuse(_) | Node::Refactor { .. }))
            .count();
        let mut engine = None;
        if tasks.is_empty() {
            drop(spawned.take());
        } else {
            let job = job::Job {
                cache: res
                    .store
                    .root()
                    .parent()
                    .unwrap_or(res.store.root())
                    .to_owned(),
                device: res.device,
                budget,
                fsync: args.fsync,
                check_finite: args.check_finite,
                places: res.graph.places(tasks.iter().map(|t| &t.node)),
                nodes: tasks,
                slots: Vec::new(),
            };
            engine = Some(engine::Engine::start(
                job,
                &res.store,
                false,
                spawned.take(),
            )?);
        }
        // The output is written while the engine computes, each computed tensor as soon as it
        // is in the cache. A failed assembly stops the engine (dropping it kills it).
        let assemble_started = Instant::now();
        let outcome =
            assemble::assemble(res, engine.as_ref(), shards, kept, !args.quiet, args.fsync)?;
        phases.assemble += assemble_started.elapsed().as_secs_f64();
        if let Some(engine) = engine.take() {
            let run = engine.finish().map_err(|e| weights_of(res, e))?;
            engine_peak = engine_peak.max(run.peak_rss);
            phases.engine += run.seconds;
            phases.waiting += run.waited;
        }
        match outcome {
            assemble::Outcome::EngineStopped => {
                return Err(ExecError::Engine {
                    message: "the engine stopped before computing every tensor".into(),
                    help: "its own message is above; what it finished is cached, so the next build resumes there".into(),
                }
                .into())
            }
            assemble::Outcome::Written(staged) => break staged,
            assemble::Outcome::Corrupt(names) if evicted.is_empty() => {
                for name in &names {
                    eprintln!(
                        "warning: the cached result for `{name}` did not match its digest; it was evicted and is being recomputed"
                    );
                }
                evicted = names;
            }
            assemble::Outcome::Corrupt(names) => {
                return Err(ExecError::Cache {
                    path: res.store.root().to_owned(),
                    source: std::io::Error::other(format!(
                        "objects for {names:?} are corrupt again after recomputing"
                    )),
                }
                .into())
            }
        }
    };

    Ok((staged, computed, engine_peak))
}

/// A non-finite result, pointed at the weights in the recipe that went into it.
fn weights_of(res: &Resolution, err: ExecError) -> ExecError {
    let ExecError::NonFinite {
        tensor,
        what,
        index,
        ..
    } = err
    else {
        return err;
    };
    let plan = res.plan.tensors.iter().find(|t| t.out.name == tensor);
    let weights = plan
        .map(|plan| {
            plan.deltas
                .iter()
                .map(|delta| {
                    let entry = &res.recipe.adapters[delta.adapter].entry;
                    let (label, span) = match delta.weight_span {
                        Some(span) => (format!("`{}`'s weight", entry.written), span),
                        None => (format!("`{}`, weight 1", entry.written), entry.span),
                    };
                    miette::LabeledSpan::new_with_span(Some(label), span)
                })
                .collect()
        })
        .unwrap_or_default();
    ExecError::NonFinite {
        tensor,
        what,
        index,
        src: Some(res.recipe.src()),
        weights,
    }
}

fn report(args: &BuildOptions, summary: &Summary) -> miette::Result<()> {
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(summary).expect("a summary serialises")
        );
    } else if !args.quiet {
        eprintln!("{}", summary.line());
    }
    Ok(())
}

/// The nodes this build needs, each once, each after the nodes it reads: every node but copies,
/// and fused tensors only when a fused model is written (`[output] adapter` alone needs only
/// the re-factored deltas).
fn needed(res: &Resolution) -> Vec<&crate::plan::Keyed> {
    let mut seen = std::collections::HashSet::new();
    res.graph
        .in_order()
        .into_iter()
        .filter(|keyed| match keyed.node {
            Node::Copy { .. } => false,
            Node::Fuse(_) => res.recipe.fuses(),
            _ => true,
        })
        .filter(|keyed| seen.insert(keyed.key))
        .collect()
}

/// Of those, the ones the local cache lacks.
fn lacking(res: &Resolution) -> Vec<&crate::plan::Keyed> {
    needed(res)
        .into_iter()
        .filter(|keyed| res.store.action(&keyed.key).is_none())
        .collect()
}

/// The engine's work, walking the graph: every node the cache lacks, each after the nodes it
/// reads. Alignment nodes come first (the tensors read them; all are computed even when the
/// tensors using them are cached, for the transfer report reads their figures), then the
/// fused tensors in the order the output is written, so that writing can follow computing
/// closely (none without a fused model to write: `[output] adapter` alone needs only the
/// re-factored deltas), then the re-factored deltas. A fused tensor that goes into an output
/// shard is handed to the build rather than cached: the shard becomes its cache object.
fn tasks(res: &Resolution) -> Vec<job::Task> {
    let (mut align, mut fused, mut refactors) = (Vec::new(), Vec::new(), Vec::new());
    for keyed in lacking(res) {
        match keyed.node {
            Node::Fuse(_) => fused.push(keyed),
            Node::Refactor { .. } => refactors.push(keyed),
            _ => align.push(keyed),
        }
    }
    let position: std::collections::HashMap<&str, usize> = res
        .shards
        .iter()
        .flat_map(|shard| shard.tensors.iter())
        .enumerate()
        .map(|(i, tensor)| (tensor.name.as_str(), i))
        .collect();
    fused.sort_by_key(|keyed| {
        position
            .get(keyed.name.as_str())
            .copied()
            .unwrap_or(usize::MAX)
    });
    // Where the cache cannot hold the output's shards (another file system), every result
    // becomes an object of its own.
    let hand_off = !fused.is_empty()
        && res.recipe.output.path.as_ref().is_some_and(|out| {
            let dir = out.path.parent().filter(|d| !d.as_os_str().is_empty());
            res.store.can_adopt_from(dir.unwrap_or(Path::new(".")))
        });
    align
        .into_iter()
        .chain(fused)
        .chain(refactors)
        .map(|keyed| job::Task {
            name: keyed.name.clone(),
            key: keyed.key,
            node: keyed.node.clone(),
            hand_off: hand_off
                && matches!(keyed.node, Node::Fuse(_))
                && position.contains_key(keyed.name.as_str()),
        })
        .collect()
}

fn check_locked(res: &Resolution, lock_path: &Path, lock: Option<&Lock>) -> Result<(), ExecError> {
    let locked = |what: String, span| ExecError::Locked {
        lock: lock_path.to_owned(),
        what,
        src: res.recipe.src(),
        span,
    };
    let Some(lock) = lock else {
        return Err(locked("there is no lock file".into(), None));
    };
    if lock.recipe != res.recipe_digest {
        return Err(locked("the recipe changed".into(), None));
    }
    for file in &res.graph.files {
        if lock.inputs.get(&file.shown) != Some(&file.digest) {
            // Point at the recipe entry that brought the file in.
            let span = std::iter::once(&res.recipe.base)
                .chain(res.recipe.adapters.iter().map(|a| &a.entry))
                .find(|entry| file.path.starts_with(&entry.path))
                .map(|entry| entry.span);
            let what = match lock.inputs.get(&file.shown) {
                Some(_) => format!("the input `{}` changed", file.shown),
                None => format!("the input `{}` is not in the lock", file.shown),
            };
            return Err(locked(what, span));
        }
    }
    if let Some(gone) = lock
        .inputs
        .keys()
        .find(|shown| !res.graph.files.iter().any(|f| &f.shown == *shown))
    {
        return Err(locked(
            format!("the locked input `{gone}` is no longer used"),
            None,
        ));
    }
    Ok(())
}

/// `modelforge plan`: what a build would do, without doing it.
pub fn plan(args: &PlanOptions) -> miette::Result<()> {
    // A plan computes nothing, so it does not read whole adapters to check their values.
    let res = Resolution::new(&args.recipe, &args.cache, &args.arch, false, None, || {})?;
    let last = res.last_build();
    let status = |keyed: &crate::plan::Keyed| res.status(keyed, &last);
    let shards = &res.shards;
    let kept = kept_shards(&res, shards, args.cache.rehash);
    let statuses: Vec<Status> = res
        .plan
        .tensors
        .iter()
        .map(|t| status(res.graph.tensor(&t.out.name)))
        .collect();
    match args.format {
        PlanFormat::Dot => out!("{}", res.graph.dot(&status)),
        PlanFormat::Json => {
            let shards: Vec<_> = shards
                .iter()
                .map(|s| serde_json::json!({"file": s.file_name, "kept": kept.contains_key(&s.file_name)}))
                .collect();
            let value = serde_json::json!({
                "recipe": res.recipe.path.display().to_string(),
                "totals": totals(&statuses),
                "nodes": res.graph.json(&status),
                "shards": shards,
            });
            outln!(
                "{}",
                serde_json::to_string_pretty(&value).expect("a plan serialises")
            );
        }
        PlanFormat::Text => {
            for (tensor, status) in res.plan.tensors.iter().zip(&statuses) {
                match status {
                    Status::Copy => outln!("copy     {}", tensor.out.name),
                    Status::Cached => outln!("cached   {}", tensor.out.name),
                    Status::Compute { why } => {
                        outln!("compute  {}  ({})", tensor.out.name, why.join("; "))
                    }
                }
            }
            for shard in shards {
                let what = match kept.contains_key(&shard.file_name) {
                    true => "keep   ",
                    false => "write  ",
                };
                outln!("{what}  {}", shard.file_name);
            }
            let t = totals(&statuses);
            outln!(
                "{} tensors: {} to compute, {} cached, {} copied; {} shard{}: {} to write, {} kept",
                t["total"],
                t["compute"],
                t["cached"],
                t["copy"],
                shards.len(),
                if shards.len() == 1 { "" } else { "s" },
                shards.len() - kept.len(),
                kept.len()
            );
        }
    }
    Ok(())
}

/// The previous output's shards a build would keep (none without a fused model).
fn kept_shards(
    res: &Resolution,
    shards: &[crate::io::writer::Shard],
    rehash: bool,
) -> std::collections::HashMap<String, FileDigest> {
    let keys = record::shard_keys(res, shards);
    record::kept_shards(res, shards, &keys, rehash)
}

fn totals(statuses: &[Status]) -> serde_json::Value {
    let count = |f: fn(&Status) -> bool| statuses.iter().filter(|s| f(s)).count();
    serde_json::json!({
        "total": statuses.len(),
        "compute": count(|s| matches!(s, Status::Compute { .. })),
        "cached": count(|s| matches!(s, Status::Cached)),
        "copy": count(|s| matches!(s, Status::Copy)),
    })
}

/// A progress bar over `len` tensors on a terminal; hidden otherwise or when not `enabled`.
fn progress_bar(len: usize, label: &str, enabled: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !(enabled && std::io::stderr().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let template = format!("{label} {{wide_bar}} {{pos}}/{{len}} tensors {{elapsed}}");
    indicatif::ProgressBar::new(len as u64)
        .with_style(indicatif::ProgressStyle::with_template(&template).expect("a valid template"))
}

/// `modelforge verify`: re-hashes the outputs and compares them with the lock.
pub fn verify(recipe: &Path) -> miette::Result<()> {
    let recipe = Recipe::load(recipe)?;
    let lock_path = lock::path_for(&recipe.path);
    let lock = match Lock::read(&lock_path) {
        Some(Ok(lock)) => lock,
        Some(Err(message)) => {
            return Err(crate::verify::VerifyError::BadLock {
                path: lock_path,
                message,
            }
            .into())
        }
        None => return Err(crate::verify::VerifyError::NoLock { path: lock_path }.into()),
    };
    let outputs: Vec<&Path> = recipe.output_dirs().map(|o| o.path.as_path()).collect();
    crate::verify::verify(&recipe_dir(&recipe), &outputs, &lock)
}
