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
    // One task per (row, kv head): its `groups` query heads (consecutive) share every K and V
    // row read. Each head's numbers are computed as if alone.
    let task = Task { q: &q, k, v, nh, hd, groups, slot_stride, scale };
    out.par_chunks_mut(groups * hd).enumerate().for_each_init(Vec::new, |scores, (idx, o)| {
        let (row, kvh) = (idx / num_kv_heads, idx % num_kv_heads);
        let (si, pos) = row_seq[row];
        // Causal: this query sees positions 0..=pos.
        let slots = &meta.seqs[si].slots[..=pos];
        task.run_best(row, kvh, slots, scores, o)
    });
    drop((ks, vs));
    Tensor::from_vec(out, (rows, nh * hd), &Device::Cpu)
}

/// What every (row, kv head) task reads.
struct Task<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    nh: usize,
    hd: usize,
    groups: usize,
    slot_stride: usize,
    scale: f32,
}

impl Task<'_> {
    /// [`Task::run`] with the SIMD forms where this CPU has them: AVX2 on x86-64 (checked at
    /// run time), NEON on aarch64 (part of every aarch64 CPU).
    fn run_best(&self, row: usize, kvh: usize, slots: &[u32], scores: &mut Vec<f32>, o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::q8::simd_available() {
            // SAFETY: AVX2 was detected at run time.
            return unsafe { self.run_avx2(row, kvh, slots, scores, o) };
        }
        self.run::<{ cfg!(target_arch = "aarch64") }>(row, kvh, slots, scores, o)
    }

    /// Query heads `kvh · groups ..` of `row` against the positions in `slots`, into `o`
    /// (`groups` heads × `hd`). Per head: scores, softmax, weighted sum of V, in position order.
    /// `SIMD`: the dot products and the weighted sum in their AVX2 (x86-64, only through
    /// [`Task::run_avx2`]) or NEON (aarch64) forms, which give the same bits.
    #[inline(always)]
    fn run<const SIMD: bool>(&self, row: usize, kvh: usize, slots: &[u32], scores: &mut Vec<f32>, o: &mut [f32]) {
        let (hd, groups, n) = (self.hd, self.groups, slots.len());
        let qs = &self.q[(row * self.nh + kvh * groups) * hd..][..groups * hd];
        scores.clear();
        scores.resize(groups * n, 0.0);
        for (j, &slot) in slots.iter().enumerate() {
            // The V rows too, so that they are in L2 when the weighted sum below reads them
            // (its AVX2 form has too few operations per row to hide the latency itself).
            self.prefetch(self.k, slots, j + AHEAD, kvh);
            self.prefetch(self.v, slots, j + AHEAD, kvh);
            let off = slot as usize * self.slot_stride + kvh * hd;
            let kr = &self.k[off..off + hd];
            for (g, qv) in qs.chunks_exact(hd).enumerate() {
                #[cfg(target_arch = "x86_64")]
                if SIMD {
                    // SAFETY: on x86-64 `SIMD` is only set by `run_avx2`, which needs AVX2.
                    scores[g * n + j] = unsafe { dot_avx2(qv, kr) } * self.scale;
                    continue;
                }
                #[cfg(target_arch = "aarch64")]
                if SIMD {
                    scores[g * n + j] = dot_neon(qv, kr) * self.scale;
                    continue;
                }
                scores[g * n + j] = dot(qv, kr) * self.scale;
            }
        }
        for s in scores.chunks_exact_mut(n) {
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in s.iter_mut() {
                *x *= inv;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: on x86-64 `SIMD` is only set by `run_avx2`, which needs AVX2.
            return unsafe { self.weighted_v_avx2(kvh, slots, scores, o) };
        }
        #[cfg(target_arch = "aarch64")]
        if SIMD {
            return self.weighted_v_neon(kvh, slots, scores, o);
        }
        for (j, &slot) in slots.iter().enumerate() {
            self.prefetch(self.v, slots, j + AHEAD, kvh);
            let off = slot as usize * self.slot_stride + kvh * hd;
            let vr = &self.v[off..off + hd];
            for (g, og) in o.chunks_exact_mut(hd).enumerate() {
                let w = scores[g * n + j];
                for (o, &x) in og.iter_mut().zip(vr) {
                    *o += w * x;
                }
            }
        }
    }

    /// The weighted sum of V of [`Task::run`] with AVX2, head by head and 32 values at a time
    /// in four registers over all positions (instead of loading and storing the output for
    /// every position): each output value is still `o + w₀·v₀ + w₁·v₁ + …` in position order,
    /// with separate multiplies and adds, so the same bits. The V rows are read once per head
    /// and 32-value slice; after the first they come from L1/L2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn weighted_v_avx2(&self, kvh: usize, slots: &[u32], scores: &[f32], o: &mut [f32]) {
        use std::arch::x86_64::*;
        let (hd, n) = (self.hd, slots.len());
        let wide = hd / 32 * 32;
        for (g, og) in o.chunks_exact_mut(hd).enumerate() {
            let w = &scores[g * n..(g + 1) * n];
            for c in (0..wide).step_by(32) {
                let mut acc = [0, 1, 2, 3].map(|i| _mm256_loadu_ps(og.as_ptr().add(c + 8 * i)));
                for (&slot, &wj) in slots.iter().zip(w) {
                    let vr = self.v.as_ptr().add(slot as usize * self.slot_stride + kvh * hd + c);
                    let wj = _mm256_set1_ps(wj);
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(wj, _mm256_loadu_ps(vr.add(8 * i))));
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(og.as_mut_ptr().add(c + 8 * i), *a);
                }
            }
            // The `hd % 32` last values (no Qwen head size has any).
            for (j, &slot) in slots.iter().enumerate() {
                let off = slot as usize * self.slot_stride + kvh * hd;
                for (o, &x) in og[wide..].iter_mut().zip(&self.v[off + wide..off + hd]) {
                    *o += w[j] * x;
                }
            }
        }
    }

    /// The same with NEON, 32 values in eight 128-bit registers: again separate multiplies and
    /// adds (no fused `fmla`) in position order, so the same bits.
    #[cfg(target_arch = "aarch64")]
    fn weighted_v_neon(&self, kvh: usize, slots: &[u32], scores: &[f32], o: &mut [f32]) {
        use std::arch::aarch64::*;
        let (hd, n) = (self.hd, slots.len());
        let wide = hd / 32 * 32;
        for (g, og) in o.chunks_exact_mut(hd).enumerate() {
            let w = &scores[g * n..(g + 1) * n];
            for c in (0..wide).step_by(32) {
                let oc = &mut og[c..c + 32];
                // SAFETY: NEON is part of every aarch64 CPU; each load and store is of 4 values
                // inside `oc` or `vr` (32 values each).
                unsafe {
                    let mut acc = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| vld1q_f32(oc.as_ptr().add(4 * i)));
                    for (&slot, &wj) in slots.iter().zip(w) {
                        let off = slot as usize * self.slot_stride + kvh * hd + c;
                        let vr = &self.v[off..off + 32];
                        let wj = vdupq_n_f32(wj);
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = vaddq_f32(*a, vmulq_f32(wj, vld1q_f32(vr.as_ptr().add(4 * i))));
                        }
                    }
                    for (i, a) in acc.iter().enumerate() {
                        vst1q_f32(oc.as_mut_ptr().add(4 * i), *a);
                    }
                }
            }
            // The `hd % 32` last values (no Qwen head size has any).
            for (j, &slot) in slots.iter().enumerate() {
                let off = slot as usize * self.slot_stride + kvh * hd;
                for (o, &x) in og[wide..].iter_mut().zip(&self.v[off + wide..off + hd]) {
                    *o += w[j] * x;
                }
            }
        }
    }

    /// [`Task::run`] compiled for AVX2: the same operations (separate multiplies and adds, the
    /// same lanes), so the same bits, in wider registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, row: usize, kvh: usize, slots: &[u32], scores: &mut Vec<f32>, o: &mut [f32]) {
        self.run::<true>(row, kvh, slots, scores, o)
    }

    /// Ask for the K or V row of position `j` (if any) ahead of its use: the cache rows are
    /// scattered in the pool by the block table, and after a decode step's weights have streamed
    /// through, they come from memory.
    #[inline(always)]
    fn prefetch(&self, pool: &[f32], slots: &[u32], j: usize, kvh: usize) {
        // Other architectures: no prefetch (the hardware's own prefetcher only).
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (pool, slots, j, kvh);
        #[cfg(target_arch = "x86_64")]
        if let Some(&slot) = slots.get(j) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let row = pool[slot as usize * self.slot_stride + kvh * self.hd..][..self.hd].as_ptr();
            for line in (0..self.hd).step_by(16) {
                // SAFETY: a prefetch never faults; the address is inside the row anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.add(line) as *const i8) };
            }
        }
    }
}

