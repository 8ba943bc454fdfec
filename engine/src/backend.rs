//! LibTorch through tch: device selection and the fusion arithmetic. Everything is computed in
//! f32 and rounded to the output dtype once.
use crate::error::EngineError;
use modelforge_core::node::{Merge, Refactor, SignElection, Sparsify, Truncation};

use crate::elementwise;
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

/// The device tensors are computed on.
#[derive(Clone, Copy, Debug)]
pub struct Backend {
    pub device: Device,
}

impl Backend {
    /// The device named `cpu` or `cuda:N`, or why it cannot be used.
    pub fn select(wanted: modelforge_core::job::Device) -> Result<Backend, EngineError> {
        use modelforge_core::job::Device as Wanted;
        // rayon spreads blocks over the cores; LibTorch's own pool would only oversubscribe them.
        tch::set_num_threads(1);
        let device = match wanted {
            Wanted::Cpu => Device::Cpu,
            Wanted::Cuda(n) => {
                load_cuda()?;
                if !(tch::Cuda::is_available() && n < tch::Cuda::device_count() as usize) {
                    return Err(EngineError::Device(format!(
                        "the device `{wanted}` is not available to this LibTorch; set `device = \"cpu\"` in the recipe's [build]"
                    )));
                }
                Device::Cuda(n)
            }
        };
        Ok(Backend { device })
    }

    /// Converts a tensor's bytes to f32 values (exactly: every supported dtype widens to f32
    /// losslessly, except f64, which is rounded).
    pub fn f32_values(&self, bytes: &[u8], dtype: Dtype, shape: &[usize]) -> Vec<f32> {
        let t = tensor(bytes, dtype, shape).to_kind(Kind::Float);
        let mut out = vec![0f32; t.numel()];
        let n = out.len();
        t.copy_data(&mut out, n);
        out
    }

    /// Rounds `bytes` of `dtype` to `to`, as LibTorch's `to` does.
    pub fn cast(&self, bytes: &[u8], dtype: Dtype, to: Dtype) -> Vec<u8> {
        let n = bytes.len() / (dtype.bitsize() / 8);
        Rounded::new(tensor(bytes, dtype, &[n]).to_kind(kind(to)), to).bytes
    }

    /// Transposes a row-major (rows × cols) f32 matrix.
    pub fn transpose(&self, values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let t = Tensor::from_slice(values)
            .view([rows as i64, cols as i64])
            .t_()
            .contiguous();
        let mut out = vec![0f32; values.len()];
        let n = out.len();
        t.copy_data(&mut out, n);
        out
    }

