//! `GET /openapi.json`: an OpenAPI 3.1 description of every endpoint.

use axum::Json;
use serde_json::{json, Value};

fn error_responses() -> Value {
    json!({
        "400": {"description": "Invalid request: the field, the limit and the value", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        "404": {"description": "Unknown model or route", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        "413": {"description": "Body larger than server.max_body_bytes", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        "429": {"description": "Overloaded; see Retry-After", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        "503": {"description": "No model ready, or shutting down", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    })
}

fn post(summary: &str, schema: &str, resp: &str) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({"description": resp, "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}});
    json!({"post": {
        "summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}},
        "responses": responses
    }})
}

fn get(summary: &str) -> Value {
    json!({"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}}})
}

pub fn document() -> Value {
    let num = |d: &str| json!({"type": "number", "description": d});
    let int = |d: &str| json!({"type": "integer", "description": d});
    let stop = json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]});
    let message = json!({"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}, {"type": "null"}]},
        "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"}, "name": {"type": "string"}, "reasoning_content": {"type": "string"}
    }});
    let mut paths = serde_json::Map::new();
    paths.insert("/generate".into(), post("Generate text (Silica's own API)", "Generate", "id, model, text, finish_reason, usage, timings, route"));
    paths.insert("/v1/chat/completions".into(), post("OpenAI chat completions (SSE when stream is true)", "ChatCompletion", "chat.completion or chat.completion.chunk events"));
    paths.insert("/v1/completions".into(), post("OpenAI text completions (SSE when stream is true)", "Completion", "text_completion"));
    paths.insert("/ws/stream".into(), json!({"get": {"summary": "WebSocket: send Generate bodies (with `id`) or {type: cancel, id}; receive start, token, done, error messages", "responses": {"101": {"description": "Switching protocols"}}}}));
    paths.insert("/models".into(), get("Every registered model: status, architecture, parameters, format, dtype, device, tier, memory, context length, live decode tokens/s"));
    paths.insert("/performance".into(), get("Live figures per model and overall: requests, tokens, decode tokens/s, TTFT and latency p50/p95, KV-cache use, uptime"));
    paths.insert("/health".into(), json!({"get": {"summary": "200 when a model is ready, 503 otherwise", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}}));
    paths.insert("/metrics".into(), json!({"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text/plain exposition format"}}}}));
    paths.insert("/v1/models".into(), get("OpenAI model list"));
    paths.insert("/v1/models/{id}".into(), json!({"get": {"summary": "One model (name or alias)", "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}], "responses": {"200": {"description": "model"}, "404": {"description": "unknown model"}}}}));
    paths.insert("/openapi.json".into(), get("This document"));
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Silica", "version": env!("CARGO_PKG_VERSION"), "description": "Qwen serving engine: native API, WebSocket streaming and the OpenAI API"},
        "paths": paths,
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
            "Generate": {"type": "object", "additionalProperties": false, "properties": {
                "id": {"type": "string", "description": "WebSocket only"},
                "type": {"enum": ["generate", "cancel"], "description": "WebSocket only"},
                "prompt": {"type": "string", "description": "a user message (chat template applied) unless raw is true"},
                "messages": {"type": "array", "items": message},
                "raw": {"type": "boolean"},
                "model": {"type": "string", "description": "name, alias or auto"},
                "priority": {"enum": ["speed", "quality", "balanced"]},
                "max_tokens": {"type": "integer", "minimum": 1},
                "strategy": {"enum": ["greedy", "sample", "beam"]},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_k": int("0 or -1: off"), "top_p": num("(0, 1]"), "min_p": num("[0, 1]"),
                "num_beams": {"type": "integer", "minimum": 2, "maximum": 16}, "length_penalty": num("beam length normalisation"),
                "repetition_penalty": num("(0, 10]"), "presence_penalty": num("[-2, 2]"), "frequency_penalty": num("[-2, 2]"),
                "seed": {"type": "integer", "minimum": 0}, "stop": stop
            }},
            "ChatCompletion": {"type": "object", "required": ["messages"], "properties": {
                "model": {"type": "string"}, "messages": {"type": "array", "items": message, "minItems": 1},
                "max_tokens": int(">= 1"), "max_completion_tokens": int(">= 1"), "temperature": num("[0, 2], default 1"), "top_p": num("(0, 1]"),
                "n": {"type": "integer", "minimum": 1, "maximum": 16}, "stop": stop, "seed": int("sampling seed; choice i uses seed + i"),
                "presence_penalty": num("[-2, 2]"), "frequency_penalty": num("[-2, 2]"), "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
                "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
                "stream": {"type": "boolean"}, "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                "tools": {"type": "array"}, "tool_choice": {"enum": ["auto", "none"]}, "chat_template_kwargs": {"type": "object"},
                "top_k": int("extension"), "min_p": num("extension"), "repetition_penalty": num("extension"), "priority": {"enum": ["speed", "quality", "balanced"]},
                "user": {}, "metadata": {}, "store": {}, "parallel_tool_calls": {}, "service_tier": {}
            }},
            "Completion": {"type": "object", "required": ["prompt"], "properties": {
                "model": {"type": "string"}, "prompt": {"oneOf": [{"type": "string"}, {"type": "array"}]},
                "max_tokens": int(">= 1, default 16"), "temperature": num("[0, 2], default 1"), "top_p": num("(0, 1]"), "n": int("1..16"),
                "stop": stop, "seed": int("seed"), "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}, "stream": {"type": "boolean"},
                "stream_options": {"type": "object"}, "presence_penalty": num("[-2, 2]"), "frequency_penalty": num("[-2, 2]"), "logit_bias": {"type": "object"}
            }}
        }}
    })
}

pub async fn spec() -> Json<Value> {
    Json(document())
}
