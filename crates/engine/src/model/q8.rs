//! Quantized matrix multiplication for the CPU on blocks of 32 values (Q8_0 and Q5_0), with
//! the threading and tiling shared by [`super::kquants`].
//!
//! candle 0.11's Q8_0 CPU kernel costs the same per row at 1 or 64 rows and it has no SIMD
//! kernel for Q5_0 at all. Here the weights keep the file's bytes (Q5_0: 22 bytes per 32
//! values), but at load every group of [`GROUP`] output columns is re-arranged in place (same
//! size) so that one AVX-512 register holds four consecutive weights of each of the 16
//! columns: one `vpdpbusd` against four activation bytes broadcast to every lane does 64
//! multiply-adds for 16 columns at once, and the per-block float step is done for 16 columns
//! with one multiply and one fused multiply-add (see [`Layout`]). The activations are quantized
//! once per call (per 32 values, scale `amax / 127` rounded to f16, as llama.cpp does for Q8_0
//! dot products).
//!
//! Each output element is computed by the same operations whatever the number of rows or the
//! path: per block, the exact integer dot product `isum` of the 32 weights and activations,
//! then `acc = (isum · x_scale) · w_scale + acc` (one rounding for the product, one for the
//! fused multiply-add), blocks in order. So results are batch-invariant, and the AVX-512, AVX2,
//! NEON (aarch64; with `sdot` where the CPU has the dot-product extension) and portable paths
//! are bitwise identical (tested). On NEON a 128-bit register holds four consecutive weights
//! of 4 of the 16 columns, and `sdot` by element does 16 multiply-adds for 4 columns.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

const QK: usize = 32;
/// Output columns interleaved per group (16 i32 lanes of a 512-bit register).
pub(super) const GROUP: usize = 16;
/// Rows of activations processed against each decoded weight block.
const ROW_TILE_32: usize = 8;
/// Output columns per parallel task (a multiple of [`GROUP`]): small enough that a busy core
/// only delays a sliver of the work (rayon's other thread steals the rest), large enough to
/// amortize scheduling.
pub(super) const COLS_PER_TASK: usize = 32;

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

    /// What the stored unsigned weight `u` is offset by: the weight is `u − OFFSET`.
    fn offset(self) -> i32 {
        match self {
            Format::Q8_0 => 128,
            Format::Q5_0 => 16,
        }
    }
}

/// The interleaved layout of a group of [`GROUP`] columns (the first `n − n % 16` columns;
/// the rest keep the file's layout). Block `b` of the group (`16 × block_bytes` bytes at
/// `b · 16 · block_bytes` from the group's start) holds:
///
/// - bytes 0..32: the 16 columns' f16 scales;
/// - Q8_0, bytes 32..544: for each quad `j` of 4 values (0..8), 64 bytes, bytes `4c..4c + 4`
///   = values `4j..4j + 4` of column `c` as `q + 128` (unsigned);
/// - Q5_0, bytes 32..96: for each quad `j`, a little-endian u64 whose bit `4c + i` is the
///   fifth bit of value `4j + i` of column `c`; bytes 96..352: for each `p` in 0..4, 64 bytes,
///   byte `4c + i` = value `4p + i` of column `c` (low nibble) and value `4(p + 4) + i` (high
///   nibble); the weight is `q5 − 16`.
///
/// A weight is thus `u − OFFSET` with `u` unsigned (`vpdpbusd` takes unsigned × signed bytes),
/// and `Σ (u − OFFSET)·x = Σ u·x − OFFSET·Σ x`, with `−OFFSET·Σ x` computed once per activation
/// block; all exact in i32.
struct Layout;

impl Layout {
    /// Re-arrange the first `n − n % 16` columns in place (word operations: a fraction of a
    /// second for the demo models).
    fn interleave(format: Format, data: &mut [u8], n: usize, row_bytes: usize) {
        let bb = format.block_bytes();
        let kb = row_bytes / bb;
        let mut src = vec![0u8; GROUP * row_bytes];
        for g in 0..n / GROUP {
            let region = &mut data[g * GROUP * row_bytes..(g + 1) * GROUP * row_bytes];
            src.copy_from_slice(region);
            for b in 0..kb {
                let dst = &mut region[b * GROUP * bb..(b + 1) * GROUP * bb];
                let mut high = [0u64; 8];
                for c in 0..GROUP {
                    let blk = &src[c * row_bytes + b * bb..c * row_bytes + (b + 1) * bb];
                    dst[2 * c..2 * c + 2].copy_from_slice(&blk[0..2]);
                    match format {
                        Format::Q8_0 => {
                            for j in 0..8 {
                                let u = word(blk, 2 + 4 * j) ^ 0x8080_8080;
                                dst[32 + 64 * j + 4 * c..36 + 64 * j + 4 * c].copy_from_slice(&u.to_le_bytes());
                            }
                        }
                        Format::Q5_0 => {
                            // The file's byte j already holds value j (low nibble) and j + 16.
                            for p in 0..4 {
                                dst[96 + 64 * p + 4 * c..100 + 64 * p + 4 * c].copy_from_slice(&blk[6 + 4 * p..10 + 4 * p]);
                            }
                            let qh = word(blk, 2);
                            for (j, h) in high.iter_mut().enumerate() {
                                *h |= (((qh >> (4 * j)) & 0xf) as u64) << (4 * c);
                            }
                        }
                    }
                }
                if format == Format::Q5_0 {
                    for (j, h) in high.iter().enumerate() {
                        dst[32 + 8 * j..40 + 8 * j].copy_from_slice(&h.to_le_bytes());
                    }
                }
            }
        }
    }

