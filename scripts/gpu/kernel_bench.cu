// Times Silica's decode kernels (crates/engine/src/model/cuda/kernels.cu, included as is) on
// the GPU machine, outside the engine: each GEMV shape of Qwen2.5-7B / 3B alone, and a whole
// single-row decode step (every layer's nine kernels plus the output head, distinct weights
// per layer, captured in one CUDA graph) with and without programmatic dependent launch.
// Build and run there:  nvcc -O3 -arch=sm_90a -o /tmp/kb scripts/gpu/kernel_bench.cu && /tmp/kb
#include "../../crates/engine/src/model/cuda/kernels.cu"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <cstring>
#include <cuda_runtime.h>

// A GEMV variant for the sweep: Silica's kernel with the loads per lane, the block size and
// double-buffered loads as parameters.
template <int LOADS, bool PIPE>
__global__ void gemv_var(const __half* __restrict__ x, const __half* __restrict__ w, __half* __restrict__ y,
                         int n_out, int k, int wr_log2) {
    __shared__ float part[32];
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int wr = 1 << wr_log2;
    const int seg = warp & (wr - 1);
    const int n = blockIdx.x * (nwarps >> wr_log2) + (warp >> wr_log2);
    const int kv = k / 8, stride = 32 * wr;
    const int kv_n = n < n_out ? kv : 0;
    const uint4* row = reinterpret_cast<const uint4*>(w + (size_t)(n < n_out ? n : 0) * k);
    float acc[1] = {0.f};
    uint4 v[LOADS], nx[PIPE ? LOADS : 1];
    int base = seg * 32 + lane;
#pragma unroll
    for (int u = 0; u < LOADS; ++u) { const int i = base + u * stride; v[u] = i < kv_n ? ld_stream(row + i) : make_uint4(0, 0, 0, 0); }
    pdl_wait();
    while (base < kv_n) {
        const int nb = base + stride * LOADS;
        if (PIPE) {
#pragma unroll
            for (int u = 0; u < LOADS; ++u) { const int i = nb + u * stride; nx[PIPE ? u : 0] = i < kv_n ? ld_stream(row + i) : make_uint4(0, 0, 0, 0); }
        }
#pragma unroll
        for (int u = 0; u < LOADS; ++u) { const int i = base + u * stride; if (i < kv_n) gemv_acc<__half, 1>(v[u], x, k, i, acc); }
        base = nb;
        if (PIPE) {
#pragma unroll
            for (int u = 0; u < LOADS; ++u) v[u] = nx[PIPE ? u : 0];
        } else if (base < kv_n) {
#pragma unroll
            for (int u = 0; u < LOADS; ++u) { const int i = base + u * stride; v[u] = i < kv_n ? ld_stream(row + i) : make_uint4(0, 0, 0, 0); }
        }
    }
    acc[0] = warp_sum(acc[0]);
    if (wr == 1) { if (lane == 0 && n < n_out) y[n] = __float2half(acc[0]); return; }
    if (lane == 0) part[warp] = acc[0];
    __syncthreads();
    if (seg == 0 && lane == 0 && n < n_out) {
        float s = 0.f;
        for (int g = 0; g < wr; ++g) s += part[warp + g];
        y[n] = __float2half(s);
    }
}

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

__global__ void fill(__half* p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
        p[i] = __float2half(((h & 0xffff) / 65536.f - 0.5f) * 0.05f);
    }
}

static bool g_pdl = true;
static bool g_alloc = false;  // a stream-ordered allocation before and a free after each kernel, as candle's ops make
static void* g_pending = nullptr;
static cudaStream_t g_s;

template <typename... A>
static void go(void (*k)(A...), dim3 grid, dim3 block, size_t smem, A... args) {
    cudaLaunchConfig_t c = {};
    c.gridDim = grid; c.blockDim = block; c.dynamicSmemBytes = smem; c.stream = g_s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    c.attrs = at; c.numAttrs = g_pdl ? 1 : 0;
    void* mine = nullptr;
    if (g_alloc) CK(cudaMallocAsync(&mine, 4096, g_s));
    CK(cudaLaunchKernelEx(&c, k, args...));
    if (g_alloc) {
        if (g_pending) CK(cudaFreeAsync(g_pending, g_s));
        g_pending = mine;
    }
}

static __half* alloc_h(size_t n, uint32_t seed) {
    __half* p; CK(cudaMalloc(&p, n * 2));
    fill<<<1024, 256>>>(p, n, seed);
    return p;
}

// The split rule of fused.rs's GemvOp.
static int wr_for(int n, int k) {
    (void)n;
    int wr = 3;
    while (wr > 0 && k / 8 < (56 << wr)) --wr;
    return wr;
}

static void gemv1(const __half* x, const __half* w, __half* y, int n, int k) {
    int wr = wr_for(n, k);
    go(silica_gemv_f16_1, dim3((n + (8 >> wr) - 1) / (8 >> wr)), dim3(256), 0, x, w, y, n, k, wr);
}

// The gate/up product with SwiGLU in its epilogue (interleaved weight; at most 4 warps per
// column, so that a block holds whole pairs: fused.rs's rule); y gets n / 2 values.
static void gemv1_swiglu(const __half* x, const __half* w, __half* y, int n, int k) {
    int wr = wr_for(n, k);
    if (wr > 2) wr = 2;
    go(silica_gemv_swiglu_f16_1, dim3((n + (8 >> wr) - 1) / (8 >> wr)), dim3(256), 0, x, w, y, n, k, wr);
}

// Step variant: the gate/up product with SwiGLU fused instead of a separate silu_mul.
static bool g_swiglu = false;


