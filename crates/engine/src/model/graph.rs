//! CUDA graphs for decode steps: a step of one or two single-token rows launches ~10 kernels per
//! layer, and on a 3B model the host needs longer to enqueue them (~10 µs each through candle)
//! than the GPU needs to run them. The step is captured once per shape and replayed with one
//! launch. Steps of up to [`max_rows`] rows are captured (one stream, a 4-beam search).
//!
//! A graph bakes in every kernel argument, so a captured step reads its inputs from buffers that
//! outlive it (token ids, positions, write slots, the slot table padded to a capacity bucket,
//! lengths), written before each replay, and leaves its logits in another. Shape: (rows,
//! capacity), the capacity a power of two ≥ the longest sequence (at least 256 positions); the
//! decode kernel reads each row's length, so padding costs only the table upload. A shape is
//! captured the second time it is seen (the first step loads the kernels' modules, which a
//! capture must not do), after one more eager run that fills candle's cache of kernel-argument
//! uploads (see `capture`). Everything else (prefill, more rows, other devices, `SILICA_CUDA_GRAPH=0`)
//! runs eagerly; a shape whose capture fails (some op the stream cannot record) runs eagerly
//! from then on, with a warning.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use super::batch::{BatchMeta, SeqInput};
use crate::kv::KvCache;

/// Most rows a captured step has: `SILICA_CUDA_GRAPH` (default 4, the rows of a 4-beam search;
/// `0` turns graphs off). Larger batches spend their time in the matmuls, not in launches.
pub(crate) fn max_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| std::env::var("SILICA_CUDA_GRAPH").ok().and_then(|v| v.parse().ok()).unwrap_or(4))
}

/// Smallest capacity bucket, in positions.
const MIN_CAPACITY: usize = 256;

use super::Patch;

/// Sets a step's input ids to `ids` (`[rows]` u32 on the device).
pub(crate) fn set_ids(b: &Buffers, ids: &Tensor) -> candle_core::Result<()> {
    if ids.dims() != b.ids.dims() || ids.dtype() != DType::U32 {
        candle_core::bail!("run_ahead: ids {:?} {:?} for {:?}", ids.shape(), ids.dtype(), b.ids.shape());
    }
    b.ids.slice_set(&ids.contiguous()?, 0, 0)
}

/// Decides a beam step on the device from the step before's top-n selection and writes the
/// next step's ids, write slots and slot table into `b` ([`super::fused::beam_advance`]);
/// returns the decision on the device.
pub(crate) fn advance_beams(b: &Buffers, top: &Tensor, nout: usize, a: &super::fused::BeamAdvance<'_>, pools: &[&Tensor]) -> candle_core::Result<Tensor> {
    super::fused::beam_advance(top, nout, a, &b.ids, &b.write_slots, &b.table, b.capacity, pools)
}

/// The persistent inputs and output of one captured shape. The inputs are views of one u32
/// buffer (each part starting on a 16-byte boundary), written with one copy per step.
pub(crate) struct Buffers {
    inputs: Tensor,
    pub ids: Tensor,
    pub positions: Tensor,
    pub write_slots: Tensor,
    /// `[rows * capacity]` slots, each row padded with its first slot.
    pub table: Tensor,
    pub lens: Tensor,
    pub logits: Tensor,
    pub capacity: usize,
}

/// Where each input sits in [`Buffers::inputs`] / [`StepInputs::words`]: ids, positions, write
/// slots and lengths (`rows` each, padded to 4 words), then the table.
struct InputLayout {
    part: usize,
    table: usize,
}

impl InputLayout {
    fn new(rows: usize, capacity: usize) -> Self {
        let part = rows.next_multiple_of(4);
        InputLayout { part, table: rows * capacity }
    }
    fn len(&self) -> usize {
        4 * self.part + self.table
    }
}

/// One step's host-side inputs, laid out as the buffers hold them.
pub(crate) struct StepInputs {
    words: Vec<u32>,
    rows: usize,
    capacity: usize,
}

