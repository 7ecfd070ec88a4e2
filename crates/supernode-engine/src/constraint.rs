//! Constrained decoding: a per-request grammar that decides which tokens may come next.
//!
//! Built on llguidance (the grammar engine of OpenAI's structured outputs, vLLM, SGLang,
//! llama.cpp and mistral.rs). Three pieces:
//!
//! - [`Grammars`]: the token trie of one vocabulary (every token's bytes, control tokens marked
//!   as special, the end-of-generation ids as EOS) and llguidance's parser factory over it.
//!   Built once per tokenizer and shared behind an `Arc`: it is the expensive part.
//! - [`ConstraintSpec`]: what a request asks for (a JSON schema, any JSON object, a regex, a
//!   choice among strings, a Lark grammar), turned into llguidance's grammar.
//! - [`Constraint`]: one compiled grammar with its matcher state, owned by one request's output
//!   (one per choice: [`Clone`] copies the state, sharing the compiled grammar). It may wait for
//!   a trigger (a token sequence such as the end of a reasoning block) before it applies.
//!
//! **Check first, then mask** (llguidance's advice, as mistral.rs does it): the sampler draws
//! from the unmasked logits, the matcher checks the token (cheap), and only a refused token
//! costs a mask computation and a second draw from the masked logits. Drawing from `p`, then
//! from `p` restricted to the allowed set when refused, yields exactly the masked distribution
//! `p(a) / P(allowed)`, so the shortcut changes cost, not results.
//!
//! Invariants: the matcher advances only on tokens the request keeps (never on recompute after
//! preemption: the state lives in the output, not in the scheduler); a token the matcher
//! refused is never emitted; nothing here panics on a user's grammar (llguidance's own panics
//! are caught and reported as errors).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::EngineError;
use crate::tokenizer::Tokenizer;

/// A vocabulary's [`Grammars`], built on the first request that needs them (the trie of a
/// large vocabulary takes a while) and shared by every later one: what `serve` and the Dynamo
/// worker each hold.
#[derive(Default)]
pub struct LazyGrammars(std::sync::OnceLock<Result<Arc<Grammars>, String>>);

