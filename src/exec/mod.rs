//! Execution: decides which tensors the cache already holds, has the engine compute the rest,
//! and assembles the output from inputs and cache objects. A build whose recipe, inputs and
//! outputs all match the lock file does nothing at all.
mod assemble;
mod cache;
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

use crate::digest::FileDigest;
use crate::io::peft::LoraKind;
use crate::lock::{self, Lock};
use crate::plan::{BuildGraph, DeltaKind, Keys, MergeKey, Origin, Plan, Status, TensorKey};
use crate::recipe::{MajoritySign, Pruning, RankChoice, Recipe};

pub use cache::{cache_stats, cache_verify, gc};
pub(crate) use error::{output_error, ExecError};
pub use options::{BuildOptions, CacheOptions, PlanFormat, PlanOptions};
pub(crate) use resolution::{open_store, recipe_dir, Resolution};
pub(crate) use summary::{Nodes, Phases, Summary};

/// Memory for tensors in flight when `--max-memory` is not given: blocks of about 0.8M
/// elements, large enough for BLAS to run at speed; measured peak RSS of the engine on a
/// 1.3 GB bf16 model is about 210 MB, 115 MB of which is LibTorch itself.
const DEFAULT_BUDGET: u64 = 64 << 20;

/// `modelforge build`.
pub fn build(args: &BuildOptions) -> miette::Result<()> {
    let started = Instant::now();
    let mut phases = Phases::default();
    let res = Resolution::new(&args.recipe, &args.cache, &args.arch, args.check_finite)?;
    phases.resolve = started.elapsed().as_secs_f64();
    let lock_path = lock::path_for(&res.recipe.path);
    // What killed builds left: a staged lock, staged outputs, or a replaced output whose
    // removal was interrupted. (A no-op build would otherwise never clear them.)
    crate::io::atomic::remove_abandoned_beside(&lock_path);
    for output in res.recipe.output_dirs() {
        crate::io::atomic::remove_abandoned_beside(&output.path);
    }
    let previous = Lock::read(&lock_path).and_then(Result::ok);
    if args.locked {
        check_locked(&res, &lock_path, previous.as_ref())?;
    }
    if !args.quiet {
        for warning in &res.plan.warnings {
            eprintln!("warning: {warning}");
        }
    }
    let copied = res.keys.tensors.iter().filter(|k| k.is_none()).count();
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
        let summary = Summary::up_to_date(&res, nodes, started.elapsed());
        return report(args, &summary);
    }

    // Shards whose bytes would not change stay as the previous output has them.
    let shards = res.shards();
    let shard_keys = record::shard_keys(&res, &shards);
    let kept = record::kept_shards(&res, &shards, &shard_keys, args.cache.rehash);

    let budget = args.max_memory.unwrap_or(DEFAULT_BUDGET);
    let mut computed = 0;
    let mut evicted = Vec::new();
    let mut engine_peak = 0;
    let staged = loop {
        let statuses = res.statuses();
        let jobs = jobs(&res, &statuses, &shards);
        let align = align_steps(&res);
        computed += jobs.len();
        let mut engine = None;
        if !jobs.is_empty() || !align.is_empty() {
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
                align,
                tensors: jobs,
            };
            engine = Some(engine::Engine::start(&job, false)?);
        }
        // The output is written while the engine computes, each computed tensor as soon as it
        // is in the cache. A failed assembly stops the engine (dropping it kills it).
        let assemble_started = Instant::now();
        let outcome = assemble::assemble(
            &res,
            engine.as_ref(),
            &shards,
            &kept,
            !args.quiet,
            args.fsync,
        )?;
        phases.assemble += assemble_started.elapsed().as_secs_f64();
        if let Some(engine) = engine.take() {
            let run = engine.finish()?;
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
    let record = record::BuildRecord::new(&res, &shards, &shard_keys, &files);
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
    report(args, &summary)
}

fn report(args: &BuildOptions, summary: &Summary) -> miette::Result<()> {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(summary).expect("a summary serialises")
        );
    } else if !args.quiet {
        eprintln!("{}", summary.line());
    }
    Ok(())
}

