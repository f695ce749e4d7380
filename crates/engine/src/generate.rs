//! Running one request to completion on a loaded model: prompt preparation (chat template or
//! raw text), chunked prefill, the decode loop with sampling or beam search, incremental
//! detokenization, stop handling, and timings.
//!
//! The per-request state lives in [`SequenceOutput`] (text, stop matching, limits) so that the
//! batching scheduler can drive many of them with the same rules.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::kv::{KvCache, SeqCache};
use crate::loaded::LoadedModel;
use crate::model::{QwenModel, SeqInput};
use crate::sampling::beam::{BeamSearch, BeamSearchParams};
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, StopMatcher};
use crate::tokenizer::{ChatMessage, ChatOptions};

/// What to run: a chat conversation, raw text, or token ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Rendered with the model's chat template, with the generation prompt appended.
    Chat { messages: Vec<ChatMessage>, options: ChatOptions },
    /// Used as is (no template).
    Text(String),
    Tokens(Vec<u32>),
}

/// When to stop.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopParams {
    /// Stop strings: generation ends before the first occurrence, which is not returned.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (besides the model's end-of-turn tokens).
    pub stop_token_ids: Vec<u32>,
    /// Most new tokens; `None` runs to the end of the model's context.
    pub max_tokens: Option<usize>,
    /// Keep going past end-of-turn tokens.
    pub ignore_eos: bool,
}

/// A request to the engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Beam search instead of sampling.
    pub beam: Option<BeamSearchParams>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-turn token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context's end.
    Length,
    /// The client went away.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The log-probability of a generated token and its top alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub prefill: Duration,
    pub time_to_first_token: Duration,
    pub decode: Duration,
    pub total: Duration,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self, usage: &Usage) -> f64 {
        usage.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    /// Decode speed over the tokens after the first (the first comes out of the prefill).
    pub fn decode_tokens_per_s(&self, usage: &Usage) -> f64 {
        usage.completion_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// One finished beam.
#[derive(Debug, Clone, Serialize)]
pub struct BeamResult {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// `sum_logprob / len^length_penalty`, `len` counting a final end-of-turn token.
    pub score: f32,
    /// Ended by an end-of-turn token (rather than by the token budget).
    pub finished: bool,
}

/// The result of a request.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    pub logprobs: Vec<TokenLogprob>,
    /// With beam search: every returned beam, best first (`text` is the best one's).
    pub beams: Vec<BeamResult>,
    /// The seed the sampler used (reported so a run can be repeated).
    pub seed: Option<u64>,
}

/// Prompt tokens after template rendering and tokenization.
pub fn prepare_prompt(m: &LoadedModel, prompt: &Prompt) -> Result<Vec<u32>> {
    let ids = match prompt {
        Prompt::Chat { messages, options } => {
            let text = m.tokenizer.apply_chat_template(messages, options)?;
            m.tokenizer.encode(&text, false)?
        }
        Prompt::Text(t) => m.tokenizer.encode(t, false)?,
        Prompt::Tokens(t) => t.clone(),
    };
    if ids.is_empty() {
        return Err(EngineError::invalid("prompt", "the prompt is empty"));
    }
    let vocab = m.config().vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::invalid("prompt", format!("token id {bad} is outside the vocabulary (size {vocab})")));
    }
    Ok(ids)
}

/// The number of new tokens a request may generate: `max_tokens` if it fits in the context,
/// else an error that gives the numbers (nothing is truncated silently).
pub fn token_budget(prompt_len: usize, max_tokens: Option<usize>, context: usize) -> Result<usize> {
    if prompt_len >= context {
        return Err(EngineError::invalid(
            "prompt",
            format!("the prompt has {prompt_len} tokens; the model's context is {context} tokens"),
        ));
    }
    match max_tokens {
        Some(0) => Err(EngineError::invalid("max_tokens", "must be at least 1, got 0")),
        Some(n) if prompt_len + n > context => Err(EngineError::invalid(
            "max_tokens",
            format!(
                "prompt ({prompt_len} tokens) + max_tokens ({n}) = {} exceeds the model's context of {context} tokens",
                prompt_len + n
            ),
        )),
        Some(n) => Ok(n),
        None => Ok(context - prompt_len),
    }
}

