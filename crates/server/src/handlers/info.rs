//! Read-only endpoints: `/models`, `/performance`, `/health`, `/metrics`, `/v1/models`, and
//! the OpenAI-shaped 404/405.

use std::fmt::Write;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use silica_engine::scheduler::EngineStats;
use silica_router::{ModelSlot, ModelStatus};

use super::unix_now;
use crate::error::ApiError;
use crate::AppState;

fn status_json(s: &ModelStatus) -> Value {
    match s {
        ModelStatus::Failed(r) => json!({"state": "failed", "reason": r}),
        other => json!({"state": other.as_str()}),
    }
}

fn model_json(slot: &ModelSlot) -> Value {
    let e = &slot.entry;
    let status = slot.status();
    let mut v = json!({
        "name": e.name,
        "aliases": e.aliases,
        "tier": e.tier,
        "status": status_json(&status),
    });
    if let ModelStatus::Ready(h) = &status {
        let i = h.info();
        let s = h.stats();
        v["architecture"] = json!(i.architecture);
        v["parameters"] = json!(i.num_parameters);
        v["format"] = json!(i.format);
        v["weights"] = json!(i.weights);
        v["dtype"] = json!(i.dtype);
        v["device"] = json!(i.device);
        v["context_length"] = json!(i.context_length);
        v["memory"] = json!({
            "weights_bytes": i.weights_file_bytes,
            "kv_cache_bytes": s.kv_cache_bytes,
            "total_bytes": i.weights_file_bytes + s.kv_cache_bytes,
        });
        v["decode_tokens_per_s"] = json!(s.recent_decode_tokens_per_s);
        v["load_seconds"] = json!(i.load_seconds);
    }
    v
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"models": state.pool.slots().iter().map(|s| model_json(s)).collect::<Vec<_>>()}))
}

fn openai_model_json(state: &AppState, slot: &ModelSlot) -> Value {
    let status = slot.status();
    let mut v = json!({
        "id": slot.entry.name,
        "object": "model",
        "created": unix_now() - state.started.elapsed().as_secs(),
        "owned_by": "silica",
        "aliases": slot.entry.aliases,
        "status": status.as_str(),
    });
    if let ModelStatus::Ready(h) = &status {
        v["max_model_len"] = json!(h.context_length());
    }
    v
}

pub async fn openai_models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state.pool.slots().iter().map(|s| openai_model_json(&state, s)).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn openai_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let slot = state.pool.find(&id).ok_or_else(|| {
        ApiError { param: Some("model".into()), ..ApiError::not_found(format!("the model `{id}` does not exist")).with_code("model_not_found") }
    })?;
    Ok(Json(openai_model_json(&state, slot)))
}

fn stats_json(s: &EngineStats) -> Value {
    json!({
        "requests": {
            "total": s.requests_total,
            "finished": s.requests_finished,
            "running": s.running,
            "waiting": s.waiting,
            "failed": s.requests_failed,
            "cancelled": s.requests_cancelled,
        },
        "tokens_generated": s.tokens_generated,
        "prompt_tokens_computed": s.prompt_tokens_computed,
        "prompt_tokens_cached": s.prompt_tokens_cached,
        "recent_decode_tokens_per_s": s.recent_decode_tokens_per_s,
        "time_to_first_token_ms": {"p50": s.ttft_ms_p50, "p95": s.ttft_ms_p95},
        "inter_token_latency_ms": {"p50": s.itl_ms_p50, "p95": s.itl_ms_p95},
        "latency_ms": {"p50": s.latency_ms_p50, "p95": s.latency_ms_p95},
        "kv_cache": {
            "blocks_total": s.kv_blocks_total,
            "blocks_used": s.kv_blocks_used,
            "blocks_free": s.kv_blocks_free,
            "prefix_cache_blocks": s.prefix_cache_blocks,
            "use": if s.kv_blocks_total > 0 { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 } else { 0.0 },
        },
        "preemptions": s.preemptions,
    })
}

pub async fn performance(State(state): State<AppState>) -> Json<Value> {
    let mut per_model = Vec::new();
    let mut all = EngineStats::default();
    let (mut ttft50, mut ttft95, mut lat50, mut lat95) = (0f64, 0f64, 0f64, 0f64);
    for slot in state.pool.slots() {
        let status = slot.status();
        let mut v = json!({"name": slot.entry.name, "status": status_json(&status)});
        if let ModelStatus::Ready(h) = &status {
            let s = h.stats();
            v["stats"] = stats_json(&s);
            all.requests_total += s.requests_total;
            all.requests_finished += s.requests_finished;
            all.running += s.running;
            all.waiting += s.waiting;
            all.requests_failed += s.requests_failed;
            all.requests_cancelled += s.requests_cancelled;
            all.tokens_generated += s.tokens_generated;
            all.prompt_tokens_computed += s.prompt_tokens_computed;
            all.prompt_tokens_cached += s.prompt_tokens_cached;
            all.recent_decode_tokens_per_s += s.recent_decode_tokens_per_s;
            all.kv_blocks_total += s.kv_blocks_total;
            all.kv_blocks_used += s.kv_blocks_used;
            all.kv_blocks_free += s.kv_blocks_free;
            all.prefix_cache_blocks += s.prefix_cache_blocks;
            all.preemptions += s.preemptions;
            // Across models the worst model's percentile bounds the overall one.
            ttft50 = ttft50.max(s.ttft_ms_p50);
            ttft95 = ttft95.max(s.ttft_ms_p95);
            lat50 = lat50.max(s.latency_ms_p50);
            lat95 = lat95.max(s.latency_ms_p95);
        }
        per_model.push(v);
    }
    all.ttft_ms_p50 = ttft50;
    all.ttft_ms_p95 = ttft95;
    all.latency_ms_p50 = lat50;
    all.latency_ms_p95 = lat95;
    let mut overall = stats_json(&all);
    overall.as_object_mut().map(|o| o.remove("inter_token_latency_ms"));
    Json(json!({
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "overall": overall,
        "models": per_model,
    }))
}

