//! Mutations shared by the fuzz targets: raw byte edits, and edits of a JSON document's tree.
//!
//! Every edit names its place with a free `usize` (reduced modulo the size of what it edits when
//! applied), so proptest can shrink a failing list of edits towards fewer edits and towards the
//! start of the input, and a list stays meaningful after an earlier edit changed the length.

#![allow(dead_code)]

use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value};

/// Integers that sit on the boundaries parsers get wrong: small counts, powers of two and their
/// neighbours, the limits of every width, and counts that overflow when multiplied by a size.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    31,
    32,
    33,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4096,
    65535,
    65536,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 53,
    1 << 60,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 7,
    u64::MAX - 1,
    u64::MAX,
];

/// An interesting integer most of the time, any integer sometimes.
pub fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![4 => select(INTERESTING), 1 => any::<u64>()]
}

/// One edit of a byte string.
#[derive(Clone, Debug)]
pub enum ByteOp {
    /// Flip one bit.
    Flip { at: usize, bit: u8 },
    /// Overwrite one byte.
    Set { at: usize, value: u8 },
    /// Overwrite `width` bytes with a little-endian integer.
    Put { at: usize, width: u8, value: u64 },
    /// Add a small signed amount to the little-endian integer of `width` bytes at `at`.
    Add { at: usize, width: u8, delta: i8 },
    /// Cut the input short.
    Truncate { at: usize },
    /// Remove up to `len` bytes.
    Remove { at: usize, len: usize },
    /// Insert bytes.
    Insert { at: usize, bytes: Vec<u8> },
    /// Copy up to `len` bytes from `from` and insert them at `to` (repeats a structure).
    Repeat { from: usize, len: usize, to: usize },
}

fn width() -> impl Strategy<Value = u8> {
    select(&[1u8, 2, 4, 8][..])
}

pub fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        3 => (any::<usize>(), 0..8u8).prop_map(|(at, bit)| ByteOp::Flip { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| ByteOp::Set { at, value }),
        3 => (any::<usize>(), width(), interesting_u64())
            .prop_map(|(at, width, value)| ByteOp::Put { at, width, value }),
        2 => (any::<usize>(), width(), any::<i8>())
            .prop_map(|(at, width, delta)| ByteOp::Add { at, width, delta }),
        1 => any::<usize>().prop_map(|at| ByteOp::Truncate { at }),
        1 => (any::<usize>(), 1..64usize).prop_map(|(at, len)| ByteOp::Remove { at, len }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| ByteOp::Insert { at, bytes }),
        1 => (any::<usize>(), 1..256usize, any::<usize>())
            .prop_map(|(from, len, to)| ByteOp::Repeat { from, len, to }),
    ]
}

/// Applies `ops` in order.
pub fn apply_bytes(data: &mut Vec<u8>, ops: &[ByteOp]) {
    for op in ops {
        apply_byte(data, op);
    }
}

