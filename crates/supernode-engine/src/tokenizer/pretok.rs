//! Pre-tokenisation for GGUF byte-level BPE: splitting text into words before merging, chosen by
//! `tokenizer.ggml.pre` exactly as llama.cpp's `llm_tokenizer_bpe` + `unicode_regex_split` do.
//!
//! A pre-tokenizer is a sequence of rules; each rule splits every current segment further (text
//! a rule does not match stays a segment of its own). Rules are either llama.cpp's hand-written
//! splitters (the GPT-2, Llama-3 and Qwen-2 regexes, ported with their quirks) or a regex run the
//! way llama.cpp runs its `std::regex` fallback: on a "collapsed" copy of the text where every
//! non-ASCII code point stands for its category (so `\p{L}` becomes a plain character class), or,
//! for regexes without categories, on the text with non-ASCII white space turned into `\x0B`.
//!
//! Segments are code-point index ranges; [`PreTokenizer::split`] returns byte ranges of `text`.

use std::ops::Range;

use crate::error::EngineError;

use super::unicode::{flags, CpFlags};

/// One splitting rule.
enum Rule {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
    Gpt2,
    /// The Llama-3 regex (`max_digits` = 3) or the Qwen-2 one (`max_digits` = 1).
    Llama3 { max_digits: usize },
    /// Any other regex, run like llama.cpp's `std::regex` fallback.
    Regex {
        re: Box<fancy_regex::Regex>,
        collapsed: bool,
    },
}

/// The word splitter of one `tokenizer.ggml.pre` type.
pub(crate) struct PreTokenizer {
    rules: Vec<Rule>,
}

/// What a pre-tokenizer type implies besides its rules (llama.cpp sets these per type).
pub(crate) struct PreConfig {
    pub pre: PreTokenizer,
    /// Detokenisation removes spaces before punctuation (`clean_up_tokenization_spaces`).
    pub clean_spaces: bool,
    /// A whole word found in the vocabulary is one token, without merging.
    pub ignore_merges: bool,
    /// The type's default for adding BOS (metadata `add_bos_token` overrides it).
    pub add_bos: bool,
    /// The type has no BOS token by default.
    pub no_bos: bool,
}

