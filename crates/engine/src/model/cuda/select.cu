// Next-token selection on the device (included by kernels.cu), so that a step brings a few
// bytes per row to the host instead of the vocabulary's logits, and the host does not sort or
// scan 150k values per row. silica_select_stats and silica_select_hist (64 blocks per row) make
// the row's statistics and, for top-k / top-p rows, its histogram; then silica_select (one
// block of SEL_THREADS per row of f32 logits) decides greedy and top-n rows and finds a sampled
// row's cut; silica_select_mass (64 blocks per row) sums the kept mass of each part and
// silica_select_draw (one block per row) draws inside the part that holds the draw. A step
// whose rows are all greedy takes silica_argmax_part + silica_argmax_combine instead; one whose
// rows all sample takes silica_select_sample, the same passes in one cooperative kernel; one
// whose rows all want their n best (n <= 16: beam steps) takes silica_topn_part +
// silica_topn_combine.
//
// Modes (SelParam::mode):
//   SEL_GREEDY  the argmax, ties to the lowest token id;
//   SEL_SAMPLE  temperature -> top-k -> top-p -> min-p -> one draw with the host's uniform `u`,
//               the same pipeline as the host sampler (sampling/mod.rs): top-k keeps exactly k
//               tokens (ties at the k-th value: lowest ids), top-p the smallest most-likely
//               prefix whose mass reaches p (ties: lowest ids first), min-p the tokens whose
//               weight exp((x - max) / T) is at least min_p, and the draw walks the survivors in
//               token-id order and takes the first whose running mass exceeds u * total;
//   SEL_TOPN    the n most likely tokens (ties: lowest ids) with their log-softmax values, in
//               no particular order (the host sorts them): the candidates of a beam step.
// Output per row: `nout` (token, value-bits) pairs; modes GREEDY and SAMPLE fill the first,
// TOPN the first n (token 0xffffffff after the finite logits run out).
// A row with a NaN or +inf logit, or only -inf, gets token 0xffffffff (the host then reports
// the error from the dense row).
//
// A cut (the last kept token in the order "larger logit first, then lower id") is found from a
// histogram of the logits over SEL_BINS equal bins between the smallest finite logit and the
// largest (counts, and fixed-point masses for top-p): the bin where the running count or mass
// crosses the need is the only one whose elements are gathered (at most SEL_CAP), sorted and
// walked. When that bin holds more (thousands of equal logits), radix selection over the
// logits' order-preserving 32-bit keys (four passes of 8 bits, warp-aggregated atomics) finds
// the cut instead. Masses are in fixed point (weight * 2^26, integer sums), so every sum, hence
// every selected token, is the same from run to run. Element layout: warp w owns the ids [w R, (w + 1) R) and its lanes read
// them 32 at a time (coalesced), so a walk in id order is a walk over warps, then iterations,
// then lanes.

#define SEL_THREADS 1024
#define SEL_WARPS (SEL_THREADS / 32)
#define SEL_FULL 0xffffffffu
// 2^26: a weight is at most 1, so 32 lanes' fixed-point weights sum within 32 bits.
#define SEL_FIX_ONE 67108864.0f

enum { SEL_GREEDY = 0, SEL_SAMPLE = 1, SEL_TOPN = 2 };

struct SelParam {
    double u;          // SAMPLE: uniform draw in [0, 1)
    float inv_temp;    // SAMPLE: 1 / temperature
    float top_p;       // SAMPLE: 1 = off
    float min_p;       // SAMPLE: 0 = off
    uint32_t top_k;    // SAMPLE: 0 = off
    uint32_t mode;
    uint32_t n;        // TOPN: how many
};

#define SEL_BINS 1024
#define SEL_CAP 4096

struct SelShared {
    uint32_t cnt[SEL_BINS];
    unsigned long long mass[SEL_BINS];
    // Gathered elements of one bin as (key << 32 | ~id), sorted: larger logit, then lower id,
    // first.
    unsigned long long sorted[SEL_CAP];
    float redf[32];
    unsigned long long redu[SEL_WARPS];
    uint32_t redi[SEL_WARPS];
    uint32_t digit;
    unsigned long long rem;
    uint32_t outn;
    uint32_t ncand;
    int bin;
    unsigned long long above;
    unsigned long long cut;
};

// Order-preserving key of a float (larger float, larger key; -inf > 0).
__device__ __forceinline__ uint32_t sel_key(float f) {
    const uint32_t b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float sel_unkey(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// The fast exp (ex2.approx): the selection passes are bound by the one SM's issue rate, and
// expf costs ~20 instructions per logit.
__device__ __forceinline__ float sel_weight(float v, float m, float inv_t) { return __expf((v - m) * inv_t); }
__device__ __forceinline__ uint32_t sel_fix(float w) { return __float2uint_rn(w * SEL_FIX_ONE); }

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SEL_FULL, v, o);
    return v;
}
// The top-p target in fixed point: the smallest mass reaching top_p of `total` (at least 1).
__device__ __forceinline__ unsigned long long sel_top_p_target(float top_p, unsigned long long total) {
    const unsigned long long t = (unsigned long long)ceil((double)top_p * (double)total);
    return t == 0 ? 1 : t;
}

// Per-warp totals into `red`, then every thread gets (sum of the warps before its own, total).
__device__ void sel_warp_scan(unsigned long long v, unsigned long long* red, unsigned long long* before,
                              unsigned long long* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_u64(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    unsigned long long b = 0, t = 0;
    for (int w = 0; w < SEL_WARPS; ++w) {
        if (w < warp) b += red[w];
        t += red[w];
    }
    *before = b;
    *total = t;
}

// Walking keys from the largest down over the elements with key > floor, finds the key at which
// the running amount (1 per element, or its fixed-point weight when MASS) first reaches `need`
// (which must not exceed the total). Returns that key; *rem is what is left of `need` after
// every larger key (1 <= *rem <= the amount of that key's elements).
template <bool MASS>
__device__ uint32_t sel_radix(const float* __restrict__ x, int vocab, int range, uint32_t floor_key, float m,
                              float inv_t, unsigned long long need, unsigned long long* rem, SelShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t prefix = 0, pmask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            sh.cnt[b] = 0;
            sh.mass[b] = 0;
        }
        if (threadIdx.x == 0) {
            sh.digit = 0;
            sh.rem = need;
        }
        __syncthreads();
        for (int j = 0; j < range; j += 32) {
            const int i = warp * range + j + lane;
            uint32_t digit = 256, amount = 0;
            if (i < vocab) {
                const float v = x[i];
                const uint32_t k = sel_key(v);
                if (k > floor_key && (k & pmask) == prefix) {
                    digit = (k >> shift) & 255;
                    amount = MASS ? sel_fix(sel_weight(v, m, inv_t)) : 1;
                }
            }
            const uint32_t peers = __match_any_sync(SEL_FULL, digit);
            const uint32_t sum = MASS ? __reduce_add_sync(peers, amount) : __popc(peers);
            if (digit < 256 && lane == __ffs(peers) - 1) {
                if (MASS)
                    atomicAdd(&sh.mass[digit], (unsigned long long)sum);
                else
                    atomicAdd(&sh.cnt[digit], sum);
            }
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l owns bins 8l .. 8l + 7; the bins above lane l's are the later lanes'.
            unsigned long long own = 0;
            for (int b = 0; b < 8; ++b) own += MASS ? sh.mass[8 * lane + b] : sh.cnt[8 * lane + b];
            unsigned long long suffix = own;
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned long long t = __shfl_down_sync(SEL_FULL, suffix, o);
                if (lane + o < 32) suffix += t;
            }
            unsigned long long acc = suffix - own;
            if (acc < need && need <= suffix) {
                for (int b = 7; b >= 0; --b) {
                    const unsigned long long a = MASS ? sh.mass[8 * lane + b] : sh.cnt[8 * lane + b];
                    if (acc + a >= need) {
                        sh.digit = 8 * lane + b;
                        sh.rem = need - acc;
                        break;
                    }
                    acc += a;
                }
            }
        }
        __syncthreads();
        prefix |= sh.digit << shift;
        pmask |= 0xffu << shift;
        need = sh.rem;
        __syncthreads();
    }
    *rem = need;
    return prefix;
}

