//! Tests of [`crate::ops`]: norms, rope, activations and the gated unit against their scalar
//! definitions, and every attention entry point against a naive softmax and against each other,
//! bit for bit.

use std::ops::Range;

use half::f16;

use super::*;

#[test]
fn rms_norm_matches_definition() {
    let x = [1.0f32, -2.0, 3.0, 0.5];
    let w = [1.0f32, 0.5, 2.0, 1.0];
    let mut out = [0.0f32; 4];
    rms_norm(&x, &w, 1e-6, 0.0, &mut out);
    let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f64 + 1e-6).sqrt();
    for i in 0..4 {
        assert!((f64::from(out[i]) - f64::from(x[i] * w[i]) / rms).abs() < 1e-6);
    }
    let mut y = x;
    rms_norm_inplace(&mut y, &w, 1e-6, 1.0);
    assert!((f64::from(y[1]) - (-2.0 * 1.5) / rms).abs() < 1e-6);
}

/// The table GELU is the formula rounded through f16 (input and output) inside ±10 and the
/// identity / zero outside, as llama.cpp defines it.
#[test]
fn table_gelu_is_the_f16_rounded_formula() {
    for &x in &[
        -12.0f32, -10.0, -3.3, -0.5, -1e-3, 0.0, 1e-3, 0.7, 2.5, 9.99, 10.0, 40.0,
    ] {
        let got = gelu_f16_table(x);
        let want = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            let v = round_f16(x);
            let a = 0.797_884_6f32;
            round_f16(0.5 * v * (1.0 + (a * v * (1.0 + 0.044715 * v * v)).tanh()))
        };
        assert_eq!(got.to_bits(), want.to_bits(), "x = {x}");
        assert!(
            (got - gelu_tanh(x)).abs() <= 2e-3 * (1.0 + x.abs()),
            "x = {x}"
        );
    }
}

#[test]
fn rope_pairings_rotate_the_right_dims() {
    let inv = [1.0f64, 0.1];
    let (mut c, mut s) = ([0.0f32; 2], [0.0f32; 2]);
    rope_cos_sin(3, &inv, 1.0, &mut c, &mut s);
    let x0 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mut a = x0;
    rope_apply(&mut a, 6, RopeStyle::Interleaved, &c, &s);
    let (c0, s0) = (3.0f32.cos(), 3.0f32.sin());
    assert!((a[0] - (1.0 * c0 - 2.0 * s0)).abs() < 1e-6);
    assert!((a[1] - (1.0 * s0 + 2.0 * c0)).abs() < 1e-6);
    assert_eq!(&a[4..], &x0[4..]);
    let mut b = x0;
    rope_apply(&mut b, 6, RopeStyle::Halves, &c, &s);
    assert!((b[0] - (1.0 * c0 - 3.0 * s0)).abs() < 1e-6);
    assert!((b[2] - (1.0 * s0 + 3.0 * c0)).abs() < 1e-6);
    assert_eq!(&b[4..], &x0[4..]);
}

#[test]
fn attention_matches_naive_softmax() {
    // 2 query heads sharing 1 KV head; 3 positions spread over blocks [2, 0] of size 2.
    let shape = AttnShape {
        n_heads: 2,
        n_kv_heads: 1,
        k_dim: 2,
        v_dim: 2,
        scale: 0.5,
        softcap: None,
        f16_rounding: false,
    };
    let mut k = vec![0.0f32; 6 * 2];
    let mut v = vec![0.0f32; 6 * 2];
    let keys = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]];
    let vals = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];
    let table = [2u32, 0];
    for p in 0..3 {
        let slot = table[p / 2] as usize * 2 + p % 2;
        k[slot * 2..slot * 2 + 2].copy_from_slice(&keys[p]);
        v[slot * 2..slot * 2 + 2].copy_from_slice(&vals[p]);
    }
    let kv = KvView {
        k: KvRows::F32(&k),
        v: KvRows::F32(&v),
        block_size: 2,
        n_kv_heads: 1,
        k_dim: 2,
        v_dim: 2,
    };
    let q = [2.0f32, 0.0, 0.0, 2.0];
    let mut out = [0.0f32; 4];
    for h in 0..2 {
        let (qh, oh) = (&q[2 * h..2 * h + 2], &mut out[2 * h..2 * h + 2]);
        attention_head(qh, &kv, 0, &table, 0..3, &shape, oh);
    }
    for h in 0..2 {
        let s: Vec<f64> = keys
            .iter()
            .map(|kk| 0.5 * f64::from(q[2 * h] * kk[0] + q[2 * h + 1] * kk[1]))
            .collect();
        let z: f64 = s.iter().map(|x| x.exp()).sum();
        for d in 0..2 {
            let want: f64 = (0..3).map(|p| s[p].exp() / z * f64::from(vals[p][d])).sum();
            assert!((f64::from(out[2 * h + d]) - want).abs() < 1e-5);
        }
    }
}

