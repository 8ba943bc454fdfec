//! One tensor, fused block of rows by block of rows in parallel and streamed into a cache
//! object, so memory stays bounded whatever the tensor's size.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use modelforge::exec::job::{DeltaJob, DeltaValues, Slice, TensorJob};
use modelforge::store::{ActionEntry, Store};
use rayon::prelude::*;

use crate::backend::{Backend, BlockDelta, BlockValues};

/// Input files, opened once each.
#[derive(Default)]
pub(crate) struct Inputs {
    files: HashMap<PathBuf, File>,
}

impl Inputs {
    fn file(&mut self, path: &PathBuf) -> std::io::Result<&File> {
        if !self.files.contains_key(path) {
            let file = File::open(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            self.files.insert(path.clone(), file);
        }
        Ok(&self.files[path])
    }

    fn read(&mut self, slice: &Slice) -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; slice.len as usize];
        self.file(&slice.path)?
            .read_exact_at(&mut bytes, slice.start)?;
        Ok(bytes)
    }
}

/// A delta in f32, laid out so that any block of output rows is a contiguous slice.
struct Prepared {
    factor: f64,
    /// Row-major (rows × rank) for low-rank deltas, (rows × cols) for dense ones.
    left: Vec<f32>,
    /// (rank × cols) for low-rank deltas; empty for dense ones.
    right: Vec<f32>,
    rank: usize,
}

impl Prepared {
    fn block(&self, start: usize, n: usize, cols: usize) -> BlockDelta<'_> {
        let values = if self.right.is_empty() {
            BlockValues::Dense(&self.left[start * cols..(start + n) * cols])
        } else {
            BlockValues::LowRank {
                left: &self.left[start * self.rank..(start + n) * self.rank],
                right: &self.right,
                rank: self.rank,
            }
        };
        BlockDelta {
            factor: self.factor,
            values,
        }
    }
}

fn prepare(
    backend: &Backend,
    inputs: &mut Inputs,
    tensor: &TensorJob,
) -> std::io::Result<Vec<Prepared>> {
    let mut prepared = Vec::new();
    for delta in &tensor.deltas {
        let mut load = |slice: &Slice| -> std::io::Result<Vec<f32>> {
            Ok(backend.f32_values(&inputs.read(slice)?, slice.dtype, &slice.shape))
        };
        prepared.push(match &delta.values {
            DeltaValues::Dense(v) => Prepared {
                factor: delta.factor(),
                left: load(v)?,
                right: Vec::new(),
                rank: 0,
            },
            DeltaValues::LowRank { transposed, a, b } => {
                let (rank, inner, outer) = (a.shape[0], a.shape[1], b.shape[0]);
                let (a, b) = (load(a)?, load(b)?);
                if *transposed {
                    // Δ = (B·A)ᵀ = Aᵀ·Bᵀ: rows of Aᵀ, all of Bᵀ.
                    Prepared {
                        factor: delta.factor(),
                        left: backend.transpose(&a, rank, inner),
                        right: backend.transpose(&b, outer, rank),
                        rank,
                    }
                } else {
                    // Δ = B·A: rows of B, all of A.
                    Prepared {
                        factor: delta.factor(),
                        left: b,
                        right: a,
                        rank,
                    }
                }
            }
        });
    }
    Ok(prepared)
}

/// Computes `tensor` into a new cache object.
pub(crate) fn fuse(
    backend: &Backend,
    store: &Store,
    inputs: &mut Inputs,
    tensor: &TensorJob,
    budget: u64,
    sync: bool,
) -> std::io::Result<ActionEntry> {
    let origin = &tensor.origin;
    let mut out = store.object_writer()?;
    let numel: usize = origin.shape.iter().product();
    if numel == 0 {
        return out.finish(sync);
    }
    let rows = origin.shape.first().copied().unwrap_or(1).max(1);
    let cols = numel / rows;
    let deltas = prepare(backend, inputs, tensor)?;
    let file = inputs.file(&origin.path)?;

    if let Some(refactor) = &tensor.refactor {
        let factor = |d: &DeltaJob| {
            if tensor.merge.is_some() {
                d.scaling
            } else {
                d.factor()
            }
        };
        let tasks: Vec<BlockDelta<'_>> = deltas
            .iter()
            .zip(&tensor.deltas)
            .map(|(prepared, delta)| BlockDelta {
                factor: factor(delta),
                ..prepared.block(0, rows, cols)
            })
            .collect();
        let weights: Vec<f64> = tensor.deltas.iter().map(|d| d.weight).collect();
        let delta = backend.merged_delta(rows, cols, &tasks, &weights, tensor.merge.as_ref());
        let (bytes, energy) = backend.refactor(&delta, refactor);
        out.write(&bytes)?;
        let mut entry = out.finish(sync)?;
        entry.energy = Some(energy);
        return Ok(entry);
    }

    if let Some(merge) = &tensor.merge {
        // Pruning and sign election look at whole tensors: no blocks here.
        let mut base = vec![0u8; origin.len as usize];
        file.read_exact_at(&mut base, origin.start)?;
        let tasks: Vec<BlockDelta<'_>> = deltas
            .iter()
            .zip(&tensor.deltas)
            .map(|(prepared, delta)| BlockDelta {
                factor: delta.scaling,
                ..prepared.block(0, rows, cols)
            })
            .collect();
        let weights: Vec<f64> = tensor.deltas.iter().map(|d| d.weight).collect();
        let bytes = backend.merge_tensor(
            &base,
            origin.dtype,
            rows,
            cols,
            &tasks,
            &weights,
            merge,
            tensor.out_dtype,
        );
        out.write(&bytes)?;
        return out.finish(sync);
    }

    // Each block in flight holds its input, two f32 temporaries, its output and their copies
    // across the LibTorch boundary: under 20 bytes an element; two blocks per thread keep the
    // cores busy.
    let in_flight = 2 * rayon::current_num_threads();
    let block_elements = (budget / (20 * in_flight as u64)).clamp(1 << 16, 1 << 24) as usize;
    let in_row_bytes = cols * origin.dtype.bitsize() / 8;
    let rows_per_block = (block_elements / cols).max(1);
    let blocks: Vec<(usize, usize)> = (0..rows)
        .step_by(rows_per_block)
        .map(|start| (start, rows_per_block.min(rows - start)))
        .collect();
    for window in blocks.chunks(in_flight) {
        let results: Vec<std::io::Result<Vec<u8>>> = window
            .par_iter()
            .map(|&(start, n)| {
                let mut base = vec![0u8; n * in_row_bytes];
                file.read_exact_at(&mut base, origin.start + (start * in_row_bytes) as u64)?;
                let block: Vec<BlockDelta<'_>> =
                    deltas.iter().map(|d| d.block(start, n, cols)).collect();
                Ok(backend.fuse_block(&base, origin.dtype, n, cols, &block, tensor.out_dtype))
            })
            .collect();
        for bytes in results {
            out.write(&bytes?)?;
        }
    }
    out.finish(sync)
}
