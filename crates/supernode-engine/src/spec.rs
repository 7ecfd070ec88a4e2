//! Speculative decoding: proposers of draft tokens, and how many to draft for each request.
//!
//! A [`Proposer`] guesses up to k tokens that follow a request's tokens; the engine verifies
//! them in the same flat batch as every other request (the target computes the drafts after
//! the request's last token and samples each of those k + 1 rows in turn, see
//! [`crate::engine`]). The accepted prefix and one more token (the correction or bonus token)
//! are kept.
//!
//! **Exactness.** The proposers here make point proposals (one token per position, no
//! distribution). For a point proposal `d`, rejection sampling accepts `d` with probability
//! `p(d)` and otherwise draws from the residual `p` restricted to `x ≠ d`, renormalised. The
//! engine does it by drawing `x ~ p` with the request's own sampler (penalties, `logit_bias`,
//! grammar, top-k/p, temperature) and accepting iff `x = d`: `P(accept) = p(d)`, and a
//! rejected draw is distributed as the residual, so each kept token has the target's
//! distribution. It draws exactly one random number per kept token, as decoding without
//! speculation does, so with batch-invariant kernels a seeded request gives the very tokens it
//! gives without speculation, at any temperature. Nothing is committed for a draft before it
//! is accepted: the penalties' history, the grammar's state and the KV slots past the accepted
//! prefix are those of the tokens kept.
//!
//! **Proposers**: [`NgramProposer`] (prompt lookup, no model), [`DraftProposer`] (a smaller
//! model with the target's vocabulary, [`draft`]) and [`MtpProposer`] (the target's own
//! multi-token-prediction layer, fed the target's hidden states, [`mtp`]).
//!
//! **Adaptivity** ([`Adaptive`]): k follows the request's acceptance (Hugging Face's
//! assisted-generation heuristic: two more after a step whose drafts were all accepted, one
//! fewer otherwise), from all of k for prompt lookup and from one for the proposers whose
//! drafts cost a forward pass ([`Proposer::first_k`]); a request whose acceptance stays low stops drafting for a number of its
//! steps that doubles each time it fails again, then probes with one draft; and nothing is drafted while more requests
//! than `disable_by_batch_size` are running (a batch that large is no longer bound by reading
//! the weights, so extra rows cost their full compute).

mod draft;
mod mtp;

use std::sync::Arc;

use supernode_models::Model;

pub use self::draft::{DraftModel, DraftProposer};
pub use self::mtp::MtpProposer;
use crate::engine::RequestId;
use crate::error::EngineError;

/// The most draft tokens per request and step that can be asked for.
pub const MAX_SPECULATIVE_TOKENS: usize = 32;
/// The longest n-gram prompt lookup can match.
pub const MAX_NGRAM: usize = 16;

/// Which proposer drafts the tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the request's
    /// last `min..=max` tokens (the longest that occurs) in its prompt and output.
    Ngram { min: usize, max: usize },
    /// A draft model's greedy tokens.
    Draft(DraftModel),
    /// The target's own multi-token-prediction (NextN) layer, loaded with it
    /// ([`supernode_models::LoadOptions::mtp`]): its greedy tokens, one layer per draft.
    Mtp,
}

impl SpecMethod {
    /// The method named `name` (`ngram`, or its alias `prompt-lookup`), with the n-gram
    /// lengths `min..=max`. `draft` needs its model loaded first: see [`DraftModel::load`].
    pub fn parse(name: &str, min: usize, max: usize) -> Result<SpecMethod, EngineError> {
        match name {
            "ngram" | "prompt-lookup" | "prompt_lookup" => Ok(SpecMethod::Ngram { min, max }),
            "mtp" => Ok(SpecMethod::Mtp),
            "draft" => Err(EngineError::Invalid(
                "speculative method `draft` needs a draft model (--draft-model PATH)".into(),
            )),
            _ => Err(EngineError::Invalid(format!(
                "unknown speculative method `{name}`: use `ngram` (prompt lookup), `draft` \
                 (a draft model, with --draft-model PATH) or `mtp` (the model's own \
                 multi-token-prediction layer)"
            ))),
        }
    }

    /// The proposer's name in metrics and reports.
    pub fn name(&self) -> &'static str {
        match self {
            SpecMethod::Ngram { .. } => "ngram",
            SpecMethod::Draft(_) => "draft",
            SpecMethod::Mtp => "mtp",
        }
    }
}

