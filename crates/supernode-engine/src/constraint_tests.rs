//! Unit tests of [`super::Constraint`] over a byte vocabulary: token `b` is the byte `b`, except
//! token 0, the end-of-generation token `<|end|>`.

use std::sync::Arc;

use serde_json::json;

use super::*;

const EOS: u32 = 0;

fn bytes_vocab() -> Arc<Grammars> {
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    words[0] = b"\xFF<|end|>".to_vec();
    Arc::new(Grammars::from_token_bytes(words, &[EOS]).unwrap())
}

fn compile(spec: ConstraintSpec) -> Constraint {
    bytes_vocab().compile(&spec).unwrap()
}

/// Feeds `text` byte by byte, checking each byte first; returns the step of the last one.
fn feed(c: &mut Constraint, text: &str) -> Step {
    let mut last = Step::Continue;
    for &b in text.as_bytes() {
        assert!(c.allows(b as u32), "{:?} refused in {text:?}", b as char);
        last = c.commit(b as u32).unwrap();
    }
    last
}

fn allowed(c: &mut Constraint) -> Vec<u32> {
    let m = c.mask().unwrap();
    (0..256).filter(|&t| m.is_allowed(t)).collect()
}

#[test]
fn a_schema_accepts_its_documents_and_refuses_the_rest() {
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": false,
    });
    let mut c = compile(ConstraintSpec::JsonSchema {
        schema,
        strict: true,
    });
    assert!(c.is_active());
    assert!(!c.allows(b'x' as u32));
    assert!(!c.allows(b' ' as u32));
    assert!(!c.allows(EOS));
    assert_eq!(allowed(&mut c), vec![b'{' as u32]);
    feed(&mut c, "{\"name\": \"Al\", \"age\": ");
    assert!(!c.allows(b'"' as u32), "age is an integer");
    assert!(!c.is_accepting());
    assert_eq!(feed(&mut c, "42}"), Step::Complete);
    assert!(c.is_accepting());
}

#[test]
fn the_mask_is_the_set_of_accepted_tokens() {
    let mut c = compile(ConstraintSpec::JsonSchema {
        schema: json!({"type": "object", "properties": {"b": {"type": "boolean"}},
                       "required": ["b"], "additionalProperties": false}),
        strict: true,
    });
    feed(&mut c, "{\"b\": ");
    assert_eq!(allowed(&mut c), vec![b'f' as u32, b't' as u32]);
    for t in 0..256u32 {
        let in_mask = t == b'f' as u32 || t == b't' as u32;
        assert_eq!(c.allows(t), in_mask, "token {t}");
    }
    let mut row = vec![1.0f32; 300];
    c.apply_mask(&mut row).unwrap();
    let finite: Vec<usize> = (0..300).filter(|&i| row[i].is_finite()).collect();
    assert_eq!(finite, vec![b'f' as usize, b't' as usize]);
}

#[test]
fn json_object_takes_any_object_only() {
    let mut c = compile(ConstraintSpec::JsonObject);
    assert_eq!(allowed(&mut c), vec![b'{' as u32]);
    assert_eq!(
        feed(&mut c, "{\"a\": [1, 2.5, null, {\"b\": \"x\"}]}"),
        Step::Complete
    );
    let mut c = compile(ConstraintSpec::JsonObject);
    assert!(!c.allows(b'[' as u32));
}

#[test]
fn regex_choice_and_lark_constrain_the_text() {
    let mut c = compile(ConstraintSpec::Regex("[0-9]{3}-[a-z]+".into()));
    feed(&mut c, "123-");
    assert!(!c.allows(b'4' as u32));
    assert!(!c.allows(EOS), "at least one letter");
    feed(&mut c, "ab");
    assert!(c.allows(EOS) && c.is_accepting());

    let mut c = compile(ConstraintSpec::Choice(vec![
        "yes".into(),
        "no".into(),
        "a.b".into(),
    ]));
    assert_eq!(allowed(&mut c), vec![b'a' as u32, b'n' as u32, b'y' as u32]);
    feed(&mut c, "a");
    assert!(!c.allows(b'x' as u32), "`.` is literal in a choice");
    assert_eq!(feed(&mut c, ".b"), Step::Complete);

    let lark = r#"
        start: greeting " " name
        greeting: "hi" | "hello"
        name: /[A-Z][a-z]*/
    "#;
    let mut c = compile(ConstraintSpec::Lark(lark.into()));
    assert!(!c.allows(b'y' as u32));
    feed(&mut c, "hello B");
    assert!(!c.allows(b'B' as u32));
    feed(&mut c, "ob");
    assert!(c.allows(EOS));
}

