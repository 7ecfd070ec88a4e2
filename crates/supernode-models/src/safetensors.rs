//! HF checkpoints: `config.json` plus safetensors weights, one file or index-listed shards.
//!
//! A safetensors file is a u64 little-endian header length `N`, `N` bytes of JSON
//! (`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`, offsets
//! relative to the data section), then the data section. Files are memory-mapped; a tensor
//! stays a [`Storage::Mapped`] range unless its bytes are not aligned to its element size
//! within the map (the map itself is page-aligned), in which case it is copied into
//! [`Storage::Owned`].
//!
//! What [`read_safetensors_dir`] returns uses llama.cpp's conventions for names and shapes
//! only: names are mapped to GGUF names by [`crate::names`], shapes are reversed into ggml
//! order (innermost first), and the per-expert matrices of MoE layers are stacked into one
//! 3-D tensor per layer and kind (`ffn_gate_exps`: `[cols, rows, n_experts]`, a copy, as
//! llama.cpp's converter stacks them). Values are the checkpoint's own: no Q/K row permutation for
//! llama and no `+1` on Gemma norm weights (llama.cpp's converter does both); the model
//! config tells the model code which convention its weights follow.
//!
//! Every header number is checked before use (header length against the file and a 100 MB
//! cap, offsets against the data section, byte counts against shape × dtype size). A
//! checkpoint tensor with no GGUF name is an error, not a silently unused weight: unknown
//! weights mean a model we would compute wrongly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;
use serde_json::Value;
use supernode_kernels::DType;

use crate::names::{hf_expert_to_gguf, hf_to_gguf, is_ignorable, qwen_mtp_as_layer};
use crate::{ModelError, Result, Shown, Storage, Tensor};

/// The largest JSON header accepted (the format's reference implementation uses the same).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An HF model directory, read.
#[derive(Debug)]
pub struct SafetensorsModel {
    pub dir: PathBuf,
    /// `config.json`, as parsed (an object).
    pub config: Value,
    /// Tensors under their GGUF names, shapes in ggml order.
    pub tensors: Vec<Tensor>,
}

impl SafetensorsModel {
    /// The tensor with GGUF name `name`, if the checkpoint has one.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(&self) -> Option<&str> {
        self.config.get("model_type").and_then(Value::as_str)
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// One header entry.
#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Read one safetensors file: its tensors under their HF names, shapes in ggml order.
pub fn read_safetensors(path: &Path) -> Result<Vec<Tensor>> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    if len == 0 {
        return Err(format_err(
            path,
            "the file is empty, not a safetensors file",
        ));
    }
    // SAFETY: a read-only private map; a file rewritten by another process while mapped is
    // outside our control, as for every memory-mapped loader.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
    parse(path, Arc::new(map))
}

