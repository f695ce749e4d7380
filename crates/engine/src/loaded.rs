//! A model ready to run: the decoder, its tokenizer and chat template, and what `/models`
//! reports about it.

use std::time::Instant;

use candle_core::Device;

use crate::device::{device_name, DTypeSpec, DeviceSpec};
use crate::error::Result;
use crate::kv::{KvCache, KvCacheConfig};
use crate::model::{open_weights, Format, ModelConfig, ModelFiles, QwenModel, WeightSource};
use crate::tokenizer::TextTokenizer;

/// Facts about a loaded model, for logs, `/models` and the router.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub format: Format,
    /// "q4_k_m-gguf"-style description of the weights, or the dense dtype.
    pub weights: String,
    /// Activation dtype.
    pub dtype: String,
    pub device: String,
    pub num_parameters: u64,
    pub context_length: usize,
    /// Size of the weight files on disk (the weights' memory, give or take re-packing).
    pub weights_file_bytes: u64,
    pub load_seconds: f64,
}

/// Decoder + tokenizer.
pub struct LoadedModel {
    pub model: QwenModel,
    pub tokenizer: TextTokenizer,
    pub info: ModelInfo,
}

impl LoadedModel {
    /// Load `files` on the requested device and dtype.
    pub fn load(name: &str, files: &ModelFiles, device: DeviceSpec, dtype: DTypeSpec) -> Result<Self> {
        let t0 = Instant::now();
        let device: Device = device.open()?;
        let (cfg, mut weights) = open_weights(files, &device, dtype)?;
        let tokenizer = match (&files, &weights) {
            (ModelFiles::Safetensors(dir), _) => TextTokenizer::from_dir(dir)?,
            (ModelFiles::Gguf(_), WeightSource::Gguf(g)) => TextTokenizer::from_gguf_metadata(g.metadata())?,
            (ModelFiles::Gguf(p), _) => unreachable!("GGUF files {} open as a GGUF source", p.display()),
        };
        let weights_desc = match &weights {
            WeightSource::Gguf(g) => {
                let t: Vec<String> = g.type_histogram().into_iter().map(|(t, n)| format!("{t}x{n}")).collect();
                format!("gguf [{}]", t.join(", "))
            }
            WeightSource::Safetensors { .. } => format!("safetensors {:?}", weights.activation_dtype()),
        };
        let model = QwenModel::load(cfg.clone(), &mut weights, &device)?;
        let info = ModelInfo {
            name: name.to_string(),
            architecture: cfg.arch.as_str().to_string(),
            format: files.format(),
            weights: weights_desc,
            dtype: format!("{:?}", model.dtype()).to_lowercase(),
            device: device_name(&device),
            num_parameters: cfg.num_parameters(),
            context_length: cfg.max_position_embeddings,
            weights_file_bytes: files.weights_bytes(),
            load_seconds: t0.elapsed().as_secs_f64(),
        };
        tracing::info!(model = name, arch = %info.architecture, device = %info.device, dtype = %info.dtype,
            secs = info.load_seconds, "model loaded");
        Ok(LoadedModel { model, tokenizer, info })
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// A KV cache holding `tokens` positions in blocks of `block_size`.
    pub fn kv_cache_for_tokens(&self, tokens: usize, block_size: usize) -> Result<KvCache> {
        let num_blocks = tokens.div_ceil(block_size).max(1);
        self.model.new_kv_cache(KvCacheConfig { block_size, num_blocks })
    }
}
