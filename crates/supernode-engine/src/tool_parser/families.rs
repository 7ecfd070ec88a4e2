//! How each model family writes tool calls: the markers that open and close a call region, and
//! the parse of a complete region into calls.
//!
//! | family | region | one call |
//! |---|---|---|
//! | `hermes` (Qwen2.5, Hermes) | `<tool_call>` … `</tool_call>`, or a `{` opening the output, to the end | `{"name": N, "arguments": {..}}` |
//! | `qwen3_coder` | `<tool_call>` … `</tool_call>` | `<function=N><parameter=P>v</parameter></function>` |
//! | `llama3_json` | `<|python_tag|>` or a `{` opening the output, to the end | `{"name": N, "parameters": {..}}`, `;`-separated |
//! | `deepseek_v3` | `<｜tool▁calls▁begin｜>` … `<｜tool▁calls▁end｜>` | `<｜tool▁call▁begin｜>function<｜tool▁sep｜>N\n```json\n{..}\n```<｜tool▁call▁end｜>`, or V3.1's `N<｜tool▁sep｜>{..}` |
//! | `mistral` | `[TOOL_CALLS]` to the end | `[{"name": N, "arguments": {..}}]`, or `N[ARGS]{..}` (v11+) |

use serde_json::{Map, Value};

/// A tool-call format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Hermes,
    Qwen3Coder,
    Llama3Json,
    DeepSeekV3,
    Mistral,
}

/// A parsed call: the function's name and its arguments as a JSON object text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCall {
    pub name: String,
    pub arguments: String,
}

pub const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
pub const DS_SEP: &str = "<｜tool▁sep｜>";

impl Family {
    pub const ALL: [Family; 5] = [
        Family::Hermes,
        Family::Qwen3Coder,
        Family::Llama3Json,
        Family::DeepSeekV3,
        Family::Mistral,
    ];

    /// The name `--tool-call-parser` takes (vLLM's).
    pub fn name(self) -> &'static str {
        match self {
            Family::Hermes => "hermes",
            Family::Qwen3Coder => "qwen3_coder",
            Family::Llama3Json => "llama3_json",
            Family::DeepSeekV3 => "deepseek_v3",
            Family::Mistral => "mistral",
        }
    }

    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The family whose markers a chat template uses, if any.
    pub fn detect(template: &str) -> Option<Family> {
        if template.contains("<tool_call>") && template.contains("<function=") {
            Some(Family::Qwen3Coder)
        } else if template.contains("<tool_call>") {
            Some(Family::Hermes)
        } else if template.contains(DS_CALLS_BEGIN) {
            Some(Family::DeepSeekV3)
        } else if template.contains("[TOOL_CALLS]") {
            Some(Family::Mistral)
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("\"parameters\""))
        {
            Some(Family::Llama3Json)
        } else {
            None
        }
    }

    /// Texts that open a call region anywhere in the output.
    pub fn starts(self) -> &'static [&'static str] {
        match self {
            Family::Hermes | Family::Qwen3Coder => &["<tool_call>"],
            Family::Llama3Json => &["<|python_tag|>"],
            Family::DeepSeekV3 => &[DS_CALLS_BEGIN, DS_CALL_BEGIN],
            Family::Mistral => &["[TOOL_CALLS]"],
        }
    }

    /// A text that opens a call region only as the first thing in the output (after
    /// whitespace), running to its end: Llama 3's bare JSON call, and the same from Qwen2.5
    /// models, which often leave out the `<tool_call>` tags.
    pub fn leading_start(self) -> Option<&'static str> {
        matches!(self, Family::Llama3Json | Family::Hermes).then_some("{")
    }

    /// The text that closes a region opened by `start`; `None`: it runs to the end of the
    /// output.
    pub fn end(self, start: &str) -> Option<&'static str> {
        if start == "{" {
            return None;
        }
        match self {
            Family::Hermes | Family::Qwen3Coder => Some("</tool_call>"),
            Family::DeepSeekV3 => Some(DS_CALLS_END),
            Family::Llama3Json | Family::Mistral => None,
        }
    }

    /// Parses one region: `start` is the text that opened it, `body` what follows up to the
    /// end marker (excluded). `None` if it is not a well-formed call, then it is kept as text.
    /// `string_params` says whether a tool's parameter is declared a string (Qwen3-Coder's
    /// values are untyped text).
    pub fn parse(
        self,
        start: &str,
        body: &str,
        string_params: &dyn Fn(&str, &str) -> bool,
    ) -> Option<Vec<RawCall>> {
        let calls = match self {
            Family::Hermes if start == "{" => {
                json_calls(&format!("{{{body}"), &["arguments", "parameters"])?
            }
            Family::Hermes => vec![json_call(body.trim(), &["arguments", "parameters"])?],
            Family::Qwen3Coder => vec![qwen3_coder_call(body, string_params)?],
            Family::Llama3Json => {
                let body = if start == "{" {
                    format!("{{{body}")
                } else {
                    body.to_string()
                };
                json_calls(&body, &["parameters", "arguments"])?
            }
            Family::DeepSeekV3 => {
                let body = if start == DS_CALL_BEGIN {
                    format!("{DS_CALL_BEGIN}{body}")
                } else {
                    body.to_string()
                };
                deepseek_calls(&body)?
            }
            Family::Mistral => mistral_calls(body)?,
        };
        (!calls.is_empty()).then_some(calls)
    }
}

