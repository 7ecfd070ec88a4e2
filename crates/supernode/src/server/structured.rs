//! The structured-output and `logit_bias` fields of chat and completion requests.
//!
//! - `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or
//!   `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (OpenAI);
//! - `structured_outputs`: `{"json" | "regex" | "choice" | "grammar" | "json_object"}` (vLLM);
//! - the legacy `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (vLLM);
//! - `logit_bias`: `{"token id": bias}`, biases in [-100, 100] (OpenAI).
//!
//! At most one constraint per request. Parsing happens with the other fields
//! ([`parse`]); compiling needs the model's vocabulary and happens when the request starts
//! ([`compile`]), on the blocking pool, so a schema llguidance cannot enforce is a 400 naming
//! the field and llguidance's reason. The vocabulary's [`Grammars`] are built on first use and
//! shared by every later request.

use serde_json::{Map, Value};
use supernode_engine::constraint::{schema_of, unenforceable_reason, Constraint, ConstraintSpec};

use super::api::{ApiError, ApiResult, Fields};
use super::AppState;

/// A constraint as a request asked for it, with the field it came from (for errors).
#[derive(Debug)]
pub struct Requested {
    pub param: &'static str,
    pub spec: ConstraintSpec,
    /// Applies once the output's text has contained this (the end of its reasoning); `None`:
    /// from the start.
    pub after: Option<&'static str>,
}

impl Requested {
    /// `spec`, asked for by `param`, applying from the start.
    pub fn new(param: &'static str, spec: ConstraintSpec) -> Requested {
        Requested {
            param,
            spec,
            after: None,
        }
    }
}

/// What these fields ask of generation.
#[derive(Debug, Default)]
pub struct Structured {
    pub constraint: Option<Requested>,
    /// `(token id, bias)`, ids not yet checked against the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
}

/// The most entries of `logit_bias` (OpenAI allows 300).
pub const MAX_LOGIT_BIAS: usize = 300;

/// Reads the structured-output fields and `logit_bias` of a request.
pub fn parse(f: &Fields) -> ApiResult<Structured> {
    let mut found: Vec<Requested> = Vec::new();
    if let Some(v) = f.get("response_format") {
        found.extend(response_format(v)?);
    }
    if let Some(v) = f.get("structured_outputs") {
        found.push(structured_outputs(v)?);
    }
    for (param, kind) in [
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ] {
        if let Some(v) = f.get(param) {
            found.push(Requested::new(param, one_kind(param, kind, v)?));
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|r| r.param).collect();
        return Err(ApiError::invalid(
            found[1].param,
            format!(
                "only one output constraint may be given per request, got {}",
                names.join(", ")
            ),
        ));
    }
    Ok(Structured {
        constraint: found.pop(),
        logit_bias: logit_bias(f.get("logit_bias"))?,
    })
}

fn wrong(param: &str, want: &str) -> ApiError {
    ApiError::invalid(param, format!("`{param}` must be {want}"))
}

fn response_format(v: &Value) -> ApiResult<Option<Requested>> {
    const P: &str = "response_format";
    let Value::Object(o) = v else {
        return Err(wrong(P, "an object"));
    };
    let f = Fields(o);
    let kind = f
        .string("type")
        .map_err(|_| wrong("response_format.type", "a string"))?
        .ok_or_else(|| ApiError::invalid(P, "`response_format.type` is required"))?;
    let spec = match kind {
        "text" => return Ok(None),
        "json_object" => ConstraintSpec::JsonObject,
        "json_schema" => {
            const JS: &str = "response_format.json_schema";
            let Some(Value::Object(js)) = f.get("json_schema") else {
                return Err(wrong(JS, "an object with a `schema`"));
            };
            let jf = Fields(js);
            jf.string("name")
                .map_err(|_| wrong("response_format.json_schema.name", "a string"))?;
            let strict = jf
                .bool("strict")
                .map_err(|_| wrong("response_format.json_schema.strict", "a boolean"))?
                .unwrap_or(false);
            let schema = match jf.get("schema") {
                Some(s @ Value::Object(_)) => s.clone(),
                Some(Value::Bool(true)) | None => {
                    return Err(ApiError::invalid(
                        P,
                        "`response_format.json_schema.schema` is required (a JSON schema object)",
                    ))
                }
                Some(_) => return Err(wrong("response_format.json_schema.schema", "an object")),
            };
            ConstraintSpec::JsonSchema { schema, strict }
        }
        other => {
            return Err(ApiError::invalid(
                P,
                format!(
                    "`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`"
                ),
            ))
        }
    };
    Ok(Some(Requested::new(P, spec)))
}

