//! Parity with the reference implementation (Hugging Face transformers, PyTorch, F32) on the
//! real demo GGUF, 5 chat prompts × 64 greedy tokens:
//! - Silica's F32 path (the GGUF dequantized) must produce identical greedy ids; the largest
//!   logit difference against the reference's top-10 logits is printed.
//! - Silica's quantized kernels may differ only at a near-tie: where the two greedy paths first
//!   differ, the reference must rate the two tokens within 0.5 logits of each other.
//!
//! The reference comes from `scripts/ref/hf_reference.py greedy`, run live when
//! `SILICA_REF_PYTHON` names the reference venv's python (scripts/test.sh sets it), else from
//! `tests/data/parity_reference_q4km_0.5b.json`, produced by the same script.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use silica_engine::device::{DTypeSpec, DeviceSpec};
use silica_engine::kv::SeqCache;
use silica_engine::loaded::LoadedModel;
use silica_engine::model::{ModelFiles, SeqInput};

const NEW_TOKENS: usize = 64;
const NEAR_TIE: f32 = 0.5;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn demo() -> PathBuf {
    let p = root().join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    assert!(p.exists(), "demo model missing at {}: run scripts/fetch-demo-models.sh", p.display());
    p
}

fn reference(prompts: &Path) -> Value {
    if let Ok(py) = std::env::var("SILICA_REF_PYTHON") {
        let out = tempfile::NamedTempFile::new().unwrap();
        let status = Command::new(&py)
            .current_dir(root())
            .args(["scripts/ref/hf_reference.py", "greedy", "--gguf"])
            .arg(demo())
            .arg("--prompts")
            .arg(prompts)
            .args(["--max-new-tokens", &NEW_TOKENS.to_string(), "--top", "10", "--threads", "2", "--out"])
            .arg(out.path())
            .status()
            .expect("run the transformers reference");
        assert!(status.success(), "hf_reference.py failed ({status})");
        println!("reference: transformers, run live by {py}");
        return serde_json::from_str(&std::fs::read_to_string(out.path()).unwrap()).unwrap();
    }
    println!("reference: tests/data/parity_reference_q4km_0.5b.json (SILICA_REF_PYTHON unset)");
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/data/parity_reference_q4km_0.5b.json")).unwrap()).unwrap()
}

/// Greedy decoding of `n` tokens with the engine's model and KV cache; returns the ids and
/// every step's logits.
fn greedy(m: &LoadedModel, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut kv = m.kv_cache_for_tokens(prompt.len() + n + 16, 16).unwrap();
    let mut seq = SeqCache::default();
    let mut ids = Vec::new();
    let mut all = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..n {
        let len = seq.len + next.len();
        kv.reserve(&mut seq, len).unwrap();
        let logits = m.model.forward(&[SeqInput { tokens: &next, cache: &seq, all_logits: false }], &mut kv).unwrap();
        seq.len = len;
        let row = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let tok = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b }) as u32;
        ids.push(tok);
        all.push(row);
        next = vec![tok];
    }
    (ids, all)
}

#[test]
fn greedy_tokens_match_transformers_on_the_demo_model() {
    let prompts_path = root().join("tests/data/parity_prompts.json");
    let prompts: Value = serde_json::from_str(&std::fs::read_to_string(&prompts_path).unwrap()).unwrap();
    let reference = reference(&prompts_path);
    let results = reference["results"].as_array().expect("results");
    assert_eq!(results.len(), 5, "five prompts");

    // The prompts' ids are the HF tokenizer's; Silica's tokenizer must give the same.
    let quant = LoadedModel::load("demo", &ModelFiles::Gguf(demo()), DeviceSpec::Cpu, DTypeSpec::Auto).unwrap();
    for p in prompts.as_array().unwrap() {
        let ids: Vec<u32> = p["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(quant.tokenizer.encode(p["text"].as_str().unwrap(), false).unwrap(), ids, "tokenizer parity on {}", p["name"]);
    }

    let dense = LoadedModel::load("demo-f32", &ModelFiles::Gguf(demo()), DeviceSpec::Cpu, DTypeSpec::F32).unwrap();
    let mut worst_f32 = 0f32;
    let mut failures = Vec::new();
    for (p, r) in prompts.as_array().unwrap().iter().zip(results) {
        let name = p["name"].as_str().unwrap_or("?");
        let prompt: Vec<u32> = p["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let ref_ids: Vec<u32> = r["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let steps = r["steps"].as_array().unwrap();
        let top = |i: usize| -> Vec<(u32, f32)> {
            steps[i]["top"].as_array().unwrap().iter().map(|t| (t[0].as_u64().unwrap() as u32, t[1].as_f64().unwrap() as f32)).collect()
        };

        // F32 path: identical ids; logit differences on the reference's top-10.
        let (ids, logits) = greedy(&dense, &prompt, NEW_TOKENS);
        let mut worst = 0f32;
        for (i, row) in logits.iter().enumerate() {
            for (t, l) in top(i) {
                worst = worst.max((row[t as usize] - l).abs());
            }
        }
        worst_f32 = worst_f32.max(worst);
        let first_diff = ids.iter().zip(&ref_ids).position(|(a, b)| a != b);
        println!("[{name}] F32 path: max |logit - reference| on top-10 = {worst:.2e}; first differing step: {first_diff:?}");
        if let Some(i) = first_diff {
            failures.push(format!("[{name}] F32 greedy ids differ at step {i}: silica {} vs reference {}", ids[i], ref_ids[i]));
        }

        // Quantized kernels: the first divergence must be a near-tie in the reference.
        let (qids, _) = greedy(&quant, &prompt, NEW_TOKENS);
        let margins: Vec<String> = (0..NEW_TOKENS)
            .map(|i| {
                let t = top(i);
                format!("{:.3}", t[0].1 - t[1].1)
            })
            .collect();
        println!("[{name}] reference top-1/top-2 margins per step: {}", margins.join(" "));
        match qids.iter().zip(&ref_ids).position(|(a, b)| a != b) {
            None => println!("[{name}] quantized path: all {NEW_TOKENS} greedy tokens identical to the reference"),
            Some(i) => {
                let t = top(i);
                let chosen = t[0].1;
                let margin = match t.iter().find(|(id, _)| *id == qids[i]) {
                    Some((_, l)) => chosen - l,
                    None => chosen - t.last().unwrap().1, // a lower bound: not even in the top 10
                };
                println!("[{name}] quantized path first differs at step {i}: silica {} vs reference {}, reference margin {margin:.3}", qids[i], ref_ids[i]);
                if margin > NEAR_TIE {
                    failures.push(format!("[{name}] quantized path diverges at step {i} with reference margin {margin:.3} > {NEAR_TIE}"));
                }
            }
        }
    }
    println!("largest F32 logit difference over all prompts: {worst_f32:.2e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
