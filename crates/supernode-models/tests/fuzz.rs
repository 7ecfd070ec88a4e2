//! Fuzz targets for the model files: GGUF (`read_gguf`, then `load_model` and one forward pass),
//! a single safetensors file (`read_safetensors`) and an HF directory (`config.json` plus
//! `model.safetensors` through `load_model` and a forward pass).
//!
//! Inputs are mutated valid files (`tests/fuzz/harness.rs` has the budget and the property):
//! GGUF seeds are decoded and edited as typed metadata and tensor infos, re-encoded, then their
//! header fields (counts, lengths, types, dimensions, offsets) and bytes are edited; safetensors
//! headers are edited as JSON trees, with their length prefix and bytes. The GGUF and small
//! safetensors seeds are `tests/fuzz-corpus/{gguf,safetensors}/` (written by
//! `write_seed_corpus`, run with `--ignored`); the HF directories are the tiny models of
//! `tests/fixtures/hf/`.

#[path = "../../../tests/fuzz/harness.rs"]
mod harness;
#[path = "../../../tests/fuzz/meta.rs"]
mod meta;
#[path = "../../../tests/fuzz/mutate.rs"]
mod mutate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::Value;
use supernode_kernels::{DType, Precision};
use supernode_models::gguf::{read_gguf, GgufWriter};
use supernode_models::safetensors::read_safetensors;
use supernode_models::{load_model, Batch, KvCache, LoadOptions, MetaValue, Metadata, Model};

use harness::{Files, Scratch, Target};
use meta::{apply_meta, meta_op, MetaOp};
use mutate::{apply_bytes, byte_op, interesting_u64, json_plan, json_pool, ByteOp, JsonPlan};

#[global_allocator]
static ALLOC: harness::LimitAlloc = harness::LimitAlloc;

/// Errors are one line (the server and the CLI print them as such).
fn one_line(e: &dyn std::fmt::Display) -> Result<(), String> {
    let s = e.to_string();
    match s.contains('\n') {
        true => Err(format!("a multi-line error: {s:?}")),
        false => Ok(()),
    }
}

/// One forward pass over two tokens: the logits, or `None` where the model cannot take one
/// (an empty vocabulary, a KV cache that cannot be made).
fn run_forward(m: &dyn Model) -> Option<supernode_models::Result<Vec<f32>>> {
    let vocab = m.config().vocab_size;
    // One recurrent state slot for a model with linear attention.
    let mut kv = KvCache::new(&m.kv_specs(), 4, 2)
        .and_then(|kv| kv.with_state_slots(&m.state_widths(), 1))
        .ok()?;
    if vocab == 0 {
        return None;
    }
    let slots: &[usize] = if kv.num_state_slots > 0 { &[0] } else { &[] };
    let tokens = [0, (vocab - 1) as u32];
    let table: &[u32] = &[0];
    let batch = Batch {
        tokens: &tokens,
        positions: &[0, 1],
        seq_of: &[0, 0],
        block_tables: &[table],
        logits_for: &[0, 1],
        state_slots: slots,
        chunked_until: &[],
        drafts: &[],
    };
    Some(m.forward(&batch, &mut kv))
}

