//! The building blocks shared by Qwen2/Qwen2.5 and Qwen3: RMSNorm, rotary embeddings,
//! grouped-query attention over the paged KV cache, and the SwiGLU MLP.

use candle_core::{DType, Device, Tensor};

use super::batch::BatchMeta;
use super::config::ModelConfig;
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
}

/// Precomputed RoPE tables `[max_positions, head_dim / 2]` (non-interleaved, "NeoX" halves,
/// as Qwen uses), gathered per row by absolute position.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
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

/// Apply RoPE to `x: [rows, heads, head_dim]` with per-row `cos`/`sin: [rows, head_dim/2]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
}

/// Grouped-query self-attention. Qwen2 has q/k/v biases; Qwen3 has none and normalises q and
/// k per head instead.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
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
        Ok(Attention {
            q_proj: w.linear(&format!("{p}.q_proj"), h, q_dim, bias)?,
            k_proj: w.linear(&format!("{p}.k_proj"), h, kv_dim, bias)?,
            v_proj: w.linear(&format!("{p}.v_proj"), h, kv_dim, bias)?,
            o_proj: w.linear(&format!("{p}.o_proj"), q_dim, h, false)?,
            q_norm,
            k_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        })
    }

    /// `x: [rows, hidden]` → `[rows, hidden]`. Writes the rows' K/V into the cache pools, then
    /// attends each sequence over its own blocks.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        meta: &BatchMeta,
        rope: (&Tensor, &Tensor),
        k_pool: &Tensor,
        v_pool: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let groups = nh / nkv;
        // 1. Projections: [rows, heads, head_dim].
        let mut q = self.q_proj.forward(x)?.reshape((rows, nh, hd))?;
        let mut k = self.k_proj.forward(x)?.reshape((rows, nkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((rows, nkv, hd))?.contiguous()?;
        // 2. Qwen3: per-head RMSNorm of q and k.
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        // 3. Rotary position embedding at each row's absolute position.
        let q = apply_rope(&q, rope.0, rope.1)?;
        let k = apply_rope(&k, rope.0, rope.1)?;
        // 4. Write the new K/V into the rows' cache slots, in place, one scatter each.
        k_pool.scatter_set(&meta.write_index, &k.contiguous()?, 0)?;
        v_pool.scatter_set(&meta.write_index, &v, 0)?;
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
                let qd = qd.contiguous()?.reshape((d, nkv, groups, hd))?;
                let gather = |pool: &Tensor| pool.index_select(&g.slots, 0)?.reshape((d, l, nkv, hd))?.transpose(1, 2)?.contiguous();
                let (ks, vs) = (gather(k_pool)?, gather(v_pool)?);
                let att = (qd.matmul(&ks.t()?)? * scale)?;
                let att = match &g.mask {
                    Some(m) => att.broadcast_add(m)?,
                    None => att,
                };
                let o = softmax(att)?.matmul(&vs)?; // [d, nkv, groups, hd]
                Some(o.reshape((d, nh * hd))?)
            }
            None => None,
        };
        if let (Some(o), Some(g)) = (&decoded, &meta.decode) {
            if g.seq_idx.len() == meta.seqs.len() && g.rows.is_none() {
                return self.o_proj.forward(o);
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
                Some(m) => att.broadcast_add(m)?,
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

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn load(w: &mut WeightSource, p: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: w.linear(&format!("{p}.gate_proj"), h, i, false)?,
            up_proj: w.linear(&format!("{p}.up_proj"), h, i, false)?,
            down_proj: w.linear(&format!("{p}.down_proj"), i, h, false)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
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

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        meta: &BatchMeta,
        rope: (&Tensor, &Tensor),
        k_pool: &Tensor,
        v_pool: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, meta, rope, k_pool, v_pool)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + h
    }
}