/// Output bookkeeping of one sequence: detokenization, stop strings and tokens, limits.
pub struct SequenceOutput {
    detok: IncrementalDecoder,
    stop: StopMatcher,
    stop_ids: HashSet<u32>,
    budget: usize,
    /// Tokens that make up the text (stop tokens excluded).
    pub generated: Vec<u32>,
    /// Tokens sampled, stop tokens included (what usage counts).
    pub num_sampled: usize,
    pub text: String,
    pub finish: Option<FinishReason>,
}

impl SequenceOutput {
    pub fn new(m: &LoadedModel, stop: &StopParams, budget: usize) -> Result<Self> {
        let mut stop_ids: HashSet<u32> = stop.stop_token_ids.iter().copied().collect();
        if !stop.ignore_eos {
            stop_ids.extend(m.tokenizer.eos_token_ids().iter().copied());
        }
        Ok(SequenceOutput {
            detok: m.tokenizer.incremental_decoder(),
            stop: StopMatcher::new(stop.stop.clone())?,
            stop_ids,
            budget,
            generated: Vec::new(),
            num_sampled: 0,
            text: String::new(),
            finish: None,
        })
    }

    /// Take one sampled token; returns the text it releases (possibly empty).
    pub fn push(&mut self, token: u32) -> Result<String> {
        debug_assert!(self.finish.is_none(), "push after finish is a bug");
        self.num_sampled += 1;
        let mut out = String::new();
        if self.stop_ids.contains(&token) {
            self.finish = Some(FinishReason::Stop);
            self.flush(&mut out);
        } else {
            self.generated.push(token);
            if let Some(delta) = self.detok.push(token)? {
                let o = self.stop.push(&delta);
                out.push_str(&o.emit);
                if o.stopped {
                    self.finish = Some(FinishReason::Stop);
                }
            }
            if self.finish.is_none() && self.generated.len() >= self.budget {
                self.finish = Some(FinishReason::Length);
                self.flush(&mut out);
            }
        }
        self.text.push_str(&out);
        Ok(out)
    }

    /// At the end of generation, release what was held back: an incomplete UTF-8 tail and a
    /// partial stop-string candidate (a stop string completed here still ends the text).
    fn flush(&mut self, out: &mut String) {
        // A decode error at the very end loses at most an undecodable tail; report it.
        let rest = match self.detok.finish() {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "could not decode the last tokens");
                String::new()
            }
        };
        let o = self.stop.push(&rest);
        out.push_str(&o.emit);
        if o.stopped {
            self.finish = Some(FinishReason::Stop);
            return;
        }
        out.push_str(&self.stop.finish());
    }

    /// Whether the sequence can go on after its next token, whatever that token is: the token
    /// budget has room for two more.
    pub fn may_outlast_next(&self) -> bool {
        self.finish.is_none() && self.generated.len() + 1 < self.budget
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }
}

/// Largest prefill chunk per forward pass (bounds the attention mask's memory).
pub const PREFILL_CHUNK: usize = 512;

/// Run one request to completion, calling `on_text` with each streamed piece of text.
/// `kv` must be large enough for the prompt plus the budget (times the beams for beam search).
pub fn generate(
    m: &LoadedModel,
    kv: &mut KvCache,
    req: &GenerateRequest,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    let t0 = Instant::now();
    let vocab = m.config().vocab_size;
    req.sampling.validate(vocab)?;
    let prompt = prepare_prompt(m, &req.prompt)?;
    let budget = token_budget(prompt.len(), req.stop.max_tokens, m.config().max_position_embeddings)?;
    match &req.beam {
        Some(b) => beam_search(m, kv, req, b, prompt, budget, t0, on_text),
        None => sample_loop(m, kv, req, prompt, budget, t0, on_text),
    }
}