    /// Column `c` (of 16) of an interleaved block: its 32 unsigned values.
    fn column(format: Format, blk: &[u8], c: usize) -> [u8; QK] {
        let mut v = [0u8; QK];
        for j in 0..8 {
            for i in 0..4 {
                v[4 * j + i] = match format {
                    Format::Q8_0 => blk[32 + 64 * j + 4 * c + i],
                    Format::Q5_0 => {
                        let p = j % 4;
                        let byte = blk[96 + 64 * p + 4 * c + i];
                        let nib = if j < 4 { byte & 0x0f } else { byte >> 4 };
                        let bits = u64::from_le_bytes(blk[32 + 8 * j..40 + 8 * j].try_into().expect("8 bytes"));
                        nib | ((((bits >> (4 * c + i)) & 1) as u8) << 4)
                    }
                };
            }
        }
        v
    }
}

/// A Q8_0 or Q5_0 weight `[n, k]`: the file's bytes, groups of 16 columns interleaved.
#[derive(Debug)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    format: Format,
    /// Groups of 16 columns in the interleaved [`Layout`], then the `n % 16` remaining columns
    /// in the file's layout (`k / 32` blocks each).
    data: WeightBytes,
}

/// Activations quantized per 32 values: int8 values, an f32 scale (f16-rounded) per block, and
/// per block `−OFFSET · Σ x` for the weight format's offset.
struct Q8Rows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    bias: Vec<i32>,
}

/// Which code computes the product (all give bitwise the same result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    Portable,
    Avx2,
    Avx512,
    /// aarch64's baseline NEON (widening multiplies).
    Neon,
    /// NEON with the dot-product extension (`sdot`).
    NeonDot,
}

impl Path {
    /// The fastest path this CPU has (checked once).
    pub(super) fn best() -> Path {
        if avx512_available() {
            Path::Avx512
        } else if simd_available() {
            Path::Avx2
        } else if dotprod_available() {
            Path::NeonDot
        } else if cfg!(target_arch = "aarch64") {
            Path::Neon
        } else {
            Path::Portable
        }
    }
}

