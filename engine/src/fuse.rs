//! One tensor, fused block of rows by block of rows in parallel and streamed into a cache
//! object, so memory stays bounded whatever the tensor's size.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use modelforge_core::job::Job;
use modelforge_core::node::{Adapt, Delta, Fuse, Input, Refactor, RowMap};
use modelforge_core::store::{ActionEntry, ObjectWriter, Store};

use modelforge_core::node::LoraKind;

use crate::backend::{Backend, BlockDelta, BlockValues, Magnitude, Rounded};
use crate::error::{shape, EngineError};
use crate::inputs::{Inputs, Slice};

std::thread_local! {
    /// Each worker's buffer for the base rows of its block, kept from block to block: a
    /// fresh allocation of megabytes per block is zeroed and faulted in anew every time.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bytes of a result that starts at element `offset` of its tensor, or why they are refused.
fn accept(rounded: Rounded, offset: u64, check_finite: bool) -> Result<Vec<u8>, EngineError> {
    match rounded.non_finite {
        Some((index, what)) if check_finite => Err(EngineError::NonFinite {
            index: offset + index,
            what,
        }),
        _ => Ok(rounded.bytes),
    }
}

/// DoRA's magnitude per output row, or per column of a transposed tensor (`true`), and in a
/// fused tensor which rows (columns) are the module's.
type Magnitudes = (Vec<f32>, bool, Option<Vec<bool>>);

/// A delta in f32, laid out so that any block of output rows is a contiguous slice; or, for a
/// full model, where to read its rows.
struct Prepared {
    factor: f64,
    /// Row-major (rows × rank) for low-rank deltas, (rows × cols) for dense ones.
    left: Vec<f32>,
    /// (rank × cols) for low-rank deltas; empty for dense ones. Experts have one each, for
    /// `group` rows apiece.
    right: Vec<f32>,
    rights: Vec<Vec<f32>>,
    group: usize,
    rank: usize,
    /// A full model's tensor, read block by block.
    model: Option<(File, Slice)>,
    magnitude: Option<Magnitudes>,
    /// Trainable tokens: rows and their new values (indices × cols).
    tokens: Option<(Vec<usize>, Vec<f32>)>,
}

/// The (rows × cols) matrix a tensor is fused as: a 3-D tensor of experts as its experts' rows
/// one after the other.
pub(crate) fn matrix(shape: &[usize]) -> (usize, usize) {
    let numel: usize = shape.iter().product();
    match shape {
        [] => (1, 1),
        [rows] => (*rows, 1),
        [.., cols] => (numel / (*cols).max(1), *cols),
    }
}

impl Prepared {
    /// The rows `start..start + n` of a full model's tensor, in f32.
    fn model_rows(
        &self,
        backend: &Backend,
        start: usize,
        n: usize,
        cols: usize,
    ) -> std::io::Result<Option<Vec<f32>>> {
        let Some((file, slice)) = &self.model else {
            return Ok(None);
        };
        let row_bytes = cols * slice.dtype.bitsize() / 8;
        let mut bytes = vec![0u8; n * row_bytes];
        file.read_exact_at(&mut bytes, slice.start + (start * row_bytes) as u64)?;
        Ok(Some(backend.f32_values(&bytes, slice.dtype, &[n, cols])))
    }

    /// This delta's share of rows `start..start + n` (never more than one expert's);
    /// `model` holds them for a full model.
    fn block<'a>(
        &'a self,
        start: usize,
        n: usize,
        cols: usize,
        model: Option<&'a [f32]>,
    ) -> BlockDelta<'a> {
        let values = if let Some(values) = model {
            BlockValues::Model(values)
        } else if let Some((indices, values)) = &self.tokens {
            BlockValues::Tokens(
                indices
                    .iter()
                    .enumerate()
                    .filter(|(_, &row)| (start..start + n).contains(&row))
                    .map(|(i, &row)| (row - start, &values[i * cols..(i + 1) * cols]))
                    .collect(),
            )
        } else if !self.rights.is_empty() {
            BlockValues::LowRank {
                left: &self.left[start * self.rank..(start + n) * self.rank],
                right: &self.rights[start / self.group],
                rank: self.rank,
            }
        } else if self.right.is_empty() {
            BlockValues::Dense(&self.left[start * cols..(start + n) * cols])
        } else {
            BlockValues::LowRank {
                left: &self.left[start * self.rank..(start + n) * self.rank],
                right: &self.right,
                rank: self.rank,
            }
        };
        let magnitude = self
            .magnitude
            .as_ref()
            .map(|(m, columns, mask)| match columns {
                true => Magnitude {
                    values: m,
                    columns: true,
                    mask: mask.as_deref(),
                },
                false => Magnitude {
                    values: &m[start..start + n],
                    columns: false,
                    mask: mask.as_ref().map(|mask| &mask[start..start + n]),
                },
            });
        BlockDelta {
            factor: self.factor,
            values,
            magnitude,
        }
    }
}

