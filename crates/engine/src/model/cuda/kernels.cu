// Silica's fused CUDA kernels for the decoder (FP16 and BF16), compiled to PTX by the engine's
// build script when the `cuda` feature is on and loaded through candle's device. Each replaces
// a run of candle ops that a decode step would otherwise launch one by one:
//   silica_qkv_rope_*      bias + (Qwen3) per-head RMSNorm + RoPE for q and k, and the K/V
//                          cache write, straight from the fused QKV projection's output
//   silica_paged_part_*    attention of one new token per sequence over its cached positions
//   silica_paged_combine_* (slot table + lengths on the device), split over positions, then
//                          the parts combined
//   silica_silu_mul_*      SwiGLU's silu(gate) * up from the fused gate/up projection
//   silica_gemv_*_M        y = x W^T for a few rows (decode), 1-8 warps per output column,
//                          the weight row streamed once with 16-byte loads for all M rows
//   silica_gemv_swiglu_*_M the same over the interleaved gate/up weight, SwiGLU applied to
//                          each (gate, up) pair of outputs
//   silica_gemv_tc_*_M     y = x W^T for 3-8 rows on the tensor cores
//   silica_add_rmsnorm_*   residual add + RMSNorm (the new residual and the normed input)
//   silica_copy_blocks     copy-on-write of KV cache blocks in every layer's pools at once
//   silica_select_*        next-token selection per row of logits (select.cu, included last),
//   silica_argmax_*        with the passes that need no cut split over 64 blocks per row
// All arithmetic is in f32; results are rounded once to the activation type.
//
// Programmatic dependent launch (sm_90+, launched so by fused.rs): every kernel lets the next
// one launch as soon as it starts (`pdl_trigger`) and waits for the previous one to finish, its
// writes visible, before it reads anything a kernel wrote or writes anything (`pdl_wait`). Only
// reads of weights, which no kernel writes, may come before the wait: the GEMV streams its first
// weights while the kernel before it still runs. Without the launch attribute both are no-ops.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Both at a kernel's start: for kernels whose first reads are another kernel's output.
__device__ __forceinline__ void pdl_enter() {
    pdl_trigger();
    pdl_wait();
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum or max; every thread gets the result. blockDim.x is a multiple of 32;
// `red` holds at least 32 floats. Starts with a barrier, so it may be called back to back.
template <bool MAX>
__device__ float block_reduce(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = MAX ? -INFINITY : 0.f;
    for (int i = 0; i < nw; ++i) r = MAX ? fmaxf(r, red[i]) : r + red[i];
    return r;
}

// qkv: [rows, (nh + 2 nkv) hd] (the fused projection, bias not yet added); bias: [(nh + 2 nkv) hd]
// or null; qn, kn: [hd] per-head RMSNorm weights (Qwen3) or null; cos, sin: [max_pos, hd / 2];
// pos, slots: [rows]. Writes q (roped) to q_out [rows, nh, hd] and k (roped), v to the pools
// [num_slots, nkv, hd] at each row's slot. Grid (nh + 2 nkv, rows), block hd threads, dynamic
// shared memory (hd + 32) floats.
template <typename T>
__device__ void qkv_rope(const T* __restrict__ qkv, const T* __restrict__ bias,
                         const T* __restrict__ qn, const T* __restrict__ kn,
                         const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                         const uint32_t* __restrict__ pos, const uint32_t* __restrict__ slots,
                         T* __restrict__ q_out, T* __restrict__ k_pool, T* __restrict__ v_pool,
                         int nh, int nkv, int hd, float eps) {
    pdl_trigger();
    extern __shared__ float sm[];
    float* xs = sm;
    float* red = sm + hd;
    const int head = blockIdx.x, row = blockIdx.y, i = threadIdx.x;
    const int width = (nh + 2 * nkv) * hd;
    const int col = head * hd + i;
    const bool is_q = head < nh, is_v = head >= nh + nkv;
    const T* nw = is_q ? qn : kn;
    const int half = hd / 2, j = i < half ? i : i - half;
    // Weights, tables and the step's inputs (no kernel writes them) before the wait, the
    // projection after it.
    const float bv = bias ? to_f(bias[col]) : 0.f;
    const size_t slot = slots[row];
    const size_t p = pos[row];
    const float c = is_v ? 0.f : to_f(cos_t[p * half + j]);
    const float sn = is_v ? 0.f : to_f(sin_t[p * half + j]);
    const float nwi = (!is_v && nw) ? to_f(nw[i]) : 1.f;
    pdl_wait();
    float x = to_f(qkv[(size_t)row * width + col]);
    if (bias) x += bv;
    if (is_v) {
        v_pool[(slot * nkv + (head - nh - nkv)) * hd + i] = from_f<T>(x);
        return;
    }
    if (nw) {
        const float ss = block_reduce<false>(x * x, red);
        x = x * rsqrtf(ss / hd + eps) * nwi;
    }
    xs[i] = x;
    __syncthreads();
    const float y = i < half ? x * c - xs[i + half] * sn : x * c + xs[j] * sn;
    if (is_q) {
        q_out[((size_t)row * nh + head) * hd + i] = from_f<T>(y);
    } else {
        k_pool[(slot * nkv + (head - nh)) * hd + i] = from_f<T>(y);
    }
}

// Decode attention over the paged cache in two kernels (split over positions, as in
// flash-decoding): one block per (query head, sequence, PD_SPLIT positions) writes its part,
// then one block per (query head, sequence) combines the parts. A part of one head over 200
// positions in one block was bound by its warps' instruction latency (6.8 µs on the H100 with
// 28 blocks busy); split, every head's positions spread over the SMs.
// q: [d, nh, HD]; pools: [num_slots, nkv, HD]; table: [d, max_len] cache slots of each
// sequence's positions; lens: [d] positions to attend (the new token's included, already
// written). Parts: acc [d, nh, splits, HD] (the V rows weighted by exp(score - m)) and ml
// [d, nh, splits, 2] (m, the part's largest score, and l, the sum of its weights; m = -inf for
// a part past the sequence's end, its acc zeros). Scores: PD_LPP lanes per position, each a quarter of the K
// row in 16-byte loads, summed by shuffles. V: each warp takes every PD_WARPS-th position, each
// lane HD / 32 dims of it (one coalesced row per warp and load).
constexpr int PD_SPLIT = 64;                        // positions per block
constexpr int PD_LPP = 4;                           // lanes per position in the score pass
constexpr int PD_THREADS = PD_SPLIT * PD_LPP;
constexpr int PD_WARPS = PD_THREADS / 32;

template <int BYTES> struct VecOf;
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<16> { using type = uint4; };

template <typename T, int HD>
__device__ void paged_part(const T* __restrict__ q, const T* __restrict__ k_pool,
                           const T* __restrict__ v_pool, const uint32_t* __restrict__ table,
                           const uint32_t* __restrict__ lens, float* __restrict__ part_acc,
                           float* __restrict__ part_ml, int nh, int nkv, int max_len, float scale) {
    constexpr int DPL = HD / 32;            // dims per lane in the V pass
    constexpr int KPL = HD / PD_LPP / 8;    // 16-byte K loads per lane in the score pass
    constexpr int VPW = PD_SPLIT / PD_WARPS;  // V rows per warp
    using Vec = typename VecOf<DPL * sizeof(T)>::type;
    __shared__ __align__(16) float qs[HD];
    __shared__ float sc[PD_SPLIT];
    __shared__ uint32_t sl[PD_SPLIT];
    __shared__ float red[32];
    __shared__ float wacc[PD_WARPS][HD];
    pdl_trigger();
    const int h = blockIdx.x, b = blockIdx.y, sp = blockIdx.z, splits = gridDim.z, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int sub = tid % PD_LPP, pslot = tid / PD_LPP;
    const int kvh = h / (nh / nkv);
    const int p0 = sp * PD_SPLIT;
    const size_t part = ((size_t)b * nh + h) * splits + sp;
    // The length and the slots are the step's inputs, which no kernel writes: read before the
    // wait, while the previous kernel (the K/V write of the new position) still runs.
    const int n = min(PD_SPLIT, (int)lens[b] - p0);
    const uint32_t slot = pslot < n ? table[(size_t)b * max_len + p0 + pslot] : 0u;
    if (sub == 0) sl[pslot] = slot;
    pdl_wait();
    if (n <= 0) {  // past the end: an empty part (zeros, so that the combine needs no branch)
        for (int e = tid; e < HD; e += PD_THREADS) part_acc[part * HD + e] = 0.f;
        if (tid == 0) {
            part_ml[2 * part] = -INFINITY;
            part_ml[2 * part + 1] = 0.f;
        }
        return;
    }
    __syncthreads();  // publishes sl
    // q, this thread's quarter K row and its warp's V rows: every load in flight at once.
    const bool on = pslot < n;
    uint4 kw[KPL];
    if (on) {
        const uint4* kp = reinterpret_cast<const uint4*>(k_pool + ((size_t)slot * nkv + kvh) * HD) + sub * KPL;
#pragma unroll
        for (int e = 0; e < KPL; ++e) kw[e] = kp[e];
    }
    Vec v[VPW];
#pragma unroll
    for (int u = 0; u < VPW; ++u) {
        const int j = warp + u * PD_WARPS;
        if (j < n) v[u] = *reinterpret_cast<const Vec*>(v_pool + ((size_t)sl[j] * nkv + kvh) * HD + lane * DPL);
    }
    const T* qp = q + ((size_t)b * nh + h) * HD;
    for (int e = tid; e < HD; e += PD_THREADS) qs[e] = to_f(qp[e]) * scale;
    __syncthreads();  // publishes qs
    float dot = 0.f;
    if (on) {
        const float4* q4 = reinterpret_cast<const float4*>(qs) + sub * KPL * 2;
#pragma unroll
        for (int e = 0; e < KPL; ++e) {
            const T* wv = reinterpret_cast<const T*>(&kw[e]);
            const float4 qa = q4[2 * e], qb = q4[2 * e + 1];
            dot += to_f(wv[0]) * qa.x + to_f(wv[1]) * qa.y + to_f(wv[2]) * qa.z + to_f(wv[3]) * qa.w +
                   to_f(wv[4]) * qb.x + to_f(wv[5]) * qb.y + to_f(wv[6]) * qb.z + to_f(wv[7]) * qb.w;
        }
    }
#pragma unroll
    for (int o = 1; o < PD_LPP; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (on && sub == 0) sc[pslot] = dot;
    // The reductions' barriers publish sc to the whole block.
    const float m = block_reduce<true>(on ? dot : -INFINITY, red);
    float p = 0.f;
    if (tid < n) {
        p = __expf(sc[tid] - m);
        sc[tid] = p;
    }
    const float l = block_reduce<false>(p, red);
    float acc[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = 0.f;
#pragma unroll
    for (int u = 0; u < VPW; ++u) {
        const int j = warp + u * PD_WARPS;
        if (j < n) {
            const float w = sc[j];
            const T* e = reinterpret_cast<const T*>(&v[u]);
#pragma unroll
            for (int d = 0; d < DPL; ++d) acc[d] += w * to_f(e[d]);
        }
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d) wacc[warp][lane * DPL + d] = acc[d];
    __syncthreads();
    for (int e = tid; e < HD; e += PD_THREADS) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < PD_WARPS; ++w) s += wacc[w][e];
        part_acc[part * HD + e] = s;
    }
    if (tid == 0) {
        part_ml[2 * part] = m;
        part_ml[2 * part + 1] = l;
    }
}

// The parts of paged_part into out: [d, nh, HD]. Grid (nh, d), HD threads, dynamic shared
// memory of one float per part. Up to PC_REG parts (contexts up to 1,024 positions), every
// thread loads all parts' (m, l) and its element of each part's acc at once and combines them
// alone: one round trip to L2 and no barrier, where the general path below (more parts) takes
// two reductions and a second round trip. In a decode step the combine is latency: it starts
// when the last part is written and the next GEMV waits for it.
constexpr int PC_REG = 16;

template <typename T>
__device__ void paged_combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                              T* __restrict__ out, int nh, int splits) {
    extern __shared__ float wsh[];
    __shared__ float red[32];
    pdl_enter();
    const int h = blockIdx.x, b = blockIdx.y, e = threadIdx.x, hd = blockDim.x;
    const size_t base = ((size_t)b * nh + h) * splits;
    if (splits <= PC_REG) {  // the same for the whole block
        float m[PC_REG], l[PC_REG], a[PC_REG];
#pragma unroll
        for (int s = 0; s < PC_REG; ++s) {
            m[s] = -INFINITY;
            l[s] = a[s] = 0.f;
            if (s < splits) {
                const float2 ml = reinterpret_cast<const float2*>(part_ml)[base + s];
                m[s] = ml.x;
                l[s] = ml.y;
                a[s] = part_acc[(base + s) * hd + e];
            }
        }
        float mx = -INFINITY;
#pragma unroll
        for (int s = 0; s < PC_REG; ++s) mx = fmaxf(mx, m[s]);
        float lsum = 0.f, acc = 0.f;
#pragma unroll
        for (int s = 0; s < PC_REG; ++s) {
            const float w = m[s] == -INFINITY ? 0.f : __expf(m[s] - mx);  // an empty part weighs 0
            lsum += w * l[s];
            acc += w * a[s];
        }
        out[((size_t)b * nh + h) * hd + e] = from_f<T>(acc / lsum);
        return;
    }
    float mloc = -INFINITY;
    for (int s = e; s < splits; s += hd) mloc = fmaxf(mloc, part_ml[2 * (base + s)]);
    const float mx = block_reduce<true>(mloc, red);
    float lloc = 0.f;
    for (int s = e; s < splits; s += hd) {
        const float m = part_ml[2 * (base + s)];
        const float w = m == -INFINITY ? 0.f : __expf(m - mx);  // an empty part weighs 0
        wsh[s] = w;
        lloc += w * part_ml[2 * (base + s) + 1];
    }
    // The reduction's barriers publish wsh.
    const float l = block_reduce<false>(lloc, red);
    float a = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) a += wsh[s] * part_acc[(base + s) * hd + e];
    out[((size_t)b * nh + h) * hd + e] = from_f<T>(a / l);
}