fn parse(path: &Path, map: Arc<Mmap>) -> Result<Vec<Tensor>> {
    let err = |msg: String| format_err(path, msg);
    let buf: &[u8] = &map;
    let mut len_bytes = [0u8; 8];
    match buf.get(..8) {
        Some(b) => len_bytes.copy_from_slice(b),
        None => {
            return Err(err(format!(
                "truncated: {} bytes, shorter than the 8-byte header length of a safetensors file",
                buf.len()
            )))
        }
    }
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(err(format!(
            "not a safetensors file, or corrupt: the header length is {n} bytes \
             (the limit is {MAX_HEADER_BYTES})"
        )));
    }
    let header_end = usize::try_from(n).ok().and_then(|n| n.checked_add(8));
    let Some(header) = header_end.and_then(|end| buf.get(8..end)) else {
        return Err(err(format!(
            "truncated or corrupt: the header length is {n} bytes but the file has only {}",
            buf.len()
        )));
    };
    let data_start = 8 + header.len();
    let data_len = buf.len() - data_start;
    let entries: BTreeMap<String, Value> = serde_json::from_slice(header)
        .map_err(|e| err(format!("the header is not a JSON object: {e}")))?;

    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let shown = Shown(&name);
        let entry: Entry = serde_json::from_value(value).map_err(|e| {
            err(format!(
                "tensor `{shown}` has a malformed header entry: {e}"
            ))
        })?;
        // Integer tensors (DeepSeek-V4's `tid2eid` expert table) are read as f32 values,
        // which hold every integer up to 2^24 exactly.
        let (dtype, elem, int) = match entry.dtype.as_str() {
            "F32" => (DType::F32, 4, false),
            "F16" => (DType::F16, 2, false),
            "BF16" => (DType::BF16, 2, false),
            "I64" => (DType::F32, 8, true),
            "I32" => (DType::F32, 4, true),
            other => {
                return Err(err(format!(
                    "tensor `{shown}` has dtype {}, which supernode does not support \
                     (supported: F32, F16, BF16, and I32/I64 as numbers up to 2^24)",
                    Shown(other)
                )))
            }
        };
        let shape: Option<Vec<usize>> = entry
            .shape
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).ok())
            .collect();
        let size = shape.as_ref().and_then(|s| {
            s.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))?
                .checked_mul(elem)
        });
        let (Some(mut shape), Some(size)) = (shape, size) else {
            return Err(err(format!(
                "tensor `{shown}` has shape {:?}, whose size overflows",
                entry.shape
            )));
        };
        let (begin, end) = entry.data_offsets;
        let range = usize::try_from(begin)
            .ok()
            .zip(usize::try_from(end).ok())
            .filter(|&(b, e)| b <= e && e <= data_len);
        let Some((begin, end)) = range else {
            return Err(err(format!(
                "truncated or corrupt: tensor `{shown}` has data offsets [{begin}, {end}], \
                 outside the {data_len}-byte data section"
            )));
        };
        if end - begin != size {
            return Err(err(format!(
                "tensor `{shown}` ({} {:?}) should have {size} bytes but its data offsets \
                 [{begin}, {end}] span {}",
                Shown(&entry.dtype),
                entry.shape,
                end - begin
            )));
        }
        if shape.is_empty() {
            shape.push(1);
        }
        let (start, stop) = (data_start + begin, data_start + end);
        let storage = if int {
            // In range: checked against the data section above.
            let bytes = buf.get(start..stop).unwrap_or_default();
            let mut values = Vec::with_capacity(bytes.len() / elem * 4);
            for b in bytes.chunks_exact(elem) {
                let v = match elem {
                    8 => i64::from_le_bytes(b.try_into().unwrap_or_default()),
                    _ => i32::from_le_bytes(b.try_into().unwrap_or_default()).into(),
                };
                if v.unsigned_abs() > 1 << 24 {
                    return Err(err(format!(
                        "tensor `{shown}` holds the integer {v}, beyond the 2^24 that \
                         supernode reads integer tensors up to"
                    )));
                }
                values.extend((v as f32).to_le_bytes());
            }
            Storage::Owned(Arc::new(values))
        } else if start % elem == 0 {
            Storage::Mapped(Arc::clone(&map), start..stop)
        } else {
            // In range: checked against the data section above.
            let bytes = buf.get(start..stop).map(<[u8]>::to_vec).unwrap_or_default();
            Storage::Owned(Arc::new(bytes))
        };
        tensors.push(Tensor {
            name,
            dtype,
            shape,
            storage,
        });
    }
    Ok(tensors)
}

