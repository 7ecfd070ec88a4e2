//! Request bodies of the OpenAI API, read field by field from JSON so that every error names
//! the parameter at fault, and the OpenAI error object.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use supernode_engine::chat::ChatMessage;
use supernode_engine::sampler::SamplingParams;

use super::structured::{self, Structured};

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::invalid("", message)
            .status(StatusCode::NOT_FOUND)
            .with_code("model_not_found")
    }

    pub fn overloaded(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::invalid("", message).status(StatusCode::SERVICE_UNAVAILABLE);
        e.kind = "server_error";
        e.code = Some("server_overloaded");
        e.retry_after = Some(1);
        e
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::invalid("", message).status(StatusCode::INTERNAL_SERVER_ERROR);
        e.kind = "server_error";
        e
    }

    pub fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a request body: a JSON object.
pub fn parse_body(bytes: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid("", format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::invalid(
            "",
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed, range-checked access to the fields of a request object. An absent field and a
/// `null` one both read as `None`.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub(crate) fn wrong(name: &str, want: &str, got: &Value) -> ApiError {
        ApiError::invalid(
            name,
            format!("`{name}` must be {want}, got {}", type_name(got)),
        )
    }

    pub fn string(&self, name: &str) -> ApiResult<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::wrong(name, "a string", v)),
        }
    }

    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::wrong(name, "a boolean", v)),
        }
    }

    /// A number in `[lo, hi]`.
    pub fn number(&self, name: &str, lo: f64, hi: f64) -> ApiResult<Option<f32>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(
                        name,
                        format!("`{name}` must be between {lo} and {hi}, got {n}"),
                    ));
                }
                Ok(Some(x as f32))
            }
            Some(v) => Err(Self::wrong(name, "a number", v)),
        }
    }

    /// An integer in `[lo, hi]`; an error quotes the number as it was sent.
    pub fn int(&self, name: &str, lo: i64, hi: i64) -> ApiResult<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let out_of_range = || {
                    ApiError::invalid(
                        name,
                        format!("`{name}` must be between {lo} and {hi}, got {n}"),
                    )
                };
                let x = match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(x), _, _) => x,
                    // Beyond i64: out of any range asked for here.
                    (None, Some(_), _) => return Err(out_of_range()),
                    (None, None, Some(f)) if f.fract() == 0.0 => {
                        if f < lo as f64 || f > hi as f64 {
                            return Err(out_of_range());
                        }
                        f as i64
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            name,
                            format!("`{name}` must be an integer, got {n}"),
                        ))
                    }
                };
                if !(lo..=hi).contains(&x) {
                    return Err(out_of_range());
                }
                Ok(Some(x))
            }
            Some(v) => Err(Self::wrong(name, "an integer", v)),
        }
    }

    /// A seed: any integer from -2^63 to 2^64 - 1, negative ones taken modulo 2^64 (so every
    /// value of an int64 or a uint64 seed gives its own stream).
    pub fn seed(&self, name: &str) -> ApiResult<Option<u64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Ok(Some(u)),
                (None, Some(i)) => Ok(Some(i as u64)),
                _ => Err(ApiError::invalid(
                    name,
                    format!(
                        "`{name}` must be an integer between {} and {}, got {n}",
                        i64::MIN,
                        u64::MAX
                    ),
                )),
            },
            Some(v) => Err(Self::wrong(name, "an integer", v)),
        }
    }
}

/// Parameters of the OpenAI API that are not implemented: refused whatever their value, so
/// that no client believes they took effect.
const NOT_YET: [&str; 2] = ["prediction", "audio"];

/// Refuses the parameters of [`NOT_YET`].
fn refuse_unsupported(f: &Fields) -> ApiResult<()> {
    if let Some(name) = NOT_YET.into_iter().find(|name| f.get(name).is_some()) {
        return Err(ApiError::invalid(
            name,
            format!("`{name}` is not supported"),
        ));
    }
    if let Some(m) = f.get("modalities") {
        if m != &json!(["text"]) {
            return Err(ApiError::invalid(
                "modalities",
                "only `[\"text\"]` is supported in `modalities`",
            ));
        }
    }
    Ok(())
}

