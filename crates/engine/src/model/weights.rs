//! Weight loading: Hugging Face safetensors directories and GGUF files behind one interface.
//!
//! The decoder asks for tensors by their Hugging Face names (`model.layers.3.self_attn.q_proj`);
//! the GGUF backend translates them (`blk.3.attn_q`). Linear layers come back as [`Linear`],
//! which is either dense (any float dtype) or quantized (candle's `QMatMul`), so one decoder
//! serves every format.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{EngineError, Result};

/// A linear layer `y = x W^T + b`, dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// `[out, in]` in the activation dtype.
    Dense(Tensor),
    /// candle's kernels (other devices; on the CPU the types Silica has no kernel for).
    Quant(QMatMul),
    /// Q8_0 and Q5_0 on the CPU: Silica's own kernels on the file's blocks (`q8.rs`).
    Q8(Arc<super::q8::Q8Matrix>),
    /// Q4_K and Q6_K on the CPU: Silica's own kernels on the file's blocks (`kquants.rs`).
    K(Arc<super::kquants::KMatrix>),
    /// Q4_K/Q6_K weights that read the same input, run as one product (q/k/v, gate/up).
    KStack(Vec<Arc<super::kquants::KMatrix>>),
}

impl Linear {
    /// `x: [rows, in]` → `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_into(x, None)
    }

    /// [`Self::forward`], the product written into `out` (a `fused::Scratch` buffer of
    /// `[rows, out]`) when Silica's GEMV computes it; elsewhere `out` is not used.
    pub fn forward_into(&self, x: &Tensor, out: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let y = self.forward_no_bias_into(x, out)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Several layers that read the same input as one, their outputs side by side (the q/k/v
    /// projections, gate and up): dense weights stacked along the output dimension, so one
    /// matmul serves all of them; Q4_K/Q6_K weights on the CPU kept as they are and run as one
    /// product (`KMatrix::forward_stacked`: one quantization of the input, one parallel pass).
    /// Biases are concatenated. `None` for other quantized parts, a mix, or when only some
    /// have a bias.
    pub fn concat(parts: &[&Linear]) -> candle_core::Result<Option<Linear>> {
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            _ => return Ok(None),
        };
        let dense: Option<Vec<&Tensor>> =
            parts.iter().map(|p| if let LinearWeight::Dense(w) = &p.weight { Some(w) } else { None }).collect();
        if let Some(weights) = dense {
            return Ok(Some(Linear { weight: LinearWeight::Dense(Tensor::cat(&weights, 0)?), bias }));
        }
        let k: Option<Vec<Arc<super::kquants::KMatrix>>> =
            parts.iter().map(|p| if let LinearWeight::K(m) = &p.weight { Some(m.clone()) } else { None }).collect();
        match k {
            Some(ms) if super::kquants::KMatrix::stackable(&ms) => Ok(Some(Linear { weight: LinearWeight::KStack(ms), bias })),
            _ => Ok(None),
        }
    }

    /// `x W^T` without the bias (for kernels that add it themselves); into `out` as in
    /// [`Self::forward_into`].
    pub fn forward_no_bias_into(&self, x: &Tensor, out: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) if super::fused::gemv_applies(x, w) => super::fused::gemv(x, w, out),
            LinearWeight::Dense(w) => x.matmul(&w.t()?),
            LinearWeight::Quant(q) => q.forward(x),
            LinearWeight::Q8(q) => q.forward(x),
            LinearWeight::K(q) => q.forward(x),
            LinearWeight::KStack(parts) => super::kquants::KMatrix::forward_stacked(parts, x),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight `[out, in]` when it is a dense tensor.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// A dense `[2 n, in]` weight without bias (two stacked layers, e.g. gate and up) with its
    /// rows interleaved: row `2 j` is the first half's row `j`, row `2 j + 1` the second's.
    /// `None` for other weights.
    pub fn interleave_halves(&self) -> candle_core::Result<Option<Linear>> {
        let (Some(w), None) = (self.dense_weight(), &self.bias) else { return Ok(None) };
        let (n2, k) = w.dims2()?;
        if n2 % 2 != 0 {
            return Ok(None);
        }
        let w = w.reshape((2, n2 / 2, k))?.transpose(0, 1)?.contiguous()?.reshape((n2, k))?;
        Ok(Some(Linear { weight: LinearWeight::Dense(w), bias: None }))
    }

    /// A quantized weight: on the CPU, Silica's own kernels for the types it has (each row's
    /// result independent of the batch); candle's `QMatMul` otherwise.
    ///
    /// candle's CPU kernels for the other types (Q4_0, Q5_K, ...) are batch-invariant except
    /// its Q6_K one, which Silica replaces.
    pub fn quantized(q: QTensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let cpu = q.device().is_cpu();
        let weight = if cpu && super::q8::Q8Matrix::supports(q.dtype()) {
            LinearWeight::Q8(Arc::new(super::q8::Q8Matrix::from_qtensor(&q)?))
        } else if cpu && super::kquants::KMatrix::supports(q.dtype()) {
            LinearWeight::K(Arc::new(super::kquants::KMatrix::from_qtensor(&q)?))
        } else {
            LinearWeight::Quant(QMatMul::from_qtensor(q)?)
        };
        Ok(Linear { weight, bias })
    }
}

