//! Tool calls read from a call region's text so far, so that a stream can give out a call's
//! name as soon as it is written and its arguments as they are written.
//!
//! [`Family::partial`] is a pure function of the text: what it reports for a text is a prefix of
//! what it reports for any longer text that begins with it (calls are only added, a call's
//! arguments only grow). A call is reported once its name is known and its arguments have
//! begun (an object's `{`), or once it is complete; from then on it stands, even if what
//! follows is malformed (then its arguments end where the text stopped being valid JSON) or
//! the output ends early. JSON arguments are given as the model wrote them; Qwen3-Coder's
//! parameters become one JSON member each as each parameter closes. Only regions opened by a
//! family's marker are read so: a bare JSON object opening the output (Llama 3's calls, and
//! Qwen2.5's without their tags) is a call only if the whole output parses as calls, so it is
//! decided when the output ends.

use serde_json::Value;

use super::families::{
    arguments_text, qwen3_coder_value, Family, DS_CALL_BEGIN, DS_CALL_END, DS_SEP,
};

/// A call as far as the text shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialCall {
    pub name: String,
    /// The arguments text so far (a JSON object once `done`).
    pub args: String,
    pub done: bool,
}

/// How far a JSON value reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// It ends at this byte offset.
    Done(usize),
    /// The whole text is a valid beginning of it.
    More,
    /// The text stops being valid JSON at this offset.
    Bad(usize),
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// A string starting at its opening quote `s[i]`.
fn scan_string(s: &[u8], mut i: usize) -> Scan {
    i += 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Scan::Done(i + 1),
            b'\\' => {
                let Some(&e) = s.get(i + 1) else {
                    return Scan::More;
                };
                match e {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                    b'u' => {
                        for k in 0..4 {
                            match s.get(i + 2 + k) {
                                None => return Scan::More,
                                Some(h) if h.is_ascii_hexdigit() => {}
                                Some(_) => return Scan::Bad(i + 2 + k),
                            }
                        }
                        i += 6;
                    }
                    _ => return Scan::Bad(i + 1),
                }
            }
            c if c < 0x20 => return Scan::Bad(i),
            _ => i += 1,
        }
    }
    Scan::More
}

/// A number starting at `s[i]`, by JSON's grammar, one character at a time.
fn scan_number(s: &[u8], mut i: usize) -> Scan {
    // 0 start, 1 minus, 2 zero, 3 integer, 4 dot, 5 fraction, 6 e, 7 exponent sign, 8 exponent.
    let mut st = 0u8;
    while i < s.len() {
        st = match (st, s[i]) {
            (0, b'-') => 1,
            (0 | 1, b'0') => 2,
            (0 | 1 | 3, b'1'..=b'9') | (3, b'0') => 3,
            (2 | 3, b'.') => 4,
            (4 | 5, b'0'..=b'9') => 5,
            (2 | 3 | 5, b'e' | b'E') => 6,
            (6, b'+' | b'-') => 7,
            (6..=8, b'0'..=b'9') => 8,
            _ if matches!(st, 2 | 3 | 5 | 8) => return Scan::Done(i),
            _ => return Scan::Bad(i),
        };
        i += 1;
    }
    Scan::More
}

/// `true`, `false` or `null` starting at `s[i]` (its first letter).
fn scan_literal(s: &[u8], i: usize) -> Scan {
    let word: &[u8] = match s[i] {
        b't' => b"true",
        b'f' => b"false",
        _ => b"null",
    };
    for (k, &w) in word.iter().enumerate() {
        match s.get(i + k) {
            None => return Scan::More,
            Some(&c) if c == w => {}
            Some(_) => return Scan::Bad(i + k),
        }
    }
    Scan::Done(i + word.len())
}