impl StepInputs {
    /// `None` unless every sequence adds exactly one token and wants only its logits.
    /// The graph shape `(rows, capacity)` of a step: `None` unless every sequence adds exactly
    /// one token and wants only its logits, and there are at most [`max_rows`] of them.
    fn shape_of(batch: &[SeqInput<'_>]) -> Option<(usize, usize)> {
        if batch.len() > max_rows() || batch.iter().any(|s| s.tokens.len() != 1 || s.all_logits) {
            return None;
        }
        let longest = batch.iter().map(|s| s.cache.len + 1).max()?;
        Some((batch.len(), longest.next_power_of_two().max(MIN_CAPACITY)))
    }

    /// The inputs of a step of shape `(rows, capacity)` (from [`shape_of`](Self::shape_of)).
    fn new(batch: &[SeqInput<'_>], kv: &KvCache, (rows, capacity): (usize, usize)) -> Self {
        let at = InputLayout::new(rows, capacity);
        let mut words = vec![0u32; at.len()];
        let (small, table) = words.split_at_mut(4 * at.part);
        for (i, (s, row)) in batch.iter().zip(table.chunks_exact_mut(capacity)).enumerate() {
            let len = s.cache.len + 1;
            small[i] = s.tokens[0];
            small[at.part + i] = s.cache.len as u32;
            small[2 * at.part + i] = kv.slot(s.cache, s.cache.len) as u32;
            small[3 * at.part + i] = len as u32;
            for (p, t) in row[..len].iter_mut().enumerate() {
                *t = kv.slot(s.cache, p) as u32;
            }
            let pad = row[0];
            row[len..].fill(pad);
        }
        StepInputs { words, rows, capacity }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.capacity)
    }
}

/// A captured graph; every use goes through [`DecodeGraphs`]' lock, which is what the CUDA
/// docs ask of graph objects (no concurrent calls on one graph).
struct Captured {
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    buffers: Buffers,
}

// SAFETY: the graph is only touched under `DecodeGraphs::inner`'s mutex.
unsafe impl Send for Captured {}

impl Captured {
    /// Writes the step's inputs (then changed on the device by `patch`, when given) and
    /// launches the graph; the logits land in the graph's buffer.
    fn replay(&self, step: &StepInputs, patch: Option<Patch<'_>>) -> candle_core::Result<Tensor> {
        upload(&self.buffers, step)?;
        if let Some(patch) = patch {
            patch(&self.buffers)?;
        }
        self.graph.launch().map_err(|e| candle_core::Error::Msg(format!("CUDA graph launch: {e}")))?;
        Ok(self.buffers.logits.clone())
    }
}

#[derive(Default)]
struct Inner {
    captured: HashMap<(usize, usize), Captured>,
    seen: HashSet<(usize, usize)>,
    /// Shapes whose capture failed: they run eagerly from then on.
    failed: HashSet<(usize, usize)>,
}

/// The model's captured decode steps.
#[derive(Default)]
pub(crate) struct DecodeGraphs {
    inner: Mutex<Inner>,
}

impl DecodeGraphs {
    /// Runs the step through a graph when one is (or can now be) captured for its shape;
    /// `Ok(None)`: run it eagerly. `body` is the model's forward over a [`BatchMeta`].
    /// The step's inputs are only gathered when a graph will run it.
    pub fn run(
        &self,
        batch: &[SeqInput<'_>],
        kv: &KvCache,
        vocab: usize,
        device: &candle_core::Device,
        body: &dyn Fn(&BatchMeta) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(key) = StepInputs::shape_of(batch) else { return Ok(None) };
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.failed.contains(&key) {
            return Ok(None);
        }
        // A shape first seen runs eagerly (see the module docs).
        if !inner.captured.contains_key(&key) && inner.seen.insert(key) {
            return Ok(None);
        }
        let step = &StepInputs::new(batch, kv, key);
        if !inner.captured.contains_key(&key) {
            match capture(step, vocab, device, body) {
                Ok(c) => {
                    tracing::debug!(rows = key.0, capacity = key.1, "decode step captured as a CUDA graph");
                    inner.captured.insert(key, c);
                }
                Err(e) => {
                    tracing::warn!(rows = key.0, capacity = key.1, error = %e, "capturing a decode step as a CUDA graph failed; steps of this shape run without one");
                    inner.failed.insert(key);
                    return Ok(None);
                }
            }
        }
        inner.captured[&key].replay(step, None).map(Some)
    }

    /// Replays the captured step of this batch's shape with inputs that the device finishes:
    /// the batch's are uploaded, then `patch` (called only when a graph will run) changes them
    /// on the device before the launch, e.g. the input ids to the previous step's selected
    /// tokens, not yet on the host (the batch's own tokens are then ignored). `Ok(None)` when
    /// no graph of that shape is captured yet: nothing was launched. The logits stay in the
    /// graph's buffer, which the next replay of the shape overwrites (stream-ordered).
    pub fn run_ahead(&self, batch: &[SeqInput<'_>], kv: &KvCache, patch: Patch<'_>) -> candle_core::Result<Option<Tensor>> {
        let Some(key) = StepInputs::shape_of(batch) else { return Ok(None) };
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = inner.captured.get(&key) else { return Ok(None) };
        c.replay(&StepInputs::new(batch, kv, key), Some(patch)).map(Some)
    }
}

#[cfg(test)]
impl DecodeGraphs {
    /// The shapes captured so far.
    fn captured(&self) -> Vec<(usize, usize)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).captured.keys().copied().collect()
    }
}

fn upload(b: &Buffers, s: &StepInputs) -> candle_core::Result<()> {
    super::fused::upload_u32(&b.inputs, &s.words)
}

/// Sets the device's default memory pool to keep what it has reserved (release threshold: all).
fn keep_pool(stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let cu_device = stream.context().cu_device();
    // SAFETY: plain driver calls on the device's own default pool; the attribute is a u64.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device)
            .result()
            .map_err(|e| candle_core::Error::Msg(format!("default memory pool: {e}")))?;
        let threshold = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &threshold as *const u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(|e| candle_core::Error::Msg(format!("memory pool threshold: {e}")))?;
    }
    Ok(())
}