fn structured_outputs(v: &Value) -> ApiResult<Requested> {
    const P: &str = "structured_outputs";
    let Value::Object(o) = v else {
        return Err(wrong(P, "an object"));
    };
    let mut kinds = Vec::new();
    for (key, val) in o.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "json" | "regex" | "choice" | "grammar" => kinds.push((key.as_str(), val)),
            "json_object" => match val {
                Value::Bool(true) => kinds.push(("json_object", val)),
                Value::Bool(false) => {}
                _ => return Err(wrong("structured_outputs.json_object", "a boolean")),
            },
            other => {
                return Err(ApiError::invalid(
                    P,
                    format!(
                        "`structured_outputs.{other}` is not supported (use one of `json`, \
                         `regex`, `choice`, `grammar`, `json_object`)"
                    ),
                ))
            }
        }
    }
    match kinds.as_slice() {
        [(kind, val)] => Ok(Requested::new(P, one_kind(P, kind, val)?)),
        [] => Err(ApiError::invalid(
            P,
            "`structured_outputs` must give one of `json`, `regex`, `choice`, `grammar`, `json_object`",
        )),
        _ => Err(ApiError::invalid(
            P,
            "`structured_outputs` must give exactly one constraint",
        )),
    }
}

/// One constraint of kind `json` (a schema object or its text), `regex`, `choice`, `grammar`
/// or `json_object`, from the field `param`.
fn one_kind(param: &str, kind: &str, v: &Value) -> ApiResult<ConstraintSpec> {
    Ok(match (kind, v) {
        ("json", _) => match schema_of(v) {
            Some(schema) => ConstraintSpec::JsonSchema {
                schema,
                strict: true,
            },
            None => return Err(wrong(param, "a JSON schema (an object, or its JSON text)")),
        },
        ("json_object", _) => ConstraintSpec::JsonObject,
        ("regex", Value::String(s)) => ConstraintSpec::Regex(s.clone()),
        ("grammar", Value::String(s)) => ConstraintSpec::Lark(s.clone()),
        ("regex" | "grammar", _) => return Err(wrong(param, "a string")),
        ("choice", Value::Array(a)) if !a.is_empty() => ConstraintSpec::Choice(
            a.iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| wrong(param, "a non-empty list of strings"))?,
        ),
        _ => return Err(wrong(param, "a non-empty list of strings")),
    })
}

fn logit_bias(v: Option<&Value>) -> ApiResult<Vec<(u32, f32)>> {
    const P: &str = "logit_bias";
    let o: &Map<String, Value> = match v {
        None => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(wrong(P, "an object mapping token ids to biases")),
    };
    if o.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            P,
            format!(
                "`logit_bias` may hold at most {MAX_LOGIT_BIAS} tokens, got {}",
                o.len()
            ),
        ));
    }
    o.iter()
        .map(|(k, b)| {
            let id = k.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    P,
                    format!("`logit_bias` keys must be token ids (integers >= 0), got `{k}`"),
                )
            })?;
            let bias = b
                .as_f64()
                .filter(|x| (-100.0..=100.0).contains(x))
                .ok_or_else(|| {
                    ApiError::invalid(
                        P,
                        format!("`logit_bias[\"{k}\"]` must be a number from -100 to 100, got {b}"),
                    )
                })?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// Checks `logit_bias` against a vocabulary of `vocab_size` ids.
pub fn check_logit_bias(bias: &[(u32, f32)], vocab_size: usize) -> ApiResult<()> {
    match bias.iter().find(|&&(id, _)| id as usize >= vocab_size) {
        Some((id, _)) => Err(ApiError::invalid(
            "logit_bias",
            format!("`logit_bias` names token {id}, outside the vocabulary of {vocab_size}"),
        )),
        None => Ok(()),
    }
}

