//! Live per-model statistics for the router and `/performance`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A snapshot of one engine's state and recent performance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_free: usize,
    /// Blocks held by the prefix cache.
    pub prefix_cache_blocks: usize,
    pub requests_total: u64,
    pub requests_finished: u64,
    pub requests_failed: u64,
    pub requests_cancelled: u64,
    pub preemptions: u64,
    pub tokens_generated: u64,
    pub prompt_tokens_computed: u64,
    pub prompt_tokens_cached: u64,
    /// Generated tokens per second over the last few seconds, all sequences together.
    pub recent_decode_tokens_per_s: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p95: f64,
    /// Inter-token latency.
    pub itl_ms_p50: f64,
    pub itl_ms_p95: f64,
    /// End-to-end latency of finished requests (submission to last token).
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    /// Bytes of the KV-cache pools (allocated once at start).
    pub kv_cache_bytes: u64,
}

/// Rolling windows the engine thread keeps to fill [`EngineStats`].
#[derive(Debug, Default)]
pub(crate) struct Windows {
    steps: VecDeque<(Instant, usize)>,
    ttft: VecDeque<f64>,
    itl: VecDeque<f64>,
    latency: VecDeque<f64>,
}

const WINDOW: Duration = Duration::from_secs(10);
const SAMPLES: usize = 2048;

fn push_bounded(q: &mut VecDeque<f64>, v: f64) {
    if q.len() == SAMPLES {
        q.pop_front();
    }
    q.push_back(v);
}

/// The `p`-th percentile (0..=100) of `v` by nearest rank; 0 for no samples.
pub fn percentile(v: &VecDeque<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

impl Windows {
    pub fn record_step(&mut self, now: Instant, tokens: usize) {
        self.steps.push_back((now, tokens));
        while self.steps.front().is_some_and(|(t, _)| now.duration_since(*t) > WINDOW) {
            self.steps.pop_front();
        }
    }
    pub fn record_ttft(&mut self, d: Duration) {
        push_bounded(&mut self.ttft, d.as_secs_f64() * 1e3);
    }
    pub fn record_itl(&mut self, d: Duration) {
        push_bounded(&mut self.itl, d.as_secs_f64() * 1e3);
    }
    pub fn record_latency(&mut self, d: Duration) {
        push_bounded(&mut self.latency, d.as_secs_f64() * 1e3);
    }
    pub fn fill(&self, s: &mut EngineStats, now: Instant) {
        let tokens: usize = self.steps.iter().map(|(_, n)| n).sum();
        s.recent_decode_tokens_per_s = match self.steps.front() {
            Some((t0, _)) if tokens > 0 => {
                let span = now.duration_since(*t0).as_secs_f64().max(0.5);
                tokens as f64 / span
            }
            _ => 0.0,
        };
        s.ttft_ms_p50 = percentile(&self.ttft, 50.0);
        s.ttft_ms_p95 = percentile(&self.ttft, 95.0);
        s.itl_ms_p50 = percentile(&self.itl, 50.0);
        s.itl_ms_p95 = percentile(&self.itl, 95.0);
        s.latency_ms_p50 = percentile(&self.latency, 50.0);
        s.latency_ms_p95 = percentile(&self.latency, 95.0);
    }
}
