//! Q4_K and Q6_K matrix multiplication for the CPU, on the GGUF file's 256-value blocks.
//!
//! candle 0.11 has SIMD kernels for these types, but its single-row Q6_K kernel rounds
//! differently from its multi-row one (so a decode step had to run every Q6_K layer on two
//! copies of its row to stay batch-invariant), and its fast multi-row kernels keep a second,
//! re-packed copy of the weights. Here, as in [`super::q8`]: the file's bytes are re-arranged
//! in place at load so that 16 output columns are interleaved ([`Q4KLayout`], [`Q6KLayout`];
//! same size), activations are quantized once per call (per 256 values, scale `amax / 127`, as
//! llama.cpp's Q8_K), AVX-512 VNNI does 64 multiply-adds per instruction for 16 columns, each
//! weight block is decoded once per tile of rows, and the threading is [`super::q8::tiled`].
//!
//! On aarch64 NEON kernels (with `sdot` where the CPU has the dot-product extension, widening
//! multiplies otherwise) take a quarter of a group (4 columns) per 128-bit register.
//!
//! Batch invariance and bitwise identity of the AVX-512, AVX2, NEON and portable paths: a block's
//! dot product is first computed exactly in integers (the sub-block scales are small
//! integers), then each row's accumulators take one fused multiply-add per block in block
//! order. The integer sum is the same whatever the path, so the floats are too.

use std::borrow::Borrow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::q8::{nearest_i8, tiled, with_f32_rows, word, Path, TaskOut, WeightBytes, COLS_PER_TASK, GROUP};

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
    /// Groups of 16 columns in the interleaved layout ([`Q4KLayout`], [`Q6KLayout`]), then
    /// the `n % 16` remaining columns as in the file.
    data: WeightBytes,
}

/// Q4_K's interleaved layout for a group of [`GROUP`] columns (re-arranged in place at load,
/// same size). Superblock `b` of the group (2304 bytes at `b · 2304`):
///
/// - bytes 0..32 and 32..64: the 16 columns' `d` and `dmin` (f16);
/// - bytes 64..256: the 12 packed scale bytes of each column as three little-endian u32
///   words, word-major (word 0 of the 16 columns, then word 1, then word 2), so the word
///   operations that unpack them (ggml's) run on 16 columns at once;
/// - bytes 256..2304: for each 32-value sub-block `s`, 256 bytes: for each `p` in 0..4, 64
///   bytes, byte `4c + i` = value `32s + 4p + i` of column `c` (low nibble) and value
///   `32s + 4p + 16 + i` (high nibble).
///
/// One 512-bit register of decoded nibbles then holds four consecutive values of each of the
/// 16 columns, which `vpdpbusd` multiplies with four activation bytes broadcast to every lane.
struct Q4KLayout;

impl Q4KLayout {
    const BYTES: usize = 144;