/// A JSON value starting at `s[i]` (whitespace first allowed).
fn scan_value(s: &[u8], mut i: usize) -> Scan {
    #[derive(Clone, Copy)]
    enum At {
        /// After `{`: a key or `}`.
        KeyOrEnd,
        /// After `,` in an object.
        Key,
        Colon,
        /// After `[`: a value or `]`.
        ValueOrEnd,
        /// Where a value must come (top level, after `:`, after `,` in an array).
        Value,
        CommaOrEnd,
    }
    // The open containers, innermost last: true for an object.
    let mut stack: Vec<bool> = Vec::new();
    let mut at = At::Value;
    loop {
        i = skip_ws(s, i);
        if i >= s.len() {
            return Scan::More;
        }
        let c = s[i];
        // Where a value that just closed ends.
        let closed = match (at, c) {
            (At::KeyOrEnd, b'}') | (At::ValueOrEnd, b']') => {
                stack.pop();
                i + 1
            }
            (At::CommaOrEnd, b'}' | b']') => {
                if stack.pop() != Some(c == b'}') {
                    return Scan::Bad(i);
                }
                i + 1
            }
            (At::CommaOrEnd, b',') => {
                at = if stack.last() == Some(&true) {
                    At::Key
                } else {
                    At::Value
                };
                i += 1;
                continue;
            }
            (At::KeyOrEnd | At::Key, b'"') => match scan_string(s, i) {
                Scan::Done(e) => {
                    at = At::Colon;
                    i = e;
                    continue;
                }
                other => return other,
            },
            (At::Colon, b':') => {
                at = At::Value;
                i += 1;
                continue;
            }
            (At::Value | At::ValueOrEnd, b'{' | b'[') => {
                stack.push(c == b'{');
                at = if c == b'{' {
                    At::KeyOrEnd
                } else {
                    At::ValueOrEnd
                };
                i += 1;
                continue;
            }
            (At::Value | At::ValueOrEnd, _) => {
                let r = match c {
                    b'"' => scan_string(s, i),
                    b'-' | b'0'..=b'9' => scan_number(s, i),
                    b't' | b'f' | b'n' => scan_literal(s, i),
                    _ => Scan::Bad(i),
                };
                match r {
                    Scan::Done(e) => e,
                    other => return other,
                }
            }
            _ => return Scan::Bad(i),
        };
        if stack.is_empty() {
            return Scan::Done(closed);
        }
        at = At::CommaOrEnd;
        i = closed;
    }
}

/// One call object `{"name": N, <args key>: {..}}` starting at `s[i]` (a `{`): the call as far
/// as it is visible, and where the object ends if it is complete and a call.
fn call_object(s: &str, i: usize, keys: &[&str]) -> (Option<PartialCall>, Option<usize>) {
    let b = s.as_bytes();
    let mut name: Option<String> = None;
    // The arguments: where their value starts, and how far it reaches.
    let mut args: Option<(usize, Scan)> = None;
    let mut j = i + 1;
    let mut first = true;
    let end = loop {
        j = skip_ws(b, j);
        if j >= b.len() {
            break Scan::More;
        }
        if b[j] == b'}' && first {
            break Scan::Done(j + 1);
        }
        if b[j] != b'"' {
            break Scan::Bad(j);
        }
        let key_end = match scan_string(b, j) {
            Scan::Done(e) => e,
            other => break other,
        };
        let Ok(key) = serde_json::from_str::<String>(&s[j..key_end]) else {
            break Scan::Bad(j);
        };
        j = skip_ws(b, key_end);
        match b.get(j) {
            None => break Scan::More,
            Some(b':') => {}
            Some(_) => break Scan::Bad(j),
        }
        let v = skip_ws(b, j + 1);
        if v >= b.len() {
            break Scan::More;
        }
        let r = scan_value(b, v);
        if args.is_none() && keys.contains(&key.as_str()) {
            args = Some((v, r));
        }
        let Scan::Done(ve) = r else {
            break r;
        };
        if key == "name" && name.is_none() {
            match serde_json::from_str::<Value>(&s[v..ve]) {
                Ok(Value::String(n)) => name = Some(n),
                _ => break Scan::Bad(v),
            }
        }
        first = false;
        j = skip_ws(b, ve);
        match b.get(j) {
            None => break Scan::More,
            Some(b',') => j += 1,
            Some(b'}') => break Scan::Done(j + 1),
            Some(_) => break Scan::Bad(j),
        }
    };
    let obj_end = match end {
        Scan::Done(e) => Some(e),
        _ => None,
    };
    let Some(name) = name else {
        return (None, None);
    };
    let call = match args {
        Some((a, r)) if b[a] == b'{' => {
            let (stop, done) = match r {
                Scan::Done(e) => (e, true),
                Scan::More => (s.len(), false),
                Scan::Bad(e) => (e, false),
            };
            Some(PartialCall {
                name,
                args: s[a..stop].to_string(),
                done,
            })
        }
        // Arguments of another kind (a string holding an object) count once complete.
        Some((a, Scan::Done(e))) => serde_json::from_str::<Value>(&s[a..e])
            .ok()
            .and_then(arguments_text)
            .map(|args| PartialCall {
                name,
                args,
                done: true,
            }),
        Some(_) => None,
        None => obj_end.map(|_| PartialCall {
            name,
            args: "{}".to_string(),
            done: true,
        }),
    };
    let end = obj_end.filter(|_| call.is_some());
    (call, end)
}

