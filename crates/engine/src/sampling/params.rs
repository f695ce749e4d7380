//! Per-request sampling parameters (OpenAI / Hugging Face semantics) and their validation.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Largest accepted `temperature`.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Largest accepted `repetition_penalty`.
pub const MAX_REPETITION_PENALTY: f32 = 10.0;
/// Bound on `|presence_penalty|` and `|frequency_penalty|` (OpenAI: -2.0..=2.0).
pub const MAX_ABS_PENALTY: f32 = 2.0;
/// Bound on `|logit_bias|` values (OpenAI: -100..=100).
pub const MAX_ABS_LOGIT_BIAS: f32 = 100.0;
/// Largest accepted `top_logprobs` (OpenAI: 0..=20).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Temperatures below this are treated as greedy decoding (as vLLM does), avoiding a
/// division by a (near) zero temperature.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How to pick the next token from one row of logits.
///
/// `Default` is greedy decoding with every processor off. Deserialising fills absent fields
/// with those defaults. Call [`SamplingParams::validate`] before use; the
/// [`Sampler`](super::Sampler) refuses to sample with invalid parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, `0..=2`. Below [`GREEDY_TEMPERATURE`] (in particular 0) decoding is
    /// greedy: argmax of the processed logits, ties to the lowest token id.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens. `None` or `Some(0)` = off; `k >= vocab` = off.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    /// reaches `top_p` (the token crossing the threshold is kept). `(0, 1]`; 1 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p * p_max`. `[0, 1]`; 0 = off.
    pub min_p: f32,
    /// Hugging Face repetition penalty over every token seen in the prompt or generated so
    /// far: positive logits are divided by it, negative ones multiplied. `(0, 10]`; 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over generated tokens: `logit -= presence_penalty` once for every
    /// token generated at least once. `-2..=2`; 0 = off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over generated tokens: `logit -= frequency_penalty * count`.
    /// `-2..=2`; 0 = off.
    pub frequency_penalty: f32,
    /// OpenAI logit bias: `(token id, bias)` pairs added to the raw logits, bias in `-100..=100`
    /// (-100 effectively bans a token, +100 effectively forces it). Repeated ids add up.
    pub logit_bias: Vec<(u32, f32)>,
    /// RNG seed. `None`: drawn from OS entropy; the seed actually used is reported by
    /// [`Sampler::seed`](super::Sampler::seed).
    pub seed: Option<u64>,
    /// Number of most likely alternatives to report with every token, `0..=20`.
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            top_logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: `temperature < GREEDY_TEMPERATURE` (so 0) or `top_k == Some(1)`.
    /// Greedy sampling never consumes random numbers.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE || self.top_k == Some(1)
    }

    /// Greedy with nothing that changes the logits first (penalties, bias) and no logprobs:
    /// the token is the raw logits' argmax.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy() && !self.needs_full_row()
    }

    /// Whether sampling needs the row's every logit on the host: penalties or a bias change the
    /// logits first, or top logprobs are reported.
    pub fn needs_full_row(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
            || self.top_logprobs.is_some()
    }

    /// Checks every field against its documented range. The error is
    /// [`EngineError::InvalidParam`] naming the field, the limit and the offending value.
    /// NaN is rejected everywhere.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let t = self.temperature;
        if !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(EngineError::invalid(
                "temperature",
                format!("temperature must be between 0 and {MAX_TEMPERATURE}, got {t}"),
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(EngineError::invalid(
                "top_p",
                format!("top_p must be greater than 0 and at most 1, got {p}"),
            ));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(EngineError::invalid(
                "min_p",
                format!("min_p must be between 0 and 1, got {m}"),
            ));
        }
        let r = self.repetition_penalty;
        if !(r > 0.0 && r <= MAX_REPETITION_PENALTY) {
            return Err(EngineError::invalid(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be greater than 0 and at most {MAX_REPETITION_PENALTY}, got {r}"
                ),
            ));
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-MAX_ABS_PENALTY..=MAX_ABS_PENALTY).contains(&v) {
                return Err(EngineError::invalid(
                    field,
                    format!(
                        "{field} must be between -{MAX_ABS_PENALTY} and {MAX_ABS_PENALTY}, got {v}"
                    ),
                ));
            }
        }
        for &(tok, bias) in &self.logit_bias {
            if tok as usize >= vocab_size {
                return Err(EngineError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias token ids must be below the vocabulary size {vocab_size}, got {tok}"
                    ),
                ));
            }
            if !(-MAX_ABS_LOGIT_BIAS..=MAX_ABS_LOGIT_BIAS).contains(&bias) {
                return Err(EngineError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias values must be between -{MAX_ABS_LOGIT_BIAS} and {MAX_ABS_LOGIT_BIAS}, got {bias} for token {tok}"
                    ),
                ));
            }
        }
        if let Some(n) = self.top_logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(EngineError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
                ));
            }
        }
        Ok(())
    }

    /// `top_k` as an effective cut-off: `Some(k)` only when it removes tokens.
    pub(crate) fn effective_top_k(&self, vocab_size: usize) -> Option<usize> {
        match self.top_k {
            Some(k) if k > 0 && k < vocab_size => Some(k),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(p: SamplingParams) -> String {
        match p.validate(100) {
            Ok(()) => panic!("expected {p:?} to be rejected"),
            Err(e) => {
                assert!(matches!(e, EngineError::InvalidParam { .. }), "{e:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        p.validate(10).unwrap();
        assert!(SamplingParams {
            temperature: 0.7,
            top_k: Some(1),
            ..Default::default()
        }
        .is_greedy());
        assert!(!SamplingParams {
            temperature: 0.7,
            ..Default::default()
        }
        .is_greedy());
    }

    #[test]
    fn serde_fills_defaults() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature":0.5,"logit_bias":[[3,-100.0]],"seed":7}"#)
                .unwrap();
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!(p.logit_bias, vec![(3, -100.0)]);
        assert_eq!(p.seed, Some(7));
        let back: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn validate_rejects_each_field() {
        let d = SamplingParams::default;
        let cases: Vec<(SamplingParams, &[&str])> = vec![
            (
                SamplingParams {
                    temperature: 3.5,
                    ..d()
                },
                &["temperature", "2", "3.5"],
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                &["temperature", "-0.1"],
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
                &["temperature", "NaN"],
            ),
            (SamplingParams { top_p: 0.0, ..d() }, &["top_p", "got 0"]),
            (SamplingParams { top_p: 1.5, ..d() }, &["top_p", "1.5"]),
            (SamplingParams { min_p: 1.25, ..d() }, &["min_p", "1.25"]),
            (SamplingParams { min_p: -0.5, ..d() }, &["min_p", "-0.5"]),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
                &["repetition_penalty", "got 0"],
            ),
            (
                SamplingParams {
                    repetition_penalty: 12.0,
                    ..d()
                },
                &["repetition_penalty", "10", "12"],
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..d()
                },
                &["presence_penalty", "2.5"],
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..d()
                },
                &["frequency_penalty", "-3"],
            ),
            (
                SamplingParams {
                    logit_bias: vec![(100, 1.0)],
                    ..d()
                },
                &["logit_bias", "100", "got 100"],
            ),
            (
                SamplingParams {
                    logit_bias: vec![(5, 150.0)],
                    ..d()
                },
                &["logit_bias", "150", "token 5"],
            ),
            (
                SamplingParams {
                    top_logprobs: Some(21),
                    ..d()
                },
                &["top_logprobs", "20", "21"],
            ),
        ];
        for (p, needles) in cases {
            let msg = err_of(p);
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
            }
        }
        // Boundaries are accepted.
        SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 10.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: vec![(99, -100.0), (0, 100.0)],
            top_logprobs: Some(20),
            ..d()
        }
        .validate(100)
        .unwrap();
    }
}
