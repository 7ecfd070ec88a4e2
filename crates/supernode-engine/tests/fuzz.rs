//! Fuzz targets for the engine's readers of untrusted bytes: tokenizers built from GGUF metadata
//! (`Tokenizer::from_gguf_metadata`) and from `tokenizer.json` directories
//! (`Tokenizer::from_hf_dir`), then used on arbitrary text and ids; and chat templates
//! (`ChatTemplate::new`, `render`, `prompt_tokens`) of arbitrary source over arbitrary messages.
//!
//! Inputs are mutated valid seeds (`tests/fuzz/harness.rs` has the budget and the property):
//! GGUF tokenizer metadata edited as typed values (the seeds are the tokenizers of
//! `tests/fuzz-corpus/gguf/`), `tokenizer.json` and `tokenizer_config.json` edited as JSON
//! trees (seeds in `tests/fuzz-corpus/tokenizer_json/`, written by `write_seed_corpus`), and
//! templates recombined from the tags and text of real-shaped templates
//! (`tests/fuzz-corpus/chat_template/`) and fragments that stress the engine.

#[path = "../../../tests/fuzz/harness.rs"]
mod harness;
#[path = "../../../tests/fuzz/meta.rs"]
mod meta;
#[path = "../../../tests/fuzz/mutate.rs"]
mod mutate;

use std::ops::Range;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Value};
use supernode_engine::chat::{ChatMessage, ChatTemplate};
use supernode_engine::tokenizer::{IncrementalDecoder, Tokenizer};
use supernode_models::gguf::{read_gguf, GgufWriter};
use supernode_models::{MetaValue, Metadata};

use harness::{Files, Scratch, Target};
use meta::{apply_meta, meta_op, MetaOp};
use mutate::{apply_bytes, byte_op, json_plan, json_pool, ByteOp, JsonPlan};

#[global_allocator]
static ALLOC: harness::LimitAlloc = harness::LimitAlloc;

/// Texts that tokenizers and templates get wrong: empty, whitespace runs, special-token texts
/// whole and cut, byte-token look-alikes, every UTF-8 length, combining marks, RTL, NUL.
const TEXTS: &[&str] = &[
    "",
    " ",
    "  ",
    "\n",
    "\r\n\t",
    "hello world",
    "Hello, world! It's 2024 -- isn't it?",
    " the the",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>",
    "<|im_end|",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "<unk>",
    "<0x0A>",
    "<start_of_turn>",
    "[CLS]",
    "##ab",
    "\u{2581}",
    "\u{2581}a b",
    "\u{0120}t",
    "é",
    "e\u{301}",
    "日本語のテキスト",
    "\u{1F600}\u{1F469}\u{200D}\u{1F4BB}",
    "\u{202E}abc",
    "\u{0}",
    "\u{FFFD}",
    "\u{F8F0}0\u{F8F1}x\u{F8F2}",
    "{{ messages }}",
    "'s 're 've ?!.,",
    "1234567890",
    "aaaaaaaaaaaaaaaa",
];

/// Texts: pieces from `pool` (the seeds' own tokens and [`TEXTS`]) or random characters,
/// joined, the whole repeated up to 400 times (long runs without spaces stress the merges).
fn texts(pool: Arc<Vec<String>>) -> impl Strategy<Value = Vec<String>> {
    let piece = prop_oneof![
        4 => any::<usize>().prop_map(move |i| pool[i % pool.len()].clone()),
        1 => "[ -~\u{80}-\u{10FFFF}]{0,12}",
    ];
    let text = (
        prop::collection::vec(piece, 0..6),
        prop_oneof![8 => Just(1usize), 1 => 2..400usize],
    )
        .prop_map(|(pieces, times)| pieces.concat().repeat(times));
    prop::collection::vec(text, 1..4)
}

fn text_pool(extra: impl IntoIterator<Item = String>) -> Arc<Vec<String>> {
    let mut pool: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
    pool.extend(extra);
    pool.sort();
    pool.dedup();
    Arc::new(pool)
}