/// A tiny deterministic generator for the bit-identity test.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// `attention_group`'s output, then `attention_head`'s for each head, concatenated.
fn group_and_heads(
    q: &[f32],
    kv: &KvView,
    kv_head: usize,
    table: &[u32],
    ctx: Range<usize>,
    shape: &AttnShape,
) -> (Vec<u32>, Vec<u32>) {
    let g = q.len() / shape.k_dim;
    let mut group = vec![f32::NAN; g * shape.v_dim];
    attention_group(q, kv, kv_head, table, ctx.clone(), shape, &mut group);
    // The pool-parallel version gives the same bits, for this group alone and among others
    // (the same queries over the full context, an empty one and half of it).
    let half = ctx.start..ctx.start + ctx.len() / 2;
    let empty = ctx.start..ctx.start;
    let spans: Vec<GroupSpan> = [ctx.clone(), empty, half, ctx.clone()]
        .into_iter()
        .map(|ctx| GroupSpan {
            kv_head,
            block_table: table,
            ctx,
        })
        .collect();
    for count in [1, spans.len()] {
        let qs = q.repeat(count);
        let mut parallel = vec![f32::NAN; count * g * shape.v_dim];
        attention_groups_parallel(&qs, kv, &spans[..count], shape, &mut parallel);
        for (span, got) in spans[..count]
            .iter()
            .zip(parallel.chunks_exact(g * shape.v_dim))
        {
            let mut want = vec![f32::NAN; g * shape.v_dim];
            attention_group(q, kv, kv_head, table, span.ctx.clone(), shape, &mut want);
            assert!(
                want.iter()
                    .zip(got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "attention_groups_parallel differs from attention_group ({count} groups)"
            );
        }
    }
    let mut heads = vec![f32::NAN; g * shape.v_dim];
    for (qh, o) in q
        .chunks_exact(shape.k_dim)
        .zip(heads.chunks_exact_mut(shape.v_dim))
    {
        attention_head(qh, kv, kv_head, table, ctx.clone(), shape, o);
    }
    // The steps written out one position at a time, with the single-row `dot_f32`.
    let mut naive = vec![f32::NAN; g * shape.v_dim];
    for (qh, o) in q
        .chunks_exact(shape.k_dim)
        .zip(naive.chunks_exact_mut(shape.v_dim))
    {
        naive_head(qh, kv, kv_head, table, ctx.clone(), shape, o);
    }
    assert!(
        heads
            .iter()
            .zip(&naive)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "attention_head differs from the step-by-step reference"
    );
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect();
    (bits(group), bits(heads))
}

/// One head's attention, position by position: `dot_f32` of the widened K row, scaled
/// and capped; `exp_f32(s - max)` summed in f64 lane `p % 16`, lanes folded `l + 8`, `+ 4`,
/// `+ 2`, `+ 1`; weights `e * f32(1 / sum)`, rounded to f16 if asked; `out += w * v` in
/// position order.
fn naive_head(
    q: &[f32],
    kv: &KvView,
    kv_head: usize,
    table: &[u32],
    ctx: Range<usize>,
    shape: &AttnShape,
    out: &mut [f32],
) {
    let widen = |rows: &KvRows, base: usize, n: usize| -> Vec<f32> {
        match *rows {
            KvRows::F32(x) => x[base..base + n].to_vec(),
            KvRows::F16(x) => x[base..base + n].iter().map(|h| h.to_f32()).collect(),
        }
    };
    let row = |p: usize| {
        let slot = table[p / kv.block_size] as usize * kv.block_size + p % kv.block_size;
        slot * kv.n_kv_heads + kv_head
    };
    let scores: Vec<f32> = ctx
        .clone()
        .map(|p| {
            let s = crate::simd::dot_f32(q, &widen(&kv.k, row(p) * kv.k_dim, shape.k_dim));
            let s = s * shape.scale;
            shape.softcap.map_or(s, |cap| softcap(s, cap))
        })
        .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let exps: Vec<f32> = scores
        .iter()
        .map(|&s| crate::simd::exp_f32(s - max))
        .collect();
    let mut lanes = [0f64; 16];
    for (i, &e) in exps.iter().enumerate() {
        lanes[i % 16] += f64::from(e);
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            lanes[l] += lanes[l + w];
        }
    }
    let inv = (1.0 / lanes[0]) as f32;
    out.fill(0.0);
    for (&e, p) in exps.iter().zip(ctx) {
        let w = if shape.f16_rounding {
            round_f16(e * inv)
        } else {
            e * inv
        };
        for (o, v) in out
            .iter_mut()
            .zip(widen(&kv.v, row(p) * kv.v_dim, shape.v_dim))
        {
            *o += w * v;
        }
    }
}