// Step variants that leave kernels out (wrong results; upper bounds of what fusing them away
// could save): the two add+RMSNorm kernels of a layer, its qkv_rope.
static bool g_no_norm = false, g_no_rope = false;

// Step variants of the decode attention: `g_fused_attn` replaces paged_part + paged_combine by
// paged_fused (one kernel, below; `g_fused32` its 32-positions-per-block instance),
// `g_no_combine` leaves the combine out (wrong results: the upper bound of what removing the
// second launch could save).
static bool g_fused_attn = false, g_fused32 = false, g_no_combine = false;

// Prototype: paged_part and paged_combine in one kernel. Every block computes its part exactly
// as paged_part does (its body, with SPLIT positions per block) and writes it to part_acc /
// part_ml; then, after a barrier, thread 0 counts the block in the (head, sequence)'s counter
// with one gpu-scope acq_rel atomic add (SASS: MEMBAR.ALL.GPU, ATOMG, CCTL.IVALL; the same
// ordering as __threadfence + atomicAdd + __threadfence, measured 0.4 us a layer faster). Its
// release half is cumulative, so it publishes the whole block's part writes, which the barrier
// ordered before it. The block that brings the count to `splits` (the last of its head; the
// order is arbitrary) has, through the acquire half and the next barrier, every other part
// visible to all its threads; it resets the counter to 0 for the next launch (no other block
// of this launch touches it any more, and the next launch's blocks reach it only after their
// pdl_wait, so after this grid has completed) and combines the parts exactly as paged_combine
// does (same arithmetic in the same order: bitwise the same output). The combine's loads go
// through L2 (__ldcg: other SMs wrote the parts during this kernel); the first PRE parts' acc
// are loaded together with the m, l values, so that the combine waits on L2 once, not twice
// (measured 1 us a layer). No block waits on another, so any grid size works. counters: [d,
// nh], zero before the first launch. Grid (nh, d, splits) with splits <= MAXS, SPLIT * PD_LPP
// threads.
template <typename T, int HD, int SPLIT, int MAXS, int PRE>
__device__ void paged_fused(const T* __restrict__ q, const T* __restrict__ k_pool,
                            const T* __restrict__ v_pool, const uint32_t* __restrict__ table,
                            const uint32_t* __restrict__ lens, float* part_acc, float* part_ml,
                            uint32_t* counters, T* __restrict__ out, int nh, int nkv, int max_len,
                            float scale) {
    constexpr int THREADS = SPLIT * PD_LPP;
    constexpr int WARPS = THREADS / 32;
    constexpr int DPL = HD / 32;            // dims per lane in the V pass
    constexpr int KPL = HD / PD_LPP / 8;    // 16-byte K loads per lane in the score pass
    constexpr int VPW = SPLIT / WARPS;      // V rows per warp
    static_assert(THREADS >= HD && THREADS % 32 == 0, "the combine needs HD threads");
    using Vec = typename VecOf<DPL * sizeof(T)>::type;
    __shared__ __align__(16) float qs[HD];
    __shared__ float sc[SPLIT];
    __shared__ uint32_t sl[SPLIT];
    __shared__ float red[32];
    __shared__ float wacc[WARPS][HD];
    __shared__ float wsh[MAXS];
    __shared__ int last;
    pdl_trigger();
    const int h = blockIdx.x, b = blockIdx.y, sp = blockIdx.z, splits = gridDim.z, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int sub = tid % PD_LPP, pslot = tid / PD_LPP;
    const int kvh = h / (nh / nkv);
    const int p0 = sp * SPLIT;
    const size_t part = ((size_t)b * nh + h) * splits + sp;
    const int n = min(SPLIT, (int)lens[b] - p0);
    const uint32_t slot = pslot < n ? table[(size_t)b * max_len + p0 + pslot] : 0u;
    if (sub == 0) sl[pslot] = slot;
    pdl_wait();
    if (n <= 0) {  // past the end: an empty part, which still counts below
        for (int e = tid; e < HD; e += THREADS) part_acc[part * HD + e] = 0.f;
        if (tid == 0) {
            part_ml[2 * part] = -INFINITY;
            part_ml[2 * part + 1] = 0.f;
        }
    } else {
        __syncthreads();  // publishes sl
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
            const int j = warp + u * WARPS;
            if (j < n) v[u] = *reinterpret_cast<const Vec*>(v_pool + ((size_t)sl[j] * nkv + kvh) * HD + lane * DPL);
        }
        const T* qp = q + ((size_t)b * nh + h) * HD;
        for (int e = tid; e < HD; e += THREADS) qs[e] = to_f(qp[e]) * scale;
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
            const int j = warp + u * WARPS;
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
        for (int e = tid; e < HD; e += THREADS) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) s += wacc[w][e];
            part_acc[part * HD + e] = s;
        }
        if (tid == 0) {
            part_ml[2 * part] = m;
            part_ml[2 * part + 1] = l;
        }
    }
    // Count this part in; the last block of the (head, sequence) goes on to the combine.
    __syncthreads();  // orders every thread's part writes before thread 0's atomic
    uint32_t* cnt = counters + (size_t)b * nh + h;
    if (tid == 0) {
        uint32_t old;  // release: this block's part; acquire: the parts counted in before
        asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(old) : "l"(cnt) : "memory");
        const bool is_last = old == (uint32_t)(splits - 1);
        if (is_last) *cnt = 0u;  // for the next launch
        last = is_last;
    }
    __syncthreads();  // publishes `last`, and orders the acquire before the other threads' loads
    if (!last) return;  // uniform over the block
    // paged_combine with threads >= HD idle (they take part in the reductions with the
    // identities: the sums gain + 0.f terms only, so they are bitwise the same).
    const size_t base = ((size_t)b * nh + h) * splits;
    const int e = tid;
    float pa[PRE];
    if (e < HD) {
#pragma unroll
        for (int s = 0; s < PRE; ++s) pa[s] = s < splits ? __ldcg(part_acc + (base + s) * HD + e) : 0.f;
    }
    float mloc = -INFINITY;
    if (e < HD)
        for (int s = e; s < splits; s += HD) mloc = fmaxf(mloc, __ldcg(part_ml + 2 * (base + s)));
    const float mx = block_reduce<true>(mloc, red);
    float lloc = 0.f;
    if (e < HD)
        for (int s = e; s < splits; s += HD) {
            const float m = __ldcg(part_ml + 2 * (base + s));
            const float w = m == -INFINITY ? 0.f : __expf(m - mx);
            wsh[s] = w;
            lloc += w * __ldcg(part_ml + 2 * (base + s) + 1);
        }
    const float l = block_reduce<false>(lloc, red);
    if (e < HD) {
        float a = 0.f;
#pragma unroll
        for (int s = 0; s < PRE; ++s)
            if (s < splits) a += wsh[s] * pa[s];
#pragma unroll 8
        for (int s = PRE; s < splits; ++s) a += wsh[s] * __ldcg(part_acc + (base + s) * HD + e);
        out[((size_t)b * nh + h) * HD + e] = from_f<T>(a / l);
    }
}