/// Byte ranges of `text` on character boundaries (as a rendered template's content ranges are).
fn some_ranges(text: &str, salt: usize) -> Vec<Range<usize>> {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let pick = |k: usize| bounds[k.wrapping_mul(2654435761).wrapping_add(salt) % bounds.len()];
    let (a, b) = (pick(1), pick(2));
    let (c, d) = (pick(3), pick(4));
    let mut r = vec![a.min(b)..a.max(b), c.min(d)..c.max(d)];
    r.sort_by_key(|r| r.start);
    if r[0].end > r[1].start {
        r.pop();
    }
    r
}

/// Uses a tokenizer built from fuzzed files the way the server does, checking what its
/// documentation promises: ids below the vocabulary size, streaming decode equal to `decode`.
fn exercise(tok: &Tokenizer, texts: &[String], ids: &[u32]) -> Result<(), String> {
    let n = tok.vocab_size();
    let stream = |ids: &[u32], special: bool| -> Result<(), String> {
        let mut dec = IncrementalDecoder::new(tok, special);
        let mut out = String::new();
        for &id in ids {
            out += &dec.push(id);
        }
        out += &dec.finish();
        let whole = tok.decode(ids, special);
        match out == whole {
            true => Ok(()),
            false => Err(format!(
                "streamed decode {out:?} != decode {whole:?} of {ids:?}"
            )),
        }
    };
    for (i, text) in texts.iter().enumerate() {
        for (add, parse) in [(false, false), (true, true), (false, true)] {
            let out = tok.encode(text, add, parse);
            if let Some(bad) = out.iter().find(|&&id| id as usize >= n) {
                return Err(format!(
                    "encode({text:?}, {add}, {parse}) gave id {bad} of a {n}-token vocabulary"
                ));
            }
            stream(&out, parse)?;
        }
        let ranges = some_ranges(text, i);
        let out = tok.encode_protected(text, true, &ranges);
        if let Some(bad) = out.iter().find(|&&id| id as usize >= n) {
            return Err(format!("encode_protected gave id {bad} of {n}"));
        }
        let _ = tok.find_control_text(text);
        let _ = tok.token_id(text);
    }
    stream(ids, false)?;
    stream(ids, true)?;
    for &id in ids {
        let _ = (
            tok.token_text(id),
            tok.token_bytes(id, true),
            tok.is_eog(id),
        );
    }
    // The model's own template, over a short conversation.
    if let Ok(Some(t)) = ChatTemplate::for_tokenizer(tok) {
        let text = texts.first().cloned().unwrap_or_default();
        let msgs = [
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", text),
        ];
        if let Ok(p) = t.prompt_tokens(tok, &msgs) {
            harness::note("prompted");
            if let Some(bad) = p.iter().find(|&&id| id as usize >= n) {
                return Err(format!("prompt_tokens gave id {bad} of {n}"));
            }
        }
    }
    Ok(())
}

/// Ids: valid ones, the vocabulary's edges and ids outside it.
fn ids() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(
        prop_oneof![4 => 0..300u32, 1 => any::<u32>(), 1 => Just(u32::MAX)],
        0..24,
    )
}

/// Texts and ids to use a tokenizer with, as a file of the input.
fn usage_file(texts: &[String], ids: &[u32]) -> (String, Vec<u8>) {
    let v = json!({"texts": texts, "ids": ids});
    (
        "usage.json".into(),
        serde_json::to_vec_pretty(&v).unwrap_or_default(),
    )
}

