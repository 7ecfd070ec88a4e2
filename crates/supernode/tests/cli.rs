//! The binary end to end: bad inputs give a one-line error and a non-zero exit; a tiny
//! synthetic model without a tokenizer runs from `--tokens`; JSON shapes are the contract's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use supernode_kernels::DType;
use supernode_models::gguf::GgufWriter;
use supernode_models::MetaValue;

fn supernode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_supernode"))
        .args(args)
        .env(
            "SUPERNODE_CACHE",
            std::env::temp_dir().join("supernode-cli-test-cache"),
        )
        .output()
        .expect("the binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("supernode-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Asserts a failed run with exactly one line on stderr containing every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

/// A tiny random llama-architecture GGUF (F32/F16/Q8_0 weights, no tokenizer).
fn tiny_llama(path: &Path, arch: &str) {
    tiny_llama_with(path, arch, &[]);
}

/// [`tiny_llama`] with the metadata `extra` set as well.
fn tiny_llama_with(path: &Path, arch: &str, extra: &[(&str, MetaValue)]) {
    let (h, heads, kv, ff, vocab, layers) = (32usize, 4usize, 2usize, 64usize, 50usize, 2usize);
    let hd = h / heads;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
            })
            .collect()
    };
    let f32s = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let q8 = |v: Vec<f32>| {
        let mut out = vec![0u8; DType::Q8_0.row_bytes(v.len()).unwrap()];
        supernode_kernels::quant::quantize_row(DType::Q8_0, &v, &mut out);
        out
    };
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String(arch.into()));
    for (k, v) in [
        ("block_count", layers),
        ("embedding_length", h),
        ("feed_forward_length", ff),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("context_length", 64),
    ] {
        w.meta(&format!("{arch}.{k}"), MetaValue::U32(v as u32));
    }
    w.meta(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(1e-5),
    );
    for (k, v) in extra {
        w.meta(k, v.clone());
    }
    w.tensor(
        "token_embd.weight",
        DType::Q8_0,
        &[h, vocab],
        q8(rnd(h * vocab)),
    );
    w.tensor("output_norm.weight", DType::F32, &[h], f32s(vec![1.0; h]));
    for i in 0..layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        w.tensor(&p("attn_norm.weight"), DType::F32, &[h], f32s(vec![1.0; h]));
        w.tensor(&p("ffn_norm.weight"), DType::F32, &[h], f32s(vec![1.0; h]));
        w.tensor(
            &p("attn_q.weight"),
            DType::F32,
            &[h, heads * hd],
            f32s(rnd(h * heads * hd)),
        );
        w.tensor(
            &p("attn_k.weight"),
            DType::F32,
            &[h, kv * hd],
            f32s(rnd(h * kv * hd)),
        );
        w.tensor(
            &p("attn_v.weight"),
            DType::F32,
            &[h, kv * hd],
            f32s(rnd(h * kv * hd)),
        );
        w.tensor(
            &p("attn_output.weight"),
            DType::Q8_0,
            &[heads * hd, h],
            q8(rnd(h * heads * hd)),
        );
        w.tensor(
            &p("ffn_gate.weight"),
            DType::Q8_0,
            &[h, ff],
            q8(rnd(h * ff)),
        );
        w.tensor(&p("ffn_up.weight"), DType::Q8_0, &[h, ff], q8(rnd(h * ff)));
        w.tensor(
            &p("ffn_down.weight"),
            DType::F32,
            &[ff, h],
            f32s(rnd(h * ff)),
        );
    }
    w.write(path).unwrap();
}