pub async fn health(State(state): State<AppState>) -> Response {
    let models: Vec<Value> = state.pool.slots().iter().map(|s| json!({"name": s.entry.name, "status": s.status().as_str()})).collect();
    let ready = state.pool.any_ready() && !state.is_draining();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let text = if state.is_draining() { "draining" } else if ready { "ok" } else { "no model is ready" };
    (status, Json(json!({"status": text, "models": models}))).into_response()
}

/// Prometheus text exposition format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP silica_{name} {help}\n# TYPE silica_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "silica_{name}{{{labels}}} {v}");
        }
    };
    family("uptime_seconds", "gauge", "Seconds since the server started.", vec![(String::new(), state.started.elapsed().as_secs_f64())]);
    let slots = state.pool.slots();
    family(
        "model_ready",
        "gauge",
        "1 when the model is ready, 0 while loading or after a failure.",
        slots.iter().map(|s| (format!("model=\"{}\",status=\"{}\"", s.entry.name, s.status().as_str()), s.handle().is_some() as u8 as f64)).collect(),
    );
    let stats: Vec<(String, EngineStats)> = slots.iter().filter_map(|s| s.handle().map(|h| (format!("model=\"{}\"", s.entry.name), h.stats()))).collect();
    let rows = |f: &dyn Fn(&EngineStats) -> f64| stats.iter().map(|(l, s)| (l.clone(), f(s))).collect::<Vec<_>>();
    family("requests_total", "counter", "Requests submitted.", rows(&|s| s.requests_total as f64));
    family("requests_finished_total", "counter", "Requests finished normally.", rows(&|s| s.requests_finished as f64));
    family("requests_failed_total", "counter", "Requests ended by an error.", rows(&|s| s.requests_failed as f64));
    family("requests_cancelled_total", "counter", "Requests cancelled by their client.", rows(&|s| s.requests_cancelled as f64));
    family("requests_running", "gauge", "Sequences decoding now.", rows(&|s| s.running as f64));
    family("requests_waiting", "gauge", "Requests waiting for admission.", rows(&|s| s.waiting as f64));
    family("tokens_generated_total", "counter", "Tokens generated.", rows(&|s| s.tokens_generated as f64));
    family("prompt_tokens_total", "counter", "Prompt tokens computed.", rows(&|s| s.prompt_tokens_computed as f64));
    family("prompt_tokens_cached_total", "counter", "Prompt tokens taken from the prefix cache.", rows(&|s| s.prompt_tokens_cached as f64));
    family("decode_tokens_per_second", "gauge", "Generated tokens per second over the last seconds.", rows(&|s| s.recent_decode_tokens_per_s));
    family("kv_cache_blocks_used", "gauge", "KV-cache blocks in use.", rows(&|s| s.kv_blocks_used as f64));
    family("kv_cache_blocks_total", "gauge", "KV-cache blocks.", rows(&|s| s.kv_blocks_total as f64));
    family("preemptions_total", "counter", "Sequences preempted for KV space.", rows(&|s| s.preemptions as f64));
    let q = |f: &dyn Fn(&EngineStats) -> (f64, f64)| {
        stats
            .iter()
            .flat_map(|(l, s)| {
                let (a, b) = f(s);
                [(format!("{l},quantile=\"0.5\""), a / 1e3), (format!("{l},quantile=\"0.95\""), b / 1e3)]
            })
            .collect::<Vec<_>>()
    };
    family("time_to_first_token_seconds", "summary", "Time to first token of recent requests.", q(&|s| (s.ttft_ms_p50, s.ttft_ms_p95)));
    family("inter_token_latency_seconds", "summary", "Time between tokens of recent requests.", q(&|s| (s.itl_ms_p50, s.itl_ms_p95)));
    family("request_latency_seconds", "summary", "End-to-end latency of recent requests.", q(&|s| (s.latency_ms_p50, s.latency_ms_p95)));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path())).with_code("unknown_route")
}

pub async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed on {}", uri.path())).with_code("method_not_allowed")
}
