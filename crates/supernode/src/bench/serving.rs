//! `supernode bench --serve`: drive an OpenAI server (a running one at `--url`, or
//! `supernode serve` started here for `--model`) with streaming requests at each
//! `--concurrency`; aggregate output tokens/s, time to first token, time per output token and
//! inter-chunk latency percentiles, errors, and the spawned server's peak memory.

use std::io::{BufRead, BufReader, IsTerminal};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::{percentile, BenchArgs};

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
        cmd.args(["--kv-cache-dtype", a.model.kv_cache_dtype_name()]);
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

pub(super) fn bench_serve(a: BenchArgs) -> Result<()> {
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
