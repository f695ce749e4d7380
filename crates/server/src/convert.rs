//! Validation at the edge: wire requests → typed engine requests, once. Every refusal names
//! the field, the limit and the value given.

use serde_json::Value;
use silica_engine::generate::{GenerateRequest, Prompt, StopParams};
use silica_engine::sampling::beam::BeamSearchParams;
use silica_engine::sampling::SamplingParams;
use silica_engine::tokenizer::{ChatMessage, ChatOptions, VALID_ROLES};

use crate::error::ApiError;
use crate::wire::{Content, GenerateBody, OpenAiSampling, StopField, Strategy, WireMessage};

/// Most stop strings per request, and longest stop string (characters).
pub const MAX_STOP: usize = 16;
pub const MAX_STOP_CHARS: usize = 512;
/// Most choices per OpenAI request (`n`).
pub const MAX_N: usize = 16;
/// Most top log-probabilities per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `max_tokens`-like fields: absent, or at least 1.
pub fn max_tokens(field: &'static str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) if n < 1 => Err(ApiError::invalid(field, format!("`{field}` must be at least 1, got {n}"))),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
    }
}

/// `stop`: at most [`MAX_STOP`] non-empty strings of at most [`MAX_STOP_CHARS`] characters.
pub fn stop_strings(s: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let v = match s {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if v.len() > MAX_STOP {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOP} stop sequences are allowed, got {}", v.len())));
    }
    for (i, s) in v.iter().enumerate() {
        if s.is_empty() {
            return Err(ApiError::invalid(format!("stop[{i}]"), "stop sequences must not be empty"));
        }
        let n = s.chars().count();
        if n > MAX_STOP_CHARS {
            return Err(ApiError::invalid(format!("stop[{i}]"), format!("a stop sequence may have at most {MAX_STOP_CHARS} characters, got {n}")));
        }
    }
    Ok(v)
}

/// `n`: 1..=[`MAX_N`].
pub fn choices(n: Option<i64>) -> Result<usize, ApiError> {
    match n {
        None => Ok(1),
        Some(n) if (1..=MAX_N as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid("n", format!("`n` must be between 1 and {MAX_N}, got {n}"))),
    }
}

/// OpenAI-shaped messages → engine chat messages.
pub fn messages(ms: Vec<WireMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if ms.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must contain at least one message"));
    }
    ms.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "developer" => "system".to_string(),
                r if VALID_ROLES.contains(&r) => r.to_string(),
                r => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!("unknown role `{r}`; expected one of system, developer, user, assistant, tool"),
                    ))
                }
            };
            if m.function_call.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(format!("messages[{i}].function_call"), "legacy `function_call` messages are not supported; use `tool_calls`"));
            }
            if m.audio.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(format!("messages[{i}].audio"), "audio is not supported"));
            }
            let content = match m.content {
                None => None,
                Some(Content::Text(t)) => Some(t),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            ("text", None) => {
                                return Err(ApiError::invalid(format!("messages[{i}].content[{j}].text"), "a text part needs `text`"))
                            }
                            (k, _) => {
                                return Err(ApiError::unsupported(
                                    format!("messages[{i}].content[{j}].type"),
                                    format!("content parts of type `{k}` are not supported; only `text`"),
                                ))
                            }
                        }
                    }
                    Some(text)
                }
            };
            if content.is_none() && m.tool_calls.as_ref().is_none_or(|t| t.is_empty()) && role != "assistant" {
                return Err(ApiError::invalid(format!("messages[{i}].content"), format!("a `{role}` message needs `content`")));
            }
            // Chat templates expect tool-call arguments as objects; OpenAI sends JSON strings.
            let tool_calls = m.tool_calls.map(|calls| {
                calls
                    .into_iter()
                    .map(|mut c| {
                        if let Some(args) = c.pointer_mut("/function/arguments") {
                            if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                                *args = parsed;
                            }
                        }
                        c
                    })
                    .collect()
            });
            Ok(ChatMessage {
                role,
                content,
                reasoning_content: m.reasoning_content,
                tool_calls,
                tool_call_id: m.tool_call_id,
                name: m.name,
            })
        })
        .collect()
}

/// OpenAI sampling fields → engine sampling and stop parameters (ranges that depend on the
/// model, such as token ids, are checked after routing by [`check_for_model`]).
pub fn openai_sampling(s: &OpenAiSampling, top_logprobs: Option<usize>) -> Result<(SamplingParams, Vec<String>, Vec<u32>, bool), ApiError> {
    let mut logit_bias = Vec::new();
    for (k, v) in s.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| ApiError::invalid("logit_bias", format!("logit_bias keys must be token ids, got `{k}`")))?;
        logit_bias.push((id, *v));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k < 0 => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (off) or at least 1, got {k}"))),
        Some(k) => Some(k as usize),
    };
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        seed: s.seed.map(|x| x as u64),
        top_logprobs,
    };
    Ok((sampling, stop_strings(s.stop.clone())?, s.stop_token_ids.clone().unwrap_or_default(), s.ignore_eos.unwrap_or(false)))
}

