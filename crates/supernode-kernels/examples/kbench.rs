//! Kernel micro-benchmark: `matmul_with` on the shapes that dominate SmolLM2-135M decoding and
//! prefill (and Gemma 3 270M's FFN), in both precisions and, where this CPU packs the type, through the packed kernels
//! (`Packed`), on the kernels' thread pool
//! (`SUPERNODE_THREADS` to change it).
//!
//! Prints the median time of several repetitions, the weight bytes read per second (each call
//! reads the whole weight matrix once, whatever the token count), multiply-adds per second, and
//! the fastest repetition (less sensitive to other processes than the median). Shared machines are noisy:
//! compare medians from runs taken back to back.
//!
//! `cargo run --release -p supernode-kernels --example kbench [-- REPS [TOKENS...]]` (token
//! counts default to 1 and 512). `SUPERNODE_KBENCH=TEXT` keeps only the rows whose weight name
//! or precision contains `TEXT` (e.g. `Exact`, `g_down`), so that `perf stat` sees one kernel;
//! `attention` keeps only one decode step's attention rows (K dots and V sums at 512 and 4,096
//! cached positions).

use std::time::Instant;

use supernode_kernels::matmul::matmul_packed;
use supernode_kernels::qdot::packed::PackedMatrix;
use supernode_kernels::{matmul_with, quantize_row, DType, Precision, WeightMatrix};

/// A small deterministic generator (xorshift64*), so runs compare like with like.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

