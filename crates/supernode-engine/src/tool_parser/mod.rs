//! Model output split into reasoning, content and tool calls, incrementally.
//!
//! [`OutputParser`] takes the generated text piece by piece (as the detokeniser yields it) and
//! returns [`Delta`]s: reasoning text, content text, and tool calls (first their name and id,
//! then their arguments). The reasoning split comes first ([`reasoning`]); only the content
//! that follows is searched for tool calls, so a call written while thinking stays reasoning.
//! A call is recognised by its family's markers ([`families`]); text that may be the start of a
//! marker is held back until it is decided. Inside a call region, a call is given out once its
//! name is written and its arguments have begun, and its arguments as they are written
//! ([`partial`]); a region that shows no call by its end, and does not parse as calls, is given
//! back as content. Every decision depends only on the text, never on how it was cut into
//! pieces, so a stream's deltas add up to the parse of the whole output ([`parse_complete`]).

mod families;
mod partial;
mod reasoning;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use families::{
    Family, RawCall, DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP,
};
pub use partial::PartialCall;
pub use reasoning::{may_reason, ReasoningFamily, ReasoningParser, REASONING_END};

/// The texts of tool-call and reasoning markers, which the tokenizer decodes even where a model
/// file marks them as control tokens (the parsers need to see them).
pub const MARKUP_TEXTS: [&str; 13] = [
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "<|python_tag|>",
    families::DS_CALLS_BEGIN,
    families::DS_CALLS_END,
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
];

/// One piece of parsed output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
    /// A tool call begins: its index among this output's calls, id and function name.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments (JSON text).
    CallArgs {
        index: usize,
        text: String,
    },
}

/// A complete tool call, as OpenAI's `message.tool_calls` has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON object text.
    pub arguments: String,
}

/// A whole output, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub reasoning: Option<String>,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl Parsed {
    /// Adds deltas up, as a client reassembles a stream.
    pub fn from_deltas(deltas: impl IntoIterator<Item = Delta>) -> Parsed {
        let mut p = Parsed::default();
        for d in deltas {
            match d {
                Delta::Reasoning(t) => p.reasoning.get_or_insert_with(String::new).push_str(&t),
                Delta::Content(t) => p.content.push_str(&t),
                Delta::CallStart { id, name, .. } => p.tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                }),
                Delta::CallArgs { index, text } => {
                    if let Some(c) = p.tool_calls.get_mut(index) {
                        c.arguments.push_str(&text);
                    }
                }
            }
        }
        p
    }
}

/// The longest suffix of `text` that is a proper prefix of one of `markers` (text that might
/// become a marker with what comes next), as a byte length.
fn partial_marker_len(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        for (i, _) in m.char_indices().skip(1) {
            if i > best && text.ends_with(&m[..i]) {
                best = i;
            }
        }
    }
    best
}

/// The earliest full marker in `text`: its position and the marker.
fn find_marker<'m>(text: &str, markers: &[&'m str]) -> Option<(usize, &'m str)> {
    markers
        .iter()
        .filter_map(|m| text.find(m).map(|p| (p, *m)))
        .min_by_key(|&(p, m)| (p, usize::MAX - m.len()))
}

/// Where the tool parser is in the output.
enum State {
    /// Nothing but whitespace yet (a leading start may still come).
    Leading,
    Text,
    /// Inside a call region opened by `start`.
    Region {
        start: &'static str,
    },
}

/// Finds tool calls of one family in content text, incrementally.
pub struct ToolCallParser {
    family: Family,
    /// Declared parameter types: `(function, parameter)` of string type.
    string_params: Vec<(String, String)>,
    /// Declared (function, parameter) pairs of any type.
    known_params: Vec<(String, String)>,
    id_prefix: String,
    state: State,
    /// Text received but not yet given out (held back, or a region's body so far).
    buf: String,
    /// Whitespace after the last content given out, held until text follows it.
    held_space: String,
    calls: usize,
    /// The current region's calls given out so far: how many argument bytes of each.
    region_args: Vec<usize>,
}