/// How an engine speculates.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecConfig {
    pub method: SpecMethod,
    /// Draft tokens per request and step at most (k), `1..=MAX_SPECULATIVE_TOKENS`.
    pub num_speculative_tokens: usize,
    /// Choose k per request from its acceptance and pause requests whose drafts fail; `false`
    /// drafts `num_speculative_tokens` whenever the proposer has them.
    pub adaptive: bool,
    /// Draft nothing while more requests than this are running; `None`: no limit.
    pub disable_by_batch_size: Option<usize>,
}

impl SpecConfig {
    /// Prompt lookup with n-grams of 1 to 3 tokens and `k` drafts, adaptive, off above 8
    /// running requests.
    pub fn ngram(k: usize) -> SpecConfig {
        SpecConfig {
            method: SpecMethod::Ngram { min: 1, max: 3 },
            num_speculative_tokens: k,
            adaptive: true,
            disable_by_batch_size: Some(8),
        }
    }

    /// `draft`'s greedy tokens, `k` drafts, adaptive, off above 8 running requests.
    pub fn draft(draft: DraftModel, k: usize) -> SpecConfig {
        SpecConfig {
            method: SpecMethod::Draft(draft),
            ..SpecConfig::ngram(k)
        }
    }

    /// Checks the ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), EngineError> {
        let k = self.num_speculative_tokens;
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&k) {
            return Err(EngineError::Invalid(format!(
                "num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {k}"
            )));
        }
        if self.disable_by_batch_size == Some(0) {
            return Err(EngineError::Invalid(
                "speculative_disable_by_batch_size must be at least 1".into(),
            ));
        }
        match self.method {
            SpecMethod::Ngram { min, max } => {
                if min == 0 || min > max || max > MAX_NGRAM {
                    return Err(EngineError::Invalid(format!(
                        "prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max \
                         <= {MAX_NGRAM}, got min {min} and max {max}"
                    )));
                }
            }
            SpecMethod::Draft(_) | SpecMethod::Mtp => {}
        }
        Ok(())
    }

    /// Bytes per token the proposer's caches take at most (its [`OwnCache`]s, growth included):
    /// 0 for prompt lookup. Each running request's cache holds at most the request's positions
    /// and its drafts, so a KV budget that gives the target `t` bytes per token and the proposer
    /// this much holds both.
    pub fn cache_bytes_per_token(&self, target: &dyn Model) -> usize {
        let (num, den) = OwnCache::GROWTH;
        let per_token = match &self.method {
            SpecMethod::Ngram { .. } => 0,
            SpecMethod::Draft(d) => d.cache_bytes_per_token(),
            SpecMethod::Mtp => supernode_models::KvCache::bytes_per_token(&target.nextn_kv_specs()),
        };
        (per_token * num).div_ceil(den)
    }

    /// The proposer this configuration names (validated first), for speculating on `target`.
    pub fn proposer(&self, target: &Arc<dyn Model>) -> Result<Box<dyn Proposer>, EngineError> {
        self.validate()?;
        Ok(match &self.method {
            &SpecMethod::Ngram { min, max } => Box::new(NgramProposer { min, max }),
            SpecMethod::Draft(d) => Box::new(DraftProposer::new(d.clone())),
            SpecMethod::Mtp => Box::new(MtpProposer::new(target.clone())?),
        })
    }
}

/// A proposer's own KV cache of one request (a draft model's, an MTP layer's), outside the
/// engine's pool: one [`supernode_models::KvCache`] whose block table is the identity, grown as
/// the request grows and dropped with it (and when the request is preempted), so its memory is
/// that of the positions it holds, plus at most a quarter ([`OwnCache::GROWTH`]). The server
/// takes these caches out of the KV budget ([`SpecConfig::cache_bytes_per_token`]).
pub(crate) struct OwnCache {
    pub kv: supernode_models::KvCache,
    pub table: Vec<u32>,
    /// Bytes per position.
    per_token: usize,
}

impl OwnCache {
    /// What a cache holds at most for the positions it needs, as a fraction (1 + 1/4): it grows
    /// by a quarter at a time, so that growing costs amortised constant time per position.
    pub const GROWTH: (usize, usize) = (5, 4);

