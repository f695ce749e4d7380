//! End-to-end tests of `silica serve` on the real demo model: malformed requests, the
//! WebSocket stream, disconnecting clients, graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn chat(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

#[test]
fn malformed_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = Server::start(&[]);
    let long_prompt = "hello ".repeat(40_000);
    // (path, body, status, param, text the message must contain)
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>, &str)> = vec![
        ("/v1/chat/completions", b"{\"model\": ".to_vec(), 400, None, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]".to_vec(), 400, None, "JSON object"),
        ("/v1/chat/completions", json!({"messages": "hi"}).to_string().into_bytes(), 400, Some("messages"), "messages"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "max_tokens": "ten"}).to_string().into_bytes(), 400, Some("max_tokens"), "max_tokens"),
        ("/v1/chat/completions", json!({"messages": []}).to_string().into_bytes(), 400, Some("messages"), "at least one"),
        ("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "hi"}]}).to_string().into_bytes(), 400, Some("messages[0].role"), "wizard"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "max_tokens": -5}).to_string().into_bytes(), 400, Some("max_tokens"), "-5"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "max_tokens": 1_000_000_000u64}).to_string().into_bytes(), 400, Some("max_tokens"), "32768"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "temperature": 3.5}).to_string().into_bytes(), 400, Some("temperature"), "3.5"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "top_p": 0}).to_string().into_bytes(), 400, Some("top_p"), "top_p"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "n": 100}).to_string().into_bytes(), 400, Some("n"), "100"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "logit_bias": {"abc": 1}}).to_string().into_bytes(), 400, Some("logit_bias"), "abc"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "logit_bias": {"999999999": 1}}).to_string().into_bytes(), 400, Some("logit_bias"), "999999999"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "frobnicate": true}).to_string().into_bytes(), 400, Some("frobnicate"), "frobnicate"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "response_format": {"type": "json_schema"}}).to_string().into_bytes(), 400, Some("response_format"), "not implemented"),
        ("/v1/chat/completions", json!({"messages": chat("hi"), "tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string().into_bytes(), 400, Some("tool_choice"), "required"),
        ("/v1/chat/completions", json!({"messages": chat(&long_prompt)}).to_string().into_bytes(), 400, Some("prompt"), "32768"),
        ("/v1/chat/completions", vec![b' '; 3 * 1024 * 1024], 413, None, "2097152"),
        ("/v1/completions", json!({"prompt": []}).to_string().into_bytes(), 400, Some("prompt"), "empty"),
        ("/v1/completions", json!({"prompt": "x", "echo": true}).to_string().into_bytes(), 400, Some("echo"), "echo"),
        ("/generate", json!({"prompt": "x", "messages": chat("y")}).to_string().into_bytes(), 400, Some("messages"), "either"),
        ("/generate", json!({"max_tokens": 5}).to_string().into_bytes(), 400, Some("prompt"), "required"),
        ("/generate", json!({"prompt": "x", "strategy": "greedy", "temperature": 0.7}).to_string().into_bytes(), 400, Some("temperature"), "0.7"),
        ("/generate", json!({"prompt": "x", "strategy": "beam", "num_beams": 40}).to_string().into_bytes(), 400, Some("num_beams"), "40"),
        ("/generate", json!({"prompt": "x", "strategy": "quantum"}).to_string().into_bytes(), 400, Some("strategy"), "quantum"),
        ("/generate", json!({"prompt": "x", "model": "gpt-9"}).to_string().into_bytes(), 404, Some("model"), "gpt-9"),
        ("/v1/chat/completions", json!({"model": "gpt-9", "messages": chat("hi")}).to_string().into_bytes(), 404, Some("model"), "gpt-9"),
    ];
    for (path, body, status, param, needle) in &cases {
        let (got, text) = s.request("POST", path, body);
        let shown = if body.len() > 200 { format!("<{} bytes>", body.len()) } else { String::from_utf8_lossy(body).into_owned() };
        assert_eq!(got, *status, "{path} {shown}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} {shown}: error body is not JSON ({e}): {text}"));
        let err = &v["error"];
        assert!(err["type"].is_string() && err["message"].is_string(), "{path} {shown}: {v}");
        assert_eq!(err["param"].as_str(), *param, "{path} {shown}: {v}");
        assert!(err["message"].as_str().unwrap().contains(needle), "{path} {shown}: message lacks {needle:?}: {v}");
    }
    let (st, text) = s.request("GET", "/v1/chat/completions", b"");
    assert_eq!(st, 405, "{text}");
    let (st, text) = s.request("GET", "/v1/models/nope", b"");
    assert_eq!(st, 404, "{text}");
    // Still serving.
    let (st, v) = s.json("POST", "/generate", &json!({"prompt": "What is the capital of France?", "max_tokens": 16}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["text"], "The capital of France is Paris.");
    assert_eq!(v["finish_reason"], "stop");
    let perf = s.get("/performance");
    assert_eq!(perf["overall"]["requests"]["running"], 0, "{perf}");
}

async fn ws_recv(ws: &mut (impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin)) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), ws.next()).await.expect("websocket message in time").expect("open").expect("ok");
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).expect("server messages are JSON");
        }
    }
}

