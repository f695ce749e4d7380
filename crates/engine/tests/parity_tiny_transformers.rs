//! Both architectures against the reference implementation: tiny seeded random Qwen2 and
//! Qwen3 checkpoints written by Silica (random norm weights, biases, q/k norms) are run by
//! Hugging Face transformers (`scripts/ref/hf_reference.py logits`) and by Silica; every
//! position's logits must agree to 1e-4 and the argmax must be identical. This is the check
//! that the Qwen3 path (no QKV bias, per-head q/k RMSNorm) is right: the demo models are Qwen2.

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device};
use silica_engine::device::DTypeSpec;
use silica_engine::kv::{KvCacheConfig, SeqCache};
use silica_engine::model::{open_weights, Arch, ModelFiles, QwenModel, SeqInput};
use silica_engine::testing::{random_weights, tiny_config, write_gguf, write_safetensors_dir};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The reference venv's python: `SILICA_REF_PYTHON`, else `.venv/bin/python`.
fn ref_python() -> PathBuf {
    if let Ok(p) = std::env::var("SILICA_REF_PYTHON") {
        return p.into();
    }
    let p = root().join(".venv/bin/python");
    assert!(p.exists(), "no reference venv: run scripts/ref/setup-venv.sh (scripts/test.sh does) or set SILICA_REF_PYTHON");
    p
}

fn silica_logits(files: ModelFiles, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (cfg, mut w) = open_weights(&files, &Device::Cpu, DTypeSpec::Auto).unwrap();
    let m = QwenModel::load(cfg, &mut w, &Device::Cpu).unwrap();
    let mut kv = m.new_kv_cache(KvCacheConfig { block_size: 4, num_blocks: 32 }).unwrap();
    let mut seq = SeqCache::default();
    kv.reserve(&mut seq, tokens.len()).unwrap();
    m.forward(&[SeqInput { tokens, cache: &seq, all_logits: true }], &mut kv).unwrap().to_vec2().unwrap()
}

#[test]
fn tiny_qwen2_and_qwen3_match_transformers() {
    let py = ref_python();
    let tokens: Vec<u32> = vec![3, 141, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27, 95, 0, 288, 41, 9];
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        for tie in [false, true] {
            let cfg = tiny_config(arch, tie);
            let w = random_weights(&cfg, 21).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let ckpt = dir.path().join("ckpt");
            write_safetensors_dir(&ckpt, &cfg, &w, DType::F32, 1).unwrap();
            let ids = dir.path().join("ids.json");
            std::fs::write(&ids, serde_json::to_string(&vec![tokens.clone()]).unwrap()).unwrap();
            let out = dir.path().join("ref.json");
            let status = Command::new(&py)
                .current_dir(root())
                .args(["scripts/ref/hf_reference.py", "logits", "--threads", "1", "--model-dir"])
                .arg(&ckpt)
                .arg("--ids")
                .arg(&ids)
                .arg("--out")
                .arg(&out)
                .status()
                .expect("run the transformers reference");
            assert!(status.success(), "hf_reference.py failed for {arch:?}");
            let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
            let reference: Vec<Vec<f32>> = r["results"][0]["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
                .collect();
            let gguf = dir.path().join("tiny.gguf");
            write_gguf(&gguf, &cfg, &w, None).unwrap();
            for (label, files) in [("safetensors", ModelFiles::detect(&ckpt).unwrap()), ("gguf", ModelFiles::Gguf(gguf))] {
                let ours = silica_logits(files, &tokens);
                let mut worst = 0f32;
                for (pos, (a, b)) in ours.iter().zip(&reference).enumerate() {
                    for (x, y) in a.iter().zip(b) {
                        // The reference is rounded to 6 significant digits.
                        worst = worst.max((x - y).abs() / (1.0 + y.abs()));
                    }
                    let am = |v: &[f32]| v.iter().enumerate().fold(0, |m, (i, &x)| if x > v[m] { i } else { m });
                    assert_eq!(am(a), am(b), "{arch:?} tied={tie} {label}: argmax differs at position {pos}");
                }
                println!("{arch:?} tied={tie} {label}: max relative logit difference vs transformers {worst:.2e}");
                assert!(worst < 1e-4, "{arch:?} tied={tie} {label}: logits differ by {worst}");
            }
        }
    }
}
