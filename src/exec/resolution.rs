//! A recipe resolved against everything a build, `plan` and `verify` share: the schemas, the
//! inputs (opened, checked, hashed), the cache, the device, and the key of every node.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::job::Device;
use super::record::BuildRecord;
use super::CacheOptions;
use super::ExecError;
use crate::digest::FileDigest;
use crate::io::writer;
use crate::lock::{self, Lock, Resolved};
use crate::plan::{BuildGraph, Keyed, Origin, Plan, Settings, Status};
use crate::recipe::{DeviceRequest, OutputDtype, Recipe, ShardBy};
use crate::store::Store;

/// A recipe with everything resolved that a build, `plan` and `verify` share.
pub(crate) struct Resolution {
    pub recipe: Recipe,
    pub store: Store,
    pub plan: Plan,
    /// Every node of the build, with its inputs and the fused model's files.
    pub graph: BuildGraph,
    /// The fused model's files and the tensors each holds.
    pub shards: Vec<writer::Shard>,
    pub device: Device,
    pub recipe_digest: FileDigest,
    /// The seed of DARE's random pruning, as given or derived.
    pub seed: u64,
    /// With `[output] gguf`: how the GGUF is laid out, checked before anything is computed.
    pub gguf: Option<crate::output::gguf::Layout>,
    /// The effect each adapter with `examples` keeps on them, once the built model is written
    /// (see `super::effect`).
    pub effects: std::sync::Mutex<BTreeMap<String, crate::plan::Effect>>,
}

impl Resolution {
    /// Reads the recipe, the schemas (`--arch` files besides the shipped ones) and the
    /// inputs; with `check_finite`, also refuses adapters holding NaN or infinity. Calls
    /// `likely_computes` (once) as soon as the build most likely computes something: when the
    /// recipe is not the one the lock was `built_from` (its digest), or when some input must
    /// be read to be hashed (new to the cache, changed, or `--rehash`). The build starts its
    /// engine then, so that LibTorch loads while the rest is resolved.
    pub fn new(
        recipe_path: &Path,
        cache: &CacheOptions,
        arch: &[PathBuf],
        check_finite: bool,
        built_from: Option<FileDigest>,
        likely_computes: impl FnOnce(),
    ) -> miette::Result<Resolution> {
        let mut likely_computes = Some(likely_computes);
        let mut computes = || {
            if let Some(signal) = likely_computes.take() {
                signal();
            }
        };
        let recipe = Recipe::load(recipe_path)?;
        let recipe_digest = FileDigest::of(recipe.text.as_bytes());
        if built_from != Some(recipe_digest) {
            computes();
        }
        let schemas = crate::arch::Schemas::load(arch)?;
        check_outputs_outside_cache(&recipe, &cache_dir(cache, Some(&recipe)))?;
        let store = open_store(cache, Some(&recipe))?;
        let device = resolve_device(&recipe);
        let plan = Plan::new(&recipe, &schemas)?;
        if cache.rehash || !plan.input_files().iter().all(|f| store.knows_file(f)) {
            computes();
        }
        if check_finite {
            for adapter in plan.inputs.adapters.iter().filter_map(|a| a.lora()) {
                adapter.check_finite().map_err(ExecError::from)?;
            }
        }
        // What the GGUF cannot hold is refused before anything is hashed or computed.
        let gguf = match &recipe.output.gguf {
            None => None,
            Some(output) => {
                let path = &output.path.path;
                let file = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let name = path
                    .file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let layout = crate::output::gguf::layout(&plan, output.weights, &name, &file)
                    .map_err(|e| ExecError::Gguf {
                        what: e.what,
                        help: e.help,
                        src: recipe.src(),
                        span: output.path.span,
                    })?;
                Some(layout)
            }
        };
        // Without a seed in the recipe, DARE's is derived from the recipe itself.
        let seed = recipe.merge.seed.unwrap_or_else(|| {
            let digest = blake3::hash(recipe.text.as_bytes());
            u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes")) >> 1
        });
        let settings = Settings {
            device: device.class(),
            merge: &recipe.merge,
            seed,
            refactor: recipe.output.adapter.as_ref().map(|a| a.rank),
        };
        let mut graph =
            BuildGraph::new(&plan, &recipe_dir(&recipe), &store, cache.rehash, &settings)
                .map_err(|source| ExecError::Hash { source })?;
        let shards = shards(&recipe, &plan);
        if recipe.fuses() {
            graph.add_outputs(&shards);
        }
        Ok(Resolution {
            recipe,
            store,
            plan,
            graph,
            shards,
            device,
            recipe_digest,
            seed,
            gguf,
            effects: Default::default(),
        })
    }