// gu: [rows, 2 inter] (gate then up, or with `interleaved` gate j and up j side by side);
// out: [rows, inter] = silu(gate) * up.
template <typename T>
__device__ void silu_mul(const T* __restrict__ gu, T* __restrict__ out, size_t n, int inter, int interleaved) {
    pdl_enter();
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t r = idx / inter, i = idx % inter;
        const size_t gi = r * 2 * inter + (interleaved ? 2 * i : i);
        const float g = to_f(gu[gi]);
        const float u = to_f(gu[interleaved ? gi + 1 : gi + inter]);
        out[idx] = from_f<T>(g / (1.f + __expf(-g)) * u);
    }
}

// x: [M, k], w: [n_out, k] (row-major, k % 8 == 0, 16-byte aligned), y: [M, n_out]. Block of
// 256 threads = 8 warps, 8 >> wr_log2 output columns. Each lane takes 8 consecutive weights per 16-byte
// load and keeps GEMV_LOADS loads in flight (predicated at the row's end); weights bypass L1
// (read once) so that x stays there.
constexpr int GEMV_LOADS = 4;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

template <typename T, int M>
__device__ __forceinline__ void gemv_acc(const uint4 wv, const T* __restrict__ x, int k, int i, float* acc) {
    const T* wh = reinterpret_cast<const T*>(&wv);
    float wf[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) wf[j] = to_f(wh[j]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const uint4 xv = reinterpret_cast<const uint4*>(x + (size_t)m * k)[i];
        const T* xh = reinterpret_cast<const T*>(&xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m] += wf[j] * to_f(xh[j]);
    }
}