#[test]
fn tiny_model_runs_from_token_ids() {
    let path = tmp("tiny.gguf");
    tiny_llama(&path, "llama");
    let p = path.to_str().unwrap();
    let out = supernode(&[
        "run",
        "--model",
        p,
        "--tokens",
        "1,2,3",
        "-n",
        "5",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], serde_json::json!([1, 2, 3]));
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5);
    assert!(v["text"].is_null());

    let out = supernode(&["logits", "--model", p, "--tokens", "4,5", "--top", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].as_array().unwrap().len(), 3);
    let top: Vec<f64> = rows[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect();
    assert!(top[0] >= top[1] && top[1] >= top[2]);

    let out = supernode(&["logits", "--model", p, "--tokens", "4,5"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["logits"][1].as_array().unwrap().len(), 50);

    // Greedy generation is the argmax of the teacher-forced logits.
    let out = supernode(&[
        "run",
        "--model",
        p,
        "--tokens",
        "4,5",
        "-n",
        "1",
        "--temperature",
        "0",
        "--json",
    ]);
    let gen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let best = v["logits"][1]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
        .unwrap()
        .0;
    assert_eq!(gen["tokens"][0].as_u64().unwrap() as usize, best);

    // Seeded sampling is reproducible; another seed samples another sequence.
    let sample = |seed: &str| {
        let out = supernode(&[
            "run",
            "--model",
            p,
            "--tokens",
            "1,2",
            "-n",
            "24",
            "--temperature",
            "1.5",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--seed",
            seed,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(sample("7"), sample("7"));
    assert_ne!(sample("7"), sample("8"));

    // Without tokenizer files, text prompts are refused with what to do instead.
    let out = supernode(&["run", "--model", p, "--prompt", "hello"]);
    assert_one_line_error(&out, &["--tokens"]);
    // Bad requests on a good model.
    let out = supernode(&["run", "--model", p, "--tokens", "1,999"]);
    assert_one_line_error(&out, &["999", "vocabulary"]);
    let long: Vec<String> = (0..80).map(|i| (i % 50).to_string()).collect();
    let out = supernode(&["run", "--model", p, "--tokens", &long.join(",")]);
    assert_one_line_error(&out, &["80 tokens", "64"]);
    let out = supernode(&["run", "--model", p, "--tokens", "1", "--top-p", "1.5"]);
    assert_one_line_error(&out, &["top_p"]);
}

/// A crafted file whose rope has no dimensions used to load and then panic in every forward
/// pass; out-of-range metadata is a one-line load error naming the key.
#[test]
fn out_of_range_metadata_is_named_at_load() {
    for (name, key, v) in [
        (
            "rope0.gguf",
            "llama.rope.dimension_count",
            MetaValue::U32(0),
        ),
        (
            "eps.gguf",
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(f32::NAN),
        ),
    ] {
        let path = tmp(name);
        tiny_llama_with(&path, "llama", &[(key, v)]);
        let p = path.to_str().unwrap();
        let out = supernode(&["run", "--model", p, "--tokens", "1"]);
        assert_one_line_error(&out, &[&format!("`{key}`"), p]);
    }
}

#[test]
fn unknown_architecture_is_named() {
    let path = tmp("mamba.gguf");
    tiny_llama(&path, "mamba");
    let out = supernode(&["run", "--model", path.to_str().unwrap(), "--tokens", "1"]);
    assert_one_line_error(&out, &["mamba", "supported", "llama"]);
}

#[test]
fn unsupported_quant_type_is_named() {
    let path = tmp("iq2.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()));
    w.raw_tensor("blk.0.ffn_up.weight", 16, vec![256, 1], vec![0; 66]);
    w.write(&path).unwrap();
    let out = supernode(&["run", "--model", path.to_str().unwrap(), "--tokens", "1"]);
    assert_one_line_error(&out, &["IQ2_XXS", "blk.0.ffn_up.weight"]);
}

#[test]
fn corrupt_files_fail_cleanly() {
    let real = std::fs::read(common::model_path("smollm2-135m")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("empty.gguf", Vec::new(), &["empty"]),
        (
            "text.gguf",
            b"This is a text file, not a model.\n".repeat(40),
            &["GGUF"],
        ),
        (
            "badmagic.gguf",
            [b"GGUX".as_slice(), &real[4..4096]].concat(),
            &["GGUF"],
        ),
        ("header-cut.gguf", real[..2000].to_vec(), &["truncated"]),
        (
            "data-cut.gguf",
            real[..real.len() / 2].to_vec(),
            &["past the end"],
        ),
    ];
    for (name, bytes, needles) in cases {
        let path = tmp(name);
        std::fs::write(&path, bytes).unwrap();
        let p = path.to_str().unwrap();
        let mut want = needles.to_vec();
        want.push(p);
        assert_one_line_error(&supernode(&["run", "--model", p, "--tokens", "1"]), &want);
        assert_one_line_error(
            &supernode(&["tokenize", "--model", p, "--text", "hi"]),
            &want,
        );
    }
    assert_one_line_error(
        &supernode(&["run", "--model", "/no/such/model.gguf", "--tokens", "1"]),
        &["known model name"],
    );
    assert_one_line_error(
        &supernode(&["fetch", "gpt-5"]),
        &["unknown model", "smollm2-135m"],
    );
}

/// `tokenize` prints llama.cpp's ids, for both real models (Gemma 3's architecture is not
/// needed to tokenize).
#[test]
fn tokenize_prints_llama_cpp_ids() {
    for name in ["smollm2-135m", "gemma3-270m"] {
        let reference = common::read_json(&common::fixture(&format!("{name}.llamacpp.json")));
        let model = common::model_path(name);
        for case in reference["cases"].as_array().unwrap() {
            if case["parse_special"].as_bool() == Some(true) {
                continue;
            }
            let text = case["text"].as_str().unwrap();
            let out = supernode(&[
                "tokenize",
                "--model",
                model.to_str().unwrap(),
                "--text",
                text,
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(got, common::ids(&case["ids"]), "{name}/{}", case["name"]);
        }
    }
}

/// `run --stop` ends the text just before the first occurrence of a stop string, as the
/// server's `stop` does, and `run` goes through the same engine: the tokens are a prefix of the
/// unstopped run's.
#[test]
fn run_stops_before_a_stop_string() {
    let model = common::model_path("smollm2-135m");
    let base = [
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The history of the printing press begins",
        "-n",
        "40",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--threads",
        "2",
    ];
    let parse = |out: Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let full = parse(supernode(&base));
    let text = full["text"].as_str().unwrap().to_string();
    // A five-byte window from the second half of the text that first occurs where it is taken.
    let at = (text.len() / 2..text.len() - 5)
        .find(|&k| {
            text.is_char_boundary(k)
                && text.is_char_boundary(k + 5)
                && !text[k..k + 5].trim().is_empty()
                && text.find(&text[k..k + 5]) == Some(k)
        })
        .expect("a stop window in the greedy text");
    let stop = text[at..at + 5].to_string();
    let mut args = base.to_vec();
    args.extend(["--stop", &stop]);
    let stopped = parse(supernode(&args));
    assert_eq!(
        stopped["text"].as_str().unwrap(),
        &text[..at],
        "stop {stop:?}"
    );
    let (all, some) = (
        common::ids(&full["tokens"]),
        common::ids(&stopped["tokens"]),
    );
    assert!(some.len() < all.len());
    assert_eq!(some[..], all[..some.len()]);
}

/// Bad limits of `serve` are one-line errors naming the option, before anything is allocated:
/// a KV cache larger than the machine (it used to abort on the failed allocation, or to be
/// killed later when the pages filled), and a zero where at least 1 is needed.
#[test]
fn serve_refuses_bad_limits_with_one_line() {
    let path = tmp("tiny-limits.gguf");
    tiny_llama(&path, "llama");
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--kv-cache-mib", "1000000000"],
            &["--kv-cache-mib 1000000000", "memory"],
        ),
        (&["--max-tokens", "0"], &["--max-tokens must be at least 1"]),
        (&["-n", "0"], &["--max-tokens must be at least 1"]),
        (
            &["--max-connections", "0"],
            &["--max-connections must be at least 1"],
        ),
        (
            &["--header-timeout", "0"],
            &["--header-timeout must be at least 1"],
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["serve", "--model", path.to_str().unwrap(), "--port", "0"];
        args.extend_from_slice(extra);
        assert_one_line_error(&supernode(&args), want);
    }
}

/// `serve --chat-template`: a file that cannot be read, a template that does not compile, and
/// a model without a tokenizer are one-line errors naming the option.
#[test]
fn serve_refuses_a_bad_chat_template_with_one_line() {
    let tiny = tmp("tiny-template.gguf");
    tiny_llama(&tiny, "llama");
    let bad = tmp("bad-template.jinja");
    std::fs::write(&bad, "{% if messages %}unclosed").unwrap();
    let good = tmp("good-template.jinja");
    std::fs::write(&good, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    let real = common::model_path("smollm2-135m");
    let serve = |model: &Path, template: &str| {
        supernode(&[
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--chat-template",
            template,
        ])
    };
    assert_one_line_error(
        &serve(&real, "/nonexistent/template.jinja"),
        &["cannot read --chat-template /nonexistent/template.jinja"],
    );
    assert_one_line_error(
        &serve(&real, bad.to_str().unwrap()),
        &[&format!("--chat-template {}", bad.display()), "template"],
    );
    assert_one_line_error(
        &serve(&tiny, good.to_str().unwrap()),
        &["--chat-template needs a model with a tokenizer"],
    );
}

/// `--speculative draft` and `--draft-model` go together, and a draft model that cannot serve
/// (not found, not a model, a recurrent state, another vocabulary) is a one-line error naming
/// it, for `run`, `serve` and `bench`.
#[test]
fn bad_draft_models_are_named() {
    let path = tmp("tiny-target.gguf");
    tiny_llama(&path, "llama");
    let p = path.to_str().unwrap();
    let junk = tmp("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    let fixtures = common::fixture("hf");
    let hybrid = fixtures.join("qwen3_5");
    let vocab256 = fixtures.join("llama");
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["--speculative", "draft"],
            vec!["--speculative draft needs --draft-model".into()],
        ),
        (
            vec!["--draft-model", p],
            vec!["--draft-model needs --speculative draft".into()],
        ),
        (
            vec!["--speculative", "ngram", "--draft-model", p],
            vec!["--draft-model needs --speculative draft".into()],
        ),
        (
            vec![
                "--speculative",
                "draft",
                "--draft-model",
                "/nonexistent/draft.gguf",
            ],
            vec!["--draft-model: `/nonexistent/draft.gguf`".into()],
        ),
        (
            vec![
                "--speculative",
                "draft",
                "--draft-model",
                junk.to_str().unwrap(),
            ],
            vec![format!("the draft model {} failed to load", junk.display())],
        ),
        (
            vec![
                "--speculative",
                "draft",
                "--draft-model",
                hybrid.to_str().unwrap(),
            ],
            vec![
                format!("the draft model {}", hybrid.display()),
                "linear attention".into(),
            ],
        ),
        (
            vec![
                "--speculative",
                "draft",
                "--draft-model",
                vocab256.to_str().unwrap(),
            ],
            vec!["has a vocabulary of 256 tokens and the target one of 50".into()],
        ),
        (
            vec!["--speculative", "mtp"],
            vec!["multi-token prediction (--speculative mtp) is supported for Qwen3.5".into()],
        ),
        (
            vec!["--speculative", "mtp", "--prompt-lookup-max", "4"],
            vec!["--prompt-lookup-min and --prompt-lookup-max need --speculative ngram".into()],
        ),
        (
            vec!["--prompt-lookup-min", "2"],
            vec!["--prompt-lookup-min and --prompt-lookup-max need --speculative ngram".into()],
        ),
    ];
    for (args, needles) in &cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let mut run = vec!["run", "--model", p, "--tokens", "1,2", "-n", "2"];
        run.extend(args);
        assert_one_line_error(&supernode(&run), &needles);
        let mut serve = vec!["serve", "--model", p, "--port", "0"];
        serve.extend(args);
        assert_one_line_error(&supernode(&serve), &needles);
        let mut bench = vec!["bench", "--model", p, "--prompt-tokens", "4"];
        bench.extend(args);
        assert_one_line_error(&supernode(&bench), &needles);
    }
}

/// `run --speculative draft` with the model as its own draft: the greedy tokens of a run
/// without speculation, and every draft accepted (the same model computes the same logits).
#[test]
fn run_with_a_draft_model_gives_the_same_tokens() {
    let model = common::model_path("smollm2-135m");
    let m = model.to_str().unwrap();
    let base = [
        "run",
        "--model",
        m,
        "--prompt",
        "The history of the printing press begins",
        "-n",
        "32",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--threads",
        "2",
    ];
    let parse = |out: Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let plain = parse(supernode(&base));
    let mut args = base.to_vec();
    args.extend(["--speculative", "draft", "--draft-model", m]);
    let spec = parse(supernode(&args));
    assert_eq!(plain["tokens"], spec["tokens"]);
    assert_eq!(plain["text"], spec["text"]);
    let drafted = spec["speculative"]["draft_tokens"].as_u64().unwrap();
    let accepted = spec["speculative"]["accepted_tokens"].as_u64().unwrap();
    assert!(drafted > 0);
    assert_eq!(accepted, drafted, "drafting for itself");
}

/// `run --speculative mtp` on the Qwen3.5 and DeepSeek-V3 fixtures with a multi-token-prediction
/// layer: the greedy tokens of a run without speculation, with drafts made; the fixtures without
/// the layer are refused with one line.
#[test]
fn run_with_the_models_mtp_layer_gives_the_same_tokens() {
    for (with, without) in [
        ("qwen3_5_mtp", "qwen3_5"),
        ("deepseek_v3_mtp", "deepseek_v3"),
    ] {
        run_with_mtp(with, without);
    }
}

fn run_with_mtp(with: &str, without: &str) {
    let fixtures = common::fixture("hf");
    let with = fixtures.join(with);
    let without = fixtures.join(without);
    let run = |model: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "5,9,17,5,9,17,5,9",
            "-n",
            "24",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ];
        args.extend(extra);
        supernode(&args)
    };
    let parse = |out: Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let plain = parse(run(&with, &[]));
    let spec = parse(run(&with, &["--speculative", "mtp"]));
    assert_eq!(plain["tokens"], spec["tokens"]);
    assert!(spec["speculative"]["draft_tokens"].as_u64().unwrap() > 0);
    assert_one_line_error(
        &run(&without, &["--speculative", "mtp"]),
        &["no multi-token-prediction layer"],
    );
}

/// `logits` at every kernel level this machine has (`SUPERNODE_ISA`), in the default
/// quantised precision, on the real models: the same bits at each, so a machine without AVX-512
/// VNNI (or without AVX-512, or x86 SIMD at all) serves exactly what one with it does. Levels
/// above the machine's are refused with one line, and `bench` reports the level it ran. The
/// tokens open the `chinese` case of the
/// llama.cpp fixtures, whose worst position moved by 2 logits when the machines differed.
#[test]
fn quantized_logits_are_the_same_bits_at_every_kernel_level() {
    let fixture = common::read_json(&common::fixture("smollm2-135m.llamacpp.json"));
    let case = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "chinese")
        .expect("the chinese case");
    let tokens: Vec<String> = common::ids(&case["ids"])
        .iter()
        .take(24)
        .map(u32::to_string)
        .collect();
    let tokens = tokens.join(",");
    for name in ["smollm2-135m", "gemma3-270m"] {
        let model = common::model_path(name);
        let mut outputs: Vec<(&str, Vec<u8>)> = Vec::new();
        for level in ["avx512-vnni", "avx512", "avx2", "scalar"] {
            let out = Command::new(env!("CARGO_BIN_EXE_supernode"))
                .args([
                    "logits",
                    "--model",
                    model.to_str().unwrap(),
                    "--tokens",
                    &tokens,
                ])
                .env("SUPERNODE_ISA", level)
                .output()
                .expect("the binary runs");
            if !out.status.success() {
                assert_one_line_error(&out, &["SUPERNODE_ISA", "best kernel level"]);
                continue;
            }
            assert!(out.stdout.len() > 1000, "{name} {level}: logits printed");
            outputs.push((level, out.stdout));
        }
        assert!(
            outputs.iter().any(|(l, _)| *l == "scalar"),
            "every machine has the scalar level"
        );
        let (first, want) = &outputs[0];
        for (level, got) in &outputs[1..] {
            assert!(
                got == want,
                "{name}: quantized logits at {level} differ from those at {first}"
            );
        }
    }
    // `bench` says which level it ran.
    let model = common::model_path("smollm2-135m");
    let out = Command::new(env!("CARGO_BIN_EXE_supernode"))
        .args(["bench", "--model", model.to_str().unwrap()])
        .args(["--prompt-tokens", "4", "--gen-tokens", "2", "--reps", "1"])
        .env("SUPERNODE_ISA", "scalar")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench prints JSON");
    assert_eq!(report["kernels"], "scalar");
    let out = Command::new(env!("CARGO_BIN_EXE_supernode"))
        .args(["logits", "--model", "no-such-model", "--tokens", "1"])
        .env("SUPERNODE_ISA", "sse4")
        .output()
        .expect("the binary runs");
    assert_one_line_error(&out, &["SUPERNODE_ISA=sse4", "avx512-vnni"]);
}