// Largest split count per launch (contexts up to 4096 with 64 positions per block, 2048 with
// 32); the host falls back to the two kernels above it.
constexpr int PF_MAX_SPLITS = 64;
__global__ void __launch_bounds__(64 * PD_LPP)
    paged_fused_f16_128(const __half* q, const __half* k_pool, const __half* v_pool, const uint32_t* table,
                        const uint32_t* lens, float* part_acc, float* part_ml, uint32_t* counters, __half* out,
                        int nh, int nkv, int max_len, float scale) {
    paged_fused<__half, 128, 64, PF_MAX_SPLITS, 16>(q, k_pool, v_pool, table, lens, part_acc, part_ml, counters, out, nh,
                                                nkv, max_len, scale);
}
__global__ void __launch_bounds__(32 * PD_LPP)
    paged_fused32_f16_128(const __half* q, const __half* k_pool, const __half* v_pool, const uint32_t* table,
                          const uint32_t* lens, float* part_acc, float* part_ml, uint32_t* counters, __half* out,
                          int nh, int nkv, int max_len, float scale) {
    paged_fused<__half, 128, 32, PF_MAX_SPLITS, 16>(q, k_pool, v_pool, table, lens, part_acc, part_ml, counters, out, nh,
                                                nkv, max_len, scale);
}

// Decode attention of one row (d = 1) at context `ctx` into `out`: the engine's two kernels
// (fused = 0, or fused = 0 with no_combine: the part only), paged_fused (1) or its
// 32-position variant (2), each falling back to the two kernels past PF_MAX_SPLITS splits.
// part_acc / part_ml hold [nh, ceil(ctx / 32)] parts.
// The engine's combine before the one-round-trip path (commit ed8a58c), for A/B in the step:
// block reductions of m and l, then the sum over the parts.
__global__ void combine_old_f16(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                __half* __restrict__ out, int nh, int splits) {
    extern __shared__ float wsh[];
    __shared__ float red[32];
    pdl_enter();
    const int h = blockIdx.x, b = blockIdx.y, e = threadIdx.x, hd = blockDim.x;
    const size_t base = ((size_t)b * nh + h) * splits;
    float mloc = -INFINITY;
    for (int s = e; s < splits; s += hd) mloc = fmaxf(mloc, part_ml[2 * (base + s)]);
    const float mx = block_reduce<true>(mloc, red);
    float lloc = 0.f;
    for (int s = e; s < splits; s += hd) {
        const float m = part_ml[2 * (base + s)];
        const float w = m == -INFINITY ? 0.f : __expf(m - mx);
        wsh[s] = w;
        lloc += w * part_ml[2 * (base + s) + 1];
    }
    const float l = block_reduce<false>(lloc, red);
    float a = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) a += wsh[s] * part_acc[(base + s) * hd + e];
    out[((size_t)b * nh + h) * hd + e] = __float2half(a / l);
}
static bool g_old_combine = false;

static void attention(int fused, bool no_combine, const __half* q, const __half* kp, const __half* vp,
                      const uint32_t* table, const uint32_t* lens, float* pacc, float* pml, uint32_t* counters,
                      __half* out, int nh, int nkv, int ctx, int max_len, float scale) {
    const int split = fused == 2 ? 32 : PD_SPLIT;
    const int splits = (ctx + split - 1) / split;
    if (fused && splits <= PF_MAX_SPLITS) {
        go(fused == 2 ? paged_fused32_f16_128 : paged_fused_f16_128, dim3(nh, 1, splits), dim3(split * PD_LPP), 0, q, kp, vp,
           table, lens, pacc, pml, counters, out, nh, nkv, max_len, scale);
        return;
    }
    const int s64 = (ctx + PD_SPLIT - 1) / PD_SPLIT;
    go(silica_paged_part_f16_128, dim3(nh, 1, s64), dim3(PD_THREADS), 0, q, kp, vp, table, lens, pacc, pml, nh, nkv,
       max_len, scale);
    if (!no_combine)
        go(g_old_combine ? combine_old_f16 : silica_paged_combine_f16, dim3(nh, 1), dim3(128), (size_t)s64 * 4, (const float*)pacc, (const float*)pml, out,
           nh, s64);
}

struct Cfg { const char* name; int hidden, inter, layers, nh, nkv, vocab; };