// WR warps share one output column (split K) when the matrix alone would not give the GPU
// enough warps in flight; their partial sums meet in shared memory. The first GEMV_LOADS weight
// loads of each lane are issued before the wait for the kernel that wrote x.
//
// SWIGLU: w is the gate and up projections with their rows interleaved (gate j at row 2j, up j
// at 2j + 1), a block's columns come in such pairs (8 >> wr_log2 >= 2), and y [M, n_out / 2]
// gets silu(gate) * up, each product rounded to T first as the separate kernels do.
template <typename T, int M, bool SWIGLU>
__device__ void gemv(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int n_out, int k, int wr_log2) {
    __shared__ float part[8][M];
    __shared__ float fin[SWIGLU ? 8 : 1][M];
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = 1 << wr_log2;
    const int seg = warp & (wr - 1);
    const int n = blockIdx.x * (8 >> wr_log2) + (warp >> wr_log2);
    const int kv = k / 8;
    const int stride = 32 * wr;
    // Rows past n_out load nothing (kv_n = 0) and only take part in the barrier below.
    const int kv_n = n < n_out ? kv : 0;
    const uint4* row = reinterpret_cast<const uint4*>(w + (size_t)(n < n_out ? n : 0) * k);
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    uint4 v[GEMV_LOADS];
    int base = seg * 32 + lane;
#pragma unroll
    for (int u = 0; u < GEMV_LOADS; ++u) {
        const int i = base + u * stride;
        v[u] = i < kv_n ? ld_stream(row + i) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
    while (base < kv_n) {
#pragma unroll
        for (int u = 0; u < GEMV_LOADS; ++u) {
            const int i = base + u * stride;
            if (i < kv_n) gemv_acc<T, M>(v[u], x, k, i, acc);
        }
        base += stride * GEMV_LOADS;
        if (base < kv_n) {
#pragma unroll
            for (int u = 0; u < GEMV_LOADS; ++u) {
                const int i = base + u * stride;
                v[u] = i < kv_n ? ld_stream(row + i) : make_uint4(0, 0, 0, 0);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
    if (SWIGLU) {
        const int c = warp >> wr_log2, cpb = 8 >> wr_log2;
        if (wr == 1) {
            if (lane == 0) {
#pragma unroll
                for (int m = 0; m < M; ++m) fin[c][m] = acc[m];
            }
        } else {
            if (lane == 0) {
#pragma unroll
                for (int m = 0; m < M; ++m) part[warp][m] = acc[m];
            }
            __syncthreads();
            if (seg == 0 && lane < M) {
                float s = 0.f;
                for (int g = 0; g < wr; ++g) s += part[warp + g][lane];
                fin[c][lane] = s;
            }
        }
        __syncthreads();
        const int t = threadIdx.x;
        if (t < (cpb / 2) * M) {
            const int p = t / M, m = t % M;
            const int j = blockIdx.x * (cpb / 2) + p;
            if (2 * j < n_out) {
                const float g = to_f(from_f<T>(fin[2 * p][m])), u = to_f(from_f<T>(fin[2 * p + 1][m]));
                y[(size_t)m * (n_out / 2) + j] = from_f<T>(g / (1.f + __expf(-g)) * u);
            }
        }
        return;
    }
    if (wr == 1) {
        if (lane == 0 && n < n_out) {
#pragma unroll
            for (int m = 0; m < M; ++m) y[(size_t)m * n_out + n] = from_f<T>(acc[m]);
        }
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) part[warp][m] = acc[m];
    }
    __syncthreads();
    if (seg == 0 && lane < M && n < n_out) {
        float s = 0.f;
        for (int g = 0; g < wr; ++g) s += part[warp + g][lane];
        y[(size_t)lane * n_out + n] = from_f<T>(s);
    }
}

// y = x W^T for 3-8 rows on the tensor cores (mma m16n8k16, f32 accumulate): the CUDA-core
// GEMV converts and multiplies every weight once per row, so by 4 rows it is bound by
// instructions. x: [M, k], w: [n_out, k] (k % 8 == 0, 16-byte aligned), y: [M, n_out]. A block
// of WARPS warps (the engine launches 8; kernel_bench times more) takes 8 output columns, its
// warps splitting k (sums met in shared memory, in a fixed order). The mma's A is x (rows M..15 zero), B is W^T: lane (g, t) holds column n0 + g's
// and x row g's 16-byte unit i (8 consecutive k) and feeds halves 0-3 to one mma and 4-7 to the
// next; since A and B take the same k positions, the order of k inside the mma does not matter.
// D's lane (g, t) then holds y[g][n0 + 2t], y[g][n0 + 2t + 1]. Loops are uniform across a warp
// (mma.sync needs every lane); loads past the row's end are zeros. With SWIGLU (gate and up
// rows interleaved) y is [M, n_out / 2], silu(gate) * up.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1);
// One specialisation per type: the asm names the operand type (f16 / bf16).
#if __CUDA_ARCH__ >= 800
#define MMA_16816(T, PTX_T)                                                                        \
    template <>                                                                                    \
    __device__ __forceinline__ void mma_16816<T>(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) { \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_T "." PTX_T ".f32 {%0,%1,%2,%3}, "  \
                     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                     \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                              \
                     : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));                      \
    }
#else
// fused.rs launches the tensor-core GEMV only for PTX built for sm_80+.
#define MMA_16816(T, PTX_T)                                                                        \
    template <>                                                                                    \
    __device__ __forceinline__ void mma_16816<T>(float (&)[4], uint32_t, uint32_t, uint32_t, uint32_t) { __trap(); }
#endif
MMA_16816(__half, "f16")
MMA_16816(__nv_bfloat16, "bf16")

template <typename T, int M, int WARPS = 8, bool SWIGLU = false, bool XPRE = true>
__device__ void gemv_tc(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int n_out, int k) {
    __shared__ float part[WARPS][32][2];
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 8, n = n0 + g;
    const int kv = k / 8, kv_n = n < n_out ? kv : 0, kv_x = g < M ? kv : 0;
    const uint4* row = reinterpret_cast<const uint4*>(w + (size_t)(n < n_out ? n : 0) * k);
    const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)(g < M ? g : 0) * k);
    constexpr int STRIDE = WARPS * 4;  // units per warp-iteration of the block: 4 lanes a warp
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    uint4 v[GEMV_LOADS];
    int wb = warp * 4;
