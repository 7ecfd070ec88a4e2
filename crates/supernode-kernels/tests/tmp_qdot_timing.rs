use std::time::Instant;
use supernode_kernels::{matmul_with, quantize_row, DType, Precision, WeightMatrix};

fn rng_vec(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Min over rounds, alternating modes, of the mean time per call within a round.
fn time_pair(w: &WeightMatrix, x: &[f32], n: usize, rounds: usize) -> (f64, f64) {
    let mut out = vec![0f32; n * w.rows];
    let per_call_guess = {
        let t = Instant::now();
        matmul_with(w, x, n, &mut out, Precision::Exact);
        t.elapsed().as_secs_f64()
    };
    let iters = ((2e-3 / per_call_guess.max(1e-6)) as usize).clamp(1, 200);
    let mut best = [f64::MAX; 2];
    for _ in 0..rounds {
        for (k, p) in [Precision::Quantized, Precision::Exact]
            .into_iter()
            .enumerate()
        {
            let t = Instant::now();
            for _ in 0..iters {
                matmul_with(w, x, n, &mut out, p);
            }
            best[k] = best[k].min(t.elapsed().as_secs_f64() / iters as f64 * 1e6);
        }
    }
    (best[0], best[1])
}

#[test]
fn timing() {
    let mut seed = 0x1234_5678u64;
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(40);
    for (dtype, rows, cols, n) in [
        (DType::Q4_1, 576, 1536, 1),
        (DType::Q8_0, 49152, 576, 1),
        (DType::Q4K, 640, 1024, 1),
        (DType::Q6K, 640, 2048, 1),
        (DType::Q4_1, 576, 1536, 64),
        (DType::Q5_0, 640, 640, 1),
        (DType::Q4K, 640, 1024, 64),
        (DType::Q5K, 640, 1024, 1),
        (DType::Q3K, 640, 1024, 1),
        (DType::Q2K, 640, 1024, 1),
        (DType::Q4_0, 640, 1024, 1),
        (DType::Q5_1, 640, 1024, 1),
        (DType::F16, 640, 1024, 1),
    ] {
        if let Ok(only) = std::env::var("ONLY") {
            if !only
                .split(',')
                .any(|o| o == format!("{}-{n}", dtype.name()))
            {
                continue;
            }
        }
        let rb = dtype.row_bytes(cols).unwrap();
        let mut data = vec![0u8; rows * rb];
        for r in data.chunks_exact_mut(rb) {
            quantize_row(dtype, &rng_vec(cols, &mut seed), r);
        }
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        let x = rng_vec(n * cols, &mut seed);
        let (q, e) = time_pair(&w, &x, n, rounds);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (q1, e1) = pool.install(|| time_pair(&w, &x, n, rounds / 2));
        println!(
            "{:5} {rows}x{cols} n={n}: 2 threads: quantized {q:8.1} us exact {e:8.1} us ({:.2}x) | 1 thread: quantized {q1:8.1} us exact {e1:8.1} us ({:.2}x)",
            dtype.name(),
            e / q,
            e1 / q1
        );
    }
}
