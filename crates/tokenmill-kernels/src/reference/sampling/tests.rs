use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A fresh generator each run; its seed is printed so a failure replays.
fn fresh_rng() -> StdRng {
    let seed: u64 = rand::rng().random();
    eprintln!("rng seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn logits(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..=scale)).collect()
}

fn sampling(t: f32, k: u32, p: f32, seed: u64, step: u64) -> SamplingParamsRow {
    let (temperature, top_k, top_p) = (t, k, p);
    let num_logprobs = 0;
    SamplingParamsRow {
        temperature,
        top_k,
        top_p,
        seed,
        step,
        num_logprobs,
    }
}

fn one(row: &[f32], p: SamplingParamsRow) -> SampledRow {
    let mut rows = sample_rows(row, row.len(), &[p]).expect("valid call");
    rows.pop().expect("one row")
}

/// Indices by descending logit, lowest index first on ties.
fn sorted(row: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    order
}

/// The tokens the kernel's cut keeps.
fn kept(row: &[f32], p: &SamplingParamsRow) -> Vec<bool> {
    let prepared = Prepared::new(row);
    let block = Block {
        threads: sampling_geometry(1, row.len()).unwrap().threads as usize,
    };
    let cut = prepared.cut(p, &block);
    (0..row.len())
        .map(|i| order_key(prepared.scaled(i, p.temperature)) >= cut)
        .collect()
}

/// The plain top-k/top-p set: sort, take k, then the shortest prefix
/// holding top_p of the mass (f64), with ties at each threshold kept.
fn nucleus(row: &[f32], temperature: f32, top_k: usize, top_p: f64) -> Vec<bool> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: Vec<f32> = row.iter().map(|l| (l - max) / temperature).collect();
    let order = sorted(&z);
    let k = if top_k == 0 { z.len() } else { top_k };
    let tau_k = z[order[k.min(z.len()) - 1]];
    let kept: Vec<usize> = order.iter().cloned().filter(|&i| z[i] >= tau_k).collect();
    let total: f64 = kept.iter().map(|&i| f64::from(z[i]).exp()).sum();
    let mut tau = tau_k;
    let mut mass = 0.0;
    for &i in &kept {
        mass += f64::from(z[i]).exp();
        tau = z[i];
        if top_p < 1.0 && mass >= top_p * total {
            break;
        }
    }
    z.iter().map(|&v| v >= tau).collect()
}

fn log_softmax_f64(row: &[f32]) -> Vec<f64> {
    let row: Vec<f64> = row.iter().map(|&l| f64::from(l)).collect();
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let norm = row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    row.iter().map(|l| l - max - norm).collect()
}

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn portable_exp_and_ln_are_within_an_ulp() {
    let mut rng = fresh_rng();
    let mut xs: Vec<f32> = (0..200_000)
        .map(|_| rng.random_range(-103.9..88.7))
        .collect();
    xs.extend((0..20_000).map(|_| rng.random_range(-1e-3..1e-3)));
    xs.extend([0.0, -0.0, 1.0, -1.0, 88.7, -87.0, -100.0, -103.9]);
    for x in xs {
        let (got, want) = (portable_exp(x), f64::from(x).exp() as f32);
        assert!(ulps(got, want) <= 1, "exp({x}) = {got} not {want}");
    }
    for _ in 0..200_000 {
        // Every positive finite float, subnormals included, by its bits.
        let x = f32::from_bits(rng.random_range(1..0x7f80_0000));
        let (got, want) = (portable_ln(x), f64::from(x).ln() as f32);
        assert!(ulps(got, want) <= 1, "ln({x}) = {got} not {want}");
    }
    assert_eq!(portable_exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(portable_exp(-200.0), 0.0);
    assert_eq!(portable_exp(100.0), f32::INFINITY);
    assert!(portable_exp(f32::NAN).is_nan());
    assert_eq!(portable_ln(1.0), 0.0);
    assert_eq!(portable_ln(0.0), f32::NEG_INFINITY);
    assert_eq!(portable_ln(f32::INFINITY), f32::INFINITY);
    assert!(portable_ln(-1.0).is_nan());
}

#[test]
fn uniform_is_inside_the_unit_interval_and_reproducible() {
    let mut rng = fresh_rng();
    let (seed, step) = (rng.random(), rng.random());
    let draws: Vec<f32> = (0..50_000).map(|i| uniform(seed, step, i)).collect();
    assert!(draws.iter().all(|&u| u > 0.0 && u < 1.0 && 1.0 - u < 1.0));
    let mean = draws.iter().map(|&u| f64::from(u)).sum::<f64>() / draws.len() as f64;
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    assert_eq!(uniform(seed, step, 7), uniform(seed, step, 7));
    assert_ne!(uniform(seed, step, 7), uniform(seed, step + 1, 7));
    assert!((0..10_000)
        .map(|i| gumbel(seed, step, i))
        .all(|g| (-2.81..16.7).contains(&g)));
    // The extremes of u: g stays finite.
    for u in [0.5 / 8_388_608.0, 1.0 - 0.5 / 8_388_608.0] {
        assert!((-portable_ln(-portable_ln(u))).is_finite());
    }
}

#[test]
fn order_key_sorts_like_the_floats() {
    let mut rng = fresh_rng();
    let mut xs: Vec<f32> = logits(&mut rng, 5000, 1e4);
    xs.extend([f32::NEG_INFINITY, f32::INFINITY, -1e-45, 1e-45]);
    for pair in xs.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert_eq!(
            a.partial_cmp(&b),
            order_key(a).partial_cmp(&order_key(b)),
            "{a} {b}"
        );
    }
    assert_eq!(order_key(-0.0), order_key(0.0));
    assert_eq!(order_key(0.0), KEY_OF_ZERO);
}