impl LazyGrammars {
    /// The grammars of `tok`'s vocabulary for logits rows of `vocab_size`, or why there are none
    /// (no tokenizer, or a vocabulary no trie can be built from); the first call decides.
    pub fn get(&self, tok: Option<&Tokenizer>, vocab_size: usize) -> Result<Arc<Grammars>, String> {
        self.0
            .get_or_init(|| {
                let tok = tok.ok_or_else(|| {
                    "this model has no tokenizer, so output constraints cannot be applied"
                        .to_string()
                })?;
                Grammars::for_tokenizer(tok, vocab_size)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// Why a constraint cannot be enforced, from [`Grammars::compile`]'s error: llguidance's
/// message (naming the schema feature or grammar line), without the error's own wording.
pub fn unenforceable_reason(e: EngineError) -> String {
    match e {
        EngineError::Constraint { msg, .. } => msg,
        other => other.to_string(),
    }
}

/// A JSON schema given as an object or as the JSON text of one (vLLM's `guided_json`, OpenAI's
/// `response_format` schema); `None` when it is neither.
pub fn schema_of(v: &Value) -> Option<Value> {
    match v {
        Value::Object(_) => Some(v.clone()),
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object),
        _ => None,
    }
}

/// The token trie of one vocabulary and llguidance's parser factory over it.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn constraint_err(op: &'static str, msg: impl std::fmt::Display) -> EngineError {
    EngineError::Constraint {
        op,
        msg: msg.to_string(),
    }
}

impl Grammars {
    /// The grammars of `tok`'s vocabulary for a model whose logits rows have `vocab_size`
    /// entries (ids past the tokenizer's, padding rows, are never allowed). Control tokens are
    /// special (a grammar reaches them only by name); the end-of-generation ids are EOS.
    pub fn for_tokenizer(tok: &Tokenizer, vocab_size: usize) -> Result<Grammars, EngineError> {
        let words = (0..vocab_size as u32)
            .map(|id| {
                let plain = tok.token_bytes(id, false);
                if !plain.is_empty() {
                    return plain;
                }
                let named = tok.token_bytes(id, true);
                if named.is_empty() {
                    return named;
                }
                let mut special = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                special.extend_from_slice(&named);
                special
            })
            .collect();
        let eos: Vec<u32> = tok
            .eog_ids()
            .iter()
            .copied()
            .filter(|&e| (e as usize) < vocab_size)
            .collect();
        Grammars::from_token_bytes(words, &eos)
    }

    /// The grammars of a vocabulary given as each token's bytes (a control token's bytes start
    /// with [`TokTrie::SPECIAL_TOKEN_MARKER`]); `eos` are the end-of-generation ids.
    pub fn from_token_bytes(words: Vec<Vec<u8>>, eos: &[u32]) -> Result<Grammars, EngineError> {
        let n = words.len();
        let Some(&first_eos) = eos.first() else {
            return Err(constraint_err(
                "vocabulary",
                "the vocabulary has no end-of-generation token, so no grammar can end",
            ));
        };
        if let Some(&bad) = eos.iter().find(|&&e| e as usize >= n) {
            return Err(constraint_err(
                "vocabulary",
                format!("end-of-generation id {bad} is outside the vocabulary of {n}"),
            ));
        }
        let info = TokRxInfo::new(n as u32, first_eos);
        let trie =
            std::panic::catch_unwind(|| TokTrie::from(&info, &words).with_eos_tokens(eos))
                .map_err(|_| constraint_err("vocabulary", "the token trie could not be built"))?;
        let env: Arc<dyn TokenizerEnv + Sync> = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| constraint_err("vocabulary", e))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Ids in the trie (the logits rows' length).
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// Compiles `spec` into a fresh constraint; the error is llguidance's message (it names the
    /// schema feature or the grammar line it cannot handle).
    pub fn compile(self: &Arc<Self>, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
        self.compile_grammar(spec.grammar())
    }

    /// Compiles an llguidance grammar built by the caller (tool calling composes its own).
    pub fn compile_grammar(
        self: &Arc<Self>,
        grammar: TopLevelGrammar,
    ) -> Result<Constraint, EngineError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| constraint_err("compile", e))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(constraint_err("compile", e));
        }
        Ok(Constraint {
            grammars: self.clone(),
            matcher,
            trigger: None,
            recent: Vec::new(),
        })
    }
}

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON document matching a JSON schema. `strict: false` ignores the keywords llguidance
    /// does not enforce instead of refusing the schema.
    JsonSchema { schema: Value, strict: bool },
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// Text matching a regular expression (Rust `regex` syntax), anchored at both ends.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl ConstraintSpec {
    /// llguidance's grammar for this spec. JSON is written with `", "` and `": "` between items
    /// and no other whitespace, so a model cannot pad a document without end.
    pub fn grammar(&self) -> TopLevelGrammar {
        match self {
            ConstraintSpec::JsonSchema { schema, strict } => {
                TopLevelGrammar::from_json_schema(with_json_options(schema.clone(), !strict))
            }
            ConstraintSpec::JsonObject => TopLevelGrammar::from_json_schema(with_json_options(
                json!({"type": "object"}),
                false,
            )),
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Choice(options) => {
                let alts: Vec<String> = options.iter().map(|s| regex_syntax::escape(s)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alts.join("|")))
            }
            ConstraintSpec::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        }
    }
}

/// `schema` as a JSON grammar nested in a Lark one (`%json {...}`), with the JSON options of
/// [`ConstraintSpec::JsonSchema`] (`strict: false` ignores the keywords llguidance cannot
/// enforce).
pub fn lark_json(schema: &Value, strict: bool) -> String {
    format!("%json {}", with_json_options(schema.clone(), !strict))
}

/// `schema` with llguidance's JSON options (`x-guidance`) set, unless it sets them itself.
fn with_json_options(mut schema: Value, lenient: bool) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance").or_insert_with(|| {
            json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
                "lenient": lenient,
            })
        });
    }
    schema
}

/// One request's grammar and how far its output has got through it.
pub struct Constraint {
    grammars: Arc<Grammars>,
    matcher: Matcher,
    /// Applies only after the output's text has contained these bytes (`None`: from the start).
    trigger: Option<Vec<u8>>,
    /// The last bytes of output seen while waiting for the trigger.
    recent: Vec<u8>,
}

