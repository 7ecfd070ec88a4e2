//! Output processing: what happens to a request's logits rows after the forward pass.
//!
//! Sampling (with the request's penalties over its history), log-probabilities,
//! detokenising, stop strings, the limits, and the events to the request's sink. Each request
//! has one [`Output`]; the engine hands it the rows the plan marked (see
//! [`super::scheduler::Scheduled`]) and appends the token it returns to the scheduler's copy of
//! the request.
//!
//! The per-request logits processors live in [`Output::sample`], before the sampler: the
//! request's `logit_bias` is added to the row, then a [`Constraint`] (structured output) checks
//! the sampled token and only when it refuses one computes the mask and draws again from the
//! masked row (see [`crate::constraint`]). Reported log-probabilities are those of the row the
//! token was drawn from: after `logit_bias` and, for a constrained request, after the grammar's
//! mask (computed at every token when log-probabilities are asked for), before penalties and
//! temperature. Draft verification (speculative decoding) calls `sample` once per sampled row,
//! in order, and stops at the first token that differs from its draft (see [`crate::spec`]):
//! nothing a draft would change (penalty history, grammar state) is touched before it is
//! accepted.

use std::sync::Arc;

use super::{
    Event, Finish, FinishReason, PromptLogits, PromptLogprobs, Sink, SpecUsage, TokenEvent,
    TokenLogprobs,
};
use crate::constraint::{Constraint, Step};
use crate::sampler::{Sampler, SamplingParams};
use crate::spec::Adaptive;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// The output side of one request.
pub(crate) struct Output {
    sampler: Sampler,
    /// Output tokens at most.
    max_tokens: usize,
    ignore_eos: bool,
    /// Output tokens before which end-of-generation tokens are masked and stop strings ignored.
    min_tokens: usize,
    /// Top alternatives to report with each token's log-probability, if any.
    logprobs: Option<usize>,
    /// Send the raw logits of prompt positions.
    prompt_logits: bool,
    /// Send prompt tokens' log-probabilities with this many alternatives.
    prompt_logprobs: Option<usize>,
    detok: Option<IncrementalDecoder>,
    stop: StopText,
    sink: Box<dyn Sink>,
    prompt_len: usize,
    generated: usize,
    /// Prompt tokens found in the prefix cache on admission.
    pub(crate) cached_tokens: usize,
    /// Added to the logits before sampling: `(token id, bias)`.
    logit_bias: Vec<(u32, f32)>,
    /// The grammar the output must follow, with its state.
    constraint: Option<Constraint>,
    /// The row after `logit_bias` and the mask (reused between tokens).
    scratch: Vec<f32>,
    /// This request's speculation state, when the engine speculates.
    pub(crate) spec: Option<Adaptive>,
}

/// What sampling a row did.
pub(crate) struct Sampled {
    /// The token to append to the request (not set for an end-of-generation token).
    pub token: Option<u32>,
    /// The final event, if the request is done.
    pub done: Option<Event>,
}

/// What an [`Output`] is made from: the request's output options.
pub(crate) struct OutputSpec {
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub min_tokens: usize,
    pub logprobs: Option<usize>,
    pub prompt_logits: bool,
    pub prompt_logprobs: Option<usize>,
    pub sink: Box<dyn Sink>,
    pub prompt_len: usize,
    pub logit_bias: Vec<(u32, f32)>,
    pub constraint: Option<Constraint>,
}

impl Output {
    pub fn new(spec: OutputSpec, tokenizer: Option<&Arc<Tokenizer>>) -> Output {
        Output {
            sampler: Sampler::new(spec.params),
            max_tokens: spec.max_tokens,
            ignore_eos: spec.ignore_eos,
            min_tokens: spec.min_tokens,
            logprobs: spec.logprobs,
            prompt_logits: spec.prompt_logits,
            prompt_logprobs: spec.prompt_logprobs,
            detok: tokenizer.map(|t| IncrementalDecoder::new(t.clone(), false)),
            stop: StopText::new(spec.stop),
            sink: spec.sink,
            prompt_len: spec.prompt_len,
            generated: 0,
            cached_tokens: 0,
            logit_bias: spec.logit_bias,
            constraint: spec.constraint,
            scratch: Vec::new(),
            spec: None,
        }
    }