fn capture(
    step: &StepInputs,
    vocab: usize,
    device: &candle_core::Device,
    body: &dyn Fn(&BatchMeta) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Captured> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(dev) = device else { candle_core::bail!("CUDA graphs need a CUDA device") };
    let (rows, capacity) = step.shape();
    let at = InputLayout::new(rows, capacity);
    let inputs = Tensor::zeros(at.len(), DType::U32, device)?;
    let part = |i: usize| inputs.narrow(0, i * at.part, rows);
    let buffers = Buffers {
        ids: part(0)?,
        positions: part(1)?,
        write_slots: part(2)?,
        lens: part(3)?,
        table: inputs.narrow(0, 4 * at.part, at.table)?,
        inputs,
        logits: Tensor::zeros((rows, vocab), DType::F32, device)?,
        capacity,
    };
    // The capture records without running; the inputs only need to be valid slots.
    upload(&buffers, step)?;
    let meta = BatchMeta::from_graph_buffers(&buffers, rows);
    let stream = dev.cuda_stream();
    let err = |what: &str, e: candle_core::cuda_backend::cudarc::driver::DriverError| candle_core::Error::Msg(format!("{what}: {e}"));
    // Keep the stream's pool from handing memory back to the driver at synchronisations, and
    // start from an idle stream (no frees of earlier steps still in flight).
    keep_pool(&stream)?;
    // candle's kernels upload their shapes and strides from host memory at each launch; a
    // captured upload would re-read that (freed) host memory at every replay. With candle's
    // upload cache on, one eager run stores each upload on the device and the capture copies
    // from there (and fails, rather than record a host read, if one is missing).
    let _cache = dev.enable_cuda_graph_htod_cache();
    body(&meta).and_then(|logits| buffers.logits.slice_set(&logits, 0, 0))?;
    stream.synchronize().map_err(|e| err("synchronize", e))?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| err("begin capture", e))?;
    // Every tensor made inside is freed inside, so the graph owns no memory between replays.
    let recorded = body(&meta).and_then(|logits| buffers.logits.slice_set(&logits, 0, 0));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    recorded?;
    let graph = graph
        .map_err(|e| candle_core::Error::Msg(format!("end capture: {e}")))?
        .ok_or_else(|| candle_core::Error::Msg("the capture recorded nothing".into()))?;
    Ok(Captured { graph, buffers })
}

/// Replayed graphs against the same steps run eagerly (runs where the `cuda` feature is built, on
/// a machine with a CUDA device).
#[cfg(test)]
mod tests {
    use crate::kv::{KvCacheConfig, SeqCache};
    use crate::model::SeqInput;
    use candle_core::Device;

    use crate::testing::{load_f16, load_random_f16, tiny_fused_config};

    #[test]
    fn replayed_decode_steps_equal_eager_ones() {
        replay_matches_eager(1, 300);
        // Three rows: cuBLAS matmuls inside the graph.
        replay_matches_eager(3, 40);
    }

