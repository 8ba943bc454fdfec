//! One tensor, fused block of rows by block of rows in parallel and streamed into a cache
//! object, so memory stays bounded whatever the tensor's size.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};

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

/// Computes `tensor` into `out`, a new cache object (or a result to hand to the build), and
/// returns when it is complete.
pub fn fuse(
    backend: &Backend,
    store: &Store,
    inputs: &mut Inputs,
    tensor: &Fuse,
    refactor: Option<&Refactor>,
    job: &Job,
    out: ObjectWriter,
) -> Result<ActionEntry, EngineError> {
    match start(backend, store, inputs, tensor, refactor, job, out)? {
        Started::Done(entry) => Ok(entry),
        Started::Streamed(stream) => {
            let mut pipeline = Pipeline::new(std::sync::Arc::new(|_: &(), _: &ActionEntry| Ok(())));
            pipeline.push(*backend, stream, ());
            pipeline
                .oldest()
                .expect("one tensor pushed")
                .map(|(_, entry)| entry)
                .map_err(|(_, e)| e)
        }
    }
}

/// A tensor [`start`]ed: computed already, or to be streamed block by block by a [`Pipeline`].
pub enum Started {
    Done(ActionEntry),
    Streamed(Box<Stream>),
}

/// What a tensor's blocks read, shared by the threads that compute them.
struct Work {
    file: std::sync::Arc<File>,
    origin: Slice,
    origin_cast: Option<safetensors::Dtype>,
    dtype: safetensors::Dtype,
    cols: usize,
    deltas: Vec<Prepared>,
    check_finite: bool,
}

impl Work {
    /// The fused bytes of rows `start..start + n`.
    fn block(&self, backend: &Backend, start: usize, n: usize) -> Result<Vec<u8>, EngineError> {
        let (cols, origin) = (self.cols, &self.origin);
        let in_row_bytes = cols * origin.dtype.bitsize() / 8;
        SCRATCH.with_borrow_mut(|base| {
            base.resize(n * in_row_bytes, 0);
            self.file
                .read_exact_at(base, origin.start + (start * in_row_bytes) as u64)?;
            let cast_block;
            let (base, in_dtype): (&[u8], _) = match self.origin_cast {
                Some(to) if to != origin.dtype => {
                    cast_block = backend.cast(base, origin.dtype, to);
                    (&cast_block, to)
                }
                _ => (base, origin.dtype),
            };
            let models: Vec<Option<Vec<f32>>> = self
                .deltas
                .iter()
                .map(|d| d.model_rows(backend, start, n, cols))
                .collect::<Result<_, _>>()?;
            let block: Vec<BlockDelta<'_>> = self
                .deltas
                .iter()
                .zip(&models)
                .map(|(d, model)| d.block(start, n, cols, model.as_deref()))
                .collect();
            let fused = backend.fuse_block(base, in_dtype, n, cols, &block, self.dtype);
            accept(fused, (start * cols) as u64, self.check_finite)
        })
    }
}

/// A tensor to be computed block of rows by block of rows, into its object.
pub struct Stream {
    work: std::sync::Arc<Work>,
    /// Each block's first row and row count, in the tensor's order.
    blocks: Vec<(usize, usize)>,
    out: ObjectWriter,
    sync: bool,
}

