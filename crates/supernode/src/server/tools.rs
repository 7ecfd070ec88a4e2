//! Tool calling and reasoning on `/v1/chat/completions`, in OpenAI's shapes: the request fields
//! (`tools`, `tool_choice`, `parallel_tool_calls`, legacy `functions`/`function_call`, tool-call
//! fields of messages, `chat_template_kwargs`) read and checked into a [`ChatTools`], the
//! parsers chosen for the model ([`Tooling`], from its chat template or `serve` flags), and the
//! parsed output turned into `message` fields or stream deltas.

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use supernode_engine::chat::{ChatExtras, ChatTemplate, RESERVED};
use supernode_engine::constraint::{lark_json, ConstraintSpec};
use supernode_engine::tokenizer::Tokenizer;
use supernode_engine::tool_parser::{
    parse_complete, Delta, Family, OutputParser, Parsed, ReasoningFamily, ReasoningParser,
    ToolCallParser, DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP,
};

use super::api::{ApiError, ApiResult, Fields};

/// What the model's template and the `serve` flags allow.
pub struct Tooling {
    pub family: Option<Family>,
    pub reasoning: Option<ReasoningFamily>,
    /// The template puts tool definitions into the prompt.
    pub renders_tools: bool,
    /// How a call is written where a `tool_choice` forces one (`None`: no tool-call format).
    forced: Option<Forced>,
}

/// A family's way of writing one call, as its template writes an assistant's calls: what the
/// grammar of a forced call produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forced {
    /// Llama 3: a bare JSON object `{"name": N, "parameters": {..}}`.
    Llama3,
    /// Hermes/Qwen2.5: `<tool_call>\n{"name": N, "arguments": {..}}\n</tool_call>`.
    Hermes,
    /// `<tool_call>\n<function=N>\n<parameter=P>\nV\n</parameter>\n</function>\n</tool_call>`.
    Qwen3Coder,
    /// DeepSeek-V3.1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>N<｜tool▁sep｜>{..}<｜tool▁call▁end｜><｜tool▁calls▁end｜>`.
    DeepSeekNamed,
    /// DeepSeek-V3/R1: `...<｜tool▁call▁begin｜>function<｜tool▁sep｜>N\n```json\n{..}\n```<｜tool▁call▁end｜>...`.
    DeepSeekFenced,
    /// Mistral before v11: `[TOOL_CALLS][{"name": N, "arguments": {..}}]`.
    MistralList,
    /// Mistral v11 and later: `[TOOL_CALLS]N[ARGS]{..}`, with `[CALL_ID]` and a 9-character id
    /// before `[ARGS]` where the template writes one (v11 does, v13 does not).
    MistralArgs { call_id: bool },
}

impl Forced {
    /// The format of `family` as the template `src` writes calls.
    fn of(family: Family, src: &str) -> Forced {
        match family {
            Family::Hermes => Forced::Hermes,
            Family::Llama3Json => Forced::Llama3,
            Family::Qwen3Coder => Forced::Qwen3Coder,
            Family::DeepSeekV3 if src.contains("```json") => Forced::DeepSeekFenced,
            Family::DeepSeekV3 => Forced::DeepSeekNamed,
            Family::Mistral if src.contains("[ARGS]") => Forced::MistralArgs {
                call_id: src.contains("[CALL_ID]"),
            },
            Family::Mistral => Forced::MistralList,
        }
    }
}