/// `{"name": N, <args key>: {...}}`; arguments given as a JSON string are parsed.
fn call_from_value(v: &Value, keys: &[&str]) -> Option<RawCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_string();
    let args = keys
        .iter()
        .find_map(|k| o.get(*k))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    Some(RawCall {
        name,
        arguments: arguments_text(args)?,
    })
}

/// Arguments as a JSON object text: an object, or a string holding one.
pub(super) fn arguments_text(args: Value) -> Option<String> {
    let args = match args {
        Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
        v => v,
    };
    args.is_object().then(|| args.to_string())
}

fn json_call(text: &str, keys: &[&str]) -> Option<RawCall> {
    call_from_value(&serde_json::from_str::<Value>(text).ok()?, keys)
}

/// JSON calls one after another, separated by whitespace or `;`, or one JSON list of them.
fn json_calls(text: &str, keys: &[&str]) -> Option<Vec<RawCall>> {
    let text = text.trim();
    if text.starts_with('[') {
        let list: Vec<Value> = serde_json::from_str(text).ok()?;
        return list.iter().map(|v| call_from_value(v, keys)).collect();
    }
    let mut calls = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut de = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = de.next()?.ok()?;
        calls.push(call_from_value(&v, keys)?);
        rest = rest[de.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    Some(calls)
}

fn deepseek_calls(body: &str) -> Option<Vec<RawCall>> {
    let mut calls = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        rest = rest.strip_prefix(DS_CALL_BEGIN)?;
        let end = rest.find(DS_CALL_END)?;
        let call = &rest[..end];
        rest = rest[end + DS_CALL_END.len()..].trim_start();
        let (head, tail) = call.split_once(DS_SEP)?;
        let (name, args) = if head.trim() == "function" {
            // V3/R1: `function<sep>NAME\n```json\n{..}\n````.
            let (name, args) = tail.split_once('\n')?;
            let args = args.trim();
            let args = args.strip_prefix("```json").or(args.strip_prefix("```"))?;
            let args = args.trim_end().strip_suffix("```")?;
            (name.trim(), args)
        } else {
            // V3.1: `NAME<sep>{..}`.
            (head.trim(), tail)
        };
        let args: Value = serde_json::from_str(args.trim()).ok()?;
        calls.push(RawCall {
            name: name.to_string(),
            arguments: arguments_text(args)?,
        });
    }
    Some(calls)
}

fn mistral_calls(body: &str) -> Option<Vec<RawCall>> {
    let body = body.trim();
    if body.starts_with('[') {
        return json_calls(body, &["arguments", "parameters"]);
    }
    // v11+: `NAME[ARGS]{..}` (optionally `NAME[CALL_ID]id[ARGS]{..}`), repeated after more
    // `[TOOL_CALLS]`.
    body.split("[TOOL_CALLS]")
        .map(|part| {
            let (head, args) = part.split_once("[ARGS]")?;
            let name = head.split("[CALL_ID]").next()?.trim();
            let args: Value = serde_json::from_str(args.trim()).ok()?;
            (!name.is_empty()).then_some(())?;
            Some(RawCall {
                name: name.to_string(),
                arguments: arguments_text(args)?,
            })
        })
        .collect()
}

/// `<function=NAME>` with `<parameter=P>\nvalue\n</parameter>` parts, then `</function>`.
fn qwen3_coder_call(body: &str, string_params: &dyn Fn(&str, &str) -> bool) -> Option<RawCall> {
    let rest = body.trim().strip_prefix("<function=")?;
    let (name, mut rest) = rest.split_once('>')?;
    let name = name.trim();
    rest = rest.trim_end().strip_suffix("</function>")?;
    let mut args = Map::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let r = rest.strip_prefix("<parameter=")?;
        let (param, r) = r.split_once('>')?;
        let end = r.find("</parameter>")?;
        let param = param.trim();
        let value = qwen3_coder_value(&r[..end], string_params(name, param));
        args.insert(param.to_string(), value);
        rest = &r[end + "</parameter>".len()..];
    }
    Some(RawCall {
        name: name.to_string(),
        arguments: Value::Object(args).to_string(),
    })
}

/// A Qwen3-Coder parameter's value from the text between its tags (one newline trimmed at each
/// end): the text itself for a string parameter, else JSON where it parses.
pub(super) fn qwen3_coder_value(raw: &str, string: bool) -> Value {
    let raw = raw.strip_prefix('\n').unwrap_or(raw);
    let raw = raw.strip_suffix('\n').unwrap_or(raw);
    match string {
        true => Value::String(raw.to_string()),
        false => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string())),
    }
}
