//! Both demo models served by one process; the router picks per request.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

const FAST: &str = "qwen2.5-coder-0.5b";
const STRONG: &str = "qwen2.5-coder-1.5b";

fn routed(s: &Server, body: Value) -> (String, String) {
    let (st, v) = s.json("POST", "/generate", &body);
    assert_eq!(st, 200, "{body}: {v}");
    (v["route"]["model"].as_str().unwrap().to_string(), v["route"]["reason"].as_str().unwrap().to_string())
}

#[test]
fn the_router_picks_by_priority_name_length_and_load() {
    let s = Server::start_models(&[FAST, STRONG], &[]);
    let models = s.get("/models");
    let list = models["models"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{models}");
    for m in list {
        assert_eq!(m["status"]["state"], "ready", "{m}");
        assert!(m["memory"]["total_bytes"].as_u64().unwrap() > m["memory"]["weights_bytes"].as_u64().unwrap(), "{m}");
    }
    assert_eq!(s.get("/v1/models")["data"].as_array().unwrap().len(), 2);
    let q = |extra: Value| {
        let mut b = json!({"prompt": "What is 2+2?", "max_tokens": 4});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let (m, why) = routed(&s, q(json!({"priority": "speed"})));
    assert_eq!(m, FAST, "{why}");
    let (m, why) = routed(&s, q(json!({"priority": "quality"})));
    assert_eq!(m, STRONG, "{why}");
    let (m, why) = routed(&s, q(json!({"priority": "quality", "max_tokens": 300, "stop": ["4"]})));
    assert_eq!(m, FAST, "{why}");
    assert!(why.contains("long generation"), "{why}");
    let (m, why) = routed(&s, q(json!({"model": "qwen-1.5b", "priority": "speed"})));
    assert_eq!(m, STRONG, "{why}");
    assert!(why.contains("by name"), "{why}");
    let (m, why) = routed(&s, q(json!({"priority": "balanced", "max_tokens": 32})));
    assert_eq!(m, FAST, "idle: {why}");

    // Load the fast model with many concurrent requests: balanced moves to the other one.
    let port = s.port;
    let load: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                let c = ServerRef(port);
                c.post(json!({"model": FAST, "prompt": format!("Write a long story number {i} about a robot."), "max_tokens": 96}))
            })
        })
        .collect();
    let t0 = Instant::now();
    loop {
        let p = s.get("/performance");
        let fast = p["models"].as_array().unwrap().iter().find(|m| m["name"] == FAST).unwrap().clone();
        let r = &fast["stats"]["requests"];
        if r["running"].as_u64().unwrap() + r["waiting"].as_u64().unwrap() >= 10 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the load did not start: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (m, why) = routed(&s, q(json!({"priority": "balanced", "max_tokens": 32})));
    assert_eq!(m, STRONG, "loaded: {why}");
    assert!(why.contains("balanced"), "{why}");
    for h in load {
        let v = h.join().unwrap();
        assert_eq!(v["route"]["model"], FAST, "{v}");
    }
}

struct ServerRef(u16);

impl ServerRef {
    fn post(&self, body: Value) -> Value {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.0)).unwrap();
        let b = body.to_string();
        write!(c, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap()
    }
}
