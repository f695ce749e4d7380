//! Tiny random Qwen2 and Qwen3 models created by the test itself, in safetensors and GGUF:
//! both formats load to the same logits; incremental decoding through the paged KV cache
//! equals a full forward; batching sequences does not change any sequence's logits.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use silica_engine::device::DTypeSpec;
use silica_engine::kv::{KvCacheConfig, SeqCache};
use silica_engine::model::{open_weights, Arch, ModelFiles, QwenModel, SeqInput};
use silica_engine::testing::{random_weights, tiny_config, write_gguf, write_safetensors_dir};

const TOKENS: [u32; 12] = [5, 17, 300, 42, 42, 7, 99, 250, 3, 0, 128, 64];

fn load(files: ModelFiles, dtype: DTypeSpec) -> QwenModel {
    let (cfg, mut w) = open_weights(&files, &Device::Cpu, dtype).expect("open weights");
    QwenModel::load(cfg, &mut w, &Device::Cpu).expect("load model")
}

fn kv(model: &QwenModel) -> silica_engine::kv::KvCache {
    model.new_kv_cache(KvCacheConfig { block_size: 4, num_blocks: 64 }).unwrap()
}

/// Logits for every position of `tokens` in one forward pass: [n, vocab].
fn full_forward(model: &QwenModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = kv(model);
    let mut seq = SeqCache::default();
    cache.reserve(&mut seq, tokens.len()).unwrap();
    let logits = model.forward(&[SeqInput { tokens, cache: &seq, all_logits: true }], &mut cache).unwrap();
    logits.to_vec2().unwrap()
}

/// Logits for every position computed incrementally: a prefill of `prefill` tokens, then one
/// token at a time through the KV cache.
fn incremental(model: &QwenModel, tokens: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let mut cache = kv(model);
    let mut seq = SeqCache::default();
    let mut out = Vec::new();
    cache.reserve(&mut seq, prefill).unwrap();
    let l = model.forward(&[SeqInput { tokens: &tokens[..prefill], cache: &seq, all_logits: true }], &mut cache).unwrap();
    seq.len = prefill;
    out.extend(l.to_vec2::<f32>().unwrap());
    for i in prefill..tokens.len() {
        cache.reserve(&mut seq, i + 1).unwrap();
        let l = model.forward(&[SeqInput { tokens: &tokens[i..i + 1], cache: &seq, all_logits: false }], &mut cache).unwrap();
        seq.len = i + 1;
        out.push(l.to_vec2::<f32>().unwrap().remove(0));
    }
    out
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0f32, f32::max)
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

fn models_for(arch: Arch, tie: bool) -> (tempfile::TempDir, ModelFiles, ModelFiles) {
    let cfg = tiny_config(arch, tie);
    let w = random_weights(&cfg, 7).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    write_safetensors_dir(&st, &cfg, &w, DType::F32, 1).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &cfg, &w, None).unwrap();
    (dir, ModelFiles::detect(&st).unwrap(), ModelFiles::detect(&gguf).unwrap())
}

#[test]
fn safetensors_and_gguf_give_the_same_logits_for_both_architectures() {
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        for tie in [false, true] {
            let (_d, st, gguf) = models_for(arch, tie);
            let a = full_forward(&load(st, DTypeSpec::Auto), &TOKENS);
            let b = full_forward(&load(gguf, DTypeSpec::Auto), &TOKENS);
            let diff = max_abs_diff(&a, &b);
            println!("{arch:?} tied={tie}: max |safetensors - gguf| = {diff:e}");
            assert!(diff < 1e-4, "{arch:?} tied={tie}: formats differ by {diff}");
            // The logits are not degenerate (the test would pass trivially on constants).
            let spread = a[3].iter().cloned().fold(f32::MIN, f32::max) - a[3].iter().cloned().fold(f32::MAX, f32::min);
            assert!(spread > 1.0, "logits look degenerate: spread {spread}");
        }
    }
}