    /// A cache of one block for layers of `specs`.
    pub fn new(specs: &[supernode_models::KvLayerSpec]) -> Result<OwnCache, EngineError> {
        Ok(OwnCache {
            kv: supernode_models::KvCache::new(specs, crate::engine::BLOCK_SIZE, 1)?,
            table: vec![0],
            per_token: supernode_models::KvCache::bytes_per_token(specs),
        })
    }

    /// Room for positions `..end`, growing by a quarter of what it holds at least.
    pub fn reserve(&mut self, end: usize) -> Result<(), EngineError> {
        let blocks = end.div_ceil(crate::engine::BLOCK_SIZE);
        let held = self.kv.num_blocks;
        if blocks > held {
            let (num, den) = Self::GROWTH;
            self.kv.grow(blocks.max(held * num / den))?;
            self.table = (0..self.kv.num_blocks as u32).collect();
        }
        Ok(())
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.kv.num_blocks * crate::engine::BLOCK_SIZE * self.per_token
    }
}

/// The most likely id (the lowest of equals).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Guesses the tokens that follow a request's tokens.
pub trait Proposer: Send {
    /// The name metrics and reports use.
    fn name(&self) -> &'static str;
    /// Appends to `out` at most `k` tokens likely to follow `tokens` (request `id`'s prompt and
    /// output so far); nothing if it has no guess.
    fn propose(&mut self, id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>);
    /// Request `id` is gone, or preempted: drop anything kept for it.
    fn release(&mut self, _id: RequestId) {}
    /// Bytes of the caches it holds now.
    fn cache_bytes(&self) -> usize {
        0
    }
    /// The k a request starts with (adaptive speculation; at most `k`): all of it where drafts
    /// cost next to nothing (prompt lookup), one where each costs a forward pass of a model
    /// (a draft model, MTP), so that a request whose drafts fail stops after a few cheap
    /// probes instead of a few full rounds.
    fn first_k(&self, k: usize) -> usize {
        k
    }
    /// Whether it needs the target's hidden states ([`Proposer::observe`]).
    fn wants_hidden(&self) -> bool {
        false
    }
    /// The target's hidden states (after its final norm, `hidden` floats each) of request
    /// `id`'s positions `first..`, computed in the last step and kept (prompt tokens, the
    /// token before the drafts and the accepted drafts; not the rejected drafts). Given in
    /// order of positions; a `first` below what was given before means the request is
    /// being recomputed from there.
    fn observe(&mut self, _id: RequestId, _first: usize, _hidden: &[f32]) {}
}

/// Prompt lookup (llama.cpp's `lookup`, vLLM's `ngram`): find the latest earlier occurrence of
/// the last `n` tokens, for `n` from `max` down to `min`, and propose the tokens that followed
/// it. It costs a scan of the request's tokens, no model.
#[derive(Clone, Debug)]
pub struct NgramProposer {
    pub min: usize,
    pub max: usize,
}

impl Proposer for NgramProposer {
    fn name(&self) -> &'static str {
        "ngram"
    }

    fn propose(&mut self, _id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>) {
        let len = tokens.len();
        for n in (self.min..=self.max.min(len.saturating_sub(1))).rev() {
            let pattern = &tokens[len - n..];
            // Latest start `i` with `tokens[i..i + n] == pattern`, the suffix itself excluded.
            let found = (0..len - n).rev().find(|&i| &tokens[i..i + n] == pattern);
            if let Some(i) = found {
                let from = i + n;
                out.extend_from_slice(&tokens[from..(from + k).min(len)]);
                return;
            }
        }
    }
}

/// What a step's forward pass costs by its number of rows, and what one draft costs to make,
/// learned as the engine runs (the least wall time seen: noise on a shared machine only ever
/// adds time, and a row count measured once on a bad step would otherwise never be tried
/// again), so that a request drafts only as
/// many tokens as pay: k maximises the expected tokens per step over the step's cost. With
/// per-token acceptance `a`, k drafts yield `1 + a + ... + a^k` tokens on average, for the
/// time of a step of `n + k` rows instead of `n`, plus k drafts. A row count not yet seen is
/// taken to cost what `n` rows do (so it gets tried, and then measured).
#[derive(Clone, Debug, Default)]
pub struct StepCosts {
    /// Seconds of a forward pass of `n` rows at index `n` (0: not yet seen).
    secs: Vec<f64>,
    /// Seconds to make one draft token.
    per_draft: f64,
}

/// Steps of more rows than this are not tracked (prefill; drafting never gets there).
const MAX_COST_ROWS: usize = 96;

