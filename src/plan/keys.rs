//! Node keys: each output tensor's key is the blake3 of a canonical description of everything
//! its bytes depend on. Paths are not part of it (moving a file changes nothing), digests are.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Adapt, DeltaKind, Origin, Plan, TensorPlan};
use crate::digest::{FileDigest, NodeKey, TensorDigest};
use crate::io::peft::LoraKind;
use crate::io::safetensors::TensorMeta;
use crate::recipe::{MajoritySign, Merge, MergeMethod};
use crate::store::Store;

/// Bumped whenever the fusion arithmetic changes, so that old cache entries are not reused.
const FUSE_VERSION: u32 = 1;

/// Bumped whenever the alignment arithmetic (`dims = "align"`) changes.
const ALIGN_VERSION: u32 = 1;

/// An input file of the build.
#[derive(Clone, Debug)]
pub(crate) struct InputFile {
    pub path: PathBuf,
    /// The path relative to the recipe's folder, as the lock file records it.
    pub shown: String,
    pub digest: FileDigest,
}

/// Everything a fused tensor's bytes depend on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct TensorKey {
    pub op: String,
    pub version: u32,
    pub origin: SliceKey,
    pub deltas: Vec<DeltaKey>,
    pub dtype: String,
    pub device: String,
    /// Absent for the plain weighted sum (`linear`, `cat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeKey>,
    /// The dtype a replacement is rounded to before anything is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_cast: Option<String>,
}

/// A pruning or sign-electing merge: the per-adapter weights and scalings matter apart.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct MergeKey {
    pub method: MergeMethod,
    pub density: f64,
    pub majority_sign: MajoritySign,
    pub seed: i64,
    pub weights: Vec<f64>,
    pub scalings: Vec<f64>,
}

/// The seed of one tensor's random pruning: from the recipe's seed and the tensor's name, so
/// that it does not depend on the order or the thread tensors are computed in.
pub(crate) fn tensor_seed(seed: u64, tensor: &str) -> i64 {
    let hash = blake3::hash(format!("{seed}:{tensor}").as_bytes());
    let bytes: [u8; 8] = hash.as_bytes()[..8].try_into().expect("8 bytes");
    (u64::from_le_bytes(bytes) >> 1) as i64
}

/// What a tensor read from an input is: its bytes are named by the digest of the base's file
/// they are read from (a base is hashed once per file), or, for an adapter's tensor, by the
/// digest of its own bytes, so that changing one tensor of an adapter changes only the keys
/// that read it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct SliceKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileDigest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<TensorDigest>,
    pub tensor: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct DeltaKey {
    /// In a fused target, where the delta's rows go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<crate::exec::job::RowMap>,
    /// q/k rows permuted into the target's rotary convention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary: Option<crate::exec::rotary::RotaryMap>,
    pub kind: String,
    pub factor: f64,
    pub a: SliceKey,
    pub b: Option<SliceKey>,
    /// Made for other widths: fitted, or replaced by an aligned delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<crate::exec::job::Adapt>,
    /// DoRA's magnitude vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub magnitude: Option<SliceKey>,
    /// The rows trainable tokens replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indices: Option<Vec<usize>>,
}

/// The node keys of `dims = "align"`'s maps and deltas, by their index in `Plan::align`.
#[derive(Clone, Debug, Default)]
pub(crate) struct AlignKeys {
    pub residuals: Vec<NodeKey>,
    pub inners: Vec<NodeKey>,
    pub deltas: Vec<NodeKey>,
    pub fits: Vec<NodeKey>,
}

impl AlignKeys {
    /// What the engine is told about an adapted delta.
    pub fn adapt(&self, plan: &Plan, adapt: Adapt) -> crate::exec::job::Adapt {
        match adapt {
            Adapt::Fit(_) => crate::exec::job::Adapt::Fit,
            Adapt::Aligned(i) => crate::exec::job::Adapt::Aligned {
                node: self.deltas[i],
                rank: plan.align.deltas[i].rank,
            },
        }
    }

