//! Model configuration for the Qwen family, read from a Hugging Face `config.json` or from GGUF
//! metadata. Qwen2/Qwen2.5 and Qwen3 share one struct; [`Arch`] carries the two differences
//! (QKV bias, per-head q/k RMSNorm).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// The architecture family. Qwen3 = Qwen2 without QKV bias and with per-head q/k RMSNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Qwen2,
    Qwen3,
}

impl Arch {
    /// Parse a `model_type` (config.json) or `general.architecture` (GGUF) string.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            other => Err(EngineError::Unsupported(format!(
                "architecture `{other}` (supported: qwen2, qwen3)"
            ))),
        }
    }
    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }
    /// Whether q and k are RMS-normalised per head before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// The validated hyper-parameters the decoder needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// The longest context the model was trained for (prompt + generated tokens).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Deserialize)]
struct RawHfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes `{"rope_theta": …, "rope_type": "default"}` here.
    rope_parameters: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Read a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Io { path: path.to_path_buf(), source: e })?;
        let raw: RawHfConfig =
            serde_json::from_str(&text).map_err(|e| EngineError::load(path, e))?;
        for (key, v) in [("rope_scaling", &raw.rope_scaling), ("rope_parameters", &raw.rope_parameters)] {
            let Some(v) = v.as_ref().filter(|v| !v.is_null()) else { continue };
            let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            if kind != "default" {
                return Err(EngineError::Unsupported(format!(
                    "{}: {key} of type `{kind}` is not implemented (only plain RoPE)",
                    path.display()
                )));
            }
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()))
            .unwrap_or(10_000.0);
        let cfg = ModelConfig {
            arch: Arch::parse(&raw.model_type)?,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32_768),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate().map_err(|e| EngineError::load(path, e))?;
        Ok(cfg)
    }

    /// Read GGUF metadata (`general.architecture` and `<arch>.*` keys). `has_output` says
    /// whether the file has a separate `output.weight` (otherwise embeddings are tied).
    pub fn from_gguf(md: &HashMap<String, Value>, has_output: bool, path: &Path) -> Result<Self> {
        let get = |key: &str| -> Result<&Value> {
            md.get(key)
                .ok_or_else(|| EngineError::load(path, format!("missing GGUF metadata key `{key}`")))
        };
        let arch_name = get("general.architecture")?
            .to_string()
            .map_err(|e| EngineError::load(path, e))?
            .clone();
        let arch = Arch::parse(&arch_name)?;
        let a = arch.as_str();
        let usize_of = |key: &str| -> Result<usize> {
            let v = get(&format!("{a}.{key}"))?;
            let n = v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map_err(|e| EngineError::load(path, format!("{a}.{key}: {e}")))?;
            Ok(n as usize)
        };
        let f64_of = |key: &str, default: f64| -> Result<f64> {
            match md.get(&format!("{a}.{key}")) {
                None => Ok(default),
                Some(v) => v
                    .to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map_err(|e| EngineError::load(path, format!("{a}.{key}: {e}"))),
            }
        };
        let hidden_size = usize_of("embedding_length")?;
        let num_heads = usize_of("attention.head_count")?;
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => usize_of("vocab_size")?,
        };
        let head_dim = match md.get(&format!("{a}.attention.key_length")) {
            Some(_) => usize_of("attention.key_length")?,
            None => hidden_size / num_heads.max(1),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_layers: usize_of("block_count")?,
            num_heads,
            num_kv_heads: usize_of("attention.head_count_kv")?,
            head_dim,
            rope_theta: f64_of("rope.freq_base", 10_000.0)?,
            rms_norm_eps: f64_of("attention.layer_norm_rms_epsilon", 1e-6)?,
            max_position_embeddings: usize_of("context_length")?,
            tie_word_embeddings: !has_output,
        };
        cfg.validate().map_err(|e| EngineError::load(path, e))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(format!(
                "num_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim must be even for RoPE, got {}", self.head_dim));
        }
        Ok(())
    }

    /// Parameter count of the decoder (embeddings counted once when tied).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.arch.qkv_bias() {
            attn += q + 2 * kv;
        }
        if self.arch.qk_norm() {
            attn += 2 * self.head_dim as u64;
        }
        let layer = attn + 3 * h * i + 2 * h;
        let embed = if self.tie_word_embeddings { v * h } else { 2 * v * h };
        layer * self.num_layers as u64 + embed + h
    }

    /// Bytes of K and V for one token across all layers at `dtype_size` bytes per element.
    pub fn kv_bytes_per_token(&self, dtype_size: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size
    }
}
