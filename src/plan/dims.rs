//! Width adaptation (`[adapter.map] dims`): how a delta made for one base's widths lands on a
//! base of other widths. `truncate` and `pad` keep each delta's leading rows and columns (the
//! fusion does it). `align` plans nodes computed before fusing, each cached under the digests
//! of what it reads, so a second adapter on the same pair of bases reuses them:
//!
//! - a residual map R per pair of bases, from the embedding rows of the tokens they share;
//! - an inner map M per pair of module weights (source module, target tensor), through R;
//! - an aligned delta per LoRA module: M·ΔW·Rᵀ, or R·ΔW·Mᵀ for modules writing the residual
//!   stream, re-factored to low rank.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::io::hf::HfModel;
use crate::io::peft::LoraModule;
use crate::io::safetensors::TensorMeta;
use modelforge_core::node::{Layout, Side};

/// Embedding tensors' module names, by family.
const EMBEDDINGS: &[&str] = &["embed_tokens", "wte", "word_embeddings", "embed_in"];

/// A tensor of a model the planner opened: where its bytes are.
#[derive(Clone, Debug)]
pub(crate) struct TensorRef {
    pub path: PathBuf,
    pub name: String,
    pub meta: TensorMeta,
}

impl TensorRef {
    pub fn of(model: &HfModel, name: &str) -> Option<TensorRef> {
        let (file, meta) = model.weights.get(name)?;
        Some(TensorRef {
            path: file.path.clone(),
            name: name.to_owned(),
            meta: meta.clone(),
        })
    }
}

/// Why the maps of `dims = "align"` cannot be planned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AlignError {
    #[error("{0}")]
    Input(#[from] crate::io::InputError),
    #[error("{path}: {source}", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {which} base has no token embedding ({} tensor)", EMBEDDINGS.join(", "))]
    NoEmbedding { which: &'static str },
    #[error("the two bases' embeddings have {source_rows} and {target_rows} rows, and they do not both have a vocabulary to match tokens by (tokenizer.json, or a SentencePiece tokenizer.model or ice_text.model)")]
    NoVocabulary {
        source_rows: usize,
        target_rows: usize,
    },
    #[error("the two vocabularies share no token")]
    NoSharedToken,
    #[error("the source base `{dir}` has no `{tensor}`", dir = dir.display())]
    NoSourceTensor { dir: PathBuf, tensor: String },
    #[error("the delta on `{tensor}` is {delta:?} but the source base's tensor is {base:?}")]
    DeltaShape {
        tensor: String,
        delta: [usize; 2],
        base: Vec<usize>,
    },
    /// A vocabulary file that cannot be read as one.
    #[error("`{path}` {what}", path = path.display())]
    Vocabulary { path: PathBuf, what: String },
}

/// How the shared tokens were found.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum TokenMatch {
    /// By string, through both bases' vocabularies: the files they were read from.
    ByString { source: String, target: String },
    /// By id: neither base has a vocabulary to read, and their embeddings have as many rows.
    ById,
}

/// The residual map between an adapter's source base and the target base.
#[derive(Debug)]
pub(crate) struct ResidualPlan {
    /// The source base's folder.
    pub source_dir: PathBuf,
    pub source: TensorRef,
    pub target: TensorRef,
    /// `[source id, target id]` of each shared token, sorted.
    pub pairs: Vec<[u32; 2]>,
    pub matched: TokenMatch,
}

impl ResidualPlan {
    /// How the report describes it.
    pub fn describe(&self) -> String {
        let how = match &self.matched {
            TokenMatch::ByString { source, target } if source == target => {
                format!("matched by string ({source})")
            }
            TokenMatch::ByString { source, target } => {
                format!("matched by string ({source}, {target})")
            }
            TokenMatch::ById => "matched by id (no vocabulary file; same vocabulary size)".into(),
        };
        format!("{} shared tokens {how}", self.pairs.len())
    }
}

/// The inner-space map of one module pair.
#[derive(Debug)]
pub(crate) struct InnerPlan {
    pub residual: usize,
    pub side: Side,
    pub source: TensorRef,
    pub target: TensorRef,
    /// Where the module's weight sits in `target`.
    pub layout: Layout,
}

/// One LoRA module's delta, aligned.
#[derive(Debug)]
pub(crate) struct AlignedPlan {
    pub inner: usize,
    pub adapter: usize,
    pub a: TensorMeta,
    pub b: TensorMeta,
    pub rank: usize,
}

/// A delta cut or zero-padded by `truncate` or `pad` (the fusion does that); this node only
/// measures the energy it keeps, for the report.
#[derive(Debug)]
pub(crate) struct FitPlan {
    pub adapter: usize,
    pub a: TensorMeta,
    pub b: TensorMeta,
    /// The target's (out, in), in the LoRA's orientation.
    pub to: [usize; 2],
}