/// Compiles the request's constraint for this model's vocabulary.
pub fn compile(st: &AppState, req: &Requested) -> ApiResult<Constraint> {
    let grammars = st
        .grammars
        .get(st.tokenizer.as_deref(), st.engine.vocab_size())
        .map_err(|m| ApiError::invalid(req.param, m))?;
    let c = grammars.compile(&req.spec).map_err(|e| {
        ApiError::invalid(
            req.param,
            format!(
                "`{}` cannot be enforced: {}",
                req.param,
                unenforceable_reason(e)
            ),
        )
    })?;
    Ok(match req.after {
        Some(text) => c.start_after(text),
        None => c,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parsed(v: Value) -> ApiResult<Structured> {
        let Value::Object(m) = v else { unreachable!() };
        parse(&Fields(&m))
    }

    fn spec(v: Value) -> ConstraintSpec {
        parsed(v).unwrap().constraint.unwrap().spec
    }

    fn param_of_error(v: Value) -> String {
        let e = parsed(v.clone()).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{v}");
        e.param.unwrap_or_default()
    }

    #[test]
    fn every_form_of_constraint_is_read() {
        let schema = json!({"type": "object"});
        assert!(parsed(json!({"response_format": {"type": "text"}}))
            .unwrap()
            .constraint
            .is_none());
        assert_eq!(
            spec(json!({"response_format": {"type": "json_object"}})),
            ConstraintSpec::JsonObject
        );
        assert_eq!(
            spec(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}})),
            ConstraintSpec::JsonSchema {
                schema: schema.clone(),
                strict: true
            }
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"regex": "a+"}})),
            ConstraintSpec::Regex("a+".into())
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"choice": ["a", "b"]}})),
            ConstraintSpec::Choice(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"grammar": "start: \"a\""}})),
            ConstraintSpec::Lark("start: \"a\"".into())
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"json": "{\"type\": \"object\"}"}})),
            ConstraintSpec::JsonSchema {
                schema: schema.clone(),
                strict: true
            }
        );
        assert_eq!(
            spec(json!({"guided_json": schema})),
            ConstraintSpec::JsonSchema {
                schema,
                strict: true
            }
        );
        assert_eq!(
            spec(json!({"guided_choice": ["x"]})),
            ConstraintSpec::Choice(vec!["x".into()])
        );
        assert_eq!(
            spec(json!({"guided_regex": "x"})),
            ConstraintSpec::Regex("x".into())
        );
        assert_eq!(
            spec(json!({"guided_grammar": "g"})),
            ConstraintSpec::Lark("g".into())
        );
    }

    #[test]
    fn bad_constraints_name_their_field() {
        let cases = [
            (json!({"response_format": "json"}), "response_format"),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"schema": {}, "strict": "yes"}}}),
                "response_format.json_schema.strict",
            ),
            (json!({"structured_outputs": {}}), "structured_outputs"),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"structural_tag": "x"}}),
                "structured_outputs",
            ),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_choice": [1]}), "guided_choice"),
            (json!({"guided_regex": 5}), "guided_regex"),
            (json!({"guided_json": "not json"}), "guided_json"),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
            ),
            (json!({"logit_bias": [1]}), "logit_bias"),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"logit_bias": {"-1": 1}}), "logit_bias"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (json!({"logit_bias": {"5": "1"}}), "logit_bias"),
        ];
        for (body, param) in cases {
            assert_eq!(param_of_error(body.clone()), param, "{body}");
        }
    }

    #[test]
    fn logit_bias_is_read_and_checked_against_the_vocabulary() {
        let s = parsed(json!({"logit_bias": {"7": -100, "12": 2.5}})).unwrap();
        let mut b = s.logit_bias;
        b.sort_by_key(|x| x.0);
        assert_eq!(b, vec![(7, -100.0), (12, 2.5)]);
        assert!(check_logit_bias(&b, 13).is_ok());
        let e = check_logit_bias(&b, 12).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logit_bias"));
        assert!(e.message.contains("12"), "{}", e.message);
    }
}
