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

// Step variant of the decode attention: `g_no_combine` leaves the combine out (wrong results:
// the upper bound of what removing the second launch could save). The one-kernel attention
// (the last block of each head combines) was measured and dropped: commit a8fbae6.
static bool g_no_combine = false;


// Decode attention of one row (d = 1) at context `ctx` into `out`, over a slot table `max_len`
// wide (parts past the length are empty): the engine's two kernels (with `no_combine` the part
// only). The combine before the one-round-trip path was A/B-timed against it here until
// commit cdfd99c (figures in docs/benchmarks.md, seventh session).
static void attention(bool no_combine, const __half* q, const __half* kp, const __half* vp, const uint32_t* table,
                      const uint32_t* lens, float* pacc, float* pml, __half* out, int nh, int nkv, int max_len, float scale) {
    const int s64 = (max_len + PD_SPLIT - 1) / PD_SPLIT;
    go(silica_paged_part_f16_128, dim3(nh, 1, s64), dim3(PD_THREADS), 0, q, kp, vp, table, lens, pacc, pml, nh, nkv,
       max_len, scale);
    if (!no_combine)
        go(silica_paged_combine_f16, dim3(nh, 1), dim3(128), (size_t)s64 * 4, (const float*)pacc,
           (const float*)pml, out, nh, s64);
}

