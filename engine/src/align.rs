//! `dims = "align"`: the maps between two bases' spaces and the deltas carried through them,
//! all in f32. Each step reads only what it needs (two embeddings, or one module's two base
//! weights, or one LoRA module) plus the maps it depends on, from the cache.
//!
//! The residual stream is shared by every module, so its map R is estimated once per pair of
//! bases, from the embedding rows of the tokens both vocabularies share; aligning each tensor
//! by its own SVD would leave the signs and rotations of its singular vectors ambiguous. A
//! module's inner space is seen by that module alone: its map M is the orthogonal map that best
//! takes the residual-mapped source weight onto the target's (orthogonal Procrustes).
use modelforge_core::node::{Input, Layout, Node, Side};
use modelforge_core::store::{ActionEntry, Store};
use tch::{Kind, Tensor};

use crate::backend::Backend;
use crate::error::{shape, EngineError};
use crate::inputs::{node_bytes, Inputs};

/// Where the inner map has no evidence (directions neither base weight uses), it keeps the
/// index alignment: Procrustes on P + λ·I, λ this fraction of P's largest singular value.
const IDENTITY_PRIOR: f64 = 1e-3;

/// The leading subspaces compared for the overlap figure are this fraction of the narrower
/// residual width: two unrelated subspaces of a d-dimensional space score about √(k/d).
const OVERLAP_FRACTION: usize = 8;

/// Computes one step into a new cache object.
pub fn step(
    backend: &Backend,
    store: &Store,
    inputs: &mut Inputs,
    step: &Node,
    sync: bool,
) -> Result<ActionEntry, EngineError> {
    let mut load = |input: &Input| -> Result<Tensor, EngineError> {
        let bytes = inputs.read(input)?;
        let (rows, cols) = matrix(input)?;
        Ok(backend.base(&bytes, input.dtype, rows, cols))
    };
    let (result, overlap, energy) = match step {
        Node::ResidualMap {
            source,
            target,
            pairs,
            ..
        } => {
            let (r, fit) = residual_map(backend, &load(source)?, &load(target)?, pairs)?;
            (vec![r], Some(fit), None)
        }
        Node::InnerMap {
            residual,
            side,
            source,
            target,
            layout,
            ..
        } => {
            let wt = laid_out(backend, load(target)?, layout)?;
            let (ws, wt) = (oriented(load(source)?, *side), oriented(wt, *side));
            let r = cached(backend, store, residual, ws.size()[1])?;
            let (m, overlap) = inner_map(&ws, &wt, &r)?;
            (vec![m], Some(overlap), None)
        }
        Node::AlignDelta {
            residual,
            inner,
            side,
            a,
            b,
            rank,
            ..
        } => {
            let (a, b) = (load(a)?, load(b)?);
            // In the input-side orientation, ΔW' = B'·A' with B' on the inner side.
            let (b, a) = match side {
                Side::Input => (b, a),
                Side::Output => (a.tr(), b.tr()),
            };
            let r = cached(backend, store, residual, a.size()[1])?;
            let m = cached(backend, store, inner, b.size()[0])?;
            let (b_t, a_t, energy) = aligned_delta(&b, &a, &m, &r, *rank)?;
            let (a_t, b_t) = match side {
                Side::Input => (a_t, b_t),
                Side::Output => (b_t.tr(), a_t.tr()),
            };
            (vec![a_t, b_t], None, Some(energy))
        }
        Node::FitEnergy { a, b, to } => {
            let (a, b) = (load(a)?, load(b)?);
            let kept = low_rank_norm(&fitted(&b, 0, to[0]), &fitted(&a, 1, to[1]))?;
            let source = low_rank_norm(&b, &a)?;
            (
                Vec::new(),
                None,
                Some(if source > 0.0 { kept / source } else { 0.0 }),
            )
        }
        Node::Overlap {
            side,
            source,
            target,
            layout,
        } => {
            let wt = laid_out(backend, load(target)?, layout)?;
            let (ws, wt) = (oriented(load(source)?, *side), oriented(wt, *side));
            // The identity from the source's residual width to the target's: cut or padded.
            let identity = Tensor::eye_m(wt.size()[1], ws.size()[1], (Kind::Float, ws.device()));
            let overlap = leading_overlap(&ws.matmul(&identity.tr()), &wt)?;
            (Vec::new(), Some(overlap), None)
        }
        Node::Copy { .. } | Node::Fuse(_) | Node::Refactor { .. } => {
            return Err(shape!("not an alignment node"))
        }
    };
    let mut out = store.object_writer()?;
    for t in result {
        out.write(&f32_bytes(&t))?;
    }
    let mut entry = out.finish(sync)?;
    entry.overlap = overlap;
    entry.energy = energy;
    Ok(entry)
}

