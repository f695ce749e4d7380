//! Shared by the end-to-end tests: a real `silica serve` process on the demo model, and a
//! minimal HTTP/1.1 client over a TCP socket (so malformed requests can be sent verbatim).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// A `silica serve` child process; killed (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Serve the demo model on a free port with `configs/default.toml` plus `extra` args, and
    /// wait until `/health` says ready.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_models(&["qwen2.5-coder-0.5b"], extra)
    }

    /// Serve the named demo models together.
    pub fn start_models(models: &[&str], extra: &[&str]) -> Server {
        let repo = repo();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_silica"));
        cmd.current_dir(&repo).args(["serve", "--port", "0", "--no-fetch"]);
        for m in models {
            let file = repo.join(format!("models/{m}-instruct-q4_k_m.gguf"));
            assert!(file.exists(), "demo model missing at {}: run scripts/fetch-demo-models.sh", file.display());
            cmd.args(["--model", m]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "warn,silica=info,silica_server=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start silica serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining stderr for the life of the process (a full pipe would block it).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port = rest.split(|c: char| !c.is_ascii_digit() && c != ':' && c != '.').next().unwrap_or("");
                    if let Some(p) = port.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                        let _ = tx.send(p);
                    }
                }
                if std::env::var("SILICA_TEST_VERBOSE").is_ok() {
                    eprintln!("[server] {line}");
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(60)).expect("silica serve did not report its port");
        let s = Server { child, port };
        let t0 = Instant::now();
        loop {
            // Ready when /health says so and no model is still loading.
            if let Ok((200, body)) = s.try_request("GET", "/health", b"") {
                if !body.contains("\"loading\"") {
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "the server did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One request; `(status, body)`.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        self.try_request(method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn try_request(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        // A server may answer (413) before reading a large body; a broken pipe is fine then.
        let _ = s.write_all(body);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, dechunk(&text, body)))
    }

    pub fn json(&self, method: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.request(method, path, body.to_string().as_bytes());
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (status, v)
    }

    pub fn get(&self, path: &str) -> serde_json::Value {
        let (status, text) = self.request("GET", path, b"");
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"))
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "the server did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Undo `Transfer-Encoding: chunked` (SSE bodies come chunked).
fn dechunk(full: &str, body: String) -> String {
    let head = full.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase();
    if !head.contains("transfer-encoding: chunked") {
        return body;
    }
    let mut out = String::new();
    let mut rest = body.as_str();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
