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
    /// Cache slots of positions `0..start + n`, for gathering K and V (prefill sequences on
    /// the gather path only; decode sequences are gathered together by [`DecodeGroup`]).
    pub read_slots: Option<Tensor>,
    /// Additive causal mask `[n, start + n]`, only when `n > 1` on the gather path.
    pub mask: Option<Tensor>,
}

/// The decode sequences (one new token each) of a step, attended together by one batched
/// gather + matmul per layer instead of a handful of kernels per sequence.
pub(crate) struct DecodeGroup {
    /// Indices into `BatchMeta::seqs`, in order.
    pub seq_idx: Vec<usize>,
    /// The batch row of each (`None` when they are exactly rows `0..d`).
    pub rows: Option<Tensor>,
    /// `[d * max_len]` cache slots, each sequence's positions padded to `max_len` with its
    /// first slot (masked out).
    pub slots: Tensor,
    /// `[d, 1, 1, max_len]` additive mask: 0 for real positions, -inf for padding (`None`
    /// when every sequence has `max_len` positions, or for the fused kernel).
    pub mask: Option<Tensor>,
    /// `[d]` u32 positions per sequence (the fused kernel's bound; `None` otherwise).
    pub lens: Option<Tensor>,
    pub max_len: usize,
}

/// How attention reads the cache in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttnMode {
    /// The CPU F32 kernel reads the pools directly.
    CpuKernel,
    /// candle's ops gather K/V per sequence (decode rows together).
    Gather,
    /// Silica's CUDA kernels write the cache and attend decode rows; prefill rows gather.
    Fused,
}

/// What the fused kernels need beyond the gather path.
pub(crate) struct FusedMeta {
    /// `[rows]` u32 cache slot of each row.
    pub write_slots: Tensor,
}

/// Everything a forward pass needs besides the weights and the cache tensors.
pub(crate) struct BatchMeta {
    pub ids: Tensor,
    pub positions: Tensor,
    pub seqs: Vec<AttnSeq>,
    /// Every row's cache slot broadcast to `[rows, kv_heads, head_dim]`: the new K/V of a
    /// layer are written with one scatter (`None` in fused mode: the kernel writes them).
    pub write_index: Option<Tensor>,
    /// Present when the fused kernels run this pass.
    pub fused: Option<FusedMeta>,
    /// Decode sequences attended together (gather path, i.e. not the CPU F32 kernel).
    pub decode: Option<DecodeGroup>,
    /// Rows whose logits are returned, in order.
    pub logit_rows: Tensor,
    pub num_logit_rows: usize,
}

impl BatchMeta {
    /// `mode` says which index tensors and masks attention needs.
    pub fn build(
        batch: &[SeqInput<'_>],
        kv: &KvCache,
        shape: (usize, usize),
        mask_dtype: DType,
        device: &Device,
        mode: AttnMode,
    ) -> candle_core::Result<Self> {
        let gather = mode != AttnMode::CpuKernel;
        let fused = mode == AttnMode::Fused;
        let (kv_heads, head_dim) = shape;
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut logit_rows = Vec::new();
        let mut seqs = Vec::with_capacity(batch.len());
        let bs = kv.block_size();
        let mut write_slots: Vec<u32> = Vec::with_capacity(total);
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
            write_slots.extend_from_slice(&read[start..]);
            let mask = if gather && n > 1 {
                // Row i (position start + i) sees positions 0..=start + i; broadcast over the
                // query heads of a group by the attention, so built once per sequence.
                let l = start + n;
                let mut m = vec![0f32; n * l];
                for i in 0..n {
                    for v in &mut m[i * l + start + i + 1..(i + 1) * l] {
                        *v = f32::NEG_INFINITY;
                    }
                }
                Some(Tensor::from_vec(m, (n, l), device)?.to_dtype(mask_dtype)?)
            } else {
                None
            };
            let read_slots = if gather && n > 1 { Some(Tensor::from_vec(read.clone(), start + n, device)?) } else { None };
            seqs.push(AttnSeq { row, n, start, read_slots, slots: read, mask });
        }
        let decode = if gather { DecodeGroup::build(&seqs, mask_dtype, device, fused)? } else { None };
        let (write_index, fused) = if fused {
            (None, Some(FusedMeta { write_slots: Tensor::from_vec(write_slots, total, device)? }))
        } else {
            let index: Vec<u32> =
                write_slots.iter().flat_map(|&s| std::iter::repeat_n(s, kv_heads * head_dim)).collect();
            (Some(Tensor::from_vec(index, (total, kv_heads, head_dim), device)?), None)
        };
        let num_logit_rows = logit_rows.len();
        Ok(BatchMeta {
            ids: Tensor::from_vec(ids, total, device)?,
            positions: Tensor::from_vec(positions, total, device)?,
            write_index,
            fused,
            decode,
            seqs,
            logit_rows: Tensor::from_vec(logit_rows, num_logit_rows, device)?,
            num_logit_rows,
        })
    }