    /// Fuses one block of rows: `round(W + Σ factor·left·right)` where W is `base` (in
    /// `in_dtype`), each low-rank delta is `left` (n × r) times `right` (r × cols), and each
    /// dense delta is already (n × cols). Returns the block's bytes in `out_dtype`.
    pub fn fuse_block(
        &self,
        base: &[u8],
        in_dtype: Dtype,
        rows: usize,
        cols: usize,
        deltas: &[BlockDelta<'_>],
        out_dtype: Dtype,
    ) -> Rounded {
        let in_place = matches!(self.device, Device::Cpu)
            && elementwise::supports(in_dtype)
            && elementwise::supports(out_dtype)
            && deltas.iter().all(|d| {
                d.magnitude.is_none()
                    && !matches!(d.values, BlockValues::Model(_) | BlockValues::Tokens(_))
            });
        if in_place {
            return self.fuse_block_cpu(base, in_dtype, rows, cols, deltas, out_dtype);
        }
        self.fuse_block_torch(base, in_dtype, rows, cols, deltas, out_dtype)
    }

    /// [`Backend::fuse_block`] on the CPU: LibTorch computes each low-rank product into a
    /// buffer the worker keeps, and [`elementwise`] widens, sums and rounds: in one pass for
    /// one delta; for several, into an f32 sum delta by delta, so that a block holds at most
    /// two f32 buffers whatever the number of deltas.
    fn fuse_block_cpu(
        &self,
        base: &[u8],
        in_dtype: Dtype,
        rows: usize,
        cols: usize,
        deltas: &[BlockDelta<'_>],
        out_dtype: Dtype,
    ) -> Rounded {
        let bytes = BUFFERS.with_borrow_mut(|(product, sum)| match deltas {
            [] => elementwise::fuse(base, in_dtype, None, out_dtype),
            [delta] => {
                let delta = delta_values(delta, product, rows, cols);
                elementwise::fuse(base, in_dtype, Some(delta), out_dtype)
            }
            _ => {
                let sum = sum.slice(rows * cols);
                elementwise::widen(base, in_dtype, sum);
                for delta in deltas {
                    let (values, factor) = delta_values(delta, product, rows, cols);
                    elementwise::add(sum, values, factor);
                }
                elementwise::narrow(sum, out_dtype)
            }
        });
        let non_finite = first_non_finite(&bytes, out_dtype);
        Rounded { bytes, non_finite }
    }

    /// [`Backend::fuse_block`] as LibTorch operations, on any device.
    fn fuse_block_torch(
        &self,
        base: &[u8],
        in_dtype: Dtype,
        rows: usize,
        cols: usize,
        deltas: &[BlockDelta<'_>],
        out_dtype: Dtype,
    ) -> Rounded {
        let w = self.base(base, in_dtype, rows, cols);
        // A full model's delta and DoRA's norm are measured from the unchanged base, so keep
        // it apart.
        let from_base = deltas
            .iter()
            .any(|d| matches!(d.values, BlockValues::Model(_)) || d.magnitude.is_some());
        let mut acc = if from_base {
            w.copy()
        } else {
            w.shallow_clone()
        };
        for delta in deltas {
            if let BlockValues::Tokens(rows) = &delta.values {
                for &(row, values) in rows {
                    let new = Tensor::from_slice(values)
                        .view([1, cols as i64])
                        .to_device(self.device);
                    let mut old = acc.narrow(0, row as i64, 1);
                    if delta.factor == 1.0 {
                        old.copy_(&new);
                    } else {
                        let step = (&new - &old) * delta.factor;
                        let _ = old.g_add_(&step);
                    }
                }
                continue;
            }
            let product = self.product(delta, rows, cols, &w);
            // In place, to keep one f32 temporary per block; the same operations, in the same order,
            // as PEFT's `W + (B @ A) * scaling`.
            let mut product = product;
            let _ = product.g_mul_scalar_(delta.factor);
            match delta.magnitude {
                None => {
                    let _ = acc.g_add_(&product);
                }
                Some(Magnitude {
                    values: magnitude,
                    columns,
                    mask,
                }) => {
                    // PEFT's DoRA merge (`DoraLinearVariant.merge_safe`): the norm of each output
                    // feature of W + ΔW, W the weight before any adapter; then
                    // (m / norm) · (current + ΔW). Stored transposed (GPT-2's Conv1D), output
                    // features are columns, and the norm is taken through a transposed view,
                    // as PEFT does.
                    let sum = &w + &product;
                    let norm = if columns {
                        sum.tr()
                            .linalg_norm(2.0, [1i64].as_slice(), false, None::<Kind>)
                    } else {
                        sum.linalg_norm(2.0, [1i64].as_slice(), false, None::<Kind>)
                    };
                    let magnitude = Tensor::from_slice(magnitude).to_device(self.device);
                    let mut factor = magnitude / norm;
                    if let Some(mask) = mask {
                        let mask = Tensor::from_slice(mask).to_device(self.device);
                        factor = factor.where_self(&mask, &factor.ones_like());
                    }
                    let factor = if columns {
                        factor.view([1, -1])
                    } else {
                        factor.view([-1, 1])
                    };
                    let _ = acc.g_add_(&product);
                    acc = factor * acc;
                }
            }
        }
        Rounded::new(acc.to_kind(kind(out_dtype)), out_dtype)
    }
}

std::thread_local! {
    /// Each worker's buffers for a block's low-rank product and for a sum of several deltas,
    /// kept from block to block.
    static BUFFERS: std::cell::RefCell<(Aligned, Aligned)> =
        const { std::cell::RefCell::new((Aligned(Vec::new()), Aligned(Vec::new()))) };
}

/// A growable f32 buffer whose values start on a 64-byte boundary, as LibTorch's own
/// allocations do: MKL's results can depend on the alignment of what it writes.
#[derive(Default)]
struct Aligned(Vec<f32>);

impl Aligned {
    fn slice(&mut self, n: usize) -> &mut [f32] {
        const LANES: usize = 64 / std::mem::size_of::<f32>();
        if self.0.len() < n + LANES {
            self.0 = vec![0f32; n + LANES];
        }
        let skip = self.0.as_ptr().align_offset(64);
        &mut self.0[skip..skip + n]
    }
}

/// One delta's values for a block of `rows` × `cols` and its factor; a low-rank product is
/// computed into `product`.
fn delta_values<'a>(
    delta: &BlockDelta<'a>,
    product: &'a mut Aligned,
    rows: usize,
    cols: usize,
) -> (&'a [f32], f32) {
    let values = match delta.values {
        BlockValues::LowRank { left, right, rank } => {
            product_into(product, left, right, rows, rank, cols)
        }
        BlockValues::Dense(values) => values,
        BlockValues::Model(_) | BlockValues::Tokens(_) => {
            unreachable!("fuse_block keeps full models and tokens on LibTorch")
        }
    };
    // LibTorch's `mul_` by a double scalar multiplies in the tensor's f32.
    (values, delta.factor as f32)
}

/// `left` (rows × rank) times `right` (rank × cols), by LibTorch's `mm`, into `buffer`.
fn product_into<'a>(
    buffer: &'a mut Aligned,
    left: &[f32],
    right: &[f32],
    rows: usize,
    rank: usize,
    cols: usize,
) -> &'a [f32] {
    let out = buffer.slice(rows * cols);
    // The factors are copied into LibTorch's (aligned) memory, as `from_slice` always did:
    // they are small, and MKL then sees the same layout as before.
    let left = Tensor::from_slice(left).view([rows as i64, rank as i64]);
    let right = Tensor::from_slice(right).view([rank as i64, cols as i64]);
    // SAFETY: the view covers `out`'s rows × cols f32 values, which `mm_out` overwrites
    // entirely, and it is dropped before `out` is used again.
    unsafe {
        let view = Tensor::from_blob(
            out.as_mut_ptr() as *const u8,
            &[rows as i64, cols as i64],
            &[],
            Kind::Float,
            Device::Cpu,
        );
        let _ = left.mm_out(&view, &right);
    }
    out
}

