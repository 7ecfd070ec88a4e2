//! The speculative-decoding options every generating subcommand shares (`run`, `serve`,
//! `bench`), named as vLLM and llama.cpp name them, and the engine configuration they make.

use anyhow::Result;
use clap::Args;
use supernode_engine::spec::{SpecConfig, SpecMethod};

#[derive(Args, Clone, Debug)]
pub(crate) struct SpecArgs {
    /// Speculative decoding: `ngram` (prompt lookup: drafts copied from what followed the last
    /// few tokens earlier in the prompt or output; no extra model). Off when not given.
    #[arg(long, value_name = "METHOD")]
    pub(crate) speculative: Option<String>,
    /// Draft tokens per request and step at most (k, 1 to 32).
    #[arg(long, value_name = "K", default_value_t = 5)]
    pub(crate) num_speculative_tokens: usize,
    /// The shortest n-gram prompt lookup matches.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) prompt_lookup_min: usize,
    /// The longest n-gram prompt lookup matches (the longest that occurs wins).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub(crate) prompt_lookup_max: usize,
    /// Draft nothing while more requests than this are running (a large batch gains little).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub(crate) speculative_disable_by_batch_size: usize,
    /// Always draft K tokens when the proposer has them, instead of choosing k per request from
    /// its acceptance and pausing requests whose drafts fail.
    #[arg(long)]
    pub(crate) speculative_fixed_k: bool,
}

impl SpecArgs {
    /// The engine's speculation, checked; `None` without `--speculative`.
    pub(crate) fn config(&self) -> Result<Option<SpecConfig>> {
        let Some(name) = &self.speculative else {
            return Ok(None);
        };
        let cfg = SpecConfig {
            method: SpecMethod::parse(name, self.prompt_lookup_min, self.prompt_lookup_max)?,
            num_speculative_tokens: self.num_speculative_tokens,
            adaptive: !self.speculative_fixed_k,
            disable_by_batch_size: Some(self.speculative_disable_by_batch_size),
        };
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("--speculative: {e}"))?;
        Ok(Some(cfg))
    }
}
