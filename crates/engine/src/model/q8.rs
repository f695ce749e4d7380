//! A Q8_0 matrix multiplication for the CPU that gets cheaper per row as rows are added.
//!
//! candle 0.11's Q8_0 CPU kernel costs the same per row at 1 or 64 rows (measured: ~14
//! GMAC/s on 2 cores, see docs/benchmarks.md), which makes batched decode no faster than
//! sequential decode. Here the activations are quantized once per call (per 32 values, scale
//! `amax / 127`, as llama.cpp does for Q8_0 dot products) and every weight block is reused
//! across a tile of rows while it is in registers.
//!
//! Each output element is computed by the same sequence of operations whatever the number of
//! rows (eight i32 lanes per block, one fused multiply-add per lane and block, one fixed final
//! reduction), so results are batch-invariant; the AVX2 and the portable paths are bitwise
//! identical (tested).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

const QK: usize = 32;
/// Rows of activations processed against each weight block while it is loaded.
const ROW_TILE: usize = 4;
/// Output columns per parallel task.
const COLS_PER_TASK: usize = 32;

/// A Q8_0 weight `[n, k]`: int8 values and one f32 scale per 32 values.
#[derive(Debug)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// `[n, k]` int8.
    quants: Vec<i8>,
    /// `[n, k / 32]`.
    scales: Vec<f32>,
}

/// Activations quantized the same way: int8 values and a scale per 32 values.
struct Q8Rows {
    quants: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Take a Q8_0 `QTensor` `[n, k]` apart into values and scales.
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        if t.dtype() != GgmlDType::Q8_0 {
            candle_core::bail!("Q8Matrix needs Q8_0, got {:?}", t.dtype());
        }
        let (n, k) = t.shape().dims2()?;
        if k % QK != 0 {
            candle_core::bail!("Q8_0 row length {k} is not a multiple of {QK}");
        }
        let data = t.data()?;
        let blocks = n * k / QK;
        if data.len() != blocks * (2 + QK) {
            candle_core::bail!("Q8_0 data has {} bytes, expected {}", data.len(), blocks * (2 + QK));
        }
        let mut quants = Vec::with_capacity(n * k);
        let mut scales = Vec::with_capacity(blocks);
        for b in data.chunks_exact(2 + QK) {
            scales.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            quants.extend(b[2..].iter().map(|&x| x as i8));
        }
        Ok(Q8Matrix { n, k, quants, scales })
    }

    /// `x: [m, k]` F32 → `[m, n]` F32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("Q8 matmul: input has {k} columns, weight expects {}", self.k);
        }
        let xs = x.to_dtype(candle_core::DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let out = self.matmul(&xs, m, avx2_available());
        Tensor::from_vec(out, (m, self.n), &Device::Cpu)
    }

    fn matmul(&self, xs: &[f32], m: usize, simd: bool) -> Vec<f32> {
        let rows = quantize_rows(xs, m, self.k);
        let kb = self.k / QK;
        // Computed column-major per task ([n][m]) so tasks own disjoint memory, then transposed.
        let mut out_t = vec![0f32; self.n * m];
        out_t.par_chunks_mut(COLS_PER_TASK * m).enumerate().for_each(|(task, chunk)| {
            let col0 = task * COLS_PER_TASK;
            for (c, out_col) in chunk.chunks_mut(m).enumerate() {
                let col = col0 + c;
                let w = &self.quants[col * self.k..(col + 1) * self.k];
                let ws = &self.scales[col * kb..(col + 1) * kb];
                let mut r0 = 0;
                while r0 < m {
                    let r1 = (r0 + ROW_TILE).min(m);
                    if simd {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `simd` is only true when AVX2 and FMA were detected at run time.
                        unsafe {
                            avx2::dot_tile(w, ws, &rows, r0, r1, self.k, &mut out_col[r0..r1])
                        };
                    } else {
                        portable::dot_tile(w, ws, &rows, r0, r1, self.k, &mut out_col[r0..r1]);
                    }
                    r0 = r1;
                }
            }
        });
        let mut out = vec![0f32; m * self.n];
        for col in 0..self.n {
            for r in 0..m {
                out[r * self.n + col] = out_t[col * m + r];
            }
        }
        out
    }
}