/// The engine's work: every fused tensor and every re-factored delta the cache lacks.
fn jobs(
    res: &Resolution,
    statuses: &[Status],
    shards: &[crate::io::writer::Shard],
) -> Vec<job::TensorJob> {
    let mut jobs: Vec<job::TensorJob> = res
        .plan
        .tensors
        .iter()
        .zip(&res.keys.tensors)
        .zip(statuses)
        // Without a fused model to write (`[output] adapter` alone), only the re-factored
        // deltas are needed.
        .filter(|(_, status)| res.recipe.fuses() && matches!(status, Status::Compute { .. }))
        .filter_map(|((tensor, key), _)| {
            let (key, parts) = key.as_ref()?;
            tensor_job(res, tensor, *key, parts, None)
        })
        .collect();
    // In the order the output is written, so that writing can follow computing closely.
    let position: std::collections::HashMap<&str, usize> = shards
        .iter()
        .flat_map(|shard| shard.tensors.iter())
        .enumerate()
        .map(|(i, tensor)| (tensor.name.as_str(), i))
        .collect();
    jobs.sort_by_key(|job| {
        position
            .get(job.name.as_str())
            .copied()
            .unwrap_or(usize::MAX)
    });
    for (tensor, (refactor, key)) in res
        .plan
        .tensors
        .iter()
        .zip(res.refactors.iter().zip(&res.keys.tensors))
    {
        if let (Some((node, refactor)), Some((_, parts))) = (refactor, key) {
            if res.store.action(node).is_none() {
                jobs.extend(tensor_job(res, tensor, *node, parts, Some(*refactor)));
            }
        }
    }
    jobs
}

fn tensor_job(
    res: &Resolution,
    tensor: &crate::plan::TensorPlan,
    key: crate::digest::NodeKey,
    parts: &TensorKey,
    refactor: Option<job::Refactor>,
) -> Option<job::TensorJob> {
    let plan = &res.plan;
    let origin = match &tensor.origin {
        Origin::Base { tensor: name, meta } => {
            let (file, _) = plan.inputs.base.weights.get(name)?;
            slice(&file.path, meta)
        }
        Origin::Replacement { adapter, meta, .. } => slice(
            &plan.inputs.adapters[*adapter]
                .tensor_file(&tensor.out.name)?
                .path,
            meta,
        ),
    };
    let deltas = tensor
        .deltas
        .iter()
        .map(|delta| {
            let path = &plan.inputs.adapters[delta.adapter]
                .tensor_file(&tensor.out.name)
                .expect("planned tensors exist")
                .path;
            let values = match &delta.kind {
                DeltaKind::LowRank {
                    kind,
                    a,
                    b,
                    rows,
                    rotary,
                    adapt,
                    magnitude,
                } => job::DeltaValues::LowRank {
                    transposed: match kind {
                        LoraKind::Linear => false,
                        LoraKind::LinearTransposed | LoraKind::Embedding => true,
                        LoraKind::Experts { transposed, .. } => *transposed,
                        LoraKind::Expert { .. } => false,
                    },
                    a: slice(path, a),
                    b: slice(path, b),
                    rows: *rows,
                    rotary: *rotary,
                    adapt: adapt.map(|adapt| res.keys.align.adapt(plan, adapt)),
                    experts: match kind {
                        LoraKind::Experts { count, .. } | LoraKind::Expert { count, .. } => {
                            Some(*count)
                        }
                        _ => None,
                    },
                    expert: match kind {
                        LoraKind::Expert { index, offset, .. } => Some([*index, *offset]),
                        _ => None,
                    },
                    magnitude: magnitude.as_ref().map(|m| slice(path, m)),
                },
                DeltaKind::Tokens { indices, values } => job::DeltaValues::Tokens {
                    indices: indices.clone(),
                    values: slice(path, values),
                },
                DeltaKind::Vector(v) => job::DeltaValues::Dense(slice(path, v)),
                DeltaKind::Difference(m) => job::DeltaValues::Model(slice(path, m)),
            };
            job::DeltaJob {
                weight: delta.weight,
                scaling: delta.scaling,
                values,
            }
        })
        .collect();
    Some(job::TensorJob {
        key,
        name: tensor.out.name.clone(),
        origin,
        deltas,
        merge: parts.merge.as_ref().map(merge_job),
        origin_cast: match &tensor.origin {
            Origin::Replacement { cast, .. } => *cast,
            Origin::Base { .. } => None,
        },
        refactor,
        out_dtype: tensor.out.dtype,
    })
}

