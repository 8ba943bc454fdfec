//! Reading safetensors files: the header is parsed and validated once (`header`), tensor bytes
//! are read on demand with positioned reads, so a file is never held in memory as a whole.
pub(crate) mod header;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::InputError;
use header::HeaderError;

/// One tensor's place in a file.
#[derive(Clone, Debug)]
pub(crate) struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    pub len: u64,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open safetensors file and its validated table of tensors.
#[derive(Debug)]
pub(crate) struct SafetensorsFile {
    pub path: PathBuf,
    file: File,
    /// Sorted by name.
    pub tensors: Vec<(String, TensorMeta)>,
}

impl SafetensorsFile {
    /// Opens `path` and checks its header against the file's length; no tensor data is read.
    pub fn open(path: &Path) -> Result<Self, InputError> {
        // Checked before opening: opening a FIFO would wait for a writer, and a directory or a
        // device is never a weights file.
        let kind = std::fs::metadata(path).map_err(|e| InputError::io(path, e))?;
        if !kind.is_file() {
            return Err(InputError::NotAFile {
                path: path.to_owned(),
                found: describe(&kind),
            });
        }
        let file = File::open(path).map_err(|e| InputError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| InputError::io(path, e))?.len();
        let damaged = |fault: HeaderError| InputError::Safetensors {
            path: path.to_owned(),
            message: fault.to_string(),
            help: fault.help(),
        };
        let mut prefix = [0u8; header::LEN_BYTES as usize];
        let prefix_len = prefix.len().min(file_len as usize);
        read_exact_at(&file, path, &mut prefix[..prefix_len], 0)?;
        let json_len = header::json_len(&prefix[..prefix_len], file_len).map_err(damaged)?;
        // At most 100 MB, and within the file.
        let mut json = vec![0u8; json_len as usize];
        read_exact_at(&file, path, &mut json, header::LEN_BYTES)?;
        let data_start = header::LEN_BYTES + json_len;
        let entries = header::entries(&json, file_len - data_start).map_err(damaged)?;
        drop(json);
        let mut tensors: Vec<(String, TensorMeta)> = entries
            .into_iter()
            .map(|entry| {
                let meta = TensorMeta {
                    dtype: entry.dtype,
                    shape: entry.shape,
                    start: data_start + entry.start,
                    len: entry.end - entry.start,
                };
                (entry.name, meta)
            })
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(SafetensorsFile {
            path: path.to_owned(),
            file,
            tensors,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i].1)
    }

    /// The `len` bytes at `offset`, for a writer to read.
    pub fn piece(&self, offset: u64, len: u64) -> super::piece::Piece<'_> {
        super::piece::Piece::File {
            file: &self.file,
            path: &self.path,
            offset,
            len,
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), InputError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| InputError::io(&self.path, e))
    }
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), InputError> {
    file.read_exact_at(buf, offset)
        .map_err(|e| InputError::io(path, e))
}

/// What a path is, for a message that says it should be a file.
pub(crate) fn describe(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a named pipe"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}