/// Loads LibTorch's CUDA half. Nothing in the engine calls into `libtorch_cuda.so` directly, so
/// the linker leaves it out and the same binary runs with a CPU-only LibTorch; loading it
/// registers its CUDA kernels and hooks with LibTorch, after which `tch::Cuda` sees the GPUs.
/// It is found through the engine's run path to LibTorch, or LD_LIBRARY_PATH.
fn load_cuda() -> Result<(), EngineError> {
    let name = c"libtorch_cuda.so";
    // SAFETY: a valid NUL-terminated name; the handle is kept open for the process's life.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns a thread-local message or null.
    let reason = unsafe {
        let message = libc::dlerror();
        if message.is_null() {
            "unknown error".to_owned()
        } else {
            std::ffi::CStr::from_ptr(message)
                .to_string_lossy()
                .into_owned()
        }
    };
    Err(EngineError::Device(format!(
        "this LibTorch has no CUDA support ({reason}); set `device = \"cpu\"` in the recipe's [build], or point LD_LIBRARY_PATH at a CUDA build of LibTorch 2.11"
    )))
}

/// A result in its output dtype, and whether it is finite.
pub struct Rounded {
    pub bytes: Vec<u8>,
    /// The first element that is NaN or infinite, and which of them it is.
    pub non_finite: Option<(u64, &'static str)>,
}

impl Rounded {
    /// `out` rounded to `dtype` straight into a new buffer (one pass: the conversion writes
    /// the bytes where they are returned).
    fn new(out: Tensor, dtype: Dtype) -> Rounded {
        let numel = out.numel();
        let len = numel * dtype.bitsize() / 8;
        let mut bytes: Vec<u8> = Vec::with_capacity(len);
        // SAFETY: the tensor views the buffer's `len` bytes of capacity, which LibTorch fills
        // entirely (a contiguous destination of `numel` elements) before the view is dropped
        // and the length set.
        unsafe {
            let mut view = Tensor::from_blob(
                bytes.as_mut_ptr(),
                &[numel as i64],
                &[],
                kind(dtype),
                Device::Cpu,
            );
            view.copy_(&out.reshape([-1]));
            drop(view);
            bytes.set_len(len);
        }
        let non_finite = first_non_finite(&bytes, dtype);
        Rounded { bytes, non_finite }
    }
}

/// The first element of little-endian floats in `bytes` that is NaN or infinite, if any: a
/// scan of the exponent bits at memory speed (LibTorch's `isfinite` took 15% of a build).
fn first_non_finite(bytes: &[u8], dtype: Dtype) -> Option<(u64, &'static str)> {
    match dtype {
        Dtype::F64 => scan::<8>(bytes, 0x7ff0 << 48, (1 << 52) - 1),
        Dtype::F32 => scan::<4>(bytes, 0x7f80_0000, 0x007f_ffff),
        Dtype::F16 => scan::<2>(bytes, 0x7c00, 0x03ff),
        Dtype::BF16 => scan::<2>(bytes, 0x7f80, 0x007f),
        _ => None,
    }
}

/// `first_non_finite` for `W`-byte floats with these exponent and mantissa masks. Blocks are
/// checked without early exit, which the compiler vectorises; only a block holding a
/// non-finite value is searched element by element.
fn scan<const W: usize>(bytes: &[u8], exponent: u64, mantissa: u64) -> Option<(u64, &'static str)> {
    const BLOCK: usize = 4096;
    let bits = |chunk: &[u8]| {
        let mut word = [0u8; 8];
        word[..W].copy_from_slice(chunk);
        u64::from_le_bytes(word)
    };
    let bad = |chunk: &[u8]| bits(chunk) & exponent == exponent;
    for (n, block) in bytes.chunks(BLOCK * W).enumerate() {
        if !block.chunks_exact(W).fold(false, |any, c| any | bad(c)) {
            continue;
        }
        let at = block.chunks_exact(W).position(bad)?;
        let value = bits(&block[at * W..(at + 1) * W]);
        let what = if value & mantissa != 0 {
            "NaN"
        } else if value >> (8 * W - 1) != 0 {
            "-inf"
        } else {
            "+inf"
        };
        return Some(((n * BLOCK + at) as u64, what));
    }
    None
}

impl Backend {
    /// One delta as a (rows × cols) f32 tensor: `left·right`, the dense values, or a full
    /// model's values minus the base's `w`.
    fn product(&self, delta: &BlockDelta<'_>, rows: usize, cols: usize, w: &Tensor) -> Tensor {
        match delta.values {
            BlockValues::LowRank { left, right, rank } => {
                let left = Tensor::from_slice(left)
                    .view([rows as i64, rank as i64])
                    .to_device(self.device);
                let right = Tensor::from_slice(right)
                    .view([rank as i64, cols as i64])
                    .to_device(self.device);
                left.matmul(&right)
            }
            BlockValues::Dense(values) => Tensor::from_slice(values)
                .view([rows as i64, cols as i64])
                .to_device(self.device),
            BlockValues::Model(values) => {
                Tensor::from_slice(values)
                    .view([rows as i64, cols as i64])
                    .to_device(self.device)
                    - w
            }
            BlockValues::Tokens(_) => unreachable!("tokens replace rows; they have no product"),
        }
    }