enum Spec {
    Gpt2,
    Llama3,
    Qwen2,
    Re(&'static str),
}

const DEFAULT: &[Spec] = &[
    Spec::Re("[\\p{P}\\$\\+<=>\\^~\\|]+"),
    Spec::Gpt2,
    Spec::Re("\\p{N}+"),
    Spec::Re("[0-9][0-9][0-9]"),
];
const GPT2: &[Spec] = &[Spec::Gpt2];
const STARCODER: &[Spec] = &[Spec::Re("\\p{N}"), Spec::Gpt2];
const LLAMA3: &[Spec] = &[Spec::Llama3];
const QWEN2: &[Spec] = &[Spec::Qwen2];
const FALCON: &[Spec] = &[
    Spec::Re("[\\p{P}\\$\\+<=>\\^~\\|`]+"),
    Spec::Gpt2,
    Spec::Re("[0-9][0-9][0-9]"),
];
const DEEPSEEK_CODER: &[Spec] = &[
    Spec::Re("[\r\n]"),
    Spec::Re("\\s?\\p{L}+"),
    Spec::Re("\\s?\\p{P}+"),
    Spec::Re("[一-龥ࠀ-一가-퟿]+"),
    Spec::Re("\\p{N}"),
];
const DEEPSEEK3: &[Spec] = &[
    Spec::Re("\\p{N}{1,3}"),
    Spec::Re("[一-龥぀-ゟ゠-ヿ]+"),
    Spec::Re("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
];
const PORO: &[Spec] = &[Spec::Re(" ?[^(\\s|.,!?…。，、।۔،)]+")];
const VIKING: &[Spec] = &[Spec::Re(" ?[^(\\s|.,!?…。，、।۔،)]+"), Spec::Re("\\p{N}")];
const TEKKEN: &[Spec] = &[Spec::Re("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")];
const GPT4O: &[Spec] = &[Spec::Re("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")];
const SEED_CODER: &[Spec] = &[Spec::Re("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")];
const UFAKZEKA: &[Spec] = &[Spec::Re("[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")];
const BAILINGMOE: &[Spec] = &[Spec::Re("'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+")];
const MINICPM5: &[Spec] = &[
    Spec::Re("\\p{N}{1,3}"),
    Spec::Re("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
];

/// One pre-tokenizer type as llama.cpp's `llama_vocab::impl::load` assigns it: the
/// `tokenizer.ggml.pre` names that select it, its rules, and `(clean_spaces, ignore_merges,
/// add_bos, no_bos)`.
struct PreType {
    names: &'static [&'static str],
    rules: &'static [Spec],
    flags: (bool, bool, bool, bool),
}

const fn pre_type(
    names: &'static [&'static str],
    rules: &'static [Spec],
    flags: (bool, bool, bool, bool),
) -> PreType {
    PreType {
        names,
        rules,
        flags,
    }
}

/// Every `tokenizer.ggml.pre` llama.cpp knows; it refuses other names, and so do we.
const PRE_TYPES: &[PreType] = &[
    pre_type(&["default"], DEFAULT, (true, false, false, false)),
    pre_type(
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        LLAMA3,
        (true, true, true, false),
    ),
    pre_type(
        &["deepseek-coder"],
        DEEPSEEK_CODER,
        (false, false, false, false),
    ),
    pre_type(
        &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        DEEPSEEK3,
        (false, false, false, false),
    ),
    pre_type(&["falcon"], FALCON, (true, false, false, false)),
    pre_type(
        &[
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        STARCODER,
        (true, false, false, false),
    ),
    pre_type(
        &["command-r", "smollm"],
        STARCODER,
        (false, false, false, false),
    ),
    pre_type(
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
        ],
        GPT2,
        (true, false, false, false),
    ),
    pre_type(
        &["trillion", "granite-docling"],
        GPT2,
        (false, false, false, false),
    ),
    pre_type(
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "hunyuan",
            "grok-2",
            "solar-open",
        ],
        QWEN2,
        (false, false, false, false),
    ),
    pre_type(&["stablelm2", "megrez"], QWEN2, (true, false, false, false)),
    pre_type(&["dbrx", "smaug-bpe"], LLAMA3, (true, false, false, false)),
    pre_type(&["chatglm-bpe"], LLAMA3, (true, false, false, true)),
    pre_type(&["glm4", "glm5"], LLAMA3, (true, true, false, true)),
    pre_type(&["poro-chat"], PORO, (false, false, false, false)),
    pre_type(
        &["bloom", "gpt3-finnish"],
        PORO,
        (true, false, false, false),
    ),
    pre_type(&["viking"], VIKING, (false, false, false, false)),
    pre_type(&["tekken"], TEKKEN, (false, true, true, false)),
    pre_type(
        &["gpt-4o", "llama4", "kanana2", "talkie"],
        GPT4O,
        (false, false, false, false),
    ),
    pre_type(&["seed-coder"], SEED_CODER, (false, false, false, false)),
    pre_type(&["ufakzeka"], UFAKZEKA, (false, false, false, false)),
    pre_type(
        &["bailingmoe", "bailingmoe2", "llada-moe"],
        BAILINGMOE,
        (false, false, false, false),
    ),
    pre_type(&["minicpm5"], MINICPM5, (true, true, false, false)),
];