#pragma unroll
    for (int u = 0; u < GEMV_LOADS; ++u) {
        const int i = wb + u * STRIDE + t;
        v[u] = i < kv_n ? ld_stream(row + i) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
    // x's units of an iteration: (XPRE, the engine's) loaded with the iteration's weights, one
    // iteration ahead, so that their latency overlaps the weights'; or at the iteration's start
    // (before: H100, kernel_bench, 7B 4 rows: down 54.9 -> 50.1 us, o 12.3 -> 10.8, gate/up
    // 93.7 -> 91.9, qkv 14.0 -> 14.7).
    uint4 xv[GEMV_LOADS];
    auto load_x = [&](int base) {
#pragma unroll
        for (int u = 0; u < GEMV_LOADS; ++u) {
            const int i = base + u * STRIDE + t;
            xv[u] = i < kv_x ? xr[i] : make_uint4(0, 0, 0, 0);
        }
    };
    if (XPRE) load_x(wb);
    for (; wb < kv; wb += STRIDE * GEMV_LOADS) {
        if (!XPRE) load_x(wb);
#pragma unroll
        for (int u = 0; u < GEMV_LOADS; ++u) {
            mma_16816<T>(d, xv[u].x, xv[u].y, v[u].x, v[u].y);
            mma_16816<T>(d, xv[u].z, xv[u].w, v[u].z, v[u].w);
        }
        const int nb = wb + STRIDE * GEMV_LOADS;
#pragma unroll
        for (int u = 0; u < GEMV_LOADS; ++u) {
            const int i = nb + u * STRIDE + t;
            v[u] = i < kv_n ? ld_stream(row + i) : make_uint4(0, 0, 0, 0);
        }
        if (XPRE) load_x(nb);
    }
    part[warp][lane][0] = d[0];
    part[warp][lane][1] = d[1];
    __syncthreads();
    if (warp == 0 && g < M) {
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int q = 0; q < WARPS; ++q) {
            s0 += part[q][lane][0];
            s1 += part[q][lane][1];
        }
        const int c = n0 + 2 * t;
        if (SWIGLU) {
            // Interleaved gate/up rows: columns c, c + 1 are output c / 2's gate and up, each
            // rounded as the product would be, then silu(gate) * up as silica_silu_mul.
            if (c + 1 < n_out) {
                const float gt = to_f(from_f<T>(s0)), up = to_f(from_f<T>(s1));
                y[(size_t)g * (n_out / 2) + c / 2] = from_f<T>(gt / (1.f + __expf(-gt)) * up);
            }
        } else {
            if (c < n_out) y[(size_t)g * n_out + c] = from_f<T>(s0);
            if (c + 1 < n_out) y[(size_t)g * n_out + c + 1] = from_f<T>(s1);
        }
    }
}

