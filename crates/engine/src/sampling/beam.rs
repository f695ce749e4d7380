//! Beam-search bookkeeping, independent of the model (Hugging Face `BeamSearchScorer` /
//! `BeamHypotheses` semantics, one sequence).
//!
//! The engine drives it:
//! 1. run the prompt, take the last-position logits, `log_softmax` them (one row; or
//!    `num_beams` identical rows — only the first is used at step 0, as HF initialises the
//!    other beams' scores to -1e9),
//! 2. [`BeamSearch::step`] returns the next live beams as `(parent, token, cumulative logprob)`;
//!    the engine forks/reorders the KV caches so that new beam `i` is `parent`'s cache plus
//!    `token`, and feeds those rows (in that order) to the next step,
//! 3. when [`BeamStep::done`] is set, [`BeamSearch::finish`] gives the hypotheses, best first.

use serde::{Deserialize, Serialize};

use super::math;
use crate::error::{EngineError, Result};

/// Smallest accepted `num_beams`.
pub const MIN_BEAMS: usize = 2;
/// Largest accepted `num_beams`.
pub const MAX_BEAMS: usize = 16;

/// Writes the log-softmax of `logits` into `out` (resized to `logits.len()`).
///
/// `-inf` logits give `-inf`; if every logit is `-inf` every output is `-inf`. NaN or `+inf`
/// inputs give NaN outputs (rejected by [`BeamSearch::step`]).
pub fn log_softmax(logits: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let max = math::max(logits);
    if max == f32::NEG_INFINITY {
        // All `-inf` (or empty, or all NaN: make that visible as NaN).
        let fill = if logits.iter().any(|l| l.is_nan()) {
            f32::NAN
        } else {
            f32::NEG_INFINITY
        };
        out.resize(logits.len(), fill);
        return;
    }
    let lse = (max as f64 + math::exp_sum(logits, max, 1.0).ln()) as f32;
    out.extend(logits.iter().map(|&l| l - lse));
}

/// Beam-search settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BeamSearchParams {
    /// Number of beams, `2..=16` (default 4).
    pub num_beams: usize,
    /// Exponent of the length normalisation: a finished hypothesis scores
    /// `sum_logprob / len.powf(length_penalty)` (default 1.0; > 0 favours longer outputs,
    /// < 0 shorter ones; 0 = raw sum). Must be finite.
    pub length_penalty: f32,
    /// `true`: stop as soon as `num_beams` hypotheses are finished. `false` (default): HF's
    /// heuristic — stop once the best live candidate, normalised by the current length,
    /// cannot beat the worst kept hypothesis.
    pub early_stopping: bool,
    /// Maximum number of generated tokens (steps), at least 1 (default 256).
    pub max_new_tokens: usize,
}

impl Default for BeamSearchParams {
    fn default() -> Self {
        BeamSearchParams {
            num_beams: 4,
            length_penalty: 1.0,
            early_stopping: false,
            max_new_tokens: 256,
        }
    }
}

impl BeamSearchParams {
    /// Checks the ranges; errors name the field, the limit and the value.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_beams;
        if !(MIN_BEAMS..=MAX_BEAMS).contains(&n) {
            return Err(EngineError::invalid(
                "num_beams",
                format!("num_beams must be between {MIN_BEAMS} and {MAX_BEAMS}, got {n}"),
            ));
        }
        let lp = self.length_penalty;
        if !lp.is_finite() {
            return Err(EngineError::invalid(
                "length_penalty",
                format!("length_penalty must be a finite number, got {lp}"),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(EngineError::invalid(
                "max_new_tokens",
                "max_new_tokens must be at least 1 for beam search, got 0",
            ));
        }
        Ok(())
    }
}

/// One next live beam: it continues live beam `parent` (an index into the rows given to
/// the step) with `token`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamChoice {
    /// Index of the parent beam among the rows passed to this step.
    pub parent: usize,
    /// The token appended.
    pub token: u32,
    /// Sum of the token logprobs of the beam, this token included.
    pub cum_logprob: f32,
}

/// Outcome of one [`BeamSearch::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct BeamStep {
    /// The next live beams, best first (at most `num_beams`). Row `i` of the next step's
    /// input must be the continuation of `beams[i]`.
    pub beams: Vec<BeamChoice>,
    /// The search is over (enough hypotheses, or `max_new_tokens` reached): call
    /// [`BeamSearch::finish`] and do not run the model on `beams`.
    pub done: bool,
}