    pub(crate) fn resolved(&self) -> Resolved {
        Resolved {
            device: self.device.class().name().to_owned(),
            dtype: match self.recipe.output.dtype {
                OutputDtype::Base => "base",
                OutputDtype::F32 => "f32",
                OutputDtype::F16 => "f16",
                OutputDtype::Bf16 => "bf16",
            }
            .to_owned(),
            merge: self.recipe.merge.method,
            seed: self.seed,
        }
    }

    pub(crate) fn input_digests(&self) -> BTreeMap<String, FileDigest> {
        self.graph
            .files
            .iter()
            .map(|f| (f.shown.clone(), f.digest))
            .collect()
    }

    /// What a build would do for a node, and why; `last` is the record of the last build.
    pub fn status(&self, keyed: &Keyed, last: &BuildRecord) -> Status {
        if matches!(keyed.node, modelforge_core::node::Node::Copy { .. }) {
            return Status::Copy;
        }
        if self.store.action(&keyed.key).is_some() {
            return Status::Cached;
        }
        let why = match (keyed.fuse(), last.tensors.get(&keyed.name)) {
            (Some(new), Some(modelforge_core::node::Node::Fuse(old))) => {
                super::changes::since(self, &keyed.name, new, old)
            }
            (Some(_), _) => vec!["it was never built".into()],
            (None, _) => vec!["it is not in the cache".into()],
        };
        Status::Compute { why }
    }

    /// The fate of every module, with the figures of width adaptation and of the comparison of
    /// the two bases read from their cache entries.
    pub fn fates(&self) -> Vec<crate::plan::Fate> {
        use crate::plan::AlignItem;
        let res = self;
        let align = &res.plan.align;
        let figure = |item| {
            let key = &res.graph.align(item).key;
            res.store.action(key).and_then(|e| e.energy.or(e.overlap))
        };
        res.plan
            .transfer
            .iter()
            .map(|fate| {
                let mut fate = fate.clone();
                match fate.adapted {
                    Some(crate::plan::Adapt::Aligned {
                        node: AlignItem::Delta(i),
                        ..
                    }) => {
                        let inner = align.deltas[i].inner;
                        let residual = align.inners[inner].residual;
                        fate.energy = figure(AlignItem::Delta(i));
                        fate.overlap = figure(AlignItem::Inner(inner));
                        fate.residual_fit = figure(AlignItem::Residual(residual));
                    }
                    Some(crate::plan::Adapt::Fit { energy }) => fate.energy = figure(energy),
                    _ => {}
                }
                if let Some(compared) = fate.compared {
                    fate.overlap = figure(compared);
                    // Moved whole, it keeps all of its energy.
                    fate.energy = fate.energy.or(Some(1.0));
                }
                fate
            })
            .collect()
    }

    /// What the files around the weights are made from.
    pub fn surroundings(&self) -> crate::output::Surroundings<'_> {
        crate::output::Surroundings {
            recipe: &self.recipe,
            recipe_digest: self.recipe_digest,
            plan: &self.plan,
            fates: self.fates(),
            effects: self.effects(),
            inputs: self.input_digests(),
        }
    }

    /// The effects measured on the adapters' examples so far.
    pub fn effects(&self) -> BTreeMap<String, crate::plan::Effect> {
        self.effects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the report says of each adapter as a whole.
    pub fn carried(&self) -> Vec<crate::plan::Carried> {
        crate::plan::Carried::of(&self.fates(), &self.effects())
    }

    /// The record of the last build of the primary output.
    pub fn last_build(&self) -> BuildRecord {
        BuildRecord::read(&self.store, &self.recipe.primary_output().path)
    }

    /// Whether the lock records exactly this recipe, these inputs, and outputs still on disk.
    pub(crate) fn up_to_date(&self, lock: &Lock, rehash: bool) -> bool {
        let dir = recipe_dir(&self.recipe);
        lock.version == lock::VERSION
            && lock.modelforge == env!("CARGO_PKG_VERSION")
            && lock.recipe == self.recipe_digest
            && lock.resolved == self.resolved()
            && lock.inputs == self.input_digests()
            && !lock.outputs.is_empty()
            && lock.outputs.iter().all(|(path, digest)| {
                self.store
                    .file_digest(&dir.join(path), rehash)
                    .is_ok_and(|d| d == *digest)
            })
    }
}