#[test]
fn bad_grammars_are_refused_with_llguidance_s_reason() {
    let g = bytes_vocab();
    let err = |spec: ConstraintSpec| match g.compile(&spec) {
        Err(EngineError::Constraint { msg, .. }) => msg,
        other => panic!("{spec:?} compiled: {other:?}"),
    };
    let m = err(ConstraintSpec::JsonSchema {
        schema: json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
        strict: true,
    });
    assert!(m.contains("missing"), "{m}");
    let m = err(ConstraintSpec::JsonSchema {
        schema: json!({"type": "wibble"}),
        strict: true,
    });
    assert!(m.contains("wibble"), "{m}");
    let m = err(ConstraintSpec::Lark("start: undefined_rule".into()));
    assert!(m.contains("undefined_rule"), "{m}");
    let m = err(ConstraintSpec::Regex("(unclosed".into()));
    assert!(!m.is_empty());
}

#[test]
fn strict_refuses_unknown_keywords_that_lenient_ignores() {
    let g = bytes_vocab();
    let schema = json!({"type": "string", "format": "no-such-format"});
    let strict = g.compile(&ConstraintSpec::JsonSchema {
        schema: schema.clone(),
        strict: true,
    });
    let lenient = g.compile(&ConstraintSpec::JsonSchema {
        schema,
        strict: false,
    });
    assert!(strict.is_err(), "{strict:?}");
    assert!(lenient.is_ok(), "{lenient:?}");
}

#[test]
fn a_triggered_constraint_waits_for_its_trigger() {
    let mut c = compile(ConstraintSpec::Regex("ok".into())).start_after("</think>");
    assert!(!c.is_active());
    for &b in b"free text </thin> </think" {
        assert_eq!(c.commit(b as u32), Ok(Step::Continue));
        assert!(!c.is_active());
    }
    c.commit(b'>' as u32).unwrap();
    assert!(c.is_active());
    assert!(!c.allows(b'x' as u32));
    assert_eq!(feed(&mut c, "ok"), Step::Complete);
}

#[test]
fn a_trigger_is_found_however_the_tokens_cut_it() {
    // Byte tokens, then "</th" and "ink>\n" (the trigger ends inside a token), then a control
    // token whose text is the trigger.
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    words[0] = b"\xFF<|end|>".to_vec();
    words.push(b"</th".to_vec());
    words.push(b"ink>\n".to_vec());
    words.push(b"\xFF</think>".to_vec());
    let g = Arc::new(Grammars::from_token_bytes(words, &[EOS]).unwrap());
    let spec = ConstraintSpec::Regex("ok".into());
    let mut split = g.compile(&spec).unwrap().start_after("</think>");
    for tok in [b'a' as u32, 256, 257] {
        assert!(!split.is_active());
        split.commit(tok).unwrap();
    }
    assert!(split.is_active() && split.allows(b'o' as u32) && !split.allows(b'x' as u32));
    let mut control = g.compile(&spec).unwrap().start_after("</think>");
    control.commit(256).unwrap();
    assert!(!control.is_active());
    control.commit(258).unwrap();
    assert!(control.is_active());
}

#[test]
fn clones_advance_independently() {
    let mut a = compile(ConstraintSpec::Choice(vec!["ab".into(), "cd".into()]));
    let mut b = a.clone();
    feed(&mut a, "a");
    assert!(b.allows(b'c' as u32));
    feed(&mut b, "cd");
    assert!(a.allows(b'b' as u32) && !a.allows(b'd' as u32));
}

#[test]
fn padding_ids_and_ids_past_the_vocabulary_are_refused() {
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    words[0] = b"\xFF<|end|>".to_vec();
    words.push(Vec::new());
    let g = Arc::new(Grammars::from_token_bytes(words, &[EOS]).unwrap());
    let mut c = g.compile(&ConstraintSpec::Regex(".*".into())).unwrap();
    assert!(c.allows(b'q' as u32));
    assert!(!c.allows(256));
    assert!(!c.allows(1000));
    assert!(Grammars::from_token_bytes(vec![b"a".to_vec()], &[]).is_err());
    assert!(Grammars::from_token_bytes(vec![b"a".to_vec()], &[3]).is_err());
}
