//! GGUF reader (versions 2 and 3) and a small writer, following ggml's `gguf.cpp` layout.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 key/value count; the key/values
//! (string key, u32 value type, value; arrays carry an element type and a u64 count and may
//! nest); the tensor infos (name, u32 n_dims, n_dims × u64 `ne`, u32 ggml type, u64 offset
//! relative to the data section); then the data section, which starts at the next multiple
//! of `general.alignment` (default 32). All numbers are little-endian.
//!
//! The file is memory-mapped and the header is parsed straight from the map: no tensor byte
//! is copied, so reading the metadata of a 250 MB model takes milliseconds. Every tensor is
//! a [`Storage::Mapped`] range of that one map.
//!
//! Invariants of a [`GgufFile`] that [`read_gguf`] returned: every count, length and offset
//! in the header was checked against the bytes that remain before it was used (nothing is
//! allocated from an unchecked number, all arithmetic is checked), keys and tensor names
//! are unique UTF-8, every tensor has 1 to 4 non-zero dimensions, a dtype supernode supports,
//! a row length that is a whole number of blocks, an offset that is a multiple of the
//! alignment, and a byte range that lies inside the file. Errors are one line, prefixed
//! with the file's path ([`ModelError::Format`]).
//!
//! One file of a little over 800 lines of code: the reader and the writer share the layout, its
//! constants and its value types, and each checks the other in the tests.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use supernode_kernels::{DType, ALL_DTYPES};

use crate::{MetaValue, Metadata, ModelError, Result, Shown, Storage, Tensor};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The alignment of the data section (and of every tensor offset) when the file names none.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Arrays nested deeper than this are rejected (no real file nests at all; the limit keeps
/// a hostile file from exhausting the stack).
const MAX_ARRAY_DEPTH: usize = 16;
/// The writer pads to `general.alignment` only up to this; beyond it (a test's absurd value)
/// it pads to the default.
const MAX_WRITER_ALIGNMENT: usize = 1 << 16;
/// Magic, version, tensor count, key/value count.
const HEADER_BYTES: usize = 4 + 4 + 8 + 8;
/// Smallest possible key/value: empty key (u64 length), u32 type, one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;
/// Smallest possible tensor info: empty name, u32 n_dims, one u64 dimension, u32 type, u64 offset.
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 8 + 4 + 8;

/// GGUF value type ids.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The smallest number of bytes a value of GGUF type `ty` can occupy, `None` for unknown types.
fn min_value_bytes(ty: u32) -> Option<usize> {
    use value_type::*;
    Some(match ty {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 => 8,
        STRING => 8,
        ARRAY => 4 + 8,
        _ => return None,
    })
}

/// A parsed GGUF file: its metadata and its tensors, which borrow a shared memory map.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    /// 2 or 3 (they share one layout).
    pub version: u32,
    pub metadata: Metadata,
    /// In file order.
    pub tensors: Vec<Tensor>,
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`]: a power of two.
    pub alignment: usize,
    /// Byte offset of the data section in the file.
    pub data_offset: usize,
    /// Tensor name → index into `tensors`, as read.
    index: HashMap<String, usize>,
}

impl GgufFile {
    /// The tensor called `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        // The index is built at load; `tensors` is public, so fall back to a scan if a caller
        // has rearranged it since.
        self.index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .filter(|t| t.name == name)
            .or_else(|| self.tensors.iter().find(|t| t.name == name))
    }

    /// `general.architecture`, e.g. `llama` or `gemma3`.
    pub fn architecture(&self) -> Result<&str> {
        match self.metadata.get("general.architecture") {
            Some(MetaValue::String(s)) => Ok(s),
            Some(v) => Err(format_err(
                &self.path,
                format!(
                    "`general.architecture` should be a string but is {}",
                    v.type_name()
                ),
            )),
            None => Err(format_err(&self.path, "has no `general.architecture` key")),
        }
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read a GGUF file: parse its header from a memory map of the whole file.
pub fn read_gguf(path: &Path) -> Result<GgufFile> {
    let io_err = |e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Err(format_err(path, "the file is empty, not a GGUF file"));
    }
    // SAFETY: the map is read-only and private. As with every memory-mapped model loader, a
    // file truncated or rewritten by another process while mapped is outside our control.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
    parse(path, Arc::new(map))
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

/// The header parser: a cursor plus the path for error messages.
struct Parser<'a> {
    path: &'a Path,
    c: Cursor<'a>,
}

impl<'a> Parser<'a> {
    fn err(&self, msg: impl Into<String>) -> ModelError {
        format_err(self.path, msg)
    }

    /// The file ended (or a length points past its end) while reading `what`.
    fn truncated(&self, what: impl Display) -> ModelError {
        self.err(format!(
            "truncated or corrupt: the file ({} bytes) ends before {what} (at byte {})",
            self.c.buf.len(),
            self.c.pos
        ))
    }

    fn u32<D: Display>(&mut self, what: impl FnOnce() -> D) -> Result<u32> {
        match self.c.u32() {
            Some(v) => Ok(v),
            None => Err(self.truncated(what())),
        }
    }

