//! Code-point classes as llama.cpp's pre-tokenizers see them, and GPT-2's byte <-> char table.
//!
//! llama.cpp gives every code point one general-category flag (number, letter, separator, mark,
//! punctuation, symbol, control; unassigned = undefined) plus a white-space flag (the Unicode
//! `White_Space` property). The category table here comes from `regex-syntax`'s Unicode tables
//! (built once, binary-searched); it agrees with llama.cpp's on every code point assigned before
//! Unicode 16 (llama.cpp's table is older: code points new in Unicode 16 are "undefined" there).

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// Category and white-space flags of one code point (llama.cpp's `unicode_cpt_flags` bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CpFlags(u16);

impl CpFlags {
    pub const UNDEFINED: u16 = 0x0001;
    pub const NUMBER: u16 = 0x0002;
    pub const LETTER: u16 = 0x0004;
    pub const SEPARATOR: u16 = 0x0008;
    pub const MARK: u16 = 0x0010;
    pub const PUNCTUATION: u16 = 0x0020;
    pub const SYMBOL: u16 = 0x0040;
    pub const CONTROL: u16 = 0x0080;
    pub const CATEGORIES: u16 = 0x00FF;
    pub const WHITESPACE: u16 = 0x0100;

    /// The flags of a position outside the text: nothing set (llama.cpp's `unicode_cpt_flags{}`).
    pub const NONE: CpFlags = CpFlags(0);

    pub fn bits(self) -> u16 {
        self.0
    }
    pub fn category(self) -> u16 {
        self.0 & Self::CATEGORIES
    }
    pub fn is_number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    pub fn is_letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    pub fn is_whitespace(self) -> bool {
        self.0 & Self::WHITESPACE != 0
    }
}

/// Sorted, disjoint `(first, last, category flag)` ranges; gaps are unassigned code points.
struct CategoryTable {
    ascii: [u16; 128],
    ranges: Vec<(u32, u32, u16)>,
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    // The patterns are fixed Unicode general categories that regex-syntax always knows; a
    // failure would be a build problem, and yields an empty class rather than a panic.
    let Ok(hir) = regex_syntax::ParserBuilder::new().build().parse(pattern) else {
        return Vec::new();
    };
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn table() -> &'static CategoryTable {
    static TABLE: OnceLock<CategoryTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut ranges = Vec::new();
        for (pattern, flag) in [
            (r"\p{N}", CpFlags::NUMBER),
            (r"\p{L}", CpFlags::LETTER),
            (r"\p{Z}", CpFlags::SEPARATOR),
            (r"\p{M}", CpFlags::MARK),
            (r"\p{P}", CpFlags::PUNCTUATION),
            (r"\p{S}", CpFlags::SYMBOL),
            (r"\p{Cc}", CpFlags::CONTROL),
            (r"\p{Cf}", CpFlags::CONTROL),
            (r"\p{Co}", CpFlags::CONTROL),
        ] {
            ranges.extend(class_ranges(pattern).into_iter().map(|(a, b)| (a, b, flag)));
        }
        // Surrogates are category Cs; they never occur in a `str` but keep the table honest.
        ranges.push((0xD800, 0xDFFF, CpFlags::CONTROL));
        ranges.sort_unstable();
        let mut ascii = [CpFlags::UNDEFINED; 128];
        for (c, slot) in ascii.iter_mut().enumerate() {
            *slot = lookup(&ranges, c as u32);
        }
        CategoryTable { ascii, ranges }
    })
}

fn lookup(ranges: &[(u32, u32, u16)], cp: u32) -> u16 {
    let i = ranges.partition_point(|r| r.0 <= cp);
    match i.checked_sub(1).map(|j| ranges[j]) {
        Some((_, last, flag)) if cp <= last => flag,
        _ => CpFlags::UNDEFINED,
    }
}

/// llama.cpp's `unicode_cpt_flags_from_cpt`.
pub(crate) fn flags(c: char) -> CpFlags {
    let t = table();
    let cp = c as u32;
    let cat = if cp < 128 {
        t.ascii[cp as usize]
    } else {
        lookup(&t.ranges, cp)
    };
    let ws = if c.is_whitespace() {
        CpFlags::WHITESPACE
    } else {
        0
    };
    CpFlags(cat | ws)
}

/// GPT-2's byte-to-char table: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// for U+0100.. in byte order.
pub(crate) fn byte_to_char() -> &'static [char; 256] {
    static MAP: OnceLock<[char; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = ['\0'; 256];
        let mut next = 256u32;
        for (b, slot) in map.iter_mut().enumerate() {
            let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            let cp = if printable {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            *slot = char::from_u32(cp).unwrap_or('\u{FFFD}');
        }
        map
    })
}

/// The byte a GPT-2 byte-level char stands for, if it is one of the 256.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cp as u8),
        0x100..=0x143 => {
            // The (cp - 256)-th byte that is not printable.
            byte_to_char()
                .iter()
                .position(|&m| m == c)
                .and_then(|b| u8::try_from(b).ok())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_of_common_code_points() {
        assert!(flags('a').is_letter());
        assert!(flags('é').is_letter());
        assert!(flags('中').is_letter());
        assert!(flags('7').is_number());
        assert!(flags('٣').is_number());
        assert_eq!(flags(',').category(), CpFlags::PUNCTUATION);
        assert_eq!(flags('$').category(), CpFlags::SYMBOL);
        assert_eq!(flags('🙂').category(), CpFlags::SYMBOL);
        assert_eq!(flags('\u{301}').category(), CpFlags::MARK);
        assert!(flags(' ').is_whitespace());
        assert_eq!(flags(' ').category(), CpFlags::SEPARATOR);
        assert!(flags('\n').is_whitespace());
        assert_eq!(flags('\n').category(), CpFlags::CONTROL);
        assert!(flags('\u{3000}').is_whitespace());
        assert_eq!(flags('\u{378}').category(), CpFlags::UNDEFINED);
    }

    #[test]
    fn byte_table_round_trips() {
        let map = byte_to_char();
        assert_eq!(map[b' ' as usize], 'Ġ');
        assert_eq!(map[b'\n' as usize], 'Ċ');
        assert_eq!(map[b'a' as usize], 'a');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(map[b as usize]), Some(b));
        }
        assert_eq!(char_to_byte('中'), None);
    }
}