impl Tooling {
    /// Parsers named by `--tool-call-parser` / `--reasoning-parser` (`none` turns one off), else
    /// detected from the template's markers.
    pub fn new(
        template: Option<(&ChatTemplate, &str)>,
        tool_flag: Option<&str>,
        reasoning_flag: Option<&str>,
    ) -> Result<Tooling> {
        let src = template.map_or("", |(_, s)| s);
        let family = match tool_flag {
            None => Family::detect(src),
            Some("none") => None,
            Some(n) => match Family::from_name(n) {
                Some(f) => Some(f),
                None => bail!(
                    "--tool-call-parser `{n}` is unknown (known: {}, none)",
                    Family::ALL.map(Family::name).join(", ")
                ),
            },
        };
        let reasoning = match reasoning_flag {
            None => ReasoningFamily::detect(src),
            Some("none") => None,
            Some(n) => match ReasoningFamily::from_name(n) {
                Some(f) => Some(f),
                None => {
                    bail!("--reasoning-parser `{n}` is unknown (known: deepseek_r1, qwen3, none)")
                }
            },
        };
        Ok(Tooling {
            family,
            reasoning,
            renders_tools: template.is_some_and(|(t, _)| t.renders_tools()),
            forced: family.map(|f| Forced::of(f, src)),
        })
    }
}

