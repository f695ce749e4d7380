//! End-to-end checks on the real demo model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M):
//! a greedy chat answer, beam search (each returned beam re-scored independently), seeds.
//! The model comes from `scripts/fetch-demo-models.sh` (run by `scripts/test.sh`).

use std::path::PathBuf;
use std::sync::OnceLock;

use silica_engine::device::{DTypeSpec, DeviceSpec};
use silica_engine::generate::{generate, FinishReason, GenerateOutput, GenerateRequest, Prompt, StopParams};
use silica_engine::kv::{KvCache, SeqCache};
use silica_engine::loaded::LoadedModel;
use silica_engine::model::{ModelFiles, SeqInput};
use silica_engine::sampling::beam::BeamSearchParams;
use silica_engine::sampling::SamplingParams;
use silica_engine::tokenizer::{ChatMessage, ChatOptions};

fn demo_path() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"));
    assert!(p.exists(), "demo model missing at {}: run scripts/fetch-demo-models.sh", p.display());
    p
}

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| LoadedModel::load("demo", &ModelFiles::Gguf(demo_path()), DeviceSpec::Cpu, DTypeSpec::Auto).expect("load demo model"))
}

fn chat(q: &str) -> Prompt {
    Prompt::Chat {
        messages: vec![ChatMessage::new("user", q)],
        options: ChatOptions { add_generation_prompt: true, ..Default::default() },
    }
}

fn run(req: &GenerateRequest) -> GenerateOutput {
    let m = model();
    let mut kv = m.kv_cache_for_tokens(4096, 16).unwrap();
    let mut streamed = String::new();
    let out = generate(m, &mut kv, req, &mut |p| streamed.push_str(p)).expect("generate");
    if req.beam.is_none() {
        assert_eq!(streamed, out.text, "streamed pieces concatenate to the text");
    }
    assert_eq!(kv.num_free_blocks(), kv.num_blocks(), "every KV block is returned");
    out
}

fn req(prompt: Prompt, sampling: SamplingParams, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt, sampling, stop: StopParams { max_tokens: Some(max_tokens), ..Default::default() }, beam: None }
}

#[test]
fn greedy_chat_answer_mentions_paris() {
    let out = run(&req(chat("What is the capital of France?"), SamplingParams::default(), 40));
    println!("{:?} {:?} {:?}", out.text, out.finish_reason, out.usage);
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop, "stops at <|im_end|> by itself");
    // Greedy is deterministic.
    let again = run(&req(chat("What is the capital of France?"), SamplingParams::default(), 40));
    assert_eq!(out.token_ids, again.token_ids);
}

#[test]
fn max_tokens_and_stop_strings_end_generation() {
    let out = run(&req(chat("Write a long poem about the sea."), SamplingParams::default(), 5));
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.usage.completion_tokens, 5);
    let full = run(&req(chat("What is the capital of France?"), SamplingParams::default(), 40));
    // Stop at the first occurrence of "Paris": the text before it, never the stop string.
    let mut r = req(chat("What is the capital of France?"), SamplingParams::default(), 40);
    r.stop.stop = vec!["Paris".into()];
    let stopped = run(&r);
    let cut = full.text.find("Paris").expect("the full answer mentions Paris");
    assert_eq!(stopped.text, full.text[..cut]);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
}

/// Sum of log-probabilities of `gen` after `prompt`, by one teacher-forced forward pass from
/// an empty cache (independent of the beam search's cache forks).
fn sequence_logprob(m: &LoadedModel, prompt: &[u32], gen: &[u32]) -> f32 {
    let mut kv: KvCache = m.kv_cache_for_tokens(prompt.len() + gen.len() + 16, 16).unwrap();
    let mut seq = SeqCache::default();
    let all: Vec<u32> = prompt.iter().chain(gen).copied().collect();
    kv.reserve(&mut seq, all.len()).unwrap();
    let logits = m.model.forward(&[SeqInput { tokens: &all, cache: &seq, all_logits: true }], &mut kv).unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    let mut total = 0f32;
    for (i, &tok) in gen.iter().enumerate() {
        let row = &rows[prompt.len() - 1 + i];
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        total += row[tok as usize] - lse;
    }
    total
}

#[test]
fn beam_search_returns_the_best_beam_and_scores_are_right() {
    let m = model();
    let mut r = req(chat("Name a prime number greater than 10."), SamplingParams::default(), 12);
    r.beam = Some(BeamSearchParams { num_beams: 4, length_penalty: 1.0, early_stopping: false, ..Default::default() });
    let out = run(&r);
    println!("best: {:?}", out.text);
    assert!(out.beams.len() >= 2, "several beams returned");
    assert_eq!(out.text, out.beams[0].text, "the text is the best beam's");
    for w in out.beams.windows(2) {
        assert!(w[0].score >= w[1].score, "beams sorted best first");
    }
    let prompt = silica_engine::generate::prepare_prompt(m, &r.prompt).unwrap();
    let eos = m.tokenizer.eos_token_ids();
    for b in &out.beams {
        // Score = sum logprob / len^length_penalty, over the generated tokens incl. a final EOS.
        let mut toks = b.token_ids.clone();
        if b.finished {
            toks.push(*eos.first().unwrap());
        }
        let lp = sequence_logprob(m, &prompt, &toks);
        let expect = lp / toks.len() as f32;
        println!("beam {:?}: reported {:.4}, recomputed {:.4}", b.text, b.score, expect);
        assert!((expect - b.score).abs() < 0.02, "beam {:?}: reported {} recomputed {}", b.text, b.score, expect);
    }
    // Greedy's own sequence scores no better than the best beam.
    let greedy = run(&req(chat("Name a prime number greater than 10."), SamplingParams::default(), 12));
    let mut g = greedy.token_ids.clone();
    if greedy.finish_reason == FinishReason::Stop {
        g.push(*eos.first().unwrap());
    }
    let gscore = sequence_logprob(m, &prompt, &g) / g.len() as f32;
    assert!(out.beams[0].score >= gscore - 0.02, "best beam {} vs greedy {}", out.beams[0].score, gscore);
}

#[test]
fn same_seed_same_text_different_seed_different_text() {
    let sampled = |seed| {
        let p = SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(seed), ..Default::default() };
        run(&req(chat("Write a short story about a robot."), p, 32))
    };
    let a = sampled(42);
    let b = sampled(42);
    let c = sampled(7);
    println!("{:?}\n{:?}", a.text, c.text);
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(a.text, b.text);
    assert_ne!(a.token_ids, c.token_ids);
}

#[test]
fn prompt_beyond_context_is_an_error_with_numbers() {
    let m = model();
    let mut kv = m.kv_cache_for_tokens(64, 16).unwrap();
    let r = req(chat("hi"), SamplingParams::default(), 40_000);
    let err = generate(m, &mut kv, &r, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("max_tokens") && err.contains("40000") && err.contains("32768"), "{err}");
}