    fn interleave(data: &mut [u8], n: usize, row_bytes: usize) {
        let kb = row_bytes / Self::BYTES;
        let mut src = vec![0u8; GROUP * row_bytes];
        for g in 0..n / GROUP {
            let region = &mut data[g * GROUP * row_bytes..(g + 1) * GROUP * row_bytes];
            src.copy_from_slice(region);
            for b in 0..kb {
                let dst = &mut region[b * GROUP * Self::BYTES..(b + 1) * GROUP * Self::BYTES];
                for c in 0..GROUP {
                    let blk = &src[c * row_bytes + b * Self::BYTES..c * row_bytes + (b + 1) * Self::BYTES];
                    dst[2 * c..2 * c + 2].copy_from_slice(&blk[0..2]);
                    dst[32 + 2 * c..34 + 2 * c].copy_from_slice(&blk[2..4]);
                    for word in 0..3 {
                        let at = 64 + 64 * word + 4 * c;
                        dst[at..at + 4].copy_from_slice(&blk[4 + 4 * word..8 + 4 * word]);
                    }
                    // Sub-block s is the low (s even) or high nibbles of bytes 32(s/2)..+32.
                    let qs = &blk[16..144];
                    for sb in 0..8 {
                        for p in 0..4 {
                            let (w1, w2) = (word(qs, 32 * (sb / 2) + 4 * p), word(qs, 32 * (sb / 2) + 4 * p + 16));
                            let v = if sb % 2 == 0 {
                                (w1 & 0x0f0f_0f0f) | ((w2 & 0x0f0f_0f0f) << 4)
                            } else {
                                ((w1 >> 4) & 0x0f0f_0f0f) | (w2 & 0xf0f0_f0f0)
                            };
                            let at = 256 + 256 * sb + 64 * p + 4 * c;
                            dst[at..at + 4].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
            }
        }
    }

    /// Column `c` of an interleaved superblock, back in the file's block layout.
    fn column(blk: &[u8], c: usize) -> [u8; 144] {
        let mut out = [0u8; 144];
        out[0..2].copy_from_slice(&blk[2 * c..2 * c + 2]);
        out[2..4].copy_from_slice(&blk[32 + 2 * c..34 + 2 * c]);
        for word in 0..3 {
            let at = 64 + 64 * word + 4 * c;
            out[4 + 4 * word..8 + 4 * word].copy_from_slice(&blk[at..at + 4]);
        }
        let mut q = [0u8; QK_K];
        for sb in 0..8 {
            for p in 0..4 {
                for i in 0..4 {
                    let v = 32 * sb + 4 * p + i;
                    let byte = blk[256 + 256 * sb + 64 * p + 4 * c + i];
                    q[v] = byte & 0xF;
                    q[v + 16] = byte >> 4;
                }
            }
        }
        for j in 0..4 {
            for l in 0..32 {
                out[16 + 32 * j + l] = q[64 * j + l] | (q[64 * j + 32 + l] << 4);
            }
        }
        out
    }
}

/// Q6_K's interleaved layout for a group of [`GROUP`] columns (same size as the file's 16
/// blocks). Superblock `b` of the group (3360 bytes at `b · 3360`):
///
/// - bytes 0..32: the 16 columns' `d` (f16);
/// - bytes 32..288: the signed scales, group-major: byte `16g + c` = scale of 16-value group
///   `g` of column `c` (one `vpmovsxbd` loads a group's 16 scales as i32);
/// - bytes 288..3360: for each 32-value sub-block `s`, 384 bytes in one forward stream (with
///   the low and high bits in two separate regions the hardware prefetcher kept up with half
///   the bandwidth). Let `q(v)` be the 6-bit value `v` of column `c`, `A(p, i) = q(32s + 4p + i)`
///   (the sub-block's first 16 values) and `B(p, i) = q(32s + 16 + 4p + i)` (its last 16):
///   - bytes `64p..64p + 64` (`p` in 0..4), byte `4c + i`: `A(p, i)` in bits 0..6 and the high
///     two bits of `B(p, i)` in bits 6..8 (so `A` is one AND away);
///   - bytes `256 + 64t..` (`t` in 0..2), byte `4c + i`: the low four bits of `B(2t, i)`
///     (low nibble) and of `B(2t + 1, i)` (high nibble).
///
/// Per sub-block and 16 columns that is 4 ANDs for the `A` values and, for the `B` values,
/// 6 shifts and 8 logic operations (the previous layout, high bits apart, took 10 shifts and
/// 16 logic operations, and the scales 4 more shifts).
struct Q6KLayout;

impl Q6KLayout {
    const BYTES: usize = 210;

    fn interleave(data: &mut [u8], n: usize, row_bytes: usize) {
        let kb = row_bytes / Self::BYTES;
        let mut src = vec![0u8; GROUP * row_bytes];
        for g in 0..n / GROUP {
            let region = &mut data[g * GROUP * row_bytes..(g + 1) * GROUP * row_bytes];
            src.copy_from_slice(region);
            for b in 0..kb {
                let dst = &mut region[b * GROUP * Self::BYTES..(b + 1) * GROUP * Self::BYTES];
                for c in 0..GROUP {
                    let blk = &src[c * row_bytes + b * Self::BYTES..c * row_bytes + (b + 1) * Self::BYTES];
                    dst[2 * c..2 * c + 2].copy_from_slice(&blk[208..210]);
                    for grp in 0..16 {
                        dst[32 + 16 * grp + c] = blk[192 + grp];
                    }
                    let (ql, qh) = (&blk[0..128], &blk[128..192]);
                    for sb in 0..8 {
                        // Values 32s..32s + 32: within 128-value half s / 4, the low (s % 4 < 2)
                        // or high nibbles of `ql`, and bits 2(s % 4).. of `qh`.
                        let (half, s4) = (sb / 4, sb % 4);
                        let (base, shift) = (64 * half + 32 * (s4 % 2), 4 * (s4 / 2));
                        // Four values each (bytes of a word): low four bits of A(p, ·) and B(p, ·),
                        // high two bits of A(p, ·) and B(p, ·).
                        let lo_a = |p: usize| (word(ql, base + 4 * p) >> shift) & 0x0f0f_0f0f;
                        let lo_b = |p: usize| (word(ql, base + 4 * p + 16) >> shift) & 0x0f0f_0f0f;
                        let hi = |j: usize| (word(qh, 32 * half + 4 * j) >> (2 * s4)) & 0x0303_0303;
                        let at = 288 + 384 * sb + 4 * c;
                        for p in 0..4 {
                            let r = lo_a(p) | (hi(p) << 4) | (hi(p + 4) << 6);
                            dst[at + 64 * p..at + 64 * p + 4].copy_from_slice(&r.to_le_bytes());
                        }
                        for t in 0..2 {
                            let nib = lo_b(2 * t) | (lo_b(2 * t + 1) << 4);
                            dst[at + 256 + 64 * t..at + 256 + 64 * t + 4].copy_from_slice(&nib.to_le_bytes());
                        }
                    }
                }
            }
        }
    }

    /// Column `c` of an interleaved superblock, back in the file's block layout.
    fn column(blk: &[u8], c: usize) -> [u8; 210] {
        let mut q = [0u8; QK_K];
        for sb in 0..8 {
            let at = 288 + 384 * sb + 4 * c;
            for p in 0..4 {
                for i in 0..4 {
                    let r = blk[at + 64 * p + i];
                    let nib = blk[at + 256 + 64 * (p / 2) + i];
                    let lo_b = if p % 2 == 0 { nib & 0xF } else { nib >> 4 };
                    q[32 * sb + 4 * p + i] = r & 0x3f;
                    q[32 * sb + 16 + 4 * p + i] = lo_b | ((r >> 6) << 4);
                }
            }
        }
        let mut out = [0u8; 210];
        for c2 in 0..2 {
            for l in 0..32 {
                let v = |o: usize| q[128 * c2 + l + o];
                out[64 * c2 + l] = (v(0) & 0xF) | ((v(64) & 0xF) << 4);
                out[64 * c2 + l + 32] = (v(32) & 0xF) | ((v(96) & 0xF) << 4);
                out[128 + 32 * c2 + l] = (v(0) >> 4) | ((v(32) >> 4) << 2) | ((v(64) >> 4) << 4) | ((v(96) >> 4) << 6);
            }
        }
        for grp in 0..16 {
            out[192 + grp] = blk[32 + 16 * grp + c];
        }
        out[208..210].copy_from_slice(&blk[2 * c..2 * c + 2]);
        out
    }
}

/// Activations quantized per 256 values (llama.cpp's Q8_K): int8 values, an f32 scale per
/// block and the sums of each 32 values (for Q4_K's minimums).
struct Q8KRows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// Eight per block, as i16 (|sum| ≤ 32·127) so SIMD can load a block's eight at once.
    sums32: Vec<i16>,
    /// Sixteen per block: `−32 ·` the sum of each 16 values (Q6_K's offset; read by the
    /// AVX-512 kernel only).
    #[cfg(target_arch = "x86_64")]
    bias16: Vec<i32>,
}

impl KMatrix {
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K)
    }

    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = t.shape().dims2()?;
        Self::from_bytes(t.dtype(), n, k, WeightBytes::from_slice(&t.data()?)?)
    }

    /// Take a weight `[n, k]` of GGML type `dtype` from its bytes as stored in the file.
    pub fn from_bytes(dtype: GgmlDType, n: usize, k: usize, data: WeightBytes) -> candle_core::Result<Self> {
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
        let mut data = data;
        let row_bytes = k / QK_K * format.block_bytes();
        match format {
            Format::Q4K => Q4KLayout::interleave(&mut data, n, row_bytes),
            Format::Q6K => Q6KLayout::interleave(&mut data, n, row_bytes),
        }
        Ok(KMatrix { n, k, format, data })
    }

    /// `x: [m, k]` F32 → `[m, n]` F32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Self::forward_stacked(&[self], x)
    }

    /// Whether `parts` can run as one product ([`KMatrix::forward_stacked`]): the same input
    /// width, and every part but the last a whole number of parallel tasks wide, so that no
    /// task spans two parts.
    pub fn stackable<P: Borrow<KMatrix>>(parts: &[P]) -> bool {
        let Some((last, init)) = parts.split_last() else { return false };
        let k = last.borrow().k;
        init.iter().all(|p| p.borrow().k == k && p.borrow().n % COLS_PER_TASK == 0)
    }

    /// Weights that read the same input (q/k/v, gate/up) as one product: `x: [m, k]` →
    /// `[m, Σ n]`, the parts' outputs side by side. The input is quantized once and all the
    /// parts' columns are one parallel pass (one wake-up of the pool, one wait at the end);
    /// each output element is computed exactly as by its part alone. The parts keep their own
    /// formats (a Q6_K `v_proj` beside Q4_K `q_proj` and `k_proj`: both read Q8_K activations).
    pub fn forward_stacked<P: Borrow<KMatrix> + Sync>(parts: &[P], x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if !Self::stackable(parts) {
            candle_core::bail!("quantized matmul: these weights cannot run as one product (engine bug)");
        }
        if k != parts[0].borrow().k {
            candle_core::bail!("quantized matmul: input has {k} columns, weight expects {}", parts[0].borrow().k);
        }
        let out = with_f32_rows(x, |xs| Self::matmul_stacked(parts, xs, m, Path::best()))?;
        Tensor::from_vec(out, (m, parts.iter().map(|p| p.borrow().n).sum::<usize>()), &Device::Cpu)
    }

    #[cfg(test)]
    fn matmul(&self, xs: &[f32], m: usize, path: Path) -> Vec<f32> {
        Self::matmul_stacked(&[self], xs, m, path)
    }

    fn matmul_stacked<P: Borrow<KMatrix> + Sync>(parts: &[P], xs: &[f32], m: usize, path: Path) -> Vec<f32> {
        let rows = quantize_rows(xs, m, parts[0].borrow().k);
        let n = parts.iter().map(|p| p.borrow().n).sum();
        tiled(n, m, ROW_TILE_K, |col0, cols, r0, r1, out| {
            // The part holding this task's columns (`stackable`: a task never spans two).
            let mut base = 0;
            for p in parts.iter().map(P::borrow) {
                if col0 < base + p.n {
                    return p.task(&rows, path, col0 - base, cols, r0, r1, out, base);
                }
                base += p.n;
            }
        })
    }

    /// Rows `r0..r1` of this weight's columns `col0..col0 + cols`, written to the output's
    /// columns `base + col0..`.
    #[allow(clippy::too_many_arguments)]
    fn task(&self, rows: &Q8KRows, path: Path, col0: usize, cols: usize, r0: usize, r1: usize, out: &TaskOut, base: usize) {
        let (k, kb) = (self.k, self.k / QK_K);
        let row_bytes = kb * self.format.block_bytes();
        let full = self.n / GROUP * GROUP;
        let gb = GROUP * self.format.block_bytes();
        let mut c = 0;
        while c < cols && col0 + c < full {
            let g = &self.data[(col0 + c) * row_bytes..(col0 + c + GROUP) * row_bytes];
            // A SIMD kernel (of module `$m`) for the tile's number of rows.
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            macro_rules! go {
                ($m:ident::$f:ident) => {
                    match r1 - r0 {
                        1 => $m::$f::<1>(g, kb, rows, r0, k, out, base + col0 + c),
                        2 => $m::$f::<2>(g, kb, rows, r0, k, out, base + col0 + c),
                        3 => $m::$f::<3>(g, kb, rows, r0, k, out, base + col0 + c),
                        4 => $m::$f::<4>(g, kb, rows, r0, k, out, base + col0 + c),
                        5 => $m::$f::<5>(g, kb, rows, r0, k, out, base + col0 + c),
                        6 => $m::$f::<6>(g, kb, rows, r0, k, out, base + col0 + c),
                        7 => $m::$f::<7>(g, kb, rows, r0, k, out, base + col0 + c),
                        _ => $m::$f::<ROW_TILE_K>(g, kb, rows, r0, k, out, base + col0 + c),
                    }
                };
            }
            match path {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Path::Avx512` is only chosen when AVX-512 F, BW and VNNI were
                // detected at run time, `Path::Avx2` when AVX2, FMA and F16C were.
                Path::Avx512 | Path::Avx2 => unsafe {
                    match (self.format, path) {
                        (Format::Q4K, Path::Avx512) => go!(simd::q4k_group_avx512),
                        (Format::Q4K, _) => go!(simd::q4k_group_avx2),
                        (Format::Q6K, Path::Avx512) => go!(simd::q6k_group_avx512),
                        (Format::Q6K, _) => go!(simd::q6k_group_avx2),
                    }
                },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: NEON is part of every aarch64 CPU; `Path::NeonDot` is only chosen
                // when the dot-product extension was detected at run time.
                Path::Neon | Path::NeonDot => unsafe {
                    match (self.format, path) {
                        (Format::Q4K, Path::NeonDot) => go!(neon::q4k_group_dotprod),
                        (Format::Q4K, _) => go!(neon::q4k_group_neon),
                        (Format::Q6K, Path::NeonDot) => go!(neon::q6k_group_dotprod),
                        (Format::Q6K, _) => go!(neon::q6k_group_neon),
                    }
                },
                _ => {
                    // The reference: each column back in the file's layout.
                    let mut col = vec![0u8; row_bytes];
                    let mut res = [0f32; ROW_TILE_K];
                    let bb = self.format.block_bytes();
                    for cc in 0..GROUP {
                        for b in 0..kb {
                            let blk = &g[b * gb..(b + 1) * gb];
                            let dst = &mut col[b * bb..(b + 1) * bb];
                            match self.format {
                                Format::Q4K => dst.copy_from_slice(&Q4KLayout::column(blk, cc)),
                                Format::Q6K => dst.copy_from_slice(&Q6KLayout::column(blk, cc)),
                            }
                        }
                        let o = &mut res[..r1 - r0];
                        match self.format {
                            Format::Q4K => portable::q4k_tile(&col, rows, r0, r1, k, o),
                            Format::Q6K => portable::q6k_tile(&col, rows, r0, r1, k, o),
                        }
                        for (i, &v) in o.iter().enumerate() {
                            out.put(r0 + i, base + col0 + c + cc, &[v]);
                        }
                    }
                }
            }
            c += GROUP;
        }
        // The `n % 16` last columns (no model has any): the file's layout, portable code.
        let mut res = [0f32; ROW_TILE_K];
        for c in c..cols {
            let w = &self.data[(col0 + c) * row_bytes..(col0 + c + 1) * row_bytes];
            let o = &mut res[..r1 - r0];
            match self.format {
                Format::Q4K => portable::q4k_tile(w, rows, r0, r1, k, o),
                Format::Q6K => portable::q6k_tile(w, rows, r0, r1, k, o),
            }
            for (i, &v) in o.iter().enumerate() {
                out.put(r0 + i, base + col0 + c, &[v]);
            }
        }
    }
}

/// Activation blocks per parallel task of [`quantize_rows`]: a decode step's 1536-wide input (6
/// blocks) stays on its thread, the 8960-wide `down_proj` input (35) and a prefill's rows are
/// shared by the pool.
const QUANT_BLOCKS_PER_TASK: usize = 8;

/// The activations `xs: [m, k]` as Q8_K blocks (with the block sums the kernels read), in
/// parallel tasks of whole blocks; each block is quantized by the same code wherever it lies.
fn quantize_rows(xs: &[f32], m: usize, k: usize) -> Q8KRows {
    use rayon::prelude::*;
    let blocks = m * k / QK_K;
    let mut rows = Q8KRows {
        quants: vec![0i8; m * k],
        scales: vec![0f32; blocks],
        sums32: vec![0i16; blocks * 8],
        #[cfg(target_arch = "x86_64")]
        bias16: vec![0i32; blocks * 16],
    };
    let t = QUANT_BLOCKS_PER_TASK;
    let tasks = xs
        .par_chunks(t * QK_K)
        .zip(rows.quants.par_chunks_mut(t * QK_K))
        .zip(rows.scales.par_chunks_mut(t))
        .zip(rows.sums32.par_chunks_mut(t * 8));
    #[cfg(target_arch = "x86_64")]
    tasks.zip(rows.bias16.par_chunks_mut(t * 16)).for_each(|((((x, q), d), s), b)| quantize_blocks(x, q, d, s, b));
    #[cfg(not(target_arch = "x86_64"))]
    tasks.for_each(|(((x, q), d), s)| quantize_blocks(x, q, d, s, &mut []));
    rows
}

/// Consecutive Q8_K blocks: `xs` → `quants`, one scale, eight 32-value sums and (where
/// `bias16` is not empty) sixteen Q6_K offset terms per block.
fn quantize_blocks(xs: &[f32], quants: &mut [i8], scales: &mut [f32], sums32: &mut [i16], bias16: &mut [i32]) {
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
        if let Some(b) = bias16.get_mut(bi * 16..bi * 16 + 16) {
            for (s, q) in b.iter_mut().zip(qb.chunks_exact(16)) {
                *s = -32 * q.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
    }
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
mod simd {
    use super::*;
    use std::arch::x86_64::*;

    const KMASK1: i32 = 0x3f3f_3f3f;
    const KMASK2: i32 = 0x0f0f_0f0f;
    const KMASK3: i32 = 0x0303_0303;

    /// Rows `r0..r0 + T` against a group of 16 interleaved Q4_K columns ([`Q4KLayout`]), with
    /// 512-bit registers: per 32-value sub-block and row, 8 `vpdpbusd` for the 16 columns'
    /// exact dot products, one multiply by their scales; the mins term with 4 `vpdpwssd`.
    /// The same integers and float steps as [`portable::q4k_tile`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4k_group_avx512<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); T];
        let mut accm = [_mm512_setzero_ps(); T];
        let m4 = _mm512_set1_epi8(0x0f);
        let byte = _mm512_set1_epi32(0xff);
        let (k1, k2, k3) = (_mm512_set1_epi32(KMASK1), _mm512_set1_epi32(KMASK2), _mm512_set1_epi32(KMASK3));
        for b in 0..kb {
            let blk = g.as_ptr().add(b * GROUP * 144);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i));
            let u0 = _mm512_loadu_si512(blk.add(64) as *const _);
            let u1 = _mm512_loadu_si512(blk.add(128) as *const _);
            let u2 = _mm512_loadu_si512(blk.add(192) as *const _);
            // Bytes 0..4 of each lane: scales 0..4 (`sc[0]`), 4..8 (`sc[1]`); mins likewise.
            let sc = [
                _mm512_and_si512(u0, k1),
                _mm512_or_si512(_mm512_and_si512(u2, k2), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 6), k3), 4)),
            ];
            let mn = [
                _mm512_and_si512(u1, k1),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi32(u2, 4), k2),
                    _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u1, 6), k3), 4),
                ),
            ];
            let mut isum = [_mm512_setzero_si512(); T];
            for sb in 0..8 {
                let scv = _mm512_and_si512(_mm512_srlv_epi32(sc[sb / 4], _mm512_set1_epi32(8 * (sb % 4) as i32)), byte);
                let mut w = [_mm512_setzero_si512(); 8];
                for p in 0..4 {
                    let v = _mm512_loadu_si512(blk.add(256 + 256 * sb + 64 * p) as *const _);
                    w[p] = _mm512_and_si512(v, m4);
                    w[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                }
                for (i, is) in isum.iter_mut().enumerate() {
                    let x = rows.quants.as_ptr().add((r0 + i) * k + b * QK_K + 32 * sb);
                    let mut dot = _mm512_setzero_si512();
                    for (j, wj) in w.iter().enumerate() {
                        let xv = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(4 * j) as *const i32));
                        dot = _mm512_dpbusd_epi32(dot, *wj, xv);
                    }
                    *is = _mm512_add_epi32(*is, _mm512_mullo_epi32(dot, scv));
                }
            }
            // Mins as i16 pairs (m0, m1), (m2, m3), (m4, m5), (m6, m7) in each lane.
            let lo16 = _mm512_set1_epi32(0xff);
            let hi16 = _mm512_set1_epi32(0xff_0000);
            let pairs = [
                _mm512_or_si512(_mm512_and_si512(mn[0], lo16), _mm512_and_si512(_mm512_slli_epi32(mn[0], 8), hi16)),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(mn[0], 16), lo16), _mm512_and_si512(_mm512_srli_epi32(mn[0], 8), hi16)),
                _mm512_or_si512(_mm512_and_si512(mn[1], lo16), _mm512_and_si512(_mm512_slli_epi32(mn[1], 8), hi16)),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(mn[1], 16), lo16), _mm512_and_si512(_mm512_srli_epi32(mn[1], 8), hi16)),
            ];
            for i in 0..T {
                let r = r0 + i;
                let bs = rows.sums32.as_ptr().add((r * kb + b) * 8) as *const u8;
                let mut summ = _mm512_setzero_si512();
                for (q, pq) in pairs.iter().enumerate() {
                    let bv = _mm512_set1_epi32(std::ptr::read_unaligned(bs.add(4 * q) as *const i32));
                    summ = _mm512_dpwssd_epi32(summ, *pq, bv);
                }
                let yd = _mm512_set1_ps(*rows.scales.get_unchecked(r * kb + b));
                acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, yd), _mm512_cvtepi32_ps(isum[i]), acc[i]);
                accm[i] = _mm512_fmadd_ps(_mm512_mul_ps(dmin, yd), _mm512_cvtepi32_ps(summ), accm[i]);
            }
        }
        let mut res = [[0f32; GROUP]; T];
        for (i, r) in res.iter_mut().enumerate() {
            _mm512_storeu_ps(r.as_mut_ptr(), _mm512_sub_ps(acc[i], accm[i]));
        }
        for (i, r) in res.iter().enumerate() {
            out.put(r0 + i, col, r);
        }
    }

    /// The same with AVX2, each half of the group (8 columns) in a 256-bit register: the
    /// eight `vpmaddubsw` pair sums of a sub-block add up exactly in i16 (≤ 8·2·15·127), and
    /// one `vpmaddwd` multiplies them by the scale into i32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k_group_avx2<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        let mut accm = [[_mm256_setzero_ps(); 2]; T];
        let m4 = _mm256_set1_epi8(0x0f);
        let byte = _mm256_set1_epi32(0xff);
        let (k1, k2, k3) = (_mm256_set1_epi32(KMASK1), _mm256_set1_epi32(KMASK2), _mm256_set1_epi32(KMASK3));
        let lo16 = _mm256_set1_epi32(0xff);
        let hi16 = _mm256_set1_epi32(0xff_0000);
        for b in 0..kb {
            let blk = g.as_ptr().add(b * GROUP * 144);
            for h in 0..2 {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(32 + 16 * h) as *const __m128i));
                let u0 = _mm256_loadu_si256(blk.add(64 + 32 * h) as *const __m256i);
                let u1 = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
                let u2 = _mm256_loadu_si256(blk.add(192 + 32 * h) as *const __m256i);
                let sc = [
                    _mm256_and_si256(u0, k1),
                    _mm256_or_si256(_mm256_and_si256(u2, k2), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), k3), 4)),
                ];
                let mn = [
                    _mm256_and_si256(u1, k1),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi32(u2, 4), k2),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), k3), 4),
                    ),
                ];
                let mut isum = [_mm256_setzero_si256(); T];
                for sb in 0..8 {
                    let s = _mm256_and_si256(_mm256_srlv_epi32(sc[sb / 4], _mm256_set1_epi32(8 * (sb % 4) as i32)), byte);
                    // The scale in both i16 halves of each lane.
                    let scv = _mm256_or_si256(s, _mm256_slli_epi32(s, 16));
                    let mut w = [_mm256_setzero_si256(); 8];
                    for p in 0..4 {
                        let v = _mm256_loadu_si256(blk.add(256 + 256 * sb + 64 * p + 32 * h) as *const __m256i);
                        w[p] = _mm256_and_si256(v, m4);
                        w[p + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    }
                    for (i, is) in isum.iter_mut().enumerate() {
                        let x = rows.quants.as_ptr().add((r0 + i) * k + b * QK_K + 32 * sb);
                        let mut s16 = _mm256_setzero_si256();
                        for (j, wj) in w.iter().enumerate() {
                            let xv = _mm256_set1_epi32(std::ptr::read_unaligned(x.add(4 * j) as *const i32));
                            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*wj, xv));
                        }
                        *is = _mm256_add_epi32(*is, _mm256_madd_epi16(s16, scv));
                    }
                }
                let pairs = [
                    _mm256_or_si256(_mm256_and_si256(mn[0], lo16), _mm256_and_si256(_mm256_slli_epi32(mn[0], 8), hi16)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(mn[0], 16), lo16), _mm256_and_si256(_mm256_srli_epi32(mn[0], 8), hi16)),
                    _mm256_or_si256(_mm256_and_si256(mn[1], lo16), _mm256_and_si256(_mm256_slli_epi32(mn[1], 8), hi16)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(mn[1], 16), lo16), _mm256_and_si256(_mm256_srli_epi32(mn[1], 8), hi16)),
                ];
                for i in 0..T {
                    let r = r0 + i;
                    let bs = rows.sums32.as_ptr().add((r * kb + b) * 8) as *const u8;
                    let mut summ = _mm256_setzero_si256();
                    for (q, pq) in pairs.iter().enumerate() {
                        let bv = _mm256_set1_epi32(std::ptr::read_unaligned(bs.add(4 * q) as *const i32));
                        summ = _mm256_add_epi32(summ, _mm256_madd_epi16(*pq, bv));
                    }
                    let yd = _mm256_set1_ps(*rows.scales.get_unchecked(r * kb + b));
                    acc[i][h] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(isum[i]), acc[i][h]);
                    accm[i][h] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, yd), _mm256_cvtepi32_ps(summ), accm[i][h]);
                }
            }
        }
        let mut res = [[0f32; GROUP]; T];
        for (i, r) in res.iter_mut().enumerate() {
            for h in 0..2 {
                _mm256_storeu_ps(r.as_mut_ptr().add(8 * h), _mm256_sub_ps(acc[i][h], accm[i][h]));
            }
        }
        for (i, r) in res.iter().enumerate() {
            out.put(r0 + i, col, r);
        }
    }

    /// Rows `r0..r0 + T` against a group of 16 interleaved Q6_K columns ([`Q6KLayout`]), with
    /// 512-bit registers: per 16-value group and row, the exact `Σ (q − 32)·x` of the 16
    /// columns as `−32·Σx` plus 4 `vpdpbusd`, times the group's scales. The same integers and
    /// float steps as [`portable::q6k_tile`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q6k_group_avx512<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); T];
        let m4 = _mm512_set1_epi8(0x0f);
        let m30 = _mm512_set1_epi8(0x30);
        let m3f = _mm512_set1_epi8(0x3f);
        for b in 0..kb {
            let blk = g.as_ptr().add(b * GROUP * 210);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let mut isum = [_mm512_setzero_si512(); T];
            for sb in 0..8 {
                let at = blk.add(288 + 384 * sb);
                let mut w = [_mm512_setzero_si512(); 8];
                let r = [0, 1, 2, 3].map(|p| _mm512_loadu_si512(at.add(64 * p) as *const _));
                let nib = [
                    _mm512_loadu_si512(at.add(256) as *const _),
                    _mm512_loadu_si512(at.add(320) as *const _),
                ];
                let lo = [_mm512_and_si512(nib[0], m4), _mm512_and_si512(nib[1], m4)];
                let hi = [
                    _mm512_and_si512(_mm512_srli_epi16(nib[0], 4), m4),
                    _mm512_and_si512(_mm512_srli_epi16(nib[1], 4), m4),
                ];
                let nibs = [lo[0], hi[0], lo[1], hi[1]];
                for p in 0..4 {
                    w[p] = _mm512_and_si512(r[p], m3f);
                    // Bits 6..8 of each byte to bits 4..6 (what a 16-bit shift brings in from
                    // the next byte lands in bits 6..8 and is masked off).
                    w[p + 4] = _mm512_or_si512(nibs[p], _mm512_and_si512(_mm512_srli_epi16(r[p], 2), m30));
                }
                // The scales of the sub-block's two 16-value groups, sign-extended to i32.
                let scv = [0, 1].map(|half| _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(32 + 16 * (2 * sb + half)) as *const __m128i)));
                for (i, is) in isum.iter_mut().enumerate() {
                    let r = r0 + i;
                    let x = rows.quants.as_ptr().add(r * k + b * QK_K + 32 * sb);
                    let bias = rows.bias16.as_ptr().add((r * kb + b) * 16 + 2 * sb);
                    for (half, sc) in scv.iter().enumerate() {
                        let mut dot = _mm512_set1_epi32(*bias.add(half));
                        for j in 4 * half..4 * half + 4 {
                            let xv = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(4 * j) as *const i32));
                            dot = _mm512_dpbusd_epi32(dot, w[j], xv);
                        }
                        *is = _mm512_add_epi32(*is, _mm512_mullo_epi32(dot, *sc));
                    }
                }
            }
            for i in 0..T {
                let yd = _mm512_set1_ps(*rows.scales.get_unchecked((r0 + i) * kb + b));
                acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, yd), _mm512_cvtepi32_ps(isum[i]), acc[i]);
            }
        }
        let mut res = [[0f32; GROUP]; T];
        for (i, r) in res.iter_mut().enumerate() {
            _mm512_storeu_ps(r.as_mut_ptr(), acc[i]);
        }
        for (i, r) in res.iter().enumerate() {
            out.put(r0 + i, col, r);
        }
    }

    /// The same with AVX2, each half of the group in a 256-bit register: per 16-value group,
    /// `(q − 32)·x` pair sums as `vpmaddubsw(q, x) − vpmaddubsw(32, x)`, four of them summed
    /// exactly in i16 (≤ 4·2·32·127), then one `vpmaddwd` by the scale.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_group_avx2<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        let m4 = _mm256_set1_epi8(0x0f);
        let m30 = _mm256_set1_epi8(0x30);
        let m3f = _mm256_set1_epi8(0x3f);
        let m32 = _mm256_set1_epi8(32);
        for b in 0..kb {
            let blk = g.as_ptr().add(b * GROUP * 210);
            for h in 0..2 {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                let mut isum = [_mm256_setzero_si256(); T];
                for sb in 0..8 {
                    let at = blk.add(288 + 384 * sb + 32 * h);
                    let mut w = [_mm256_setzero_si256(); 8];
                    let r = [0, 1, 2, 3].map(|p| _mm256_loadu_si256(at.add(64 * p) as *const __m256i));
                    let nib = [_mm256_loadu_si256(at.add(256) as *const __m256i), _mm256_loadu_si256(at.add(320) as *const __m256i)];
                    let nibs = [
                        _mm256_and_si256(nib[0], m4),
                        _mm256_and_si256(_mm256_srli_epi16(nib[0], 4), m4),
                        _mm256_and_si256(nib[1], m4),
                        _mm256_and_si256(_mm256_srli_epi16(nib[1], 4), m4),
                    ];
                    for p in 0..4 {
                        w[p] = _mm256_and_si256(r[p], m3f);
                        w[p + 4] = _mm256_or_si256(nibs[p], _mm256_and_si256(_mm256_srli_epi16(r[p], 2), m30));
                    }
                    let scv = [0, 1].map(|half| {
                        let p = blk.add(32 + 16 * (2 * sb + half) + 8 * h) as *const __m128i;
                        let s = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p));
                        // The scale in both i16 halves of each lane.
                        _mm256_or_si256(_mm256_and_si256(s, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(s, 16))
                    });
                    for (i, is) in isum.iter_mut().enumerate() {
                        let x = rows.quants.as_ptr().add((r0 + i) * k + b * QK_K + 32 * sb);
                        for (half, sc) in scv.iter().enumerate() {
                            let mut s16 = _mm256_setzero_si256();
                            for j in 4 * half..4 * half + 4 {
                                let xv = _mm256_set1_epi32(std::ptr::read_unaligned(x.add(4 * j) as *const i32));
                                let p = _mm256_sub_epi16(_mm256_maddubs_epi16(w[j], xv), _mm256_maddubs_epi16(m32, xv));
                                s16 = _mm256_add_epi16(s16, p);
                            }
                            *is = _mm256_add_epi32(*is, _mm256_madd_epi16(s16, *sc));
                        }
                    }
                }
                for i in 0..T {
                    let yd = _mm256_set1_ps(*rows.scales.get_unchecked((r0 + i) * kb + b));
                    acc[i][h] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(isum[i]), acc[i][h]);
                }
            }
        }
        let mut res = [[0f32; GROUP]; T];
        for (i, r) in res.iter_mut().enumerate() {
            _mm256_storeu_ps(r.as_mut_ptr(), acc[i][0]);
            _mm256_storeu_ps(r.as_mut_ptr().add(8), acc[i][1]);
        }
        for (i, r) in res.iter().enumerate() {
            out.put(r0 + i, col, r);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::q8::neon::{f16x4, put_rows, quads};
    use super::*;
    use std::arch::aarch64::*;

    /// Rows `r0..r0 + T` against a group of 16 interleaved Q4_K columns ([`Q4KLayout`]) with
    /// `sdot`: a quarter of the group (4 columns) at a time in 128-bit registers, per 32-value
    /// sub-block and row 8 `sdot` and one multiply-add by the scales.
    #[target_feature(enable = "dotprod")]
    pub(super) unsafe fn q4k_group_dotprod<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        q4k_group::<true, T>(g, kb, rows, r0, k, out, col)
    }

    /// The same with baseline NEON: widening multiplies, a sub-block's products (≤ 15·127)
    /// summed exactly in i16 before widening.
    pub(super) unsafe fn q4k_group_neon<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        q4k_group::<false, T>(g, kb, rows, r0, k, out, col)
    }

    /// Q6_K with `sdot`: the weights as signed `q − 32`, per 16-value group and row 4 `sdot`
    /// and one multiply-add by the group's scales.
    #[target_feature(enable = "dotprod")]
    pub(super) unsafe fn q6k_group_dotprod<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        q6k_group::<true, T>(g, kb, rows, r0, k, out, col)
    }

    /// The same with baseline NEON: a group's products (|q − 32|·127 ≤ 32·127) summed exactly
    /// in i16 before widening.
    pub(super) unsafe fn q6k_group_neon<const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        q6k_group::<false, T>(g, kb, rows, r0, k, out, col)
    }

    /// The kernel of both Q4_K paths: the same integers and float steps as
    /// [`portable::q4k_tile`].
    #[inline(always)]
    unsafe fn q4k_group<const DOT: bool, const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let mut acc = [[vdupq_n_f32(0.0); 4]; T];
        let mut accm = [[vdupq_n_f32(0.0); 4]; T];
        let m4 = vdupq_n_u8(0x0f);
        let (k1, k2, k3) = (vdupq_n_u32(0x3f3f_3f3f), vdupq_n_u32(0x0f0f_0f0f), vdupq_n_u32(0x0303_0303));
        // Byte `s % 4` of a lane (a column) of `v`: the scale or min of sub-block `s`.
        let byte = |v: uint32x4_t, s: usize| vreinterpretq_s32_u32(vandq_u32(vshlq_u32(v, vdupq_n_s32(-8 * (s % 4) as i32)), vdupq_n_u32(0xff)));
        for b in 0..kb {
            let blk = g.as_ptr().add(b * GROUP * 144);
            for q in 0..4 {
                // Columns 4q..4q + 4: their scales and mins unpacked as in `q4k_scales_mins`.
                let d = f16x4(blk.add(8 * q));
                let dmin = f16x4(blk.add(32 + 8 * q));
                let [u0, u1, u2] = [0, 1, 2].map(|w| vreinterpretq_u32_u8(vld1q_u8(blk.add(64 + 64 * w + 16 * q))));
                let sc = [vandq_u32(u0, k1), vorrq_u32(vandq_u32(u2, k2), vshlq_n_u32::<4>(vandq_u32(vshrq_n_u32::<6>(u0), k3)))];
                let mn = [
                    vandq_u32(u1, k1),
                    vorrq_u32(vandq_u32(vshrq_n_u32::<4>(u2), k2), vshlq_n_u32::<4>(vandq_u32(vshrq_n_u32::<6>(u1), k3))),
                ];
                let mut isum = [vdupq_n_s32(0); T];
                for sb in 0..8 {
                    let scv = byte(sc[sb / 4], sb);
                    let mut w = [vdupq_n_s8(0); 8];
                    for p in 0..4 {
                        let v = vld1q_u8(blk.add(256 + 256 * sb + 64 * p + 16 * q));
                        w[p] = vreinterpretq_s8_u8(vandq_u8(v, m4));
                        w[p + 4] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                    }
                    for (i, is) in isum.iter_mut().enumerate() {
                        let x = rows.quants.as_ptr().add((r0 + i) * k + b * QK_K + 32 * sb);
                        *is = vmlaq_s32(*is, quads::<DOT, 8>(vdupq_n_s32(0), &w, x), scv);
                    }
                }
                let mins = [0, 1, 2, 3, 4, 5, 6, 7].map(|s| byte(mn[s / 4], s));
                for i in 0..T {
                    let r = r0 + i;
                    let bs = rows.sums32.as_ptr().add((r * kb + b) * 8);
                    let mut summ = vdupq_n_s32(0);
                    for (s, m) in mins.iter().enumerate() {
                        summ = vmlaq_n_s32(summ, *m, *bs.add(s) as i32);
                    }
                    let yd = vdupq_n_f32(*rows.scales.get_unchecked(r * kb + b));
                    acc[i][q] = vfmaq_f32(acc[i][q], vmulq_f32(d, yd), vcvtq_f32_s32(isum[i]));
                    accm[i][q] = vfmaq_f32(accm[i][q], vmulq_f32(dmin, yd), vcvtq_f32_s32(summ));
                }
            }
        }
        for (a, m) in acc.iter_mut().zip(&accm) {
            for (a, m) in a.iter_mut().zip(m) {
                *a = vsubq_f32(*a, *m);
            }
        }
        put_rows(&acc, out, r0, col);
    }

    /// The kernel of both Q6_K paths: the same integers and float steps as
    /// [`portable::q6k_tile`].
    #[inline(always)]
    unsafe fn q6k_group<const DOT: bool, const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8KRows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let mut acc = [[vdupq_n_f32(0.0); 4]; T];
        let m4 = vdupq_n_u8(0x0f);
        let m30 = vdupq_n_u8(0x30);
        let m3f = vdupq_n_u8(0x3f);
        let m32 = vdupq_n_s8(32);
        for b in 0..kb {
            let blk = g.as_ptr().add(b * GROUP * 210);
            for q in 0..4 {
                // Columns 4q..4q + 4.
                let d = f16x4(blk.add(8 * q));
                let mut isum = [vdupq_n_s32(0); T];
                for sb in 0..8 {
                    let at = blk.add(288 + 384 * sb + 16 * q);
                    let r = [0, 1, 2, 3].map(|p| vld1q_u8(at.add(64 * p)));
                    let nib = [vld1q_u8(at.add(256)), vld1q_u8(at.add(320))];
                    let nibs = [vandq_u8(nib[0], m4), vshrq_n_u8::<4>(nib[0]), vandq_u8(nib[1], m4), vshrq_n_u8::<4>(nib[1])];
                    let mut w = [vdupq_n_s8(0); 8];
                    for p in 0..4 {
                        // `A(p, ·)` and `B(p, ·)` of the layout.
                        let va = vandq_u8(r[p], m3f);
                        let vb = vorrq_u8(nibs[p], vandq_u8(vshrq_n_u8::<2>(r[p]), m30));
                        w[p] = vsubq_s8(vreinterpretq_s8_u8(va), m32);
                        w[p + 4] = vsubq_s8(vreinterpretq_s8_u8(vb), m32);
                    }
                    // The signed scales of the sub-block's two 16-value groups, as i32.
                    let scv = [0, 1].map(|half| {
                        let s = std::ptr::read_unaligned(blk.add(32 + 16 * (2 * sb + half) + 4 * q) as *const u32);
                        vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(s)))))
                    });
                    for (i, is) in isum.iter_mut().enumerate() {
                        let x = rows.quants.as_ptr().add((r0 + i) * k + b * QK_K + 32 * sb);
                        for (half, sc) in scv.iter().enumerate() {
                            let dot = quads::<DOT, 4>(vdupq_n_s32(0), &w[4 * half..4 * half + 4], x.add(16 * half));
                            *is = vmlaq_s32(*is, dot, *sc);
                        }
                    }
                }
                for (i, (a, is)) in acc.iter_mut().zip(isum).enumerate() {
                    let yd = vdupq_n_f32(*rows.scales.get_unchecked((r0 + i) * kb + b));
                    a[q] = vfmaq_f32(a[q], vmulq_f32(d, yd), vcvtq_f32_s32(is));
                }
            }
        }
        put_rows(&acc, out, r0, col);
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
            let a = q.matmul(&xs, 9, Path::Portable);
            if super::super::q8::simd_available() {
                assert_eq!(a, q.matmul(&xs, 9, Path::Avx2), "{dt:?} AVX2");
            }
            if super::super::q8::avx512_available() {
                assert_eq!(a, q.matmul(&xs, 9, Path::Avx512), "{dt:?} AVX-512");
            }
            if cfg!(target_arch = "aarch64") {
                assert_eq!(a, q.matmul(&xs, 9, Path::Neon), "{dt:?} NEON");
            }
            if super::super::q8::dotprod_available() {
                assert_eq!(a, q.matmul(&xs, 9, Path::NeonDot), "{dt:?} NEON sdot");
            }
        }
    }

    /// 40 columns of `dt`: the first 32 (two groups) re-arranged, each column's blocks
    /// recoverable byte for byte; the last 8 keep the file's layout.
    fn check_layout_keeps_every_byte(dt: GgmlDType, block_bytes: usize, column: impl Fn(&[u8], usize) -> Vec<u8>) {
        let w = Tensor::randn(0f32, 1., (40, 512), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let file = q.data().unwrap().into_owned();
        let ours = KMatrix::from_qtensor(&q).unwrap();
        assert_eq!(ours.data.len(), file.len());
        let row_bytes = 2 * block_bytes;
        for col in 0..32 {
            for b in 0..2 {
                let (g, c) = (col / GROUP, col % GROUP);
                let gblk = &ours.data[g * GROUP * row_bytes + b * GROUP * block_bytes..][..GROUP * block_bytes];
                assert_eq!(column(gblk, c)[..], file[col * row_bytes + b * block_bytes..][..block_bytes], "{dt:?} column {col} block {b}");
            }
        }
        assert_eq!(ours.data[32 * row_bytes..], file[32 * row_bytes..], "{dt:?} tail columns");
    }

    #[test]
    fn the_interleaved_layouts_keep_every_byte() {
        check_layout_keeps_every_byte(GgmlDType::Q4K, 144, |g, c| Q4KLayout::column(g, c).to_vec());
        check_layout_keeps_every_byte(GgmlDType::Q6K, 210, |g, c| Q6KLayout::column(g, c).to_vec());
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (q, xs, _) = setup(dt, 70, 512, 7);
            let all = q.matmul(&xs, 7, Path::best());
            for r in 0..7 {
                let one = q.matmul(&xs[r * 512..(r + 1) * 512], 1, Path::best());
                assert_eq!(one[..], all[r * 70..(r + 1) * 70], "{dt:?}");
            }
        }
    }


    #[test]
    fn parallel_quantization_equals_one_pass_over_the_blocks() {
        // 3 rows of 8960 (the 1.5B's `down_proj` input): 105 blocks, 14 tasks, the last partial.
        let (m, k) = (3, 8960);
        let xs: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let got = quantize_rows(&xs, m, k);
        let blocks = m * k / QK_K;
        let (mut q, mut d, mut s) = (vec![0i8; m * k], vec![0f32; blocks], vec![0i16; blocks * 8]);
        let mut b = vec![0i32; blocks * 16];
        quantize_blocks(&xs, &mut q, &mut d, &mut s, &mut b);
        assert_eq!((got.quants, got.scales, got.sums32), (q, d, s));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(got.bias16, b);
        assert!(b.iter().any(|&v| v != 0), "the offset terms were computed");
    }
    #[test]
    fn a_stacked_product_equals_its_parts_bit_for_bit() {
        // q/k/v as in the 1.5B's layers with a Q6_K v_proj, and a last part of 40 columns
        // (16-column groups plus the file's layout, not a whole task).
        let part = |dt, n| setup(dt, n, 512, 5).0;
        let parts = [part(GgmlDType::Q4K, 64), part(GgmlDType::Q4K, 32), part(GgmlDType::Q6K, 40)];
        assert!(KMatrix::stackable(&parts));
        let x = Tensor::randn(0f32, 1., (5, 512), &Device::Cpu).unwrap();
        let all = KMatrix::forward_stacked(&parts, &x).unwrap().to_vec2::<f32>().unwrap();
        let mut col = 0;
        for p in &parts {
            let alone = p.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for (r, row) in alone.iter().enumerate() {
                assert_eq!(row[..], all[r][col..col + p.n], "part at column {col}, row {r}");
            }
            col += p.n;
        }
        assert_eq!(col, all[0].len());
        // A part that is not a whole number of tasks wide can only come last.
        assert!(!KMatrix::stackable(&[part(GgmlDType::Q4K, 48), part(GgmlDType::Q4K, 32)]));
    }

    /// `cargo test --release -p silica-engine --lib kquant_stream_speed -- --ignored --nocapture`:
    /// one activation row against weights shaped as the 1.5B's gate/up and down projections and
    /// a 1536×1536 one, run inside the rayon pool as the forward pass is; GB/s of weights,
    /// median of 9 rounds of 3 sweeps. The first two shapes in as many copies as make 256 MB
    /// (8× the 32 MB L3: with 8 copies, 62–90 MB, part of each sweep still came from the L3),
    /// so that they stream from memory as in a decode step (≈ 1 GB); the 1536×1536 one in 8
    /// copies (10.6 MB), which stay in the L3: the kernel's speed in cache. Each round is
    /// followed by a round that only reads the same bytes, split into the same tasks
    /// ([`tiled`]) and summed, the machine's streaming rate in the same minute: the kernel's
    /// rate over it says how far the kernel is from the memory system's limit.
    #[test]
    #[ignore]
    fn kquant_stream_speed() {
        /// Columns `col0..col0 + cols` of `q`'s bytes, read and summed.
        fn read_task(q: &KMatrix, col0: usize, cols: usize) -> u64 {
            let row_bytes = q.k / QK_K * q.format.block_bytes();
            q.data[col0 * row_bytes..(col0 + cols) * row_bytes]
                .chunks_exact(8)
                .fold(0u64, |a, w| a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap())))
        }
        for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
            for (n, k) in [(8960, 1536), (1536, 8960), (1536, 1536)] {
                let (q, xs, _) = setup(dt, n, k, 1);
                let count = if n == k { 8 } else { (256usize << 20).div_ceil(q.data.len()) };
                let copies: Vec<KMatrix> = (0..count)
                    .map(|_| KMatrix { n, k, format: q.format, data: WeightBytes::from_slice(&q.data).unwrap() })
                    .collect();
                let sweep = |kernel: bool| {
                    rayon::scope(|_| {
                        let t = std::time::Instant::now();
                        for _ in 0..3 {
                            for c in &copies {
                                if kernel {
                                    std::hint::black_box(c.matmul(&xs, 1, Path::best()));
                                } else {
                                    std::hint::black_box(tiled(n, 1, ROW_TILE_K, |col0, cols, _, _, out| {
                                        out.put(0, col0, &[read_task(c, col0, cols) as f32])
                                    }));
                                }
                            }
                        }
                        (3 * count * q.data.len()) as f64 / t.elapsed().as_secs_f64() / 1e9
                    })
                };
                let (mut rates, mut reads): (Vec<f64>, Vec<f64>) = (0..9).map(|_| (sweep(true), sweep(false))).unzip();
                rates.sort_by(f64::total_cmp);
                reads.sort_by(f64::total_cmp);
                println!(
                    "{dt:?} {n}x{k} ×{count}: {:.1} GB/s (min {:.1}, max {:.1}); plain read {:.1} GB/s (min {:.1}, max {:.1})",
                    rates[4], rates[0], rates[8], reads[4], reads[0], reads[8]
                );
            }
        }
    }

    #[test]
    #[ignore]
    fn kquant_stacked_speed() {
        let (n, k) = (8960, 1536);
        let (q, xs, _) = setup(GgmlDType::Q4K, n, k, 1);
        let copies: Vec<KMatrix> = (0..16)
            .map(|_| KMatrix { n, k, format: q.format, data: WeightBytes::from_slice(&q.data).unwrap() })
            .collect();
        let mut single = Vec::new();
        let mut stacked = Vec::new();
        for it in 0..20 {
            let r = rayon::scope(|_| {
                let t = std::time::Instant::now();
                for _ in 0..2 {
                    if it % 2 == 0 {
                        for c in &copies {
                            std::hint::black_box(c.matmul(&xs, 1, Path::best()));
                        }
                    } else {
                        for c in copies.chunks(2) {
                            std::hint::black_box(KMatrix::matmul_stacked(c, &xs, 1, Path::best()));
                        }
                    }
                }
                (32 * q.data.len()) as f64 / t.elapsed().as_secs_f64() / 1e9
            });
            if it % 2 == 0 { single.push(r) } else { stacked.push(r) }
        }
        single.sort_by(f64::total_cmp);
        stacked.sort_by(f64::total_cmp);
        println!("single {:.1} stacked {:.1} GB/s", single[5], stacked[5]);
    }

    #[test]
    fn close_to_the_dequantized_product() {
        for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (q, xs, deq) = setup(dt, 48, 1024, 3);
            let x = Tensor::from_vec(xs.clone(), (3, 1024), &Device::Cpu).unwrap();
            let exact = x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for path in [Path::Portable, Path::best()] {
                let ours = q.matmul(&xs, 3, path);
                let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
                let worst = exact.iter().zip(&ours).fold(0f32, |a, (e, o)| a.max((e - o).abs()));
                assert!(worst < 0.02 * scale, "{dt:?} {path:?}: worst {worst} vs scale {scale}");
            }
        }
    }
}