/// What a chat or completion request asks of generation.
#[derive(Debug)]
pub struct GenSpec {
    pub model: String,
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    /// The field `max_tokens` came from (`max_completion_tokens` or `max_tokens`), for errors.
    pub max_tokens_param: &'static str,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    /// Output tokens before which the end of generation and stop strings do not apply (vLLM's).
    pub min_tokens: usize,
    /// Top alternatives to report per token; `None`: no logprobs at all.
    pub logprobs: Option<usize>,
    /// Keeps the request's prefix-cache entries apart from other salts' (vLLM's field).
    pub cache_salt: Option<String>,
    /// Completions: the answer starts with the prompt (with its tokens' logprobs if `logprobs`
    /// is set).
    pub echo: bool,
    /// The output constraint and `logit_bias`.
    pub structured: Structured,
}

/// The most choices one request may ask for.
pub const MAX_N: i64 = 16;
/// The most stop strings.
pub const MAX_STOP: usize = 16;
/// The most alternatives per token in logprobs.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// The fields chat and completions share; `max_tokens` may be as low as `least_max_tokens`.
fn common(f: &Fields, least_max_tokens: i64) -> ApiResult<GenSpec> {
    refuse_unsupported(f)?;
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?
        .to_string();
    let d = SamplingParams::default();
    let top_k = match f.int("top_k", -1, i64::from(u32::MAX))? {
        None | Some(-1) => 0,
        Some(k) => k as usize,
    };
    let params = SamplingParams {
        temperature: f.number("temperature", 0.0, 2.0)?.unwrap_or(1.0),
        top_p: match f.number("top_p", 0.0, 1.0)? {
            Some(p) if p <= 0.0 => {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("`top_p` must be in (0, 1], got {p}"),
                ))
            }
            Some(p) => p,
            None => 1.0,
        },
        top_k,
        min_p: f.number("min_p", 0.0, 1.0)?.unwrap_or(0.0),
        presence_penalty: f.number("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: f.number("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        repetition_penalty: match f.number("repetition_penalty", 0.0, 10.0)? {
            Some(r) if r <= 0.0 => {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    format!("`repetition_penalty` must be in (0, 10], got {r}"),
                ))
            }
            Some(r) => r,
            None => 1.0,
        },
        seed: f.seed("seed")?,
        ..d
    };
    let (max_tokens, max_tokens_param) = match f.int(
        "max_completion_tokens",
        least_max_tokens,
        i64::from(u32::MAX),
    )? {
        Some(m) => (Some(m as usize), "max_completion_tokens"),
        None => (
            f.int("max_tokens", least_max_tokens, i64::from(u32::MAX))?
                .map(|m| m as usize),
            "max_tokens",
        ),
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOP {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "`stop` may hold at most {MAX_STOP} strings, got {}",
                        a.len()
                    ),
                ));
            }
            a.iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(Fields::wrong(
                        "stop",
                        "a string or a list of strings",
                        other,
                    )),
                })
                .collect::<ApiResult<_>>()?
        }
        Some(v) => return Err(Fields::wrong("stop", "a string or a list of strings", v)),
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let min_tokens = f.int("min_tokens", 0, i64::from(u32::MAX))?.unwrap_or(0) as usize;
    if let Some(m) = max_tokens.filter(|&m| m < min_tokens) {
        return Err(ApiError::invalid(
            "min_tokens",
            format!("`min_tokens` ({min_tokens}) must not exceed `{max_tokens_param}` ({m})"),
        ));
    }
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(v) => return Err(Fields::wrong("stream_options", "an object", v)),
    };
    Ok(GenSpec {
        model,
        params,
        max_tokens,
        max_tokens_param,
        stop,
        n: f.int("n", 1, MAX_N)?.unwrap_or(1) as usize,
        stream,
        include_usage,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        min_tokens,
        logprobs: None,
        cache_salt: match f.string("cache_salt")? {
            Some("") => {
                return Err(ApiError::invalid(
                    "cache_salt",
                    "`cache_salt` must be a non-empty string if given",
                ))
            }
            salt => salt.map(str::to_string),
        },
        echo: false,
        structured: structured::parse(f)?,
    })
}

/// A parsed `POST /v1/chat/completions` body.
#[derive(Debug)]
pub struct ChatRequest {
    pub spec: GenSpec,
    pub messages: Vec<ChatMessage>,
    pub tools: super::tools::ChatTools,
}