#[test]
fn block_sum_is_the_sum_in_the_kernels_order() {
    let mut rng = fresh_rng();
    for n in [1usize, 7, 31, 1000, 49_152] {
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let plain: f64 = values.iter().map(|&v| f64::from(v)).sum();
        for threads in [32, 64, 1024] {
            let got = Block { threads }.sum(n, |i| values[i]);
            assert!(
                (f64::from(got) - plain).abs() <= 1e-6 * plain.max(1.0),
                "{n} {threads}"
            );
        }
    }
    assert_eq!(Block { threads: 1024 }.sum(1, |_| 0.3), 0.3);
}

#[test]
fn geometry_is_whole_warps_up_to_1024() {
    let vocabs = [1, 7, 33, 1000, 49_152, 128_256];
    for (vocab, threads) in vocabs.into_iter().zip([32, 32, 64, 1024, 1024, 1024]) {
        let g = sampling_geometry(5, vocab).unwrap();
        assert_eq!((g.grid, g.threads, g.shared_bytes), (5, threads, 0));
    }
    assert!(sampling_geometry(1, 0).is_err());
    assert!(sampling_geometry(1usize << 31, 10).is_err());
    assert_eq!(sampling_geometry(0, 10).unwrap().grid, 0);
}

#[test]
fn invalid_calls_are_refused() {
    let p = SamplingParamsRow::default();
    let mut bad = [p; 4];
    (bad[0].temperature, bad[1].temperature) = (f32::NAN, f32::INFINITY);
    (bad[2].top_p, bad[3].num_logprobs) = (f32::NAN, 21);
    for b in bad {
        assert!(sample_rows(&[0.0; 4], 4, &[b]).is_err(), "{b:?}");
    }
    assert!(sample_rows(&[0.0; 5], 4, &[p]).is_err());
    assert!(sample_rows(&[], 0, &[p]).is_err());
    assert_eq!(sample_rows(&[], 4, &[]).unwrap(), vec![]);
}

#[test]
fn params_encode_to_the_kernels_layout() {
    let p = SamplingParamsRow {
        temperature: 0.7,
        top_k: 40,
        top_p: 0.9,
        seed: 0x0102_0304_0506_0708,
        step: 0x1112_1314_1516_1718,
        num_logprobs: 5,
    };
    let words = p.encode();
    assert_eq!(words[..4], [0.7f32.to_bits(), 40, 0.9f32.to_bits(), 5]);
    assert_eq!(
        words[4..],
        [0x0506_0708, 0x0102_0304, 0x1516_1718, 0x1112_1314]
    );
}

#[test]
fn greedy_is_the_argmax_lowest_index_first() {
    let mut rng = fresh_rng();
    for vocab in [1, 7, 1000, 49_152] {
        let mut row = logits(&mut rng, vocab, 5.0);
        let best = sorted(&row)[0];
        assert_eq!(one(&row, SamplingParamsRow::default()).token as usize, best);
        // A tie with a later index keeps the first.
        row.push(row[best]);
        let p = sampling(-1.0, 0, 1.0, 0, 0);
        assert_eq!(one(&row, p).token as usize, best);
    }
}

#[test]
fn top_k_one_is_the_argmax_at_any_temperature() {
    let mut rng = fresh_rng();
    for vocab in [1, 7, 1000, 4099] {
        let row = logits(&mut rng, vocab, 3.0);
        let best = sorted(&row)[0] as u32;
        for step in 0..20 {
            let t = rng.random_range(0.01f32..100.0);
            let top_p = if step % 2 == 0 { 1.0 } else { 0.5 };
            assert_eq!(
                one(&row, sampling(t, 1, top_p, rng.random(), step)).token,
                best
            );
        }
    }
}

