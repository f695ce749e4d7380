//! The short per-row steps of the CPU F32 decoder, in plain Rust over slices: the residual
//! add fused with the RMSNorm that follows it, and RoPE fused with the K/V cache write.
//!
//! Through candle's ops these were a handful of ops each (copies out of the stacked q/k/v
//! output, `unsqueeze`/`contiguous`, `rope_thd`, two `scatter_set`; an add and a norm with a
//! tensor each): ≈ 0.5 ms of a 1.5B decode step, on one core while the other waits. Each
//! element is computed by the same expression as candle's (`rms_norm`, `rope_thd`), in the same
//! order, so the outputs are the same bits, and every row by the same code whatever the batch
//! (batch invariance, invariant 8 of ARCHITECTURE.md). The CUDA path has its own kernels
//! (`fused.rs`).

use candle_core::{CpuStorage, DType, Device, Layout, Tensor};
use rayon::prelude::*;

use super::q8::with_f32_rows;

/// Whether these ops apply: F32 tensors on the CPU.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Rows per parallel task (a decode step's single row runs inline).
const ROWS_PER_TASK: usize = 4;

/// `(x + h, rmsnorm(x + h) · w)` for `x, h: [rows, dim]`, in one pass per row.
pub(crate) fn add_rmsnorm(x: &Tensor, h: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, dim) = x.dims2()?;
    if h.dims2()? != (rows, dim) || w.dims1()? != dim {
        candle_core::bail!("add_rmsnorm: shapes {:?} + {:?}, weight {:?}", x.shape(), h.shape(), w.shape());
    }
    let mut sum = vec![0f32; rows * dim];
    let mut normed = vec![0f32; rows * dim];
    with_f32_rows(x, |xs| {
        with_f32_rows(h, |hs| {
            with_f32_rows(w, |ws| {
                let per_task = ROWS_PER_TASK * dim;
                sum.par_chunks_mut(per_task)
                    .zip(normed.par_chunks_mut(per_task))
                    .zip(xs.par_chunks(per_task).zip(hs.par_chunks(per_task)))
                    .for_each(|((s, n), (x, h))| {
                        for (((s, n), x), h) in
                            s.chunks_exact_mut(dim).zip(n.chunks_exact_mut(dim)).zip(x.chunks_exact(dim)).zip(h.chunks_exact(dim))
                        {
                            add_rmsnorm_row(x, h, ws, eps, s, n);
                        }
                    });
            })
        })
    })???; // one `?` per nested borrow
    Ok((Tensor::from_vec(sum, (rows, dim), &Device::Cpu)?, Tensor::from_vec(normed, (rows, dim), &Device::Cpu)?))
}

/// One row: `s = x + h`, then candle's `rms_norm` of `s` (sum of squares in order, then
/// `s / sqrt(mean + eps) · w`).
#[inline]
fn add_rmsnorm_row(x: &[f32], h: &[f32], w: &[f32], eps: f32, s: &mut [f32], n: &mut [f32]) {
    for ((s, &x), &h) in s.iter_mut().zip(x).zip(h) {
        *s = x + h;
    }
    let sum2 = s.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / s.len() as f32 + eps).sqrt();
    for ((n, &s), &w) in n.iter_mut().zip(s.iter()).zip(w) {
        *n = s / m * w;
    }
}

/// The stacked (or separate) q/k/v projections of a step's rows, each `[rows, width]` inside a
/// row-major buffer: `at` is the offset of row 0's values, `stride` the distance between rows.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub data: &'a [f32],
    pub at: usize,
    pub stride: usize,
}

impl Rows<'_> {
    fn row(&self, r: usize, width: usize) -> &[f32] {
        &self.data[self.at + r * self.stride..][..width]
    }
}

/// Run `f` on the rows of a 2-D F32 CPU tensor whose rows are contiguous (a column range of a
/// stacked projection's output, as `narrow` makes it, is), borrowing its storage; other
/// layouts are copied first.
pub(crate) fn with_rows<R>(t: &Tensor, f: impl FnOnce(Rows<'_>) -> R) -> candle_core::Result<R> {
    let (_, width) = t.dims2()?;
    let stride = t.stride();
    if t.dtype() == DType::F32 && stride[1] == 1 && stride[0] >= width {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            return Ok(f(Rows { data: cpu.as_slice::<f32>()?, at: layout.start_offset(), stride: stride[0] }));
        }
    }
    with_f32_rows(t, |data| f(Rows { data, at: 0, stride: width }))
}

