//! The token table of a GGUF vocabulary: texts, scores, llama.cpp's token attributes, and the
//! text -> id map, built once per tokenizer.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// llama.cpp's `llama_token_attr` bits.
pub(crate) mod attr {
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
    /// A control token that is markup of tool calls or reasoning (`<tool_call>`, `</think>`):
    /// decoded as its text even when control tokens are not, as HF (where these are not
    /// special) and the tool-call parsers expect.
    pub const MARKUP: u32 = 1 << 6;

    /// The attribute of a GGUF `tokenizer.ggml.token_type` value.
    pub fn from_token_type(t: i64) -> u32 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0,
        }
    }
}

/// A small, fast hasher for the short strings and id pairs of vocabularies (FxHash's mixing).
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.mix(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.mix(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.mix(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.mix(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.mix(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// All tokens of a vocabulary.
pub(crate) struct Vocab {
    pub texts: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<u32>,
    /// Text -> id; for duplicate texts the last id wins (as in llama.cpp).
    pub ids: FxMap<Box<str>, u32>,
}

impl Vocab {
    pub fn new(texts: Vec<String>, scores: Vec<f32>, attrs: Vec<u32>) -> Vocab {
        let mut ids = FxMap::default();
        ids.reserve(texts.len());
        for (i, t) in texts.iter().enumerate() {
            ids.insert(t.as_str().into(), i as u32);
        }
        Vocab {
            texts,
            scores,
            attrs,
            ids,
        }
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    #[inline]
    pub fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    pub fn attr(&self, id: u32) -> u32 {
        self.attrs.get(id as usize).copied().unwrap_or(0)
    }

    pub fn has_attr(&self, id: u32, mask: u32) -> bool {
        self.attr(id) & mask != 0
    }
}