// The 4-row tensor-core GEMV with more warps per block of 8 columns (the engine launches 8):
// more weight loads in flight per SM where the matrix has few columns (the down projection).
template <int W, bool XPRE = true>
__global__ void __launch_bounds__(32 * W) kb_gemv_tc_f16_4(const __half* x, const __half* w, __half* y, int n_out, int k) {
    gemv_tc<__half, 4, W, false, XPRE>(x, w, y, n_out, k);
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
        // KB_CAP: the step's two-kernel attention over a slot table of this many positions (as
        // the engine's graphs, whose capacity is a power of two >= the context: parts past the
        // length are empty).
        const int cap = std::max(ctx, getenv("KB_CAP") ? atoi(getenv("KB_CAP")) : ctx);
        const int csplits = (cap + PD_SPLIT - 1) / PD_SPLIT;
        float *pacc, *pml;
        CK(cudaMalloc(&pacc, (size_t)nh * csplits * hd * 4)); CK(cudaMalloc(&pml, (size_t)nh * csplits * 2 * 4));
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
            attention(g_no_combine, q, kp[l], vp[l], table, lens, pacc, pml, att, nh, nkv, cap, scale);
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
        for (int v = 0; v < 4; ++v) {  // interleaved: the GPU's timings drift between runs
            g_no_combine = v % 2 == 1;
            float ms = time_graph(step, 50);
            printf("step (graph, pdl 1, %s): %.3f ms = %.1f tok/s\n",
                   g_no_combine ? "attention without the combine" : "attention in two kernels", ms, 1000 / ms);
        }
        g_no_combine = false;
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
        {  // The same GEMVs for the 4 rows of a 4-beam step, on the tensor cores as fused.rs launches
           // them (silica_gemv_tc_f16_4: 8 output columns per block of 256 threads), and the head.
            const size_t kx = (size_t)std::max(H, I), ny = (size_t)std::max(std::max(2 * I, qkvw), c.vocab);
            __half* x4 = alloc_h(4 * kx, 40); __half* y4; CK(cudaMalloc(&y4, 4 * ny * 2));
            double all = 0;
            for (auto& s : shapes) {
                float ms = time_graph([&]() { for (int l = 0; l < L; ++l)
                    go(silica_gemv_tc_f16_4, dim3((s.rows + 7) / 8), dim3(256), 0, (const __half*)x4, (const __half*)(*s.w)[l], y4, s.rows, s.k); }, 20);
                double b = 2.0 * s.rows * s.k;
                all += ms;
                printf("gemv tc 4 rows %-8s [%6d x %6d]: %7.2f us  %6.0f GB/s\n", s.n, s.rows, s.k, ms * 1000 / L, b / (ms / L) / 1e6);
            }
            for (auto& s : shapes)  // more warps per block of 8 columns
                for (int var : {16, 32, 8 + 1, 16 + 1}) {  // warps, + 1: x loaded at each iteration's start
                    const int wv = var & ~1;
                    auto run_w = [&](const __half* w) {
                        const dim3 grid((s.rows + 7) / 8), block(32 * wv);
                        if (var == 16) go(kb_gemv_tc_f16_4<16>, grid, block, 0, (const __half*)x4, w, y4, s.rows, s.k);
                        else if (var == 32) go(kb_gemv_tc_f16_4<32>, grid, block, 0, (const __half*)x4, w, y4, s.rows, s.k);
                        else if (var == 9) go(kb_gemv_tc_f16_4<8, false>, grid, block, 0, (const __half*)x4, w, y4, s.rows, s.k);
                        else go(kb_gemv_tc_f16_4<16, false>, grid, block, 0, (const __half*)x4, w, y4, s.rows, s.k);
                    };
                    float ms = time_graph([&]() { for (int l = 0; l < L; ++l) run_w((*s.w)[l]); }, 20);
                    // Against the engine's 8 warps on layer 0 (the sums over k meet in another order).
                    const size_t ny4 = 4 * (size_t)s.rows;
                    std::vector<__half> a8(ny4), aw(ny4);
                    go(silica_gemv_tc_f16_4, dim3((s.rows + 7) / 8), dim3(256), 0, (const __half*)x4, (const __half*)(*s.w)[0], y4, s.rows, s.k);
                    CK(cudaMemcpyAsync(a8.data(), y4, ny4 * 2, cudaMemcpyDeviceToHost, g_s));
                    run_w((*s.w)[0]);
                    CK(cudaMemcpyAsync(aw.data(), y4, ny4 * 2, cudaMemcpyDeviceToHost, g_s));
                    CK(cudaStreamSynchronize(g_s));
                    float dmax = 0, vmax = 0;
                    for (size_t i = 0; i < ny4; ++i) {
                        dmax = std::max(dmax, std::fabs(__half2float(a8[i]) - __half2float(aw[i])));
                        vmax = std::max(vmax, std::fabs(__half2float(a8[i])));
                    }
                    printf("gemv tc 4 rows %-8s [%6d x %6d], %d warps a block%s: %7.2f us  %6.0f GB/s (largest difference from 8 warps %.2g of %.2g)\n",
                           s.n, s.rows, s.k, wv, var & 1 ? ", x at each iteration's start" : "", ms * 1000 / L, 2.0 * s.rows * s.k / (ms / L) / 1e6, dmax, vmax);
                }
            float ms = time_graph([&]() { for (int i = 0; i < 4; ++i)
                go(silica_gemv_tc_f16_4, dim3((c.vocab + 7) / 8), dim3(256), 0, (const __half*)x4, (const __half*)head, y4, c.vocab, H); }, 20);
            printf("gemv tc 4 rows head     [%6d x %6d]: %7.2f us  %6.0f GB/s\n", c.vocab, H, ms * 1000 / 4, 2.0 * c.vocab * H / (ms / 4) / 1e6);
            printf("gemv tc 4 rows, every layer's four GEMVs and the head: %.3f ms a step\n", all + ms / 4);
            CK(cudaFree(x4)); CK(cudaFree(y4));
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
        small("paged_decode", [&](int l) { attention(false, q, kp[l], vp[l], table, lens, pacc, pml, att, nh, nkv, cap, scale); });
        small("paged_part alone", [&](int l) { attention(true, q, kp[l], vp[l], table, lens, pacc, pml, att, nh, nkv, cap, scale); });
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
            {  // a 4-beam step's selection: the 8 best of each of 4 rows (mode 2, n 8), the five kernels
                // (the engine's path for such rows beside other rows)
                const int R = 4, N = 8;
                float* lg4; CK(cudaMalloc(&lg4, (size_t)R * c.vocab * 4));
                for (int r = 0; r < R; ++r) CK(cudaMemcpy(lg4 + (size_t)r * c.vocab, hl.data(), (size_t)c.vocab * 4, cudaMemcpyHostToDevice));
                SelParam p4[R] = {};
                for (auto& p : p4) { p.inv_temp = 1.f; p.top_p = 1.f; p.mode = 2; p.n = N; }
                SelParam* dp4; CK(cudaMalloc(&dp4, sizeof p4)); CK(cudaMemcpy(dp4, p4, sizeof p4, cudaMemcpyHostToDevice));
                uint32_t* so4; CK(cudaMalloc(&so4, R * N * 2 * 4));
                SelStats* sp4; uint32_t* gc4; unsigned long long *gm4, *cuts4, *pm4;
                CK(cudaMalloc(&cuts4, R * 8)); CK(cudaMalloc(&pm4, R * 64 * 8));
                CK(cudaMalloc(&sp4, R * 64 * sizeof(SelStats))); CK(cudaMalloc(&gc4, R * SEL_BINS * 4)); CK(cudaMalloc(&gm4, R * SEL_BINS * 8));
                small("select top-8 of 4 rows", [&](int) {
                    go(silica_select_stats, dim3(64, R), dim3(SEL_PART_THREADS), 0, (const float*)lg4, c.vocab, sp4, gc4, gm4);
                    go(silica_select_hist, dim3(64, R), dim3(SEL_PART_THREADS), 0, (const float*)lg4, c.vocab, (const SelParam*)dp4,
                       (const SelStats*)sp4, gc4, gm4);
                    go(silica_select, dim3(R), dim3(SEL_THREADS), 0, (const float*)lg4, c.vocab, (const SelParam*)dp4, so4, N,
                       (const SelStats*)sp4, 64, (const uint32_t*)gc4, (const unsigned long long*)gm4, cuts4);
                    go(silica_select_mass, dim3(64, R), dim3(SEL_PART_THREADS), 0, (const float*)lg4, c.vocab, (const SelParam*)dp4,
                       (const SelStats*)sp4, (const unsigned long long*)cuts4, pm4);
                    go(silica_select_draw, dim3(R), dim3(SEL_THREADS), 0, (const float*)lg4, c.vocab, (const SelParam*)dp4,
                       (const SelStats*)sp4, 64, (const unsigned long long*)cuts4, (const unsigned long long*)pm4, so4, N); });
                // the engine's path for such a step (fused.rs TopNOp): 64 part top-n blocks per row,
                // then one combine block per row
                const int per = (c.vocab + 63) / 64;
                TopNPart* tp4; CK(cudaMalloc(&tp4, (size_t)R * 64 * sizeof(TopNPart)));
                small("select top-8 of 4 rows (two kernels)", [&](int) {
                    go(silica_topn_part, dim3(64, R), dim3(TOPN_THREADS), (size_t)per * 4, (const float*)lg4, c.vocab, N, tp4);
                    go(silica_topn_combine, dim3(R), dim3(TOPN_THREADS), (size_t)64 * N * 8, (const TopNPart*)tp4, 64, N, so4, N); });
                CK(cudaFree(tp4));
                for (void* p : {(void*)lg4, (void*)dp4, (void*)so4, (void*)sp4, (void*)gc4, (void*)gm4, (void*)cuts4, (void*)pm4}) CK(cudaFree(p));
            }
            small("argmax (64 parts)", [&](int) {
                go(silica_argmax_part, dim3(64, 1), dim3(ARGMAX_THREADS), 0, (const float*)lg, c.vocab, ap);
                go(silica_argmax_combine, dim3(1), dim3(32), 0, (const ArgPart*)ap, 64, so); });
            CK(cudaFree(ap));
            CK(cudaFree(lg)); CK(cudaFree(dp)); CK(cudaFree(so));
        }
        CK(cudaDeviceSynchronize());
        for (auto* v : {&wqkv, &wo, &wgu, &wd, &n1, &n2, &bias, &kp, &vp}) for (auto p : *v) CK(cudaFree(p));
        for (void* p : {(void*)head, (void*)cosT, (void*)sinT, (void*)pos, (void*)slot, (void*)pacc, (void*)pml, (void*)table, (void*)lens, (void*)resid, (void*)normed,
                        (void*)qkv, (void*)q, (void*)att, (void*)h, (void*)an, (void*)gu, (void*)act, (void*)logits}) CK(cudaFree(p));
    }
    return 0;
}