/// The fused model's files and the tensors each holds (`[output] shard_by`).
fn shards(recipe: &Recipe, plan: &Plan) -> Vec<writer::Shard> {
    let tensors = plan.tensors.iter();
    let groups = match recipe.output.shard_by {
        ShardBy::Size => vec![tensors.map(|t| t.out.clone()).collect()],
        ShardBy::Inputs => {
            // Keyed by the adapters a tensor depends on; the base's own tensors come first.
            let mut groups: BTreeMap<Vec<usize>, Vec<writer::OutTensor>> = BTreeMap::new();
            for tensor in tensors {
                let replacement = match tensor.origin {
                    Origin::Replacement { adapter, .. } => Some(adapter),
                    Origin::Base { .. } => None,
                };
                let mut adapters: Vec<usize> = replacement
                    .into_iter()
                    .chain(tensor.deltas.iter().map(|d| d.adapter))
                    .collect();
                adapters.sort_unstable();
                adapters.dedup();
                groups.entry(adapters).or_default().push(tensor.out.clone());
            }
            groups.into_values().collect()
        }
    };
    writer::layout(groups, recipe.output.max_shard_size)
}

pub(crate) fn recipe_dir(recipe: &Recipe) -> PathBuf {
    recipe.path.parent().map(Path::to_owned).unwrap_or_default()
}

/// `cpu`, or `cuda:N`, as asked for. `auto` is CUDA, where this machine has an NVIDIA device,
/// only for a build with whole-tensor work (re-factoring deltas for `[output] adapter`, a
/// pruning or sign-electing merge). A build that only sums deltas is memory-bound: measured on
/// an H200 host with 16 cores, a 13.5 GB model with a LoRA on all seven projections built in
/// 10 s on the CPU and 30 s on CUDA, every block crossing PCIe twice (README, Benchmarks).
fn resolve_device(recipe: &Recipe) -> Device {
    let whole = recipe.output.adapter.is_some()
        || recipe.merge.method.sparsify().is_some()
        || recipe.merge.method.elects_sign();
    match recipe.device {
        DeviceRequest::Cpu => Device::Cpu,
        DeviceRequest::Cuda(n) => Device::Cuda(n),
        DeviceRequest::Auto if whole && Path::new("/dev/nvidia0").exists() => Device::Cuda(0),
        DeviceRequest::Auto => Device::Cpu,
    }
}

/// The cache: `--cache`, else `MODELFORGE_CACHE`, else the `cache/` folder at the top of the
/// workspace the recipe lives in (the nearest folder above it holding `.git` or `cache/`),
/// else `cache/` beside the recipe.
pub(crate) fn cache_dir(args: &CacheOptions, recipe: Option<&Recipe>) -> PathBuf {
    if let Some(dir) = &args.dir {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("MODELFORGE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let start = match recipe {
        Some(recipe) => std::path::absolute(recipe_dir(recipe)).unwrap_or_default(),
        None => std::env::current_dir().unwrap_or_default(),
    };
    start
        .ancestors()
        .find(|dir| dir.join(".git").exists() || dir.join("cache").is_dir())
        .unwrap_or(&start)
        .join("cache")
}

/// A build replaces its outputs as a whole: one that held the cache (or lay in it) would
/// destroy it.
fn check_outputs_outside_cache(recipe: &Recipe, cache: &Path) -> Result<(), ExecError> {
    use crate::io::paths::{nested, resolve};
    let cache_resolved = resolve(cache);
    match recipe
        .output_dirs()
        .find(|output| nested(&resolve(&output.path), &cache_resolved))
    {
        Some(output) => Err(ExecError::OutputInCache {
            output: output.path.clone(),
            cache: cache.to_owned(),
            src: recipe.src(),
            span: output.span,
        }),
        None => Ok(()),
    }
}

pub(crate) fn open_store(args: &CacheOptions, recipe: Option<&Recipe>) -> Result<Store, ExecError> {
    let dir = cache_dir(args, recipe);
    Store::open(&dir).map_err(|source| ExecError::Cache { path: dir, source })
}
