//! Recipes: the TOML a user writes, read and checked once into a [`Recipe`] that later stages
//! can trust. Values the user can get wrong keep their span so that later stages can still point
//! at them.
mod error;
mod layers;
mod schema;
mod weight;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{NamedSource, SourceSpan};
use toml::Spanned;

pub(crate) use error::{RecipeError, Src};
pub(crate) use layers::LayerRange;
pub(crate) use modelforge_core::node::{SignElection as MajoritySign, Sparsify};
pub(crate) use schema::{GgufType, MergeMethod, OutputDtype, ShardBy};

pub(crate) use weight::{layer_of, module_matches, ResolvedRule, Weight, WeightRule};

use schema::{RawRecipe, RawWeight};

/// The largest recipe read: a recipe with thousands of adapters is still far below it, and
/// parsing this much takes about a second.
const MAX_RECIPE_LEN: u64 = 16 << 20;

/// Shards above this size are split (the `transformers` default).
const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// A checked recipe: every path resolved and present, every number finite.
#[derive(Debug)]
pub(crate) struct Recipe {
    pub path: PathBuf,
    /// The text as read, for the lock file, the model card and diagnostics.
    pub text: Arc<String>,
    pub base: Entry,
    /// `[base] arch`: the base's schema by name, unchecked until the schemas are known.
    pub base_arch: Option<Named>,
    pub adapters: Vec<AdapterEntry>,
    pub output: Output,
    pub device: DeviceRequest,
    pub merge: Merge,
}

/// `[merge]`, checked: every method is one task-arithmetic merge with a way to sparsify each
/// delta and a way to elect signs.
#[derive(Clone, Debug)]
pub(crate) struct Merge {
    pub method: MergeMethod,
    /// The fraction of each delta's entries kept, as rules over layers and modules like
    /// `weight`'s (none: 1.0, keep all).
    pub density: Vec<WeightRule>,
    pub majority_sign: MajoritySign,
    /// The seed of DARE's random pruning; `None` means derived from the recipe's digest.
    pub seed: Option<u64>,
}

impl MergeMethod {
    /// Whether the method prunes each delta, and whether by magnitude or at random.
    pub fn sparsify(self) -> Option<Sparsify> {
        match self {
            MergeMethod::Linear | MergeMethod::Cat => None,
            MergeMethod::Ties | MergeMethod::MagnitudePrune => Some(Sparsify::Magnitude),
            MergeMethod::DareLinear | MergeMethod::DareTies => Some(Sparsify::Random),
        }
    }

    /// Whether the method elects a sign per entry and keeps only agreeing deltas.
    pub fn elects_sign(self) -> bool {
        matches!(self, MergeMethod::Ties | MergeMethod::DareTies)
    }
}

/// How an adapter's layers land on the base's.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum LayerMap {
    /// Layer i to layer i; the layer counts must agree.
    Same,
    /// Target layer t takes the source layer nearest t·(S−1)/(T−1).
    Interpolate,
    /// Layer i to layer i while both exist; the rest of the source is dropped.
    Truncate,
    /// Source layer → target layer; several sources of one target are averaged.
    Table(Vec<(usize, usize)>, SourceSpan),
}

/// A name the recipe gives (an architecture schema's), with where it gives it.
#[derive(Clone, Debug)]
pub(crate) struct Named {
    pub name: String,
    pub span: SourceSpan,
}

impl Named {
    fn of(value: &Spanned<String>) -> Named {
        Named {
            name: value.get_ref().clone(),
            span: value.span().into(),
        }
    }
}

/// How an adapter's delta meets a base of other widths (`[adapter.map] dims`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum DimsMap {
    /// The widths must agree.
    Exact,
    /// Keep the leading rows and columns of each delta; the base may only be narrower.
    Truncate,
    /// Zero rows and columns after each delta's own; the base may only be wider.
    Pad,
    /// Map each delta through the two bases' spaces (residual stream by the shared tokens'
    /// embeddings, each module's inner space by its two base weights), re-factored to `rank`
    /// (default: the adapter module's own).
    Align { rank: Option<usize> },
}