fn prepare(
    backend: &Backend,
    store: &Store,
    inputs: &mut Inputs,
    tensor: &Fuse,
) -> Result<Vec<Prepared>, EngineError> {
    let (rows, cols) = matrix(&tensor.origin.shape);
    let mut prepared = Vec::new();
    for delta in &tensor.deltas {
        let mut load = |input: &Input| -> Result<Vec<f32>, EngineError> {
            Ok(backend.f32_values(&inputs.read(input)?, input.dtype, &input.shape))
        };
        let plain =
            |left, right, rank| Prepared::new(left, right, rank).with_factor(delta.factor());
        prepared.push(match &delta.delta {
            Delta::Vector(v) => plain(load(v)?, Vec::new(), 0),
            Delta::Tokens { indices, values } => {
                let values = load(values)?;
                if values.len() != indices.len() * cols || indices.iter().any(|&i| i >= rows) {
                    return Err(shape!(
                        "{} trainable token rows do not fit a {rows} × {cols} tensor",
                        indices.len()
                    ));
                }
                Prepared {
                    tokens: Some((indices.clone(), values)),
                    ..plain(Vec::new(), Vec::new(), 0)
                }
            }
            Delta::LowRank {
                a,
                b,
                kind:
                    LoraKind::Expert {
                        count: experts,
                        index,
                        offset,
                    },
                ..
            } => {
                let (a, b) = (load(a)?, load(b)?);
                let (e, r) = (*experts, a.len() / cols.max(1) / experts.max(&1));
                let (index, offset) = (*index, *offset);
                let outer = b.len() / (e * r).max(1);
                if r == 0 || a.len() != e * r * cols || index >= *experts || offset + rows > outer {
                    return Err(shape!(
                        "expert {index}'s LoRA does not fit a {rows} × {cols} tensor"
                    ));
                }
                // Rows `offset..` of B_e (column k·E + e of B) and A_e.
                let left = (0..rows)
                    .flat_map(|row| (0..r).map(move |k| (offset + row) * e * r + k * e + index))
                    .map(|at| b[at])
                    .collect();
                let right = a[index * r * cols..(index + 1) * r * cols].to_vec();
                plain(left, right, r)
            }
            Delta::LowRank {
                a,
                b,
                kind:
                    LoraKind::Experts {
                        count: experts,
                        transposed,
                    },
                ..
            } => {
                let (a, b) = (load(a)?, load(b)?);
                self::experts(&a, &b, *experts, *transposed, (rows, cols))
                    .map(|(left, rights, rank)| Prepared {
                        group: rows / experts,
                        rights,
                        ..plain(left, Vec::new(), rank)
                    })
                    .ok_or_else(|| {
                        shape!("a LoRA of {experts} experts does not fit a {rows} × {cols} tensor")
                    })?
            }
            Delta::Difference(m) => Prepared {
                model: {
                    let slice = inputs.slice(m)?;
                    Some((open(&slice.path)?, slice))
                },
                ..plain(Vec::new(), Vec::new(), 0)
            },
            Delta::LowRank { .. } => low_rank(
                backend,
                store,
                &mut load,
                &delta.delta,
                &tensor.origin.shape,
            )?
            .with_factor(delta.factor()),
        });
    }
    Ok(prepared)
}

