//! Writing safetensors deterministically and as a stream: the header is computed from shapes
//! alone, then tensor bytes are appended in header order, hashed on the way out. The same
//! tensors always give the same bytes: names sorted, no timestamps, `format = pt` metadata.
//! Builds keep a previous output's shard on that promise (`exec/record.rs`): a change to the
//! bytes written here for the same tensors must bump its `SHARD_VERSION`.
use super::direct::DirectWriter;
use super::piece::Piece;
use super::write_behind::WriteBehind;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Map, Value};

/// A tensor to be written: its name, dtype and shape fix its size.
#[derive(Clone, Debug)]
pub(crate) struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn len(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.bitsize()).div_ceil(8) as u64
    }
}

/// One output file and the tensors it holds, in write order.
#[derive(Clone, Debug)]
pub(crate) struct Shard {
    pub file_name: String,
    pub tensors: Vec<OutTensor>,
}

/// Splits each group of tensors (sorted by name) into shards of at most `max_shard_size` bytes
/// (a tensor larger than that gets a shard of its own); a group never shares a shard with
/// another. Shards are named as `transformers` names them. Within a shard, wider dtypes come
/// first so that every tensor's data stays aligned.
pub(crate) fn layout(groups: Vec<Vec<OutTensor>>, max_shard_size: u64) -> Vec<Shard> {
    let mut shards: Vec<Vec<OutTensor>> = Vec::new();
    for group in groups {
        let (mut size, first) = (0, shards.len());
        for tensor in group {
            let len = tensor.len();
            let open = shards.len() > first;
            match shards.last_mut() {
                Some(shard) if open && size + len <= max_shard_size => {
                    size += len;
                    shard.push(tensor);
                }
                _ => {
                    size = len;
                    shards.push(vec![tensor]);
                }
            }
        }
    }
    let count = shards.len();
    shards
        .into_iter()
        .enumerate()
        .map(|(i, mut tensors)| {
            tensors.sort_by(|a, b| {
                b.dtype
                    .bitsize()
                    .cmp(&a.dtype.bitsize())
                    .then_with(|| a.name.cmp(&b.name))
            });
            let file_name = if count == 1 {
                super::hf::SINGLE.to_owned()
            } else {
                format!("model-{:05}-of-{count:05}.safetensors", i + 1)
            };
            Shard { file_name, tensors }
        })
        .collect()
}

/// `model.safetensors.index.json` for a sharded output.
pub(crate) fn index_json(shards: &[Shard]) -> Value {
    let total: u64 = shards
        .iter()
        .flat_map(|s| &s.tensors)
        .map(OutTensor::len)
        .sum();
    let mut entries: Vec<(&str, &str)> = shards
        .iter()
        .flat_map(|s| {
            s.tensors
                .iter()
                .map(move |t| (t.name.as_str(), s.file_name.as_str()))
        })
        .collect();
    entries.sort();
    let weight_map: Map<String, Value> = entries
        .into_iter()
        .map(|(name, file)| (name.to_owned(), Value::from(file)))
        .collect();
    json!({ "metadata": { "total_size": total }, "weight_map": weight_map })
}

/// Where a shard's bytes go, and how they are hashed: around the page cache where the file
/// system allows it (hashed by the threads that write), through it otherwise (hashed here).
enum Out {
    Direct(Box<DirectWriter>),
    Buffered(BufWriter<WriteBehind>, Box<blake3::Hasher>),
}

impl Out {
    /// A writer of a file of `len` bytes.
    fn new(file: File, len: u64) -> Out {
        match DirectWriter::create(file, len) {
            Ok(direct) => Out::Direct(Box::new(direct)),
            Err(file) => Out::Buffered(
                BufWriter::with_capacity(8 << 20, WriteBehind::new(file)),
                Box::default(),
            ),
        }
    }

    fn write(&mut self, piece: Piece<'_>) -> std::io::Result<()> {
        match self {
            Out::Direct(out) => out.write(piece),
            Out::Buffered(out, hasher) => piece.each(
                |e| e,
                |bytes| {
                    crate::digest::hash_into(hasher, bytes);
                    out.write_all(bytes)
                },
            ),
        }
    }

    /// Flushes (and with `sync`, syncs) the file; returns its blake3 digest.
    fn finish(self, sync: bool) -> std::io::Result<blake3::Hash> {
        match self {
            Out::Direct(out) => out.finish(sync),
            Out::Buffered(out, hasher) => {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                if sync {
                    file.get_ref().sync_all()?;
                }
                Ok(hasher.finalize())
            }
        }
    }
}

