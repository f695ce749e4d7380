//! Request handlers, and what they share: routing, submission (waiting for the first event so
//! that errors found by the engine still get their HTTP status), event streams per choice.

pub mod info;
pub mod native;
pub mod openai;
pub mod ws;

use axum::http::{HeaderValue, StatusCode};
use futures::Stream;
use serde_json::{json, Value};
use silica_engine::generate::{GenerateRequest, Prompt};
use silica_engine::scheduler::{Event, EventStream, FinishedEvent, RequestTimings, TokenEvent};
use silica_engine::EngineError;
use silica_router::{Priority, Route, RouteRequest};

use crate::convert::check_for_model;
use crate::error::ApiError;
use crate::AppState;

/// One choice's events: the first (already received) and the rest.
pub struct ChoiceStream {
    first: Option<Event>,
    rx: EventStream,
}

/// A request's route through the pool.
pub fn route_for(state: &AppState, model: Option<&str>, priority: Option<Priority>, req: &GenerateRequest) -> Result<Route, ApiError> {
    // A lower bound on the prompt's tokens without tokenizing: prompts of token ids are exact.
    let prompt_tokens_hint = match &req.prompt {
        Prompt::Tokens(t) => t.len(),
        _ => 0,
    };
    let r = RouteRequest { model, priority, max_tokens: req.stop.max_tokens, prompt_tokens_hint };
    Ok(state.pool.route(&r)?)
}

/// Submit one request per choice and wait for each one's first event. An error event first
/// (bad parameters the engine found, prompt beyond the context) becomes the HTTP error.
pub async fn start(state: &AppState, route: &Route, reqs: Vec<GenerateRequest>) -> Result<Vec<ChoiceStream>, ApiError> {
    if state.is_draining() {
        return Err(ApiError { retry_after: Some(5), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down") });
    }
    let vocab = route.handle.vocab_size();
    for r in &reqs {
        check_for_model(r, vocab)?;
    }
    let mut rxs = Vec::with_capacity(reqs.len());
    for r in reqs {
        rxs.push(route.handle.submit(r)?);
    }
    let mut out = Vec::with_capacity(rxs.len());
    for mut rx in rxs {
        match rx.recv().await {
            Some(Event::Error(e)) => return Err(e.into()),
            Some(ev) => out.push(ChoiceStream { first: Some(ev), rx }),
            None => return Err(EngineError::Unavailable("the engine ended the request without a result".into()).into()),
        }
    }
    Ok(out)
}

fn is_terminal(ev: &Event) -> bool {
    matches!(ev, Event::Finished(_) | Event::Error(_))
}

/// A choice's events tagged with its index; ends after the terminal event. A stream that the
/// engine closes without one yields an error event (never a silent end).
pub fn tagged(index: usize, c: ChoiceStream) -> impl Stream<Item = (usize, Event)> + Send {
    futures::stream::unfold((c.first, Some(c.rx)), move |(first, rx)| async move {
        let mut rx = rx?;
        let ev = match first {
            Some(ev) => ev,
            None => rx
                .recv()
                .await
                .unwrap_or_else(|| Event::Error(EngineError::Unavailable("the engine ended the request without a result".into()))),
        };
        let next = if is_terminal(&ev) { None } else { Some(rx) };
        Some(((index, ev), (None, next)))
    })
}

/// Wait for a choice's result.
pub async fn collect(c: ChoiceStream) -> Result<(Vec<TokenEvent>, FinishedEvent), ApiError> {
    use futures::StreamExt;
    let mut s = Box::pin(tagged(0, c));
    let mut tokens = Vec::new();
    while let Some((_, ev)) = s.next().await {
        match ev {
            Event::Token(t) => tokens.push(t),
            Event::Finished(f) => return Ok((tokens, f)),
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(EngineError::Unavailable("the engine ended the request without a result".into()).into())
}

/// `x-silica-route`: which model and why, as a header value (ASCII only).
pub fn route_header(route: &Route) -> HeaderValue {
    let s: String = format!("{}; {}", route.model, route.reason).chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

pub fn route_json(route: &Route, priority: Option<Priority>) -> Value {
    json!({"model": route.model, "reason": route.reason, "priority": priority.map(|p| p.as_str())})
}

pub fn timings_json(t: &RequestTimings) -> Value {
    json!({
        "queue_ms": t.queue.as_secs_f64() * 1e3,
        "time_to_first_token_ms": t.time_to_first_token.as_secs_f64() * 1e3,
        "total_ms": t.total.as_secs_f64() * 1e3,
        "decode_tokens_per_s": t.decode_tokens_per_s,
        "prompt_tokens_cached": t.prompt_tokens_cached,
    })
}

/// A fresh id with a prefix (`chatcmpl-…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:08x}", rand::random::<u64>(), rand::random::<u32>())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