/// JSON call objects one after another (separated by whitespace or `;`), or a JSON list of
/// them.
fn json_calls(text: &str, keys: &[&str]) -> Vec<PartialCall> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = skip_ws(b, 0);
    let list = b.get(i) == Some(&b'[');
    if list {
        i += 1;
    }
    loop {
        i = skip_ws(b, i);
        if b.get(i) != Some(&b'{') {
            break;
        }
        let (call, end) = call_object(text, i, keys);
        out.extend(call);
        let Some(e) = end else {
            break;
        };
        i = skip_ws(b, e);
        match (list, b.get(i)) {
            (true, Some(b',')) | (false, Some(b';')) => i += 1,
            (false, _) => {}
            (true, _) => break,
        }
    }
    out
}

/// A call to `name` whose JSON object of arguments begins `text` (after whitespace), and
/// where in `text` the object ends if it is complete.
fn object_args(name: &str, text: &str) -> (Option<PartialCall>, Option<usize>) {
    let a = text.len() - text.trim_start().len();
    if !text[a..].starts_with('{') {
        return (None, None);
    }
    let (stop, end) = match scan_value(text.as_bytes(), a) {
        Scan::Done(e) => (e, Some(e)),
        Scan::More => (text.len(), None),
        Scan::Bad(e) => (e, None),
    };
    let call = PartialCall {
        name: name.to_string(),
        args: text[a..stop].to_string(),
        done: end.is_some(),
    };
    (Some(call), end)
}

/// The rest of `text` after `marker`; if `text` does not begin with it, whether it still may
/// (it is a beginning of the marker).
fn after<'t>(text: &'t str, marker: &str) -> Result<&'t str, bool> {
    text.strip_prefix(marker)
        .ok_or_else(|| marker.starts_with(text))
}

/// DeepSeek's calls: `<call begin>` then V3/R1's `function<sep>NAME\n```json\n{..}\n```` or
/// V3.1's `NAME<sep>{..}`, then `<call end>`, repeated.
fn deepseek(body: &str) -> Vec<PartialCall> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Ok(r) = after(rest.trim_start(), DS_CALL_BEGIN) {
        let Some((head, tail)) = r.split_once(DS_SEP) else {
            break;
        };
        let (name, args) = if head.trim() == "function" {
            let Some((name, a)) = tail.split_once('\n') else {
                break;
            };
            let a = a.trim_start();
            let a = match after(a, "```json") {
                Ok(a) => a,
                Err(true) => break,
                Err(false) => match a.strip_prefix("```") {
                    Some(a) => a,
                    None => break,
                },
            };
            (name.trim(), a)
        } else {
            (head.trim(), tail)
        };
        let (call, end) = object_args(name, args);
        out.extend(call);
        let Some(e) = end else {
            break;
        };
        match args[e..].find(DS_CALL_END) {
            Some(p) => rest = &args[e + p + DS_CALL_END.len()..],
            None => break,
        }
    }
    out
}

/// Mistral v11+: `NAME[ARGS]{..}` (or `NAME[CALL_ID]id[ARGS]{..}`), again after each further
/// `[TOOL_CALLS]`.
fn mistral_named(body: &str) -> Vec<PartialCall> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        rest = rest.trim_start();
        if !out.is_empty() {
            match after(rest, "[TOOL_CALLS]") {
                Ok(r) => rest = r,
                Err(_) => break,
            }
        }
        let Some((head, args)) = rest.split_once("[ARGS]") else {
            break;
        };
        let name = head.split("[CALL_ID]").next().unwrap_or("").trim();
        if name.is_empty() {
            break;
        }
        let (call, end) = object_args(name, args);
        out.extend(call);
        let Some(e) = end else {
            break;
        };
        rest = &args[e..];
    }
    out
}

