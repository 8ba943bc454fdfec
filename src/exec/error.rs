//! Everything that can go wrong while executing a build, as diagnostics.
use std::path::{Path, PathBuf};

use miette::Diagnostic;
use thiserror::Error;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum ExecError {
    #[error("cannot write the output `{}`: {source}", path.display())]
    #[diagnostic(
        code(modelforge::exec::output),
        help("check that the output's folder is writable and has space; any previous output was left as it was")
    )]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot use the cache `{}`: {source}", path.display())]
    #[diagnostic(
        code(modelforge::exec::cache),
        help("choose another cache with `--cache DIR` or MODELFORGE_CACHE, or make this one writable")
    )]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot read an input: {source}")]
    #[diagnostic(
        code(modelforge::exec::input),
        help("check that the recipe's inputs are readable")
    )]
    Hash {
        #[source]
        source: std::io::Error,
    },

    #[error("the engine failed: {message}")]
    #[diagnostic(code(modelforge::exec::engine), help("{help}"))]
    Engine { message: String, help: String },

    #[error("the build does not match `{}`: {what}", lock.display())]
    #[diagnostic(
        code(modelforge::exec::locked),
        help("`--locked` builds only what the lock file records; build without `--locked` to update it, and commit the new lock")
    )]
    Locked {
        lock: PathBuf,
        what: String,
        #[source_code]
        src: crate::recipe::Src,
        #[label("this input changed")]
        span: Option<miette::SourceSpan>,
    },

    #[error("{count} object(s) in the cache `{}` do not match their digest, first `{}`", path.display(), first.display())]
    #[diagnostic(
        code(modelforge::exec::cache_damaged),
        help("builds evict such objects when they read them and recompute them; `modelforge cache verify --repair` removes them all now")
    )]
    CacheDamaged {
        path: PathBuf,
        count: usize,
        first: PathBuf,
    },

    #[error("{message}")]
    #[diagnostic(
        code(modelforge::exec::remote),
        help("check the address, that the server is up, and the AWS_* variables (credentials, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true for plain http); a build without `--remote` needs none of it")
    )]
    Remote { message: String },

    #[error("the fused tensor `{tensor}` holds {what} (at element {index})")]
    #[diagnostic(
        code(modelforge::exec::non_finite),
        help("a weight or delta this large overflows the output's dtype, or the base already holds it: check the recipe's weights, write `[output] dtype = \"f32\"`, or pass `--allow-non-finite` to write it anyway")
    )]
    NonFinite {
        tensor: String,
        what: String,
        index: u64,
        /// The recipe, once the build says which of its weights went into the tensor.
        #[source_code]
        src: Option<crate::recipe::Src>,
        #[label(collection)]
        weights: Vec<miette::LabeledSpan>,
    },

    #[error("the output `{}` would overlap the cache `{}`", output.display(), cache.display())]
    #[diagnostic(
        code(modelforge::exec::output_in_cache),
        help("write the output to a folder outside the cache, or choose another cache with `--cache DIR` or MODELFORGE_CACHE")
    )]
    OutputInCache {
        output: PathBuf,
        cache: PathBuf,
        #[source_code]
        src: crate::recipe::Src,
        #[label("this output")]
        span: miette::SourceSpan,
    },

    #[error("cannot write the GGUF: {what}")]
    #[diagnostic(code(modelforge::exec::gguf), help("{help}"))]
    Gguf {
        what: String,
        help: String,
        #[source_code]
        src: crate::recipe::Src,
        #[label("this output")]
        span: miette::SourceSpan,
    },

    #[error(transparent)]
    #[diagnostic(transparent)]
    Input(#[from] crate::io::InputError),
}

/// An error writing the output `path` from pieces (`io::piece`): a piece's file that could not
/// be read is reported as that file's, anything else as the output's.
pub(crate) fn write_error(path: &Path) -> impl Fn(std::io::Error) -> ExecError + '_ {
    move |e| match crate::io::piece::ReadError::within(e) {
        Ok(read) => ExecError::Input(crate::io::InputError::io(read.path, read.source)),
        Err(source) => ExecError::Output {
            path: path.to_owned(),
            source,
        },
    }
}

pub(crate) fn output_error(path: &Path) -> impl Fn(std::io::Error) -> ExecError + '_ {
    move |source| ExecError::Output {
        path: path.to_owned(),
        source,
    }
}
