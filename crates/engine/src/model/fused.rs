//! Silica's fused CUDA kernels (`cuda/kernels.cu`) as candle ops, for FP16/BF16 on CUDA.
//!
//! A decode step launched ~29 candle ops per layer, each costing more host time (~12 µs) than
//! the GPU needs to run it, so a single stream was bound by the host. These kernels replace the
//! runs of small ops: the q/k/v bias, RoPE and cache write (one kernel instead of ~10), the
//! decode attention over the paged cache (one instead of gather + 2 matmuls + mask + softmax),
//! and SwiGLU's activation (one instead of three). Without the `cuda` feature, or for another
//! dtype or head size, [`applies`] is false and the model uses candle's ops.

use candle_core::{DType, Device, Result, Tensor};

/// `SILICA_FUSED=0` turns the kernels off (to compare against candle's ops).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| cfg!(feature = "cuda") && std::env::var("SILICA_FUSED").map(|v| v != "0").unwrap_or(true))
}

/// Largest hidden size the add + RMSNorm kernel keeps in shared memory (48 KB per block).
pub const MAX_HIDDEN: usize = 8192;

/// Whether the fused kernels serve a model with these properties.
pub fn applies(device: &Device, dtype: DType, head_dim: usize, hidden: usize) -> bool {
    enabled()
        && device.is_cuda()
        && matches!(dtype, DType::F16 | DType::BF16)
        && matches!(head_dim, 64 | 128 | 256)
        && hidden <= MAX_HIDDEN
}

/// Inputs of [`qkv_rope_write`] besides the projection output and the pools.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct QkvRope<'a> {
    pub bias: Option<&'a Tensor>,
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    /// Full RoPE tables `[max_positions, head_dim / 2]`.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// `[rows]` u32 absolute positions.
    pub positions: &'a Tensor,
    /// `[rows]` u32 cache slots the rows' K/V go to.
    pub slots: &'a Tensor,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
}

/// From the fused projection `qkv: [rows, (nh + 2 nkv) hd]` (no bias added yet): adds the bias,
/// applies Qwen3's per-head q/k norms if given, rotates q and k, writes k and v into the pools
/// `[slots, nkv, hd]` at each row's slot, and returns q `[rows, nh, hd]` (in `out` when given:
/// a [`Scratch`] buffer).
pub fn qkv_rope_write(qkv: &Tensor, p: &QkvRope<'_>, k_pool: &Tensor, v_pool: &Tensor, out: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let op = imp::QkvOp { p, k_pool, v_pool };
        match out {
            None => qkv.contiguous()?.apply_op1_no_bwd(&op),
            Some(out) => op.write_into(&qkv.contiguous()?, out),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, p, k_pool, v_pool, out);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// Attention of one new token per sequence: `q: [d, nh, hd]` over the pools at the slots of
/// `table: [d, max_len]` (u32, row `i` valid for its first `lens[i]` entries), scaled by
/// `scale`. Returns `[d, nh * hd]`: the parts and the output in `scratch`'s buffers when given
/// and large enough, newly allocated otherwise.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    table: &Tensor,
    lens: &Tensor,
    num_kv_heads: usize,
    scale: f32,
    scratch: Option<&Scratch>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let op = imp::PagedOp { k_pool, v_pool, table, lens, num_kv_heads, scale };
        let (d, max_len) = table.dims2()?;
        match scratch.filter(|s| s.fits(d, max_len)) {
            None => q.contiguous()?.apply_op1_no_bwd(&op),
            Some(s) => op.write_into(&q.contiguous()?, &s.part_acc, &s.part_ml, &s.attn(d)?),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k_pool, v_pool, table, lens, num_kv_heads, scale, scratch);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// Most rows Silica's GEMV kernel can take (it is compiled for 1..=8).
pub const GEMV_MAX_ROWS: usize = 8;

/// Most rows it is used for: `SILICA_GEMV_ROWS` (default 8; 2 where the PTX predates sm_80,
/// which has no tensor-core kernel); cuBLAS above.
pub(crate) fn gemv_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        let default = if tc_ptx() { GEMV_MAX_ROWS } else { 2 };
        std::env::var("SILICA_GEMV_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(default).min(GEMV_MAX_ROWS)
    })
}

/// Whether the PTX has the tensor-core GEMV (built for sm_80 or later).
fn tc_ptx() -> bool {
    option_env!("SILICA_KERNELS_CAP").and_then(|c| c.parse::<u32>().ok()).is_some_and(|c| c >= 80)
}

/// From how many rows the GEMV runs on the tensor cores (`silica_gemv_tc_*`):
/// `SILICA_GEMV_TC_ROWS` (default 3). The CUDA-core kernel converts and multiplies every weight
/// once per row, so by 4 rows it is bound by instructions (measured slower than cuBLAS).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn gemv_tc_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        if !tc_ptx() {
            return usize::MAX;
        }
        std::env::var("SILICA_GEMV_TC_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
    })
}

/// Whether [`gemv_swiglu`] takes `x`: every row count the GEMV takes (the CUDA-core and the
/// tensor-core kernels both have the SwiGLU epilogue).
pub fn gemv_swiglu_applies(x: &Tensor) -> bool {
    x.dim(0).is_ok_and(|rows| (1..=gemv_rows()).contains(&rows))
}

/// Whether `x W^T` goes to Silica's GEMV kernel: on CUDA in f16/bf16, 1 to
/// [`gemv_rows`] rows, contiguous operands whose rows are whole 16-byte loads. cuBLAS
/// picks kernels for such skinny products that reach 35–80 % of the memory bandwidth (measured
/// with ncu on the H100) and costs more host time per call.
pub fn gemv_applies(x: &Tensor, w: &Tensor) -> bool {
    let (Ok((rows, k)), Ok((_, wk))) = (x.dims2(), w.dims2()) else { return false };
    let elem = x.dtype().size_in_bytes();
    enabled()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F16 | DType::BF16)
        && w.dtype() == x.dtype()
        && (1..=gemv_rows()).contains(&rows)
        && k == wk
        && k % 8 == 0
        && x.is_contiguous()
        && w.is_contiguous()
        && x.layout().start_offset() * elem % 16 == 0
        && w.layout().start_offset() * elem % 16 == 0
}

/// `x: [rows, k]`, `w: [n, k]` → `x W^T: [rows, n]` (when [`gemv_applies`]), in `out` when
/// given (a [`Scratch`] buffer of that shape).
pub fn gemv(x: &Tensor, w: &Tensor, out: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let op = imp::GemvOp { swiglu: false };
        match out {
            None => x.apply_op2_no_bwd(w, &op),
            Some(out) => op.write_into(x, w, out),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, out);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// SwiGLU's first half in one kernel: `w: [2 inter, k]` the gate and up projections with their
/// rows interleaved (see `Linear::interleave_halves`) → `silu(x gate^T) * (x up^T): [rows,
/// inter]` (when [`gemv_applies`]), in `scratch`'s buffer when given. The same values as the
/// product followed by [`silu_mul`] (each product rounded first); the sums may split
/// differently.
pub fn gemv_swiglu(x: &Tensor, w: &Tensor, scratch: Option<&Scratch>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let op = imp::GemvOp { swiglu: true };
        match scratch {
            None => x.apply_op2_no_bwd(w, &op),
            Some(s) => op.write_into(x, w, &s.act(x.dim(0)?)?),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, scratch);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// The residual add and the next RMSNorm in one kernel: `(x + h, rmsnorm(x + h) * weight)`,
/// both `[rows, hidden]`; into `scratch`'s residual and normed buffers when given (the residual
/// may be `x` itself: the add is done in place).
pub fn add_rmsnorm(x: &Tensor, h: &Tensor, weight: &Tensor, eps: f32, scratch: Option<&Scratch>) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        let op = imp::AddNormOp { weight, eps };
        let (x, h) = (x.contiguous()?, h.contiguous()?);
        match scratch {
            None => {
                let out = x.apply_op2_no_bwd(&h, &op)?;
                Ok((out.get(0)?, out.get(1)?))
            }
            Some(s) => {
                let rows = x.dim(0)?;
                let (resid, normed) = (s.resid(rows)?, s.normed(rows)?);
                op.write_into(&x, &h, &resid, &normed)?;
                Ok((resid, normed))
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, h, weight, eps, scratch);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// `gate_up: [rows, 2 inter]` (gate columns, then up; with `interleaved` gate j and up j side
/// by side) → `silu(gate) * up: [rows, inter]`, into `scratch`'s buffer when given.
pub fn silu_mul(gate_up: &Tensor, interleaved: bool, scratch: Option<&Scratch>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let gate_up = gate_up.contiguous()?;
        let op = imp::SiluMulOp { interleaved };
        match scratch {
            None => gate_up.apply_op1_no_bwd(&op),
            Some(s) => op.write_into(&gate_up, &s.act(gate_up.dim(0)?)?),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (gate_up, interleaved, scratch);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// Fewest rows a [`Scratch`] serves (more when `SILICA_CUDA_GRAPH` captures larger steps): the
/// rows of a captured decode step by default, a 4-beam search.
pub const SCRATCH_ROWS: usize = 4;

/// Most positions a [`Scratch`] serves (its attention parts: 4 rows × 28 heads × 512 parts ×
/// 128 × 4 bytes = 29 MB for the 7B); longer steps allocate their parts.
pub const SCRATCH_MAX_LEN: usize = 32768;

/// The sizes a [`Scratch`] is made for.
#[derive(Debug, Clone, Copy)]
pub struct ScratchDims {
    /// Most rows of a step it serves.
    pub rows: usize,
    /// Most positions a decode row attends over (the model's context).
    pub max_len: usize,
    pub hidden: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
}

/// A decode step's activations in buffers made once per model. Inside a captured CUDA graph
/// every tensor candle allocates becomes a memory node between the kernels, and those nodes
/// stop a kernel from starting while the previous one ends (programmatic dependent launch, see
/// `imp::launch`); steps of single-token rows therefore write every intermediate of the fused
/// kernels and the GEMVs here (the same buffers in every layer: the kernels run in stream
/// order). Only the embedding, the first norm and the head still allocate, at the ends of the
/// step.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Scratch {
    dims: ScratchDims,
    resid: Tensor,
    normed: Tensor,
    qkv: Tensor,
    q: Tensor,
    attn: Tensor,
    h: Tensor,
    gate_up: Tensor,
    act: Tensor,
    /// The split decode attention's parts (f32, flat): weighted V sums, then (max, sum) pairs.
    part_acc: Tensor,
    part_ml: Tensor,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Scratch {
    /// Positions per part of the split decode attention (`PD_SPLIT` in kernels.cu).
    pub const SPLIT: usize = 64;

    pub fn new(d: ScratchDims, dtype: DType, device: &Device) -> Result<Self> {
        let (r, nh, hd) = (d.rows, d.num_heads, d.head_dim);
        let parts = d.max_len.div_ceil(Self::SPLIT).max(1);
        let buf = |cols: usize| Tensor::zeros((r, cols), dtype, device);
        Ok(Scratch {
            resid: buf(d.hidden)?,
            normed: buf(d.hidden)?,
            qkv: buf((nh + 2 * d.num_kv_heads) * hd)?,
            q: Tensor::zeros((r, nh, hd), dtype, device)?,
            attn: buf(nh * hd)?,
            h: buf(d.hidden)?,
            gate_up: buf(2 * d.intermediate)?,
            act: buf(d.intermediate)?,
            part_acc: Tensor::zeros(r * nh * parts * hd, DType::F32, device)?,
            part_ml: Tensor::zeros(r * nh * parts * 2, DType::F32, device)?,
            dims: d,
        })
    }

    /// Whether a decode step of `rows` single-token rows attending over up to `max_len`
    /// positions fits.
    pub fn fits(&self, rows: usize, max_len: usize) -> bool {
        rows <= self.dims.rows && max_len <= self.dims.max_len
    }

    fn first(t: &Tensor, rows: usize) -> Result<Tensor> {
        t.narrow(0, 0, rows)
    }

    /// The first `rows` rows of one of `scratch`'s buffers (`buf`, e.g. `Scratch::qkv`), if
    /// there is a scratch.
    pub fn rows_of(scratch: Option<&Scratch>, buf: fn(&Scratch, usize) -> Result<Tensor>, rows: usize) -> Result<Option<Tensor>> {
        scratch.map(|s| buf(s, rows)).transpose()
    }
    pub fn resid(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.resid, rows)
    }
    pub fn normed(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.normed, rows)
    }
    pub fn qkv(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.qkv, rows)
    }
    pub fn q(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.q, rows)
    }
    pub fn attn(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.attn, rows)
    }
    pub fn h(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.h, rows)
    }
    pub fn gate_up(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.gate_up, rows)
    }
    pub fn act(&self, rows: usize) -> Result<Tensor> {
        Self::first(&self.act, rows)
    }
}

