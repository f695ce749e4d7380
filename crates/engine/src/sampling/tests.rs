use super::*;

const LOGITS10: [f32; 10] = [1.0, 2.5, 0.3, -1.0, 2.0, 0.0, 1.7, -0.5, 3.0, 0.8];

fn sampler(p: SamplingParams, v: usize) -> Sampler {
    Sampler::new(p, v)
}

fn draws(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| s.sample(logits, &[], &[]).unwrap().token)
        .collect()
}

fn softmax(x: &[f32], t: f64) -> Vec<f64> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = x.iter().map(|&v| ((v as f64 - m) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn seeded(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn fixed_seed_gives_a_fixed_sequence() {
    let mut s = sampler(seeded(0.8, 42), 10);
    assert_eq!(s.seed(), 42);
    let got = draws(&mut s, &LOGITS10, 20);
    let expected: Vec<u32> = vec![8, 8, 5, 8, 2, 1, 4, 8, 8, 1, 6, 8, 8, 8, 8, 1, 8, 1, 6, 1];
    assert_eq!(got, expected);
    // Independent check: one uniform f64 per draw from the same ChaCha8 stream, inverted
    // through an f64 softmax CDF in token order.
    let p = softmax(&LOGITS10, 0.8);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let reference: Vec<u32> = (0..20)
        .map(|_| {
            let u: f64 = rng.random();
            let mut cum = 0.0;
            p.iter()
                .position(|&pi| {
                    cum += pi;
                    cum > u
                })
                .unwrap_or(9) as u32
        })
        .collect();
    assert_eq!(got, reference);
}

#[test]
fn same_seed_same_tokens_different_seed_differs() {
    let a = draws(&mut sampler(seeded(0.8, 7), 10), &LOGITS10, 50);
    let b = draws(&mut sampler(seeded(0.8, 7), 10), &LOGITS10, 50);
    let c = draws(&mut sampler(seeded(0.8, 8), 10), &LOGITS10, 50);
    assert_eq!(a, b);
    assert_ne!(a, c);
    // An OS-entropy seed is recorded and reproduces the run.
    let mut r = sampler(
        SamplingParams {
            temperature: 0.8,
            ..Default::default()
        },
        10,
    );
    let seed = r.seed();
    let d = draws(&mut r, &LOGITS10, 50);
    assert_eq!(d, draws(&mut sampler(seeded(0.8, seed), 10), &LOGITS10, 50));
}

#[test]
fn empirical_distribution_matches_softmax_at_temperature() {
    let n = 40_000;
    let mut s = sampler(seeded(0.8, 1), 10);
    let mut counts = [0usize; 10];
    for t in draws(&mut s, &LOGITS10, n) {
        counts[t as usize] += 1;
    }
    let p = softmax(&LOGITS10, 0.8);
    for i in 0..10 {
        let f = counts[i] as f64 / n as f64;
        let sd = (p[i] * (1.0 - p[i]) / n as f64).sqrt();
        assert!(
            (f - p[i]).abs() < 5.0 * sd + 1e-4,
            "token {i}: freq {f} vs p {}",
            p[i]
        );
    }
}

#[test]
fn large_vocab_dense_draw_is_sane() {
    // Exercises the block-skipping dense draw: mass concentrated on a few far-apart ids.
    let v = 151_936;
    let mut logits = vec![-20.0f32; v];
    logits[5] = 5.0;
    logits[70_000] = 5.0;
    logits[151_935] = 5.0 + 2f32.ln();
    let mut s = sampler(seeded(1.0, 3), v);
    let mut c = [0usize; 3];
    let n = 4000;
    for _ in 0..n {
        match s.sample(&logits, &[], &[]).unwrap().token {
            5 => c[0] += 1,
            70_000 => c[1] += 1,
            151_935 => c[2] += 1,
            _ => {}
        }
    }
    assert!(c.iter().sum::<usize>() >= n - 10);
    assert!((c[2] as f64 / n as f64 - 0.5).abs() < 0.05, "{c:?}");
    assert!((c[0] as f64 / n as f64 - 0.25).abs() < 0.05, "{c:?}");
}

#[test]
fn top_k_keeps_only_the_k_largest() {
    let p = SamplingParams {
        temperature: 1.5,
        top_k: Some(3),
        seed: Some(5),
        ..Default::default()
    };
    let mut s = sampler(p, 10);
    let mut seen = [false; 10];
    for t in draws(&mut s, &LOGITS10, 1000) {
        assert!([8, 1, 4].contains(&t), "token {t} is outside the top 3");
        seen[t as usize] = true;
    }
    assert!(seen[8] && seen[1] && seen[4]);
}

#[test]
fn top_p_keeps_the_nucleus() {
    // Probabilities 0.4, 0.3, 0.2, 0.1 (shuffled ids): the 0.5 nucleus is {0.4, 0.3}.
    let logits: Vec<f32> = [0.2f32, 0.4, 0.1, 0.3].iter().map(|p| p.ln()).collect();
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.5,
        seed: Some(9),
        ..Default::default()
    };
    let mut s = sampler(p, 4);
    let mut c = [0usize; 4];
    for t in draws(&mut s, &logits, 2000) {
        c[t as usize] += 1;
    }
    assert_eq!((c[0], c[2]), (0, 0), "{c:?}");
    // Renormalised 4:3.
    let f = c[1] as f64 / 2000.0;
    assert!((f - 4.0 / 7.0).abs() < 0.05, "{c:?}");
    // top_p = 0.75 takes the third token too (0.7 < 0.75).
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.75,
        seed: Some(9),
        ..Default::default()
    };
    let got = draws(&mut sampler(p, 4), &logits, 2000);
    assert!(got.contains(&0) && !got.contains(&2));
    // With top-k too: top-k 3 then top-p over the renormalised {0.4, 0.3, 0.2}: 0.4/0.9 < 0.5.
    let p = SamplingParams {
        temperature: 1.0,
        top_k: Some(3),
        top_p: 0.5,
        seed: Some(1),
        ..Default::default()
    };
    let got = draws(&mut sampler(p, 4), &logits, 2000);
    assert!(got.contains(&3) && !got.contains(&0) && !got.contains(&2));
}

#[test]
fn top_p_on_a_large_vocab_grows_the_prefix() {
    // 1000 equally likely tokens and a flat tail: the 0.5 nucleus needs > 64 entries.
    let v = 5000;
    let mut logits = vec![-30.0f32; v];
    for (i, l) in logits.iter_mut().enumerate().take(1000) {
        *l = if i % 2 == 0 { 1.0 } else { 0.0 };
    }
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.5,
        seed: Some(2),
        ..Default::default()
    };
    let mut s = sampler(p, v);
    let n = 3000;
    let mut even = 0;
    for t in draws(&mut s, &logits, n) {
        assert!(t < 1000);
        // Mass of the 500 "1.0" tokens: e/(e+1) = 0.73 > 0.5, so only even ids survive.
        assert_eq!(t % 2, 0, "token {t} outside the nucleus");
        even += 1;
    }
    assert_eq!(even, n);
}