#[test]
fn top_k_keeps_exactly_the_k_largest() {
    let mut rng = fresh_rng();
    for vocab in [7, 33, 1000] {
        let row = logits(&mut rng, vocab, 4.0);
        for _ in 0..5 {
            let k = rng.random_range(1..vocab as u32);
            let t = rng.random_range(0.2f32..3.0);
            let p = sampling(t, k, 1.0, rng.random(), 0);
            let mut expected = vec![false; vocab];
            sorted(&row)[..k as usize]
                .iter()
                .for_each(|&i| expected[i] = true);
            assert_eq!(kept(&row, &p), expected, "vocab {vocab} k {k}");
            for step in 0..50 {
                let token = one(&row, SamplingParamsRow { step, ..p }).token as usize;
                assert!(expected[token], "token {token} outside the top {k}");
            }
        }
    }
}

#[test]
fn top_p_keeps_the_smallest_nucleus() {
    let mut rng = fresh_rng();
    for vocab in [7, 33, 1000] {
        let row = logits(&mut rng, vocab, 4.0);
        for _ in 0..5 {
            let top_p = rng.random_range(0.05f32..0.99);
            let t = rng.random_range(0.3f32..2.0);
            let k = rng.random_range(0..vocab as u32) * u32::from(rng.random_bool(0.5));
            let p = sampling(t, k, top_p, rng.random(), 0);
            let got = kept(&row, &p);
            // f32 against f64 sums: allow the boundary token either way.
            let inner = nucleus(&row, t, k as usize, f64::from(top_p) * (1.0 - 1e-5));
            let outer = nucleus(&row, t, k as usize, f64::from(top_p) * (1.0 + 1e-5));
            for i in 0..vocab {
                assert!(!inner[i] || got[i], "vocab {vocab} p {top_p}: {i} dropped");
                assert!(!got[i] || outer[i], "vocab {vocab} p {top_p}: {i} kept");
            }
            for step in 0..50 {
                let token = one(&row, SamplingParamsRow { step, ..p }).token as usize;
                assert!(got[token] && outer[token], "{token} outside the nucleus");
            }
        }
    }
}

#[test]
fn draws_follow_the_restricted_softmax() {
    let mut rng = fresh_rng();
    let row = logits(&mut rng, 5, 1.5);
    for (top_k, top_p) in [(0, 1.0), (3, 1.0), (0, 0.8), (4, 0.9)] {
        let t = rng.random_range(0.7f32..1.5);
        let p = sampling(t, top_k, top_p, rng.random(), 0);
        let set = kept(&row, &p);
        let weight = |i: usize| (f64::from(row[i]) / f64::from(t)).exp();
        let weights: Vec<f64> = (0..5)
            .map(|i| if set[i] { weight(i) } else { 0.0 })
            .collect();
        let total: f64 = weights.iter().sum();
        let draws = 20_000u64;
        let mut counts = [0u64; 5];
        for step in 0..draws {
            counts[one(&row, SamplingParamsRow { step, ..p }).token as usize] += 1;
        }
        let mut chi2 = 0.0;
        for i in 0..5 {
            let expected = weights[i] / total * draws as f64;
            if expected == 0.0 {
                assert_eq!(counts[i], 0, "token {i} is cut yet drawn");
            } else {
                chi2 += (counts[i] as f64 - expected).powi(2) / expected;
            }
        }
        // At most 4 degrees of freedom: P(chi2 > 30) < 5e-6.
        assert!(
            chi2 < 30.0,
            "chi2 {chi2}: {counts:?} against {weights:?}, k {top_k} p {top_p}"
        );
    }
}

#[test]
fn same_seed_and_step_give_the_same_token() {
    let mut rng = fresh_rng();
    let row = logits(&mut rng, 1000, 1.0);
    let p = sampling(1.0, 0, 0.95, rng.random(), rng.random());
    let tokens: Vec<u32> = (0..4).map(|_| one(&row, p).token).collect();
    assert!(tokens.windows(2).all(|w| w[0] == w[1]));
    // A flat distribution over 1000 tokens: 20 steps give many tokens.
    let mut seen: Vec<u32> = (0..20)
        .map(|s| one(&row, SamplingParamsRow { step: s, ..p }).token)
        .collect();
    seen.sort();
    seen.dedup();
    assert!(seen.len() > 10, "{seen:?}");
    // Rows of one batch are independent of each other.
    let batch = sample_rows(&[row.clone(), row.clone()].concat(), 1000, &[p, p]).unwrap();
    assert_eq!(batch[0], batch[1]);
    assert_eq!(batch[0].token, tokens[0]);
}

