//! Q4_K and Q6_K matrix multiplication for the CPU, on the GGUF file's own 256-value blocks.
//!
//! candle 0.11 has SIMD kernels for these types, but its single-row Q6_K kernel rounds
//! differently from its multi-row one (so a decode step had to run every Q6_K layer on two
//! copies of its row to stay batch-invariant, doubling the cost of the largest tensor of the
//! 1.5B model, its output head), and its kernels re-quantize the activations for every call
//! and never reuse a weight block across rows. Here, as in [`super::q8`]: activations are
//! quantized once per call (per 256 values, scale `amax / 127`, as llama.cpp's Q8_K), each
//! weight block is decoded once per tile of rows, and the threading is [`super::q8::tiled`].
//!
//! Batch invariance and bitwise identity of the AVX2 and portable paths: a block's dot
//! product is first computed exactly in integers (the sub-block scales are small integers),
//! then each row's accumulators take one fused multiply-add per block in block order. The
//! integer sum is the same whatever the path, so the floats are too.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::q8::{nearest_i8, simd_available, tiled, with_f32_rows};

/// Rows of activations processed against each weight block while it is decoded.
const ROW_TILE_K: usize = 8;

const QK_K: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// 144 bytes: `d: f16, dmin: f16, scales: [u8; 12]` (eight 6-bit scales and mins),
    /// `qs: [u8; 128]` (nibbles); value = d·sc·q − dmin·m per 32-value sub-block.
    Q4K,
    /// 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`;
    /// value = d·sc·(q6 − 32) per 16-value group.
    Q6K,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4K => 144,
            Format::Q6K => 210,
        }
    }
}

/// A Q4_K or Q6_K weight `[n, k]` in the GGUF block layout.
#[derive(Debug)]
pub struct KMatrix {
    n: usize,
    k: usize,
    format: Format,
    data: Vec<u8>,
}

/// Activations quantized per 256 values (llama.cpp's Q8_K): int8 values, an f32 scale per
/// block and the sums of each 32 values (for Q4_K's minimums).
struct Q8KRows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// Eight per block, as i16 (|sum| ≤ 32·127) so SIMD can load a block's eight at once.
    sums32: Vec<i16>,
}

impl KMatrix {
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K)
    }

    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = t.shape().dims2()?;
        Self::from_bytes(t.dtype(), n, k, t.data()?.into_owned())
    }

    /// Take a weight `[n, k]` of GGML type `dtype` from its bytes as stored in the file.
    pub fn from_bytes(dtype: GgmlDType, n: usize, k: usize, data: Vec<u8>) -> candle_core::Result<Self> {
        let format = match dtype {
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q6K => Format::Q6K,
            other => candle_core::bail!("KMatrix needs Q4_K or Q6_K, got {other:?}"),
        };
        if k % QK_K != 0 {
            candle_core::bail!("{format:?} row length {k} is not a multiple of {QK_K}");
        }
        let want = n * k / QK_K * format.block_bytes();
        if data.len() != want {
            candle_core::bail!("{format:?} data has {} bytes, expected {want}", data.len());
        }
        Ok(KMatrix { n, k, format, data })
    }

    /// `x: [m, k]` F32 → `[m, n]` F32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("quantized matmul: input has {k} columns, weight expects {}", self.k);
        }
        let out = with_f32_rows(x, |xs| self.matmul(xs, m, simd_available()))?;
        Tensor::from_vec(out, (m, self.n), &Device::Cpu)
    }

    fn matmul(&self, xs: &[f32], m: usize, simd: bool) -> Vec<f32> {
        let rows = quantize_rows(xs, m, self.k);
        let row_bytes = self.k / QK_K * self.format.block_bytes();
        tiled(self.n, m, ROW_TILE_K, |col0, cols, r0, r1, out| {
            let w = &self.data[col0 * row_bytes..(col0 + cols) * row_bytes];
            let k = self.k;
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `simd` is only true when AVX2, FMA and F16C were detected at run time.
                unsafe {
                    // The tile height is a constant in each instance, so the row loop unrolls.
                    macro_rules! go {
                        ($q6:literal) => {
                            match r1 - r0 {
                                1 => avx2::cols::<$q6, 1>(w, row_bytes, &rows, r0, k, out, m),
                                2 => avx2::cols::<$q6, 2>(w, row_bytes, &rows, r0, k, out, m),
                                3 => avx2::cols::<$q6, 3>(w, row_bytes, &rows, r0, k, out, m),
                                4 => avx2::cols::<$q6, 4>(w, row_bytes, &rows, r0, k, out, m),
                                5 => avx2::cols::<$q6, 5>(w, row_bytes, &rows, r0, k, out, m),
                                6 => avx2::cols::<$q6, 6>(w, row_bytes, &rows, r0, k, out, m),
                                7 => avx2::cols::<$q6, 7>(w, row_bytes, &rows, r0, k, out, m),
                                _ => avx2::cols::<$q6, ROW_TILE_K>(w, row_bytes, &rows, r0, k, out, m),
                            }
                        };
                    }
                    match self.format {
                        Format::Q4K => go!(false),
                        Format::Q6K => go!(true),
                    }
                };
            } else {
                for (c, wc) in w.chunks_exact(row_bytes).enumerate() {
                    let o = &mut out[c * m + r0..c * m + r1];
                    match self.format {
                        Format::Q4K => portable::q4k_tile(wc, &rows, r0, r1, k, o),
                        Format::Q6K => portable::q6k_tile(wc, &rows, r0, r1, k, o),
                    }
                }
            }
        })
    }
}

