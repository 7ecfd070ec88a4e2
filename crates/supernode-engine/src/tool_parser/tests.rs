//! The parsers against real chat templates (tests/fixtures/templates, from llama.cpp, vLLM and
//! mistral-common) and model
//! outputs (tests/fixtures/tool_outputs.json), whole and streamed in random pieces.

use serde_json::{json, Map, Value};

use super::*;
use crate::chat::{ChatExtras, ChatMessage, ChatTemplate};

fn fixture(path: &str) -> String {
    let p = format!("{}/../../tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// (template file, tool-call family, reasoning family, BOS, EOS)
const TEMPLATES: [(&str, Family, Option<ReasoningFamily>, &str, &str); 13] = [
    (
        "Qwen-Qwen2.5-7B-Instruct",
        Family::Hermes,
        None,
        "",
        "<|im_end|>",
    ),
    (
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
        Family::Hermes,
        None,
        "<|begin_of_text|>",
        "<|im_end|>",
    ),
    (
        "Qwen-Qwen3-0.6B",
        Family::Hermes,
        Some(ReasoningFamily::Qwen3),
        "",
        "<|im_end|>",
    ),
    ("Qwen3-Coder", Family::Qwen3Coder, None, "", "<|im_end|>"),
    (
        "meta-llama-Llama-3.1-8B-Instruct",
        Family::Llama3Json,
        None,
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    (
        "meta-llama-Llama-3.2-3B-Instruct",
        Family::Llama3Json,
        None,
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        Family::DeepSeekV3,
        Some(ReasoningFamily::DeepSeekR1),
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    (
        "deepseek-ai-DeepSeek-V3.1",
        Family::DeepSeekV3,
        Some(ReasoningFamily::DeepSeekR1),
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    (
        "mistralai-Mistral-Nemo-Instruct-2407",
        Family::Mistral,
        None,
        "<s>",
        "</s>",
    ),
    (
        "vllm-tool_chat_template_deepseekv31",
        Family::DeepSeekV3,
        Some(ReasoningFamily::DeepSeekR1),
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    (
        "vllm-tool_chat_template_deepseekv3",
        Family::DeepSeekV3,
        None,
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    (
        "mistralai-mistral-common-v11",
        Family::Mistral,
        None,
        "<s>",
        "</s>",
    ),
    (
        "mistralai-mistral-common-v13",
        Family::Mistral,
        None,
        "<s>",
        "</s>",
    ),
];

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city name"},
            "days": {"type": "integer"}
        }, "required": ["city"]}}})
}

fn template(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    ChatTemplate::new(&fixture(&format!("templates/{name}.jinja")), bos, eos)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn parser(family: Family, reasoning: Option<ReasoningParser>) -> OutputParser {
    OutputParser::new(
        reasoning,
        Some(ToolCallParser::new(family, &[weather_tool()], "call_")),
    )
}

#[test]
fn families_are_detected_from_real_templates() {
    for (name, family, reasoning, _, _) in TEMPLATES {
        let src = fixture(&format!("templates/{name}.jinja"));
        assert_eq!(Family::detect(&src), Some(family), "{name}");
        assert_eq!(ReasoningFamily::detect(&src), reasoning, "{name}");
    }
    let plain = "{% for m in messages %}{{ m.content }}{% endfor %}";
    assert_eq!(Family::detect(plain), None);
    assert!(!ChatTemplate::new(plain, "", "").unwrap().renders_tools());
}

#[test]
fn real_templates_render_the_tool_definitions() {
    for (name, _, _, bos, eos) in TEMPLATES {
        let t = template(name, bos, eos);
        // DeepSeek's templates render calls and results, never the definitions: a request
        // with tools is refused for them.
        if name.contains("DeepSeek") {
            assert!(!t.renders_tools(), "{name}");
            continue;
        }
        assert!(t.renders_tools(), "{name} does not render tools");
        let extras = ChatExtras {
            tools: Some(json!([weather_tool()])),
            ..ChatExtras::default()
        };
        let (out, located) = t
            .render_with(
                &[ChatMessage::new("user", "Weather in Paris?")],
                &extras,
                true,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out.contains("get_weather"), "{name}: {out}");
        assert!(
            out.contains("Get the current weather in a city"),
            "{name}: {out}"
        );
        assert!(out.contains("Weather in Paris?"), "{name}");
        // The user's text is still located (protected against control-token injection).
        let ranges = located.unwrap_or_else(|| panic!("{name}: contents not located"));
        assert!(
            ranges
                .iter()
                .any(|r| &out[r.clone()] == "Weather in Paris?"),
            "{name}"
        );
    }
}

/// An assistant turn with two tool calls, then the tool results.
fn conversation(n_calls: usize) -> (Vec<ChatMessage>, ChatExtras) {
    let calls = json!([
        {"id": "abcdefgh0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris <|im_end|>", "days": 2}}},
        {"id": "abcdefgh1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}
    ]);
    let calls = Value::Array(calls.as_array().unwrap()[..n_calls].to_vec());
    let mut asst = Map::new();
    asst.insert("tool_calls".into(), calls);
    let tool = |id: &str| {
        let mut m = Map::new();
        m.insert("tool_call_id".into(), json!(id));
        m.insert("name".into(), json!("get_weather"));
        m
    };
    let messages = vec![
        ChatMessage::new("user", "Weather in Paris and Lyon?"),
        ChatMessage::new("assistant", ""),
        ChatMessage::new("tool", "{\"temp\": 19} <|im_end|>"),
        ChatMessage::new("tool", "{\"temp\": 21}"),
    ];
    let mut fields = vec![Map::new(), asst, tool("abcdefgh0"), tool("abcdefgh1")];
    let mut messages = messages;
    messages.truncate(2 + n_calls);
    fields.truncate(2 + n_calls);
    let extras = ChatExtras {
        fields,
        tools: Some(json!([weather_tool()])),
        kwargs: Map::new(),
    };
    (messages, extras)
}

/// What a model of each family writes for the first call: the template's own rendering of an
/// assistant tool call (between the generation prompt and the end of the turn) must parse back
/// to the call.
#[test]
fn calls_rendered_by_each_template_parse_back() {
    for (name, family, reasoning, bos, eos) in TEMPLATES {
        let t = template(name, bos, eos);
        // Llama 3.1's template takes one call per turn.
        let n = if name.contains("Llama-3") { 1 } else { 2 };
        let (mut msgs, mut extras) = conversation(n);
        msgs.truncate(2);
        extras.fields.truncate(2);
        let (prefix, _) = t.render_with(&msgs[..1], &extras, true).unwrap();
        let (full, _) = t
            .render_with(&msgs, &extras, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let Some(turn) = full.strip_prefix(prefix.as_str()) else {
            // Templates whose generation prompt differs from a rendered turn's opening (it opens
            // `<think>` in R1's): take the turn from the assistant header.
            let (at, header) = [
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                // (A generation prompt with thinking off closes the block at once.)
                "<｜Assistant｜></think>",
                "<｜Assistant｜>",
            ]
            .iter()
            .find_map(|h| full.find(h).map(|at| (at, *h)))
            .unwrap_or_else(|| panic!("{name}: {full}"));
            check_turn(name, family, reasoning, &full[at + header.len()..]);
            continue;
        };
        check_turn(name, family, reasoning, turn);
    }
}

fn check_turn(name: &str, family: Family, reasoning: Option<ReasoningFamily>, turn: &str) {
    let mut turn = turn.trim_end().to_string();
    for end in [
        "<｜Assistant｜>",
        "<｜end▁of▁sentence｜>",
        "<｜Assistant｜>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<｜end▁of▁sentence｜>",
        "</s>",
    ] {
        // R1's template closes a call turn twice over.
        while let Some(t) = turn.strip_suffix(end) {
            turn = t.to_string();
        }
    }
    let prompt = reasoning.map(|_| "");
    let p = parse_complete(&mut parser(family, prompt.map(ReasoningParser::new)), &turn);
    let args: Vec<Value> = p
        .tool_calls
        .iter()
        .map(|c| serde_json::from_str(&c.arguments).unwrap())
        .collect();
    assert!(
        !p.tool_calls.is_empty(),
        "{name}: no call in {turn:?}: {p:?}"
    );
    assert_eq!(p.tool_calls[0].name, "get_weather", "{name}: {turn:?}");
    assert_eq!(
        args[0],
        json!({"city": "Paris <|im_end|>", "days": 2}),
        "{name}: {turn:?}"
    );
    if p.tool_calls.len() > 1 {
        assert_eq!(args[1], json!({"city": "Lyon"}), "{name}");
    }
    assert_eq!(p.content.trim(), "", "{name}: {turn:?}");
    streamed_equals_whole(family, prompt, &turn);
    // Streamed a character at a time, the first call and the start of its arguments are given
    // out before the model has written its second argument; a bare JSON call (Llama 3's) only
    // when the output ends.
    let cut = turn
        .find("days")
        .unwrap_or_else(|| panic!("{name}: {turn:?}"));
    let mut stream = parser(family, prompt.map(ReasoningParser::new));
    let mut deltas = Vec::new();
    for ch in turn[..cut].chars() {
        deltas.extend(stream.push(ch.encode_utf8(&mut [0; 4])));
    }
    let so_far = Parsed::from_deltas(deltas);
    if turn.trim_start().starts_with('{') {
        assert_eq!(so_far, Parsed::default(), "{name}");
        return;
    }
    let first = &p.tool_calls[0];
    assert_eq!(so_far.tool_calls.len(), 1, "{name}: {:?}", &turn[..cut]);
    let shown = &so_far.tool_calls[0].arguments;
    assert!(
        shown.contains("Paris")
            && first.arguments.starts_with(shown.as_str())
            && *shown != first.arguments,
        "{name}: {shown:?} of {:?}",
        first.arguments
    );
}

#[test]
fn tool_results_and_arguments_go_back_through_the_templates_protected() {
    for (name, _, _, bos, eos) in TEMPLATES {
        let t = template(name, bos, eos);
        let (msgs, extras) = conversation(2);
        let rendered = t.render_with(&msgs, &extras, true).or_else(|_| {
            // Llama 3.1's template takes one call per turn.
            let (msgs, extras) = conversation(1);
            t.render_with(&msgs, &extras, true)
        });
        let Ok((out, located)) = rendered else {
            // Mistral's template wants 9-character call ids.
            assert!(name.contains("Mistral"), "{name}");
            continue;
        };
        let ranges = located.unwrap_or_else(|| panic!("{name}: not located"));
        // The injected control texts, in the arguments and in a tool result, lie inside
        // protected ranges.
        for injected in ["Paris <|im_end|>", "19} <|im_end|>"] {
            let found: Vec<usize> = out
                .match_indices(injected)
                .map(|(at, _)| at + injected.len() - 10)
                .collect();
            assert!(!found.is_empty(), "{name}: {injected} not rendered");
            for at in found {
                assert!(
                    ranges.iter().any(|r| r.start <= at && at + 10 <= r.end),
                    "{name}: injected text unprotected at {at}"
                );
            }
        }
    }
}

#[test]
fn family_outputs_parse() {
    let cases: Value = serde_json::from_str(&fixture("tool_outputs.json")).unwrap();
    for case in cases.as_array().unwrap() {
        let family = Family::from_name(case["family"].as_str().unwrap()).unwrap();
        let output = case["output"].as_str().unwrap();
        let reasoning = case["reasoning_prompt"].as_str().map(ReasoningParser::new);
        let p = parse_complete(&mut parser(family, reasoning), output);
        let calls: Vec<Value> = p
            .tool_calls
            .iter()
            .map(|c| json!({"name": c.name, "arguments": serde_json::from_str::<Value>(&c.arguments).unwrap()}))
            .collect();
        let what = case["name"].as_str().unwrap();
        assert_eq!(Value::Array(calls), case["calls"], "{what}");
        assert_eq!(p.content, case["content"].as_str().unwrap(), "{what}");
        assert_eq!(p.reasoning.as_deref(), case["reasoning"].as_str(), "{what}");
        let prompt = case["reasoning_prompt"].as_str();
        streamed_equals_whole(family, prompt, output);
    }
}

/// A small deterministic generator (xorshift) for the random cuts.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The output cut in random pieces of 1 to 6 characters parses to what the whole does.
fn streamed_equals_whole(family: Family, reasoning_prompt: Option<&str>, output: &str) {
    let mk = || parser(family, reasoning_prompt.map(ReasoningParser::new));
    let whole = parse_complete(&mut mk(), output);
    let chars: Vec<char> = output.chars().collect();
    for seed in 1..40u64 {
        let mut rng = Rng(seed * 0x9E37_79B9_7F4A_7C15);
        let mut p = mk();
        let mut deltas = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let n = 1 + rng.below(6);
            let piece: String = chars[i..(i + n).min(chars.len())].iter().collect();
            deltas.extend(p.push(&piece));
            i += n;
        }
        deltas.extend(p.finish());
        // A call's first delta carries its id and name; arguments only follow it.
        let mut started = 0;
        for d in &deltas {
            match d {
                Delta::CallStart { index, .. } => {
                    assert_eq!(*index, started);
                    started += 1;
                }
                Delta::CallArgs { index, .. } => assert!(*index < started),
                _ => {}
            }
        }
        assert_eq!(
            Parsed::from_deltas(deltas),
            whole,
            "seed {seed}: {output:?}"
        );
    }
}

#[test]
fn reasoning_is_split_and_calls_inside_it_are_not_parsed() {
    let out = "<think>Maybe <tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>?</think>\n\nIt is sunny.";
    let p = parse_complete(
        &mut parser(Family::Hermes, Some(ReasoningParser::new(""))),
        out,
    );
    assert!(p.tool_calls.is_empty());
    assert_eq!(p.content, "It is sunny.");
    assert!(p.reasoning.unwrap().contains("<tool_call>"));
    streamed_equals_whole(Family::Hermes, Some(""), out);
    // A prompt that opened `<think>` (DeepSeek-R1's template): the output starts inside.
    let p = parse_complete(
        &mut parser(
            Family::DeepSeekV3,
            Some(ReasoningParser::new("<｜Assistant｜><think>\n")),
        ),
        "plan</think>answer",
    );
    assert_eq!(
        (p.reasoning.as_deref(), p.content.as_str()),
        (Some("plan"), "answer")
    );
    // Qwen3 with thinking off: the prompt closed the block, so all is content.
    let p = parse_complete(
        &mut parser(
            Family::Hermes,
            Some(ReasoningParser::new("<think>\n\n</think>\n\n")),
        ),
        "just <think> text",
    );
    assert_eq!(
        (p.reasoning, p.content.as_str()),
        (None, "just <think> text")
    );
}

#[test]
fn text_that_is_not_a_call_stays_content() {
    for (family, out) in [
        (
            Family::Hermes,
            "Use <tool_call>not json</tool_call> like this",
        ),
        (Family::Hermes, "a < b and <tool_c"),
        (Family::Llama3Json, "{not a call} ok"),
        (Family::Mistral, "[TOOL_CALLS] nonsense"),
        (Family::DeepSeekV3, "x <｜tool▁calls▁begin｜>broken"),
    ] {
        let p = parse_complete(&mut parser(family, None), out);
        assert!(p.tool_calls.is_empty(), "{out}");
        assert_eq!(p.content, out);
        streamed_equals_whole(family, None, out);
    }
}

#[test]
fn template_variables_and_prompts_set_the_reasoning_start() {
    let user = [ChatMessage::new("user", "hi")];
    // Qwen3: `enable_thinking: false` reaches the template, which closes an empty block.
    let t = template("Qwen-Qwen3-0.6B", "", "<|im_end|>");
    let mut off = ChatExtras::default();
    off.kwargs.insert("enable_thinking".into(), json!(false));
    let (out, _) = t.render_with(&user, &off, true).unwrap();
    assert!(out.ends_with("<think>\n\n</think>\n\n"), "{out:?}");
    let p = parse_complete(
        &mut parser(Family::Hermes, Some(ReasoningParser::new(&out))),
        "Hello",
    );
    assert_eq!((p.reasoning, p.content.as_str()), (None, "Hello"));
    let (on, _) = t.render_with(&user, &ChatExtras::default(), true).unwrap();
    assert!(!on.contains("<think>"), "{on:?}");
    // An output constraint waits for the reasoning only where the prompt left room for it.
    assert!(!may_reason(&out) && may_reason(&on));
    // DeepSeek-R1: the prompt opens `<think>`, so the output starts as reasoning.
    let t = template(
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    );
    // llama.cpp's copy of the template closes the block unless `enable_thinking` is set.
    let mut think = ChatExtras::default();
    think.kwargs.insert("enable_thinking".into(), json!(true));
    let (out, _) = t.render_with(&user, &think, true).unwrap();
    assert!(out.ends_with("<think>\n"), "{out:?}");
    let (closed, _) = t.render_with(&user, &ChatExtras::default(), true).unwrap();
    assert!(may_reason(&out) && !may_reason(&closed), "{closed:?}");
    let r1 = |out: &str| ReasoningParser::for_family(out, ReasoningFamily::DeepSeekR1);
    let p = parse_complete(
        &mut parser(Family::DeepSeekV3, Some(r1(&out))),
        "Let me think.\n</think>\n\nHi there.",
    );
    // A prompt that leaves the opening to the model: reasoning from the start, with or
    // without the model's own `<think>`.
    for text in [
        "<think>Let me think.\n</think>\n\nHi there.",
        "Let me think.\n</think>\n\nHi there.",
    ] {
        let q = parse_complete(
            &mut parser(Family::DeepSeekV3, Some(r1("<｜Assistant｜>"))),
            text,
        );
        assert_eq!(p, q);
        streamed_equals_whole(Family::DeepSeekV3, Some("<｜Assistant｜>"), text);
    }
    assert_eq!(p.reasoning.as_deref(), Some("Let me think.\n"));
    assert_eq!(p.content, "Hi there.");
}

/// A call that goes wrong after it was given out (malformed arguments, or an output cut short
/// by `max_tokens`) keeps what was valid, streamed or whole; the text after its region is
/// content again.
#[test]
fn calls_cut_short_keep_what_was_written() {
    let ds = format!("{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{\"city\": \"Par");
    for (family, out, args, content) in [
        (
            Family::Hermes,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa",
            "{\"city\": \"Pa",
            "",
        ),
        (
            Family::Hermes,
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"days\": 2, oops}}</tool_call> then",
            "{\"days\": 2, ",
            " then",
        ),
        (Family::DeepSeekV3, ds.as_str(), "{\"city\": \"Par", ""),
        (
            Family::Qwen3Coder,
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=da",
            "{\"city\":\"Paris\"",
            "",
        ),
    ] {
        let p = parse_complete(&mut parser(family, None), out);
        assert_eq!(p.tool_calls.len(), 1, "{out}");
        assert_eq!(p.tool_calls[0].arguments, args, "{out}");
        assert_eq!(p.content, content, "{out}");
        streamed_equals_whole(family, None, out);
    }
}