/// A loaded model must run, and return the logits of two rows.
fn forward(m: &dyn Model) -> Result<(), String> {
    let vocab = m.config().vocab_size;
    match run_forward(m) {
        Some(Ok(logits)) if logits.len() != 2 * vocab => Err(format!(
            "forward returned {} logits for 2 rows of a {vocab}-token vocabulary",
            logits.len()
        )),
        Some(Ok(_)) => {
            harness::note("ran");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `load_model` on `path`, then a forward pass.
fn load_and_run(path: &Path, quantized: bool) -> Result<(), String> {
    let precision = match quantized {
        true => Precision::Quantized,
        false => Precision::Exact,
    };
    match load_model(
        path,
        &LoadOptions {
            precision,
            kv_dtype: None,
            mtp: false,
        },
    ) {
        Ok(m) => {
            harness::note("loaded");
            forward(&*m.model)
        }
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// A GGUF seed, decoded: what the writer needs to write it again.
#[derive(Clone)]
struct GgufSeed {
    meta: Metadata,
    tensors: Vec<SeedTensor>,
}

#[derive(Clone)]
struct SeedTensor {
    name: String,
    ggml: u32,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn decode_gguf(name: &str, bytes: &[u8], scratch: &Scratch) -> GgufSeed {
    let dir = scratch.write(&vec![(name.to_string(), bytes.to_vec())]);
    let f = read_gguf(&dir.join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"));
    GgufSeed {
        meta: f.metadata.clone(),
        tensors: f
            .tensors
            .iter()
            .map(|t| SeedTensor {
                name: t.name.clone(),
                ggml: t.dtype.ggml_id(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                data: t.bytes().to_vec(),
            })
            .collect(),
    }
}

/// Tensor names the loaders look up, beyond those of the seeds.
const TENSOR_NAMES: &[&str] = &[
    "token_embd.weight",
    "output.weight",
    "output_norm.weight",
    "rope_freqs.weight",
    "blk.0.attn_q.bias",
    "blk.0.attn_k.bias",
    "blk.0.attn_q_norm.weight",
    "blk.0.ffn_gate_inp.weight",
    "blk.0.exp_probs_b.bias",
    "blk.0.ffn_gate_shexp.weight",
    "blk.1.attn_q.weight",
    "blk.2.ffn_down.weight",
    "blk.4294967295.attn_q.weight",
];

/// One edit of the tensor infos (before encoding).
#[derive(Clone, Debug)]
enum TensorOp {
    Dim { t: usize, d: usize, value: u64 },
    Dims { t: usize, dims: Vec<u64> },
    Type { t: usize, ggml: u32 },
    Rename { t: usize, name: usize },
    Remove { t: usize },
    Duplicate { t: usize },
    Resize { t: usize, len: usize },
}

fn tensor_op() -> impl Strategy<Value = TensorOp> {
    let t = any::<usize>;
    let small = prop_oneof![3 => 1..80u64, 1 => interesting_u64()];
    prop_oneof![
        3 => (t(), 0..4usize, small.clone()).prop_map(|(t, d, value)| TensorOp::Dim { t, d, value }),
        1 => (t(), prop::collection::vec(small, 0..6)).prop_map(|(t, dims)| TensorOp::Dims { t, dims }),
        2 => (t(), prop_oneof![0..16u32, 16..42u32, Just(u32::MAX)])
            .prop_map(|(t, ggml)| TensorOp::Type { t, ggml }),
        2 => (t(), any::<usize>()).prop_map(|(t, name)| TensorOp::Rename { t, name }),
        1 => t().prop_map(|t| TensorOp::Remove { t }),
        1 => t().prop_map(|t| TensorOp::Duplicate { t }),
        1 => (t(), 0..4096usize).prop_map(|(t, len)| TensorOp::Resize { t, len }),
    ]
}

fn apply_tensor_ops(tensors: &mut Vec<SeedTensor>, ops: &[TensorOp], names: &[String]) {
    for op in ops {
        let t = match *op {
            TensorOp::Dim { t, .. }
            | TensorOp::Dims { t, .. }
            | TensorOp::Type { t, .. }
            | TensorOp::Rename { t, .. }
            | TensorOp::Remove { t }
            | TensorOp::Duplicate { t }
            | TensorOp::Resize { t, .. } => t,
        };
        let Some(i) = t.checked_rem(tensors.len()) else {
            continue;
        };
        match op {
            TensorOp::Dim { d, value, .. } => {
                let shape = &mut tensors[i].shape;
                if let Some(d) = d.checked_rem(shape.len()) {
                    shape[d] = *value;
                }
            }
            TensorOp::Dims { dims, .. } => tensors[i].shape = dims.clone(),
            TensorOp::Type { ggml, .. } => tensors[i].ggml = *ggml,
            TensorOp::Rename { name, .. } => {
                if let Some(new) = name.checked_rem(names.len()).map(|k| &names[k]) {
                    tensors[i].name = new.clone();
                }
            }
            TensorOp::Remove { .. } => {
                tensors.remove(i);
            }
            TensorOp::Duplicate { .. } => {
                let t = tensors[i].clone();
                tensors.insert(i, t);
            }
            TensorOp::Resize { len, .. } => tensors[i].data.resize(*len, 0x3c),
        }
    }
}

/// Where the encoded header keeps a field, and what kind of field it is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Version,
    Count,
    Length,
    ValueType,
    Scalar,
    Dim,
    GgmlType,
    Offset,
}

const KINDS: [Kind; 8] = [
    Kind::Version,
    Kind::Count,
    Kind::Length,
    Kind::ValueType,
    Kind::Scalar,
    Kind::Dim,
    Kind::GgmlType,
    Kind::Offset,
];

#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    width: usize,
    kind: Kind,
}

/// The header fields of a well-formed GGUF file, in order (the walk stops where the bytes
/// stop making sense).
fn gguf_fields(b: &[u8]) -> Vec<Field> {
    struct W<'a> {
        b: &'a [u8],
        pos: usize,
        out: Vec<Field>,
    }
    impl W<'_> {
        fn num(&mut self, width: usize, kind: Kind) -> Option<u64> {
            let bytes = self.b.get(self.pos..self.pos + width)?;
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(bytes);
            self.out.push(Field {
                at: self.pos,
                width,
                kind,
            });
            self.pos += width;
            Some(u64::from_le_bytes(v))
        }
        fn string(&mut self) -> Option<()> {
            let n = self.num(8, Kind::Length)?;
            self.pos = self.pos.checked_add(usize::try_from(n).ok()?)?;
            (self.pos <= self.b.len()).then_some(())
        }
        fn value(&mut self, ty: u64) -> Option<()> {
            match ty {
                0 | 1 | 7 => self.num(1, Kind::Scalar).map(drop),
                2 | 3 => self.num(2, Kind::Scalar).map(drop),
                4..=6 => self.num(4, Kind::Scalar).map(drop),
                10..=12 => self.num(8, Kind::Scalar).map(drop),
                8 => self.string(),
                9 => {
                    let elem = self.num(4, Kind::ValueType)?;
                    let n = self.num(8, Kind::Count)?;
                    (0..n).try_for_each(|_| self.value(elem))
                }
                _ => None,
            }
        }
        fn walk(&mut self) -> Option<()> {
            self.pos = 4;
            self.num(4, Kind::Version)?;
            let tensors = self.num(8, Kind::Count)?;
            let kvs = self.num(8, Kind::Count)?;
            for _ in 0..kvs {
                self.string()?;
                let ty = self.num(4, Kind::ValueType)?;
                self.value(ty)?;
            }
            for _ in 0..tensors {
                self.string()?;
                let dims = self.num(4, Kind::Count)?;
                for _ in 0..dims {
                    self.num(8, Kind::Dim)?;
                }
                self.num(4, Kind::GgmlType)?;
                self.num(8, Kind::Offset)?;
            }
            Some(())
        }
    }
    let mut w = W {
        b,
        pos: 0,
        out: Vec::new(),
    };
    let _ = w.walk();
    w.out
}

/// One edit of an encoded header field: the `pick`-th field (of kind `kind`, if given) gets
/// an interesting value, or has `delta` added.
#[derive(Clone, Debug)]
struct FieldOp {
    pick: usize,
    kind: Option<usize>,
    value: u64,
    delta: Option<i8>,
}

fn field_op() -> impl Strategy<Value = FieldOp> {
    (
        any::<usize>(),
        prop::option::of(0..KINDS.len()),
        prop_oneof![2 => interesting_u64(), 1 => 0..48u64],
        prop::option::weighted(0.3, any::<i8>()),
    )
        .prop_map(|(pick, kind, value, delta)| FieldOp {
            pick,
            kind,
            value,
            delta,
        })
}

fn apply_field_ops(bytes: &mut [u8], ops: &[FieldOp]) {
    if ops.is_empty() {
        return;
    }
    let fields = gguf_fields(bytes);
    for op in ops {
        let of_kind: Vec<&Field> = fields
            .iter()
            .filter(|f| op.kind.is_none_or(|k| f.kind == KINDS[k]))
            .collect();
        let Some(f) = op.pick.checked_rem(of_kind.len()).map(|i| of_kind[i]) else {
            continue;
        };
        let slot = &mut bytes[f.at..f.at + f.width];
        let mut old = [0u8; 8];
        old[..f.width].copy_from_slice(slot);
        let v = match op.delta {
            Some(d) => u64::from_le_bytes(old).wrapping_add_signed(d as i64),
            None => op.value,
        };
        slot.copy_from_slice(&v.to_le_bytes()[..f.width]);
    }
}

#[derive(Clone, Debug)]
struct GgufPlan {
    seed: usize,
    meta: Vec<MetaOp>,
    tensors: Vec<TensorOp>,
    fields: Vec<FieldOp>,
    bytes: Vec<ByteOp>,
    quantized: bool,
}

fn gguf_plan(seeds: usize) -> impl Strategy<Value = GgufPlan> {
    let ops = |n| 0..=n;
    (
        0..seeds,
        prop::collection::vec(meta_op(), ops(3)),
        prop::collection::vec(tensor_op(), ops(3)),
        prop_oneof![Just(Vec::new()), prop::collection::vec(field_op(), 1..=3)],
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(byte_op(), 1..4)],
        any::<bool>(),
    )
        .prop_map(|(seed, meta, tensors, fields, bytes, quantized)| GgufPlan {
            seed,
            meta,
            tensors,
            fields,
            bytes,
            quantized,
        })
}

/// Arrays whose elements differ in type (after an element edit) become arrays of one type, that
/// of the first differing element, so the writer can encode them.
fn homogenize(v: &mut MetaValue) {
    let MetaValue::Array(items) = v else { return };
    items.iter_mut().for_each(homogenize);
    let Some(first) = items.first().map(std::mem::discriminant) else {
        return;
    };
    let Some(like) = items
        .iter()
        .find(|e| std::mem::discriminant(*e) != first)
        .cloned()
    else {
        return;
    };
    for e in items.iter_mut() {
        if std::mem::discriminant(e) != std::mem::discriminant(&like) {
            *e = like.clone();
        }
    }
}

fn encode_gguf(
    seed: &GgufSeed,
    plan: &GgufPlan,
    keys: &[String],
    pool: &[MetaValue],
    names: &[String],
) -> Vec<u8> {
    let mut meta = seed.meta.clone();
    apply_meta(&mut meta, &plan.meta, keys, pool);
    meta.entries.values_mut().for_each(homogenize);
    let mut tensors = seed.tensors.clone();
    apply_tensor_ops(&mut tensors, &plan.tensors, names);
    let mut w = GgufWriter::new();
    for (k, v) in &meta.entries {
        w.meta(k, v.clone());
    }
    for t in &tensors {
        w.raw_tensor(&t.name, t.ggml, t.shape.clone(), t.data.clone());
    }
    let mut bytes = w.to_bytes().expect("arrays were made homogeneous");
    apply_field_ops(&mut bytes, &plan.fields);
    apply_bytes(&mut bytes, &plan.bytes);
    bytes
}

fn check_gguf(scratch: &Scratch, bytes: &[u8], quantized: bool) -> Result<(), String> {
    let dir = scratch.write(&vec![("model.gguf".into(), bytes.to_vec())]);
    let path = dir.join("model.gguf");
    match read_gguf(&path) {
        Ok(f) => {
            harness::note("read");
            for t in &f.tensors {
                let want = t.dtype.row_bytes(t.shape[0]).map(|r| r * t.rows());
                if want != Some(t.bytes().len()) {
                    return Err(format!(
                        "tensor `{}` {:?} {:?} has {} bytes",
                        t.name,
                        t.dtype,
                        t.shape,
                        t.bytes().len()
                    ));
                }
            }
        }
        Err(e) => return one_line(&e),
    }
    load_and_run(&path, quantized)
}

#[test]
fn fuzz_gguf() {
    let scratch = Arc::new(Scratch::new("gguf"));
    let corpus = harness::corpus("gguf");
    let seeds: Vec<GgufSeed> = corpus
        .iter()
        .map(|(name, files)| decode_gguf(name, &files[0].1, &scratch))
        .collect();
    let metas: Vec<Metadata> = seeds.iter().map(|s| s.meta.clone()).collect();
    let keys = meta::key_pool(&metas);
    let pool = meta::value_pool(&metas);
    let mut names: Vec<String> = TENSOR_NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(
        seeds
            .iter()
            .flat_map(|s| s.tensors.iter().map(|t| t.name.clone())),
    );
    names.sort();
    names.dedup();

    let n = seeds.len();
    let s = Arc::clone(&scratch);
    let target = Target {
        name: "gguf",
        build: Box::new(move |p: &GgufPlan| {
            (
                encode_gguf(&seeds[p.seed], p, &keys, &pool, &names),
                p.quantized,
            )
        }),
        files: Box::new(|(bytes, _): &(Vec<u8>, bool)| vec![("model.gguf".into(), bytes.clone())]),
        check: Box::new(move |(bytes, q): &(Vec<u8>, bool)| check_gguf(&s, bytes, *q)),
    };
    let replay: Vec<(Vec<u8>, bool)> = corpus
        .into_iter()
        .flat_map(|(_, files)| [(files[0].1.clone(), false), (files[0].1.clone(), true)])
        .collect();
    harness::fuzz(&target, &replay, gguf_plan(n));
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// A safetensors file split into its header (as JSON) and its data section.
#[derive(Clone)]
struct StSeed {
    header: Value,
    data: Vec<u8>,
}

fn split_safetensors(bytes: &[u8]) -> StSeed {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    StSeed {
        header: serde_json::from_slice(&bytes[8..8 + n]).expect("seed header is JSON"),
        data: bytes[8 + n..].to_vec(),
    }
}

/// Edits of a safetensors file: its JSON header, the header's padding and length prefix, bytes.
#[derive(Clone, Debug)]
struct StPlan {
    header: JsonPlan,
    /// Pad the header with spaces to a multiple of 8 (the reference writer does).
    align: bool,
    /// Add this to the length prefix, or replace it.
    len_delta: i8,
    len: Option<u64>,
    bytes: Vec<ByteOp>,
}

fn st_plan() -> impl Strategy<Value = StPlan> {
    (
        json_plan(4),
        any::<bool>(),
        prop_oneof![6 => Just(0i8), 1 => any::<i8>()],
        prop::option::weighted(0.1, interesting_u64()),
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(byte_op(), 1..4)],
    )
        .prop_map(|(header, align, len_delta, len, bytes)| StPlan {
            header,
            align,
            len_delta,
            len,
            bytes,
        })
}

fn encode_safetensors(seed: &StSeed, plan: &StPlan, pool: &[Value]) -> Vec<u8> {
    let mut header = plan.header.apply(&seed.header, pool);
    if plan.align {
        header.resize(header.len().next_multiple_of(8), b' ');
    }
    let len = plan
        .len
        .unwrap_or((header.len() as u64).wrapping_add_signed(plan.len_delta as i64));
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&seed.data);
    apply_bytes(&mut out, &plan.bytes);
    out
}

fn elem_bytes(d: DType) -> usize {
    match d {
        DType::F32 => 4,
        _ => 2,
    }
}

fn check_safetensors(scratch: &Scratch, bytes: &[u8]) -> Result<(), String> {
    let dir = scratch.write(&vec![("model.safetensors".into(), bytes.to_vec())]);
    match read_safetensors(&dir.join("model.safetensors")) {
        Ok(tensors) => {
            harness::note("read");
            for t in tensors {
                if t.bytes().len() != t.numel() * elem_bytes(t.dtype) {
                    return Err(format!(
                        "tensor `{}` {:?} {:?} has {} bytes",
                        t.name,
                        t.dtype,
                        t.shape,
                        t.bytes().len()
                    ));
                }
            }
            Ok(())
        }
        Err(e) => one_line(&e),
    }
}

#[test]
fn fuzz_safetensors() {
    let scratch = Arc::new(Scratch::new("safetensors"));
    let corpus = harness::corpus("safetensors");
    let seeds: Vec<StSeed> = corpus
        .iter()
        .map(|(_, files)| split_safetensors(&files[0].1))
        .collect();
    let pool = json_pool(
        &seeds.iter().map(|s| s.header.clone()).collect::<Vec<_>>(),
        200,
    );
    let n = seeds.len();
    let s = Arc::clone(&scratch);
    let target = Target {
        name: "safetensors",
        build: Box::new(move |(seed, plan): &(usize, StPlan)| {
            encode_safetensors(&seeds[*seed], plan, &pool)
        }),
        files: Box::new(|b: &Vec<u8>| vec![("model.safetensors".into(), b.clone())]),
        check: Box::new(move |b: &Vec<u8>| check_safetensors(&s, b)),
    };
    let replay: Vec<Vec<u8>> = corpus.into_iter().map(|(_, f)| f[0].1.clone()).collect();
    harness::fuzz(&target, &replay, (0..n, st_plan()));
}

/// One file of an HF model directory, split for editing.
#[derive(Clone)]
enum DirFile {
    Json(Value),
    Safetensors(StSeed),
}

/// An HF model directory: `config.json`, the weights (one file, or shards and their index).
#[derive(Clone)]
struct DirSeed {
    /// Name, the file split for editing, the file as it is.
    files: Vec<(String, DirFile, Vec<u8>)>,
}

/// Edits of an HF directory: `config.json`, and one other file (the JSON plan for an index,
/// the safetensors plan for weights).
#[derive(Clone, Debug)]
struct DirPlan {
    seed: usize,
    config: JsonPlan,
    other: Option<(usize, JsonPlan, StPlan)>,
    quantized: bool,
}

impl DirSeed {
    fn of(files: &Files) -> DirSeed {
        let split = |name: &str, bytes: &[u8]| match name.ends_with(".json") {
            true => DirFile::Json(serde_json::from_slice(bytes).expect("seed JSON")),
            false => DirFile::Safetensors(split_safetensors(bytes)),
        };
        DirSeed {
            files: files
                .iter()
                .map(|(n, b)| (n.clone(), split(n, b), b.clone()))
                .collect(),
        }
    }

    fn edit(&self, p: &DirPlan, pool: &[Value]) -> Files {
        let others: Vec<usize> = (0..self.files.len())
            .filter(|&i| self.files[i].0 != "config.json")
            .collect();
        let other = p
            .other
            .as_ref()
            .and_then(|(i, json, st)| Some((*others.get(i % others.len().max(1))?, json, st)));
        self.files
            .iter()
            .enumerate()
            .map(|(i, (name, file, bytes))| {
                let edited = match (file, other) {
                    (DirFile::Json(v), _) if name == "config.json" => p.config.apply(v, pool),
                    (DirFile::Json(v), Some((o, json, _))) if o == i => json.apply(v, pool),
                    (DirFile::Safetensors(st), Some((o, _, plan))) if o == i => {
                        encode_safetensors(st, plan, pool)
                    }
                    _ => bytes.clone(),
                };
                (name.clone(), edited)
            })
            .collect()
    }
}

/// The seeds of the directory target: the tiny models of `tests/fixtures/hf`, then the
/// directories of `tests/fuzz-corpus/safetensors_dir` (past failures).
fn dir_seeds() -> Vec<(String, Files)> {
    let fixtures = harness::repo_root().join("tests/fixtures/hf");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .expect("tests/fixtures/hf")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("model.safetensors").is_file())
        .collect();
    dirs.sort();
    let mut out: Vec<(String, Files)> = dirs
        .iter()
        .map(|d| {
            let read = |n: &str| (n.to_string(), std::fs::read(d.join(n)).expect("fixture"));
            (
                d.display().to_string(),
                vec![read("config.json"), read("model.safetensors")],
            )
        })
        .collect();
    out.extend(harness::corpus("safetensors_dir"));
    out
}

#[test]
fn fuzz_safetensors_dir() {
    let scratch = Arc::new(Scratch::new("safetensors_dir"));
    let corpus = dir_seeds();
    let seeds: Vec<DirSeed> = corpus.iter().map(|(_, f)| DirSeed::of(f)).collect();
    let docs: Vec<Value> = seeds
        .iter()
        .flat_map(|s| &s.files)
        .map(|(_, f, _)| match f {
            DirFile::Json(v) => v.clone(),
            DirFile::Safetensors(st) => st.header.clone(),
        })
        .collect();
    let pool = json_pool(&docs, 300);
    let n = seeds.len();
    let other = prop::option::of((any::<usize>(), json_plan(3), st_plan()));
    let plans =
        (0..n, json_plan(4), other, any::<bool>()).prop_map(|(seed, config, other, quantized)| {
            DirPlan {
                seed,
                config,
                other,
                quantized,
            }
        });
    let s = Arc::clone(&scratch);
    let target = Target {
        name: "safetensors_dir",
        build: Box::new(move |p: &DirPlan| (seeds[p.seed].edit(p, &pool), p.quantized)),
        files: Box::new(|(files, _): &(Files, bool)| files.clone()),
        check: Box::new(move |(files, q): &(Files, bool)| load_and_run(s.write(files), *q)),
    };
    let replay: Vec<(Files, bool)> = corpus.into_iter().map(|(_, f)| (f, false)).collect();
    harness::fuzz(&target, &replay, plans);
}

/// Every model seed loads and runs (a seed that fails early keeps the fuzzer out of the code
/// behind the failing check).
#[test]
fn model_seeds_load_and_run() {
    let scratch = Scratch::new("seeds");
    for (name, files) in harness::corpus("gguf") {
        let path = scratch.write(&files).join(&name);
        let has_model = read_gguf(&path)
            .expect("seed reads")
            .metadata
            .get("general.architecture")
            .is_some();
        if has_model {
            let m = load_model(&path, &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let logits = run_forward(&*m.model).map(|r| r.map_err(|e| e.to_string()));
            assert!(matches!(logits, Some(Ok(_))), "{name}: {logits:?}");
        }
    }
    for (name, files) in dir_seeds() {
        let m = load_model(scratch.write(&files), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let logits = run_forward(&*m.model).map(|r| r.map_err(|e| e.to_string()));
        assert!(matches!(logits, Some(Ok(_))), "{name}: {logits:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions

/// Found by fuzzing: per-layer tables were sized by the layer count before `validate` bounded
/// it. A GGUF `block_count` or an HF `num_hidden_layers` of 2^31 made a 2 GiB allocation for a
/// kilobyte file (the fuzz binary's allocator aborts on it); larger counts panicked with
/// "capacity overflow". Each must be an error.
#[test]
fn regression_huge_layer_counts_are_errors() {
    let scratch = Scratch::new("regression_layers");
    for (name, files) in harness::corpus("gguf") {
        let seed = decode_gguf(&name, &files[0].1, &scratch);
        let Some(MetaValue::String(arch)) = seed.meta.get("general.architecture").cloned() else {
            continue;
        };
        for huge in [
            MetaValue::U32(1 << 31),
            MetaValue::U64(1 << 40),
            MetaValue::I64(i64::MAX),
        ] {
            let mut seed = seed.clone();
            seed.meta
                .entries
                .insert(format!("{arch}.block_count"), huge.clone());
            let plan = GgufPlan {
                seed: 0,
                meta: Vec::new(),
                tensors: Vec::new(),
                fields: Vec::new(),
                bytes: Vec::new(),
                quantized: false,
            };
            let bytes = encode_gguf(&seed, &plan, &[], &[], &[]);
            let path = scratch
                .write(&vec![("m.gguf".into(), bytes)])
                .join("m.gguf");
            let loaded = load_model(&path, &LoadOptions::default());
            assert!(loaded.is_err(), "{name}: a block count of {huge:?} loads");
        }
    }
    for (name, files) in dir_seeds() {
        for huge in [1u64 << 31, 1 << 40, 1 << 63] {
            let mut files = files.clone();
            for (file, bytes) in files.iter_mut().filter(|(f, _)| f == "config.json") {
                let mut config: Value = serde_json::from_slice(bytes).expect(file);
                config["num_hidden_layers"] = Value::from(huge);
                *bytes = serde_json::to_vec(&config).expect("json");
            }
            let loaded = load_model(scratch.write(&files), &LoadOptions::default());
            assert!(loaded.is_err(), "{name}: {huge} hidden layers load");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The seed corpus

fn f32_bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32;
            (x / (1 << 24) as f32 - 0.5).to_le_bytes()
        })
        .collect()
}

/// `n` elements of `dtype` (random-looking f32 values encoded, or Q8_0 blocks of them).
fn weights(dtype: DType, n: usize, seed: u32) -> Vec<u8> {
    let f = f32_bytes(n, seed);
    let floats: Vec<f32> = f
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    match dtype {
        DType::F32 => f,
        DType::F16 => floats
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::BF16 => floats
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        DType::Q8_0 => floats
            .chunks(32)
            .flat_map(|b| {
                let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
                out.extend(b.iter().map(|x| (x / d.max(1e-9)).round() as i8 as u8));
                out
            })
            .collect(),
        other => panic!("no seed encoder for {other:?}"),
    }
}

struct TinySpec<'a> {
    arch: &'a str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    layers: usize,
    vocab: usize,
    dtype: DType,
    tied: bool,
    qk_norm: bool,
    gemma: bool,
    /// Experts: (count, used, expert ffn); layer 0 stays dense.
    moe: Option<(usize, usize, usize)>,
}

/// A tiny random model of `spec` with its metadata (no tokenizer).
fn tiny_model(spec: &TinySpec) -> GgufWriter {
    let s = spec;
    let mut w = GgufWriter::new();
    let a = s.arch;
    let u = |w: &mut GgufWriter, k: &str, v: usize| {
        w.meta(&format!("{a}.{k}"), MetaValue::U32(v as u32));
    };
    w.meta("general.architecture", MetaValue::String(a.into()));
    u(&mut w, "block_count", s.layers);
    u(&mut w, "context_length", 64);
    u(&mut w, "embedding_length", s.hidden);
    u(&mut w, "feed_forward_length", s.ffn);
    u(&mut w, "attention.head_count", s.heads);
    u(&mut w, "attention.head_count_kv", s.kv_heads);
    u(&mut w, "attention.key_length", s.head_dim);
    u(&mut w, "attention.value_length", s.head_dim);
    w.meta(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(1e-6),
    );
    w.meta(&format!("{a}.rope.freq_base"), MetaValue::F32(10000.0));
    if s.gemma {
        u(&mut w, "attention.sliding_window", 4);
        w.meta(
            &format!("{a}.final_logit_softcapping"),
            MetaValue::F32(30.0),
        );
    }
    if let Some((e, used, f)) = s.moe {
        u(&mut w, "expert_count", e);
        u(&mut w, "expert_used_count", used);
        u(&mut w, "expert_feed_forward_length", f);
    }
    let mut k = 0u32;
    let mut t = |w: &mut GgufWriter, name: &str, dtype: DType, shape: &[usize]| {
        k += 1;
        let n = shape.iter().product();
        w.tensor(name, dtype, shape, weights(dtype, n, k));
    };
    let (h, hd) = (s.hidden, s.head_dim);
    t(&mut w, "token_embd.weight", s.dtype, &[h, s.vocab]);
    t(&mut w, "output_norm.weight", DType::F32, &[h]);
    if !s.tied {
        t(&mut w, "output.weight", s.dtype, &[h, s.vocab]);
    }
    for i in 0..s.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        t(&mut w, &p("attn_norm.weight"), DType::F32, &[h]);
        t(&mut w, &p("ffn_norm.weight"), DType::F32, &[h]);
        t(&mut w, &p("attn_q.weight"), s.dtype, &[h, s.heads * hd]);
        t(&mut w, &p("attn_k.weight"), s.dtype, &[h, s.kv_heads * hd]);
        t(&mut w, &p("attn_v.weight"), s.dtype, &[h, s.kv_heads * hd]);
        t(
            &mut w,
            &p("attn_output.weight"),
            s.dtype,
            &[s.heads * hd, h],
        );
        if s.qk_norm {
            t(&mut w, &p("attn_q_norm.weight"), DType::F32, &[hd]);
            t(&mut w, &p("attn_k_norm.weight"), DType::F32, &[hd]);
        }
        if s.gemma {
            t(&mut w, &p("post_attention_norm.weight"), DType::F32, &[h]);
            t(&mut w, &p("post_ffw_norm.weight"), DType::F32, &[h]);
        }
        match s.moe {
            Some((e, _, f)) if i > 0 => {
                t(&mut w, &p("ffn_gate_inp.weight"), DType::F32, &[h, e]);
                t(&mut w, &p("ffn_gate_exps.weight"), s.dtype, &[h, f, e]);
                t(&mut w, &p("ffn_up_exps.weight"), s.dtype, &[h, f, e]);
                t(&mut w, &p("ffn_down_exps.weight"), s.dtype, &[f, h, e]);
            }
            _ => {
                t(&mut w, &p("ffn_gate.weight"), s.dtype, &[h, s.ffn]);
                t(&mut w, &p("ffn_up.weight"), s.dtype, &[h, s.ffn]);
                t(&mut w, &p("ffn_down.weight"), s.dtype, &[s.ffn, h]);
            }
        }
    }
    w
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if \
                      add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A byte-level BPE vocabulary (`gpt2`): three control tokens, printable ASCII, `Ġ` and merges.
fn bpe_tokenizer(w: &mut GgufWriter, pre: &str) -> usize {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
    tokens.push("\u{0120}".into());
    let merges = [
        "\u{0120} t",
        "h e",
        "\u{0120}t he",
        "l l",
        "o r",
        "\u{0120} w",
    ];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let mut types = vec![MetaValue::I32(3); 3];
    types.resize(tokens.len(), MetaValue::I32(1));
    w.meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", MetaValue::String(pre.into()))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.iter().cloned().map(MetaValue::String).collect()),
        )
        .meta("tokenizer.ggml.token_type", MetaValue::Array(types))
        .meta(
            "tokenizer.ggml.merges",
            MetaValue::Array(
                merges
                    .iter()
                    .map(|m| MetaValue::String(m.to_string()))
                    .collect(),
            ),
        )
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(0))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .meta("tokenizer.chat_template", MetaValue::String(CHATML.into()));
    tokens.len()
}

/// A SentencePiece vocabulary (`llama`): unknown, BOS, EOS, the 256 byte tokens and pieces.
fn spm_tokenizer(w: &mut GgufWriter) -> usize {
    let mut tokens: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    for (t, score) in [
        ("\u{2581}", -1.0),
        ("a", -2.0),
        ("b", -2.0),
        ("\u{2581}a", -1.5),
        ("ab", -3.0),
        ("\u{2581}ab", -0.5),
        ("<start_of_turn>", 0.0),
        ("<end_of_turn>", 0.0),
    ] {
        let ty = if t.starts_with('<') { 3 } else { 1 };
        tokens.push((t.into(), score, ty));
    }
    w.meta("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(
                tokens
                    .iter()
                    .map(|t| MetaValue::String(t.0.clone()))
                    .collect(),
            ),
        )
        .meta(
            "tokenizer.ggml.scores",
            MetaValue::Array(tokens.iter().map(|t| MetaValue::F32(t.1)).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(tokens.iter().map(|t| MetaValue::I32(t.2)).collect()),
        )
        .meta("tokenizer.ggml.add_space_prefix", MetaValue::Bool(true))
        .meta(
            "tokenizer.chat_template",
            MetaValue::String(
                "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ \
                 m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt \
                 %}<start_of_turn>model\n{% endif %}"
                    .into(),
            ),
        );
    tokens.len()
}

/// Writes the GGUF and safetensors seeds of `tests/fuzz-corpus/` (run with `--ignored` after
/// changing them; the files are committed).
#[test]
#[ignore = "writes the committed seed corpus"]
fn write_seed_corpus() {
    let root = harness::repo_root().join("tests/fuzz-corpus");
    let put = |dir: &str, name: &str, bytes: Vec<u8>| {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).expect("corpus dir");
        std::fs::write(d.join(name), bytes).expect("corpus file");
    };
    let base = TinySpec {
        arch: "llama",
        hidden: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        ffn: 16,
        layers: 1,
        vocab: 0,
        dtype: DType::F32,
        tied: false,
        qk_norm: false,
        gemma: false,
        moe: None,
    };

    let vocab = bpe_tokenizer(&mut GgufWriter::new(), "llama-bpe");
    let mut w = tiny_model(&TinySpec { vocab, ..base });
    bpe_tokenizer(&mut w, "llama-bpe");
    put("gguf", "llama-bpe.gguf", w.to_bytes().expect("seed"));

    let vocab = spm_tokenizer(&mut GgufWriter::new());
    let mut w = tiny_model(&TinySpec {
        arch: "qwen3",
        hidden: 32,
        head_dim: 16,
        ffn: 32,
        vocab,
        dtype: DType::Q8_0,
        tied: true,
        qk_norm: true,
        ..base
    });
    spm_tokenizer(&mut w);
    w.meta("general.alignment", MetaValue::U32(64));
    put("gguf", "qwen3-spm-q8.gguf", w.to_bytes().expect("seed"));

    let vocab = bpe_tokenizer(&mut GgufWriter::new(), "default");
    let mut w = tiny_model(&TinySpec {
        arch: "gemma3",
        layers: 2,
        vocab,
        dtype: DType::F16,
        tied: true,
        qk_norm: true,
        gemma: true,
        ..base
    });
    bpe_tokenizer(&mut w, "default");
    put("gguf", "gemma3-f16.gguf", w.to_bytes().expect("seed"));

    let w = tiny_model(&TinySpec {
        arch: "qwen3moe",
        layers: 2,
        vocab: 24,
        dtype: DType::BF16,
        qk_norm: true,
        moe: Some((4, 2, 8)),
        ..base
    });
    put("gguf", "qwen3moe-bf16.gguf", w.to_bytes().expect("seed"));

    let mut w = GgufWriter::new();
    for (k, v) in [
        ("u8", MetaValue::U8(200)),
        ("i16", MetaValue::I16(-30000)),
        ("u64", MetaValue::U64(u64::MAX)),
        ("f64", MetaValue::F64(-2.25e300)),
        ("bool", MetaValue::Bool(true)),
        ("string", MetaValue::String("h\u{e9}llo\n".into())),
        (
            "nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::String("x".into())]),
                MetaValue::Array(vec![]),
            ]),
        ),
    ] {
        w.meta(k, v);
    }
    w.tensor("q4", DType::Q4_0, &[32, 2], vec![7; 36]);
    put("gguf", "value-types.gguf", w.to_bytes().expect("seed"));

    // safetensors: every dtype, a scalar, an empty tensor; one file with its data section at an
    // odd offset (tensors copied, not mapped).
    let specs: Vec<StSpec> = vec![
        (
            "model.embed_tokens.weight",
            "F32",
            vec![3, 2],
            f32_bytes(6, 1),
        ),
        ("model.norm.weight", "BF16", vec![3], vec![1, 2, 3, 4, 5, 6]),
        (
            "model.layers.0.self_attn.q_proj.weight",
            "F16",
            vec![2, 2],
            vec![9; 8],
        ),
        ("scalar", "F32", vec![], f32_bytes(1, 2)),
        ("empty", "F32", vec![0, 4], Vec::new()),
    ];
    put("safetensors", "aligned.safetensors", st_file(&specs, true));
    put(
        "safetensors",
        "odd-offset.safetensors",
        st_file(&specs, false),
    );

    // A tiny tied Llama as a sharded checkpoint: the index and two shards (F32 and BF16).
    let (h, ff, vocab) = (8, 16, 16);
    let f32s = |n: &'static str, shape: Vec<usize>, seed: u32| -> StSpec {
        let n_el = shape.iter().product();
        (n, "F32", shape, weights(DType::F32, n_el, seed))
    };
    let bf16s = |n: &'static str, shape: Vec<usize>, seed: u32| -> StSpec {
        let n_el = shape.iter().product();
        (n, "BF16", shape, weights(DType::BF16, n_el, seed))
    };
    let first = vec![
        f32s("model.embed_tokens.weight", vec![vocab, h], 1),
        f32s("model.norm.weight", vec![h], 2),
        f32s("model.layers.0.input_layernorm.weight", vec![h], 3),
        f32s("model.layers.0.post_attention_layernorm.weight", vec![h], 4),
    ];
    let second = vec![
        bf16s("model.layers.0.self_attn.q_proj.weight", vec![h, h], 5),
        bf16s("model.layers.0.self_attn.k_proj.weight", vec![4, h], 6),
        bf16s("model.layers.0.self_attn.v_proj.weight", vec![4, h], 7),
        bf16s("model.layers.0.self_attn.o_proj.weight", vec![h, h], 8),
        bf16s("model.layers.0.mlp.gate_proj.weight", vec![ff, h], 9),
        bf16s("model.layers.0.mlp.up_proj.weight", vec![ff, h], 10),
        bf16s("model.layers.0.mlp.down_proj.weight", vec![h, ff], 11),
    ];
    let shards = [
        ("model-00001-of-00002.safetensors", &first),
        ("model-00002-of-00002.safetensors", &second),
    ];
    let mut weight_map = serde_json::Map::new();
    for (shard, specs) in shards {
        for (n, ..) in specs.iter() {
            weight_map.insert(n.to_string(), Value::from(shard));
        }
        put("safetensors_dir/llama-sharded", shard, st_file(specs, true));
    }
    let json = |v: Value| serde_json::to_vec_pretty(&v).expect("json");
    put(
        "safetensors_dir/llama-sharded",
        "model.safetensors.index.json",
        json(serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map})),
    );
    put(
        "safetensors_dir/llama-sharded",
        "config.json",
        json(serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h,
            "intermediate_size": ff, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": vocab, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true
        })),
    );
}

/// One tensor of a safetensors file: HF name, dtype, row-major shape, bytes.
type StSpec<'a> = (&'a str, &'a str, Vec<usize>, Vec<u8>);

/// A safetensors file of `specs`; `align` pads the header to a multiple of 8 (as the reference
/// writer does), otherwise the data section starts at an odd offset.
fn st_file(specs: &[StSpec], align: bool) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0;
    for (n, dtype, shape, data) in specs {
        header.insert(
            n.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                               "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    let pad = match align {
        true => h.len().next_multiple_of(8) - h.len(),
        false => 1 - h.len() % 2,
    };
    h.resize(h.len() + pad, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, _, _, data) in specs {
        out.extend_from_slice(data);
    }
    out
}