/// `dims` with where the recipe says it (its span, or the `[adapter.map]` table's).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DimsChoice {
    pub map: DimsMap,
    pub span: SourceSpan,
}

/// How a recipe names a base or an adapter: `path`, or `hf` with an optional `revision`.
type InputKeys<'a> = (
    &'a Option<Spanned<String>>,
    &'a Option<Spanned<String>>,
    &'a Option<Spanned<String>>,
);

/// A path the recipe names, with where it names it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub path: PathBuf,
    /// The path as written in the recipe.
    pub written: String,
    pub span: SourceSpan,
}

#[derive(Clone, Debug)]
pub(crate) struct AdapterEntry {
    pub entry: Entry,
    pub weight: Vec<WeightRule>,
    /// The base the adapter was trained on, when the recipe names it.
    pub source: Option<Entry>,
    /// `examples`: a file of texts of what the adapter does (with `source`).
    pub examples: Option<Entry>,
    /// `arch`: the schema the adapter's module names follow.
    pub arch: Option<Named>,
    pub map: LayerMap,
    pub dims: DimsChoice,
    /// Module names (last path components) the recipe skips.
    pub skip: Vec<String>,
    /// `unmatched = "error"`, where it says so: a module whose role the base has no place for
    /// fails the build instead of being skipped with a warning.
    pub refuse_unmatched: Option<SourceSpan>,
    /// The span of the whole `[[adapter]]` table.
    pub span: SourceSpan,
}

#[derive(Clone, Debug)]
pub(crate) struct Output {
    /// The fused model (none when only `adapter` is written).
    pub path: Option<Entry>,
    pub dtype: OutputDtype,
    pub max_shard_size: u64,
    pub shard_by: ShardBy,
    /// `[output] adapter`: the combined delta, re-factored into one PEFT adapter.
    pub adapter: Option<AdapterOutput>,
    /// `[output] gguf`: the fused model as one GGUF file.
    pub gguf: Option<GgufOutput>,
}

#[derive(Clone, Debug)]
pub(crate) struct GgufOutput {
    pub path: Entry,
    pub weights: GgufType,
}

#[derive(Clone, Debug)]
pub(crate) struct AdapterOutput {
    pub path: Entry,
    pub rank: RankChoice,
}