/// A finished (or, at the length limit, unfinished) sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamHypothesis {
    /// Generated tokens, excluding the EOS token that ended it.
    pub tokens: Vec<u32>,
    /// Length-normalised score: `sum_logprob / len.powf(length_penalty)` where `len` counts
    /// the EOS token for finished hypotheses (as HF does), i.e. `tokens.len() + 1`, and is
    /// `tokens.len()` for beams cut at `max_new_tokens`.
    pub score: f32,
    /// Sum of the token logprobs (EOS included when it ended the hypothesis).
    pub sum_logprob: f32,
    /// The EOS token that ended it; `None` when cut at `max_new_tokens`.
    pub eos_token: Option<u32>,
}

#[derive(Debug, Clone)]
struct Beam {
    tokens: Vec<u32>,
    score: f32,
}

/// Beam-search state for one sequence.
#[derive(Debug)]
pub struct BeamSearch {
    params: BeamSearchParams,
    eos_ids: Vec<u32>,
    live: Vec<Beam>,
    hyps: Vec<BeamHypothesis>,
    worst_score: f64,
    steps: usize,
    /// HF `_done`: enough hypotheses; live beams are discarded.
    hyps_done: bool,
    /// No more steps allowed (hyps done or length limit).
    finished: bool,
    cands: Vec<(f32, usize, u32)>,
    idx: Vec<u32>,
}

