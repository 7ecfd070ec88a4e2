//! `tokenizer.json` through HF `tokenizers`, wrapped to behave like the GGUF tokenizers.
//!
//! Encoding goes through `tokenizers` without its post-processor (BOS/EOS are added by
//! [`super::Tokenizer`] from `tokenizer_config.json`'s flags, or from what the post-processor
//! would add). A second copy with `encode_special_tokens` set treats special added tokens as
//! text: that is `parse_special = false`, and the encoding of protected fragments. Decoding uses
//! per-token bytes in the style the `decoder` section implies (byte-level or SentencePiece), so
//! that [`super::IncrementalDecoder`] and `decode` agree by construction.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use serde_json::Value;

use crate::error::EngineError;

use super::special::Fragment;
use super::vocab::{attr, Vocab};
use super::PieceStyle;

pub(crate) struct HfBackend {
    normal: tokenizers::Tokenizer,
    no_special: tokenizers::Tokenizer,
}

/// Everything read from a tokenizer directory.
pub(crate) struct HfLoaded {
    pub backend: HfBackend,
    pub vocab: Vocab,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub style: PieceStyle,
    pub strip_first_space: bool,
    pub chat_template: Option<String>,
}

/// How far token ids may run beyond twice the number of tokens (gaps left by converters).
const MAX_ID_SLACK: usize = 1024;

fn read_file(path: &Path) -> Result<Vec<u8>, EngineError> {
    std::fs::read(path).map_err(|e| EngineError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value, EngineError> {
    serde_json::from_slice(bytes).map_err(|e| EngineError::Io {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// `"<s>"` or `{"content": "<s>", ..}` (both forms occur in `tokenizer_config.json`).
fn token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A string template, or the `default` (else first) entry of a list of named templates.
fn chat_template_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            };
            named("default")
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)
        }
        _ => None,
    }
}

/// The decoder types in `decoder`, flattening `Sequence`s.
fn decoder_types(v: &Value, out: &mut Vec<Value>) {
    match v.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for d in v
                .get("decoders")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                decoder_types(d, out);
            }
        }
        Some(_) => out.push(v.clone()),
        None => {}
    }
}

/// Piece style and first-space stripping implied by the `decoder` section.
fn decoding_of(json: &Value) -> (PieceStyle, bool) {
    let mut decs = Vec::new();
    if let Some(d) = json.get("decoder") {
        decoder_types(d, &mut decs);
    }
    let ty = |d: &Value| {
        d.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    if decs.iter().any(|d| ty(d) == "ByteLevel") {
        return (PieceStyle::ByteLevel, false);
    }
    let mut style = PieceStyle::Raw;
    let mut strip = false;
    for d in &decs {
        match ty(d).as_str() {
            "Metaspace" => {
                style = PieceStyle::SentencePiece;
                let scheme = d.get("prepend_scheme").and_then(Value::as_str);
                let legacy = d.get("add_prefix_space").and_then(Value::as_bool);
                strip |= matches!(scheme, Some("always") | Some("first")) || legacy == Some(true);
            }
            "Replace" | "ByteFallback" => style = PieceStyle::SentencePiece,
            "Strip" => {
                let start = d.get("start").and_then(Value::as_u64).unwrap_or(0);
                let content = d.get("content").and_then(Value::as_str).unwrap_or(" ");
                strip |= start > 0 && content == " ";
            }
            _ => {}
        }
    }
    (style, strip)
}

fn tok_err(op: &'static str) -> impl Fn(tokenizers::Error) -> EngineError {
    move |e| EngineError::tokenizer(op, e.to_string())
}

/// Runs a call into `tokenizers` that a malformed `tokenizer.json` can make panic (the crate
/// trusts its files: a post-processor template naming a special token it does not define panics
/// on every encode): the call's own result, or an error for the panic.
fn unpanicked<T>(op: &'static str, f: impl FnOnce() -> T) -> Result<T, EngineError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        EngineError::tokenizer(
            op,
            format!("`tokenizers` panicked ({what}): the file is malformed"),
        )
    })
}