/// A token-embedding table, dense or quantized (rows looked up without dequantizing it all).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Embedding {
    /// `ids: [n] u32` → `[n, hidden]` in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(w) => w.index_select(ids, 0),
            Embedding::Quant(q) => q.embedding(ids)?.to_dtype(dtype),
        }
    }
}

/// Where the weights come from.
pub enum WeightSource {
    Safetensors { vb: VarBuilder<'static>, dir: PathBuf },
    Gguf(GgufWeights),
}

/// A GGUF file opened for reading tensors.
pub struct GgufWeights {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
    device: Device,
    /// `Some(dtype)`: dequantize every tensor to this dense dtype. `None`: keep quantized.
    dense: Option<DType>,
    /// Where the CPU kernels' weights go (reserved at the first one: room for every tensor of
    /// a type they take).
    arena: Option<super::q8::WeightArena>,
}

impl GgufWeights {
    /// Open a GGUF file and read its header and metadata. Checks that every tensor lies
    /// inside the file, so a truncated download is reported here, naming the file.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::Io { path: path.into(), source: e })?;
        let file_len = file
            .metadata()
            .map_err(|e| EngineError::Io { path: path.into(), source: e })?
            .len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| EngineError::load(path, format!("not a readable GGUF file: {e}")))?;
        for (name, info) in &content.tensor_infos {
            let bytes = tensor_bytes(info) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(EngineError::load(
                    path,
                    format!(
                        "file is truncated or corrupt: tensor `{name}` ends at byte {end} but the \
                         file has {file_len} bytes"
                    ),
                ));
            }
        }
        Ok(GgufWeights {
            path: path.into(),
            content,
            reader,
            device: device.clone(),
            dense: None,
            arena: None,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Counts of tensors per GGML type, for logs and `/models`.
    pub fn type_histogram(&self) -> Vec<(String, usize)> {
        let mut m: HashMap<String, usize> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            *m.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort();
        v
    }

    /// A tensor's type, shape and bytes exactly as stored, read straight into the buffer the
    /// kernels keep (candle's `QTensor` reads into one buffer, copies into typed blocks, and
    /// taking the bytes back out copies again: the largest tensor three times at the peak).
    /// The buffer is a [`super::q8::WeightBytes`] from the file's arena (2 MB pages where the
    /// system allows).
    fn raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, super::q8::WeightBytes)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::load(&self.path, format!("tensor `{name}` is missing")))?;
        let (dtype, dims) = (info.ggml_dtype, info.shape.dims().to_vec());
        let bytes = tensor_bytes(info);
        let start = self.content.tensor_data_offset + info.offset;
        let io = |e| EngineError::Io { path: self.path.clone(), source: e };
        if self.arena.is_none() {
            let own = |i: &&TensorInfo| {
                super::q8::Q8Matrix::supports(i.ggml_dtype) || super::kquants::KMatrix::supports(i.ggml_dtype)
            };
            let room: usize = self.content.tensor_infos.values().filter(own).map(|i| tensor_bytes(i).next_multiple_of(64)).sum();
            self.arena = Some(super::q8::WeightArena::new(room).map_err(io)?);
        }
        let mut data = self.arena.as_mut().expect("reserved above").take(bytes).map_err(io)?;
        self.reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.reader.read_exact(&mut data))
            .map_err(io)?;
        Ok((dtype, dims, data))
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let t = self
            .content
            .tensor(&mut self.reader, name, &self.device)
            .map_err(|e| EngineError::load(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok(t)
    }
}

