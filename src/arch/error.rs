//! What an architecture schema file can get wrong, each pointing at the span at fault.
use std::path::PathBuf;

use miette::{Diagnostic, SourceSpan};
use thiserror::Error;

use crate::recipe::Src;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum ArchError {
    #[error("cannot read the architecture schema `{}`", path.display())]
    #[diagnostic(
        code(modelforge::arch::unreadable),
        help("check that the file given to `--arch` exists and is readable")
    )]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the architecture schema `{}` is not UTF-8 text, or larger than {limit} bytes", path.display())]
    #[diagnostic(
        code(modelforge::arch::not_text),
        help("a schema is a short TOML file like those in arch/; check that this is the file you meant")
    )]
    NotText { path: PathBuf, limit: u64 },

    #[error("{message}")]
    #[diagnostic(code(modelforge::arch::invalid), help("{help}"))]
    Invalid {
        message: String,
        help: String,
        #[source_code]
        src: Src,
        #[label("here")]
        span: Option<SourceSpan>,
    },
}