/// A LoRA module's B·A (not of experts), in the tensor's orientation: read, or the aligned
/// factors of another node; cut or padded when made for other widths; scattered into its
/// part's rows of a fused tensor.
fn low_rank(
    backend: &Backend,
    store: &Store,
    load: &mut dyn FnMut(&Input) -> Result<Vec<f32>, EngineError>,
    delta: &Delta<Input, modelforge_core::digest::NodeKey>,
    shape: &[usize],
) -> Result<Prepared, EngineError> {
    let Delta::LowRank {
        kind,
        a,
        b,
        rows: row_map,
        rotary,
        adapt,
        magnitude,
    } = delta
    else {
        unreachable!("called for low-rank deltas")
    };
    let (rows, cols) = matrix(shape);
    let transposed = kind.transposed();
    let mut magnitude = match magnitude {
        Some(m) => Some((load(m)?, transposed, None)),
        None => None,
    };
    // The factors in the LoRA's orientation: A (rank × inner), B (outer × rank).
    let (rank, inner, a, b) = match adapt {
        Some(Adapt::Aligned { node, rank }) => {
            // Made by an alignment step of this job or an earlier build: A's then B's f32
            // values, A as wide as the target's input side.
            let bytes = crate::inputs::node_bytes(store, node)?;
            let values = backend.f32_values(&bytes, safetensors::Dtype::F32, &[bytes.len() / 4]);
            let inner = if transposed { rows } else { cols };
            if *rank == 0 || !values.len().is_multiple_of(*rank) || values.len() / rank <= inner {
                return Err(shape!(
                    "the aligned delta {} does not fit a {rows} × {cols} tensor at rank {rank}",
                    node.hex()
                ));
            }
            let (a, b) = values.split_at(rank * inner);
            (*rank, inner, a.to_vec(), b.to_vec())
        }
        _ => (a.shape[0], a.shape[1], load(a)?, load(b)?),
    };
    let outer = b.len() / rank.max(1);
    if row_map.is_some() || rotary.is_some() {
        // A part of a fused tensor. In a transposed target (GPT-2's Conv1D) its rows are
        // columns: Δ = Aᵀ · (Bᵀ scattered into columns).
        let axis = usize::from(transposed);
        let total = shape.get(axis).copied().unwrap_or(0);
        let map = row_map.unwrap_or(RowMap::Offset { offset: 0 });
        let scattered = scatter(
            &b,
            rank,
            outer,
            total,
            map,
            *rotary,
            transposed,
            &mut magnitude,
        )?;
        let prepared = if transposed {
            Prepared::new(backend.transpose(&a, rank, inner), scattered, rank)
        } else {
            Prepared::new(scattered, a, rank)
        };
        return Ok(prepared.with_magnitude(magnitude));
    }
    let (left, right) = if transposed {
        // Δ = (B·A)ᵀ = Aᵀ·Bᵀ: rows of Aᵀ, all of Bᵀ.
        (
            backend.transpose(&a, rank, inner),
            backend.transpose(&b, outer, rank),
        )
    } else {
        // Δ = B·A: rows of B, all of A.
        (b, a)
    };
    let (left_rows, right_cols) = (left.len() / rank.max(1), right.len() / rank.max(1));
    let prepared = if matches!(adapt, Some(Adapt::Fit { .. })) {
        // Made for other widths: its leading rows and columns, zeros after.
        Prepared::new(
            fit(&left, left_rows, rank, rows, rank),
            fit(&right, rank, right_cols, rank, cols),
            rank,
        )
    } else if rank > 0 && (left_rows, right_cols) != (rows, cols) {
        return Err(shape!(
            "a delta of {left_rows} × {right_cols} does not fit the {rows} × {cols} tensor"
        ));
    } else {
        Prepared::new(left, right, rank)
    };
    Ok(prepared.with_magnitude(magnitude))
}

/// B's rows (the delta's output features, `outer` of them, `rank` wide) scattered to where
/// its part's rows are in a fused tensor of `total` rows, zero elsewhere, so that the block
/// loop sees one tensor-shaped delta; laid out (total × rank), or (rank × total) when
/// `transposed`. A DoRA magnitude goes with its rows, and the part's other rows keep theirs.
#[allow(clippy::too_many_arguments)]
fn scatter(
    b: &[f32],
    rank: usize,
    outer: usize,
    total: usize,
    map: RowMap,
    rotary: Option<modelforge_core::rotary::RotaryMap>,
    transposed: bool,
    magnitude: &mut Option<Magnitudes>,
) -> Result<Vec<f32>, EngineError> {
    let mut scattered = vec![0f32; total * rank];
    let mut part = magnitude
        .as_ref()
        .map(|_| (vec![0f32; total], vec![false; total]));
    for row in 0..outer {
        let from = rotary.map_or(row, |r| r.row(row));
        for to in map.targets(from) {
            if to >= total {
                return Err(shape!("row {to} is outside the target's {total} rows"));
            }
            if let (Some((values, mask)), Some((m, _, _))) = (part.as_mut(), magnitude.as_ref()) {
                values[to] = m.get(row).copied().unwrap_or(f32::NAN);
                mask[to] = true;
            }
            for k in 0..rank {
                let value = b[row * rank + k];
                if transposed {
                    scattered[k * total + to] = value;
                } else {
                    scattered[to * rank + k] = value;
                }
            }
        }
    }
    if let (Some((values, mask)), Some(m)) = (part, magnitude.as_mut()) {
        *m = (values, transposed, Some(mask));
    }
    Ok(scattered)
}

