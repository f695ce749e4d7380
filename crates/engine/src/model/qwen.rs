//! One decoder for Qwen2/Qwen2.5 and Qwen3. Module names mirror the Hugging Face checkpoint
//! (`model.embed_tokens`, `model.layers.N.self_attn`, `model.norm`, `lm_head`).

use candle_core::{DType, Device, Tensor};

use super::batch::{AttnMode, BatchMeta, SeqInput};
use super::config::ModelConfig;
use super::layers::{DecoderLayer, Rope, RopeAt, RmsNorm};
use super::weights::{Embedding, Linear, WeightSource};
use crate::error::{EngineError, Result};
use crate::kv::{KvCache, KvCacheConfig};

/// The loaded decoder. Holds weights only: no per-request state (the KV cache is passed in).
pub struct QwenModel {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// Silica's fused CUDA kernels serve this model (see `fused.rs`).
    fused: bool,
    /// The fused decode steps' activation buffers (present when `fused`).
    scratch: Option<super::fused::Scratch>,
    /// Decode steps captured as CUDA graphs (fused kernels on CUDA; see `graph.rs`).
    #[cfg(feature = "cuda")]
    pub(super) graphs: Option<super::graph::DecodeGraphs>,
}

impl QwenModel {
    /// Build the decoder from any weight source.
    pub fn load(cfg: ModelConfig, w: &mut WeightSource, device: &Device) -> Result<Self> {
        let dtype = w.activation_dtype();
        let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(DecoderLayer::load(w, i, &cfg)?);
        }
        let norm = RmsNorm::load(w, "model.norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = w.lm_head(cfg.tie_word_embeddings, cfg.vocab_size, cfg.hidden_size)?;
        let rope = Rope::new(&cfg, dtype, device)?;
        let fused = super::fused::applies(device, dtype, cfg.head_dim, cfg.hidden_size);
        if fused {
            tracing::info!("decoder runs Silica's fused CUDA kernels (SILICA_FUSED=0 turns them off)");
        }
        let scratch = if fused {
            let dims = super::fused::ScratchDims {
                // Every captured step's rows (graph.rs), at least the default's.
                #[cfg(feature = "cuda")]
                rows: super::graph::max_rows().max(super::fused::SCRATCH_ROWS),
                #[cfg(not(feature = "cuda"))]
                rows: super::fused::SCRATCH_ROWS,
                max_len: cfg.max_position_embeddings.min(super::fused::SCRATCH_MAX_LEN),
                hidden: cfg.hidden_size,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                intermediate: cfg.intermediate_size,
            };
            Some(super::fused::Scratch::new(dims, dtype, device)?)
        } else {
            None
        };
        Ok(QwenModel {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device: device.clone(),
            fused,
            scratch,
            #[cfg(feature = "cuda")]
            graphs: (fused && super::graph::max_rows() > 0).then(super::graph::DecodeGraphs::default),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A KV cache shaped for this model.
    pub fn new_kv_cache(&self, cfg: KvCacheConfig) -> Result<KvCache> {
        KvCache::new(cfg, self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype, &self.device)
    }

    /// A KV cache holding `tokens` positions in blocks of `block_size`.
    pub fn kv_cache_for_tokens(&self, tokens: usize, block_size: usize) -> Result<KvCache> {
        let num_blocks = tokens.div_ceil(block_size).max(1);
        self.new_kv_cache(KvCacheConfig { block_size, num_blocks })
    }

    /// One batched forward pass over several sequences' new tokens.
    ///
    /// Each sequence's blocks must already be reserved for its new positions; this writes the
    /// new K/V into them but does not advance `SeqCache::len` (the caller does, on success).
    /// Returns F32 logits `[rows, vocab]`: one row per sequence (its last token), or one per
    /// new token for sequences with `all_logits`.
    pub fn forward(&self, batch: &[SeqInput<'_>], kv: &mut KvCache) -> Result<Tensor> {
        if self.device.is_cpu() {
            // The whole pass on a rayon worker: every parallel op inside (the quantized
            // matmuls, candle's norms and RoPE, attention) then starts from a worker, which
            // runs its share itself, instead of from this thread, which would hand each op to
            // the pool and sleep until it is done (a wake-up and a sleep per op).
            return rayon::scope(|_| self.forward_on(batch, kv));
        }
        self.forward_on(batch, kv)
    }

    fn forward_on(&self, batch: &[SeqInput<'_>], kv: &mut KvCache) -> Result<Tensor> {
        if batch.is_empty() {
            return Err(EngineError::invalid("batch", "empty forward batch"));
        }
        kv.flush_copies()?;
        let max_pos = self.cfg.max_position_embeddings;
        for s in batch {
            if s.cache.len + s.tokens.len() > max_pos {
                return Err(EngineError::invalid(
                    "max_tokens",
                    format!(
                        "sequence would reach {} positions, the model's context is {max_pos}",
                        s.cache.len + s.tokens.len()
                    ),
                ));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(EngineError::invalid(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size),
                ));
            }
        }
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &self.graphs {
            let kv: &KvCache = kv;
            if let Some(logits) = graphs.run(batch, kv, self.cfg.vocab_size, &self.device, &|meta| self.run(meta, kv))? {
                return Ok(logits);
            }
        }
        let mode = if self.fused {
            AttnMode::Fused
        } else if self.device.is_cpu() && self.dtype == DType::F32 {
            AttnMode::CpuKernel
        } else {
            AttnMode::Gather
        };
        let shape = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let meta = BatchMeta::build(batch, kv, shape, self.dtype, &self.device, mode)?;
        Ok(self.run(&meta, kv)?)
    }

    /// A decode step launched ahead of the host: one new position per sequence, whose inputs
    /// `patch` finishes on the device (the input ids: the previous step's selected tokens,
    /// which the host has not read yet; for a beam step also the rows' slots; called only when
    /// the step will run), through the CUDA graph already captured for the batch's shape. `Ok(None)` when there is none (CPU, other
    /// devices, a shape not captured yet): nothing was launched and the caller runs the step
    /// with [`forward`](Self::forward) once it knows the tokens. As `forward`, the blocks must
    /// be reserved and `SeqCache::len` is not advanced; each `SeqInput`'s tokens are ignored
    /// (one each).
    pub(crate) fn forward_ahead(
        &self,
        batch: &[SeqInput<'_>],
        kv: &mut KvCache,
        patch: super::Patch<'_>,
    ) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &self.graphs {
            let max_pos = self.cfg.max_position_embeddings;
            if batch.is_empty() || batch.iter().any(|s| s.tokens.len() != 1 || s.cache.len + 1 > max_pos) {
                return Ok(None);
            }
            kv.flush_copies()?;
            return Ok(graphs.run_ahead(batch, kv, patch)?);
        }
        let _ = (batch, kv, patch);
        Ok(None)
    }

    /// The forward pass proper over a step's [`BatchMeta`]: F32 logits of its logit rows.
    fn run(&self, meta: &BatchMeta, kv: &KvCache) -> candle_core::Result<Tensor> {
        // 1. Embed: [rows, hidden].
        let mut x = self.embed_tokens.forward(&meta.ids, self.dtype)?;
        // 2. RoPE: the fused kernel indexes the tables itself; candle's ops take each row's,
        //    the CPU F32 pass each row's as host slices (copied once, not in every layer).
        let cpu_f32 = self.device.is_cpu() && self.dtype == DType::F32;
        let rope = RopeAt::new(&self.rope, meta, !self.fused, cpu_f32)?;
        // 3. The decoder blocks and the final norm; 4. the head, only on the rows whose logits
        //    are wanted (the norm is per row).
        let logit_rows = |x: Tensor| -> candle_core::Result<Tensor> {
            if meta.num_logit_rows == x.dim(0)? { Ok(x) } else { x.index_select(&meta.logit_rows, 0) }
        };
        // A step of single-token rows writes its activations into the model's buffers.
        let scratch = self.scratch.as_ref().filter(|s| meta.decode_only().is_some_and(|(rows, len)| s.fits(rows, len)));
        let x = if self.fused || super::cpu_ops::applies(&x) {
            // Each residual add is fused with the norm that follows it (the next layer's input
            // norm, the final norm after the last layer), so every row leaves normed: Silica's
            // CUDA kernel, or one pass per row on the CPU (F32).
            let mut normed = self.layers[0].input_norm().forward(&x)?;
            for (i, layer) in self.layers.iter().enumerate() {
                let next = self.layers.get(i + 1).map_or(&self.norm, |l| l.input_norm());
                (x, normed) = layer.forward_fused(&x, &normed, next, meta, &rope, &kv.k[i], &kv.v[i], scratch)?;
            }
            logit_rows(normed)?
        } else {
            for (i, layer) in self.layers.iter().enumerate() {
                x = layer.forward(&x, meta, &rope, &kv.k[i], &kv.v[i])?;
            }
            self.norm.forward(&logit_rows(x)?)?
        };
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }
}
