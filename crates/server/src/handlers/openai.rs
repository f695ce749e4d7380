//! The OpenAI API: `POST /v1/chat/completions` and `POST /v1/completions`, with and without
//! streaming (SSE, keep-alives, `[DONE]`, errors as events).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{select_all, BoxStream};
use futures::StreamExt;
use serde_json::{json, Value};
use silica_engine::generate::{GenerateRequest, Prompt, StopParams, TokenLogprob};
use silica_engine::scheduler::{Event, TokenEvent};
use silica_engine::tokenizer::ChatOptions;
use silica_engine::tokenizer::TokenTable;
use silica_router::Route;
use tokio::sync::mpsc;

use super::{collect, new_id, route_for, route_header, start, tagged, unix_now, ChoiceStream};
use crate::convert::{self, choices, max_tokens, messages, openai_sampling, per_choice, refuse_if_set, MAX_TOP_LOGPROBS};
use crate::error::ApiError;
use crate::extract::{typed, JsonObject};
use crate::tools::{self, ToolCall, ToolStream};
use crate::wire::{ChatRequest, CompletionPrompt, CompletionRequest};
use crate::AppState;

/// A whole (non-streamed) OpenAI answer.
fn completion_body(object: &str, id: &str, route: &Route, choices: Vec<Value>, usage: Value) -> Response {
    Json(json!({
        "id": id,
        "object": object,
        "created": unix_now(),
        "model": route.model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": format!("silica-{}", env!("CARGO_PKG_VERSION")),
    }))
    .into_response()
}

fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Chat-style logprob entries (`{token, logprob, bytes, top_logprobs}`) for some tokens.
fn chat_logprobs(table: &TokenTable, lps: &[TokenLogprob]) -> Vec<Value> {
    let entry = |id: u32, lp: f32| json!({"token": table.text(id), "logprob": lp, "bytes": table.bytes(id)});
    lps.iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect()
}

/// Completions-style logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
fn completion_logprobs(table: &TokenTable, lps: &[TokenLogprob], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for l in lps {
        let t = table.text(l.token);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        token_logprobs.push(l.logprob);
        let top: serde_json::Map<String, Value> = l.top.iter().map(|&(id, lp)| (table.text(id), json!(lp))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets})
}

fn tool_calls_json(calls: &[ToolCall], streaming: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"id": new_id("call"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}});
            if streaming {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

/// What a chat request turned into.
struct ChatPlan {
    reqs: Vec<GenerateRequest>,
    model: Option<String>,
    priority: Option<silica_router::Priority>,
    stream: bool,
    include_usage: bool,
    tools_on: bool,
}

fn plan_chat(r: ChatRequest) -> Result<ChatPlan, ApiError> {
    refuse_if_set("functions", &r.functions, "legacy function calling; use `tools`")?;
    refuse_if_set("function_call", &r.function_call, "legacy function calling; use `tool_choice`")?;
    refuse_if_set("audio", &r.audio, "Silica generates text only")?;
    refuse_if_set("prediction", &r.prediction, "predicted outputs are not implemented")?;
    refuse_if_set("reasoning_effort", &r.reasoning_effort, "use `chat_template_kwargs: {\"enable_thinking\": …}` with Qwen3")?;
    refuse_if_set("web_search_options", &r.web_search_options, "Silica has no web search")?;
    if let Some(rf) = r.response_format.as_ref().filter(|v| !v.is_null()) {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::unsupported(
                "response_format",
                "`response_format` other than {\"type\": \"text\"} (JSON mode, JSON schema) is not implemented",
            ));
        }
    }
    if let Some(m) = r.modalities.as_ref().filter(|v| !v.is_null()) {
        if m != &json!(["text"]) {
            return Err(ApiError::unsupported("modalities", "only the `text` modality is supported"));
        }
    }
    let tools = r.tools.clone().unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") || t.pointer("/function/name").and_then(Value::as_str).is_none() {
            return Err(ApiError::invalid(format!("tools[{i}]"), "each tool must be {\"type\": \"function\", \"function\": {\"name\": …, …}}"));
        }
    }
    let tools_on = match r.tool_choice.as_ref() {
        None | Some(Value::Null) => !tools.is_empty(),
        Some(Value::String(s)) if s == "auto" => !tools.is_empty(),
        Some(Value::String(s)) if s == "none" => false,
        Some(other) => {
            return Err(ApiError::unsupported(
                "tool_choice",
                format!("tool_choice {other} is not supported (forcing a call needs constrained decoding); use \"auto\" or \"none\""),
            ))
        }
    };
    let top_logprobs = match (r.logprobs, r.top_logprobs) {
        (Some(true), k) => {
            let k = k.unwrap_or(0);
            if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) {
                return Err(ApiError::invalid("top_logprobs", format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}")));
            }
            Some(k as usize)
        }
        (_, Some(_)) => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
        _ => None,
    };
    let n = choices(r.n)?;
    let (sampling, stop, stop_token_ids, ignore_eos) = openai_sampling(&r.sampling(), top_logprobs)?;
    let max = match r.max_completion_tokens {
        Some(_) => max_tokens("max_completion_tokens", r.max_completion_tokens)?,
        None => max_tokens("max_tokens", r.max_tokens)?,
    };
    let options = ChatOptions {
        add_generation_prompt: true,
        tools: tools_on.then_some(tools),
        extra: r.chat_template_kwargs.clone().unwrap_or_default(),
    };
    let req = GenerateRequest {
        prompt: Prompt::Chat { messages: messages(r.messages)?, options },
        sampling,
        stop: StopParams { stop, stop_token_ids, max_tokens: max, ignore_eos },
        beam: None,
    };
    let stream = r.stream.unwrap_or(false);
    Ok(ChatPlan {
        reqs: per_choice(req, n),
        model: r.model,
        priority: r.priority,
        stream,
        include_usage: stream && r.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        tools_on,
    })
}