fn read_usage(files: &Files) -> (Vec<String>, Vec<u32>) {
    let v: Value = files
        .iter()
        .find(|(n, _)| n == "usage.json")
        .and_then(|(_, b)| serde_json::from_slice(b).ok())
        .unwrap_or_else(|| json!({"texts": TEXTS, "ids": [0, 1, 2, 3, 100000]}));
    let texts = v["texts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(String::from))
        .collect();
    let ids = v["ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_u64().map(|x| x as u32))
        .collect();
    (texts, ids)
}

// ---------------------------------------------------------------------------------------------
// Tokenizers from GGUF metadata

/// A tokenizer input: metadata and how to use the tokenizer built from it.
struct GgufTok {
    meta: Metadata,
    texts: Vec<String>,
    ids: Vec<u32>,
}

fn metadata_file(meta: &Metadata) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in &meta.entries {
        w.meta(k, v.clone());
    }
    // Mixed arrays cannot be written; they are then left out of the dump.
    w.to_bytes().unwrap_or_default()
}

fn check_gguf_tokenizer(input: &GgufTok) -> Result<(), String> {
    match Tokenizer::from_gguf_metadata(&input.meta) {
        Ok(tok) => {
            harness::note("built");
            exercise(&tok, &input.texts, &input.ids)
        }
        Err(_) => Ok(()),
    }
}

#[derive(Clone, Debug)]
struct GgufTokPlan {
    seed: usize,
    meta: Vec<MetaOp>,
    texts: Vec<String>,
    ids: Vec<u32>,
}

#[test]
fn fuzz_tokenizer_gguf() {
    // Seeds: the tokenizers of the GGUF corpus, and metadata-only files of past failures.
    let scratch = Scratch::new("tokenizer_gguf");
    let mut corpus = harness::corpus("gguf");
    corpus.extend(harness::corpus("tokenizer_gguf"));
    let mut seeds: Vec<(Metadata, Files)> = Vec::new();
    for (name, files) in &corpus {
        let Some((_, bytes)) = files.iter().find(|(n, _)| n.ends_with(".gguf")) else {
            continue;
        };
        let dir = scratch.write(&vec![("t.gguf".into(), bytes.clone())]);
        let meta = read_gguf(&dir.join("t.gguf"))
            .unwrap_or_else(|e| panic!("seed {name}: {e}"))
            .metadata;
        if meta.get("tokenizer.ggml.tokens").is_some() {
            seeds.push((meta, files.clone()));
        }
    }
    let metas: Vec<Metadata> = seeds.iter().map(|s| s.0.clone()).collect();
    let keys = meta::key_pool(&metas);
    let values = meta::value_pool(&metas);
    let pool = text_pool(values.iter().filter_map(|v| match v {
        MetaValue::String(s) if s.len() < 64 => Some(s.clone()),
        _ => None,
    }));
    let replay: Vec<GgufTok> = seeds
        .iter()
        .map(|(meta, files)| {
            let (texts, ids) = read_usage(files);
            GgufTok {
                meta: meta.clone(),
                texts,
                ids,
            }
        })
        .collect();
    let plans = (
        0..metas.len(),
        prop::collection::vec(meta_op(), 0..=4),
        texts(pool),
        ids(),
    )
        .prop_map(|(seed, meta, texts, ids)| GgufTokPlan {
            seed,
            meta,
            texts,
            ids,
        });
    let target = Target {
        name: "tokenizer_gguf",
        build: Box::new(move |p: &GgufTokPlan| {
            let mut meta = metas[p.seed].clone();
            apply_meta(&mut meta, &p.meta, &keys, &values);
            GgufTok {
                meta,
                texts: p.texts.clone(),
                ids: p.ids.clone(),
            }
        }),
        files: Box::new(|t: &GgufTok| {
            vec![
                ("tokenizer.gguf".into(), metadata_file(&t.meta)),
                usage_file(&t.texts, &t.ids),
            ]
        }),
        check: Box::new(check_gguf_tokenizer),
    };
    harness::fuzz(&target, &replay, plans);
}

// ---------------------------------------------------------------------------------------------
// Tokenizers from tokenizer.json

#[derive(Clone, Debug)]
struct JsonTokPlan {
    seed: usize,
    tokenizer: JsonPlan,
    /// Edits of `tokenizer_config.json`; `None` leaves the file out.
    config: Option<JsonPlan>,
    texts: Vec<String>,
    ids: Vec<u32>,
}

struct JsonSeed {
    tokenizer: Value,
    config: Value,
}

#[test]
fn fuzz_tokenizer_json() {
    let scratch = Arc::new(Scratch::new("tokenizer_json"));
    let corpus = harness::corpus("tokenizer_json");
    let json_of = |files: &Files, name: &str| -> Value {
        files
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, b)| serde_json::from_slice(b).ok())
            .unwrap_or(Value::Null)
    };
    let seeds: Vec<JsonSeed> = corpus
        .iter()
        .map(|(_, files)| JsonSeed {
            tokenizer: json_of(files, "tokenizer.json"),
            config: json_of(files, "tokenizer_config.json"),
        })
        .filter(|s| s.tokenizer.is_object())
        .collect();
    let mut docs: Vec<Value> = seeds.iter().map(|s| s.tokenizer.clone()).collect();
    docs.extend(seeds.iter().map(|s| s.config.clone()));
    let pool = json_pool(&docs, 400);
    let texts_pool = text_pool(pool.iter().filter_map(|v| match v {
        Value::String(s) if s.len() < 64 => Some(s.clone()),
        _ => None,
    }));
    let n = seeds.len();
    let plans = (
        0..n,
        json_plan(5),
        prop::option::weighted(0.8, json_plan(3)),
        texts(texts_pool),
        ids(),
    )
        .prop_map(|(seed, tokenizer, config, texts, ids)| JsonTokPlan {
            seed,
            tokenizer,
            config,
            texts,
            ids,
        });
    let s = Arc::clone(&scratch);
    let target = Target {
        name: "tokenizer_json",
        build: Box::new(move |p: &JsonTokPlan| {
            let seed = &seeds[p.seed];
            let mut files = vec![(
                "tokenizer.json".to_string(),
                p.tokenizer.apply(&seed.tokenizer, &pool),
            )];
            if let Some(c) = &p.config {
                files.push(("tokenizer_config.json".into(), c.apply(&seed.config, &pool)));
            }
            files.push(usage_file(&p.texts, &p.ids));
            files
        }),
        files: Box::new(Files::clone),
        check: Box::new(move |files: &Files| {
            let dir = s.write(files);
            let (texts, ids) = read_usage(files);
            match Tokenizer::from_hf_dir(dir) {
                Ok(tok) => {
                    harness::note("built");
                    exercise(&tok, &texts, &ids)
                }
                Err(_) => Ok(()),
            }
        }),
    };
    let replay: Vec<Files> = corpus.into_iter().map(|(_, f)| f).collect();
    harness::fuzz(&target, &replay, plans);
}