/// Qwen3-Coder: `<function=NAME>`, then `<parameter=P>\nvalue\n</parameter>` parts, then
/// `</function>`. The call shows once its name is written; each closed parameter adds one
/// member, `"P":value`, string parameters (`is_string`) as text and others as JSON where they
/// parse.
fn qwen3_coder(body: &str, is_string: &dyn Fn(&str, &str) -> bool) -> Vec<PartialCall> {
    let Ok(rest) = after(body.trim_start(), "<function=") else {
        return Vec::new();
    };
    let Some((name, mut rest)) = rest.split_once('>') else {
        return Vec::new();
    };
    let name = name.trim();
    let mut call = PartialCall {
        name: name.to_string(),
        args: String::new(),
        done: false,
    };
    loop {
        rest = rest.trim_start();
        if rest.starts_with("</function>") {
            call.args
                .push_str(if call.args.is_empty() { "{}" } else { "}" });
            call.done = true;
            break;
        }
        let Ok(r) = after(rest, "<parameter=") else {
            break;
        };
        let Some((param, r)) = r.split_once('>') else {
            break;
        };
        let Some(end) = r.find("</parameter>") else {
            break;
        };
        let param = param.trim();
        let value = qwen3_coder_value(&r[..end], is_string(name, param));
        call.args.push(if call.args.is_empty() { '{' } else { ',' });
        call.args
            .push_str(&Value::String(param.to_string()).to_string());
        call.args.push(':');
        call.args.push_str(&value.to_string());
        rest = &r[end + "</parameter>".len()..];
    }
    vec![call]
}