pub async fn chat(State(state): State<AppState>, JsonObject(v): JsonObject) -> Result<Response, ApiError> {
    let plan = plan_chat(typed(v)?)?;
    let route = route_for(&state, plan.model.as_deref(), plan.priority, &plan.reqs[0])?;
    let chans = start(&state, &route, plan.reqs).await?;
    let id = new_id("chatcmpl");
    let mut resp = if plan.stream {
        chat_stream(&state, &route, id, chans, plan.include_usage, plan.tools_on)
    } else {
        let table = route.handle.tokens().clone();
        let mut out = Vec::new();
        let (mut prompt, mut completion) = (0, 0);
        for (i, c) in chans.into_iter().enumerate() {
            let (tokens, f) = collect(c).await?;
            prompt = f.usage.prompt_tokens;
            completion += f.usage.completion_tokens;
            let (content, calls) = if plan.tools_on { tools::parse(&f.text) } else { (Some(f.text.clone()), Vec::new()) };
            let mut message = json!({"role": "assistant", "content": content});
            let finish = if calls.is_empty() { f.reason.as_str() } else { "tool_calls" };
            if !calls.is_empty() {
                message["tool_calls"] = json!(tool_calls_json(&calls, false));
            }
            let lps: Vec<TokenLogprob> = tokens.iter().flat_map(|t| t.logprobs.iter().cloned()).collect();
            let has_lp = has_logprobs(&tokens);
            out.push(json!({
                "index": i,
                "message": message,
                "logprobs": if has_lp { json!({"content": chat_logprobs(&table, &lps)}) } else { Value::Null },
                "finish_reason": finish,
            }));
        }
        completion_body("chat.completion", &id, &route, out, usage_json(prompt, completion))
    };
    resp.headers_mut().insert("x-silica-route", route_header(&route));
    Ok(resp)
}

fn has_logprobs(tokens: &[TokenEvent]) -> bool {
    tokens.iter().any(|t| !t.logprobs.is_empty())
}

/// An SSE response fed by a task; the task stops (dropping the engine streams, which cancels
/// the generations) as soon as the client goes away.
fn sse_from<F, Fut>(state: &AppState, produce: F) -> Response
where
    F: FnOnce(mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<String>(64);
    tokio::spawn(produce(tx));
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (Ok::<_, Infallible>(SseEvent::default().data(d)), rx)) });
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs_f64(state.cfg.sse_keep_alive_seconds)))
        .into_response()
}