// ---------------------------------------------------------------------------------------------
// Chat templates

/// A template split into its tags (`{% %}`, `{{ }}`, `{# #}`) and the text between them.
fn fragments(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while !rest.is_empty() {
        let open = ["{%", "{{", "{#"]
            .iter()
            .filter_map(|o| rest.find(o))
            .min()
            .unwrap_or(rest.len());
        if open > 0 {
            out.push(rest[..open].to_string());
            rest = &rest[open..];
            continue;
        }
        let close = match &rest[..2] {
            "{%" => "%}",
            "{{" => "}}",
            _ => "#}",
        };
        let end = rest[2..].find(close).map_or(rest.len(), |i| i + 4);
        out.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    out
}

/// Fragments that push the template engine: recursion, self-inclusion, big loops and strings,
/// deep expressions, Python methods, `tojson` options, slicing, exceptions, namespaces.
const STRESS: &[&str] = &[
    "{% for i in range(1000) %}{{ i }}{% endfor %}",
    "{% for m in messages %}{% for n in messages %}{{ n.content }}{% endfor %}{% endfor %}",
    "{{ 'ab' * 1000 }}",
    "{{ messages | tojson }}",
    "{{ messages | tojson(indent=2, sort_keys=true) }}",
    "{{ messages[0] | tojson(indent='\t') }}",
    "{{ messages | tojson(indent=100000) }}",
    "{{ {'a': [1, 2.5, none, true]} | tojson(ensure_ascii=false) }}",
    "{% macro r(n) %}{% if n > 0 %}{{ r(n - 1) }}{% endif %}{% endmacro %}{{ r(50) }}",
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "{% include 'chat' %}",
    "{% import 'chat' as c %}",
    "{% extends 'chat' %}",
    "{{ raise_exception('refused') }}",
    "{{ strftime_now('%Y-%m-%d %H:%M:%S %A %B %j %p %-d %e %%') }}",
    "{{ strftime_now('%') }}",
    "{% set ns = namespace(found=false, n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}",
    "{{ messages[-1]['content'][::-1] }}",
    "{{ messages[0].content[1:-1] }}",
    "{{ message['content'].split('\\n')[0].strip().lower().upper() }}",
    "{{ message.content.replace('a', 'b').startswith('x') }}",
    "{{ (((((((((((((((((((((((1))))))))))))))))))))))) }}",
    "{{ [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]] }}",
    "{{ message['content'] | trim | length }}",
    "{{ messages | map(attribute='role') | join(', ') }}",
    "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}",
    "{% if messages | length > 1 and messages[1].role == 'user' %}x{% elif true %}y{% else %}z{% endif %}",
    "{{ bos_token ~ eos_token }}",
    "{% generation %}x{% endgeneration %}",
    "{% raw %}{{ not parsed }}{% endraw %}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    "{{ message['content'] if message is defined else '' }}",
    "{{ loop.index0 ~ loop.revindex ~ loop.length ~ loop.first ~ loop.last }}",
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }}{% continue %}{% endfor %}",
    "{{ '%s-%d' % ('a', 3) }}",
    "{{ 10 ** 10 ** 10 }}",
    "{{ 1 / 0 }}",
    "{{ 9223372036854775807 + 1 }}",
    "{{ range(10) | batch(3) | list }}",
    "{{ messages | dictsort }}",
    "{{ message.content.center(1000) }}",
    "{{ 'x'.join(range(100) | map('string')) }}",
    "{{ \"\\u2581\\x00\\n\" }}",
    "{{",
    "{%",
    "{# unclosed",
    "}}",
    "%}",
    "{% endfor %}",
    "{% endif %}",
];

