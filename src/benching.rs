//! Entry points for the micro-benchmarks in `benches/`, not a stable API: the crate-private
//! writers that a build's hot path goes through.
use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;

/// One tensor to write: name, dtype, shape and its bytes.
pub type Tensor<'a> = (&'a str, Dtype, Vec<usize>, &'a [u8]);

/// Writes `tensors` as one safetensors file at `path` exactly as a build writes an output shard
/// (header from the shapes, then the bytes streamed in 8 MiB pieces, hashed on the way out);
/// returns the file's blake3.
pub fn write_safetensors(path: &Path, tensors: &[Tensor<'_>]) -> std::io::Result<blake3::Hash> {
    use crate::io::writer::{layout, OutTensor, ShardWriter};
    let mut out: Vec<OutTensor> = tensors
        .iter()
        .map(|(name, dtype, shape, _)| OutTensor {
            name: (*name).to_owned(),
            dtype: *dtype,
            shape: shape.clone(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    let shard = &layout(vec![out], u64::MAX)[0];
    let bytes: HashMap<&str, &[u8]> = tensors.iter().map(|t| (t.0, t.3)).collect();
    let mut writer = ShardWriter::create(path, shard)?;
    for tensor in &shard.tensors {
        writer.begin(&tensor.name)?;
        for piece in bytes[tensor.name.as_str()].chunks(8 << 20) {
            writer.write(crate::io::piece::Piece::Bytes(piece))?;
        }
    }
    writer.finish(false)
}