/// Writes one shard: header first, then each tensor's bytes in the shard's order.
pub(crate) struct ShardWriter {
    out: Out,
    /// Tensors still to write, with their byte counts.
    pending: VecDeque<(String, u64)>,
    /// Bytes of the current tensor still expected.
    remaining: u64,
    size: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, shard: &Shard) -> std::io::Result<Self> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({ "format": "pt" }));
        let mut offset = 0u64;
        for tensor in &shard.tensors {
            let len = tensor.len();
            header.insert(
                tensor.name.clone(),
                json!({ "dtype": tensor.dtype.to_string(), "shape": tensor.shape, "data_offsets": [offset, offset + len] }),
            );
            offset += len;
        }
        let mut header = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        header.resize(header.len().next_multiple_of(8), b' ');

        let file = File::create(path)?;
        let len = 8 + header.len() as u64 + offset;
        let mut writer = ShardWriter {
            out: Out::new(file, len),
            pending: shard
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.len()))
                .collect(),
            remaining: 0,
            size: 0,
        };
        writer.put(Piece::Bytes(&(header.len() as u64).to_le_bytes()))?;
        writer.put(Piece::Bytes(&header))?;
        Ok(writer)
    }

    /// Starts the next tensor, which must be `name`; returns where its bytes start in the file.
    pub fn begin(&mut self, name: &str) -> std::io::Result<u64> {
        if self.remaining != 0 {
            return Err(std::io::Error::other(format!(
                "tensor before `{name}` is incomplete"
            )));
        }
        match self.pending.pop_front() {
            Some((next, len)) if next == name => {
                self.remaining = len;
                Ok(self.size)
            }
            other => Err(std::io::Error::other(format!(
                "wrote `{name}` out of order (expected {other:?})"
            ))),
        }
    }

    /// Appends bytes of the current tensor.
    pub fn write(&mut self, piece: Piece<'_>) -> std::io::Result<()> {
        if piece.len() > self.remaining {
            return Err(std::io::Error::other(
                "more bytes than the tensor's shape allows",
            ));
        }
        self.remaining -= piece.len();
        self.put(piece)
    }

    fn put(&mut self, piece: Piece<'_>) -> std::io::Result<()> {
        self.size += piece.len();
        self.out.write(piece)
    }

    /// Flushes and syncs the file; every declared tensor must have been written in full.
    /// Returns the file's blake3 digest; with `sync`, the data is on disk when this returns.
    pub fn finish(self, sync: bool) -> std::io::Result<blake3::Hash> {
        if self.remaining != 0 || !self.pending.is_empty() {
            return Err(std::io::Error::other(
                "shard finished before all its tensors were written",
            ));
        }
        self.out.finish(sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dtype: Dtype, n: usize) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype,
            shape: vec![n],
        }
    }

    #[test]
    fn shards_split_at_the_size_limit_and_align_dtypes() {
        let tensors = vec![
            tensor("a", Dtype::BF16, 10),
            tensor("b", Dtype::F32, 10),
            tensor("c", Dtype::F32, 10),
        ];
        let shards = layout(vec![tensors.clone()], 60);
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].file_name, "model-00001-of-00002.safetensors");
        // f32 before bf16 inside a shard keeps 4-byte alignment.
        assert_eq!(shards[0].tensors[0].name, "b");
        assert_eq!(
            layout(vec![tensors], 1 << 30)[0].file_name,
            "model.safetensors"
        );
    }

    #[test]
    fn groups_never_share_a_shard() {
        let names = |shards: &[Shard]| -> Vec<Vec<String>> {
            let names = |s: &Shard| s.tensors.iter().map(|t| t.name.clone()).collect();
            shards.iter().map(names).collect()
        };
        let groups = vec![
            vec![tensor("a", Dtype::F32, 1), tensor("c", Dtype::F32, 1)],
            vec![tensor("b", Dtype::F32, 1)],
            vec![tensor("d", Dtype::F32, 4), tensor("e", Dtype::F32, 4)],
        ];
        assert_eq!(
            names(&layout(groups.clone(), 1 << 30)),
            [vec!["a", "c"], vec!["b"], vec!["d", "e"]]
        );
        // The size limit still splits a group.
        let shards = layout(groups, 20);
        assert_eq!(
            names(&shards),
            [vec!["a", "c"], vec!["b"], vec!["d"], vec!["e"]]
        );
        assert_eq!(shards[3].file_name, "model-00004-of-00004.safetensors");
    }

    #[test]
    fn written_files_are_valid_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let shard = &layout(
            vec![vec![tensor("x", Dtype::F32, 2), tensor("y", Dtype::U8, 3)]],
            1 << 30,
        )[0];
        let path = dir.path().join(&shard.file_name);
        let mut writer = ShardWriter::create(&path, shard).unwrap();
        writer.begin("x").unwrap();
        writer.write(Piece::Bytes(&[0; 8])).unwrap();
        writer.begin("y").unwrap();
        writer.write(Piece::Bytes(&[1, 2])).unwrap();
        writer.write(Piece::Bytes(&[3])).unwrap();
        let written = writer.finish(false).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(written, blake3::hash(&bytes));
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(parsed.tensor("y").unwrap().data(), &[1, 2, 3]);
    }

    /// Where the file system refuses `O_DIRECT`, the shard goes through the page cache and is
    /// hashed on the way: the same bytes and digest, from memory or read from a file.
    #[test]
    fn a_buffered_shard_has_the_same_bytes_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(20 << 20) + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("source"), &bytes).unwrap();
        let source = File::open(dir.path().join("source")).unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let mut out = Out::Buffered(
            BufWriter::with_capacity(8 << 20, WriteBehind::new(file)),
            Box::default(),
        );
        out.write(Piece::Bytes(&bytes[..1000])).unwrap();
        out.write(Piece::File {
            file: &source,
            path: Path::new("source"),
            offset: 1000,
            len: bytes.len() as u64 - 1000,
        })
        .unwrap();
        assert_eq!(out.finish(false).unwrap(), blake3::hash(&bytes));
        assert!(std::fs::read(&path).unwrap() == bytes);
    }

    #[test]
    fn out_of_order_or_short_writes_fail() {
        let dir = tempfile::tempdir().unwrap();
        let shard = &layout(
            vec![vec![tensor("x", Dtype::F32, 2), tensor("y", Dtype::F32, 2)]],
            1 << 30,
        )[0];
        let mut writer = ShardWriter::create(&dir.path().join("m.safetensors"), shard).unwrap();
        assert!(writer.begin("y").is_err());
        let mut writer = ShardWriter::create(&dir.path().join("n.safetensors"), shard).unwrap();
        writer.begin("x").unwrap();
        writer.write(Piece::Bytes(&[0; 4])).unwrap();
        assert!(writer.begin("y").is_err());
    }
}