/// The median and the minimum of `reps` timed calls (after one warm-up), in seconds.
fn time_secs(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

/// One decode step's attention over `ctx` cached positions in the paged layout of SmolLM2's
/// cache (3 KV heads of 64, 16-token pages in shuffled order), per KV head: the query heads
/// of its group against the K rows, then the weighted sum of the V rows. Prints the median
/// milliseconds for one layer (all KV heads), in f16 and f32.
fn attention_rows(rng: &mut Rng, reps: usize, ctx: usize) {
    use supernode_kernels::simd::{
        dot_f16_rows, dot_f32_rows, weighted_rows_f16, weighted_rows_f32,
    };
    let (kv_heads, g, d, page) = (3usize, 3usize, 64usize, 16usize);
    let pages = ctx.div_ceil(page);
    let order: Vec<usize> = (0..pages).map(|p| (p * 7919) % pages).collect();
    let stride = kv_heads * d;
    let len = pages * page * stride;
    let k32 = rng.vec(len);
    let v32 = rng.vec(len);
    let k16: Vec<half::f16> = k32.iter().map(|&x| half::f16::from_f32(x)).collect();
    let v16: Vec<half::f16> = v32.iter().map(|&x| half::f16::from_f32(x)).collect();
    let q = rng.vec(g * d);
    let ws: Vec<f32> = rng
        .vec(g * ctx)
        .iter()
        .map(|x| x.abs() / ctx as f32)
        .collect();
    let mut scores = vec![0f32; g * ctx];
    let mut out = vec![0f32; g * d];
    // Each KV head's rows: its slice of every position's row.
    let bases: Vec<Vec<usize>> = (0..kv_heads)
        .map(|h| {
            (0..ctx)
                .map(|p| (order[p / page] * page + p % page) * stride + h * d)
                .collect()
        })
        .collect();
    let names = ["K dots f16", "V sums f16", "K dots f32", "V sums f32"];
    let mut ms = [0f64; 4];
    for (kernel, m) in ms.iter_mut().enumerate() {
        let (secs, _) = time_secs(reps, || {
            for b in &bases {
                match kernel {
                    0 => dot_f16_rows(&q, d, &k16, b, &mut scores),
                    1 => weighted_rows_f16(&ws, &v16, b, d, &mut out),
                    2 => dot_f32_rows(&q, d, &k32, b, &mut scores),
                    _ => weighted_rows_f32(&ws, &v32, b, d, &mut out),
                }
            }
        });
        *m = secs * 1e3;
    }
    let cols: Vec<String> = names
        .iter()
        .zip(ms)
        .map(|(n, m)| format!("{n} {m:.3} ms"))
        .collect();
    println!(
        "attention ctx {ctx:>6}: {} (one layer, {kv_heads} KV heads x {g} query heads)",
        cols.join(", ")
    );
}

fn main() {
    if let Some(t) = std::env::var("SUPERNODE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        supernode_kernels::pool::set_threads(t);
    }
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(15);
    let mut token_counts: Vec<usize> = std::env::args()
        .skip(2)
        .filter_map(|a| a.parse().ok())
        .collect();
    if token_counts.is_empty() {
        token_counts = vec![1, 512];
    }
    let filter = std::env::var("SUPERNODE_KBENCH").unwrap_or_default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let shapes = [
        ("ffn_up   Q4_1", DType::Q4_1, 1536, 576),
        ("ffn_down Q4_1", DType::Q4_1, 576, 1536),
        ("ffn_up   Q4_0", DType::Q4_0, 1536, 576),
        ("head     Q8_0", DType::Q8_0, 49152, 576),
        // Larger than the last-level cache: the weights stream from memory, as in decoding.
        ("big      Q4_1", DType::Q4_1, 49152, 576),
        ("big      Q4_K", DType::Q4K, 8192, 2048),
        ("big      Q6_K", DType::Q6K, 8192, 2048),
        // Gemma 3 270M's FFN: 640 columns take no K-quant, so Q4_K_M stores them as Q5_0.
        ("g_up     Q5_0", DType::Q5_0, 2048, 640),
        ("g_down   Q4_K", DType::Q4K, 640, 2048),
        ("g_down   Q6_K", DType::Q6K, 640, 2048),
        ("g_o      Q4_K", DType::Q4K, 640, 1024),
    ];
    println!(
        "threads {}, median of {reps} reps",
        supernode_kernels::pool::threads()
    );
    println!(
        "{:<14} {:>5} {:>9} {:>10} {:>9} {:>9} {:>10}",
        "weight", "n", "precision", "median ms", "GB/s", "GMAC/s", "min ms"
    );
    for (name, dtype, rows, cols) in shapes {
        let modes = [("Exact", false), ("Quantized", false), ("Packed", true)];
        let modes: Vec<_> = modes
            .into_iter()
            .filter(|(mode, _)| name.contains(&filter) || mode.contains(&filter))
            .collect();
        if modes.is_empty() {
            continue;
        }
        let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
        let mut data = vec![0u8; rows * row_bytes];
        for row in data.chunks_exact_mut(row_bytes) {
            quantize_row(dtype, &rng.vec(cols), row);
        }
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        for &n in &token_counts {
            // The head only ever sees one token per sequence.
            if n > 1 && rows > 10_000 {
                continue;
            }
            let x = rng.vec(n * cols);
            let mut out = vec![0f32; n * rows];
            let packed = PackedMatrix::pack(dtype, rows, cols, &data);
            for &(mode, pack) in &modes {
                let reps = if n > 1 { reps.div_ceil(3) } else { reps };
                let (secs, min) = match (&packed, pack) {
                    (Some(p), true) => time_secs(reps, || matmul_packed(p, &x, n, &mut out)),
                    (None, true) => continue,
                    (_, false) => {
                        let precision = match mode {
                            "Exact" => Precision::Exact,
                            _ => Precision::Quantized,
                        };
                        time_secs(reps, || matmul_with(&w, &x, n, &mut out, precision))
                    }
                };
                println!(
                    "{name:<14} {n:>5} {:>9} {:>10.3} {:>9.2} {:>9.2} {:>10.3}",
                    mode,
                    secs * 1e3,
                    data.len() as f64 / secs / 1e9,
                    (rows * cols * n) as f64 / secs / 1e9,
                    min * 1e3
                );
            }
        }
    }
    if filter.is_empty() || "attention".contains(&filter) {
        for ctx in [512, 4096] {
            attention_rows(&mut rng, reps, ctx);
        }
    }
}
