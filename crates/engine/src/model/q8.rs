//! Quantized matrix multiplication for the CPU on the file's own blocks of 32 values
//! (Q8_0 and Q5_0), with the threading and tiling shared by [`super::kquants`].
//!
//! candle 0.11's Q8_0 CPU kernel costs the same per row at 1 or 64 rows (measured: ~14
//! GMAC/s on 2 cores, see docs/benchmarks.md) and it has no SIMD kernel for Q5_0 at all. Here
//! the weights stay in the GGUF file's block layout (Q5_0: 22 bytes per 32 values, 0.69 bytes
//! per weight; an earlier version re-packed Q5_0 to Q8_0 at load, which cost 1.5× the memory
//! traffic of a decode step), the activations are quantized once per call (per 32 values, scale
//! `amax / 127` rounded to f16, as llama.cpp does for Q8_0 dot products), and every weight
//! block is decoded to 32 signed bytes once per tile of rows, while it is in registers.
//!
//! Each output element is computed by the same sequence of operations whatever the number of
//! rows (eight i32 lanes per block, one fused multiply-add per lane and block, one fixed final
//! reduction), so results are batch-invariant; the AVX2 and the portable paths are bitwise
//! identical (tested): a block's integer lane sums are exact, and the float operations are the
//! same ones in the same order.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

const QK: usize = 32;
/// Rows of activations processed against each weight block while it is decoded.
const ROW_TILE_32: usize = 8;
/// Output columns per parallel task: small enough that a busy core only delays a sliver of
/// the work (rayon's other thread steals the rest), large enough to amortize scheduling.
const COLS_PER_TASK: usize = 32;

/// The weight formats with 32-value blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `d: f16, qs: [i8; 32]`, value = d·q.
    Q8_0,
    /// `d: f16, qh: u32, qs: [u8; 16]`, value = d·(q5 − 16) with the low nibbles in `qs` (values
    /// j and j + 16 share byte j) and the fifth bits in `qh`.
    Q5_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q5_0 => 22,
        }
    }
}

/// A Q8_0 or Q5_0 weight `[n, k]`, in the GGUF file's own block layout.
#[derive(Debug)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    format: Format,
    /// `n` rows of `k / 32` blocks.
    data: Vec<u8>,
}

