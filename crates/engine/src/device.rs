//! Device and dtype selection: `--device auto|cpu|cuda[:N]|metal`, `--dtype auto|f32|f16|bf16`.
//!
//! Metal and CUDA are reached only through candle's own `Device` abstraction; this crate holds
//! no backend-specific logic beyond picking one.

use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DeviceSpec {
    /// CUDA if compiled in and present, else Metal likewise, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "metal" | "mps" => Ok(DeviceSpec::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| {
                    EngineError::invalid("device", format!("bad CUDA ordinal in `{s}`"))
                }),
                None => Err(EngineError::invalid(
                    "device",
                    format!("`{s}` is not one of auto, cpu, cuda, cuda:N, metal"),
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Open the device. A backend not compiled into this binary, or absent on this machine,
    /// is an error that says which.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(EngineError::Device(
                        "CUDA was requested but this binary was built without the `cuda` feature \
                         (rebuild with `cargo build --release --features cuda`)"
                            .into(),
                    ));
                }
                Device::new_cuda(n)
                    .map(single_stream)
                    .map_err(|e| EngineError::Device(format!("cannot open CUDA device {n}: {e}")))
            }
            DeviceSpec::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(EngineError::Device(
                        "Metal was requested but this binary was built without the `metal` \
                         feature (rebuild with `cargo build --release --features metal`)"
                            .into(),
                    ));
                }
                Device::new_metal(0)
                    .map_err(|e| EngineError::Device(format!("cannot open Metal device: {e}")))
            }
            DeviceSpec::Auto => {
                if candle_core::utils::cuda_is_available() {
                    match Device::new_cuda(0) {
                        Ok(d) => return Ok(single_stream(d)),
                        Err(e) => tracing::warn!("CUDA compiled in but unusable ({e}); trying next"),
                    }
                }
                if candle_core::utils::metal_is_available() {
                    match Device::new_metal(0) {
                        Ok(d) => return Ok(d),
                        Err(e) => tracing::warn!("Metal compiled in but unusable ({e}); using CPU"),
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// Silica runs everything of a CUDA device on candle's one stream, so cudarc's cross-stream
/// event tracking (two events created per allocation, recorded and waited on at every kernel
/// launch: several microseconds of host time per op) only costs time. Turned off before any
/// tensor exists on the device.
fn single_stream(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: no tensor is used on another stream: candle's device has one stream and
        // Silica creates none.
        unsafe { d.disable_event_tracking() };
    }
    device
}

/// Which dtype the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DTypeSpec {
    /// F16 on CUDA/Metal; on the CPU F32 for safetensors and the file's own quantization for GGUF.
    #[default]
    Auto,
    F32,
    F16,
    BF16,
}

impl FromStr for DTypeSpec {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DTypeSpec::Auto),
            "f32" | "float32" => Ok(DTypeSpec::F32),
            "f16" | "float16" | "fp16" => Ok(DTypeSpec::F16),
            "bf16" | "bfloat16" => Ok(DTypeSpec::BF16),
            other => Err(EngineError::invalid(
                "dtype",
                format!("`{other}` is not one of auto, f32, f16, bf16"),
            )),
        }
    }
}

impl std::fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DTypeSpec::Auto => "auto",
            DTypeSpec::F32 => "f32",
            DTypeSpec::F16 => "f16",
            DTypeSpec::BF16 => "bf16",
        };
        f.write_str(s)
    }
}

impl DTypeSpec {
    /// The activation dtype for dense weights on `device`.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::F16 => DType::F16,
            DTypeSpec::BF16 => DType::BF16,
            DTypeSpec::Auto if device.is_cpu() => DType::F32,
            DTypeSpec::Auto => DType::F16,
        }
    }
}

/// The size of a transparent huge page on Linux (x86-64 and aarch64 with 4 KB base pages):
/// the weight arena (`model::q8`) and the CPU KV pools (`kv`) ask for pages of this size.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// A short human name for a device ("cpu", "cuda:0", "metal").
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_and_backends_not_compiled_in() {
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        let err = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("device") && err.contains("tpu"), "{err}");
        assert!("bf8".parse::<DTypeSpec>().unwrap_err().to_string().contains("dtype"));
        #[cfg(not(feature = "cuda"))]
        {
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("without the `cuda` feature"), "{err}");
        }
        #[cfg(not(feature = "metal"))]
        {
            let err = DeviceSpec::Metal.open().unwrap_err().to_string();
            assert!(err.contains("without the `metal` feature"), "{err}");
        }
        assert!(DeviceSpec::Auto.open().is_ok(), "auto always finds at least the CPU");
    }
}

/// Copies F32 tensors to the host. On CUDA through a reusable page-locked buffer: a pageable
/// copy of a 152k-logit row is staged by the driver and took ~0.3 ms on the H100, the pinned
/// copy a fraction of that, and it is paid on every step that samples on the host. Elsewhere
/// (and for anything but F32) `to_vec1`.
#[derive(Default)]
pub(crate) struct HostCopier {
    #[cfg(feature = "cuda")]
    pinned: Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>>,
}

impl HostCopier {
    /// All elements of `t`, row-major.
    pub fn to_vec(&mut self, t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(dev), candle_core::DType::F32) = (t.device(), t.dtype()) {
            return self.cuda(dev, &t.flatten_all()?.contiguous()?);
        }
        t.flatten_all()?.to_vec1()
    }

    #[cfg(feature = "cuda")]
    fn cuda(&mut self, dev: &candle_core::CudaDevice, t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
        use candle_core::cuda_backend::WrapErr;
        let n = t.elem_count();
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("a CUDA tensor without CUDA storage");
        };
        let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("not contiguous") };
        let src = cs.as_cuda_slice::<f32>()?.slice(a..b);
        let stream = dev.cuda_stream();
        if self.pinned.as_ref().is_none_or(|p| p.len() < n) {
            // Flags 0: cached host memory (the default write-combined kind is slow to read).
            // SAFETY: filled by the copy below before it is read.
            self.pinned = Some(unsafe { stream.context().alloc_pinned_with_flags::<f32>(n.next_power_of_two(), 0) }.w()?);
        }
        // The destination is the first `n` elements of the page-locked buffer (a copy takes
        // the destination's length, so the whole buffer would read past the source).
        let host = &mut self.pinned.as_mut().expect("allocated above").as_mut_slice().w()?[..n];
        stream.memcpy_dtoh(&src, host).w()?;
        stream.synchronize().w()?;
        Ok(host.to_vec())
    }
}

