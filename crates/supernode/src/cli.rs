//! Subcommands: `run`, `logits`, `tokenize`, `serve`, `bench`, `fetch`.

use std::io::{self, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use supernode_engine::chat::{ChatMessage, ChatTemplate};
use supernode_engine::engine::SpecUsage;
use supernode_engine::load::load_tokenizer;
use supernode_engine::sampler::SamplingParams;
use supernode_engine::session::{Generate, Session};
use supernode_engine::tokenizer::Tokenizer;

use crate::chat_repl::{interactive_chat, ChatOptions};
use crate::fetch;
use crate::model_args::{load_options, open_model, open_model_with, status_line, ModelArgs};
use crate::spec_args::SpecArgs;

/// `run`'s token limit when `--max-tokens` is not given (an interactive chat has none).
const DEFAULT_MAX_TOKENS: usize = 128;

#[derive(Parser)]
#[command(
    name = "supernode",
    version,
    about = "Fast inference for open-weight language models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (or chat interactively with --chat and no --prompt).
    Run(RunArgs),
    /// Print the logits of every position of a token sequence as JSON.
    Logits(LogitsArgs),
    /// Print the token ids of a text as JSON.
    Tokenize(TokenizeArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(crate::server::ServeArgs),
    /// Serve as an NVIDIA Dynamo backend worker behind Dynamo's frontend and router (built
    /// with the `dynamo` feature).
    #[cfg(feature = "dynamo")]
    Worker(Box<crate::worker::WorkerArgs>),
    /// Measure speed (prefill and decode, or a server under load with --serve) as JSON.
    Bench(crate::bench::BenchArgs),
    /// Download a model into the cache: a known name (smollm2-135m, gemma3-270m, qwen2.5-0.5b)
    /// or a Hub name (org/repo[@REV][:QUANT]); prints its local path.
    Fetch {
        /// The model's short name or Hub name.
        name: String,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// The prompt text (special tokens in it are recognised, except in --chat mode).
    #[arg(long, short = 'p', conflicts_with = "tokens")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Tokens to generate at most (default: 128, or in an interactive chat all the room the
    /// context has left).
    #[arg(short = 'n', long = "max-tokens")]
    max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the top probability (0: off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalise repeated tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Wrap the prompt in the model's chat template (interactive chat if no --prompt).
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop before this text (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object {prompt_tokens, tokens, text} instead of streaming text (with
    /// `speculative: {draft_tokens, accepted_tokens}` when speculating).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Print only the K largest logits of each position, as [id, logit] pairs.
    #[arg(long)]
    top: Option<usize>,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    text: String,
    /// Do not add BOS/EOS even if the model asks for them.
    #[arg(long)]
    no_add_special: bool,
    /// Treat special-token texts (e.g. <|im_start|>) as plain text.
    #[arg(long)]
    no_parse_special: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run_cmd(a),
        Command::Logits(a) => logits_cmd(a),
        Command::Tokenize(a) => tokenize_cmd(a),
        Command::Serve(a) => crate::server::serve(a),
        #[cfg(feature = "dynamo")]
        Command::Worker(a) => crate::worker::worker(*a),
        Command::Bench(a) => crate::bench::bench(a),
        Command::Fetch { name } => {
            let path = match (fetch::known(&name), crate::hub::HubSpec::parse(&name)) {
                (Some(m), _) => fetch::ensure(m)?,
                (None, Some(spec)) => crate::hub::resolve(&spec)?,
                (None, None) => {
                    let names: Vec<_> = fetch::KNOWN_MODELS.iter().map(|m| m.name).collect();
                    bail!(
                        "unknown model `{name}`: give a Hub name (org/repo[@REV][:QUANT]) or a known \
                         name ({})",
                        names.join(", ")
                    )
                }
            };
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn open(m: &ModelArgs) -> Result<Session> {
    open_model(m).map(|(s, _)| s)
}

fn sampling(a: &RunArgs) -> SamplingParams {
    SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repeat_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        ..SamplingParams::default()
    }
}

fn template(tok: &Tokenizer) -> Result<ChatTemplate> {
    ChatTemplate::for_tokenizer(tok)?.context(
        "this model has no chat template (it is likely a base model): run it without --chat",
    )
}

fn run_cmd(a: RunArgs) -> Result<()> {
    let params = sampling(&a);
    params.validate().map_err(anyhow::Error::msg)?;
    a.spec.check()?;
    let mut session = open_model_with(&a.model, a.spec.wants_mtp())?.0;
    let spec = a.spec.config(
        &load_options(&a.model),
        session.model(),
        session.tokenizer().map(|t| t.as_ref()),
    )?;
    session.set_speculative(spec)?;
    if a.chat && a.prompt.is_none() && a.tokens.is_none() {
        let tmpl = template(session.require_tokenizer()?)?;
        let opts = ChatOptions {
            system: a.system.clone(),
            params,
            max_tokens: a.max_tokens,
            stop: a.stop.clone(),
            ignore_eos: a.ignore_eos,
            verbose: a.model.verbose,
        };
        return interactive_chat(&mut session, &tmpl, &opts);
    }
    let prompt: Vec<u32> = match (&a.tokens, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = session.require_tokenizer()?;
            if a.chat {
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(ChatMessage {
                        role: "system".into(),
                        content: s.clone(),
                    });
                }
                msgs.push(ChatMessage {
                    role: "user".into(),
                    content: text.clone(),
                });
                template(tok)?.prompt_tokens(tok, &msgs)?
            } else {
                tok.encode(text, true, true)
            }
        }
        (None, None) => {
            bail!("give a prompt with --prompt or --tokens (or use --chat for an interactive chat)")
        }
    };
    let (tokens, text, spec) = generate(&mut session, &prompt, &params, &a, !a.json)?;
    if a.json {
        let mut out = json!({ "prompt_tokens": prompt, "tokens": tokens, "text": text });
        if let Some(u) = spec {
            out["speculative"] = json!({
                "draft_tokens": u.draft_tokens,
                "accepted_tokens": u.accepted_tokens,
            });
        }
        println!("{out}");
    }
    Ok(())
}

/// Generates, streaming text to stdout if `stream`; returns the tokens, their text (None
/// without a tokenizer) and what speculation did.
fn generate(
    session: &mut Session,
    prompt: &[u32],
    params: &SamplingParams,
    a: &RunArgs,
    stream: bool,
) -> Result<(Vec<u32>, Option<String>, Option<SpecUsage>)> {
    let has_text = session.tokenizer().is_some();
    let mut stdout = io::stdout().lock();
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let g = Generate {
        params: params.clone(),
        max_tokens: a.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        cache_salt: None,
    };
    let out = session.generate(prompt, &g, |t| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if stream && !t.text.is_empty() {
            let _ = stdout.write_all(t.text.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if stream {
        let _ = stdout.write_all(out.finish.text.as_bytes());
        let _ = writeln!(stdout);
    }
    let total = t0.elapsed().as_secs_f64();
    let n = out.tokens.len();
    let spec = out.finish.spec;
    if let (Some(f), true) = (first, n > 1) {
        let drafts = spec.map_or(String::new(), |u| {
            format!(
                "; {} of {} draft tokens accepted",
                u.accepted_tokens, u.draft_tokens
            )
        });
        status_line(
            a.model.verbose,
            &format!(
                "prompt {} tokens in {:.3}s ({:.1} tok/s); generated {} tokens at {:.1} tok/s{drafts}",
                prompt.len(),
                f,
                prompt.len() as f64 / f,
                n,
                (n - 1) as f64 / (total - f).max(1e-9)
            ),
        );
    }
    Ok((out.tokens, has_text.then_some(out.text), spec))
}

fn logits_cmd(a: LogitsArgs) -> Result<()> {
    let mut session = open(&a.model)?;
    let rows = session.logits(&a.tokens)?;
    let logits: Vec<serde_json::Value> = match a.top {
        None => rows.iter().map(|r| json!(r)).collect(),
        Some(k) => rows
            .iter()
            .map(|r| {
                let mut idx: Vec<usize> = (0..r.len()).collect();
                idx.sort_by(|&x, &y| r[y].total_cmp(&r[x]).then(x.cmp(&y)));
                json!(idx
                    .iter()
                    .take(k)
                    .map(|&i| json!([i, r[i]]))
                    .collect::<Vec<_>>())
            })
            .collect(),
    };
    println!("{}", json!({ "tokens": a.tokens, "logits": logits }));
    Ok(())
}

fn tokenize_cmd(a: TokenizeArgs) -> Result<()> {
    let path = fetch::resolve_model(&a.model.model)?;
    let tok =
        load_tokenizer(&path)?.with_context(|| format!("{} has no tokenizer", path.display()))?;
    let ids = tok.encode(&a.text, !a.no_add_special, !a.no_parse_special);
    println!("{}", json!(ids));
    Ok(())
}