    /// Output tokens it may still produce.
    pub fn remaining(&self) -> usize {
        self.max_tokens.saturating_sub(self.generated)
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn is_closed(&self) -> bool {
        self.sink.is_closed()
    }

    /// Delivers an event; `false` if the receiver is gone.
    pub fn send(&mut self, event: Event) -> bool {
        self.sink.send(event)
    }

    /// Delivers what the request asked of the prompt rows at positions `start..` (`prompt`
    /// holds its tokens): their logits, and the log-probability of the prompt token each
    /// predicts. `false` if the receiver is gone.
    pub fn prompt_rows<'a>(
        &mut self,
        start: usize,
        rows: impl ExactSizeIterator<Item = &'a [f32]>,
        prompt: &[u32],
    ) -> bool {
        let mut logits = Vec::new();
        let mut logprobs = Vec::new();
        for (p, row) in (start..).zip(rows) {
            if self.prompt_logits {
                logits.extend_from_slice(row);
            }
            if let (Some(k), Some(&next)) = (self.prompt_logprobs, prompt.get(p + 1)) {
                if p + 1 < self.prompt_len {
                    logprobs.push(token_logprobs(row, next, k));
                }
            }
        }
        if self.prompt_logits
            && !self
                .sink
                .send(Event::PromptLogits(PromptLogits { start, logits }))
        {
            return false;
        }
        if !logprobs.is_empty() {
            let ev = Event::PromptLogprobs(PromptLogprobs {
                start: start + 1,
                logprobs,
            });
            return self.sink.send(ev);
        }
        true
    }

    /// The final event with `reason`, `text` being what was held back.
    pub fn finish(&self, reason: FinishReason, text: String) -> Event {
        Event::Done(Finish {
            reason,
            text,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            cached_tokens: self.cached_tokens,
            stop_string: self.stop.matched.clone(),
            spec: self.spec.as_ref().map(|a| SpecUsage {
                draft_tokens: a.drafted,
                accepted_tokens: a.accepted,
            }),
        })
    }

    /// The final event of a request that ends with `length` outside sampling (the cache
    /// cannot hold it), with everything held back.
    pub fn finish_length(&mut self) -> Event {
        let text = self.flush();
        self.finish(FinishReason::Length, text)
    }

    /// Everything held back, for the final event.
    fn flush(&mut self) -> String {
        let tail = self.detok.as_mut().map(|d| d.finish()).unwrap_or_default();
        let (mut text, stopped) = self.stop.push(&tail);
        if !stopped {
            text.push_str(&self.stop.flush());
        }
        text
    }

    /// Samples the next token from `row`, the logits after `history` (the request's tokens so
    /// far); `ctx_len` bounds the request, `eog` are the end-of-generation tokens.
    pub fn sample(&mut self, row: &[f32], history: &[u32], ctx_len: usize, eog: &[u32]) -> Sampled {
        if self.max_tokens == 0 {
            return Sampled {
                token: None,
                done: Some(self.finish_length()),
            };
        }
        // Below `min_tokens` the end-of-generation tokens cannot be drawn (unless a grammar,
        // which decides where the output ends, is in charge).
        let masked: &[u32] = if self.generated < self.min_tokens && !self.ignore_eos {
            eog
        } else {
            &[]
        };
        let (tok, logprobs) = match self.draw(row, history, masked) {
            Ok(drawn) => drawn,
            Err(msg) => {
                return Sampled {
                    token: None,
                    done: Some(Event::Error(msg)),
                }
            }
        };
        let constrained = self.constraint.as_ref().is_some_and(Constraint::is_active);
        let ends = if constrained {
            self.constraint.as_ref().is_some_and(|c| c.is_eos(tok))
        } else {
            !self.ignore_eos && eog.contains(&tok)
        };
        if ends {
            let text = self.flush();
            return Sampled {
                token: None,
                done: Some(self.finish(FinishReason::Stop, text)),
            };
        }
        let step = match self.constraint.as_mut().map(|c| c.commit(tok)) {
            Some(Err(msg)) => {
                return Sampled {
                    token: None,
                    done: Some(Event::Error(msg)),
                }
            }
            Some(Ok(step)) => step,
            None => Step::Continue,
        };
        self.generated += 1;
        let delta = self.detok.as_mut().map(|d| d.push(tok)).unwrap_or_default();
        let (text, stopped) = if self.generated < self.min_tokens {
            (self.stop.pass(&delta), false)
        } else {
            self.stop.push(&delta)
        };
        let alive = self.sink.send(Event::Token(TokenEvent {
            id: tok,
            text,
            logprobs,
        }));
        let done = if !alive {
            Some(self.finish(FinishReason::Cancelled, String::new()))
        } else if stopped {
            Some(self.finish(FinishReason::Stop, String::new()))
        } else if step == Step::Complete {
            let text = self.flush();
            Some(self.finish(FinishReason::Stop, text))
        } else if self.generated >= self.max_tokens || history.len() + 1 > ctx_len {
            // The next token would sit at position `history.len()`, outside the context.
            Some(self.finish_length())
        } else {
            None
        };
        Sampled {
            token: Some(tok),
            done,
        }
    }