/// Activations quantized per 32 values: int8 values and an f32 scale (f16-rounded) per block.
struct Q8Rows {
    quants: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Take a Q8_0 or Q5_0 `QTensor` `[n, k]` (its bytes are kept as they are).
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = t.shape().dims2()?;
        Self::from_bytes(t.dtype(), n, k, t.data()?.into_owned())
    }

    /// Take a weight `[n, k]` of GGML type `dtype` from its bytes as stored in the file.
    pub fn from_bytes(dtype: GgmlDType, n: usize, k: usize, data: Vec<u8>) -> candle_core::Result<Self> {
        let format = match dtype {
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q5_0 => Format::Q5_0,
            other => candle_core::bail!("Q8Matrix needs Q8_0 or Q5_0, got {other:?}"),
        };
        if k % QK != 0 {
            candle_core::bail!("{format:?} row length {k} is not a multiple of {QK}");
        }
        let want = n * k / QK * format.block_bytes();
        if data.len() != want {
            candle_core::bail!("{format:?} data has {} bytes, expected {want}", data.len());
        }
        Ok(Q8Matrix { n, k, format, data })
    }

    /// Whether this GGML type has a kernel here.
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q5_0)
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
        self.matmul_with(xs, m, simd, simd && vnni_available())
    }

    fn matmul_with(&self, xs: &[f32], m: usize, simd: bool, vnni: bool) -> Vec<f32> {
        let rows = quantize_rows(xs, m, self.k);
        let row_bytes = self.k / QK * self.format.block_bytes();
        tiled(self.n, m, ROW_TILE_32, |col0, cols, r0, r1, out| {
            let w = &self.data[col0 * row_bytes..(col0 + cols) * row_bytes];
            let k = self.k;
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `simd` is only true when AVX2, FMA and F16C were detected at run time,
                // `vnni` only when AVX512-VNNI and AVX512-VL were too.
                unsafe {
                    // The tile height is a constant in each instance, so the row loop unrolls.
                    macro_rules! go {
                        ($f:ident, $q5:literal) => {
                            match r1 - r0 {
                                1 => $f::<$q5, 1>(w, row_bytes, &rows, r0, k, out, m),
                                2 => $f::<$q5, 2>(w, row_bytes, &rows, r0, k, out, m),
                                3 => $f::<$q5, 3>(w, row_bytes, &rows, r0, k, out, m),
                                4 => $f::<$q5, 4>(w, row_bytes, &rows, r0, k, out, m),
                                5 => $f::<$q5, 5>(w, row_bytes, &rows, r0, k, out, m),
                                6 => $f::<$q5, 6>(w, row_bytes, &rows, r0, k, out, m),
                                7 => $f::<$q5, 7>(w, row_bytes, &rows, r0, k, out, m),
                                _ => $f::<$q5, ROW_TILE_32>(w, row_bytes, &rows, r0, k, out, m),
                            }
                        };
                    }
                    use avx2::{dot_cols_avx2, dot_cols_vnni};
                    match (self.format, vnni) {
                        (Format::Q8_0, false) => go!(dot_cols_avx2, false),
                        (Format::Q5_0, false) => go!(dot_cols_avx2, true),
                        (Format::Q8_0, true) => go!(dot_cols_vnni, false),
                        (Format::Q5_0, true) => go!(dot_cols_vnni, true),
                    }
                };
            } else {
                for (c, wc) in w.chunks_exact(row_bytes).enumerate() {
                    portable::dot_tile(self.format, wc, &rows, r0, r1, k, &mut out[c * m + r0..c * m + r1]);
                }
            }
        })
    }
}

/// Run `f` on the rows of `x` as one contiguous F32 slice, borrowing the tensor's storage when
/// it already is one (no copy per call).
pub(super) fn with_f32_rows<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let x = x.to_dtype(candle_core::DType::F32)?;
    if x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let all = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            return Ok(f(&all[start..start + x.elem_count()]));
        }
    }
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// The shared loop: `kernel(col0, cols, r0, r1, out)` writes rows `r0..r1` of output columns
/// `col0..col0 + cols`, where `out` is those columns' `[cols][m]` results.
/// Columns are split into tasks of [`COLS_PER_TASK`]; inside a task each tile of
/// `row_tile` activation rows meets every column of the task, so both stay in L1. Which
/// rows share a tile does not change any element's sequence of operations.
pub(super) fn tiled<F>(n: usize, m: usize, row_tile: usize, kernel: F) -> Vec<f32>
where
    F: Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
{
    // Computed column-major per task ([n][m]) so tasks own disjoint memory, then transposed.
    let mut out_t = vec![0f32; n * m];
    out_t.par_chunks_mut(COLS_PER_TASK * m).enumerate().for_each(|(task, chunk)| {
        let col0 = task * COLS_PER_TASK;
        let cols = chunk.len() / m;
        let mut r0 = 0;
        while r0 < m {
            let r1 = (r0 + row_tile).min(m);
            kernel(col0, cols, r0, r1, chunk);
            r0 = r1;
        }
    });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (col, src) in out_t.chunks_exact(m).enumerate() {
        for (r, &v) in src.iter().enumerate() {
            out[r * n + col] = v;
        }
    }
    out
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
            *q = nearest_i8(v * id);
        }
        scales[bi] = d;
    }
    Q8Rows { quants, scales }
}