#[test]
fn incremental_decoding_with_kv_cache_equals_full_forward() {
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let (_d, st, _g) = models_for(arch, false);
        let model = load(st, DTypeSpec::Auto);
        let full = full_forward(&model, &TOKENS);
        for prefill in [1, 3, 4, 5] {
            let inc = incremental(&model, &TOKENS, prefill);
            let diff = max_abs_diff(&full, &inc);
            println!("{arch:?} prefill={prefill}: max |full - incremental| = {diff:e}");
            assert!(diff < 1e-4, "{arch:?} prefill {prefill}: differs by {diff}");
        }
    }
}

#[test]
fn batching_sequences_does_not_change_their_logits() {
    let (_d, st, _g) = models_for(Arch::Qwen3, false);
    let model = load(st, DTypeSpec::Auto);
    let a: &[u32] = &TOKENS[..7];
    let b: &[u32] = &TOKENS[2..12];
    let alone_a = full_forward(&model, a);
    let alone_b = full_forward(&model, b);
    let mut cache = kv(&model);
    let (mut sa, mut sb) = (SeqCache::default(), SeqCache::default());
    // Interleave block allocation so the sequences' blocks are not contiguous.
    for len in 1..=10 {
        if len <= a.len() {
            cache.reserve(&mut sa, len).unwrap();
        }
        cache.reserve(&mut sb, len).unwrap();
    }
    let l = model
        .forward(
            &[SeqInput { tokens: a, cache: &sa, all_logits: true }, SeqInput { tokens: b, cache: &sb, all_logits: true }],
            &mut cache,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(max_abs_diff(&alone_a, &l[..7]) < 1e-4);
    assert!(max_abs_diff(&alone_b, &l[7..]) < 1e-4);
    // And a decode step of both together after the batched prefill.
    sa.len = a.len();
    sb.len = b.len();
    cache.reserve(&mut sa, a.len() + 1).unwrap();
    cache.reserve(&mut sb, b.len() + 1).unwrap();
    let step = model
        .forward(
            &[SeqInput { tokens: &[9], cache: &sa, all_logits: false }, SeqInput { tokens: &[11], cache: &sb, all_logits: false }],
            &mut cache,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let ref_a = full_forward(&model, &[a, &[9]].concat());
    let ref_b = full_forward(&model, &[b, &[11]].concat());
    assert!(max_abs_diff(&[ref_a[7].clone()], &step[..1]) < 1e-4);
    assert!(max_abs_diff(&[ref_b[10].clone()], &step[1..]) < 1e-4);
}

#[test]
fn sharded_and_half_precision_safetensors_load() {
    let cfg = tiny_config(Arch::Qwen2, false);
    let w = random_weights(&cfg, 11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let sharded = dir.path().join("sharded");
    write_safetensors_dir(&single, &cfg, &w, DType::F32, 1).unwrap();
    write_safetensors_dir(&sharded, &cfg, &w, DType::F32, 3).unwrap();
    assert!(sharded.join("model.safetensors.index.json").exists());
    let a = full_forward(&load(ModelFiles::detect(&single).unwrap(), DTypeSpec::Auto), &TOKENS);
    let b = full_forward(&load(ModelFiles::detect(&sharded).unwrap(), DTypeSpec::Auto), &TOKENS);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    for dt in [DType::F16, DType::BF16] {
        let p = dir.path().join(format!("{dt:?}"));
        write_safetensors_dir(&p, &cfg, &w, dt, 1).unwrap();
        // Stored in half precision, computed in F32 on the CPU (dtype auto) and in the
        // file's dtype when asked.
        let f32_run = full_forward(&load(ModelFiles::detect(&p).unwrap(), DTypeSpec::Auto), &TOKENS);
        let diff = max_abs_diff(&a, &f32_run);
        assert!(diff < 0.5, "{dt:?} weights drift by {diff}");
        let spec = if dt == DType::F16 { DTypeSpec::F16 } else { DTypeSpec::BF16 };
        let half = full_forward(&load(ModelFiles::detect(&p).unwrap(), spec), &TOKENS);
        let agree = a.iter().zip(&half).filter(|(x, y)| argmax(x) == argmax(y)).count();
        assert!(agree >= 10, "{dt:?} compute: argmax agrees on {agree}/12 positions");
    }
}

#[test]
fn quantized_gguf_stays_close_to_f32() {
    let cfg = tiny_config(Arch::Qwen2, true);
    let w = random_weights(&cfg, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.gguf");
    let q8_path = dir.path().join("q8.gguf");
    write_gguf(&f32_path, &cfg, &w, None).unwrap();
    write_gguf(&q8_path, &cfg, &w, Some(GgmlDType::Q8_0)).unwrap();
    let a = full_forward(&load(ModelFiles::Gguf(f32_path), DTypeSpec::Auto), &TOKENS);
    let q8 = load(ModelFiles::Gguf(q8_path.clone()), DTypeSpec::Auto);
    let b = full_forward(&q8, &TOKENS);
    let agree = a.iter().zip(&b).filter(|(x, y)| argmax(x) == argmax(y)).count();
    assert!(agree >= 11, "Q8_0 argmax agrees on {agree}/12");
    // The quantized path also decodes incrementally exactly like its own full forward.
    let inc = incremental(&q8, &TOKENS, 2);
    assert!(max_abs_diff(&b, &inc) < 1e-3);
    // Dequantizing the GGUF to F32 runs the dense path. The quantized kernels also round the
    // activations to 8 bits (as llama.cpp does), so the two differ slightly but agree on argmax.
    let deq = full_forward(&load(ModelFiles::Gguf(q8_path), DTypeSpec::F32), &TOKENS);
    let diff = max_abs_diff(&b, &deq);
    println!("Q8_0 kernels vs dequantized F32: max logit diff {diff}");
    assert!(diff < 0.5, "dense vs quantized kernels: {diff}");
    let agree = b.iter().zip(&deq).filter(|(x, y)| argmax(x) == argmax(y)).count();
    assert!(agree >= 11, "dequantized vs quantized argmax agrees on {agree}/12");
}

#[test]
fn truncated_or_corrupt_files_are_clear_errors_naming_the_file() {
    let (d, st, gguf) = models_for(Arch::Qwen2, false);
    // Truncated GGUF.
    let bytes = std::fs::read(gguf.path()).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = open_weights(&ModelFiles::Gguf(cut.clone()), &Device::Cpu, DTypeSpec::Auto).err().expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains("cut.gguf") && msg.contains("truncated"), "{msg}");
    // Garbage GGUF.
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a gguf file").unwrap();
    let msg = open_weights(&ModelFiles::Gguf(junk), &Device::Cpu, DTypeSpec::Auto).err().expect("must fail").to_string();
    assert!(msg.contains("junk.gguf"), "{msg}");
    // Truncated safetensors.
    let f = st.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let msg = open_weights(&st, &Device::Cpu, DTypeSpec::Auto).err().expect("must fail").to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
    // A token outside the vocabulary is an error, not a panic.
    let (_d2, st2, _) = models_for(Arch::Qwen2, false);
    let model = load(st2, DTypeSpec::Auto);
    let mut cache = kv(&model);
    let mut seq = SeqCache::default();
    cache.reserve(&mut seq, 1).unwrap();
    let err = model.forward(&[SeqInput { tokens: &[9999], cache: &seq, all_logits: false }], &mut cache).err().unwrap();
    assert!(err.to_string().contains("9999"));
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}

/// The gather path (every device but the CPU F32 kernel: here BF16 on the CPU): decode rows
/// of several sequences attended together, and mixed with a prefill chunk, give each
/// sequence's logits as when it runs alone.
#[test]
fn gather_attention_groups_decode_rows_without_changing_logits() {
    let (_d, st, _g) = models_for(Arch::Qwen2, true);
    let model = load(st, DTypeSpec::BF16);
    let prompts: [&[u32]; 3] = [&TOKENS[..7], &TOKENS[2..12], &TOKENS[5..8]];
    let next = [9u32, 11, 13];
    // Alone: prefill, then one decode step.
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .zip(next)
        .map(|(p, t)| {
            let mut cache = kv(&model);
            let mut seq = SeqCache::default();
            cache.reserve(&mut seq, p.len()).unwrap();
            model.forward(&[SeqInput { tokens: p, cache: &seq, all_logits: false }], &mut cache).unwrap();
            seq.len = p.len();
            cache.reserve(&mut seq, p.len() + 1).unwrap();
            let l = model.forward(&[SeqInput { tokens: &[t], cache: &seq, all_logits: false }], &mut cache).unwrap();
            l.to_vec2::<f32>().unwrap().remove(0)
        })
        .collect();
    // Together: the three prefills in one batch, then the three decode rows in one batch.
    let mut cache = kv(&model);
    let mut seqs = vec![SeqCache::default(), SeqCache::default(), SeqCache::default()];
    for (s, p) in seqs.iter_mut().zip(prompts) {
        cache.reserve(s, p.len()).unwrap();
    }
    let inputs: Vec<SeqInput> = seqs.iter().zip(prompts).map(|(s, p)| SeqInput { tokens: p, cache: s, all_logits: false }).collect();
    model.forward(&inputs, &mut cache).unwrap();
    for (s, p) in seqs.iter_mut().zip(prompts) {
        s.len = p.len();
        cache.reserve(s, p.len() + 1).unwrap();
    }
    let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
    let inputs: Vec<SeqInput> = seqs.iter().zip(&toks).map(|(s, t)| SeqInput { tokens: t, cache: s, all_logits: false }).collect();
    let together = model.forward(&inputs, &mut cache).unwrap().to_vec2::<f32>().unwrap();
    let scale = alone.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&alone, &together);
    assert!(diff <= 1e-3 * scale, "grouped decode differs by {diff} (scale {scale})");
    // Mixed: sequence 0 decodes while a fresh copy of prompt 1 prefills in the same step.
    let mut fresh = SeqCache::default();
    seqs[0].len += 1;
    let want_len = seqs[0].len + 1;
    cache.reserve(&mut seqs[0], want_len).unwrap();
    cache.reserve(&mut fresh, prompts[1].len()).unwrap();
    let mixed = model
        .forward(
            &[SeqInput { tokens: prompts[1], cache: &fresh, all_logits: false }, SeqInput { tokens: &[15], cache: &seqs[0], all_logits: false }],
            &mut cache,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut c2 = kv(&model);
    let mut s2 = SeqCache::default();
    let full: Vec<u32> = [prompts[0], &[9, 15]].concat();
    c2.reserve(&mut s2, full.len()).unwrap();
    let ref0 = model.forward(&[SeqInput { tokens: &full, cache: &s2, all_logits: false }], &mut c2).unwrap().to_vec2::<f32>().unwrap();
    let mut c3 = kv(&model);
    let mut s3 = SeqCache::default();
    c3.reserve(&mut s3, prompts[1].len()).unwrap();
    let ref1 = model.forward(&[SeqInput { tokens: prompts[1], cache: &s3, all_logits: false }], &mut c3).unwrap().to_vec2::<f32>().unwrap();
    // Prefill vs incremental in BF16 round differently; the argmax and a loose bound hold.
    for (got, want) in [(&mixed[1], &ref0[0]), (&mixed[0], &ref1[0])] {
        assert_eq!(argmax(got), argmax(want));
        assert!(max_abs_diff(&[got.clone()], &[want.clone()]) <= 0.05 * scale);
    }
}
