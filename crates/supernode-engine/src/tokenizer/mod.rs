//! Tokenizers: text <-> token ids, exactly as llama.cpp does it for GGUF files, and through HF
//! `tokenizers` for `tokenizer.json` directories.
//!
//! A GGUF vocabulary (`tokenizer.ggml.*` metadata) is either `gpt2` (byte-level BPE, `bpe.rs`,
//! words split by the pre-tokenizer of `tokenizer.ggml.pre`, `pretok.rs`) or `llama`
//! (SentencePiece-style, `spm.rs`). Encoding first cuts special-token texts out of the input
//! (`special.rs`, llama.cpp's `tokenizer_st_partition`), then tokenises the text between them.
//! Decoding concatenates each token's bytes (llama.cpp's `token_to_piece`, cached per token at
//! load) and applies llama.cpp's `detokenize` rules: the first token loses one leading space when
//! the model adds a space prefix, and `clean_spaces` vocabularies drop spaces before punctuation.
//! [`IncrementalDecoder`] streams the same text token by token.
//!
//! Invariants: ids below [`Tokenizer::vocab_size`] are valid; every lookup table is built once at
//! load; nothing here panics on file or user data.
//!
//! Length: about 820 lines of code, above the house's 800, because loading a GGUF vocabulary
//! checks every piece of metadata against the others (ids in range, types, merges, the
//! pre-tokenizer name) in one place, so that a crafted file is refused with the key it got
//! wrong; splitting those checks from the fields they guard would scatter one contract.

mod bpe;
mod detok;
mod export;
mod hf;
mod pretok;
mod special;
mod spm;
mod unicode;
mod vocab;

use std::ops::Range;
use std::path::Path;

use supernode_models::Metadata;

use crate::error::EngineError;

pub use detok::IncrementalDecoder;

use bpe::Bpe;
use hf::HfBackend;
use special::{Fragment, SpecialMatcher};
use spm::Spm;
use vocab::{attr, Vocab};

/// Texts llama.cpp takes for end-of-turn tokens when `tokenizer.ggml.eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts llama.cpp treats as end of generation whatever the metadata says.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// How tokens become bytes for decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2 byte-level: each char of a normal token stands for one byte.
    ByteLevel,
    /// SentencePiece: U+2581 is a space, `<0xNN>` byte tokens are that byte.
    SentencePiece,
    /// The token text as it is.
    Raw,
}

enum Backend {
    Spm(Spm),
    Bpe(Bpe),
    Hf(Box<HfBackend>),
}

/// A model's tokenizer. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Tokenizer {
    vocab: Vocab,
    backend: Backend,
    specials: SpecialMatcher,
    /// `token_to_piece(id, special = true)` of every token, concatenated; `piece_offs[id]..[id+1]`.
    piece_bytes: Vec<u8>,
    piece_offs: Vec<usize>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// SPM: prefix a space to text at the start and after each special token.
    spm_space_prefix: bool,
    /// Decoding drops one leading space of the first token.
    strip_first_space: bool,
    /// Decoding removes spaces before `?!.,` and in contractions (llama.cpp's `clean_spaces`).
    clean_spaces: bool,
    eog: Vec<u32>,
    chat_template: Option<String>,
}

/// Optional special ids read from metadata, with llama.cpp's defaults.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    fim: [Option<u32>; 6], // pre, suf, mid, pad, rep, sep
}