/// Whether [`select`] runs on this device (CUDA with the kernels on).
pub fn select_applies(device: &Device) -> bool {
    enabled() && device.is_cuda()
}

/// What [`select`] picked for one row.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub enum Selected {
    /// The token of a [`Selection::Greedy`] or [`Selection::Sample`] row.
    Token(u32),
    /// The `n` most likely tokens of a [`Selection::TopN`] row with their log-softmax values,
    /// most likely first (ties: lower id first).
    Top(Vec<(u32, f32)>),
    /// The row has a NaN or `+inf` logit, or only `-inf`: the host reports the error.
    NonFinite,
}

/// Next-token selection for every row of `logits: [rows, vocab]` on the device
/// (`cuda/select.cu`): a few bytes per row come back instead of the vocabulary's logits.
pub fn select(logits: &Tensor, rows: &[crate::sampling::Selection]) -> Result<Vec<Selected>> {
    let (out, nout, vocab) = launch_selection(logits, rows)?;
    let words = out.flatten_all()?.to_vec1::<u32>()?;
    Ok(read_selection(rows, &words, nout, vocab))
}

/// The selection kernels for `rows` over `logits`, launched: `[rows, nout * 2]` u32 on the
/// device (token and value pairs; `u32::MAX` first for a row that is not finite), `nout`, and
/// the vocabulary size.
fn launch_selection(logits: &Tensor, rows: &[crate::sampling::Selection]) -> Result<(Tensor, usize, usize)> {
    use crate::sampling::Selection;
    let (n, vocab) = logits.dims2()?;
    if n != rows.len() {
        candle_core::bail!("select: {n} rows of logits for {} selections", rows.len());
    }
    if vocab == 0 || vocab > i32::MAX as usize {
        candle_core::bail!("select: vocabulary of {vocab}");
    }
    let nout = rows.iter().map(|r| if let Selection::TopN(k) = r { (*k).clamp(1, vocab) } else { 1 }).max().unwrap_or(1);
    // `SelParam` of select.cu: u (f64), inv_temp, top_p, min_p (f32), top_k, mode, n (u32).
    let params = |rows: &[Selection]| -> Vec<u32> {
        let mut words = Vec::with_capacity(rows.len() * 8);
        for r in rows {
            let (u, inv_t, top_p, min_p, top_k, mode, k) = match *r {
                Selection::Greedy => (0f64, 1f32, 1f32, 0f32, 0u32, 0u32, 1u32),
                Selection::Sample { u, temperature, top_k, top_p, min_p } => {
                    let top_k = top_k.filter(|&k| k < vocab).map_or(0, |k| k as u32);
                    (u, 1.0 / temperature, top_p, min_p, top_k, 1, 1)
                }
                Selection::TopN(k) => (0.0, 1.0, 1.0, 0.0, 0, 2, k.clamp(1, vocab) as u32),
            };
            let ub = u.to_bits();
            words.extend([ub as u32, (ub >> 32) as u32, inv_t.to_bits(), top_p.to_bits(), min_p.to_bits(), top_k, mode, k]);
        }
        words
    };
    #[cfg(feature = "cuda")]
    {
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        // Every row greedy (nout is then 1): the argmax split over many blocks per row, no
        // parameters to upload.
        let out = if rows.iter().all(|r| matches!(r, Selection::Greedy)) {
            logits.apply_op1_no_bwd(&imp::ArgmaxOp)?
        } else if nout <= imp::TOPN_MAX && rows.iter().all(|r| matches!(r, Selection::TopN(_))) {
            // Every row a beam step's candidates: two kernels; each row's `nout` best (the host
            // keeps each row's first k once sorted).
            logits.apply_op1_no_bwd(&imp::TopNOp { n: nout })?
        } else if rows.iter().all(|r| matches!(r, Selection::Sample { .. })) {
            // Every row sampled: one kernel (nout is then 1).
            let params = Tensor::from_vec(params(rows), (rows.len(), 8), logits.device())?;
            logits.apply_op2_no_bwd(&params, &imp::SampleOp)?
        } else {
            let params = Tensor::from_vec(params(rows), (rows.len(), 8), logits.device())?;
            logits.apply_op2_no_bwd(&params, &imp::SelectOp { nout })?
        };
        Ok((out, nout, vocab))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (params, nout);
        candle_core::bail!("device selection needs the `cuda` feature")
    }
}

/// Each row's result from the selection's output words (`[rows, nout * 2]`, row-major).
fn read_selection(rows: &[crate::sampling::Selection], out: &[u32], nout: usize, vocab: usize) -> Vec<Selected> {
    use crate::sampling::Selection;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let o = &out[i * nout * 2..(i + 1) * nout * 2];
            if o[0] == u32::MAX {
                return Selected::NonFinite;
            }
            match r {
                Selection::TopN(k) => {
                    let mut top: Vec<(u32, f32)> =
                        o.chunks_exact(2).take((*k).clamp(1, vocab)).filter(|p| p[0] != u32::MAX).map(|p| (p[0], f32::from_bits(p[1]))).collect();
                    top.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    Selected::Top(top)
                }
                _ => Selected::Token(o[0]),
            }
        })
        .collect()
}

/// Page-locked host buffers that selections launched ahead ([`select_start`]) copy their
/// results into, each with the event that marks its copy done; reused from step to step (a
/// page-locked allocation costs far more than a step's copy).
#[derive(Default)]
pub(crate) struct Readbacks {
    #[cfg(feature = "cuda")]
    free: Vec<imp::Readback>,
}

/// A selection launched by [`select_start`]: the kernels and the copy of their few words to
/// the host are on the stream; the host reads them with [`wait`](Self::wait) while the device
/// goes on with whatever was launched after.
pub(crate) struct PendingSelection {
    rows: Vec<crate::sampling::Selection>,
    vocab: usize,
    /// `[rows, nout * 2]` u32 on the device: each row's token (or its `nout` best tokens, for
    /// top-n rows) and value bits.
    out: Tensor,
    nout: usize,
    /// `out` on its way to the host.
    words: PendingWords,
}

/// [`select`] without waiting for the result: see [`PendingSelection`].
pub(crate) fn select_start(logits: &Tensor, rows: &[crate::sampling::Selection], pool: &mut Readbacks) -> Result<PendingSelection> {
    let (out, nout, vocab) = launch_selection(logits, rows)?;
    let words = read_start(&out, pool)?;
    Ok(PendingSelection { rows: rows.to_vec(), vocab, out, nout, words })
}

impl PendingSelection {
    /// The rows' tokens on the device, `[rows]` u32, for the next step's input ids: a row that
    /// is not finite (which the host fails when it reads the result) gives the vocabulary's
    /// last id rather than an index outside the embedding. Rows that take one token only.
    pub fn tokens(&self) -> Result<Tensor> {
        let rows = self.rows.len();
        if self.nout != 1 {
            candle_core::bail!("tokens() of a top-{} selection", self.nout);
        }
        self.out.narrow(1, 0, 1)?.minimum((self.vocab - 1) as u32)?.reshape(rows)
    }

    /// The selection's output on the device (`[rows, nout * 2]` u32), and `nout`.
    pub fn output(&self) -> (&Tensor, usize) {
        (&self.out, self.nout)
    }

    /// Waits for the copy to the host and reads each row's result; the buffer goes back to
    /// `pool`.
    pub fn wait(self, pool: &mut Readbacks) -> Result<Vec<Selected>> {
        let words = self.words.wait(pool)?;
        Ok(read_selection(&self.rows, &words, self.nout, self.vocab))
    }

    /// Drops a selection whose result is not needed, keeping its buffer for the next one (a
    /// later copy into it is ordered after this one on the stream).
    pub fn discard(self, pool: &mut Readbacks) {
        self.words.discard(pool);
    }
}

/// Words a read-back buffer holds ([`select_start`], [`read_start`]): the results of up to 64
/// rows of one token, or 4 rows of 16 candidates.
pub(crate) const READBACK_WORDS: usize = 128;

/// A few u32 words of a device tensor on their way to the host ([`read_start`]).
pub(crate) struct PendingWords {
    n: usize,
    #[cfg(feature = "cuda")]
    readback: imp::Readback,
}

/// Enqueues the copy of `t` (contiguous u32, at most [`READBACK_WORDS`]) to the host, without
/// waiting.
pub(crate) fn read_start(t: &Tensor, pool: &mut Readbacks) -> Result<PendingWords> {
    #[cfg(feature = "cuda")]
    {
        Ok(PendingWords { n: t.elem_count(), readback: imp::Readback::copy(t, pool)? })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = pool;
        candle_core::bail!("read-back of {} words needs the `cuda` feature", t.elem_count())
    }
}

impl PendingWords {
    /// Waits for the copy and returns the words; the buffer goes back to `pool`.
    pub fn wait(self, pool: &mut Readbacks) -> Result<Vec<u32>> {
        #[cfg(feature = "cuda")]
        {
            let words = self.readback.words(self.n);
            pool.free.push(self.readback);
            words
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (pool, self.n);
            unreachable!("a PendingWords exists only with the `cuda` feature")
        }
    }

    /// Drops words that are not needed, keeping the buffer.
    pub fn discard(self, pool: &mut Readbacks) {
        #[cfg(feature = "cuda")]
        pool.free.push(self.readback);
        #[cfg(not(feature = "cuda"))]
        let _ = (pool, self.n);
    }
}

/// Whether [`copy_blocks`] serves a cache on this device (CUDA with the kernels on, f16/bf16/f32
/// pools whose positions are whole 16-byte units).
pub fn copy_blocks_applies(device: &Device, dtype: DType, position_elems: usize) -> bool {
    enabled() && device.is_cuda() && matches!(dtype, DType::F16 | DType::BF16 | DType::F32) && position_elems * dtype.size_in_bytes() % 16 == 0
}

/// Copies whole cache blocks `(src, dst)` inside every pool `[blocks * block_size, ...]` with one
/// kernel launch. The pairs must not overlap (no block both read and written).
pub fn copy_blocks(pools: &[&Tensor], pairs: &[(u32, u32)], block_size: usize) -> Result<()> {
    if pools.is_empty() {
        return Ok(());
    }
    let block_bytes = block_bytes_checked(pools, block_size, pairs.iter().map(|&(s, d)| s.max(d)), "copy_blocks")?;
    #[cfg(feature = "cuda")]
    {
        imp::copy_blocks(pools, pairs, block_bytes)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = block_bytes;
        candle_core::bail!("batched block copies need the `cuda` feature")
    }
}