#[test]
fn min_p_drops_tokens_below_threshold() {
    // p = 0.5, 0.3, 0.15, 0.05; min_p 0.2 => threshold 0.1: only token 3 is dropped.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let p = SamplingParams {
        temperature: 1.0,
        min_p: 0.2,
        seed: Some(4),
        ..Default::default()
    };
    let got = draws(&mut sampler(p, 4), &logits, 3000);
    assert!(!got.contains(&3));
    assert!(got.contains(&2));
    // Same through the sparse path (top-k on).
    let p = SamplingParams {
        temperature: 1.0,
        top_k: Some(3),
        min_p: 0.35,
        seed: Some(4),
        ..Default::default()
    };
    let got = draws(&mut sampler(p, 4), &logits, 3000);
    assert!(!got.contains(&3) && !got.contains(&2) && got.contains(&1));
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut s = sampler(SamplingParams::default(), 10);
    assert_eq!(s.sample(&LOGITS10, &[], &[]).unwrap().token, 8);
    let mut s = sampler(SamplingParams::default(), 4);
    assert_eq!(
        s.sample(&[1.0, 3.0, 3.0, f32::NEG_INFINITY], &[], &[])
            .unwrap()
            .token,
        1
    );
    // top_k = 1 is greedy too.
    let p = SamplingParams {
        temperature: 1.0,
        top_k: Some(1),
        ..Default::default()
    };
    assert_eq!(sampler(p, 10).sample(&LOGITS10, &[], &[]).unwrap().token, 8);
}