    /// The combined delta of whole tensors. Without `merge`, Σ factor · product; with it, a
    /// task-arithmetic merge as PEFT's `merge_utils` computes it: each task (factor · product,
    /// the factor being the adapter's scaling) is pruned, signs are elected on the pruned tasks,
    /// then tasks are weighted and summed, or averaged over the entries that agree.
    pub fn merged_delta(
        &self,
        w: &Tensor,
        rows: usize,
        cols: usize,
        tasks: &[BlockDelta<'_>],
        weights: &[f64],
        merge: Option<&Merge>,
    ) -> Tensor {
        let shape = [rows as i64, cols as i64];
        let Some(merge) = merge else {
            let mut sum = Tensor::zeros(shape, (Kind::Float, self.device));
            for task in tasks {
                let mut product = self.product(task, rows, cols, w);
                let _ = product.g_mul_scalar_(task.factor);
                let _ = sum.g_add_(&product);
            }
            return sum;
        };
        // The generator is seeded per tensor, so the masks do not depend on which tensors
        // were computed before.
        tch::manual_seed(merge.seed);
        let pruned: Vec<Tensor> = tasks
            .iter()
            .map(|task| {
                let values = self.product(task, rows, cols, w) * task.factor;
                match merge.sparsify {
                    None => values,
                    Some(Sparsify::Magnitude) => {
                        let flat = values.reshape([-1]);
                        let k = (merge.density * flat.numel() as f64) as i64;
                        let (_, kept) = flat.abs().topk(k, -1, true, true);
                        let mask = flat.zeros_like().index_fill(0, &kept, 1.0);
                        &values * mask.reshape(shape)
                    }
                    Some(Sparsify::Random) => {
                        let mask = values.full_like(merge.density).bernoulli();
                        (&values * mask) / merge.density
                    }
                }
            })
            .collect();
        let stacked = Tensor::stack(&pruned, 0);
        let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let weights = Tensor::from_slice(&weights)
            .view([-1, 1, 1])
            .to_device(self.device);
        let weighted = &stacked * &weights;
        match merge.elect_sign {
            None => weighted.sum_dim_intlist(0, false, Kind::Float),
            Some(election) => {
                let sign = stacked.sign();
                let votes = match election {
                    SignElection::Total => stacked.sum_dim_intlist(0, false, Kind::Float),
                    SignElection::Frequency => sign.sum_dim_intlist(0, false, Kind::Float),
                };
                let majority = votes.ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0;
                let agrees = sign.eq_tensor(&majority);
                let kept = (&weighted * &agrees).sum_dim_intlist(0, false, Kind::Float);
                let count = agrees.sum_dim_intlist(0, false, Kind::Float).clamp_min(1.0);
                kept / count
            }
        }
    }

    /// Factors the combined delta (transposed if asked) by a truncated SVD: returns A's then
    /// B's f32 bytes, with B·A ≈ the delta, and the fraction of its energy kept.
    pub fn refactor(&self, delta: &Tensor, refactor: &Refactor) -> (Rounded, f64) {
        let m = if refactor.transpose {
            delta.t_copy()
        } else {
            delta.shallow_clone()
        };
        let (u, s, v) = m.to_device(Device::Cpu).svd(true, true);
        let energies = &s * &s;
        let total = energies.sum(Kind::Double).double_value(&[]);
        let cumulative: Vec<f64> =
            Vec::<f64>::try_from(energies.to_kind(Kind::Double).cumsum(0, Kind::Double))
                .unwrap_or_default();
        let full = cumulative.len().max(1);
        let k = match refactor.truncation {
            Truncation::Rank(k) => k.clamp(1, full),
            Truncation::Energy(e) => cumulative
                .iter()
                .position(|&c| c >= e * total)
                .map_or(full, |i| i + 1),
        };
        let kept = if total > 0.0 {
            cumulative.get(k - 1).copied().unwrap_or(total) / total
        } else {
            1.0
        };
        let k = k as i64;
        let a = v.narrow(1, 0, k).t_copy().contiguous();
        let b = (u.narrow(1, 0, k) * s.narrow(0, 0, k).unsqueeze(0)).contiguous();
        // A then B, one object.
        let both = Tensor::cat(&[a.flatten(0, -1), b.flatten(0, -1)], 0);
        (Rounded::new(both, Dtype::F32), kept)
    }

    /// A base tensor (or block of rows) in f32, on the device, converted from `bytes` where
    /// they are (no intermediate copy).
    pub fn base(&self, bytes: &[u8], dtype: Dtype, rows: usize, cols: usize) -> Tensor {
        let shape = [rows as i64, cols as i64];
        // SAFETY: the view reads `bytes` (rows × cols elements of `dtype`, as the callers'
        // slices hold) and is dropped before this returns; what is returned is a new tensor,
        // never the view, since values are written into it later.
        unsafe {
            let view = Tensor::from_blob(bytes.as_ptr(), &shape, &[], kind(dtype), Device::Cpu);
            match (self.device, kind(dtype)) {
                (Device::Cpu, Kind::Float) => view.copy(),
                (Device::Cpu, _) => view.to_kind(Kind::Float),
                (device, _) => view.to_device(device).to_kind(Kind::Float),
            }
        }
    }

    /// `round(w + delta)` in `out_dtype`, as bytes.
    pub fn add_and_round(&self, w: Tensor, delta: Tensor, out_dtype: Dtype) -> Rounded {
        Rounded::new((w + delta).to_kind(kind(out_dtype)), out_dtype)
    }
}

/// One delta's share of a block of rows.
pub struct BlockDelta<'a> {
    pub factor: f64,
    pub values: BlockValues<'a>,
    /// DoRA: once this delta is added, the sum is scaled by m / ‖W + Δ‖ along the output
    /// features, W being the block's starting value.
    pub magnitude: Option<Magnitude<'a>>,
}

/// DoRA's magnitude for a block: one value per row, or, for a whole tensor stored transposed,
/// per column.
#[derive(Clone, Copy)]
pub struct Magnitude<'a> {
    pub values: &'a [f32],
    pub columns: bool,
    /// In a fused tensor, the rows (columns) that are the module's; the others are not scaled.
    pub mask: Option<&'a [bool]>,
}

