//! Vectorisable numeric kernels over `f32` slices used by the sampler and beam search.
//!
//! The loops keep `LANES` independent accumulators so that LLVM can vectorise reductions
//! (a plain sequential float sum cannot be reordered and stays scalar), and `exp` is a
//! branch-free Cephes-style polynomial (max relative error ~2e-7, i.e. about 2 ulp) instead
//! of a libm call per element: over a 151,936-entry vocabulary this is the hot loop.

const LANES: usize = 16;

/// Below this argument `exp` underflows to zero (and `-inf`, an excluded token, lands here).
const EXP_LO: f32 = -87.33;
/// Above this argument `exp` overflows; arguments are clamped here (callers subtract the max,
/// so they only ever pass values <= 0).
const EXP_HI: f32 = 88.37;

/// `e^x` for `f32`, branch-free so that loops calling it vectorise.
///
/// Exact zero for `x < -87.33` (including `-inf`), NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer with plain SSE2 math.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(EXP_LO, EXP_HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1 rounds to 0.5 in f32
    let y = p * r * r + r + 1.0;
    // `t = ROUND + n` exactly, so its low mantissa bits hold n (in [-126, 127] after the
    // clamp); build 2^n from them with integer ops only (a float->int cast would not vectorise).
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    // NaN propagates through `xc`; underflow (and `-inf`) gives an exact 0.
    let v = y * scale;
    if x < EXP_LO {
        0.0
    } else {
        v
    }
}

/// Largest non-NaN value of `xs` (`-inf` for an empty slice or one without any).
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter()
        .chain(rem)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `Σ exp((x - shift) * scale)` over `xs`, accumulated in `LANES` f32 lanes and combined in f64.
pub(crate) fn exp_sum(xs: &[f32], shift: f32, scale: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { exp_sum_avx2(xs, shift, scale) };
    }
    exp_sum_impl(xs, shift, scale)
}

/// Writes `out[i] = exp((xs[i] - shift) * scale)` and returns the sum (see [`exp_sum`]).
pub(crate) fn exp_into(xs: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { exp_into_avx2(xs, shift, scale, out) };
    }
    exp_into_impl(xs, shift, scale, out)
}

// The same code compiled for AVX2. Only AVX2 (no FMA) is enabled, so every operation rounds
// exactly as in the baseline build and results are bit-identical on every x86_64 CPU: the
// lane structure is fixed by the source, only the vector width changes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_sum_avx2(xs: &[f32], shift: f32, scale: f32) -> f64 {
    exp_sum_impl(xs, shift, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_into_avx2(xs: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    exp_into_impl(xs, shift, scale, out)
}

#[inline(always)]
fn exp_sum_impl(xs: &[f32], shift: f32, scale: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp((v - shift) * scale);
        }
    }
    let mut s: f64 = acc.iter().map(|&a| a as f64).sum();
    for &v in rem {
        s += exp((v - shift) * scale) as f64;
    }
    s
}

#[inline(always)]
fn exp_into_impl(xs: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    debug_assert_eq!(xs.len(), out.len());
    let mut acc = [0f32; LANES];
    let n = xs.len().min(out.len());
    let (xs, out) = (&xs[..n], &mut out[..n]);
    let split = n - n % LANES;
    for (c, o) in xs[..split]
        .chunks_exact(LANES)
        .zip(out[..split].chunks_exact_mut(LANES))
    {
        for ((a, &v), o) in acc.iter_mut().zip(c).zip(o.iter_mut()) {
            let e = exp((v - shift) * scale);
            *o = e;
            *a += e;
        }
    }
    let mut s: f64 = acc.iter().map(|&a| a as f64).sum();
    for (&v, o) in xs[split..].iter().zip(out[split..].iter_mut()) {
        let e = exp((v - shift) * scale);
        *o = e;
        s += e as f64;
    }
    s
}

/// Plain sum of `xs` in `LANES` f32 lanes, combined in f64.
pub(crate) fn sum(xs: &[f32]) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s: f64 = acc.iter().map(|&a| a as f64).sum();
    for &v in rem {
        s += v as f64;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            let rel = ((got - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_3;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn reductions() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 * 0.1 - 3.0)
            .collect();
        assert_eq!(max(&xs), 7.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN, 1.0]), 1.0);
        let want: f64 = xs.iter().map(|&v| ((v - 7.0) as f64 * 0.5).exp()).sum();
        assert!((exp_sum(&xs, 7.0, 0.5) - want).abs() / want < 1e-6);
        let mut out = vec![0.0; xs.len()];
        let s = exp_into(&xs, 7.0, 0.5, &mut out);
        assert!((s - want).abs() / want < 1e-6);
        assert!((sum(&out) - want).abs() / want < 1e-6);
        assert!((out[3] as f64 - ((xs[3] - 7.0) as f64 * 0.5).exp()).abs() < 1e-6);
        // The AVX2 build and the baseline build agree bit for bit.
        let mut out2 = vec![0.0; xs.len()];
        assert_eq!(exp_into_impl(&xs, 7.0, 0.5, &mut out2), s);
        assert_eq!(out, out2);
        assert_eq!(exp_sum_impl(&xs, 7.0, 0.5), exp_sum(&xs, 7.0, 0.5));
    }
}
#[cfg(test)]
mod bench {
    #[test]
    #[ignore]
    fn bench_kernels() {
        let v = 151_936;
        let xs: Vec<f32> = (0..v)
            .map(|i| ((i * 7919) % 2000) as f32 * 0.01 - 10.0)
            .collect();
        let mut out = vec![0f32; v];
        let n = 200;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(super::max(std::hint::black_box(&xs)));
        }
        eprintln!("max {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(super::exp_sum(std::hint::black_box(&xs), 10.0, 1.0));
        }
        eprintln!(
            "exp_sum {:.1} us",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(super::exp_into(
                std::hint::black_box(&xs),
                10.0,
                1.0,
                &mut out,
            ));
        }
        eprintln!(
            "exp_into {:.1} us",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(super::sum(std::hint::black_box(&xs)));
        }
        eprintln!("sum {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
        let t = std::time::Instant::now();
        for _ in 0..n {
            let s: f32 = std::hint::black_box(&xs).iter().map(|x| x.exp()).sum();
            std::hint::black_box(s);
        }
        eprintln!(
            "libm exp {:.1} us",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
        let t = std::time::Instant::now();
        for _ in 0..n {
            let mut l = std::hint::black_box(&xs).clone();
            l[3] += 1.0;
            std::hint::black_box(&l);
        }
        eprintln!("clone {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
}
