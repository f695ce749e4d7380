//! The building blocks shared by Qwen2/Qwen2.5 and Qwen3: RMSNorm, rotary embeddings,
//! grouped-query attention over the paged KV cache, and the SwiGLU MLP.

use candle_core::{DType, Device, Tensor};

use super::batch::BatchMeta;
use super::config::ModelConfig;
use super::fused::Scratch;
use super::weights::{Linear, WeightSource};
use crate::error::Result;

/// Root-mean-square layer norm over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &mut WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: w.dense(&format!("{name}.weight"), &[dim])?, eps: eps as f32 })
    }
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// `(x + h, self(x + h))` in one pass: one CUDA kernel (fused mode; into `scratch`'s
    /// buffers when given), or one pass per row on the CPU (F32).
    pub(crate) fn add_forward(&self, x: &Tensor, h: &Tensor, scratch: Option<&Scratch>) -> candle_core::Result<(Tensor, Tensor)> {
        if super::cpu_ops::applies(x) {
            return super::cpu_ops::add_rmsnorm(x, h, &self.weight, self.eps);
        }
        super::fused::add_rmsnorm(x, h, &self.weight, self.eps, scratch)
    }
}

/// Precomputed RoPE tables `[max_positions, head_dim / 2]` (non-interleaved, "NeoX" halves,
/// as Qwen uses), gathered per row by absolute position.
#[derive(Debug, Clone)]
pub struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64) as f32)
            .collect();
        let n = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Rope { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// The cos/sin rows for the batch's positions.
    pub fn tables(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }
}

/// RoPE for one forward pass: the full tables (the fused kernel indexes them by position) and,
/// for candle's ops, the rows gathered for the batch's positions; for the CPU F32 pass also
/// those rows and each row's cache slot as host slices, the same for every layer.
pub(crate) struct RopeAt<'a> {
    pub table: &'a Rope,
    pub rows: Option<(Tensor, Tensor)>,
    pub host: Option<HostRope>,
}

/// The pass's RoPE rows and cache slots on the host ([`super::cpu_ops::rope_write`]'s inputs).
pub(crate) struct HostRope {
    /// `[rows, head_dim / 2]` each, copied once from [`RopeAt::rows`].
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Each row's cache slot: position `start + i` of its sequence.
    slots: Vec<u32>,
}

impl<'a> RopeAt<'a> {
    /// `gather`: candle's ops need the rows (every mode but the fused one); `host`: the CPU F32
    /// pass also reads them, and the rows' slots, from host slices.
    pub fn new(table: &'a Rope, meta: &BatchMeta, gather: bool, host: bool) -> candle_core::Result<Self> {
        let rows = if gather { Some(table.tables(&meta.positions)?) } else { None };
        let host = match (&rows, host) {
            (Some((cos, sin)), true) => {
                let mut slots = vec![0u32; cos.dim(0)?];
                for s in &meta.seqs {
                    slots[s.row..s.row + s.n].copy_from_slice(&s.slots[s.start..s.start + s.n]);
                }
                Some(HostRope { cos: cos.flatten_all()?.to_vec1()?, sin: sin.flatten_all()?.to_vec1()?, slots })
            }
            _ => None,
        };
        Ok(RopeAt { table, rows, host })
    }

    fn rows(&self) -> candle_core::Result<(&Tensor, &Tensor)> {
        match &self.rows {
            Some((c, s)) => Ok((c, s)),
            None => candle_core::bail!("RoPE rows were not gathered for this pass (engine bug)"),
        }
    }
}

/// Apply RoPE to `x: [rows, heads, head_dim]` with per-row `cos`/`sin: [rows, head_dim/2]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
}

/// [`Linear::concat`] at load, a failure named by the module path `p`.
fn stacked(w: &WeightSource, p: &str, parts: &[&Linear]) -> Result<Option<Linear>> {
    Linear::concat(parts).map_err(|e| crate::error::EngineError::load(w.location(), format!("{p}: {e}")))
}

/// The q/k/v projections: one stacked product for dense weights and for Q4_K/Q6_K ones on
/// the CPU (their types may differ, e.g. a Q6_K `v_proj` beside Q4_K `q_proj`/`k_proj`),
/// three for other quantized ones (see `Linear::concat`).
#[derive(Debug, Clone)]
enum QkvProj {
    Fused(Linear),
    Split { q: Linear, k: Linear, v: Linear },
}