/// R (d_t × d_s): the polar factor (nearest matrix with orthonormal rows or columns) of the
/// least-squares map of the shared tokens' source embedding rows X onto their target rows Y.
/// Plain Procrustes on X and Y is exact for a rotated target; the least-squares map first
/// makes it exact for a target that is also sliced to fewer dimensions, whatever X's spread.
/// Returns R and the relative residual ‖X·Rᵀ − Y‖ / ‖Y‖.
fn residual_map(
    backend: &Backend,
    source: &Tensor,
    target: &Tensor,
    pairs: &[[u32; 2]],
) -> Result<(Tensor, f64), EngineError> {
    let index = |column: usize| {
        let ids: Vec<i64> = pairs.iter().map(|p| p[column] as i64).collect();
        Tensor::from_slice(&ids).to_device(backend.device)
    };
    let x = source.index_select(0, &index(0));
    let y = target.index_select(0, &index(1));
    let driver = if backend.device.is_cuda() {
        "gels"
    } else {
        "gelsd"
    };
    let (solution, _, _, _) = x.f_linalg_lstsq(&y, None, driver)?;
    let r = polar(&solution.tr())?;
    let fit = norm(&(x.matmul(&r.tr()) - &y)) / norm(&y).max(f64::MIN_POSITIVE);
    Ok((r, fit))
}

/// M (inner_t × inner_s) = argmin over orthonormal M of ‖M·W_s·Rᵀ − W_t‖, both weights in the
/// input-side orientation (inner × residual); and the mean cosine of the principal angles
/// between the leading right singular subspaces (the residual side) of W_s·Rᵀ and W_t.
fn inner_map(ws: &Tensor, wt: &Tensor, r: &Tensor) -> Result<(Tensor, f64), EngineError> {
    let mapped = ws.matmul(&r.tr());
    let p = wt.matmul(&mapped.tr());
    let (inner_t, inner_s) = (p.size()[0], p.size()[1]);
    let largest = p.f_svd(false, false)?.1.max().double_value(&[]);
    let prior =
        Tensor::eye_m(inner_t, inner_s, (Kind::Float, p.device())) * (IDENTITY_PRIOR * largest);
    let m = polar(&(p + prior))?;
    Ok((m, leading_overlap(&mapped, wt)?))
}

/// The mean cosine of the principal angles between the leading right singular subspaces (the
/// residual side, in the input-side orientation) of two weights of equal residual width, each
/// `1/OVERLAP_FRACTION` of that width: 1 when they coincide, about √(1/OVERLAP_FRACTION) for
/// unrelated ones.
fn leading_overlap(mapped: &Tensor, wt: &Tensor) -> Result<f64, EngineError> {
    let width = mapped.size()[1].min(wt.size()[1]) as usize;
    let k = (width / OVERLAP_FRACTION).max(1) as i64;
    let leading = |w: &Tensor| -> Result<Tensor, EngineError> {
        let (_, _, v) = w.f_svd(true, true)?;
        Ok(v.narrow(1, 0, k.min(v.size()[1])))
    };
    let cosines = leading(mapped)?
        .tr()
        .matmul(&leading(wt)?)
        .f_svd(false, false)?
        .1;
    Ok(cosines.mean(Kind::Double).double_value(&[]))
}

/// The module's weight as the target tensor holds it: transposed first when the tensor is
/// stored (in × out), then only the module's rows of a fused tensor.
fn laid_out(backend: &Backend, wt: Tensor, layout: &Layout) -> Result<Tensor, EngineError> {
    let wt = if layout.transposed { wt.tr() } else { wt };
    Ok(match &layout.rows {
        Some(rows) => {
            let ids: Vec<i64> = rows.iter().map(|&r| i64::from(r)).collect();
            let ids = Tensor::from_slice(&ids).to_device(backend.device);
            wt.f_index_select(0, &ids)?
        }
        None => wt,
    })
}