pub fn chat_request(body: &Map<String, Value>) -> ApiResult<ChatRequest> {
    let f = Fields(body);
    let mut spec = common(&f, 1)?;
    let want_logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.int("top_logprobs", 0, MAX_TOP_LOGPROBS)?;
    if top.is_some() && !want_logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs` set to true",
        ));
    }
    spec.logprobs = want_logprobs.then(|| top.unwrap_or(0) as usize);
    let msgs = match f.get("messages") {
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must hold at least one message",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(Fields::wrong("messages", "a list of messages", v)),
    };
    let messages = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<ApiResult<_>>()?;
    let tools = super::tools::parse(&f, msgs)?;
    Ok(ChatRequest {
        spec,
        messages,
        tools,
    })
}

fn message(i: usize, m: &Value) -> ApiResult<ChatMessage> {
    let at = format!("messages[{i}]");
    let Value::Object(o) = m else {
        return Err(Fields::wrong(&at, "an object", m));
    };
    let f = Fields(o);
    let role_at = format!("{at}.role");
    let role = f
        .string("role")
        .map_err(|_| ApiError::invalid(&role_at, format!("`{role_at}` must be a string")))?
        .ok_or_else(|| ApiError::invalid(&role_at, format!("`{role_at}` is required")))?;
    let role = match role {
        "system" | "user" | "assistant" | "tool" => role,
        "developer" => "system",
        other => {
            return Err(ApiError::invalid(
                &role_at,
                format!(
                    "`{role_at}` must be one of system, developer, user, assistant, tool; got `{other}`"
                ),
            ))
        }
    };
    let content_at = format!("{at}.content");
    let content = match f.get("content") {
        None if role == "assistant" => String::new(),
        None => {
            return Err(ApiError::invalid(
                &content_at,
                format!("`{content_at}` is required"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                let part_at = format!("{content_at}[{j}]");
                let Value::Object(po) = p else {
                    return Err(Fields::wrong(&part_at, "a content part object", p));
                };
                let pf = Fields(po);
                match pf.string("type").ok().flatten() {
                    Some("text") => match pf.string("text") {
                        Ok(Some(t)) => texts.push(t.to_string()),
                        _ => {
                            return Err(ApiError::invalid(
                                &part_at,
                                format!("`{part_at}.text` must be a string"),
                            ))
                        }
                    },
                    Some(other) => {
                        return Err(ApiError::invalid(
                            &part_at,
                            format!(
                                "content parts of type `{other}` are not supported (only `text`)"
                            ),
                        ))
                    }
                    None => {
                        return Err(ApiError::invalid(
                            &part_at,
                            format!("`{part_at}.type` is required"),
                        ))
                    }
                }
            }
            texts.join("\n")
        }
        Some(v) => {
            return Err(Fields::wrong(
                &content_at,
                "a string or a list of content parts",
                v,
            ))
        }
    };
    Ok(ChatMessage::new(role, content))
}

/// The prompt of a completion request.
#[derive(Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A parsed `POST /v1/completions` body.
#[derive(Debug)]
pub struct CompletionRequest {
    pub spec: GenSpec,
    /// One or more prompts; each gets `n` choices.
    pub prompts: Vec<Prompt>,
}

/// The most prompts in one completion request.
pub const MAX_PROMPTS: usize = 64;

pub fn completion_request(body: &Map<String, Value>) -> ApiResult<CompletionRequest> {
    let f = Fields(body);
    // With `echo`, `max_tokens: 0` scores the prompt alone (how lm-eval asks for
    // log-likelihoods).
    let echo = f.bool("echo")?.unwrap_or(false);
    let mut spec = common(&f, if echo { 0 } else { 1 })?;
    super::tools::refuse_on_completions(&f)?;
    spec.echo = echo;
    spec.logprobs = f.int("logprobs", 0, MAX_TOP_LOGPROBS)?.map(|k| k as usize);
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if f.int("best_of", 1, MAX_N)?
        .is_some_and(|b| b as usize != spec.n)
    {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` other than `n` is not supported",
        ));
    }
    let prompts = match f.get("prompt") {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(v) => prompts(v)?,
    };
    Ok(CompletionRequest { spec, prompts })
}