/// Words to swap into tags: names the templates read, operators, literals, filters.
const WORDS: &[&str] = &[
    "messages",
    "message",
    "m",
    "loop",
    "content",
    "role",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "tools",
    "none",
    "true",
    "false",
    "0",
    "-1",
    "1000000",
    "''",
    "'x'",
    "+",
    "~",
    "*",
    "**",
    "//",
    "%",
    "==",
    "!=",
    "in",
    "not",
    "and",
    "or",
    "is",
    "|",
    "(",
    ")",
    "[",
    "]",
    ":",
    ",",
    ".",
    "trim",
    "length",
    "tojson",
    "safe",
    "first",
    "last",
    "reverse",
    "items",
    "upper",
];

/// One edit of a template, at the level of its fragments (and of the words inside a tag).
#[derive(Clone, Debug)]
enum TemplateOp {
    /// Insert a fragment of any seed, or a stress fragment.
    Insert {
        at: usize,
        frag: usize,
    },
    Remove {
        at: usize,
    },
    Replace {
        at: usize,
        frag: usize,
    },
    /// Repeat `len` fragments in place (nests loops and conditions).
    Repeat {
        at: usize,
        len: usize,
    },
    /// Swap one word inside a fragment for another.
    Word {
        at: usize,
        word: usize,
        with: usize,
    },
    /// Keep the fragments up to `at` and continue with another seed's from `from` on.
    Splice {
        at: usize,
        seed: usize,
        from: usize,
    },
}

fn template_op() -> impl Strategy<Value = TemplateOp> {
    let u = any::<usize>;
    prop_oneof![
        4 => (u(), u()).prop_map(|(at, frag)| TemplateOp::Insert { at, frag }),
        2 => u().prop_map(|at| TemplateOp::Remove { at }),
        3 => (u(), u()).prop_map(|(at, frag)| TemplateOp::Replace { at, frag }),
        1 => (u(), 1..6usize).prop_map(|(at, len)| TemplateOp::Repeat { at, len }),
        3 => (u(), u(), u()).prop_map(|(at, word, with)| TemplateOp::Word { at, word, with }),
        1 => (u(), u(), u()).prop_map(|(at, seed, from)| TemplateOp::Splice { at, seed, from }),
    ]
}

/// The words of a tag: runs of word characters, and single other characters.
fn words(frag: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in frag.char_indices() {
        let word = c.is_alphanumeric() || c == '_' || c == '\'';
        match (word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(s..i);
                start = None;
            }
            _ => {}
        }
        if !word && !c.is_whitespace() {
            out.push(i..i + c.len_utf8());
        }
    }
    if let Some(s) = start {
        out.push(s..frag.len());
    }
    out
}