    /// Each key depends on the digests of what its node reads and on the keys of the nodes
    /// it reads, never on paths: moving a base changes nothing, and a second adapter on the
    /// same pair of bases finds the maps already made.
    fn new(plan: &Plan, slice: &dyn Fn(&Path, &str, &TensorMeta) -> SliceKey) -> AlignKeys {
        let align = &plan.align;
        let tensor = |t: &super::TensorRef| slice(&t.path, &t.name, &t.meta);
        let residuals: Vec<NodeKey> = align
            .residuals
            .iter()
            .map(|r| {
                let pairs: Vec<u8> = r
                    .pairs
                    .iter()
                    .flatten()
                    .flat_map(|i| i.to_le_bytes())
                    .collect();
                NodeKey::of_value(&serde_json::json!({
                    "op": "residual_map",
                    "version": ALIGN_VERSION,
                    "source": tensor(&r.source),
                    "target": tensor(&r.target),
                    "pairs": blake3::hash(&pairs).to_hex().as_str(),
                }))
            })
            .collect();
        let inners: Vec<NodeKey> = align
            .inners
            .iter()
            .map(|m| {
                let mut key = serde_json::json!({
                    "op": "inner_map",
                    "version": ALIGN_VERSION,
                    "residual": residuals[m.residual],
                    "side": m.side,
                    "source": tensor(&m.source),
                    "target": tensor(&m.target),
                });
                // A whole, untransposed target keeps the key it had before layouts existed.
                if m.layout != Default::default() {
                    key["layout"] = serde_json::to_value(&m.layout).expect("a layout serialises");
                }
                NodeKey::of_value(&key)
            })
            .collect();
        let lora_file = |adapter: usize| match &plan.inputs.adapters[adapter] {
            super::Source::Lora(adapter) => &adapter.file,
            super::Source::Model(_) => unreachable!("only LoRA modules are adapted"),
        };
        let fits = align
            .fits
            .iter()
            .map(|f| {
                let file = lora_file(f.adapter);
                NodeKey::of_value(&serde_json::json!({
                    "op": "fit_energy",
                    "version": ALIGN_VERSION,
                    "a": slice(&file.path, &name_in(file, &f.a), &f.a),
                    "b": slice(&file.path, &name_in(file, &f.b), &f.b),
                    "to": f.to,
                }))
            })
            .collect();
        let deltas = align
            .deltas
            .iter()
            .map(|d| {
                let file = lora_file(d.adapter);
                let inner = &align.inners[d.inner];
                NodeKey::of_value(&serde_json::json!({
                    "op": "align_delta",
                    "version": ALIGN_VERSION,
                    "residual": residuals[inner.residual],
                    "inner": inners[d.inner],
                    "side": inner.side,
                    "a": slice(&file.path, &name_in(file, &d.a), &d.a),
                    "b": slice(&file.path, &name_in(file, &d.b), &d.b),
                    "rank": d.rank,
                }))
            })
            .collect();
        AlignKeys {
            residuals,
            inners,
            deltas,
            fits,
        }
    }
}

/// Digests every input file (through the stat cache) and keys every computed tensor.
pub(crate) struct Keys {
    pub files: Vec<InputFile>,
    /// Per tensor of the plan: `None` when the tensor is copied byte for byte.
    pub tensors: Vec<Option<(NodeKey, TensorKey)>>,
    /// Per tensor of the plan, what its bytes depend on: its node key when it is computed, the
    /// input slice it is copied from when it is not.
    pub bytes: Vec<NodeKey>,
    pub align: AlignKeys,
}

impl Keys {
    pub fn new(
        plan: &Plan,
        recipe_dir: &Path,
        store: &Store,
        rehash: bool,
        device: &str,
        merge: (&Merge, u64),
    ) -> std::io::Result<Keys> {
        let mut paths: Vec<PathBuf> = plan.inputs.base.weight_files();
        paths.push(plan.inputs.base.dir.join("config.json"));
        for source in &plan.inputs.adapters {
            paths.extend(source.files());
        }
        paths.extend(plan.arch_files.iter().cloned());
        paths.extend(plan.align.files());
        paths.extend(plan.tokenizer.iter().cloned());
        let mut files = Vec::new();
        for path in paths {
            let digest = store
                .file_digest(&path, rehash)
                .map_err(|e| with_path(e, &path))?;
            let shown = pathdiff(&path, recipe_dir);
            files.push(InputFile {
                path,
                shown,
                digest,
            });
        }
        let by_path: BTreeMap<&Path, FileDigest> =
            files.iter().map(|f| (f.path.as_path(), f.digest)).collect();
        // Adapters' tensors are keyed by their own bytes.
        let mut by_tensor = BTreeMap::new();
        for source in &plan.inputs.adapters {
            let Some(adapter) = source.lora() else {
                continue;
            };
            let file = &adapter.file;
            let tensors: Vec<(String, u64, u64)> = file
                .tensors
                .iter()
                .map(|(name, meta)| (name.clone(), meta.start, meta.len))
                .collect();
            let digests = store
                .tensor_digests(&file.path, by_path[file.path.as_path()], &tensors)
                .map_err(|e| with_path(e, &file.path))?;
            by_tensor.insert(file.path.clone(), digests);
        }
        let slice = |path: &Path, name: &str, meta: &TensorMeta| {
            let bytes = by_tensor.get(path).and_then(|d| d.get(name)).copied();
            SliceKey {
                file: bytes.is_none().then(|| by_path[path]),
                bytes,
                tensor: name.to_owned(),
                dtype: meta.dtype.to_string(),
                shape: meta.shape.clone(),
            }
        };
        let align = AlignKeys::new(plan, &slice);
        let tensors: Vec<_> = plan
            .tensors
            .iter()
            .map(|tensor| {
                if tensor.is_copy() {
                    return None;
                }
                let key = tensor_key(plan, tensor, device, merge, &slice, &align);
                Some((NodeKey::of_value(&key), key))
            })
            .collect();
        let bytes = plan
            .tensors
            .iter()
            .zip(&tensors)
            .map(|(tensor, key)| match key {
                Some((node, _)) => *node,
                None => NodeKey::of_value(&serde_json::json!({
                    "op": "copy",
                    "origin": origin_slice(plan, tensor, &slice),
                })),
            })
            .collect();
        Ok(Keys {
            files,
            tensors,
            bytes,
            align,
        })
    }
}