/// The pre-tokenizer and flags for `tokenizer.ggml.pre` (`None` or empty: llama.cpp's default);
/// an unknown name is an error naming it and listing the known ones, as in llama.cpp.
pub(crate) fn for_pre_type(pre: Option<&str>) -> Result<PreConfig, EngineError> {
    let name = pre.unwrap_or("default");
    let Some(ty) = PRE_TYPES.iter().find(|t| t.names.contains(&name)) else {
        let known: Vec<&str> = PRE_TYPES.iter().flat_map(|t| t.names).copied().collect();
        return Err(EngineError::tokenizer(
            "gguf",
            format!(
                "unknown pre-tokenizer `{name}` in `tokenizer.ggml.pre` (supported: {})",
                known.join(", ")
            ),
        ));
    };
    let (clean_spaces, ignore_merges, add_bos, no_bos) = ty.flags;
    let rules = ty
        .rules
        .iter()
        .map(|s| match s {
            Spec::Gpt2 => Ok(Rule::Gpt2),
            Spec::Llama3 => Ok(Rule::Llama3 { max_digits: 3 }),
            Spec::Qwen2 => Ok(Rule::Llama3 { max_digits: 1 }),
            Spec::Re(expr) => regex_rule(expr),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PreConfig {
        pre: PreTokenizer { rules },
        clean_spaces,
        ignore_merges,
        add_bos,
        no_bos,
    })
}

/// The rules of `tokenizer.ggml.pre` as regexes for HF `tokenizers`' `Split` pre-tokenizer, in
/// order: the hand-written splitters as the regexes they implement (those of the original
/// `tokenizer.json` files), the others as they are.
pub(crate) fn hf_patterns(pre: Option<&str>) -> Result<Vec<String>, EngineError> {
    const GPT2_RE: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let name = pre.unwrap_or("default");
    // Unknown names get for_pre_type's error, which lists the known ones.
    for_pre_type(pre)?;
    let ty = PRE_TYPES
        .iter()
        .find(|t| t.names.contains(&name))
        .expect("for_pre_type knows it");
    Ok(ty
        .rules
        .iter()
        .map(|s| match s {
            Spec::Gpt2 => GPT2_RE.to_string(),
            Spec::Llama3 => LLAMA3_RE.to_string(),
            Spec::Qwen2 => QWEN2_RE.to_string(),
            Spec::Re(expr) => expr.to_string(),
        })
        .collect())
}

impl PreTokenizer {
    /// Splits `text` into words, as byte ranges in order, covering all of `text`.
    pub(crate) fn split(&self, text: &str) -> Vec<Range<usize>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut cps = Vec::with_capacity(text.len());
        let mut offs = Vec::with_capacity(text.len() + 1);
        for (i, c) in text.char_indices() {
            cps.push(c);
            offs.push(i);
        }
        offs.push(text.len());
        let fl: Vec<CpFlags> = cps.iter().map(|&c| flags(c)).collect();
        let text = Text { cps: &cps, fl: &fl };

        let mut segs = vec![(0, cps.len())];
        for rule in &self.rules {
            let mut next = Vec::with_capacity(segs.len() * 2);
            for &seg in &segs {
                match rule {
                    Rule::Gpt2 => split_gpt2(&text, seg, &mut next),
                    Rule::Llama3 { max_digits } => split_llama3(&text, seg, *max_digits, &mut next),
                    Rule::Regex { re, collapsed } => {
                        split_regex(&text, seg, re, *collapsed, &mut next)
                    }
                }
            }
            segs = next;
        }
        segs.into_iter().map(|(a, b)| offs[a]..offs[b]).collect()
    }
}

/// The code points of the text being split and their flags.
struct Text<'a> {
    cps: &'a [char],
    fl: &'a [CpFlags],
}

/// Emits consecutive segments `[prev, end)`, dropping empty ones (llama.cpp's `_add_token`).
struct Emitter {
    prev: usize,
}

impl Emitter {
    fn add(&mut self, end: usize, out: &mut Vec<(usize, usize)>) -> usize {
        let len = end - self.prev;
        if len > 0 {
            out.push((self.prev, end));
        }
        self.prev = end;
        len
    }
}

/// Accessors that see only one segment: outside it, no code point and no flags.
struct Seg<'a> {
    t: &'a Text<'a>,
    ini: usize,
    end: usize,
}

impl Seg<'_> {
    fn cpt(&self, pos: usize) -> Option<char> {
        (self.ini <= pos && pos < self.end).then(|| self.t.cps[pos])
    }
    fn flags(&self, pos: usize) -> CpFlags {
        if self.ini <= pos && pos < self.end {
            self.t.fl[pos]
        } else {
            CpFlags::NONE
        }
    }
}

fn not_ws_letter_number(f: CpFlags) -> bool {
    !(f.is_whitespace() || f.is_letter() || f.is_number())
}