    /// Draws the next token from `row` under `logit_bias`, the constraint and, without an
    /// active constraint, the mask of `masked` tokens; returns it with its log-probabilities (if
    /// asked) in the row it was drawn from.
    fn draw(
        &mut self,
        row: &[f32],
        history: &[u32],
        masked: &[u32],
    ) -> Result<(u32, Option<TokenLogprobs>), String> {
        let top = self.logprobs;
        let constraint = self.constraint.as_mut().filter(|c| c.is_active());
        let masked = if constraint.is_some() {
            &[][..]
        } else {
            masked
        };
        if self.logit_bias.is_empty() && constraint.is_none() && masked.is_empty() {
            let tok = self.sampler.sample(row, history);
            return Ok((tok, top.map(|k| token_logprobs(row, tok, k))));
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(row);
        for &(id, bias) in &self.logit_bias {
            if let Some(x) = self.scratch.get_mut(id as usize) {
                *x += bias;
            }
        }
        for &id in masked {
            if let Some(x) = self.scratch.get_mut(id as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        let lp = |row: &[f32], tok: u32| top.map(|k| token_logprobs(row, tok, k));
        let Some(c) = constraint else {
            let tok = self.sampler.sample(&self.scratch, history);
            return Ok((tok, lp(&self.scratch, tok)));
        };
        // With log-probabilities asked for, the mask is needed anyway: apply it first.
        if top.is_none() {
            let tok = self.sampler.sample(&self.scratch, history);
            if c.allows(tok) {
                return Ok((tok, None));
            }
        }
        c.apply_mask(&mut self.scratch)?;
        let tok = self.sampler.sample(&self.scratch, history);
        if !c.allows(tok) {
            return Err(format!(
                "the sampler drew token {tok}, which the grammar refuses, from the masked logits"
            ));
        }
        Ok((tok, lp(&self.scratch, tok)))
    }
}

/// The log-probability of `chosen` and the `top` most likely tokens, from raw logits.
pub fn token_logprobs(row: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
    let max = row
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| ((x - max) as f64).exp())
        .sum();
    let lse = max as f64 + sum.ln();
    let lp = |x: f32| {
        if x.is_finite() {
            (x as f64 - lse) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    // A small sorted list of the best `top`; ties keep the lower id first.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &x) in row.iter().enumerate() {
            let x = if x.is_nan() { f32::NEG_INFINITY } else { x };
            if best.len() == top && x <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, y)| y >= x);
            best.insert(at, (id as u32, x));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        logprob: lp(row[chosen as usize]),
        top: best.into_iter().map(|(id, x)| (id, lp(x))).collect(),
    }
}

/// Holds back generated text that might be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    pending: String,
    /// The stop string found, once one is.
    pub matched: Option<String>,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> StopText {
        StopText {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            matched: None,
        }
    }

    /// Adds generated text; returns the text now safe to emit, and whether a stop string was
    /// found (the text before it is returned; the rest is dropped).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, s)) = first {
            self.matched = Some(s.clone());
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let bytes = self.pending.as_bytes();
        let hold = self
            .stops
            .iter()
            .filter_map(|s| {
                (1..s.len().min(bytes.len() + 1))
                    .rev()
                    .find(|&m| bytes.ends_with(&s.as_bytes()[..m]))
            })
            .max()
            .unwrap_or(0);
        // A held suffix equals the start of a stop string, so it starts on a character boundary.
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Adds generated text that may not end the output (below `min_tokens`): all of it, with
    /// what was held, is safe to emit.
    pub fn pass(&mut self, delta: &str) -> String {
        self.pending.push_str(delta);
        std::mem::take(&mut self.pending)
    }

    /// Everything still held.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_text_holds_back_possible_starts() {
        let mut st = StopText::new(vec!["END".into()]);
        assert_eq!(st.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(st.push("N"), (String::new(), false));
        assert_eq!(st.push("X"), ("ENX".to_string(), false));
        assert_eq!(st.push("a END b"), ("a ".to_string(), true));
    }

    #[test]
    fn stop_text_finds_the_earliest_stop_and_flushes() {
        let mut st = StopText::new(vec!["bb".into(), "a".into()]);
        assert_eq!(st.push("xbbya"), ("x".to_string(), true));
        assert_eq!(st.matched.as_deref(), Some("bb"));
        let mut st = StopText::new(vec!["\n\n".into()]);
        assert_eq!(st.push("é\n"), ("é".to_string(), false));
        assert_eq!(st.flush(), "\n");
        assert_eq!(st.matched, None);
        let mut none = StopText::new(vec![String::new()]);
        assert_eq!(none.push("abc"), ("abc".to_string(), false));
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let row = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let lp = token_logprobs(&row, 2, 2);
        let lse = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.top[0].0, 1);
        assert_eq!(lp.top[1].0, 2);
        assert!(token_logprobs(&row, 3, 0).logprob.is_infinite());
    }
}