// Calls f(value, id) for each of this thread's elements (warp w's ids [w range, (w + 1) range),
// 32 at a time, in increasing id order per lane), loading SEL_BATCH of them ahead of use: one
// block streams the whole row, and with one load in flight per thread a pass is bound by latency.
#define SEL_BATCH 8
template <typename F>
__device__ __forceinline__ void sel_each(const float* __restrict__ x, int vocab, int range, F f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int j0 = 0; j0 < range; j0 += 32 * SEL_BATCH) {
        float v[SEL_BATCH];
#pragma unroll
        for (int u = 0; u < SEL_BATCH; ++u) {
            const int j = j0 + u * 32, i = warp * range + j + lane;
            v[u] = j < range && i < vocab ? x[i] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < SEL_BATCH; ++u) {
            const int j = j0 + u * 32, i = warp * range + j + lane;
            if (j < range && i < vocab) f(v[u], i);
        }
    }
}

// An element's place in the order "larger logit first, then lower id" (larger: earlier).
__device__ __forceinline__ unsigned long long sel_composite(uint32_t key, uint32_t id) {
    return ((unsigned long long)key << 32) | (uint32_t)~id;
}

// Bin of a logit (-1 for -inf): monotone in the value.
__device__ __forceinline__ int sel_bin(float v, float lo, float scale) {
    return v == -INFINITY ? -1 : min(SEL_BINS - 1, (int)((v - lo) * scale));
}

// The id of the `rank`-th (0-based) element whose key is `tau`, in id order.
__device__ uint32_t sel_tie_id(const float* __restrict__ x, int vocab, int range, uint32_t tau,
                               unsigned long long rank, SelShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t ties = 0;
    for (int j = 0; j < range; j += 32) {
        const int i = warp * range + j + lane;
        ties += i < vocab && sel_key(x[i]) == tau;
    }
    unsigned long long before, total;
    sel_warp_scan(ties, sh.redu, &before, &total);
    const unsigned long long own = warp_sum_u64(ties);
    if (threadIdx.x == 0) sh.cut = 0xffffffffu;
    __syncthreads();
    if (before <= rank && rank < before + own) {
        unsigned long long r = before;
        for (int j = 0; j < range; j += 32) {
            const int i = warp * range + j + lane;
            const uint32_t mask = __ballot_sync(SEL_FULL, i < vocab && sel_key(x[i]) == tau);
            if (rank < r + __popc(mask)) {
                // The (rank - r)-th set bit of the mask.
                uint32_t mm = mask;
                for (unsigned long long s = r; s < rank; ++s) mm &= mm - 1;
                if (lane == 0) sh.cut = warp * range + j + __ffs(mm) - 1;
                break;
            }
            r += __popc(mask);
        }
    }
    __syncthreads();
    return (uint32_t)sh.cut;
}

// Histogram of the finite logits over SEL_BINS bins: counts, and (WITH_MASS) fixed-point masses.
template <bool WITH_MASS>
__device__ void sel_hist(const float* __restrict__ x, int vocab, int range, float lo, float scale, float m,
                         float inv_t, SelShared& sh) {
    for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {
        sh.cnt[b] = 0;
        sh.mass[b] = 0;
    }
    __syncthreads();
    sel_each(x, vocab, range, [&](float v, int) {
        const int b = sel_bin(v, lo, scale);
        if (b >= 0) {
            atomicAdd(&sh.cnt[b], 1u);
            if (WITH_MASS) atomicAdd(&sh.mass[b], (unsigned long long)sel_fix(sel_weight(v, m, inv_t)));
        }
    });
    __syncthreads();
}

// Walking the bins from the largest down to `lowest`, with `acc0` already counted, the bin where
// the running count (or mass) reaches `need`: sets sh.bin (-1 if none) and sh.above (the amount
// of the bins above it, plus `acc0`).
template <bool MASS>
__device__ void sel_find_bin(int lowest, unsigned long long acc0, unsigned long long need, SelShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int PER = SEL_BINS / 32;
    if (threadIdx.x == 0) sh.bin = -1;
    __syncthreads();
    if (warp == 0) {
        unsigned long long own = 0;
        for (int b = 0; b < PER; ++b) {
            const int bb = PER * lane + b;
            if (bb >= lowest) own += MASS ? sh.mass[bb] : sh.cnt[bb];
        }
        unsigned long long suffix = own;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long t = __shfl_down_sync(SEL_FULL, suffix, o);
            if (lane + o < 32) suffix += t;
        }
        unsigned long long acc = acc0 + suffix - own;
        if (acc < need && need <= acc0 + suffix) {
            for (int b = PER - 1; b >= 0; --b) {
                const int bb = PER * lane + b;
                if (bb < lowest) continue;
                const unsigned long long a = MASS ? sh.mass[bb] : sh.cnt[bb];
                if (acc + a >= need) {
                    sh.bin = bb;
                    sh.above = acc;
                    break;
                }
                acc += a;
            }
        }
    }
    __syncthreads();
}

