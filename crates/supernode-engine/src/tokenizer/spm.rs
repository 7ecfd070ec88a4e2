//! GGUF `llama` tokenizers: SentencePiece-style BPE as llama.cpp's `llm_tokenizer_spm_session`
//! runs it.
//!
//! The caller has already escaped spaces to U+2581 (and prepended one where the model adds a
//! space prefix). Each UTF-8 character starts as a symbol; the adjacent pair whose concatenation
//! is a vocabulary token with the highest score (ties: leftmost) is merged until no pair is a
//! token. A final symbol that is not a token (a character outside the vocabulary) falls back to
//! its bytes as `<0xNN>` tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;

pub(crate) struct Spm {
    /// The token of each byte: `<0xNN>`, else the byte itself as a one-character token.
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    prev: i32,
    next: i32,
}

struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl Spm {
    pub fn new(vocab: &Vocab, unk: Option<u32>) -> Spm {
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = vocab.id(&format!("<0x{b:02X}>")).or_else(|| {
                u8::try_from(b)
                    .ok()
                    .filter(u8::is_ascii)
                    .and_then(|a| vocab.id(&char::from(a).to_string()))
            });
        }
        Spm { byte_ids, unk }
    }

    /// Appends the tokens of one escaped text fragment to `out`.
    pub fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (i, c) in text.char_indices() {
            let k = syms.len() as i32;
            syms.push(Sym {
                start: i as u32,
                len: c.len_utf8() as u32,
                prev: k - 1,
                next: k + 1,
            });
        }
        let Some(last) = syms.last_mut() else {
            return;
        };
        last.next = -1;

        let mut heap = BinaryHeap::with_capacity(syms.len());
        let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, l: i32, r: i32| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            let start = ls.start as usize;
            let size = ls.len + rs.len;
            if let Some(id) = text
                .get(start..start + size as usize)
                .and_then(|s| vocab.id(s))
            {
                heap.push(Bigram {
                    score: vocab.scores.get(id as usize).copied().unwrap_or(0.0),
                    left: l as u32,
                    right: r as u32,
                    size,
                });
            }
        };
        for i in 1..syms.len() as i32 {
            try_add(&syms, &mut heap, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left as usize, b.right as usize);
            let (ln, rn) = (syms[l].len, syms[r].len);
            if ln == 0 || rn == 0 || ln + rn != b.size {
                continue;
            }
            syms[l].len += rn;
            syms[r].len = 0;
            let next = syms[r].next;
            syms[l].next = next;
            if next >= 0 {
                syms[next as usize].prev = l as i32;
            }
            try_add(&syms, &mut heap, syms[l].prev, l as i32);
            try_add(&syms, &mut heap, l as i32, next);
        }

        let mut i = 0i32;
        while i >= 0 {
            let s = syms[i as usize];
            let piece = &text[s.start as usize..(s.start + s.len) as usize];
            match vocab.id(piece) {
                Some(id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        if let Some(id) = self.byte_ids[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }
}