/// Read an HF model directory: `config.json`, then `model.safetensors` or the shards that
/// `model.safetensors.index.json` lists; tensors are renamed to GGUF names.
pub fn read_safetensors_dir(dir: &Path) -> Result<SafetensorsModel> {
    let config_path = dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format_err(
                dir,
                "no config.json (a safetensors model directory needs one next to the weights)",
            )
        } else {
            io_err(&config_path, e)
        }
    })?;
    let config: Value = serde_json::from_str(&config_text)
        .map_err(|e| format_err(&config_path, format!("not valid JSON: {e}")))?;
    if !config.is_object() {
        return Err(format_err(&config_path, "should hold a JSON object"));
    }
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| format_err(&config_path, "has no string `model_type`"))?
        .to_owned();

    let index_path = dir.join(INDEX_FILE);
    let single_path = dir.join(SINGLE_FILE);
    let hf_tensors = if index_path.is_file() {
        read_sharded(dir, &index_path)?
    } else if single_path.is_file() {
        read_safetensors(&single_path)?
    } else {
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        found.sort();
        let found = match found.is_empty() {
            true => String::new(),
            false => format!(" (it has {})", found.join(", ")),
        };
        return Err(format_err(
            dir,
            format!("has neither {SINGLE_FILE} nor {INDEX_FILE}{found}"),
        ));
    };

    let tensors = rename(dir, &config, &model_type, hf_tensors)?;
    Ok(SafetensorsModel {
        dir: dir.to_path_buf(),
        config,
        tensors,
    })
}

/// The shards an index lists, every listed tensor checked to be in its shard.
fn read_sharded(dir: &Path, index_path: &Path) -> Result<Vec<Tensor>> {
    let err = |msg: String| format_err(index_path, msg);
    let text = std::fs::read_to_string(index_path).map_err(|e| io_err(index_path, e))?;
    let index: Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let Some(weight_map) = index.get("weight_map").and_then(Value::as_object) else {
        return Err(err("has no `weight_map` object".into()));
    };
    let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, file) in weight_map {
        let Some(file) = file.as_str() else {
            return Err(err(format!(
                "`weight_map` entry `{}` is not a file name",
                Shown(name)
            )));
        };
        let plain = !file.is_empty()
            && Path::new(file)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(err(format!(
                "`weight_map` entry `{}` names `{}`, not a file inside the model directory",
                Shown(name),
                Shown(file)
            )));
        }
        by_shard.entry(file).or_default().push(name);
    }
    let mut tensors = Vec::new();
    let mut source: HashMap<String, &str> = HashMap::new();
    for (file, names) in by_shard {
        let shard_path = dir.join(file);
        if !shard_path.is_file() {
            return Err(err(format!(
                "shard `{}` (listed in `weight_map`) does not exist",
                Shown(file)
            )));
        }
        let shard = read_safetensors(&shard_path)?;
        let present: HashSet<&str> = shard.iter().map(|t| t.name.as_str()).collect();
        if let Some(missing) = names.iter().find(|n| !present.contains(**n)) {
            return Err(err(format!(
                "tensor `{}` is listed in shard `{}` but that shard does not have it",
                Shown(missing),
                Shown(file)
            )));
        }
        for t in shard {
            if let Some(other) = source.insert(t.name.clone(), file) {
                return Err(err(format!(
                    "tensor `{}` is in both shard `{}` and shard `{}`",
                    Shown(&t.name),
                    Shown(other),
                    Shown(file)
                )));
            }
            tensors.push(t);
        }
    }
    Ok(tensors)
}

