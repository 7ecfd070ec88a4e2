//! Finding special-token texts in input text: llama.cpp's `tokenizer_st_partition`, made fast.
//!
//! llama.cpp takes the special tokens (control, user-defined and unknown ones) longest first and,
//! for each, cuts every occurrence out of the still-raw text fragments, leftmost first and without
//! overlap. So a longer token wins over a shorter one anywhere in the text, not only at the same
//! position. The same result comes from one Aho-Corasick pass that lists every occurrence of every
//! special text, then visits the tokens in that order, accepting an occurrence when it neither
//! overlaps an accepted one nor starts before the end of this token's previous acceptance.
//!
//! Control and unknown tokens are only looked for when `parse_special` is set; user-defined ones
//! always (as in llama.cpp and HF `tokenizers`). Occurrences overlapping a `protected` range are
//! ignored unless the token is user-defined: protected text behaves as if `parse_special` were off.
//! Tokens of equal length are visited by ascending id (llama.cpp's order among them is that of an
//! unstable sort; it matters only when two different equal-length tokens overlap in the text).

use std::collections::BTreeMap;
use std::ops::Range;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// A piece of partitioned text: raw text to tokenise, or a special token found in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

pub(crate) struct SpecialMatcher {
    ac: Option<AhoCorasick>,
    /// Per pattern: its token id, text length, visiting rank and whether it needs `parse_special`.
    pats: Vec<Pattern>,
}

#[derive(Clone, Copy)]
struct Pattern {
    id: u32,
    len: usize,
    rank: u32,
    needs_parse_special: bool,
}

impl SpecialMatcher {
    /// `tokens`: `(id, text, needs_parse_special)` of every special token.
    pub fn new(tokens: Vec<(u32, String, bool)>) -> SpecialMatcher {
        let mut tokens: Vec<_> = tokens.into_iter().filter(|t| !t.1.is_empty()).collect();
        tokens.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let pats = tokens
            .iter()
            .enumerate()
            .map(|(rank, (id, text, needs))| Pattern {
                id: *id,
                len: text.len(),
                rank: rank as u32,
                needs_parse_special: *needs,
            })
            .collect();
        let ac = if tokens.is_empty() {
            None
        } else {
            AhoCorasickBuilder::new()
                .match_kind(MatchKind::Standard)
                .build(tokens.iter().map(|t| t.1.as_bytes()))
                .ok()
        };
        SpecialMatcher { ac, pats }
    }

    /// The id of a control or unknown token whose text occurs anywhere in `text` (the tokens
    /// that only `parse_special` turns into ids), if any.
    pub fn find_control(&self, text: &str) -> Option<u32> {
        let ac = self.ac.as_ref()?;
        ac.find_overlapping_iter(text)
            .map(|m| self.pats[m.pattern().as_usize()])
            .find(|p| p.needs_parse_special)
            .map(|p| p.id)
    }

    /// Splits `text` into raw fragments and special tokens, in order.
    pub fn partition(
        &self,
        text: &str,
        parse_special: bool,
        protected: &[Range<usize>],
    ) -> Vec<Fragment> {
        // Occurrences packed as `rank << 32 | start`, so one sort orders them by rank, then start.
        let mut occ: Vec<u64> = Vec::new();
        if let Some(ac) = &self.ac {
            for m in ac.find_overlapping_iter(text) {
                let p = self.pats[m.pattern().as_usize()];
                if p.needs_parse_special
                    && (!parse_special || overlaps_any(protected, m.start(), m.end()))
                {
                    continue;
                }
                // Texts beyond 4 GiB are not tokenised; their later occurrences are ignored.
                let Ok(start) = u32::try_from(m.start()) else {
                    break;
                };
                occ.push((u64::from(p.rank) << 32) | u64::from(start));
            }
        }
        occ.sort_unstable();

        // Accepted spans: start -> (end, token id).
        let mut taken: BTreeMap<usize, (usize, u32)> = BTreeMap::new();
        let mut i = 0;
        while i < occ.len() {
            let rank = (occ[i] >> 32) as u32;
            let p = self.pats[rank as usize];
            let mut last_end = 0;
            while i < occ.len() && (occ[i] >> 32) as u32 == rank {
                let start = (occ[i] & 0xFFFF_FFFF) as usize;
                let end = start + p.len;
                i += 1;
                if start < last_end {
                    continue;
                }
                let clash = taken
                    .range(..end)
                    .next_back()
                    .is_some_and(|(_, &(e, _))| e > start);
                if clash {
                    continue;
                }
                taken.insert(start, (end, p.id));
                last_end = end;
            }
        }

        let mut out = Vec::with_capacity(taken.len() * 2 + 1);
        let mut pos = 0;
        for (start, (end, id)) in taken {
            if start > pos {
                out.push(Fragment::Text(pos..start));
            }
            out.push(Fragment::Token(id));
            pos = end;
        }
        if pos < text.len() {
            out.push(Fragment::Text(pos..text.len()));
        }
        out
    }
}

fn overlaps_any(ranges: &[Range<usize>], start: usize, end: usize) -> bool {
    ranges.iter().any(|r| r.start < end && start < r.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> SpecialMatcher {
        SpecialMatcher::new(vec![
            (1, "<|im_start|>".into(), true),
            (2, "<|im_end|>".into(), true),
            (3, "bcd".into(), true),
            (4, "ab".into(), true),
            (5, "\n\n".into(), false),
            (6, "\n".into(), false),
        ])
    }

    #[test]
    fn longer_tokens_win_anywhere() {
        // "bcd" is cut out first, so "ab" cannot match at 0.
        assert_eq!(
            m().partition("abcd", true, &[]),
            [Fragment::Text(0..1), Fragment::Token(3)]
        );
    }

    #[test]
    fn control_tokens_need_parse_special_user_defined_do_not() {
        let t = "<|im_start|>x\n\n\ny";
        assert_eq!(
            m().partition(t, true, &[]),
            [
                Fragment::Token(1),
                Fragment::Text(12..13),
                Fragment::Token(5),
                Fragment::Token(6),
                Fragment::Text(16..17)
            ]
        );
        assert_eq!(
            m().partition(t, false, &[]),
            [
                Fragment::Text(0..13),
                Fragment::Token(5),
                Fragment::Token(6),
                Fragment::Text(16..17)
            ]
        );
    }

    #[test]
    fn protected_ranges_hide_control_tokens() {
        let t = "<|im_start|>a<|im_end|>";
        assert_eq!(
            m().partition(t, true, std::slice::from_ref(&(12..23))),
            [Fragment::Token(1), Fragment::Text(12..23)]
        );
    }
}