/// Grouped-query self-attention. Qwen2 has q/k/v biases; Qwen3 has none and normalises q and
/// k per head instead.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: QkvProj,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Attention {
    pub fn load(w: &mut WeightSource, p: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_dim = cfg.num_heads * hd;
        let kv_dim = cfg.num_kv_heads * hd;
        let bias = cfg.arch.qkv_bias();
        let (q_norm, k_norm) = if cfg.arch.qk_norm() {
            (
                Some(RmsNorm::load(w, &format!("{p}.q_norm"), hd, cfg.rms_norm_eps)?),
                Some(RmsNorm::load(w, &format!("{p}.k_norm"), hd, cfg.rms_norm_eps)?),
            )
        } else {
            (None, None)
        };
        let q = w.linear(&format!("{p}.q_proj"), h, q_dim, bias)?;
        let k = w.linear(&format!("{p}.k_proj"), h, kv_dim, bias)?;
        let v = w.linear(&format!("{p}.v_proj"), h, kv_dim, bias)?;
        let qkv = match stacked(w, p, &[&q, &k, &v])? {
            Some(fused) => QkvProj::Fused(fused),
            None => QkvProj::Split { q, k, v },
        };
        Ok(Attention {
            qkv,
            o_proj: w.linear(&format!("{p}.o_proj"), q_dim, h, false)?,
            q_norm,
            k_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Steps 1–4 with candle's ops: projections, Qwen3's q/k norms, RoPE, cache write. Returns
    /// q `[rows, heads, head_dim]`.
    fn qkv_ops(
        &self,
        x: &Tensor,
        meta: &BatchMeta,
        rope: &RopeAt<'_>,
        k_pool: &Tensor,
        v_pool: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // 1. Projections: [rows, heads, head_dim].
        let (q, k, v) = match &self.qkv {
            QkvProj::Fused(l) => {
                let y = l.forward(x)?;
                (y.narrow(1, 0, nh * hd)?, y.narrow(1, nh * hd, nkv * hd)?, y.narrow(1, (nh + nkv) * hd, nkv * hd)?)
            }
            QkvProj::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
        };
        // 2–4 on the CPU (Qwen2: no q/k norms): RoPE and the cache write in one pass.
        if self.q_norm.is_none() && super::attention_cpu::applies(&q, k_pool) && super::attention_cpu::applies(&q, v_pool) {
            return self.rope_write_cpu(&q, &k, &v, rope, k_pool, v_pool);
        }
        let mut q = q.reshape((rows, nh, hd))?;
        let mut k = k.reshape((rows, nkv, hd))?;
        let v = v.reshape((rows, nkv, hd))?.contiguous()?;
        // 2. Qwen3: per-head RMSNorm of q and k.
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        // 3. Rotary position embedding at each row's absolute position.
        let (cos, sin) = rope.rows()?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        // 4. Write the new K/V into the rows' cache slots, in place, one scatter each.
        let write_index = match &meta.write_index {
            Some(w) => w,
            None => candle_core::bail!("no cache write index for this pass (engine bug)"),
        };
        k_pool.scatter_set(write_index, &k.contiguous()?, 0)?;
        v_pool.scatter_set(write_index, &v, 0)?;
        Ok(q)
    }

    /// Steps 2–4 of [`Attention::qkv_ops`] on the CPU ([`super::cpu_ops::rope_write`]): q, k
    /// and v `[rows, width]` (column ranges of the stacked output, or separate products).
    fn rope_write_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &RopeAt<'_>,
        k_pool: &Tensor,
        v_pool: &Tensor,
    ) -> candle_core::Result<Tensor> {
        use super::cpu_ops::{with_rows, RopeWrite};
        let Some(host) = &rope.host else {
            candle_core::bail!("RoPE rows were not copied to the host for this pass (engine bug)");
        };
        let p = RopeWrite {
            cos: &host.cos,
            sin: &host.sin,
            slots: &host.slots,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        };
        // One `?` per borrowed tensor, the last for `rope_write` itself.
        with_rows(q, |q| with_rows(k, |k| with_rows(v, |v| super::cpu_ops::rope_write(q, k, v, &p, k_pool, v_pool))))???
    }

    /// `x: [rows, hidden]` → `[rows, hidden]`. Writes the rows' K/V into the cache pools, then
    /// attends each sequence over its own blocks. `scratch`: a decode step's buffers (fused
    /// mode, single-token rows only).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        meta: &BatchMeta,
        rope: &RopeAt<'_>,
        k_pool: &Tensor,
        v_pool: &Tensor,
        scratch: Option<&Scratch>,
    ) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let groups = nh / nkv;
        // 1–4. Projections, norms, RoPE and the cache write: one matmul and one kernel when the
        //      fused kernels apply, candle's ops otherwise.
        let q = match (&self.qkv, &meta.fused) {
            (QkvProj::Fused(l), Some(f)) => {
                let p = super::fused::QkvRope {
                    bias: l.bias(),
                    q_norm: self.q_norm.as_ref().map(RmsNorm::weight),
                    k_norm: self.k_norm.as_ref().map(RmsNorm::weight),
                    cos: &rope.table.cos,
                    sin: &rope.table.sin,
                    positions: &meta.positions,
                    slots: &f.write_slots,
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    eps: self.eps,
                };
                let qkv = l.forward_no_bias_into(x, Scratch::rows_of(scratch, Scratch::qkv, rows)?.as_ref())?;
                super::fused::qkv_rope_write(&qkv, &p, k_pool, v_pool, Scratch::rows_of(scratch, Scratch::q, rows)?.as_ref())?
            }
            _ => self.qkv_ops(x, meta, rope, k_pool, v_pool)?,
        };
        // 5. Attention per sequence over its blocks: on the CPU straight from the pools,
        //    elsewhere by gathering each sequence's K/V.
        if super::attention_cpu::applies(&q, k_pool) {
            let o = super::attention_cpu::attend(&q, k_pool, v_pool, meta, nkv, 1.0 / (hd as f32).sqrt())?;
            return self.o_proj.forward(&o);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        // candle's GPU softmax accumulates half-precision rows in F32 already; the CPU one
        // does not, so there the scores go through F32.
        let softmax = |att: Tensor| -> candle_core::Result<Tensor> {
            if !att.device().is_cpu() {
                return candle_nn::ops::softmax_last_dim(&att);
            }
            let in_dtype = att.dtype();
            candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?.to_dtype(in_dtype)
        };
        // 5a. Decode sequences together: [d, nkv, groups, hd] × [d, nkv, hd, max_len].
        let decoded = match &meta.decode {
            Some(g) => {
                let (d, l) = (g.seq_idx.len(), g.max_len);
                let qd = match &g.rows {
                    None if d == rows => q.clone(),
                    None => q.narrow(0, 0, d)?,
                    Some(r) => q.index_select(r, 0)?,
                };
                Some(match (&meta.fused, &g.lens) {
                    (Some(_), Some(lens)) => {
                        let table = g.slots.reshape((d, l))?;
                        super::fused::paged_decode(&qd, k_pool, v_pool, &table, lens, nkv, scale as f32, scratch)?
                    }
                    _ => {
                        let qd = qd.contiguous()?.reshape((d, nkv, groups, hd))?;
                        let gather = |pool: &Tensor| {
                            pool.index_select(&g.slots, 0)?.reshape((d, l, nkv, hd))?.transpose(1, 2)?.contiguous()
                        };
                        let (ks, vs) = (gather(k_pool)?, gather(v_pool)?);
                        let att = (qd.matmul(&ks.t()?)? * scale)?;
                        let att = match &g.mask {
                            Some(m) => att.broadcast_add(m)?,
                            None => att,
                        };
                        softmax(att)?.matmul(&vs)?.reshape((d, nh * hd))? // [d, nkv, groups, hd]
                    }
                })
            }
            None => None,
        };
        if let (Some(o), Some(g)) = (&decoded, &meta.decode) {
            if g.seq_idx.len() == meta.seqs.len() && g.rows.is_none() {
                return self.o_proj.forward_into(o, Scratch::rows_of(scratch, Scratch::h, rows)?.as_ref());
            }
        }
        // 5b. Prefill sequences one by one; outputs assembled in row order.
        let mut outs = Vec::with_capacity(meta.seqs.len());
        let mut next_decoded = 0;
        for s in &meta.seqs {
            let n = s.n;
            if n == 1 {
                let o = decoded.as_ref().expect("decode rows have a decode group");
                outs.push(o.narrow(0, next_decoded, 1)?);
                next_decoded += 1;
                continue;
            }
            let read_slots = s.read_slots.as_ref().expect("prefill rows on the gather path have read slots");
            // q: [n, nh, hd] → [nkv, groups * n, hd] (head h uses kv head h / groups).
            let qs = q.narrow(0, s.row, n)?.transpose(0, 1)?.contiguous()?.reshape((nkv, groups * n, hd))?;
            let ks = k_pool.index_select(read_slots, 0)?.transpose(0, 1)?.contiguous()?;
            let vs = v_pool.index_select(read_slots, 0)?.transpose(0, 1)?.contiguous()?;
            let att = (qs.matmul(&ks.t()?)? * scale)?;
            let att = match &s.mask {
                // [nkv, groups, n, l] + [n, l]: the same causal mask for every query head.
                Some(m) => att.reshape((nkv, groups, n, ()))?.broadcast_add(m)?.reshape((nkv, groups * n, ()))?,
                None => att,
            };
            let o = softmax(att)?.matmul(&vs)?; // [nkv, groups * n, hd]
            let o = o.reshape((nh, n, hd))?.transpose(0, 1)?.reshape((n, nh * hd))?;
            outs.push(o);
        }
        let o = if outs.len() == 1 { outs.pop().expect("one output") } else { Tensor::cat(&outs, 0)? };
        self.o_proj.forward(&o)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`; gate and up as one stacked product
/// where `Linear::concat` can stack them.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: GateUp,
    /// The stacked gate/up rows are interleaved (Silica's CUDA kernels; see `Mlp::load`).
    interleaved: bool,
    down_proj: Linear,
    intermediate: usize,
}

/// Rows per slice of a CPU prefill through the MLP (see `Mlp::forward`): enough rows for the
/// kernels' 8-row tiles to reuse each weight block many times.
const MLP_ROWS: usize = 128;

#[derive(Debug, Clone)]
enum GateUp {
    Fused(Linear),
    Split { gate: Linear, up: Linear },
}

impl Mlp {
    pub fn load(w: &mut WeightSource, p: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = w.linear(&format!("{p}.gate_proj"), h, i, false)?;
        let up = w.linear(&format!("{p}.up_proj"), h, i, false)?;
        // For Silica's CUDA kernels the stacked weight's gate and up rows are interleaved, so
        // that the decode GEMV applies SwiGLU to each (gate, up) pair of its outputs.
        let (gate_up, interleaved) = match stacked(w, p, &[&gate, &up])? {
            Some(fused) => match fused.dense_weight() {
                Some(t) if super::fused::applies(t.device(), t.dtype(), cfg.head_dim, cfg.hidden_size) => {
                    let err = |e| crate::error::EngineError::load(w.location(), format!("{p}: {e}"));
                    match fused.interleave_halves().map_err(err)? {
                        Some(l) => (GateUp::Fused(l), true),
                        None => (GateUp::Fused(fused), false),
                    }
                }
                _ => (GateUp::Fused(fused), false),
            },
            None => (GateUp::Split { gate, up }, false),
        };
        Ok(Mlp { gate_up, interleaved, down_proj: w.linear(&format!("{p}.down_proj"), i, h, false)?, intermediate: i })
    }

    /// `fused_kernels`: SwiGLU's activation by Silica's CUDA kernel; `scratch`: the step's
    /// buffers for the products and the activation.
    pub fn forward(&self, x: &Tensor, fused_kernels: bool, scratch: Option<&Scratch>) -> candle_core::Result<Tensor> {
        // On the CPU a long prefill goes through in slices of rows: the `[rows, 2·i]` gate/up
        // output is the largest activation (37 MB for 512 rows of the 1.5B), and the peak
        // memory target counts it. Rows are independent, so the result is the same.
        let rows = x.dim(0)?;
        if x.device().is_cpu() && rows > MLP_ROWS {
            let parts = (0..rows)
                .step_by(MLP_ROWS)
                .map(|r| self.forward_rows(&x.narrow(0, r, MLP_ROWS.min(rows - r))?, fused_kernels, None))
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Tensor::cat(&parts, 0);
        }
        self.forward_rows(x, fused_kernels, scratch)
    }

    fn forward_rows(&self, x: &Tensor, fused_kernels: bool, scratch: Option<&Scratch>) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let buf = |f: fn(&Scratch, usize) -> candle_core::Result<Tensor>| Scratch::rows_of(scratch, f, rows);
        let h = match &self.gate_up {
            GateUp::Fused(l) if self.interleaved => match l.dense_weight() {
                // Decode rows: the product and SwiGLU in one kernel.
                Some(w) if super::fused::gemv_applies(x, w) && super::fused::gemv_swiglu_applies(x) => {
                    super::fused::gemv_swiglu(x, w, scratch)?
                }
                _ => super::fused::silu_mul(&l.forward_into(x, buf(Scratch::gate_up)?.as_ref())?, true, scratch)?,
            },
            GateUp::Fused(l) => {
                let y = l.forward_into(x, buf(Scratch::gate_up)?.as_ref())?;
                if fused_kernels {
                    super::fused::silu_mul(&y, false, scratch)?
                } else if y.device().is_cpu() && y.dtype() == DType::F32 {
                    silu_mul_cpu(&y, self.intermediate)?
                } else {
                    let i = self.intermediate;
                    (candle_nn::ops::silu(&y.narrow(1, 0, i)?)? * y.narrow(1, i, i)?)?
                }
            }
            GateUp::Split { gate, up } => (candle_nn::ops::silu(&gate.forward(x)?)? * up.forward(x)?)?,
        };
        self.down_proj.forward_into(&h, buf(Scratch::h)?.as_ref())
    }
}

/// `silu(gate) · up` from the stacked `[rows, 2·i]` gate/up output, in one pass over it and
/// in parallel chunks (candle's ops: two copies, a one-thread `silu` with its own output, and
/// the product: 0.8 ms of a 1.5B decode step). The same formula as candle's `silu`, element
/// by element, so rows stay independent of the batch.
fn silu_mul_cpu(y: &Tensor, i: usize) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    const CHUNK: usize = 1024;
    let rows = y.dim(0)?;
    let mut out = vec![0f32; rows * i];
    super::q8::with_f32_rows(y, |ys| {
        out.par_chunks_mut(i).zip(ys.par_chunks(2 * i)).for_each(|(o, gu)| {
            let (gate, up) = gu.split_at(i);
            o.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let at = c * CHUNK;
                for ((o, &g), &u) in o.iter_mut().zip(&gate[at..]).zip(&up[at..]) {
                    *o = g / (1. + (-g).exp()) * u;
                }
            });
        });
    })?;
    Tensor::from_vec(out, (rows, i), y.device())
}

/// One transformer block: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(w: &mut WeightSource, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let p = format!("model.layers.{i}");
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
        })
    }

    /// The input norm of this layer (applied by the previous layer's fused add + norm).
    pub(crate) fn input_norm(&self) -> &RmsNorm {
        &self.input_layernorm
    }

    /// Fused mode and the CPU F32 path: takes the residual stream and its normed copy (this
    /// layer's input norm already applied), returns the new residual and `next_norm` applied to
    /// it (the next layer's input norm, or the final norm), each residual add fused with the
    /// norm after it ([`RmsNorm::add_forward`]).
    pub(crate) fn forward_fused(
        &self,
        resid: &Tensor,
        normed: &Tensor,
        next_norm: &RmsNorm,
        meta: &BatchMeta,
        rope: &RopeAt<'_>,
        k_pool: &Tensor,
        v_pool: &Tensor,
        scratch: Option<&Scratch>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self.self_attn.forward(normed, meta, rope, k_pool, v_pool, scratch)?;
        let (x, n) = self.post_attention_layernorm.add_forward(resid, &h, scratch)?;
        let h = self.mlp.forward(&n, meta.fused.is_some(), scratch)?;
        next_norm.add_forward(&x, &h, scratch)
    }

    /// candle's ops (every mode but the fused one): `x` in, the new residual stream out.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        meta: &BatchMeta,
        rope: &RopeAt<'_>,
        k_pool: &Tensor,
        v_pool: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, meta, rope, k_pool, v_pool, None)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?, false, None)?;
        x + h
    }
}