#[test]
fn logit_bias_bans_and_forces() {
    let p = SamplingParams {
        logit_bias: vec![(8, -100.0)],
        ..Default::default()
    };
    assert_eq!(sampler(p, 10).sample(&LOGITS10, &[], &[]).unwrap().token, 1);
    let p = SamplingParams {
        temperature: 1.0,
        logit_bias: vec![(8, -100.0)],
        seed: Some(1),
        ..Default::default()
    };
    assert!(!draws(&mut sampler(p, 10), &LOGITS10, 1000).contains(&8));
    let p = SamplingParams {
        temperature: 1.0,
        logit_bias: vec![(3, 100.0)],
        seed: Some(1),
        ..Default::default()
    };
    assert!(draws(&mut sampler(p, 10), &LOGITS10, 1000)
        .iter()
        .all(|&t| t == 3));
}

#[test]
fn repetition_penalty_flips_the_argmax() {
    let logits = [2.0f32, 1.5, -1.0];
    let p = SamplingParams {
        repetition_penalty: 1.5,
        ..Default::default()
    };
    let mut s = sampler(p.clone(), 3);
    assert_eq!(s.sample(&logits, &[], &[]).unwrap().token, 0);
    // Token 0 seen in the prompt: 2.0 / 1.5 = 1.333 < 1.5.
    let mut s = sampler(p.clone(), 3);
    assert_eq!(s.sample(&logits, &[0], &[]).unwrap().token, 1);
    // Negative logits are multiplied; tokens seen several times are penalised once.
    let mut s = sampler(p, 3);
    let x = s
        .processed_logits(&logits, &[2, 2], &[0, 2])
        .unwrap()
        .to_vec();
    assert_eq!(x, vec![2.0 / 1.5, 1.5, -1.5]);
}

#[test]
fn presence_and_frequency_penalties_exact() {
    let p = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..Default::default()
    };
    let mut s = sampler(p, 5);
    // The prompt does not count; generated: token 1 twice, token 2 once.
    let x = s
        .processed_logits(&[0.0; 5], &[3, 3, 4], &[1, 2, 1])
        .unwrap()
        .to_vec();
    assert_eq!(x, vec![0.0, -1.0, -0.75, 0.0, 0.0]);
    // Incremental: one more token 2.
    let x = s
        .processed_logits(&[0.0; 5], &[3, 3, 4], &[1, 2, 1, 2])
        .unwrap()
        .to_vec();
    assert_eq!(x, vec![0.0, -1.0, -1.0, 0.0, 0.0]);
    // A shorter history (restart) rebuilds the counts.
    let x = s
        .processed_logits(&[0.0; 5], &[3, 3, 4], &[4])
        .unwrap()
        .to_vec();
    assert_eq!(x, vec![0.0, 0.0, 0.0, 0.0, -0.75]);
    // Same length but a different last token is also detected.
    let x = s
        .processed_logits(&[0.0; 5], &[3, 3, 4], &[0])
        .unwrap()
        .to_vec();
    assert_eq!(x, vec![-0.75, 0.0, 0.0, 0.0, 0.0]);
    // Bias, then repetition, then presence/frequency.
    let p = SamplingParams {
        logit_bias: vec![(1, 1.0)],
        repetition_penalty: 2.0,
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..Default::default()
    };
    let mut s = sampler(p, 3);
    let x = s
        .processed_logits(&[1.0, 1.0, -1.0], &[], &[1, 2])
        .unwrap()
        .to_vec();
    assert_eq!(x, vec![1.0, (1.0 + 1.0) / 2.0 - 0.75, -2.0 - 0.75]);
}