// Sorts sh.sorted[0 .. n) (n <= SEL_CAP): larger logit, then lower id, first. Bitonic, over the
// next power of two padded with 0 (below every element: a finite logit's key is not 0):
// log2(size) (log2(size) + 1) / 2 passes of one compare-exchange per pair (66 for 2048).
__device__ void sel_sort(uint32_t n, SelShared& sh) {
    uint32_t size = 1;
    while (size < n) size <<= 1;
    for (uint32_t a = n + threadIdx.x; a < size; a += blockDim.x) sh.sorted[a] = 0;
    __syncthreads();
    for (uint32_t k = 2; k <= size; k <<= 1) {
        for (uint32_t j = k >> 1; j > 0; j >>= 1) {
            for (uint32_t a = threadIdx.x; a < size; a += blockDim.x) {
                const uint32_t b = a ^ j;
                if (b > a) {
                    const unsigned long long u = sh.sorted[a], w = sh.sorted[b];
                    // Descending runs where bit k of the index is clear, ascending where set.
                    if (((a & k) == 0) == (u < w)) {
                        sh.sorted[a] = w;
                        sh.sorted[b] = u;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Gathers bin `bin`'s elements of the whole row (one block) and sorts them into
// sh.sorted[0 .. n). Returns n, or 0 when the bin holds more than SEL_CAP.
__device__ uint32_t sel_gather(const float* __restrict__ x, int vocab, int range, float lo, float scale, int bin,
                               SelShared& sh) {
    if (threadIdx.x == 0) sh.ncand = 0;
    __syncthreads();
    sel_each(x, vocab, range, [&](float v, int i) {
        if (sel_bin(v, lo, scale) == bin) {
            const uint32_t slot = atomicAdd(&sh.ncand, 1u);
            if (slot < SEL_CAP) sh.sorted[slot] = sel_composite(sel_key(v), (uint32_t)i);
        }
    });
    __syncthreads();
    const uint32_t n = sh.ncand;
    if (n > SEL_CAP) return 0;
    sel_sort(n, sh);
    return n;
}

// In sh.sorted[0 .. n), the first entry at which `acc` plus the running fixed-point mass reaches
// `need` (the last one if never). Returns its composite key.
__device__ unsigned long long sel_walk_sorted(uint32_t n, unsigned long long acc, unsigned long long need, float m,
                                              float inv_t, SelShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) sh.cut = sh.sorted[n - 1];
    __syncthreads();
    if (warp == 0) {
        const uint32_t per = (n + 31) / 32, a0 = min(n, lane * per), a1 = min(n, a0 + per);
        unsigned long long own = 0;
        for (uint32_t a = a0; a < a1; ++a) own += sel_fix(sel_weight(sel_unkey((uint32_t)(sh.sorted[a] >> 32)), m, inv_t));
        unsigned long long incl = own;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long t = __shfl_up_sync(SEL_FULL, incl, o);
            if (lane >= o) incl += t;
        }
        unsigned long long run = acc + incl - own;
        if (run < need && need <= acc + incl) {
            for (uint32_t a = a0; a < a1; ++a) {
                run += sel_fix(sel_weight(sel_unkey((uint32_t)(sh.sorted[a] >> 32)), m, inv_t));
                if (run >= need) {
                    sh.cut = sh.sorted[a];
                    break;
                }
            }
        }
    }
    __syncthreads();
    return sh.cut;
}

// The passes that need the whole row but no cut, split over many blocks per row (one block
// streams a 152k row in ~15 µs a pass, bound by one SM): silica_select_stats finds each part's
// largest and smallest finite logit, whether it holds a NaN or +inf, and how many finite
// logits it has (and zeroes the row's global histogram); silica_select_hist, for the rows that
// cut by top-k or top-p, adds each part's counts (and fixed-point masses) to the row's global
// histogram with integer atomics, so the sums are exact and the same from run to run.
#define SEL_PART_THREADS 256
// cuts[row] of a row that silica_select decided itself (no draw to make).
#define SEL_DECIDED 0xffffffffffffffffull
struct SelStats {
    float m;          // largest logit (NaN ignored)
    float lo;         // smallest logit other than -inf
    uint32_t bad;     // a NaN or +inf
    uint32_t finite;  // logits other than -inf
};

// A block-wide sum (every thread gets it); redu holds 32 words. Starts with a barrier.
__device__ unsigned long long sel_block_sum(unsigned long long v, unsigned long long* redu) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_u64(v);
    __syncthreads();
    if (lane == 0) redu[warp] = v;
    __syncthreads();
    unsigned long long t = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += redu[w];
    return t;
}

// Every thread's stats combined (every thread gets them). blockDim.x is a multiple of 32.
__device__ SelStats sel_reduce_stats(SelStats a, float* redf, unsigned long long* redu) {
    SelStats r;
    r.m = block_reduce<true>(a.m, redf);
    r.lo = -block_reduce<true>(-a.lo, redf);
    r.bad = __syncthreads_or(a.bad);
    r.finite = (uint32_t)sel_block_sum(a.finite, redu);
    return r;
}

// The row's stats from its parts (read past L1: other blocks may have just written them).
__device__ SelStats sel_row_stats(const SelStats* __restrict__ parts, int nparts, float* redf, unsigned long long* redu) {
    SelStats a{-INFINITY, INFINITY, 0, 0};
    for (int t = threadIdx.x; t < nparts; t += blockDim.x) {
        const float4 w = __ldcg(reinterpret_cast<const float4*>(parts + t));
        a.m = fmaxf(a.m, w.x);
        a.lo = fminf(a.lo, w.y);
        a.bad |= __float_as_uint(w.z);
        a.finite += __float_as_uint(w.w);
    }
    return sel_reduce_stats(a, redf, redu);
}

// The stats of x[i0, i1).
__device__ SelStats sel_part_stats(const float* __restrict__ x, int i0, int i1, float* redf, unsigned long long* redu) {
    SelStats a{-INFINITY, INFINITY, 0, 0};
#pragma unroll 4
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        const float v = x[i];
        a.bad |= isnan(v) || v == INFINITY;
        a.m = fmaxf(a.m, v);
        if (v != -INFINITY) {
            a.lo = fminf(a.lo, v);
            ++a.finite;
        }
    }
    return sel_reduce_stats(a, redf, redu);
}

// Adds x[i0, i1)'s counts (and with `has_p` fixed-point masses) to the row's histogram
// g_cnt / g_mass, through the block's own (cnt, mass: SEL_BINS each, in shared memory).
__device__ void sel_part_hist(const float* __restrict__ x, int i0, int i1, float lo, float scale, float m, float inv_t,
                              bool has_p, uint32_t* cnt, unsigned long long* mass, uint32_t* __restrict__ g_cnt,
                              unsigned long long* __restrict__ g_mass) {
    for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {
        cnt[b] = 0;
        mass[b] = 0;
    }
    __syncthreads();
#pragma unroll 4
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        const float v = x[i];
        const int b = sel_bin(v, lo, scale);
        if (b >= 0) {
            atomicAdd(&cnt[b], 1u);
            if (has_p) atomicAdd(&mass[b], (unsigned long long)sel_fix(sel_weight(v, m, inv_t)));
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {
        if (cnt[b]) atomicAdd(&g_cnt[b], cnt[b]);
        if (mass[b]) atomicAdd(&g_mass[b], mass[b]);
    }
}

// The bin scale of a row: SEL_BINS equal bins from lo to m.
__device__ __forceinline__ float sel_scale(float m, float lo) {
    const float span = m - lo;
    return span > 0.f && isfinite(span) ? (float)(SEL_BINS - 1) / span : 0.f;
}

// Whether a row's selection cuts by top-k or top-p (then its histogram is built by parts).
__device__ __forceinline__ bool sel_cuts(const SelParam& p, uint32_t finite, bool* has_p) {
    const bool has_k = p.top_k > 0 && p.top_k < finite;
    *has_p = p.top_p < 1.f;
    return p.mode == SEL_SAMPLE && (has_k || *has_p);
}

// Grid (parts, rows). parts: [rows, parts]; the histogram: [rows, SEL_BINS] counts and masses.
extern "C" __global__ void __launch_bounds__(SEL_PART_THREADS)
    silica_select_stats(const float* __restrict__ logits, int vocab, SelStats* __restrict__ parts,
                        uint32_t* __restrict__ g_cnt, unsigned long long* __restrict__ g_mass) {
    __shared__ float redf[32];
    __shared__ unsigned long long redu[32];
    pdl_enter();
    const int row = blockIdx.y, nparts = gridDim.x;
    for (int b = blockIdx.x * SEL_PART_THREADS + threadIdx.x; b < SEL_BINS; b += nparts * SEL_PART_THREADS) {
        g_cnt[(size_t)row * SEL_BINS + b] = 0;
        g_mass[(size_t)row * SEL_BINS + b] = 0;
    }
    const int per = (vocab + nparts - 1) / nparts;
    const int i0 = blockIdx.x * per, i1 = min(vocab, i0 + per);
    const SelStats r = sel_part_stats(logits + (size_t)row * vocab, i0, i1, redf, redu);
    if (threadIdx.x == 0) parts[(size_t)row * nparts + blockIdx.x] = r;
}

// Grid (parts, rows), after silica_select_stats on the same parts.
extern "C" __global__ void __launch_bounds__(SEL_PART_THREADS)
    silica_select_hist(const float* __restrict__ logits, int vocab, const SelParam* __restrict__ params,
                       const SelStats* __restrict__ parts, uint32_t* __restrict__ g_cnt,
                       unsigned long long* __restrict__ g_mass) {
    __shared__ uint32_t cnt[SEL_BINS];
    __shared__ unsigned long long mass[SEL_BINS];
    __shared__ float redf[32];
    __shared__ unsigned long long redu[32];
    pdl_enter();
    const int row = blockIdx.y, nparts = gridDim.x;
    const SelParam p = params[row];
    const SelStats st = sel_row_stats(parts + (size_t)row * nparts, nparts, redf, redu);
    bool has_p;
    if (st.bad || st.m == -INFINITY || !sel_cuts(p, st.finite, &has_p)) return;
    const int per = (vocab + nparts - 1) / nparts;
    const int i0 = blockIdx.x * per, i1 = min(vocab, i0 + per);
    sel_part_hist(logits + (size_t)row * vocab, i0, i1, st.lo, sel_scale(st.m, st.lo), st.m, p.inv_temp, has_p, cnt,
                  mass, g_cnt + (size_t)row * SEL_BINS, g_mass + (size_t)row * SEL_BINS);
}

// The cut of a sampled row (SEL_SAMPLE: the kept tokens are those at or above it in composite
// order, with a weight of at least min_p), from its stats `st` and, when it cuts by top-k or
// top-p, its histogram in sh.cnt / sh.mass. `gather(bin)` puts the bin's elements of the whole
// row into sh.sorted, sorted, and returns how many (0: more than SEL_CAP); the radix fallback
// reads the row itself (one block, SEL_THREADS threads: `range` ids per warp).
template <typename G>
__device__ unsigned long long sel_sample_cut(const float* __restrict__ x, int vocab, int range, const SelParam& p,
                                             const SelStats& st, SelShared& sh, G gather) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float m = st.m, lo = st.lo, scale = sel_scale(m, lo), inv_t = p.inv_temp;
    const uint32_t finite = st.finite;
    const bool has_k = p.top_k > 0 && p.top_k < finite;
    const bool has_p = p.top_p < 1.f;
    unsigned long long cut = 0;  // below every finite logit: all kept
    bool fast = true;
    if (has_k || has_p) {
        int top_bin = -1;                       // the top-k cut's bin
        unsigned long long kept_mass = 0;       // mass of the top-k set (has_k && has_p)
        uint32_t jk = 0;                        // the top-k cut's index in the top-k bin's list
        if (has_k) {
            sel_find_bin<false>(0, 0, p.top_k, sh);
            const int bin = sh.bin;
            const unsigned long long above = sh.above;
            if (gather(bin) == 0) {
                fast = false;
            } else {
                jk = p.top_k - above - 1;
                cut = sh.sorted[jk];
                top_bin = bin;
                if (has_p) {
                    unsigned long long s = 0;
                    for (int b = bin + 1 + threadIdx.x; b < SEL_BINS; b += blockDim.x) s += sh.mass[b];
                    for (uint32_t a = threadIdx.x; a <= jk; a += blockDim.x)
                        s += sel_fix(sel_weight(sel_unkey((uint32_t)(sh.sorted[a] >> 32)), m, inv_t));
                    unsigned long long before;
                    sel_warp_scan(s, sh.redu, &before, &kept_mass);
                }
            }
        }
        if (fast && has_p) {
            unsigned long long total = kept_mass;
            if (!has_k) {
                unsigned long long s = 0, before;
                for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) s += sh.mass[b];
                sel_warp_scan(s, sh.redu, &before, &total);
            }
            const unsigned long long target = sel_top_p_target(p.top_p, total);
            // Bins strictly above the top-k bin first; then inside the top-k bin's sorted list.
            const int lowest = has_k ? top_bin + 1 : 0;
            int bin = -1;
            unsigned long long above = 0;
            if (lowest < SEL_BINS) {
                sel_find_bin<true>(lowest, 0, target, sh);
                bin = sh.bin;
                above = sh.above;
            }
            if (bin >= 0) {
                const uint32_t np = gather(bin);
                if (np == 0)
                    fast = false;
                else
                    cut = sel_walk_sorted(np, above, target, m, inv_t, sh);
            } else {
                // Every bin above the top-k bin is kept; the cut is inside its list.
                unsigned long long s = 0, before, mass_above;
                for (int b = top_bin + 1 + threadIdx.x; b < SEL_BINS; b += blockDim.x) s += sh.mass[b];
                sel_warp_scan(s, sh.redu, &before, &mass_above);
                cut = sel_walk_sorted(jk + 1, mass_above, target, m, inv_t, sh);
            }
        }
    }
    if (!fast) {
        // A bin too full to gather (thousands of equal logits): radix selection.
        uint32_t tau = 0;
        unsigned long long ties = ~0ull;
        if (has_k) tau = sel_radix<false>(x, vocab, range, 0, m, 1.f, p.top_k, &ties, sh);
        if (has_p) {
            unsigned long long above = 0;
            for (int j = 0; j < range; j += 32) {
                const int i = warp * range + j + lane;
                if (i < vocab && sel_key(x[i]) > tau) above += sel_fix(sel_weight(x[i], m, inv_t));
            }
            unsigned long long before, m_gt;
            sel_warp_scan(above, sh.redu, &before, &m_gt);
            const unsigned long long w_tau = has_k ? sel_fix(sel_weight(sel_unkey(tau), m, inv_t)) : 0;
            const unsigned long long total = m_gt + (has_k ? ties * w_tau : 0);
            const unsigned long long target = sel_top_p_target(p.top_p, total);
            if (m_gt >= target) {
                unsigned long long rem;
                tau = sel_radix<true>(x, vocab, range, tau, m, inv_t, target, &rem, sh);
                const unsigned long long w = sel_fix(sel_weight(sel_unkey(tau), m, inv_t));
                ties = (rem + w - 1) / w;
            } else {
                ties = min(ties, (target - m_gt + w_tau - 1) / w_tau);
            }
        }
        cut = ties == ~0ull ? 0 : sel_composite(tau, sel_tie_id(x, vocab, range, tau, ties - 1, sh));
    }
    return cut;
}


extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    silica_select(const float* __restrict__ logits, int vocab, const SelParam* __restrict__ params,
                  uint32_t* __restrict__ out, int nout, const SelStats* __restrict__ parts, int nparts,
                  const uint32_t* __restrict__ g_cnt, const unsigned long long* __restrict__ g_mass,
                  unsigned long long* __restrict__ cuts) {
    __shared__ SelShared sh;
    pdl_enter();
    // A row that is not drawn by silica_select_mass / silica_select_draw (greedy, top-n, or
    // not finite) is decided here; a sampled row's cut is written at the end.
    if (threadIdx.x == 0) cuts[blockIdx.x] = SEL_DECIDED;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* x = logits + (size_t)blockIdx.x * vocab;
    const SelParam p = params[blockIdx.x];
    uint32_t* o = out + (size_t)blockIdx.x * nout * 2;
    const int range = (vocab + SEL_THREADS - 1) / SEL_THREADS * 32;

    // The max and the smallest finite logit; whether some logit is NaN or +inf; how many are
    // finite: from silica_select_stats' parts.
    const SelStats st = sel_row_stats(parts + (size_t)blockIdx.x * nparts, nparts, sh.redf, sh.redu);
    const float m = st.m, lo = st.lo;
    const uint32_t finite = st.finite;
    if (st.bad || m == -INFINITY) {
        if (threadIdx.x == 0) {
            o[0] = 0xffffffffu;
            o[1] = 0;
        }
        return;
    }
    const float scale = sel_scale(m, lo);

    if (p.mode == SEL_GREEDY) {
        uint32_t best = 0xffffffffu;
        sel_each(x, vocab, range, [&](float v, int i) {
            if (v == m) best = min(best, (uint32_t)i);
        });
        for (int off = 16; off > 0; off >>= 1) best = min(best, __shfl_xor_sync(SEL_FULL, best, off));
        if (lane == 0) sh.redi[warp] = best;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 0; w < SEL_WARPS; ++w) best = min(best, sh.redi[w]);
            o[0] = best;
            o[1] = 0;
        }
        return;
    }

    if (p.mode == SEL_TOPN) {
        float s = 0.f;
        sel_each(x, vocab, range, [&](float v, int) { s += expf(v - m); });
        const float lse = m + logf(block_reduce<false>(s, sh.redf));
        const uint32_t n = min(min(p.n, finite), (uint32_t)nout);
        // The cut: the n-th element in (logit desc, id asc) order.
        sel_hist<false>(x, vocab, range, lo, scale, m, 1.f, sh);
        sel_find_bin<false>(0, 0, n, sh);
        const int bin = sh.bin;
        const unsigned long long above = sh.above;
        const uint32_t nb = sel_gather(x, vocab, range, lo, scale, bin, sh);
        unsigned long long cut;
        if (nb > 0) {
            cut = sh.sorted[n - above - 1];
        } else {
            unsigned long long rem;
            const uint32_t tau = sel_radix<false>(x, vocab, range, 0, m, 1.f, n, &rem, sh);
            cut = sel_composite(tau, sel_tie_id(x, vocab, range, tau, rem - 1, sh));
        }
        if (threadIdx.x == 0) sh.outn = 0;
        for (int k = n + threadIdx.x; k < nout; k += blockDim.x) o[2 * k] = 0xffffffffu;
        __syncthreads();
        sel_each(x, vocab, range, [&](float v, int i) {
            if (v != -INFINITY && sel_composite(sel_key(v), i) >= cut) {
                const uint32_t slot = atomicAdd(&sh.outn, 1u);
                o[2 * slot] = (uint32_t)i;
                o[2 * slot + 1] = __float_as_uint(v - lse);
            }
        });
        return;
    }

    // SEL_SAMPLE: the histogram silica_select_hist built (masses only with top-p), then the cut.
    bool has_p;
    if (sel_cuts(p, finite, &has_p)) {
        const uint32_t* gc = g_cnt + (size_t)blockIdx.x * SEL_BINS;
        const unsigned long long* gm = g_mass + (size_t)blockIdx.x * SEL_BINS;
        for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {
            sh.cnt[b] = gc[b];
            sh.mass[b] = has_p ? gm[b] : 0;
        }
        __syncthreads();
    }
    const unsigned long long cut = sel_sample_cut(x, vocab, range, p, st, sh, [&](int bin) {
        return sel_gather(x, vocab, range, lo, scale, bin, sh);
    });
    // The draw over the kept tokens: silica_select_mass and silica_select_draw.
    if (threadIdx.x == 0) cuts[blockIdx.x] = cut;
}

