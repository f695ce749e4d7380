//! `silica bench`: load one model behind its engine thread and measure it at several
//! concurrency levels: aggregate generated tokens/s, time to first token and inter-token
//! latency percentiles, as seen by a client of the engine handle.

use std::time::{Duration, Instant};

use anyhow::Result;
use silica_engine::generate::{GenerateRequest, Prompt, StopParams};
use silica_engine::sampling::beam::BeamSearchParams;
use silica_engine::sampling::SamplingParams;
use silica_engine::scheduler::{EngineHandle, Event};
use silica_engine::tokenizer::{ChatMessage, ChatOptions};

/// What one bench level measures.
#[derive(Clone)]
pub struct BenchSpec {
    pub concurrency: Vec<usize>,
    pub max_tokens: usize,
    pub strategy: String,
    pub num_beams: usize,
    /// Synthetic prompts of exactly this many tokens (distinct per request, so the prefix
    /// cache cannot serve them) instead of the chat questions.
    pub prompt_tokens: Option<usize>,
}

/// The strategies `silica bench --strategy` knows.
pub const STRATEGIES: [&str; 5] = ["greedy", "sample", "top-k", "top-p", "beam"];

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BenchRow {
    pub strategy: String,
    pub max_tokens: usize,
    pub prompt_tokens: Option<usize>,
    pub concurrency: usize,
    pub requests: usize,
    pub generated_tokens: usize,
    pub wall_s: f64,
    pub aggregate_tokens_per_s: f64,
    pub per_stream_tokens_per_s: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p95: f64,
    pub itl_ms_p50: f64,
    pub itl_ms_p95: f64,
    /// Decode steps per second of one stream (1000 / ITL p50).
    pub decode_tokens_per_s: f64,
    /// Weight bytes read per decode step × steps/s, over the device's bandwidth.
    pub bandwidth_utilisation: Option<f64>,
    /// Rounds this row is the median of ([`median_rows`]).
    pub rounds: usize,
}

const QUESTIONS: &[&str] = &[
    "Explain how a hash map works.",
    "Write a Python function that reverses a linked list.",
    "What are the main differences between TCP and UDP?",
    "Describe the water cycle in detail.",
    "Write a short story about a lighthouse keeper.",
    "How does garbage collection work in Java?",
    "List ten uses of a paperclip.",
    "Explain recursion to a child.",
];

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn request(i: usize, spec: &BenchSpec) -> GenerateRequest {
    let sampling = match spec.strategy.as_str() {
        "greedy" | "beam" => SamplingParams::default(),
        "top-k" => SamplingParams { temperature: 0.8, top_k: Some(40), seed: Some(i as u64), ..Default::default() },
        "top-p" => SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(i as u64), ..Default::default() },
        _ => SamplingParams { temperature: 0.8, seed: Some(i as u64), ..Default::default() },
    };
    let prompt = match spec.prompt_tokens {
        // Ordinary vocabulary ids (100..20100), different for every request.
        Some(n) => Prompt::Tokens((0..n).map(|j| (100 + (i * 7919 + j * 31) % 20_000) as u32).collect()),
        None => Prompt::Chat {
            messages: vec![ChatMessage::new("user", QUESTIONS[i % QUESTIONS.len()])],
            options: ChatOptions { add_generation_prompt: true, ..Default::default() },
        },
    };
    GenerateRequest {
        prompt,
        sampling,
        // Fixed-length outputs so every level does the same work.
        stop: StopParams { max_tokens: Some(spec.max_tokens), ignore_eos: true, ..Default::default() },
        beam: (spec.strategy == "beam").then(|| BeamSearchParams { num_beams: spec.num_beams, ..Default::default() }),
    }
}

/// Run every concurrency level; returns one row per level.
pub async fn run(handle: &EngineHandle, spec: &BenchSpec) -> Result<Vec<BenchRow>> {
    // Warm-up: one short request of the same shape (first-touch allocations, thread pools,
    // the first use of each kernel), with a prompt of its own. Every measured request also has
    // its own index, so a token prompt is never one the prefix cache has already seen: a
    // time to first token is a whole prefill.
    let warm = BenchSpec { concurrency: vec![1], max_tokens: 4, ..spec.clone() };
    run_level(handle, &warm, 1, WARM_UP_INDEX).await?;
    let mut rows = Vec::new();
    let mut next = 0;
    for &c in &spec.concurrency {
        let row = run_level(handle, spec, c, next).await?;
        next += c;
        tracing::info!(?row, "bench level done");
        rows.push(row);
    }
    Ok(rows)
}

/// The warm-up request's index: far from the measured ones (0, 1, 2, ...).
const WARM_UP_INDEX: usize = 1_000_003;