/// How alike a module's two base weights are under the identity map the index modes use
/// (`exact`, `truncate`, `pad`), for the report: the source base's weight of the module and
/// the target's where its delta lands.
#[derive(Debug)]
pub(crate) struct OverlapPlan {
    pub side: Side,
    pub source: TensorRef,
    pub target: TensorRef,
    /// Where the module's weight sits in `target`.
    pub layout: Layout,
}

/// Everything width adaptation computes before fusing, and what the report compares,
/// deduplicated.
#[derive(Debug, Default)]
pub(crate) struct Alignment {
    /// The source bases opened, one per distinct folder.
    pub sources: Vec<HfModel>,
    pub residuals: Vec<ResidualPlan>,
    pub inners: Vec<InnerPlan>,
    pub deltas: Vec<AlignedPlan>,
    pub fits: Vec<FitPlan>,
    pub overlaps: Vec<OverlapPlan>,
}

impl Alignment {
    /// The source base at `dir`, opened once; its index in `sources`.
    pub fn source(&mut self, dir: &Path) -> Result<usize, AlignError> {
        if let Some(i) = self.sources.iter().position(|m| m.dir == dir) {
            return Ok(i);
        }
        self.sources.push(HfModel::open(dir)?);
        Ok(self.sources.len() - 1)
    }

    /// The residual map from the source base at `dir` to `target`, planned once per source.
    pub fn residual(&mut self, dir: &Path, target: &HfModel) -> Result<usize, AlignError> {
        if let Some(i) = self.residuals.iter().position(|r| r.source_dir == dir) {
            return Ok(i);
        }
        let source = self.source(dir)?;
        let source = &self.sources[source];
        let embedding = |model: &HfModel, which: &'static str| {
            embedding(model).ok_or(AlignError::NoEmbedding { which })
        };
        let (s, t) = (embedding(source, "source")?, embedding(target, "target")?);
        let (s_rows, t_rows) = (s.meta.shape[0], t.meta.shape[0]);
        let (pairs, matched) = match (vocabulary(dir)?, vocabulary(&target.dir)?) {
            (Some((sv, source)), Some((tv, target))) => (
                shared_tokens(&sv, &tv, s_rows, t_rows),
                TokenMatch::ByString { source, target },
            ),
            _ if s_rows == t_rows => (
                (0..s_rows as u32).map(|i| [i, i]).collect(),
                TokenMatch::ById,
            ),
            _ => {
                return Err(AlignError::NoVocabulary {
                    source_rows: s_rows,
                    target_rows: t_rows,
                })
            }
        };
        if pairs.is_empty() {
            return Err(AlignError::NoSharedToken);
        }
        self.residuals.push(ResidualPlan {
            source_dir: dir.to_owned(),
            source: s,
            target: t,
            pairs,
            matched,
        });
        Ok(self.residuals.len() - 1)
    }

    /// The inner map of a module pair, planned once per pair of weights.
    fn inner(
        &mut self,
        residual: usize,
        side: Side,
        source_tensor: &str,
        (target, layout): (TensorRef, Layout),
    ) -> Result<usize, AlignError> {
        if let Some(i) = self.inners.iter().position(|m| {
            m.residual == residual
                && m.source.name == source_tensor
                && m.target.name == target.name
                && m.layout == layout
        }) {
            return Ok(i);
        }
        let model = self
            .sources
            .iter()
            .find(|m| m.dir == self.residuals[residual].source_dir)
            .expect("the residual map opened its source");
        let source =
            TensorRef::of(model, source_tensor).ok_or_else(|| AlignError::NoSourceTensor {
                dir: model.dir.clone(),
                tensor: source_tensor.to_owned(),
            })?;
        self.inners.push(InnerPlan {
            residual,
            side,
            source,
            target,
            layout,
        });
        Ok(self.inners.len() - 1)
    }

    /// Plans the aligned delta of one LoRA module (`adapter`'s `lora`, on `source_tensor` of
    /// the source base) onto its weight in `target`, laid out there as `layout` says: its inner
    /// map, shared with any other adapter on the same weights, then the delta itself,
    /// re-factored to `rank` (default: its own). Returns its index in `deltas`.
    pub fn module(
        &mut self,
        residual: usize,
        side: Side,
        source_tensor: &str,
        target: (TensorRef, Layout),
        (adapter, lora): (usize, &LoraModule),
        rank: Option<usize>,
    ) -> Result<usize, AlignError> {
        let inner = self.inner(residual, side, source_tensor, target)?;
        let source_shape = &self.inners[inner].source.meta.shape;
        let delta_shape = [lora.b.shape[0], lora.a.shape[1]];
        if source_shape[..] != delta_shape {
            return Err(AlignError::DeltaShape {
                tensor: source_tensor.to_owned(),
                delta: delta_shape,
                base: source_shape.clone(),
            });
        }
        self.deltas.push(AlignedPlan {
            inner,
            adapter,
            a: lora.a.clone(),
            b: lora.b.clone(),
            rank: rank.unwrap_or(lora.a.shape[0]),
        });
        Ok(self.deltas.len() - 1)
    }

    /// Plans measuring what `truncate` or `pad` keeps of a LoRA module's delta when it is cut
    /// or padded to `to` (out, in); returns its index in `fits`.
    pub fn fit(&mut self, adapter: usize, lora: &LoraModule, to: [usize; 2]) -> usize {
        self.fits.push(FitPlan {
            adapter,
            a: lora.a.clone(),
            b: lora.b.clone(),
            to,
        });
        self.fits.len() - 1
    }

    /// Plans comparing the source base's `source_tensor` (of the source base `source`, an index
    /// in `sources`) with its module's weight in `target` under the identity map, once per pair
    /// of weights; `None` when the source base has no such tensor of the delta's shape (the
    /// report then cannot tell).
    pub fn overlap(
        &mut self,
        source: usize,
        side: Side,
        (source_tensor, delta): (&str, [usize; 2]),
        (target, layout): (TensorRef, Layout),
    ) -> Option<usize> {
        let source = TensorRef::of(&self.sources[source], source_tensor)
            .filter(|s| s.meta.shape[..] == delta)?;
        if let Some(i) = self.overlaps.iter().position(|o| {
            o.source.path == source.path
                && o.source.name == source.name
                && o.target.name == target.name
                && o.layout == layout
        }) {
            return Some(i);
        }
        self.overlaps.push(OverlapPlan {
            side,
            source,
            target,
            layout,
        });
        Some(self.overlaps.len() - 1)
    }

    /// How the report names the adaptation of aligned delta `i`.
    pub fn describe(&self, i: usize) -> String {
        let delta = &self.deltas[i];
        let residual = &self.residuals[self.inners[delta.inner].residual];
        format!("align rank {}: {}", delta.rank, residual.describe())
    }

    /// All files the alignment reads beyond the target base and the adapters.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .sources
            .iter()
            .flat_map(HfModel::weight_files)
            .collect();
        files.sort();
        files.dedup();
        files
    }
}