/// Heads and positions for [`rope_write`].
pub(crate) struct RopeWrite<'a> {
    /// `[rows, head_dim / 2]` each: the rows' RoPE tables (gathered by position).
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Each row's cache slot.
    pub slots: &'a [u32],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// RoPE on q and k, and the new K (rotated) and V rows written into their cache slots, in
/// place: returns q `[rows, heads, head_dim]`.
pub(crate) fn rope_write(
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    p: &RopeWrite<'_>,
    k_pool: &Tensor,
    v_pool: &Tensor,
) -> candle_core::Result<Tensor> {
    let (rows, hd) = (p.slots.len(), p.head_dim);
    if p.cos.len() != rows * hd / 2 || p.sin.len() != rows * hd / 2 {
        candle_core::bail!("rope_write: {} rows, tables of {} values", rows, p.cos.len());
    }
    let mut q_out = vec![0f32; rows * p.num_heads * hd];
    let width = p.num_heads * hd;
    let run = |r: usize, o: &mut [f32]| {
        let (cos, sin) = (&p.cos[r * hd / 2..][..hd / 2], &p.sin[r * hd / 2..][..hd / 2]);
        for (src, dst) in q.row(r, width).chunks_exact(hd).zip(o.chunks_exact_mut(hd)) {
            rope_head(src, cos, sin, dst);
        }
    };
    if rows == 1 {
        run(0, &mut q_out);
    } else {
        q_out.par_chunks_mut(width).enumerate().for_each(|(r, o)| run(r, o));
    }
    k_pool.inplace_op1(&WriteRows { src: k, rope: Some(p), slots: p.slots, kv_width: p.num_kv_heads * hd })?;
    v_pool.inplace_op1(&WriteRows { src: v, rope: None, slots: p.slots, kv_width: p.num_kv_heads * hd })?;
    Tensor::from_vec(q_out, (rows, p.num_heads, hd), &Device::Cpu)
}

/// candle's `rope_thd` for one head: `(x1·cos − x2·sin, x1·sin + x2·cos)` over the two halves.
#[inline]
fn rope_head(src: &[f32], cos: &[f32], sin: &[f32], dst: &mut [f32]) {
    let half = src.len() / 2;
    let (x1, x2) = src.split_at(half);
    let (d1, d2) = dst.split_at_mut(half);
    for i in 0..half {
        d1[i] = x1[i] * cos[i] - x2[i] * sin[i];
        d2[i] = x1[i] * sin[i] + x2[i] * cos[i];
    }
}

/// Writes each row (`kv_width` values; rotated per head when `rope` is given) into its slot of a
/// `[slots, kv_heads, head_dim]` pool, in place.
struct WriteRows<'a> {
    src: Rows<'a>,
    rope: Option<&'a RopeWrite<'a>>,
    slots: &'a [u32],
    kv_width: usize,
}

