//! The elementwise half of a fusion on the CPU, in one pass: `round(W + Σ factor·Δ)` over a
//! block, widened, summed and rounded chunk by chunk while the chunk sits in L1. LibTorch does
//! the same in five passes over the whole block (widen, scale, add, round, copy out), each
//! through memory; this pass does the arithmetic those passes do, in their order, so the bytes
//! are the same (`backend`'s tests compare the two).
use half::f16;
use half::slice::HalfFloatSliceExt;
use safetensors::Dtype;

/// Elements per chunk: the chunk's f32 values and its bytes in and out fit in L1.
const CHUNK: usize = 1024;

/// Whether the pass reads and writes `dtype`.
pub fn supports(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

#[inline(always)]
fn width(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// Defines a public pass whose body is compiled twice, for any x86-64 and for AVX2, and run
/// as AVX2 where the CPU has it: the same operations on eight lanes at a time where the
/// portable build has four. Each lane rounds as IEEE says and nothing is contracted into a
/// fused multiply-add, so the bytes are the same either way (tested below against an element
/// by element reference, and in `backend` against LibTorch). Measured with
/// `benches/kernels.rs` on a 409 × 2048 bf16 block: the one pass of [`fuse`] from 397 to
/// 219 µs, the whole block with its rank-16 product from 783 to 662 µs; AVX-512 made no further
/// measurable difference (the pass is then bound by memory). What the body calls is
/// `#[inline(always)]`, so that it is compiled into each copy.
macro_rules! passes {
    ($($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block)*) => {$(
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { avx2($($arg),*) };
            }
            portable($($arg),*)
        }
    )*};
}

passes! {
    /// `base` (elements of `in_dtype`) plus `factor · values` if there is a delta, the product
    /// rounded to f32 and then added, as PEFT's `W + (B @ A) * scaling` does; rounded once to
    /// `out_dtype`. The delta holds as many values as `base` holds elements.
    pub fn fuse(
        base: &[u8],
        in_dtype: Dtype,
        delta: Option<(&[f32], f32)>,
        out_dtype: Dtype
    ) -> Vec<u8> {
        let (win, wout) = (width(in_dtype), width(out_dtype));
        let n = base.len() / win;
        let mut out = vec![0u8; n * wout];
        let mut acc = [0f32; CHUNK];
        for start in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - start);
            let acc = &mut acc[..len];
            widen_chunk(&base[start * win..(start + len) * win], in_dtype, acc);
            if let Some((values, factor)) = delta {
                add_chunk(acc, &values[start..start + len], factor);
            }
            narrow_chunk(acc, out_dtype, &mut out[start * wout..(start + len) * wout]);
        }
        out
    }

    /// `base` (elements of `dtype`) as f32 values in `to`, exactly: the start of a sum of
    /// several deltas, [`add`]ed one by one and then [`narrow`]ed.
    pub fn widen(base: &[u8], dtype: Dtype, to: &mut [f32]) {
        let w = width(dtype);
        for (bytes, to) in base.chunks(CHUNK * w).zip(to.chunks_mut(CHUNK)) {
            widen_chunk(bytes, dtype, to);
        }
    }

    /// `values` rounded to `dtype`, as bytes.
    pub fn narrow(values: &[f32], dtype: Dtype) -> Vec<u8> {
        let w = width(dtype);
        let mut out = vec![0u8; values.len() * w];
        for (values, to) in values.chunks(CHUNK).zip(out.chunks_mut(CHUNK * w)) {
            narrow_chunk(values, dtype, to);
        }
        out
    }

    /// `acc += factor · values`: the product rounded to f32, then the sum (never one fused
    /// multiply-add, which would round once and differ from LibTorch's `mul_` then `add_`).
    pub fn add(acc: &mut [f32], values: &[f32], factor: f32) {
        add_chunk(acc, values, factor)
    }
}

#[inline(always)]
fn add_chunk(acc: &mut [f32], values: &[f32], factor: f32) {
    for (a, v) in acc.iter_mut().zip(values) {
        *a += *v * factor;
    }
}