template <typename F>
static float time_graph(F body, int reps) {
    cudaGraph_t g; cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(g_s, cudaStreamCaptureModeGlobal));
    body();
    CK(cudaStreamEndCapture(g_s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, g_s));
    cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    CK(cudaEventRecord(a, g_s));
    for (int i = 0; i < reps; ++i) CK(cudaGraphLaunch(ge, g_s));
    CK(cudaEventRecord(b, g_s));
    CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b));
    CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
    return ms / reps;
}

struct Var { const char* name; void (*k)(const __half*, const __half*, __half*, int, int, int); };

// Every variant × block size × split for the 7B / 3B shapes; prints the best per shape.
static void sweep() {
    Var vars[] = {{"L4", gemv_var<4, false>}, {"L8", gemv_var<8, false>}, {"L16", gemv_var<16, false>},
                  {"L4p", gemv_var<4, true>}, {"L8p", gemv_var<8, true>}};
    for (auto& v : vars) {
        cudaFuncAttributes a; CK(cudaFuncGetAttributes(&a, v.k));
        printf("variant %s: %d registers\n", v.name, a.numRegs);
    }
    struct S { const char* n; int rows, k; } shapes[] = {
        {"7b qkv", 4608, 3584}, {"7b o", 3584, 3584}, {"7b gate/up", 37888, 3584}, {"7b down", 3584, 18944},
        {"3b qkv", 2560, 2048}, {"3b o", 2048, 2048}, {"3b gate/up", 22016, 2048}, {"3b down", 2048, 11008}};
    const int L = 32;
    for (auto& sh : shapes) {
        std::vector<__half*> w(L);
        for (int l = 0; l < L; ++l) w[l] = alloc_h((size_t)sh.rows * sh.k, 100 + l);
        __half* x = alloc_h(sh.k, 7); __half* y; CK(cudaMalloc(&y, sh.rows * 2));
        CK(cudaDeviceSynchronize());
        const double bytes = 2.0 * sh.rows * sh.k;
        float best = 1e9; char bestd[96] = "";
        printf("%-11s", sh.n);
        for (auto& v : vars) for (int threads : {128, 256, 512}) for (int wr = 0; wr <= 4; ++wr) {
            const int cols = (threads / 32) >> wr;
            if (cols < 1 || (sh.k / 8) / (32 << wr) < 1) continue;
            float ms = time_graph([&]() { for (int l = 0; l < L; ++l) go(v.k, dim3((sh.rows + cols - 1) / cols), dim3(threads), 0, (const __half*)x, (const __half*)w[l], y, sh.rows, sh.k, wr); }, 10);
            float us = ms * 1000 / L;
            if (threads == 256 && (v.k == vars[0].k || v.k == vars[1].k)) printf(" %s/wr%d %.2f", v.name, 1 << wr, us);
            if (us < best) { best = us; snprintf(bestd, sizeof bestd, "%s threads %d wr %d", v.name, threads, 1 << wr); }
        }
        printf("\n%-11s best %6.2f us (%4.0f GB/s): %s\n", sh.n, best, bytes / best / 1e3, bestd);
        for (auto p : w) CK(cudaFree(p));
        CK(cudaFree(x)); CK(cudaFree(y));
    }
}

