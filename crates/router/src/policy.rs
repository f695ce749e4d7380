//! The routing policy: which model serves a request, and why.
//!
//! 1. An explicit model name or alias always wins; an unknown one is [`RouteError::UnknownModel`],
//!    a known one that is not ready is [`RouteError::NotReady`] (no silent substitution).
//! 2. Otherwise only ready models whose context holds the request are considered.
//! 3. A long generation (`max_tokens` above [`RouterConfig::long_generation_tokens`]) goes to
//!    the fast model, whatever the priority.
//! 4. `speed` → the fastest model (speed tier first, then fewer parameters); `quality` → the
//!    best (quality tier first, then more parameters); `balanced` (the default) → the lowest
//!    expected completion time from measured per-token latency (a size-based prior until
//!    measured) and live queue depth.
//! 5. An overloaded choice (its queue is full) falls back to the next model in the same order
//!    when [`RouterConfig::fallback`] allows; the reason says so.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use silica_engine::registry::Tier;

/// Router settings (`[router]` in `configs/default.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// `max_tokens` above this counts as a long generation and goes to the fast model.
    pub long_generation_tokens: usize,
    /// Fall back to the next suitable model when the chosen one is overloaded.
    pub fallback: bool,
    /// The priority of requests that name none.
    pub default_priority: Priority,
    /// New tokens assumed for `balanced` when the request gives no `max_tokens`.
    pub assumed_max_tokens: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig { long_generation_tokens: 200, fallback: true, default_priority: Priority::Balanced, assumed_max_tokens: 256 }
    }
}

impl RouterConfig {
    /// Read the `[router]` table of a settings file; errors name the file and the key.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let cfg: RouterConfig = silica_engine::registry::settings_table(path, "router")?;
        if cfg.long_generation_tokens == 0 {
            return Err(format!("{}: router.long_generation_tokens must be at least 1", path.display()));
        }
        if cfg.assumed_max_tokens == 0 {
            return Err(format!("{}: router.assumed_max_tokens must be at least 1", path.display()));
        }
        Ok(cfg)
    }
}

/// What the client asked to optimise for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Speed,
    Quality,
    Balanced,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Speed => "speed",
            Priority::Quality => "quality",
            Priority::Balanced => "balanced",
        }
    }
}

/// The facts of a request the policy looks at.
#[derive(Debug, Clone, Default)]
pub struct RouteRequest<'a> {
    /// A model name or alias; `None`, `""` and `"auto"` let the policy choose.
    pub model: Option<&'a str>,
    pub priority: Option<Priority>,
    pub max_tokens: Option<usize>,
    /// A lower bound on the prompt's length in tokens (0 when unknown).
    pub prompt_tokens_hint: usize,
}

/// Load status of a candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum CandidateStatus {
    Loading,
    Ready,
    Failed(String),
}

/// What the policy knows of one model.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub aliases: Vec<String>,
    pub tier: Option<Tier>,
    pub num_parameters: u64,
    pub context_length: usize,
    pub status: CandidateStatus,
    pub running: usize,
    pub waiting: usize,
    /// Its queue is full: a submission would be refused.
    pub overloaded: bool,
    /// Measured inter-token latency (p50, ms) under recent load; 0 when not measured yet.
    pub itl_ms: f64,
}

impl Candidate {
    /// A ready, idle, unmeasured model (for tests and examples).
    pub fn ready_idle(name: &str, tier: Option<Tier>, num_parameters: u64) -> Self {
        Candidate {
            name: name.into(),
            aliases: Vec::new(),
            tier,
            num_parameters,
            context_length: 32768,
            status: CandidateStatus::Ready,
            running: 0,
            waiting: 0,
            overloaded: false,
            itl_ms: 0.0,
        }
    }

    fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }

    /// Per-token latency: measured, else a prior of 30 ms per billion parameters (the order
    /// of the demo models on two CPU cores; only the ratio between models matters).
    fn per_token_ms(&self) -> f64 {
        if self.itl_ms > 0.0 {
            self.itl_ms
        } else {
            (self.num_parameters as f64 / 1e9 * 30.0).max(1.0)
        }
    }

    /// Expected time to complete `tokens` new tokens behind the current queue: sequences
    /// ahead share the engine's steps, so each one running or waiting stretches the wait.
    fn expected_ms(&self, tokens: usize) -> f64 {
        let load = 1.0 + (self.running + self.waiting) as f64 * 0.5;
        self.per_token_ms() * tokens as f64 * load
    }
}

/// The choice: an index into the candidates and a reason for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub index: usize,
    pub reason: String,
}