fn put_le(data: &mut [u8], at: usize, width: usize, value: u64) {
    let end = (at + width).min(data.len());
    data[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
}

fn get_le(data: &[u8], at: usize, width: usize) -> u64 {
    let end = (at + width).min(data.len());
    let mut b = [0u8; 8];
    b[..end - at].copy_from_slice(&data[at..end]);
    u64::from_le_bytes(b)
}

fn apply_byte(data: &mut Vec<u8>, op: &ByteOp) {
    let n = data.len();
    // A position inside the data (for edits) or up to its end (for inserts and cuts).
    let inside = |at: usize| at % n.max(1);
    let upto = |at: usize| at % (n + 1);
    match *op {
        _ if n == 0 && !matches!(op, ByteOp::Insert { .. }) => {}
        ByteOp::Flip { at, bit } => data[inside(at)] ^= 1 << (bit % 8),
        ByteOp::Set { at, value } => data[inside(at)] = value,
        ByteOp::Put { at, width, value } => put_le(data, inside(at), width as usize, value),
        ByteOp::Add { at, width, delta } => {
            let at = inside(at);
            let v = get_le(data, at, width as usize).wrapping_add_signed(delta as i64);
            put_le(data, at, width as usize, v);
        }
        ByteOp::Truncate { at } => data.truncate(upto(at)),
        ByteOp::Remove { at, len } => {
            let at = inside(at);
            data.drain(at..(at + len).min(n));
        }
        ByteOp::Insert { at, ref bytes } => {
            let at = upto(at);
            data.splice(at..at, bytes.iter().copied());
        }
        ByteOp::Repeat { from, len, to } => {
            let from = inside(from);
            let chunk = data[from..(from + len).min(n)].to_vec();
            let to = upto(to);
            data.splice(to..to, chunk);
        }
    }
}

/// One step from a JSON value to a child.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Every node of `v` in preorder, as the steps from the root (the root is the empty path).
fn paths(v: &Value) -> Vec<Vec<Step>> {
    fn walk(v: &Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        out.push(path.clone());
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    path.push(Step::Key(k.clone()));
                    walk(c, path, out);
                    path.pop();
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    path.push(Step::Index(i));
                    walk(c, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn node_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, s| match (v, s) {
        (Value::Object(m), Step::Key(k)) => m.get_mut(k),
        (Value::Array(a), Step::Index(i)) => a.get_mut(*i),
        _ => None,
    })
}

fn node<'a>(v: &'a Value, path: &[Step]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, s| match (v, s) {
        (Value::Object(m), Step::Key(k)) => m.get(k),
        (Value::Array(a), Step::Index(i)) => a.get(*i),
        _ => None,
    })
}

/// One edit of a JSON tree. `node` picks a node in preorder; `pool` picks a value from the
/// target's pool (interesting values and pieces of every seed, so edits recombine seeds).
#[derive(Clone, Debug)]
pub enum JsonOp {
    /// Replace the node with a pool value.
    Replace { node: usize, pool: usize },
    /// Replace the node with a new interesting value.
    Set { node: usize, value: Value },
    /// Remove the node from its parent.
    Remove { node: usize },
    /// Repeat an array element or an object entry (under a new key) `times` times.
    Repeat { node: usize, times: u8 },
    /// Replace the node with a copy of another node of the same document.
    Graft { from: usize, to: usize },
    /// Give an object entry another key, from the pool's strings.
    Rename { node: usize, pool: usize },
    /// Put the node inside a one-element array or a one-entry object.
    Wrap { node: usize, in_array: bool },
    /// Change a number: add `delta`, negate, or turn an integer into a float.
    Nudge {
        node: usize,
        delta: i64,
        float: bool,
    },
}

/// Leaves that parsers get wrong: every type, the boundaries of integer widths, huge, tiny,
/// negative and fractional numbers, empty and odd strings, empty containers.
pub fn interesting_json() -> impl Strategy<Value = Value> {
    let numbers = prop_oneof![
        select(INTERESTING).prop_map(Value::from),
        select(INTERESTING).prop_map(|v| Value::from(-(v as i128).min(i64::MAX as i128) as i64)),
        select(
            &[
                0.5f64,
                -0.0,
                1e-300,
                1e300,
                -1e300,
                3.0,
                2.5e9,
                1e19,
                4294967296.5
            ][..]
        )
        .prop_map(Value::from),
    ];
    let strings = select(
        &[
            "",
            " ",
            "a",
            "\u{0}",
            "\u{2581}",
            "\u{F8F0}",
            "\u{FFFD}",
            "<0xFF>",
            "<0xZZ>",
            "<unk>",
            "<s>",
            "</s>",
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "user",
            "assistant",
            "system",
            "tool",
            "\u{10FFFF}\u{1F600}é",
            "{{ x }}",
            "{%",
            "\\",
            "(?",
            "[",
            "\u{200B}",
            "a\nb",
            "\u{1b}[31m",
        ][..],
    )
    .prop_map(Value::from);
    prop_oneof![
        3 => numbers,
        3 => strings,
        1 => "[ -~\u{80}-\u{10FFFF}]{0,40}".prop_map(Value::from),
        1 => (0..3000usize).prop_map(|n| Value::from("x".repeat(n))),
        1 => select(&[0u8, 1, 2, 3][..]).prop_map(|k| match k {
            0 => Value::Null,
            1 => Value::Bool(true),
            2 => Value::Array(Vec::new()),
            _ => Value::Object(Map::new()),
        }),
        1 => (1..200usize).prop_map(|depth| {
            (0..depth).fold(Value::Null, |v, _| Value::Array(vec![v]))
        }),
    ]
}