#[test]
fn top_logprobs_values_and_order() {
    let logits = [1.0f32, 2.0, 3.0, 0.5];
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp() + 0.5f64.exp()).ln();
    let p = SamplingParams {
        top_logprobs: Some(3),
        ..Default::default()
    };
    let out = sampler(p, 4).sample(&logits, &[], &[]).unwrap();
    assert_eq!(out.token, 2);
    assert!((out.logprob as f64 - (3.0 - lse)).abs() < 1e-5);
    let ids: Vec<u32> = out.top_logprobs.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![2, 1, 0]);
    for &(t, lp) in &out.top_logprobs {
        assert!(
            (lp as f64 - (logits[t as usize] as f64 - lse)).abs() < 1e-5,
            "{t}: {lp}"
        );
    }
    // Logprobs are those of the processed logits at temperature 1, whatever the temperature
    // and truncation; top_logprobs None => empty.
    let p = SamplingParams {
        temperature: 0.3,
        top_k: Some(2),
        seed: Some(1),
        ..Default::default()
    };
    let out = sampler(p, 4).sample(&logits, &[], &[]).unwrap();
    assert!(out.top_logprobs.is_empty());
    assert!((out.logprob as f64 - (logits[out.token as usize] as f64 - lse)).abs() < 1e-5);
    // More requested than the vocabulary: all of it, -inf last.
    let p = SamplingParams {
        top_logprobs: Some(20),
        ..Default::default()
    };
    let out = sampler(p, 3)
        .sample(&[0.0, f32::NEG_INFINITY, 0.0], &[], &[])
        .unwrap();
    assert_eq!(out.top_logprobs.len(), 3);
    assert_eq!(out.top_logprobs[2], (1, f32::NEG_INFINITY));
    assert!((out.top_logprobs[0].1 - 0.5f32.ln()).abs() < 1e-6);
    assert_eq!(out.top_logprobs[0].0, 0);
}

#[test]
fn non_finite_logits() {
    let p = SamplingParams {
        temperature: 1.0,
        seed: Some(1),
        ..Default::default()
    };
    let mut s = sampler(p.clone(), 4);
    let e = s
        .sample(&[0.0, f32::NAN, 1.0, 0.0], &[], &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("logits") && e.contains("token 1") && e.contains("NaN"),
        "{e}"
    );
    let e = s
        .sample(&[0.0, 1.0, f32::INFINITY, 0.0], &[], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("token 2") && e.contains("+inf"), "{e}");
    let e = s
        .sample(&[f32::NEG_INFINITY; 4], &[], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("-inf"), "{e}");
    // -inf excludes a token.
    let inf = f32::NEG_INFINITY;
    assert!(draws(&mut s, &[inf, 0.0, inf, 0.0], 500)
        .iter()
        .all(|&t| t == 1 || t == 3));
    let mut g = sampler(SamplingParams::default(), 4);
    assert_eq!(
        g.sample(&[inf, -5.0, inf, -7.0], &[], &[]).unwrap().token,
        1
    );
    assert!(g.sample(&[f32::NAN; 4], &[], &[]).is_err());
    // Wrong row length.
    let e = g.sample(&[0.0; 3], &[], &[]).unwrap_err().to_string();
    assert!(e.contains("expected one row of 4 logits"), "{e}");
}

#[test]
fn invalid_params_are_refused_at_sample_time() {
    let p = SamplingParams {
        temperature: 3.5,
        ..Default::default()
    };
    let e = sampler(p, 10)
        .sample(&LOGITS10, &[], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("temperature") && e.contains("3.5"), "{e}");
}

#[test]
fn draw_is_independent_of_the_truncation_path() {
    // top_k = vocab and top_p = 1 are "off": same tokens as no truncation for the same seed.
    let base = SamplingParams {
        temperature: 0.9,
        seed: Some(11),
        ..Default::default()
    };
    let a = draws(&mut sampler(base.clone(), 10), &LOGITS10, 200);
    let b = draws(
        &mut sampler(
            SamplingParams {
                top_k: Some(10),
                ..base.clone()
            },
            10,
        ),
        &LOGITS10,
        200,
    );
    let c = draws(
        &mut sampler(
            SamplingParams {
                top_k: Some(0),
                ..base.clone()
            },
            10,
        ),
        &LOGITS10,
        200,
    );
    assert_eq!(a, b);
    assert_eq!(a, c);
    // top_k = 9 of 10 (sparse path) only differs where the dropped token (3) was drawn.
    let d = draws(
        &mut sampler(
            SamplingParams {
                top_k: Some(9),
                ..base
            },
            10,
        ),
        &LOGITS10,
        200,
    );
    assert!(!d.contains(&3));
}