/// The grammar that makes a `required` or named `tool_choice` a call, in the family's own format
/// ([`Forced`]): one call of one of the tools offered (the named choice offers one), its
/// arguments held to the tool's parameters schema. Markers that are one control token of the
/// vocabulary (`control(text)` gives its id) are that token: a grammar reaches control tokens
/// only by id. `None` where the choice asks for nothing, or where the model has no tool-call
/// format. (For a model that may reason first, the caller applies the grammar once the
/// reasoning ends.)
pub fn forced_call(
    tooling: &Tooling,
    tools: &ChatTools,
    control: &dyn Fn(&str) -> Option<u32>,
) -> Option<ConstraintSpec> {
    if !matches!(tools.choice, Some(Choice::Required | Choice::Named(_))) {
        return None;
    }
    let forced = tooling.forced?;
    let offered: Vec<(&str, Value)> = tools
        .tools
        .iter()
        .filter_map(|t| {
            let name = t.pointer("/function/name")?.as_str()?;
            let params = t
                .pointer("/function/parameters")
                .cloned()
                .unwrap_or_else(|| json!({ "type": "object" }));
            Some((name, params))
        })
        .collect();
    if offered.is_empty() {
        return None;
    }
    // Tool schemas come from clients written for other servers: keywords the grammar cannot
    // enforce are ignored rather than refused (`strict: false`).
    // Any one offered call as a JSON object `{"name": N, key: {..}}`.
    let json_call = |key: &str| {
        let branches: Vec<Value> = offered
            .iter()
            .map(|(name, params)| {
                json!({
                    "type": "object",
                    "properties": { "name": { "const": name }, key: params },
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        json!({ "anyOf": branches })
    };
    let lit = |text: &str| match control(text) {
        Some(id) => format!("<[{id}]>"),
        None => lark_string(text),
    };
    let alts = |one: &dyn Fn(&str, &Value) -> String| {
        offered
            .iter()
            .map(|(n, p)| one(n, p))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let lark = match forced {
        Forced::Llama3 => {
            return Some(ConstraintSpec::JsonSchema {
                schema: json_call("parameters"),
                strict: false,
            });
        }
        Forced::Hermes => format!(
            "start: {} {} {} {} {}\n",
            lit("<tool_call>"),
            lit("\n"),
            lark_json(&json_call("arguments"), false),
            lit("\n"),
            lit("</tool_call>"),
        ),
        Forced::MistralList => {
            let list = json!({
                "type": "array", "items": json_call("arguments"), "minItems": 1, "maxItems": 1,
            });
            format!(
                "start: {} {}\n",
                lit("[TOOL_CALLS]"),
                lark_json(&list, false)
            )
        }
        Forced::MistralArgs { call_id } => {
            // The id is what v11's template checks a call's id for: 9 letters or digits.
            let id = if call_id {
                format!("{} /[a-zA-Z0-9]{{9}}/ ", lit("[CALL_ID]"))
            } else {
                String::new()
            };
            let call =
                alts(&|n, p| format!("({} {id}{} {})", lit(n), lit("[ARGS]"), lark_json(p, false)));
            format!("start: {} call\ncall: {call}\n", lit("[TOOL_CALLS]"))
        }
        Forced::DeepSeekNamed | Forced::DeepSeekFenced => {
            let call = alts(&|n, p| {
                let args = lark_json(p, false);
                match forced {
                    Forced::DeepSeekNamed => format!("({} {} {args})", lit(n), lit(DS_SEP)),
                    _ => format!(
                        "({} {} {} {args} {})",
                        lit("function"),
                        lit(DS_SEP),
                        lit(&format!("{n}\n```json\n")),
                        lit("\n```"),
                    ),
                }
            });
            format!(
                "start: {} {} call {} {}\ncall: {call}\n",
                lit(DS_CALLS_BEGIN),
                lit(DS_CALL_BEGIN),
                lit(DS_CALL_END),
                lit(DS_CALLS_END),
            )
        }
        Forced::Qwen3Coder => {
            let call = alts(&|n, p| {
                let required: Vec<&str> = p
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut parts = vec![lit(&format!("<function={n}>\n"))];
                for (param, schema) in p
                    .pointer("/properties")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    // A string is the text itself (up to the closing tag; one of its `enum`
                    // if it has one); any other type is JSON, as the parser reads it.
                    let strings: Option<Vec<&str>> = schema
                        .get("enum")
                        .and_then(Value::as_array)
                        .and_then(|e| e.iter().map(Value::as_str).collect());
                    let value = match (schema.get("type").and_then(Value::as_str), strings) {
                        (Some("string"), Some(options)) => format!(
                            "({}) {}",
                            options
                                .iter()
                                .map(|o| lit(o))
                                .collect::<Vec<_>>()
                                .join(" | "),
                            lit(PARAM_END)
                        ),
                        (Some("string"), None) => "text".to_string(),
                        _ => format!("{} {}", lark_json(schema, false), lit(PARAM_END)),
                    };
                    let part = format!("({} {value})", lit(&format!("<parameter={param}>\n")));
                    let optional = !required.contains(&param.as_str());
                    parts.push(if optional { format!("{part}?") } else { part });
                }
                parts.push(lit("</function>\n"));
                format!("({})", parts.join(" "))
            });
            format!(
                "start: {} {} call {}\ncall: {call}\ntext[suffix={}]: /(?s:.*)/\n",
                lit("<tool_call>"),
                lit("\n"),
                lit("</tool_call>"),
                lark_string(PARAM_END),
            )
        }
    };
    Some(ConstraintSpec::Lark(lark))
}

/// What closes a Qwen3-Coder parameter's value.
const PARAM_END: &str = "\n</parameter>\n";

/// The id of the control token whose text is exactly `text`, if `tok`'s vocabulary has one
/// (a token without plain bytes, as `Grammars::for_tokenizer` marks them special).
pub fn control_token(tok: Option<&Tokenizer>, text: &str) -> Option<u32> {
    let t = tok?;
    let id = t.token_id(text)?;
    t.token_bytes(id, false).is_empty().then_some(id)
}

/// A Lark string literal of `text` (Lark strings use JSON's syntax, without a raw DEL).
fn lark_string(text: &str) -> String {
    serde_json::to_string(text)
        .expect("a string serialises")
        .replace('\u{7f}', "\\u007f")
}

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq)]
pub enum Choice {
    Auto,
    None,
    Required,
    Named(String),
}

/// The tool-calling part of a chat request.
#[derive(Debug, Default)]
pub struct ChatTools {
    /// What the template gets: tools (those the choice allows), message fields, variables.
    pub extras: ChatExtras,
    /// The tools offered (OpenAI shape); empty: no tool calling.
    pub tools: Vec<Value>,
    pub choice: Option<Choice>,
    pub parallel: bool,
    /// The request used the legacy `functions`: the answer also has `function_call`.
    pub legacy: bool,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

/// A function definition `{name, description?, parameters?}` at `at`.
fn function_def(at: &str, v: &Value) -> ApiResult<Value> {
    let Value::Object(o) = v else {
        return Err(bad(at, format!("`{at}` must be an object")));
    };
    let name = match o.get("name") {
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
        {
            s
        }
        _ => {
            return Err(bad(
                &format!("{at}.name"),
                format!("`{at}.name` must be a string of 1 to 64 letters, digits, `_` or `-`"),
            ))
        }
    };
    if let Some(p) = o.get("parameters").filter(|p| !p.is_null()) {
        if !p.is_object() {
            return Err(bad(
                &format!("{at}.parameters"),
                format!("`{at}.parameters` must be a JSON schema object"),
            ));
        }
    }
    if o.get("description")
        .is_some_and(|d| !d.is_string() && !d.is_null())
    {
        return Err(bad(
            &format!("{at}.description"),
            format!("`{at}.description` must be a string"),
        ));
    }
    let mut f = o.clone();
    f.insert("name".into(), json!(name));
    Ok(json!({"type": "function", "function": f}))
}

fn parse_choice(param: &str, v: &Value, names: &[&str]) -> ApiResult<Choice> {
    let choice = match v {
        Value::String(s) => match s.as_str() {
            "auto" => Choice::Auto,
            "none" => Choice::None,
            "required" if param == "tool_choice" => Choice::Required,
            other => {
                return Err(bad(
                    param,
                    format!(
                        "`{param}` must be auto, none, required or a named function; got `{other}`"
                    ),
                ))
            }
        },
        Value::Object(o) => {
            let name = if param == "tool_choice" {
                if o.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(bad(param, format!("`{param}.type` must be `function`")));
                }
                o.get("function").and_then(|f| f.get("name"))
            } else {
                o.get("name")
            };
            match name.and_then(Value::as_str) {
                Some(n) if names.contains(&n) => Choice::Named(n.to_string()),
                Some(n) => {
                    return Err(bad(
                        param,
                        format!("`{param}` names the function `{n}`, which is not among the tools"),
                    ))
                }
                None => return Err(bad(param, format!("`{param}` must name a function"))),
            }
        }
        other => {
            return Err(bad(
                param,
                format!("`{param}` must be a string or an object, got {other}"),
            ))
        }
    };
    Ok(choice)
}

/// Refuses tool fields on `/v1/completions`, which has no tools, unless they ask for nothing.
pub fn refuse_on_completions(f: &Fields) -> ApiResult<()> {
    for name in ["tools", "functions", "tool_choice", "function_call"] {
        let asks_nothing = match f.get(name) {
            None => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::String(s)) => s == "none",
            Some(_) => false,
        };
        if !asks_nothing {
            return Err(bad(
                name,
                format!("`{name}` is not supported on /v1/completions (use /v1/chat/completions)"),
            ));
        }
    }
    Ok(())
}

/// Reads the tool fields of a chat request body; `messages` is its (already checked) list.
pub fn parse(f: &Fields, messages: &[Value]) -> ApiResult<ChatTools> {
    let mut out = ChatTools {
        parallel: f.bool("parallel_tool_calls")?.unwrap_or(true),
        ..ChatTools::default()
    };
    let (list_param, choice_param) = match (f.get("tools"), f.get("functions")) {
        (Some(_), Some(_)) => {
            return Err(bad("functions", "give `tools` or `functions`, not both"))
        }
        (_, Some(_)) => ("functions", "function_call"),
        _ => ("tools", "tool_choice"),
    };
    out.legacy = list_param == "functions";
    match f.get(list_param) {
        None => {}
        Some(Value::Array(a)) => {
            for (i, t) in a.iter().enumerate() {
                let at = format!("{list_param}[{i}]");
                let def = if out.legacy {
                    function_def(&at, t)?
                } else {
                    if t.get("type").and_then(Value::as_str) != Some("function") {
                        return Err(bad(&at, format!("`{at}.type` must be `function`")));
                    }
                    let func = t
                        .get("function")
                        .ok_or_else(|| bad(&at, format!("`{at}.function` is required")))?;
                    function_def(&format!("{at}.function"), func)?
                };
                out.tools.push(def);
            }
        }
        Some(v) => return Err(Fields::wrong(list_param, "a list of tools", v)),
    }
    if f.get("tool_choice").is_some() && out.legacy {
        return Err(bad(
            "tool_choice",
            "give `tool_choice` with `tools`, not with `functions`",
        ));
    }
    let names: Vec<&str> = out
        .tools
        .iter()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    out.choice = match f.get(choice_param) {
        None => None,
        Some(v) => Some(parse_choice(choice_param, v, &names)?),
    };
    if out.tools.is_empty() && matches!(out.choice, Some(Choice::Required | Choice::Named(_))) {
        return Err(bad(
            choice_param,
            format!("`{choice_param}` asks for a tool call but no tools are given"),
        ));
    }
    let offered: Vec<Value> = match &out.choice {
        Some(Choice::None) => Vec::new(),
        Some(Choice::Named(n)) => out
            .tools
            .iter()
            .filter(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(n))
            .cloned()
            .collect(),
        _ => out.tools.clone(),
    };
    if matches!(out.choice, Some(Choice::None)) {
        out.tools.clear();
    } else {
        out.tools = offered.clone();
    }
    out.extras.tools = (!offered.is_empty()).then_some(Value::Array(offered));
    out.extras.fields = messages
        .iter()
        .enumerate()
        .map(|(i, m)| message_fields(i, m))
        .collect::<ApiResult<_>>()?;
    match f.get("chat_template_kwargs") {
        None => {}
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| RESERVED.contains(&k.as_str())) {
                return Err(bad(
                    "chat_template_kwargs",
                    format!("`chat_template_kwargs.{k}` is set by the server and cannot be given"),
                ));
            }
            out.extras.kwargs = o.clone();
        }
        Some(v) => return Err(Fields::wrong("chat_template_kwargs", "an object", v)),
    }
    Ok(out)
}