fn split_gpt2(t: &Text, (ini, end): (usize, usize), out: &mut Vec<(usize, usize)>) {
    let s = Seg { t, ini, end };
    let mut em = Emitter { prev: ini };
    let mut pos = ini;
    while pos < end {
        let c = t.cps[pos];
        let f = t.fl[pos];
        // 's|'t|'re|'ve|'m|'ll|'d
        if c == '\'' && pos + 1 < end {
            let n = t.cps[pos + 1];
            if matches!(n, 's' | 't' | 'm' | 'd') {
                pos += em.add(pos + 2, out);
                continue;
            }
            if pos + 2 < end {
                let nn = t.cps[pos + 2];
                if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += em.add(pos + 3, out);
                    continue;
                }
            }
        }
        let mut f2 = if c == ' ' { s.flags(pos + 1) } else { f };
        // <space>?\p{L}+
        if f2.is_letter() {
            pos += usize::from(c == ' ');
            while f2.is_letter() {
                pos += 1;
                f2 = s.flags(pos);
            }
            em.add(pos, out);
            continue;
        }
        // <space>?\p{N}+
        if f2.is_number() {
            pos += usize::from(c == ' ');
            while f2.is_number() {
                pos += 1;
                f2 = s.flags(pos);
            }
            em.add(pos, out);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+
        if not_ws_letter_number(f2) && f2.bits() != 0 {
            pos += usize::from(c == ' ');
            while not_ws_letter_number(f2) && f2.bits() != 0 {
                pos += 1;
                f2 = s.flags(pos);
            }
            em.add(pos, out);
            continue;
        }
        let mut nws = 0;
        while s.flags(pos + nws).is_whitespace() {
            nws += 1;
        }
        // \s+(?!\S)
        if nws > 1 && s.cpt(pos + nws).is_some() {
            pos += nws - 1;
            em.add(pos, out);
            continue;
        }
        // \s+
        if nws > 0 {
            pos += nws;
            em.add(pos, out);
            continue;
        }
        pos += 1;
        em.add(pos, out);
    }
}