/// Prefill `tokens` into `seq` in chunks; returns the last position's logits.
fn prefill(m: &LoadedModel, kv: &mut KvCache, seq: &mut SeqCache, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut last = Vec::new();
    for chunk in tokens.chunks(PREFILL_CHUNK) {
        kv.reserve(seq, seq.len + chunk.len())?;
        let logits = m.model.forward(&[SeqInput { tokens: chunk, cache: seq, all_logits: false }], kv)?;
        seq.len += chunk.len();
        last = logits.squeeze(0)?.to_vec1::<f32>()?;
    }
    Ok(last)
}

#[allow(clippy::too_many_arguments)]
fn sample_loop(
    m: &LoadedModel,
    kv: &mut KvCache,
    req: &GenerateRequest,
    prompt: Vec<u32>,
    budget: usize,
    t0: Instant,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    let mut sampler = Sampler::new(req.sampling.clone(), m.config().vocab_size);
    let mut out = SequenceOutput::new(m, &req.stop, budget)?;
    let mut seq = SeqCache::default();
    let result = (|| -> Result<(Timings, Vec<TokenLogprob>)> {
        let mut logits = prefill(m, kv, &mut seq, &prompt)?;
        let prefill_t = t0.elapsed();
        let mut ttft = Duration::ZERO;
        let mut logprobs = Vec::new();
        let decode_start = Instant::now();
        loop {
            let s: Sampled = sampler.sample(&logits, &prompt, &out.generated)?;
            if req.sampling.top_logprobs.is_some() {
                logprobs.push(TokenLogprob { token: s.token, logprob: s.logprob, top: s.top_logprobs.clone() });
            }
            let piece = out.push(s.token)?;
            if ttft.is_zero() {
                ttft = t0.elapsed();
            }
            if !piece.is_empty() {
                on_text(&piece);
            }
            if out.is_finished() {
                break;
            }
            let next_len = seq.len + 1;
            kv.reserve(&mut seq, next_len)?;
            let l = m.model.forward(&[SeqInput { tokens: &[s.token], cache: &seq, all_logits: false }], kv)?;
            seq.len += 1;
            logits = l.squeeze(0)?.to_vec1::<f32>()?;
        }
        let timings = Timings { prefill: prefill_t, time_to_first_token: ttft, decode: decode_start.elapsed(), total: t0.elapsed() };
        Ok((timings, logprobs))
    })();
    kv.free(&mut seq);
    let (timings, logprobs) = result?;
    Ok(GenerateOutput {
        text: out.text.clone(),
        token_ids: out.generated.clone(),
        finish_reason: out.finish.unwrap_or(FinishReason::Length),
        usage: Usage { prompt_tokens: prompt.len(), completion_tokens: out.num_sampled },
        timings,
        logprobs,
        beams: Vec::new(),
        seed: Some(sampler.seed()),
    })
}

/// Cut `text` before the first occurrence of any stop string.
fn cut_at_stop(text: &str, stops: &[String]) -> (String, bool) {
    match stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(i) => (text[..i].to_string(), true),
        None => (text.to_string(), false),
    }
}

/// Finished beam hypotheses (best first) as results: text decoded and cut at the first stop
/// string; a beam ended by an end-of-turn token or a stop string counts as finished.
pub fn beam_results(m: &LoadedModel, hyps: Vec<crate::sampling::beam::BeamHypothesis>, stops: &[String]) -> Result<Vec<BeamResult>> {
    let mut beams = Vec::with_capacity(hyps.len());
    for h in hyps {
        let (text, hit_stop) = cut_at_stop(&m.tokenizer.decode(&h.tokens, true)?, stops);
        beams.push(BeamResult { text, finished: h.eos_token.is_some() || hit_stop, token_ids: h.tokens, score: h.score });
    }
    if beams.is_empty() {
        return Err(EngineError::invalid("num_beams", "beam search produced no hypothesis"));
    }
    Ok(beams)
}