fn token_list(a: &[Value]) -> Option<Vec<u32>> {
    a.iter()
        .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

/// A prompt (text or token ids) or a list of prompts, as OpenAI takes them.
fn prompts(v: &Value) -> ApiResult<Vec<Prompt>> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, a list of token ids, or a list of those",
        )
    };
    let ids = |a: &[Value]| {
        token_list(a).map(Prompt::Tokens).ok_or_else(|| {
            ApiError::invalid("prompt", "token ids in `prompt` must be integers >= 0")
        })
    };
    match v {
        Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
        Value::Array(a) if a.is_empty() => Err(ApiError::invalid("prompt", "`prompt` is empty")),
        Value::Array(a) if a.iter().all(Value::is_number) => Ok(vec![ids(a)?]),
        Value::Array(a) if a.len() > MAX_PROMPTS => Err(ApiError::invalid(
            "prompt",
            format!(
                "`prompt` may hold at most {MAX_PROMPTS} prompts, got {}",
                a.len()
            ),
        )),
        Value::Array(a) => a
            .iter()
            .map(|p| match p {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(t) if t.is_empty() => {
                    Err(ApiError::invalid("prompt", "a prompt in `prompt` is empty"))
                }
                Value::Array(t) => ids(t),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn chat_fields_are_read_and_checked() {
        let r = chat_request(&obj(json!({
            "model": "m", "temperature": 0, "max_tokens": 7, "stop": "x", "n": 2, "seed": 5,
            "logprobs": true, "top_logprobs": 3, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "developer", "content": "s"},
                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}]
        })))
        .unwrap();
        assert_eq!(r.spec.params.temperature, 0.0);
        assert_eq!(r.spec.max_tokens, Some(7));
        assert_eq!(r.spec.stop, vec!["x"]);
        assert_eq!(r.spec.n, 2);
        assert_eq!(r.spec.params.seed, Some(5));
        assert_eq!(r.spec.logprobs, Some(3));
        assert!(r.spec.stream && r.spec.include_usage);
        assert_eq!(r.messages[0], ChatMessage::new("system", "s"));
        assert_eq!(r.messages[1].content, "a\nb");
    }

    #[test]
    fn bad_fields_name_their_parameter() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": "hi"}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "king", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "messages": [], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [], "temperature": 9}),
                "temperature",
            ),
            (json!({"model": "m", "messages": [], "top_p": 0}), "top_p"),
            (
                json!({"model": "m", "messages": [], "max_tokens": -1}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [], "max_tokens": 1.5}),
                "max_tokens",
            ),
            (json!({"model": "m", "messages": [], "n": 1000}), "n"),
            (json!({"model": "m", "messages": [], "stop": [1]}), "stop"),
            (
                json!({"model": "m", "messages": [], "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "messages": [], "logprobs": true, "top_logprobs": 99}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "messages": [], "presence_penalty": 5}),
                "presence_penalty",
            ),
            (
                json!({"model": "m", "messages": [], "stream": "yes"}),
                "stream",
            ),
        ];
        for (body, param) in cases {
            let e = chat_request(&obj(body.clone())).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn prompts_come_as_text_or_tokens() {
        let p = |v: Value| prompts(&v);
        assert_eq!(p(json!("hi")).unwrap(), vec![Prompt::Text("hi".into())]);
        assert_eq!(p(json!([1, 2])).unwrap(), vec![Prompt::Tokens(vec![1, 2])]);
        assert_eq!(p(json!(["hi"])).unwrap(), vec![Prompt::Text("hi".into())]);
        assert_eq!(p(json!([[3]])).unwrap(), vec![Prompt::Tokens(vec![3])]);
        assert_eq!(
            p(json!(["a", [4, 5], "b"])).unwrap(),
            vec![
                Prompt::Text("a".into()),
                Prompt::Tokens(vec![4, 5]),
                Prompt::Text("b".into())
            ]
        );
        assert!(p(json!([-1])).is_err());
        assert!(p(json!([[-1]])).is_err());
        assert!(p(json!([[]])).is_err());
        assert!(p(json!(["a", 1])).is_err());
        assert!(p(json!([])).is_err());
        assert!(p(json!({})).is_err());
        assert!(p(json!(vec!["x"; MAX_PROMPTS + 1])).is_err());
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert!(parse_body(b"{not json").is_err());
        assert!(parse_body(b"[1]").is_err());
        assert!(parse_body(b"{}").is_ok());
    }
}