/// Drive merged choice streams: `on_event` turns each event into chunks; errors become an
/// error event; the end is `[DONE]`. Returns early when the client is gone.
async fn pump(
    tx: mpsc::Sender<String>,
    chans: Vec<ChoiceStream>,
    mut on_event: impl FnMut(usize, Event) -> Result<Vec<Value>, crate::ApiError> + Send,
    finale: impl FnOnce() -> Vec<Value> + Send,
) {
    let mut merged = select_all(chans.into_iter().enumerate().map(|(i, c)| -> BoxStream<'static, (usize, Event)> { tagged(i, c).boxed() }));
    let mut failed = false;
    loop {
        let item = tokio::select! {
            _ = tx.closed() => return,
            item = merged.next() => item,
        };
        let Some((i, ev)) = item else { break };
        match on_event(i, ev) {
            Ok(chunks) => {
                for c in chunks {
                    if tx.send(c.to_string()).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(e.body().to_string()).await;
                failed = true;
                break;
            }
        }
    }
    drop(merged);
    if !failed {
        for c in finale() {
            if tx.send(c.to_string()).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.send("[DONE]".into()).await;
}

fn chat_stream(state: &AppState, route: &Route, id: String, chans: Vec<ChoiceStream>, include_usage: bool, tools_on: bool) -> Response {
    let model = route.model.clone();
    let table = route.handle.tokens().clone();
    let created = unix_now();
    let n = chans.len();
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        c
    };
    sse_from(state, move |tx| async move {
        let mut started = vec![false; n];
        let mut parsers: Vec<ToolStream> = (0..n).map(|_| ToolStream::default()).collect();
        let usage = std::sync::Arc::new(std::sync::Mutex::new((0usize, 0usize)));
        let usage2 = usage.clone();
        let chunk2 = chunk.clone();
        let on_event = move |i: usize, ev: Event| -> Result<Vec<Value>, ApiError> {
            let mut out = Vec::new();
            let mut delta = serde_json::Map::new();
            if !started[i] {
                started[i] = true;
                delta.insert("role".into(), json!("assistant"));
                delta.insert("content".into(), json!(""));
            }
            match ev {
                Event::Token(t) => {
                    let text = if tools_on { parsers[i].push(&t.text) } else { t.text };
                    if !text.is_empty() {
                        delta.insert("content".into(), json!(text));
                    }
                    let lp = (!t.logprobs.is_empty()).then(|| json!({"content": chat_logprobs(&table, &t.logprobs)}));
                    if !delta.is_empty() || lp.is_some() {
                        out.push(chunk(json!([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": null}]), None));
                    }
                }
                Event::Finished(f) => {
                    if let Ok(mut g) = usage2.lock() {
                        g.0 = f.usage.prompt_tokens;
                        g.1 += f.usage.completion_tokens;
                    }
                    let mut finish = f.reason.as_str();
                    if tools_on {
                        let (rest, calls) = parsers[i].finish();
                        if !rest.is_empty() {
                            delta.insert("content".into(), json!(rest));
                        }
                        if !calls.is_empty() {
                            delta.insert("tool_calls".into(), json!(tool_calls_json(&calls, true)));
                            finish = "tool_calls";
                        }
                    }
                    if !delta.is_empty() {
                        out.push(chunk(json!([{"index": i, "delta": delta, "logprobs": null, "finish_reason": null}]), None));
                    }
                    out.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}]), None));
                }
                Event::Error(e) => return Err(e.into()),
            }
            Ok(out)
        };
        let finale = move || {
            if !include_usage {
                return Vec::new();
            }
            let (p, c) = usage.lock().map(|g| *g).unwrap_or_default();
            vec![chunk2(json!([]), Some(usage_json(p, c)))]
        };
        pump(tx, chans, on_event, finale).await;
    })
}

pub async fn completions(State(state): State<AppState>, JsonObject(v): JsonObject) -> Result<Response, ApiError> {
    let r: CompletionRequest = typed(v)?;
    if r.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "`echo` is not implemented"));
    }
    convert::refuse_if_set("suffix", &r.suffix, "insertion (fill-in-the-middle) is not implemented")?;
    let n = choices(r.n)?;
    if let Some(b) = r.best_of.filter(|&b| b as usize != n) {
        return Err(ApiError::unsupported("best_of", format!("`best_of` different from `n` is not implemented (best_of {b}, n {n})")));
    }
    let top_logprobs = match r.logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(k) => return Err(ApiError::invalid("logprobs", format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"))),
    };
    let prompts: Vec<Prompt> = match r.prompt.clone() {
        CompletionPrompt::Text(t) => vec![Prompt::Text(t)],
        CompletionPrompt::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
        CompletionPrompt::Tokens(t) => vec![Prompt::Tokens(t)],
        CompletionPrompt::TokenLists(v) => v.into_iter().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    if prompts.iter().any(|p| matches!(p, Prompt::Text(t) if t.is_empty())) {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    if prompts.len() * n > convert::MAX_N {
        return Err(ApiError::invalid("n", format!("prompts × n may be at most {}, got {}", convert::MAX_N, prompts.len() * n)));
    }
    let (sampling, stop, stop_token_ids, ignore_eos) = openai_sampling(&r.sampling(), top_logprobs)?;
    // OpenAI's default for completions is 16 new tokens.
    let max = max_tokens("max_tokens", r.max_tokens)?.unwrap_or(16);
    let mut reqs = Vec::new();
    for p in prompts {
        let req = GenerateRequest {
            prompt: p,
            sampling: sampling.clone(),
            stop: StopParams { stop: stop.clone(), stop_token_ids: stop_token_ids.clone(), max_tokens: Some(max), ignore_eos },
            beam: None,
        };
        reqs.extend(per_choice(req, n));
    }
    let route = route_for(&state, r.model.as_deref(), r.priority, &reqs[0])?;
    let chans = start(&state, &route, reqs).await?;
    let id = new_id("cmpl");
    let table = route.handle.tokens().clone();
    let stream = r.stream.unwrap_or(false);
    let mut resp = if stream {
        let include_usage = r.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let model = route.model.clone();
        let created = unix_now();
        let n_choices = chans.len();
        sse_from(&state, move |tx| async move {
            let chunk = move |choices: Value, usage: Option<Value>| {
                let mut c = json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices});
                if include_usage {
                    c["usage"] = usage.unwrap_or(Value::Null);
                }
                c
            };
            let chunk2 = chunk.clone();
            let totals = std::sync::Arc::new(std::sync::Mutex::new((vec![0usize; n_choices], 0usize)));
            let t2 = totals.clone();
            let mut offsets = vec![0usize; n_choices];
            let on_event = move |i: usize, ev: Event| -> Result<Vec<Value>, ApiError> {
                match ev {
                    Event::Token(t) => {
                        let lp = (!t.logprobs.is_empty()).then(|| completion_logprobs(&table, &t.logprobs, offsets[i]));
                        offsets[i] += t.text.len();
                        if t.text.is_empty() && lp.is_none() {
                            return Ok(vec![]);
                        }
                        Ok(vec![chunk(json!([{"index": i, "text": t.text, "logprobs": lp, "finish_reason": null}]), None)])
                    }
                    Event::Finished(f) => {
                        if let Ok(mut g) = t2.lock() {
                            g.0[i] = f.usage.prompt_tokens;
                            g.1 += f.usage.completion_tokens;
                        }
                        Ok(vec![chunk(json!([{"index": i, "text": "", "logprobs": null, "finish_reason": f.reason.as_str()}]), None)])
                    }
                    Event::Error(e) => Err(e.into()),
                }
            };
            let finale = move || {
                if !include_usage {
                    return Vec::new();
                }
                let (p, c) = totals.lock().map(|g| (g.0.iter().step_by(n.max(1)).sum::<usize>(), g.1)).unwrap_or_default();
                vec![chunk2(json!([]), Some(usage_json(p, c)))]
            };
            pump(tx, chans, on_event, finale).await;
        })
    } else {
        let mut out = Vec::new();
        let (mut prompt, mut completion) = (0, 0);
        for (i, c) in chans.into_iter().enumerate() {
            let (tokens, f) = collect(c).await?;
            if i % n == 0 {
                prompt += f.usage.prompt_tokens;
            }
            completion += f.usage.completion_tokens;
            let lps: Vec<TokenLogprob> = tokens.iter().flat_map(|t| t.logprobs.iter().cloned()).collect();
            out.push(json!({
                "index": i,
                "text": f.text,
                "logprobs": if has_logprobs(&tokens) { completion_logprobs(&table, &lps, 0) } else { Value::Null },
                "finish_reason": f.reason.as_str(),
            }));
        }
        completion_body("text_completion", &id, &route, out, usage_json(prompt, completion))
    };
    resp.headers_mut().insert("x-silica-route", route_header(&route));
    Ok(resp)
}