/// The checks that need the chosen model: sampling ranges and token ids.
pub fn check_for_model(req: &GenerateRequest, vocab_size: usize) -> Result<(), ApiError> {
    req.sampling.validate(vocab_size)?;
    if let Prompt::Tokens(ids) = &req.prompt {
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt must contain at least one token"));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ApiError::invalid("prompt", format!("token id {id} is outside the vocabulary of {vocab_size} tokens")));
        }
    }
    if let Some(&id) = req.stop.stop_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(ApiError::invalid("stop_token_ids", format!("token id {id} is outside the vocabulary of {vocab_size} tokens")));
    }
    if let Some(b) = &req.beam {
        b.validate()?;
    }
    Ok(())
}

/// Copies of `req` for `n` choices: choice `i` samples with `seed + i` when a seed is given.
pub fn per_choice(req: GenerateRequest, n: usize) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| {
            let mut r = req.clone();
            r.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(i as u64));
            r
        })
        .collect()
}

/// A refused OpenAI parameter: present and not null (or not its no-op value).
pub fn refuse_if_set(field: &'static str, v: &Option<Value>, why: &str) -> Result<(), ApiError> {
    match v {
        Some(x) if !x.is_null() => Err(ApiError::unsupported(field, format!("`{field}` is not supported: {why}"))),
        _ => Ok(()),
    }
}

/// `/generate` (and WebSocket) body → engine request.
pub fn native_request(b: &GenerateBody) -> Result<GenerateRequest, ApiError> {
    let prompt = match (&b.prompt, &b.messages) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("messages", "give either `prompt` or `messages`, not both")),
        (None, None) => return Err(ApiError::invalid("prompt", "`prompt` or `messages` is required")),
        (Some(p), None) if b.raw == Some(true) => Prompt::Text(p.clone()),
        (Some(p), None) => Prompt::Chat {
            messages: vec![ChatMessage::new("user", p)],
            options: ChatOptions { add_generation_prompt: true, ..Default::default() },
        },
        (None, Some(ms)) => {
            if b.raw == Some(true) {
                return Err(ApiError::invalid("raw", "`raw` applies to `prompt`, not to `messages`"));
            }
            Prompt::Chat { messages: messages(ms.clone())?, options: ChatOptions { add_generation_prompt: true, ..Default::default() } }
        }
    };
    if matches!(&prompt, Prompt::Text(t) if t.is_empty()) {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    let strategy = b.strategy.unwrap_or(if b.num_beams.is_some_and(|n| n > 1) {
        Strategy::Beam
    } else if b.temperature.is_some_and(|t| t > 0.0) {
        Strategy::Sample
    } else {
        Strategy::Greedy
    });
    let temperature = match (strategy, b.temperature) {
        (Strategy::Sample, None) => 1.0,
        (Strategy::Sample, Some(t)) if t <= 0.0 => {
            return Err(ApiError::invalid("temperature", format!("strategy `sample` needs a temperature above 0, got {t}")))
        }
        (Strategy::Sample, Some(t)) => t,
        (_, Some(t)) if t > 0.0 => {
            return Err(ApiError::invalid("temperature", format!("strategy `{}` is deterministic; temperature must be 0, got {t}", strategy_name(strategy))))
        }
        (_, _) => 0.0,
    };
    if strategy != Strategy::Beam && b.num_beams.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("num_beams", format!("`num_beams` needs strategy `beam`, got strategy `{}`", strategy_name(strategy))));
    }
    let top_k = match b.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k < 0 => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (off) or at least 1, got {k}"))),
        Some(k) => Some(k as usize),
    };
    let max_tokens = max_tokens("max_tokens", b.max_tokens)?;
    let beam = match strategy {
        Strategy::Beam => {
            let n = b.num_beams.unwrap_or(4);
            if !(2..=16).contains(&n) {
                return Err(ApiError::invalid("num_beams", format!("`num_beams` must be between 2 and 16, got {n}")));
            }
            Some(BeamSearchParams { num_beams: n as usize, length_penalty: b.length_penalty.unwrap_or(1.0), ..Default::default() })
        }
        _ => None,
    };
    Ok(GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p: b.top_p.unwrap_or(1.0),
            min_p: b.min_p.unwrap_or(0.0),
            repetition_penalty: b.repetition_penalty.unwrap_or(1.0),
            presence_penalty: b.presence_penalty.unwrap_or(0.0),
            frequency_penalty: b.frequency_penalty.unwrap_or(0.0),
            seed: b.seed,
            ..Default::default()
        },
        stop: StopParams { stop: stop_strings(b.stop.clone())?, max_tokens, ..Default::default() },
        beam,
    })
}

pub fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::Greedy => "greedy",
        Strategy::Sample => "sample",
        Strategy::Beam => "beam",
    }
}