/// `x` (|x| ≤ 127 up to rounding) to the nearest integer, ties to even, as ggml's
/// `nearest_int`: adding 1.5·2²³ leaves the rounded integer in the low mantissa bits. Plain
/// float arithmetic, so it vectorizes (`f32::round` is a libm call per value).
#[inline]
pub(super) fn nearest_i8(x: f32) -> i8 {
    let t = x + 12_582_912.0;
    ((t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000).clamp(-127, 127) as i8
}

/// Whether the AVX512-VNNI variant of the 32-value kernels (`vpdpbusd` on 256-bit vectors
/// in place of AVX2's `vpmaddubsw` + `vpmaddwd`, same integer results) can run; checked once.
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            simd_available()
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
                && std::env::var_os("SILICA_NO_VNNI").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX2 paths (AVX2, FMA, F16C) can run on this CPU; checked once.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Final reduction of the eight lanes, in a fixed order shared by both paths.
#[inline]
fn reduce8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

mod portable {
    use super::*;

    /// One block's 32 weights as signed bytes.
    fn decode(format: Format, b: &[u8], out: &mut [i8; QK]) {
        match format {
            Format::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&b[2..2 + QK]) {
                    *o = q as i8;
                }
            }
            Format::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..16 {
                    let q = b[6 + j];
                    let lo = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                    let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                    out[j] = lo as i8 - 16;
                    out[j + 16] = hi as i8 - 16;
                }
            }
        }
    }

    /// Rows `r0..r1` of the activations against one weight column. Lane `l` of a block sums
    /// the products of values `4l..4l+3`, exactly as AVX2's maddubs+madd (or VNNI's dpbusd)
    /// groups them; then `acc = (isum · x_scale) · w_scale + acc`, one rounding for the
    /// product and one for the fused multiply-add.
    pub fn dot_tile(format: Format, w: &[u8], rows: &Q8Rows, r0: usize, r1: usize, k: usize, out: &mut [f32]) {
        let kb = k / QK;
        let bb = format.block_bytes();
        let mut acc = [[0f32; 8]; ROW_TILE_32];
        let mut wq = [0i8; QK];
        for b in 0..kb {
            let blk = &w[b * bb..(b + 1) * bb];
            decode(format, blk, &mut wq);
            let wd = f16_at(blk, 0);
            for (a, r) in acc.iter_mut().zip(r0..r1) {
                let x = &rows.quants[r * k + b * QK..r * k + (b + 1) * QK];
                let xd = rows.scales[r * kb + b];
                for (l, a) in a.iter_mut().enumerate() {
                    let mut isum = 0i32;
                    for j in 4 * l..4 * l + 4 {
                        isum += wq[j] as i32 * x[j] as i32;
                    }
                    *a = (isum as f32 * xd).mul_add(wd, *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = reduce8(a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// An f16 (little-endian bytes at `p`) to f32 with F16C; exact, like `half`'s conversion.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// A Q5_0 block's 32 values minus 16, as signed bytes (ggml's unpacking).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_q5_0(b: *const u8) -> __m256i {
        // Low nibbles to bytes 0..16, high nibbles to bytes 16..32.
        let qs = _mm_loadu_si128(b.add(6) as *const __m128i);
        let nib = _mm256_and_si256(
            _mm256_insertf128_si256(_mm256_castsi128_si256(qs), _mm_srli_epi16(qs, 4), 1),
            _mm256_set1_epi8(0x0f),
        );
        // Byte j = 0xFF where bit j of qh is set.
        let qh = u32::from_le_bytes([*b.add(2), *b.add(3), *b.add(4), *b.add(5)]);
        let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let bits = _mm256_cmpeq_epi8(
            _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
            _mm256_set1_epi64x(-1),
        );
        // q − 16 = nibble where the bit is set, nibble − 16 (= nibble | 0xF0) where it is not.
        _mm256_or_si256(nib, _mm256_andnot_si256(bits, _mm256_set1_epi8(0xf0u8 as i8)))
    }

    /// One block's exact i32 lane sums: AVX2 pairs bytes with maddubs then madd.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes_avx2(wabs: __m256i, xsg: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xsg), _mm256_set1_epi16(1))
    }

    /// The same sums with one VNNI instruction.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn lanes_vnni(wabs: __m256i, xsg: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, xsg)
    }

    macro_rules! kernel {
        ($cols:ident, $tile:ident, $lanes:ident, $features:literal) => {
            /// The kernel for each weight row (`row_bytes` each) of `w`; column `c`'s rows go
            /// to `out[c * m + r0..]`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $cols<const Q5: bool, const T: usize>(
                w: &[u8],
                row_bytes: usize,
                rows: &Q8Rows,
                r0: usize,
                k: usize,
                out: &mut [f32],
                m: usize,
            ) {
                for (c, wc) in w.chunks_exact(row_bytes).enumerate() {
                    $tile::<Q5, T>(wc, rows, r0, k, &mut out[c * m + r0..c * m + r0 + T]);
                }
            }

            /// SIMD version of [`portable::dot_tile`]: each weight block is decoded once for
            /// the tile of `T` rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $tile<const Q5: bool, const T: usize>(w: &[u8], rows: &Q8Rows, r0: usize, k: usize, out: &mut [f32]) {
                let kb = k / QK;
                let bb = if Q5 { 22 } else { 34 };
                let mut acc = [_mm256_setzero_ps(); T];
                let wp = w.as_ptr();
                let xq = rows.quants.as_ptr().add(r0 * k);
                let xs = rows.scales.as_ptr().add(r0 * kb);
                for b in 0..kb {
                    let blk = wp.add(b * bb);
                    let wv = if Q5 { decode_q5_0(blk) } else { _mm256_loadu_si256(blk.add(2) as *const __m256i) };
                    let wd = _mm256_set1_ps(f16_at(blk));
                    let wabs = _mm256_sign_epi8(wv, wv);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_si256(xq.add(i * k + b * QK) as *const __m256i);
                        // |w| * (x * sign(w)) = w * x, summed in fours to i32 lanes.
                        let p = $lanes(wabs, _mm256_sign_epi8(xv, wv));
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(*xs.add(i * kb + b)));
                        *a = _mm256_fmadd_ps(t, wd, *a);
                    }
                }
                for (i, o) in out.iter_mut().enumerate().take(T) {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i]);
                    *o = reduce8(lanes);
                }
            }
        };
    }
    kernel!(dot_cols_avx2, dot_tile_avx2, lanes_avx2, "avx2,fma,f16c");
    kernel!(dot_cols_vnni, dot_tile_vnni, lanes_vnni, "avx2,fma,f16c,avx512vnni,avx512vl");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dt: GgmlDType, n: usize, k: usize, m: usize) -> (Q8Matrix, Vec<f32>, Tensor) {
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (Q8Matrix::from_qtensor(&q).unwrap(), xs, q.dequantize(&Device::Cpu).unwrap())
    }

    #[test]
    fn simd_and_portable_paths_are_bitwise_identical() {
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let (q, xs, _) = setup(dt, 70, 256, 19);
            let a = q.matmul_with(&xs, 19, false, false);
            if simd_available() {
                assert_eq!(a, q.matmul_with(&xs, 19, true, false), "{dt:?} AVX2");
            }
            if vnni_available() {
                assert_eq!(a, q.matmul_with(&xs, 19, true, true), "{dt:?} VNNI");
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let (q, xs, _) = setup(dt, 64, 128, 7);
            let all = q.matmul(&xs, 7, simd_available());
            for r in 0..7 {
                let one = q.matmul(&xs[r * 128..(r + 1) * 128], 1, simd_available());
                assert_eq!(one[..], all[r * 64..(r + 1) * 64], "{dt:?}");
            }
        }
    }

    #[test]
    fn close_to_the_dequantized_product() {
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let (q, xs, deq) = setup(dt, 48, 512, 3);
            let x = Tensor::from_vec(xs.clone(), (3, 512), &Device::Cpu).unwrap();
            let exact = x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for simd in [false, simd_available()] {
                let ours = q.matmul(&xs, 3, simd);
                let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
                let worst = exact.iter().zip(&ours).fold(0f32, |a, (e, o)| a.max((e - o).abs()));
                // Only the activations' 8-bit rounding separates the two.
                assert!(worst < 0.02 * scale, "{dt:?}: worst {worst} vs scale {scale}");
            }
        }
    }
}
