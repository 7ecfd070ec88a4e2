//! The interactive chat of `supernode run --chat` (no `--prompt`): one user message per line,
//! the reply streamed to stdout.
//!
//! On a terminal the line is read with rustyline (editing, history kept in
//! `<cache>/chat_history`); piped input is read line by line, so scripts can drive it.
//! Commands: `/bye` ends the session (as does end of input), `/clear` forgets the conversation
//! (the system message stays), `/help` lists them. Ctrl-C during a reply stops that reply and
//! keeps the session (the text so far stays in the conversation); Ctrl-C at the prompt clears
//! the line. A reply may use all the room the context has left unless `--max-tokens` caps it,
//! and a reply cut by either limit says so on stderr.

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use supernode_engine::chat::{ChatMessage, ChatTemplate};
use supernode_engine::engine::FinishReason;
use supernode_engine::sampler::SamplingParams;
use supernode_engine::session::{Generate, Session};

use crate::model_args::status_line;

/// Set by Ctrl-C while a reply is being generated; the token callback stops the reply.
static STOP_REPLY: AtomicBool = AtomicBool::new(false);
/// True while a reply is being generated (Ctrl-C at any other time ends the process).
static GENERATING: AtomicBool = AtomicBool::new(false);

const HELP: &str = "commands: /bye (or Ctrl-D) ends the chat; /clear forgets the conversation; \
                    /help shows this. Ctrl-C stops a reply.";

/// What the chat needs from `run`'s arguments.
pub(crate) struct ChatOptions {
    pub(crate) system: Option<String>,
    pub(crate) params: SamplingParams,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) stop: Vec<String>,
    pub(crate) ignore_eos: bool,
    pub(crate) verbose: bool,
}

/// Where lines come from.
enum Input {
    Editor(Box<DefaultEditor>, Option<PathBuf>),
    Piped(io::StdinLock<'static>),
}

impl Input {
    fn open() -> Input {
        if io::stdin().is_terminal() {
            if let Ok(mut ed) = DefaultEditor::new() {
                let history = crate::fetch::cache_dir()
                    .ok()
                    .map(|d| d.join("chat_history"));
                if let Some(h) = &history {
                    let _ = ed.load_history(h);
                }
                return Input::Editor(Box::new(ed), history);
            }
        }
        Input::Piped(io::stdin().lock())
    }

    /// The next line, `None` at the end of input.
    fn line(&mut self) -> Result<Option<String>> {
        match self {
            Input::Editor(ed, _) => loop {
                match ed.readline(">>> ") {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = ed.add_history_entry(line.as_str());
                        }
                        return Ok(Some(line));
                    }
                    Err(ReadlineError::Interrupted) => {
                        eprintln!("(Ctrl-C clears the line; /bye or Ctrl-D ends the chat)");
                    }
                    Err(ReadlineError::Eof) => return Ok(None),
                    Err(e) => return Err(e).context("reading the chat input"),
                }
            },
            Input::Piped(stdin) => {
                let mut line = String::new();
                if stdin.read_line(&mut line).context("reading stdin")? == 0 {
                    return Ok(None);
                }
                Ok(Some(line.trim_end_matches(['\n', '\r']).to_owned()))
            }
        }
    }

    fn save_history(&mut self) {
        if let Input::Editor(ed, Some(path)) = self {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = ed.save_history(path);
        }
    }
}

/// Ctrl-C stops the reply being generated; outside a reply it ends the process as usual.
fn install_ctrl_c() -> Result<()> {
    ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            STOP_REPLY.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// Runs the chat until `/bye` or the end of input.
pub(crate) fn interactive_chat(
    session: &mut Session,
    tmpl: &ChatTemplate,
    o: &ChatOptions,
) -> Result<()> {
    install_ctrl_c()?;
    let start: Vec<ChatMessage> = o.system.iter().map(|s| message("system", s)).collect();
    let mut msgs = start.clone();
    let mut input = Input::open();
    if matches!(input, Input::Editor(..)) {
        eprintln!("{HELP}");
    }
    let result = (|| -> Result<()> {
        while let Some(line) = input.line()? {
            let text = line.trim();
            match text {
                "" => continue,
                "/bye" => break,
                "/clear" => {
                    msgs.clone_from(&start);
                    eprintln!("(conversation cleared)");
                    continue;
                }
                "/help" | "/?" => {
                    eprintln!("{HELP}");
                    continue;
                }
                cmd if cmd.starts_with('/') && !cmd.contains(char::is_whitespace) => {
                    eprintln!("unknown command {cmd}; /help lists the commands");
                    continue;
                }
                _ => {}
            }
            msgs.push(message("user", &line));
            let tok = session.require_tokenizer()?.clone();
            let prompt = tmpl.prompt_tokens(&tok, &msgs)?;
            let room = session.ctx_len().saturating_sub(prompt.len());
            if room == 0 {
                msgs.pop();
                eprintln!(
                    "the conversation fills the {}-token context: /clear starts a new one",
                    session.ctx_len()
                );
                continue;
            }
            let reply = reply(session, &prompt, room, o)?;
            msgs.push(message("assistant", &reply));
        }
        Ok(())
    })();
    input.save_history();
    result
}

/// Streams one reply to stdout; returns its text.
fn reply(session: &mut Session, prompt: &[u32], room: usize, o: &ChatOptions) -> Result<String> {
    let max_tokens = o.max_tokens.map_or(room, |n| n.min(room));
    let g = Generate {
        params: o.params.clone(),
        max_tokens,
        stop: o.stop.clone(),
        ignore_eos: o.ignore_eos,
        cache_salt: None,
    };
    let mut stdout = io::stdout().lock();
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    STOP_REPLY.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    let out = session.generate(prompt, &g, |t| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if !t.text.is_empty() {
            let _ = stdout.write_all(t.text.as_bytes());
            let _ = stdout.flush();
        }
        !STOP_REPLY.load(Ordering::SeqCst)
    });
    GENERATING.store(false, Ordering::SeqCst);
    let out = out?;
    let _ = stdout.write_all(out.finish.text.as_bytes());
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    let n = out.tokens.len();
    match out.finish.reason {
        FinishReason::Cancelled => eprintln!("(reply stopped)"),
        FinishReason::Length if n >= max_tokens && max_tokens < room => {
            eprintln!("(reply cut at --max-tokens {max_tokens})")
        }
        FinishReason::Length => eprintln!(
            "(reply cut: the context of {} tokens is full; /clear starts a new conversation)",
            session.ctx_len()
        ),
        FinishReason::Stop => {}
    }
    if let (Some(f), true) = (first, n > 1) {
        let total = t0.elapsed().as_secs_f64();
        status_line(
            o.verbose,
            &format!(
                "prompt {} tokens in {:.3}s; generated {} tokens at {:.1} tok/s",
                prompt.len(),
                f,
                n,
                (n - 1) as f64 / (total - f).max(1e-9)
            ),
        );
    }
    Ok(out.text)
}