    fn u64<D: Display>(&mut self, what: impl FnOnce() -> D) -> Result<u64> {
        match self.c.u64() {
            Some(v) => Ok(v),
            None => Err(self.truncated(what())),
        }
    }

    /// Check that `count` items of at least `min_bytes` each can fit in what remains, and
    /// return the count as a `usize` that is safe to allocate for.
    fn checked_count<D: Display>(
        &self,
        count: u64,
        min_bytes: usize,
        what: impl FnOnce() -> D,
    ) -> Result<usize> {
        let fits = usize::try_from(count).ok().filter(|&n| {
            n.checked_mul(min_bytes)
                .is_some_and(|b| b <= self.c.remaining())
        });
        fits.ok_or_else(|| {
            self.err(format!(
                "truncated or corrupt: {} claims {count} items of at least {min_bytes} bytes, \
                 but only {} bytes remain (at byte {})",
                what(),
                self.c.remaining(),
                self.c.pos
            ))
        })
    }

    /// A GGUF string (u64 length + bytes), which must be UTF-8.
    fn string<D: Display>(&mut self, what: impl Fn() -> D) -> Result<&'a str> {
        let len = self.u64(|| format!("the length of {}", what()))?;
        let at = self.c.pos;
        let bytes = usize::try_from(len)
            .ok()
            .filter(|&n| n <= self.c.remaining())
            .and_then(|n| self.c.take(n))
            .ok_or_else(|| {
                self.err(format!(
                    "truncated or corrupt: {} claims {len} bytes, but only {} remain (at byte {at})",
                    what(),
                    self.c.remaining()
                ))
            })?;
        std::str::from_utf8(bytes)
            .map_err(|_| self.err(format!("{} is not valid UTF-8 (at byte {at})", what())))
    }

    /// One value of type `ty`; `what` names it for error messages.
    fn value<D: Display>(
        &mut self,
        ty: u32,
        depth: usize,
        what: &dyn Fn() -> D,
    ) -> Result<MetaValue> {
        use value_type::*;
        let short = |p: &Parser| p.truncated(what());
        let v = match ty {
            U8 => MetaValue::U8(
                self.c
                    .array()
                    .map(u8::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            I8 => MetaValue::I8(
                self.c
                    .array()
                    .map(i8::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            U16 => MetaValue::U16(
                self.c
                    .array()
                    .map(u16::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            I16 => MetaValue::I16(
                self.c
                    .array()
                    .map(i16::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            U32 => MetaValue::U32(
                self.c
                    .array()
                    .map(u32::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            I32 => MetaValue::I32(
                self.c
                    .array()
                    .map(i32::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            U64 => MetaValue::U64(
                self.c
                    .array()
                    .map(u64::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            I64 => MetaValue::I64(
                self.c
                    .array()
                    .map(i64::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            F32 => MetaValue::F32(
                self.c
                    .array()
                    .map(f32::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            F64 => MetaValue::F64(
                self.c
                    .array()
                    .map(f64::from_le_bytes)
                    .ok_or_else(|| short(self))?,
            ),
            BOOL => {
                let at = self.c.pos;
                match self.c.array::<1>().ok_or_else(|| short(self))? {
                    [0] => MetaValue::Bool(false),
                    [1] => MetaValue::Bool(true),
                    [b] => {
                        return Err(self.err(format!(
                            "{} is a bool with byte value {b} (at byte {at}), not 0 or 1",
                            what()
                        )))
                    }
                }
            }
            STRING => MetaValue::String(self.string(what)?.to_owned()),
            ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{} nests arrays deeper than {MAX_ARRAY_DEPTH} levels",
                        what()
                    )));
                }
                let elem_ty = self.u32(|| format!("the element type of {}", what()))?;
                let Some(min) = min_value_bytes(elem_ty) else {
                    return Err(self.err(format!(
                        "{} is an array of unknown value type {elem_ty}",
                        what()
                    )));
                };
                let count = self.u64(|| format!("the length of {}", what()))?;
                let n = self.checked_count(count, min, what)?;
                // Vocabularies are arrays of 10^5 numbers or strings: decode those in tight
                // loops (the byte count of fixed-size elements was checked just above).
                let fixed = |p: &mut Parser<'a>, size: usize, f: fn(&[u8]) -> MetaValue| {
                    let bytes = p.c.take(n * size).unwrap_or_default();
                    bytes.chunks_exact(size).map(f).collect()
                };
                let items = match elem_ty {
                    U8 => fixed(self, 1, |b| MetaValue::U8(b[0])),
                    I8 => fixed(self, 1, |b| MetaValue::I8(b[0] as i8)),
                    U16 => fixed(self, 2, |b| {
                        MetaValue::U16(u16::from_le_bytes([b[0], b[1]]))
                    }),
                    I16 => fixed(self, 2, |b| {
                        MetaValue::I16(i16::from_le_bytes([b[0], b[1]]))
                    }),
                    U32 => fixed(self, 4, |b| MetaValue::U32(u32::from_le_bytes(le4(b)))),
                    I32 => fixed(self, 4, |b| MetaValue::I32(i32::from_le_bytes(le4(b)))),
                    F32 => fixed(self, 4, |b| MetaValue::F32(f32::from_le_bytes(le4(b)))),
                    U64 => fixed(self, 8, |b| MetaValue::U64(u64::from_le_bytes(le8(b)))),
                    I64 => fixed(self, 8, |b| MetaValue::I64(i64::from_le_bytes(le8(b)))),
                    F64 => fixed(self, 8, |b| MetaValue::F64(f64::from_le_bytes(le8(b)))),
                    STRING => {
                        let mut items = Vec::with_capacity(n);
                        for i in 0..n {
                            let s = self.string(|| format!("element {i} of {}", what()))?;
                            items.push(MetaValue::String(s.to_owned()));
                        }
                        items
                    }
                    _ => {
                        let mut items = Vec::with_capacity(n);
                        for i in 0..n {
                            let elem_what = || format!("element {i} of {}", what());
                            items.push(self.value(elem_ty, depth + 1, &elem_what)?);
                        }
                        items
                    }
                };
                MetaValue::Array(items)
            }
            _ => {
                return Err(self.err(format!("{} has unknown value type {ty}", what())));
            }
        };
        Ok(v)
    }
}

/// The first 4 bytes of `b` (a chunk of exactly 4).
fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    a
}

/// The first 8 bytes of `b` (a chunk of exactly 8).
fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// One tensor info, as read, before the data section's position is known.
struct TensorInfo<'a> {
    name: &'a str,
    dtype: DType,
    shape: Vec<usize>,
    offset: u64,
    /// Stored as ggml's I32, read as f32 numbers.
    int32: bool,
}

/// ggml's type id of 32-bit integers.
const I32_TYPE_ID: u32 = 26;

fn supported_list() -> String {
    ALL_DTYPES
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parse a mapped GGUF file.
fn parse(path: &Path, map: Arc<Mmap>) -> Result<GgufFile> {
    let buf: &[u8] = &map;
    let mut p = Parser {
        path,
        c: Cursor { buf, pos: 0 },
    };
    if buf.is_empty() {
        return Err(p.err("the file is empty, not a GGUF file"));
    }
    let head = buf.get(..4).unwrap_or(buf);
    if !GGUF_MAGIC.starts_with(head) || head.len() < 4 {
        if GGUF_MAGIC.starts_with(head) {
            return Err(p.truncated("the end of the magic `GGUF`"));
        }
        return Err(p.err(format!(
            "not a GGUF file: it starts with \"{}\" instead of \"GGUF\"",
            head.escape_ascii()
        )));
    }
    p.c.pos = 4;
    let version = p.u32(|| "the version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(
                p.err("GGUF v1 is not supported (re-convert the model with a current llama.cpp)")
            )
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(p.err(format!(
                "a big-endian GGUF v{} file; only little-endian GGUF is supported",
                v.swap_bytes()
            )))
        }
        v => return Err(p.err(format!("unsupported GGUF version {v} (supported: 2 and 3)"))),
    }
    let tensor_count = p.u64(|| "the tensor count")?;
    let kv_count = p.u64(|| "the key/value count")?;
    debug_assert_eq!(p.c.pos, HEADER_BYTES);

    // Both counts together must fit in what follows before either sizes an allocation.
    let n_kv = p.checked_count(kv_count, MIN_KV_BYTES, || "the key/value count")?;
    let n_tensors = p.checked_count(tensor_count, MIN_TENSOR_INFO_BYTES, || "the tensor count")?;
    let min_total = n_kv
        .checked_mul(MIN_KV_BYTES)
        .zip(n_tensors.checked_mul(MIN_TENSOR_INFO_BYTES))
        .and_then(|(a, b)| a.checked_add(b));
    if min_total.is_none_or(|t| t > p.c.remaining()) {
        return Err(p.err(format!(
            "truncated or corrupt: the header claims {kv_count} keys and {tensor_count} tensors, \
             which cannot fit in the {} bytes that follow it",
            p.c.remaining()
        )));
    }

    let mut metadata = Metadata::default();
    for k in 0..n_kv {
        let key = p.string(|| format!("the name of key #{k}"))?;
        let shown_key = Shown(key);
        let ty = p.u32(|| format!("the value type of key `{shown_key}`"))?;
        let value = p.value(ty, 0, &|| format!("the value of key `{shown_key}`"))?;
        if metadata.entries.insert(key.to_owned(), value).is_some() {
            return Err(p.err(format!("key `{shown_key}` appears twice")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_i64()
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
                p.err(format!(
                    "`general.alignment` is {v:?}; it must be a power of two"
                ))
            })?,
    };

    let mut infos = Vec::with_capacity(n_tensors);
    let mut seen = HashSet::with_capacity(n_tensors);
    for t in 0..n_tensors {
        let name = p.string(|| format!("the name of tensor #{t}"))?;
        let shown_name = Shown(name);
        let n_dims = p.u32(|| format!("the dimension count of tensor `{shown_name}`"))?;
        if !(1..=4).contains(&n_dims) {
            return Err(p.err(format!(
                "tensor `{shown_name}` has {n_dims} dimensions (GGUF allows 1 to 4)"
            )));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let ne = p.u64(|| format!("dimension {d} of tensor `{shown_name}`"))?;
            match usize::try_from(ne) {
                Ok(n) if n > 0 => shape.push(n),
                _ => {
                    return Err(p.err(format!(
                        "tensor `{shown_name}` has dimension {d} of size {ne}"
                    )))
                }
            }
        }
        let type_id = p.u32(|| format!("the type of tensor `{shown_name}`"))?;
        // I32 tensors (DeepSeek-V4's `ffn_gate_tid2eid` expert table) are read as f32 numbers,
        // which hold every integer up to 2^24 exactly.
        let int32 = type_id == I32_TYPE_ID;
        let Some(dtype) = DType::from_ggml_id(type_id).or(int32.then_some(DType::F32)) else {
            let type_name = match DType::ggml_name(type_id) {
                "unknown" => format!("unknown type id {type_id}"),
                known => format!("type {known}"),
            };
            return Err(p.err(format!(
                "tensor `{shown_name}` has {type_name}, which supernode does not support (supported: {})",
                supported_list()
            )));
        };
        let offset = p.u64(|| format!("the data offset of tensor `{shown_name}`"))?;
        if !seen.insert(name) {
            return Err(p.err(format!("tensor `{shown_name}` appears twice")));
        }
        infos.push(TensorInfo {
            name,
            dtype,
            shape,
            offset,
            int32,
        });
    }

    let data_offset = p.c.pos.checked_next_multiple_of(alignment).ok_or_else(|| {
        p.err(format!(
            "the alignment {alignment} overflows the data offset"
        ))
    })?;

    let file_len = buf.len();
    let mut tensors = Vec::with_capacity(infos.len());
    let mut index = HashMap::with_capacity(infos.len());
    for info in infos {
        let TensorInfo {
            name,
            dtype,
            shape,
            offset,
            int32,
        } = info;
        let shown_name = Shown(name);
        let ne0 = shape.first().copied().unwrap_or(1);
        let row = dtype.row_bytes(ne0).ok_or_else(|| {
            p.err(format!(
                "tensor `{shown_name}` has rows of {ne0} elements, not a whole number of {} blocks of {}",
                dtype.name(),
                dtype.block_size()
            ))
        })?;
        let size = shape
            .iter()
            .skip(1)
            .try_fold(row, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                p.err(format!(
                    "the size of tensor `{shown_name}` {shape:?} overflows"
                ))
            })?;
        if offset % alignment as u64 != 0 {
            return Err(p.err(format!(
                "tensor `{shown_name}` has data offset {offset}, not a multiple of the alignment {alignment}"
            )));
        }
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_offset));
        let range = start.and_then(|s| Some(s..s.checked_add(size)?));
        let range = match range {
            Some(r) if r.end <= file_len => r,
            _ => {
                return Err(p.err(format!(
                "truncated or corrupt: tensor `{shown_name}` ({} {shape:?}, {size} bytes at data offset \
                     {offset}) runs past the end of the file ({file_len} bytes)",
                dtype.name()
            )))
            }
        };
        let storage = match int32 {
            false => Storage::Mapped(Arc::clone(&map), range),
            true => {
                let mut values = Vec::with_capacity(range.len());
                for b in buf[range].chunks_exact(4) {
                    let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if v.unsigned_abs() > 1 << 24 {
                        return Err(p.err(format!(
                            "tensor `{shown_name}` holds the integer {v}, beyond the 2^24 that \
                             supernode reads integer tensors up to"
                        )));
                    }
                    values.extend((v as f32).to_le_bytes());
                }
                Storage::Owned(Arc::new(values))
            }
        };
        index.insert(name.to_owned(), tensors.len());
        tensors.push(Tensor {
            name: name.to_owned(),
            dtype,
            shape,
            storage,
        });
    }

    Ok(GgufFile {
        path: path.to_path_buf(),
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        index,
    })
}

/// One tensor to write: raw type id and shape, so that tests can write what the reader rejects.
#[derive(Clone, Debug)]
struct WriterTensor {
    name: String,
    ggml_type: u32,
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file in memory: metadata and tensors, written in insertion order.
///
/// It writes what it is given (a shape that does not match the data, an unsupported type id,
/// a bad `general.alignment`), so tests can make broken files as well as good ones. Tensor
/// data is padded to the alignment: `general.alignment` if it is set to a power of two, else
/// 32. No padding follows the last tensor, so every byte of the file is needed.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    kvs: Vec<(String, MetaValue)>,
    tensors: Vec<WriterTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file.
    pub fn new() -> GgufWriter {
        GgufWriter {
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// The version number to write (2 and 3 share a layout; others make invalid files).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Set a metadata key, replacing an earlier value of the same key.
    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value,
            None => self.kvs.push((key.to_owned(), value)),
        }
        self
    }

    /// Add a tensor; `shape` is in ggml order (innermost first), `data` its encoded bytes.
    pub fn tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        data: Vec<u8>,
    ) -> &mut Self {
        let shape = shape.iter().map(|&d| d as u64).collect();
        self.raw_tensor(name, dtype.ggml_id(), shape, data)
    }

    /// Add a tensor with any ggml type id, supported or not.
    pub fn raw_tensor(
        &mut self,
        name: &str,
        ggml_type: u32,
        shape: Vec<u64>,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push(WriterTensor {
            name: name.to_owned(),
            ggml_type,
            shape,
            data,
        });
        self
    }

    fn alignment(&self) -> usize {
        self.kvs
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_i64())
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a.is_power_of_two() && *a <= MAX_WRITER_ALIGNMENT)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The file's bytes. Fails only for an array whose elements differ in type.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let sizes: Vec<usize> = self.tensors.iter().map(|t| t.data.len()).collect();
        let (mut out, offsets) = self.header(&sizes)?;
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }

    /// The bytes before the data section (header, key/values, tensor infos, padding) of a file
    /// whose tensors, in insertion order, take `sizes` bytes (their stored data is ignored), and
    /// each tensor's offset in the data section. A caller that streams the tensor data itself
    /// (joining split files too large to hold in memory) adds tensors with empty data, writes
    /// these bytes, then each tensor's bytes at its offset.
    pub fn header(&self, sizes: &[usize]) -> Result<(Vec<u8>, Vec<usize>)> {
        if sizes.len() != self.tensors.len() {
            return Err(ModelError::Invalid(format!(
                "GGUF writer: {} sizes given for {} tensors",
                sizes.len(),
                self.tensors.len()
            )));
        }
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            out.extend_from_slice(&value_type_of(value).to_le_bytes());
            put_value(&mut out, key, value)?;
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (t, &size) in self.tensors.iter().zip(sizes) {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + size).next_multiple_of(align);
        }
        // A file without tensors ends after its infos: every byte of a written file is needed.
        if !self.tensors.is_empty() {
            out.resize(out.len().next_multiple_of(align), 0);
        }
        Ok((out, offsets))
    }

    /// Write the file to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes()?).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type_of(v: &MetaValue) -> u32 {
    use value_type::*;
    match v {
        MetaValue::U8(_) => U8,
        MetaValue::I8(_) => I8,
        MetaValue::U16(_) => U16,
        MetaValue::I16(_) => I16,
        MetaValue::U32(_) => U32,
        MetaValue::I32(_) => I32,
        MetaValue::U64(_) => U64,
        MetaValue::I64(_) => I64,
        MetaValue::F32(_) => F32,
        MetaValue::F64(_) => F64,
        MetaValue::Bool(_) => BOOL,
        MetaValue::String(_) => STRING,
        MetaValue::Array(_) => ARRAY,
    }
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &MetaValue) -> Result<()> {
    match v {
        MetaValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(items) => {
            // An empty array needs some element type; uint8 is as good as any.
            let elem_ty = items.first().map_or(value_type::U8, value_type_of);
            if items.iter().any(|i| value_type_of(i) != elem_ty) {
                return Err(ModelError::Invalid(format!(
                    "GGUF writer: array `{key}` mixes element types"
                )));
            }
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use memmap2::MmapMut;

    /// Parse bytes through an anonymous map: the same code path as a file, without the disk.
    fn parse_bytes(bytes: &[u8]) -> Result<GgufFile> {
        let mut m = MmapMut::map_anon(bytes.len().max(1)).expect("anonymous map");
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only().expect("read-only map");
        if bytes.is_empty() {
            return Err(format_err(
                Path::new("mem"),
                "the file is empty, not a GGUF file",
            ));
        }
        // The map may be longer than `bytes` only when `bytes` is empty, handled above.
        parse(Path::new("mem.gguf"), Arc::new(map))
    }

    fn err_of(bytes: &[u8]) -> String {
        match parse_bytes(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A small valid file: a few keys (one nested array) and three tensors of different types.
    fn small() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .meta("llama.block_count", MetaValue::U32(1))
            .meta(
                "tokenizer.ggml.tokens",
                MetaValue::Array(vec![
                    MetaValue::String("a".into()),
                    MetaValue::String("bé".into()),
                ]),
            )
            .meta(
                "nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I16(-1)]),
                    MetaValue::Array(vec![]),
                ]),
            )
            .meta("flag", MetaValue::Bool(true))
            .tensor(
                "a.weight",
                DType::F32,
                &[4, 2],
                f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
            )
            .tensor("b.weight", DType::F16, &[3], vec![1, 2, 3, 4, 5, 6])
            .tensor("c.weight", DType::Q8_0, &[32], (0..34).collect());
        w
    }

    /// Hand-made bytes for cases the writer cannot express.
    #[derive(Default)]
    struct Raw(Vec<u8>);
    impl Raw {
        fn header(version: u32, tensors: u64, kvs: u64) -> Raw {
            let mut r = Raw(b"GGUF".to_vec());
            r.u32(version).u64(tensors).u64(kvs);
            r
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn pad(&mut self, n: usize) -> &mut Self {
            self.0.resize(self.0.len() + n, 0);
            self
        }
    }

    #[test]
    fn writer_round_trip_every_value_type() {
        let values = vec![
            ("u8", MetaValue::U8(200)),
            ("i8", MetaValue::I8(-100)),
            ("u16", MetaValue::U16(60000)),
            ("i16", MetaValue::I16(-30000)),
            ("u32", MetaValue::U32(4_000_000_000)),
            ("i32", MetaValue::I32(-2_000_000_000)),
            ("u64", MetaValue::U64(u64::MAX)),
            ("i64", MetaValue::I64(i64::MIN)),
            ("f32", MetaValue::F32(1.5)),
            ("f64", MetaValue::F64(-2.25e300)),
            ("bool", MetaValue::Bool(false)),
            ("string", MetaValue::String("héllo\n".into())),
            ("empty", MetaValue::String(String::new())),
            (
                "arr",
                MetaValue::Array(vec![MetaValue::F32(1.0), MetaValue::F32(2.0)]),
            ),
            (
                "nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::String("x".into())]),
                    MetaValue::Array(vec![
                        MetaValue::String("y".into()),
                        MetaValue::String("z".into()),
                    ]),
                ]),
            ),
            ("empty_arr", MetaValue::Array(vec![])),
        ];
        let mut w = GgufWriter::new();
        for (k, v) in &values {
            w.meta(k, v.clone());
        }
        w.meta("general.alignment", MetaValue::U32(64));
        let data: Vec<u8> = (0..=255).collect();
        w.tensor(
            "t0",
            DType::F32,
            &[2, 3],
            f32_bytes(&[0., 1., 2., 3., 4., 5.]),
        )
        .tensor("t1", DType::Q4_0, &[32, 2], data[..36].to_vec())
        .tensor("t2", DType::BF16, &[1, 1, 1, 5], data[..10].to_vec());
        let f = parse_bytes(&w.to_bytes().unwrap()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset % 64, 0);
        for (k, v) in &values {
            assert_eq!(f.metadata.get(k), Some(v), "key {k}");
        }
        assert_eq!(f.tensors.len(), 3);
        let t0 = f.tensor("t0").unwrap();
        assert_eq!((t0.dtype, t0.shape.clone()), (DType::F32, vec![2, 3]));
        assert_eq!(t0.bytes(), f32_bytes(&[0., 1., 2., 3., 4., 5.]));
        let t1 = f.tensor("t1").unwrap();
        assert_eq!(
            (t1.dtype, t1.shape.clone(), t1.bytes()),
            (DType::Q4_0, vec![32, 2], &data[..36])
        );
        let t2 = f.tensor("t2").unwrap();
        assert_eq!(
            (t2.dtype, t2.shape.clone(), t2.bytes()),
            (DType::BF16, vec![1, 1, 1, 5], &data[..10])
        );
        for t in &f.tensors {
            let Storage::Mapped(_, r) = &t.storage else {
                panic!("not mapped")
            };
            assert_eq!(r.start % 64, 0);
        }
        assert!(f.tensor("missing").is_none());
        assert_eq!(
            f.architecture().unwrap_err().to_string(),
            "mem.gguf: has no `general.architecture` key"
        );

        let mut w2 = small();
        w2.version(2);
        let f2 = parse_bytes(&w2.to_bytes().unwrap()).unwrap();
        assert_eq!((f2.version, f2.architecture().unwrap()), (2, "llama"));
        assert_eq!(f2.alignment, DEFAULT_ALIGNMENT);
    }

    #[test]
    fn writer_rejects_mixed_arrays() {
        let mut w = GgufWriter::new();
        w.meta(
            "x",
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
        );
        assert!(w
            .to_bytes()
            .unwrap_err()
            .to_string()
            .contains("mixes element types"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = small().to_bytes().unwrap();
        assert!(parse_bytes(&bytes).is_ok());
        for len in 0..bytes.len() {
            let e = err_of(&bytes[..len]);
            assert!(!e.contains('\n'), "multi-line error: {e}");
            if len >= 4 {
                assert!(e.contains("truncated"), "prefix {len}: {e}");
            }
        }
        // Where it was cut is named.
        let kv_cut = err_of(&bytes[..40]);
        assert!(kv_cut.contains("key"), "{kv_cut}");
        let last = err_of(&bytes[..bytes.len() - 1]);
        assert!(
            last.contains("`c.weight`") && last.contains("runs past the end"),
            "{last}"
        );
    }

    #[test]
    fn not_gguf_files() {
        assert_eq!(err_of(b""), "mem: the file is empty, not a GGUF file");
        let e = err_of(b"hello, world\nthis is text\n");
        assert_eq!(
            e,
            "mem.gguf: not a GGUF file: it starts with \"hell\" instead of \"GGUF\""
        );
        let e = err_of(b"\x89PNG\r\n\x1a\n");
        assert!(
            e.contains("not a GGUF file") && e.contains("\\x89PNG"),
            "{e}"
        );
        assert!(err_of(b"GG").contains("truncated"));
        assert!(err_of(b"GGUX").contains("not a GGUF file"));
    }

    #[test]
    fn empty_file_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.gguf");
        std::fs::write(&p, b"").unwrap();
        let e = read_gguf(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&p.display().to_string()) && e.ends_with("empty, not a GGUF file"),
            "{e}"
        );
        let e = read_gguf(&dir.path().join("missing.gguf")).unwrap_err();
        assert!(matches!(e, ModelError::Io { .. }), "{e}");
    }

    #[test]
    fn versions() {
        let e = err_of(&Raw::header(1, 0, 0).0);
        assert!(e.contains("GGUF v1 is not supported"), "{e}");
        let e = err_of(&Raw::header(99, 0, 0).0);
        assert!(e.contains("unsupported GGUF version 99"), "{e}");
        let e = err_of(&Raw::header(3u32.swap_bytes(), 0, 0).0);
        assert!(e.contains("big-endian"), "{e}");
        let f = parse_bytes(&Raw::header(3, 0, 0).0).unwrap();
        assert!(f.tensors.is_empty() && f.metadata.entries.is_empty());
    }

    #[test]
    fn absurd_counts_and_lengths() {
        // Tensor and key counts that the file cannot hold.
        for (t, k) in [
            (1u64 << 62, 0u64),
            (0, 1 << 62),
            (u64::MAX, u64::MAX),
            (3, 3),
        ] {
            let mut r = Raw::header(3, t, k);
            r.pad(64);
            let e = err_of(&r.0);
            assert!(e.contains("truncated or corrupt"), "{e}");
        }
        // A key length of 2^60.
        let mut r = Raw::header(3, 0, 1);
        r.u64(1 << 60).pad(16);
        let e = err_of(&r.0);
        assert!(
            e.contains("the name of key #0 claims 1152921504606846976 bytes"),
            "{e}"
        );
        // A string value of length u64::MAX.
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(value_type::STRING).u64(u64::MAX).pad(8);
        let e = err_of(&r.0);
        assert!(e.contains("the value of key `k` claims"), "{e}");
        // An array count of 2^62, and of u64::MAX for 8-byte elements.
        for (ty, n) in [
            (value_type::U8, 1u64 << 62),
            (value_type::F64, u64::MAX),
            (value_type::ARRAY, 1 << 40),
        ] {
            let mut r = Raw::header(3, 0, 1);
            r.str("arr").u32(value_type::ARRAY).u32(ty).u64(n).pad(32);
            let e = err_of(&r.0);
            assert!(e.contains("the value of key `arr` claims"), "{e}");
        }
        // Arrays nested past the limit.
        let mut r = Raw::header(3, 0, 1);
        r.str("deep").u32(value_type::ARRAY);
        for _ in 0..40 {
            r.u32(value_type::ARRAY).u64(1);
        }
        r.pad(64);
        assert!(err_of(&r.0).contains("nests arrays deeper"));
        // n_dims of 0, 5 and 2^32-1.
        for n in [0u32, 5, u32::MAX] {
            let mut r = Raw::header(3, 1, 0);
            r.str("t").u32(n).pad(64);
            let e = err_of(&r.0);
            assert!(e.contains(&format!("tensor `t` has {n} dimensions")), "{e}");
        }
        // A dimension of 0, and dimensions whose product overflows.
        let mut r = Raw::header(3, 1, 0);
        r.str("t").u32(2).u64(4).u64(0).u32(0).u64(0).pad(64);
        assert!(err_of(&r.0).contains("dimension 1 of size 0"));
        let mut r = Raw::header(3, 1, 0);
        r.str("t")
            .u32(3)
            .u64(1 << 40)
            .u64(1 << 40)
            .u64(1 << 40)
            .u32(0)
            .u64(0)
            .pad(64);
        assert!(err_of(&r.0).contains("overflows"));
    }

    #[test]
    fn names_in_errors_are_escaped() {
        // Found by fuzzing: a key name holding a newline made a two-line error, and a file's
        // escape sequences reached the terminal raw.
        let mut r = Raw::header(3, 0, 1);
        r.str("a\nb\u{1b}[31m").u32(77).pad(8);
        assert_eq!(
            err_of(&r.0),
            r"mem.gguf: the value of key `a\nb\u{1b}[31m` has unknown value type 77"
        );
        let mut w = GgufWriter::new();
        w.tensor("t\r", DType::F32, &[2], vec![0; 4]);
        let e = err_of(&w.to_bytes().unwrap());
        assert!(
            e.contains(r"tensor `t\r` (F32 [2]") && !e.contains('\r'),
            "{e}"
        );
        // Long names are cut.
        let mut r = Raw::header(3, 0, 1);
        r.str(&"é".repeat(300)).u32(77).pad(8);
        let e = err_of(&r.0);
        assert!(e.contains(&format!("key `{}…`", "é".repeat(100))), "{e}");
    }

    #[test]
    fn bad_keys_and_values() {
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(13).pad(16);
        let e = err_of(&r.0);
        assert!(
            e.contains("the value of key `k` has unknown value type 13"),
            "{e}"
        );
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(value_type::ARRAY).u32(77).u64(1).pad(16);
        assert!(err_of(&r.0).contains("array of unknown value type 77"));
        let mut r = Raw::header(3, 0, 1);
        r.u64(2).0.extend_from_slice(&[0xff, 0xfe]);
        r.u32(value_type::U8).pad(1);
        assert!(err_of(&r.0).contains("the name of key #0 is not valid UTF-8"));
        let mut r = Raw::header(3, 0, 1);
        r.str("b").u32(value_type::BOOL).0.push(7);
        assert!(err_of(&r.0).contains("bool with byte value 7"));
        let mut r = Raw::header(3, 0, 2);
        r.str("k")
            .u32(value_type::U8)
            .pad(1)
            .str("k")
            .u32(value_type::U8)
            .pad(1);
        assert_eq!(err_of(&r.0), "mem.gguf: key `k` appears twice");
        let mut w = small();
        w.meta("general.architecture", MetaValue::U32(1));
        let f = parse_bytes(&w.to_bytes().unwrap()).unwrap();
        assert!(f
            .architecture()
            .unwrap_err()
            .to_string()
            .contains("should be a string"));
    }

    #[test]
    fn unsupported_tensor_types() {
        let mut w = GgufWriter::new();
        w.raw_tensor("blk.0.ffn_up.weight", 16, vec![256], vec![0; 66]);
        let e = err_of(&w.to_bytes().unwrap());
        assert!(
            e.starts_with(
                "mem.gguf: tensor `blk.0.ffn_up.weight` has type IQ2_XXS, which supernode does not \
                 support (supported: F32, F16, BF16, Q4_0"
            ),
            "{e}"
        );
        let mut w = GgufWriter::new();
        w.raw_tensor("x", 999, vec![4], vec![0; 16]);
        let e = err_of(&w.to_bytes().unwrap());
        assert!(
            e.contains("tensor `x` has unknown type id 999, which supernode does not support"),
            "{e}"
        );
    }

    #[test]
    fn bad_tensor_layouts() {
        // Data past the end of the file.
        let mut w = GgufWriter::new();
        w.tensor("big", DType::F32, &[4, 4], vec![0; 60]);
        let e = err_of(&w.to_bytes().unwrap());
        assert!(
            e.contains("tensor `big` (F32 [4, 4], 64 bytes at data offset 0) runs past the end"),
            "{e}"
        );
        // A row that is not a whole number of blocks.
        let mut w = GgufWriter::new();
        w.tensor("q", DType::Q8_0, &[33], vec![0; 68]);
        assert!(err_of(&w.to_bytes().unwrap()).contains("not a whole number of Q8_0 blocks of 32"));
        // A misaligned offset: patch the second tensor's offset from 32 to 8.
        let mut w = GgufWriter::new();
        w.tensor("a", DType::F32, &[2], vec![0; 8])
            .tensor("b", DType::F32, &[2], vec![0; 8]);
        let mut bytes = w.to_bytes().unwrap();
        let at = bytes
            .windows(9)
            .position(|s| s == b"\x01\0\0\0\0\0\0\0b")
            .unwrap();
        let off_at = at + 8 + 1 + 4 + 8 + 4;
        assert_eq!(bytes[off_at], 32);
        bytes[off_at] = 8;
        let e = err_of(&bytes);
        assert_eq!(
            e,
            "mem.gguf: tensor `b` has data offset 8, not a multiple of the alignment 32"
        );
        // Duplicate tensor names.
        let mut w = GgufWriter::new();
        w.tensor("a", DType::F32, &[2], vec![0; 8])
            .tensor("a", DType::F32, &[2], vec![0; 8]);
        assert_eq!(
            err_of(&w.to_bytes().unwrap()),
            "mem.gguf: tensor `a` appears twice"
        );
    }

    #[test]
    fn bad_alignment_values() {
        for bad in [
            MetaValue::U32(0),
            MetaValue::U32(3),
            MetaValue::I32(-32),
            MetaValue::String("32".into()),
        ] {
            let mut w = small();
            w.meta("general.alignment", bad.clone());
            let e = err_of(&w.to_bytes().unwrap());
            assert!(
                e.contains("`general.alignment` is") && e.contains("power of two"),
                "{bad:?}: {e}"
            );
        }
        let mut w = small();
        w.meta("general.alignment", MetaValue::U64(1 << 62));
        let e = err_of(&w.to_bytes().unwrap());
        assert!(
            e.contains("tensor `a.weight`") && e.contains("runs past the end"),
            "{e}"
        );
    }

    #[test]
    fn flipped_bytes_never_panic() {
        let bytes = small().to_bytes().unwrap();
        let mut mutated = bytes.clone();
        for i in 0..bytes.len() {
            for v in [
                0x00,
                0xff,
                0x80,
                0x01,
                bytes[i] ^ 0x10,
                bytes[i].wrapping_add(1),
            ] {
                mutated[i] = v;
                let _ = parse_bytes(&mutated);
            }
            mutated[i] = bytes[i];
        }
        // Random multi-byte mutations (xorshift, fixed seed).
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20_000 {
            let mut m = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % m.len() as u64) as usize;
                m[i] = next() as u8;
            }
            let cut = m.len() - (next() % 8) as usize;
            if let Ok(f) = parse_bytes(&m[..cut]) {
                for t in &f.tensors {
                    let _ = t.bytes();
                }
            }
        }
    }
}