/// Over f32 rows, `attention_group` equals `attention_head` per head bit for bit; over f16
/// rows, both also equal what they give on f32 rows of the same (widened) values. Values
/// stored in the keys (MLA's latent: `v` is the key rows, of which the first `v_dim` are
/// read) are covered too.
#[test]
fn attention_group_equals_attention_head_bit_for_bit() {
    let mut rng = Lcg(7);
    let block_size = 16;
    // (group, n_kv_heads, k_dim, v_dim, values in keys)
    let shapes = [
        (1, 2, 64, 64, false),
        (3, 3, 64, 64, false),
        (4, 2, 128, 128, false),
        (3, 1, 256, 256, false),
        (4, 2, 192, 128, false),
        (3, 2, 72, 40, false),
        (2, 1, 5, 3, false),
        (2, 1, 576, 512, true),
        (3, 1, 37, 21, true),
    ];
    let mut checked = 0;
    for &(group, n_kv, k_dim, v_dim, in_keys) in &shapes {
        let n_heads = group * n_kv;
        // 6 blocks of 16, handed out in a scrambled order.
        let table = [4u32, 1, 5, 0, 3, 2];
        let slots = table.len() * block_size;
        let k: Vec<f32> = (0..slots * n_kv * k_dim)
            .map(|_| rng.next() * 3.0)
            .collect();
        let v: Vec<f32> = (0..slots * n_kv * v_dim).map(|_| rng.next()).collect();
        let q: Vec<f32> = (0..n_heads * k_dim).map(|_| rng.next()).collect();
        let (k16, v16): (Vec<f16>, Vec<f16>) = (
            k.iter().map(|&x| f16::from_f32(x)).collect(),
            v.iter().map(|&x| f16::from_f32(x)).collect(),
        );
        let (kw, vw): (Vec<f32>, Vec<f32>) = (
            k16.iter().map(|x| x.to_f32()).collect(),
            v16.iter().map(|x| x.to_f32()).collect(),
        );
        let view = |k, v| KvView {
            k,
            v: if in_keys { k } else { v },
            block_size,
            n_kv_heads: n_kv,
            k_dim,
            v_dim: if in_keys { k_dim } else { v_dim },
        };
        let f32_view = view(KvRows::F32(&k), KvRows::F32(&v));
        let f16_view = view(KvRows::F16(&k16), KvRows::F16(&v16));
        let widened_view = view(KvRows::F32(&kw), KvRows::F32(&vw));
        for softcap in [None, Some(3.0f32)] {
            for f16_rounding in [false, true] {
                let shape = AttnShape {
                    n_heads,
                    n_kv_heads: n_kv,
                    k_dim,
                    v_dim,
                    scale: 1.0 / (k_dim as f32).sqrt(),
                    softcap,
                    f16_rounding,
                };
                for ctx in [0..1, 0..5, 0..16, 0..17, 0..50, 7..90, 20..96, 95..96] {
                    for kvh in 0..n_kv {
                        let qg = &q[kvh * group * k_dim..(kvh + 1) * group * k_dim];
                        let case = format!(
                            "group {group} kv {n_kv} k {k_dim} v {v_dim} in_keys {in_keys} \
                             cap {softcap:?} f16 {f16_rounding} ctx {ctx:?}"
                        );
                        let run =
                            |kv: &KvView| group_and_heads(qg, kv, kvh, &table, ctx.clone(), &shape);
                        let (group_f32, heads_f32) = run(&f32_view);
                        assert_eq!(group_f32, heads_f32, "{case}");
                        let (group_f16, heads_f16) = run(&f16_view);
                        let (group_w, heads_w) = run(&widened_view);
                        assert_eq!(group_f16, group_w, "{case}");
                        assert_eq!(heads_f16, heads_w, "{case}");
                        assert_eq!(group_f16, heads_f16, "{case}");
                        checked += group;
                    }
                }
            }
        }
    }
    assert!(checked > 500);
}