// Residual add and RMSNorm in one pass: s_out = x + h (rounded to T, the new residual),
// n_out = rmsnorm(s_out) * w. x, h, s_out, n_out: [rows, hdim]; s_out may be x (each element is
// read before it is written, by the same thread). One block per row.
// Rows of whole, aligned 16-byte units (every Qwen hidden size) take one unit per thread, all
// loads in flight at once and the norm weights read before the wait; others go element-wise
// through shared memory.
template <typename T>
__device__ void add_rmsnorm(const T* x, const T* __restrict__ h, const T* __restrict__ w,
                            T* s_out, T* __restrict__ n_out, int rows, int hdim, float eps) {
    extern __shared__ float sm[];  // hdim + 32 floats: the sum as rounded, then the reduction
    float* red = sm + hdim;
    pdl_trigger();
    const int r = blockIdx.x;
    const T* xr = x + (size_t)r * hdim;
    const T* hr = h + (size_t)r * hdim;
    T* sr = s_out + (size_t)r * hdim;
    T* nr = n_out + (size_t)r * hdim;
    const bool vec = hdim % 8 == 0 && hdim / 8 <= (int)blockDim.x &&
                     (((uintptr_t)xr | (uintptr_t)hr | (uintptr_t)w | (uintptr_t)sr | (uintptr_t)nr) & 15) == 0;
    if (vec) {
        const int u = threadIdx.x;
        const bool on = u < hdim / 8;
        const uint4 wv = on ? reinterpret_cast<const uint4*>(w)[u] : make_uint4(0, 0, 0, 0);
        pdl_wait();
        float f[8];
        float ss = 0.f;
        if (on) {
            const uint4 xv = reinterpret_cast<const uint4*>(xr)[u];
            const uint4 hv = reinterpret_cast<const uint4*>(hr)[u];
            const T* x8 = reinterpret_cast<const T*>(&xv);
            const T* h8 = reinterpret_cast<const T*>(&hv);
            uint4 sv;
            T* s8 = reinterpret_cast<T*>(&sv);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                s8[j] = from_f<T>(to_f(x8[j]) + to_f(h8[j]));
                f[j] = to_f(s8[j]);
                ss += f[j] * f[j];
            }
            reinterpret_cast<uint4*>(sr)[u] = sv;
        }
        const float inv = rsqrtf(block_reduce<false>(ss, red) / hdim + eps);
        if (on) {
            const T* w8 = reinterpret_cast<const T*>(&wv);
            uint4 nv;
            T* n8 = reinterpret_cast<T*>(&nv);
#pragma unroll
            for (int j = 0; j < 8; ++j) n8[j] = from_f<T>(f[j] * inv * to_f(w8[j]));
            reinterpret_cast<uint4*>(nr)[u] = nv;
        }
        return;
    }
    pdl_wait();
    float ss = 0.f;
    for (int i = threadIdx.x; i < hdim; i += blockDim.x) {
        const T s = from_f<T>(to_f(xr[i]) + to_f(hr[i]));
        sr[i] = s;
        const float f = to_f(s);
        sm[i] = f;
        ss += f * f;
    }
    const float inv = rsqrtf(block_reduce<false>(ss, red) / hdim + eps);
    for (int i = threadIdx.x; i < hdim; i += blockDim.x) nr[i] = from_f<T>(sm[i] * inv * to_f(w[i]));
}