/// The bytes of one block of `pools[0]` (`[blocks * block_size, ...]`), after checking that every
/// block of `blocks` lies inside the pools.
fn block_bytes_checked(pools: &[&Tensor], block_size: usize, blocks: impl Iterator<Item = u32>, what: &str) -> Result<usize> {
    let Some(first) = pools.first() else { candle_core::bail!("{what}: no cache pools") };
    let slots = first.dim(0)?;
    if let Some(b) = blocks.max().filter(|&b| (b as usize + 1) * block_size > slots) {
        candle_core::bail!("{what}: block {b} outside the pool of {slots} slots");
    }
    Ok(first.elem_count() / slots * block_size * first.dtype().size_in_bytes())
}

/// What the host knows of a beam step whose successor [`beam_advance`] prepares on the device.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct BeamAdvance<'a> {
    /// Candidates per row (`BeamSearch::candidates_per_row`); the selection's rows hold them.
    pub k: usize,
    pub num_beams: usize,
    /// Each live beam's sum of logprobs (the step's rows, in order).
    pub cum: &'a [f32],
    /// A fresh block per row: the next step's last block of that row.
    pub spares: &'a [u32],
    pub eos: &'a [u32],
    /// Each live beam's blocks; those over positions `0..pos` are used.
    pub blocks: &'a [&'a [u32]],
    /// The next step's position (every live beam's length once this step is in).
    pub pos: usize,
    pub block_size: usize,
}

/// The next beam step's inputs decided and written on the device (select.cu,
/// `silica_beam_advance`, then `silica_copy_blocks` for the parents' partial last blocks), from
/// this step's top-n selection `top` (`[rows, nout * 2]`, [`PendingSelection::output`]) into a
/// captured graph's buffers: `ids`, `write_slots`, `table` (`[rows * capacity]`). Returns the
/// decision on the device: `[rows * 2 + 1]` u32, (parent, token) per row, then 1 when
/// `num_beams` beams were taken.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn beam_advance(top: &Tensor, nout: usize, a: &BeamAdvance<'_>, ids: &Tensor, write_slots: &Tensor, table: &Tensor, capacity: usize, pools: &[&Tensor]) -> Result<Tensor> {
    let rows = a.cum.len();
    let nblk = a.pos.div_ceil(a.block_size);
    if rows == 0 || rows > 8 || a.spares.len() != rows || a.blocks.len() != rows || a.k == 0 || a.k > nout || rows * a.k > 256 {
        candle_core::bail!("beam_advance: {rows} rows, {} spares, {} block lists, {} of {nout} candidates", a.spares.len(), a.blocks.len(), a.k);
    }
    if top.dims2()? != (rows, nout * 2) || ids.dims1()? != rows || write_slots.dims1()? != rows || table.elem_count() != rows * capacity || a.pos >= capacity {
        candle_core::bail!("beam_advance: top {:?}, ids {:?}, table {:?}, position {} of {capacity}", top.shape(), ids.shape(), table.shape(), a.pos);
    }
    if a.blocks.iter().any(|b| b.len() < nblk) {
        candle_core::bail!("beam_advance: a live beam has fewer than the {nblk} blocks of {} positions", a.pos);
    }
    let blocks = a.spares.iter().chain(a.blocks.iter().flat_map(|b| &b[..nblk])).copied();
    let block_bytes = block_bytes_checked(pools, a.block_size, blocks, "beam_advance")?;
    #[cfg(feature = "cuda")]
    {
        imp::beam_advance(top, nout, a, (ids, write_slots, table, capacity), pools, block_bytes)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = block_bytes;
        candle_core::bail!("beam steps decided on the device need the `cuda` feature")
    }
}