#[test]
fn activations() {
    assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
    let mut g = [1.0f32, -1.0];
    glu_inplace(&mut g, &[2.0, 3.0], Activation::Silu);
    assert!((g[0] - 2.0 * silu(1.0)).abs() < 1e-6);
}

/// SiLU's gated unit (16 at a time where the CPU can) equals the scalar `silu` times `up`,
/// bit for bit, over a wide range (exp's clamps, ±0, infinities, NaN), with and without a
/// tail; and `silu` stays within a few ulp of the f64 formula.
#[test]
fn glu_of_silu_is_the_scalar_silu() {
    let mut xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0537).collect();
    xs.extend([-200.0, -104.5, 88.9, 95.0, 1e-30, -1e-30, 0.0, -0.0]);
    xs.extend([
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN,
    ]);
    for len in [xs.len(), 33, 16, 3] {
        let x = &xs[..len];
        let up: Vec<f32> = (0..len).map(|i| 1.5 - (i % 7) as f32 * 0.375).collect();
        assert_glu_is_scalar(Activation::Silu, x, &up);
    }
    for &x in &xs[..4000] {
        let want = f64::from(x) / (1.0 + (-f64::from(x)).exp());
        let got = f64::from(silu(x));
        assert!((got - want).abs() <= 4e-7 * want.abs() + 1e-30, "x = {x}");
    }
}

/// The table GELU's gated unit (16 at a time where the CPU can) equals the scalar lookup
/// times `up`, bit for bit: every f16 value, values between them (rounding ties), the
/// ±10 edges, huge values, infinities and NaN, at lengths with and without a tail.
#[test]
fn glu_of_the_table_gelu_is_the_scalar_lookup() {
    let mut xs: Vec<f32> = (0..=u16::MAX)
        .map(|b| half::f16::from_bits(b).to_f32())
        .collect();
    for b in (0..=u16::MAX).step_by(7) {
        let v = half::f16::from_bits(b).to_f32();
        let next = half::f16::from_bits(b.wrapping_add(1)).to_f32();
        xs.push((v + next) / 2.0);
    }
    xs.extend([
        -10.0, -9.999, 10.0, 9.999, -10.001, 10.001, 1e30, -1e30, 70000.0,
    ]);
    xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
    for len in [xs.len(), 17, 16, 5] {
        let x = &xs[xs.len() - len..];
        let up: Vec<f32> = (0..len).map(|i| 0.5 + (i % 13) as f32 * 0.25).collect();
        assert_glu_is_scalar(Activation::GeluF16Table, x, &up);
    }
}

