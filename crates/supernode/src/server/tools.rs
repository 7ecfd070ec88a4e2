//! Tool calling and reasoning on `/v1/chat/completions`, in OpenAI's shapes: the request fields
//! (`tools`, `tool_choice`, `parallel_tool_calls`, legacy `functions`/`function_call`, tool-call
//! fields of messages, `chat_template_kwargs`) read and checked into a [`ChatTools`], the
//! parsers chosen for the model ([`Tooling`], from its chat template or `serve` flags), and the
//! parsed output turned into `message` fields or stream deltas.

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use supernode_engine::chat::{ChatExtras, ChatTemplate, RESERVED};
use supernode_engine::constraint::ConstraintSpec;
use supernode_engine::tool_parser::{
    parse_complete, Delta, Family, OutputParser, Parsed, ReasoningFamily, ReasoningParser,
    ToolCallParser,
};

use super::api::{ApiError, ApiResult, Fields};

/// What the model's template and the `serve` flags allow.
pub struct Tooling {
    pub family: Option<Family>,
    pub reasoning: Option<ReasoningFamily>,
    /// The template puts tool definitions into the prompt.
    pub renders_tools: bool,
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
        })
    }
}

/// The grammar that makes a `required` or named `tool_choice` a call, for the families whose
/// call may be a bare JSON object (Hermes/Qwen2.5 `{"name", "arguments"}`, Llama 3
/// `{"name", "parameters"}`): a JSON schema with one branch per tool offered (the named choice
/// offers one), its parameters' schema under the family's key. `None` where the choice asks for
/// nothing, or where the family's call format is not JSON, or where the model reasons first
/// (the grammar would forbid its reasoning): there the model is asked, not forced.
pub fn forced_call(tooling: &Tooling, tools: &ChatTools) -> Option<ConstraintSpec> {
    if !matches!(tools.choice, Some(Choice::Required | Choice::Named(_)))
        || tooling.reasoning.is_some()
    {
        return None;
    }
    let key = match tooling.family? {
        Family::Hermes => "arguments",
        Family::Llama3Json => "parameters",
        _ => return None,
    };
    let branches: Vec<Value> = tools
        .tools
        .iter()
        .filter_map(|t| {
            let name = t.pointer("/function/name")?.as_str()?;
            let params = t
                .pointer("/function/parameters")
                .cloned()
                .unwrap_or_else(|| json!({ "type": "object" }));
            Some(json!({
                "type": "object",
                "properties": { "name": { "const": name }, key: params },
                "required": ["name", key],
                "additionalProperties": false,
            }))
        })
        .collect();
    (!branches.is_empty()).then(|| ConstraintSpec::JsonSchema {
        schema: json!({ "anyOf": branches }),
        // Tool schemas come from clients written for other servers: keywords the grammar
        // cannot enforce are ignored rather than refused.
        strict: false,
    })
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