impl ToolCallParser {
    /// A parser for `family`; `tools` are the request's definitions (OpenAI shape), which say
    /// the parameter types; call ids are `{id_prefix}{n}` (see [`ToolCallParser::call_id`]).
    pub fn new(family: Family, tools: &[Value], id_prefix: &str) -> ToolCallParser {
        let mut string_params = Vec::new();
        let mut known_params = Vec::new();
        for t in tools {
            let f = t.get("function").unwrap_or(t);
            let name = f.get("name").and_then(Value::as_str).unwrap_or("");
            let props = f
                .pointer("/parameters/properties")
                .and_then(Value::as_object);
            for (p, schema) in props.into_iter().flatten() {
                known_params.push((name.to_string(), p.clone()));
                if schema.get("type").and_then(Value::as_str) == Some("string") {
                    string_params.push((name.to_string(), p.clone()));
                }
            }
        }
        ToolCallParser {
            family,
            string_params,
            known_params,
            id_prefix: id_prefix.to_string(),
            state: State::Leading,
            buf: String::new(),
            held_space: String::new(),
            calls: 0,
            region_args: Vec::new(),
        }
    }

    /// Takes the next piece of content; returns what is decided.
    pub fn push(&mut self, text: &str, out: &mut Vec<Delta>) {
        self.buf.push_str(text);
        self.advance(false, out);
    }

    /// The output ended: decides whatever is held.
    pub fn finish(&mut self, out: &mut Vec<Delta>) {
        self.advance(true, out);
        if self.calls == 0 && !self.held_space.is_empty() {
            out.push(Delta::Content(std::mem::take(&mut self.held_space)));
        }
    }

    fn advance(&mut self, at_end: bool, out: &mut Vec<Delta>) {
        loop {
            match self.state {
                State::Leading => {
                    let body = self.buf.trim_start();
                    let lead = self.family.leading_start();
                    match lead {
                        Some(l) if body.starts_with(l) => {
                            self.buf = body[l.len()..].to_string();
                            self.state = State::Region { start: l };
                        }
                        _ if body.is_empty() && !at_end => return,
                        _ => self.state = State::Text,
                    }
                }
                State::Text => {
                    let starts = self.family.starts();
                    if let Some((p, m)) = find_marker(&self.buf, starts) {
                        let before = self.buf[..p].to_string();
                        self.emit_text(&before, out);
                        self.buf.drain(..p + m.len());
                        self.state = State::Region { start: m };
                        continue;
                    }
                    let keep = if at_end {
                        0
                    } else {
                        partial_marker_len(&self.buf, starts)
                    };
                    let ready: String = self.buf.drain(..self.buf.len() - keep).collect();
                    self.emit_text(&ready, out);
                    return;
                }
                State::Region { start } => {
                    let end = self.family.end(start);
                    match end.and_then(|e| self.buf.find(e).map(|p| (p, e))) {
                        Some((p, e)) => {
                            let body = self.buf[..p].to_string();
                            self.buf.drain(..p + e.len());
                            self.region(start, &body, e, out);
                        }
                        None if at_end => {
                            let body = std::mem::take(&mut self.buf);
                            self.region(start, &body, "", out);
                        }
                        None => {
                            // Give out what the region shows so far: not the beginning of its
                            // end marker, which is not part of its body.
                            let hold = end.map_or(0, |e| partial_marker_len(&self.buf, &[e]));
                            let seen = &self.buf[..self.buf.len() - hold];
                            let calls = self.family.partial(start, seen, &self.is_string());
                            self.show(&calls, out);
                            return;
                        }
                    }
                    self.state = State::Text;
                }
            }
        }
    }