impl Family {
    /// The calls of a region opened by `start` whose body so far is `body` (see the module
    /// documentation); empty if none is visible yet, or the text is not calls.
    pub fn partial(
        self,
        start: &str,
        body: &str,
        is_string: &dyn Fn(&str, &str) -> bool,
    ) -> Vec<PartialCall> {
        match self {
            // A bare object opening the output is a call only if the whole output is calls
            // (a model may as well answer in JSON): it is decided at the end.
            _ if start == "{" => Vec::new(),
            Family::Hermes => json_calls(body, &["arguments", "parameters"]),
            Family::Llama3Json => json_calls(body, &["parameters", "arguments"]),
            Family::Qwen3Coder => qwen3_coder(body, is_string),
            Family::DeepSeekV3 if start == DS_CALL_BEGIN => deepseek(&format!("{start}{body}")),
            Family::DeepSeekV3 => deepseek(body),
            Family::Mistral if body.trim_start().starts_with('[') => {
                json_calls(body, &["arguments", "parameters"])
            }
            Family::Mistral => mistral_named(body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::DS_CALLS_BEGIN;
    use super::*;

    /// Every proper prefix of a valid JSON text scans as `More` and the whole as `Done`; a text
    /// serde_json refuses scans as `Bad` at its first wrong character.
    #[test]
    fn scanner_agrees_with_serde_json() {
        let good = [
            r#"{"a": [1, -2.5e+3, true, false, null, "x\"\u00e9\\"], "b": {}, "c": []}"#,
            r#"[0, 0.5, -0, 1E9, {"k": "v"}, [[]]]"#,
            r#""é""#,
        ];
        for g in good {
            for n in (0..g.len()).filter(|&n| g.is_char_boundary(n)) {
                let r = scan_value(&g.as_bytes()[..n], 0);
                assert_eq!(r, Scan::More, "{g:?}[..{n}]");
            }
            assert_eq!(scan_value(g.as_bytes(), 0), Scan::Done(g.len()), "{g:?}");
            assert!(serde_json::from_str::<Value>(g).is_ok());
        }
        assert_eq!(scan_value(b"12 ", 0), Scan::Done(2));
        for (bad, at) in [
            (r#"{"a" 1}"#, 5),
            (r#"{"a": 01}"#, 7),
            (r#"[1, ]"#, 4),
            (r#"{"a": tru}"#, 9),
            ("\"a\nb\"", 2),
            (r#"{"a": "\x"}"#, 8),
            (r#"[1}"#, 2),
            (r#"{"a": 1.}"#, 8),
            (r#"{"a": 1,}"#, 8),
            (r#"{"a": -}"#, 7),
        ] {
            assert_eq!(scan_value(bad.as_bytes(), 0), Scan::Bad(at), "{bad:?}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad:?}");
        }
    }

    /// What a family reports for each prefix of `body` is a prefix of what it reports for the
    /// whole, which it returns.
    fn grows(family: Family, start: &str, body: &str) -> Vec<PartialCall> {
        let s = |_: &str, _: &str| true;
        let whole = family.partial(start, body, &s);
        for (n, _) in body.char_indices() {
            let part = family.partial(start, &body[..n], &s);
            assert!(part.len() <= whole.len(), "{body:?}[..{n}]");
            for (p, w) in part.iter().zip(&whole) {
                assert_eq!(p.name, w.name);
                assert!(w.args.starts_with(&p.args), "{body:?}[..{n}]: {p:?} {w:?}");
                assert!(!p.done || (w.done && p.args == w.args));
            }
        }
        whole
    }

    #[test]
    fn calls_show_early_and_only_grow() {
        let c = grows(
            Family::Hermes,
            "<tool_call>",
            r#" {"name": "f", "arguments": {"a": [1, "x"]}} "#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].args.as_str(), c[0].done),
            (r#"{"a": [1, "x"]}"#, true)
        );
        // Shown as soon as the arguments open.
        let early = Family::Hermes.partial(
            "<tool_call>",
            r#"{"name": "f", "arguments": {"a"#,
            &|_, _| true,
        );
        assert_eq!(early[0].args, r#"{"a"#);
        // Arguments before the name, or in a string: shown once the object closes.
        let c = grows(
            Family::Hermes,
            "<tool_call>",
            r#"{"arguments": {"x": 1}, "name": "g"}"#,
        );
        assert_eq!(
            (c[0].name.as_str(), c[0].args.as_str()),
            ("g", r#"{"x": 1}"#)
        );
        let c = grows(
            Family::Hermes,
            "<tool_call>",
            r#"{"name": "g", "arguments": "{\"x\": 1}"}"#,
        );
        assert_eq!(c[0].args, r#"{"x":1}"#);
        let c = grows(
            Family::Llama3Json,
            "<|python_tag|>",
            r#"{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": "v"}}"#,
        );
        assert_eq!(c.len(), 2);
        let c = grows(
            Family::Mistral,
            "[TOOL_CALLS]",
            r#"[{"name": "a", "arguments": {"k": 1}}, {"name": "b", "arguments": {}}]"#,
        );
        assert_eq!(c.len(), 2);
        let c = grows(
            Family::Mistral,
            "[TOOL_CALLS]",
            r#"a[ARGS]{"k": 1}[TOOL_CALLS]b[CALL_ID]x1[ARGS]{}"#,
        );
        assert_eq!((c[1].name.as_str(), c[1].done), ("b", true));
        let body = format!(
            "{DS_CALL_BEGIN}function{DS_SEP}a\n```json\n{{\"k\": 1}}\n```{DS_CALL_END}\
             {DS_CALL_BEGIN}b{DS_SEP}{{\"q\": [2]}}{DS_CALL_END}"
        );
        let c = grows(Family::DeepSeekV3, DS_CALLS_BEGIN, &body);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].args.as_str(), c[1].args.as_str()),
            (r#"{"k": 1}"#, r#"{"q": [2]}"#)
        );
        let c = grows(
            Family::Qwen3Coder,
            "<tool_call>",
            "\n<function=f>\n<parameter=a>\nx < y\n</parameter>\n<parameter=b>\n2\n</parameter>\n</function>\n",
        );
        assert_eq!(
            (c[0].args.as_str(), c[0].done),
            (r#"{"a":"x < y","b":"2"}"#, true)
        );
    }

    #[test]
    fn a_call_gone_wrong_keeps_what_was_valid() {
        let c = Family::Hermes.partial(
            "<tool_call>",
            r#"{"name": "f", "arguments": {"a": 1, oops}}"#,
            &|_, _| true,
        );
        assert_eq!((c[0].args.as_str(), c[0].done), (r#"{"a": 1, "#, false));
        for not_calls in [
            r#"{"nam": "f", "arguments": {}}"#,
            "not json",
            r#"{"name": 3}"#,
        ] {
            assert!(Family::Hermes
                .partial("<tool_call>", not_calls, &|_, _| true)
                .is_empty());
        }
        // A bare object is not read before the output ends.
        let bare = r#""name": "f", "arguments": {"a": 1}}"#;
        assert!(Family::Llama3Json
            .partial("{", bare, &|_, _| true)
            .is_empty());
    }
}