impl Tokenizer {
    /// Builds the tokenizer of a GGUF file from its metadata, as llama.cpp's `llama_vocab::load`.
    pub fn from_gguf_metadata(meta: &Metadata) -> Result<Tokenizer, EngineError> {
        let model = meta
            .get_str("tokenizer.ggml.model")?
            .ok_or_else(|| EngineError::tokenizer("gguf", "no `tokenizer.ggml.model` key"))?;
        let pre = meta
            .get_str("tokenizer.ggml.pre")?
            .filter(|p| !p.is_empty());
        let raw_tokens = meta
            .get_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| EngineError::tokenizer("gguf", "no `tokenizer.ggml.tokens` key"))?;
        let n = raw_tokens.len();
        let texts: Vec<String> = raw_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    (*t).to_string()
                }
            })
            .collect();
        drop(raw_tokens);
        let scores = match meta.get_f32_array("tokenizer.ggml.scores")? {
            Some(s) if s.len() < n => {
                return Err(EngineError::tokenizer(
                    "gguf",
                    format!("{} scores for {n} tokens", s.len()),
                ))
            }
            Some(s) => s,
            None => vec![0.0; n],
        };
        let attrs = match meta.get_i64_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() < n => {
                return Err(EngineError::tokenizer(
                    "gguf",
                    format!("{} token types for {n} tokens", t.len()),
                ))
            }
            Some(t) => t
                .iter()
                .take(n)
                .map(|&t| attr::from_token_type(t))
                .collect(),
            None => vec![attr::NORMAL; n],
        };
        let mut vocab = Vocab::new(texts, scores, attrs);

        // Per-model defaults, then the metadata's word.
        let (mut ids, mut add_bos, mut add_space_prefix, clean_spaces, kind) = match model {
            "llama" => (
                SpecialIds::defaults(Some(1), Some(2), Some(0)),
                true,
                true,
                false,
                None,
            ),
            "gpt2" => {
                let cfg = pretok::for_pre_type(pre)?;
                let bos = if cfg.no_bos { None } else { Some(11) };
                let ids = SpecialIds::defaults(bos, Some(11), None);
                (ids, cfg.add_bos, false, cfg.clean_spaces, Some(cfg))
            }
            other => {
                return Err(EngineError::tokenizer(
                    "gguf",
                    format!("tokenizer model `{other}` is not supported (only `gpt2` and `llama`)"),
                ))
            }
        };
        let mut add_eos = false;
        if let Some(v) = meta.get_bool("tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }
        ids.read(meta, n)?;
        if let Some(v) = meta.get_bool("tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }
        if let Some(v) = meta.get_bool("tokenizer.ggml.add_eos_token")? {
            add_eos = v;
        }

        let backend = match kind {
            None => Backend::Spm(Spm::new(&vocab, ids.unk)),
            Some(cfg) => {
                let merges = meta
                    .get_str_array("tokenizer.ggml.merges")?
                    .ok_or_else(|| EngineError::tokenizer("gguf", "no `tokenizer.ggml.merges`"))?;
                Backend::Bpe(Bpe::new(&vocab, &merges, cfg.pre, cfg.ignore_merges))
            }
        };
        let style = match backend {
            Backend::Bpe(_) => PieceStyle::ByteLevel,
            _ => PieceStyle::SentencePiece,
        };
        let eog = detect_specials(&mut vocab, &mut ids);
        let specials = special_matcher(&vocab, |_| true);
        let chat_template = meta.get_str("tokenizer.chat_template")?.map(str::to_string);
        Ok(Tokenizer::assemble(
            vocab,
            backend,
            specials,
            style,
            Settings {
                bos: ids.bos,
                eos: ids.eos,
                add_bos,
                add_eos,
                spm_space_prefix: add_space_prefix && matches!(style, PieceStyle::SentencePiece),
                strip_first_space: add_space_prefix,
                clean_spaces,
                eog,
                chat_template,
            },
        ))
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json` when present, for BOS/EOS, `add_bos_token`
    /// and `chat_template`) from `dir` through HF `tokenizers`.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, EngineError> {
        let loaded = hf::load(dir)?;
        let mut vocab = loaded.vocab;
        let mut ids = SpecialIds {
            bos: loaded.bos,
            eos: loaded.eos,
            eot: None,
            eom: None,
            unk: None,
            fim: [None; 6],
        };
        // Only HF's own special added tokens are cut out here (and only when parsing specials):
        // inside fragments HF handles its non-special added tokens itself.
        let specials = special_matcher(&vocab, |a| a & (attr::CONTROL | attr::UNKNOWN) != 0);
        let eog = detect_specials(&mut vocab, &mut ids);
        Ok(Tokenizer::assemble(
            vocab,
            Backend::Hf(Box::new(loaded.backend)),
            specials,
            loaded.style,
            Settings {
                bos: ids.bos,
                eos: ids.eos,
                add_bos: loaded.add_bos,
                add_eos: loaded.add_eos,
                spm_space_prefix: false,
                strip_first_space: loaded.strip_first_space,
                clean_spaces: false,
                eog,
                chat_template: loaded.chat_template,
            },
        ))
    }

    fn assemble(
        vocab: Vocab,
        backend: Backend,
        specials: SpecialMatcher,
        style: PieceStyle,
        s: Settings,
    ) -> Tokenizer {
        let mut piece_bytes = Vec::with_capacity(vocab.len() * 6);
        let mut piece_offs = Vec::with_capacity(vocab.len() + 1);
        for (text, &a) in vocab.texts.iter().zip(&vocab.attrs) {
            piece_offs.push(piece_bytes.len());
            write_piece(style, text, a, &mut piece_bytes);
        }
        piece_offs.push(piece_bytes.len());
        Tokenizer {
            vocab,
            backend,
            specials,
            piece_bytes,
            piece_offs,
            bos: s.bos,
            eos: s.eos,
            add_bos: s.add_bos,
            add_eos: s.add_eos,
            spm_space_prefix: s.spm_space_prefix,
            strip_first_space: s.strip_first_space,
            clean_spaces: s.clean_spaces,
            eog: s.eog,
            chat_template: s.chat_template,
        }
    }

    /// Text to ids. `add_special`: add BOS/EOS as the model's flags say; `parse_special`: turn
    /// control-token texts (e.g. `<|im_start|>`) in `text` into their tokens.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.encode_impl(text, add_special, parse_special, &[])
    }

    /// Like [`Tokenizer::encode`] with `parse_special`, but control-token texts inside the byte
    /// ranges `protected` (user content in a rendered chat template) stay plain text. Text between
    /// special tokens is tokenised as a whole, so without special texts in the protected ranges
    /// the result is exactly `encode(text, add_special, true)`.
    pub fn encode_protected(
        &self,
        text: &str,
        add_special: bool,
        protected: &[Range<usize>],
    ) -> Vec<u32> {
        self.encode_impl(text, add_special, true, protected)
    }

    fn encode_impl(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        protected: &[Range<usize>],
    ) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.backend {
            Backend::Hf(hf) => {
                if !parse_special || protected.is_empty() {
                    hf.encode_whole(text, parse_special, &mut out);
                } else {
                    // HF splits special tokens itself; fragments are only needed when protection
                    // changes the split.
                    let frags = self.specials.partition(text, true, protected);
                    if frags == self.specials.partition(text, true, &[]) {
                        hf.encode_whole(text, true, &mut out);
                    } else {
                        hf.encode_fragments(text, &frags, &mut out);
                    }
                }
            }
            Backend::Bpe(bpe) => {
                for f in self.specials.partition(text, parse_special, protected) {
                    match f {
                        Fragment::Text(r) => bpe.tokenize(&self.vocab, &text[r], &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Backend::Spm(spm) => {
                let mut prev_special = true;
                let mut buf = String::new();
                for f in self.specials.partition(text, parse_special, protected) {
                    match f {
                        Fragment::Text(r) => {
                            buf.clear();
                            if self.spm_space_prefix && prev_special {
                                buf.push('\u{2581}');
                            }
                            for c in text[r].chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm.tokenize(&self.vocab, &buf, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Number of token ids (the largest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// End-of-generation ids, ascending: EOS, EOT, EOM and the control tokens llama.cpp treats as
    /// end of generation (`<|im_end|>`, `<end_of_turn>`, `<|endoftext|>`, `<|eot_id|>`, ...).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The bytes `id` decodes to (llama.cpp's `token_to_piece` without space stripping). Control
    /// and unknown tokens give their text when `render_special`, else nothing; an id outside the
    /// vocabulary gives nothing.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> Vec<u8> {
        self.piece(id, render_special).to_vec()
    }

    pub(crate) fn piece(&self, id: u32, render_special: bool) -> &[u8] {
        let i = id as usize;
        if i >= self.vocab.len()
            || (!render_special
                && self.vocab.has_attr(id, attr::CONTROL | attr::UNKNOWN)
                && !self.vocab.has_attr(id, attr::MARKUP))
        {
            return &[];
        }
        &self.piece_bytes[self.piece_offs[i]..self.piece_offs[i + 1]]
    }

    pub(crate) fn strips_first_space(&self) -> bool {
        self.strip_first_space
    }

    pub(crate) fn cleans_spaces(&self) -> bool {
        self.clean_spaces
    }

    /// Ids to text, as llama.cpp's `llama_detokenize(remove_special = false, unparse_special =
    /// render_special)`; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip = self.strip_first_space;
        for &id in ids {
            let mut p = self.piece(id, render_special);
            if strip {
                p = p.strip_prefix(b" ").unwrap_or(p);
                strip = false;
            }
            bytes.extend_from_slice(p);
        }
        if self.clean_spaces {
            clean_spaces(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The vocabulary string of `id`.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The id of a vocabulary string.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    /// The id of a control token (one that only `parse_special` recognises) whose text occurs
    /// in `text`, if any.
    pub fn find_control_text(&self, text: &str) -> Option<u32> {
        self.specials.find_control(text)
    }

    /// `tokenizer.chat_template` of a GGUF file, or `chat_template` of `tokenizer_config.json`.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

struct Settings {
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    spm_space_prefix: bool,
    strip_first_space: bool,
    clean_spaces: bool,
    eog: Vec<u32>,
    chat_template: Option<String>,
}

/// The special-token ids of llama.cpp's GGUF keys that generation does not use (padding,
/// separator — llama.cpp's spelling —, classifier and mask tokens of encoder models).
const UNUSED_SPECIAL_KEYS: [&str; 4] = [
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.cls_token_id",
    "tokenizer.ggml.mask_token_id",
];

impl SpecialIds {
    fn defaults(bos: Option<u32>, eos: Option<u32>, unk: Option<u32>) -> SpecialIds {
        SpecialIds {
            bos,
            eos,
            eot: None,
            eom: None,
            unk,
            fim: [None; 6],
        }
    }

    /// Metadata ids override the defaults; defaults outside the vocabulary are dropped. A
    /// metadata id outside it is an error naming its key (llama.cpp warns and keeps the
    /// default, so that the file's BOS or EOS silently becomes another token).
    fn read(&mut self, meta: &Metadata, n: usize) -> Result<(), EngineError> {
        let [pre, suf, mid, pad, rep, sep] = &mut self.fim;
        let slots: [(&[&str], &mut Option<u32>); 11] = [
            (&["tokenizer.ggml.bos_token_id"], &mut self.bos),
            (&["tokenizer.ggml.eos_token_id"], &mut self.eos),
            (&["tokenizer.ggml.eot_token_id"], &mut self.eot),
            (&["tokenizer.ggml.eom_token_id"], &mut self.eom),
            (&["tokenizer.ggml.unknown_token_id"], &mut self.unk),
            (
                &[
                    "tokenizer.ggml.fim_pre_token_id",
                    "tokenizer.ggml.prefix_token_id",
                ],
                pre,
            ),
            (
                &[
                    "tokenizer.ggml.fim_suf_token_id",
                    "tokenizer.ggml.suffix_token_id",
                ],
                suf,
            ),
            (
                &[
                    "tokenizer.ggml.fim_mid_token_id",
                    "tokenizer.ggml.middle_token_id",
                ],
                mid,
            ),
            (&["tokenizer.ggml.fim_pad_token_id"], pad),
            (&["tokenizer.ggml.fim_rep_token_id"], rep),
            (&["tokenizer.ggml.fim_sep_token_id"], sep),
        ];
        let in_vocab = |key: &str| -> Result<Option<u32>, EngineError> {
            match meta.get_usize(key)? {
                Some(id) if id >= n => Err(EngineError::tokenizer(
                    "gguf",
                    format!(
                        "`{key}` is {id}, outside the vocabulary of {n} tokens \
                         (`tokenizer.ggml.tokens`)"
                    ),
                )),
                id => Ok(id.map(|id| id as u32)),
            }
        };
        for (keys, slot) in slots {
            if slot.is_some_and(|id| id as usize >= n) {
                *slot = None;
            }
            for key in keys {
                if let Some(id) = in_vocab(key)? {
                    *slot = Some(id);
                }
            }
        }
        // Ids generation does not use are still checked: a file that names a token it does
        // not have is broken, and saying so at load beats a wrong token later.
        for key in UNUSED_SPECIAL_KEYS {
            in_vocab(key)?;
        }
        Ok(())
    }
}

/// llama.cpp's text-based detection of EOT/EOM/FIM tokens, its "unused" marking and its
/// end-of-generation set; marks the tokens found as control tokens. Returns the sorted EOG ids.
/// (llama.cpp walks a hash map here; ids ascending decide the same whenever at most one
/// candidate text of each kind is in the vocabulary.)
fn detect_specials(vocab: &mut Vocab, ids: &mut SpecialIds) -> Vec<u32> {
    let n = vocab.len();
    for id in 0..n {
        let text = vocab.texts[id].as_str();
        let mut found = false;
        let [pre, suf, mid, pad, rep, sep] = &mut ids.fim;
        for (texts, slot) in [
            (EOT_TEXTS, &mut ids.eot),
            (&["<|eom_id|>"][..], &mut ids.eom),
            (FIM_PRE_TEXTS, pre),
            (FIM_SUF_TEXTS, suf),
            (FIM_MID_TEXTS, mid),
            (FIM_PAD_TEXTS, pad),
            (FIM_REP_TEXTS, rep),
            (FIM_SEP_TEXTS, sep),
        ] {
            if slot.is_none() && texts.contains(&text) {
                *slot = Some(id as u32);
                found = true;
            }
        }
        if found {
            vocab.attrs[id] |= attr::CONTROL;
        }
    }
    for id in 0..n {
        if vocab.attrs[id] & attr::CONTROL != 0 && vocab.texts[id].contains("unused") {
            vocab.attrs[id] |= attr::UNUSED;
        }
    }

    let mut eog: Vec<u32> = ids.fim[3..].iter().flatten().copied().collect();
    for id in 0..n {
        let text = vocab.texts[id].as_str();
        if EOG_TEXTS.contains(&text) {
            eog.push(id as u32);
            vocab.attrs[id] |= attr::CONTROL;
        }
        if crate::tool_parser::MARKUP_TEXTS.contains(&text) {
            vocab.attrs[id] |= attr::MARKUP;
        }
        if matches!(
            text,
            "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
        ) {
            vocab.attrs[id] = attr::USER_DEFINED;
        }
    }
    eog.extend(ids.eos);
    eog.extend(ids.eot);
    eog.extend(ids.eom);
    eog.sort_unstable();
    eog.dedup();

    let has = |eog: &[u32], vocab: &Vocab, t: &str| {
        eog.iter().find(|&&i| vocab.texts[i as usize] == t).copied()
    };
    // gpt-oss / solar-open: `<|end|>` ends a message, not the generation.
    if let Some(end) = has(&eog, vocab, "<|end|>") {
        let ret = has(&eog, vocab, "<|return|>").is_some();
        let call =
            has(&eog, vocab, "<|call|>").is_some() || has(&eog, vocab, "<|calls|>").is_some();
        let flush = has(&eog, vocab, "<|flush|>").is_some();
        if call && (ret || flush) {
            eog.retain(|&i| i != end);
            vocab.attrs[end as usize] = attr::USER_DEFINED;
        }
    }
    // gemma4 / plamo: `</s>` is a normal token there.
    if let Some(s) = has(&eog, vocab, "</s>") {
        if has(&eog, vocab, "<|tool_response>").is_some()
            || has(&eog, vocab, "<|plamo:eos|>").is_some()
        {
            eog.retain(|&i| i != s);
            vocab.attrs[s as usize] = attr::NORMAL;
        }
    }
    eog
}

/// The special-token matcher over every control, user-defined and unknown token whose attribute
/// passes `keep`.
fn special_matcher(vocab: &Vocab, keep: impl Fn(u32) -> bool) -> SpecialMatcher {
    let tokens = vocab
        .attrs
        .iter()
        .enumerate()
        .filter(|(_, &a)| a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0 && keep(a))
        .map(|(id, &a)| {
            (
                id as u32,
                vocab.texts[id].clone(),
                a & (attr::CONTROL | attr::UNKNOWN) != 0,
            )
        })
        .collect();
    SpecialMatcher::new(tokens)
}

/// llama.cpp's `token_to_piece(id, special = true)` for one token.
fn write_piece(style: PieceStyle, text: &str, a: u32, out: &mut Vec<u8>) {
    if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
        out.extend_from_slice(text.as_bytes());
    } else if a & attr::NORMAL != 0 {
        match style {
            PieceStyle::ByteLevel => {
                for c in text.chars() {
                    match unicode::char_to_byte(c) {
                        Some(b) => out.push(b),
                        None => {
                            out.extend_from_slice(b"[UNK_BYTE_0x");
                            for b in c.encode_utf8(&mut [0u8; 4]).bytes() {
                                out.extend_from_slice(format!("{b:02x}").as_bytes());
                            }
                            out.extend_from_slice(text.as_bytes());
                            out.push(b']');
                        }
                    }
                }
            }
            PieceStyle::SentencePiece => {
                for c in text.chars() {
                    if c == '\u{2581}' {
                        out.push(b' ');
                    } else {
                        out.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes());
                    }
                }
            }
            PieceStyle::Raw => out.extend_from_slice(text.as_bytes()),
        }
    } else if a & attr::BYTE != 0 {
        let hex = text.get(3..5).unwrap_or("");
        out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
    }
}

/// llama.cpp's `clean_spaces` passes over detokenised bytes: drop the space in " ?", " !", " .",
/// " ,"; turn " ' " into "'"; drop the space before "'s", "'m", "'re", "'ve".
pub(crate) fn clean_spaces(t: &mut Vec<u8>) {
    let n1 = t.len();
    if n1 == 0 {
        return;
    }
    let mut total = 1;
    for i in 1..n1 {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }
    let n2 = total;
    total = 1;
    let mut i = 1;
    while i < n2 {
        let x = t[i];
        if x == b'\'' && i + 1 < n2 && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }
    let n3 = total;
    total = 1;
    for i in 1..n3 {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < n3 {
            let x1 = t[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if x1 != b't' && x1 != b'd' && i + 2 < n3 {
                let x2 = t[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
}

#[cfg(test)]
mod tests {
    use supernode_models::MetaValue;

    use super::*;

    /// A SentencePiece vocabulary: unknown, BOS, EOS, the 256 byte tokens and a few pieces.
    fn spm_tokenizer() -> Tokenizer {
        Tokenizer::from_gguf_metadata(&spm_metadata()).expect("tokenizer builds")
    }

    /// The metadata of [`spm_tokenizer`].
    fn spm_metadata() -> Metadata {
        let mut tokens: Vec<(String, f32, i32)> = vec![
            ("<unk>".into(), 0.0, 2),
            ("<s>".into(), 0.0, 3),
            ("</s>".into(), 0.0, 3),
        ];
        tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
        for (t, score) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("▁a", -1.5),
            ("ab", -3.0),
            ("▁ab", -0.5),
        ] {
            tokens.push((t.into(), score, 1));
        }
        let mut meta = Metadata::default();
        let mut set = |k: &str, v: MetaValue| {
            meta.entries.insert(k.to_string(), v);
        };
        set("tokenizer.ggml.model", MetaValue::String("llama".into()));
        set(
            "tokenizer.ggml.tokens",
            MetaValue::Array(
                tokens
                    .iter()
                    .map(|t| MetaValue::String(t.0.clone()))
                    .collect(),
            ),
        );
        set(
            "tokenizer.ggml.scores",
            MetaValue::Array(tokens.iter().map(|t| MetaValue::F32(t.1)).collect()),
        );
        set(
            "tokenizer.ggml.token_type",
            MetaValue::Array(tokens.iter().map(|t| MetaValue::I32(t.2)).collect()),
        );
        meta
    }

    #[test]
    fn spm_space_prefix_merges_and_byte_fallback() {
        let tok = spm_tokenizer();
        let id = |t: &str| tok.token_id(t).unwrap_or(u32::MAX);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), Some(2));
        assert!(tok.adds_bos());
        assert_eq!(tok.encode("ab", true, false), [1, id("▁ab")]);
        // After a special token the space prefix comes back (llama.cpp's `is_prev_special`).
        assert_eq!(
            tok.encode("a</s>b", false, true),
            [id("▁a"), 2, id("▁"), id("b")]
        );
        assert_eq!(
            tok.encode("é", false, false),
            [id("▁"), id("<0xC3>"), id("<0xA9>")]
        );
        assert_eq!(tok.decode(&[id("▁ab")], false), "ab");
        // Only the very first token loses its space, even when it is an unrendered BOS.
        assert_eq!(tok.decode(&[1, id("▁ab")], false), " ab");
        assert_eq!(tok.decode(&[1, id("▁ab")], true), "<s> ab");
        assert_eq!(
            tok.decode(&[id("▁"), id("<0xC3>"), id("<0xA9>")], false),
            "é"
        );
        assert_eq!(tok.token_bytes(id("<0xC3>"), false), [0xC3]);
        assert_eq!(tok.token_bytes(2, false), b"");
        assert_eq!(tok.token_bytes(2, true), b"</s>");
        assert_eq!(tok.eog_ids(), [2]);
    }

    /// A special id outside the vocabulary used to be dropped for the default (BOS 1 for a
    /// file that said 5000); it is a load error naming the key.
    #[test]
    fn special_ids_outside_the_vocabulary_are_named() {
        let n = spm_tokenizer().vocab_size();
        let mut meta = spm_metadata();
        for key in [
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.fim_pre_token_id",
            "tokenizer.ggml.prefix_token_id",
            "tokenizer.ggml.fim_sep_token_id",
        ]
        .into_iter()
        .chain(UNUSED_SPECIAL_KEYS)
        {
            let mut bad = meta.clone();
            bad.entries.insert(key.into(), MetaValue::U32(n as u32));
            let err = Tokenizer::from_gguf_metadata(&bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{key}` is {n}")) && err.contains("vocabulary"),
                "{err}"
            );
        }
        meta.entries.insert(
            "tokenizer.ggml.eos_token_id".into(),
            MetaValue::U32(n as u32 - 1),
        );
        let tok = Tokenizer::from_gguf_metadata(&meta).unwrap();
        assert_eq!(tok.eos_id(), Some(n as u32 - 1));
    }

    #[test]
    fn tokenizers_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<crate::chat::ChatTemplate>();
    }

    fn cleaned(s: &str) -> String {
        let mut b = s.as_bytes().to_vec();
        clean_spaces(&mut b);
        String::from_utf8(b).unwrap_or_default()
    }

    #[test]
    fn clean_spaces_like_llama_cpp() {
        assert_eq!(cleaned("Hello , world !"), "Hello, world!");
        assert_eq!(cleaned("it ' s"), "it's");
        assert_eq!(cleaned("I 'm here , they 're"), "I'm here, they're");
        assert_eq!(cleaned("don 't"), "don 't");
        assert_eq!(cleaned(" ."), ".");
        assert_eq!(cleaned(""), "");
    }
}