/// How many positions ahead K and V rows are prefetched.
const AHEAD: usize = 4;

/// [`dot`] with 256-bit registers: lane `l` of the register is `acc[l]` there, the same
/// multiplies and adds in the same order, then the same reduction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let chunks = a.len().min(b.len()) / 8;
    let mut acc = _mm256_setzero_ps();
    for c in 0..chunks {
        let (x, y) = (_mm256_loadu_ps(a.as_ptr().add(8 * c)), _mm256_loadu_ps(b.as_ptr().add(8 * c)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), acc);
    let mut s = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    for (x, y) in a[8 * chunks..].iter().zip(&b[8 * chunks..]) {
        s += x * y;
    }
    s
}

/// [`dot`] with NEON: lanes 0..4 of `acc` in one register and 4..8 in another, the same
/// multiplies and adds in the same order, then the same reduction.
#[cfg(target_arch = "aarch64")]
fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::aarch64::*;
    let chunks = a.len().min(b.len()) / 8;
    // SAFETY: NEON is part of every aarch64 CPU; the loads read the first `8 · chunks` values
    // of each slice.
    let mut s = unsafe {
        let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for c in 0..chunks {
            let (x, y) = (a.as_ptr().add(8 * c), b.as_ptr().add(8 * c));
            lo = vaddq_f32(lo, vmulq_f32(vld1q_f32(x), vld1q_f32(y)));
            hi = vaddq_f32(hi, vmulq_f32(vld1q_f32(x.add(4)), vld1q_f32(y.add(4))));
        }
        // [l0 + l4, l1 + l5, l2 + l6, l3 + l7], then ((l0 + l4) + (l1 + l5)), ((l2 + l6) + (l3 + l7)).
        let h = vaddq_f32(lo, hi);
        let p = vpaddq_f32(h, h);
        vgetq_lane_f32::<0>(p) + vgetq_lane_f32::<1>(p)
    };
    for (x, y) in a[8 * chunks..].iter().zip(&b[8 * chunks..]) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On x86-64 without AVX2 (and off x86-64 and aarch64) both sides are the portable code.
    #[test]
    fn the_simd_build_gives_the_same_bits() {
        // As the 1.5B (12 heads of 128, 2 kv heads) and the 0.5B (14 of 64), one position, and
        // head sizes with tails past the 8-lane chunks and the 32-value slices (68, 40).
        for (nh, hd, nkv, positions) in [(12, 68, 2, 37), (12, 128, 2, 203), (14, 64, 2, 1), (4, 40, 4, 9)] {
            check_simd_against_portable(nh, hd, nkv, positions);
        }
    }

    fn check_simd_against_portable(nh: usize, hd: usize, nkv: usize, positions: usize) {
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5).collect()
        };
        let (q, k, v) = (vals(nh * hd, 1), vals(positions * nkv * hd, 2), vals(positions * nkv * hd, 3));
        let slots: Vec<u32> = (0..positions as u32).rev().collect();
        let task = Task { q: &q, k: &k, v: &v, nh, hd, groups: nh / nkv, slot_stride: nkv * hd, scale: 0.125 };
        for kvh in 0..nkv {
            let groups = nh / nkv;
            let (mut a, mut b) = (vec![0f32; groups * hd], vec![0f32; groups * hd]);
            task.run::<false>(0, kvh, &slots, &mut Vec::new(), &mut a);
            task.run_best(0, kvh, &slots, &mut Vec::new(), &mut b);
            assert_eq!(a, b, "{nh} heads of {hd}, {nkv} kv heads, {positions} positions: kv head {kvh}");
        }
    }

    /// `cargo test --release -p silica-engine --lib attention_speed -- --ignored --nocapture`:
    /// one (row, kv head) task as in a 1.5B decode step (6 query heads of 128) over 600
    /// positions in a pool of 4096 slots per layer (28 layers, 115 MB each for K and V),
    /// after 64 MB of other reads (as a decode step's weights pass through the caches between
    /// two layers' attention); the pool alternately in 4 KB pages (a `Vec`, as the KV cache's
    /// CPU tensors are) and in 2 MB pages (a copy in a [`WeightBytes`] mapping).
    #[test]
    #[ignore]
    fn attention_speed() {
        use super::super::q8::WeightBytes;
        let (nh, hd, nkv, positions, pool) = (12, 128, 2, 600, 4096 * 28);
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5).collect()
        };
        let (q, k, v) = (vals(nh * hd, 1), vals(pool * nkv * hd, 2), vals(pool * nkv * hd, 3));
        let in_huge_pages = |x: &[f32]| {
            // SAFETY: the bytes of an f32 slice, read only.
            WeightBytes::from_slice(unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, x.len() * 4) }).unwrap()
        };
        let (kb, vb) = (in_huge_pages(&k), in_huge_pages(&v));
        // SAFETY: `WeightBytes` starts are 64-byte aligned and hold the f32 values copied above.
        let (kh, vh) = unsafe {
            (std::slice::from_raw_parts(kb.as_ptr() as *const f32, k.len()), std::slice::from_raw_parts(vb.as_ptr() as *const f32, v.len()))
        };
        let other = vec![1u8; 64 << 20];
        for (name, k, v) in [("4 KB", &k[..], &v[..]), ("2 MB", kh, vh)].into_iter().cycle().take(6) {
            let task = Task { q: &q, k, v, nh, hd, groups: nh / nkv, slot_stride: nkv * hd, scale: 0.125 };
            let mut times = Vec::new();
            for round in 0..15 {
                std::hint::black_box(other.iter().step_by(64).map(|&b| b as u64).sum::<u64>());
                let t = std::time::Instant::now();
                for layer in 0..28 {
                    let slots: Vec<u32> = (0..positions as u32).map(|p| (layer * 4096) as u32 + p).collect();
                    let mut o = vec![0f32; 6 * hd];
                    task.run_best(0, (layer + round) % 2, &slots, &mut Vec::new(), &mut o);
                    std::hint::black_box(&o);
                }
                times.push(t.elapsed().as_secs_f64() * 1e6 / 28.0);
            }
            times.sort_by(f64::total_cmp);
            println!("attention task, 600 positions, pool in {name} pages: {:.1} µs (median of 15)", times[7]);
        }
    }
}
