//! `supernode bench`: speed figures as JSON.
//!
//! - Offline (default): prefill a prompt of `--prompt-tokens` pseudo-random tokens, then decode
//!   `--gen-tokens` greedily past end-of-generation, `--reps` times; medians with min and max.
//! - `--serve`: drive an OpenAI server (a running one at `--url`, or `supernode serve` started
//!   here for `--model`) with `--requests` streaming chat requests (or, with `--completions`,
//!   text completions) at each `--concurrency`;
//!   aggregate output tokens/s, time to first token, time per output token and inter-chunk
//!   latency percentiles, errors, and the spawned server's peak memory.

use std::io::{BufRead, BufReader, IsTerminal};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use supernode_engine::sampler::SamplingParams;
use supernode_kernels::pool;

use crate::cli::{open_model, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length (offline mode).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode (offline mode).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
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
        return bench_serve(a);
    }
    if a.reps == 0 || a.prompt_tokens == 0 || a.gen_tokens < 2 {
        bail!("--reps and --prompt-tokens must be at least 1 and --gen-tokens at least 2");
    }
    let (mut session, path) = open_model(&a.model)?;
    let vocab = session.model().config().vocab_size;
    let need = a.prompt_tokens + a.gen_tokens;
    if need > session.ctx_len() {
        bail!(
            "--prompt-tokens + --gen-tokens = {need} exceeds the context of {}",
            session.ctx_len()
        );
    }
    // Pseudo-random prompt tokens (as llama-bench uses), the same every run.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect();
    let show = !a.json && std::io::stderr().is_terminal();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..a.reps {
        let t0 = Instant::now();
        let mut first = None;
        let mut n = 0usize;
        session.generate(
            &prompt,
            &SamplingParams::greedy(),
            a.gen_tokens,
            true,
            |_, _| {
                n += 1;
                first.get_or_insert_with(Instant::now);
                true
            },
        )?;
        let end = Instant::now();
        let first = first.context("no token was generated")?;
        let p = a.prompt_tokens as f64 / (first - t0).as_secs_f64();
        let d = (n - 1) as f64 / (end - first).as_secs_f64().max(1e-9);
        if show {
            eprintln!(
                "rep {}/{}: prefill {p:.1} tok/s, decode {d:.1} tok/s",
                rep + 1,
                a.reps
            );
        }
        prefill.push(p);
        decode.push(d);
    }
    let bytes = session.model().weight_bytes_per_token();
    let (pm, dm) = (median(&prefill), median(&decode));
    let bw = read_bandwidth();
    let out = json!({
        "model": path.display().to_string(),
        "threads": pool::threads(),
        "precision": a.model.precision_name(),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "reps": a.reps,
        "prefill_tok_s": pm,
        "prefill_tok_s_min": min(&prefill),
        "prefill_tok_s_max": max(&prefill),
        "decode_tok_s": dm,
        "decode_tok_s_min": min(&decode),
        "decode_tok_s_max": max(&decode),
        "weight_bytes_per_token": bytes,
        "decode_weight_gb_s": dm * bytes as f64 / 1e9,
        "memory_read_gb_s": bw / 1e9,
        "decode_roofline_tok_s": bw / bytes as f64,
        "decode_roofline_share": dm * bytes as f64 / bw,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Memory read bandwidth in bytes/s on the compute pool's threads: the best of a few passes
/// summing a 512 MiB buffer, each thread its own part (the roofline for weight-bound decode).
fn read_bandwidth() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let buf = vec![1u64; 64 << 20];
    let mut best = 0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let total = AtomicU64::new(0);
        pool::for_each(buf.len() >> 16, |i| {
            let c = &buf[i << 16..(i + 1) << 16];
            let s = c.iter().fold(0u64, |a, &x| a.wrapping_add(x));
            total.fetch_add(s, Ordering::Relaxed);
        });
        let s = total.load(Ordering::Relaxed);
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((buf.len() * 8) as f64 / dt);
    }
    best
}

