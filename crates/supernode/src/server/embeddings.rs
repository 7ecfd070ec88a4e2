//! `POST /v1/embeddings` in OpenAI's shape: `input` a string, a list of strings, a list of
//! token ids or a list of such lists; `encoding_format` `float` or `base64` (little-endian f32).
//! Each input is the L2-normalised mean of the loaded model's final hidden states (after the
//! final norm), as llama-server computes with mean pooling ([`supernode_engine::embed`]); the
//! engine computes them between two of its steps.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::api::{self, ApiError, ApiResult, Fields};
use super::generate::count_refused;
use super::{AppState, Shared};

/// The most inputs one request may hold (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

/// A parsed embeddings request.
#[derive(Debug, PartialEq)]
pub struct EmbeddingRequest {
    pub inputs: Vec<Vec<u32>>,
    pub base64: bool,
}

fn ids(a: &[Value]) -> Option<Vec<u32>> {
    a.iter()
        .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

pub fn parse(st: &AppState, body: &Map<String, Value>) -> ApiResult<EmbeddingRequest> {
    let f = Fields(body);
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    if model != st.model_id {
        return Err(super::unknown_model(st, model));
    }
    let base64 = match f.string("encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, got `{other}`"),
            ))
        }
    };
    let hidden = st.hidden;
    if let Some(d) = f.int("dimensions", 1, i64::from(u32::MAX))? {
        if d as usize != hidden {
            return Err(ApiError::invalid(
                "dimensions",
                format!("this model's embeddings have {hidden} dimensions, not {d}"),
            ));
        }
    }
    let text = |s: &str| -> ApiResult<Vec<u32>> {
        let tok = st.tokenizer.as_ref().ok_or_else(|| {
            ApiError::invalid("input", "this model has no tokenizer: give token ids")
        })?;
        Ok(tok.encode(s, true, false))
    };
    let bad = || {
        ApiError::invalid(
            "input",
            "`input` must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
        )
    };
    let inputs: Vec<Vec<u32>> = match f.get("input") {
        None => return Err(ApiError::invalid("input", "`input` is required")),
        Some(Value::String(s)) => vec![text(s)?],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid("input", "`input` is empty"))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![ids(a).ok_or_else(bad)?],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => text(s),
                Value::Array(t) => ids(t).ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(bad()),
    };
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "`input` may hold at most {MAX_INPUTS} inputs, got {}",
                inputs.len()
            ),
        ));
    }
    for (i, t) in inputs.iter().enumerate() {
        if t.is_empty() {
            return Err(ApiError::invalid(
                "input",
                format!("input {i} has no tokens"),
            ));
        }
        if t.len() > st.max_model_len {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input {i} has {} tokens; this model's context holds {}",
                    t.len(),
                    st.max_model_len
                ),
            )
            .with_code("context_length_exceeded"));
        }
        if let Some(id) = t.iter().find(|&&id| id as usize >= st.vocab_size) {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "token id {id} in input {i} is outside the vocabulary of {}",
                    st.vocab_size
                ),
            ));
        }
    }
    Ok(EmbeddingRequest { inputs, base64 })
}

/// One embedding as OpenAI encodes it.
pub fn encode(v: &[f32], base64: bool) -> Value {
    if base64 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(v)
    }
}

pub async fn handler(State(st): State<Shared>, body: Bytes) -> Response {
    let st2 = st.clone();
    let parsed = tokio::task::spawn_blocking(move || parse(&st2, &api::parse_body(&body)?))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::internal(format!(
                "preparing the request failed: {e}"
            )))
        });
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            count_refused(&st, &e);
            return e.into_response();
        }
    };
    let tokens: usize = req.inputs.iter().map(Vec::len).sum();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reply = Box::new(move |r| {
        let _ = tx.send(r);
    });
    if st.engine.embed(req.inputs, reply).is_err() {
        return ApiError::overloaded("the server is shutting down").into_response();
    }
    let vectors = match rx.await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return ApiError::internal(e.to_string()).into_response(),
        Err(_) => {
            return ApiError::overloaded("the engine stopped before the embeddings were computed")
                .into_response()
        }
    };
    st.metrics.finished("stop", None);
    st.metrics.prompt(tokens, 0);
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| json!({ "object": "embedding", "index": i, "embedding": encode(v, req.base64) }))
        .collect();
    Json(json!({
        "object": "list", "data": data, "model": st.model_id,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000, -2.0f32 = 0xc0000000.
        assert_eq!(encode(&[1.0, -2.0], true), json!("AACAPwAAAMA="));
        assert_eq!(encode(&[0.5], false), json!([0.5]));
    }
}