/// How the combined delta of each module is truncated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RankChoice {
    /// The sum of the ranks of the adapters touching the module: exact for linear merges.
    Exact,
    Rank(usize),
    /// The smallest rank keeping this fraction of ‖Δ‖²_F.
    Energy(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

impl Recipe {
    /// Reads and checks the recipe at `path`.
    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        let unreadable = |source| RecipeError::Unreadable {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(unreadable)?;
        // Read through a limit rather than by the file's length, so that a pipe
        // (`build <(generate-recipe)`) works and `/dev/zero` does not fill the memory.
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_RECIPE_LEN + 1),
            &mut bytes,
        )
        .map_err(unreadable)?;
        if bytes.len() as u64 > MAX_RECIPE_LEN {
            return Err(RecipeError::TooLarge {
                path: path.to_owned(),
                limit: MAX_RECIPE_LEN,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| RecipeError::NotUtf8 {
            path: path.to_owned(),
            at: e.utf8_error().valid_up_to(),
        })?;
        Recipe::parse(path, text)
    }

    pub fn parse(path: &Path, text: String) -> Result<Recipe, RecipeError> {
        let text = Arc::new(text);
        let src = NamedSource::new(path.display().to_string(), text.clone());
        let dir = path.parent().map(Path::to_owned).unwrap_or_default();
        let checker = Checker { src, dir };
        let raw: RawRecipe = toml::from_str(&text).map_err(|err| checker.syntax(err))?;

        let base = {
            let b = raw.base.get_ref();
            let at = raw.base.span();
            checker.input_dir("base model", (&b.path, &b.hf, &b.revision), at)?
        };
        let adapters = raw
            .adapters
            .iter()
            .map(|adapter| checker.adapter(adapter))
            .collect::<Result<_, _>>()?;
        let output = raw.output.get_ref();
        if output.path.is_none() && output.adapter.is_none() && output.gguf.is_none() {
            return Err(checker.invalid(
                "`[output]` names nothing to write".into(),
                "add `path = \"build/<name>\"` for the fused model, `gguf = \"build/<name>.gguf\"` for llama.cpp, `adapter = \"build/<name>-lora\"` for a PEFT adapter of the combined delta, or several",
                raw.output.span(),
            ));
        }
        if let (None, Some(span)) = (&output.gguf, output.gguf_type.as_ref().map(|t| t.span())) {
            return Err(checker.invalid(
                "`gguf_type` applies to `[output] gguf` only".into(),
                "add `gguf = \"build/<name>.gguf\"` to [output], or remove it",
                span,
            ));
        }
        let adapter_output = checker.adapter_output(output)?;
        let output = Output {
            gguf: output.gguf.as_ref().map(|path| GgufOutput {
                path: checker.entry(path),
                weights: output
                    .gguf_type
                    .as_ref()
                    .map(|t| *t.get_ref())
                    .unwrap_or_default(),
            }),
            adapter: adapter_output,
            path: output.path.as_ref().map(|path| checker.entry(path)),
            dtype: output
                .dtype
                .as_ref()
                .map(|d| *d.get_ref())
                .unwrap_or_default(),
            max_shard_size: match &output.max_shard_size {
                None => DEFAULT_MAX_SHARD_SIZE,
                Some(size) => crate::io::size::parse_size(size.get_ref()).map_err(|reason| {
                    checker.invalid(
                        format!("bad shard size: {reason}"),
                        "write a size such as `\"2GB\"` or `\"500MiB\"`",
                        size.span(),
                    )
                })?,
            },
            shard_by: output.shard_by.unwrap_or_default(),
        };
        let device_field = raw.build.as_ref().and_then(|b| b.get_ref().device.as_ref());
        let device = match device_field {
            None => DeviceRequest::Auto,
            Some(device) => parse_device(device.get_ref()).ok_or_else(|| {
                checker.invalid(
                    format!("unknown device `{}`", device.get_ref()),
                    "use `\"auto\"`, `\"cpu\"`, `\"cuda\"` or `\"cuda:N\"`",
                    device.span(),
                )
            })?,
        };
        let merge = checker.merge(raw.merge.as_ref())?;
        let recipe = Recipe {
            path: path.to_owned(),
            text,
            base,
            base_arch: raw.base.get_ref().arch.as_ref().map(Named::of),
            adapters,
            output,
            device,
            merge,
        };
        recipe.check_outputs_stand_apart(&checker)?;
        Ok(recipe)
    }

    /// The output that names the build (its record in the cache, the summary): the fused model,
    /// else the adapter.
    pub fn primary_output(&self) -> &Entry {
        match (&self.output.path, &self.output.adapter, &self.output.gguf) {
            (Some(path), _, _) => path,
            (None, Some(adapter), _) => &adapter.path,
            (None, None, Some(gguf)) => &gguf.path,
            (None, None, None) => {
                unreachable!("a recipe's [output] names a path, an adapter or a GGUF")
            }
        }
    }

    /// Whether the fused model's tensors are needed: for the model directory or the GGUF.
    pub fn fuses(&self) -> bool {
        self.output.path.is_some() || self.output.gguf.is_some()
    }

    /// The outputs, each replaced as a whole by a build: directories, and the GGUF file.
    pub fn output_dirs(&self) -> impl Iterator<Item = &Entry> {
        self.output
            .path
            .iter()
            .chain(self.output.adapter.as_ref().map(|a| &a.path))
            .chain(self.output.gguf.as_ref().map(|g| &g.path))
    }

    /// Refuses outputs that would replace an input, the recipe, or each other.
    fn check_outputs_stand_apart(&self, checker: &Checker) -> Result<(), RecipeError> {
        use crate::io::paths::{nested, resolve};
        let mut others: Vec<(&'static str, &Path, Option<SourceSpan>)> =
            vec![("the base model", &self.base.path, Some(self.base.span))];
        for adapter in &self.adapters {
            others.push(("the adapter", &adapter.entry.path, Some(adapter.entry.span)));
            if let Some(source) = &adapter.source {
                others.push(("the source base", &source.path, Some(source.span)));
            }
        }
        others.push(("the recipe", &self.path, None));
        let outputs: Vec<&Entry> = self.output_dirs().collect();
        for (i, output) in outputs.iter().enumerate() {
            let resolved = resolve(&output.path);
            let earlier = outputs[..i]
                .iter()
                .map(|o| ("the output", o.path.as_path(), Some(o.span)));
            for (what, other, other_span) in others.iter().copied().chain(earlier) {
                if nested(&resolved, &resolve(other)) {
                    return Err(RecipeError::OutputOverlap {
                        output: output.path.clone(),
                        what,
                        other: other.to_owned(),
                        src: checker.src.clone(),
                        span: output.span,
                        other_span,
                    });
                }
            }
        }
        Ok(())
    }

    /// The recipe's text as a diagnostic source.
    pub fn src(&self) -> Src {
        NamedSource::new(self.path.display().to_string(), self.text.clone())
    }

    /// `recipe.toml:12`: the recipe's file name and the line `span` starts on.
    pub fn line_of(&self, span: miette::SourceSpan) -> String {
        let line = 1 + self.text[..span.offset().min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count();
        let name = self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        format!("{name}:{line}")
    }
}

fn parse_device(text: &str) -> Option<DeviceRequest> {
    match text {
        "auto" => Some(DeviceRequest::Auto),
        "cpu" => Some(DeviceRequest::Cpu),
        "cuda" => Some(DeviceRequest::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceRequest::Cuda),
    }
}

/// `recipes/../examples/x` → `examples/x`, without touching the file system (so that a path
/// that does not exist yet still reads well in messages).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Turns raw values into checked ones, making each error point at its span.
struct Checker {
    src: Src,
    dir: PathBuf,
}

impl Checker {
    fn syntax(&self, err: toml::de::Error) -> RecipeError {
        let mut message = err.message().to_owned();
        // The toml crate stops at a fixed depth (its parser and its deserializer each say so in
        // their own words) rather than overflow the stack; say what that means for a recipe.
        if message.contains("recursion") {
            message = "tables or values are nested too deeply".into();
        }
        let help = if message.starts_with("tables or values are nested") {
            "a recipe needs at most four levels, as in `[[adapter]] weight = [ { modules = [\"q_proj\"] } ]`; see README.md for the recipe format"
        } else if message.starts_with("unknown field") {
            "remove the key or fix its spelling; see README.md for the recipe's keys"
        } else if message.starts_with("missing field") {
            "add the missing key"
        } else if message.starts_with("invalid type") {
            "give the value the type the message names"
        } else {
            "see README.md for the recipe format"
        };
        RecipeError::Invalid {
            message: format!("invalid recipe: {message}"),
            help: help.into(),
            src: self.src.clone(),
            span: err.span().map(Into::into),
        }
    }

    fn invalid(&self, message: String, help: &str, span: std::ops::Range<usize>) -> RecipeError {
        RecipeError::Invalid {
            message,
            help: help.into(),
            src: self.src.clone(),
            span: Some(span.into()),
        }
    }

    fn entry(&self, path: &Spanned<String>) -> Entry {
        Entry {
            path: normalize(&self.dir.join(path.get_ref())),
            written: path.get_ref().clone(),
            span: path.span().into(),
        }
    }

    /// A base or an adapter: a folder (`path`), or a Hugging Face repository (`hf`, with an
    /// optional `revision`) found in the local Hugging Face cache.
    fn input_dir(
        &self,
        what: &'static str,
        (path, hf, revision): InputKeys<'_>,
        table: std::ops::Range<usize>,
    ) -> Result<Entry, RecipeError> {
        match (path, hf) {
            (Some(path), None) => {
                if let Some(revision) = revision {
                    return Err(self.invalid(
                        "`revision` belongs with `hf`".into(),
                        "a folder has no revisions: drop `revision`, or name the model by `hf = \"org/name\"`",
                        revision.span(),
                    ));
                }
                self.existing_dir(what, path)
            }
            (None, Some(repo)) => self.hf_snapshot(what, repo, revision.as_ref()),
            (Some(path), Some(_)) => Err(self.invalid(
                format!("the {what} has both a `path` and an `hf` repository"),
                "keep one: `path` for a folder, `hf = \"org/name\"` for a model in the local Hugging Face cache",
                path.span(),
            )),
            (None, None) => Err(self.invalid(
                format!("the {what} has neither a `path` nor an `hf` repository"),
                "add `path = \"FOLDER\"`, or `hf = \"org/name\"` (with `revision` if not `main`) for a model in the local Hugging Face cache",
                table,
            )),
        }
    }

    fn hf_snapshot(
        &self,
        what: &'static str,
        repo: &Spanned<String>,
        revision: Option<&Spanned<String>>,
    ) -> Result<Entry, RecipeError> {
        use crate::io::hf_cache::{self, Missing};
        let rev = revision.map_or("main", |r| r.get_ref().as_str());
        let span = revision.map_or(repo.span(), |r| r.span());
        match hf_cache::snapshot(&hf_cache::cache_root(), repo.get_ref(), rev) {
            Ok(snapshot) => Ok(Entry {
                path: snapshot.dir,
                written: repo.get_ref().clone(),
                span: repo.span().into(),
            }),
            Err(Missing::BadName) => Err(self.invalid(
                format!(
                    "`{}` (revision `{rev}`) is not a Hugging Face repository name",
                    repo.get_ref()
                ),
                "name it `org/name`, as on the hub, with a branch, tag or commit as `revision`",
                span,
            )),
            Err(Missing::NotCached(folder)) => Err(RecipeError::NotInHfCache {
                what,
                repo: repo.get_ref().clone(),
                revision: rev.to_owned(),
                folder,
                src: self.src.clone(),
                span: span.into(),
            }),
        }
    }

    fn existing_dir(
        &self,
        what: &'static str,
        path: &Spanned<String>,
    ) -> Result<Entry, RecipeError> {
        self.existing(what, path, true)
    }

    fn existing_file(
        &self,
        what: &'static str,
        path: &Spanned<String>,
    ) -> Result<Entry, RecipeError> {
        self.existing(what, path, false)
    }

    /// `path` as an entry, if it names a directory (`dir`) or a file.
    fn existing(
        &self,
        what: &'static str,
        path: &Spanned<String>,
        dir: bool,
    ) -> Result<Entry, RecipeError> {
        let entry = self.entry(path);
        let found = match std::fs::metadata(&entry.path) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(RecipeError::Inaccessible {
                    what,
                    path: entry.path,
                    source,
                    src: self.src.clone(),
                    span: entry.span,
                })
            }
        };
        let Some(found) = found else {
            return Err(RecipeError::MissingPath {
                what,
                path: entry.path,
                dir: if self.dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    self.dir.clone()
                },
                src: self.src.clone(),
                span: entry.span,
            });
        };
        if dir && !found.is_dir() {
            return Err(RecipeError::NotADirectory {
                what,
                path: entry.path,
                src: self.src.clone(),
                span: entry.span,
            });
        }
        if !dir && !found.is_file() {
            return Err(RecipeError::NotAFile {
                what,
                path: entry.path,
                src: self.src.clone(),
                span: entry.span,
            });
        }
        Ok(entry)
    }

    fn adapter(&self, raw: &Spanned<schema::RawAdapter>) -> Result<AdapterEntry, RecipeError> {
        let adapter = raw.get_ref();
        let entry = self.input_dir(
            "adapter",
            (&adapter.path, &adapter.hf, &adapter.revision),
            raw.span(),
        )?;
        let weight = match &adapter.weight {
            None => vec![WeightRule {
                value: 1.0,
                span: None,
                layers: None,
                modules: None,
            }],
            Some(weight) => self.rules(weight)?,
        };
        let source = match &adapter.source {
            Some(path) => Some(self.existing_dir("source base", path)?),
            None => None,
        };
        let examples = match (&adapter.examples, &source) {
            (None, _) => None,
            (Some(path), Some(_)) => Some(self.existing_file("examples", path)?),
            (Some(path), None) => {
                return Err(self.invalid(
                    "`examples` needs the adapter's `source` base".into(),
                    "add `source = \"path/to/source-base\"` to this [[adapter]]: the examples are scored on the source with the adapter, and on the base with it carried",
                    path.span(),
                ))
            }
        };
        let (map, skip) = self.layer_map(adapter.map.as_ref())?;
        let refuse_unmatched = self.unmatched(adapter.map.as_ref())?;
        let dims = self.dims(adapter.map.as_ref(), source.is_some(), raw.span())?;
        Ok(AdapterEntry {
            entry,
            weight,
            source,
            examples,
            arch: adapter.arch.as_ref().map(Named::of),
            map,
            dims,
            skip,
            refuse_unmatched,
            span: raw.span().into(),
        })
    }

    fn layer_map(
        &self,
        raw: Option<&Spanned<schema::RawMap>>,
    ) -> Result<(LayerMap, Vec<String>), RecipeError> {
        let Some(raw) = raw else {
            return Ok((LayerMap::Same, Vec::new()));
        };
        let raw = raw.get_ref();
        let map = match raw.layers.as_ref().map(|l| (l.get_ref(), l.span())) {
            None => LayerMap::Same,
            Some((schema::RawLayers::Named(name), span)) => match name.as_str() {
                "same" => LayerMap::Same,
                "interpolate" => LayerMap::Interpolate,
                "truncate" => LayerMap::Truncate,
                other => {
                    return Err(self.invalid(
                        format!("unknown layer mapping `{other}`"),
                        "use \"same\", \"interpolate\", \"truncate\", or a table such as `{ 0 = 0, 1 = 0, 2 = 1 }`",
                        span,
                    ))
                }
            },
            Some((schema::RawLayers::Table(table), span)) => {
                let mut pairs = Vec::new();
                for (source, target) in table {
                    let Ok(source) = source.trim().parse::<usize>() else {
                        return Err(self.invalid(
                            format!("`{source}` is not a layer number"),
                            "keys are source layers, values target layers: `{ 0 = 0, 1 = 0 }`",
                            target.span(),
                        ));
                    };
                    pairs.push((source, *target.get_ref() as usize));
                }
                LayerMap::Table(pairs, span.into())
            }
        };
        let mut skip = Vec::new();
        for (module, action) in raw.modules.iter().flatten() {
            if action.get_ref() != "skip" {
                return Err(self.invalid(
                    format!("unknown module action `{}`", action.get_ref()),
                    "the only action is \"skip\": `modules = { gate_proj = \"skip\" }`",
                    action.span(),
                ));
            }
            skip.push(module.clone());
        }
        Ok((map, skip))
    }

    /// `[adapter.map] unmatched`: the span of `"error"` when it is given.
    fn unmatched(
        &self,
        raw: Option<&Spanned<schema::RawMap>>,
    ) -> Result<Option<SourceSpan>, RecipeError> {
        let Some(unmatched) = raw.and_then(|r| r.get_ref().unmatched.as_ref()) else {
            return Ok(None);
        };
        match unmatched.get_ref().as_str() {
            "skip" => Ok(None),
            "error" => Ok(Some(unmatched.span().into())),
            other => Err(self.invalid(
                format!("unknown `unmatched` policy `{other}`"),
                "use \"skip\" (the default: leave such a module out, with a warning) or \"error\" (fail the build)",
                unmatched.span(),
            )),
        }
    }

    /// `[adapter.map] dims` and `rank`: how widths adapt. `align` needs the adapter's source
    /// base, whose weights it maps from.
    fn dims(
        &self,
        raw: Option<&Spanned<schema::RawMap>>,
        has_source: bool,
        adapter_span: std::ops::Range<usize>,
    ) -> Result<DimsChoice, RecipeError> {
        let exact = DimsChoice {
            map: DimsMap::Exact,
            span: adapter_span.into(),
        };
        let Some(raw) = raw.map(Spanned::get_ref) else {
            return Ok(exact);
        };
        let rank = match &raw.rank {
            Some(rank) if *rank.get_ref() == 0 => {
                return Err(self.invalid(
                    "`rank` must be at least 1".into(),
                    "e.g. `rank = 16`, or drop it to keep each module's own rank",
                    rank.span(),
                ))
            }
            Some(rank) => Some((*rank.get_ref() as usize, rank.span())),
            None => None,
        };
        let Some(dims) = &raw.dims else {
            if let Some((_, span)) = rank {
                return Err(self.invalid(
                    "`rank` applies to `dims = \"align\"` only".into(),
                    "add `dims = \"align\"` to [adapter.map], or remove `rank`",
                    span,
                ));
            }
            return Ok(exact);
        };
        let map = match dims.get_ref().as_str() {
            "exact" => DimsMap::Exact,
            "truncate" => DimsMap::Truncate,
            "pad" => DimsMap::Pad,
            "align" => DimsMap::Align {
                rank: rank.as_ref().map(|(r, _)| *r),
            },
            other => {
                return Err(self.invalid(
                    format!("unknown width adaptation `{other}`"),
                    "use \"exact\" (widths must agree), \"truncate\", \"pad\" or \"align\"",
                    dims.span(),
                ))
            }
        };
        if let (Some((_, span)), false) = (rank, matches!(map, DimsMap::Align { .. })) {
            return Err(self.invalid(
                "`rank` applies to `dims = \"align\"` only".into(),
                "truncate and pad keep each delta's rank; remove `rank`",
                span,
            ));
        }
        if matches!(map, DimsMap::Align { .. }) && !has_source {
            return Err(self.invalid(
                "`dims = \"align\"` needs the base the adapter was trained on".into(),
                "add `source = \"path/to/source-base\"` to this [[adapter]]: alignment maps from its weights to the base's",
                dims.span(),
            ));
        }
        Ok(DimsChoice {
            map,
            span: dims.span().into(),
        })
    }

    /// `0.8`, or `[ { value = 1.0 }, { layers = "16..", value = 0.5 } ]`.
    fn rules(&self, raw: &Spanned<RawWeight>) -> Result<Vec<WeightRule>, RecipeError> {
        match raw.get_ref() {
            RawWeight::Scalar(value) => Ok(vec![WeightRule {
                value: self.finite(*value, raw.span())?,
                span: Some(raw.span().into()),
                layers: None,
                modules: None,
            }]),
            RawWeight::Rules(rules) => rules
                .iter()
                .map(|rule| self.weight_rule(rule.get_ref()))
                .collect(),
        }
    }

    fn weight_rule(&self, rule: &schema::RawWeightRule) -> Result<WeightRule, RecipeError> {
        let layers = match &rule.layers {
            None => None,
            Some(text) => {
                let range = LayerRange::parse(text.get_ref()).map_err(|reason| {
                    RecipeError::LayerRange {
                        text: text.get_ref().clone(),
                        reason,
                        src: self.src.clone(),
                        span: text.span().into(),
                    }
                })?;
                Some((range, text.span().into()))
            }
        };
        if let Some(modules) = &rule.modules {
            if modules.get_ref().is_empty() {
                return Err(self.invalid(
                    "`modules = []` matches no module".into(),
                    "name at least one module, e.g. `modules = [\"q_proj\"]`, or drop the key to match all",
                    modules.span(),
                ));
            }
            let bad = modules.get_ref().iter().find(|name| {
                name.is_empty()
                    || name.starts_with('.')
                    || name.ends_with('.')
                    || name.contains("..")
            });
            if let Some(name) = bad {
                return Err(self.invalid(
                    format!("`{name:?}` is not a module name"),
                    "name modules by the last parts of their path, such as `\"q_proj\"` or `\"self_attn.q_proj\"`",
                    modules.span(),
                ));
            }
        }
        Ok(WeightRule {
            value: self.finite(*rule.value.get_ref(), rule.value.span())?,
            span: Some(rule.value.span().into()),
            layers,
            modules: rule.modules.as_ref().map(|m| m.get_ref().clone()),
        })
    }

    fn adapter_output(
        &self,
        raw: &schema::RawOutput,
    ) -> Result<Option<AdapterOutput>, RecipeError> {
        let Some(path) = &raw.adapter else {
            if let Some(span) = raw
                .adapter_rank
                .as_ref()
                .map(|r| r.span())
                .or(raw.adapter_energy.as_ref().map(|e| e.span()))
            {
                return Err(self.invalid(
                    "`adapter_rank` and `adapter_energy` apply to `[output] adapter` only".into(),
                    "add `adapter = \"build/combined-lora\"` to [output], or remove them",
                    span,
                ));
            }
            return Ok(None);
        };
        let rank = match (&raw.adapter_rank, &raw.adapter_energy) {
            (Some(_), Some(energy)) => {
                return Err(self.invalid(
                    "give `adapter_rank` or `adapter_energy`, not both".into(),
                    "keep the one that says how to truncate",
                    energy.span(),
                ))
            }
            (Some(rank), None) if *rank.get_ref() == 0 => {
                return Err(self.invalid(
                    "`adapter_rank` must be at least 1".into(),
                    "e.g. `adapter_rank = 16`",
                    rank.span(),
                ))
            }
            (Some(rank), None) => RankChoice::Rank(*rank.get_ref() as usize),
            (None, Some(energy)) if !(*energy.get_ref() > 0.0 && *energy.get_ref() <= 1.0) => {
                return Err(self.invalid(
                    format!("the energy `{}` is not in (0, 1]", energy.get_ref()),
                    "it is the fraction of each delta's squared norm kept, e.g. `0.99`",
                    energy.span(),
                ))
            }
            (None, Some(energy)) => RankChoice::Energy(*energy.get_ref()),
            (None, None) => RankChoice::Exact,
        };
        Ok(Some(AdapterOutput {
            path: self.entry(path),
            rank,
        }))
    }

    fn merge(&self, raw: Option<&Spanned<schema::RawMerge>>) -> Result<Merge, RecipeError> {
        let Some(raw) = raw else {
            return Ok(Merge {
                method: MergeMethod::Linear,
                density: Vec::new(),
                majority_sign: MajoritySign::Total,
                seed: None,
            });
        };
        let raw = raw.get_ref();
        let method = raw
            .method
            .as_ref()
            .map(|m| *m.get_ref())
            .unwrap_or_default();
        let density =
            match &raw.density {
                None if method.sparsify().is_some() => {
                    let span = raw.method.as_ref().map(|m| m.span()).unwrap_or(0..0);
                    let name = serde_json::to_value(method).unwrap_or_default();
                    return Err(self.invalid(
                    format!("`{}` needs a `density`", name.as_str().unwrap_or("")),
                    "add `density = 0.5` (the fraction of each delta's entries to keep) to [merge]",
                    span,
                ));
                }
                None => Vec::new(),
                Some(d) if method.sparsify().is_none() => return Err(self.invalid(
                    "`density` applies to ties, dare_linear, dare_ties and magnitude_prune only"
                        .into(),
                    "remove it, or choose a method that prunes",
                    d.span(),
                )),
                Some(d) => {
                    let rules = self.rules(d)?;
                    if let Some(bad) = rules.iter().find(|r| !(r.value > 0.0 && r.value <= 1.0)) {
                        return Err(self.invalid(
                            format!("the density `{}` is not in (0, 1]", bad.value),
                            "density is the fraction of entries kept, e.g. `0.5`",
                            d.span(),
                        ));
                    }
                    rules
                }
            };
        if let Some(sign) = &raw.majority_sign {
            if !method.elects_sign() {
                return Err(self.invalid(
                    "`majority_sign` applies to ties and dare_ties only".into(),
                    "remove it, or use `method = \"ties\"` or `\"dare_ties\"`",
                    sign.span(),
                ));
            }
        }
        Ok(Merge {
            method,
            density,
            majority_sign: raw
                .majority_sign
                .as_ref()
                .map(|s| *s.get_ref())
                .unwrap_or_default(),
            seed: raw.seed.as_ref().map(|s| *s.get_ref()),
        })
    }

    fn finite(&self, value: f64, span: std::ops::Range<usize>) -> Result<f64, RecipeError> {
        if value.is_finite() {
            Ok(value)
        } else {
            Err(RecipeError::NonFiniteWeight {
                value,
                src: self.src.clone(),
                span: span.into(),
            })
        }
    }
}
