//! Incremental detokenisation for streaming: text as tokens arrive, never a broken character.
//!
//! The decoder keeps the bytes it has not yet emitted. After each token it emits the longest
//! prefix that can no longer change: one that ends on a character boundary (an incomplete UTF-8
//! sequence at the end waits for its next bytes; a sequence already known to be invalid is emitted
//! as U+FFFD, as `decode` would), and, for vocabularies with llama.cpp's `clean_spaces`, one
//! whose cut cannot touch a cleaning pattern (a space before `?!.,`, or an apostrophe within
//! three bytes). The cleaning passes are local, so cleaning the emitted pieces one by one gives
//! the same bytes as cleaning the whole. Hence the concatenation of every `push` and `finish`
//! equals [`Tokenizer::decode`] of all the ids.

use std::borrow::Borrow;
use std::sync::Arc;

use super::{clean_spaces, Tokenizer};

/// Streams the text of generated tokens. `T` is `&Tokenizer` or `Arc<Tokenizer>`.
pub struct IncrementalDecoder<T: Borrow<Tokenizer> = Arc<Tokenizer>> {
    tok: T,
    render_special: bool,
    /// Bytes decoded but not yet emitted.
    pending: Vec<u8>,
    /// No token pushed yet (its leading space may be stripped).
    first: bool,
}