#[test]
fn logprobs_match_a_plain_log_softmax() {
    let mut rng = fresh_rng();
    for vocab in [1, 7, 1000, 49_152, 128_256] {
        let row = logits(&mut rng, vocab, 10.0);
        let n = rng.random_range(0..=MAX_TOP_LOGPROBS as u32);
        let t = if rng.random_bool(0.5) { 0.0 } else { 0.8 };
        let p = SamplingParamsRow {
            num_logprobs: n,
            ..sampling(t, 50, 0.9, rng.random(), 3)
        };
        let got = one(&row, p);
        let want = log_softmax_f64(&row);
        let close = |a: f32, b: f64| (f64::from(a) - b).abs() <= 1e-5 * b.abs().max(1.0);
        assert!(close(got.logprob, want[got.token as usize]), "{vocab}");
        let order = sorted(&row);
        assert_eq!(got.top.len(), (n as usize).min(vocab));
        for (r, &(id, lp)) in got.top.iter().enumerate() {
            assert_eq!(id as usize, order[r], "vocab {vocab} rank {r}");
            assert!(close(lp, want[order[r]]), "vocab {vocab} rank {r}: {lp}");
        }
    }
    // Ties in the top list: lowest index first.
    let p = SamplingParamsRow {
        num_logprobs: 4,
        ..Default::default()
    };
    let top = one(&[1.0, 2.0, 1.0, 2.0], p).top;
    assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 0, 2]);
}

#[test]
fn extreme_logits_give_no_nan() {
    let inf = f32::INFINITY;
    let rows: [&[f32]; 8] = [
        &[-inf, 1.0, -inf, 0.5],
        &[-inf, -inf, -inf],
        &[f32::NAN, 2.0, f32::NAN],
        &[f32::NAN, f32::NAN],
        &[inf, 0.0, inf, -inf],
        &[3e38, -3e38, f32::MAX, f32::MIN],
        &[0.25; 9],
        &[-0.0, 0.0, -1e-45, 1e-45],
    ];
    for row in rows {
        for t in [0.0, 1e-30, 0.5, 1.0, 1e30] {
            for (k, top_p) in [(0, 1.0), (2, 1.0), (0, 0.5), (2, 0.0), (1, -1.0)] {
                let p = SamplingParamsRow {
                    num_logprobs: 20,
                    ..sampling(t, k, top_p, 9, 1)
                };
                let got = one(row, p);
                let what = format!("{row:?} t {t} k {k} p {top_p}: {got:?}");
                assert!((got.token as usize) < row.len(), "{what}");
                // Finite: not NaN, and no impossible token drawn.
                assert!(got.logprob.is_finite() && got.logprob <= 0.0, "{what}");
                assert!(got.top.iter().all(|t| !t.1.is_nan()), "{what}");
                assert_eq!(got.top.len(), row.len(), "{what}");
            }
        }
    }
    // All impossible: uniform. All equal: uniform too.
    let lp = one(&[f32::NEG_INFINITY; 4], SamplingParamsRow::default()).logprob;
    assert!((lp - (0.25f32).ln()).abs() < 1e-6);
    let lp = one(&[7.0; 4], sampling(1.0, 0, 1.0, 1, 1)).logprob;
    assert!((lp - (0.25f32).ln()).abs() < 1e-6);
}

#[test]
fn outputs_decode_to_rows() {
    let ids = [4, 2, NO_TOKEN, NO_TOKEN];
    let lps = [-0.1, -2.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
    let row = SampledRow::from_outputs(4, -0.1, &ids, &lps, 3);
    assert_eq!(row.top, vec![(4, -0.1), (2, -2.0)]);
    assert_eq!(
        SampledRow::from_outputs(4, -0.1, &ids, &lps, 1).top,
        vec![(4, -0.1)]
    );
    assert!(row.bit_eq(&row.clone()));
    let other = SampledRow {
        logprob: -0.0,
        ..row.clone()
    };
    assert!(!row.bit_eq(&other));
}

#[test]
fn tokens_only_draws_the_tokens_of_the_full_sampler() {
    let mut rng = fresh_rng();
    for vocab in [1usize, 7, 1000, 4099] {
        let batch = 6;
        let logits = logits(&mut rng, vocab * batch, 8.0);
        let params: Vec<SamplingParamsRow> = (0..batch)
            .map(|i| {
                let t = [0.0, 0.0, 0.5, 1.0, 1.3, 0.8][i];
                let k = [0, 3, 0, 0, 50, 5][i];
                let p = [1.0, 1.0, 0.9, 1.0, 0.5, 0.95][i];
                sampling(t, k, p, rng.random(), rng.random_range(0..1000))
            })
            .collect();
        let full: Vec<u32> = sample_rows(&logits, vocab, &params)
            .expect("valid")
            .into_iter()
            .map(|r| r.token)
            .collect();
        assert_eq!(
            sample_tokens(&logits, vocab, &params).expect("valid"),
            full,
            "vocab {vocab}"
        );
    }
}