/// The tool fields of message `i`: `tool_calls` (arguments parsed to objects), `tool_call_id`,
/// `name`, `reasoning_content`; a legacy `function_call` becomes one tool call.
fn message_fields(i: usize, m: &Value) -> ApiResult<Map<String, Value>> {
    let at = format!("messages[{i}]");
    let mut out = Map::new();
    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
    for key in ["name", "tool_call_id", "reasoning_content"] {
        match m.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                out.insert(key.into(), json!(s));
            }
            Some(_) => {
                return Err(bad(
                    &format!("{at}.{key}"),
                    format!("`{at}.{key}` must be a string"),
                ))
            }
        }
    }
    if role == "tool" && !out.contains_key("tool_call_id") {
        return Err(bad(
            &format!("{at}.tool_call_id"),
            format!("`{at}.tool_call_id` is required for a tool message"),
        ));
    }
    let calls = match (m.get("tool_calls"), m.get("function_call")) {
        (Some(Value::Array(a)), _) => a.clone(),
        (Some(Value::Null) | None, Some(fc)) if !fc.is_null() => {
            vec![json!({"id": format!("call_{i}"), "type": "function", "function": fc})]
        }
        (Some(Value::Null) | None, _) => return Ok(out),
        (Some(v), _) => {
            return Err(Fields::wrong(
                &format!("{at}.tool_calls"),
                "a list of tool calls",
                v,
            ))
        }
    };
    if role != "assistant" && !calls.is_empty() {
        return Err(bad(
            &format!("{at}.tool_calls"),
            "only assistant messages may hold tool calls",
        ));
    }
    let mut parsed = Vec::new();
    for (j, c) in calls.iter().enumerate() {
        let cat = format!("{at}.tool_calls[{j}]");
        let name = c.pointer("/function/name").and_then(Value::as_str);
        let args = c.pointer("/function/arguments");
        let (Some(name), Some(args)) = (name, args) else {
            return Err(bad(
                &cat,
                format!("`{cat}` must have `function.name` and `function.arguments`"),
            ));
        };
        let args = match args {
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return Err(bad(
                        &format!("{cat}.function.arguments"),
                        format!("`{cat}.function.arguments` must be a JSON object, as text"),
                    ))
                }
            },
            v @ Value::Object(_) => v.clone(),
            _ => {
                return Err(bad(
                    &format!("{cat}.function.arguments"),
                    format!("`{cat}.function.arguments` must be a JSON object, as text"),
                ))
            }
        };
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        parsed.push(
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}),
        );
    }
    out.insert("tool_calls".into(), Value::Array(parsed));
    Ok(out)
}