// A token's fixed-point weight if it is kept (at or above the cut, weight at least min_p),
// else 0.
__device__ __forceinline__ uint32_t sel_amount(float v, int i, float m, float inv_t, unsigned long long cut,
                                               float min_p) {
    const float w = sel_weight(v, m, inv_t);
    return v != -INFINITY && sel_composite(sel_key(v), i) >= cut && w >= min_p ? sel_fix(w) : 0;
}

// The kept mass of x[i0, i1) (every thread gets it).
__device__ unsigned long long sel_part_mass(const float* __restrict__ x, int i0, int i1, float m, const SelParam& p,
                                            unsigned long long cut, unsigned long long* redu) {
    unsigned long long mine = 0;
#pragma unroll 4
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) mine += sel_amount(x[i], i, m, p.inv_temp, cut, p.min_p);
    return sel_block_sum(mine, redu);
}

// The part (of `nparts`, kept masses pm, read past L1) that holds the draw u * total, and the
// draw's target inside it, into *part_at / *t_part (shared; every thread sees them after the
// closing barrier). Warp 0: each lane sums a run of parts, a scan finds the run that passes the
// target, its lane walks it.
__device__ void sel_draw_at(const unsigned long long* __restrict__ pm, int nparts, double u, int* part_at,
                            unsigned long long* t_part) {
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const int per = (nparts + 31) / 32, a0 = min(nparts, lane * per), a1 = min(nparts, a0 + per);
        unsigned long long own = 0;
        for (int b = a0; b < a1; ++b) own += __ldcg(pm + b);
        unsigned long long incl = own;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long t = __shfl_up_sync(SEL_FULL, incl, o);
            if (lane >= o) incl += t;
        }
        const unsigned long long total = __shfl_sync(SEL_FULL, incl, 31);
        // total >= 2^26: the most likely token has weight 1 and survives every filter.
        unsigned long long target = (unsigned long long)(u * (double)total);
        if (target >= total) target = total - 1;
        unsigned long long before = incl - own;
        if (before <= target && target < incl) {
            int b = a0;
            while (before + __ldcg(pm + b) <= target) before += __ldcg(pm + b++);
            *part_at = b;
            *t_part = target - before;
        }
    }
    __syncthreads();
}