pub enum BlockValues<'a> {
    LowRank {
        left: &'a [f32],
        right: &'a [f32],
        rank: usize,
    },
    Dense(&'a [f32]),
    /// A full model's values: the delta is these minus the base's.
    Model(&'a [f32]),
    /// Trainable tokens: (row within the block, its new values); weighted, a row moves the
    /// factor's fraction of the way to them.
    Tokens(Vec<(usize, &'a [f32])>),
}

fn tensor(bytes: &[u8], dtype: Dtype, shape: &[usize]) -> Tensor {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(bytes, &shape, kind(dtype))
}

/// The LibTorch kind of a floating safetensors dtype (the plan admits no others here).
pub fn kind(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        _ => Kind::Float,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, scale: f64, seed: i64) -> Vec<f32> {
        tch::manual_seed(seed);
        let t = Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * scale;
        Vec::<f32>::try_from(t).unwrap()
    }

    fn to_bytes(values: &[f32], dtype: Dtype) -> Vec<u8> {
        let t = Tensor::from_slice(values).to_kind(kind(dtype));
        let mut out = vec![0u8; values.len() * dtype.bitsize() / 8];
        t.copy_data_u8(&mut out, values.len());
        out
    }

    fn to_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
        let n = bytes.len() * 8 / dtype.bitsize();
        Vec::<f32>::try_from(tensor(bytes, dtype, &[n]).to_kind(Kind::Float)).unwrap()
    }

    #[test]
    fn the_cpu_pass_gives_libtorchs_bytes() {
        let backend = Backend::select(modelforge_core::job::Device::Cpu).unwrap();
        // Sizes that leave partial chunks; values around every rounding boundary's scale,
        // with infinities, the largest f16 and bf16-overflowing f32s, subnormals and zeros.
        let (rows, cols, rank) = (37, 301, 5);
        let n = rows * cols;
        let mut base = random(n, 0.05, 1);
        let specials = [
            f32::INFINITY,
            f32::NEG_INFINITY,
            65504.0,
            3.0e38,
            -3.3e38,
            1.0e-40,
            0.0,
            -0.0,
            1.0 + f32::EPSILON * 64.0,
        ];
        for (i, v) in specials.iter().enumerate() {
            base[i * 97] = *v;
        }
        let left = random(rows * rank, 0.3, 2);
        let right = random(rank * cols, 0.3, 3);
        let left2 = random(rows * 2, 50.0, 4);
        let right2 = random(2 * cols, 50.0, 5);
        let dense = random(n, 0.01, 6);
        let low = |left: &'static [f32], right: &'static [f32], rank, factor| BlockDelta {
            factor,
            values: BlockValues::LowRank { left, right, rank },
            magnitude: None,
        };
        let leak = |v: Vec<f32>| -> &'static [f32] { Vec::leak(v) };
        let (left, right, left2, right2, dense) = (
            leak(left),
            leak(right),
            leak(left2),
            leak(right2),
            leak(dense),
        );
        let stacks: Vec<Vec<BlockDelta<'static>>> = vec![
            vec![],
            vec![low(left, right, rank, 1.6)],
            vec![
                low(left, right, rank, 0.8 * 2.0),
                BlockDelta {
                    factor: -0.3,
                    values: BlockValues::Dense(dense),
                    magnitude: None,
                },
                low(left2, right2, 2, 1e3),
            ],
        ];
        let dtypes = [Dtype::BF16, Dtype::F16, Dtype::F32];
        for (in_dtype, out_dtype) in dtypes.iter().flat_map(|a| dtypes.map(|b| (*a, b))) {
            let bytes = to_bytes(&base, in_dtype);
            for deltas in &stacks {
                let ours = backend.fuse_block(&bytes, in_dtype, rows, cols, deltas, out_dtype);
                let torch =
                    backend.fuse_block_torch(&bytes, in_dtype, rows, cols, deltas, out_dtype);
                let what = format!("{in_dtype:?} -> {out_dtype:?}, {} deltas", deltas.len());
                let (a, b) = (
                    to_f32(&ours.bytes, out_dtype),
                    to_f32(&torch.bytes, out_dtype),
                );
                let differ = a
                    .iter()
                    .zip(&b)
                    .position(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()));
                assert_eq!(differ, None, "{what}");
                assert_eq!(ours.bytes.len(), torch.bytes.len(), "{what}");
                assert_eq!(ours.non_finite, torch.non_finite, "{what}");
            }
        }
    }

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        let cases: [(Dtype, Vec<u8>); 4] = [
            (
                Dtype::F32,
                [1.0f32, f32::NEG_INFINITY]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                Dtype::F64,
                [2.0f64, 3.0, f64::NAN]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            // f16: 1.0, 65504 (the largest finite), +inf
            (
                Dtype::F16,
                [0x3c00u16, 0x7bff, 0x7c00]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            // bf16: 1.0, NaN
            (
                Dtype::BF16,
                [0x3f80u16, 0x7fc0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ];
        let found: Vec<_> = cases
            .iter()
            .map(|(dtype, bytes)| first_non_finite(bytes, *dtype))
            .collect();
        assert_eq!(
            found,
            [
                Some((1, "-inf")),
                Some((2, "NaN")),
                Some((2, "+inf")),
                Some((1, "NaN"))
            ]
        );
        let finite: Vec<u8> = [0.5f32, -3.0e38]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(&finite, Dtype::F32), None);
    }
}