impl Q8Matrix {
    /// Take a Q8_0 or Q5_0 `QTensor` `[n, k]`.
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = t.shape().dims2()?;
        Self::from_bytes(t.dtype(), n, k, WeightBytes::from_slice(&t.data()?)?)
    }

    /// Take a weight `[n, k]` of GGML type `dtype` from its bytes as stored in the file; they
    /// are re-arranged in place.
    pub fn from_bytes(dtype: GgmlDType, n: usize, k: usize, mut data: WeightBytes) -> candle_core::Result<Self> {
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
        Layout::interleave(format, &mut data, n, k / QK * format.block_bytes());
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
        let out = with_f32_rows(x, |xs| self.matmul(xs, m, Path::best()))?;
        Tensor::from_vec(out, (m, self.n), &Device::Cpu)
    }

    fn matmul(&self, xs: &[f32], m: usize, path: Path) -> Vec<f32> {
        let rows = quantize_rows(xs, m, self.k, self.format.offset());
        let (k, kb, bb) = (self.k, self.k / QK, self.format.block_bytes());
        let row_bytes = kb * bb;
        let full = self.n / GROUP * GROUP;
        tiled(self.n, m, ROW_TILE_32, |col0, cols, r0, r1, out| {
            let mut c = 0;
            while c < cols && col0 + c < full {
                let g = &self.data[(col0 + c) * row_bytes..(col0 + c + GROUP) * row_bytes];
                // A SIMD kernel for the tile's number of rows.
                #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
                macro_rules! go {
                    ($f:ident, $q5:literal) => {
                        match r1 - r0 {
                            1 => $f::<$q5, 1>(g, kb, &rows, r0, k, out, col0 + c),
                            2 => $f::<$q5, 2>(g, kb, &rows, r0, k, out, col0 + c),
                            3 => $f::<$q5, 3>(g, kb, &rows, r0, k, out, col0 + c),
                            4 => $f::<$q5, 4>(g, kb, &rows, r0, k, out, col0 + c),
                            5 => $f::<$q5, 5>(g, kb, &rows, r0, k, out, col0 + c),
                            6 => $f::<$q5, 6>(g, kb, &rows, r0, k, out, col0 + c),
                            7 => $f::<$q5, 7>(g, kb, &rows, r0, k, out, col0 + c),
                            _ => $f::<$q5, ROW_TILE_32>(g, kb, &rows, r0, k, out, col0 + c),
                        }
                    };
                }
                match path {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Path::Avx512` is only chosen when AVX-512 F, BW and VNNI were
                    // detected at run time, `Path::Avx2` when AVX2, FMA and F16C were.
                    Path::Avx512 | Path::Avx2 => unsafe {
                        use simd::{group_avx2, group_avx512};
                        match (self.format, path) {
                            (Format::Q8_0, Path::Avx512) => go!(group_avx512, false),
                            (Format::Q5_0, Path::Avx512) => go!(group_avx512, true),
                            (Format::Q8_0, _) => go!(group_avx2, false),
                            (Format::Q5_0, _) => go!(group_avx2, true),
                        }
                    },
                    #[cfg(target_arch = "aarch64")]
                    // SAFETY: NEON is part of every aarch64 CPU; `Path::NeonDot` is only chosen
                    // when the dot-product extension was detected at run time.
                    Path::Neon | Path::NeonDot => unsafe {
                        use neon::{group_dotprod, group_neon};
                        match (self.format, path) {
                            (Format::Q8_0, Path::NeonDot) => go!(group_dotprod, false),
                            (Format::Q5_0, Path::NeonDot) => go!(group_dotprod, true),
                            (Format::Q8_0, _) => go!(group_neon, false),
                            (Format::Q5_0, _) => go!(group_neon, true),
                        }
                    },
                    _ => portable::group(self.format, g, kb, &rows, r0, r1, k, out, col0 + c),
                }
                c += GROUP;
            }
            // The `n % 16` last columns, in the file's layout.
            for c in c..cols {
                let w = &self.data[(col0 + c) * row_bytes..(col0 + c + 1) * row_bytes];
                for r in r0..r1 {
                    out.put(r, col0 + c, &[portable::dot(self.format, w, &rows, r, k)]);
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

/// A weight's bytes for the CPU kernels: a range of an anonymous mapping that asks the kernel
/// for 2 MB pages (`madvise(MADV_HUGEPAGE)`; Linux grants them when transparent huge pages are
/// in `madvise` or `always` mode, otherwise the mapping keeps 4 KB pages). A decode step
/// streams every weight once: with 4 KB pages that is a TLB miss every 4 KB (250,000 per step
/// on the 1.5B) and the hardware prefetchers restart at every page. One row against 96 MB of
/// Q4_K/Q6_K weights, 2 threads, streamed 10–35 % faster from 2 MB pages (docs/benchmarks.md).
/// The loader takes all of a file's weights from one [`WeightArena`], so that the small ones
/// (a 256×1536 `k_proj` is 221 KB) and the ends of the large ones are in 2 MB pages too. The
/// cost is at load: the kernel zeroes each fresh 2 MB page (the 1.5B loads in 3–4.6 s instead
/// of 1.7 s on the 2-core build machine).
pub struct WeightBytes {
    /// Keeps the mapping alive.
    _map: std::sync::Arc<memmap2::MmapMut>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `WeightBytes` is the only handle to its range of the mapping (ranges are handed
// out once, see `WeightArena::take`, and it is not `Clone`), so it is like a `Box<[u8]>`.
unsafe impl Send for WeightBytes {}
unsafe impl Sync for WeightBytes {}

impl WeightBytes {
    /// `len` zero bytes in a mapping of their own (the pages are taken when first written).
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        WeightArena::new(len)?.take(len)
    }

    /// A copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> std::io::Result<Self> {
        let mut w = Self::zeroed(bytes.len())?;
        w.copy_from_slice(bytes);
        Ok(w)
    }
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` lies in the mapping that `_map` keeps alive, and only this
        // handle reaches it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for WeightBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.len)
    }
}

/// One mapping, 2 MB-aligned and advised for 2 MB pages, carved into [`WeightBytes`] of
/// consecutive ranges. Reserving costs address space only: a page is taken when first written
/// (so a reserve larger than what is taken costs no memory).
pub struct WeightArena {
    map: std::sync::Arc<memmap2::MmapMut>,
    base: *mut u8,
    cap: usize,
    used: usize,
}

// SAFETY: the arena only hands out ranges nobody holds yet (see `WeightBytes`).
unsafe impl Send for WeightArena {}

impl WeightArena {
    const HUGE: usize = crate::device::HUGE_PAGE;

    /// Room for `cap` bytes.
    pub fn new(cap: usize) -> std::io::Result<Self> {
        // One extra 2 MB so that the start can be aligned; never touched.
        let mut map = memmap2::MmapMut::map_anon(cap + Self::HUGE)?;
        #[cfg(target_os = "linux")]
        if let Err(e) = map.advise(memmap2::Advice::HugePage) {
            tracing::debug!(error = %e, "no huge pages for the weights; they keep 4 KB pages");
        }
        let start = map.as_mut_ptr();
        let base = start.wrapping_add(start.align_offset(Self::HUGE));
        Ok(WeightArena { map: std::sync::Arc::new(map), base, cap, used: 0 })
    }

    /// The next `len` bytes (zero until written), each start 64-byte aligned; a mapping of
    /// their own once the reserve is used up.
    pub fn take(&mut self, len: usize) -> std::io::Result<WeightBytes> {
        let at = self.used.next_multiple_of(64);
        if at + len > self.cap {
            return WeightBytes::zeroed(len);
        }
        self.used = at + len;
        // SAFETY: `at + len ≤ cap`, and `base + cap` lies inside the mapping (it has `cap` plus
        // the alignment slack); the range is handed out only here, once.
        Ok(WeightBytes { _map: self.map.clone(), ptr: unsafe { self.base.add(at) }, len })
    }
}

/// The shared loop: `kernel(col0, cols, r0, r1, out)` writes rows `r0..r1` of output columns
/// `col0..col0 + cols` through `out`. Columns are split into tasks of [`COLS_PER_TASK`]; inside
/// a task each tile of `row_tile` activation rows meets every column of the task, so both
/// stay in cache. Which rows share a tile does not change any element's operations.
pub(super) fn tiled<F>(n: usize, m: usize, row_tile: usize, kernel: F) -> Vec<f32>
where
    F: Fn(usize, usize, usize, usize, &TaskOut) + Sync,
{
    let mut out = vec![0f32; m * n];
    let shared = SharedOut { ptr: out.as_mut_ptr(), m, n };
    (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each(|task| {
        let col0 = task * COLS_PER_TASK;
        let cols = COLS_PER_TASK.min(n - col0);
        let task_out = TaskOut { out: &shared, col0, cols };
        let mut r0 = 0;
        while r0 < m {
            let r1 = (r0 + row_tile).min(m);
            kernel(col0, cols, r0, r1, &task_out);
            r0 = r1;
        }
    });
    out
}

/// The `[m, n]` row-major result, written by parallel tasks.
struct SharedOut {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: tasks reach the buffer only through `TaskOut::put`, which writes only inside the
// task's own columns; `tiled` gives every task disjoint columns and outlives them all.
unsafe impl Sync for SharedOut {}

/// One task's view of the result: its columns `col0..col0 + cols` of every row.
pub(super) struct TaskOut<'a> {
    out: &'a SharedOut,
    col0: usize,
    cols: usize,
}

impl TaskOut<'_> {
    /// Row `r`, columns `col..col + vals.len()` (16 consecutive columns of a group: one store).
    #[inline]
    pub(super) fn put(&self, r: usize, col: usize, vals: &[f32]) {
        assert!(
            r < self.out.m && col >= self.col0 && col + vals.len() <= self.col0 + self.cols,
            "write outside the task's columns: this is a bug"
        );
        // SAFETY: in bounds (checked) and inside this task's columns, which no other task writes.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.out.ptr.add(r * self.out.n + col), vals.len()) }
    }
}

fn quantize_rows(xs: &[f32], m: usize, k: usize, offset: i32) -> Q8Rows {
    let mut quants = vec![0i8; m * k];
    let mut scales = vec![0f32; m * k / QK];
    let mut bias = vec![0i32; m * k / QK];
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
        bias[bi] = -offset * qb.iter().map(|&q| q as i32).sum::<i32>();
    }
    Q8Rows { quants, scales, bias }
}

/// `x` (|x| ≤ 127 up to rounding) to the nearest integer, ties to even, as ggml's
/// `nearest_int`: adding 1.5·2²³ leaves the rounded integer in the low mantissa bits. Plain
/// float arithmetic, so it vectorizes (`f32::round` is a libm call per value).
#[inline]
pub(super) fn nearest_i8(x: f32) -> i8 {
    let t = x + 12_582_912.0;
    ((t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000).clamp(-127, 127) as i8
}

/// Whether the AVX-512 paths (F, BW, VL and VNNI, with AVX2, FMA and F16C) can run; checked
/// once. `SILICA_NO_AVX512` in the environment turns them off (the AVX2 paths then run).
pub fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            simd_available()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::env::var_os("SILICA_NO_AVX512").is_none()
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

/// Whether the NEON paths may use the dot-product extension (`sdot`, Armv8.4 and some
/// Armv8.2 cores); checked once. Always false off aarch64.
pub fn dotprod_available() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_aarch64_feature_detected!("dotprod"))
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// The little-endian u32 at byte `at`.
#[inline]
pub(super) fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

mod portable {
    use super::*;

    /// A block's 32 values as the unsigned `u = weight + OFFSET`.
    pub fn unsigned_values(format: Format, b: &[u8]) -> [u8; QK] {
        let mut out = [0u8; QK];
        match format {
            Format::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&b[2..2 + QK]) {
                    *o = q ^ 0x80;
                }
            }
            Format::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..16 {
                    let q = b[6 + j];
                    out[j] = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                    out[j + 16] = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                }
            }
        }
        out
    }

    /// One output element: row `r` against a column `w` in the file's layout. The reference
    /// semantics of every path.
    pub fn dot(format: Format, w: &[u8], rows: &Q8Rows, r: usize, k: usize) -> f32 {
        let bb = format.block_bytes();
        let mut acc = 0f32;
        for b in 0..k / QK {
            let blk = &w[b * bb..(b + 1) * bb];
            acc = step(&unsigned_values(format, blk), f16_at(blk, 0), rows, r, b, k, acc);
        }
        acc
    }

    /// `acc = (isum · x_scale) · w_scale + acc` for block `b` of row `r`, `isum` exact.
    #[inline]
    fn step(u: &[u8; QK], wd: f32, rows: &Q8Rows, r: usize, b: usize, k: usize, acc: f32) -> f32 {
        let kb = k / QK;
        let x = &rows.quants[r * k + b * QK..r * k + (b + 1) * QK];
        let isum = rows.bias[r * kb + b] + u.iter().zip(x).map(|(&u, &x)| u as i32 * x as i32).sum::<i32>();
        (isum as f32 * rows.scales[r * kb + b]).mul_add(wd, acc)
    }

    /// Rows `r0..r1` against a group of 16 interleaved columns starting at column `col`.
    #[allow(clippy::too_many_arguments)]
    pub fn group(format: Format, g: &[u8], kb: usize, rows: &Q8Rows, r0: usize, r1: usize, k: usize, out: &TaskOut, col: usize) {
        let gb = GROUP * format.block_bytes();
        for c in 0..GROUP {
            for r in r0..r1 {
                let mut acc = 0f32;
                for b in 0..kb {
                    let blk = &g[b * gb..(b + 1) * gb];
                    let u = Layout::column(format, blk, c);
                    acc = step(&u, f16_at(blk, 2 * c), rows, r, b, k, acc);
                }
                out.put(r, col + c, &[acc]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use super::*;
    use std::arch::x86_64::*;

    /// Rows `r0..r0 + T` against a group of 16 interleaved columns (`kb` blocks), with 512-bit
    /// registers: per block, 8 `vpdpbusd` (64 multiply-adds each) per row.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn group_avx512<const Q5: bool, const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8Rows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let gb = if Q5 { 22 * GROUP } else { 34 * GROUP };
        let mut acc = [_mm512_setzero_ps(); T];
        let xq = rows.quants.as_ptr().add(r0 * k);
        let xs = rows.scales.as_ptr().add(r0 * kb);
        let xb = rows.bias.as_ptr().add(r0 * kb);
        let m4 = _mm512_set1_epi8(0x0f);
        let sixteen = _mm512_set1_epi8(16);
        for b in 0..kb {
            let blk = g.as_ptr().add(b * gb);
            let wd = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let mut w = [_mm512_setzero_si512(); 8];
            if Q5 {
                for p in 0..4 {
                    let v = _mm512_loadu_si512(blk.add(96 + 64 * p) as *const _);
                    let lo = _mm512_and_si512(v, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                    let hlo = std::ptr::read_unaligned(blk.add(32 + 8 * p) as *const u64);
                    let hhi = std::ptr::read_unaligned(blk.add(32 + 8 * (p + 4)) as *const u64);
                    w[p] = _mm512_mask_add_epi8(lo, hlo, lo, sixteen);
                    w[p + 4] = _mm512_mask_add_epi8(hi, hhi, hi, sixteen);
                }
            } else {
                for (j, wj) in w.iter_mut().enumerate() {
                    *wj = _mm512_loadu_si512(blk.add(32 + 64 * j) as *const _);
                }
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let x = xq.add(i * k + b * QK);
                let mut s = _mm512_set1_epi32(*xb.add(i * kb + b));
                for (j, wj) in w.iter().enumerate() {
                    let xv = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(4 * j) as *const i32));
                    s = _mm512_dpbusd_epi32(s, *wj, xv);
                }
                let t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(*xs.add(i * kb + b)));
                *a = _mm512_fmadd_ps(t, wd, *a);
            }
        }
        let mut res = [[0f32; GROUP]; T];
        for (r, a) in res.iter_mut().zip(acc) {
            _mm512_storeu_ps(r.as_mut_ptr(), a);
        }
        for (i, r) in res.iter().enumerate() {
            out.put(r0 + i, col, r);
        }
    }

    /// The same with AVX2 (machines without AVX-512 VNNI): each half of the group (8 columns)
    /// in a 256-bit register. Q5_0's unsigned values (≤ 31) go through `vpmaddubsw` without
    /// saturating; Q8_0's (≤ 255) would not, so there the signed weights are used with the
    /// sign trick and no offset. The integer sums are exact either way.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_avx2<const Q5: bool, const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8Rows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let gb = if Q5 { 22 * GROUP } else { 34 * GROUP };
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        let xq = rows.quants.as_ptr().add(r0 * k);
        let xs = rows.scales.as_ptr().add(r0 * kb);
        let xb = rows.bias.as_ptr().add(r0 * kb);
        let m4 = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        // Byte `4c + i` of a quad selects bit `4c + i` of that quad's u64 of fifth bits.
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        for b in 0..kb {
            let blk = g.as_ptr().add(b * gb);
            for h in 0..2 {
                let wd = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
                let mut w = [_mm256_setzero_si256(); 8];
                if Q5 {
                    for p in 0..4 {
                        let v = _mm256_loadu_si256(blk.add(96 + 64 * p + 32 * h) as *const __m256i);
                        let lo = _mm256_and_si256(v, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                        for (j, nib) in [(p, lo), (p + 4, hi)] {
                            let hb = std::ptr::read_unaligned(blk.add(32 + 8 * j + 4 * h) as *const u32);
                            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(hb as i32), spread);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                            w[j] = _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(16)));
                        }
                    }
                } else {
                    for (j, wj) in w.iter_mut().enumerate() {
                        let u = _mm256_loadu_si256(blk.add(32 + 64 * j + 32 * h) as *const __m256i);
                        *wj = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
                    }
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let x = xq.add(i * k + b * QK);
                    let mut s = _mm256_set1_epi32(if Q5 { *xb.add(i * kb + b) } else { 0 });
                    for (j, wj) in w.iter().enumerate() {
                        let xv = _mm256_set1_epi32(std::ptr::read_unaligned(x.add(4 * j) as *const i32));
                        let p = if Q5 {
                            _mm256_maddubs_epi16(*wj, xv)
                        } else {
                            _mm256_maddubs_epi16(_mm256_sign_epi8(*wj, *wj), _mm256_sign_epi8(xv, *wj))
                        };
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                    }
                    let t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(*xs.add(i * kb + b)));
                    a[h] = _mm256_fmadd_ps(t, wd, a[h]);
                }
            }
        }
        let mut res = [[0f32; GROUP]; T];
        for (r, a) in res.iter_mut().zip(acc) {
            _mm256_storeu_ps(r.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(r.as_mut_ptr().add(8), a[1]);
        }
        for (i, r) in res.iter().enumerate() {
            out.put(r0 + i, col, r);
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// Per lane `l` (a column): `acc[l] + Σ_i w[4l + i]·x[4·LANE + i]`, one `sdot` (by element).
    #[target_feature(enable = "dotprod")]
    #[inline]
    unsafe fn sdot<const LANE: i32>(mut acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        // `vdotq_laneq_s32` is not stable in Rust yet; this is the instruction it stands for.
        std::arch::asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            lane = const LANE,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }

    /// The four f16 at `p` as f32 (`fcvtl`, baseline Armv8; exact, as `half`'s conversion).
    #[inline(always)]
    pub(in super::super) unsafe fn f16x4(p: *const u8) -> float32x4_t {
        let h = vreinterpret_u16_u8(vld1_u8(p));
        let f: float32x4_t;
        // `vcvt_f32_f16` was stabilized after this crate's rust-version (1.85); `half` also
        // writes this instruction by hand.
        std::arch::asm!("fcvtl {f:v}.4s, {h:v}.4h", f = lateout(vreg) f, h = in(vreg) h, options(pure, nomem, nostack, preserves_flags));
        f
    }

    /// Per column `c` of 4: `s[c] + Σ_j Σ_i w[j][4c + i]·x[4j + i]` over the quads `w` (each
    /// register: 4 values of each of 4 columns) and the activations at `x` (4 per quad); exact.
    /// With `DOT`, one `sdot` per quad. Without, widening multiplies: the products of `RUN`
    /// quads are summed in i16 lanes, then pairs of lanes, before widening to i32, so the
    /// caller makes sure that `2 · RUN · max |w·x| ≤ 32767`.
    #[inline(always)]
    pub(in super::super) unsafe fn quads<const DOT: bool, const RUN: usize>(mut s: int32x4_t, w: &[int8x16_t], x: *const i8) -> int32x4_t {
        if DOT {
            let mut xv = vdupq_n_s8(0);
            for (j, wj) in w.iter().enumerate() {
                if j % 4 == 0 {
                    xv = vld1q_s8(x.add(4 * j));
                }
                s = match j % 4 {
                    0 => sdot::<0>(s, *wj, xv),
                    1 => sdot::<1>(s, *wj, xv),
                    2 => sdot::<2>(s, *wj, xv),
                    _ => sdot::<3>(s, *wj, xv),
                };
            }
            return s;
        }
        let quad = |j: usize| vreinterpretq_s8_s32(vdupq_n_s32(std::ptr::read_unaligned(x.add(4 * j) as *const i32)));
        for (c, run) in w.chunks(RUN).enumerate() {
            let (mut lo, mut hi) = (vdupq_n_s16(0), vdupq_n_s16(0));
            for (j, wj) in run.iter().enumerate() {
                let xv = quad(RUN * c + j);
                lo = vmlal_s8(lo, vget_low_s8(*wj), vget_low_s8(xv));
                hi = vmlal_high_s8(hi, *wj, xv);
            }
            // Lanes 4l..4l + 4 of `lo` (columns 0, 1) and `hi` (2, 3) to lane l of `s`.
            s = vpadalq_s16(s, vpaddq_s16(lo, hi));
        }
        s
    }

    /// Rows `r0..r0 + T` against a group of 16 interleaved columns (`kb` blocks) with `sdot`:
    /// per block, a quarter of the group (4 columns) at a time in 128-bit registers, 8 `sdot`
    /// per row and quarter.
    #[target_feature(enable = "dotprod")]
    pub(super) unsafe fn group_dotprod<const Q5: bool, const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8Rows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        group::<true, Q5, T>(g, kb, rows, r0, k, out, col)
    }

    /// The same with baseline NEON (no `sdot`): widening multiplies. Q5_0's unsigned values
    /// (≤ 31, products ≤ 31·127) are summed four quads at a time in i16, Q8_0's signed ones
    /// (products ≤ 128·127) one quad at a time.
    pub(super) unsafe fn group_neon<const Q5: bool, const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8Rows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        group::<false, Q5, T>(g, kb, rows, r0, k, out, col)
    }

    /// The kernel of both: Q8_0's weights are used signed (`u ^ 0x80`) with no offset, Q5_0's
    /// unsigned with the block's `−16 · Σ x`; the integer sums are exact either way, and the
    /// float steps are [`portable::group`]'s.
    #[inline(always)]
    unsafe fn group<const DOT: bool, const Q5: bool, const T: usize>(
        g: &[u8],
        kb: usize,
        rows: &Q8Rows,
        r0: usize,
        k: usize,
        out: &TaskOut,
        col: usize,
    ) {
        let gb = if Q5 { 22 * GROUP } else { 34 * GROUP };
        let mut acc = [[vdupq_n_f32(0.0); 4]; T];
        let xq = rows.quants.as_ptr().add(r0 * k);
        let xs = rows.scales.as_ptr().add(r0 * kb);
        let xb = rows.bias.as_ptr().add(r0 * kb);
        let m4 = vdupq_n_u8(0x0f);
        // Byte `i` of a register of fifth bits tests bit `i % 8` of its source byte.
        let bit = vld1q_u8([1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128].as_ptr());
        for b in 0..kb {
            let blk = g.as_ptr().add(b * gb);
            for q in 0..4 {
                // Columns 4q..4q + 4.
                let wd = f16x4(blk.add(8 * q));
                let mut w = [vdupq_n_s8(0); 8];
                if Q5 {
                    // Quad j's u64 of fifth bits has the quarter's 16 bits in bytes 2q, 2q + 1;
                    // a table lookup spreads each byte over 8 lanes (quads j, j + 1 share a load).
                    let even = vcombine_u8(vdup_n_u8(2 * q as u8), vdup_n_u8(2 * q as u8 + 1));
                    let odd = vaddq_u8(even, vdupq_n_u8(8));
                    for p in 0..4 {
                        let v = vld1q_u8(blk.add(96 + 64 * p + 16 * q));
                        for (j, nib) in [(p, vandq_u8(v, m4)), (p + 4, vshrq_n_u8::<4>(v))] {
                            let bits = vld1q_u8(blk.add(32 + 16 * (j / 2)));
                            let spread = vqtbl1q_u8(bits, if j % 2 == 0 { even } else { odd });
                            let fifth = vandq_u8(vtstq_u8(spread, bit), vdupq_n_u8(16));
                            w[j] = vreinterpretq_s8_u8(vorrq_u8(nib, fifth));
                        }
                    }
                } else {
                    for (j, wj) in w.iter_mut().enumerate() {
                        let u = vld1q_u8(blk.add(32 + 64 * j + 16 * q));
                        *wj = vreinterpretq_s8_u8(veorq_u8(u, vdupq_n_u8(0x80)));
                    }
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let x = xq.add(i * k + b * QK);
                    let s = if Q5 {
                        quads::<DOT, 4>(vdupq_n_s32(*xb.add(i * kb + b)), &w, x)
                    } else {
                        quads::<DOT, 1>(vdupq_n_s32(0), &w, x)
                    };
                    let t = vmulq_f32(vcvtq_f32_s32(s), vdupq_n_f32(*xs.add(i * kb + b)));
                    a[q] = vfmaq_f32(a[q], t, wd);
                }
            }
        }
        put_rows(&acc, out, r0, col);
    }

    /// Rows `r0..r0 + T` of a group's 16 columns (4 registers a row) into `out` at `col`.
    #[inline(always)]
    pub(in super::super) unsafe fn put_rows<const T: usize>(acc: &[[float32x4_t; 4]; T], out: &TaskOut, r0: usize, col: usize) {
        for (i, a) in acc.iter().enumerate() {
            let mut r = [0f32; GROUP];
            for (q, aq) in a.iter().enumerate() {
                vst1q_f32(r.as_mut_ptr().add(4 * q), *aq);
            }
            out.put(r0 + i, col, &r);
        }
    }
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
        // 70 columns: four interleaved groups and six in the file's layout.
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let (q, xs, _) = setup(dt, 70, 256, 19);
            let a = q.matmul(&xs, 19, Path::Portable);
            if simd_available() {
                assert_eq!(a, q.matmul(&xs, 19, Path::Avx2), "{dt:?} AVX2");
            }
            if avx512_available() {
                assert_eq!(a, q.matmul(&xs, 19, Path::Avx512), "{dt:?} AVX-512");
            }
            if cfg!(target_arch = "aarch64") {
                assert_eq!(a, q.matmul(&xs, 19, Path::Neon), "{dt:?} NEON");
            }
            if dotprod_available() {
                assert_eq!(a, q.matmul(&xs, 19, Path::NeonDot), "{dt:?} NEON sdot");
            }
        }
    }

    #[test]
    fn the_interleaved_layout_keeps_every_value() {
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let w = Tensor::randn(0f32, 1., (32, 64), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dt).unwrap();
            let file = q.data().unwrap().into_owned();
            let ours = Q8Matrix::from_qtensor(&q).unwrap();
            let f = ours.format;
            let (bb, row_bytes) = (f.block_bytes(), 2 * f.block_bytes());
            assert_eq!(ours.data.len(), file.len());
            for col in 0..32 {
                for b in 0..2 {
                    let orig = &file[col * row_bytes + b * bb..col * row_bytes + (b + 1) * bb];
                    let (g, c) = (col / GROUP, col % GROUP);
                    let gblk = &ours.data[g * GROUP * row_bytes + b * GROUP * bb..][..GROUP * bb];
                    assert_eq!(Layout::column(f, gblk, c), portable::unsigned_values(f, orig), "{dt:?}");
                    assert_eq!(gblk[2 * c..2 * c + 2], orig[0..2], "{dt:?}");
                }
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let (q, xs, _) = setup(dt, 70, 128, 7);
            let all = q.matmul(&xs, 7, Path::best());
            for r in 0..7 {
                let one = q.matmul(&xs[r * 128..(r + 1) * 128], 1, Path::best());
                assert_eq!(one[..], all[r * 70..(r + 1) * 70], "{dt:?}");
            }
        }
    }

    #[test]
    fn close_to_the_dequantized_product() {
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let (q, xs, deq) = setup(dt, 48, 512, 3);
            let x = Tensor::from_vec(xs.clone(), (3, 512), &Device::Cpu).unwrap();
            let exact = x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for path in [Path::Portable, Path::best()] {
                let ours = q.matmul(&xs, 3, path);
                let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
                let worst = exact.iter().zip(&ours).fold(0f32, |a, (e, o)| a.max((e - o).abs()));
                // Only the activations' 8-bit rounding separates the two.
                assert!(worst < 0.02 * scale, "{dt:?}: worst {worst} vs scale {scale}");
            }
        }
    }
}