#define ADD_RMSNORM(T, SUFFIX)                                                                 \
    extern "C" __global__ void silica_add_rmsnorm_##SUFFIX(const T* x, const T* h, const T* w, \
                                                           T* s_out, T* n_out, int rows, int hdim, \
                                                           float eps) {                            \
        add_rmsnorm<T>(x, h, w, s_out, n_out, rows, hdim, eps);                                \
    }
ADD_RMSNORM(__half, f16)
ADD_RMSNORM(__nv_bfloat16, bf16)

#define GEMV(T, SUFFIX, M)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        silica_gemv_##SUFFIX##_##M(const T* x, const T* w, T* y, int n_out, int k, int wr_log2) { \
        gemv<T, M, false>(x, w, y, n_out, k, wr_log2);                                          \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        silica_gemv_swiglu_##SUFFIX##_##M(const T* x, const T* w, T* y, int n_out, int k,       \
                                          int wr_log2) {                                        \
        gemv<T, M, true>(x, w, y, n_out, k, wr_log2);                                           \
    }
#define GEMV_TC(T, SUFFIX, M)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        silica_gemv_tc_##SUFFIX##_##M(const T* x, const T* w, T* y, int n_out, int k) {         \
        gemv_tc<T, M>(x, w, y, n_out, k);                                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        silica_gemv_tc_swiglu_##SUFFIX##_##M(const T* x, const T* w, T* y, int n_out, int k) {  \
        gemv_tc<T, M, 8, true>(x, w, y, n_out, k);                                              \
    }