pub fn json_op() -> impl Strategy<Value = JsonOp> {
    let node = any::<usize>;
    prop_oneof![
        4 => (node(), any::<usize>()).prop_map(|(node, pool)| JsonOp::Replace { node, pool }),
        3 => (node(), interesting_json()).prop_map(|(node, value)| JsonOp::Set { node, value }),
        2 => node().prop_map(|node| JsonOp::Remove { node }),
        1 => (node(), 1..8u8).prop_map(|(node, times)| JsonOp::Repeat { node, times }),
        2 => (node(), node()).prop_map(|(from, to)| JsonOp::Graft { from, to }),
        1 => (node(), any::<usize>()).prop_map(|(node, pool)| JsonOp::Rename { node, pool }),
        1 => (node(), any::<bool>()).prop_map(|(node, in_array)| JsonOp::Wrap { node, in_array }),
        2 => (node(), prop_oneof![-3..4i64, select(&[i64::MIN, i64::MAX, 1 << 32][..])], any::<bool>())
            .prop_map(|(node, delta, float)| JsonOp::Nudge { node, delta, float }),
    ]
}

/// Values to recombine: pieces of the seeds (scalars, and containers up to `max_bytes` long
/// as JSON) and every object key as a string.
pub fn json_pool(seeds: &[Value], max_bytes: usize) -> Arc<Vec<Value>> {
    let mut pool = Vec::new();
    for seed in seeds {
        for p in paths(seed) {
            let Some(v) = node(seed, &p) else { continue };
            if let Some(Step::Key(k)) = p.last() {
                pool.push(Value::from(k.as_str()));
            }
            let small = match v {
                Value::Array(_) | Value::Object(_) => {
                    serde_json::to_string(v).is_ok_and(|s| s.len() <= max_bytes)
                }
                _ => true,
            };
            if small {
                pool.push(v.clone());
            }
        }
    }
    pool.sort_by_cached_key(|v| v.to_string());
    pool.dedup();
    Arc::new(pool)
}

/// Applies `ops` in order to `doc`, drawing pool values from `pool`.
pub fn apply_json(doc: &mut Value, ops: &[JsonOp], pool: &[Value]) {
    for op in ops {
        apply_json_op(doc, op, pool);
    }
}

fn pick<T>(items: &[T], i: usize) -> Option<&T> {
    items.get(i.checked_rem(items.len())?)
}