// The draw inside x[start, end): the first id whose running kept mass exceeds t_in, written to
// o[0..2] by the thread that finds it. Each thread sums a run of consecutive ids, a scan over
// the threads finds the run where the mass passes the target, and that thread walks its run.
__device__ void sel_draw_in(const float* __restrict__ x, int start, int end, unsigned long long t_in, float m,
                            const SelParam& p, unsigned long long cut, unsigned long long* redu, uint32_t* o) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int per = (end - start + (int)blockDim.x - 1) / (int)blockDim.x;
    const int i0 = start + threadIdx.x * per, i1 = min(end, i0 + per);
    auto kept = [&](int i) -> uint32_t { return sel_amount(x[i], i, m, p.inv_temp, cut, p.min_p); };
    unsigned long long run_sum = 0;
    for (int i = i0; i < i1; ++i) run_sum += kept(i);
    unsigned long long incl = run_sum;
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned long long t = __shfl_up_sync(SEL_FULL, incl, off);
        if (lane >= off) incl += t;
    }
    __syncthreads();
    if (lane == 31) redu[warp] = incl;
    __syncthreads();
    unsigned long long excl = incl - run_sum;
    for (int w = 0; w < warp; ++w) excl += redu[w];
    if (excl <= t_in && t_in < excl + run_sum) {
        unsigned long long run = excl;
        for (int i = i0; i < i1; ++i) {
            run += kept(i);
            if (run > t_in) {
                o[0] = (uint32_t)i;
                o[1] = 0;
                break;
            }
        }
    }
}

// The kept mass of each part of a sampled row (grid (parts, rows), SEL_PART_THREADS threads;
// after silica_select): pmass: [rows, parts].
extern "C" __global__ void __launch_bounds__(SEL_PART_THREADS)
    silica_select_mass(const float* __restrict__ logits, int vocab, const SelParam* __restrict__ params,
                       const SelStats* __restrict__ parts, const unsigned long long* __restrict__ cuts,
                       unsigned long long* __restrict__ pmass) {
    __shared__ float redf[32];
    __shared__ unsigned long long redu[32];
    pdl_enter();
    const int row = blockIdx.y, nparts = gridDim.x;
    const unsigned long long cut = cuts[row];
    if (cut == SEL_DECIDED) return;
    const SelParam p = params[row];
    const float m = sel_row_stats(parts + (size_t)row * nparts, nparts, redf, redu).m;
    const int per = (vocab + nparts - 1) / nparts;
    const int i0 = blockIdx.x * per, i1 = min(vocab, i0 + per);
    const unsigned long long t = sel_part_mass(logits + (size_t)row * vocab, i0, i1, m, p, cut, redu);
    if (threadIdx.x == 0) pmass[(size_t)row * nparts + blockIdx.x] = t;
}

// The draw of a sampled row (grid (rows), SEL_THREADS threads; after silica_select_mass): the
// first token, in id order, whose running kept mass exceeds u * total, found in the part that
// holds it.
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    silica_select_draw(const float* __restrict__ logits, int vocab, const SelParam* __restrict__ params,
                       const SelStats* __restrict__ parts, int nparts, const unsigned long long* __restrict__ cuts,
                       const unsigned long long* __restrict__ pmass, uint32_t* __restrict__ out, int nout) {
    __shared__ float redf[32];
    __shared__ unsigned long long redu[32];
    __shared__ int part_at;
    __shared__ unsigned long long t_part;
    pdl_enter();
    const int row = blockIdx.x;
    const unsigned long long cut = cuts[row];
    if (cut == SEL_DECIDED) return;
    const SelParam p = params[row];
    const float m = sel_row_stats(parts + (size_t)row * nparts, nparts, redf, redu).m;
    sel_draw_at(pmass + (size_t)row * nparts, nparts, p.u, &part_at, &t_part);
    const int per_part = (vocab + nparts - 1) / nparts;
    const int start = part_at * per_part, end = min(vocab, start + per_part);
    sel_draw_in(logits + (size_t)row * vocab, start, end, t_part, m, p, cut, redu, out + (size_t)row * nout * 2);
}

