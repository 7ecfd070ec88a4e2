//! `supernode bench`: speed figures as JSON.
//!
//! - Offline (default): prefill a prompt of `--prompt-tokens` pseudo-random tokens (or the text
//!   of `--prompt`/`--prompt-file`, with `--chat` in the chat template), then decode
//!   `--gen-tokens` greedily (past end-of-generation for the random prompt), `--reps` times;
//!   medians with min and max, and with `--speculative` the draft tokens and acceptance rate.
//! - `--serve`: drive an OpenAI server (a running one at `--url`, or `supernode serve` started
//!   here for `--model`) with `--requests` streaming chat requests (or, with `--completions`,
//!   text completions) at each `--concurrency`;
//!   aggregate output tokens/s, time to first token, time per output token and inter-chunk
//!   latency percentiles, errors, and the spawned server's peak memory.

//!
//! `offline.rs` and `serving.rs` hold the two modes; this module holds their arguments and the
//! statistics they share.

mod offline;
mod serving;

use anyhow::Result;
use clap::Args;

use crate::model_args::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    spec: crate::spec_args::SpecArgs,
    /// A real prompt instead of random tokens (offline mode); generation stops at the end of
    /// generation.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt text from this file (offline mode).
    #[arg(long)]
    prompt_file: Option<std::path::PathBuf>,
    /// Wrap the prompt text in the model's chat template as a user message (offline mode).
    #[arg(long)]
    chat: bool,
    /// Prompt length (offline mode).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode (offline mode).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Decode all of --gen-tokens past end-of-generation tokens with a text prompt too (random
    /// token prompts always do), so that runs compare the same number of tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Repetitions (offline mode); medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print only the JSON object (no progress).
    #[arg(long)]
    json: bool,
    /// Benchmark an OpenAI server instead: the one at --url, or `supernode serve --model M`
    /// started for the run.
    #[arg(long)]
    serve: bool,
    /// A running server's base URL (serving mode), e.g. http://127.0.0.1:8080.
    #[arg(long, requires = "serve")]
    url: Option<String>,
    /// Concurrent clients, comma-separated for several runs (serving mode).
    #[arg(long, value_delimiter = ',', default_value = "16")]
    concurrency: Vec<usize>,
    /// Requests per concurrency level (serving mode).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Output tokens per request (serving mode; generation ignores end-of-generation tokens).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Send text prompts to /v1/completions instead of chat messages to /v1/chat/completions
    /// (serving mode; for base models, which have no chat template).
    #[arg(long, requires = "serve")]
    completions: bool,
    /// Extra arguments for the spawned server, e.g. "--max-num-seqs 32" (serving mode).
    #[arg(long, allow_hyphen_values = true)]
    server_args: Option<String>,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.serve {
        serving::bench_serve(a)
    } else {
        offline::bench_offline(a)
    }
}

pub(crate) fn median(xs: &[f64]) -> f64 {
    percentile(xs, 50.0)
}

pub(crate) fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

pub(crate) fn max(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Linear-interpolated percentile; NaN for no data.
pub(crate) fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let r = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (r - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_interpolate() {
        let xs = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&xs, 100.0), 4.0);
        assert_eq!(percentile(&xs, 50.0), 2.5);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
