//! Faults found while planning: inputs that do not fit the recipe or each other. Each points at
//! the recipe entry that brought the input in.
use miette::{Diagnostic, SourceSpan};
use thiserror::Error;

use crate::io::InputError;
use crate::recipe::Src;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum PlanError {
    /// An input file is unusable; the message and help are the input error's own.
    #[error("{message}")]
    #[diagnostic(code(modelforge::plan::input), help("{help}"))]
    Input {
        message: String,
        help: String,
        #[source_code]
        src: Src,
        #[label("{label}")]
        span: SourceSpan,
        label: &'static str,
    },

    #[error("none of the {count} modules of the adapter `{adapter}` exist in the base model (first: `{example}`)")]
    #[diagnostic(
        code(modelforge::plan::no_target),
        help("the adapter was made for another model{made_for}; fuse it into the base it was trained on")
    )]
    NothingMatches {
        adapter: String,
        count: usize,
        example: String,
        made_for: String,
        #[source_code]
        src: Src,
        #[label("this adapter")]
        span: SourceSpan,
    },

    #[error("the adapter `{adapter}` changes `{tensor}`, which the base model does not have")]
    #[diagnostic(
        code(modelforge::plan::unknown_target),
        help("every tensor of an adapter must land somewhere: check that the adapter was made for this base{made_for}")
    )]
    UnknownTarget {
        adapter: String,
        tensor: String,
        made_for: String,
        #[source_code]
        src: Src,
        #[label("this adapter")]
        span: SourceSpan,
    },

    #[error("the adapter `{adapter}` gives `{tensor}` a delta of shape {delta:?}, but the base tensor is {base:?}")]
    #[diagnostic(
        code(modelforge::plan::shape),
        help("the adapter was trained on a model of other widths{made_for}; fuse it into a base of the same shape")
    )]
    Shape {
        adapter: String,
        tensor: String,
        delta: Vec<usize>,
        base: Vec<usize>,
        made_for: String,
        #[source_code]
        src: Src,
        #[label("this adapter")]
        span: SourceSpan,
    },

    /// A width adaptation that cannot be planned.
    #[error("{message}")]
    #[diagnostic(code(modelforge::plan::dims), help("{help}"))]
    Dims {
        message: String,
        help: String,
        #[source_code]
        src: Src,
        #[label("{label}")]
        span: SourceSpan,
        label: &'static str,
    },

    #[error("layer range `{range}` does not fit the base model: {reason}")]
    #[diagnostic(
        code(modelforge::plan::layer_range),
        help("layer ranges are half-open and count from 0")
    )]
    LayerRange {
        range: String,
        reason: String,
        #[source_code]
        src: Src,
        #[label("this range")]
        span: SourceSpan,
    },

    #[error("the output `{}` would overwrite an input of this recipe", path.display())]
    #[diagnostic(
        code(modelforge::plan::output_over_input),
        help("write the output to a directory of its own, e.g. under `build/`")
    )]
    OutputOverInput {
        path: std::path::PathBuf,
        #[source_code]
        src: Src,
        #[label("this output")]
        span: SourceSpan,
    },
}

impl PlanError {
    /// An input error, located at the recipe entry that named the input.
    pub fn input(err: InputError, src: Src, span: SourceSpan, label: &'static str) -> Self {
        PlanError::Input {
            message: err.to_string(),
            help: err
                .help()
                .map(|h| h.to_string())
                .unwrap_or_else(|| "check the file".into()),
            src,
            span,
            label,
        }
    }
}