/// The alignment nodes (`dims = "align"`) the cache lacks, in the order they depend on each
/// other: residual maps, inner maps, aligned deltas. All are computed even when the tensors
/// using them are cached, for the transfer report reads their figures.
fn align_steps(res: &Resolution) -> Vec<job::AlignStep> {
    let (align, keys) = (&res.plan.align, &res.keys.align);
    let tensor = |t: &crate::plan::TensorRef| slice(&t.path, &t.meta);
    let residuals =
        align
            .residuals
            .iter()
            .zip(&keys.residuals)
            .map(|(r, key)| job::AlignStep::Residual {
                key: *key,
                source: tensor(&r.source),
                target: tensor(&r.target),
                pairs: r.pairs.clone(),
            });
    let inners = align
        .inners
        .iter()
        .zip(&keys.inners)
        .map(|(m, key)| job::AlignStep::Inner {
            key: *key,
            residual: keys.residuals[m.residual],
            side: m.side,
            source: tensor(&m.source),
            target: tensor(&m.target),
            layout: m.layout.clone(),
        });
    let deltas = align.deltas.iter().zip(&keys.deltas).map(|(d, key)| {
        let inner = &align.inners[d.inner];
        let path = &res.plan.inputs.adapters[d.adapter]
            .lora()
            .expect("only LoRA modules are aligned")
            .file
            .path;
        job::AlignStep::Delta {
            key: *key,
            residual: keys.residuals[inner.residual],
            inner: keys.inners[d.inner],
            side: inner.side,
            a: slice(path, &d.a),
            b: slice(path, &d.b),
            rank: d.rank,
        }
    });
    let fits = align.fits.iter().zip(&keys.fits).map(|(f, key)| {
        let path = &res.plan.inputs.adapters[f.adapter]
            .lora()
            .expect("only LoRA modules are adapted")
            .file
            .path;
        job::AlignStep::Fit {
            key: *key,
            a: slice(path, &f.a),
            b: slice(path, &f.b),
            to: f.to,
        }
    });
    residuals
        .chain(inners)
        .chain(deltas)
        .chain(fits)
        .filter(|step| res.store.action(&step.key()).is_none())
        .collect()
}

