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

    #[error("the base model has no module that the adapter `{adapter}` changes ({modules})")]
    #[diagnostic(
        code(modelforge::plan::no_target),
        help("the adapter was made for another model{made_for}; fuse it into the base it was trained on{unknown_arch}")
    )]
    NothingMatches {
        adapter: String,
        /// "`name`", or "N modules, first `name`".
        modules: String,
        made_for: String,
        /// A hint when no schema describes the base.
        unknown_arch: String,
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

    /// An adapter feature that cannot be fused here, with what was found and why.
    #[error("the adapter `{adapter}` {message}")]
    #[diagnostic(code(modelforge::plan::adapter), help("{help}"))]
    Adapter {
        adapter: String,
        message: String,
        help: String,
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

    #[error("unknown architecture `{name}`")]
    #[diagnostic(
        code(modelforge::plan::unknown_arch),
        help("known architectures: {known}; add your own schema with `--arch FILE`")
    )]
    UnknownArch {
        name: String,
        known: String,
        #[source_code]
        src: Src,
        #[label("no schema of this name")]
        span: SourceSpan,
    },

    #[error("`{tensor}` has {found} output features where the `{arch}` schema expects {expected} ({what})")]
    #[diagnostic(
        code(modelforge::plan::schema_mismatch),
        help("the base's config.json and weights do not fit the `{arch}` schema; check the config's widths, or name the right schema with `[base] arch = \"...\"`")
    )]
    SchemaMismatch {
        tensor: String,
        found: usize,
        expected: usize,
        what: String,
        arch: String,
        #[source_code]
        src: Src,
        #[label("this base")]
        span: SourceSpan,
    },

    #[error("the base's config.json does not give the widths the `{arch}` schema needs to place adapter modules by role")]
    #[diagnostic(
        code(modelforge::plan::no_widths),
        help("the hidden size and the number of attention heads must be in config.json, under the keys the schema's `[config]` names (by default `hidden_size` or `n_embd`, `num_attention_heads` or `n_head`)")
    )]
    NoWidths {
        arch: String,
        #[source_code]
        src: Src,
        #[label("this base")]
        span: SourceSpan,
    },

    #[error("the adapter `{adapter}`'s `{module}` ({role}) has no counterpart in the base's architecture ({arch}), and the recipe asks for an error")]
    #[diagnostic(
        code(modelforge::plan::unmatched),
        help("skip the module by name with `[adapter.map] modules = {{ {leaf} = \"skip\" }}`, or remove `unmatched = \"error\"` to skip every such module with a warning")
    )]
    Unmatched {
        adapter: String,
        module: String,
        leaf: String,
        role: String,
        arch: String,
        #[source_code]
        src: Src,
        #[label("this policy")]
        span: SourceSpan,
    },

    #[error("the adapter `{adapter}` has {source_heads} key/value heads in `{module}`, but the base's `{tensor}` has {target_heads}")]
    #[diagnostic(
        code(modelforge::plan::kv_heads),
        help("grouped-query k and v carry over when the head counts agree, or when each source head fills whole target heads or groups (fewer source heads than the target's); average or split heads by hand, or skip the module with `[adapter.map] modules = {{ k_proj = \"skip\", v_proj = \"skip\" }}`")
    )]
    KvHeads {
        adapter: String,
        module: String,
        tensor: String,
        source_heads: usize,
        target_heads: usize,
        #[source_code]
        src: Src,
        #[label("this adapter")]
        span: SourceSpan,
    },

    #[error("cannot carry `{module}` of `{adapter}` from the `{from}` rotary convention into `{to}`: {reason}")]
    #[diagnostic(
        code(modelforge::plan::rotary),
        help("q and k rows are permuted head by head: the conventions need heads of a size divisible by 4 (2 for `half`), and the adapter's rows whole heads of the base's size; if the base does not use this convention, remove `rotary` from its schema")
    )]
    Rotary {
        adapter: String,
        module: String,
        from: String,
        to: String,
        reason: String,
        #[source_code]
        src: Src,
        #[label("this adapter")]
        span: SourceSpan,
    },

    #[error("{message}")]
    #[diagnostic(
        code(modelforge::plan::examples),
        help("`examples` are scored by the engine's forward pass on the source base and on the built model; drop `examples` for a base it cannot run, or give the missing file")
    )]
    Examples {
        message: String,
        #[source_code]
        src: Src,
        #[label("these examples")]
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