    /// `(rows, positions attended)` when every row is one sequence's single new token, all in
    /// the decode group (the fused kernels' decode step); `None` otherwise.
    pub(crate) fn decode_only(&self) -> Option<(usize, usize)> {
        let g = self.decode.as_ref()?;
        let all = self.fused.is_some()
            && g.rows.is_none()
            && g.seq_idx.len() == self.seqs.len()
            && self.seqs.iter().all(|s| s.n == 1);
        all.then_some((self.seqs.len(), g.max_len))
    }
}

#[cfg(feature = "cuda")]
impl BatchMeta {
    /// The meta of a captured decode step (`graph.rs`): every row one token, its inputs in the
    /// graph's persistent buffers; no tensor is made here.
    pub(crate) fn from_graph_buffers(b: &super::graph::Buffers, rows: usize) -> Self {
        BatchMeta {
            ids: b.ids.clone(),
            positions: b.positions.clone(),
            seqs: (0..rows)
                .map(|row| AttnSeq { row, n: 1, start: 0, slots: Vec::new(), read_slots: None, mask: None })
                .collect(),
            write_index: None,
            fused: Some(FusedMeta { write_slots: b.write_slots.clone() }),
            decode: Some(DecodeGroup {
                seq_idx: (0..rows).collect(),
                rows: None,
                slots: b.table.clone(),
                mask: None,
                lens: Some(b.lens.clone()),
                max_len: b.capacity,
            }),
            // Every row's logits: never indexed.
            logit_rows: b.ids.clone(),
            num_logit_rows: rows,
        }
    }
}

impl DecodeGroup {
    /// `fused`: the kernel bounds each sequence by its length (no mask).
    fn build(seqs: &[AttnSeq], mask_dtype: DType, device: &Device, fused: bool) -> candle_core::Result<Option<Self>> {
        let seq_idx: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].n == 1).collect();
        if seq_idx.is_empty() {
            return Ok(None);
        }
        let d = seq_idx.len();
        let max_len = seq_idx.iter().map(|&i| seqs[i].slots.len()).max().unwrap_or(1);
        let mut slots = Vec::with_capacity(d * max_len);
        for &i in &seq_idx {
            let s = &seqs[i].slots;
            slots.extend_from_slice(s);
            slots.extend(std::iter::repeat_n(s[0], max_len - s.len()));
        }
        let padded = seq_idx.iter().any(|&i| seqs[i].slots.len() < max_len);
        let in_order = seq_idx.iter().enumerate().all(|(k, &i)| seqs[i].row == k);
        let rows = if in_order {
            None
        } else {
            Some(Tensor::from_vec(seq_idx.iter().map(|&i| seqs[i].row as u32).collect::<Vec<_>>(), d, device)?)
        };
        Ok(Some(DecodeGroup {
            rows,
            slots: Tensor::from_vec(slots, d * max_len, device)?,
            mask: if fused || !padded {
                None
            } else {
                let mut mask = Vec::with_capacity(d * max_len);
                for &i in &seq_idx {
                    let len = seqs[i].slots.len();
                    mask.extend(std::iter::repeat_n(0f32, len));
                    mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, max_len - len));
                }
                Some(Tensor::from_vec(mask, (d, 1, 1, max_len), device)?.to_dtype(mask_dtype)?)
            },
            lens: if fused {
                let lens: Vec<u32> = seq_idx.iter().map(|&i| seqs[i].slots.len() as u32).collect();
                Some(Tensor::from_vec(lens, d, device)?)
            } else {
                None
            },
            max_len,
            seq_idx,
        }))
    }
}