fn quantize_rows(xs: &[f32], m: usize, k: usize) -> Q8KRows {
    let mut quants = vec![0i8; m * k];
    let mut scales = vec![0f32; m * k / QK_K];
    let mut sums32 = vec![0i16; m * k / 32];
    for (bi, (xb, qb)) in xs.chunks_exact(QK_K).zip(quants.chunks_exact_mut(QK_K)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = nearest_i8(v * id);
        }
        scales[bi] = d;
        for (s, q) in sums32[bi * 8..bi * 8 + 8].iter_mut().zip(qb.chunks_exact(32)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
    }
    Q8KRows { quants, scales, sums32 }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K's eight 6-bit scales (bytes 0..8) and mins (bytes 8..16) from its 12 packed bytes,
/// unpacked with word operations as ggml's SIMD kernels do (the same values as its
/// `get_scale_min_k4`).
#[inline]
fn q4k_scales_mins(q: &[u8]) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let sc_lo = u0 & KMASK1;
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&sc_lo.to_le_bytes());
    out[4..8].copy_from_slice(&sc_hi.to_le_bytes());
    out[8..12].copy_from_slice(&mins_lo.to_le_bytes());
    out[12..16].copy_from_slice(&u3.to_le_bytes());
    out
}

mod portable {
    use super::*;