/// How many bytes a tensor takes in the file.
fn tensor_bytes(info: &TensorInfo) -> usize {
    info.shape.elem_count() / info.ggml_dtype.block_size().max(1) * info.ggml_dtype.type_size()
}

/// Translate a Hugging Face tensor name to its GGUF name.
pub fn gguf_name(hf: &str) -> String {
    if hf == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if hf == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    if hf == "lm_head.weight" {
        return "output.weight".into();
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            let mapped = [
                ("self_attn.q_proj.", "attn_q."),
                ("self_attn.k_proj.", "attn_k."),
                ("self_attn.v_proj.", "attn_v."),
                ("self_attn.o_proj.", "attn_output."),
                ("self_attn.q_norm.", "attn_q_norm."),
                ("self_attn.k_norm.", "attn_k_norm."),
                ("mlp.gate_proj.", "ffn_gate."),
                ("mlp.up_proj.", "ffn_up."),
                ("mlp.down_proj.", "ffn_down."),
                ("input_layernorm.", "attn_norm."),
                ("post_attention_layernorm.", "ffn_norm."),
            ];
            for (from, to) in mapped {
                if let Some(suffix) = tail.strip_prefix(from) {
                    return format!("blk.{idx}.{to}{suffix}");
                }
            }
        }
    }
    hf.to_string()
}

impl WeightSource {
    /// Open a safetensors checkpoint directory (single file or sharded with an index).
    pub fn safetensors(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        for f in &files {
            check_safetensors_header(f)?;
        }
        // SAFETY: the files are memory-mapped read-only; the caller must not modify them
        // while the model is loaded (the same contract as every mmap-based loader).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .map_err(|e| EngineError::load(dir, e))?;
        Ok(WeightSource::Safetensors { vb, dir: dir.into() })
    }

    /// Open a GGUF file; `dense` dequantizes everything to that dtype, `None` keeps the
    /// file's quantization.
    pub fn gguf(path: &Path, device: &Device, dense: Option<DType>) -> Result<Self> {
        let mut g = GgufWeights::open(path, device)?;
        g.dense = dense;
        Ok(WeightSource::Gguf(g))
    }

    /// The dtype activations flow in (quantized matmuls take F32 input).
    pub fn activation_dtype(&self) -> DType {
        match self {
            WeightSource::Safetensors { vb, .. } => vb.dtype(),
            WeightSource::Gguf(g) => g.dense.unwrap_or(DType::F32),
        }
    }

    pub fn location(&self) -> &Path {
        match self {
            WeightSource::Safetensors { dir, .. } => dir,
            WeightSource::Gguf(g) => &g.path,
        }
    }

    /// Whether a tensor with this Hugging Face name exists.
    pub fn contains(&self, hf: &str) -> bool {
        match self {
            WeightSource::Safetensors { vb, .. } => vb.contains_tensor(hf),
            WeightSource::Gguf(g) => g.has_tensor(&gguf_name(hf)),
        }
    }