/// Collect one generation's messages on a connection where only it runs.
async fn ws_run(ws: &mut (impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin), id: &str) -> (Vec<String>, Value) {
    let mut tokens = Vec::new();
    loop {
        let m = ws_recv(ws).await;
        assert_eq!(m["id"], id, "{m}");
        match m["type"].as_str().unwrap() {
            "start" => assert!(tokens.is_empty() && m["model"] == "qwen2.5-coder-0.5b", "{m}"),
            "token" => {
                assert_eq!(m["index"], tokens.len(), "{m}");
                tokens.push(m["text"].as_str().unwrap().to_string());
            }
            "done" => return (tokens, m),
            other => panic!("unexpected {other}: {m}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_streams_cancels_and_survives_bad_messages() {
    let s = tokio::task::spawn_blocking(|| Server::start(&[])).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws/stream", s.port)).await.expect("connect");
    let req = json!({"prompt": "Write one sentence about the sea.", "strategy": "sample", "temperature": 0.8, "seed": 42, "max_tokens": 24});

    // Streamed tokens concatenate to the text /generate returns for the same seeded request.
    let mut msg = req.clone();
    msg["id"] = json!("a");
    ws.send(Message::Text(msg.to_string().into())).await.unwrap();
    let (tokens, done) = ws_run(&mut ws, "a").await;
    let streamed: String = tokens.concat();
    assert!(!streamed.is_empty());
    assert_eq!(done["text"], streamed, "{done}");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() >= tokens.len() as u64, "{done}");
    assert!(done["timings"]["time_to_first_token_ms"].as_f64().unwrap() > 0.0, "{done}");
    let port = s.port;
    let body = req.clone();
    let via_http = tokio::task::spawn_blocking(move || {
        common_request(port, &body)
    })
    .await
    .unwrap();
    assert_eq!(via_http["text"], streamed, "{via_http}");

    // A malformed message gets an error and the connection stays usable.
    ws.send(Message::Text("this is not json".into())).await.unwrap();
    let e = ws_recv(&mut ws).await;
    assert_eq!((e["type"].as_str(), e["id"].is_null()), (Some("error"), true), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("JSON"), "{e}");
    ws.send(Message::Text(json!({"id": "bad", "prompt": "x", "temperature": 9}).to_string().into())).await.unwrap();
    let e = ws_recv(&mut ws).await;
    assert_eq!((e["type"].as_str(), e["id"].as_str(), e["error"]["param"].as_str()), (Some("error"), Some("bad"), Some("temperature")), "{e}");
    ws.send(Message::Text(json!({"type": "cancel", "id": "nothing"}).to_string().into())).await.unwrap();
    let e = ws_recv(&mut ws).await;
    assert_eq!((e["type"].as_str(), e["id"].as_str()), (Some("error"), Some("nothing")), "{e}");

    // Cancel: a long generation stops with finish_reason `cancelled`.
    ws.send(Message::Text(json!({"id": "long", "prompt": "Write a very long story about a dragon.", "max_tokens": 400}).to_string().into())).await.unwrap();
    let mut seen = 0;
    let done = loop {
        let m = ws_recv(&mut ws).await;
        assert_eq!(m["id"], "long", "{m}");
        match m["type"].as_str().unwrap() {
            "token" => {
                seen += 1;
                if seen == 3 {
                    ws.send(Message::Text(json!({"type": "cancel", "id": "long"}).to_string().into())).await.unwrap();
                }
            }
            "done" => break m,
            _ => {}
        }
    };
    assert_eq!(done["finish_reason"], "cancelled", "{done}");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() < 50, "{done}");

    // Two generations at once on one connection, told apart by id.
    for id in ["x", "y"] {
        ws.send(Message::Text(json!({"id": id, "prompt": format!("Say the letter {id}."), "max_tokens": 8}).to_string().into())).await.unwrap();
    }
    let mut finished = std::collections::HashMap::new();
    let mut texts: std::collections::HashMap<String, String> = Default::default();
    while finished.len() < 2 {
        let m = ws_recv(&mut ws).await;
        let id = m["id"].as_str().unwrap().to_string();
        match m["type"].as_str().unwrap() {
            "token" => texts.entry(id).or_default().push_str(m["text"].as_str().unwrap()),
            "done" => {
                finished.insert(id, m);
            }
            "start" => {}
            other => panic!("{other}: {m}"),
        }
    }
    for id in ["x", "y"] {
        assert_eq!(finished[id]["text"].as_str().unwrap(), texts.get(id).map(String::as_str).unwrap_or(""), "{}", finished[id]);
    }
    ws.close(None).await.ok();
    let perf = tokio::task::spawn_blocking(move || {
        let p = s.get("/performance");
        drop(s);
        p
    })
    .await
    .unwrap();
    assert!(perf["overall"]["requests"]["cancelled"].as_u64().unwrap() >= 1, "{perf}");
}

fn common_request(port: u16, body: &Value) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let b = body.to_string();
    write!(s, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// Open a streaming chat request and return the socket once the first chunk has arrived.
fn open_stream(port: u16, max_tokens: u32) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let b = json!({"messages": chat("Write a long story about the history of Rome."), "stream": true, "max_tokens": max_tokens, "ignore_eos": true}).to_string();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{b}", b.len()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = String::new();
    while !got.contains("data: {") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    s
}

#[test]
fn disconnecting_clients_cancel_and_free_their_kv_blocks_then_shutdown_is_clean() {
    let dir = tempfile_dir();
    let cfg = dir.join("serve.toml");
    std::fs::write(&cfg, "[server]\nshutdown_grace_seconds = 1\n[engine]\nprefix_caching = false\nkv_cache = { tokens = 16384 }\n").unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let before = s.get("/performance")["overall"]["requests"]["cancelled"].as_u64().unwrap();
    let n = 8;
    let streams: Vec<TcpStream> = (0..n).map(|_| open_stream(s.port, 300)).collect();
    // Non-streaming requests whose clients leave before the answer.
    let mut plain = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        let b = json!({"prompt": "Write a long essay.", "max_tokens": 300}).to_string();
        write!(c, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{b}", b.len()).unwrap();
        plain.push(c);
    }
    std::thread::sleep(Duration::from_millis(1500));
    drop(streams);
    drop(plain);
    let t0 = Instant::now();
    let perf = loop {
        let p = s.get("/performance");
        let r = &p["overall"]["requests"];
        let kv = &p["overall"]["kv_cache"];
        if r["running"] == 0 && r["waiting"] == 0 && kv["blocks_used"] == 0 {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "generations still running or blocks held: {p}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let cancelled = perf["overall"]["requests"]["cancelled"].as_u64().unwrap() - before;
    assert_eq!(cancelled, n as u64 + 2, "{perf}");
    assert_eq!(perf["overall"]["requests"]["finished"], 0, "{perf}");

    // SIGTERM with a stream open: it ends with an error event and [DONE] after the grace
    // period, and the process exits successfully.
    let mut open = open_stream(s.port, 2000);
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    let _ = open.read_to_string(&mut rest);
    assert!(rest.contains("\"error\""), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("silica-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