int main(int argc, char** argv) {
    CK(cudaStreamCreateWithFlags(&g_s, cudaStreamNonBlocking));
    const int ctx = argc > 1 ? atoi(argv[1]) : 200;
    if (argc > 2 && std::string(argv[2]) == "sweep") { sweep(); return 0; }
    Cfg cfgs[] = {{"qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064}, {"qwen2.5-3b", 2048, 11008, 36, 16, 2, 151936}};
    for (const Cfg& c : cfgs) {
        const int H = c.hidden, I = c.inter, L = c.layers, hd = 128, nh = c.nh, nkv = c.nkv;
        const int qkvw = (nh + 2 * nkv) * hd;
        std::vector<__half*> wqkv(L), wo(L), wgu(L), wd(L), n1(L), n2(L), bias(L);
        double bytes = 0;
        for (int l = 0; l < L; ++l) {
            wqkv[l] = alloc_h((size_t)qkvw * H, 1 + l * 8); wo[l] = alloc_h((size_t)H * H, 2 + l * 8);
            wgu[l] = alloc_h((size_t)2 * I * H, 3 + l * 8); wd[l] = alloc_h((size_t)H * I, 4 + l * 8);
            n1[l] = alloc_h(H, 5 + l * 8); n2[l] = alloc_h(H, 6 + l * 8); bias[l] = alloc_h(qkvw, 7 + l * 8);
            bytes += 2.0 * ((double)qkvw * H + (double)H * H + 2.0 * I * H + (double)H * I);
        }
        __half* head = alloc_h((size_t)c.vocab * H, 999);
        bytes += 2.0 * c.vocab * H;
        const int slots = 4096;
        __half* cosT = alloc_h((size_t)32768 * hd / 2, 11); __half* sinT = alloc_h((size_t)32768 * hd / 2, 12);
        std::vector<__half*> kp(L), vp(L);
        for (int l = 0; l < L; ++l) { kp[l] = alloc_h((size_t)slots * nkv * hd, 20 + l); vp[l] = alloc_h((size_t)slots * nkv * hd, 60 + l); }
        uint32_t *pos, *slot, *table, *lens;
        const int splits = (ctx + PD_SPLIT - 1) / PD_SPLIT;
        // KB_CAP: the step's two-kernel attention over a slot table of this many positions (as
        // the engine's graphs, whose capacity is a power of two >= the context: parts past the
        // length are empty).
        const int cap = std::max(ctx, getenv("KB_CAP") ? atoi(getenv("KB_CAP")) : ctx);
        const int csplits = (cap + PD_SPLIT - 1) / PD_SPLIT;
        float *pacc, *pml;
        CK(cudaMalloc(&pacc, (size_t)nh * csplits * hd * 4)); CK(cudaMalloc(&pml, (size_t)nh * csplits * 2 * 4));
        // paged_fused's parts (up to 32 positions each) and its per-head counters, zeroed once.
        const int splits32 = (ctx + 31) / 32;
        float *paccf, *pmlf; uint32_t* cnt;
        CK(cudaMalloc(&paccf, (size_t)nh * splits32 * hd * 4)); CK(cudaMalloc(&pmlf, (size_t)nh * splits32 * 2 * 4));
        CK(cudaMalloc(&cnt, (size_t)nh * 4)); CK(cudaMemset(cnt, 0, (size_t)nh * 4));
        CK(cudaMalloc(&pos, 4)); CK(cudaMalloc(&slot, 4)); CK(cudaMalloc(&table, 4 * ctx)); CK(cudaMalloc(&lens, 4));
        std::vector<uint32_t> tb(ctx); for (int i = 0; i < ctx; ++i) tb[i] = i;
        uint32_t p0 = ctx - 1, l0 = ctx;
        CK(cudaMemcpy(pos, &p0, 4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(slot, &p0, 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(lens, &l0, 4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(table, tb.data(), 4 * ctx, cudaMemcpyHostToDevice));
        __half* resid = alloc_h(H, 30); __half* normed = alloc_h(H, 31);
        __half *qkv, *q, *att, *h, *an, *gu, *act, *logits;
        CK(cudaMalloc(&qkv, qkvw * 2)); CK(cudaMalloc(&q, nh * hd * 2)); CK(cudaMalloc(&att, nh * hd * 2));
        CK(cudaMalloc(&h, H * 2)); CK(cudaMalloc(&an, 2 * H * 2)); CK(cudaMalloc(&gu, 2 * I * 2)); CK(cudaMalloc(&act, I * 2));
        CK(cudaMalloc(&logits, (size_t)c.vocab * 2));
        CK(cudaDeviceSynchronize());
        const float scale = 1.f / sqrtf((float)hd), eps = 1e-6f;
        const int norm_threads = std::min(1024, ((H + 7) / 8 + 31) / 32 * 32);  // fused.rs AddNormOp
        auto layer = [&](int l, const __half* x_res, const __half* x_norm) {
            gemv1(x_norm, wqkv[l], qkv, qkvw, H);
            if (!g_no_rope)
            go(silica_qkv_rope_f16, dim3(nh + 2 * nkv, 1), dim3(hd), (size_t)(hd + 32) * 4, (const __half*)qkv,
               (const __half*)bias[l], (const __half*)nullptr, (const __half*)nullptr, (const __half*)cosT, (const __half*)sinT,
               (const uint32_t*)pos, (const uint32_t*)slot, q, kp[l], vp[l], nh, nkv, hd, eps);
            if (g_fused_attn || g_no_combine) {
                attention(g_fused_attn ? (g_fused32 ? 2 : 1) : 0, g_no_combine, q, kp[l], vp[l], table, lens,
                          g_fused_attn ? paccf : pacc, g_fused_attn ? pmlf : pml, cnt, att, nh, nkv, ctx, ctx, scale);
            } else {
            go(silica_paged_part_f16_128, dim3(nh, 1, csplits), dim3(PD_THREADS), 0, (const __half*)q, (const __half*)kp[l],
               (const __half*)vp[l], (const uint32_t*)table, (const uint32_t*)lens, pacc, pml, nh, nkv, cap, scale);
            go(g_old_combine ? combine_old_f16 : silica_paged_combine_f16, dim3(nh, 1), dim3(hd), (size_t)csplits * 4, (const float*)pacc,
               (const float*)pml, att, nh, csplits);
            }
            gemv1(att, wo[l], h, H, H);
            if (!g_no_norm)
            go(silica_add_rmsnorm_f16, dim3(1), dim3(norm_threads), (size_t)(H + 32) * 4, x_res, (const __half*)h, (const __half*)n1[l], an, an + H, 1, H, eps);
            if (g_swiglu) {
                gemv1_swiglu(an + H, wgu[l], act, 2 * I, H);
            } else {
                gemv1(an + H, wgu[l], gu, 2 * I, H);
                go(silica_silu_mul_f16, dim3((I + 1023) / 1024), dim3(1024), 0, (const __half*)gu, act, (size_t)I, I, 0);
            }
            gemv1(act, wd[l], h, H, I);
            if (!g_no_norm)
            go(silica_add_rmsnorm_f16, dim3(1), dim3(norm_threads), (size_t)(H + 32) * 4, (const __half*)an, (const __half*)h, (const __half*)n2[l], resid, normed, 1, H, eps);
        };
        auto step = [&]() {
            for (int l = 0; l < L; ++l) layer(l, resid, normed);
            gemv1(normed, head, logits, c.vocab, H);
        };
        if (argc > 2) {  // "ncu": one eager layer, for the profiler
            layer(0, resid, normed);
            CK(cudaDeviceSynchronize());
            return 0;
        }
        printf("== %s, context %d (slot table %d), %.2f GB of weights per step\n", c.name, ctx, cap, bytes / 1e9);
        {  // paged_fused against the engine's two kernels: q and layer 0's pools (the bench's random data)
            std::vector<int> cx = {300, 64, 1000};
            if (std::find(cx.begin(), cx.end(), ctx) == cx.end()) cx.push_back(ctx);
            const int cmax = *std::max_element(cx.begin(), cx.end()), cs32 = (cmax + 31) / 32, nq = nh * hd;
            uint32_t *ctab, *clen; float *cacc, *cml; __half* ca[3];
            __half* cq = alloc_h(nq, 40);
            CK(cudaMalloc(&ctab, 4 * (size_t)cmax)); CK(cudaMalloc(&clen, 4));
            CK(cudaMalloc(&cacc, (size_t)nh * cs32 * hd * 4)); CK(cudaMalloc(&cml, (size_t)nh * cs32 * 2 * 4));
            for (auto& a : ca) CK(cudaMalloc(&a, (size_t)nq * 2));
            std::vector<uint32_t> ct(cmax);
            for (int i = 0; i < cmax; ++i) ct[i] = (uint32_t)(((size_t)i * 37 + 11) % slots);  // scattered slots
            CK(cudaMemcpy(ctab, ct.data(), 4 * (size_t)cmax, cudaMemcpyHostToDevice));
            CK(cudaDeviceSynchronize());
            std::vector<__half> ref(nq), got(nq);
            std::vector<uint32_t> hc(nh);
            for (int cc : cx) {
                const uint32_t ln = cc;
                CK(cudaMemcpyAsync(clen, &ln, 4, cudaMemcpyHostToDevice, g_s));
                attention(0, false, cq, kp[0], vp[0], ctab, clen, cacc, cml, cnt, ca[0], nh, nkv, cc, cmax, scale);
                CK(cudaMemcpyAsync(ref.data(), ca[0], (size_t)nq * 2, cudaMemcpyDeviceToHost, g_s));
                CK(cudaStreamSynchronize(g_s));
                for (int f = 1; f <= 2; ++f) {
                    const int split = f == 2 ? 32 : PD_SPLIT, parts = (cc + split - 1) / split;
                    bool eq = true; float md = 0.f;
                    for (int rep = 0; rep < 2; ++rep) {  // twice: the second launch needs the counters reset by the first
                        CK(cudaMemsetAsync(ca[f], 0xff, (size_t)nq * 2, g_s));  // NaNs, so that a missed write shows
                        attention(f, false, cq, kp[0], vp[0], ctab, clen, cacc, cml, cnt, ca[f], nh, nkv, cc, cmax, scale);
                        CK(cudaMemcpyAsync(got.data(), ca[f], (size_t)nq * 2, cudaMemcpyDeviceToHost, g_s));
                        CK(cudaStreamSynchronize(g_s));
                        eq = eq && memcmp(ref.data(), got.data(), (size_t)nq * 2) == 0;
                        for (int i = 0; i < nq; ++i) {
                            const float d = fabsf(__half2float(got[i]) - __half2float(ref[i]));
                            if (!(d <= md)) md = d;  // a NaN sticks
                        }
                    }
                    CK(cudaMemcpy(hc.data(), cnt, (size_t)nh * 4, cudaMemcpyDeviceToHost));
                    const bool zero = std::all_of(hc.begin(), hc.end(), [](uint32_t v) { return v == 0; });
                    printf("check context %d, %d part%s of %d%s: %s bitwise equal: %s, largest abs diff %g, counters back to 0: %s\n",
                           cc, parts, parts == 1 ? "" : "s", split, parts > PF_MAX_SPLITS ? " (too many: two kernels)" : "",
                           f == 1 ? "fused attention" : "fused attention (32 per block; other split, so not expected)",
                           eq ? "yes" : "no", md, zero ? "yes" : "no");
                }
            }
            for (void* p : {(void*)cq, (void*)ctab, (void*)clen, (void*)cacc, (void*)cml, (void*)ca[0], (void*)ca[1], (void*)ca[2]}) CK(cudaFree(p));
        }
        for (int pdl : {0, 1, 0, 1}) {
            g_pdl = pdl;
            float ms = time_graph(step, 50);
            printf("step (graph, pdl %d): %.3f ms = %.1f tok/s, %.0f GB/s\n", pdl, ms, 1000 / ms, bytes / ms / 1e6);
        }
        g_pdl = 1;
        for (int v = 0; v < 4; ++v) {
            g_swiglu = v & 1;
            float ms = time_graph(step, 50);
            printf("step (graph, pdl 1, swiglu %s): %.3f ms = %.1f tok/s\n", g_swiglu ? "in the gate/up gemv" : "separate", ms, 1000 / ms);
        }
        g_swiglu = false;
        for (int v = 0; v < 6; ++v) {
            g_no_norm = v % 3 == 1; g_no_rope = v % 3 == 2;
            float ms = time_graph(step, 50);
            printf("step (graph, pdl 1, %s): %.3f ms = %.1f tok/s\n", g_no_norm ? "without the norms" : g_no_rope ? "without qkv_rope" : "all kernels", ms, 1000 / ms);
        }
        g_no_norm = g_no_rope = false;
        if (splits > PF_MAX_SPLITS || splits32 > PF_MAX_SPLITS)
            printf("(more than %d parts: the fused variants fall back to the two kernels)\n", PF_MAX_SPLITS);
        for (int v = 0; v < 10; ++v) {  // interleaved: the GPU's timings drift between runs
            const char* an[5] = {"attention in two kernels", "attention in two kernels, the old combine", "attention in one kernel",
                                 "attention in one kernel, 32 positions per block", "attention without the combine"};
            g_fused_attn = v % 5 == 2 || v % 5 == 3; g_fused32 = v % 5 == 3; g_no_combine = v % 5 == 4; g_old_combine = v % 5 == 1;
            float ms = time_graph(step, 50);
            printf("step (graph, pdl 1, %s): %.3f ms = %.1f tok/s\n", an[v % 5], ms, 1000 / ms);
        }
        g_fused_attn = g_fused32 = g_no_combine = g_old_combine = false;
        for (int pdl : {0, 1}) {
            g_pdl = pdl;
            g_alloc = true;
            float ms = time_graph([&]() { step(); CK(cudaFreeAsync(g_pending, g_s)); g_pending = nullptr; }, 50);
            g_alloc = false;
            printf("step (graph, pdl %d, an allocation and a free around each kernel): %.3f ms = %.1f tok/s\n", pdl, ms, 1000 / ms);
        }
        g_pdl = true;
        struct Shape { const char* n; std::vector<__half*>* w; int rows, k; const __half* x; __half* y; };
        Shape shapes[] = {{"qkv", &wqkv, qkvw, H, normed, qkv}, {"o", &wo, H, H, att, h}, {"gate/up", &wgu, 2 * I, H, normed, gu}, {"down", &wd, H, I, act, h}};
        for (auto& s : shapes) {
            float ms = time_graph([&]() { for (int l = 0; l < L; ++l) gemv1(s.x, (*s.w)[l], s.y, s.rows, s.k); }, 20);
            double b = 2.0 * s.rows * s.k;
            printf("gemv %-8s [%6d x %6d] wr %d: %7.2f us  %6.0f GB/s\n", s.n, s.rows, s.k, wr_for(s.rows, s.k), ms * 1000 / L, b / (ms / L) / 1e6);
        }
        {
            float ms = time_graph([&]() { for (int l = 0; l < L; ++l) gemv1_swiglu(normed, wgu[l], act, 2 * I, H); }, 20);
            printf("gemv gate/up+swiglu [%6d x %6d]: %7.2f us  %6.0f GB/s\n", 2 * I, H, ms * 1000 / L, 4.0 * I * H / (ms / L) / 1e6);
        }
        for (int wr = 0; wr <= 3; ++wr) {
            const int cols = 8 >> wr;
            float ms = time_graph([&]() { for (int i = 0; i < 4; ++i)
                go(silica_gemv_f16_1, dim3((c.vocab + cols - 1) / cols), dim3(256), 0, (const __half*)normed, (const __half*)head, logits, c.vocab, H, wr); }, 20);
            printf("gemv head    [%6d x %6d] wr %d: %7.2f us  %6.0f GB/s\n", c.vocab, H, 1 << wr, ms * 1000 / 4, 2.0 * c.vocab * H / (ms / 4) / 1e6);
        }
        auto small = [&](const char* n, auto f) {
            float ms = time_graph([&]() { for (int l = 0; l < L; ++l) f(l); }, 50);
            printf("%-22s %7.2f us each (in a chain of %d)\n", n, ms * 1000 / L, L);
        };
        small("qkv_rope", [&](int l) { go(silica_qkv_rope_f16, dim3(nh + 2 * nkv, 1), dim3(hd), (size_t)(hd + 32) * 4, (const __half*)qkv,
               (const __half*)bias[l], (const __half*)nullptr, (const __half*)nullptr, (const __half*)cosT, (const __half*)sinT,
               (const uint32_t*)pos, (const uint32_t*)slot, q, kp[l], vp[l], nh, nkv, hd, eps); });
        small("paged_decode", [&](int l) { go(silica_paged_part_f16_128, dim3(nh, 1, splits), dim3(PD_THREADS), 0, (const __half*)q, (const __half*)kp[l],
               (const __half*)vp[l], (const uint32_t*)table, (const uint32_t*)lens, pacc, pml, nh, nkv, ctx, scale);
            go(silica_paged_combine_f16, dim3(nh, 1), dim3(hd), (size_t)splits * 4, (const float*)pacc, (const float*)pml, att, nh, splits); });
        small("paged_decode fused", [&](int l) { attention(1, false, q, kp[l], vp[l], table, lens, paccf, pmlf, cnt, att, nh, nkv, ctx, ctx, scale); });
        small("paged_decode fused32", [&](int l) { attention(2, false, q, kp[l], vp[l], table, lens, paccf, pmlf, cnt, att, nh, nkv, ctx, ctx, scale); });
        g_old_combine = true;
        small("paged_decode (old combine)", [&](int l) { attention(0, false, q, kp[l], vp[l], table, lens, pacc, pml, cnt, att, nh, nkv, ctx, ctx, scale); });
        g_old_combine = false;
        small("paged_part alone", [&](int l) { attention(0, true, q, kp[l], vp[l], table, lens, pacc, pml, cnt, att, nh, nkv, ctx, ctx, scale); });
        small("add_rmsnorm", [&](int l) { go(silica_add_rmsnorm_f16, dim3(1), dim3(norm_threads), (size_t)(H + 32) * 4, (const __half*)resid, (const __half*)h, (const __half*)n1[l], an, an + H, 1, H, eps); });
        small("silu_mul", [&](int l) { go(silica_silu_mul_f16, dim3((I + 1023) / 1024), dim3(1024), 0, (const __half*)gu, act, (size_t)I, I, 0); });
        {  // next-token selection over this model's vocabulary (random logits, sd 2)
            float* lg; CK(cudaMalloc(&lg, (size_t)c.vocab * 4));
            std::vector<float> hl(c.vocab);
            uint32_t st = 12345;
            for (auto& v : hl) { st = st * 1664525u + 1013904223u; v = ((st >> 8) / 16777216.f - 0.5f) * 7.f; }
            // KB_LOGITS: rows of f32 logits of this vocabulary (a real model's), row KB_ROW (default 0).
            if (const char* path = getenv("KB_LOGITS")) {
                if (FILE* f = fopen(path, "rb")) {
                    fseek(f, 0, SEEK_END);
                    const long size = ftell(f);
                    const int row = getenv("KB_ROW") ? atoi(getenv("KB_ROW")) : 0;
                    if (size % ((long)c.vocab * 4) == 0 && (long)(row + 1) * c.vocab * 4 <= size) {
                        fseek(f, (long)row * c.vocab * 4, SEEK_SET);
                        if (fread(hl.data(), 4, c.vocab, f) == (size_t)c.vocab) printf("selection on %s row %d\n", path, row);
                    }
                    fclose(f);
                }
            }
            CK(cudaMemcpy(lg, hl.data(), (size_t)c.vocab * 4, cudaMemcpyHostToDevice));
            SelParam ps[3] = {};
            ps[0].inv_temp = 1.f; ps[0].top_p = 1.f; ps[0].mode = 0; ps[0].n = 1;                       // greedy
            ps[1] = ps[0]; ps[1].mode = 1; ps[1].u = 0.3; ps[1].top_k = 50;                           // top-k 50
            ps[2] = ps[0]; ps[2].mode = 1; ps[2].u = 0.3; ps[2].top_p = 0.9f;                         // top-p 0.9
            SelParam* dp; CK(cudaMalloc(&dp, sizeof ps)); CK(cudaMemcpy(dp, ps, sizeof ps, cudaMemcpyHostToDevice));
            uint32_t* so; CK(cudaMalloc(&so, 64));
            const char* names[3] = {"select greedy", "select top-k 50", "select top-p 0.9"};
            SelStats* sp; uint32_t* gc; unsigned long long *gm, *cuts, *pm;
            CK(cudaMalloc(&cuts, 8)); CK(cudaMalloc(&pm, 64 * 8));
            CK(cudaMalloc(&sp, 64 * sizeof(SelStats))); CK(cudaMalloc(&gc, SEL_BINS * 4)); CK(cudaMalloc(&gm, SEL_BINS * 8));
            for (int i = 0; i < 3; ++i)
                small(names[i], [&](int) {
                    go(silica_select_stats, dim3(64, 1), dim3(SEL_PART_THREADS), 0, (const float*)lg, c.vocab, sp, gc, gm);
                    go(silica_select_hist, dim3(64, 1), dim3(SEL_PART_THREADS), 0, (const float*)lg, c.vocab, (const SelParam*)(dp + i),
                       (const SelStats*)sp, gc, gm);
                    go(silica_select, dim3(1), dim3(SEL_THREADS), 0, (const float*)lg, c.vocab, (const SelParam*)(dp + i), so, 1,
                       (const SelStats*)sp, 64, (const uint32_t*)gc, (const unsigned long long*)gm, cuts);
                    go(silica_select_mass, dim3(64, 1), dim3(SEL_PART_THREADS), 0, (const float*)lg, c.vocab, (const SelParam*)(dp + i),
                       (const SelStats*)sp, (const unsigned long long*)cuts, pm);
                    go(silica_select_draw, dim3(1), dim3(SEL_THREADS), 0, (const float*)lg, c.vocab, (const SelParam*)(dp + i),
                       (const SelStats*)sp, 64, (const unsigned long long*)cuts, (const unsigned long long*)pm, so, 1); });
            {  // the same rows in one cooperative kernel (fused.rs SampleOp), its counters zeroed first
                unsigned long long* lists; uint32_t* sync;
                CK(cudaMalloc(&lists, (size_t)SEL_ROUNDS * SEL_CAP * 8)); CK(cudaMalloc(&sync, 16));
                const char* one[3] = {"", "select top-k 50 (one kernel)", "select top-p 0.9 (one kernel)"};
                for (int i = 1; i < 3; ++i)
                    small(one[i], [&](int) {
                        CK(cudaMemsetAsync(sync, 0, 16, g_s));
                        cudaLaunchConfig_t lc = {};
                        lc.gridDim = dim3(64, 1); lc.blockDim = dim3(SEL_THREADS); lc.stream = g_s;
                        cudaLaunchAttribute at[1];
                        at[0].id = cudaLaunchAttributeCooperative; at[0].val.cooperative = 1;
                        lc.attrs = at; lc.numAttrs = 1;
                        CK(cudaLaunchKernelEx(&lc, silica_select_sample, (const float*)lg, c.vocab, (const SelParam*)(dp + i), so, 1,
                                              sp, gc, gm, lists, sync, pm)); });
                CK(cudaFree(lists)); CK(cudaFree(sync));
            }
            CK(cudaFree(sp)); CK(cudaFree(gc)); CK(cudaFree(gm)); CK(cudaFree(cuts)); CK(cudaFree(pm));
            ArgPart* ap; CK(cudaMalloc(&ap, 64 * sizeof(ArgPart)));
            small("argmax (64 parts)", [&](int) {
                go(silica_argmax_part, dim3(64, 1), dim3(ARGMAX_THREADS), 0, (const float*)lg, c.vocab, ap);
                go(silica_argmax_combine, dim3(1), dim3(32), 0, (const ArgPart*)ap, 64, so); });
            CK(cudaFree(ap));
            CK(cudaFree(lg)); CK(cudaFree(dp)); CK(cudaFree(so));
        }
        CK(cudaDeviceSynchronize());
        for (auto* v : {&wqkv, &wo, &wgu, &wd, &n1, &n2, &bias, &kp, &vp}) for (auto p : *v) CK(cudaFree(p));
        for (void* p : {(void*)head, (void*)cosT, (void*)sinT, (void*)pos, (void*)slot, (void*)pacc, (void*)pml, (void*)paccf, (void*)pmlf, (void*)cnt, (void*)table, (void*)lens, (void*)resid, (void*)normed,
                        (void*)qkv, (void*)q, (void*)att, (void*)h, (void*)an, (void*)gu, (void*)act, (void*)logits}) CK(cudaFree(p));
    }
    return 0;
}
