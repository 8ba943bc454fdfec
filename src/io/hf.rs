//! Hugging Face model directories: `config.json` plus `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::safetensors::{describe, SafetensorsFile, TensorMeta};
use super::InputError;

pub(crate) const INDEX: &str = "model.safetensors.index.json";
pub(crate) const SINGLE: &str = "model.safetensors";

/// A model directory with its weights opened and cross-checked.
#[derive(Debug)]
pub(crate) struct HfModel {
    pub dir: PathBuf,
    pub config: Map<String, Value>,
    pub weights: Weights,
}

/// The tensors of one or more safetensors files, by name.
#[derive(Debug)]
pub(crate) struct Weights {
    pub files: Vec<SafetensorsFile>,
    /// name → (index into `files`, meta), sorted by name.
    pub tensors: BTreeMap<String, (usize, TensorMeta)>,
}

impl Weights {
    /// Where each tensor is, for the engine.
    pub fn places(&self) -> Vec<modelforge_core::job::TensorPlace> {
        self.tensors
            .iter()
            .map(|(name, (file, meta))| modelforge_core::job::TensorPlace {
                name: name.clone(),
                path: self.files[*file].path.clone(),
                dtype: meta.dtype,
                shape: meta.shape.clone(),
                start: meta.start,
                len: meta.len,
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<(&SafetensorsFile, &TensorMeta)> {
        self.tensors
            .get(name)
            .map(|(file, meta)| (&self.files[*file], meta))
    }

    fn from_files(files: Vec<SafetensorsFile>) -> Result<Self, InputError> {
        let mut tensors = BTreeMap::new();
        for (index, file) in files.iter().enumerate() {
            for (name, meta) in &file.tensors {
                if let Some((first, _)) = tensors.insert(name.clone(), (index, meta.clone())) {
                    return Err(InputError::DuplicateTensor {
                        name: name.clone(),
                        first: files[first].path.clone(),
                        second: file.path.clone(),
                    });
                }
            }
        }
        Ok(Weights { files, tensors })
    }
}

impl HfModel {
    pub fn open(dir: &Path) -> Result<Self, InputError> {
        let config_path = dir.join("config.json");
        if !present(&config_path)? {
            return Err(InputError::NoConfig {
                dir: dir.to_owned(),
            });
        }
        let config =
            match read_json(&config_path)? {
                Value::Object(map) => map,
                other => return Err(InputError::BadConfig {
                    path: config_path,
                    message: format!("the top level is `{}`, not a JSON object", shown(&other)),
                    help:
                        "config.json must be an object such as `{\"model_type\": \"llama\", ...}`"
                            .into(),
                }),
            };
        let weights = open_weights(dir)?;
        Ok(HfModel {
            dir: dir.to_owned(),
            config,
            weights,
        })
    }

    /// The number of transformer layers, from whichever key the architecture uses.
    pub fn layer_count(&self) -> Option<usize> {
        ["num_hidden_layers", "n_layer", "num_layers"]
            .iter()
            .find_map(|key| self.config.get(*key).and_then(Value::as_u64))
            .map(|n| n as usize)
    }

    pub fn architecture(&self) -> String {
        self.config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| self.config.get("model_type").and_then(Value::as_str))
            .unwrap_or("unknown")
            .to_owned()
    }

    /// The weight files, in the order their names sort.
    pub fn weight_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.weights.files.iter().map(|f| f.path.clone()).collect();
        if present(&self.dir.join(INDEX)).unwrap_or(false) {
            files.push(self.dir.join(INDEX));
        }
        files.sort();
        files
    }
}

/// The most bytes a JSON input may have. The largest real ones, shard indexes of models with
/// hundreds of thousands of tensors, are a few MB; anything near this is not what it says.
const MAX_JSON_LEN: u64 = 100_000_000;

/// Whether something is at `path` (which may be a symbolic link; it is followed). A path that
/// cannot be looked at, a link that loops, say, is an error rather than absent.
pub(crate) fn present(path: &Path) -> Result<bool, InputError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InputError::io(path, e)),
    }
}

