//! Reading safetensors files: the header is parsed and validated once (by the `safetensors`
//! crate), tensor bytes are read on demand with positioned reads, so a file is never held in
//! memory as a whole.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::InputError;

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
    pub fn open(path: &Path) -> Result<Self, InputError> {
        let file = File::open(path).map_err(|e| InputError::io(path, e))?;
        if file
            .metadata()
            .map_err(|e| InputError::io(path, e))?
            .is_dir()
        {
            return Err(InputError::io(
                path,
                std::io::Error::other("is a directory, expected a file"),
            ));
        }
        // The crate validates the header against the whole buffer (offsets, sizes, trailing
        // bytes); a map lets it do so without reading the data.
        // SAFETY: the map is read-only and dropped before this function returns; a file changed
        // underneath it can at worst make validation fail.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| InputError::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| InputError::Safetensors {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        drop(map);
        let data_start = 8 + header_len as u64;
        let mut tensors: Vec<(String, TensorMeta)> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let meta = TensorMeta {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0 as u64,
                    len: (info.data_offsets.1 - info.data_offsets.0) as u64,
                };
                (name, meta)
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

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), InputError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| InputError::io(&self.path, e))
    }
}