/// HF names → GGUF names, dropping ignorable tensors; unknown names are an error.
fn rename(dir: &Path, config: &Value, arch: &str, hf: Vec<Tensor>) -> Result<Vec<Tensor>> {
    // DeepSeek-V3's multi-token-prediction layers come after the `num_hidden_layers` decoder
    // layers. The first is kept, under its layer's GGUF names (`blk.{n}.nextn.*` and the
    // block's own), loaded only for `--speculative mtp`; the others are dropped (nothing uses
    // them: the MTP proposer chains the first).
    let nextn = config
        .get("num_nextn_predict_layers")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let n_layers = config.get("num_hidden_layers").and_then(Value::as_u64);
    let is_mtp = |name: &str| {
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, _)| i.parse::<u64>().ok());
        nextn > 0 && matches!((layer, n_layers), (Some(l), Some(n)) if l > n)
    };

    let mut out = Vec::with_capacity(hf.len());
    let mut unknown = Vec::new();
    let mut experts: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    // Qwen3.5 / Qwen3-Next keep theirs under `mtp.`: named as llama.cpp's converter names them
    // (layers after the decoder's), loaded only for `--speculative mtp`.
    let text_layers = config
        .get("text_config")
        .and_then(|c| c.get("num_hidden_layers"))
        .or_else(|| config.get("num_hidden_layers"))
        .and_then(Value::as_u64);
    // DeepSeek-V4's multi-token-prediction layers (`mtp.{j}.*`) are not read yet: transformers
    // drops them too.
    let v4_mtp =
        |name: &str| crate::arch::deepseek_v4::V4.contains(&arch) && name.starts_with("mtp.");
    for mut t in hf {
        if is_ignorable(&t.name) || is_mtp(&t.name) || v4_mtp(&t.name) {
            continue;
        }
        let hf_name = text_layers
            .and_then(|n| qwen_mtp_as_layer(&t.name, n as usize))
            .unwrap_or_else(|| t.name.clone());
        let Some(gguf) = hf_to_gguf(arch, &hf_name) else {
            match hf_expert_to_gguf(arch, &hf_name) {
                Some((stacked, e)) => experts.entry(stacked).or_default().push((e, t)),
                None => unknown.push(t.name),
            }
            continue;
        };
        if let Some(first) = seen.insert(gguf.clone(), t.name.clone()) {
            return Err(format_err(
                dir,
                format!(
                    "tensors `{}` and `{}` both map to `{gguf}`",
                    Shown(&first),
                    Shown(&t.name)
                ),
            ));
        }
        t.name = gguf;
        out.push(t);
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(format_err(
            dir,
            format!(
                "{} checkpoint tensor(s) have no GGUF name for model_type `{}` \
                 (supernode would compute this model wrongly): {}",
                unknown.len(),
                Shown(arch),
                list_some(&unknown)
            ),
        ));
    }
    for (name, parts) in experts {
        out.push(stack_experts(dir, name, parts)?);
    }
    Ok(out)
}

