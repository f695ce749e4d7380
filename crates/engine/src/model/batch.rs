//! The explicit forward context: which sequences are in this step, their new tokens, their
//! positions and their cache blocks. Built once per step on the host, shared by every layer.

use candle_core::{DType, Device, Tensor};

use crate::kv::{KvCache, SeqCache};

/// One sequence's part of a batched forward pass.
pub struct SeqInput<'a> {
    /// The new tokens to run (a prefill chunk, or one token when decoding).
    pub tokens: &'a [u32],
    /// The sequence's cache: positions `0..cache.len` are stored; blocks must already be
    /// reserved for `cache.len + tokens.len()` positions.
    pub cache: &'a SeqCache,
    /// Return logits for every new token instead of only the last one.
    pub all_logits: bool,
}

/// Per-sequence attention bookkeeping.
pub(crate) struct AttnSeq {
    /// First row of this sequence in the batch.
    pub row: usize,
    /// Number of new tokens.
    pub n: usize,
    /// Position of the first new token.
    pub start: usize,
    /// Cache slots of positions `0..start + n` (host copy of `read_slots`).
    pub slots: Vec<u32>,
    /// Cache slots of positions `0..start + n`, for gathering K and V.
    pub read_slots: Tensor,
    /// Contiguous runs `(row offset in sequence, first slot, count)` to write new K/V to.
    pub write_runs: Vec<(usize, usize, usize)>,
    /// Additive causal mask `[groups * n, start + n]`, only when `n > 1`.
    pub mask: Option<Tensor>,
}

/// Everything a forward pass needs besides the weights and the cache tensors.
pub(crate) struct BatchMeta {
    pub ids: Tensor,
    pub positions: Tensor,
    pub seqs: Vec<AttnSeq>,
    /// Rows whose logits are returned, in order.
    pub logit_rows: Tensor,
    pub num_logit_rows: usize,
}

impl BatchMeta {
    pub fn build(
        batch: &[SeqInput<'_>],
        kv: &KvCache,
        groups: usize,
        mask_dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut logit_rows = Vec::new();
        let mut seqs = Vec::with_capacity(batch.len());
        let bs = kv.block_size();
        for s in batch {
            let row = ids.len();
            let start = s.cache.len;
            let n = s.tokens.len();
            if n == 0 {
                candle_core::bail!("a sequence in the batch has no new tokens");
            }
            if s.cache.blocks.len() * bs < start + n {
                candle_core::bail!(
                    "blocks for {} positions reserved, {} needed (engine bug)",
                    s.cache.blocks.len() * bs,
                    start + n
                );
            }
            ids.extend_from_slice(s.tokens);
            positions.extend((start..start + n).map(|p| p as u32));
            if s.all_logits {
                logit_rows.extend((row..row + n).map(|r| r as u32));
            } else {
                logit_rows.push((row + n - 1) as u32);
            }
            let read: Vec<u32> = (0..start + n).map(|p| kv.slot(s.cache, p) as u32).collect();
            let mut write_runs = Vec::new();
            let mut i = 0;
            while i < n {
                let pos = start + i;
                let in_block = bs - pos % bs;
                let count = in_block.min(n - i);
                write_runs.push((i, kv.slot(s.cache, pos), count));
                i += count;
            }
            let mask = if n > 1 {
                let l = start + n;
                let mut m = vec![0f32; groups * n * l];
                for g in 0..groups {
                    for i in 0..n {
                        let r = (g * n + i) * l;
                        for v in &mut m[r + start + i + 1..r + l] {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
                Some(Tensor::from_vec(m, (groups * n, l), device)?.to_dtype(mask_dtype)?)
            } else {
                None
            };
            seqs.push(AttnSeq {
                row,
                n,
                start,
                read_slots: Tensor::from_vec(read.clone(), start + n, device)?,
                slots: read,
                write_runs,
                mask,
            });
        }
        let num_logit_rows = logit_rows.len();
        Ok(BatchMeta {
            ids: Tensor::from_vec(ids, total, device)?,
            positions: Tensor::from_vec(positions, total, device)?,
            seqs,
            logit_rows: Tensor::from_vec(logit_rows, num_logit_rows, device)?,
            num_logit_rows,
        })
    }
}