/// Reads what `tensor` needs and computes it now if it is computed whole (a merge other than
/// the plain sum, a re-factored delta, an empty tensor); otherwise says how to stream it.
pub fn start(
    backend: &Backend,
    store: &Store,
    inputs: &mut Inputs,
    tensor: &Fuse,
    refactor: Option<&Refactor>,
    job: &Job,
    out: ObjectWriter,
) -> Result<Started, EngineError> {
    let (budget, sync, check_finite) = (job.budget, job.fsync, job.check_finite);
    let origin = inputs.slice(&tensor.origin)?;
    let numel: usize = origin.shape.iter().product();
    if numel == 0 {
        return Ok(Started::Done(out.finish(sync)?));
    }
    let (rows, cols) = matrix(&origin.shape);
    let deltas = prepare(backend, store, inputs, tensor)?;
    let file = inputs.file(&origin.path)?;

    if refactor.is_some() || tensor.merge.is_some() {
        return whole(
            backend,
            &file,
            &origin,
            tensor,
            &deltas,
            refactor,
            out,
            check_finite,
            sync,
        )
        .map(Started::Done);
    }

    // A block being computed on LibTorch's path holds its input, two f32 temporaries, its
    // output and their copies across the LibTorch boundary: under 20 bytes an element (the
    // CPU's one-pass path, `elementwise`, holds about half); a block computed and waiting for
    // its writer only its output, at most 8 bytes an element. The budget counts the larger,
    // for every block a pipeline lets be in flight.
    let block_elements =
        (budget / (28 * Pipeline::<()>::in_flight() as u64)).clamp(1 << 16, 1 << 24) as usize;
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
    Ok(Started::Streamed(Box::new(Stream {
        work: std::sync::Arc::new(Work {
            file,
            origin,
            origin_cast: tensor.origin_cast,
            dtype: tensor.dtype,
            cols,
            deltas,
            check_finite,
        }),
        blocks,
        out,
        sync,
    })))
}

/// Tensors streamed one after another without a pause between them: the next tensor's
/// blocks are computed on rayon's threads while the last blocks of the one before finish
/// and its writer writes them, so that no core waits at the end of each tensor.
///
/// Each tensor has a writer thread, which writes its blocks in order as they come (hashing
/// them on the way) and, once all are written, finishes its object and calls the pipeline's
/// `done` with it. A block holds a permit from when it is started until it is written: at
/// most [`Pipeline::in_flight`] blocks are in flight over all tensors, and at most
/// [`TENSORS`] tensors (each holding its prepared deltas, as does the next one while it is
/// prepared). A block or a writer that fails stops the blocks not yet started;
/// [`Pipeline::oldest`] gives the results in the tensors' order, so the first error in that
/// order is the one reported.
pub struct Pipeline<T> {
    permits: Receiver<()>,
    give_back: SyncSender<()>,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pending: std::collections::VecDeque<(T, Written)>,
    done: Done<T>,
}

/// Tensors a pipeline streams at once.
pub const TENSORS: usize = 2;

type Written = std::thread::JoinHandle<Result<ActionEntry, EngineError>>;
pub type Done<T> =
    std::sync::Arc<dyn Fn(&T, &ActionEntry) -> Result<(), EngineError> + Send + Sync>;
pub type Outcome<T> = Result<(T, ActionEntry), (T, EngineError)>;