/// `act.glu` of `x` and `up` equals `act.apply(x) * up` value by value, bit for bit (any
/// NaN for NaN), and so does every level's vector kernel on the values it takes.
fn assert_glu_is_scalar(act: Activation, x: &[f32], up: &[f32]) {
    let check = |got: &[f32], what: &str| {
        for ((&x, &u), &got) in x.iter().zip(up).zip(got) {
            let want = act.apply(x) * u;
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{act:?} {what} x = {x}: {got} vs {want}"
            );
        }
    };
    let mut got = x.to_vec();
    act.glu(&mut got, up);
    check(&got, "glu");
    for isa in crate::cpu::Isa::ALL {
        let Some(k) = crate::cpu::kernels_of(isa) else {
            continue;
        };
        let mut got = x.to_vec();
        // SAFETY: `kernels_of` hands out only the levels this CPU has; the lengths are equal
        // and the table is the activation's own.
        let done = unsafe {
            match (act, k.glu_silu, k.glu_gelu_table) {
                (Activation::Silu, Some(glu), _) => glu(&mut got, up),
                (Activation::GeluF16Table, _, Some(glu)) => {
                    glu(&mut got, up, &super::activation::GELU_TABLE)
                }
                _ => 0,
            }
        };
        check(&got[..done], &format!("{isa:?}"));
    }
}

/// LayerNorm against its definition: zero mean, unit variance, then `* w + b`.
#[test]
fn layer_norm_matches_definition() {
    let x = [1.0f32, -2.0, 3.0, 0.5];
    let (w, b) = ([1.0f32, 0.5, 2.0, -1.0], [0.1f32, 0.0, -0.2, 0.3]);
    let mean = 2.5f64 / 4.0;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / 4.0;
    let mut y = x;
    layer_norm_inplace(&mut y, &w, &b, 1e-6);
    for i in 0..4 {
        let want =
            (f64::from(x[i]) - mean) / (var + 1e-6).sqrt() * f64::from(w[i]) + f64::from(b[i]);
        assert!(
            (f64::from(y[i]) - want).abs() < 1e-6,
            "{i}: {} vs {want}",
            y[i]
        );
    }
}

/// Sparse attention over listed positions: over a whole range it is `attention_group` bit for
/// bit; over a subset it is the naive softmax over those positions alone (f32 and f16 rows).
#[test]
fn attention_at_positions_is_attention_over_those_positions() {
    let mut rng = Lcg(11);
    let (block_size, k_dim, v_dim, g) = (4, 12, 8, 3);
    let table = [2u32, 0, 3, 1];
    let slots = table.len() * block_size;
    let k: Vec<f32> = (0..slots * k_dim).map(|_| rng.next() * 2.0).collect();
    let q: Vec<f32> = (0..g * k_dim).map(|_| rng.next()).collect();
    let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    let view = |rows| KvView {
        k: rows,
        v: rows,
        block_size,
        n_kv_heads: 1,
        k_dim,
        v_dim: k_dim,
    };
    let shape = AttnShape {
        n_heads: g,
        n_kv_heads: 1,
        k_dim,
        v_dim,
        scale: 0.3,
        softcap: None,
        f16_rounding: false,
    };
    for kv in [view(KvRows::F32(&k)), view(KvRows::F16(&k16))] {
        let all: Vec<usize> = (0..13).collect();
        let (mut a, mut b) = (vec![0.0; g * v_dim], vec![0.0; g * v_dim]);
        attention_group(&q, &kv, 0, &table, 0..13, &shape, &mut a);
        attention_group_at(&q, &kv, 0, &table, &all, &shape, &mut b);
        assert_eq!(a, b);
        let some = [1usize, 4, 5, 11, 15];
        attention_group_at(&q, &kv, 0, &table, &some, &shape, &mut b);
        let row = |p: usize| -> Vec<f32> {
            let slot = table[p / block_size] as usize * block_size + p % block_size;
            match kv.k {
                KvRows::F32(x) => x[slot * k_dim..(slot + 1) * k_dim].to_vec(),
                KvRows::F16(x) => x[slot * k_dim..(slot + 1) * k_dim]
                    .iter()
                    .map(|h| h.to_f32())
                    .collect(),
            }
        };
        for h in 0..g {
            let qh = &q[h * k_dim..(h + 1) * k_dim];
            let s: Vec<f64> = some
                .iter()
                .map(|&p| {
                    row(p)
                        .iter()
                        .zip(qh)
                        .map(|(a, b)| f64::from(a * b))
                        .sum::<f64>()
                        * 0.3
                })
                .collect();
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..v_dim {
                let want: f64 = some
                    .iter()
                    .zip(&e)
                    .map(|(&p, w)| w / sum * f64::from(row(p)[c]))
                    .sum();
                let got = f64::from(b[h * v_dim + c]);
                assert!(
                    (got - want).abs() < 1e-5,
                    "head {h} col {c}: {got} vs {want}"
                );
            }
        }
    }
}