impl<T: Borrow<Tokenizer>> IncrementalDecoder<T> {
    /// `render_special`: control tokens appear as their text (as in `decode`).
    pub fn new(tok: T, render_special: bool) -> Self {
        IncrementalDecoder {
            tok,
            render_special,
            pending: Vec::new(),
            first: true,
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.tok.borrow()
    }

    /// Adds one token; returns the text that became final (often empty while a character or a
    /// cleaning pattern is incomplete).
    pub fn push(&mut self, id: u32) -> String {
        let tok = self.tok.borrow();
        let mut piece = tok.piece(id, self.render_special);
        if self.first {
            if tok.strips_first_space() {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            self.first = false;
        }
        self.pending.extend_from_slice(piece);
        let clean = tok.cleans_spaces();
        let valid = complete_prefix(&self.pending);
        let cut = if clean {
            clean_safe_cut(&self.pending, valid)
        } else {
            valid
        };
        self.emit(cut, clean)
    }

    /// Emits everything still held (an incomplete character becomes U+FFFD) and resets the
    /// decoder for a new sequence.
    pub fn finish(&mut self) -> String {
        let clean = self.tok.borrow().cleans_spaces();
        let out = self.emit(self.pending.len(), clean);
        self.first = true;
        out
    }

    fn emit(&mut self, cut: usize, clean: bool) -> String {
        if cut == 0 {
            return String::new();
        }
        let mut head: Vec<u8> = self.pending.drain(..cut).collect();
        if clean {
            clean_spaces(&mut head);
        }
        match String::from_utf8(head) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// The length of the longest prefix of `b` that does not end inside an incomplete (but so far
/// valid) UTF-8 sequence. Invalid sequences inside it are final: lossy decoding replaces them the
/// same way whatever follows.
fn complete_prefix(b: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        match std::str::from_utf8(&b[pos..]) {
            Ok(_) => return b.len(),
            Err(e) => {
                pos += e.valid_up_to();
                match e.error_len() {
                    Some(n) => pos += n,
                    None => return pos,
                }
            }
        }
    }
}

/// The largest cut `p <= valid` on a character boundary where cleaning `b[..p]` and `b[p..]`
/// apart equals cleaning `b` whole: no apostrophe in `b[p-3..=p+1]`, not a space followed by
/// `?!.,` across the cut, and a byte after the cut already known. 0 if there is none yet.
fn clean_safe_cut(b: &[u8], valid: usize) -> usize {
    let n = b.len();
    if n < 2 {
        return 0;
    }
    let mut p = valid.min(n - 2);
    while p > 0 {
        let boundary = b[p] & 0xC0 != 0x80;
        let apostrophe = b[p.saturating_sub(3)..=p + 1].contains(&b'\'');
        let space_punct = b[p - 1] == b' ' && matches!(b[p], b'?' | b'!' | b'.' | b',');
        if boundary && !apostrophe && !space_punct {
            return p;
        }
        p -= 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use supernode_models::{MetaValue, Metadata};

    use super::super::unicode::byte_to_char;
    use super::*;

    /// A byte-level `gpt2` vocabulary with llama.cpp's `clean_spaces` (pre `gpt-2`): a control
    /// token, the 256 byte tokens and a few multi-byte ones.
    fn clean_spaces_tokenizer() -> Tokenizer {
        let mut tokens = vec!["<|endoftext|>".to_string()];
        tokens.extend(byte_to_char().iter().map(|c| c.to_string()));
        tokens.extend(["Ġ'", "'s", "Ġ,", "Ġ're", "ä½", "ł"].map(String::from));
        let mut types = vec![MetaValue::I32(3)];
        types.extend((1..tokens.len()).map(|_| MetaValue::I32(1)));
        let mut meta = Metadata::default();
        let mut set = |k: &str, v: MetaValue| {
            meta.entries.insert(k.to_string(), v);
        };
        set("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
        set("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()));
        set(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()),
        );
        set("tokenizer.ggml.token_type", MetaValue::Array(types));
        set("tokenizer.ggml.merges", MetaValue::Array(vec![]));
        set("tokenizer.ggml.eos_token_id", MetaValue::U32(0));
        Tokenizer::from_gguf_metadata(&meta).expect("tokenizer builds")
    }

    #[test]
    fn pushes_concatenate_to_decode_with_clean_spaces() {
        let tok = clean_spaces_tokenizer();
        assert!(tok.cleans_spaces());
        let byte = |b: u8| {
            tok.token_id(&byte_to_char()[b as usize].to_string())
                .unwrap_or(0)
        };
        let mut alphabet: Vec<u32> = b" '.,?!smrevtdax".iter().map(|&b| byte(b)).collect();
        alphabet.extend([0xE4u8, 0xBD, 0xA0, 0xFF].map(byte));
        alphabet
            .extend(["Ġ'", "'s", "Ġ,", "Ġ're", "ä½", "ł"].map(|t| tok.token_id(t).unwrap_or(0)));
        alphabet.push(0);
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for case in 0..3000 {
            let len = next(24);
            let ids: Vec<u32> = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
            for render_special in [false, true] {
                let mut dec = IncrementalDecoder::new(&tok, render_special);
                let mut out = String::new();
                for &id in &ids {
                    out += &dec.push(id);
                }
                out += &dec.finish();
                assert_eq!(
                    out,
                    tok.decode(&ids, render_special),
                    "case {case}: {ids:?}"
                );
            }
        }
    }

    #[test]
    fn multibyte_characters_are_held_back() {
        let tok = clean_spaces_tokenizer();
        let byte = |b: u8| {
            tok.token_id(&byte_to_char()[b as usize].to_string())
                .unwrap_or(0)
        };
        let mut dec = IncrementalDecoder::new(&tok, false);
        let ids: Vec<u32> = "a 你好 b".bytes().map(byte).collect();
        let chunks: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
        assert_eq!(chunks.concat() + &dec.finish(), "a 你好 b");
    }

    #[test]
    fn complete_prefix_holds_back_incomplete_characters() {
        let s = "a你".as_bytes();
        assert_eq!(complete_prefix(s), 4);
        assert_eq!(complete_prefix(&s[..3]), 1);
        assert_eq!(complete_prefix(&[b'a', 0xFF, b'b']), 3);
        assert_eq!(complete_prefix(&[0xE4, b'a']), 2);
    }

    #[test]
    fn clean_cuts_avoid_patterns() {
        assert_eq!(clean_safe_cut(b"Hello world", 11), 9);
        // Only before the "t": cleaning "i" and "t 's" apart still gives "it's".
        assert_eq!(clean_safe_cut(b"it 's", 5), 1);
        assert_eq!(clean_safe_cut(b" 's", 3), 0);
        assert_eq!(clean_safe_cut(b"ab ,cd", 6), 4);
    }
}
