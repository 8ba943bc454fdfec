//! What can be wrong with an input file. These carry paths, not recipe spans: the stage that
//! knows which recipe entry named the file adds the span (see `plan::error`).
use std::path::PathBuf;

use miette::Diagnostic;
use thiserror::Error;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum InputError {
    #[error("cannot read `{}`: {source}", path.display())]
    #[diagnostic(
        code(modelforge::input::io),
        help("check that the file exists and is readable")
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("`{}` has no config.json, so it is not a Hugging Face model directory", dir.display())]
    #[diagnostic(
        code(modelforge::input::no_config),
        help("a base model directory holds config.json beside model.safetensors (or its shards and model.safetensors.index.json)")
    )]
    NoConfig { dir: PathBuf },

    #[error("`{}` is not valid JSON: {message}", path.display())]
    #[diagnostic(
        code(modelforge::input::bad_json),
        help("the file is damaged or not what its name says; re-download or re-export it")
    )]
    BadJson { path: PathBuf, message: String },

    #[error("`{}`: {message}", path.display())]
    #[diagnostic(code(modelforge::input::bad_config), help("{help}"))]
    BadConfig {
        path: PathBuf,
        message: String,
        help: String,
    },

    #[error("`{}` holds no safetensors weights", dir.display())]
    #[diagnostic(
        code(modelforge::input::no_weights),
        help("expected model.safetensors, or shards listed in model.safetensors.index.json")
    )]
    NoWeights { dir: PathBuf },

    #[error("refusing to read the pickled file `{}`", path.display())]
    #[diagnostic(
        code(modelforge::input::pickle),
        help(
            "pickle files can run arbitrary code when loaded, so modelforge never opens them. Convert the file \
             to safetensors where you trust it, e.g. in Python: `safetensors.torch.save_file(torch.load(path, \
             weights_only=True), \"{}\")`",
            suggested
        )
    )]
    Pickle { path: PathBuf, suggested: String },

    #[error("`{}` is not a valid safetensors file: {message}", path.display())]
    #[diagnostic(
        code(modelforge::input::safetensors),
        help("the file is truncated or damaged; re-download or re-export it")
    )]
    Safetensors { path: PathBuf, message: String },

    #[error("the tensor `{name}` is stored twice: in `{}` and in `{}`", first.display(), second.display())]
    #[diagnostic(
        code(modelforge::input::duplicate_tensor),
        help("the shards overlap; the model directory is inconsistent")
    )]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("`{}` says `{tensor}` is in `{shard}`, but {problem}", index.display())]
    #[diagnostic(
        code(modelforge::input::index),
        help("the index and the shards disagree; re-download the model")
    )]
    Index {
        index: PathBuf,
        tensor: String,
        shard: String,
        problem: String,
    },

    #[error("the tensor `{tensor}` in `{}` has dtype {dtype}, which modelforge cannot compute with", path.display())]
    #[diagnostic(
        code(modelforge::input::dtype),
        help("modelforge fuses into f32, f16, bf16 and f64 tensors")
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("unrecognised tensor `{key}` in the adapter `{}`", path.display())]
    #[diagnostic(
        code(modelforge::input::adapter_key),
        help("modelforge reads PEFT LoRA adapters: keys end in `lora_A.weight`/`lora_B.weight`, `lora_embedding_A`/`lora_embedding_B`, or name a `modules_to_save` tensor")
    )]
    AdapterKey { path: PathBuf, key: String },

    #[error("the adapter `{}` has `{module}.{present}` but no matching `{missing}`", path.display())]
    #[diagnostic(
        code(modelforge::input::lora_pair),
        help(
            "every LoRA module needs both its A and its B matrix; the adapter file is incomplete"
        )
    )]
    LoraPair {
        path: PathBuf,
        module: String,
        present: String,
        missing: String,
    },

    #[error("the LoRA matrices of `{module}` in `{}` do not fit together: {detail}", path.display())]
    #[diagnostic(code(modelforge::input::lora_rank), help("{help}"))]
    LoraRank {
        path: PathBuf,
        module: String,
        detail: String,
        help: &'static str,
    },
}

impl InputError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        InputError::Io {
            path: path.into(),
            source,
        }
    }
}