/// How one request's outputs are parsed.
pub struct ParseSpec {
    family: Option<Family>,
    tools: Vec<Value>,
    reasoning: Option<ReasoningFamily>,
    prompt: String,
    id_prefix: String,
    pub parallel: bool,
    pub legacy: bool,
}

impl ParseSpec {
    /// `None` when nothing is to be parsed (no tools offered, no reasoning format).
    pub fn new(
        t: &Tooling,
        req: &ChatTools,
        prompt: String,
        request_id: &str,
    ) -> Option<ParseSpec> {
        let family = t.family.filter(|_| !req.tools.is_empty());
        if family.is_none() && t.reasoning.is_none() {
            return None;
        }
        Some(ParseSpec {
            family,
            tools: req.tools.clone(),
            reasoning: t.reasoning,
            prompt,
            id_prefix: format!("call_{}_", request_id.rsplit('-').next().unwrap_or("")),
            parallel: req.parallel,
            legacy: req.legacy,
        })
    }

    /// A parser for choice `i`.
    pub fn parser(&self, i: usize) -> OutputParser {
        OutputParser::new(
            self.reasoning
                .map(|f| ReasoningParser::for_family(&self.prompt, f)),
            self.family
                .map(|f| ToolCallParser::new(f, &self.tools, &format!("{}{i}_", self.id_prefix))),
        )
    }