/// One 3-D tensor (ggml `[cols, rows, n_experts]`) from the per-expert matrices of a MoE layer,
/// as llama.cpp's converter stacks them (`ffn_gate_exps`); the bytes are copied once.
fn stack_experts(dir: &Path, name: String, mut parts: Vec<(usize, Tensor)>) -> Result<Tensor> {
    parts.sort_by_key(|(e, _)| *e);
    let first = &parts[0].1;
    let (dtype, shape) = (first.dtype, first.shape.clone());
    if let Some((i, (e, _))) = parts.iter().enumerate().find(|(i, (e, _))| i != e) {
        let msg = match i.cmp(e) {
            std::cmp::Ordering::Less => format!("expert {i} is missing"),
            _ => format!("expert {e} appears twice"),
        };
        return Err(format_err(
            dir,
            format!("the per-expert tensors of `{name}`: {msg}"),
        ));
    }
    if let Some((_, t)) = parts
        .iter()
        .find(|(_, t)| t.dtype != dtype || t.shape != shape || shape.len() != 2)
    {
        return Err(format_err(
            dir,
            format!(
                "`{}` ({} {:?}) does not stack with `{}` ({} {:?}) into `{name}`: experts \
                 must be matrices of one dtype and shape",
                Shown(&t.name),
                t.dtype.name(),
                t.shape,
                Shown(&first.name),
                dtype.name(),
                shape
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(parts.iter().map(|(_, t)| t.bytes().len()).sum());
    for (_, t) in &parts {
        bytes.extend_from_slice(t.bytes());
    }
    Ok(Tensor {
        name,
        dtype,
        shape: vec![shape[0], shape[1], parts.len()],
        storage: Storage::Owned(Arc::new(bytes)),
    })
}

/// The first few names, and how many more.
fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let head = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{}`", Shown(n)))
        .collect::<Vec<_>>()
        .join(", ");
    match names.len().saturating_sub(SHOWN) {
        0 => head,
        more => format!("{head} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memmap2::MmapMut;

    /// One tensor to write: HF name, safetensors dtype, row-major shape, bytes.
    type Spec<'a> = (&'a str, &'a str, &'a [usize], Vec<u8>);

    /// A safetensors file; `align` pads the header with spaces to a multiple of 8 (as the
    /// reference writer does), otherwise the data section may start anywhere.
    fn st_bytes(specs: &[Spec], align: bool) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0;
        for (name, dtype, shape, data) in specs {
            header.insert(
                (*name).into(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + data.len()]}),
            );
            off += data.len();
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        // The data section starts at 8 + h.len(): pad it to a multiple of 8, or to an odd byte.
        let pad = match align {
            true => (8 - h.len() % 8) % 8,
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

    fn parse_bytes(bytes: &[u8]) -> Result<Vec<Tensor>> {
        let mut m = MmapMut::map_anon(bytes.len().max(1)).unwrap();
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only().unwrap();
        // An anonymous map is at least one byte; a zero-length input is tested on disk.
        assert!(!bytes.is_empty());
        parse(Path::new("mem.safetensors"), Arc::new(map))
    }

    fn err_of(bytes: &[u8]) -> String {
        match parse_bytes(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    fn f32s(n: usize, base: f32) -> Vec<u8> {
        (0..n)
            .flat_map(|i| (base + i as f32).to_le_bytes())
            .collect()
    }

    fn llama_specs() -> Vec<(&'static str, &'static str, &'static [usize], Vec<u8>)> {
        vec![
            ("model.embed_tokens.weight", "F32", &[4, 3], f32s(12, 0.0)),
            ("model.norm.weight", "BF16", &[3], vec![1, 2, 3, 4, 5, 6]),
            (
                "model.layers.0.self_attn.q_proj.weight",
                "F16",
                &[3, 3],
                (0..18).collect(),
            ),
            (
                "model.layers.0.self_attn.rotary_emb.inv_freq",
                "F32",
                &[2],
                f32s(2, 0.0),
            ),
        ]
    }

    fn write_dir(dir: &Path, config: &str, files: &[(&str, Vec<u8>)]) {
        std::fs::write(dir.join("config.json"), config).unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    #[test]
    fn single_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let specs = llama_specs();
        write_dir(
            dir.path(),
            r#"{"model_type": "llama"}"#,
            &[(SINGLE_FILE, st_bytes(&specs, true))],
        );
        let m = read_safetensors_dir(dir.path()).unwrap();
        assert_eq!(m.model_type(), Some("llama"));
        let mut names: Vec<_> = m.tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "blk.0.attn_q.weight",
                "output_norm.weight",
                "token_embd.weight"
            ]
        );
        let e = m.tensor("token_embd.weight").unwrap();
        assert_eq!((e.dtype, e.shape.clone()), (DType::F32, vec![3, 4]));
        assert_eq!(e.bytes(), f32s(12, 0.0));
        assert!(matches!(e.storage, Storage::Mapped(..)));
        let n = m.tensor("output_norm.weight").unwrap();
        assert_eq!(
            (n.dtype, n.shape.clone(), n.bytes()),
            (DType::BF16, vec![3], &[1u8, 2, 3, 4, 5, 6][..])
        );
        let q = m.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.dtype, q.shape.clone()), (DType::F16, vec![3, 3]));
        assert_eq!(q.bytes(), (0..18).collect::<Vec<u8>>());
    }

    #[test]
    fn unaligned_data_is_copied() {
        let specs = [
            ("b", "F32", &[2usize][..], f32s(2, 7.0)),
            ("s", "F32", &[][..], f32s(1, 3.0)),
            ("a", "F16", &[1][..], vec![9, 8]),
        ];
        for align in [true, false] {
            let ts = parse_bytes(&st_bytes(&specs, align)).unwrap();
            let get = |n: &str| ts.iter().find(|t| t.name == n).unwrap();
            assert_eq!(get("b").bytes(), f32s(2, 7.0));
            assert_eq!(get("a").bytes(), [9, 8]);
            let s = get("s");
            assert_eq!((s.shape.clone(), s.bytes()), (vec![1], &f32s(1, 3.0)[..]));
            for t in &ts {
                assert_eq!(
                    matches!(t.storage, Storage::Owned(_)),
                    !align,
                    "{} align {align}",
                    t.name
                );
            }
        }
        // An aligned data section with a tensor at an odd offset inside it.
        let specs = [
            ("a", "F16", &[1usize][..], vec![9, 8]),
            ("b", "F32", &[2][..], f32s(2, 7.0)),
        ];
        let ts = parse_bytes(&st_bytes(&specs, true)).unwrap();
        let b = ts.iter().find(|t| t.name == "b").unwrap();
        assert!(matches!(b.storage, Storage::Owned(_)));
        assert_eq!(b.bytes(), f32s(2, 7.0));
    }

    #[test]
    fn sharded_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let specs = llama_specs();
        let (first, second) = specs.split_at(2);
        let index = serde_json::json!({
            "metadata": {"total_size": 0},
            "weight_map": {
                "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                "model.norm.weight": "model-00001-of-00002.safetensors",
                "model.layers.0.self_attn.q_proj.weight": "model-00002-of-00002.safetensors",
            }
        });
        write_dir(
            dir.path(),
            r#"{"model_type": "llama", "num_hidden_layers": 1}"#,
            &[
                ("model-00001-of-00002.safetensors", st_bytes(first, true)),
                ("model-00002-of-00002.safetensors", st_bytes(second, true)),
                (INDEX_FILE, index.to_string().into_bytes()),
            ],
        );
        let m = read_safetensors_dir(dir.path()).unwrap();
        assert_eq!(m.tensors.len(), 3);
        assert_eq!(
            m.tensor("blk.0.attn_q.weight").unwrap().bytes(),
            (0..18).collect::<Vec<u8>>()
        );
        assert_eq!(m.tensor("token_embd.weight").unwrap().shape, vec![3, 4]);

        // A listed tensor missing from its shard.
        let mut bad = index.clone();
        bad["weight_map"]["model.layers.0.mlp.up_proj.weight"] =
            "model-00002-of-00002.safetensors".into();
        std::fs::write(dir.path().join(INDEX_FILE), bad.to_string()).unwrap();
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("tensor `model.layers.0.mlp.up_proj.weight` is listed in shard"),
            "{e}"
        );
        // A listed shard that does not exist.
        let mut bad = index.clone();
        bad["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors".into();
        std::fs::write(dir.path().join(INDEX_FILE), bad.to_string()).unwrap();
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(
                "shard `model-00003-of-00002.safetensors` (listed in `weight_map`) does not exist"
            ),
            "{e}"
        );
        // A shard outside the directory.
        let mut bad = index.clone();
        bad["weight_map"]["model.norm.weight"] = "../x.safetensors".into();
        std::fs::write(dir.path().join(INDEX_FILE), bad.to_string()).unwrap();
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a file inside the model directory"), "{e}");
        // The same tensor in two shards.
        std::fs::write(
            dir.path().join("model-00002-of-00002.safetensors"),
            st_bytes(&specs, true),
        )
        .unwrap();
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is in both shard"), "{e}");
    }

    #[test]
    fn directory_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "no config.json (a safetensors model directory needs one next to the weights)"
            ),
            "{e}"
        );
        write_dir(
            dir.path(),
            r#"{"model_type": "llama"}"#,
            &[("other.safetensors", vec![])],
        );
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(e.ends_with("has neither model.safetensors nor model.safetensors.index.json (it has other.safetensors)"), "{e}");
        write_dir(dir.path(), r#"{"hidden_size": 4}"#, &[]);
        assert!(read_safetensors_dir(dir.path())
            .unwrap_err()
            .to_string()
            .contains("no string `model_type`"));
        write_dir(dir.path(), "{", &[]);
        assert!(read_safetensors_dir(dir.path())
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
        write_dir(
            dir.path(),
            r#"{"model_type": "llama"}"#,
            &[(SINGLE_FILE, vec![])],
        );
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("the file is empty, not a safetensors file"),
            "{e}"
        );
    }

    #[test]
    fn unknown_names_are_errors_and_experts_are_stacked() {
        let dir = tempfile::tempdir().unwrap();
        let mut specs = llama_specs();
        specs.push((
            "model.layers.0.self_attn.q_a_proj.weight",
            "F32",
            &[1],
            f32s(1, 0.0),
        ));
        specs.push(("transformer.wte.weight", "F32", &[1], f32s(1, 0.0)));
        write_dir(
            dir.path(),
            r#"{"model_type": "llama"}"#,
            &[(SINGLE_FILE, st_bytes(&specs, true))],
        );
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "2 checkpoint tensor(s) have no GGUF name for model_type `llama` (supernode would compute \
                 this model wrongly): `model.layers.0.self_attn.q_a_proj.weight`, `transformer.wte.weight`"
            ),
            "{e}"
        );
        // Per-expert matrices are stacked, experts in order; a gap is an error.
        let expert = |e: usize, base: f32| {
            (
                format!("model.layers.0.mlp.experts.{e}.up_proj.weight"),
                f32s(6, base),
            )
        };
        let names: Vec<(String, Vec<u8>)> = [expert(1, 10.0), expert(0, 0.0)].into();
        let specs: Vec<Spec> = names
            .iter()
            .map(|(n, b)| (n.as_str(), "F32", &[3usize, 2][..], b.clone()))
            .collect();
        write_dir(
            dir.path(),
            r#"{"model_type": "qwen3_moe"}"#,
            &[(SINGLE_FILE, st_bytes(&specs, true))],
        );
        let m = read_safetensors_dir(dir.path()).unwrap();
        let t = m.tensor("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!(t.shape, [2, 3, 2]);
        let mut want = f32s(6, 0.0);
        want.extend(f32s(6, 10.0));
        assert_eq!(t.bytes(), &want[..]);
        let names: Vec<(String, Vec<u8>)> = [expert(0, 0.0), expert(2, 0.0)].into();
        let specs: Vec<Spec> = names
            .iter()
            .map(|(n, b)| (n.as_str(), "F32", &[3usize, 2][..], b.clone()))
            .collect();
        write_dir(
            dir.path(),
            r#"{"model_type": "qwen3_moe"}"#,
            &[(SINGLE_FILE, st_bytes(&specs, true))],
        );
        let e = read_safetensors_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("`blk.0.ffn_up_exps.weight`: expert 1 is missing"),
            "{e}"
        );
        // DeepSeek-V3's first multi-token-prediction layer is kept, the next ones dropped.
        let specs = [
            (
                "model.layers.0.self_attn.kv_b_proj.weight",
                "BF16",
                &[1usize][..],
                vec![0, 0],
            ),
            (
                "model.layers.1.eh_proj.weight",
                "BF16",
                &[1][..],
                vec![0, 0],
            ),
            (
                "model.layers.2.eh_proj.weight",
                "BF16",
                &[1][..],
                vec![0, 0],
            ),
        ];
        write_dir(
            dir.path(),
            r#"{"model_type": "deepseek_v3", "num_hidden_layers": 1, "num_nextn_predict_layers": 2}"#,
            &[(SINGLE_FILE, st_bytes(&specs, true))],
        );
        let m = read_safetensors_dir(dir.path()).unwrap();
        let mut names: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["blk.0.attn_kv_b.weight", "blk.1.nextn.eh_proj.weight"]
        );
    }

    #[test]
    fn names_in_errors_are_escaped() {
        // Found by fuzzing: a dtype (or a tensor name) holding a newline made a two-line error.
        let e = err_of(&st_bytes(&[("a\nb", "I\n8", &[1], vec![0])], true));
        assert!(
            e.starts_with(r"mem.safetensors: tensor `a\nb` has dtype I\n8, which supernode"),
            "{e}"
        );
    }

    #[test]
    fn header_errors() {
        let good = st_bytes(&llama_specs(), true);
        // Header longer than the file, and past the cap.
        let mut b = good.clone();
        b[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
        assert!(err_of(&b).contains("truncated or corrupt: the header length is"));
        b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err_of(&b).contains("(the limit is 100000000)"));
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err_of(&b).contains("the header length is 18446744073709551615"));
        // Not JSON, not an object.
        let mut h = 4u64.to_le_bytes().to_vec();
        h.extend_from_slice(b"[1] ");
        assert!(err_of(&h).contains("the header is not a JSON object"));
        assert!(err_of(b"abc").contains("truncated: 3 bytes"));
        let one = |entry: serde_json::Value, data: usize| {
            let h = serde_json::json!({ "t": entry }).to_string();
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(h.as_bytes());
            b.resize(b.len() + data, 0);
            err_of(&b)
        };
        let e = one(
            serde_json::json!({"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}),
            8,
        );
        assert!(
            e.contains("tensor `t` has data offsets [0, 80], outside the 8-byte data section"),
            "{e}"
        );
        let e = one(
            serde_json::json!({"dtype": "F32", "shape": [2], "data_offsets": [8, 4]}),
            8,
        );
        assert!(e.contains("outside"), "{e}");
        let e = one(
            serde_json::json!({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}),
            8,
        );
        assert!(
            e.contains(
                "tensor `t` (F32 [3]) should have 12 bytes but its data offsets [0, 8] span 8"
            ),
            "{e}"
        );
        let e = one(
            serde_json::json!({"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}),
            8,
        );
        assert!(e.ends_with("tensor `t` has dtype U8, which supernode does not support (supported: F32, F16, BF16, and I32/I64 as numbers up to 2^24)"), "{e}");
        // An integer beyond what f32 holds exactly is refused, not rounded.
        let h = serde_json::json!({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})
            .to_string();
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&((1i64 << 24) + 1).to_le_bytes());
        let e = err_of(&b);
        assert!(
            e.contains("holds the integer 16777217, beyond the 2^24"),
            "{e}"
        );
        let e = one(
            serde_json::json!({"dtype": "F32", "shape": [1u64 << 40, 1u64 << 40], "data_offsets": [0, 8]}),
            8,
        );
        assert!(e.contains("overflows"), "{e}");
        let e = one(
            serde_json::json!({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}),
            8,
        );
        assert!(e.contains("malformed header entry"), "{e}");
        let e = one(serde_json::json!({"dtype": "F32", "shape": [2]}), 8);
        assert!(e.contains("malformed header entry"), "{e}");
    }

    #[test]
    fn truncations_and_flips_never_panic() {
        let good = st_bytes(&llama_specs(), true);
        for len in 1..good.len() {
            let e = err_of(&good[..len]);
            assert!(!e.contains('\n'), "{e}");
        }
        let mut m = good.clone();
        for i in 0..good.len() {
            for v in [0x00, 0xff, b'"', b'9', good[i] ^ 0x20] {
                m[i] = v;
                if let Ok(ts) = parse_bytes(&m) {
                    for t in &ts {
                        assert_eq!(t.bytes().len(), t.numel() * t.dtype.block_bytes());
                    }
                }
            }
            m[i] = good[i];
        }
    }
}