    pub fn q4k_tile(w: &[u8], rows: &Q8KRows, r0: usize, r1: usize, k: usize, out: &mut [f32]) {
        let kb = k / QK_K;
        let mut acc = [0f32; ROW_TILE_K];
        let mut accm = [0f32; ROW_TILE_K];
        let mut q = [0u8; QK_K];
        for b in 0..kb {
            let blk = &w[b * 144..(b + 1) * 144];
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let sm = q4k_scales_mins(&blk[4..16]);
            let (sc, mn) = (&sm[0..8], &sm[8..16]);
            for j in 0..4 {
                for l in 0..32 {
                    let v = blk[16 + 32 * j + l];
                    q[64 * j + l] = v & 0xF;
                    q[64 * j + 32 + l] = v >> 4;
                }
            }
            for (i, r) in (r0..r1).enumerate() {
                let y = &rows.quants[r * k + b * QK_K..r * k + (b + 1) * QK_K];
                let mut sumi = 0i32;
                for s in 0..8 {
                    let dot: i32 = (32 * s..32 * s + 32).map(|i| q[i] as i32 * y[i] as i32).sum();
                    sumi += sc[s] as i32 * dot;
                }
                let bs = &rows.sums32[(r * kb + b) * 8..(r * kb + b) * 8 + 8];
                let summ: i32 = (0..8).map(|s| mn[s] as i32 * bs[s] as i32).sum();
                let yd = rows.scales[r * kb + b];
                acc[i] = (d * yd).mul_add(sumi as f32, acc[i]);
                accm[i] = (dmin * yd).mul_add(summ as f32, accm[i]);
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = acc[i] - accm[i];
        }
    }

    pub fn q6k_tile(w: &[u8], rows: &Q8KRows, r0: usize, r1: usize, k: usize, out: &mut [f32]) {
        let kb = k / QK_K;
        let mut acc = [0f32; ROW_TILE_K];
        let mut q = [0i32; QK_K];
        for b in 0..kb {
            let blk = &w[b * 210..(b + 1) * 210];
            let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            let d = f16_at(blk, 208);
            for c in 0..2 {
                let (ql, qh) = (&ql[64 * c..], &qh[32 * c..]);
                for l in 0..32 {
                    q[128 * c + l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    q[128 * c + l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    q[128 * c + l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    q[128 * c + l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                }
            }
            for (i, r) in (r0..r1).enumerate() {
                let y = &rows.quants[r * k + b * QK_K..r * k + (b + 1) * QK_K];
                let mut sumi = 0i32;
                for g in 0..16 {
                    let dot: i32 = (16 * g..16 * g + 16).map(|i| q[i] * y[i] as i32).sum();
                    sumi += sc[g] as i8 as i32 * dot;
                }
                acc[i] = (d * rows.scales[r * kb + b]).mul_add(sumi as f32, acc[i]);
            }
        }
        out.copy_from_slice(&acc[..out.len()]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
        _mm_cvtsi128_si32(s)
    }

    use super::super::q8::avx2::f16_at as f16;

    /// The Q4_K (`Q6 = false`) or Q6_K kernel for each weight row (`row_bytes` each) of `w`;
    /// column `c`'s rows go to `out[c * m + r0..]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn cols<const Q6: bool, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &mut [f32],
        m: usize,
    ) {
        for (c, wc) in w.chunks_exact(row_bytes).enumerate() {
            let o = &mut out[c * m + r0..c * m + r0 + T];
            if Q6 {
                q6k_tile::<T>(wc, rows, r0, k, o)
            } else {
                q4k_tile::<T>(wc, rows, r0, k, o)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_tile<const T: usize>(w: &[u8], rows: &Q8KRows, r0: usize, k: usize, out: &mut [f32]) {
        let kb = k / QK_K;
        let mut acc = [0f32; T];
        let mut accm = [0f32; T];
        let m4 = _mm256_set1_epi8(0x0f);
        for b in 0..kb {
            let blk = w.as_ptr().add(b * 144);
            let (d, dmin) = (f16(blk), f16(blk.add(2)));
            let sm = q4k_scales_mins(std::slice::from_raw_parts(blk.add(4), 12));
            // Scales and mins as i16: lanes 0..8 and 8..16.
            let smv = _mm256_cvtepu8_epi16(_mm_loadu_si128(sm.as_ptr() as *const __m128i));
            let scv = _mm256_permute2x128_si256(smv, smv, 0x00);
            let mv = _mm256_extracti128_si256(smv, 1);
            let mut q = [_mm256_setzero_si256(); 8];
            let mut s = [_mm256_setzero_si256(); 8];
            for j in 0..4 {
                let v = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                q[2 * j] = _mm256_and_si256(v, m4);
                q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for (j, sj) in s.iter_mut().enumerate() {
                // Broadcast scale j (i16 lane j of each half) to all sixteen lanes.
                let lo = (2 * j) as i8;
                *sj = _mm256_shuffle_epi8(scv, _mm256_set1_epi16(i16::from_le_bytes([lo as u8, lo as u8 + 1])));
            }
            for i in 0..T {
                let r = r0 + i;
                let y = rows.quants.as_ptr().add(r * k + b * QK_K);
                let mut sumv = _mm256_setzero_si256();
                for j in 0..8 {
                    let yv = _mm256_loadu_si256(y.add(32 * j) as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], yv), s[j]);
                    sumv = _mm256_add_epi32(sumv, p);
                }
                let sumi = hsum_i32(sumv);
                // Σ min·(sum of the sub-block's activations): eight i16 products, summed exactly.
                let bs = _mm_loadu_si128(rows.sums32.as_ptr().add((r * kb + b) * 8) as *const __m128i);
                let pm = _mm_madd_epi16(mv, bs);
                let pm = _mm_add_epi32(pm, _mm_unpackhi_epi64(pm, pm));
                let summ = _mm_cvtsi128_si32(_mm_add_epi32(pm, _mm_shuffle_epi32(pm, 0b01)));
                let yd = *rows.scales.get_unchecked(r * kb + b);
                acc[i] = (d * yd).mul_add(sumi as f32, acc[i]);
                accm[i] = (dmin * yd).mul_add(summ as f32, accm[i]);
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = acc[i] - accm[i];
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k_tile<const T: usize>(w: &[u8], rows: &Q8KRows, r0: usize, k: usize, out: &mut [f32]) {
        let kb = k / QK_K;
        let mut acc = [0f32; T];
        let m4 = _mm256_set1_epi8(0x0f);
        let m2 = _mm256_set1_epi8(3);
        let m32 = _mm256_set1_epi8(32);
        for b in 0..kb {
            let blk = w.as_ptr().add(b * 210);
            let d = f16(blk.add(208));
            let sc = blk.add(192) as *const i8;
            // q[4c + i]: the 32 values at 128c + 32i, unsigned 0..63; s[..]: their two scales.
            let mut q = [_mm256_setzero_si256(); 8];
            let mut s = [_mm256_setzero_si256(); 8];
            for c in 0..2 {
                let ql0 = _mm256_loadu_si256(blk.add(64 * c) as *const __m256i);
                let ql1 = _mm256_loadu_si256(blk.add(64 * c + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * c) as *const __m256i);
                // The two high bits of each value, already shifted to bits 4..5.
                let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4);
                let h4 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4);
                let h6 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4);
                q[4 * c] = _mm256_or_si256(_mm256_and_si256(ql0, m4), h0);
                q[4 * c + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), h2);
                q[4 * c + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), h4);
                q[4 * c + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h6);
                for i in 0..4 {
                    let g = 8 * c + 2 * i;
                    s[4 * c + i] = _mm256_set_m128i(
                        _mm_set1_epi16(*sc.add(g + 1) as i16),
                        _mm_set1_epi16(*sc.add(g) as i16),
                    );
                }
            }
            for i in 0..T {
                let r = r0 + i;
                let y = rows.quants.as_ptr().add(r * k + b * QK_K);
                let mut sumv = _mm256_setzero_si256();
                for j in 0..8 {
                    let yv = _mm256_loadu_si256(y.add(32 * j) as *const __m256i);
                    // (q − 32)·y in pairs: q·y − 32·y, both exact in i16.
                    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q[j], yv), _mm256_maddubs_epi16(m32, yv));
                    sumv = _mm256_add_epi32(sumv, _mm256_madd_epi16(p, s[j]));
                }
                let sumi = hsum_i32(sumv);
                acc[i] = (d * *rows.scales.get_unchecked(r * kb + b)).mul_add(sumi as f32, acc[i]);
            }
        }
        out.copy_from_slice(&acc[..out.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dt: GgmlDType, n: usize, k: usize, m: usize) -> (KMatrix, Vec<f32>, Tensor) {
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (KMatrix::from_qtensor(&q).unwrap(), xs, q.dequantize(&Device::Cpu).unwrap())
    }

    #[test]
    fn simd_and_portable_paths_are_bitwise_identical() {
        for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (q, xs, _) = setup(dt, 70, 512, 9);
            let a = q.matmul(&xs, 9, false);
            if simd_available() {
                assert_eq!(a, q.matmul(&xs, 9, true), "{dt:?}");
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (q, xs, _) = setup(dt, 64, 512, 7);
            let all = q.matmul(&xs, 7, simd_available());
            for r in 0..7 {
                let one = q.matmul(&xs[r * 512..(r + 1) * 512], 1, simd_available());
                assert_eq!(one[..], all[r * 64..(r + 1) * 64], "{dt:?}");
            }
        }
    }

    #[test]
    fn close_to_the_dequantized_product() {
        for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (q, xs, deq) = setup(dt, 48, 1024, 3);
            let x = Tensor::from_vec(xs.clone(), (3, 1024), &Device::Cpu).unwrap();
            let exact = x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for simd in [false, simd_available()] {
                let ours = q.matmul(&xs, 3, simd);
                let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
                let worst = exact.iter().zip(&ours).fold(0f32, |a, (e, o)| a.max((e - o).abs()));
                assert!(worst < 0.02 * scale, "{dt:?} simd={simd}: worst {worst} vs scale {scale}");
            }
        }
    }
}
