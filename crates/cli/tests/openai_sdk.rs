//! End to end with the official `openai` Python SDK: a real `silica serve` on the demo model,
//! driven by `tests/openai/test_openai_sdk.py` (chat and completions, streaming, usage, stop,
//! lengths, seeds, `n`, logprobs, tool calls, errors).
//!
//! The interpreter is `$SILICA_REF_PYTHON` (scripts/test.sh sets it to the reference venv, which
//! has `openai`), else `<repo>/.venv/bin/python` (create it with scripts/ref/setup-venv.sh).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SILICA_REF_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = common::repo().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the `openai` package: SILICA_REF_PYTHON is unset and {} does not exist; \
         run scripts/ref/setup-venv.sh (or set SILICA_REF_PYTHON to a python that has `openai`)",
        venv.display()
    );
    venv
}

#[test]
fn openai_python_sdk_against_a_real_server() {
    let python = python();
    let script = common::repo().join("tests/openai/test_openai_sdk.py");
    assert!(script.exists(), "missing {}", script.display());
    let server = common::Server::start(&[]);
    let base = format!("{}/v1", server.base());

    let mut child = Command::new(&python)
        .arg("-u")
        .arg(&script)
        .arg(&base)
        .current_dir(common::repo())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", python.display()));

    // Forward the script's output line by line as it comes (through the test harness, so
    // `--nocapture` shows it live and a failure shows it in the report).
    let stdout = child.stdout.take().expect("stdout piped");
    let stderr = child.stderr.take().expect("stderr piped");
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    let mut summary = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if line.ends_with(" failed") && line.contains(" passed, ") {
            summary = Some(line);
        }
    }
    let _ = err_thread.join();
    let status = child.wait().expect("wait for the Python script");
    drop(server);

    assert!(
        status.success(),
        "the openai SDK checks failed ({status}): {}",
        summary.as_deref().unwrap_or("the script printed no summary line")
    );
    let summary = summary.expect("the script printed no `N passed, M failed` line");
    assert!(summary.ends_with(" 0 failed"), "unexpected summary: {summary}");
}