/// Little-endian `bytes` of `dtype` to f32, exactly (at most [`CHUNK`] of them).
#[inline(always)]
fn widen_chunk(bytes: &[u8], dtype: Dtype, to: &mut [f32]) {
    let pairs = || {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    match dtype {
        Dtype::BF16 => {
            for (to, bits) in to.iter_mut().zip(pairs()) {
                *to = f32::from_bits(u32::from(bits) << 16);
            }
        }
        Dtype::F16 => {
            let mut halves = [f16::ZERO; CHUNK];
            let halves = &mut halves[..to.len()];
            for (h, bits) in halves.iter_mut().zip(pairs()) {
                *h = f16::from_bits(bits);
            }
            halves.convert_to_f32_slice(to);
        }
        _ => {
            for (to, b) in to.iter_mut().zip(bytes.chunks_exact(4)) {
                *to = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// f32 values to little-endian bytes of `dtype`, rounded to nearest, ties to even (at most
/// [`CHUNK`] of them).
#[inline(always)]
fn narrow_chunk(values: &[f32], dtype: Dtype, to: &mut [u8]) {
    match dtype {
        Dtype::BF16 => {
            for (to, &v) in to.chunks_exact_mut(2).zip(values) {
                to.copy_from_slice(&bf16_bits(v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            let mut halves = [f16::ZERO; CHUNK];
            let halves = &mut halves[..values.len()];
            halves.convert_from_f32_slice(values);
            for (to, h) in to.chunks_exact_mut(2).zip(halves.iter()) {
                to.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        _ => {
            for (to, &v) in to.chunks_exact_mut(4).zip(values) {
                to.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// f32 to bfloat16 as LibTorch rounds it (`c10::BFloat16`'s round_to_nearest_even): the
/// upper half, with the lower half rounding it to nearest, ties to even; NaN to the quiet NaN.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7fc0;
    }
    let bits = v.to_bits();
    let bias = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(bias) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfloat16_rounds_to_nearest_even() {
        let round = |bits: u32| bf16_bits(f32::from_bits(bits));
        assert_eq!(round(0x3f80_0000), 0x3f80); // 1.0, exact
        assert_eq!(round(0x3f80_8000), 0x3f80); // a tie, to the even 1.0
        assert_eq!(round(0x3f81_8000), 0x3f82); // a tie, to the even 0x3f82
        assert_eq!(round(0x3f80_8001), 0x3f81); // just above the tie
        assert_eq!(round(0x7f7f_ffff), 0x7f80); // the largest f32 overflows to +inf
        assert_eq!(round(0xff80_0000), 0xff80); // -inf stays
        assert_eq!(round(0x0000_0001), 0x0000); // the smallest subnormal rounds to zero
        assert_eq!(bf16_bits(f32::NAN), 0x7fc0);
    }

    /// The passes (AVX2 where the CPU has it) give, element by element, the widen, add and
    /// round of one value at a time, for every dtype pair, on values that round every way:
    /// ties, subnormals, infinities, NaN, overflow.
    #[test]
    fn the_passes_compute_element_by_element() {
        let mut bits: Vec<u32> = (0..5000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) ^ (i << 7))
            .collect();
        bits.extend([
            0x3f80_8000,
            0x3f81_8000,
            0x7f7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            1,
        ]);
        bits.extend([0x7fc0_0000, 0x0080_0000, 0x3380_0000, 0x4780_0000]);
        let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let delta: Vec<f32> = values.iter().rev().map(|v| v * 0.5).collect();
        let one = |v: f32, dtype: Dtype| -> Vec<u8> {
            match dtype {
                Dtype::BF16 => bf16_bits(v).to_le_bytes().to_vec(),
                Dtype::F16 => f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            }
        };
        let back = |bytes: &[u8], dtype: Dtype| -> f32 {
            match dtype {
                Dtype::BF16 => {
                    f32::from_bits(u32::from(u16::from_le_bytes([bytes[0], bytes[1]])) << 16)
                }
                Dtype::F16 => f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32(),
                _ => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            }
        };
        for in_dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let base = narrow(&values, in_dtype);
            let w = width(in_dtype);
            for out_dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
                for delta in [None, Some((&delta[..], 0.37f32))] {
                    let expected: Vec<u8> = base
                        .chunks(w)
                        .enumerate()
                        .flat_map(|(i, b)| {
                            let v = back(b, in_dtype);
                            let v = delta.map_or(v, |(d, f)| v + d[i] * f);
                            one(v, out_dtype)
                        })
                        .collect();
                    let fused = fuse(&base, in_dtype, delta, out_dtype);
                    assert!(fused == expected, "{in_dtype:?} -> {out_dtype:?}");
                    // The same by the passes a sum of several deltas takes.
                    let mut sum = vec![0f32; values.len()];
                    widen(&base, in_dtype, &mut sum);
                    if let Some((values, factor)) = delta {
                        add(&mut sum, values, factor);
                    }
                    assert!(
                        narrow(&sum, out_dtype) == expected,
                        "{in_dtype:?} -> {out_dtype:?}"
                    );
                }
            }
        }
    }
}