impl Clone for Constraint {
    /// An independent copy of the state (for another choice of the same request); the compiled
    /// grammar and the trie are shared.
    fn clone(&self) -> Constraint {
        Constraint {
            grammars: self.grammars.clone(),
            matcher: self.matcher.deep_clone(),
            trigger: self.trigger.clone(),
            recent: self.recent.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("trigger", &self.trigger)
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// What the constraint made of an accepted token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// More output must or may follow.
    Continue,
    /// The grammar is complete and admits nothing more: the request is done.
    Complete,
}

impl Constraint {
    /// The same constraint, applied only once the output's text has contained `trigger` (for
    /// instance `</think>`, which ends a reasoning block), however the tokens cut it: as plain
    /// bytes or as one control token of that text. The tokens up to the one that completes it
    /// are not constrained.
    pub fn start_after(mut self, trigger: &str) -> Constraint {
        self.trigger = (!trigger.is_empty()).then(|| trigger.as_bytes().to_vec());
        self
    }

    /// Ids the constraint knows (the logits rows' length it expects).
    pub fn vocab_size(&self) -> usize {
        self.grammars.vocab_size()
    }

    /// Whether the grammar applies to the next token (its trigger, if any, has been seen).
    pub fn is_active(&self) -> bool {
        self.trigger.is_none()
    }

    /// Whether `tok` ends generation (an EOS of the vocabulary).
    pub fn is_eos(&self, tok: u32) -> bool {
        self.grammars
            .factory
            .tok_env()
            .tok_trie()
            .eos_tokens()
            .contains(&tok)
    }

    /// Whether the grammar admits `tok` next (EOS: whether the text so far is complete).
    pub fn allows(&mut self, tok: u32) -> bool {
        if tok as usize >= self.vocab_size() {
            return false;
        }
        let trie = self.grammars.factory.tok_env().tok_trie();
        // A token with no bytes (a padding id) never advances any grammar.
        if trie.token_len(tok) == 0 && !self.is_eos(tok) {
            return false;
        }
        matches!(self.matcher.validate_tokens(&[tok]), Ok(1))
    }

    /// The set of tokens the grammar admits next.
    pub fn mask(&mut self) -> Result<SimpleVob, String> {
        let m = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        if m.is_zero() {
            return Err("the grammar admits no token here".into());
        }
        Ok(m)
    }

    /// Sets every logit the grammar refuses next to `-inf`.
    pub fn apply_mask(&mut self, row: &mut [f32]) -> Result<(), String> {
        let m = self.mask()?;
        let n = m.len().min(row.len());
        for (id, x) in row[..n].iter_mut().enumerate() {
            if !m.is_allowed(id as u32) {
                *x = f32::NEG_INFINITY;
            }
        }
        for x in &mut row[n..] {
            *x = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Advances past `tok`, the token the request keeps; it must be one [`Self::allows`]
    /// accepted (or any token while waiting for the trigger).
    pub fn commit(&mut self, tok: u32) -> Result<Step, String> {
        if let Some(trigger) = &self.trigger {
            // A control token's bytes are a marker byte and its text.
            let bytes = self.grammars.factory.tok_env().tok_trie().token(tok);
            self.recent.extend_from_slice(bytes);
            if self
                .recent
                .windows(trigger.len())
                .any(|w| w == trigger.as_slice())
            {
                self.trigger = None;
                self.recent.clear();
            } else {
                let keep = trigger.len() - 1;
                let cut = self.recent.len().saturating_sub(keep);
                self.recent.drain(..cut);
            }
            return Ok(Step::Continue);
        }
        self.matcher
            .consume_token(tok)
            .map_err(|e| format!("the grammar refused token {tok}: {e}"))?;
        Ok(if self.matcher.is_stopped() {
            Step::Complete
        } else {
            Step::Continue
        })
    }

    /// Whether the output so far is a complete document (EOS would be accepted).
    pub fn is_accepting(&mut self) -> bool {
        self.trigger.is_none() && self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
#[path = "constraint_tests.rs"]
mod tests;