pub(crate) fn load(dir: &Path) -> Result<HfLoaded, EngineError> {
    let tok_path = dir.join("tokenizer.json");
    let bytes = read_file(&tok_path)?;
    let json = parse_json(&tok_path, &bytes)?;
    let mut normal = unpanicked("tokenizer.json", || {
        tokenizers::Tokenizer::from_bytes(&bytes)
    })?
    .map_err(tok_err("tokenizer.json"))?;
    // A file's padding and truncation settings are for batches of fixed length (transformers
    // turns them off unless a call asks for them): padding would add ids, possibly outside the
    // vocabulary, and truncation would cut prompts short.
    normal.with_padding(None);
    normal
        .with_truncation(None)
        .map_err(tok_err("tokenizer.json"))?;
    let mut no_special = normal.clone();
    no_special.set_encode_special_tokens(true);

    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        Some(parse_json(&config_path, &read_file(&config_path)?)?)
    } else {
        None
    };
    let cfg = |k: &str| config.as_ref().and_then(|c| c.get(k));

    // The vocabulary, added tokens included; ids without a token get a placeholder text. Real
    // files number their tokens densely (added tokens right after the model's); a file whose
    // largest id is far beyond its token count would have the table hold mostly placeholders.
    let by_text = normal.get_vocab(true);
    let n = by_text
        .values()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0);
    if n > MAX_ID_SLACK + 2 * by_text.len() {
        return Err(EngineError::tokenizer(
            "tokenizer.json",
            format!(
                "the largest token id is {} but there are only {} tokens",
                n - 1,
                by_text.len()
            ),
        ));
    }
    let mut texts: Vec<Option<String>> = vec![None; n];
    for (text, &id) in &by_text {
        texts[id as usize] = Some(text.clone());
    }
    let texts: Vec<String> = texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[EMPTY_{i}]")))
        .collect();

    let (style, strip_first_space) = decoding_of(&json);
    let byte_fallback = json
        .pointer("/model/byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut attrs: Vec<u32> = texts
        .iter()
        .map(|t| {
            let is_byte = t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t.get(3..5)
                    .is_some_and(|h| u8::from_str_radix(h, 16).is_ok());
            if byte_fallback && is_byte {
                attr::BYTE
            } else {
                attr::NORMAL
            }
        })
        .collect();
    for (id, added) in normal.get_added_tokens_decoder() {
        if let Some(a) = attrs.get_mut(id as usize) {
            *a = if added.special {
                attr::CONTROL
            } else {
                attr::USER_DEFINED
            };
        }
    }
    let vocab = Vocab::new(texts, vec![0.0; n], attrs);

    let bos = token_content(cfg("bos_token")).and_then(|t| vocab.id(&t));
    let eos = token_content(cfg("eos_token")).and_then(|t| vocab.id(&t));

    // What the post-processor adds, for configs that do not say (nothing, if the model cannot
    // represent the probe); a panic is a broken file.
    let probe = |add: bool| {
        unpanicked("tokenizer.json", || normal.encode("a", add))
            .map(|r| r.map(|e| e.get_ids().to_vec()).unwrap_or_default())
    };
    let (with, without) = (probe(true)?, probe(false)?);
    let post_adds_bos = with.len() > without.len() && bos.is_some() && with.first() == bos.as_ref();
    let post_adds_eos = with.len() > without.len() && eos.is_some() && with.last() == eos.as_ref();
    let add_bos = cfg("add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(post_adds_bos);
    let add_eos = cfg("add_eos_token")
        .and_then(Value::as_bool)
        .unwrap_or(post_adds_eos);

    Ok(HfLoaded {
        backend: HfBackend { normal, no_special },
        vocab,
        bos,
        eos,
        add_bos,
        add_eos,
        style,
        strip_first_space,
        chat_template: chat_template_of(cfg("chat_template")),
    })
}

impl HfBackend {
    /// Encodes all of `text` (no BOS/EOS); special added tokens are recognised when `parse_special`.
    pub fn encode_whole(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
        let tok = if parse_special {
            &self.normal
        } else {
            &self.no_special
        };
        // An encoding error (the model cannot represent the text) yields no ids for it.
        if let Ok(Ok(e)) = unpanicked("encode", || tok.encode(text, false)) {
            out.extend_from_slice(e.get_ids());
        }
    }

    /// Encodes pre-split fragments: text pieces with special tokens treated as text.
    pub fn encode_fragments(&self, text: &str, frags: &[Fragment], out: &mut Vec<u32>) {
        for f in frags {
            match f {
                Fragment::Text(r) => self.encode_whole(&text[r.clone()], false, out),
                Fragment::Token(id) => out.push(*id),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::super::unicode::byte_to_char;
    use super::super::{IncrementalDecoder, Tokenizer};

    const MERGES: &[&str] = &[
        "Ġ t", "h e", "l l", "Ġt he", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
    ];

    /// A byte-level BPE `tokenizer.json` (GPT-2 style) with three special tokens, and its config.
    fn write_tokenizer_dir(tag: &str, config: Option<serde_json::Value>) -> std::path::PathBuf {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .enumerate()
        {
            vocab.insert(t.to_string(), json!(i));
        }
        for c in byte_to_char() {
            let id = vocab.len();
            vocab.insert(c.to_string(), json!(id));
        }
        for m in MERGES {
            let id = vocab.len();
            vocab.insert(m.replace(' ', ""), json!(id));
        }
        let added: Vec<_> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let tok = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": MERGES},
        });
        let dir = std::env::temp_dir().join(format!("supernode-hf-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("write tokenizer.json");
        if let Some(c) = config {
            std::fs::write(dir.join("tokenizer_config.json"), c.to_string()).expect("write config");
        }
        dir
    }

    #[test]
    fn decoder_section_sets_piece_style() {
        use super::{decoding_of, PieceStyle};
        let llama2 = json!({"decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}});
        assert_eq!(decoding_of(&llama2), (PieceStyle::SentencePiece, true));
        let metaspace = json!({"decoder": {"type": "Metaspace", "replacement": "▁",
                                           "prepend_scheme": "never", "split": true}});
        assert_eq!(decoding_of(&metaspace), (PieceStyle::SentencePiece, false));
        let bytelevel = json!({"decoder": {"type": "ByteLevel"}});
        assert_eq!(decoding_of(&bytelevel), (PieceStyle::ByteLevel, false));
        assert_eq!(
            decoding_of(&json!({"decoder": null})),
            (PieceStyle::Raw, false)
        );
    }

    fn id(tok: &Tokenizer, text: &str) -> u32 {
        tok.token_id(text).unwrap_or(u32::MAX)
    }

    #[test]
    fn hf_byte_level_bpe_encodes_and_decodes() {
        let dir = write_tokenizer_dir("plain", None);
        let tok = Tokenizer::from_hf_dir(&dir).expect("loads");
        let ids = tok.encode("hello the world", true, false);
        assert_eq!(
            ids,
            [id(&tok, "hello"), id(&tok, "Ġthe"), id(&tok, "Ġworld")]
        );
        assert_eq!(tok.decode(&ids, false), "hello the world");
        assert_eq!(tok.bos_id(), None);
        assert_eq!(tok.chat_template(), None);
        // Special texts: parsed only when asked.
        let text = "<|im_start|>hello<|im_end|>";
        assert_eq!(tok.encode(text, false, true), [1, id(&tok, "hello"), 2]);
        let plain = tok.encode(text, false, false);
        assert!(!plain.contains(&1) && !plain.contains(&2), "{plain:?}");
        assert_eq!(tok.decode(&plain, false), text);
        assert_eq!(tok.decode(&[1, id(&tok, "hello"), 2], false), "hello");
        assert_eq!(tok.decode(&[1, id(&tok, "hello"), 2], true), text);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hf_config_gives_bos_eos_template_and_protection() {
        let config = json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "add_bos_token": true,
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        });
        let dir = write_tokenizer_dir("config", Some(config));
        let tok = Arc::new(Tokenizer::from_hf_dir(&dir).expect("loads"));
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), Some(2));
        assert_eq!(tok.eog_ids(), [0, 2]);
        assert!(tok.chat_template().is_some());
        assert_eq!(tok.encode("hello", true, true), [1, id(&tok, "hello")]);

        let text = "<|im_start|>hello <|im_end|>";
        let open = tok.encode_protected(text, false, &[]);
        assert_eq!(open, tok.encode(text, false, true));
        let content = 12..text.len() - 10;
        let guarded = tok.encode_protected(text, false, std::slice::from_ref(&content));
        assert_eq!(guarded[0], 1);
        assert_eq!(guarded.last(), Some(&2));
        assert_eq!(tok.decode(&guarded, true), text);
        let user = "<|im_start|>x<|im_end|>";
        let all = format!("{user}{user}");
        let second = user.len()..all.len();
        let guarded = tok.encode_protected(&all, false, std::slice::from_ref(&second));
        assert_eq!(guarded.iter().filter(|&&t| t == 1).count(), 1);

        let mut dec = IncrementalDecoder::new(Arc::clone(&tok), false);
        let mut out = String::new();
        for &t in &guarded {
            out += &dec.push(t);
        }
        out += &dec.finish();
        assert_eq!(out, tok.decode(&guarded, false));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// `dir`'s `tokenizer.json` edited by `edit`, loaded: the error's text.
    fn load_error(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let dir = write_tokenizer_dir(tag, None);
        let path = dir.join("tokenizer.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        edit(&mut v);
        std::fs::write(&path, v.to_string()).expect("write");
        let e = Tokenizer::from_hf_dir(&dir).expect_err("loads").to_string();
        let _ = std::fs::remove_dir_all(dir);
        e
    }

    #[test]
    fn malformed_files_are_errors() {
        // Found by fuzzing: one token id of 2^31 - 1 sized the id table for 2^31 tokens.
        let e = load_error("huge-id", |v| v["model"]["vocab"]["he"] = json!(i32::MAX));
        assert!(
            e.contains("the largest token id is 2147483647 but there are only"),
            "{e}"
        );
        // Found by fuzzing: a post-processor naming a special token it does not define made
        // `tokenizers` panic on every encode.
        let e = load_error("template", |v| {
            v["post_processor"] = json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": " ", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {}});
        });
        assert!(
            e.starts_with("tokenizer (tokenizer.json): `tokenizers` panicked ("),
            "{e}"
        );
    }

    #[test]
    fn padding_and_truncation_of_the_file_are_off() {
        // Found by fuzzing: a file's fixed padding added its `pad_id` (outside the vocabulary
        // there) to every encoding; its truncation would cut prompts short.
        let dir = write_tokenizer_dir("padding", None);
        let path = dir.join("tokenizer.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        v["padding"] = json!({"strategy": {"Fixed": 64}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 100000, "pad_type_id": 0, "pad_token": "[PAD]"});
        v["truncation"] = json!({"direction": "Right", "max_length": 2,
            "strategy": "LongestFirst", "stride": 0});
        std::fs::write(&path, v.to_string()).expect("write");
        let tok = Tokenizer::from_hf_dir(&dir).expect("loads");
        let ids = tok.encode("hello the world", false, false);
        assert_eq!(
            ids,
            [id(&tok, "hello"), id(&tok, "Ġthe"), id(&tok, "Ġworld")]
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
