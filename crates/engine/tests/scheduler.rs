//! The engine loop on the real demo model: batching does not change outputs, every request
//! gets exactly one terminal event and every KV block comes back, prefix caching skips
//! prefill, a full queue is refused.

use std::path::PathBuf;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use silica_engine::device::{DTypeSpec, DeviceSpec};
use silica_engine::generate::{FinishReason, GenerateRequest, Prompt, StopParams};
use silica_engine::loaded::LoadedModel;
use silica_engine::model::ModelFiles;
use silica_engine::sampling::beam::BeamSearchParams;
use silica_engine::sampling::SamplingParams;
use silica_engine::scheduler::{collect_blocking, EngineHandle, Event, FinishedEvent, KvBudget, SchedulerConfig};
use silica_engine::tokenizer::{ChatMessage, ChatOptions};
use silica_engine::EngineError;

fn demo() -> LoadedModel {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"));
    assert!(p.exists(), "demo model missing at {}: run scripts/fetch-demo-models.sh", p.display());
    LoadedModel::load("demo", &ModelFiles::Gguf(p), DeviceSpec::Cpu, DTypeSpec::Auto).expect("load demo model")
}

fn engine(cfg: SchedulerConfig) -> EngineHandle {
    EngineHandle::start(demo(), cfg).expect("start engine")
}

fn chat(system: Option<&str>, q: &str) -> Prompt {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", q));
    Prompt::Chat { messages, options: ChatOptions { add_generation_prompt: true, ..Default::default() } }
}

fn req(prompt: Prompt, sampling: SamplingParams, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt, sampling, stop: StopParams { max_tokens: Some(max_tokens), ..Default::default() }, beam: None }
}

const QUESTIONS: [&str; 16] = [
    "What is 2+2?", "Name a color.", "Write a haiku about rain.", "What is Rust?",
    "Say hello in French.", "What is the capital of Japan?", "Give me a prime number.", "What is HTTP?",
    "Name a planet.", "What is a hash map?", "Translate 'cat' to Spanish.", "What is 10 times 7?",
    "Name an ocean.", "What is Python?", "Write one word.", "What does CPU stand for?",
];

/// Statistics once the engine has published a step with nothing running or waiting (they are
/// published after each step, so they can trail the events by one step).
fn settled(h: &EngineHandle) -> silica_engine::scheduler::EngineStats {
    for _ in 0..600 {
        let s = h.stats();
        if s.running + s.waiting == 0 {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the engine did not settle: {:?}", h.stats());
}

fn run_all(h: &EngineHandle, reqs: Vec<GenerateRequest>) -> Vec<(Vec<u32>, FinishedEvent)> {
    let streams: Vec<_> = reqs.into_iter().map(|r| h.submit(r).expect("submit")).collect();
    streams
        .into_iter()
        .map(|rx| {
            let (tokens, fin) = collect_blocking(rx).expect("request succeeds");
            let ids: Vec<u32> = tokens.iter().flat_map(|t| t.token_ids.clone()).collect();
            let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
            assert_eq!(text, fin.text, "streamed pieces concatenate to the final text");
            (ids, fin)
        })
        .collect()
}

#[test]
fn concurrent_outputs_equal_outputs_alone() {
    let h = engine(SchedulerConfig::default());
    let greedy: Vec<_> = QUESTIONS.iter().map(|q| req(chat(None, q), SamplingParams::default(), 24)).collect();
    let seeded: Vec<_> = QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| req(chat(None, q), SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(i as u64), ..Default::default() }, 24))
        .collect();
    for reqs in [greedy, seeded] {
        let alone: Vec<_> = reqs.iter().map(|r| run_all(&h, vec![r.clone()]).remove(0)).collect();
        let together = run_all(&h, reqs.clone());
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.0, t.0, "request {i}: tokens differ when batched ({:?} vs {:?})", a.1.text, t.1.text);
            assert_eq!(a.1.text, t.1.text);
        }
    }
    let s = settled(&h);
    assert_eq!(s.kv_blocks_used, s.prefix_cache_blocks, "only the prefix cache holds blocks");
    h.shutdown();
}

#[test]
fn random_requests_and_cancellations_return_every_block() {
    // A small cache (no prefix cache to absorb the pressure) forces preemption; a small batch
    // budget forces chunked prefill.
    let cfg = SchedulerConfig {
        kv_cache: KvBudget::Tokens(1024),
        max_batch_tokens: 128,
        max_num_seqs: 24,
        prefix_caching: false,
        ..Default::default()
    };
    let h = engine(cfg);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1234);
    let n = 200;
    let mut threads = Vec::new();
    for i in 0..n {
        let max_tokens = rng.random_range(1..40);
        let cancel_after: Option<usize> = if rng.random_bool(0.3) { Some(rng.random_range(0..4)) } else { None };
        let q = format!("{} {}", QUESTIONS[i % 16], "and explain briefly. ".repeat(rng.random_range(0..16)));
        let beam = rng.random_bool(0.1);
        let mut r = req(chat(None, &q), SamplingParams { temperature: 0.7, seed: Some(i as u64), ..Default::default() }, max_tokens);
        if beam {
            r.sampling = SamplingParams::default();
            r.beam = Some(BeamSearchParams { num_beams: 2, ..Default::default() });
        }
        let mut rx = loop {
            match h.submit(r.clone()) {
                Ok(rx) => break rx,
                Err(EngineError::Overloaded { .. }) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("submit failed: {e}"),
            }
        };
        threads.push(std::thread::spawn(move || {
            let mut tokens = 0;
            let mut terminal = 0;
            loop {
                if cancel_after.is_some_and(|c| tokens >= c) {
                    return (true, terminal);
                }
                match rx.blocking_recv() {
                    Some(Event::Token(_)) => tokens += 1,
                    Some(Event::Finished(f)) => {
                        assert!(f.usage.completion_tokens <= max_tokens);
                        terminal += 1;
                    }
                    Some(Event::Error(e)) => panic!("request {i} failed: {e}"),
                    None => return (false, terminal),
                }
            }
        }));
    }
    let mut cancelled = 0;
    for t in threads {
        let (was_cancelled, terminal) = t.join().expect("client thread");
        if was_cancelled {
            cancelled += 1;
            assert!(terminal <= 1);
        } else {
            assert_eq!(terminal, 1, "exactly one terminal event");
        }
    }
    // Let the engine notice the last cancellations.
    let s = settled(&h);
    println!("stats after {n} requests ({cancelled} cancelled by the client): {s:?}");
    assert_eq!(s.running + s.waiting, 0);
    assert_eq!(s.kv_blocks_used, s.prefix_cache_blocks, "every block not held by the prefix cache is free");
    assert_eq!(s.requests_finished + s.requests_cancelled, n as u64);
    assert!(s.preemptions > 0, "the small cache should have forced preemption");
    h.shutdown();
}