/// Which side of a module faces the residual stream, from its role in the schemas.
pub(crate) fn side_of(role: crate::arch::Role) -> Side {
    if role.writes_residual() {
        Side::Output
    } else {
        Side::Input
    }
}

/// The model's token embedding.
fn embedding(model: &HfModel) -> Option<TensorRef> {
    let name = model.weights.tensors.iter().find_map(|(name, (_, meta))| {
        let module = name.strip_suffix(".weight")?;
        let leaf = module.rsplit('.').next()?;
        (EMBEDDINGS.contains(&leaf) && meta.shape.len() == 2).then_some(name)
    })?;
    TensorRef::of(model, name)
}

/// SentencePiece model files, by the names models ship them under.
const SENTENCEPIECE: &[&str] = &["tokenizer.model", "ice_text.model"];

/// A base's vocabulary (token string → id in its embedding) and the file it was read from:
/// tokenizer.json when it has one, else a SentencePiece model, whose ids are shifted by
/// tokenizer_config.json's `num_image_tokens` where that is given (the first ChatGLM-6B release
/// put 20,000 image tokens before the text pieces).
type Vocabulary = (BTreeMap<String, u32>, String);

fn vocabulary(dir: &Path) -> Result<Option<Vocabulary>, AlignError> {
    let path = dir.join("tokenizer.json");
    if crate::io::hf::present(&path)? {
        return tokenizer_json(&path).map(|v| Some((v, "tokenizer.json".into())));
    }
    for name in SENTENCEPIECE {
        let path = dir.join(name);
        if crate::io::hf::present(&path)? {
            let offset = image_tokens(dir)?;
            let pieces = sentencepiece(&path)?;
            let mut vocab = BTreeMap::new();
            for (id, piece) in pieces.into_iter().enumerate() {
                let id = u32::try_from(id as u64 + offset).map_err(|_| AlignError::Vocabulary {
                    path: path.clone(),
                    what: "has too many pieces".into(),
                })?;
                vocab.entry(piece).or_insert(id);
            }
            return Ok(Some((vocab, (*name).to_owned())));
        }
    }
    Ok(None)
}

