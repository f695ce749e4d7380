//! The Qwen decoder and its loading: config, weights (safetensors or GGUF), layers.

mod attention_cpu;
pub mod batch;
pub mod config;
mod cpu_ops;
pub(crate) mod fused;
#[cfg(feature = "cuda")]
mod graph;
pub mod layers;
mod kquants;
mod q8;
pub mod qwen;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::Device;

pub use batch::SeqInput;
pub use config::{Arch, ModelConfig};
pub use qwen::QwenModel;
pub use weights::WeightSource;

#[cfg(feature = "cuda")]
pub(crate) use graph::{advance_beams, set_ids, Buffers as GraphBuffers};

/// A captured decode step's input buffers (CUDA graphs only).
#[cfg(not(feature = "cuda"))]
pub(crate) enum GraphBuffers {}

/// Changes a captured step's uploaded inputs on the device before its launch (see
/// [`qwen::QwenModel::forward_ahead`]).
pub(crate) type Patch<'a> = Box<dyn FnOnce(&GraphBuffers) -> candle_core::Result<()> + 'a>;

#[cfg(not(feature = "cuda"))]
pub(crate) fn set_ids(b: &GraphBuffers, _: &candle_core::Tensor) -> candle_core::Result<()> {
    match *b {}
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn advance_beams(b: &GraphBuffers, _: &candle_core::Tensor, _: usize, _: &fused::BeamAdvance<'_>, _: &[&candle_core::Tensor]) -> candle_core::Result<candle_core::Tensor> {
    match *b {}
}

use crate::device::DTypeSpec;
use crate::error::{EngineError, Result};

/// The on-disk format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Safetensors,
    Gguf,
}

/// Where a model's files are, once resolved to local paths.
#[derive(Debug, Clone)]
pub enum ModelFiles {
    /// A directory with `config.json`, safetensors weights and `tokenizer.json`.
    Safetensors(PathBuf),
    /// A GGUF file (tokenizer and chat template inside).
    Gguf(PathBuf),
}

impl ModelFiles {
    /// Detect the format of a local path: a `.gguf` file, or a checkpoint directory.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            if path.join("config.json").exists() {
                return Ok(ModelFiles::Safetensors(path.into()));
            }
            let ggufs: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| EngineError::Io { path: path.into(), source: e })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(ModelFiles::Gguf(one.clone())),
                [] => Err(EngineError::load(path, "directory has neither config.json nor a .gguf file")),
                _ => Err(EngineError::load(path, "directory has several .gguf files; name one")),
            };
        }
        if path.is_file() {
            return Ok(ModelFiles::Gguf(path.into()));
        }
        Err(EngineError::load(path, "no such file or directory"))
    }

    /// Bytes of the weight files: the GGUF file, or every `*.safetensors` of the directory.
    pub fn weights_bytes(&self) -> u64 {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        match self {
            ModelFiles::Gguf(p) => size(p),
            ModelFiles::Safetensors(dir) => std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                        .map(|p| size(&p))
                        .sum()
                })
                .unwrap_or(0),
        }
    }

    pub fn format(&self) -> Format {
        match self {
            ModelFiles::Safetensors(_) => Format::Safetensors,
            ModelFiles::Gguf(_) => Format::Gguf,
        }
    }
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::Safetensors(p) | ModelFiles::Gguf(p) => p,
        }
    }
}

/// Open the weights of `files` on `device`. For GGUF, `DTypeSpec::Auto` keeps the file's
/// quantization; an explicit dtype dequantizes every tensor to it.
pub fn open_weights(files: &ModelFiles, device: &Device, dtype: DTypeSpec) -> Result<(ModelConfig, WeightSource)> {
    match files {
        ModelFiles::Safetensors(dir) => {
            let cfg = ModelConfig::from_hf_config(&dir.join("config.json"))?;
            let w = WeightSource::safetensors(dir, dtype.resolve(device), device)?;
            Ok((cfg, w))
        }
        ModelFiles::Gguf(path) => {
            let dense = match dtype {
                DTypeSpec::Auto => None,
                d => Some(d.resolve(device)),
            };
            let w = WeightSource::gguf(path, device, dense)?;
            let WeightSource::Gguf(g) = &w else { unreachable!("just built a GGUF source") };
            let cfg = ModelConfig::from_gguf(g.metadata(), g.has_tensor("output.weight"), path)?;
            tracing::info!(path = %path.display(), types = ?g.type_histogram(), "GGUF tensors");
            Ok((cfg, w))
        }
    }
}