impl Prepared {
    /// A delta of `left · right` (or of `left` alone when dense), factor 1.
    fn new(left: Vec<f32>, right: Vec<f32>, rank: usize) -> Prepared {
        Prepared {
            factor: 1.0,
            left,
            right,
            rights: Vec::new(),
            group: 0,
            rank,
            model: None,
            magnitude: None,
            tokens: None,
        }
    }

    fn with_factor(self, factor: f64) -> Prepared {
        Prepared { factor, ..self }
    }

    fn with_magnitude(self, magnitude: Option<Magnitudes>) -> Prepared {
        Prepared { magnitude, ..self }
    }
}

/// PEFT's `ParamWrapper` factors of `experts` experts as one left factor (rows × r) and one
/// right factor per expert (r × cols): A is (E·r × in), B (out × E·r) with expert e's rank
/// column k at k·E + e (PEFT reshapes B to (out, r, E)). Expert e's delta is B_e·A_e, shaped
/// (out × in), or its transpose when the parameter is stored [E, in, out]. `None` if the factors
/// do not fit the tensor.
fn experts(
    a: &[f32],
    b: &[f32],
    experts: usize,
    transposed: bool,
    (rows, cols): (usize, usize),
) -> Option<(Vec<f32>, Vec<Vec<f32>>, usize)> {
    let group = rows.checked_div(experts)?;
    let (outer, inner) = if transposed {
        (cols, group)
    } else {
        (group, cols)
    };
    if experts == 0 || group * experts != rows || !b.len().is_multiple_of(outer) {
        return None;
    }
    let rank = b.len() / outer / experts;
    if rank == 0 || a.len() != experts * rank * inner || b.len() != outer * experts * rank {
        return None;
    }
    // B_e[o][k] and A_e[k][i].
    let b_at = |e: usize, o: usize, k: usize| b[o * experts * rank + k * experts + e];
    let a_at = |e: usize, k: usize, i: usize| a[(e * rank + k) * inner + i];
    let mut left = vec![0f32; rows * rank];
    let mut rights = Vec::with_capacity(experts);
    for e in 0..experts {
        let mut right = vec![0f32; rank * cols];
        for row in 0..group {
            for k in 0..rank {
                // Untransposed, the tensor's rows are B_e's; transposed, A_eᵀ's.
                left[(e * group + row) * rank + k] = if transposed {
                    a_at(e, k, row)
                } else {
                    b_at(e, row, k)
                };
            }
        }
        for k in 0..rank {
            for col in 0..cols {
                right[k * cols + col] = if transposed {
                    b_at(e, col, k)
                } else {
                    a_at(e, k, col)
                };
            }
        }
        rights.push(right);
    }
    Some((left, rights, rank))
}

/// Rows `first..end` cut into blocks of at most `most` rows, as equal as they can be and, where
/// there are rows enough, as many as a multiple of `threads`: no thread waits at a tensor's
/// end while another finishes a block twice the size of its own.
fn balanced(first: usize, end: usize, most: usize, threads: usize) -> Vec<(usize, usize)> {
    let rows = end - first;
    let mut count = rows.div_ceil(most.max(1)).max(1);
    if rows >= threads {
        count = count.next_multiple_of(threads.max(1)).min(rows);
    }
    let (size, longer) = (rows / count, rows % count);
    let mut start = first;
    (0..count)
        .map(|i| {
            let n = size + usize::from(i < longer);
            start += n;
            (start - n, n)
        })
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// A row-major (rows × cols) matrix cut or zero-padded to (to_rows × to_cols), keeping its
/// leading block.
fn fit(values: &[f32], rows: usize, cols: usize, to_rows: usize, to_cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; to_rows * to_cols];
    let width = cols.min(to_cols);
    for row in 0..rows.min(to_rows) {
        out[row * to_cols..row * to_cols + width]
            .copy_from_slice(&values[row * cols..row * cols + width]);
    }
    out
}