fn median(xs: &[f64]) -> f64 {
    percentile(xs, 50.0)
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Linear-interpolated percentile; NaN for no data.
fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let r = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (r - lo as f64)
}

/// A `supernode serve` started for the benchmark; stopped with SIGTERM on drop.
struct Spawned {
    child: Child,
    url: String,
}

impl Spawned {
    fn start(a: &BenchArgs) -> Result<Spawned> {
        let exe = std::env::current_exe().context("cannot find the supernode binary")?;
        let mut cmd = Proc::new(exe);
        cmd.args(["serve", "--model", &a.model.model, "--port", "0"]);
        if let Some(t) = a.model.threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        if let Some(c) = a.model.ctx {
            cmd.args(["--ctx", &c.to_string()]);
        }
        cmd.args(["--precision", a.model.precision_name()]);
        if let Some(extra) = &a.server_args {
            cmd.args(extra.split_whitespace());
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start `supernode serve`")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let url = loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                bail!("the server exited before listening:\n{}", seen.join("\n"));
            };
            let line = line?;
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.trim().to_string();
            }
            seen.push(line);
        };
        // Keep draining the server's stderr so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Spawned { child, url })
    }

    /// Peak resident memory (VmHWM) in bytes, where /proc has it.
    fn peak_rss(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            let _ = Proc::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        #[cfg(not(unix))]
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request's timings.
#[derive(Default)]
struct Timing {
    ok: bool,
    error: Option<String>,
    ttft: f64,
    /// Seconds per output token after the first.
    tpot: Option<f64>,
    gaps: Vec<f64>,
    tokens: usize,
}

const TOPICS: [&str; 8] = [
    "the sea",
    "a lighthouse keeper",
    "mountains in winter",
    "a robot learning to paint",
    "the history of bread",
    "a city at night",
    "an old library",
    "a journey by train",
];

fn bench_serve(a: BenchArgs) -> Result<()> {
    if a.requests == 0 || a.max_tokens == 0 || a.concurrency.contains(&0) {
        bail!("--requests, --max-tokens and every --concurrency must be at least 1");
    }
    let spawned = match &a.url {
        Some(_) => None,
        None => Some(Spawned::start(&a)?),
    };
    let base = a
        .url
        .clone()
        .or_else(|| spawned.as_ref().map(|s| s.url.clone()))
        .expect("a URL or a spawned server")
        .trim_end_matches('/')
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        // A fresh connection per request: reusing one the server has just closed fails the
        // request, which would count against the server.
        .pool_max_idle_per_host(0)
        .build()?;
    let model_id: String = rt.block_on(async {
        let v: Value = client
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .with_context(|| format!("cannot reach {base}"))?
            .json()
            .await?;
        v["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .context("/v1/models lists no model")
    })?;
    let mut runs = Vec::new();
    for &conc in &a.concurrency {
        let bar = if a.json || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(a.requests as u64).with_style(
                ProgressStyle::with_template(&format!(
                    "concurrency {conc}: {{bar:30}} {{pos}}/{{len}} requests {{elapsed}}"
                ))
                .expect("valid template"),
            )
        };
        let t0 = Instant::now();
        let timings = rt.block_on(run_load(&client, &base, &model_id, &a, conc, &bar));
        let wall = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        runs.push(summarise(&timings, conc, wall));
    }
    let out = json!({
        "url": base,
        "model": model_id,
        "requests": a.requests,
        "max_tokens": a.max_tokens,
        "runs": runs,
        "server_peak_rss_bytes": spawned.as_ref().and_then(Spawned::peak_rss),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn run_load(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    a: &BenchArgs,
    conc: usize,
    bar: &ProgressBar,
) -> Vec<Timing> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, next, bar) = (client.clone(), next.clone(), bar.clone());
        let (model, max_tokens, total) = (model.to_string(), a.max_tokens, a.requests);
        let completions = a.completions;
        let url = match completions {
            true => format!("{base}/v1/completions"),
            false => format!("{base}/v1/chat/completions"),
        };
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let topic = TOPICS[i % TOPICS.len()];
                let mut body = json!({
                    "model": model,
                    "max_tokens": max_tokens,
                    "temperature": 0.7,
                    "seed": i,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                if completions {
                    body["prompt"] =
                        json!(format!("Request {i}: a short story about {topic}. Once"));
                } else {
                    body["messages"] = json!([{"role": "user", "content":
                        format!("Request {i}: write a short story about {topic}.")}]);
                }
                out.push(one_request(&client, &url, body).await);
                bar.inc(1);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(v) => all.extend(v),
            Err(e) => all.push(Timing {
                error: Some(format!("client task failed: {e}")),
                ..Timing::default()
            }),
        }
    }
    all
}

async fn one_request(client: &reqwest::Client, url: &str, body: Value) -> Timing {
    let t0 = Instant::now();
    let mut t = Timing::default();
    let resp = match client
        .post(url)
        .json(&body)
        .timeout(Duration::from_secs(600))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            t.error = Some(e.to_string());
            return t;
        }
    };
    if !resp.status().is_success() {
        t.error = Some(format!(
            "HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        ));
        return t;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut usage_tokens = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                t.error = Some(e.to_string());
                return t;
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(p) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..p + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if v.get("error").is_some() {
                    t.error = Some(data.to_string());
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(n as usize);
                }
                // Chat chunks carry `delta.content`, completion chunks `text`.
                let choice = &v["choices"][0];
                let has_text = choice["delta"]["content"]
                    .as_str()
                    .or(choice["text"].as_str())
                    .is_some_and(|s| !s.is_empty());
                if has_text {
                    let now = Instant::now();
                    match last {
                        None => {
                            first = Some(now);
                            t.ttft = (now - t0).as_secs_f64();
                        }
                        Some(prev) => t.gaps.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                }
            }
        }
    }
    // Servers without usage in streams send one chunk per token.
    t.tokens = usage_tokens.unwrap_or(t.gaps.len() + usize::from(first.is_some()));
    if let (Some(f), Some(l)) = (first, last) {
        if t.tokens > 1 {
            t.tpot = Some((l - f).as_secs_f64() / (t.tokens - 1) as f64);
        }
    }
    if t.error.is_none() && !done {
        t.error = Some("the stream ended without [DONE]".into());
    }
    t.ok = t.error.is_none() && first.is_some();
    if t.error.is_none() && first.is_none() {
        t.error = Some("no text was streamed".into());
    }
    t
}

fn summarise(ts: &[Timing], conc: usize, wall: f64) -> Value {
    let ok: Vec<&Timing> = ts.iter().filter(|t| t.ok).collect();
    let errors: Vec<&str> = ts.iter().filter_map(|t| t.error.as_deref()).collect();
    let tokens: usize = ok.iter().map(|t| t.tokens).sum();
    let ttft: Vec<f64> = ok.iter().map(|t| t.ttft).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|t| t.tpot).collect();
    let gaps: Vec<f64> = ok.iter().flat_map(|t| t.gaps.iter().copied()).collect();
    let pct = |xs: &[f64]| {
        json!({
            "p50": percentile(xs, 50.0), "p90": percentile(xs, 90.0),
            "p95": percentile(xs, 95.0), "p99": percentile(xs, 99.0),
            "mean": xs.iter().sum::<f64>() / xs.len().max(1) as f64,
        })
    };
    json!({
        "concurrency": conc,
        "requests": ts.len(),
        "ok": ok.len(),
        "errors": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens as f64 / wall,
        "ttft_s": pct(&ttft),
        "tpot_s": pct(&tpot),
        "inter_chunk_s": pct(&gaps),
    })
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