impl<T: Clone + Send + 'static> Pipeline<T> {
    /// A pipeline that calls `done` on the writer's thread with each tensor's finished object
    /// (its error fails the tensor).
    pub fn new(done: Done<T>) -> Pipeline<T> {
        let (give_back, permits) = std::sync::mpsc::sync_channel(Self::in_flight());
        for _ in 0..Self::in_flight() {
            give_back
                .send(())
                .expect("the channel has room for every permit");
        }
        Pipeline {
            permits,
            give_back,
            failed: Default::default(),
            pending: Default::default(),
            done,
        }
    }

    /// Blocks in flight at most: two per thread, one computed while the other waits for its
    /// writer.
    pub fn in_flight() -> usize {
        2 * rayon::current_num_threads()
    }

    /// Streams `stream` (known by `tag`), returning once its last block has started; a
    /// pipeline holding [`TENSORS`] tensors first waits for the oldest, whose outcome it
    /// returns.
    pub fn push(&mut self, backend: Backend, stream: Box<Stream>, tag: T) -> Option<Outcome<T>> {
        let oldest = (self.pending.len() >= TENSORS)
            .then(|| self.oldest())
            .flatten();
        let Stream {
            work,
            blocks,
            mut out,
            sync,
        } = *stream;
        let count = blocks.len();
        let (send, receive) = std::sync::mpsc::channel::<(usize, Result<Vec<u8>, EngineError>)>();
        let (give_back, failed, done, mine) = (
            self.give_back.clone(),
            self.failed.clone(),
            self.done.clone(),
            tag.clone(),
        );
        let writer = std::thread::spawn(move || -> Result<ActionEntry, EngineError> {
            let mut early = std::collections::BTreeMap::new();
            let (mut next, mut error) = (0, None);
            for (index, bytes) in receive {
                if error.is_some() {
                    // Failed: what still comes is dropped, its permit given back.
                    let _ = give_back.send(());
                    continue;
                }
                early.insert(index, bytes);
                while let Some(bytes) = early.remove(&next) {
                    let _ = give_back.send(());
                    next += 1;
                    if let Err(e) = bytes.and_then(|b| Ok(out.write(&b)?)) {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        for _ in std::mem::take(&mut early) {
                            let _ = give_back.send(());
                        }
                        error = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = error {
                return Err(e);
            }
            if next < count {
                // Blocks were never started: another tensor failed first.
                return Err(EngineError::Io(std::io::Error::other(
                    "stopped when another tensor failed",
                )));
            }
            // Only a complete tensor becomes an object; a failed one's temporary file is
            // removed when its writer is dropped.
            let entry = out.finish(sync)?;
            done(&mine, &entry)?;
            Ok(entry)
        });
        for (index, (start, n)) in blocks.into_iter().enumerate() {
            if self.failed.load(std::sync::atomic::Ordering::Relaxed)
                || self.permits.recv().is_err()
            {
                break;
            }
            let (send, work) = (send.clone(), work.clone());
            rayon::spawn(move || {
                let _ = send.send((index, work.block(&backend, start, n)));
            });
        }
        self.pending.push_back((tag, writer));
        oldest
    }

    /// The outcome of the oldest tensor being streamed, once it is complete; `None` if there
    /// is none.
    pub fn oldest(&mut self) -> Option<Outcome<T>> {
        let (tag, writer) = self.pending.pop_front()?;
        Some(match writer.join().expect("a writer does not panic") {
            Ok(entry) => Ok((tag, entry)),
            Err(e) => Err((tag, e)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use modelforge_core::digest::TensorDigest;
    use modelforge_core::job::{Device, Place};
    use modelforge_core::node::{Content, DeviceClass, Weighted};
    use safetensors::Dtype;

    /// Four 4096 × 64 bf16 tensors, each with a rank-4 LoRA, in files; the second's base holds
    /// a NaN three quarters in (element `NAN_AT`), where a block other than its first starts.
    fn four_tensors(dir: &std::path::Path) -> (Vec<Fuse>, Job) {
        let (rows, cols, rank) = (4096, 64, 4);
        let mut places = Vec::new();
        let mut input = |name: String, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>| {
            let path = dir.join(&name);
            std::fs::write(&path, &bytes).unwrap();
            let content = Content::Bytes(TensorDigest::of(name.as_bytes()));
            places.push(Place {
                content: content.clone(),
                tensor: name.clone(),
                path,
                start: 0,
                len: bytes.len() as u64,
            });
            Input {
                content,
                tensor: name,
                dtype,
                shape,
            }
        };
        let f32s = |n: usize, seed: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| (((i * 7 + seed) % 13) as f32 * 0.01 - 0.06).to_le_bytes())
                .collect()
        };
        let bf16s = |n: usize, seed: usize, nan_at: Option<usize>| -> Vec<u8> {
            (0..n)
                .flat_map(|i| match nan_at == Some(i) {
                    true => half::bf16::NAN.to_le_bytes(),
                    false => {
                        half::bf16::from_f32(((i * 5 + seed) % 11) as f32 * 0.1 - 0.5).to_le_bytes()
                    }
                })
                .collect()
        };
        let tensors = (0..4)
            .map(|t| Fuse {
                origin: input(
                    format!("w{t}"),
                    Dtype::BF16,
                    vec![rows, cols],
                    bf16s(rows * cols, t, (t == 1).then_some(NAN_AT as usize)),
                ),
                origin_cast: None,
                deltas: vec![Weighted {
                    weight: 1.0,
                    scaling: 2.0,
                    delta: Delta::low_rank(
                        LoraKind::Linear,
                        input(
                            format!("a{t}"),
                            Dtype::F32,
                            vec![rank, cols],
                            f32s(rank * cols, t),
                        ),
                        input(
                            format!("b{t}"),
                            Dtype::F32,
                            vec![rows, rank],
                            f32s(rows * rank, t + 1),
                        ),
                    ),
                }],
                merge: None,
                dtype: Dtype::BF16,
                device: DeviceClass::Cpu,
            })
            .collect();
        let job = Job {
            cache: dir.join("cache"),
            device: Device::Cpu,
            // The smallest blocks: 65,536 elements, so each tensor is several.
            budget: 0,
            fsync: false,
            check_finite: true,
            nodes: Vec::new(),
            places,
            slots: Vec::new(),
        };
        (tensors, job)
    }

    const NAN_AT: u64 = 3 * 4096 * 64 / 4;

    /// Tensors streamed through one pipeline come out in the order pushed, each as it comes out
    /// alone and each `done` once; one that fails (a NaN in its base, finite results asked for)
    /// is reported in its place, the tensors after it end (computed or stopped) and none is
    /// left waiting for a permit.
    #[test]
    fn a_pipeline_gives_tensors_in_order_and_a_failure_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (tensors, job) = four_tensors(dir.path());
        let backend = Backend::select(Device::Cpu).unwrap();
        let store = Store::open(&job.cache).unwrap();
        let mut inputs = Inputs::new(&job.places);
        let alone: Vec<Result<ActionEntry, EngineError>> = tensors
            .iter()
            .map(|t| {
                fuse(
                    &backend,
                    &store,
                    &mut inputs,
                    t,
                    None,
                    &job,
                    store.object_writer().unwrap(),
                )
            })
            .collect();
        assert!(matches!(
            alone[1],
            Err(EngineError::NonFinite { index: NAN_AT, .. })
        ));

        for order in [vec![0, 2, 3], vec![0, 1, 2, 3]] {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let done: Done<usize> = Arc::new({
                let calls = calls.clone();
                move |t: &usize, _: &ActionEntry| {
                    calls.lock().unwrap().push(*t);
                    Ok(())
                }
            });
            let mut pipeline = Pipeline::new(done);
            let mut outcomes = Vec::new();
            for &t in &order {
                let out = store.object_writer().unwrap();
                let Ok(Started::Streamed(stream)) =
                    start(&backend, &store, &mut inputs, &tensors[t], None, &job, out)
                else {
                    panic!("a plain sum is streamed")
                };
                assert!(stream.blocks.len() >= 4);
                outcomes.extend(pipeline.push(backend, stream, t));
            }
            while let Some(outcome) = pipeline.oldest() {
                outcomes.push(outcome);
            }
            let tags: Vec<usize> = outcomes
                .iter()
                .map(|o| match o {
                    Ok((t, _)) | Err((t, _)) => *t,
                })
                .collect();
            assert_eq!(tags, order);
            let mut succeeded = Vec::new();
            for outcome in outcomes {
                match outcome {
                    Ok((t, entry)) => {
                        assert_eq!(entry.tensor, alone[t].as_ref().unwrap().tensor);
                        succeeded.push(t);
                    }
                    Err((1, e)) => {
                        assert!(
                            matches!(e, EngineError::NonFinite { index: NAN_AT, .. }),
                            "{e}"
                        )
                    }
                    // After the failure: stopped before all its blocks started.
                    Err((t, e)) => assert!(t > 1 && order.contains(&1), "{t}: {e}"),
                }
            }
            // Each writer calls `done` as it finishes, which need not be in order.
            let mut calls = calls.lock().unwrap().clone();
            calls.sort();
            assert_eq!(calls, succeeded);
            if !order.contains(&1) {
                assert_eq!(succeeded, order);
            }
        }
    }

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