/// The input tensor a tensor starts from.
fn origin_slice(
    plan: &Plan,
    tensor: &TensorPlan,
    slice: &dyn Fn(&Path, &str, &TensorMeta) -> SliceKey,
) -> SliceKey {
    match &tensor.origin {
        Origin::Base { tensor: name, meta } => {
            let (file, _) = plan
                .inputs
                .base
                .weights
                .get(name)
                .expect("planned tensors exist");
            slice(&file.path, name, meta)
        }
        Origin::Replacement { adapter, meta, .. } => {
            let file = plan.inputs.adapters[*adapter]
                .tensor_file(&tensor.out.name)
                .expect("planned tensors exist");
            slice(&file.path, &name_in(file, meta), meta)
        }
    }
}

fn tensor_key(
    plan: &Plan,
    tensor: &TensorPlan,
    device: &str,
    (merge, seed): (&Merge, u64),
    slice: &dyn Fn(&Path, &str, &TensorMeta) -> SliceKey,
    align: &AlignKeys,
) -> TensorKey {
    let origin = origin_slice(plan, tensor, slice);
    let deltas = tensor
        .deltas
        .iter()
        .map(|delta| {
            let file = plan.inputs.adapters[delta.adapter]
                .tensor_file(&tensor.out.name)
                .expect("planned tensors exist");
            let name_of = |meta: &TensorMeta| name_in(file, meta);
            let plain = |kind: &str, a: SliceKey| DeltaKey {
                rows: None,
                rotary: None,
                kind: kind.into(),
                factor: delta.weight * delta.scaling,
                a,
                b: None,
                adapt: None,
                magnitude: None,
                indices: None,
            };
            match &delta.kind {
                DeltaKind::LowRank {
                    kind,
                    a,
                    b,
                    rows,
                    rotary,
                    adapt,
                    magnitude,
                } => DeltaKey {
                    rows: *rows,
                    rotary: *rotary,
                    kind: match kind {
                        LoraKind::Linear => "linear".to_owned(),
                        LoraKind::LinearTransposed => "linear_transposed".into(),
                        LoraKind::Embedding => "embedding".into(),
                        LoraKind::Experts { count, transposed } => {
                            let t = if *transposed { "_transposed" } else { "" };
                            format!("experts{t}:{count}")
                        }
                        LoraKind::Expert {
                            count,
                            index,
                            offset,
                        } => format!("expert:{index}/{count}@{offset}"),
                    },
                    b: Some(slice(&file.path, &name_of(b), b)),
                    adapt: adapt.map(|adapt| align.adapt(plan, adapt)),
                    magnitude: magnitude
                        .as_ref()
                        .map(|m| slice(&file.path, &name_of(m), m)),
                    ..plain("", slice(&file.path, &name_of(a), a))
                },
                DeltaKind::Vector(v) => plain("vector", slice(&file.path, &name_of(v), v)),
                DeltaKind::Difference(m) => {
                    plain("difference", slice(&file.path, &tensor.out.name, m))
                }
                DeltaKind::Tokens { indices, values } => DeltaKey {
                    indices: Some(indices.clone()),
                    ..plain("tokens", slice(&file.path, &name_of(values), values))
                },
            }
        })
        .collect();
    TensorKey {
        origin_cast: match &tensor.origin {
            Origin::Replacement { cast, .. } => cast.map(|c| c.to_string()),
            Origin::Base { .. } => None,
        },
        op: "fuse".into(),
        version: FUSE_VERSION,
        origin,
        deltas,
        dtype: tensor.out.dtype.to_string(),
        device: device.to_owned(),
        merge: (merge.method.sparsify().is_some() || merge.method.elects_sign()).then(|| {
            MergeKey {
                method: merge.method,
                density: {
                    let name = &tensor.out.name;
                    let module = name
                        .rsplit_once('.')
                        .map_or(name.as_str(), |(module, _)| module);
                    plan.density
                        .for_module(module, crate::recipe::layer_of(module))
                },
                majority_sign: merge.majority_sign,
                seed: tensor_seed(seed, &tensor.out.name),
                weights: tensor.deltas.iter().map(|d| d.weight).collect(),
                scalings: tensor.deltas.iter().map(|d| d.scaling).collect(),
            }
        }),
    }
}