#[test]
fn prefix_cache_skips_the_shared_system_prompt() {
    let h = engine(SchedulerConfig::default());
    let system = "You are a meticulous assistant for a large software company. ".repeat(12);
    let r = req(chat(Some(&system), "What is 3+4?"), SamplingParams::default(), 16);
    let first = run_all(&h, vec![r.clone()]).remove(0);
    let second = run_all(&h, vec![r.clone()]).remove(0);
    let other = run_all(&h, vec![req(chat(Some(&system), "Name a fruit."), SamplingParams::default(), 16)]).remove(0);
    println!("first {:?}\nsecond {:?}\nother {:?}", first.1.timings, second.1.timings, other.1.timings);
    assert_eq!(first.1.timings.prompt_tokens_cached, 0);
    assert!(second.1.timings.prompt_tokens_cached >= 128, "the system prompt's blocks are reused");
    assert!(second.1.timings.prompt_tokens_computed < first.1.timings.prompt_tokens_computed);
    assert_eq!(first.0, second.0, "same output with the cached prefix");
    assert!(other.1.timings.prompt_tokens_cached >= 128, "a different question after the same system prompt reuses it");
    // Alone on a cache-less engine the other question gives the same tokens.
    let cold = engine(SchedulerConfig { prefix_caching: false, ..Default::default() });
    let cold_other = run_all(&cold, vec![req(chat(Some(&system), "Name a fruit."), SamplingParams::default(), 16)]).remove(0);
    assert_eq!(cold_other.0, other.0);
    cold.shutdown();
    h.shutdown();
}

#[test]
fn a_long_prompt_does_not_stall_a_short_request() {
    // A 64-token step budget: the long prompt needs ~20 steps of prefill.
    let h = engine(SchedulerConfig { max_batch_tokens: 64, prefix_caching: false, ..Default::default() });
    let long_q = format!("Summarize this text: {}", "The quick brown fox jumps over the lazy dog. ".repeat(120));
    let long = h.submit(req(chat(None, &long_q), SamplingParams::default(), 4)).unwrap();
    let short = h.submit(req(chat(None, "Name a color."), SamplingParams::default(), 8)).unwrap();
    let t_long = std::thread::spawn(move || {
        let mut rx = long;
        let mut first = None;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token(_) if first.is_none() => first = Some(std::time::Instant::now()),
                Event::Finished(f) => return (first.expect("tokens before the end"), f),
                Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
        panic!("no terminal event");
    });
    let (short_tokens, short_done) = collect_blocking(short).expect("short request");
    assert_eq!(short_tokens.len(), short_done.usage.completion_tokens, "one token event per sampled token");
    let short_end = std::time::Instant::now();
    let (long_first, long_done) = t_long.join().unwrap();
    println!("long prompt {} tokens; short finished {:?} before the long one's first token",
        long_done.usage.prompt_tokens, long_first.saturating_duration_since(short_end));
    assert!(long_done.usage.prompt_tokens > 1000);
    assert!(short_end < long_first, "the short request waited for the long prompt's prefill");
    h.shutdown();
}

#[test]
fn full_queue_is_refused_and_bad_requests_get_one_error_event() {
    let h = engine(SchedulerConfig { max_waiting: 2, max_num_seqs: 1, ..Default::default() });
    let long = req(chat(None, "Count from 1 to 100."), SamplingParams::default(), 64);
    let a = h.submit(long.clone()).unwrap();
    let b = h.submit(long.clone()).unwrap();
    let mut refused = 0;
    let mut extra = Vec::new();
    for _ in 0..4 {
        match h.submit(long.clone()) {
            Err(EngineError::Overloaded { limit, .. }) => {
                assert_eq!(limit, 2);
                refused += 1;
            }
            Ok(rx) => extra.push(rx),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 2, "a full queue refuses with Overloaded");
    drop((a, b, extra));
    // Dropped receivers cancel: the engine reaps them at its next step and frees the queue.
    settled(&h);
    // Over-long max_tokens: one Error event naming the field and the numbers.
    let rx = h.submit(req(chat(None, "hi"), SamplingParams::default(), 100_000)).unwrap();
    let err = collect_blocking(rx).unwrap_err().to_string();
    assert!(err.contains("max_tokens") && err.contains("100000"), "{err}");
    let _ = FinishReason::Stop;
    h.shutdown();
}
