//! The gated delta rule's two forms on one head of Qwen3.5's shape (`dk = dv = 128`): one
//! prefill window of [`DELTA_CHUNK`] tokens token by token ([`gated_delta_step`]) against the
//! chunked form ([`gated_delta_chunk`]), one thread. Prints the median of several rounds of
//! each, taken alternately so that machine noise hits both alike.
//!
//! `cargo run --release -p supernode-kernels --example delta_bench [-- ROUNDS]`

use std::time::Instant;

use supernode_kernels::ops::{gated_delta_chunk, gated_delta_step, l2_norm_inplace, DELTA_CHUNK};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9);
    let (dk, dv, l) = (128usize, 128usize, DELTA_CHUNK);
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 2001) as f32 / 1000.0 - 1.0
    };
    let mut unit = |n: usize, scale: f32| -> Vec<f32> {
        let mut x: Vec<f32> = (0..n).map(|_| rnd()).collect();
        x.chunks_exact_mut(dk)
            .for_each(|h| l2_norm_inplace(h, 1e-6));
        x.iter().map(|v| v * scale).collect()
    };
    let q = unit(l * dk, 1.0 / (dk as f32).sqrt());
    let k = unit(l * dk, 1.0);
    let v = unit(l * dv, 1.0);
    let log_decay = vec![-0.05f32; l];
    let beta = vec![0.5f32; l];
    let s0 = vec![0.01f32; dv * dk];
    let reps = 50;
    let (mut loop_us, mut chunk_us) = (Vec::new(), Vec::new());
    let mut out = vec![0.0; l * dv];
    for _ in 0..rounds {
        let mut s = s0.clone();
        let t = Instant::now();
        for _ in 0..reps {
            for i in 0..l {
                gated_delta_step(
                    &mut s,
                    &q[i * dk..(i + 1) * dk],
                    &k[i * dk..(i + 1) * dk],
                    &v[i * dv..(i + 1) * dv],
                    log_decay[i].exp(),
                    beta[i],
                    &mut out[i * dv..(i + 1) * dv],
                );
            }
        }
        loop_us.push(t.elapsed().as_secs_f64() * 1e6 / reps as f64);
        let mut s = s0.clone();
        let t = Instant::now();
        for _ in 0..reps {
            gated_delta_chunk(&mut s, &q, &k, &v, &log_decay, &beta, &mut out);
        }
        chunk_us.push(t.elapsed().as_secs_f64() * 1e6 / reps as f64);
    }
    let (a, b) = (median(loop_us), median(chunk_us));
    println!(
        "{l} tokens of one {dv}x{dk} head, median of {rounds}: token by token {a:.1} us, \
         chunked {b:.1} us ({:.2}x)",
        a / b
    );
}
