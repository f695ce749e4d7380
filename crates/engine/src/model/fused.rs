//! Silica's fused CUDA kernels (`cuda/kernels.cu`) as candle ops, for FP16/BF16 on CUDA.
//!
//! A decode step launched ~29 candle ops per layer, each costing more host time (~12 µs) than
//! the GPU needs to run it, so a single stream was bound by the host. These kernels replace the
//! runs of small ops: the q/k/v bias, RoPE and cache write (one kernel instead of ~10), the
//! decode attention over the paged cache (one instead of gather + 2 matmuls + mask + softmax),
//! and SwiGLU's activation (one instead of three). Without the `cuda` feature, or for another
//! dtype or head size, [`applies`] is false and the model uses candle's ops.

use candle_core::{DType, Device, Result, Tensor};

/// `SILICA_FUSED=0` turns the kernels off (to compare against candle's ops).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| cfg!(feature = "cuda") && std::env::var("SILICA_FUSED").map(|v| v != "0").unwrap_or(true))
}

/// Largest hidden size the add + RMSNorm kernel keeps in shared memory (48 KB per block).
pub const MAX_HIDDEN: usize = 8192;

/// Whether the fused kernels serve a model with these properties.
pub fn applies(device: &Device, dtype: DType, head_dim: usize, hidden: usize) -> bool {
    enabled()
        && device.is_cuda()
        && matches!(dtype, DType::F16 | DType::BF16)
        && matches!(head_dim, 64 | 128 | 256)
        && hidden <= MAX_HIDDEN
}

/// Inputs of [`qkv_rope_write`] besides the projection output and the pools.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct QkvRope<'a> {
    pub bias: Option<&'a Tensor>,
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    /// Full RoPE tables `[max_positions, head_dim / 2]`.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// `[rows]` u32 absolute positions.
    pub positions: &'a Tensor,
    /// `[rows]` u32 cache slots the rows' K/V go to.
    pub slots: &'a Tensor,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
}

/// From the fused projection `qkv: [rows, (nh + 2 nkv) hd]` (no bias added yet): adds the bias,
/// applies Qwen3's per-head q/k norms if given, rotates q and k, writes k and v into the pools
/// `[slots, nkv, hd]` at each row's slot, and returns q `[rows, nh, hd]`.
pub fn qkv_rope_write(qkv: &Tensor, p: &QkvRope<'_>, k_pool: &Tensor, v_pool: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        qkv.contiguous()?.apply_op1_no_bwd(&imp::QkvOp { p, k_pool, v_pool })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, p, k_pool, v_pool);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// Attention of one new token per sequence: `q: [d, nh, hd]` over the pools at the slots of
/// `table: [d, max_len]` (u32, row `i` valid for its first `lens[i]` entries), scaled by
/// `scale`. Returns `[d, nh * hd]`.
pub fn paged_decode(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    table: &Tensor,
    lens: &Tensor,
    num_kv_heads: usize,
    scale: f32,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        q.contiguous()?.apply_op1_no_bwd(&imp::PagedOp { k_pool, v_pool, table, lens, num_kv_heads, scale })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k_pool, v_pool, table, lens, num_kv_heads, scale);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// Most rows Silica's GEMV kernel can take (it is compiled for 1..=8).
pub const GEMV_MAX_ROWS: usize = 8;

/// Most rows it is used for: `SILICA_GEMV_ROWS` (default 2). Each weight is converted once
/// but multiplied by every row with CUDA-core FMAs, so by 4–8 rows the kernel is bound by
/// instructions, and cuBLAS (tensor cores) is faster.
fn gemv_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("SILICA_GEMV_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(2).min(GEMV_MAX_ROWS)
    })
}

/// Whether `x W^T` goes to Silica's GEMV kernel: on CUDA in f16/bf16, 1 to
/// [`gemv_rows`] rows, contiguous operands whose rows are whole 16-byte loads. cuBLAS
/// picks kernels for such skinny products that reach 35–80 % of the memory bandwidth (measured
/// with ncu on the H100) and costs more host time per call.
pub fn gemv_applies(x: &Tensor, w: &Tensor) -> bool {
    let (Ok((rows, k)), Ok((_, wk))) = (x.dims2(), w.dims2()) else { return false };
    let elem = x.dtype().size_in_bytes();
    enabled()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F16 | DType::BF16)
        && w.dtype() == x.dtype()
        && (1..=gemv_rows()).contains(&rows)
        && k == wk
        && k % 8 == 0
        && x.is_contiguous()
        && w.is_contiguous()
        && x.layout().start_offset() * elem % 16 == 0
        && w.layout().start_offset() * elem % 16 == 0
}