    /// A dense tensor (norm weights, biases) of `shape` in the activation dtype.
    pub fn dense(&mut self, hf: &str, shape: &[usize]) -> Result<Tensor> {
        let dtype = self.activation_dtype();
        match self {
            WeightSource::Safetensors { vb, dir } => vb
                .get(shape, hf)
                .map_err(|e| EngineError::load(dir.as_path(), format!("tensor `{hf}`: {e}"))),
            WeightSource::Gguf(g) => {
                let name = gguf_name(hf);
                let t = g.qtensor(&name)?;
                let t = t
                    .dequantize(&g.device)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.reshape(shape))
                    .map_err(|e| EngineError::load(&g.path, format!("tensor `{name}`: {e}")))?;
                Ok(t)
            }
        }
    }

    /// A linear layer with weight `[out, in]` and an optional bias `[out]`.
    pub fn linear(&mut self, hf_prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let wname = format!("{hf_prefix}.weight");
        let bias = if bias { Some(self.dense(&format!("{hf_prefix}.bias"), &[out_dim])?) } else { None };
        match self {
            WeightSource::Safetensors { .. } => {
                Ok(Linear { weight: LinearWeight::Dense(self.dense(&wname, &[out_dim, in_dim])?), bias })
            }
            WeightSource::Gguf(g) => {
                let name = gguf_name(&wname);
                let own_kernel = g.content.tensor_infos.get(&name).is_some_and(|i| {
                    super::q8::Q8Matrix::supports(i.ggml_dtype) || super::kquants::KMatrix::supports(i.ggml_dtype)
                });
                if g.dense.is_none() && g.device.is_cpu() && own_kernel {
                    let (dtype, dims, data) = g.raw(&name)?;
                    check_shape(&g.path, &name, &dims, &[out_dim, in_dim])?;
                    let err = |e| EngineError::load(&g.path, format!("tensor `{name}`: {e}"));
                    let weight = if super::q8::Q8Matrix::supports(dtype) {
                        LinearWeight::Q8(Arc::new(super::q8::Q8Matrix::from_bytes(dtype, out_dim, in_dim, data).map_err(err)?))
                    } else {
                        LinearWeight::K(Arc::new(super::kquants::KMatrix::from_bytes(dtype, out_dim, in_dim, data).map_err(err)?))
                    };
                    return Ok(Linear { weight, bias });
                }
                let q = g.qtensor(&name)?;
                check_shape(&g.path, &name, q.shape().dims(), &[out_dim, in_dim])?;
                let err = |e| EngineError::load(&g.path, format!("tensor `{name}`: {e}"));
                match g.dense {
                    Some(dtype) => Ok(Linear {
                        weight: LinearWeight::Dense(q.dequantize(&g.device).and_then(|t| t.to_dtype(dtype)).map_err(err)?),
                        bias,
                    }),
                    None => Linear::quantized(q, bias).map_err(err),
                }
            }
        }
    }

    /// The token embedding table `[vocab, hidden]`.
    pub fn embedding(&mut self, hf: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        match self {
            WeightSource::Safetensors { .. } => Ok(Embedding::Dense(self.dense(hf, &[vocab, hidden])?)),
            WeightSource::Gguf(g) => {
                let name = gguf_name(hf);
                let q = g.qtensor(&name)?;
                check_shape(&g.path, &name, q.shape().dims(), &[vocab, hidden])?;
                let quantized = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                if g.dense.is_none() && quantized {
                    Ok(Embedding::Quant(Arc::new(q)))
                } else {
                    let dtype = g.dense.unwrap_or(DType::F32);
                    let t = q
                        .dequantize(&g.device)
                        .and_then(|t| t.to_dtype(dtype))
                        .map_err(|e| EngineError::load(&g.path, format!("tensor `{name}`: {e}")))?;
                    Ok(Embedding::Dense(t))
                }
            }
        }
    }

    /// The output head; with tied embeddings it reuses `model.embed_tokens.weight`.
    pub fn lm_head(&mut self, tied: bool, vocab: usize, hidden: usize) -> Result<Linear> {
        let name = if tied || !self.contains("lm_head.weight") {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        self.linear(name, hidden, vocab, false)
    }
}

fn check_shape(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(EngineError::load(
            path,
            format!("tensor `{name}` has shape {got:?}, the config implies {want:?}"),
        ));
    }
    Ok(())
}

