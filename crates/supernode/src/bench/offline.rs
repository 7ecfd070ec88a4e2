//! `supernode bench` offline: prefill a prompt of `--prompt-tokens` pseudo-random tokens (or a
//! real prompt's text), then decode `--gen-tokens` greedily (past end-of-generation for random
//! tokens), `--reps` times, through the engine; medians with min and max, the memory bandwidth
//! that bounds decode, and what speculative decoding drafted and had accepted.

use std::io::IsTerminal;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use supernode_engine::chat::{ChatMessage, ChatTemplate};
use supernode_engine::sampler::SamplingParams;
use supernode_engine::session::Generate;
use supernode_kernels::pool;

use super::{max, median, min, BenchArgs};
use crate::model_args::{load_options, open_model_with};

pub(super) fn bench_offline(a: BenchArgs) -> Result<()> {
    if a.reps == 0 || a.prompt_tokens == 0 || a.gen_tokens < 2 {
        bail!("--reps and --prompt-tokens must be at least 1 and --gen-tokens at least 2");
    }
    a.spec.check()?;
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
        }
        (None, None) => None,
    };
    if a.chat && text.is_none() {
        bail!("--chat needs a prompt text (--prompt or --prompt-file)");
    }
    let (mut session, path) = open_model_with(&a.model, a.spec.wants_mtp())?;
    let spec = a.spec.config(
        &load_options(&a.model),
        session.model(),
        session.tokenizer().map(|t| t.as_ref()),
    )?;
    session.set_speculative(spec.clone())?;
    let vocab = session.model().config().vocab_size;
    let prompt: Vec<u32> = match &text {
        Some(t) => {
            let tok = session.require_tokenizer()?;
            if a.chat {
                let tmpl = ChatTemplate::for_tokenizer(tok)?
                    .context("this model has no chat template: run it without --chat")?;
                let msgs = [ChatMessage {
                    role: "user".into(),
                    content: t.clone(),
                }];
                tmpl.prompt_tokens(tok, &msgs)?
            } else {
                tok.encode(t, true, true)
            }
        }
        None => {
            // Pseudo-random prompt tokens (as llama-bench uses), the same every run.
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            (0..a.prompt_tokens)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % vocab as u64) as u32
                })
                .collect()
        }
    };
    let need = prompt.len() + a.gen_tokens;
    if need > session.ctx_len() {
        bail!(
            "the prompt's {} tokens + --gen-tokens = {need} exceeds the context of {}",
            prompt.len(),
            session.ctx_len()
        );
    }
    let show = !a.json && std::io::stderr().is_terminal();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut generated = Vec::new();
    let (mut drafted, mut accepted) = (0usize, 0usize);
    for rep in 0..a.reps {
        let t0 = Instant::now();
        let mut first = None;
        let mut n = 0usize;
        // A salt of its own per repetition: the prefix cache must not serve this prompt from
        // the previous one.
        let g = Generate {
            params: SamplingParams::greedy(),
            max_tokens: a.gen_tokens,
            stop: Vec::new(),
            ignore_eos: a.ignore_eos || text.is_none(),
            cache_salt: Some(format!("bench-rep-{rep}")),
        };
        let out = session.generate(&prompt, &g, |_| {
            n += 1;
            first.get_or_insert_with(Instant::now);
            true
        })?;
        let end = Instant::now();
        if n < 2 {
            bail!("only {n} token was generated: decode speed needs at least 2");
        }
        if let Some(u) = out.finish.spec {
            drafted += u.draft_tokens;
            accepted += u.accepted_tokens;
        }
        generated.push(n as f64);
        let first = first.context("no token was generated")?;
        let p = prompt.len() as f64 / (first - t0).as_secs_f64();
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
    let mut out = json!({
        "model": path.display().to_string(),
        "threads": pool::threads(),
        "kernels": supernode_kernels::isa_name(),
        "precision": a.model.precision_name(),
        "kv_cache_dtype": a.model.kv_cache_dtype_name(),
        "prompt_tokens": prompt.len(),
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
    if text.is_some() {
        // A real prompt stops at the end of generation: how far it got.
        out["generated_tokens"] = json!(median(&generated));
    }
    if let Some(c) = spec {
        let rate = if drafted > 0 {
            accepted as f64 / drafted as f64
        } else {
            0.0
        };
        out["speculative"] = json!({
            "method": c.method.name(),
            "num_speculative_tokens": c.num_speculative_tokens,
            "adaptive": c.adaptive,
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "acceptance_rate": rate,
        });
        if let supernode_engine::spec::SpecMethod::Draft(d) = &c.method {
            out["speculative"]["draft_model"] = json!(d.name);
        }
    }
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
