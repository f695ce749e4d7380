//! `WS /ws/stream`: several generations per connection, each identified by an `id` that every
//! server message carries.
//!
//! Client → server: a `/generate` body (optionally `"id"`, `"type": "generate"`), or
//! `{"type": "cancel", "id": …}`. Server → client: `start` {id, model, route}, `token`
//! {id, index, text}, then `done` {id, finish_reason, usage, timings, …} — `finish_reason`
//! `cancelled` after a cancel — or `error` {id, error}. A malformed message gets an `error`
//! (id null when none could be read) and the connection stays open. Closing the connection
//! cancels its generations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use silica_engine::scheduler::Event;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::{native, new_id, route_for, route_json, start, tagged};
use crate::error::ApiError;
use crate::extract::parse_json_text;
use crate::AppState;

type Active = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

pub async fn upgrade(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(state.cfg.max_body_bytes).on_upgrade(move |socket| session(state, socket))
}

fn error_msg(id: Option<&str>, e: &ApiError) -> Value {
    let mut v = e.body();
    v["type"] = json!("error");
    v["id"] = json!(id);
    v["status"] = json!(e.status.as_u16());
    v
}

async fn session(state: AppState, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<Value>(256);
    let writer = tokio::spawn(async move {
        while let Some(v) = out_rx.recv().await {
            if sink.send(Message::Text(v.to_string().into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let active: Active = Arc::default();
    let mut tasks = JoinSet::new();
    while let Some(msg) = incoming.next().await {
        let Ok(msg) = msg else { break };
        match msg {
            Message::Text(t) => {
                if let Err((id, e)) = handle(&state, t.as_str(), &out, &active, &mut tasks) {
                    let _ = out.send(error_msg(id.as_deref(), &e)).await;
                }
            }
            Message::Binary(_) => {
                let e = ApiError::new(StatusCode::BAD_REQUEST, "binary messages are not supported; send JSON text");
                let _ = out.send(error_msg(None, &e)).await;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
        }
        while tasks.try_join_next().is_some() {}
    }
    // The client is gone: dropping the generations' streams cancels them in the engines.
    tasks.shutdown().await;
    drop(out);
    let _ = writer.await;
}

/// One client message. Errors come back with the request's id when it could be read.
fn handle(state: &AppState, text: &str, out: &mpsc::Sender<Value>, active: &Active, tasks: &mut JoinSet<()>) -> Result<(), (Option<String>, ApiError)> {
    let v = parse_json_text(text.as_bytes()).map_err(|e| (None, e))?;
    let id = match v.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err((None, ApiError::invalid("id", format!("`id` must be a string, got {other}")))),
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("generate").to_string();
    match kind.as_str() {
        "cancel" => {
            let Some(id) = id else { return Err((None, ApiError::invalid("id", "`cancel` needs the `id` of a running generation"))) };
            let tx = active.lock().ok().and_then(|mut a| a.remove(&id));
            match tx {
                Some(tx) => {
                    let _ = tx.send(());
                    Ok(())
                }
                None => Err((Some(id.clone()), ApiError::not_found(format!("no running generation has id `{id}`")))),
            }
        }
        "generate" => {
            let id = id.unwrap_or_else(|| new_id("ws"));
            let fail = |e: ApiError| (Some(id.clone()), e);
            let (body, req) = native::parse(v).map_err(fail)?;
            let route = route_for(state, body.model.as_deref(), body.priority, &req).map_err(fail)?;
            let (cancel_tx, mut cancel_rx) = oneshot::channel::<()>();
            {
                let mut a = active.lock().map_err(|_| fail(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "session state poisoned")))?;
                if a.contains_key(&id) {
                    return Err(fail(ApiError::invalid("id", format!("a generation with id `{id}` is already running on this connection"))));
                }
                if a.len() >= state.cfg.max_ws_generations {
                    return Err(fail(ApiError {
                        retry_after: Some(1),
                        ..ApiError::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            format!("at most {} generations may run at once on one connection", state.cfg.max_ws_generations),
                        )
                    }));
                }
                a.insert(id.clone(), cancel_tx);
            }
            let (state, out, active) = (state.clone(), out.clone(), active.clone());
            tasks.spawn(async move {
                let started = tokio::select! {
                    r = start(&state, &route, vec![req]) => Some(r),
                    _ = &mut cancel_rx => None,
                };
                let done_cancelled = |completion: usize, text: &str| {
                    json!({"type": "done", "id": id, "model": route.model, "finish_reason": "cancelled", "text": text,
                           "usage": {"prompt_tokens": null, "completion_tokens": completion}, "route": route_json(&route, body.priority)})
                };
                match started {
                    None => {
                        let _ = out.send(done_cancelled(0, "")).await;
                    }
                    Some(Err(e)) => {
                        let _ = out.send(error_msg(Some(&id), &e)).await;
                    }
                    Some(Ok(mut chans)) => {
                        let _ = out.send(json!({"type": "start", "id": id, "model": route.model, "route": route_json(&route, body.priority)})).await;
                        let mut events = Box::pin(tagged(0, chans.remove(0)));
                        let (mut index, mut completion, mut text) = (0usize, 0usize, String::new());
                        loop {
                            let item = tokio::select! {
                                item = events.next() => item,
                                _ = &mut cancel_rx => {
                                    drop(events);
                                    let _ = out.send(done_cancelled(completion, &text)).await;
                                    break;
                                }
                            };
                            match item {
                                Some((_, Event::Token(t))) => {
                                    completion += t.token_ids.len();
                                    if !t.text.is_empty() {
                                        text.push_str(&t.text);
                                        let _ = out.send(json!({"type": "token", "id": id, "index": index, "text": t.text})).await;
                                        index += 1;
                                    }
                                }
                                Some((_, Event::Finished(f))) => {
                                    let mut v = native::result_json(&id, &route, &body, &f);
                                    v["type"] = json!("done");
                                    let _ = out.send(v).await;
                                    break;
                                }
                                Some((_, Event::Error(e))) => {
                                    let _ = out.send(error_msg(Some(&id), &ApiError::from(e))).await;
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                }
                if let Ok(mut a) = active.lock() {
                    a.remove(&id);
                }
            });
            Ok(())
        }
        other => Err((id, ApiError::invalid("type", format!("unknown message type `{other}`; expected `generate` or `cancel`")))),
    }
}