/// Beam search: all live beams run as one batched forward per step; a beam's cache is forked
/// from its parent's (full blocks shared, the partial block copied on write).
#[allow(clippy::too_many_arguments)]
fn beam_search(
    m: &LoadedModel,
    kv: &mut KvCache,
    req: &GenerateRequest,
    params: &BeamSearchParams,
    prompt: Vec<u32>,
    budget: usize,
    t0: Instant,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    if !req.sampling.is_greedy() {
        return Err(EngineError::invalid(
            "temperature",
            "beam search is deterministic; sampling parameters (temperature > 0) cannot be combined with num_beams",
        ));
    }
    let mut eos: Vec<u32> = req.stop.stop_token_ids.clone();
    if !req.stop.ignore_eos {
        eos.extend(m.tokenizer.eos_token_ids().iter().copied());
    }
    let params = BeamSearchParams { max_new_tokens: budget, ..params.clone() };
    let mut search = BeamSearch::new(params, eos)?;
    let vocab = m.config().vocab_size;
    let mut live: Vec<SeqCache> = vec![SeqCache::default()];
    let mut ttft = Duration::ZERO;
    let mut prefill_t = Duration::ZERO;
    let decode_start = Instant::now();
    let result = (|| -> Result<()> {
        let mut logits = prefill(m, kv, &mut live[0], &prompt)?;
        prefill_t = t0.elapsed();
        let mut logprobs = Vec::with_capacity(vocab);
        let mut row = Vec::with_capacity(vocab);
        loop {
            logprobs.clear();
            for r in logits.chunks(vocab) {
                crate::sampling::log_softmax(r, &mut row);
                logprobs.extend_from_slice(&row);
            }
            let step = search.step(&logprobs, vocab)?;
            if ttft.is_zero() {
                ttft = t0.elapsed();
            }
            if step.done || step.beams.is_empty() {
                break;
            }
            let next: Vec<SeqCache> = step.beams.iter().map(|b| kv.fork(&live[b.parent])).collect();
            for mut s in std::mem::replace(&mut live, next) {
                kv.free(&mut s);
            }
            for s in live.iter_mut() {
                kv.reserve(s, s.len + 1)?;
            }
            let tokens: Vec<u32> = step.beams.iter().map(|b| b.token).collect();
            let inputs: Vec<SeqInput<'_>> = live
                .iter()
                .zip(&tokens)
                .map(|(s, t)| SeqInput { tokens: std::slice::from_ref(t), cache: s, all_logits: false })
                .collect();
            logits = m.model.forward(&inputs, kv)?.flatten_all()?.to_vec1::<f32>()?;
            for s in live.iter_mut() {
                s.len += 1;
            }
        }
        Ok(())
    })();
    for s in live.iter_mut() {
        kv.free(s);
    }
    result?;
    let beams = beam_results(m, search.finish(), &req.stop.stop)?;
    let best = beams[0].clone();
    let finish = if best.finished { FinishReason::Stop } else { FinishReason::Length };
    on_text(&best.text);
    Ok(GenerateOutput {
        text: best.text.clone(),
        token_ids: best.token_ids.clone(),
        finish_reason: finish,
        usage: Usage { prompt_tokens: prompt.len(), completion_tokens: best.token_ids.len() + usize::from(best.finished) },
        timings: Timings { prefill: prefill_t, time_to_first_token: ttft, decode: decode_start.elapsed(), total: t0.elapsed() },
        logprobs: Vec::new(),
        beams,
        seed: None,
    })
}