GEMV_TC(__half, f16, 1) GEMV_TC(__half, f16, 2) GEMV_TC(__half, f16, 3) GEMV_TC(__half, f16, 4)
GEMV_TC(__half, f16, 5) GEMV_TC(__half, f16, 6) GEMV_TC(__half, f16, 7) GEMV_TC(__half, f16, 8)
GEMV_TC(__nv_bfloat16, bf16, 1) GEMV_TC(__nv_bfloat16, bf16, 2) GEMV_TC(__nv_bfloat16, bf16, 3)
GEMV_TC(__nv_bfloat16, bf16, 4) GEMV_TC(__nv_bfloat16, bf16, 5) GEMV_TC(__nv_bfloat16, bf16, 6)
GEMV_TC(__nv_bfloat16, bf16, 7) GEMV_TC(__nv_bfloat16, bf16, 8)
#define GEMV_ALL(T, SUFFIX) \
    GEMV(T, SUFFIX, 1) GEMV(T, SUFFIX, 2) GEMV(T, SUFFIX, 3) GEMV(T, SUFFIX, 4) \
    GEMV(T, SUFFIX, 5) GEMV(T, SUFFIX, 6) GEMV(T, SUFFIX, 7) GEMV(T, SUFFIX, 8)
GEMV_ALL(__half, f16)
GEMV_ALL(__nv_bfloat16, bf16)

