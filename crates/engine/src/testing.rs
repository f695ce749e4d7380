//! Tiny seeded random Qwen2/Qwen3 checkpoints, written as safetensors directories and GGUF
//! files, for tests that must exercise both loaders and both architectures without a real
//! model. Used by this crate's tests and by `silica` test helpers; not part of serving.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};
use crate::model::{Arch, ModelConfig};

/// A small configuration: hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16, vocab 320.
/// Dimensions are multiples of 32 so the GGUF variant can be quantized to Q8_0.
pub fn tiny_config(arch: Arch, tie_word_embeddings: bool) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 320,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 256,
        tie_word_embeddings,
    }
}

/// [`tiny_config`] (Qwen2, untied) widened to heads of 64 (`heads` query heads sharing
/// `kv_heads` K/V heads, hidden 128, intermediate 256, context 1,024): shapes that Silica's
/// fused CUDA kernels and decode graphs take.
pub fn tiny_fused_config(heads: usize, kv_heads: usize) -> ModelConfig {
    let mut cfg = tiny_config(Arch::Qwen2, false);
    (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) = (128, 256, heads, kv_heads, 64);
    cfg.max_position_embeddings = 1024;
    cfg
}

/// Writes `cfg` with seeded random weights as an F16 safetensors directory and loads it on
/// `device` (F16).
pub fn load_random_f16(cfg: &ModelConfig, seed: u64, dir: &Path, device: &Device) -> Result<crate::model::QwenModel> {
    write_safetensors_dir(dir, cfg, &random_weights(cfg, seed)?, DType::F16, 1)?;
    load_f16(cfg, dir, device)
}

/// Loads the F16 safetensors directory that [`load_random_f16`] wrote, once more.
pub fn load_f16(cfg: &ModelConfig, dir: &Path, device: &Device) -> Result<crate::model::QwenModel> {
    crate::model::QwenModel::load(cfg.clone(), &mut crate::model::WeightSource::safetensors(dir, DType::F16, device)?, device)
}

/// Random weights with Hugging Face names, F32, deterministic in `seed`.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut out = Vec::new();
    let mut add = |name: String, shape: &[usize], center: f32, spread: f32, rng: &mut rand_chacha::ChaCha8Rng| -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| center + rng.random_range(-spread..spread)).collect();
        out.push((name, Tensor::from_vec(data, shape, &dev)?));
        Ok(())
    };
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    add("model.embed_tokens.weight".into(), &[cfg.vocab_size, h], 0.0, 1.0, &mut rng)?;
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.2, &mut rng)?;
        add(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0, 0.2, &mut rng)?;
        let ws = 1.0 / (h as f32).sqrt() * 1.7;
        add(format!("{p}.self_attn.q_proj.weight"), &[q, h], 0.0, ws, &mut rng)?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 0.0, ws, &mut rng)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], 0.0, ws, &mut rng)?;
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q], 0.0, ws, &mut rng)?;
        if cfg.arch.qkv_bias() {
            add(format!("{p}.self_attn.q_proj.bias"), &[q], 0.0, 0.5, &mut rng)?;
            add(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.0, 0.5, &mut rng)?;
            add(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.0, 0.5, &mut rng)?;
        }
        if cfg.arch.qk_norm() {
            add(format!("{p}.self_attn.q_norm.weight"), &[hd], 1.0, 0.2, &mut rng)?;
            add(format!("{p}.self_attn.k_norm.weight"), &[hd], 1.0, 0.2, &mut rng)?;
        }
        add(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.0, ws, &mut rng)?;
        add(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.0, ws, &mut rng)?;
        add(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.0, 1.0 / (i as f32).sqrt() * 1.7, &mut rng)?;
    }
    add("model.norm.weight".into(), &[h], 1.0, 0.2, &mut rng)?;
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), &[cfg.vocab_size, h], 0.0, 0.3, &mut rng)?;
    }
    Ok(out)
}

/// The `config.json` Hugging Face transformers reads for this configuration.
pub fn hf_config_json(cfg: &ModelConfig) -> serde_json::Value {
    let (arch_class, model_type) = match cfg.arch {
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
    };
    serde_json::json!({
        "architectures": [arch_class],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": cfg.arch.qkv_bias(),
        "use_sliding_window": false,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
    })
}

/// Write `dir/config.json` and the weights as safetensors in `dtype`; with `shards > 1`, as
/// several files plus `model.safetensors.index.json`.
pub fn write_safetensors_dir(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &[(String, Tensor)],
    dtype: DType,
    shards: usize,
) -> Result<()> {
    let io = |e: std::io::Error| EngineError::Io { path: dir.into(), source: e };
    std::fs::create_dir_all(dir).map_err(io)?;
    let text = serde_json::to_string_pretty(&hf_config_json(cfg)).expect("a JSON value serializes");
    std::fs::write(dir.join("config.json"), text).map_err(io)?;
    let converted: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    if shards <= 1 {
        let map: HashMap<String, Tensor> = converted.into_iter().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        return Ok(());
    }
    let per = converted.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in converted.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        for name in map.keys() {
            weight_map.insert(name.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&map, dir.join(&file))?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).map_err(io)?;
    Ok(())
}

/// Write the weights as a GGUF file with llama.cpp's tensor names and metadata keys. Matrices
/// are stored as `quant` (e.g. Q8_0) or F32 when `None`; norms and biases stay F32.
pub fn write_gguf(path: &Path, cfg: &ModelConfig, weights: &[(String, Tensor)], quant: Option<GgmlDType>) -> Result<()> {
    let a = cfg.arch.as_str();
    let u = |v: usize| Value::U32(v as u32);
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(format!("tiny-random-{a}"))),
        (format!("{a}.block_count"), u(cfg.num_layers)),
        (format!("{a}.context_length"), u(cfg.max_position_embeddings)),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{a}.attention.head_count"), u(cfg.num_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads)),
        (format!("{a}.attention.key_length"), u(cfg.head_dim)),
        (format!("{a}.attention.value_length"), u(cfg.head_dim)),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        ("tokenizer.ggml.tokens".into(), Value::Array((0..cfg.vocab_size).map(|i| Value::String(format!("<t{i}>"))).collect())),
    ];
    let mut qs = Vec::with_capacity(weights.len());
    for (name, t) in weights {
        let gname = crate::model::weights::gguf_name(name);
        let q = match quant {
            Some(dt) if t.rank() == 2 => QTensor::quantize(t, dt)?,
            _ => QTensor::quantize(t, GgmlDType::F32)?,
        };
        qs.push((gname, q));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).map_err(|e| EngineError::Io { path: path.into(), source: e })?;
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}