/// For `[output] adapter`: per tensor, the node that factors its combined delta, when the
/// delta is low-rank (a LoRA module's; bias vectors and replaced tensors have no factors).
fn refactors(
    plan: &Plan,
    keys: &Keys,
    rank: RankChoice,
) -> Vec<Option<(crate::digest::NodeKey, job::Refactor)>> {
    plan.tensors
        .iter()
        .zip(&keys.tensors)
        .map(|(tensor, key)| {
            let (node, _) = key.as_ref()?;
            let kinds: Vec<LoraKind> = tensor
                .deltas
                .iter()
                .filter_map(|d| match &d.kind {
                    DeltaKind::LowRank { kind, .. } => Some(*kind),
                    DeltaKind::Difference(_) => {
                        Some(crate::plan::difference_kind(&tensor.out.name))
                    }
                    DeltaKind::Vector(_) | DeltaKind::Tokens { .. } => None,
                })
                .collect();
            if kinds.is_empty() || kinds.len() != tensor.deltas.len() || tensor.out.shape.len() != 2
            {
                return None;
            }
            let truncation = match rank {
                RankChoice::Exact => job::Truncation::Rank(
                    tensor
                        .deltas
                        .iter()
                        .map(|d| match &d.kind {
                            DeltaKind::LowRank {
                                adapt: Some(crate::plan::Adapt::Aligned(i)),
                                ..
                            } => plan.align.deltas[*i].rank,
                            DeltaKind::LowRank { a, .. } => a.shape[0],
                            // A full model's delta has no rank to speak of: keep it all.
                            DeltaKind::Difference(_) => {
                                tensor.out.shape[0].min(tensor.out.shape[1])
                            }
                            DeltaKind::Vector(_) | DeltaKind::Tokens { .. } => 0,
                        })
                        .sum(),
                ),
                RankChoice::Rank(k) => job::Truncation::Rank(k),
                RankChoice::Energy(e) => job::Truncation::Energy(e),
            };
            // An input embedding is written as PEFT's embedding LoRA, whatever changed it (a
            // tied head's LoRA lands on it too): (B·A)ᵀ is the delta.
            let embedding = crate::plan::difference_kind(&tensor.out.name) == LoraKind::Embedding;
            let refactor = job::Refactor {
                truncation,
                transpose: embedding || kinds[0] != LoraKind::Linear,
            };
            let key = crate::digest::NodeKey::of_value(&serde_json::json!({
                "op": "refactor",
                "version": 1,
                "of": node,
                "refactor": refactor,
            }));
            Some((key, refactor))
        })
        .collect()
}

fn merge_job(key: &MergeKey) -> job::MergeJob {
    job::MergeJob {
        sparsify: key.method.sparsify().map(|p| match p {
            Pruning::Magnitude => job::Sparsify::Magnitude,
            Pruning::Random => job::Sparsify::Random,
        }),
        elect_sign: key.method.elects_sign().then_some(match key.majority_sign {
            MajoritySign::Total => job::SignElection::Total,
            MajoritySign::Frequency => job::SignElection::Frequency,
        }),
        density: key.density,
        seed: key.seed,
    }
}

fn slice(path: &Path, meta: &crate::io::safetensors::TensorMeta) -> job::Slice {
    job::Slice {
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        dtype: meta.dtype,
        shape: meta.shape.clone(),
        start: meta.start,
        len: meta.len,
    }
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
    for file in &res.keys.files {
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
        .find(|shown| !res.keys.files.iter().any(|f| &f.shown == *shown))
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
    let res = Resolution::new(&args.recipe, &args.cache, &args.arch, false)?;
    let statuses = res.statuses();
    let shards = res.shards();
    let kept = kept_shards(&res, &shards, args.cache.rehash);
    match args.format {
        PlanFormat::Dot => print!(
            "{}",
            BuildGraph::new(&res.plan, &res.keys, &statuses, &shards, &|key| {
                res.store.action(key).is_some()
            })
            .dot()
        ),
        PlanFormat::Json => {
            let graph = BuildGraph::new(&res.plan, &res.keys, &statuses, &shards, &|key| {
                res.store.action(key).is_some()
            });
            let nodes: Vec<_> = graph.graph.node_weights().collect();
            let shards: Vec<_> = shards
                .iter()
                .map(|s| serde_json::json!({"file": s.file_name, "kept": kept.contains_key(&s.file_name)}))
                .collect();
            let value = serde_json::json!({
                "recipe": res.recipe.path.display().to_string(),
                "totals": totals(&statuses),
                "nodes": nodes,
                "shards": shards,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&value).expect("a plan serialises")
            );
        }
        PlanFormat::Text => {
            for (tensor, status) in res.plan.tensors.iter().zip(&statuses) {
                match status {
                    Status::Copy => println!("copy     {}", tensor.out.name),
                    Status::Cached => println!("cached   {}", tensor.out.name),
                    Status::Compute { why } => {
                        println!("compute  {}  ({})", tensor.out.name, why.join("; "))
                    }
                }
            }
            for shard in &shards {
                let what = match kept.contains_key(&shard.file_name) {
                    true => "keep   ",
                    false => "write  ",
                };
                println!("{what}  {}", shard.file_name);
            }
            let t = totals(&statuses);
            println!(
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
