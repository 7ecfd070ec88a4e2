//! The tokenizers of the two real models against llama.cpp.
//!
//! `tests/fixtures/tokenizer_llamacpp.json` (made by `tools/make_tokenizer_reference.py` with
//! llama-cpp-python) holds llama.cpp's ids and detokenised text for ~30 varied strings per model
//! and, for SmolLM2, its chat template rendered by Jinja2 the way HF renders it. The tokenizers are
//! built from the real GGUF files' metadata, found in `$SUPERNODE_CACHE/models` (default
//! `~/.cache/supernode/models`).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use supernode_engine::chat::{ChatMessage, ChatTemplate};
use supernode_engine::tokenizer::{IncrementalDecoder, Tokenizer};

const FIXTURE: &str = include_str!("../../../tests/fixtures/tokenizer_llamacpp.json");

fn fixture() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| serde_json::from_str(FIXTURE).expect("fixture is valid JSON"))
}

fn model_path(name: &str) -> PathBuf {
    let cache = std::env::var_os("SUPERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache").join("supernode")
        });
    cache.join("models").join(format!("{name}.gguf"))
}

fn load(name: &str) -> Arc<Tokenizer> {
    let meta = metadata(name);
    Arc::new(Tokenizer::from_gguf_metadata(&meta).expect("tokenizer from metadata"))
}

fn metadata(name: &str) -> supernode_models::Metadata {
    let path = model_path(name);
    assert!(
        path.is_file(),
        "{} is missing: run `supernode fetch {name}` first",
        path.display()
    );
    let gguf = supernode_models::gguf::read_gguf(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    gguf.metadata
}

fn smollm2() -> Arc<Tokenizer> {
    static T: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| load("smollm2-135m")).clone()
}

fn gemma3() -> Arc<Tokenizer> {
    static T: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| load("gemma3-270m")).clone()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn streamed(tok: &Arc<Tokenizer>, ids: &[u32], render_special: bool) -> (String, Vec<String>) {
    let mut dec = IncrementalDecoder::new(Arc::clone(tok), render_special);
    let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
    chunks.push(dec.finish());
    (chunks.concat(), chunks)
}

fn check_model(name: &str, tok: &Arc<Tokenizer>) {
    let rec = &fixture()["models"][name];
    assert_eq!(
        tok.vocab_size() as u64,
        rec["vocab_size"].as_u64().unwrap_or(0)
    );
    assert_eq!(tok.bos_id().map(u64::from), rec["bos"].as_u64());
    assert_eq!(tok.eos_id().map(u64::from), rec["eos"].as_u64());
    assert_eq!(tok.adds_bos(), rec["add_bos"].as_bool().unwrap_or(false));
    assert_eq!(tok.eog_ids(), ids_of(&rec["eog"]).as_slice());

    let cases = rec["cases"].as_array().expect("cases");
    assert!(
        cases.len() >= 50,
        "{name}: fixture has {} cases",
        cases.len()
    );
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let add = c["add_special"].as_bool().expect("add_special");
        let parse = c["parse_special"].as_bool().expect("parse_special");
        let want = ids_of(&c["ids"]);
        assert_eq!(
            tok.encode(text, add, parse),
            want,
            "{name}: encode({text:?}, add_special={add}, parse_special={parse})"
        );
        for (render, key) in [(false, "decoded"), (true, "decoded_special")] {
            let decoded = tok.decode(&want, render);
            assert_eq!(
                decoded,
                c[key].as_str().unwrap_or(""),
                "{name}: {key} of {text:?}"
            );
            let (joined, _) = streamed(tok, &want, render);
            assert_eq!(joined, decoded, "{name}: streamed {key} of {text:?}");
        }
    }
}

#[test]
fn smollm2_tokenizes_like_llama_cpp() {
    check_model("smollm2-135m", &smollm2());
}

#[test]
fn gemma3_tokenizes_like_llama_cpp() {
    check_model("gemma3-270m", &gemma3());
}

/// `tok` (model `name`'s) written as `tokenizer.json` and loaded by HF `tokenizers`.
fn hf_export(name: &str, tok: &Tokenizer) -> tokenizers::Tokenizer {
    let json = tok
        .hf_tokenizer_json(&metadata(name))
        .expect("export")
        .to_string();
    json.parse().expect("HF tokenizers loads the export")
}