impl StepCosts {
    /// A forward pass of `rows` rows took `secs`.
    pub fn record_step(&mut self, rows: usize, secs: f64) {
        if rows == 0 || rows > MAX_COST_ROWS {
            return;
        }
        if self.secs.len() <= rows {
            self.secs.resize(rows + 1, 0.0);
        }
        let old = self.secs[rows];
        self.secs[rows] = if old == 0.0 { secs } else { old.min(secs) };
    }

    /// Making `drafts` draft tokens took `secs`.
    pub fn record_drafts(&mut self, drafts: usize, secs: f64) {
        if drafts > 0 {
            let per = secs / drafts as f64;
            self.per_draft = if self.per_draft == 0.0 {
                per
            } else {
                self.per_draft.min(per)
            };
        }
    }

    fn step(&self, rows: usize) -> Option<f64> {
        self.secs.get(rows).copied().filter(|&t| t > 0.0)
    }

    /// The number of drafts, at most `k_max`, with the most expected tokens per second for a
    /// request with per-token acceptance `a`, in a step whose other rows number `base` (0: none
    /// pays better than decoding without drafts).
    pub fn best_k(&self, a: f64, k_max: usize, base: usize) -> usize {
        let a = a.clamp(0.0, 0.999);
        let Some(plain) = self.step(base.max(1)) else {
            return k_max;
        };
        let mut best = (0, 1.0);
        let mut tokens = 1.0;
        let mut power = 1.0;
        for k in 1..=k_max {
            power *= a;
            tokens += power;
            let step = self.step(base.max(1) + k).unwrap_or(plain);
            let value = tokens * plain / (step + k as f64 * self.per_draft);
            // A draft must pay for itself by a margin, not by noise.
            if value > best.1 * 1.02 {
                best = (k, value);
            }
        }
        best.0
    }
}

/// One request's speculation state: its k and its acceptance so far.
#[derive(Clone, Debug)]
pub struct Adaptive {
    /// Drafts to ask for next.
    k: usize,
    /// Exponential moving average of the share of drafts accepted per verification.
    rate: f32,
    /// Decoding steps left without drafting.
    pause: u32,
    /// The next pause's length.
    backoff: u32,
    /// Draft tokens verified and accepted, for the request's usage report.
    pub drafted: usize,
    pub accepted: usize,
    /// Moving estimate of the chance that a draft is accepted given the ones before it were
    /// (each verification's maximum-likelihood value: accepted / (accepted + 1 if one was
    /// rejected)).
    token_rate: f32,
}

/// Below this average acceptance a request pauses its drafting.
const MIN_RATE: f32 = 0.25;
/// The first pause, in decoding steps; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: u32 = 4;
const MAX_BACKOFF: u32 = 64;

impl Adaptive {
    pub fn new(k: usize) -> Adaptive {
        Adaptive {
            k,
            rate: 1.0,
            pause: 0,
            backoff: FIRST_BACKOFF,
            drafted: 0,
            accepted: 0,
            token_rate: 0.5,
        }
    }

    /// The estimated chance that a draft is accepted (given the drafts before it were).
    pub fn token_rate(&self) -> f64 {
        f64::from(self.token_rate)
    }

    /// Drafting would not pay this step ([`StepCosts::best_k`] chose none): pause for the
    /// shortest pause (the acceptance's own backoff is left to failing drafts), then probe the
    /// estimate again with one draft.
    pub fn skip(&mut self) {
        self.pause = FIRST_BACKOFF;
        self.k = 1;
    }

    /// How many drafts to ask for this step, out of `k_max` (0 while paused; a paused step
    /// counts down).
    pub fn want(&mut self, cfg: &SpecConfig) -> usize {
        if !cfg.adaptive {
            return cfg.num_speculative_tokens;
        }
        if self.pause > 0 {
            self.pause -= 1;
            return 0;
        }
        self.k.clamp(1, cfg.num_speculative_tokens)
    }

