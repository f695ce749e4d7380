//! A model ready to run: the decoder, its tokenizer and chat template, and what `/models`
//! reports about it.

use std::time::Instant;

use candle_core::Device;

use crate::device::{device_name, DTypeSpec, DeviceSpec};
use crate::error::Result;
use crate::kv::KvCache;
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

/// What a model will take in memory once loaded: its weights and its KV-cache pools.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights_bytes + self.kv_cache_bytes
    }

    /// Estimate from the model's configuration alone (GGUF header or `config.json`), without
    /// loading the weights: quantized GGUF weights take their file size; dense weights take
    /// parameters × dtype size; the KV cache takes what `engine` gives it.
    pub fn of(files: &ModelFiles, device: DeviceSpec, dtype: DTypeSpec, engine: &crate::scheduler::SchedulerConfig) -> Result<Self> {
        let device: Device = device.open()?;
        let cfg = match files {
            ModelFiles::Safetensors(dir) => crate::model::ModelConfig::from_hf_config(&dir.join("config.json"))?,
            ModelFiles::Gguf(path) => {
                let mut f = std::fs::File::open(path).map_err(|e| crate::EngineError::Io { path: path.clone(), source: e })?;
                let c = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| crate::EngineError::load(path, e))?;
                ModelConfig::from_gguf(&c.metadata, c.tensor_infos.contains_key("output.weight"), path)?
            }
        };
        let act = dtype.resolve(&device);
        let weights_bytes = match (files, dtype) {
            (ModelFiles::Gguf(_), DTypeSpec::Auto) => files.weights_bytes(),
            _ => cfg.num_parameters() * act.size_in_bytes() as u64,
        };
        let kv_dtype_size = match (files, dtype) {
            (ModelFiles::Gguf(_), DTypeSpec::Auto) if device.is_cpu() => 4,
            _ => act.size_in_bytes(),
        };
        let per_token = cfg.kv_bytes_per_token(kv_dtype_size);
        let blocks = engine.num_blocks(per_token, &device)?;
        Ok(MemoryEstimate { weights_bytes, kv_cache_bytes: (blocks * engine.block_size * per_token) as u64 })
    }
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
        self.model.kv_cache_for_tokens(tokens, block_size)
    }
}