impl candle_core::InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "silica-kv-write"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(pool) = storage else {
            candle_core::bail!("KV pool is not F32");
        };
        if !layout.is_contiguous() {
            candle_core::bail!("KV pool is not contiguous");
        }
        let pool = &mut pool[layout.start_offset()..][..layout.shape().elem_count()];
        for (r, &slot) in self.slots.iter().enumerate() {
            let at = slot as usize * self.kv_width;
            let Some(dst) = pool.get_mut(at..at + self.kv_width) else {
                candle_core::bail!("cache slot {slot} outside the pool (engine bug)");
            };
            let src = self.src.row(r, self.kv_width);
            match self.rope {
                Some(p) => {
                    let hd = p.head_dim;
                    let (cos, sin) = (&p.cos[r * hd / 2..][..hd / 2], &p.sin[r * hd / 2..][..hd / 2]);
                    for (s, d) in src.chunks_exact(hd).zip(dst.chunks_exact_mut(hd)) {
                        rope_head(s, cos, sin, d);
                    }
                }
                None => dst.copy_from_slice(src),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 8_388_608.0 - 1.0).collect()
    }

    #[test]
    fn add_rmsnorm_equals_candle_s_add_and_norm_bit_for_bit() {
        // Odd sizes; 1 row (inline) and 9 rows (parallel, a partial last task).
        for (rows, dim) in [(1, 37), (9, 1536), (5, 7)] {
            let x = Tensor::from_vec(vals(rows * dim, 1), (rows, dim), &Device::Cpu).unwrap();
            let h = Tensor::from_vec(vals(rows * dim, 2), (rows, dim), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(vals(dim, 3), dim, &Device::Cpu).unwrap();
            let (s, n) = add_rmsnorm(&x, &h, &w, 1e-6).unwrap();
            let want_s = (&x + &h).unwrap();
            let want_n = candle_nn::ops::rms_norm(&want_s, &w, 1e-6).unwrap();
            assert_eq!(s.to_vec2::<f32>().unwrap(), want_s.to_vec2::<f32>().unwrap(), "{rows}x{dim} sum");
            assert_eq!(n.to_vec2::<f32>().unwrap(), want_n.to_vec2::<f32>().unwrap(), "{rows}x{dim} norm");
        }
    }

    #[test]
    fn rope_write_equals_candle_s_rope_and_scatter_bit_for_bit() {
        let (nh, nkv, hd, slots_in_pool) = (6, 2, 10, 11);
        for rows in [1usize, 3] {
            let total = (nh + 2 * nkv) * hd;
            let y = vals(rows * total, 4);
            let cos = vals(rows * hd / 2, 5);
            let sin = vals(rows * hd / 2, 6);
            let slots: Vec<u32> = (0..rows as u32).map(|r| (7 * r + 3) % slots_in_pool as u32).collect();
            let pool = || Tensor::zeros((slots_in_pool, nkv, hd), DType::F32, &Device::Cpu).unwrap();
            let (kp, vp) = (pool(), pool());
            let part = |at| Rows { data: &y, at, stride: total };
            let p = RopeWrite { cos: &cos, sin: &sin, slots: &slots, num_heads: nh, num_kv_heads: nkv, head_dim: hd };
            let q = rope_write(part(0), part(nh * hd), part((nh + nkv) * hd), &p, &kp, &vp).unwrap();

            // candle: the same through rope_thd and scatter_set.
            let yt = Tensor::from_vec(y.clone(), (rows, total), &Device::Cpu).unwrap();
            let c = Tensor::from_vec(cos.clone(), (rows, hd / 2), &Device::Cpu).unwrap();
            let s = Tensor::from_vec(sin.clone(), (rows, hd / 2), &Device::Cpu).unwrap();
            let rope = |t: Tensor| {
                candle_nn::rotary_emb::rope_thd(&t.unsqueeze(0).unwrap().contiguous().unwrap(), &c, &s).unwrap().squeeze(0).unwrap()
            };
            let want_q = rope(yt.narrow(1, 0, nh * hd).unwrap().reshape((rows, nh, hd)).unwrap());
            let want_k = rope(yt.narrow(1, nh * hd, nkv * hd).unwrap().reshape((rows, nkv, hd)).unwrap());
            let want_v = yt.narrow(1, (nh + nkv) * hd, nkv * hd).unwrap().reshape((rows, nkv, hd)).unwrap().contiguous().unwrap();
            let (wk, wv) = (pool(), pool());
            let idx = Tensor::from_vec(slots.clone(), (rows, 1, 1), &Device::Cpu).unwrap().broadcast_as((rows, nkv, hd)).unwrap().contiguous().unwrap();
            wk.scatter_set(&idx, &want_k.contiguous().unwrap(), 0).unwrap();
            wv.scatter_set(&idx, &want_v, 0).unwrap();
            assert_eq!(q.to_vec3::<f32>().unwrap(), want_q.to_vec3::<f32>().unwrap(), "{rows} rows: q");
            assert_eq!(kp.to_vec3::<f32>().unwrap(), wk.to_vec3::<f32>().unwrap(), "{rows} rows: k pool");
            assert_eq!(vp.to_vec3::<f32>().unwrap(), wv.to_vec3::<f32>().unwrap(), "{rows} rows: v pool");
        }
    }
}