    /// Whether a tool's parameter is to be read as text: declared a string, or not declared.
    fn is_string(&self) -> impl Fn(&str, &str) -> bool + '_ {
        |f: &str, p: &str| {
            let key = (f.to_string(), p.to_string());
            self.string_params.contains(&key) || !self.known_params.contains(&key)
        }
    }

    /// Call `index`'s id: `{id_prefix}{index}`, except for Mistral, whose templates take ids
    /// of 9 letters or digits (v11's refuses any other, Nemo's keeps the last 9): there it is
    /// 9 of them derived from that text (FNV-1a in base 62), as vLLM gives Mistral's calls.
    fn call_id(&self, index: usize) -> String {
        let id = format!("{}{index}", self.id_prefix);
        if self.family != Family::Mistral {
            return id;
        }
        const DIGITS: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (0..9)
            .map(|_| {
                let d = DIGITS[(h % 62) as usize] as char;
                h /= 62;
                d
            })
            .collect()
    }

    /// Gives out what is new in the current region's `calls`: calls not yet started, and the
    /// arguments each has grown by.
    fn show(&mut self, calls: &[PartialCall], out: &mut Vec<Delta>) {
        for (k, c) in calls.iter().enumerate() {
            if k == self.region_args.len() {
                self.held_space.clear();
                let index = self.calls;
                self.calls += 1;
                out.push(Delta::CallStart {
                    index,
                    id: self.call_id(index),
                    name: c.name.clone(),
                });
                self.region_args.push(0);
            }
            // (Arguments only grow, so what was sent is a prefix of them.)
            let sent = self.region_args[k];
            if let Some(more) = c.args.get(sent..).filter(|m| !m.is_empty()) {
                out.push(Delta::CallArgs {
                    index: self.calls - self.region_args.len() + k,
                    text: more.to_string(),
                });
                self.region_args[k] = c.args.len();
            }
        }
    }

    /// A complete region: the calls it shows (those given out so far and the rest), else its
    /// calls if it parses as a whole, else the text as it came.
    fn region(&mut self, start: &str, body: &str, end: &str, out: &mut Vec<Delta>) {
        let calls = self.family.partial(start, body, &self.is_string());
        if !calls.is_empty() {
            self.show(&calls, out);
            self.region_args.clear();
            return;
        }
        debug_assert!(self.region_args.is_empty());
        let parsed = self.family.parse(start, body, &self.is_string());
        match parsed {
            Some(calls) => {
                let whole: Vec<PartialCall> = calls
                    .into_iter()
                    .map(|c| PartialCall {
                        name: c.name,
                        args: c.arguments,
                        done: true,
                    })
                    .collect();
                self.show(&whole, out);
                self.region_args.clear();
            }
            None => {
                let text = format!("{start}{body}{end}");
                self.emit_text(&text, out);
            }
        }
    }

    /// Gives out content, holding its trailing whitespace until more text follows (whitespace
    /// just before a call, or after the last one, is not content).
    fn emit_text(&mut self, text: &str, out: &mut Vec<Delta>) {
        let core = text.trim_end();
        if core.is_empty() {
            self.held_space.push_str(text);
            return;
        }
        let mut s = std::mem::take(&mut self.held_space);
        s.push_str(core);
        self.held_space = text[core.len()..].to_string();
        out.push(Delta::Content(s));
    }
}

/// Reasoning, then tool calls, over one output.
pub struct OutputParser {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
}

impl OutputParser {
    pub fn new(reasoning: Option<ReasoningParser>, tools: Option<ToolCallParser>) -> OutputParser {
        OutputParser { reasoning, tools }
    }

    /// Takes the next piece of generated text; returns what is decided.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let mut out = Vec::new();
        let mut mid = Vec::new();
        match &mut self.reasoning {
            Some(r) => r.push(text, &mut mid),
            None => mid.push(Delta::Content(text.to_string())),
        }
        self.route(mid, &mut out);
        out
    }

    /// The output ended: everything still held.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        let mut mid = Vec::new();
        if let Some(r) = &mut self.reasoning {
            r.finish(&mut mid);
        }
        self.route(mid, &mut out);
        if let Some(t) = &mut self.tools {
            t.finish(&mut out);
        }
        out
    }

    fn route(&mut self, mid: Vec<Delta>, out: &mut Vec<Delta>) {
        for d in mid {
            match (d, &mut self.tools) {
                (Delta::Content(t), Some(tp)) => tp.push(&t, out),
                (d, _) => out.push(d),
            }
        }
    }

    /// Whether any tool call was found so far.
    pub fn called(&self) -> bool {
        self.tools.as_ref().is_some_and(|t| t.calls > 0)
    }
}

/// The parse of a whole output at once.
pub fn parse_complete(parser: &mut OutputParser, text: &str) -> Parsed {
    let mut deltas = parser.push(text);
    deltas.extend(parser.finish());
    Parsed::from_deltas(deltas)
}