/// M·B·A·Rᵀ re-factored by a truncated SVD to `rank`: returns (B_t, A_t), zero-padded to
/// `rank` when the delta has fewer directions, and ‖ΔW_t‖_F / ‖ΔW_s‖_F. The SVD is of the
/// small core of the two factors' QR decompositions, never of a dense delta.
fn aligned_delta(
    b: &Tensor,
    a: &Tensor,
    m: &Tensor,
    r: &Tensor,
    rank: usize,
) -> Result<(Tensor, Tensor, f64), EngineError> {
    let (b_t, a_t) = (m.matmul(b), a.matmul(&r.tr()));
    let (qb, rb) = Tensor::f_linalg_qr(&b_t, "reduced")?;
    let (qa, ra) = Tensor::f_linalg_qr(&a_t.tr(), "reduced")?;
    let (u, s, v) = rb.matmul(&ra.tr()).f_svd(true, true)?;
    let k = (rank as i64).min(s.size()[0]);
    let kept = s.narrow(0, 0, k);
    let b_new = qb.matmul(&u.narrow(1, 0, k)) * kept.unsqueeze(0);
    let a_new = qa.matmul(&v.narrow(1, 0, k)).tr();
    let source = low_rank_norm(b, a)?;
    let energy = if source > 0.0 {
        norm(&kept) / source
    } else {
        0.0
    };
    // Fewer directions than `rank`: zero columns of B and rows of A.
    let (b_new, a_new) = (fitted(&b_new, 1, rank), fitted(&a_new, 0, rank));
    Ok((b_new, a_new, energy))
}

/// `t` cut to `len` along `dim`, or zero-padded to it.
fn fitted(t: &Tensor, dim: i64, len: usize) -> Tensor {
    let (have, len) = (t.size()[dim as usize], len as i64);
    if len <= have {
        return t.narrow(dim, 0, len);
    }
    let mut shape = t.size();
    shape[dim as usize] = len - have;
    Tensor::cat(
        &[
            t.shallow_clone(),
            Tensor::zeros(shape, (t.kind(), t.device())),
        ],
        dim,
    )
}

/// ‖B·A‖_F without forming B·A.
fn low_rank_norm(b: &Tensor, a: &Tensor) -> Result<f64, EngineError> {
    let (_, rb) = Tensor::f_linalg_qr(b, "reduced")?;
    let (_, ra) = Tensor::f_linalg_qr(&a.tr(), "reduced")?;
    Ok(norm(&rb.matmul(&ra.tr())))
}

/// U·Vᵀ of A's thin SVD: the matrix with orthonormal rows or columns nearest to A.
fn polar(a: &Tensor) -> Result<Tensor, EngineError> {
    let (u, _, v) = a.f_svd(true, true)?;
    Ok(u.matmul(&v.tr()))
}

fn norm(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

/// A weight in the input-side orientation: (inner × residual).
fn oriented(w: Tensor, side: Side) -> Tensor {
    match side {
        Side::Input => w,
        Side::Output => w.tr(),
    }
}

/// A map computed by an earlier step, `cols` columns wide.
fn cached(
    backend: &Backend,
    store: &Store,
    key: &modelforge_core::digest::NodeKey,
    cols: i64,
) -> Result<Tensor, EngineError> {
    let bytes = node_bytes(store, key)?;
    let numel = (bytes.len() / 4) as i64;
    if cols <= 0 || numel % cols != 0 {
        return Err(shape!("the alignment map {} has the wrong size", key.hex()));
    }
    Ok(backend.base(
        &bytes,
        safetensors::Dtype::F32,
        (numel / cols) as usize,
        cols as usize,
    ))
}

fn matrix(input: &Input) -> Result<(usize, usize), EngineError> {
    match input.shape[..] {
        [rows, cols] => Ok((rows, cols)),
        _ => Err(shape!(
            "`{}` should be a matrix, and is shaped {:?}",
            input.tensor,
            input.shape
        )),
    }
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    let t = t
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu)
        .contiguous();
    let mut bytes = vec![0u8; t.numel() * 4];
    t.copy_data_u8(&mut bytes, t.numel());
    bytes
}