fn apply_json_op(doc: &mut Value, op: &JsonOp, pool: &[Value]) {
    let all = paths(doc);
    let at = |i: usize| pick(&all, i).cloned().unwrap_or_default();
    match op {
        JsonOp::Replace { node, pool: p } => {
            if let (Some(v), Some(new)) = (node_mut(doc, &at(*node)), pick(pool, *p)) {
                *v = new.clone();
            }
        }
        JsonOp::Set { node, value } => {
            if let Some(v) = node_mut(doc, &at(*node)) {
                *v = value.clone();
            }
        }
        JsonOp::Remove { node } => {
            let mut path = at(*node);
            let Some(last) = path.pop() else { return };
            match (node_mut(doc, &path), last) {
                (Some(Value::Object(m)), Step::Key(k)) => {
                    m.remove(&k);
                }
                (Some(Value::Array(a)), Step::Index(i)) if i < a.len() => {
                    a.remove(i);
                }
                _ => {}
            }
        }
        JsonOp::Repeat { node, times } => {
            let mut path = at(*node);
            let Some(last) = path.pop() else { return };
            match (node_mut(doc, &path), last) {
                (Some(Value::Object(m)), Step::Key(k)) => {
                    if let Some(v) = m.get(&k).cloned() {
                        for t in 0..*times {
                            m.insert(format!("{k}{t}"), v.clone());
                        }
                    }
                }
                (Some(Value::Array(a)), Step::Index(i)) if i < a.len() => {
                    let v = a[i].clone();
                    for _ in 0..*times {
                        a.insert(i, v.clone());
                    }
                }
                _ => {}
            }
        }
        JsonOp::Graft { from, to } => {
            let Some(v) = node(doc, &at(*from)).cloned() else {
                return;
            };
            if let Some(t) = node_mut(doc, &at(*to)) {
                *t = v;
            }
        }
        JsonOp::Rename { node, pool: p } => {
            let mut path = at(*node);
            let (Some(Step::Key(k)), Some(Value::String(new))) =
                (path.pop(), pick(pool, *p).filter(|v| v.is_string()))
            else {
                return;
            };
            if let Some(Value::Object(m)) = node_mut(doc, &path) {
                if let Some(v) = m.remove(&k) {
                    m.insert(new.clone(), v);
                }
            }
        }
        JsonOp::Wrap { node, in_array } => {
            if let Some(v) = node_mut(doc, &at(*node)) {
                let inner = v.take();
                *v = match in_array {
                    true => Value::Array(vec![inner]),
                    false => Value::Object(Map::from_iter([("content".to_string(), inner)])),
                };
            }
        }
        JsonOp::Nudge { node, delta, float } => {
            let Some(v) = node_mut(doc, &at(*node)) else {
                return;
            };
            let Value::Number(n) = v else { return };
            *v = match (n.as_i64(), n.as_u64(), n.as_f64()) {
                _ if *float => Value::from(n.as_f64().unwrap_or(0.0) + *delta as f64 + 0.5),
                (Some(i), _, _) if *delta == 0 => Value::from(i.checked_neg().unwrap_or(i64::MAX)),
                (Some(i), _, _) => Value::from(i.wrapping_add(*delta)),
                (None, Some(u), _) => Value::from(u.wrapping_add_signed(*delta)),
                (_, _, Some(f)) => Value::from(f * *delta as f64),
                _ => return,
            };
        }
    }
}

/// A JSON document as text after tree edits: compact or pretty, then byte edits on the text.
pub fn json_bytes(doc: &Value, pretty: bool, bytes: &[ByteOp]) -> Vec<u8> {
    let mut out = match pretty {
        true => serde_json::to_vec_pretty(doc),
        false => serde_json::to_vec(doc),
    }
    .unwrap_or_default();
    apply_bytes(&mut out, bytes);
    out
}

/// Edits of one JSON document: tree edits, the text's layout, then a few byte edits (most
/// inputs stay valid JSON so that they reach the code behind the parser).
#[derive(Clone, Debug)]
pub struct JsonPlan {
    pub tree: Vec<JsonOp>,
    pub pretty: bool,
    pub bytes: Vec<ByteOp>,
}

pub fn json_plan(max_ops: usize) -> impl Strategy<Value = JsonPlan> {
    (
        prop::collection::vec(json_op(), 0..=max_ops),
        any::<bool>(),
        prop_oneof![
            4 => Just(Vec::new()),
            1 => prop::collection::vec(byte_op(), 1..4),
        ],
    )
        .prop_map(|(tree, pretty, bytes)| JsonPlan {
            tree,
            pretty,
            bytes,
        })
}

impl JsonPlan {
    /// The bytes of `seed` edited by this plan.
    pub fn apply(&self, seed: &Value, pool: &[Value]) -> Vec<u8> {
        let mut doc = seed.clone();
        apply_json(&mut doc, &self.tree, pool);
        json_bytes(&doc, self.pretty, &self.bytes)
    }
}
