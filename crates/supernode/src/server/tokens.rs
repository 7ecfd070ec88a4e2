//! `POST /tokenize` and `POST /detokenize`, in llama-server's shapes (`content`,
//! `add_special`, `parse_special`, `with_pieces` → `tokens`; `tokens` → `content`), with vLLM's
//! forms accepted too (`prompt` with `add_special_tokens`, or chat `messages` rendered through
//! the model's template; the answer adds `count` and `max_model_len`, and detokenize's answer
//! `prompt`), and vLLM's `GET /tokenizer_info` (what lm-eval's remote tokenizer reads).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use supernode_engine::tokenizer::Tokenizer;

use super::api::{self, ApiError, ApiResult, Fields};
use super::{AppState, Shared};

fn tokenizer(st: &AppState) -> ApiResult<&Tokenizer> {
    st.tokenizer
        .as_deref()
        .ok_or_else(|| ApiError::invalid("", "this model has no tokenizer"))
}

/// A token's text: a string where its bytes are UTF-8, else the bytes (as llama-server does).
fn piece(tok: &Tokenizer, id: u32) -> Value {
    let bytes = tok.token_bytes(id, true);
    match String::from_utf8(bytes) {
        Ok(s) => json!(s),
        Err(e) => json!(e.into_bytes()),
    }
}

pub fn tokenize_body(st: &AppState, body: &Map<String, Value>) -> ApiResult<Value> {
    let f = Fields(body);
    let tok = tokenizer(st)?;
    if let Some(m) = f.string("model")? {
        if m != st.model_id {
            return Err(super::unknown_model(st, m));
        }
    }
    let tokens = if f.get("messages").is_some() {
        let tmpl = st
            .template
            .as_ref()
            .ok_or_else(|| ApiError::invalid("messages", "this model has no chat template"))?;
        let mut chat = body.clone();
        chat.entry("model").or_insert_with(|| json!(st.model_id));
        chat.remove("add_generation_prompt");
        let req = api::chat_request(&chat)?;
        tmpl.prompt_tokens(tok, &req.messages)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?
    } else {
        let (text, param) = match (f.string("content")?, f.string("prompt")?) {
            (Some(t), _) => (t, "content"),
            (None, Some(t)) => (t, "prompt"),
            (None, None) => {
                return Err(ApiError::invalid(
                    "content",
                    "`content` (or `prompt`, or `messages`) is required",
                ))
            }
        };
        // llama-server adds no BOS unless asked; vLLM's `prompt` form adds it unless told not to.
        let add = match param {
            "content" => f.bool("add_special")?.unwrap_or(false),
            _ => f.bool("add_special_tokens")?.unwrap_or(true),
        };
        let parse = f.bool("parse_special")?.unwrap_or(true);
        tok.encode(text, add, parse)
    };
    let list: Vec<Value> = if f.bool("with_pieces")?.unwrap_or(false) {
        tokens
            .iter()
            .map(|&id| json!({ "id": id, "piece": piece(tok, id) }))
            .collect()
    } else {
        tokens.iter().map(|&id| json!(id)).collect()
    };
    Ok(json!({ "tokens": list, "count": tokens.len(), "max_model_len": st.max_model_len }))
}

pub fn detokenize_body(st: &AppState, body: &Map<String, Value>) -> ApiResult<Value> {
    let f = Fields(body);
    let tok = tokenizer(st)?;
    let bad = || ApiError::invalid("tokens", "`tokens` must be a list of token ids");
    let ids: Vec<u32> = match f.get("tokens") {
        None => return Err(ApiError::invalid("tokens", "`tokens` is required")),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(bad)
            })
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(bad()),
    };
    let vocab = tok.vocab_size();
    if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = tok.decode(&ids, true);
    Ok(json!({ "content": text, "prompt": text }))
}

/// vLLM's `GET /tokenizer_info`: the tokenizer's configuration in `tokenizer_config.json`'s
/// terms. lm-eval's API models detect a server tokenizer by it (with `/tokenize`) and then
/// tokenise through the server instead of loading one from the Hub.
pub fn tokenizer_info_body(st: &AppState) -> ApiResult<Value> {
    let tok = tokenizer(st)?;
    // Special tokens as the text that encodes to them (`/tokenize` parses special text).
    let text = |id: Option<u32>| id.map(|id| tok.decode(&[id], true));
    Ok(json!({
        "tokenizer_class": "supernode",
        "bos_token": text(tok.bos_id()),
        "eos_token": text(tok.eos_id()),
        "add_bos_token": tok.adds_bos(),
        "chat_template": st.template_source,
        "model_max_length": st.max_model_len,
        "vocab_size": tok.vocab_size(),
    }))
}

pub async fn tokenizer_info(State(st): State<Shared>) -> Response {
    match tokenizer_info_body(&st) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run(
    st: Shared,
    body: Bytes,
    f: fn(&AppState, &Map<String, Value>) -> ApiResult<Value>,
) -> Response {
    let r = tokio::task::spawn_blocking(move || f(&st, &api::parse_body(&body)?))
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("tokenizing failed: {e}"))));
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn tokenize(State(st): State<Shared>, body: Bytes) -> Response {
    run(st, body, tokenize_body).await
}

pub async fn detokenize(State(st): State<Shared>, body: Bytes) -> Response {
    run(st, body, detokenize_body).await
}
