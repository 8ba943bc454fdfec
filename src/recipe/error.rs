//! Everything a recipe can get wrong, each pointing at the span that is at fault.
use std::path::PathBuf;
use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};
use thiserror::Error;

/// The recipe's text, named by its path, for diagnostics to quote.
pub(crate) type Src = NamedSource<Arc<String>>;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum RecipeError {
    #[error("cannot read the recipe `{}`", path.display())]
    #[diagnostic(
        code(modelforge::recipe::unreadable),
        help("check that the file exists and is readable")
    )]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the recipe `{}` is larger than {limit} bytes", path.display())]
    #[diagnostic(
        code(modelforge::recipe::too_large),
        help("a recipe is a short TOML file naming a base, its adapters and an output; check that this is the file you meant")
    )]
    TooLarge { path: PathBuf, limit: u64 },

    #[error("the recipe `{}` is not UTF-8 text (invalid byte at offset {at})", path.display())]
    #[diagnostic(
        code(modelforge::recipe::not_utf8),
        help("recipes are TOML, which is UTF-8; check that this is the file you meant, or re-save it as UTF-8")
    )]
    NotUtf8 { path: PathBuf, at: usize },

    #[error("{message}")]
    #[diagnostic(code(modelforge::recipe::invalid), help("{help}"))]
    Invalid {
        message: String,
        help: String,
        #[source_code]
        src: Src,
        #[label("here")]
        span: Option<SourceSpan>,
    },

    #[error("the {what} `{}` does not exist", path.display())]
    #[diagnostic(
        code(modelforge::recipe::missing_path),
        help("relative paths resolve against the recipe's folder, `{}`", dir.display())
    )]
    MissingPath {
        what: &'static str,
        path: PathBuf,
        dir: PathBuf,
        #[source_code]
        src: Src,
        #[label("not found")]
        span: SourceSpan,
    },

    #[error("the {what} `{repo}` (revision `{revision}`) is not in the local Hugging Face cache (`{}`)", folder.display())]
    #[diagnostic(
        code(modelforge::recipe::not_in_hf_cache),
        help("download it first: `hf download {repo} --revision {revision}`. modelforge reads the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) and never downloads")
    )]
    NotInHfCache {
        what: &'static str,
        repo: String,
        revision: String,
        folder: PathBuf,
        #[source_code]
        src: Src,
        #[label("not in the cache")]
        span: SourceSpan,
    },

    #[error("cannot look at the {what} `{}`", path.display())]
    #[diagnostic(
        code(modelforge::recipe::inaccessible),
        help("check the path: a symbolic link on it may lead back to itself, or a folder on it may not be readable")
    )]
    Inaccessible {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
        #[source_code]
        src: Src,
        #[label("this path")]
        span: SourceSpan,
    },

    #[error("the {what} `{}` is not a file", path.display())]
    #[diagnostic(code(modelforge::recipe::not_a_file), help("point at the file itself"))]
    NotAFile {
        what: &'static str,
        path: PathBuf,
        #[source_code]
        src: Src,
        #[label("not a file")]
        span: SourceSpan,
    },

    #[error("the {what} `{}` is not a directory", path.display())]
    #[diagnostic(
        code(modelforge::recipe::not_a_directory),
        help("point at the directory that holds the files, not at a file inside it")
    )]
    NotADirectory {
        what: &'static str,
        path: PathBuf,
        #[source_code]
        src: Src,
        #[label("a file, not a directory")]
        span: SourceSpan,
    },

    #[error("malformed layer range `{text}`: {reason}")]
    #[diagnostic(
        code(modelforge::recipe::layer_range),
        help("layer ranges are half-open: `\"0..4\"` is layers 0, 1, 2 and 3; `\"16..\"` is 16 to the last; `\"3\"` is layer 3 alone")
    )]
    LayerRange {
        text: String,
        reason: String,
        #[source_code]
        src: Src,
        #[label("this range")]
        span: SourceSpan,
    },

    #[error("the weight `{value}` is not a finite number")]
    #[diagnostic(
        code(modelforge::recipe::non_finite_weight),
        help("weights multiply the adapter's scaling: use a finite number such as `1.0`, or `0.0` to switch the adapter off")
    )]
    NonFiniteWeight {
        value: f64,
        #[source_code]
        src: Src,
        #[label("not finite")]
        span: SourceSpan,
    },

    #[error("the output `{}` would overwrite {what} `{}`", output.display(), other.display())]
    #[diagnostic(
        code(modelforge::recipe::output_overlap),
        help("outputs are replaced as a whole: write them to a folder of their own, beside the inputs, e.g. `build/<name>`")
    )]
    OutputOverlap {
        output: PathBuf,
        what: &'static str,
        other: PathBuf,
        #[source_code]
        src: Src,
        #[label("this output")]
        span: SourceSpan,
        #[label("overlaps this")]
        other_span: Option<SourceSpan>,
    },
}
