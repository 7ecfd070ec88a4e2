//! What a chat render takes beyond roles and contents: tool definitions, the fields of tool
//! calling (`tool_calls`, `tool_call_id`, `name`, `reasoning_content`) and the caller's template
//! variables (`chat_template_kwargs`), as transformers' `apply_chat_template` passes them.
//!
//! The texts a user controls are kept plain by the same marking as message contents
//! ([`super::ChatTemplate::render`]): every *protected* string is wrapped in markers in the
//! locating renders. Protected are the contents, `reasoning_content`, and every string value in a
//! tool call's arguments (templates render them with `tojson`, which keeps the markers). Other
//! strings (tool definitions, function names, ids, argument keys, template variables) cannot be
//! marked without changing what a template sees, so any control-token text in them is refused.

use serde_json::{Map, Value};

use super::{marked, ChatMessage};
use crate::error::EngineError;
use crate::tokenizer::Tokenizer;

/// Tools, per-message tool fields and template variables for a render.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatExtras {
    /// Fields beside `role` and `content`, one map per message (or none at all): `tool_calls`
    /// (arguments as JSON objects where they parse, as transformers expects), `tool_call_id`,
    /// `name`, `reasoning_content`.
    pub fields: Vec<Map<String, Value>>,
    /// The tool definitions in OpenAI's shape (`[{"type": "function", "function": {...}}]`).
    pub tools: Option<Value>,
    /// Variables for the template (`enable_thinking`, ...); the render's own names win.
    pub kwargs: Map<String, Value>,
}

impl ChatExtras {
    /// The same with every tool call's object arguments as JSON text; `None` if there are none.
    pub fn with_string_arguments(&self) -> Option<ChatExtras> {
        let mut out = self.clone();
        let mut changed = false;
        for m in &mut out.fields {
            if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
                for call in calls {
                    if let Some(args) = call.pointer_mut("/function/arguments") {
                        if !args.is_string() {
                            *args = Value::String(args.to_string());
                            changed = true;
                        }
                    }
                }
            }
        }
        changed.then_some(out)
    }
}

/// The names a render sets itself; template variables may not replace them.
pub const RESERVED: [&str; 5] = [
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// Numbers protected strings in render order and wraps them (see [`marked`]).
pub(super) struct Marker {
    pub next: usize,
    /// Keep the core (the wrapped render) or leave it out (the hollow one).
    pub core: bool,
}

impl Marker {
    fn mark(&mut self, s: &str) -> String {
        let i = self.next;
        self.next += 1;
        marked(i, s, self.core)
    }
}

/// The `messages` a template sees: role, content and the message's extra fields, with the
/// protected strings marked when `marker` is given.
pub(super) fn template_messages(
    messages: &[ChatMessage],
    extras: &ChatExtras,
    mut marker: Option<&mut Marker>,
) -> Value {
    let out = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut obj = extras.fields.get(i).cloned().unwrap_or_default();
            let mut mark = |s: &str| match marker.as_deref_mut() {
                Some(mk) => mk.mark(s),
                None => s.to_string(),
            };
            obj.insert("role".into(), Value::String(m.role.clone()));
            obj.insert("content".into(), Value::String(mark(&m.content)));
            if let Some(Value::String(r)) = obj.get_mut("reasoning_content") {
                *r = mark(r);
            }
            if let Some(Value::Array(calls)) = obj.get_mut("tool_calls") {
                for call in calls {
                    if let Some(args) = call.pointer_mut("/function/arguments") {
                        map_strings(args, &mut mark);
                    }
                }
            }
            Value::Object(obj)
        })
        .collect();
    Value::Array(out)
}

/// Replaces every string value (not keys) inside `v` by `f` of it.
fn map_strings(v: &mut Value, f: &mut dyn FnMut(&str) -> String) {
    match v {
        Value::String(s) => *s = f(s),
        Value::Array(a) => a.iter_mut().for_each(|x| map_strings(x, f)),
        Value::Object(o) => o.values_mut().for_each(|x| map_strings(x, f)),
        _ => {}
    }
}

/// Every protected string, in the order [`template_messages`] marks them.
pub(super) fn protected_strings(messages: &[ChatMessage], extras: &ChatExtras) -> Vec<String> {
    let mut out = Vec::new();
    let v = template_messages(messages, extras, None);
    // The same walk as the marking's, collecting instead.
    for m in v.as_array().into_iter().flatten() {
        if let Some(Value::String(c)) = m.get("content") {
            out.push(c.clone());
        }
        if let Some(Value::String(r)) = m.get("reasoning_content") {
            out.push(r.clone());
        }
        for call in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(args) = call.pointer("/function/arguments") {
                let mut args = args.clone();
                map_strings(&mut args, &mut |s| {
                    out.push(s.to_string());
                    s.to_string()
                });
            }
        }
    }
    out
}

/// Refuses control-token texts in the strings that cannot be marked: tool definitions,
/// template variables, and the unprotected message fields (names, ids, argument keys).
pub(super) fn refuse_unmarkable(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    extras: &ChatExtras,
) -> Result<(), EngineError> {
    let mut texts = Vec::new();
    let mut hollow = Marker {
        next: 0,
        core: false,
    };
    // Protected strings emptied: what is left is what a user cannot have kept plain.
    let v = template_messages(messages, extras, Some(&mut hollow));
    for m in v.as_array().into_iter().flatten() {
        let mut m = m.clone();
        if let Some(o) = m.as_object_mut() {
            o.remove("content");
            o.remove("reasoning_content");
        }
        collect_texts(&m, &mut texts);
    }
    if let Some(t) = &extras.tools {
        collect_texts(t, &mut texts);
    }
    collect_texts(&Value::Object(extras.kwargs.clone()), &mut texts);
    for text in texts {
        for variant in [text.clone(), text.to_lowercase(), text.to_uppercase()] {
            if let Some(id) = tok.find_control_text(&variant) {
                let name = tok.token_text(id).unwrap_or("").escape_debug().to_string();
                return Err(EngineError::Invalid(format!(
                    "a tool definition, tool call or template variable contains the \
                     control-token text `{name}`, which only message contents may hold: remove it"
                )));
            }
        }
    }
    Ok(())
}

/// Every string and object key inside `v`, with the markers of a hollow render removed.
fn collect_texts(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.chars().filter(|&c| !super::is_marker_char(c)).collect()),
        Value::Array(a) => a.iter().for_each(|x| collect_texts(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                out.push(k.clone());
                collect_texts(x, out);
            }
        }
        _ => {}
    }
}