/// `c` concurrent requests with indices `first..first + c`.
async fn run_level(handle: &EngineHandle, spec: &BenchSpec, c: usize, first: usize) -> Result<BenchRow> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(c);
    for i in first..first + c {
        let mut rx = handle.submit(request(i, spec))?;
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut first: Option<Duration> = None;
            let mut last = t0;
            let mut itl = Vec::new();
            let mut tokens = 0usize;
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token(t) => {
                        let now = Instant::now();
                        match first {
                            None => first = Some(now - t0),
                            Some(_) => itl.push((now - last).as_secs_f64() * 1e3),
                        }
                        last = now;
                        tokens += t.token_ids.len().max(1);
                    }
                    Event::Finished(f) => {
                        let n = f.usage.completion_tokens.max(tokens);
                        // Beam search sends its text in one event at the end: its first token
                        // and decode rate are the engine's (first beam step; tokens after it
                        // per second).
                        let (first, rate) = if itl.is_empty() && n > 1 {
                            (f.timings.time_to_first_token, Some(f.timings.decode_tokens_per_s))
                        } else {
                            (first.unwrap_or_default(), None)
                        };
                        return Ok::<_, anyhow::Error>((first, itl, rate, n));
                    }
                    Event::Error(e) => return Err(e.into()),
                }
            }
            anyhow::bail!("stream ended without a result")
        }));
    }
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    let mut rates = Vec::new();
    let mut generated = 0;
    for t in tasks {
        let (f, i, rate, n) = t.await??;
        ttft.push(f.as_secs_f64() * 1e3);
        itl.extend(i);
        rates.extend(rate);
        generated += n;
    }
    let wall = start.elapsed().as_secs_f64();
    let itl_p50 = percentile(&mut itl, 50.0);
    let decode = if itl_p50 > 0.0 { 1e3 / itl_p50 } else { percentile(&mut rates, 50.0) };
    Ok(BenchRow {
        strategy: spec.strategy.clone(),
        max_tokens: spec.max_tokens,
        prompt_tokens: spec.prompt_tokens,
        decode_tokens_per_s: decode,
        bandwidth_utilisation: None,
        concurrency: c,
        requests: c,
        generated_tokens: generated,
        wall_s: wall,
        aggregate_tokens_per_s: generated as f64 / wall,
        per_stream_tokens_per_s: generated as f64 / wall / c as f64,
        ttft_ms_p50: percentile(&mut ttft, 50.0),
        ttft_ms_p95: percentile(&mut ttft, 95.0),
        itl_ms_p50: itl_p50,
        itl_ms_p95: percentile(&mut itl, 95.0),
        rounds: 1,
    })
}

/// Rounds of the same runs, each round's rows in the same order (one row per run and
/// concurrency level), folded into one row per run: the round with the median decode tok/s per
/// stream (the lower of the two middle ones for an even count), with `rounds` set. Running the
/// strategies in turn, round after round, and taking each one's median lets a machine that
/// drifts during the bench weigh on every strategy alike.
pub fn median_rows(rounds: Vec<Vec<BenchRow>>) -> Result<Vec<BenchRow>> {
    let n = rounds.len();
    let Some(len) = rounds.first().map(Vec::len) else { return Ok(Vec::new()) };
    if rounds.iter().any(|r| r.len() != len) {
        anyhow::bail!("bench rounds of different lengths: {:?}", rounds.iter().map(Vec::len).collect::<Vec<_>>());
    }
    let mut per_run: Vec<Vec<BenchRow>> = (0..len).map(|_| Vec::with_capacity(n)).collect();
    for round in rounds {
        for (run, row) in per_run.iter_mut().zip(round) {
            run.push(row);
        }
    }
    Ok(per_run
        .into_iter()
        .map(|mut run| {
            run.sort_by(|a, b| a.decode_tokens_per_s.total_cmp(&b.decode_tokens_per_s));
            let mut row = run.swap_remove((n - 1) / 2);
            row.rounds = n;
            row
        })
        .collect())
}

/// Fill in bandwidth utilisation: `bytes_per_step` weight bytes read per decode step.
pub fn add_bandwidth(rows: &mut [BenchRow], bytes_per_step: f64, bandwidth_gbs: f64) {
    for r in rows {
        r.bandwidth_utilisation = Some(bytes_per_step * r.decode_tokens_per_s / (bandwidth_gbs * 1e9));
    }
}

/// A markdown table of the rows. Beam search streams no tokens: no inter-token latency ("-").
pub fn table(rows: &[BenchRow]) -> String {
    let itl = |ms: f64| if ms > 0.0 { format!("{ms:.2}") } else { "-".to_string() };
    let mut s = String::from(
        "| strategy | new tokens | prompt | streams | aggregate tok/s | decode tok/s per stream | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | bandwidth |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |\n",
            r.strategy,
            r.max_tokens,
            r.prompt_tokens.map_or("chat".to_string(), |n| n.to_string()),
            r.concurrency,
            r.aggregate_tokens_per_s,
            r.decode_tokens_per_s,
            r.ttft_ms_p50,
            r.ttft_ms_p95,
            itl(r.itl_ms_p50),
            itl(r.itl_ms_p95),
            r.bandwidth_utilisation.map_or("-".to_string(), |u| format!("{:.0}%", u * 100.0)),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{median_rows, BenchRow};

    fn row(strategy: &str, decode: f64) -> BenchRow {
        BenchRow { strategy: strategy.into(), decode_tokens_per_s: decode, rounds: 1, ..Default::default() }
    }

    #[test]
    fn each_run_keeps_its_median_round() {
        let rounds = vec![
            vec![row("greedy", 100.0), row("top-p", 90.0)],
            vec![row("greedy", 120.0), row("top-p", 80.0)],
            vec![row("greedy", 110.0), row("top-p", 95.0)],
        ];
        let rows = median_rows(rounds).unwrap();
        let got: Vec<(&str, f64, usize)> = rows.iter().map(|r| (r.strategy.as_str(), r.decode_tokens_per_s, r.rounds)).collect();
        assert_eq!(got, vec![("greedy", 110.0, 3), ("top-p", 90.0, 3)]);
        // Two rounds: the lower middle one.
        let rows = median_rows(vec![vec![row("greedy", 100.0)], vec![row("greedy", 120.0)]]).unwrap();
        assert_eq!((rows[0].decode_tokens_per_s, rows[0].rounds), (100.0, 2));
        assert!(median_rows(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn rounds_of_different_lengths_are_an_error() {
        let err = median_rows(vec![vec![row("greedy", 1.0)], vec![]]).unwrap_err();
        assert!(err.to_string().contains("different lengths"), "{err}");
    }
}