#define QKV_ROPE(T, SUFFIX)                                                                   \
    extern "C" __global__ void silica_qkv_rope_##SUFFIX(                                      \
        const T* qkv, const T* bias, const T* qn, const T* kn, const T* cos_t, const T* sin_t, \
        const uint32_t* pos, const uint32_t* slots, T* q_out, T* k_pool, T* v_pool, int nh,   \
        int nkv, int hd, float eps) {                                                         \
        qkv_rope<T>(qkv, bias, qn, kn, cos_t, sin_t, pos, slots, q_out, k_pool, v_pool, nh,   \
                    nkv, hd, eps);                                                            \
    }

#define PAGED_PART(T, SUFFIX, HD)                                                               \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                    \
        silica_paged_part_##SUFFIX##_##HD(const T* q, const T* k_pool, const T* v_pool,         \
                                          const uint32_t* table, const uint32_t* lens,          \
                                          float* part_acc, float* part_ml, int nh, int nkv,     \
                                          int max_len, float scale) {                           \
        paged_part<T, HD>(q, k_pool, v_pool, table, lens, part_acc, part_ml, nh, nkv, max_len, scale); \
    }
#define PAGED_COMBINE(T, SUFFIX)                                                                \
    extern "C" __global__ void silica_paged_combine_##SUFFIX(const float* part_acc,             \
                                                             const float* part_ml, T* out,      \
                                                             int nh, int splits) {              \
        paged_combine<T>(part_acc, part_ml, out, nh, splits);                                   \
    }

#define SILU_MUL(T, SUFFIX)                                                                    \
    extern "C" __global__ void silica_silu_mul_##SUFFIX(const T* gu, T* out, size_t n,         \
                                                        int inter, int interleaved) {          \
        silu_mul<T>(gu, out, n, inter, interleaved);                                           \
    }

QKV_ROPE(__half, f16)
QKV_ROPE(__nv_bfloat16, bf16)
PAGED_PART(__half, f16, 64)
PAGED_PART(__half, f16, 128)
PAGED_PART(__half, f16, 256)
PAGED_PART(__nv_bfloat16, bf16, 64)
PAGED_PART(__nv_bfloat16, bf16, 128)
PAGED_PART(__nv_bfloat16, bf16, 256)
PAGED_COMBINE(__half, f16)
PAGED_COMBINE(__nv_bfloat16, bf16)
SILU_MUL(__half, f16)
SILU_MUL(__nv_bfloat16, bf16)
// Copy-on-write of whole KV cache blocks in every pool at once: pools = the pools' addresses,
// pairs = (src, dst) block ids; grid (pairs, pools), `units` 16-byte units per block.
extern "C" __global__ void silica_copy_blocks(const unsigned long long* pools, const uint32_t* pairs, uint64_t units) {
    pdl_enter();
    uint4* base = reinterpret_cast<uint4*>(pools[blockIdx.y]);
    const uint4* src = base + pairs[2 * blockIdx.x] * units;
    uint4* dst = base + pairs[2 * blockIdx.x + 1] * units;
    for (uint64_t i = threadIdx.x; i < units; i += blockDim.x) dst[i] = src[i];
}

#include "select.cu"