/// Teacher forcing: one forward over `tokens` returning, for every position, the `k` largest
/// (token id, logit) pairs of the next-token logits, best first. For checking a device and
/// dtype against a reference implementation on the same weights.
pub fn teacher_forced_top_k(m: &LoadedModel, tokens: &[u32], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    if tokens.is_empty() {
        return Err(EngineError::invalid("tokens", "at least one token is needed"));
    }
    let mut kv = m.kv_cache_for_tokens(tokens.len(), 16)?;
    let mut seq = SeqCache::default();
    kv.reserve(&mut seq, tokens.len())?;
    let logits = m.model.forward(&[SeqInput { tokens, cache: &seq, all_logits: true }], &mut kv);
    kv.free(&mut seq);
    Ok(logits?.to_vec2::<f32>()?.iter().map(|row| top_k_of(row, k)).collect())
}

/// Teacher forcing through decode steps: the first `decode_from` tokens in one prefill, then
/// every later position as a one-token decode step, so the decode path (batched decode
/// attention over the paged cache) is what is checked. With `streams` > 1, copies of the
/// sequence run in the same decode steps, copy `j` prefilling `j` fewer tokens (so every step
/// mixes sequences of different lengths); their logits are compared with copy 0's at the same
/// positions. Returns copy 0's top `k` per position and the largest difference between copies
/// (absolute, over the row's largest |logit|).
pub fn teacher_forced_decode(
    model: &QwenModel,
    tokens: &[u32],
    k: usize,
    decode_from: usize,
    streams: usize,
) -> Result<(Vec<Vec<(u32, f32)>>, f32)> {
    let n = tokens.len();
    if streams == 0 || decode_from < streams || decode_from >= n {
        return Err(EngineError::invalid(
            "decode_from",
            format!("need streams ({streams}) >= 1 and streams <= decode_from ({decode_from}) < tokens ({n})"),
        ));
    }
    let mut kv = model.kv_cache_for_tokens(streams * (n + 16), 16)?;
    let mut seqs: Vec<SeqCache> = (0..streams).map(|_| SeqCache::default()).collect();
    let result = (|| -> Result<(Vec<Vec<(u32, f32)>>, f32)> {
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(n);
        for (j, seq) in seqs.iter_mut().enumerate() {
            kv.reserve(seq, n)?;
            let p = decode_from - j;
            let l = model.forward(&[SeqInput { tokens: &tokens[..p], cache: seq, all_logits: j == 0 }], &mut kv)?;
            if j == 0 {
                rows.extend(l.to_vec2::<f32>()?);
            }
            seq.len = p;
        }
        let mut max_diff = 0f32;
        loop {
            let active: Vec<usize> = (0..streams).filter(|&j| seqs[j].len < n).collect();
            if active.is_empty() {
                break;
            }
            let inputs: Vec<SeqInput<'_>> = active
                .iter()
                .map(|&j| SeqInput { tokens: &tokens[seqs[j].len..seqs[j].len + 1], cache: &seqs[j], all_logits: false })
                .collect();
            let l = model.forward(&inputs, &mut kv)?.to_vec2::<f32>()?;
            for (row, &j) in l.into_iter().zip(&active) {
                let pos = seqs[j].len;
                if j == 0 {
                    rows.push(row);
                } else if pos >= decode_from {
                    let reference = &rows[pos];
                    let scale = reference.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-6);
                    let diff = row.iter().zip(reference).fold(0f32, |a, (&x, &y)| a.max((x - y).abs()));
                    max_diff = max_diff.max(diff / scale);
                }
            }
            for &j in &active {
                seqs[j].len += 1;
            }
        }
        Ok((rows.iter().map(|row| top_k_of(row, k)).collect(), max_diff))
    })();
    for seq in &mut seqs {
        kv.free(seq);
    }
    result
}

/// The `k` largest entries of a row, largest first (ties by id).
fn top_k_of(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx = Vec::new();
    crate::sampling::top_k_sorted(row, k, &mut idx);
    idx.into_iter().map(|i| (i, row[i as usize])).collect()
}