/// The safetensors files of a checkpoint directory: `model.safetensors`, or the shards listed
/// in `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| EngineError::Io { path: index.clone(), source: e })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::load(&index, e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::load(&index, "no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if files.is_empty() {
            return Err(EngineError::load(&index, "`weight_map` lists no files"));
        }
        for f in &files {
            if !f.exists() {
                return Err(EngineError::load(f, "shard listed in the index is missing"));
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(EngineError::load(dir, "no model.safetensors or model.safetensors.index.json"))
}

/// Parse a safetensors header and check that every tensor lies inside the file, so a
/// truncated or corrupt file is reported naming the file instead of failing later.
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| EngineError::Io { path: path.into(), source: e })?;
    let len = f.metadata().map_err(|e| EngineError::Io { path: path.into(), source: e })?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| EngineError::load(path, "file is too short to be safetensors"))?;
    let hlen = u64::from_le_bytes(n);
    if hlen > 100_000_000 || 8 + hlen > len {
        return Err(EngineError::load(path, format!("corrupt safetensors header (length {hlen}, file {len} bytes)")));
    }
    let mut header = vec![0u8; hlen as usize];
    f.read_exact(&mut header).map_err(|e| EngineError::load(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| EngineError::load(path, format!("corrupt safetensors header: {e}")))?;
    let data_len = len - 8 - hlen;
    if let Some(obj) = v.as_object() {
        for (name, t) in obj {
            if name == "__metadata__" {
                continue;
            }
            let end = t
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .and_then(|o| o.get(1))
                .and_then(|e| e.as_u64())
                .ok_or_else(|| EngineError::load(path, format!("tensor `{name}` has no data_offsets")))?;
            if end > data_len {
                return Err(EngineError::load(
                    path,
                    format!("file is truncated: tensor `{name}` ends at {end}, data section has {data_len} bytes"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_linear_rows_do_not_depend_on_the_batch() {
        for dt in [GgmlDType::Q6K, GgmlDType::Q4K, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5K, GgmlDType::Q4_0] {
            let w = Tensor::randn(0f32, 1., (256, 512), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dt).unwrap();
            let lin = Linear::quantized(q, None).unwrap();
            let x = Tensor::randn(0f32, 1., (5, 512), &Device::Cpu).unwrap();
            let batch = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..5 {
                let one = lin.forward(&x.narrow(0, r, 1).unwrap()).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(one[0], batch[r], "{dt:?}: row {r} alone differs from the same row in a batch");
            }
        }
    }

    /// `cargo test --release -p silica-engine --lib kernel_speed -- --ignored --nocapture`:
    /// GMAC/s of Silica's CPU kernels against candle's `QMatMul` per type and row count.
    #[test]
    #[ignore]
    fn kernel_speed() {
        let (n, k) = (4864, 896);
        for dt in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = Tensor::randn(0f32, 1., (n, if dt == GgmlDType::Q5_0 || dt == GgmlDType::Q8_0 { k } else { 1024 }), &Device::Cpu).unwrap();
            let k = w.dim(1).unwrap();
            let q = QTensor::quantize(&w, dt).unwrap();
            let ours = Linear::quantized(QTensor::quantize(&w, dt).unwrap(), None).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 16, 128] {
                let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
                let mut line = format!("{dt:?} m={m}:");
                let a = |x: &Tensor| ours.forward(x).unwrap();
                let b = |x: &Tensor| theirs.forward(x).unwrap();
                let fs: [(&str, &dyn Fn(&Tensor) -> Tensor); 2] = [("silica", &a), ("candle", &b)];
                for (name, f) in fs
                {
                    f(&x);
                    let reps = (200 / m).max(3);
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        f(&x);
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    line += &format!(" {name} {:.1} GMAC/s ({:.3} ms)", (n * k * m) as f64 / s / 1e9, s * 1e3);
                }
                println!("{line}");
            }
        }
    }

    #[test]
    fn gguf_names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.layers.3.self_attn.q_proj.bias"), "blk.3.attn_q.bias");
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight"), "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("model.layers.12.self_attn.k_norm.weight"), "blk.12.attn_k_norm.weight");
        assert_eq!(gguf_name("lm_head.weight"), "output.weight");
    }

    #[test]
    fn stacked_dense_layers_give_each_part_s_output_and_refuse_mixed_parts() {
        let dev = Device::Cpu;
        let dense = |out: usize, bias: bool| Linear {
            weight: LinearWeight::Dense(Tensor::randn(0f32, 1., (out, 64), &dev).unwrap()),
            bias: bias.then(|| Tensor::randn(0f32, 1., out, &dev).unwrap()),
        };
        let x = Tensor::randn(0f32, 1., (3, 64), &dev).unwrap();
        for bias in [false, true] {
            let (q, k, v) = (dense(32, bias), dense(16, bias), dense(16, bias));
            let fused = Linear::concat(&[&q, &k, &v]).unwrap().expect("dense parts stack");
            assert_eq!(fused.bias().is_some(), bias);
            let y = fused.forward(&x).unwrap();
            let mut col = 0;
            for part in [&q, &k, &v] {
                let want = part.forward(&x).unwrap();
                let n = want.dim(1).unwrap();
                let got = y.narrow(1, col, n).unwrap();
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "bias {bias}: part at column {col} differs by {diff}");
                col += n;
            }
        }
        // Only some parts with a bias, or a quantized part: kept separate.
        assert!(Linear::concat(&[&dense(8, true), &dense(8, false)]).unwrap().is_none());
        let w = Tensor::randn(0f32, 1., (32, 64), &dev).unwrap();
        let quant = Linear::quantized(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(), None).unwrap();
        assert!(Linear::concat(&[&dense(8, false), &quant]).unwrap().is_none());
    }
}