/// Why no model can serve a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("the model `{name}` does not exist; available models: {}", known.join(", "))]
    UnknownModel { name: String, known: Vec<String> },
    #[error("the model `{name}` is not ready ({status})")]
    NotReady { name: String, status: String },
    #[error("no model is ready to serve requests ({detail})")]
    NoneReady { detail: String },
    #[error("no ready model has a context of {needed} tokens (largest: {largest})")]
    TooLong { needed: usize, largest: usize },
    #[error("every suitable model is overloaded; retry later")]
    Overloaded,
}

fn status_text(s: &CandidateStatus) -> String {
    match s {
        CandidateStatus::Loading => "still loading".into(),
        CandidateStatus::Ready => "ready".into(),
        CandidateStatus::Failed(r) => format!("failed to load: {r}"),
    }
}

fn tier_rank(t: Option<Tier>, favour: Tier) -> u8 {
    match t {
        Some(x) if x == favour => 0,
        None => 1,
        Some(_) => 2,
    }
}

/// Choose the model for `req` among `models`.
pub fn choose(cfg: &RouterConfig, models: &[Candidate], req: &RouteRequest) -> Result<Decision, RouteError> {
    if let Some(name) = req.model.filter(|m| !m.is_empty() && *m != "auto") {
        let Some(index) = models.iter().position(|c| c.answers_to(name)) else {
            return Err(RouteError::UnknownModel { name: name.into(), known: models.iter().map(|c| c.name.clone()).collect() });
        };
        let c = &models[index];
        if c.status != CandidateStatus::Ready {
            return Err(RouteError::NotReady { name: c.name.clone(), status: status_text(&c.status) });
        }
        return Ok(Decision { index, reason: format!("model `{name}` requested by name") });
    }

    let ready: Vec<usize> = (0..models.len()).filter(|&i| models[i].status == CandidateStatus::Ready).collect();
    if ready.is_empty() {
        let detail = if models.is_empty() {
            "none is configured".to_string()
        } else {
            models.iter().map(|c| format!("{}: {}", c.name, status_text(&c.status))).collect::<Vec<_>>().join("; ")
        };
        return Err(RouteError::NoneReady { detail });
    }
    let needed = req.prompt_tokens_hint + req.max_tokens.unwrap_or(0);
    let fits: Vec<usize> = ready.iter().copied().filter(|&i| models[i].context_length > needed).collect();
    if fits.is_empty() {
        let largest = ready.iter().map(|&i| models[i].context_length).max().unwrap_or(0);
        return Err(RouteError::TooLong { needed, largest });
    }

    let asked = req.priority.unwrap_or(cfg.default_priority);
    let long = req.max_tokens.is_some_and(|n| n > cfg.long_generation_tokens);
    let priority = if long { Priority::Speed } else { asked };
    let mut order = fits;
    let speed_key = |c: &Candidate| (tier_rank(c.tier, Tier::Speed), c.num_parameters);
    let quality_key = |c: &Candidate| (tier_rank(c.tier, Tier::Quality), std::cmp::Reverse(c.num_parameters));
    let tokens = req.max_tokens.unwrap_or(cfg.assumed_max_tokens);
    match priority {
        Priority::Speed => order.sort_by_key(|&i| speed_key(&models[i])),
        Priority::Quality => order.sort_by_key(|&i| quality_key(&models[i])),
        Priority::Balanced => order.sort_by(|&a, &b| {
            let (ea, eb) = (models[a].expected_ms(tokens), models[b].expected_ms(tokens));
            ea.partial_cmp(&eb).unwrap_or(Ordering::Equal).then_with(|| quality_key(&models[a]).cmp(&quality_key(&models[b])))
        }),
    }
    let why = |i: usize| -> String {
        let c = &models[i];
        match priority {
            Priority::Speed if long => format!(
                "long generation (max_tokens {} > {}) goes to the fastest model",
                req.max_tokens.unwrap_or(0),
                cfg.long_generation_tokens
            ),
            Priority::Speed => "priority speed: the fastest ready model".into(),
            Priority::Quality => "priority quality: the highest-quality ready model".into(),
            Priority::Balanced => format!(
                "priority balanced: lowest expected completion time ({:.0} ms for {tokens} tokens; {} running, {} waiting)",
                c.expected_ms(tokens),
                c.running,
                c.waiting
            ),
        }
    };
    let first = order[0];
    if !models[first].overloaded {
        return Ok(Decision { index: first, reason: why(first) });
    }
    if cfg.fallback {
        if let Some(&i) = order.iter().find(|&&i| !models[i].overloaded) {
            return Ok(Decision { index: i, reason: format!("{}; fell back from `{}`, which is overloaded", why(i), models[first].name) });
        }
    }
    Err(RouteError::Overloaded)
}