// ---- Sampled rows in one kernel --------------------------------------------------------------
// A step whose rows all sample (SEL_SAMPLE) takes silica_select_sample instead of the five
// kernels above: grid (parts, rows), SEL_THREADS threads, launched cooperatively so that every
// block is resident at once; the passes over a row are separated by a barrier of its blocks.
// Each block works on its part and, after a barrier, reads what the others wrote (past L1).
// What needs the whole row (the bins of the cuts, the sorted candidates, the cut, the part that
// holds the draw) every block works out alike from the same data, so no block waits for
// another's decision. The same integer arithmetic and helpers as the five kernels: the same
// tokens. Five kernels took ~50 µs on a 3B's random-weight logits, mostly the one-block passes
// over the row and the launches between them.
#define SEL_ROUNDS 2  // gathers per row at most: the top-k cut's bin, then the top-p cut's

// The barrier of one row's blocks: `arrive` (zero at launch) counts arrivals; the n-th barrier
// of the row waits for n * gridDim.x of them.
__device__ void sel_row_barrier(uint32_t* arrive, uint32_t target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(arrive, 1u);
        uint32_t seen;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(arrive) : "memory");
        } while (seen < target);
        __threadfence();
    }
    __syncthreads();
}

// Appends x[i0, i1)'s elements of bin `bin` to `list` (its length in *n, which the row's blocks
// share; entries past SEL_CAP are counted, not stored), one atomic per warp and load.
__device__ void sel_part_gather(const float* __restrict__ x, int i0, int i1, float lo, float scale, int bin,
                                unsigned long long* __restrict__ list, uint32_t* n) {
    const int lane = threadIdx.x & 31;
    for (int j = i0 + (int)threadIdx.x - lane; j < i1; j += blockDim.x) {
        const int i = j + lane;
        float v = 0.f;
        bool in = false;
        if (i < i1) {
            v = x[i];
            in = sel_bin(v, lo, scale) == bin;
        }
        const uint32_t mask = __ballot_sync(SEL_FULL, in);
        if (mask) {
            uint32_t base = 0;
            if (lane == 0) base = atomicAdd(n, (uint32_t)__popc(mask));
            base = __shfl_sync(SEL_FULL, base, 0);
            const uint32_t slot = base + __popc(mask & ((1u << lane) - 1));
            if (in && slot < SEL_CAP) list[slot] = sel_composite(sel_key(v), (uint32_t)i);
        }
    }
}

// Grid (parts, rows), SEL_THREADS threads, cooperative; every row SEL_SAMPLE. out: [rows, nout,
// 2]; parts: [rows, parts]; g_cnt / g_mass: [rows, SEL_BINS]; lists: [rows, SEL_ROUNDS,
// SEL_CAP]; sync: [rows, 4] u32, zero at launch (the arrivals, then each round's list length);
// pmass: [rows, parts].
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    silica_select_sample(const float* __restrict__ logits, int vocab, const SelParam* __restrict__ params,
                         uint32_t* __restrict__ out, int nout, SelStats* __restrict__ parts, uint32_t* __restrict__ g_cnt,
                         unsigned long long* __restrict__ g_mass, unsigned long long* __restrict__ lists,
                         uint32_t* __restrict__ sync, unsigned long long* __restrict__ pmass) {
    __shared__ SelShared sh;
    const int row = blockIdx.y, nparts = gridDim.x, part = blockIdx.x;
    const float* x = logits + (size_t)row * vocab;
    const SelParam p = params[row];
    uint32_t* o = out + (size_t)row * nout * 2;
    uint32_t* row_sync = sync + (size_t)row * 4;
    uint32_t barriers = 0;
    auto barrier = [&]() { sel_row_barrier(row_sync, ++barriers * nparts); };
    const int per = (vocab + nparts - 1) / nparts;
    const int i0 = part * per, i1 = min(vocab, i0 + per);
    uint32_t* gc = g_cnt + (size_t)row * SEL_BINS;
    unsigned long long* gm = g_mass + (size_t)row * SEL_BINS;

    // 1. The part's stats; the row's histogram zeroed.
    const SelStats mine = sel_part_stats(x, i0, i1, sh.redf, sh.redu);
    if (threadIdx.x == 0) parts[(size_t)row * nparts + part] = mine;
    for (int b = part * blockDim.x + threadIdx.x; b < SEL_BINS; b += nparts * blockDim.x) {
        gc[b] = 0;
        gm[b] = 0;
    }
    barrier();
    const SelStats st = sel_row_stats(parts + (size_t)row * nparts, nparts, sh.redf, sh.redu);
    if (st.bad || st.m == -INFINITY) {
        if (part == 0 && threadIdx.x == 0) {
            o[0] = 0xffffffffu;
            o[1] = 0;
        }
        return;
    }
    const float scale = sel_scale(st.m, st.lo);
    // 2. The part's histogram into the row's, which every block then reads whole.
    bool has_p;
    if (sel_cuts(p, st.finite, &has_p)) {
        sel_part_hist(x, i0, i1, st.lo, scale, st.m, p.inv_temp, has_p, sh.cnt, sh.mass, gc, gm);
        barrier();
        for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {
            sh.cnt[b] = __ldcg(gc + b);
            sh.mass[b] = has_p ? __ldcg(gm + b) : 0;
        }
        __syncthreads();
    }
    // 3. The cut; each gather collects a bin's elements by parts into the round's list.
    int round = 0;
    const int range = (vocab + SEL_THREADS - 1) / SEL_THREADS * 32;
    const unsigned long long cut = sel_sample_cut(x, vocab, range, p, st, sh, [&](int bin) -> uint32_t {
        unsigned long long* list = lists + ((size_t)row * SEL_ROUNDS + round) * SEL_CAP;
        uint32_t* n = row_sync + 1 + round;
        ++round;
        sel_part_gather(x, i0, i1, st.lo, scale, bin, list, n);
        barrier();
        const uint32_t count = __ldcg(n);
        if (count > SEL_CAP) return 0;
        for (uint32_t a = threadIdx.x; a < count; a += blockDim.x) sh.sorted[a] = __ldcg(list + a);
        sel_sort(count, sh);
        return count;
    });
    // 4. The part's kept mass; then the block whose part holds the draw walks it.
    const unsigned long long kept = sel_part_mass(x, i0, i1, st.m, p, cut, sh.redu);
    if (threadIdx.x == 0) pmass[(size_t)row * nparts + part] = kept;
    barrier();
    sel_draw_at(pmass + (size_t)row * nparts, nparts, p.u, &sh.bin, &sh.rem);
    if (sh.bin == part) sel_draw_in(x, i0, i1, sh.rem, st.m, p, cut, sh.redu, o);
}

// Greedy rows alone (every row of the step greedy): the argmax split over ARGMAX_PARTS blocks
// per row, then one warp per row combines the parts (the one-block kernel above spends ~30 µs
// on two passes over a 152k row on one SM). Same result: the largest logit, ties to the lowest
// id; token 0xffffffff for a row with a NaN or +inf logit, or only -inf.
#define ARGMAX_THREADS 256
struct ArgPart {
    float m;        // the part's largest logit (-inf if none is larger)
    uint32_t arg;   // its lowest id (0xffffffff if none)
    uint32_t bad;   // the part holds a NaN or +inf
    uint32_t pad;
};

// Larger logit first, then lower id.
__device__ __forceinline__ void arg_better(float& m, uint32_t& arg, float m2, uint32_t arg2) {
    if (m2 > m || (m2 == m && arg2 < arg)) {
        m = m2;
        arg = arg2;
    }
}

