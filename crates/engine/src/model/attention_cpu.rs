//! Attention on the CPU straight from the paged K/V pools.
//!
//! Each (query row, head) is computed by the same sequential code whatever else is in the
//! batch or however the prompt was chunked, so a sequence's numbers never depend on the
//! batch (batch invariance: the same greedy tokens alone or with 63 others, with or without a
//! cached prefix). It also avoids gathering each sequence's K/V into contiguous copies.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::batch::BatchMeta;

/// Whether the fast path applies: F32 tensors on the CPU.
pub fn applies(q: &Tensor, k_pool: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::F32 && k_pool.dtype() == DType::F32 && k_pool.is_contiguous()
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight fixed lanes: vectorizes, and the summation order depends only on the length.
    // (Zipped chunks, not indices: without bounds checks the lanes become SIMD registers.)
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca.remainder().iter().zip(cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in tail {
        s += x * y;
    }
    s
}

/// `q: [rows, heads, head_dim]` (F32) against each sequence's cached positions; returns
/// `[rows, heads * head_dim]`.
pub(crate) fn attend(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    meta: &BatchMeta,
    num_kv_heads: usize,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let (rows, nh, hd) = q.dims3()?;
    let groups = nh / num_kv_heads;
    let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (ks, kl) = k_pool.storage_and_layout();
    let (vs, vl) = v_pool.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
        candle_core::bail!("CPU attention needs CPU tensors");
    };
    let k = &kc.as_slice::<f32>()?[kl.start_offset()..];
    let v = &vc.as_slice::<f32>()?[vl.start_offset()..];
    let slot_stride = num_kv_heads * hd;
    // Which sequence and position each row belongs to.
    let mut row_seq = vec![(0usize, 0usize); rows];
    for (si, s) in meta.seqs.iter().enumerate() {
        for i in 0..s.n {
            row_seq[s.row + i] = (si, s.start + i);
        }
    }
    let mut out = vec![0f32; rows * nh * hd];
    out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores, (idx, o)| {
        let (row, h) = (idx / nh, idx % nh);
        let (si, pos) = row_seq[row];
        let slots = &meta.seqs[si].slots;
        let kvh = h / groups;
        let qv = &q[(row * nh + h) * hd..(row * nh + h + 1) * hd];
        // Causal: this query sees positions 0..=pos.
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for &slot in &slots[..=pos] {
            let off = slot as usize * slot_stride + kvh * hd;
            let s = dot(qv, &k[off..off + hd]) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (&w, &slot) in scores.iter().zip(&slots[..=pos]) {
            let off = slot as usize * slot_stride + kvh * hd;
            let w = w * inv;
            for (o, &x) in o.iter_mut().zip(&v[off..off + hd]) {
                *o += w * x;
            }
        }
    });
    drop((ks, vs));
    Tensor::from_vec(out, (rows, nh * hd), &Device::Cpu)
}