    /// `teacher_forced_decode` with copies of one sequence prefilled to different lengths, then
    /// decoded together (rows of different lengths, several attention splits each, as `silica
    /// logits --decode-from --streams` does on the GPU machine): the copies' logits at a
    /// position must match the first copy's, F16 rounding apart. (The K/V reads before the PDL
    /// wait that broke the H100's teacher-forced check did not fail this test;
    /// `replayed_decode_steps_equal_eager_ones` failed on them in 4 runs of 4, and had passed
    /// once before.)
    #[test]
    fn copies_of_different_lengths_decode_alike() {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let (cfg, dir) = (tiny_fused_config(4, 2), tempfile::tempdir().unwrap());
        let m = load_random_f16(&cfg, 5, dir.path(), &dev).unwrap();
        assert!(m.graphs.is_some(), "the fused kernels and graphs apply to this model");
        let tokens: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % cfg.vocab_size as u32).collect();
        let (top, diff) = crate::generate::teacher_forced_decode(&m, &tokens, 1, 150, 4).unwrap();
        assert_eq!(top.len(), tokens.len());
        assert!(top.iter().flatten().all(|&(_, v)| v.is_finite()), "copy 0's logits not finite");
        // Copy 0 prefilled the positions that copy j decoded (150 - j .. 150): F16 rounding
        // apart, ~0.01 of the logit range (0.007 on the H100's 3B).
        assert!(diff < 0.03, "copies differ by {diff} of the logit range");
    }

    fn replay_matches_eager(seqs: usize, steps: usize) {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let (cfg, dir) = (tiny_fused_config(2, 1), tempfile::tempdir().unwrap());
        let graphs = load_random_f16(&cfg, 3, dir.path(), &dev).unwrap();
        let mut eager = load_f16(&cfg, dir.path(), &dev).unwrap();
        assert!(graphs.graphs.is_some(), "the fused kernels and graphs apply to this model");
        eager.graphs = None;
        let kv_cfg = KvCacheConfig { block_size: 16, num_blocks: 64 };
        let (mut kv_g, mut kv_e) = (graphs.new_kv_cache(kv_cfg).unwrap(), eager.new_kv_cache(kv_cfg).unwrap());
        let mut seq_g = vec![SeqCache::default(); seqs];
        let mut seq_e = vec![SeqCache::default(); seqs];
        let mut tokens: Vec<Vec<u32>> = (0..seqs as u32).map(|s| vec![5 + s, 17, 3, 99 + s, 42]).collect();
        let mut fed = 0;
        // A prefill, then decode steps: eager (shape first seen), captured, replayed ..., and
        // (one row) again past 256 positions (the next capacity bucket).
        for step in 0..steps {
            let mut inputs_g = Vec::new();
            let mut inputs_e = Vec::new();
            for k in 0..seqs {
                let new = &tokens[k][fed..];
                kv_g.reserve(&mut seq_g[k], fed + new.len()).unwrap();
                kv_e.reserve(&mut seq_e[k], fed + new.len()).unwrap();
            }
            for k in 0..seqs {
                inputs_g.push(SeqInput { tokens: &tokens[k][fed..], cache: &seq_g[k], all_logits: false });
                inputs_e.push(SeqInput { tokens: &tokens[k][fed..], cache: &seq_e[k], all_logits: false });
            }
            let g = graphs.forward(&inputs_g, &mut kv_g).unwrap();
            let e = eager.forward(&inputs_e, &mut kv_e).unwrap();
            let e: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap_or_else(|x| panic!("step {step}, eager: {x}"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap_or_else(|x| panic!("step {step}, graph: {x}"));
            assert!(e.iter().all(|v| v.is_finite()), "{seqs} rows, step {step}: eager logits not finite");
            assert_eq!(g, e, "{seqs} rows, step {step}");
            let n = tokens[0].len() - fed;
            for k in 0..seqs {
                seq_g[k].len += n;
                seq_e[k].len += n;
                let row = &e[k * cfg.vocab_size..(k + 1) * cfg.vocab_size];
                let next = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
                tokens[k].push(next);
            }
            fed += n;
        }
        assert!(graphs.graphs.as_ref().unwrap().captured().contains(&(seqs, 256)), "{seqs} rows: no graph was captured");
    }
}