/// The name of the tensor stored at `meta`'s offset (LoRA and replacement tensors are never
/// empty, so no two share an offset).
fn name_in(file: &crate::io::safetensors::SafetensorsFile, meta: &TensorMeta) -> String {
    file.tensors
        .iter()
        .find(|(_, m)| m.start == meta.start && m.len == meta.len)
        .map(|(n, _)| n.clone())
        .unwrap_or_default()
}

impl TensorKey {
    /// Why `self` differs from the key `old` that the same tensor had in the last build,
    /// naming files through `files`; `sources` names the file its origin and each of its
    /// deltas are read from (an adapter's tensors are keyed by their own bytes, not its file's).
    pub fn changes_since(
        &self,
        old: &TensorKey,
        files: &[InputFile],
        sources: &[String],
    ) -> Vec<String> {
        let name = |digest: &FileDigest| {
            files
                .iter()
                .find(|f| f.digest == *digest)
                .map(|f| format!("`{}`", f.shown))
                .unwrap_or_else(|| "an input".into())
        };
        let source = |i: usize| {
            sources
                .get(i)
                .map(|s| format!("`{s}`"))
                .unwrap_or_else(|| "an adapter".into())
        };
        let changed = |new: &SliceKey, old: &SliceKey, i: usize| match &new.file {
            Some(file) if new.file != old.file => Some(format!("{} changed", name(file))),
            None if new.bytes != old.bytes => Some(format!("{} changed", source(i))),
            _ => None,
        };
        let mut why = Vec::new();
        why.extend(changed(&self.origin, &old.origin, 0));
        if self.deltas.len() != old.deltas.len() {
            why.push(format!(
                "{} adapter(s) touch it now, {} before",
                self.deltas.len(),
                old.deltas.len()
            ));
        } else {
            for (i, (new, old)) in self.deltas.iter().zip(&old.deltas).enumerate() {
                let read = [
                    (Some(&new.a), Some(&old.a)),
                    (new.b.as_ref(), old.b.as_ref()),
                    (new.magnitude.as_ref(), old.magnitude.as_ref()),
                ];
                let tensor_changed = read.iter().any(|pair| match pair {
                    (Some(new), Some(old)) => changed(new, old, i + 1).is_some(),
                    (None, None) => false,
                    _ => true,
                });
                if tensor_changed {
                    why.push(format!("{} changed", source(i + 1)));
                } else if new.factor != old.factor {
                    why.push(format!(
                        "the weight × scaling of {} went from {} to {}",
                        source(i + 1),
                        old.factor,
                        new.factor
                    ));
                } else if new != old {
                    why.push(format!("{} is fused into it differently", source(i + 1)));
                }
            }
        }
        if self.dtype != old.dtype {
            why.push(format!(
                "the output dtype changed from {} to {}",
                old.dtype, self.dtype
            ));
        }
        if self.device != old.device {
            why.push(format!(
                "the device changed from {} to {}",
                old.device, self.device
            ));
        }
        if self.merge != old.merge {
            why.push("the merge settings changed".into());
        }
        if self.version != old.version {
            why.push("modelforge's fusion changed".into());
        }
        if why.is_empty() {
            why.push("its cached result is missing".into());
        }
        why
    }
}

fn with_path(err: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// `path` relative to `base` where it lies below it (or beside it, through `..`).
pub(crate) fn pathdiff(path: &Path, base: &Path) -> String {
    use std::path::Component;
    let abs = |p: &Path| {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
    };
    let (path, base) = (abs(path), abs(base));
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out.display().to_string()
}