    /// The `message` of a whole output (choice `i`), and whether it called tools.
    pub fn message(&self, i: usize, text: &str) -> (Value, bool) {
        let mut p: Parsed = parse_complete(&mut self.parser(i), text);
        if !self.parallel {
            p.tool_calls.truncate(1);
        }
        let content = (!p.content.is_empty() || p.tool_calls.is_empty()).then_some(p.content);
        let mut m = json!({"role": "assistant", "content": content});
        if let Some(r) = p.reasoning {
            m["reasoning_content"] = json!(r);
        }
        let called = !p.tool_calls.is_empty();
        if called {
            let calls: Vec<Value> = p
                .tool_calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            if self.legacy {
                m["function_call"] = calls[0]["function"].clone();
            }
            m["tool_calls"] = Value::Array(calls);
        }
        (m, called)
    }

    /// The stream `delta`s of parsed pieces (calls past the first dropped without
    /// `parallel_tool_calls`).
    pub fn deltas(&self, ds: Vec<Delta>) -> Vec<Value> {
        ds.into_iter()
            .filter_map(|d| match d {
                Delta::Reasoning(t) => Some(json!({"reasoning_content": t})),
                Delta::Content(t) => Some(json!({"content": t})),
                Delta::CallStart { index, .. } | Delta::CallArgs { index, .. }
                    if index > 0 && !self.parallel =>
                {
                    None
                }
                Delta::CallStart { index, id, name } => Some(json!({"tool_calls": [{
                    "index": index, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]})),
                Delta::CallArgs { index, text } => {
                    Some(json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]}))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use supernode_engine::constraint::Grammars;
    use supernode_engine::tool_parser::{Parsed, ToolCallParser};

    use super::*;

    /// Control tokens of the test vocabulary, after the 256 bytes (id 0, the end, included).
    const CONTROL: [&str; 8] = [
        DS_CALLS_BEGIN,
        DS_CALLS_END,
        DS_CALL_BEGIN,
        DS_CALL_END,
        DS_SEP,
        "[TOOL_CALLS]",
        "[ARGS]",
        "[CALL_ID]",
    ];

    fn control(text: &str) -> Option<u32> {
        CONTROL
            .iter()
            .position(|c| *c == text)
            .map(|i| 256 + i as u32)
    }

    /// Byte `b` is token `b` (0 is the end), then the control tokens by name only.
    fn grammars() -> Arc<Grammars> {
        let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        words[0] = b"\xFF<|end|>".to_vec();
        for c in CONTROL {
            words.push([b"\xFF", c.as_bytes()].concat());
        }
        Arc::new(Grammars::from_token_bytes(words, &[0]).unwrap())
    }

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city"],
            }}}),
            json!({"type": "function", "function": {"name": "get_time", "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
            }}}),
        ]
    }

    fn tooling(family: Family, src: &str) -> Tooling {
        Tooling {
            family: Some(family),
            reasoning: None,
            renders_tools: true,
            forced: Some(Forced::of(family, src)),
        }
    }

    /// As `parse` leaves them: a named choice offers only its tool.
    fn chat_tools(choice: Choice) -> ChatTools {
        let offered = |t: &Value| match &choice {
            Choice::Named(n) => t.pointer("/function/name").and_then(Value::as_str) == Some(n),
            _ => true,
        };
        ChatTools {
            tools: tools().into_iter().filter(offered).collect(),
            choice: Some(choice),
            parallel: true,
            ..ChatTools::default()
        }
    }

    /// Whether the grammar takes `text` (control-token texts as those tokens) whole and may end
    /// there.
    fn accepts(spec: &ConstraintSpec, text: &str) -> bool {
        let mut c = grammars().compile(spec).unwrap();
        let mut rest = text;
        while !rest.is_empty() {
            let (tok, len) = match CONTROL.iter().find(|m| rest.starts_with(**m)) {
                Some(m) => (control(m).unwrap(), m.len()),
                None => (rest.as_bytes()[0] as u32, 1),
            };
            if !c.allows(tok) {
                return false;
            }
            c.commit(tok).unwrap();
            rest = &rest[len..];
        }
        c.is_accepting()
    }

    /// The calls the family's parser reads in `text`.
    fn parsed(family: Family, text: &str) -> Vec<(String, Value)> {
        let mut p = ToolCallParser::new(family, &tools(), "call_");
        let mut out = Vec::new();
        p.push(text, &mut out);
        p.finish(&mut out);
        Parsed::from_deltas(out)
            .tool_calls
            .into_iter()
            .map(|c| (c.name, serde_json::from_str(&c.arguments).unwrap()))
            .collect()
    }

    /// Each format with a grammar: (family, a template source that selects it, a call as its
    /// template writes one, calls it must refuse).
    fn formats() -> Vec<(Family, &'static str, String, Vec<String>)> {
        let ds = |inner: &str| {
            format!("{DS_CALLS_BEGIN}{DS_CALL_BEGIN}{inner}{DS_CALL_END}{DS_CALLS_END}")
        };
        vec![
            (
                Family::Hermes,
                "",
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>".into(),
                vec![
                    r#"{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}"#.into(),
                    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"days\": 3}}\n</tool_call>".into(),
                    "<tool_call>\n{\"name\": \"get_news\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>".into(),
                ],
            ),
            (
                Family::Llama3Json,
                "",
                r#"{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}"#.into(),
                vec![
                    r#"{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}"#.into(),
                    r#"{"name": "get_news", "parameters": {"city": "Paris"}}"#.into(),
                ],
            ),
            (
                Family::DeepSeekV3,
                "",
                ds(&format!(r#"get_weather{DS_SEP}{{"city": "Paris", "days": 3}}"#)),
                vec![
                    ds(&format!(r#"get_weather{DS_SEP}{{"city": "Paris", "days": 9}}"#)),
                    ds(&format!(r#"get_time{DS_SEP}{{"zone": "PST"}}"#)),
                    format!(r#"get_weather{DS_SEP}{{"city": "Paris"}}"#),
                ],
            ),
            (
                Family::DeepSeekV3,
                "```json",
                ds(&format!(
                    "function{DS_SEP}get_weather\n```json\n{{\"city\": \"Paris\", \"days\": 3}}\n```"
                )),
                vec![ds(&format!(
                    "function{DS_SEP}get_weather\n{{\"city\": \"Paris\", \"days\": 3}}"
                ))],
            ),
            (
                Family::Mistral,
                "",
                r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]"#
                    .into(),
                vec![
                    r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}]"#.into(),
                    r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": 3}}]"#.into(),
                ],
            ),
            (
                Family::Mistral,
                "{{- name + '[ARGS]' + arguments }}",
                r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}"#.into(),
                vec![
                    r#"get_weather[ARGS]{"city": "Paris", "days": 3}"#.into(),
                    r#"[TOOL_CALLS]get_weather{"city": "Paris", "days": 3}"#.into(),
                    r#"[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}"#.into(),
                    r#"[TOOL_CALLS]get_weather[ARGS]{"days": 3}"#.into(),
                ],
            ),
            (
                Family::Mistral,
                "{{- name + '[CALL_ID]' + id + '[ARGS]' + arguments }}",
                r#"[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris", "days": 3}"#
                    .into(),
                vec![
                    r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}"#.into(),
                    r#"[TOOL_CALLS]get_weather[CALL_ID]a1b2[ARGS]{"city": "Paris"}"#.into(),
                    r#"[TOOL_CALLS]get_weather[CALL_ID]a1b2-c3d4[ARGS]{"city": "Paris"}"#.into(),
                ],
            ),
            (
                Family::Qwen3Coder,
                "",
                "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan <Francisco>\n\
                 </parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
                    .into(),
                vec![
                    "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n\
                     </function>\n</tool_call>"
                        .into(),
                    "<tool_call>\n<function=get_time>\n<parameter=zone>\nPST\n</parameter>\n\
                     </function>\n</tool_call>"
                        .into(),
                    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n\
                     <parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>"
                        .into(),
                ],
            ),
        ]
    }

    #[test]
    fn forced_calls_take_each_formats_calls_and_its_parser_reads_them() {
        for (family, src, call, wrong) in formats() {
            let t = tooling(family, src);
            let spec = forced_call(&t, &chat_tools(Choice::Required), &control)
                .unwrap_or_else(|| panic!("{family:?}: no grammar"));
            assert!(
                accepts(&spec, &call),
                "{family:?} {src:?}: refused {call:?}"
            );
            for w in &wrong {
                assert!(!accepts(&spec, w), "{family:?} {src:?}: took {w:?}");
            }
            let calls = parsed(family, &call);
            assert_eq!(calls.len(), 1, "{family:?}: {call:?}");
            assert_eq!(calls[0].0, "get_weather");
            assert_eq!(calls[0].1["days"], json!(3), "{family:?}");
            // A named choice takes only that tool.
            let named = forced_call(&t, &chat_tools(Choice::Named("get_time".into())), &control);
            assert!(
                !accepts(&named.unwrap(), &call),
                "{family:?}: a named choice took another tool"
            );
        }
    }

    #[test]
    fn nothing_is_forced_where_the_choice_or_the_model_asks_for_nothing() {
        let t = tooling(Family::Qwen3Coder, "");
        assert!(forced_call(&t, &chat_tools(Choice::Auto), &control).is_none());
        assert!(forced_call(&t, &chat_tools(Choice::None), &control).is_none());
        let reasoning = Tooling {
            reasoning: Some(ReasoningFamily::DeepSeekR1),
            ..tooling(Family::Hermes, "")
        };
        assert!(forced_call(&reasoning, &chat_tools(Choice::Required), &control).is_some());
        // Markers that are not control tokens are plain text in the grammar.
        let plain = |_: &str| None;
        let t = tooling(Family::DeepSeekV3, "");
        let spec = forced_call(&t, &chat_tools(Choice::Required), &plain).unwrap();
        let ConstraintSpec::Lark(src) = spec else {
            panic!("not a Lark grammar")
        };
        assert!(
            src.contains(&lark_string(DS_CALLS_BEGIN)) && !src.contains("<["),
            "{src}"
        );
    }
}