fn edit_template(
    seeds: &[Vec<String>],
    pool: &[String],
    seed: usize,
    ops: &[TemplateOp],
) -> String {
    let mut frags = seeds[seed].clone();
    let pick = |items: &[String], i: usize| items.get(i % items.len().max(1)).cloned();
    for op in ops {
        let n = frags.len();
        let at = |i: usize| i % (n + 1);
        match *op {
            TemplateOp::Insert { at: a, frag } => {
                if let Some(f) = pick(pool, frag) {
                    frags.insert(at(a), f);
                }
            }
            TemplateOp::Remove { at: a } if n > 0 => {
                frags.remove(a % n);
            }
            TemplateOp::Replace { at: a, frag } if n > 0 => {
                if let Some(f) = pick(pool, frag) {
                    frags[a % n] = f;
                }
            }
            TemplateOp::Repeat { at: a, len } if n > 0 => {
                let a = a % n;
                let chunk: Vec<String> = frags[a..(a + len).min(n)].to_vec();
                frags.splice(a..a, chunk);
            }
            TemplateOp::Word { at: a, word, with } if n > 0 => {
                let f = &mut frags[a % n];
                let ws = words(f);
                if let Some(r) = ws.get(word % ws.len().max(1)).cloned() {
                    f.replace_range(r, WORDS[with % WORDS.len()]);
                }
            }
            TemplateOp::Splice { at: a, seed, from } => {
                let other = &seeds[seed % seeds.len()];
                let from = from % (other.len() + 1);
                frags.truncate(at(a));
                frags.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    frags.concat()
}

/// A chat template input: the template, the model's BOS/EOS texts and a conversation.
#[derive(Clone, Debug)]
struct ChatInput {
    source: String,
    bos: String,
    eos: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
}

#[derive(Clone, Debug)]
struct ChatPlan {
    seed: usize,
    ops: Vec<TemplateOp>,
    bytes: Vec<ByteOp>,
    bos: usize,
    eos: usize,
    messages: Vec<(usize, String)>,
    add_generation_prompt: bool,
}

const ROLES: &[&str] = &[
    "system",
    "user",
    "assistant",
    "tool",
    "user",
    "assistant",
    "",
    "x\n",
];

fn chat_input_files(c: &ChatInput) -> Files {
    let rest = json!({
        "bos": c.bos, "eos": c.eos, "messages": c.messages,
        "add_generation_prompt": c.add_generation_prompt,
    });
    vec![
        ("template.jinja".into(), c.source.as_bytes().to_vec()),
        (
            "context.json".into(),
            serde_json::to_vec_pretty(&rest).unwrap_or_default(),
        ),
    ]
}

/// A corpus entry: a template file (with a default conversation), or a directory holding
/// `template.jinja` and `context.json`.
fn chat_input_of(files: &Files) -> ChatInput {
    let source = files
        .iter()
        .find(|(n, _)| n.ends_with(".jinja"))
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let ctx: Value = files
        .iter()
        .find(|(n, _)| n == "context.json")
        .and_then(|(_, b)| serde_json::from_slice(b).ok())
        .unwrap_or_else(|| {
            json!({"bos": "<s>", "eos": "</s>", "add_generation_prompt": true, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi <|im_end|> there"},
                {"role": "assistant", "content": " <think>x</think>Hello. "},
                {"role": "user", "content": "And?"}]})
        });
    ChatInput {
        source,
        bos: ctx["bos"].as_str().unwrap_or("").into(),
        eos: ctx["eos"].as_str().unwrap_or("").into(),
        messages: serde_json::from_value(ctx["messages"].clone()).unwrap_or_default(),
        add_generation_prompt: ctx["add_generation_prompt"].as_bool().unwrap_or(true),
    }
}

/// The tokenizer prompts are tokenised with: the BPE tokenizer of the GGUF corpus.
fn chat_tokenizer() -> Tokenizer {
    let scratch = Scratch::new("chat_tokenizer");
    let (_, files) = harness::corpus("gguf")
        .into_iter()
        .find(|(n, _)| n == "llama-bpe.gguf")
        .expect("tests/fuzz-corpus/gguf/llama-bpe.gguf");
    let dir = scratch.write(&files);
    let meta = read_gguf(&dir.join("llama-bpe.gguf"))
        .expect("seed")
        .metadata;
    Tokenizer::from_gguf_metadata(&meta).expect("seed tokenizer")
}

fn check_chat(tok: &Tokenizer, c: &ChatInput) -> Result<(), String> {
    let Ok(t) = ChatTemplate::new(&c.source, &c.bos, &c.eos) else {
        return Ok(());
    };
    harness::note("compiled");
    let Ok((text, located)) = t.render(&c.messages, c.add_generation_prompt) else {
        return Ok(());
    };
    harness::note("rendered");
    if located.is_some() {
        harness::note("located");
    }
    let mut end = 0;
    for r in located.iter().flatten() {
        if r.start < end || text.get(r.clone()).is_none() {
            return Err(format!(
                "content range {r:?} is out of order or not on character boundaries of a \
                 {}-byte render",
                text.len()
            ));
        }
        end = r.end;
    }
    if let Ok(ids) = t.prompt_tokens(tok, &c.messages) {
        harness::note("tokenized");
        let n = tok.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(format!("prompt_tokens gave id {bad} of {n}"));
        }
    }
    Ok(())
}

#[test]
fn fuzz_chat_template() {
    let corpus = harness::corpus("chat_template");
    let replay: Vec<ChatInput> = corpus.iter().map(|(_, f)| chat_input_of(f)).collect();
    let seeds: Vec<Vec<String>> = replay.iter().map(|c| fragments(&c.source)).collect();
    let mut pool: Vec<String> = seeds.iter().flatten().cloned().collect();
    pool.extend(STRESS.iter().map(|s| s.to_string()));
    pool.sort();
    pool.dedup();
    let texts = text_pool(pool.iter().filter(|f| f.len() < 40).cloned());
    let n = seeds.len();
    let content = {
        let t = Arc::clone(&texts);
        prop_oneof![
            4 => any::<usize>().prop_map(move |i| t[i % t.len()].clone()),
            1 => "[ -~\u{80}-\u{10FFFF}]{0,16}",
        ]
    };
    let plans = (
        (0..n, prop::collection::vec(template_op(), 0..6)),
        prop_oneof![6 => Just(Vec::new()), 1 => prop::collection::vec(byte_op(), 1..3)],
        (any::<usize>(), any::<usize>()),
        prop::collection::vec((any::<usize>(), content), 0..6),
        any::<bool>(),
    )
        .prop_map(
            |((seed, ops), bytes, (bos, eos), messages, add_generation_prompt)| ChatPlan {
                seed,
                ops,
                bytes,
                bos,
                eos,
                messages,
                add_generation_prompt,
            },
        );
    let tok = chat_tokenizer();
    let target = Target {
        name: "chat_template",
        build: Box::new(move |p: &ChatPlan| {
            let mut source = edit_template(&seeds, &pool, p.seed, &p.ops).into_bytes();
            apply_bytes(&mut source, &p.bytes);
            ChatInput {
                source: String::from_utf8_lossy(&source).into_owned(),
                bos: texts[p.bos % texts.len()].clone(),
                eos: texts[p.eos % texts.len()].clone(),
                messages: p
                    .messages
                    .iter()
                    .map(|(r, c)| ChatMessage::new(ROLES[r % ROLES.len()], c.clone()))
                    .collect(),
                add_generation_prompt: p.add_generation_prompt,
            }
        }),
        files: Box::new(chat_input_files),
        check: Box::new(move |c: &ChatInput| check_chat(&tok, c)),
    };
    harness::fuzz(&target, &replay, plans);
}

// ---------------------------------------------------------------------------------------------
// The seed corpus

/// GPT-2's byte → character map (printable bytes stand for themselves).
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap_or('?');
    }
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(next).unwrap_or('?');
            next += 1;
            printable.push(b);
        }
    }
    chars
}