/// The lightning indexer's scores against their definition, and the top-k choice: best scores,
/// ties to the earlier position, ascending, everything when k covers the context.
#[test]
fn index_scores_and_top_k() {
    let mut rng = Lcg(5);
    let (block_size, d, g) = (4, 6, 3);
    let table = [1u32, 2, 0];
    let k: Vec<f32> = (0..table.len() * block_size * d)
        .map(|_| rng.next())
        .collect();
    let q: Vec<f32> = (0..g * d).map(|_| rng.next()).collect();
    let w = [0.7f32, -0.4, 1.1];
    let kv = KvView {
        k: KvRows::F32(&k),
        v: KvRows::F32(&k),
        block_size,
        n_kv_heads: 1,
        k_dim: d,
        v_dim: d,
    };
    let mut out = vec![0.0; 7];
    index_scores(&q, &w, &kv, &table, 3..10, 0.5, &mut out);
    for (i, p) in (3..10).enumerate() {
        let slot = table[p / block_size] as usize * block_size + p % block_size;
        let kp = &k[slot * d..(slot + 1) * d];
        let want: f64 = (0..g)
            .map(|h| {
                let dot: f64 = q[h * d..(h + 1) * d]
                    .iter()
                    .zip(kp)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                f64::from(w[h]) * (0.5 * dot).max(0.0)
            })
            .sum();
        assert!(
            (f64::from(out[i]) - want).abs() < 1e-5,
            "{p}: {} vs {want}",
            out[i]
        );
    }
    let mut sel = Vec::new();
    top_k_positions(&[0.5, 2.0, -1.0, 2.0, 0.0, 3.0], 10, 3, &mut sel);
    assert_eq!(sel, [11, 13, 15]);
    sel.clear();
    top_k_positions(&[0.0, 0.0, 0.0, 1.0], 0, 2, &mut sel);
    assert_eq!(sel, [0, 3], "ties go to the earlier position");
    sel.clear();
    top_k_positions(&[3.0, 1.0], 4, 8, &mut sel);
    assert_eq!(sel, [4, 5]);
}

/// A long context is scored over the threads in chunks: every score has the bits of the same
/// position scored in a short call on one thread.
#[test]
fn index_scores_split_over_threads_are_the_bits_of_short_calls() {
    let mut rng = Lcg(11);
    let (block_size, d, g, n) = (16, 8, 4, 1300usize);
    let blocks = n.div_ceil(block_size);
    // A shuffled block table, so that chunk offsets must map through it.
    let table: Vec<u32> = (0..blocks as u32)
        .map(|b| (b * 7) % blocks as u32)
        .collect();
    let k: Vec<f32> = (0..blocks * block_size * d).map(|_| rng.next()).collect();
    let q: Vec<f32> = (0..g * d).map(|_| rng.next()).collect();
    let w: Vec<f32> = (0..g).map(|_| rng.next()).collect();
    let kv = KvView {
        k: KvRows::F32(&k),
        v: KvRows::F32(&k),
        block_size,
        n_kv_heads: 1,
        k_dim: d,
        v_dim: d,
    };
    let ctx = 5..n;
    let mut long = vec![0.0; ctx.len()];
    index_scores(&q, &w, &kv, &table, ctx.clone(), 0.3, &mut long);
    for (i, p) in ctx.enumerate() {
        let mut one = [0.0];
        index_scores(&q, &w, &kv, &table, p..p + 1, 0.3, &mut one);
        assert_eq!(long[i].to_bits(), one[0].to_bits(), "position {p}");
    }
}