/// Rough per-token cost over a Qwen-sized vocabulary:
/// `cargo test --release -p silica-engine --lib sampling::tests::bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_full_vocab() {
    let v = 151_936;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let logits: Vec<f32> = (0..v).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect();
    let generated: Vec<u32> = (0..512).map(|i| (i * 97 % v) as u32).collect();
    // A peaked row, closer to a real model's: N(0, 2.5) plus a few clear favourites.
    let mut peaked: Vec<f32> = (0..v)
        .map(|_| {
            let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos() * 2.5) as f32
        })
        .collect();
    for (j, i) in [17usize, 4242, 99_999, 150_000].iter().enumerate() {
        peaked[*i] = 16.0 - j as f32;
    }
    let mx = math::max(&peaked);
    let mut w = vec![0f32; v];
    math::exp_into(&peaked, mx, 1.0 / 0.7, &mut w);
    let mut idx = Vec::new();
    for (name, row) in [("weights", &w), ("logits", &peaked)] {
        let t0 = std::time::Instant::now();
        for _ in 0..300 {
            top_k_sorted(std::hint::black_box(row), 64, &mut idx);
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / 300.0;
        eprintln!("top_k_sorted(64) on peaked {name:20} {us:8.1} us");
    }
    let t0 = std::time::Instant::now();
    let mut s = Sampler::new(
        SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            ..Default::default()
        },
        v,
    );
    for _ in 0..300 {
        std::hint::black_box(s.sample(&peaked, &[], &[]).unwrap());
    }
    eprintln!(
        "{:45} {:8.1} us/token",
        "peaked t=0.7 top_p=0.9",
        t0.elapsed().as_secs_f64() * 1e6 / 300.0
    );
    let cases: Vec<(&str, SamplingParams)> = vec![
        ("greedy", SamplingParams::default()),
        (
            "t=1",
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
        ),
        (
            "t=0.7",
            SamplingParams {
                temperature: 0.7,
                ..Default::default()
            },
        ),
        (
            "t=0.7 top_k=50",
            SamplingParams {
                temperature: 0.7,
                top_k: Some(50),
                ..Default::default()
            },
        ),
        (
            "t=0.7 top_p=0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "t=0.7 k=20 p=0.8 rep=1.1 pres freq top5",
            SamplingParams {
                temperature: 0.7,
                top_k: Some(20),
                top_p: 0.8,
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                top_logprobs: Some(5),
                ..Default::default()
            },
        ),
    ];
    for (name, p) in cases {
        let mut s = Sampler::new(p, v);
        let n = 300;
        let t0 = std::time::Instant::now();
        for i in 0..n {
            std::hint::black_box(
                s.sample(&logits, &[1, 2, 3], &generated[..i.min(512)])
                    .unwrap(),
            );
        }
        eprintln!(
            "{name:45} {:8.1} us/token",
            t0.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}

/// The bucketed nucleus (flat distributions) gives the set the sorted definition gives.
#[test]
fn bucketed_nucleus_matches_the_sorted_definition() {
    use rand::{Rng, SeedableRng};
    for seed in 0..20u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v = 5000 + seed as usize * 997;
        // Nearly flat weights with a few repeated values (ties).
        let w: Vec<f32> = (0..v).map(|i| if i % 97 == 0 { 0.5 } else { rng.random_range(0.3f32..1.0) }).collect();
        for top_p in [0.3f64, 0.9, 0.999] {
            let target = top_p * w.iter().map(|&x| x as f64).sum::<f64>();
            let mut order: Vec<u32> = (0..v as u32).collect();
            order.sort_by(|a, b| w[*b as usize].total_cmp(&w[*a as usize]).then(a.cmp(b)));
            let mut cum = 0f64;
            let n = order.iter().position(|&t| {
                cum += w[t as usize] as f64;
                cum >= target
            }).map_or(v, |j| j + 1);
            let mut want: Vec<u32> = order[..n].to_vec();
            want.sort_unstable();
            let mut idx = Vec::new();
            let got = super::nucleus_by_buckets(&w, target, &mut idx);
            let mut got_set: Vec<u32> = match got {
                Some(k) => idx[..k].to_vec(),
                None => (0..v as u32).collect(),
            };
            got_set.sort_unstable();
            assert_eq!(got_set.len(), want.len(), "seed {seed} top_p {top_p}");
            assert_eq!(got_set, want, "seed {seed} top_p {top_p}");
        }
    }
}

#[test]
fn sort_ids_equals_a_comparison_sort_for_small_and_large_sets() {
    use rand::seq::SliceRandom;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (v, n) in [(100, 0), (100, 37), (151_936, 4_095), (151_936, 4_096), (151_936, 140_000), (151_936, 151_936)] {
        let mut all: Vec<u32> = (0..v as u32).collect();
        all.shuffle(&mut rng);
        let mut got = all[..n].to_vec();
        let mut want = got.clone();
        want.sort_unstable();
        super::sort_ids(&mut got, v);
        assert_eq!(got, want, "v {v} n {n}");
    }
}