/// The pieces of a SentencePiece model file.
fn sentencepiece(path: &Path) -> Result<Vec<String>, AlignError> {
    let read = |source| AlignError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if !meta.is_file() || meta.len() > crate::io::sentencepiece::MAX_LEN {
        return Err(AlignError::Vocabulary {
            path: path.to_owned(),
            what: format!(
                "is not a SentencePiece model file of at most {} MB",
                crate::io::sentencepiece::MAX_LEN >> 20
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    crate::io::sentencepiece::pieces(&bytes).map_err(|e| AlignError::Vocabulary {
        path: path.to_owned(),
        what: format!("is not a readable SentencePiece model: {e}"),
    })
}

/// tokenizer_config.json's `num_image_tokens`, 0 when it does not say.
fn image_tokens(dir: &Path) -> Result<u64, AlignError> {
    let path = dir.join("tokenizer_config.json");
    if !crate::io::hf::present(&path)? {
        return Ok(0);
    }
    let json = crate::io::hf::read_json(&path)?;
    match json.get("num_image_tokens") {
        None | Some(Value::Null) => Ok(0),
        Some(n) => n.as_u64().ok_or_else(|| AlignError::Vocabulary {
            path: path.clone(),
            what: "gives a `num_image_tokens` that is not a whole number".into(),
        }),
    }
}

/// The vocabulary of a tokenizer.json.
fn tokenizer_json(path: &Path) -> Result<BTreeMap<String, u32>, AlignError> {
    let json = crate::io::hf::read_json(path)?;
    let malformed = || AlignError::Vocabulary {
        path: path.to_owned(),
        what: "has no readable `model.vocab`".into(),
    };
    let mut vocab = BTreeMap::new();
    match json.pointer("/model/vocab") {
        // BPE and WordPiece: a map of token to id.
        Some(Value::Object(map)) => {
            for (token, id) in map {
                let id = id.as_u64().ok_or_else(malformed)?;
                vocab.insert(token.clone(), u32::try_from(id).map_err(|_| malformed())?);
            }
        }
        // Unigram: a list of [token, score], the id being the place.
        Some(Value::Array(list)) => {
            for (id, entry) in list.iter().enumerate() {
                let token = entry.get(0).and_then(Value::as_str).ok_or_else(malformed)?;
                vocab.insert(token.to_owned(), id as u32);
            }
        }
        _ => return Err(malformed()),
    }
    for added in json
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(token), Some(id)) = (
            added.get("content").and_then(Value::as_str),
            added.get("id").and_then(Value::as_u64),
        ) {
            vocab.insert(token.to_owned(), id as u32);
        }
    }
    Ok(vocab)
}

/// `[source id, target id]` of the tokens both vocabularies spell the same, within both
/// embeddings' rows, sorted by source id.
fn shared_tokens(
    source: &BTreeMap<String, u32>,
    target: &BTreeMap<String, u32>,
    source_rows: usize,
    target_rows: usize,
) -> Vec<[u32; 2]> {
    let mut pairs: Vec<[u32; 2]> = source
        .iter()
        .filter_map(|(token, &s)| Some([s, *target.get(token)?]))
        .filter(|[s, t]| (*s as usize) < source_rows && (*t as usize) < target_rows)
        .collect();
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p[0]);
    pairs
}

/// Whether a delta of shape `delta` may be fitted to `base` by `truncate` (only narrower) or
/// `pad` (only wider); the offending dimension otherwise.
pub(crate) fn fits(truncate: bool, delta: &[usize], base: &[usize]) -> Result<(), usize> {
    match delta
        .iter()
        .zip(base)
        .position(|(d, b)| if truncate { b > d } else { b < d })
    {
        Some(dim) => Err(dim),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&str, u32)]) -> BTreeMap<String, u32> {
        tokens.iter().map(|(t, i)| (t.to_string(), *i)).collect()
    }

    #[test]
    fn tokens_are_matched_by_string_within_both_embeddings() {
        let source = vocab(&[("a", 0), ("b", 1), ("c", 2), ("only-source", 3), ("big", 9)]);
        let target = vocab(&[("c", 0), ("a", 5), ("b", 1), ("big", 2), ("x", 3)]);
        // `big` is beyond the source embedding's 4 rows.
        assert_eq!(
            shared_tokens(&source, &target, 4, 8),
            [[0, 5], [1, 1], [2, 0]]
        );
        assert_eq!(shared_tokens(&source, &target, 4, 4), [[1, 1], [2, 0]]);
    }

    #[test]
    fn truncate_only_narrows_and_pad_only_widens() {
        assert_eq!(fits(true, &[64, 32], &[48, 32]), Ok(()));
        assert_eq!(fits(true, &[64, 32], &[48, 40]), Err(1));
        assert_eq!(fits(false, &[48, 32], &[64, 32]), Ok(()));
        assert_eq!(fits(false, &[48, 32], &[40, 32]), Err(0));
    }
}