/// Reads a JSON file of at most `MAX_JSON_LEN` bytes. serde_json stops at 128 levels of
/// nesting, so no document can exhaust the stack.
pub(crate) fn read_json(path: &Path) -> Result<Value, InputError> {
    let meta = std::fs::metadata(path).map_err(|e| InputError::io(path, e))?;
    if !meta.is_file() {
        return Err(InputError::NotAFile {
            path: path.to_owned(),
            found: describe(&meta),
        });
    }
    if meta.len() > MAX_JSON_LEN {
        return Err(InputError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
            limit: MAX_JSON_LEN,
        });
    }
    let bytes = std::fs::read(path).map_err(|e| InputError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| InputError::BadJson {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn open_weights(dir: &Path) -> Result<Weights, InputError> {
    let index_path = dir.join(INDEX);
    if present(&index_path)? {
        return open_sharded(dir, &index_path);
    }
    let single = dir.join(SINGLE);
    if present(&single)? {
        return Weights::from_files(vec![SafetensorsFile::open(&single)?]);
    }
    // Some exporters name the single file otherwise; take every .safetensors file.
    let mut files = Vec::new();
    let mut pickles = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| InputError::io(dir, e))? {
        let path = entry.map_err(|e| InputError::io(dir, e))?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => files.push(path),
            Some("bin" | "pt" | "pth" | "ckpt") => pickles.push(path),
            _ => {}
        }
    }
    files.sort();
    pickles.sort();
    if files.is_empty() {
        if let Some(path) = pickles.into_iter().next() {
            let suggested = dir.join(SINGLE).display().to_string();
            return Err(InputError::Pickle { path, suggested });
        }
        return Err(InputError::NoWeights {
            dir: dir.to_owned(),
        });
    }
    Weights::from_files(
        files
            .iter()
            .map(|p| SafetensorsFile::open(p))
            .collect::<Result<_, _>>()?,
    )
}

fn open_sharded(dir: &Path, index_path: &Path) -> Result<Weights, InputError> {
    let index = read_json(index_path)?;
    let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
        return Err(InputError::BadConfig {
            path: index_path.to_owned(),
            message: "has no `weight_map` object".into(),
            help: "a shard index maps each tensor name to its file under `weight_map`".into(),
        });
    };
    let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(InputError::BadConfig {
                path: index_path.to_owned(),
                message: format!(
                    "the `weight_map` entry for `{tensor}` is `{}`, not a file name",
                    shown(shard)
                ),
                help: "every `weight_map` value must be a shard's file name".into(),
            });
        };
        shards.entry(shard).or_default().push(tensor);
    }
    let mut files = Vec::new();
    for (shard, names) in &shards {
        let index_error = |tensor: &str, problem: String| InputError::Index {
            index: index_path.to_owned(),
            tensor: tensor.to_owned(),
            shard: shard.to_string(),
            problem,
        };
        // `names` holds at least the tensor that brought the shard in.
        let first = names.first().copied().unwrap_or_default();
        // A shard name is a plain file name in the same directory, never a path elsewhere.
        if !is_plain_file_name(shard) {
            return Err(index_error(
                first,
                "that is not a file name inside the model directory".into(),
            ));
        }
        let path = dir.join(shard);
        if !present(&path)? {
            return Err(index_error(first, "that file does not exist".into()));
        }
        let file = SafetensorsFile::open(&path)?;
        for name in names {
            if file.get(name).is_none() {
                return Err(index_error(name, "that file does not hold it".into()));
            }
        }
        files.push(file);
    }
    Weights::from_files(files)
}

/// A JSON value as a message quotes it: compact, and cut short when long.
pub(crate) fn shown(value: &Value) -> String {
    const MAX: usize = 60;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// `model-00001-of-00002.safetensors`, as opposed to `../x`, `/etc/x`, `a/b` or `.`.
fn is_plain_file_name(name: &str) -> bool {
    use std::path::Component;
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(c)), None) if c == name
    ) && !name.contains('\\')
}

/// The files a tokenizer is saved as (`save_pretrained`): taken from an adapter's directory
/// when it was trained on a resized vocabulary.
pub(crate) const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_stay_in_the_directory() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        for name in [
            "../x.safetensors",
            "/etc/x",
            "a/b",
            ".",
            "..",
            "",
            "a\\b",
            "x/",
        ] {
            assert!(!is_plain_file_name(name), "{name}");
        }
    }
}