fn open(path: &PathBuf) -> std::io::Result<File> {
    File::open(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// A tensor computed whole: pruning, sign election and SVD look at whole tensors, so a merge
/// other than the plain sum, or a re-factored delta, is not cut into blocks.
#[allow(clippy::too_many_arguments)]
fn whole(
    backend: &Backend,
    file: &File,
    origin: &Slice,
    tensor: &Fuse,
    deltas: &[Prepared],
    refactor: Option<&Refactor>,
    mut out: ObjectWriter,
    check_finite: bool,
    sync: bool,
) -> Result<ActionEntry, EngineError> {
    let (rows, cols) = matrix(&origin.shape);
    let mut base = vec![0u8; origin.len as usize];
    file.read_exact_at(&mut base, origin.start)?;
    // A replacement loaded into a layer of the base's dtype is rounded to it first.
    let (base, in_dtype) = match tensor.origin_cast {
        Some(to) if to != origin.dtype => (backend.cast(&base, origin.dtype, to), to),
        _ => (base, origin.dtype),
    };
    let models: Vec<Option<Vec<f32>>> = deltas
        .iter()
        .map(|d| d.model_rows(backend, 0, rows, cols))
        .collect::<Result<_, _>>()?;
    // A pruning merge weights the scaled deltas itself; the plain sum takes weight × scaling.
    let tasks: Vec<BlockDelta<'_>> = deltas
        .iter()
        .zip(&tensor.deltas)
        .zip(&models)
        .map(|((prepared, delta), model)| BlockDelta {
            factor: if tensor.merge.is_some() {
                delta.scaling
            } else {
                delta.factor()
            },
            ..prepared.block(0, rows, cols, model.as_deref())
        })
        .collect();
    let weights: Vec<f64> = tensor.deltas.iter().map(|d| d.weight).collect();
    let w = backend.base(&base, in_dtype, rows, cols);
    let delta = backend.merged_delta(&w, rows, cols, &tasks, &weights, tensor.merge.as_ref());
    if let Some(refactor) = refactor {
        let (factors, energy) = backend.refactor(&delta, refactor);
        out.write(&accept(factors, 0, check_finite)?)?;
        let mut entry = out.finish(sync)?;
        entry.energy = Some(energy);
        return Ok(entry);
    }
    let fused = backend.add_and_round(w, delta, tensor.dtype);
    out.write(&accept(fused, 0, check_finite)?)?;
    Ok(out.finish(sync)?)
}

/// Computes `tensor` into `out`, a new cache object (or a result to hand to the build).
pub fn fuse(
    backend: &Backend,
    store: &Store,
    inputs: &mut Inputs,
    tensor: &Fuse,
    refactor: Option<&Refactor>,
    job: &Job,
    mut out: ObjectWriter,
) -> Result<ActionEntry, EngineError> {
    let (budget, sync, check_finite) = (job.budget, job.fsync, job.check_finite);
    let origin = &inputs.slice(&tensor.origin)?;
    let numel: usize = origin.shape.iter().product();
    if numel == 0 {
        return Ok(out.finish(sync)?);
    }
    let (rows, cols) = matrix(&origin.shape);
    let deltas = prepare(backend, store, inputs, tensor)?;
    let file = inputs.file(&origin.path)?;

    if refactor.is_some() || tensor.merge.is_some() {
        return whole(
            backend,
            file,
            origin,
            tensor,
            &deltas,
            refactor,
            out,
            check_finite,
            sync,
        );
    }

    // Up to two blocks per thread are in flight, computed or waiting for the writer, which
    // hashes and writes them in order. A block being computed on LibTorch's path holds its input, two f32
    // temporaries, its output and their copies across the LibTorch boundary: under 20 bytes an
    // element (the CPU's one-pass path, `elementwise`, holds about half); a block computed and
    // waiting for the writer only its output, at most 8 bytes an element. The budget counts
    // the larger.
    let in_flight = 2 * rayon::current_num_threads();
    let block_elements = (budget / (28 * in_flight as u64)).clamp(1 << 16, 1 << 24) as usize;
    let in_row_bytes = cols * origin.dtype.bitsize() / 8;
    // A DoRA magnitude per column of a transposed tensor needs whole columns: one block. Blocks
    // never straddle two experts, whose right factors differ.
    let whole = deltas
        .iter()
        .any(|d| d.magnitude.as_ref().is_some_and(|(_, columns, _)| *columns));
    let rows_per_block = if whole {
        rows
    } else {
        (block_elements / cols).max(1)
    };
    let group = deltas
        .iter()
        .map(|d| d.group)
        .find(|&g| g > 0)
        .unwrap_or(rows);
    // Whole columns stay one block.
    let threads = if whole {
        1
    } else {
        rayon::current_num_threads()
    };
    let blocks: Vec<(usize, usize)> = (0..rows)
        .step_by(group)
        .flat_map(|first| balanced(first, (first + group).min(rows), rows_per_block, threads))
        .collect();
    // Blocks are computed on rayon's threads as they come free, never more than `in_flight`
    // ahead of the writer, which hashes and writes them in order: a permit goes back each time
    // a block is written. A block that fails, or a writer that fails, stops what follows; the
    // first error in the tensor's order is the one returned.
    let compute = |start: usize, n: usize| -> Result<Vec<u8>, EngineError> {
        SCRATCH.with_borrow_mut(|base| {
            base.resize(n * in_row_bytes, 0);
            file.read_exact_at(base, origin.start + (start * in_row_bytes) as u64)?;
            let cast_block;
            let (base, in_dtype): (&[u8], _) = match tensor.origin_cast {
                Some(to) if to != origin.dtype => {
                    cast_block = backend.cast(base, origin.dtype, to);
                    (&cast_block, to)
                }
                _ => (base, origin.dtype),
            };
            let models: Vec<Option<Vec<f32>>> = deltas
                .iter()
                .map(|d| d.model_rows(backend, start, n, cols))
                .collect::<Result<_, _>>()?;
            let block: Vec<BlockDelta<'_>> = deltas
                .iter()
                .zip(&models)
                .map(|(d, model)| d.block(start, n, cols, model.as_deref()))
                .collect();
            let fused = backend.fuse_block(base, in_dtype, n, cols, &block, tensor.dtype);
            accept(fused, (start * cols) as u64, check_finite)
        })
    };
    let (send, receive) = std::sync::mpsc::channel::<(usize, Result<Vec<u8>, EngineError>)>();
    let (permit, permits) = std::sync::mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        permit
            .send(())
            .expect("the channel has room for every permit");
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<ObjectWriter, EngineError> {
            let mut early = std::collections::BTreeMap::new();
            let mut next = 0;
            for (index, bytes) in receive {
                early.insert(index, bytes);
                while let Some(bytes) = early.remove(&next) {
                    out.write(&bytes?)?;
                    next += 1;
                    // The spawner may be gone once every block is out.
                    let _ = permit.send(());
                }
            }
            // A block missing here was never computed: the spawner stopped for an error.
            Ok(out)
        });
        rayon::in_place_scope(|blocks_scope| {
            for (index, &(start, n)) in blocks.iter().enumerate() {
                // No permit: the writer stopped, and says why.
                if permits.recv().is_err() {
                    break;
                }
                let send = send.clone();
                let compute = &compute;
                blocks_scope.spawn(move |_| {
                    let _ = send.send((index, compute(start, n)));
                });
            }
        });
        drop(send);
        // Only a complete tensor becomes an object; a failed one's temporary file is removed
        // when its writer is dropped.
        let written = writer.join().expect("the writer does not panic")?;
        Ok(written.finish(sync)?)
    })
}

#[cfg(test)]
mod tests {
    use super::balanced;

    /// Blocks cover their rows once, in order, none longer than asked, within one row of each
    /// other, and as many as a multiple of the threads where the rows allow.
    #[test]
    fn blocks_are_balanced_over_the_threads() {
        for (first, end, most, threads) in [
            (0, 2048, 292, 2),
            (0, 256, 292, 2),
            (0, 5632, 106, 2),
            (100, 103, 1, 4),
            (0, 3, 1000, 4),
            (0, 1, 1, 2),
            (0, 7, 2, 1),
        ] {
            let blocks = balanced(first, end, most, threads);
            let mut at = first;
            for &(start, n) in &blocks {
                assert_eq!(start, at);
                assert!(n >= 1 && n <= most.max(1));
                at += n;
            }
            assert_eq!(at, end);
            let sizes: Vec<usize> = blocks.iter().map(|b| b.1).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            if end - first >= threads {
                assert_eq!(blocks.len() % threads, 0, "{blocks:?}");
            }
        }
        // A tensor of 256 rows on two threads is two blocks, not one.
        assert_eq!(balanced(0, 256, 292, 2), vec![(0, 128), (128, 128)]);
    }
}