fn quantize_rows(xs: &[f32], m: usize, k: usize) -> Q8Rows {
    let mut quants = vec![0i8; m * k];
    let mut scales = vec![0f32; m * k / QK];
    for (bi, (xb, qb)) in xs.chunks_exact(QK).zip(quants.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        // The scale is stored as f16 in llama.cpp's Q8_0 activations; keep that rounding.
        let d = half::f16::from_f32(d).to_f32();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round().clamp(-127.0, 127.0) as i8;
        }
        scales[bi] = d;
    }
    Q8Rows { quants, scales }
}

/// Whether the AVX2+FMA path can run on this CPU.
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Final reduction of the eight lanes, in a fixed order shared by both paths.
#[inline]
fn reduce8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

mod portable {
    use super::*;

    /// Rows `r0..r1` of the activations against one weight column. Lane `l` of a block sums
    /// the products of values `4l..4l+3`, exactly as AVX2's maddubs+madd pairs them.
    pub fn dot_tile(w: &[i8], ws: &[f32], rows: &Q8Rows, r0: usize, r1: usize, k: usize, out: &mut [f32]) {
        let kb = k / QK;
        for (o, r) in out.iter_mut().zip(r0..r1) {
            let x = &rows.quants[r * k..(r + 1) * k];
            let xsc = &rows.scales[r * kb..(r + 1) * kb];
            let mut acc = [0f32; 8];
            for b in 0..kb {
                let s = ws[b] * xsc[b];
                for (l, a) in acc.iter_mut().enumerate() {
                    let mut isum = 0i32;
                    for j in 0..4 {
                        let i = b * QK + 4 * l + j;
                        isum += w[i] as i32 * x[i] as i32;
                    }
                    *a = s.mul_add(isum as f32, *a);
                }
            }
            *o = reduce8(acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2 version of [`portable::dot_tile`]: each weight block is loaded once for the tile.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tile(w: &[i8], ws: &[f32], rows: &Q8Rows, r0: usize, r1: usize, k: usize, out: &mut [f32]) {
        let kb = k / QK;
        let t = r1 - r0;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        for b in 0..kb {
            let wv = _mm256_loadu_si256(w.as_ptr().add(b * QK) as *const __m256i);
            let wabs = _mm256_sign_epi8(wv, wv);
            for (i, a) in acc.iter_mut().enumerate().take(t) {
                let r = r0 + i;
                let xv = _mm256_loadu_si256(rows.quants.as_ptr().add(r * k + b * QK) as *const __m256i);
                // |w| * (x * sign(w)) = w * x, pairs summed to i16, then fours to i32.
                let xs = _mm256_sign_epi8(xv, wv);
                let p16 = _mm256_maddubs_epi16(wabs, xs);
                let p32 = _mm256_madd_epi16(p16, ones);
                let s = _mm256_set1_ps(ws[b] * rows.scales[r * kb + b]);
                *a = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p32), *a);
            }
        }
        for (i, o) in out.iter_mut().enumerate().take(t) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i]);
            *o = reduce8(lanes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(n: usize, k: usize, m: usize) -> (Q8Matrix, Vec<f32>, Tensor) {
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (Q8Matrix::from_qtensor(&q).unwrap(), xs, q.dequantize(&Device::Cpu).unwrap())
    }

    #[test]
    fn simd_and_portable_paths_are_bitwise_identical() {
        let (q, xs, _) = setup(70, 256, 9);
        let a = q.matmul(&xs, 9, false);
        if avx2_available() {
            assert_eq!(a, q.matmul(&xs, 9, true));
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (q, xs, _) = setup(64, 128, 7);
        let all = q.matmul(&xs, 7, avx2_available());
        for r in 0..7 {
            let one = q.matmul(&xs[r * 128..(r + 1) * 128], 1, avx2_available());
            assert_eq!(one[..], all[r * 64..(r + 1) * 64]);
        }
    }

    #[test]
    fn close_to_the_dequantized_product() {
        let (q, xs, deq) = setup(48, 512, 3);
        let x = Tensor::from_vec(xs.clone(), (3, 512), &Device::Cpu).unwrap();
        let exact = x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ours = q.matmul(&xs, 3, avx2_available());
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = exact.iter().zip(&ours).fold(0f32, |a, (e, o)| a.max((e - o).abs()));
        // Only the activations' 8-bit rounding separates the two.
        assert!(worst < 0.02 * scale, "worst {worst} vs scale {scale}");
    }
}