    /// Records a verification of `drafted` tokens of which the first `accepted` were kept.
    pub fn record(&mut self, cfg: &SpecConfig, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted;
        self.accepted += accepted;
        if !cfg.adaptive {
            return;
        }
        let rejected = usize::from(accepted < drafted);
        let estimate = accepted as f32 / (accepted + rejected) as f32;
        self.token_rate = 0.6 * self.token_rate + 0.4 * estimate;
        let share = accepted as f32 / drafted as f32;
        self.rate = 0.6 * self.rate + 0.4 * share;
        self.k = if accepted == drafted {
            (self.k + 2).min(cfg.num_speculative_tokens)
        } else {
            self.k.saturating_sub(1).max(1)
        };
        if self.rate < MIN_RATE {
            self.pause = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            // Resume with one draft and a neutral average: a cheap probe.
            self.rate = 0.5;
            self.k = 1;
        } else if share >= 0.5 {
            self.backoff = FIRST_BACKOFF;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(p: &mut NgramProposer, tokens: &[u32], k: usize) -> Vec<u32> {
        let mut out = Vec::new();
        p.propose(RequestId(1), tokens, k, &mut out);
        out
    }

    #[test]
    fn ngram_proposes_what_followed_the_latest_match_of_the_longest_ngram() {
        let mut p = NgramProposer { min: 1, max: 3 };
        // "1 2 3" occurs at 0 (followed by 4 5) and at 5 (followed by 9 9); the latest wins.
        let t = [1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 7, 1, 2, 3];
        assert_eq!(propose(&mut p, &t, 2), vec![9, 9]);
        assert_eq!(propose(&mut p, &t, 10), vec![9, 9, 7, 1, 2, 3]);
        // Only the last token matches ("8" never occurred; "3" did).
        let t = [5, 3, 6, 7, 8, 3];
        assert_eq!(propose(&mut p, &t, 3), vec![6, 7, 8]);
        // A longer match beats a later shorter one.
        let t = [1, 2, 4, 9, 2, 5, 1, 2];
        assert_eq!(propose(&mut p, &t, 1), vec![4]);
        // Nothing to match.
        assert!(propose(&mut p, &[1, 2, 3], 4).is_empty());
        assert!(propose(&mut p, &[7], 4).is_empty());
        assert!(propose(&mut p, &[], 4).is_empty());
        let mut p2 = NgramProposer { min: 2, max: 2 };
        assert!(propose(&mut p2, &[5, 3, 6, 7, 8, 3], 3).is_empty());
    }

    #[test]
    fn bad_configurations_name_the_parameter() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf/llama");
        let target: Arc<dyn Model> = Arc::from(
            supernode_models::load_model(&dir, &Default::default())
                .unwrap()
                .model,
        );
        let err = |c: SpecConfig| c.proposer(&target).err().map(|e| e.to_string()).unwrap();
        let mut c = SpecConfig::ngram(0);
        assert!(err(c.clone()).contains("num_speculative_tokens"));
        c.num_speculative_tokens = MAX_SPECULATIVE_TOKENS + 1;
        assert!(err(c.clone()).contains("num_speculative_tokens"));
        c.num_speculative_tokens = 4;
        c.method = SpecMethod::Ngram { min: 3, max: 2 };
        assert!(err(c.clone()).contains("prompt_lookup_min"));
        c.method = SpecMethod::Ngram { min: 0, max: 2 };
        assert!(err(c.clone()).contains("prompt_lookup_min"));
        c.method = SpecMethod::Ngram { min: 1, max: 99 };
        assert!(err(c.clone()).contains("prompt_lookup_max"));
        c.method = SpecMethod::Ngram { min: 1, max: 3 };
        c.disable_by_batch_size = Some(0);
        assert!(err(c.clone()).contains("disable_by_batch_size"));
        c.disable_by_batch_size = None;
        assert_eq!(c.proposer(&target).unwrap().name(), "ngram");
        // MTP needs the target's own multi-token-prediction layer.
        c.method = SpecMethod::parse("mtp", 1, 3).unwrap();
        assert!(err(c.clone()).contains("no multi-token-prediction layer"));
        let e = SpecMethod::parse("eagle9", 1, 3).unwrap_err().to_string();
        assert!(e.contains("unknown speculative method `eagle9`"), "{e}");
        assert_eq!(
            SpecMethod::parse("ngram", 2, 4).unwrap(),
            SpecMethod::Ngram { min: 2, max: 4 }
        );
    }

    #[test]
    fn k_grows_with_acceptance_and_failing_requests_pause() {
        let cfg = SpecConfig::ngram(8);
        let mut a = Adaptive::new(4);
        assert_eq!(a.want(&cfg), 4);
        a.record(&cfg, 4, 4);
        assert_eq!(a.want(&cfg), 6);
        a.record(&cfg, 6, 6);
        assert_eq!(a.want(&cfg), 8);
        a.record(&cfg, 8, 8);
        assert_eq!(a.want(&cfg), 8, "k stays within num_speculative_tokens");
        a.record(&cfg, 8, 3);
        assert_eq!(a.want(&cfg), 7);
        // Failures drag the average down until the request pauses.
        let mut steps = 0;
        while a.want(&cfg) > 0 {
            a.record(&cfg, 2, 0);
            steps += 1;
            assert!(steps < 10, "it never paused");
        }
        assert_eq!(a.drafted, 26 + 2 * steps);
        assert_eq!(a.accepted, 21);
        // The pause lasts FIRST_BACKOFF steps (one was just spent), then drafting resumes.
        for _ in 1..FIRST_BACKOFF {
            assert_eq!(a.want(&cfg), 0);
        }
        assert_eq!(a.want(&cfg), 1);
        // Failing again pauses for twice as long.
        while a.want(&cfg) > 0 {
            a.record(&cfg, 1, 0);
        }
        let mut paused = 1;
        while a.want(&cfg) == 0 {
            paused += 1;
        }
        assert_eq!(paused, 2 * FIRST_BACKOFF);
        // Fixed k without adaptivity.
        let fixed = SpecConfig {
            adaptive: false,
            ..SpecConfig::ngram(5)
        };
        let mut a = Adaptive::new(5);
        a.record(&fixed, 5, 0);
        a.record(&fixed, 5, 0);
        assert_eq!(a.want(&fixed), 5);
    }

    /// k maximises expected tokens per second: all drafts when extra rows cost nothing, fewer
    /// where rows past a point cost more, none at a low acceptance or when drafts cost a pass
    /// each; unseen row counts are tried.
    #[test]
    fn drafts_are_as_many_as_pay_for_their_rows() {
        let mut c = StepCosts::default();
        assert_eq!(c.best_k(0.1, 5, 1), 5, "nothing measured yet: try");
        for n in 1..=8 {
            c.record_step(n, 0.010);
        }
        assert_eq!(c.best_k(0.8, 5, 1), 5);
        assert_eq!(c.best_k(0.0, 5, 1), 0);
        // Rows 5 and on cost three times as much (an exact product past the fused kernels).
        let mut c = StepCosts::default();
        for n in 1..=8 {
            c.record_step(n, if n < 5 { 0.010 } else { 0.030 });
        }
        assert_eq!(c.best_k(0.9, 5, 1), 3);
        // A second row costs 30% more: worth it at 0.5 (1.5 tokens), not at 0.2.
        let mut c = StepCosts::default();
        c.record_step(1, 0.010);
        c.record_step(2, 0.013);
        assert_eq!(c.best_k(0.5, 1, 1), 1);
        assert_eq!(c.best_k(0.2, 1, 1), 0);
        // Drafts that cost a third of a step each (a model pass) need a high acceptance.
        c.record_drafts(2, 0.0066);
        assert_eq!(c.best_k(0.5, 1, 1), 0);
        assert_eq!(c.best_k(0.9, 1, 1), 1);
        // The least time seen; prefill-sized steps are not kept.
        c.record_step(1, 0.020);
        assert_eq!(c.step(1), Some(0.010));
        c.record_step(1, 0.008);
        assert_eq!(c.step(1), Some(0.008));
        c.record_step(MAX_COST_ROWS + 1, 1.0);
        assert!(c.step(MAX_COST_ROWS + 1).is_none());
    }

    /// The per-token acceptance estimate follows each verification's likelihood estimate, and a
    /// skipped step pauses the request like failing drafts.
    #[test]
    fn the_token_rate_follows_verifications_and_skips_pause() {
        let cfg = SpecConfig::ngram(4);
        let mut a = Adaptive::new(4);
        assert_eq!(a.token_rate(), 0.5);
        a.record(&cfg, 4, 4);
        assert!((a.token_rate() - 0.7).abs() < 1e-6);
        a.record(&cfg, 4, 0);
        assert!((a.token_rate() - 0.42).abs() < 1e-6);
        a.record(&cfg, 3, 1);
        assert!((a.token_rate() - (0.6 * 0.42 + 0.4 * 0.5)).abs() < 1e-6);
        let mut a = Adaptive::new(4);
        for _ in 0..2 {
            a.skip();
            assert!((0..FIRST_BACKOFF).all(|_| a.want(&cfg) == 0));
            assert_eq!(a.want(&cfg), 1);
        }
    }
}