impl BeamSearch {
    /// Creates the search; `eos_ids` are the tokens that finish a hypothesis.
    pub fn new(params: BeamSearchParams, eos_ids: Vec<u32>) -> Result<Self> {
        params.validate()?;
        Ok(BeamSearch {
            live: vec![Beam {
                tokens: Vec::new(),
                score: 0.0,
            }],
            hyps: Vec::with_capacity(params.num_beams + 1),
            worst_score: 1e9,
            steps: 0,
            hyps_done: false,
            finished: false,
            cands: Vec::new(),
            idx: Vec::new(),
            params,
            eos_ids,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &BeamSearchParams {
        &self.params
    }

    /// Number of steps taken (= tokens generated per live beam).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Whether the search is over (a step returned `done`).
    pub fn is_done(&self) -> bool {
        self.finished
    }

    /// The live beams' sums of token logprobs, in the order of the last step's beams.
    pub fn live_scores(&self) -> Vec<f32> {
        self.live.iter().map(|b| b.score).collect()
    }

    /// Finished hypotheses kept so far (at most `num_beams`), in insertion order.
    pub fn hypotheses(&self) -> &[BeamHypothesis] {
        &self.hyps
    }

    /// Advances one token. `logprobs` is row-major `[rows, vocab_size]`: the log-softmax of
    /// each live beam's logits, rows in the order of the previous step's
    /// [`BeamStep::beams`]. At step 0, `rows` may be 1 or more; only row 0 is used.
    ///
    /// Candidates: the `max(2, 1 + #eos) * num_beams` best `(beam, token)` continuations by
    /// cumulative logprob (ties: lower beam, then lower token). In rank order, an EOS
    /// continuation among the first `num_beams` becomes a hypothesis (others are dropped); a
    /// non-EOS one becomes a live beam until `num_beams` are live. `-inf` continuations are
    /// never taken.
    pub fn step(&mut self, logprobs: &[f32], vocab_size: usize) -> Result<BeamStep> {
        self.ensure_running()?;
        if vocab_size == 0
            || logprobs.is_empty()
            || logprobs.len() / vocab_size * vocab_size != logprobs.len()
        {
            return Err(EngineError::invalid(
                "logprobs",
                format!(
                    "expected [beams, {vocab_size}] log-probabilities, got {} values",
                    logprobs.len()
                ),
            ));
        }
        let used = self.used_rows(logprobs.len() / vocab_size)?;
        let n_keep = self.candidates_per_row();

        self.cands.clear();
        for r in 0..used {
            let row = &logprobs[r * vocab_size..(r + 1) * vocab_size];
            if let Some(t) = row.iter().position(|l| l.is_nan() || *l == f32::INFINITY) {
                return Err(EngineError::invalid(
                    "logprobs",
                    format!("log-probability of token {t} in beam {r} is {}", row[t]),
                ));
            }
            let base = self.live[r].score;
            super::top_k_sorted(row, n_keep, &mut self.idx);
            for &t in &self.idx {
                let s = row[t as usize];
                if s > f32::NEG_INFINITY {
                    self.cands.push((base + s, r, t));
                }
            }
        }
        self.advance()
    }

    /// How many continuations of each live beam a step considers: the
    /// `max(2, 1 + #eos) * num_beams` best, as [`step`](Self::step) takes them.
    pub fn candidates_per_row(&self) -> usize {
        2.max(1 + self.eos_ids.len()) * self.params.num_beams
    }

    /// [`step`](Self::step) from each live beam's [`candidates_per_row`](Self::candidates_per_row)
    /// best continuations instead of the whole rows: `top[r]` holds `(token, logprob)` of row
    /// `r`, most likely first, ties by lower token (what the device's selection returns). The
    /// same candidates give the same step as `step` on the full rows.
    pub fn step_top(&mut self, top: &[Vec<(u32, f32)>]) -> Result<BeamStep> {
        self.ensure_running()?;
        let used = self.used_rows(top.len())?;
        let n_keep = self.candidates_per_row();
        self.cands.clear();
        for (r, row) in top.iter().take(used).enumerate() {
            if let Some(&(t, s)) = row.iter().find(|(_, s)| s.is_nan() || *s == f32::INFINITY) {
                return Err(EngineError::invalid("logprobs", format!("log-probability of token {t} in beam {r} is {s}")));
            }
            let base = self.live[r].score;
            for &(t, s) in row.iter().take(n_keep) {
                if s > f32::NEG_INFINITY {
                    self.cands.push((base + s, r, t));
                }
            }
        }
        self.advance()
    }

    fn ensure_running(&self) -> Result<()> {
        if self.finished {
            return Err(EngineError::invalid("beam_search", "step() called after the search finished"));
        }
        Ok(())
    }

    /// How many of a step's `rows` it uses: row 0 at step 0 (of at least one), else one per
    /// live beam, exactly.
    fn used_rows(&self, rows: usize) -> Result<usize> {
        let used = if self.steps == 0 { 1 } else { self.live.len() };
        if rows < used || (self.steps > 0 && rows != used) {
            return Err(EngineError::invalid("logprobs", format!("expected {used} rows (one per live beam), got {rows}")));
        }
        Ok(used)
    }

    /// The rest of a step once `self.cands` holds every live beam's best continuations.
    fn advance(&mut self) -> Result<BeamStep> {
        let nb = self.params.num_beams;
        let n_keep = self.candidates_per_row();
        if self.cands.is_empty() {
            return Err(EngineError::invalid(
                "logprobs",
                "every continuation of every live beam has log-probability -inf",
            ));
        }
        self.cands
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        self.cands.truncate(n_keep);

        // cur_len - decoder_prompt_len in HF: generated length including this step's token.
        let cur_len = self.steps + 1;
        let best = self.cands[0].0;
        let mut choices = Vec::with_capacity(nb);
        let cands = std::mem::take(&mut self.cands);
        for (rank, &(score, parent, token)) in cands.iter().enumerate() {
            if self.eos_ids.contains(&token) {
                if rank >= nb {
                    continue;
                }
                let tokens = self.live[parent].tokens.clone();
                self.add_hypothesis(tokens, score, cur_len, Some(token));
            } else {
                choices.push(BeamChoice {
                    parent,
                    token,
                    cum_logprob: score,
                });
                if choices.len() == nb {
                    break;
                }
            }
        }
        self.cands = cands;

        self.steps += 1;
        self.live = choices
            .iter()
            .map(|c| {
                let mut tokens = Vec::with_capacity(self.live[c.parent].tokens.len() + 1);
                tokens.extend_from_slice(&self.live[c.parent].tokens);
                tokens.push(c.token);
                Beam {
                    tokens,
                    score: c.cum_logprob,
                }
            })
            .collect();

        self.hyps_done = self.is_hyps_done(best, cur_len);
        self.finished =
            self.hyps_done || self.steps >= self.params.max_new_tokens || self.live.is_empty();
        Ok(BeamStep {
            beams: choices,
            done: self.finished,
        })
    }

    /// Ends the search: if it did not stop on finished hypotheses, the live beams are offered
    /// as hypotheses too (scored by their length). Returns the kept hypotheses (at most
    /// `num_beams`), best score first (ties: earlier-finished first).
    pub fn finish(mut self) -> Vec<BeamHypothesis> {
        if !self.hyps_done {
            let live = std::mem::take(&mut self.live);
            for b in live {
                let len = b.tokens.len();
                self.add_hypothesis(b.tokens, b.score, len, None);
            }
        }
        let mut hyps = self.hyps;
        hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
        hyps
    }

    fn normalised(&self, sum_logprob: f32, len: usize) -> f64 {
        sum_logprob as f64 / (len.max(1) as f64).powf(self.params.length_penalty as f64)
    }

    /// HF `BeamHypotheses.add`.
    fn add_hypothesis(&mut self, tokens: Vec<u32>, sum_logprob: f32, len: usize, eos: Option<u32>) {
        let score = self.normalised(sum_logprob, len);
        let nb = self.params.num_beams;
        if self.hyps.len() < nb || score > self.worst_score {
            self.hyps.push(BeamHypothesis {
                tokens,
                score: score as f32,
                sum_logprob,
                eos_token: eos,
            });
            if self.hyps.len() > nb {
                // Drop the worst (the earliest one on ties), like HF's sorted (score, index).
                let mut worst = 0;
                for (i, h) in self.hyps.iter().enumerate() {
                    if h.score < self.hyps[worst].score {
                        worst = i;
                    }
                }
                self.hyps.remove(worst);
                self.worst_score = self
                    .hyps
                    .iter()
                    .map(|h| h.score as f64)
                    .fold(f64::INFINITY, f64::min);
            } else {
                self.worst_score = self.worst_score.min(score);
            }
        }
    }

    /// HF `BeamHypotheses.is_done` for `early_stopping` `True` / `False`.
    fn is_hyps_done(&self, best_sum_logprob: f32, cur_len: usize) -> bool {
        if self.hyps.len() < self.params.num_beams {
            return false;
        }
        if self.params.early_stopping {
            return true;
        }
        self.worst_score >= self.normalised(best_sum_logprob, cur_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 0;

    /// A toy "model": probability tables by prefix over the vocabulary {EOS, a=1, b=2, c=3}.
    fn run(
        table: &dyn Fn(&[u32]) -> [f64; 4],
        params: BeamSearchParams,
    ) -> (Vec<BeamStep>, Vec<BeamHypothesis>) {
        let mut bs = BeamSearch::new(params, vec![EOS]).unwrap();
        let mut prefixes: Vec<Vec<u32>> = vec![vec![]];
        let mut steps = Vec::new();
        loop {
            let mut rows = Vec::new();
            for p in &prefixes {
                rows.extend(table(p).iter().map(|&q| q.ln() as f32));
            }
            let st = bs.step(&rows, 4).unwrap();
            prefixes = st
                .beams
                .iter()
                .map(|c| {
                    let mut p = prefixes[c.parent].clone();
                    p.push(c.token);
                    p
                })
                .collect();
            let done = st.done;
            steps.push(st);
            if done {
                break;
            }
        }
        (steps, bs.finish())
    }

    fn table1(p: &[u32]) -> [f64; 4] {
        match p {
            [] => [0.01, 0.50, 0.40, 0.09],
            [1] => [0.01, 0.33, 0.33, 0.33],
            [2] => [0.01, 0.90, 0.05, 0.04],
            [_, _] => [0.97, 0.01, 0.01, 0.01],
            _ => [0.97, 0.01, 0.01, 0.01],
        }
    }

    fn greedy(table: &dyn Fn(&[u32]) -> [f64; 4], max: usize) -> (Vec<u32>, f64) {
        let mut p = Vec::new();
        let mut lp = 0.0;
        for _ in 0..max {
            let row = table(&p);
            let (t, q) =
                row.iter().enumerate().fold(
                    (0, -1.0),
                    |acc, (i, &q)| if q > acc.1 { (i, q) } else { acc },
                );
            lp += q.ln();
            if t as u32 == EOS {
                break;
            }
            p.push(t as u32);
        }
        (p, lp)
    }

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() < 1e-5
    }

    #[test]
    fn step_top_equals_step_on_the_full_rows() {
        // A 64-token "model" whose log-probabilities depend on the prefix (with exact ties).
        let vocab = 64;
        let row = |p: &[u32]| -> Vec<f32> {
            let h = p.iter().fold(17u64, |h, &t| h.wrapping_mul(31).wrapping_add(t as u64 + 1));
            let logits: Vec<f32> = (0..vocab as u64).map(|t| ((h ^ (t * 2654435761)) % 23) as f32 * 0.25).collect();
            let mut lp = Vec::new();
            log_softmax(&logits, &mut lp);
            lp
        };
        for num_beams in [2, 4] {
            let params = BeamSearchParams { num_beams, max_new_tokens: 12, ..Default::default() };
            let mut dense = BeamSearch::new(params.clone(), vec![EOS, 5]).unwrap();
            let mut top = BeamSearch::new(params, vec![EOS, 5]).unwrap();
            let mut prefixes: Vec<Vec<u32>> = vec![vec![]];
            loop {
                let rows: Vec<Vec<f32>> = prefixes.iter().map(|p| row(p)).collect();
                let a = dense.step(&rows.concat(), vocab).unwrap();
                let cands: Vec<Vec<(u32, f32)>> = rows
                    .iter()
                    .map(|r| {
                        let mut idx = Vec::new();
                        super::super::top_k_sorted(r, top.candidates_per_row(), &mut idx);
                        idx.iter().map(|&t| (t, r[t as usize])).collect()
                    })
                    .collect();
                let b = top.step_top(&cands).unwrap();
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
                prefixes = a.beams.iter().map(|c| [prefixes[c.parent].as_slice(), &[c.token]].concat()).collect();
                if a.done {
                    break;
                }
            }
            assert_eq!(format!("{:?}", dense.finish()), format!("{:?}", top.finish()));
        }
    }

    #[test]
    fn log_softmax_values() {
        let mut out = Vec::new();
        log_softmax(&[1.0, 2.0, f32::NEG_INFINITY, 0.0], &mut out);
        let lse = (1f64.exp() + 2f64.exp() + 1.0).ln();
        assert!(close(out[0], 1.0 - lse) && close(out[1], 2.0 - lse) && close(out[3], -lse));
        assert_eq!(out[2], f32::NEG_INFINITY);
        log_softmax(&[f32::NEG_INFINITY; 3], &mut out);
        assert_eq!(out, vec![f32::NEG_INFINITY; 3]);
    }

    #[test]
    fn beam_beats_greedy_and_reorders_parents() {
        let (g, glp) = greedy(&table1, 5);
        assert_eq!(g, vec![1, 1]); // a a EOS: 0.5 * 0.33 * 0.97
        assert!((glp - (0.5f64 * 0.33 * 0.97).ln()).abs() < 1e-9);

        let params = BeamSearchParams {
            num_beams: 2,
            max_new_tokens: 5,
            ..Default::default()
        };
        let (steps, hyps) = run(&table1, params);
        // Step 0: a (0.5), b (0.4) from the single prompt row.
        let s0: Vec<(usize, u32)> = steps[0].beams.iter().map(|c| (c.parent, c.token)).collect();
        assert_eq!(s0, vec![(0, 1), (0, 2)]);
        assert!(close(steps[0].beams[1].cum_logprob, 0.4f64.ln()));
        // Step 1: "b a" (0.36) from parent 1 first, then "a a" (0.165) from parent 0
        // (ties among a's children go to the lowest token).
        let s1: Vec<(usize, u32)> = steps[1].beams.iter().map(|c| (c.parent, c.token)).collect();
        assert_eq!(s1, vec![(1, 1), (0, 1)]);
        assert!(close(
            steps[1].beams[0].cum_logprob,
            0.4f64.ln() + 0.9f64.ln()
        ));
        assert!(close(
            steps[1].beams[1].cum_logprob,
            0.5f64.ln() + 0.33f64.ln()
        ));
        assert!(!steps[1].done);
        // Step 2: both EOS continuations finish; with early_stopping = false HF's heuristic
        // (best candidate ln(0.349)/3 > worst kept ln(0.160)/3) keeps going one more step,
        // where the best candidate ln(0.0035)/4 can no longer beat the worst: done at step 3.
        assert!(!steps[2].done);
        assert_eq!(steps.len(), 4);
        assert!(steps[3].done);

        assert_eq!(hyps.len(), 2);
        let best = 0.4f64 * 0.9 * 0.97;
        assert_eq!(hyps[0].tokens, vec![2, 1]);
        assert_eq!(hyps[0].eos_token, Some(EOS));
        assert!(close(hyps[0].sum_logprob, best.ln()));
        assert!(close(hyps[0].score, best.ln() / 3.0));
        assert!(best > 0.5 * 0.33 * 0.97);
        assert_eq!(hyps[1].tokens, vec![1, 1]);
        assert!(close(hyps[1].score, (0.5f64 * 0.33 * 0.97).ln() / 3.0));
    }

    #[test]
    fn early_stopping_stops_as_soon_as_num_beams_finished() {
        let params = BeamSearchParams {
            num_beams: 2,
            max_new_tokens: 5,
            early_stopping: true,
            ..Default::default()
        };
        let (steps, hyps) = run(&table1, params);
        assert_eq!(steps.len(), 3);
        assert!(steps[2].done);
        assert_eq!(hyps[0].tokens, vec![2, 1]);
        assert_eq!(hyps[1].tokens, vec![1, 1]);
    }

    fn table2(p: &[u32]) -> [f64; 4] {
        match p {
            [] => [0.005, 0.6, 0.39, 0.005],
            [1] => [0.5, 0.25, 0.25, 0.0],
            [2] => [0.1, 0.7, 0.1, 0.1],
            _ => [0.9, 0.05, 0.03, 0.02],
        }
    }

    #[test]
    fn length_penalty_changes_the_winner() {
        // "a EOS": 0.6 * 0.5 = 0.3 over 2 tokens; "b a EOS": 0.39 * 0.7 * 0.9 = 0.2457 over 3.
        let short = (0.6f64 * 0.5).ln();
        let long = (0.39f64 * 0.7 * 0.9).ln();
        let p0 = BeamSearchParams {
            num_beams: 2,
            max_new_tokens: 3,
            length_penalty: 0.0,
            ..Default::default()
        };
        let (_, h0) = run(&table2, p0.clone());
        assert_eq!(h0[0].tokens, vec![1]);
        assert!(close(h0[0].score, short));
        assert_eq!(h0[1].tokens, vec![2, 1]);
        assert!(close(h0[1].score, long));

        let p1 = BeamSearchParams {
            length_penalty: 1.0,
            ..p0
        };
        let (_, h1) = run(&table2, p1);
        assert_eq!(h1[0].tokens, vec![2, 1]);
        assert!(close(h1[0].score, long / 3.0));
        assert_eq!(h1[1].tokens, vec![1]);
        assert!(close(h1[1].score, short / 2.0));
    }

    #[test]
    fn live_beams_become_hypotheses_at_the_length_limit() {
        let params = BeamSearchParams {
            num_beams: 2,
            max_new_tokens: 2,
            ..Default::default()
        };
        let (steps, hyps) = run(&table1, params);
        assert_eq!(steps.len(), 2);
        assert!(steps[1].done);
        assert_eq!(hyps.len(), 2);
        assert_eq!(hyps[0].tokens, vec![2, 1]);
        assert_eq!(hyps[0].eos_token, None);
        assert!(close(hyps[0].score, (0.4f64 * 0.9).ln() / 2.0));
        assert_eq!(hyps[1].tokens, vec![1, 1]);
    }

    #[test]
    fn step_errors() {
        let mut bs = BeamSearch::new(
            BeamSearchParams {
                num_beams: 2,
                ..Default::default()
            },
            vec![0],
        )
        .unwrap();
        assert!(bs.step(&[0.0; 7], 4).is_err());
        assert!(bs.step(&[f32::NAN, -1.0, -1.0, -1.0], 4).is_err());
        let st = bs.step(&[-3.0, -1.0, -2.0, -0.5], 4).unwrap();
        assert_eq!(st.beams.len(), 2);
        // Now two rows are required.
        let err = bs.step(&[-1.0; 4], 4).unwrap_err().to_string();
        assert!(err.contains("expected 2 rows"), "{err}");
        for (p, field) in [
            (
                BeamSearchParams {
                    num_beams: 1,
                    ..Default::default()
                },
                "num_beams",
            ),
            (
                BeamSearchParams {
                    num_beams: 17,
                    ..Default::default()
                },
                "num_beams",
            ),
            (
                BeamSearchParams {
                    length_penalty: f32::NAN,
                    ..Default::default()
                },
                "length_penalty",
            ),
            (
                BeamSearchParams {
                    max_new_tokens: 0,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
        ] {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
        }
    }
}
