//! What can be wrong with an input file. These carry paths, not recipe spans: the stage that
//! knows which recipe entry named the file adds the span (see `plan::error`).
use std::path::PathBuf;

use miette::Diagnostic;
use thiserror::Error;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum InputError {
    #[error("cannot read `{}`: {source}", path.display())]
    #[diagnostic(code(modelforge::input::io), help("{help}"))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
        help: &'static str,
    },

    #[error("`{}` is {found}, where a file is expected", path.display())]
    #[diagnostic(
        code(modelforge::input::not_a_file),
        help("replace it with the file itself (a symbolic link to a file is fine)")
    )]
    NotAFile { path: PathBuf, found: &'static str },

    #[error("`{}` is {size} bytes, too large for a JSON file of this kind (at most {limit} bytes)", path.display())]
    #[diagnostic(
        code(modelforge::input::too_large),
        help("this is not the file its name says; re-download or re-export it")
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
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
    #[diagnostic(code(modelforge::input::safetensors), help("{help}"))]
    Safetensors {
        path: PathBuf,
        message: String,
        help: &'static str,
    },

    #[error("the tensor `{name}` is stored twice: in `{}` and in `{}`", first.display(), second.display())]
    #[diagnostic(
        code(modelforge::input::duplicate_tensor),
        help("a tensor must live in one file: remove the stray file from the directory, or re-download the model")
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

    #[error("the tensor `{tensor}` in `{}` holds {what} (at element {index})", path.display())]
    #[diagnostic(
        code(modelforge::input::non_finite),
        help("the adapter diverged in training or is damaged, and would write {what} into every tensor it touches; train it again, or use an earlier checkpoint (`build --allow-non-finite` fuses it anyway)")
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        what: &'static str,
        index: u64,
    },

    #[error("the adapter `{}` holds no tensors", path.display())]
    #[diagnostic(
        code(modelforge::input::empty_adapter),
        help("a PEFT adapter holds the `lora_A`/`lora_B` matrices of each module it changes; re-save the adapter with PEFT")
    )]
    EmptyAdapter { path: PathBuf },

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
        use std::io::ErrorKind;
        let help = match (source.kind(), source.raw_os_error()) {
            (ErrorKind::NotFound, _) => "check the path: the file is not there",
            (ErrorKind::PermissionDenied, _) => {
                "make the file (and the folders above it) readable by this user, e.g. `chmod a+r FILE`"
            }
            (_, Some(libc::ELOOP)) => {
                "a symbolic link on this path leads back to itself; point it at the real file"
            }
            (ErrorKind::UnexpectedEof, _) => {
                "the file changed or shrank while it was read; run again once nothing writes to it"
            }
            _ => "check that the file exists and is readable",
        };
        InputError::Io {
            path: path.into(),
            source,
            help,
        }
    }
}