// Grid (parts, rows), ARGMAX_THREADS threads; parts: [rows, parts].
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    silica_argmax_part(const float* __restrict__ logits, int vocab, ArgPart* __restrict__ parts) {
    __shared__ float rm[ARGMAX_THREADS / 32];
    __shared__ uint32_t ra[ARGMAX_THREADS / 32];
    pdl_enter();
    const int row = blockIdx.y, nparts = gridDim.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int per = (vocab + nparts - 1) / nparts;
    const int i0 = blockIdx.x * per, i1 = min(vocab, i0 + per);
    const float* x = logits + (size_t)row * vocab;
    float m = -INFINITY;
    uint32_t arg = 0xffffffffu;
    int bad = 0;
#pragma unroll 4
    for (int i = i0 + threadIdx.x; i < i1; i += ARGMAX_THREADS) {
        const float v = x[i];
        bad |= isnan(v) || v == INFINITY;
        if (v > m) {  // ids rise within a thread: the first of equal logits stays
            m = v;
            arg = (uint32_t)i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const uint32_t a2 = __shfl_xor_sync(0xffffffffu, arg, o);
        arg_better(m, arg, m2, a2);
    }
    if (lane == 0) {
        rm[warp] = m;
        ra[warp] = arg;
    }
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
        for (int w = 1; w < ARGMAX_THREADS / 32; ++w) arg_better(m, arg, rm[w], ra[w]);
        parts[(size_t)row * nparts + blockIdx.x] = ArgPart{m, arg, (uint32_t)bad, 0};
    }
}

// Grid (rows), 32 threads; out: [rows, 2] (token, 0), as silica_select writes for greedy rows.
extern "C" __global__ void silica_argmax_combine(const ArgPart* __restrict__ parts, int nparts,
                                                 uint32_t* __restrict__ out) {
    pdl_enter();
    const int row = blockIdx.x, lane = threadIdx.x;
    float m = -INFINITY;
    uint32_t arg = 0xffffffffu, bad = 0;
    for (int p = lane; p < nparts; p += 32) {
        const ArgPart a = parts[(size_t)row * nparts + p];
        arg_better(m, arg, a.m, a.arg);
        bad |= a.bad;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const uint32_t a2 = __shfl_xor_sync(0xffffffffu, arg, o);
        arg_better(m, arg, m2, a2);
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    if (lane == 0) {
        out[2 * row] = bad || m == -INFINITY ? 0xffffffffu : arg;
        out[2 * row + 1] = 0;
    }
}

// Top-n of rows that all want only their n best tokens (a beam step's candidates; n <=
// TOPN_MAX), in two kernels instead of silica_select's five passes (~74 µs for the 3B's 4 rows
// on the H100): silica_topn_part keeps each part's n best logits (ties: lowest ids) with the
// part's largest logit and its sum of exp(v - max); silica_topn_combine takes the row's n best
// among the parts' candidates (the row's n best are among them) and their log-softmax values.
// The same tokens as SEL_TOPN; output as silica_select writes for SEL_TOPN rows (token
// 0xffffffff past the finite logits, and first for a row with a NaN or +inf logit or only -inf).
#define TOPN_MAX 16
#define TOPN_THREADS 256
struct TopNPart {
    float m;           // the part's largest finite logit (-inf if none)
    float s;           // the sum of exp(v - m) over its finite logits (0 if none)
    uint32_t finite;   // its finite logits
    uint32_t bad;      // it holds a NaN or +inf
    float v[TOPN_MAX];     // its best logits, larger first (-inf past its finite ones)
    uint32_t id[TOPN_MAX]; // their ids (0xffffffff past its finite ones)
};

// The block's best of every thread's (v, id), larger v first, then lower id, to every thread.
// rv, ri: one slot per warp.
__device__ __forceinline__ void topn_best(float& v, uint32_t& id, float* rv, uint32_t* ri) {
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        const uint32_t i2 = __shfl_xor_sync(0xffffffffu, id, o);
        arg_better(v, id, v2, i2);
    }
    if ((threadIdx.x & 31) == 0) {
        rv[threadIdx.x >> 5] = v;
        ri[threadIdx.x >> 5] = id;
    }
    __syncthreads();
    v = rv[0];
    id = ri[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) arg_better(v, id, rv[w], ri[w]);
    __syncthreads();  // rv and ri are written again by the next round
}

// Grid (parts, rows), TOPN_THREADS threads, dynamic shared memory of ceil(vocab / parts) floats;
// parts: [rows, parts]; n <= TOPN_MAX.
extern "C" __global__ void __launch_bounds__(TOPN_THREADS)
    silica_topn_part(const float* __restrict__ logits, int vocab, int n, TopNPart* __restrict__ parts) {
    extern __shared__ float xs[];
    __shared__ float rv[TOPN_THREADS / 32];
    __shared__ uint32_t ri[TOPN_THREADS / 32];
    __shared__ float red[32];
    pdl_enter();
    const int row = blockIdx.y, nparts = gridDim.x, tid = threadIdx.x;
    const int per = (vocab + nparts - 1) / nparts;
    const int i0 = blockIdx.x * per, cnt = max(0, min(vocab, i0 + per) - i0);
    const float* x = logits + (size_t)row * vocab + i0;
    // Each thread's elements (j = tid, tid + TOPN_THREADS, ...) stay its own throughout.
    float m = -INFINITY;
    int bad = 0, finite = 0;
    for (int j = tid; j < cnt; j += TOPN_THREADS) {
        float v = x[j];
        if (isnan(v) || v == INFINITY) {
            bad = 1;
            v = -INFINITY;
        } else if (v != -INFINITY) {
            ++finite;
        }
        xs[j] = v;
        m = fmaxf(m, v);
    }
    m = block_reduce<true>(m, red);
    float s = 0.f;
    if (m != -INFINITY)
        for (int j = tid; j < cnt; j += TOPN_THREADS) s += expf(xs[j] - m);  // exp(-inf) = 0
    s = block_reduce<false>(s, red);
    const float nfin = block_reduce<false>((float)finite, red);
    bad = __syncthreads_or(bad);
    // This thread's best remaining element (the first of equal values: the lowest id).
    float bv = -INFINITY;
    uint32_t bid = 0xffffffffu;
    auto rescan = [&]() {
        bv = -INFINITY;
        bid = 0xffffffffu;
        for (int j = tid; j < cnt; j += TOPN_THREADS)
            if (xs[j] > bv) {
                bv = xs[j];
                bid = (uint32_t)(i0 + j);
            }
    };
    rescan();
    TopNPart* out = parts + (size_t)row * nparts + blockIdx.x;
    for (int k = 0; k < n; ++k) {
        float v = bv;
        uint32_t id = bid;
        topn_best(v, id, rv, ri);  // the same for every thread
        if (v == -INFINITY) {      // no finite element left
            for (int r = k + tid; r < n; r += TOPN_THREADS) {
                out->v[r] = -INFINITY;
                out->id[r] = 0xffffffffu;
            }
            break;
        }
        if (tid == 0) {
            out->v[k] = v;
            out->id[k] = id;
        }
        if (id == bid) {  // ids are unique: one owner, who takes it out
            xs[id - i0] = -INFINITY;
            rescan();
        }
    }
    if (tid == 0) {
        out->m = m;
        out->s = s;
        out->finite = (uint32_t)nfin;
        out->bad = (uint32_t)bad;
    }
}

