//! GGUF `gpt2` tokenizers: byte-level BPE as llama.cpp's `llm_tokenizer_bpe_session` runs it.
//!
//! Text is split into words by the pre-tokenizer of `tokenizer.ggml.pre`; each word's bytes
//! become GPT-2 byte characters, one symbol per byte; then the adjacent pair with the lowest merge
//! rank (ties: leftmost) is merged until no pair has a rank. Ranks are looked up by the ids of
//! the two halves (a map built once from `tokenizer.ggml.merges`); a merge whose halves or result
//! are not in the vocabulary can never apply to real text and is dropped at load.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::pretok::PreTokenizer;
use super::unicode::byte_to_char;
use super::vocab::{FxMap, Vocab};

/// Candidate merges: `(rank, left, right, size, merged id)`, smallest rank then leftmost first.
type MergeQueue = BinaryHeap<Reverse<(u32, u32, u32, u32, u32)>>;

pub(crate) struct Bpe {
    pre: PreTokenizer,
    /// `(left id, right id) -> (rank, merged id)`.
    ranks: FxMap<(u32, u32), (u32, u32)>,
    /// The token of each single byte.
    byte_ids: [Option<u32>; 256],
    /// A word that is itself a token is emitted whole (llama.cpp's `ignore_merges`).
    ignore_merges: bool,
}

#[derive(Clone, Copy)]
struct Sym {
    id: Option<u32>,
    len: u32,
    prev: i32,
    next: i32,
}

impl Bpe {
    pub fn new(vocab: &Vocab, merges: &[&str], pre: PreTokenizer, ignore_merges: bool) -> Bpe {
        let map = byte_to_char();
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = vocab.id(map[b].encode_utf8(&mut [0u8; 4]));
        }
        let mut ranks = FxMap::default();
        ranks.reserve(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (first, second) = (&m[..pos], &m[pos + 1..]);
            let (Some(l), Some(r)) = (vocab.id(first), vocab.id(second)) else {
                continue;
            };
            let Some(merged) = vocab.id(&format!("{first}{second}")) else {
                continue;
            };
            ranks.entry((l, r)).or_insert((rank as u32, merged));
        }
        Bpe {
            pre,
            ranks,
            byte_ids,
            ignore_merges,
        }
    }

    /// Appends the tokens of one text fragment (no special tokens in it) to `out`.
    pub fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut syms = Vec::new();
        let mut heap = BinaryHeap::new();
        for word in self.pre.split(text) {
            let bytes = &text.as_bytes()[word];
            if self.ignore_merges {
                let map = byte_to_char();
                let encoded: String = bytes.iter().map(|&b| map[b as usize]).collect();
                if let Some(id) = vocab.id(&encoded) {
                    out.push(id);
                    continue;
                }
            }
            self.merge_word(bytes, &mut syms, &mut heap, out);
        }
    }

    fn merge_word(
        &self,
        bytes: &[u8],
        syms: &mut Vec<Sym>,
        heap: &mut MergeQueue,
        out: &mut Vec<u32>,
    ) {
        let n = bytes.len();
        syms.clear();
        heap.clear();
        syms.extend(bytes.iter().enumerate().map(|(i, &b)| Sym {
            id: self.byte_ids[b as usize],
            len: 1,
            prev: i as i32 - 1,
            next: if i + 1 == n { -1 } else { i as i32 + 1 },
        }));
        let add = |syms: &[Sym], heap: &mut BinaryHeap<_>, l: i32, r: i32| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            if let (Some(a), Some(b)) = (ls.id, rs.id) {
                if let Some(&(rank, merged)) = self.ranks.get(&(a, b)) {
                    heap.push(Reverse((rank, l as u32, r as u32, ls.len + rs.len, merged)));
                }
            }
        };
        for i in 1..n as i32 {
            add(syms, heap, i - 1, i);
        }
        while let Some(Reverse((_, l, r, size, merged))) = heap.pop() {
            let (l, r) = (l as usize, r as usize);
            let (ln, rn) = (syms[l].len, syms[r].len);
            if ln == 0 || rn == 0 || ln + rn != size {
                continue; // outdated: one side was merged since
            }
            syms[l].len += rn;
            syms[l].id = Some(merged);
            syms[r].len = 0;
            let next = syms[r].next;
            syms[l].next = next;
            if next >= 0 {
                syms[next as usize].prev = l as i32;
            }
            add(syms, heap, syms[l].prev, l as i32);
            add(syms, heap, l as i32, next);
        }
        // A symbol without a token is a byte missing from the vocabulary: llama.cpp emits nothing.
        out.extend(syms.iter().filter(|s| s.len > 0).filter_map(|s| s.id));
    }
}
