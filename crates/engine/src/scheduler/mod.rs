//! The engine loop: one OS thread per loaded model serves all of its requests together,
//! step by step (schedule → one batched forward → sample → postprocess), with continuous
//! batching, chunked prefill under a per-step token budget, a paged KV cache with prefix
//! reuse, preemption by recompute, cancellation and backpressure.
//!
//! ```text
//! EngineHandle::submit(request) ──mpsc──▶ engine thread ──▶ Event::Token … Event::Finished | Event::Error
//! ```
//! Every accepted request receives exactly one terminal event. Dropping the receiver cancels
//! the request; its KV blocks return to the pool at the next step.

mod engine_loop;
pub mod prefix;
pub mod stats;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{EngineError, Result};
use crate::generate::{BeamResult, FinishReason, GenerateRequest, TokenLogprob, Usage};
use crate::loaded::{LoadedModel, ModelInfo};
use crate::tokenizer::TokenTable;
pub use stats::EngineStats;

/// How much memory the KV cache may take.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvBudget {
    /// A number of blocks.
    Blocks(usize),
    /// Bytes of K and V across all layers.
    Bytes(u64),
    /// Tokens of context across all sequences.
    Tokens(usize),
    /// A share (0..1] of the memory available when the model has loaded (CPU: `MemAvailable`
    /// of /proc/meminfo). Other devices need an explicit size.
    ShareOfFreeMemory(f64),
}

/// Memory available for new allocations on the CPU, from /proc/meminfo.
pub fn cpu_available_bytes() -> Result<u64> {
    let path = std::path::Path::new("/proc/meminfo");
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::Io { path: path.into(), source: e })?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| EngineError::Config("engine.kv_cache: cannot read MemAvailable from /proc/meminfo".into()))
}

/// Scheduler settings (`configs/default.toml`, `[engine]`).
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    pub kv_cache: KvBudget,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens (decode rows + prefill chunks) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most requests waiting for admission; beyond it `submit` fails with `Overloaded`.
    pub max_waiting: usize,
    /// Reuse KV blocks of identical prompt prefixes across requests.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            block_size: 16,
            kv_cache: KvBudget::Tokens(65_536),
            max_num_seqs: 64,
            max_batch_tokens: 512,
            max_waiting: 256,
            prefix_caching: true,
        }
    }
}

impl SchedulerConfig {
    /// Read the `[engine]` table of a settings file (other tables are other crates'), then
    /// validate it. Errors name the file and the key.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let cfg: SchedulerConfig = crate::registry::settings_table(path, "engine").map_err(EngineError::Config)?;
        cfg.validate().map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, m: String| Err(EngineError::Config(format!("engine.{k}: {m}")));
        if self.block_size == 0 || self.block_size > 1024 {
            return bad("block_size", format!("must be in 1..=1024, got {}", self.block_size));
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs", "must be at least 1".into());
        }
        if self.max_batch_tokens < self.max_num_seqs.min(64) {
            return bad("max_batch_tokens", format!("must be at least min(max_num_seqs, 64), got {}", self.max_batch_tokens));
        }
        Ok(())
    }

    /// Number of blocks for a model with `bytes_per_token` of KV per position on `device`.
    pub fn num_blocks(&self, bytes_per_token: usize, device: &candle_core::Device) -> Result<usize> {
        let per_block = (bytes_per_token * self.block_size).max(1) as u64;
        let blocks = match self.kv_cache {
            KvBudget::Blocks(n) => n,
            KvBudget::Tokens(t) => t.div_ceil(self.block_size),
            KvBudget::Bytes(b) => (b / per_block) as usize,
            KvBudget::ShareOfFreeMemory(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(EngineError::Config(format!("engine.kv_cache.share_of_free_memory must be in (0, 1], got {f}")));
                }
                if !device.is_cpu() {
                    return Err(EngineError::Config(
                        "engine.kv_cache.share_of_free_memory is measured on the CPU only; give `bytes` or `tokens` for GPU devices".into(),
                    ));
                }
                let avail = cpu_available_bytes()?;
                ((avail as f64 * f) as u64 / per_block) as usize
            }
        };
        Ok(blocks.max(1))
    }
}

/// A piece of generated output.
#[derive(Debug, Clone, Serialize)]
pub struct TokenEvent {
    /// Text released by this token (may be empty while a UTF-8 character or a possible stop
    /// string is held back).
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
}

/// Per-request timings.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RequestTimings {
    /// From submission to admission into the running batch.
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
    /// Generated tokens after the first, per second of decoding.
    pub decode_tokens_per_s: f64,
    /// Prompt tokens actually computed (the rest came from the prefix cache).
    pub prompt_tokens_computed: usize,
    pub prompt_tokens_cached: usize,
}

/// The end of a request.
#[derive(Debug, Clone, Serialize)]
pub struct FinishedEvent {
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: RequestTimings,
    /// The full text (for beam search, the best beam).
    pub text: String,
    /// Beam search: every returned beam, best first.
    pub beams: Vec<BeamResult>,
    pub seed: Option<u64>,
}

/// What a request's stream carries: tokens, then exactly one `Finished` or `Error`.
#[derive(Debug)]
pub enum Event {
    Token(TokenEvent),
    Finished(FinishedEvent),
    Error(EngineError),
}