// Grid (rows), TOPN_THREADS threads, dynamic shared memory of nparts * n * 8 bytes; out:
// [rows, nout, 2] with nout >= n.
extern "C" __global__ void __launch_bounds__(TOPN_THREADS)
    silica_topn_combine(const TopNPart* __restrict__ parts, int nparts, int n, uint32_t* __restrict__ out, int nout) {
    extern __shared__ float cv[];  // the candidates' values, then their ids
    uint32_t* ci = reinterpret_cast<uint32_t*>(cv + nparts * n);
    __shared__ float rv[TOPN_THREADS / 32];
    __shared__ uint32_t ri[TOPN_THREADS / 32];
    __shared__ float red[32];
    pdl_enter();
    const int row = blockIdx.x, tid = threadIdx.x, total = nparts * n;
    const TopNPart* pr = parts + (size_t)row * nparts;
    float m = -INFINITY, finite = 0.f;
    int bad = 0;
    for (int p = tid; p < nparts; p += TOPN_THREADS) {
        m = fmaxf(m, pr[p].m);
        finite += (float)pr[p].finite;
        bad |= pr[p].bad != 0;
    }
    for (int c = tid; c < total; c += TOPN_THREADS) {
        cv[c] = pr[c / n].v[c % n];
        ci[c] = pr[c / n].id[c % n];
    }
    const float mx = block_reduce<true>(m, red);
    float s = 0.f;
    for (int p = tid; p < nparts; p += TOPN_THREADS) {
        const float mp = pr[p].m;
        if (mp != -INFINITY) s += pr[p].s * expf(mp - mx);
    }
    const float sum = block_reduce<false>(s, red);
    const int fin = (int)block_reduce<false>(finite, red);
    bad = __syncthreads_or(bad);  // also publishes cv and ci
    uint32_t* o = out + (size_t)row * nout * 2;
    const int ne = bad || fin == 0 ? 0 : min(min(n, fin), nout);
    for (int k = ne + tid; k < nout; k += TOPN_THREADS) {
        o[2 * k] = 0xffffffffu;
        o[2 * k + 1] = 0;
    }
    if (ne == 0) return;
    const float lse = mx + logf(sum);
    float bv = -INFINITY;
    uint32_t bid = 0xffffffffu;
    int bc = -1;
    auto rescan = [&]() {
        bv = -INFINITY;
        bid = 0xffffffffu;
        bc = -1;
        for (int c = tid; c < total; c += TOPN_THREADS)
            if (cv[c] != -INFINITY && (cv[c] > bv || (cv[c] == bv && ci[c] < bid))) {
                bv = cv[c];
                bid = ci[c];
                bc = c;
            }
    };
    rescan();
    // The candidates hold at least `ne` finite values: every round's best is finite.
    for (int k = 0; k < ne; ++k) {
        float v = bv;
        uint32_t id = bid;
        topn_best(v, id, rv, ri);
        if (tid == 0) {
            o[2 * k] = id;
            o[2 * k + 1] = __float_as_uint(v - lse);
        }
        if (bc >= 0 && id == bid) {
            cv[bc] = -INFINITY;
            rescan();
        }
    }
}

// A 4-beam search step decided on the device, so that the next beam step can be launched
// before the host has read this one's candidates (the host decides the same step from the
// same candidates and checks that both agree; engine_loop.rs, `launch_beams_ahead`).
//
// top: [rows, nout, 2] from silica_topn_combine, each row's k best (token, log-softmax bits),
// best first (token 0xffffffff past the finite ones; the first 0xffffffff for a row that is
// not finite). prm: cum[rows] (f32 bits, the live beams' sums), spare[rows] (a fresh block per
// row for the next step's last block), eos[neos], then blocks[rows, nblk] (each live beam's
// blocks over positions 0..P-1). The same step as BeamSearch::advance (sampling/beam.rs):
// candidates cum[r] + value, ranked by (sum descending in Rust's total order, row, token),
// truncated to k; walking the ranks, an EOS token is skipped (it becomes a hypothesis on the
// host), any other one continues as the next live beam until nb are taken.
// Writes the next step's graph inputs for row r = its beam: ids[r] = token, write_slots[r] =
// the slot of position P in spare[r], table[r, 0..capacity] = the parent's slots below the
// last block, spare[r]'s from there to P, padded with the row's first slot; out = (src, dst)
// block pairs for silica_copy_blocks (the parent's partial last block into spare[r]; the
// spare onto itself when P starts a block), then (parent, token) per row, then 1 when nb beams
// were taken (0: the host discards the step). One block of BEAM_THREADS; rows * k <= BEAM_THREADS.
#define BEAM_THREADS 256

__device__ __forceinline__ uint32_t total_order_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(BEAM_THREADS)
    silica_beam_advance(const uint32_t* __restrict__ top, int rows, int nout, int k, int nb,
                        const uint32_t* __restrict__ prm, int neos, int nblk, int P, int bs, int capacity,
                        uint32_t* __restrict__ ids, uint32_t* __restrict__ write_slots,
                        uint32_t* __restrict__ table, uint32_t* __restrict__ out) {
    __shared__ uint32_t key[BEAM_THREADS];
    __shared__ int valid[BEAM_THREADS];
    __shared__ int order[BEAM_THREADS];
    __shared__ int parent[8];
    __shared__ uint32_t token[8];
    __shared__ int taken;
    pdl_enter();
    const int tid = threadIdx.x, nc = rows * k;
    const uint32_t* cum = prm;
    const uint32_t* spare = prm + rows;
    const uint32_t* eos = prm + 2 * rows;
    const uint32_t* blocks = prm + 2 * rows + neos;
    if (tid < nc) {
        const int r = tid / k, j = tid % k;
        const uint32_t t = top[((size_t)r * nout + j) * 2];
        const float v = __uint_as_float(top[((size_t)r * nout + j) * 2 + 1]);
        const bool ok = t != 0xffffffffu && v > -INFINITY && v == v && v != INFINITY;
        valid[tid] = ok;
        key[tid] = ok ? total_order_key(__fadd_rn(__uint_as_float(cum[r]), v)) : 0u;
        order[tid] = -1;
    }
    if (tid < 8) {
        parent[tid] = tid < rows ? tid : 0;
        token[tid] = 0;
    }
    __syncthreads();
    if (tid < nc && valid[tid]) {
        // Rank: the valid candidates before this one (larger sum; equal sums: lower row, then
        // lower token; the ids of one row are distinct).
        const uint32_t kt = key[tid], tt = top[((size_t)(tid / k) * nout + tid % k) * 2];
        const int rt = tid / k;
        int rank = 0;
        for (int c = 0; c < nc; ++c) {
            if (c == tid || !valid[c]) continue;
            const int rc = c / k;
            const uint32_t tc = top[((size_t)rc * nout + c % k) * 2];
            rank += key[c] > kt || (key[c] == kt && (rc < rt || (rc == rt && tc < tt)));
        }
        order[rank] = tid;
    }
    __syncthreads();
    if (tid == 0) {
        int n = 0;
        for (int rank = 0; rank < k && rank < nc && n < nb; ++rank) {
            const int c = order[rank];
            if (c < 0) break;
            const uint32_t t = top[((size_t)(c / k) * nout + c % k) * 2];
            bool is_eos = false;
            for (int e = 0; e < neos; ++e) is_eos |= eos[e] == t;
            if (is_eos) continue;
            if (n < rows) {
                parent[n] = c / k;
                token[n] = t;
            }
            ++n;
        }
        taken = n;
    }
    __syncthreads();
    const int tail = (P / bs) * bs;
    for (int i = tid; i < rows * capacity; i += BEAM_THREADS) {
        const int r = i / capacity, p = i % capacity;
        const uint32_t* pb = blocks + (size_t)parent[r] * nblk;
        const int q = p <= P ? p : 0;
        const uint32_t slot = q < tail ? pb[q / bs] * bs + q % bs : spare[r] * bs + q % bs;
        table[i] = slot;
    }
    if (tid < rows) {
        ids[tid] = token[tid];
        write_slots[tid] = spare[tid] * bs + P % bs;
        const uint32_t src = P % bs ? blocks[(size_t)parent[tid] * nblk + P / bs] : spare[tid];
        out[2 * tid] = src;
        out[2 * tid + 1] = spare[tid];
        out[2 * rows + 2 * tid] = parent[tid];
        out[2 * rows + 2 * tid + 1] = token[tid];
    }
    if (tid == 0) out[4 * rows] = taken == nb && nb == rows;
}