/// Llama-3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`; Qwen-2 is the same with `\p{N}`.
fn split_llama3(
    t: &Text,
    (ini, end): (usize, usize),
    max_digits: usize,
    out: &mut Vec<(usize, usize)>,
) {
    let s = Seg { t, ini, end };
    let mut em = Emitter { prev: ini };
    let is_rn = |c: Option<char>| matches!(c, Some('\r') | Some('\n'));
    let mut pos = ini;
    while pos < end {
        let c = t.cps[pos];
        let f = t.fl[pos];
        if c == '\'' && pos + 1 < end {
            let n = t.cps[pos + 1].to_ascii_lowercase();
            if matches!(n, 's' | 't' | 'm' | 'd') {
                pos += em.add(pos + 2, out);
                continue;
            }
            if pos + 2 < end {
                let nn = t.cps[pos + 2].to_ascii_lowercase();
                if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += em.add(pos + 3, out);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(c == '\r' || c == '\n' || f.is_number())
            && (f.is_letter() || s.flags(pos + 1).is_letter())
        {
            pos += 1;
            while s.flags(pos).is_letter() {
                pos += 1;
            }
            em.add(pos, out);
            continue;
        }
        // \p{N}{1,max_digits}
        if f.is_number() {
            let mut run_start = pos;
            while s.flags(pos).is_number() {
                pos += 1;
                if pos - run_start >= max_digits {
                    em.add(pos, out);
                    run_start = pos;
                }
            }
            em.add(pos, out);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+[\r\n]*
        let mut f2 = if c == ' ' { s.flags(pos + 1) } else { f };
        if not_ws_letter_number(f2) && f.bits() != 0 {
            pos += usize::from(c == ' ');
            while not_ws_letter_number(f2) && f2.bits() != 0 {
                pos += 1;
                f2 = s.flags(pos);
            }
            while is_rn(s.cpt(pos)) {
                pos += 1;
            }
            em.add(pos, out);
            continue;
        }
        let mut nws = 0;
        let mut last_rn_end = 0;
        while s.flags(pos + nws).is_whitespace() {
            if is_rn(s.cpt(pos + nws)) {
                last_rn_end = pos + nws + 1;
            }
            nws += 1;
        }
        // \s*[\r\n]+
        if last_rn_end > 0 {
            pos = last_rn_end;
            em.add(pos, out);
            continue;
        }
        // \s+(?!\S)
        if nws > 1 && s.cpt(pos + nws).is_some() {
            pos += nws - 1;
            em.add(pos, out);
            continue;
        }
        // \s+
        if nws > 0 {
            pos += nws;
            em.add(pos, out);
            continue;
        }
        pos += 1;
        em.add(pos, out);
    }
}

/// Stand-ins for non-ASCII code points in the collapsed text (llama.cpp uses bytes 0xD0..0xD5).
const COLLAPSED_OTHER: char = '\u{E0D0}';
const COLLAPSED_NUMBER: char = '\u{E0D1}';
const COLLAPSED_LETTER: char = '\u{E0D2}';
const COLLAPSED_PUNCT: char = '\u{E0D3}';
const COLLAPSED_MARK: char = '\u{E0D4}';
const COLLAPSED_SYMBOL: char = '\u{E0D5}';

/// The class body a `\p{..}` category stands for in a collapsed regex: the stand-in plus the
/// ASCII members of the category (ASCII stays itself in the collapsed text).
fn category_class(name: &str) -> Option<String> {
    let (stand_in, ascii) = match name {
        "N" => (COLLAPSED_NUMBER, "0-9"),
        "L" | "Lu" | "Ll" | "Lt" | "Lm" | "Lo" => (COLLAPSED_LETTER, "A-Za-z"),
        "P" => (COLLAPSED_PUNCT, "!-#%-*,-/:;?@\\[-\\]_\\{\\}"),
        "M" => (COLLAPSED_MARK, ""),
        "S" => (COLLAPSED_SYMBOL, "\\$\\+<->\\^`\\|~"),
        _ => return None,
    };
    Some(format!("{stand_in}{ascii}"))
}

fn uses_categories(expr: &str) -> bool {
    ["N", "L", "P", "M", "S", "Lu", "Ll", "Lt", "Lm", "Lo"]
        .iter()
        .any(|c| expr.contains(&format!("\\p{{{c}}}")))
}

/// Rewrites `\p{..}` categories into classes over the collapsed text, as llama.cpp does.
fn collapse_regex(expr: &str) -> String {
    let ch: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < ch.len() {
        if ch[i] == '[' && (i == 0 || ch[i - 1] != '\\') {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && ch[i] == ']' && ch[i - 1] != '\\' {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        if ch[i] == '\\' && i + 3 < ch.len() && ch[i + 1] == 'p' && ch[i + 2] == '{' {
            if let Some(close) = (i + 3..ch.len().min(i + 11)).find(|&j| ch[j] == '}') {
                let name: String = ch[i + 3..close].iter().collect();
                if let Some(class) = category_class(&name) {
                    if !inside {
                        out.push('[');
                    }
                    out.push_str(&class);
                    if !inside {
                        out.push(']');
                    }
                    i = close + 1;
                    continue;
                }
            }
        }
        out.push(ch[i]);
        i += 1;
    }
    out
}

fn regex_rule(expr: &str) -> Result<Rule, EngineError> {
    let collapsed = uses_categories(expr);
    let pattern = if collapsed {
        collapse_regex(expr)
    } else {
        expr.to_string()
    };
    let re = fancy_regex::Regex::new(&pattern)
        .map_err(|e| EngineError::tokenizer("pre-tokenizer regex", format!("`{expr}`: {e}")))?;
    Ok(Rule::Regex {
        re: Box::new(re),
        collapsed,
    })
}

/// The character a code point becomes in the text a regex rule runs on.
fn regex_char(c: char, f: CpFlags, collapsed: bool) -> char {
    if (c as u32) < 128 {
        return c;
    }
    if f.is_whitespace() {
        return '\u{0B}';
    }
    if !collapsed {
        return c;
    }
    match f.category() {
        CpFlags::NUMBER => COLLAPSED_NUMBER,
        CpFlags::LETTER => COLLAPSED_LETTER,
        CpFlags::PUNCTUATION => COLLAPSED_PUNCT,
        CpFlags::MARK => COLLAPSED_MARK,
        CpFlags::SYMBOL => COLLAPSED_SYMBOL,
        _ => COLLAPSED_OTHER,
    }
}

/// Matches and the unmatched stretches between them all become segments (llama.cpp's
/// `unicode_regex_split_stl`); an empty match only splits the stretch it falls in.
fn split_regex(
    t: &Text,
    (ini, end): (usize, usize),
    re: &fancy_regex::Regex,
    collapsed: bool,
    out: &mut Vec<(usize, usize)>,
) {
    let mut hay = String::with_capacity(end - ini);
    let mut byte_of = Vec::with_capacity(end - ini + 1);
    for i in ini..end {
        byte_of.push(hay.len());
        hay.push(regex_char(t.cps[i], t.fl[i], collapsed));
    }
    byte_of.push(hay.len());
    let cp_of = |b: usize| ini + byte_of.partition_point(|&x| x < b);

    let mut done = ini;
    for m in re.find_iter(&hay) {
        // A regex that fails at run time (backtracking limit) leaves the rest unsplit.
        let Ok(m) = m else { break };
        let (s, e) = (cp_of(m.start()), cp_of(m.end()));
        if s > done {
            out.push((done, s));
        }
        if e > s {
            out.push((s, e));
        }
        done = done.max(e);
    }
    if done < end {
        out.push((done, end));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let cfg = for_pre_type(Some(pre)).expect("known pre-tokenizer");
        cfg.pre
            .split(text)
            .into_iter()
            .map(|r| text[r].to_string())
            .collect()
    }

    #[test]
    fn gpt2_split() {
        assert_eq!(
            words("gpt-2", "Hello world's  end 123!!\n"),
            ["Hello", " world", "'s", " ", " end", " 123", "!!", "\n"]
        );
    }

    #[test]
    fn smollm_splits_digits_first() {
        assert_eq!(
            words("smollm", "abc 12345 x3.14"),
            ["abc", " ", "1", "2", "3", "4", "5", " x", "3", ".", "1", "4"]
        );
    }

    #[test]
    fn llama3_groups_three_digits() {
        assert_eq!(
            words("llama3", "I'M 1234567 ok\n\n  x"),
            ["I", "'M", " ", "123", "456", "7", " ok", "\n\n", " ", " x"]
        );
    }

    #[test]
    fn qwen2_single_digits() {
        assert_eq!(words("qwen2", "x 12"), ["x", " ", "1", "2"]);
    }

    #[test]
    fn default_splits_punctuation_runs_and_digit_triples() {
        assert_eq!(
            words("default", "a+b 1234567 ..."),
            ["a", "+", "b", " ", "123", "456", "7", " ", "..."]
        );
    }

    #[test]
    fn deepseek3_splits_cjk_and_numbers() {
        assert_eq!(
            words("deepseek-v3", "你好world 12345"),
            ["你好", "world", " ", "123", "45"]
        );
    }

    /// llama.cpp refuses a `tokenizer.ggml.pre` it does not know; so do we, naming it and the
    /// known ones (it used to fall back on the default split silently).
    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let err = match for_pre_type(Some("llama-9000")) {
            Ok(_) => panic!("an unknown pre-tokenizer loads"),
            Err(e) => e.to_string(),
        };
        for want in [
            "`llama-9000`",
            "`tokenizer.ggml.pre`",
            "supported: default, llama3",
            "smollm",
            "minicpm5",
        ] {
            assert!(err.contains(want), "`{want}` not in: {err}");
        }
        assert!(for_pre_type(None).is_ok());
        assert!(for_pre_type(Some("default")).is_ok());
        // Every name of the table builds.
        for name in PRE_TYPES.iter().flat_map(|t| t.names) {
            assert!(for_pre_type(Some(name)).is_ok(), "{name}");
        }
    }

    #[test]
    fn split_covers_the_text() {
        let text = "Some text, with ünïcödé — and emoji 🙂🙂 and\ttabs\r\n";
        for pre in [
            "default",
            "gpt-2",
            "smollm",
            "llama3",
            "qwen2",
            "deepseek-v3",
            "tekken",
        ] {
            let joined: String = words(pre, text).concat();
            assert_eq!(joined, text, "{pre}");
        }
    }
}