/// The vocabulary written as `tokenizer.json` (what `supernode worker` hands Dynamo's frontend),
/// loaded by HF `tokenizers`, gives llama.cpp's ids for every case of the fixture, and decodes
/// them to llama.cpp's text.
fn check_hf_export(name: &str, tok: &Arc<Tokenizer>) {
    let mut hf = hf_export(name, tok);
    let rec = &fixture()["models"][name];
    let mut checked = 0;
    for c in rec["cases"].as_array().expect("cases") {
        let text = c["text"].as_str().expect("text");
        let add = c["add_special"].as_bool().expect("add_special");
        let parse = c["parse_special"].as_bool().expect("parse_special");
        let want = ids_of(&c["ids"]);
        hf.set_encode_special_tokens(!parse);
        let got = hf.encode(text, add).expect("encode").get_ids().to_vec();
        assert_eq!(
            got, want,
            "{name}: HF encode({text:?}, add_special={add}, parse_special={parse})"
        );
        for (skip, key) in [(true, "decoded"), (false, "decoded_special")] {
            let decoded = hf.decode(&want, skip).expect("decode");
            assert_eq!(
                decoded,
                c[key].as_str().unwrap_or(""),
                "{name}: HF {key} of {text:?}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 50, "{name}: {checked} cases");
}

#[test]
fn smollm2_exported_tokenizer_json_tokenizes_like_llama_cpp() {
    check_hf_export("smollm2-135m", &smollm2());
}

#[test]
fn gemma3_exported_tokenizer_json_tokenizes_like_llama_cpp() {
    check_hf_export("gemma3-270m", &gemma3());
}

/// Qwen2.5's vocabulary (the `qwen2` pre-tokenizer) has no llama.cpp ids in the fixture: its
/// export is checked against this tokenizer on every text of the fixture, with and without
/// special-token parsing.
#[test]
fn qwen25_exported_tokenizer_json_tokenizes_like_the_gguf_tokenizer() {
    let tok = load("qwen2.5-0.5b");
    let mut hf = hf_export("qwen2.5-0.5b", &tok);
    let mut texts: Vec<String> = fixture()["models"]
        .as_object()
        .expect("models")
        .values()
        .flat_map(|m| m["cases"].as_array().expect("cases").iter())
        .map(|c| c["text"].as_str().expect("text").to_string())
        .collect();
    texts.push("<|im_start|>user\nx = 12345 + 678;\n\tprint(x)<|im_end|>\n".into());
    for text in &texts {
        for parse in [true, false] {
            hf.set_encode_special_tokens(!parse);
            let got = hf.encode(text.as_str(), true).expect("encode");
            let want = tok.encode(text, true, parse);
            assert_eq!(
                got.get_ids(),
                want.as_slice(),
                "encode({text:?}, parse_special={parse})"
            );
            let decoded = hf.decode(&want, false).expect("decode");
            assert_eq!(decoded, tok.decode(&want, true), "decode of {text:?}");
        }
    }
}

#[test]
fn streaming_never_emits_broken_characters() {
    let text = "中文测试：你好，世界！🙂🎉 日本語のテキスト 👨‍👩‍👧‍👦 ok";
    for tok in [smollm2(), gemma3()] {
        let ids = tok.encode(text, false, false);
        let (joined, chunks) = streamed(&tok, &ids, false);
        assert!(
            chunks.iter().all(|c| !c.contains('\u{FFFD}')),
            "a chunk holds U+FFFD: {chunks:?}"
        );
        assert_eq!(joined, tok.decode(&ids, false));
        assert_eq!(joined, text);
    }
}

#[test]
fn smollm2_chat_template_renders_like_hf_and_tokenizes_like_llama_cpp() {
    let tok = smollm2();
    let source = tok.chat_template().expect("SmolLM2 has a chat template");
    let chats = fixture()["models"]["smollm2-135m"]["chats"]
        .as_array()
        .expect("chats");
    assert!(!chats.is_empty());
    for chat in chats {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(chat["messages"].clone()).expect("messages");
        let template = ChatTemplate::new(
            source,
            chat["bos_token"].as_str().unwrap_or(""),
            chat["eos_token"].as_str().unwrap_or(""),
        )
        .expect("template compiles");
        let (rendered, ranges) = template.render(&messages, true).expect("renders");
        let ranges = ranges.expect("the contents are located");
        assert_eq!(rendered, chat["rendered"].as_str().unwrap_or(""));
        assert_eq!(ranges.len(), messages.len());
        for (r, m) in ranges.iter().zip(&messages) {
            assert_eq!(&rendered[r.clone()], m.content);
        }

        let want = ids_of(&chat["ids"]);
        let protected = tok.encode_protected(&rendered, true, &ranges);
        let im_start = tok.token_id("<|im_start|>").expect("<|im_start|> in vocab");
        let typed = messages
            .iter()
            .filter(|m| m.content.contains("<|im_start|>"))
            .count();
        if typed == 0 {
            assert_eq!(
                protected, want,
                "no special text in contents: same as llama.cpp"
            );
        } else {
            // llama.cpp turns the typed "<|im_start|>" into the control token; protection keeps
            // it plain text.
            let count = |ids: &[u32]| ids.iter().filter(|&&t| t == im_start).count();
            assert_eq!(count(&protected) + typed, count(&want));
            assert_eq!(tok.decode(&protected, true), rendered);
        }
    }
}

#[test]
fn encoding_two_thousand_words_is_fast() {
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog,",
        "and",
        "then",
        "它",
        "runs",
        "away.",
        "Numbers",
        "12345",
        "don't",
        "\n\n",
        "supercalifragilistic",
        "émigré",
        "🙂",
    ];
    let text: String = (0..2000)
        .map(|i| format!("{} ", words[(i * 7 + i / 3) % words.len()]))
        .collect();
    for (name, tok) in [("smollm2", smollm2()), ("gemma3", gemma3())] {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let ids = tok.encode(&text, true, true);
            best = best.min(t.elapsed());
            assert!(ids.len() > 2000);
        }
        assert!(
            best < Duration::from_millis(50),
            "{name}: {best:?} for 2000 words"
        );
    }
}
