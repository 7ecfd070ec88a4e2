//! A GGUF vocabulary written out as HF `tokenizer.json`, for programs that tokenise with HF
//! `tokenizers` (Dynamo's frontend renders and tokenises the prompts of the workers it routes
//! to, from the model card's `tokenizer.json`).
//!
//! - `gpt2` vocabularies become byte-level BPE: the merges of `tokenizer.ggml.merges` in order,
//!   and the pre-tokenizer of `tokenizer.ggml.pre` as a sequence of regex splits (the regexes
//!   llama.cpp's hand-written splitters implement, as the original `tokenizer.json` files state
//!   them), then the byte-level mapping without its own regex.
//! - `llama` (SentencePiece) vocabularies become BPE with byte fallback, whose merges are every
//!   split of a token into two tokens, ranked by the merged token's score, highest first: the
//!   order in which llama.cpp's `llm_tokenizer_spm` merges (as HF's own converter does it).
//!   Spaces become U+2581 in a normalizer, with the leading one when the model adds it.
//!
//! Control and user-defined tokens are added tokens (special for control ones). BOS/EOS are added
//! by the post-processor when the model adds them. The tests check the result with HF
//! `tokenizers` against llama.cpp's ids on the real models.

use serde_json::{json, Map, Value};
use supernode_models::Metadata;

use crate::error::EngineError;

use super::pretok;
use super::vocab::attr;
use super::{Backend, Tokenizer};

impl Tokenizer {
    /// This tokenizer as HF `tokenizer.json`. `meta` is the GGUF metadata it was built from
    /// (for the merges and the pre-tokenizer); a tokenizer loaded from a `tokenizer.json`
    /// directory has that file already, and is refused.
    pub fn hf_tokenizer_json(&self, meta: &Metadata) -> Result<Value, EngineError> {
        let (model, pre_tokenizer, normalizer, decoder) = match &self.backend {
            Backend::Bpe(_) => self.byte_level_parts(meta)?,
            Backend::Spm(_) => self.sentencepiece_parts(meta)?,
            Backend::Hf(_) => {
                return Err(EngineError::tokenizer(
                    "export",
                    "this tokenizer comes from a tokenizer.json already: use that file",
                ))
            }
        };
        let added: Vec<Value> = (0..self.vocab.len() as u32)
            .filter(|&id| self.vocab.has_attr(id, attr::CONTROL | attr::USER_DEFINED))
            .map(|id| {
                json!({
                    "id": id,
                    "content": self.vocab.texts[id as usize],
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": self.vocab.has_attr(id, attr::CONTROL),
                })
            })
            .collect();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor(),
            "decoder": decoder,
            "model": model,
        }))
    }

    /// The text of token `id`, if there is one.
    fn text_of(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.vocab.texts.get(i as usize))
            .map(String::as_str)
    }

    /// BOS and EOS around each sequence, as the model's flags say; none when it adds neither.
    fn post_processor(&self) -> Value {
        let ends: Vec<(&str, u32)> = [(self.add_bos, self.bos), (self.add_eos, self.eos)]
            .into_iter()
            .filter_map(|(adds, id)| adds.then_some(id).flatten())
            .filter_map(|id| Some((self.text_of(Some(id))?, id)))
            .collect();
        if ends.is_empty() {
            return Value::Null;
        }
        let seq = |name: &str, type_id: u32| {
            let mut v = Vec::new();
            if self.add_bos {
                if let Some(t) = self.text_of(self.bos) {
                    v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
                }
            }
            v.push(json!({"Sequence": {"id": name, "type_id": type_id}}));
            if self.add_eos {
                if let Some(t) = self.text_of(self.eos) {
                    v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
                }
            }
            v
        };
        let mut pair = seq("A", 0);
        pair.extend(seq("B", 1));
        let specials: Map<String, Value> = ends
            .iter()
            .map(|&(t, id)| (t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]})))
            .collect();
        json!({
            "type": "TemplateProcessing",
            "single": seq("A", 0),
            "pair": pair,
            "special_tokens": specials,
        })
    }

    fn vocab_map(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for (id, t) in self.vocab.texts.iter().enumerate() {
            // Duplicate texts keep the last id, as the text -> id map does.
            m.insert(t.clone(), json!(id));
        }
        m
    }

    fn byte_level_parts(
        &self,
        meta: &Metadata,
    ) -> Result<(Value, Value, Value, Value), EngineError> {
        let pre = meta
            .get_str("tokenizer.ggml.pre")?
            .filter(|p| !p.is_empty());
        let cfg = pretok::for_pre_type(pre)?;
        let merges = meta
            .get_str_array("tokenizer.ggml.merges")?
            .ok_or_else(|| EngineError::tokenizer("gguf", "no `tokenizer.ggml.merges`"))?;
        let merges: Vec<Value> = merges
            .iter()
            .filter_map(|m| {
                // Split as the BPE loader does: at the first space after the first byte.
                let pos = m.bytes().skip(1).position(|b| b == b' ')? + 1;
                Some(json!([&m[..pos], &m[pos + 1..]]))
            })
            .collect();
        let byte_level = json!({
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": false,
        });
        let mut steps: Vec<Value> = pretok::hf_patterns(pre)?
            .into_iter()
            .map(|p| {
                json!({
                    "type": "Split",
                    "pattern": {"Regex": p},
                    "behavior": "Isolated",
                    "invert": false,
                })
            })
            .collect();
        steps.push(byte_level.clone());
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": cfg.ignore_merges,
            "vocab": self.vocab_map(),
            "merges": merges,
        });
        let pre_tokenizer = json!({"type": "Sequence", "pretokenizers": steps});
        Ok((model, pre_tokenizer, Value::Null, byte_level))
    }

    fn sentencepiece_parts(
        &self,
        meta: &Metadata,
    ) -> Result<(Value, Value, Value, Value), EngineError> {
        let unk = match meta.get_usize("tokenizer.ggml.unknown_token_id")? {
            Some(id) => u32::try_from(id).ok(),
            None => self.vocab.id("<unk>"),
        };
        // Every split of a normal token into two tokens, ranked by the token's score.
        let mut merges: Vec<(f32, u32, usize)> = Vec::new();
        for (id, text) in self.vocab.texts.iter().enumerate() {
            if !self
                .vocab
                .has_attr(id as u32, attr::NORMAL | attr::USER_DEFINED)
            {
                continue;
            }
            for (cut, _) in text.char_indices().skip(1) {
                let (l, r) = text.split_at(cut);
                if self.vocab.id(l).is_some() && self.vocab.id(r).is_some() {
                    merges.push((self.vocab.scores[id], id as u32, cut));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let merges: Vec<Value> = merges
            .iter()
            .map(|&(_, id, cut)| {
                let (l, r) = self.vocab.texts[id as usize].split_at(cut);
                json!([l, r])
            })
            .collect();
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": self.text_of(unk),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": self.vocab_map(),
            "merges": merges,
        });
        let replace_space = json!({
            "type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"
        });
        let normalizer = if self.spm_space_prefix {
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                replace_space,
            ]})
        } else {
            replace_space
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.strip_first_space {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok((
            model,
            Value::Null,
            normalizer,
            json!({"type": "Sequence", "decoders": decoders}),
        ))
    }
}