fn added(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": special})
}

/// Writes the `tokenizer.json` seeds of `tests/fuzz-corpus/tokenizer_json/` (run with
/// `--ignored` after changing them; the files are committed).
#[test]
#[ignore = "writes the committed seed corpus"]
fn write_seed_corpus() {
    let root = harness::repo_root().join("tests/fuzz-corpus/tokenizer_json");
    let put = |name: &str, tokenizer: Value, config: Option<Value>| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).expect("corpus dir");
        let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("json");
        std::fs::write(d.join("tokenizer.json"), pretty(&tokenizer)).expect("write");
        if let Some(c) = config {
            std::fs::write(d.join("tokenizer_config.json"), pretty(&c)).expect("write");
        }
    };

    // Byte-level BPE (GPT-2 / Qwen style): a split regex, special added tokens, a template.
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for c in byte_chars() {
        let id = vocab.len();
        vocab.insert(c.to_string(), json!(id));
    }
    let merges = [
        "\u{0120} t",
        "h e",
        "\u{0120}t he",
        "l l",
        "he ll",
        "hell o",
        "o r",
    ];
    for m in merges {
        let id = vocab.len();
        vocab.insert(m.replace(' ', ""), json!(id));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": false});
    put(
        "bpe-byte-level",
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": specials.iter().enumerate().map(|(i, t)| added(i, t, true)).collect::<Vec<_>>(),
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                 "behavior": "Isolated", "invert": false},
                byte_level]},
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        }),
        Some(json!({
            "bos_token": null,
            "eos_token": {"content": "<|im_end|>", "special": true},
            "add_bos_token": false,
            "chat_template": [
                {"name": "default", "template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"},
                {"name": "tool_use", "template": "{{ tools | tojson }}"}
            ],
        })),
    );

    // SentencePiece as BPE with byte fallback (Llama 2 / Mistral style), BOS by the
    // post-processor.
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for b in 0..=255u8 {
        let id = vocab.len();
        vocab.insert(format!("<0x{b:02X}>"), json!(id));
    }
    let merges = ["\u{2581} a", "a b", "\u{2581}a b", "\u{2581} h", "h i"];
    for t in ["\u{2581}", "a", "b", "h", "i"]
        .into_iter()
        .map(String::from)
        .chain(merges.iter().map(|m| m.replace(' ', "")))
    {
        let id = vocab.len();
        vocab.insert(t, json!(id));
    }
    put(
        "spm-byte-fallback",
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(0, "<unk>", true), added(1, "<s>", true), added(2, "</s>", true)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        }),
        Some(json!({
            "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "__type": "AddedToken"},
            "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
        })),
    );

    // Unigram with a Metaspace pre-tokenizer (T5 / Gemma style).
    let pieces: Vec<Value> = [
        ("<unk>", 0.0),
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("\u{2581}", -2.0),
        ("\u{2581}a", -1.5),
        ("a", -3.0),
        ("b", -3.0),
        ("ab", -2.5),
        ("\u{2581}hello", -1.0),
        ("\u{2581}world", -1.0),
        (".", -2.0),
    ]
    .iter()
    .map(|(p, s)| json!([p, s]))
    .collect();
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}",
                           "prepend_scheme": "always", "split": true});
    put(
        "unigram-metaspace",
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(0, "<unk>", true), added(1, "<pad>", true), added(2, "</s>", true)],
            "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"},
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
            "pre_tokenizer": metaspace,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}},
            "decoder": metaspace,
            "model": {"type": "Unigram", "unk_id": 0, "vocab": pieces, "byte_fallback": false},
        }),
        None,
    );

    // WordPiece (BERT style) with padding and truncation set, added tokens of every flavour.
    let mut vocab = serde_json::Map::new();
    for t in [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "##ing", "a", "b",
        "##b", ",", ".", "!",
    ] {
        let id = vocab.len();
        vocab.insert(t.into(), json!(id));
    }
    put(
        "wordpiece-bert",
        json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0},
            "padding": {"strategy": {"Fixed": 4}, "direction": "Right", "pad_to_multiple_of": null,
                        "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
            "added_tokens": [
                added(0, "[PAD]", true), added(1, "[UNK]", true), added(2, "[CLS]", true),
                added(3, "[SEP]", true), added(4, "[MASK]", true),
                {"id": 15, "content": "<tool>", "single_word": true, "lstrip": true,
                 "rstrip": true, "normalized": true, "special": false}],
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                           "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab},
        }),
        Some(json!({"cls_token": "[CLS]", "sep_token": "[SEP]", "add_bos_token": true})),
    );
}