/// The receiving end of a request's events; drop it to cancel.
pub type EventStream = UnboundedReceiver<Event>;

pub(crate) enum Command {
    Submit(Submission),
    Shutdown,
}

pub(crate) struct Submission {
    pub req: GenerateRequest,
    pub tx: UnboundedSender<Event>,
    pub arrived: Instant,
}

/// A cheap, cloneable handle to a model's engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<Command>,
    pending: Arc<AtomicUsize>,
    max_waiting: usize,
    stats: Arc<Mutex<EngineStats>>,
    info: Arc<ModelInfo>,
    tokens: TokenTable,
    vocab_size: usize,
    context_length: usize,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("model", &self.info.name).finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Start the engine thread for `model`.
    pub fn start(model: LoadedModel, cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        let info = Arc::new(model.info.clone());
        let tokens = TokenTable::new(&model.tokenizer);
        let vocab_size = model.config().vocab_size;
        let context_length = model.config().max_position_embeddings;
        let (tx, rx) = std::sync::mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let mut engine = engine_loop::Engine::new(model, cfg.clone(), rx, pending.clone(), stats.clone())?;
        // Publish the initial figures (KV-cache size) before anyone reads them.
        engine.publish();
        let thread = std::thread::Builder::new()
            .name(format!("engine-{}", info.name))
            .spawn(move || engine.run())
            .map_err(|e| EngineError::Unavailable(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            tx,
            pending,
            max_waiting: cfg.max_waiting,
            stats,
            info,
            tokens,
            vocab_size,
            context_length,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Queue a request. Fails at once with `Overloaded` when the waiting queue is full;
    /// everything else (template, tokenization, limits) is checked on the engine thread and
    /// reported as an `Event::Error` on the stream. Never blocks.
    pub fn submit(&self, req: GenerateRequest) -> Result<EventStream> {
        let waiting = self.pending.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded { waiting, limit: self.max_waiting });
        }
        let (tx, rx) = unbounded_channel();
        let sub = Submission { req, tx, arrived: Instant::now() };
        if self.tx.send(Command::Submit(sub)).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Unavailable("the engine thread has stopped".into()));
        }
        Ok(rx)
    }

    /// Whether the waiting queue is full (the next `submit` would fail with `Overloaded`).
    pub fn is_overloaded(&self) -> bool {
        self.pending.load(Ordering::SeqCst) >= self.max_waiting
    }

    /// A snapshot of the live statistics. `waiting` counts every submitted request not yet
    /// admitted, including those the engine thread has not picked up yet.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        s.waiting = self.pending.load(Ordering::SeqCst);
        s
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// Every token's bytes, for reporting logprobs without the tokenizer.
    pub fn tokens(&self) -> &TokenTable {
        &self.tokens
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Stop the engine: requests still queued or running end with an `Unavailable` error.
    /// Waits for the thread to exit.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
    }
}

/// Collect a request's events into its final result (for callers that do not stream).
pub async fn collect(mut rx: EventStream) -> Result<(Vec<TokenEvent>, FinishedEvent)> {
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(t) => tokens.push(t),
            Event::Finished(f) => return Ok((tokens, f)),
            Event::Error(e) => return Err(e),
        }
    }
    Err(EngineError::Unavailable("the engine ended the stream without a result".into()))
}

/// Blocking variant of [`collect`] for threads outside an async runtime.
pub fn collect_blocking(mut rx: EventStream) -> Result<(Vec<TokenEvent>, FinishedEvent)> {
    let mut tokens = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => tokens.push(t),
            Event::Finished(f) => return Ok((tokens, f)),
            Event::Error(e) => return Err(e),
        }
    }
    Err(EngineError::Unavailable("the engine ended the stream without a result".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_budget_forms_and_config_errors() {
        let dev = candle_core::Device::Cpu;
        let c = |kv| SchedulerConfig { kv_cache: kv, block_size: 16, ..Default::default() };
        assert_eq!(c(KvBudget::Tokens(100)).num_blocks(1024, &dev).unwrap(), 7);
        assert_eq!(c(KvBudget::Bytes(16 * 1024 * 10)).num_blocks(1024, &dev).unwrap(), 10);
        assert_eq!(c(KvBudget::Blocks(3)).num_blocks(1024, &dev).unwrap(), 3);
        assert!(c(KvBudget::ShareOfFreeMemory(0.01)).num_blocks(1024, &dev).unwrap() >= 1);
        let err = c(KvBudget::ShareOfFreeMemory(1.5)).num_blocks(1024, &dev).unwrap_err().to_string();
        assert!(err.contains("share_of_free_memory") && err.contains("1.5"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "[engine]\nkv_cache = { share_of_free_memory = 0.25 }\nmax_num_seqs = 8\n[server]\nport = 1\n").unwrap();
        let cfg = SchedulerConfig::from_file(&p).unwrap();
        assert_eq!(cfg.kv_cache, KvBudget::ShareOfFreeMemory(0.25));
        assert_eq!(cfg.max_num_seqs, 8);
        std::fs::write(&p, "[engine]\nmax_num_sequences = 8\n").unwrap();
        let err = SchedulerConfig::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("s.toml") && err.contains("max_num_sequences"), "{err}");
    }
}
