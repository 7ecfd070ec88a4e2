//! Reasoning split from content: `<think>…</think>` as DeepSeek-R1 and Qwen3 write it.
//!
//! An output is reasoning from an opening `<think>` (or from its start, when the prompt already
//! opened the block, as DeepSeek-R1's template does) to `</think>`; the rest is content, its
//! leading whitespace dropped. An output that opens no block is all content. A partial marker
//! is held back until decided.

use super::{find_marker, partial_marker_len, Delta};

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// The text that ends a reasoning block: where an output constraint begins to apply.
pub const REASONING_END: &str = CLOSE;

/// Whether an output after `prompt` may hold reasoning: unless the prompt ends by closing a
/// `<think>` block (Qwen3 with `enable_thinking: false`, DeepSeek-V3.1's non-thinking mode).
pub fn may_reason(prompt: &str) -> bool {
    !prompt.trim_end().ends_with(CLOSE)
}

/// A reasoning format (both use `<think>`; the names are vLLM's `--reasoning-parser` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningFamily {
    DeepSeekR1,
    Qwen3,
}

impl ReasoningFamily {
    pub fn name(self) -> &'static str {
        match self {
            ReasoningFamily::DeepSeekR1 => "deepseek_r1",
            ReasoningFamily::Qwen3 => "qwen3",
        }
    }

    pub fn from_name(name: &str) -> Option<ReasoningFamily> {
        [ReasoningFamily::DeepSeekR1, ReasoningFamily::Qwen3]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// The format a chat template's reasoning markers show, if any.
    pub fn detect(template: &str) -> Option<ReasoningFamily> {
        if !template.contains(CLOSE) {
            None
        } else if template.contains("<｜Assistant｜>") {
            Some(ReasoningFamily::DeepSeekR1)
        } else {
            Some(ReasoningFamily::Qwen3)
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    /// Before anything but whitespace: a `<think>` may open.
    Start,
    /// Reasoning from the start, after an optional `<think>`.
    Opening,
    Reasoning,
    /// After `</think>`: whitespace before the content is dropped.
    AfterThink,
    Content,
}

/// Splits one output's reasoning from its content.
pub struct ReasoningParser {
    state: State,
    buf: String,
}

impl ReasoningParser {
    /// `prompt` is the rendered prompt: if it ends inside an open `<think>` block, the output
    /// starts as reasoning.
    pub fn new(prompt: &str) -> ReasoningParser {
        let open = prompt.rfind(OPEN);
        let close = prompt.rfind(CLOSE);
        let inside = match (open, close) {
            (Some(o), Some(c)) => o > c && prompt[o + OPEN.len()..].trim().is_empty(),
            (Some(o), None) => prompt[o + OPEN.len()..].trim().is_empty(),
            _ => false,
        };
        ReasoningParser {
            state: if inside {
                State::Reasoning
            } else {
                State::Start
            },
            buf: String::new(),
        }
    }

    /// [`ReasoningParser::new`] for a family: DeepSeek-R1 models always think first, and
    /// templates of the R1 distills leave the opening `<think>` to the model, which may not
    /// write it: for them the output is reasoning unless the prompt closed the block.
    pub fn for_family(prompt: &str, family: ReasoningFamily) -> ReasoningParser {
        let mut p = ReasoningParser::new(prompt);
        if family == ReasoningFamily::DeepSeekR1 {
            let closed = match (prompt.rfind(OPEN), prompt.rfind(CLOSE)) {
                (Some(o), Some(c)) => c > o,
                (None, Some(_)) => true,
                _ => false,
            };
            if !closed && p.state == State::Start {
                // A leading `<think>` is still taken off.
                p.state = State::Opening;
            }
        }
        p
    }

    pub fn push(&mut self, text: &str, out: &mut Vec<Delta>) {
        self.buf.push_str(text);
        self.advance(false, out);
    }

    pub fn finish(&mut self, out: &mut Vec<Delta>) {
        self.advance(true, out);
    }

    fn advance(&mut self, at_end: bool, out: &mut Vec<Delta>) {
        loop {
            match self.state {
                State::Start => {
                    let body = self.buf.trim_start();
                    if let Some(rest) = body.strip_prefix(OPEN) {
                        self.buf = rest.to_string();
                        self.state = State::Reasoning;
                    } else if !at_end && OPEN.starts_with(body) {
                        return;
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Opening => {
                    let body = self.buf.trim_start();
                    if let Some(rest) = body.strip_prefix(OPEN) {
                        self.buf = rest.to_string();
                    } else if !at_end && OPEN.starts_with(body) {
                        return;
                    }
                    self.state = State::Reasoning;
                }
                State::Reasoning => {
                    if let Some((p, m)) = find_marker(&self.buf, &[CLOSE]) {
                        if p > 0 {
                            out.push(Delta::Reasoning(self.buf[..p].to_string()));
                        }
                        self.buf.drain(..p + m.len());
                        self.state = State::AfterThink;
                        continue;
                    }
                    let keep = if at_end {
                        0
                    } else {
                        partial_marker_len(&self.buf, &[CLOSE])
                    };
                    let ready: String = self.buf.drain(..self.buf.len() - keep).collect();
                    if !ready.is_empty() {
                        out.push(Delta::Reasoning(ready));
                    }
                    return;
                }
                State::AfterThink => {
                    let body = self.buf.trim_start();
                    if body.is_empty() {
                        self.buf.clear();
                        return;
                    }
                    self.buf = body.to_string();
                    self.state = State::Content;
                }
                State::Content => {
                    if !self.buf.is_empty() {
                        out.push(Delta::Content(std::mem::take(&mut self.buf)));
                    }
                    return;
                }
            }
        }
    }
}
