//! `POST /generate`: Silica's own generation endpoint.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use silica_engine::generate::GenerateRequest;
use silica_engine::scheduler::FinishedEvent;
use silica_router::Route;

use super::{collect, route_for, route_header, route_json, start, timings_json};
use crate::convert::native_request;
use crate::error::ApiError;
use crate::extract::{typed, JsonObject};
use crate::wire::GenerateBody;
use crate::AppState;

/// Parse and validate a `/generate` body (also the WebSocket's generation message).
pub fn parse(v: Value) -> Result<(GenerateBody, GenerateRequest), ApiError> {
    let body: GenerateBody = typed(v)?;
    let req = native_request(&body)?;
    Ok((body, req))
}

/// The `/generate` answer (and the WebSocket `done` message's fields).
pub fn result_json(id: &str, route: &Route, body: &GenerateBody, f: &FinishedEvent) -> Value {
    let mut v = json!({
        "id": id,
        "model": route.model,
        "text": f.text,
        "finish_reason": f.reason.as_str(),
        "usage": {
            "prompt_tokens": f.usage.prompt_tokens,
            "completion_tokens": f.usage.completion_tokens,
            "total_tokens": f.usage.prompt_tokens + f.usage.completion_tokens,
        },
        "timings": timings_json(&f.timings),
        "route": route_json(route, body.priority),
        "seed": f.seed,
    });
    if !f.beams.is_empty() {
        v["beams"] = f.beams.iter().map(|b| json!({"text": b.text, "score": b.score, "finished": b.finished})).collect();
    }
    v
}

pub async fn generate(State(state): State<AppState>, JsonObject(v): JsonObject) -> Result<Response, ApiError> {
    let (body, req) = parse(v)?;
    if let Some(k) = body.kind.as_deref().filter(|k| *k != "generate") {
        return Err(ApiError::invalid("type", format!("`type` is for WebSocket messages; POST /generate only generates, got `{k}`")));
    }
    let route = route_for(&state, body.model.as_deref(), body.priority, &req)?;
    let mut chans = start(&state, &route, vec![req]).await?;
    let (_, fin) = collect(chans.remove(0)).await?;
    let id = body.id.clone().unwrap_or_else(|| super::new_id("gen"));
    let mut r = Json(result_json(&id, &route, &body, &fin)).into_response();
    r.headers_mut().insert("x-silica-route", route_header(&route));
    Ok(r)
}