/// Writes `data` into the u32 tensor `t` in place (a CUDA graph's input buffer).
#[cfg(feature = "cuda")]
pub fn upload_u32(t: &Tensor, data: &[u32]) -> Result<()> {
    if t.elem_count() != data.len() || t.dtype() != DType::U32 {
        candle_core::bail!("upload: {} values into {:?} {:?}", data.len(), t.shape(), t.dtype());
    }
    t.inplace_op1(&imp::Upload(data))
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaSlice, CudaView, DevicePtr, DeviceRepr, DeviceSlice, LaunchConfig};
    use candle_core::cuda_backend::cudarc::driver::CudaFunction;
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

    use super::QkvRope;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/silica_kernels.ptx"));
    const MODULE: &str = "silica_kernels";

    fn suffix(dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::F16 => Ok("f16"),
            DType::BF16 => Ok("bf16"),
            other => bail!("Silica's fused kernels take f16 or bf16, not {other:?}"),
        }
    }

    /// The op's own input, as a contiguous view.
    fn input<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("fused kernel input is not contiguous") };
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// Another tensor's device memory as a contiguous view; `what` names it in errors.
    fn view<'a, T: CudaDType>(s: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        let Storage::Cuda(s) = s else { bail!("{what} is not on the CUDA device") };
        let Some((a, b)) = l.contiguous_offsets() else { bail!("{what} is not contiguous") };
        if a * std::mem::size_of::<T>() % 16 != 0 {
            bail!("{what} does not start on a 16-byte boundary");
        }
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// The device address of a view, for an optional (nullable) kernel argument.
    fn raw_ptr<T>(v: &CudaView<'_, T>) -> u64 {
        let (ptr, _sync) = v.device_ptr(v.stream());
        ptr
    }

    /// The device address of a kernel's freshly allocated output.
    fn slice_ptr<T>(s: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = s.device_ptr(s.stream());
        ptr
    }

    /// A kernel argument as the driver reads it: a device address or a 4/8-byte scalar.
    #[derive(Clone, Copy)]
    enum Arg {
        Ptr(u64),
        U64(u64),
        I32(i32),
        F32(f32),
    }

    impl Arg {
        /// The value in an 8-byte slot; the driver reads the parameter's size from its start
        /// (little-endian hosts: the low bytes of a 4-byte scalar come first).
        fn slot(self) -> u64 {
            match self {
                Arg::Ptr(v) | Arg::U64(v) => v,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
            }
        }
    }

    /// Whether kernels are launched with programmatic dependent launch: the GPU is sm_90 or
    /// later, the PTX was built for it, and `SILICA_PDL` is not `0`. Then a kernel starts while
    /// the one before it finishes (its launch latency hidden; a GEMV streams its first weights
    /// meanwhile), each waiting in `pdl_wait` (kernels.cu) before it touches shared data.
    fn pdl_on(dev: &CudaDevice) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            let ptx_cap: u32 = env!("SILICA_KERNELS_CAP").parse().unwrap_or(0);
            let major = dev
                .cuda_stream()
                .context()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .unwrap_or(0);
            let on = ptx_cap >= 90 && major >= 9 && std::env::var("SILICA_PDL").map(|v| v != "0").unwrap_or(true);
            tracing::debug!(ptx_cap, major, on, "programmatic dependent launch");
            on
        })
    }

    /// Launches `func` on candle's stream (with programmatic dependent launch where
    /// [`pdl_on`]).
    ///
    /// # Safety
    /// `args` match the kernel's parameters in number, order and size, and every address and
    /// size in them keeps the kernel inside its buffers.
    unsafe fn launch(dev: &CudaDevice, func: &CudaFunction, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        // SAFETY: passed on from the caller.
        unsafe { launch_with(dev, func, cfg, args, false) }
    }

    /// [`launch`], or with `cooperative` a cooperative launch: every block of the grid is
    /// resident at once (the driver refuses a grid too large for that), so blocks may wait for
    /// each other; no programmatic dependent launch then.
    unsafe fn launch_with(dev: &CudaDevice, func: &CudaFunction, cfg: LaunchConfig, args: &[Arg], cooperative: bool) -> Result<()> {
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        // On the stack: no allocation per launch (the most any Silica kernel takes is 15).
        const MAX_ARGS: usize = 16;
        if args.len() > MAX_ARGS {
            bail!("a kernel launch with {} arguments (at most {MAX_ARGS})", args.len());
        }
        let mut slots = [0u64; MAX_ARGS];
        for (s, a) in slots.iter_mut().zip(args) {
            *s = a.slot();
        }
        let mut params = [std::ptr::null_mut::<std::ffi::c_void>(); MAX_ARGS];
        for (p, s) in params.iter_mut().zip(slots.iter_mut()) {
            *p = (s as *mut u64).cast();
        }
        // SAFETY: a plain C struct for which all zeroes is a valid value.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        if cooperative {
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attr.value.cooperative = 1;
        } else {
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
        }
        let pdl = cooperative || pdl_on(dev);
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        // SAFETY: `config`, `params` and the slots they point to outlive the call (the driver
        // copies the parameters at launch); the caller vouches for the arguments.
        unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .w()
    }

    fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
        bail!("{name} runs on CUDA only")
    }

    /// `CustomOp1` for an op with `run::<T>(storage, layout)`: f16/bf16 on CUDA only; with
    /// `f32`, for an op with `run(storage, layout)` over f32 logits `[rows, vocab]`.
    macro_rules! custom_op1 {
        // The dispatch inside `cuda_fwd` (`self` comes in as a token, for hygiene).
        (@fwd $this:ident, $s:ident, $l:ident, $name:literal, f32) => {{
            if $s.dtype() != DType::F32 || $l.shape().rank() != 2 {
                bail!("{}: logits {:?} {:?}, want [rows, vocab] f32", $name, $l.shape(), $s.dtype());
            }
            $this.run($s, $l)
        }};
        (@fwd $this:ident, $s:ident, $l:ident, $name:literal) => {
            match $s.dtype() {
                DType::F16 => $this.run::<half::f16>($s, $l),
                DType::BF16 => $this.run::<half::bf16>($s, $l),
                other => bail!("{}: unsupported dtype {other:?}", $name),
            }
        };
        ($op:ty, $name:literal $(, $kind:ident)?) => {
            impl CustomOp1 for $op {
                fn name(&self) -> &'static str {
                    $name
                }
                fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                    cpu_unsupported($name)
                }
                fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
                    custom_op1!(@fwd self, s, l, $name $(, $kind)?)
                }
            }
        };
    }

    /// `CustomOp2` for an op with `run::<T>(s1, l1, s2, l2)`: f16/bf16 on CUDA only.
    macro_rules! custom_op2 {
        ($op:ty, $name:literal) => {
            impl CustomOp2 for $op {
                fn name(&self) -> &'static str {
                    $name
                }
                fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                    cpu_unsupported($name)
                }
                fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
                    match s1.dtype() {
                        DType::F16 => self.run::<half::f16>(s1, l1, s2, l2),
                        DType::BF16 => self.run::<half::bf16>(s1, l1, s2, l2),
                        other => bail!("{}: unsupported dtype {other:?}", $name),
                    }
                }
            }
        };
    }

    /// The CUDA device a tensor lives on.
    fn cuda_device(t: &Tensor, what: &str) -> Result<CudaDevice> {
        match t.device() {
            candle_core::Device::Cuda(d) => Ok(d.clone()),
            _ => bail!("{what} is not on the CUDA device"),
        }
    }

    /// A kernel's output buffer (a [`super::Scratch`] view): `dims` of the input's dtype,
    /// contiguous; its device address.
    fn out_addr(t: &Tensor, dtype: DType, dims: &[usize], what: &str) -> Result<u64> {
        if t.dtype() != dtype || t.dims() != dims {
            bail!("{what}: buffer {:?} {:?}, the kernel writes {dims:?} {dtype:?}", t.dims(), t.dtype());
        }
        addr(t, what)
    }

    pub(super) struct QkvOp<'a> {
        pub p: &'a QkvRope<'a>,
        pub k_pool: &'a Tensor,
        pub v_pool: &'a Tensor,
    }

    impl QkvOp<'_> {
        fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let (rows, _) = l.shape().dims2()?;
            let (nh, hd) = (self.p.num_heads, self.p.head_dim);
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(rows * nh * hd)? };
            self.launch(dev, s.dtype(), raw_ptr(&input::<T>(s, l)?), l.shape().dims2()?, slice_ptr(&out))?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, nh, hd))))
        }

        /// Into `out: [rows, nh, hd]`.
        pub(super) fn write_into(&self, qkv: &Tensor, out: &Tensor) -> Result<Tensor> {
            let dev = cuda_device(qkv, "qkv")?;
            let dims = qkv.dims2()?;
            let o = out_addr(out, qkv.dtype(), &[dims.0, self.p.num_heads, self.p.head_dim], "q")?;
            self.launch(&dev, qkv.dtype(), addr(qkv, "qkv")?, dims, o)?;
            Ok(out.clone())
        }

        fn launch(&self, dev: &CudaDevice, dtype: DType, qkv: u64, (rows, width): (usize, usize), out: u64) -> Result<()> {
            let p = self.p;
            let (nh, nkv, hd) = (p.num_heads, p.num_kv_heads, p.head_dim);
            if width != (nh + 2 * nkv) * hd {
                bail!("fused qkv: width {width}, expected ({nh} + 2 * {nkv}) * {hd}");
            }
            for (t, what) in [(p.positions, "positions"), (p.slots, "write slots")] {
                if t.dims1()? != rows {
                    bail!("fused qkv: {what} has {} entries for {rows} rows", t.dims1()?);
                }
            }
            let opt = |t: Option<&Tensor>, what: &str| t.map_or(Ok(0), |t| addr(t, what));
            let func = dev.get_or_load_custom_func(&format!("silica_qkv_rope_{}", suffix(dtype)?), MODULE, PTX)?;
            // The pools are written in place: the kernel is the only user of those slots, and
            // everything runs on candle's one stream.
            let args = [
                Arg::Ptr(qkv),
                Arg::Ptr(opt(p.bias, "qkv bias")?),
                Arg::Ptr(opt(p.q_norm, "q_norm")?),
                Arg::Ptr(opt(p.k_norm, "k_norm")?),
                Arg::Ptr(addr(p.cos, "rope cos")?),
                Arg::Ptr(addr(p.sin, "rope sin")?),
                Arg::Ptr(addr(p.positions, "positions")?),
                Arg::Ptr(addr(p.slots, "write slots")?),
                Arg::Ptr(out),
                Arg::Ptr(addr(self.k_pool, "k pool")?),
                Arg::Ptr(addr(self.v_pool, "v pool")?),
                Arg::I32(nh as i32),
                Arg::I32(nkv as i32),
                Arg::I32(hd as i32),
                Arg::F32(p.eps),
            ];
            let cfg = LaunchConfig {
                grid_dim: ((nh + 2 * nkv) as u32, rows as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: ((hd + 32) * 4) as u32,
            };
            // SAFETY: the arguments match `silica_qkv_rope_*` in kernels.cu; shapes checked above
            // and by the caller (pools hold every slot in `slots`, `out` holds rows * nh * hd).
            unsafe { launch(dev, &func, cfg, &args) }
        }
    }


    pub(super) struct PagedOp<'a> {
        pub k_pool: &'a Tensor,
        pub v_pool: &'a Tensor,
        pub table: &'a Tensor,
        pub lens: &'a Tensor,
        pub num_kv_heads: usize,
        pub scale: f32,
    }

    impl PagedOp<'_> {
        /// Parts per (sequence, head) for this step's table.
        fn splits(&self) -> Result<usize> {
            let splits = self.table.dims2()?.1.div_ceil(super::Scratch::SPLIT).max(1);
            if splits * 4 > 48 * 1024 {
                bail!("paged decode: {splits} parts of {} positions, over the combine's shared memory", super::Scratch::SPLIT);
            }
            Ok(splits)
        }

        fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let (d, nh, hd) = l.shape().dims3()?;
            let splits = self.splits()?;
            // SAFETY: every part's m, l and acc are written by its block (zeros past a
            // sequence's end) before the combine reads them; the combine writes all of `out`.
            let (part_acc, part_ml, out) = unsafe {
                (dev.alloc::<f32>(d * nh * splits * hd)?, dev.alloc::<f32>(d * nh * splits * 2)?, dev.alloc::<T>(d * nh * hd)?)
            };
            let bufs = (slice_ptr(&part_acc), slice_ptr(&part_ml), slice_ptr(&out));
            self.launch(dev, s.dtype(), raw_ptr(&input::<T>(s, l)?), (d, nh, hd), bufs)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((d, nh * hd))))
        }

        /// With the parts in `part_acc`/`part_ml` (f32, flat, large enough) and the output in
        /// `out: [d, nh * hd]`.
        pub(super) fn write_into(&self, q: &Tensor, part_acc: &Tensor, part_ml: &Tensor, out: &Tensor) -> Result<Tensor> {
            let dev = cuda_device(q, "q")?;
            let (d, nh, hd) = q.dims3()?;
            let splits = self.splits()?;
            if part_acc.elem_count() < d * nh * splits * hd || part_ml.elem_count() < d * nh * splits * 2 {
                bail!("paged decode: part buffers too small for {d} x {nh} x {splits} parts");
            }
            let bufs = (
                out_addr(part_acc, DType::F32, part_acc.dims(), "attention parts")?,
                out_addr(part_ml, DType::F32, part_ml.dims(), "attention part weights")?,
                out_addr(out, q.dtype(), &[d, nh * hd], "attention output")?,
            );
            self.launch(&dev, q.dtype(), addr(q, "q")?, (d, nh, hd), bufs)?;
            Ok(out.clone())
        }

        fn launch(&self, dev: &CudaDevice, dtype: DType, q: u64, (d, nh, hd): (usize, usize, usize), (part_acc, part_ml, out): (u64, u64, u64)) -> Result<()> {
            let (td, max_len) = self.table.dims2()?;
            if td != d || self.lens.dims1()? != d {
                bail!("paged decode: {d} queries, table {td} rows, {} lengths", self.lens.dims1()?);
            }
            if nh % self.num_kv_heads != 0 {
                bail!("paged decode: {nh} heads over {} kv heads", self.num_kv_heads);
            }
            let splits = self.splits()?;
            let name = format!("silica_paged_part_{}_{hd}", suffix(dtype)?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let (nh_i, nkv_i, len_i) = (nh as i32, self.num_kv_heads as i32, max_len as i32);
            let args = [
                Arg::Ptr(q),
                Arg::Ptr(addr(self.k_pool, "k pool")?),
                Arg::Ptr(addr(self.v_pool, "v pool")?),
                Arg::Ptr(addr(self.table, "slot table")?),
                Arg::Ptr(addr(self.lens, "lengths")?),
                Arg::Ptr(part_acc),
                Arg::Ptr(part_ml),
                Arg::I32(nh_i),
                Arg::I32(nkv_i),
                Arg::I32(len_i),
                Arg::F32(self.scale),
            ];
            // PD_THREADS in kernels.cu: 4 threads per position of a part.
            let threads = 4 * super::Scratch::SPLIT as u32;
            let cfg = LaunchConfig { grid_dim: (nh as u32, d as u32, splits as u32), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match `silica_paged_part_*`; every slot in `table` is
            // inside the pools (the engine reserved them), `lens[i] <= max_len`; the part
            // buffers hold d * nh * splits parts (checked by the callers).
            unsafe { launch(dev, &func, cfg, &args) }?;
            let func = dev.get_or_load_custom_func(&format!("silica_paged_combine_{}", suffix(dtype)?), MODULE, PTX)?;
            let args = [Arg::Ptr(part_acc), Arg::Ptr(part_ml), Arg::Ptr(out), Arg::I32(nh_i), Arg::I32(splits as i32)];
            let cfg = LaunchConfig {
                grid_dim: (nh as u32, d as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: (splits * 4) as u32,
            };
            // SAFETY: the arguments match `silica_paged_combine_*`; the parts are the ones
            // written above, `splits` per (sequence, head); `out` holds d * nh * hd.
            unsafe { launch(dev, &func, cfg, &args) }
        }
    }


    pub(super) struct SiluMulOp {
        pub interleaved: bool,
    }

    impl SiluMulOp {
        fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let (rows, w) = l.shape().dims2()?;
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(rows * (w / 2))? };
            self.launch(dev, s.dtype(), raw_ptr(&input::<T>(s, l)?), (rows, w), slice_ptr(&out))?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, w / 2))))
        }

        /// Into `out: [rows, inter]`.
        pub(super) fn write_into(&self, gu: &Tensor, out: &Tensor) -> Result<Tensor> {
            let dev = cuda_device(gu, "gate/up")?;
            let (rows, w) = gu.dims2()?;
            let o = out_addr(out, gu.dtype(), &[rows, w / 2], "silu output")?;
            self.launch(&dev, gu.dtype(), addr(gu, "gate/up")?, (rows, w), o)?;
            Ok(out.clone())
        }

        fn launch(&self, dev: &CudaDevice, dtype: DType, gu: u64, (rows, w): (usize, usize), out: u64) -> Result<()> {
            if w % 2 != 0 {
                bail!("silu_mul: odd width {w}");
            }
            let inter = w / 2;
            let n = rows * inter;
            let func = dev.get_or_load_custom_func(&format!("silica_silu_mul_{}", suffix(dtype)?), MODULE, PTX)?;
            let args = [Arg::Ptr(gu), Arg::Ptr(out), Arg::U64(n as u64), Arg::I32(inter as i32), Arg::I32(self.interleaved as i32)];
            let cfg = LaunchConfig::for_num_elems(n as u32);
            // SAFETY: the arguments match `silica_silu_mul_*`; `out` holds rows * inter.
            unsafe { launch(dev, &func, cfg, &args) }
        }
    }


    /// `silica_gemv_*` (or with `swiglu`, `silica_gemv_swiglu_*`: half as many outputs).
    pub(super) struct GemvOp {
        pub swiglu: bool,
    }

    impl GemvOp {
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device();
            let (rows, k) = xl.shape().dims2()?;
            let (n, _) = wl.shape().dims2()?;
            let n_y = if self.swiglu { n / 2 } else { n };
            let x = input::<T>(xs, xl)?;
            let w = input::<T>(ws, wl)?;
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(rows * n_y)? };
            self.launch(dev, xs.dtype(), raw_ptr(&x), raw_ptr(&w), slice_ptr(&out), (rows, k), wl.shape().dims2()?)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, n_y))))
        }

        /// `x W^T` (or its SwiGLU) into `out: [rows, n]` (`[rows, n / 2]`).
        pub(super) fn write_into(&self, x: &Tensor, w: &Tensor, out: &Tensor) -> Result<Tensor> {
            let dev = cuda_device(x, "gemv input")?;
            let (rows, k) = x.dims2()?;
            let (n, wk) = w.dims2()?;
            if w.dtype() != x.dtype() {
                bail!("silica-gemv: x {:?}, w {:?}", x.dtype(), w.dtype());
            }
            let n_y = if self.swiglu { n / 2 } else { n };
            let o = out_addr(out, x.dtype(), &[rows, n_y], "gemv output")?;
            self.launch(&dev, x.dtype(), addr(x, "gemv input")?, addr(w, "gemv weight")?, o, (rows, k), (n, wk))?;
            Ok(out.clone())
        }

        #[allow(clippy::too_many_arguments)]
        fn launch(&self, dev: &CudaDevice, dtype: DType, x: u64, w: u64, out: u64, (rows, k): (usize, usize), (n, wk): (usize, usize)) -> Result<()> {
            if wk != k || rows == 0 || rows > super::GEMV_MAX_ROWS || k % 8 != 0 || (self.swiglu && n % 2 != 0) {
                bail!("silica-gemv: x [{rows}, {k}], w [{n}, {wk}]");
            }
            if rows >= super::gemv_tc_rows() {
                let kind = if self.swiglu { "gemv_tc_swiglu" } else { "gemv_tc" };
                let func = dev.get_or_load_custom_func(&format!("silica_{kind}_{}_{rows}", suffix(dtype)?), MODULE, PTX)?;
                let args = [Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(out), Arg::I32(n as i32), Arg::I32(k as i32)];
                // A block of 8 warps per 8 output columns (kernels.cu, gemv_tc); with SwiGLU the
                // 4 (gate, up) pairs among them.
                let cfg = LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the arguments match `silica_gemv_tc_*` / `silica_gemv_tc_swiglu_*`;
                // alignment as below; `out` holds rows * n (rows * n / 2).
                return unsafe { launch(dev, &func, cfg, &args) };
            }
            let kind = if self.swiglu { "gemv_swiglu" } else { "gemv" };
            let func = dev.get_or_load_custom_func(&format!("silica_{kind}_{}_{rows}", suffix(dtype)?), MODULE, PTX)?;
            // Warps per output column (split K): as many as leave each lane at least 1.75
            // 16-byte loads, up to the block's 8. Measured on the H100 (scripts/gpu/
            // kernel_bench.cu, sweep): short per-warp runs and many blocks beat long runs, e.g.
            // the 7B's o projection 11.1 µs with 4 warps per column and 8 loads per lane, 10.4
            // with 8 warps and 4 loads; the 3B's gate/up (k = 2048) 30.4 µs with 4 warps, 38.0
            // with 8 (one load per lane). SwiGLU needs the (gate, up) pairs in one block: at
            // most 4 warps per column.
            let mut wr_log2 = if self.swiglu { 2u32 } else { 3 };
            while wr_log2 > 0 && k / 8 < 56 << wr_log2 {
                wr_log2 -= 1;
            }
            let cols_per_block = 8 >> wr_log2;
            let args = [Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(out), Arg::I32(n as i32), Arg::I32(k as i32), Arg::I32(wr_log2 as i32)];
            let cfg = LaunchConfig { grid_dim: (n.div_ceil(cols_per_block) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match `silica_gemv_*` / `silica_gemv_swiglu_*`; alignment
            // checked by `gemv_applies` (the allocating path) or `addr` (16-byte starts); `out`
            // holds rows * n (rows * n / 2).
            unsafe { launch(dev, &func, cfg, &args) }
        }
    }


    pub(super) struct AddNormOp<'a> {
        pub weight: &'a Tensor,
        pub eps: f32,
    }

    impl AddNormOp<'_> {
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            hs: &CudaStorage,
            hl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device();
            let (rows, hdim) = xl.shape().dims2()?;
            if hl.shape().dims2()? != (rows, hdim) {
                bail!("silica-add-rmsnorm: x {:?}, h {:?}", xl.shape(), hl.shape());
            }
            let (x, h) = (input::<T>(xs, xl)?, input::<T>(hs, hl)?);
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(2 * rows * hdim)? };
            let s = slice_ptr(&out);
            let n = s + (rows * hdim * std::mem::size_of::<T>()) as u64;
            self.launch(dev, xs.dtype(), (raw_ptr(&x), raw_ptr(&h)), (s, n), (rows, hdim))?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, rows, hdim))))
        }

        /// Into `s_out` (which may be `x`) and `n_out`, both `[rows, hidden]`.
        pub(super) fn write_into(&self, x: &Tensor, h: &Tensor, s_out: &Tensor, n_out: &Tensor) -> Result<()> {
            let dev = cuda_device(x, "residual")?;
            let dims = x.dims2()?;
            if h.dims2()? != dims {
                bail!("silica-add-rmsnorm: x {:?}, h {:?}", x.shape(), h.shape());
            }
            let outs = (out_addr(s_out, x.dtype(), &[dims.0, dims.1], "residual")?, out_addr(n_out, x.dtype(), &[dims.0, dims.1], "normed")?);
            self.launch(&dev, x.dtype(), (addr(x, "residual")?, addr(h, "residual delta")?), outs, dims)
        }

        fn launch(&self, dev: &CudaDevice, dtype: DType, (x, h): (u64, u64), (s, n): (u64, u64), (rows, hdim): (usize, usize)) -> Result<()> {
            if self.weight.dims1()? != hdim {
                bail!("silica-add-rmsnorm: hidden {hdim}, weight {:?}", self.weight.shape());
            }
            if hdim > super::MAX_HIDDEN {
                bail!("silica-add-rmsnorm: hidden size {hdim} over the kernel's shared memory");
            }
            let func = dev.get_or_load_custom_func(&format!("silica_add_rmsnorm_{}", suffix(dtype)?), MODULE, PTX)?;
            let args = [
                Arg::Ptr(x),
                Arg::Ptr(h),
                Arg::Ptr(addr(self.weight, "norm weight")?),
                Arg::Ptr(s),
                Arg::Ptr(n),
                Arg::I32(rows as i32),
                Arg::I32(hdim as i32),
                Arg::F32(self.eps),
            ];
            // One thread per 16-byte unit of a row (the kernel's vector path; fewer warps in the
            // reduction than a full block), whole warps, at most 1024.
            let threads = hdim.div_ceil(8).next_multiple_of(32).min(1024) as u32;
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: ((hdim + 32) * 4) as u32,
            };
            // SAFETY: the arguments match `silica_add_rmsnorm_*`; every buffer holds rows * hdim.
            unsafe { launch(dev, &func, cfg, &args) }
        }
    }

    /// `(rows, vocab)` of a selection's inputs: f32 logits `[rows, vocab]`, u32 parameters
    /// `[rows, 8]`.
    fn selection_shape(op: &str, ls: &CudaStorage, ll: &Layout, ps: &CudaStorage, pl: &Layout) -> Result<(usize, usize)> {
        let (rows, vocab) = ll.shape().dims2()?;
        if pl.shape().dims2()? != (rows, 8) || ls.dtype() != DType::F32 || ps.dtype() != DType::U32 {
            bail!("{op}: logits {:?} {:?}, params {:?} {:?}", ll.shape(), ls.dtype(), pl.shape(), ps.dtype());
        }
        Ok((rows, vocab))
    }

    /// `silica_select`: logits `[rows, vocab]` f32 and the rows' `SelParam`s (8 u32 words each)
    /// → `[rows, nout, 2]` u32.
    pub(super) struct SelectOp {
        pub nout: usize,
    }

    impl CustomOp2 for SelectOp {
        fn name(&self) -> &'static str {
            "silica-select"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("silica-select")
        }
        fn cuda_fwd(&self, ls: &CudaStorage, ll: &Layout, ps: &CudaStorage, pl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = ls.device();
            let (rows, vocab) = selection_shape("silica-select", ls, ll, ps, pl)?;
            let logits = input::<f32>(ls, ll)?;
            let params = input::<u32>(ps, pl)?;
            if raw_ptr(&params) % 8 != 0 {
                bail!("silica-select: parameters not 8-byte aligned");
            }
            let nparts = SELECT_PARTS.min(vocab).max(1);
            // SAFETY: the kernel writes the slots the host reads (slot 0 of every row; the first
            // n of a top-n row); silica_select_stats writes every part (16 bytes: SelStats in
            // select.cu) and zeroes the histograms before silica_select_hist and silica_select
            // read them.
            let (out, parts, g_cnt, g_mass, cuts, pmass) = unsafe {
                (
                    dev.alloc::<u32>(rows * self.nout * 2)?,
                    dev.alloc::<u32>(rows * nparts * 4)?,
                    dev.alloc::<u32>(rows * SEL_BINS)?,
                    dev.alloc::<u64>(rows * SEL_BINS)?,
                    dev.alloc::<u64>(rows)?,
                    dev.alloc::<u64>(rows * nparts)?,
                )
            };
            let vocab_i = vocab as i32;
            let grid_parts = LaunchConfig { grid_dim: (nparts as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let func = dev.get_or_load_custom_func("silica_select_stats", MODULE, PTX)?;
            let args = [Arg::Ptr(raw_ptr(&logits)), Arg::I32(vocab_i), Arg::Ptr(slice_ptr(&parts)), Arg::Ptr(slice_ptr(&g_cnt)), Arg::Ptr(slice_ptr(&g_mass))];
            // SAFETY: the arguments match `silica_select_stats`.
            unsafe { launch(dev, &func, grid_parts, &args) }?;
            let func = dev.get_or_load_custom_func("silica_select_hist", MODULE, PTX)?;
            let args = [
                Arg::Ptr(raw_ptr(&logits)),
                Arg::I32(vocab_i),
                Arg::Ptr(raw_ptr(&params)),
                Arg::Ptr(slice_ptr(&parts)),
                Arg::Ptr(slice_ptr(&g_cnt)),
                Arg::Ptr(slice_ptr(&g_mass)),
            ];
            // SAFETY: the arguments match `silica_select_hist`; same grid as the stats.
            unsafe { launch(dev, &func, grid_parts, &args) }?;
            let func = dev.get_or_load_custom_func("silica_select", MODULE, PTX)?;
            let args = [
                Arg::Ptr(raw_ptr(&logits)),
                Arg::I32(vocab_i),
                Arg::Ptr(raw_ptr(&params)),
                Arg::Ptr(slice_ptr(&out)),
                Arg::I32(self.nout as i32),
                Arg::Ptr(slice_ptr(&parts)),
                Arg::I32(nparts as i32),
                Arg::Ptr(slice_ptr(&g_cnt)),
                Arg::Ptr(slice_ptr(&g_mass)),
                Arg::Ptr(slice_ptr(&cuts)),
            ];
            let grid_rows = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match `silica_select` in select.cu; it writes every row's cut.
            unsafe { launch(dev, &func, grid_rows, &args) }?;
            // Sampled rows: their kept mass by parts, then the draw.
            let func = dev.get_or_load_custom_func("silica_select_mass", MODULE, PTX)?;
            let args = [
                Arg::Ptr(raw_ptr(&logits)),
                Arg::I32(vocab_i),
                Arg::Ptr(raw_ptr(&params)),
                Arg::Ptr(slice_ptr(&parts)),
                Arg::Ptr(slice_ptr(&cuts)),
                Arg::Ptr(slice_ptr(&pmass)),
            ];
            // SAFETY: the arguments match `silica_select_mass`; same parts as the stats.
            unsafe { launch(dev, &func, grid_parts, &args) }?;
            let func = dev.get_or_load_custom_func("silica_select_draw", MODULE, PTX)?;
            let args = [
                Arg::Ptr(raw_ptr(&logits)),
                Arg::I32(vocab_i),
                Arg::Ptr(raw_ptr(&params)),
                Arg::Ptr(slice_ptr(&parts)),
                Arg::I32(nparts as i32),
                Arg::Ptr(slice_ptr(&cuts)),
                Arg::Ptr(slice_ptr(&pmass)),
                Arg::Ptr(slice_ptr(&out)),
                Arg::I32(self.nout as i32),
            ];
            // SAFETY: the arguments match `silica_select_draw`; it writes slot 0 of each sampled
            // row, which silica_select left to it.
            unsafe { launch(dev, &func, grid_rows, &args) }?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, self.nout * 2))))
        }
    }

    /// Parts per row of silica_select_stats / silica_select_hist (select.cu), and its bins.
    const SELECT_PARTS: usize = 64;
    const SEL_BINS: usize = 1024;
    /// Longest candidate list of a cut (SEL_CAP) and gathers per row (SEL_ROUNDS), select.cu.
    const SEL_CAP: usize = 4096;
    const SEL_ROUNDS: usize = 2;
    /// Threads per block of silica_select_sample (SEL_THREADS).
    const SEL_THREADS: u32 = 1024;
    /// Fewest parts per row worth the one-kernel path; below, the five kernels.
    const SAMPLE_MIN_PARTS: usize = 8;

    /// `silica_select_sample`: every row sampled (nout 1), in one cooperative kernel of up to
    /// SELECT_PARTS blocks per row; the same output as [`SelectOp`], which takes the rows when
    /// the device cannot hold SAMPLE_MIN_PARTS blocks of every row at once.
    pub(super) struct SampleOp;

    impl CustomOp2 for SampleOp {
        fn name(&self) -> &'static str {
            "silica-select-sample"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("silica-select-sample")
        }
        fn cuda_fwd(&self, ls: &CudaStorage, ll: &Layout, ps: &CudaStorage, pl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = ls.device();
            let (rows, vocab) = selection_shape("silica-select-sample", ls, ll, ps, pl)?;
            let func = dev.get_or_load_custom_func("silica_select_sample", MODULE, PTX)?;
            // How many blocks of this kernel the device holds at once (one per SM at 64
            // registers a thread): the parts of every row must fit.
            let per_sm = func.occupancy_max_active_blocks_per_multiprocessor(SEL_THREADS, 0, None).w()? as usize;
            let sms = dev.cuda_stream().context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()? as usize;
            let nparts = SELECT_PARTS.min(per_sm * sms / rows.max(1)).min(vocab);
            if nparts < SAMPLE_MIN_PARTS {
                return SelectOp { nout: 1 }.cuda_fwd(ls, ll, ps, pl);
            }
            let logits = input::<f32>(ls, ll)?;
            let params = input::<u32>(ps, pl)?;
            if raw_ptr(&params) % 8 != 0 {
                bail!("silica-select-sample: parameters not 8-byte aligned");
            }
            // SAFETY: the kernel writes both words of every row's output, every part's stats
            // (16 bytes: SelStats in select.cu) and kept mass before any block reads them (a
            // barrier of the row's blocks in between), and zeroes the histograms before adding
            // to them; a list's entries are written before its length is read, up to that length.
            let (out, parts, g_cnt, g_mass, lists, pmass) = unsafe {
                (
                    dev.alloc::<u32>(rows * 2)?,
                    dev.alloc::<u32>(rows * nparts * 4)?,
                    dev.alloc::<u32>(rows * SEL_BINS)?,
                    dev.alloc::<u64>(rows * SEL_BINS)?,
                    dev.alloc::<u64>(rows * SEL_ROUNDS * SEL_CAP)?,
                    dev.alloc::<u64>(rows * nparts)?,
                )
            };
            // The barriers' arrival counters and the lists' lengths start at zero.
            let sync = dev.alloc_zeros::<u32>(rows * 4)?;
            let args = [
                Arg::Ptr(raw_ptr(&logits)),
                Arg::I32(vocab as i32),
                Arg::Ptr(raw_ptr(&params)),
                Arg::Ptr(slice_ptr(&out)),
                Arg::I32(1),
                Arg::Ptr(slice_ptr(&parts)),
                Arg::Ptr(slice_ptr(&g_cnt)),
                Arg::Ptr(slice_ptr(&g_mass)),
                Arg::Ptr(slice_ptr(&lists)),
                Arg::Ptr(slice_ptr(&sync)),
                Arg::Ptr(slice_ptr(&pmass)),
            ];
            let cfg = LaunchConfig { grid_dim: (nparts as u32, rows as u32, 1), block_dim: (SEL_THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match `silica_select_sample`; the grid fits the device at
            // once (checked above; the cooperative launch fails rather than start it otherwise),
            // which the kernel's barriers between a row's blocks need.
            unsafe { launch_with(dev, &func, cfg, &args, true) }?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, 2))))
        }
    }

    /// Most candidates per row of [`TopNOp`] (TOPN_MAX in select.cu).
    pub(super) const TOPN_MAX: usize = 16;
    /// Words of select.cu's `TopNPart`: m, s, finite, bad, then TOPN_MAX values and ids.
    const TOPN_PART_WORDS: usize = 4 + 2 * TOPN_MAX;
    /// Parts per row of silica_topn_part.
    const TOPN_PARTS: usize = 64;

    /// `silica_topn_part` + `silica_topn_combine`: logits `[rows, vocab]` f32 → `[rows, n, 2]`
    /// u32, each row's `n` best tokens and their log-softmax values (as `silica_select` writes
    /// for SEL_TOPN rows of `n`).
    pub(super) struct TopNOp {
        pub n: usize,
    }

    impl TopNOp {
        fn run(&self, ls: &CudaStorage, ll: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = ls.device();
            let (rows, vocab) = ll.shape().dims2()?;
            let n = self.n;
            if n == 0 || n > TOPN_MAX {
                bail!("silica-topn: {n} per row, want 1..={TOPN_MAX}");
            }
            let logits = input::<f32>(ls, ll)?;
            let nparts = TOPN_PARTS.min(vocab).max(1);
            let per = vocab.div_ceil(nparts);
            // The part's logits in shared memory (48 KB without opting in).
            if per * 4 > 48 * 1024 {
                bail!("silica-topn: {per} logits per part, over the shared memory");
            }
            // SAFETY: silica_topn_part writes every field of every part before the combine
            // reads it; the combine writes both words of all n slots of every row.
            let (parts, out) = unsafe { (dev.alloc::<u32>(rows * nparts * TOPN_PART_WORDS)?, dev.alloc::<u32>(rows * n * 2)?) };
            let func = dev.get_or_load_custom_func("silica_topn_part", MODULE, PTX)?;
            let args = [Arg::Ptr(raw_ptr(&logits)), Arg::I32(vocab as i32), Arg::I32(n as i32), Arg::Ptr(slice_ptr(&parts))];
            let cfg = LaunchConfig { grid_dim: (nparts as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: (per * 4) as u32 };
            // SAFETY: the arguments match `silica_topn_part` (TOPN_THREADS = 256 threads).
            unsafe { launch(dev, &func, cfg, &args) }?;
            let func = dev.get_or_load_custom_func("silica_topn_combine", MODULE, PTX)?;
            let args = [Arg::Ptr(slice_ptr(&parts)), Arg::I32(nparts as i32), Arg::I32(n as i32), Arg::Ptr(slice_ptr(&out)), Arg::I32(n as i32)];
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (nparts * n * 8) as u32 };
            // SAFETY: the arguments match `silica_topn_combine`; `parts` holds nparts per row.
            unsafe { launch(dev, &func, cfg, &args) }?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, n * 2))))
        }
    }

    /// `silica_argmax_part` + `silica_argmax_combine`: logits `[rows, vocab]` f32 → `[rows, 2]`
    /// u32, as `silica_select` writes for greedy rows.
    pub(super) struct ArgmaxOp;

    /// Blocks per row of the argmax (select.cu): ~2.4k logits each on a 152k vocabulary.
    const ARGMAX_PARTS: usize = 64;

    impl ArgmaxOp {
        fn run(&self, ls: &CudaStorage, ll: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = ls.device();
            let (rows, vocab) = ll.shape().dims2()?;
            let logits = input::<f32>(ls, ll)?;
            let parts_n = ARGMAX_PARTS.min(vocab).max(1);
            // SAFETY: every part (16 bytes: ArgPart in select.cu) is written by its block before
            // the combine reads it; the combine writes both words of every row.
            let (parts, out) = unsafe { (dev.alloc::<u32>(rows * parts_n * 4)?, dev.alloc::<u32>(rows * 2)?) };
            let func = dev.get_or_load_custom_func("silica_argmax_part", MODULE, PTX)?;
            let args = [Arg::Ptr(raw_ptr(&logits)), Arg::I32(vocab as i32), Arg::Ptr(slice_ptr(&parts))];
            let cfg = LaunchConfig { grid_dim: (parts_n as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match `silica_argmax_part`.
            unsafe { launch(dev, &func, cfg, &args) }?;
            let func = dev.get_or_load_custom_func("silica_argmax_combine", MODULE, PTX)?;
            let args = [Arg::Ptr(slice_ptr(&parts)), Arg::I32(parts_n as i32), Arg::Ptr(slice_ptr(&out))];
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match `silica_argmax_combine`; `parts` holds parts_n per row.
            unsafe { launch(dev, &func, cfg, &args) }?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, 2))))
        }
    }

    /// The device address of a contiguous tensor's first element (16-byte aligned); `what` names
    /// it in errors. A kernel that writes there in place relies on the caller keeping the tensor
    /// alive and alone in using those bytes until the stream has run it.
    fn addr(t: &Tensor, what: &str) -> Result<u64> {
        let (s, l) = t.storage_and_layout();
        Ok(match t.dtype() {
            DType::F16 => raw_ptr(&view::<half::f16>(&s, l, what)?),
            DType::BF16 => raw_ptr(&view::<half::bf16>(&s, l, what)?),
            DType::F32 => raw_ptr(&view::<f32>(&s, l, what)?),
            DType::U32 => raw_ptr(&view::<u32>(&s, l, what)?),
            other => bail!("{what} of {other:?}"),
        })
    }

    /// The CUDA device of the pools and the words that start every upload for
    /// `silica_copy_blocks`: each pool's address (two words), `extra` words of room after them.
    fn pool_words(pools: &[&Tensor], block_bytes: usize, extra: usize) -> Result<(CudaDevice, Vec<u32>)> {
        let candle_core::Device::Cuda(dev) = pools[0].device() else { bail!("kv pools are not on CUDA") };
        if block_bytes % 16 != 0 {
            bail!("blocks of {block_bytes} bytes are not whole 16-byte units");
        }
        let mut words = Vec::with_capacity(2 * pools.len() + extra);
        for p in pools {
            let a = addr(p, "kv pool")?;
            words.extend([a as u32, (a >> 32) as u32]);
        }
        Ok((dev.clone(), words))
    }

    /// Launches `silica_copy_blocks`: `npairs` (src, dst) block pairs at `pairs_at` in each of the
    /// `npools` pools whose addresses are at `pools_at`.
    ///
    /// SAFETY: both addresses hold what they say on the device until the kernel has run; every
    /// block is inside its pool and no block is the source of one pair and the destination of
    /// another.
    unsafe fn launch_copy_blocks(dev: &CudaDevice, (pools_at, npools): (u64, usize), (pairs_at, npairs): (u64, usize), block_bytes: usize) -> Result<()> {
        let func = dev.get_or_load_custom_func("silica_copy_blocks", MODULE, PTX)?;
        let args = [Arg::Ptr(pools_at), Arg::Ptr(pairs_at), Arg::U64((block_bytes / 16) as u64)];
        let cfg = LaunchConfig { grid_dim: (npairs as u32, npools as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `silica_copy_blocks`; the rest is the caller's.
        unsafe { launch(dev, &func, cfg, &args) }
    }

    pub(super) fn copy_blocks(pools: &[&Tensor], pairs: &[(u32, u32)], block_bytes: usize) -> Result<()> {
        // One upload: the pools' addresses, then the pairs.
        let (dev, mut words) = pool_words(pools, block_bytes, 2 * pairs.len())?;
        for &(s, d) in pairs {
            words.extend([s, d]);
        }
        let n = words.len();
        let table = Tensor::from_vec(words, n, pools[0].device())?;
        let at = addr(&table, "copy table")?;
        // SAFETY: `table` lives on (candle frees through the stream, after the kernel); blocks
        // checked by the caller, and no block is both a source and a destination.
        unsafe { launch_copy_blocks(&dev, (at, pools.len()), (at + 8 * pools.len() as u64, pairs.len()), block_bytes) }
    }

    /// See [`super::beam_advance`] (arguments checked there).
    pub(super) fn beam_advance(
        top: &Tensor,
        nout: usize,
        a: &super::BeamAdvance<'_>,
        (ids, write_slots, table, capacity): (&Tensor, &Tensor, &Tensor, usize),
        pools: &[&Tensor],
        block_bytes: usize,
    ) -> Result<Tensor> {
        let rows = a.cum.len();
        let nblk = a.pos.div_ceil(a.block_size);
        // One upload: the pools' addresses (for silica_copy_blocks), then the kernel's `prm`:
        // cum, spares, eos, blocks.
        let (dev, mut words) = pool_words(pools, block_bytes, 2 * rows + a.eos.len() + rows * nblk)?;
        words.extend(a.cum.iter().map(|c| c.to_bits()));
        words.extend_from_slice(a.spares);
        words.extend_from_slice(a.eos);
        for b in a.blocks {
            words.extend_from_slice(&b[..nblk]);
        }
        let n = words.len();
        let prm = Tensor::from_vec(words, n, top.device())?;
        let out = Tensor::zeros(4 * rows + 1, DType::U32, top.device())?;
        let (pools_at, out_at) = (addr(&prm, "beam parameters")?, addr(&out, "beam decision")?);
        let func = dev.get_or_load_custom_func("silica_beam_advance", MODULE, PTX)?;
        let args = [
            Arg::Ptr(addr(&top.contiguous()?, "beam candidates")?),
            Arg::I32(rows as i32),
            Arg::I32(nout as i32),
            Arg::I32(a.k as i32),
            Arg::I32(a.num_beams as i32),
            Arg::Ptr(pools_at + 8 * pools.len() as u64),
            Arg::I32(a.eos.len() as i32),
            Arg::I32(nblk as i32),
            Arg::I32(a.pos as i32),
            Arg::I32(a.block_size as i32),
            Arg::I32(capacity as i32),
            Arg::Ptr(addr(ids, "graph ids")?),
            Arg::Ptr(addr(write_slots, "graph write slots")?),
            Arg::Ptr(addr(table, "graph slot table")?),
            Arg::Ptr(out_at),
        ];
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `silica_beam_advance` (BEAM_THREADS = 256); sizes and
        // block ids checked by the caller; `top`, `prm` and `out` live on (candle frees through
        // the stream, after the kernel).
        unsafe { launch(&dev, &func, cfg, &args) }?;
        // SAFETY: `prm` and `out` live on; the pairs (out's first words) are (a parent's block,
        // a row's spare) or (spare, spare): no block is both the source of one pair and the
        // destination of another.
        unsafe { launch_copy_blocks(&dev, (pools_at, pools.len()), (out_at, rows), block_bytes) }?;
        // What the host reads: (parent, token) per row, then the flag.
        out.narrow(0, 2 * rows, 2 * rows + 1)
    }

    /// A page-locked host buffer for a few u32 words and the event recorded after the copy
    /// into it (see `super::Readbacks`).
    pub(crate) struct Readback {
        host: candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>,
        done: candle_core::cuda_backend::cudarc::driver::CudaEvent,
    }

    use super::READBACK_WORDS;

    impl Readback {
        /// Enqueues the copy of `out` (contiguous u32, at most READBACK_WORDS) into a buffer of
        /// `pool` (or a new one) and records the event after it.
        pub(crate) fn copy(out: &Tensor, pool: &mut super::Readbacks) -> Result<Self> {
            let candle_core::Device::Cuda(dev) = out.device() else { bail!("read-back of a tensor that is not on CUDA") };
            let n = out.elem_count();
            if n > READBACK_WORDS {
                bail!("read-back of {n} words, at most {READBACK_WORDS}");
            }
            let stream = dev.cuda_stream();
            let mut rb = match pool.free.pop() {
                Some(rb) => rb,
                None => Readback {
                    // Flags 0: cached host memory (the default write-combined kind is slow to
                    // read). SAFETY: only the words a copy has filled are read (`words`).
                    host: unsafe { stream.context().alloc_pinned_with_flags::<u32>(READBACK_WORDS, 0) }.w()?,
                    // Default flags: no timing; the host spins on it, as on a synchronize.
                    done: stream.context().new_event(None).w()?,
                },
            };
            let (s, l) = out.storage_and_layout();
            let src = view::<u32>(&s, l, "selection output")?;
            // A plain slice of the page-locked memory: the copy is asynchronous and records
            // nothing on the buffer's own event; `done` marks its end.
            let host = &mut rb.host.as_mut_slice().w()?[..n];
            stream.memcpy_dtoh(&src, host).w()?;
            rb.done.record(&stream).w()?;
            Ok(rb)
        }

        /// The first `n` words, once the copy is done.
        pub(crate) fn words(&self, n: usize) -> Result<Vec<u32>> {
            self.done.synchronize().w()?;
            Ok(self.host.as_slice().w()?[..n].to_vec())
        }
    }

    /// Host data into a u32 tensor's own device memory (stream-ordered).
    pub(super) struct Upload<'a>(pub &'a [u32]);

    impl candle_core::InplaceOp1 for Upload<'_> {
        fn name(&self) -> &'static str {
            "silica-upload"
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
            bail!("silica-upload runs on CUDA only")
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
            let dev = s.device().clone();
            let Some((a, b)) = l.contiguous_offsets() else { bail!("upload target is not contiguous") };
            if b - a != self.0.len() {
                bail!("upload of {} values into {}", self.0.len(), b - a);
            }
            let mut dst = s.as_cuda_slice_mut::<u32>()?.slice_mut(a..b);
            dev.memcpy_htod(self.0, &mut dst)
        }
    }

    custom_op1!(QkvOp<'_>, "silica-qkv-rope");
    custom_op1!(PagedOp<'_>, "silica-paged-decode");
    custom_op1!(SiluMulOp, "silica-silu-mul");
    custom_op1!(ArgmaxOp, "silica-argmax", f32);
    custom_op1!(TopNOp, "silica-topn", f32);
    custom_op2!(GemvOp, "silica-gemv");
    custom_op2!(AddNormOp<'_>, "silica-add-rmsnorm");
}

/// The device's selection against the host sampler on the same rows (runs where the `cuda`
/// feature is built, on a machine with a CUDA device).
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::{select, Selected};
    use crate::sampling::{draw_with_uniform, log_softmax, top_k_sorted, SamplingParams, Selection};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// Rows of several shapes: flat (random weights), peaked, many exact ties, many `-inf`.
    fn rows(vocab: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut normal = move |s: f64| {
            let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos() * s) as f32
        };
        let flat: Vec<f32> = (0..vocab).map(|_| normal(0.5)).collect();
        let peaked: Vec<f32> = (0..vocab).map(|_| normal(3.0)).collect();
        let ties: Vec<f32> = (0..vocab).map(|_| (normal(2.0) * 2.0).round() / 2.0).collect();
        let holes: Vec<f32> =
            flat.iter().enumerate().map(|(i, &v)| if i % 3 == 1 { f32::NEG_INFINITY } else { v * 4.0 }).collect();
        vec![flat, peaked, ties, holes]
    }

    fn on_device(rows: &[Vec<f32>]) -> Tensor {
        let vocab = rows[0].len();
        let flat: Vec<f32> = rows.concat();
        Tensor::from_vec(flat, (rows.len(), vocab), &Device::new_cuda(0).expect("a CUDA device")).unwrap()
    }

    /// Rows that all want top-n take the two top-n kernels; beside a greedy row they take the
    /// five-pass selection. The same candidates either way, on rows with ties, holes and fewer
    /// finite logits than asked, with a different n per row.
    #[test]
    fn top_n_rows_alone_equal_top_n_beside_greedy() {
        for vocab in [1001, 151_936] {
            let mut rows = rows(vocab, 11);
            let mut few = vec![f32::NEG_INFINITY; vocab];
            for (i, v) in few.iter_mut().enumerate().step_by(vocab / 5) {
                *v = (i % 3) as f32;
            }
            rows.push(few);
            let sel: Vec<Selection> = [1usize, 5, 12, 16, 9].into_iter().map(Selection::TopN).collect();
            let alone = select(&on_device(&rows), &sel).unwrap();
            let (mut rows_g, mut sel_g) = (rows.clone(), sel.clone());
            rows_g.push(rows[0].clone());
            sel_g.push(Selection::Greedy);
            let beside = select(&on_device(&rows_g), &sel_g).unwrap();
            for r in 0..rows.len() {
                let (Selected::Top(a), Selected::Top(b)) = (&alone[r], &beside[r]) else {
                    panic!("row {r}, vocab {vocab}: {:?} / {:?}", alone[r], beside[r])
                };
                assert_eq!(a.iter().map(|c| c.0).collect::<Vec<_>>(), b.iter().map(|c| c.0).collect::<Vec<_>>(), "row {r}, vocab {vocab}");
                for (x, y) in a.iter().zip(b) {
                    assert!((x.1 - y.1).abs() < 1e-4, "row {r} token {}: {} vs {}", x.0, x.1, y.1);
                }
            }
            let Selected::Top(few) = &alone[4] else { panic!("row 4, vocab {vocab}: {:?}", alone[4]) };
            assert_eq!(few.len(), 6, "vocab {vocab}: the row has 6 finite logits");
        }
    }

    #[test]
    fn greedy_and_top_n_match_the_host() {
        for vocab in [1001, 151_936] {
            let rows = rows(vocab, 7);
            let logits = on_device(&rows);
            let greedy = select(&logits, &vec![Selection::Greedy; rows.len()]).unwrap();
            let top = select(&logits, &vec![Selection::TopN(12); rows.len()]).unwrap();
            // Greedy rows beside others go through the one-block selection kernel instead of
            // the split argmax: the same tokens.
            let mixed: Vec<Selection> =
                (0..rows.len()).map(|r| if r % 2 == 0 { Selection::Greedy } else { Selection::TopN(12) }).collect();
            let mixed = select(&logits, &mixed).unwrap();
            for r in (0..rows.len()).step_by(2) {
                assert_eq!(mixed[r], greedy[r], "row {r}, vocab {vocab}");
            }
            for (r, x) in rows.iter().enumerate() {
                let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let argmax = x.iter().position(|&v| v == max).unwrap() as u32;
                assert_eq!(greedy[r], Selected::Token(argmax), "row {r}, vocab {vocab}");
                let mut ids = Vec::new();
                top_k_sorted(x, 12, &mut ids);
                let mut lp = Vec::new();
                log_softmax(x, &mut lp);
                let Selected::Top(got) = &top[r] else { panic!("row {r}: {:?}", top[r]) };
                assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), ids, "row {r}, vocab {vocab}");
                for &(t, v) in got {
                    assert!((v - lp[t as usize]).abs() < 1e-4, "row {r} token {t}: {v} vs {}", lp[t as usize]);
                }
            }
        }
    }

    #[test]
    fn sampling_matches_the_host_draw() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (mut cases, mut differ) = (0usize, 0usize);
        for vocab in [1001, 151_936] {
            let rows = rows(vocab, 3);
            let logits = on_device(&rows);
            for temperature in [0.7f32, 1.0, 1.6] {
                for top_k in [None, Some(1), Some(40), Some(900)] {
                    for top_p in [1.0f32, 0.9, 0.3] {
                        for min_p in [0.0f32, 0.05] {
                            let params = SamplingParams { temperature, top_k, top_p, min_p, ..SamplingParams::default() };
                            for _ in 0..4 {
                                let us: Vec<f64> = rows.iter().map(|_| rng.random()).collect();
                                let sel: Vec<Selection> = us
                                    .iter()
                                    .map(|&u| Selection::Sample { u, temperature, top_k, top_p, min_p })
                                    .collect();
                                let got = select(&logits, &sel).unwrap();
                                // With a greedy row among them the sampled rows go through
                                // the five-kernel path instead of the one kernel: the same tokens.
                                let mut mixed = sel.clone();
                                mixed[0] = Selection::Greedy;
                                let five = select(&logits, &mixed).unwrap();
                                assert_eq!(&five[1..], &got[1..], "vocab {vocab} {params:?} u {us:?}");
                                for (r, x) in rows.iter().enumerate() {
                                    let want = draw_with_uniform(&params, x, us[r]);
                                    cases += 1;
                                    if got[r] != Selected::Token(want) {
                                        differ += 1;
                                        eprintln!("vocab {vocab} row {r} {params:?} u {}: device {:?}, host {want}", us[r], got[r]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // The device sums weights in fixed point (2^-26) where the host sums f64: a draw that
        // lands within that rounding of a token boundary may pick the neighbour.
        assert!(differ * 200 <= cases, "{differ} of {cases} draws differ from the host's");
    }

    #[test]
    fn a_non_finite_row_is_reported() {
        let mut rows = rows(1001, 5);
        rows[1][17] = f32::NAN;
        rows[2][3] = f32::INFINITY;
        rows[3] = vec![f32::NEG_INFINITY; 1001];
        let got = select(&on_device(&rows), &vec![Selection::TopN(4); 4]).unwrap();
        assert!(matches!(got[0], Selected::Top(_)));
        assert_eq!(&got[1..], &[Selected::NonFinite, Selected::NonFinite, Selected::NonFinite]);
        // Greedy rows alone take the split argmax.
        let got = select(&on_device(&rows), &vec![Selection::Greedy; 4]).unwrap();
        assert!(matches!(got[0], Selected::Token(_)));
        assert_eq!(&got[1..], &[Selected::NonFinite, Selected::NonFinite, Selected::NonFinite]);
        // Sampled rows alone take the one-kernel path.
        let sample = Selection::Sample { u: 0.5, temperature: 0.8, top_k: None, top_p: 0.9, min_p: 0.0 };
        let got = select(&on_device(&rows), &vec![sample; 4]).unwrap();
        assert!(matches!(got[0], Selected::Token(_)));
        assert_eq!(&got[1..], &[Selected::NonFinite, Selected::NonFinite, Selected::NonFinite]);
    }

    /// The split decode attention against a plain host computation: lengths of one position,
    /// around a part's 64, and several parts; two head sizes; grouped heads; shuffled slots.
    #[test]
    fn paged_decode_matches_the_host() {
        use super::{paged_decode, Scratch, ScratchDims};
        use candle_core::DType;
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let (nh, nkv, slots, max_len) = (4usize, 2usize, 1024usize, 640usize);
        let lens = [1u32, 64, 65, 300, 640];
        let d = lens.len();
        for hd in [64usize, 128] {
            let mut uni = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| (rng.random::<f32>() - 0.5) * s).collect() };
            let half = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect() };
            let (q, k, v) = (half(uni(d * nh * hd, 2.0)), half(uni(slots * nkv * hd, 2.0)), half(uni(slots * nkv * hd, 2.0)));
            // Each sequence's positions at distinct, shuffled slots.
            let mut table = vec![0u32; d * max_len];
            for b in 0..d {
                let mut perm: Vec<u32> = (0..slots as u32).collect();
                for i in (1..perm.len()).rev() {
                    perm.swap(i, rng.random_range(0..=i));
                }
                table[b * max_len..(b + 1) * max_len].copy_from_slice(&perm[..max_len]);
            }
            let scale = 1.0 / (hd as f32).sqrt();
            let t = |x: &[f32], shape: &[usize]| Tensor::from_vec(x.to_vec(), shape, &dev).unwrap().to_dtype(DType::F16).unwrap();
            let (qt, kt, vt) = (t(&q, &[d, nh, hd]), t(&k, &[slots, nkv, hd]), t(&v, &[slots, nkv, hd]));
            let table_t = Tensor::from_vec(table.clone(), (d, max_len), &dev).unwrap();
            let lens_t = Tensor::from_vec(lens.to_vec(), d, &dev).unwrap();
            let run = |q: &Tensor, scratch: Option<&Scratch>| -> Vec<f32> {
                let got = paged_decode(q, &kt, &vt, &table_t, &lens_t, nkv, scale, scratch).unwrap();
                got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            };
            // Into preallocated buffers (a decode step's scratch, left dirty by an earlier step),
            // the same bits as into fresh ones.
            let dims = ScratchDims { rows: d, max_len, hidden: 64, num_heads: nh, num_kv_heads: nkv, head_dim: hd, intermediate: 64 };
            let scratch = Scratch::new(dims, DType::F16, &dev).unwrap();
            run(&(&qt * 3.0).unwrap(), Some(&scratch));
            let got = run(&qt, None);
            assert_eq!(run(&qt, Some(&scratch)), got, "hd {hd}: scratch and allocated outputs differ");
            for b in 0..d {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let qv = &q[(b * nh + h) * hd..(b * nh + h + 1) * hd];
                    let len = lens[b] as usize;
                    let row = |pool: &[f32], j: usize| {
                        let s = table[b * max_len + j] as usize;
                        pool[(s * nkv + kvh) * hd..(s * nkv + kvh + 1) * hd].to_vec()
                    };
                    let scores: Vec<f64> = (0..len)
                        .map(|j| row(&k, j).iter().zip(qv).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * scale as f64)
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let l: f64 = w.iter().sum();
                    let vrows: Vec<Vec<f32>> = (0..len).map(|j| row(&v, j)).collect();
                    for e in 0..hd {
                        let want: f64 = (0..len).map(|j| w[j] * vrows[j][e] as f64).sum::<f64>() / l;
                        let have = got[(b * nh + h) * hd + e] as f64;
                        assert!((have - want).abs() <= 2e-3 + 1e-2 * want.abs(), "hd {hd} seq {b} (len {len}) head {h} dim {e}: {have} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn copy_on_write_copies_are_batched_and_exact() {
        use crate::kv::{KvCache, KvCacheConfig, SeqCache};
        use candle_core::DType;
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let cfg = KvCacheConfig { block_size: 4, num_blocks: 8 };
        let mut kv = KvCache::new(cfg, 3, 2, 8, DType::F16, &dev).unwrap();
        for (i, pool) in kv.k.iter_mut().chain(kv.v.iter_mut()).enumerate() {
            let n = pool.elem_count();
            let vals = Tensor::arange(0f32, n as f32, &dev).unwrap().affine(1.0, 1000.0 * i as f64).unwrap();
            *pool = vals.to_dtype(DType::F16).unwrap().reshape(pool.shape()).unwrap();
        }
        let before: Vec<Vec<f32>> = kv.k.iter().chain(kv.v.iter()).map(|p| p.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()).collect();
        let mut a = SeqCache::default();
        kv.reserve(&mut a, 6).unwrap();
        a.len = 6;
        let (mut b, mut c) = (kv.fork(&a), kv.fork(&a));
        kv.reserve(&mut b, 7).unwrap();
        kv.reserve(&mut c, 7).unwrap();
        assert_ne!(b.blocks[1], a.blocks[1]);
        assert_ne!(c.blocks[1], b.blocks[1]);
        kv.flush_copies().unwrap();
        let per_block = 4 * 2 * 8;
        for (i, pool) in kv.k.iter().chain(kv.v.iter()).enumerate() {
            let now: Vec<f32> = pool.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            let block = |v: &[f32], blk: u32| v[blk as usize * per_block..(blk as usize + 1) * per_block].to_vec();
            for copy in [&b, &c] {
                assert_eq!(block(&now, copy.blocks[1]), block(&before[i], a.blocks[1]), "pool {i}");
            }
            assert_eq!(block(&now, a.blocks[1]), block(&before[i], a.blocks[1]), "pool {i}: the source is unchanged");
        }
    }

    /// The GEMV with SwiGLU in its epilogue, over the interleaved gate/up weight, against the
    /// plain GEMV over the stacked weight followed by the SwiGLU kernel: the same bits where both
    /// split the sums alike (k = 2048: 4 warps per column), within rounding where the plain
    /// GEMV takes 8 warps (k = 3584); into scratch buffers and freshly allocated.
    #[test]
    fn gemv_swiglu_equals_the_product_then_silu() {
        use super::{gemv, gemv_swiglu, silu_mul, Scratch, ScratchDims};
        use candle_core::DType;
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (k, inter) in [(2048usize, 100usize), (3584, 37)] {
            // 4 rows: the tensor-core kernel.
            for rows in [1usize, 2, 4] {
                let mut uni = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| (rng.random::<f32>() - 0.5) * s).collect() };
                let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(DType::F16).unwrap();
                let x = t(uni(rows * k, 2.0), (rows, k));
                let stacked = t(uni(2 * inter * k, 0.1), (2 * inter, k));
                let inter_w = stacked.reshape((2, inter, k)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap().reshape((2 * inter, k)).unwrap();
                let f32s = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
                let want = f32s(&silu_mul(&gemv(&x, &stacked, None).unwrap(), false, None).unwrap());
                // The interleaved product through the SwiGLU kernel's interleaved mode too.
                let via_interleaved = f32s(&silu_mul(&gemv(&x, &inter_w, None).unwrap(), true, None).unwrap());
                let dims = ScratchDims { rows: 4, max_len: 64, hidden: 64, num_heads: 1, num_kv_heads: 1, head_dim: 64, intermediate: inter };
                let scratch = Scratch::new(dims, DType::F16, &dev).unwrap();
                let fused = f32s(&gemv_swiglu(&x, &inter_w, None).unwrap());
                let into = f32s(&gemv_swiglu(&x, &inter_w, Some(&scratch)).unwrap());
                assert_eq!(fused, into, "k {k} rows {rows}: scratch and allocated outputs differ");
                assert_eq!(fused.len(), rows * inter);
                for (i, ((a, b), c)) in fused.iter().zip(&want).zip(&via_interleaved).enumerate() {
                    if k == 2048 {
                        assert_eq!(a, b, "k {k} rows {rows} output {i}");
                        assert_eq!(c, b, "k {k} rows {rows} output {i} (interleaved silu)");
                    } else {
                        assert!((a - b).abs() <= 1e-3 + 1e-2 * b.abs(), "k {k} rows {rows} output {i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The GEMV for 1–8 rows (CUDA cores below `gemv_tc_rows`, tensor cores from there) against
    /// a host computation, with column counts that are not multiples of a block's 8 and k of
    /// the 3B/7B shapes; f16 and bf16.
    #[test]
    fn gemv_matches_the_host_for_every_row_count() {
        use super::gemv;
        use candle_core::DType;
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for dtype in [DType::F16, DType::BF16] {
            for (n, k) in [(100usize, 2048usize), (37, 3584), (24, 11008)] {
                for rows in 1..=8usize {
                    let mut uni = |c: usize, sc: f32| -> Vec<f32> { (0..c).map(|_| (rng.random::<f32>() - 0.5) * sc).collect() };
                    let t = |v: &[f32], shape: (usize, usize)| Tensor::from_vec(v.to_vec(), shape, &dev).unwrap().to_dtype(dtype).unwrap();
                    let (xv, wv) = (uni(rows * k, 2.0), uni(n * k, 0.1));
                    let (x, w) = (t(&xv, (rows, k)), t(&wv, (n, k)));
                    // The host computes with the rounded inputs.
                    let back = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
                    let (xr, wr) = (back(&x), back(&w));
                    let got = back(&gemv(&x, &w, None).unwrap());
                    assert_eq!(got.len(), rows * n);
                    for r in 0..rows {
                        for c in 0..n {
                            let want: f64 = (0..k).map(|i| xr[r * k + i] as f64 * wr[c * k + i] as f64).sum();
                            let have = got[r * n + c] as f64;
                            let tol = if dtype == DType::BF16 { 1e-2 } else { 2e-3 };
                            assert!((have - want).abs() <= tol * (1.0 + want.abs()), "{dtype:?} n {n} k {k} rows {rows} [{r}, {c}]: {have} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