/// `x: [rows, k]`, `w: [n, k]` → `x W^T: [rows, n]` (when [`gemv_applies`]).
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        x.apply_op2_no_bwd(w, &imp::GemvOp)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// The residual add and the next RMSNorm in one kernel: `(x + h, rmsnorm(x + h) * weight)`,
/// both `[rows, hidden]`.
pub fn add_rmsnorm(x: &Tensor, h: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        let out = x.contiguous()?.apply_op2_no_bwd(&h.contiguous()?, &imp::AddNormOp { weight, eps })?;
        Ok((out.get(0)?, out.get(1)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, h, weight, eps);
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

/// `gate_up: [rows, 2 inter]` (gate columns, then up) → `silu(gate) * up: [rows, inter]`.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        gate_up.contiguous()?.apply_op1_no_bwd(&imp::SiluMulOp)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = gate_up;
        candle_core::bail!("fused kernels need the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DevicePtr, DeviceRepr, DeviceSlice, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

    use super::QkvRope;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/silica_kernels.ptx"));
    const MODULE: &str = "silica_kernels";

    fn suffix(dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::F16 => Ok("f16"),
            DType::BF16 => Ok("bf16"),
            other => bail!("Silica's fused kernels take f16 or bf16, not {other:?}"),
        }
    }

    /// The op's own input, as a contiguous view.
    fn input<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("fused kernel input is not contiguous") };
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// Another tensor's device memory as a contiguous view; `what` names it in errors.
    fn view<'a, T: CudaDType>(s: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        let Storage::Cuda(s) = s else { bail!("{what} is not on the CUDA device") };
        let Some((a, b)) = l.contiguous_offsets() else { bail!("{what} is not contiguous") };
        if a * std::mem::size_of::<T>() % 16 != 0 {
            bail!("{what} does not start on a 16-byte boundary");
        }
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// The device address of a view, for an optional (nullable) kernel argument.
    fn raw_ptr<T>(v: &CudaView<'_, T>) -> u64 {
        let (ptr, _sync) = v.device_ptr(v.stream());
        ptr
    }

    fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
        bail!("{name} runs on CUDA only")
    }

    /// `CustomOp1` for an op with `run::<T>(storage, layout)`: f16/bf16 on CUDA only.
    macro_rules! custom_op1 {
        ($op:ty, $name:literal) => {
            impl CustomOp1 for $op {
                fn name(&self) -> &'static str {
                    $name
                }
                fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                    cpu_unsupported($name)
                }
                fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
                    match s.dtype() {
                        DType::F16 => self.run::<half::f16>(s, l),
                        DType::BF16 => self.run::<half::bf16>(s, l),
                        other => bail!("{}: unsupported dtype {other:?}", $name),
                    }
                }
            }
        };
    }

    /// `CustomOp2` for an op with `run::<T>(s1, l1, s2, l2)`: f16/bf16 on CUDA only.
    macro_rules! custom_op2 {
        ($op:ty, $name:literal) => {
            impl CustomOp2 for $op {
                fn name(&self) -> &'static str {
                    $name
                }
                fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                    cpu_unsupported($name)
                }
                fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
                    match s1.dtype() {
                        DType::F16 => self.run::<half::f16>(s1, l1, s2, l2),
                        DType::BF16 => self.run::<half::bf16>(s1, l1, s2, l2),
                        other => bail!("{}: unsupported dtype {other:?}", $name),
                    }
                }
            }
        };
    }

    pub(super) struct QkvOp<'a> {
        pub p: &'a QkvRope<'a>,
        pub k_pool: &'a Tensor,
        pub v_pool: &'a Tensor,
    }

    impl QkvOp<'_> {
        fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let p = self.p;
            let dev = s.device();
            let (rows, width) = l.shape().dims2()?;
            let (nh, nkv, hd) = (p.num_heads, p.num_kv_heads, p.head_dim);
            if width != (nh + 2 * nkv) * hd {
                bail!("fused qkv: width {width}, expected ({nh} + 2 * {nkv}) * {hd}");
            }
            for (t, what) in [(p.positions, "positions"), (p.slots, "write slots")] {
                if t.dims1()? != rows {
                    bail!("fused qkv: {what} has {} entries for {rows} rows", t.dims1()?);
                }
            }
            let qkv = input::<T>(s, l)?;
            let (cos_s, cos_l) = p.cos.storage_and_layout();
            let (sin_s, sin_l) = p.sin.storage_and_layout();
            let (pos_s, pos_l) = p.positions.storage_and_layout();
            let (slot_s, slot_l) = p.slots.storage_and_layout();
            // The pools are written in place through read guards: the kernel is the only user
            // of those slots, and everything runs on candle's one stream.
            let (k_s, k_l) = self.k_pool.storage_and_layout();
            let (v_s, v_l) = self.v_pool.storage_and_layout();
            let (bias_g, qn_g, kn_g) = (
                p.bias.map(Tensor::storage_and_layout),
                p.q_norm.map(Tensor::storage_and_layout),
                p.k_norm.map(Tensor::storage_and_layout),
            );
            let opt_view = |g: &Option<(candle_core::StorageRef<'_>, &Layout)>, what: &str| -> Result<Option<u64>> {
                match g {
                    None => Ok(None),
                    Some((s, l)) => Ok(Some(raw_ptr(&view::<T>(s, l, what)?))),
                }
            };
            let bias = opt_view(&bias_g, "qkv bias")?.unwrap_or(0);
            let qn = opt_view(&qn_g, "q_norm")?.unwrap_or(0);
            let kn = opt_view(&kn_g, "k_norm")?.unwrap_or(0);
            let cos = view::<T>(&cos_s, cos_l, "rope cos")?;
            let sin = view::<T>(&sin_s, sin_l, "rope sin")?;
            let pos = view::<u32>(&pos_s, pos_l, "positions")?;
            let slots = view::<u32>(&slot_s, slot_l, "write slots")?;
            let k = view::<T>(&k_s, k_l, "k pool")?;
            let v = view::<T>(&v_s, v_l, "v pool")?;
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(rows * nh * hd)? };
            let func = dev.get_or_load_custom_func(&format!("silica_qkv_rope_{}", suffix(s.dtype())?), MODULE, PTX)?;
            let (nh_i, nkv_i, hd_i) = (nh as i32, nkv as i32, hd as i32);
            let mut b = func.builder();
            b.arg(&qkv).arg(&bias).arg(&qn).arg(&kn).arg(&cos).arg(&sin).arg(&pos).arg(&slots);
            b.arg(&out).arg(&k).arg(&v).arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&p.eps);
            let cfg = LaunchConfig {
                grid_dim: ((nh + 2 * nkv) as u32, rows as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: ((hd + 32) * 4) as u32,
            };
            // SAFETY: the arguments match `silica_qkv_rope_*` in kernels.cu; shapes checked above
            // and by the caller (pools hold every slot in `slots`).
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, nh, hd))))
        }
    }


    pub(super) struct PagedOp<'a> {
        pub k_pool: &'a Tensor,
        pub v_pool: &'a Tensor,
        pub table: &'a Tensor,
        pub lens: &'a Tensor,
        pub num_kv_heads: usize,
        pub scale: f32,
    }

    impl PagedOp<'_> {
        fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let (d, nh, hd) = l.shape().dims3()?;
            let (td, max_len) = self.table.dims2()?;
            if td != d || self.lens.dims1()? != d {
                bail!("paged decode: {d} queries, table {td} rows, {} lengths", self.lens.dims1()?);
            }
            if nh % self.num_kv_heads != 0 {
                bail!("paged decode: {nh} heads over {} kv heads", self.num_kv_heads);
            }
            let q = input::<T>(s, l)?;
            let (k_s, k_l) = self.k_pool.storage_and_layout();
            let (v_s, v_l) = self.v_pool.storage_and_layout();
            let (t_s, t_l) = self.table.storage_and_layout();
            let (n_s, n_l) = self.lens.storage_and_layout();
            let k = view::<T>(&k_s, k_l, "k pool")?;
            let v = view::<T>(&v_s, v_l, "v pool")?;
            let table = view::<u32>(&t_s, t_l, "slot table")?;
            let lens = view::<u32>(&n_s, n_l, "lengths")?;
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(d * nh * hd)? };
            let name = format!("silica_paged_decode_{}_{hd}", suffix(s.dtype())?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let (nh_i, nkv_i, len_i) = (nh as i32, self.num_kv_heads as i32, max_len as i32);
            let mut b = func.builder();
            b.arg(&q).arg(&k).arg(&v).arg(&table).arg(&lens).arg(&out);
            b.arg(&nh_i).arg(&nkv_i).arg(&len_i).arg(&self.scale);
            let cfg = LaunchConfig { grid_dim: (nh as u32, d as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match `silica_paged_decode_*`; every slot in `table` is
            // inside the pools (the engine reserved them), `lens[i] <= max_len`.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((d, nh * hd))))
        }
    }


    pub(super) struct SiluMulOp;

    impl SiluMulOp {
        fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let (rows, w) = l.shape().dims2()?;
            if w % 2 != 0 {
                bail!("silu_mul: odd width {w}");
            }
            let inter = w / 2;
            let n = rows * inter;
            let gu = input::<T>(s, l)?;
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(n)? };
            let func = dev.get_or_load_custom_func(&format!("silica_silu_mul_{}", suffix(s.dtype())?), MODULE, PTX)?;
            let (n_u, inter_i) = (n as u64, inter as i32);
            let mut b = func.builder();
            b.arg(&gu).arg(&out).arg(&n_u).arg(&inter_i);
            let cfg = LaunchConfig::for_num_elems(n as u32);
            // SAFETY: the arguments match `silica_silu_mul_*`.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, inter))))
        }
    }


    pub(super) struct GemvOp;

    impl GemvOp {
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device();
            let (rows, k) = xl.shape().dims2()?;
            let (n, wk) = wl.shape().dims2()?;
            if wk != k || rows == 0 || rows > super::GEMV_MAX_ROWS || k % 8 != 0 {
                bail!("silica-gemv: x {:?}, w {:?}", xl.shape(), wl.shape());
            }
            let x = input::<T>(xs, xl)?;
            let w = input::<T>(ws, wl)?;
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(rows * n)? };
            let name = format!("silica_gemv_{}_{rows}", suffix(xs.dtype())?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            // Warps per output column (split K): enough warps in flight to cover the memory
            // latency (an H100 holds ~8k resident warps), but at least two 16-byte loads per
            // lane each.
            let mut wr_log2 = 0u32;
            while wr_log2 < 3 && n << wr_log2 < 8192 && k / 8 / 32 >> (wr_log2 + 1) >= 2 {
                wr_log2 += 1;
            }
            let cols_per_block = 8 >> wr_log2;
            let (n_i, k_i, wr_i) = (n as i32, k as i32, wr_log2 as i32);
            let mut b = func.builder();
            b.arg(&x).arg(&w).arg(&out).arg(&n_i).arg(&k_i).arg(&wr_i);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(cols_per_block) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `silica_gemv_*`; alignment checked by `gemv_applies`.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, n))))
        }
    }


    pub(super) struct AddNormOp<'a> {
        pub weight: &'a Tensor,
        pub eps: f32,
    }

    impl AddNormOp<'_> {
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            hs: &CudaStorage,
            hl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device();
            let (rows, hdim) = xl.shape().dims2()?;
            if hl.shape().dims2()? != (rows, hdim) || self.weight.dims1()? != hdim {
                bail!("silica-add-rmsnorm: x {:?}, h {:?}, weight {:?}", xl.shape(), hl.shape(), self.weight.shape());
            }
            let x = input::<T>(xs, xl)?;
            let h = input::<T>(hs, hl)?;
            let (w_s, w_l) = self.weight.storage_and_layout();
            let w = view::<T>(&w_s, w_l, "norm weight")?;
            // SAFETY: written by the kernel before any read.
            let out = unsafe { dev.alloc::<T>(2 * rows * hdim)? };
            let func = dev.get_or_load_custom_func(&format!("silica_add_rmsnorm_{}", suffix(xs.dtype())?), MODULE, PTX)?;
            let (rows_i, hdim_i) = (rows as i32, hdim as i32);
            let mut b = func.builder();
            b.arg(&x).arg(&h).arg(&w).arg(&out).arg(&rows_i).arg(&hdim_i).arg(&self.eps);
            if hdim > super::MAX_HIDDEN {
                bail!("silica-add-rmsnorm: hidden size {hdim} over the kernel's shared memory");
            }
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: ((hdim + 32) * 4) as u32,
            };
            // SAFETY: the arguments match `silica_add_rmsnorm_*`.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, rows, hdim))))
        }
    }

    custom_op1!(QkvOp<'_>, "silica-qkv-rope");
    custom_op1!(PagedOp<'_>, "silica-paged-decode");
    custom_op1!(SiluMulOp, "silica-silu-mul");
    custom_op2!(GemvOp, "silica-gemv");
    custom_op2!(AddNormOp<'_>, "silica-add-rmsnorm");
}
