//! The speculative-decoding options every generating subcommand shares (`run`, `serve`,
//! `bench`), named as vLLM and llama.cpp name them, and the engine configuration they make.

use anyhow::{bail, Context, Result};
use clap::Args;
use supernode_engine::spec::{DraftModel, SpecConfig, SpecMethod};
use supernode_engine::tokenizer::Tokenizer;
use supernode_models::{LoadOptions, Model};

use crate::fetch;

#[derive(Args, Clone, Debug)]
pub(crate) struct SpecArgs {
    /// Speculative decoding: `ngram` (prompt lookup: drafts copied from what followed the last
    /// few tokens earlier in the prompt or output; no extra model), `draft` (a smaller model
    /// with the same vocabulary drafts greedily; give it with --draft-model) or `mtp` (the
    /// checkpoint's own multi-token-prediction layer: Qwen3.5, Qwen3-Next, DeepSeek-V3). Off
    /// when not given.
    #[arg(long, value_name = "METHOD")]
    pub(crate) speculative: Option<String>,
    /// The draft model of `--speculative draft`: a .gguf file, a model directory, a short name
    /// or a Hub name, as --model takes; loaded with the model's precision and threads. It must
    /// have the model's vocabulary.
    #[arg(long, value_name = "MODEL")]
    pub(crate) draft_model: Option<String>,
    /// Draft tokens per request and step at most (k, 1 to 32).
    #[arg(long, value_name = "K", default_value_t = 5)]
    pub(crate) num_speculative_tokens: usize,
    /// The shortest n-gram prompt lookup matches (`ngram` only; default 1).
    #[arg(long, value_name = "N")]
    pub(crate) prompt_lookup_min: Option<usize>,
    /// The longest n-gram prompt lookup matches, the longest that occurs winning (`ngram` only;
    /// default 3).
    #[arg(long, value_name = "N")]
    pub(crate) prompt_lookup_max: Option<usize>,
    /// Draft nothing while more requests than this are running (a large batch gains little).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub(crate) speculative_disable_by_batch_size: usize,
    /// Always draft K tokens when the proposer has them, instead of choosing k per request from
    /// its acceptance and pausing requests whose drafts fail.
    #[arg(long)]
    pub(crate) speculative_fixed_k: bool,
}

impl SpecArgs {
    /// Checks what needs no model (before the model loads): the flags go together, and
    /// prompt lookup's configuration is valid.
    pub(crate) fn check(&self) -> Result<()> {
        let lookup = self.prompt_lookup_min.is_some() || self.prompt_lookup_max.is_some();
        if lookup
            && !matches!(
                self.speculative.as_deref(),
                Some("ngram" | "prompt-lookup" | "prompt_lookup")
            )
        {
            bail!("--prompt-lookup-min and --prompt-lookup-max need --speculative ngram");
        }
        match (self.speculative.as_deref(), &self.draft_model) {
            (Some("draft"), None) => {
                bail!("--speculative draft needs --draft-model MODEL (the model that drafts)")
            }
            (Some("draft"), Some(_)) | (None, None) => Ok(()),
            (_, Some(_)) => bail!("--draft-model needs --speculative draft"),
            (Some(name), None) => self
                .with(SpecMethod::parse(
                    name,
                    self.lookup_min(),
                    self.lookup_max(),
                )?)
                .map(drop),
        }
    }

    fn lookup_min(&self) -> usize {
        self.prompt_lookup_min.unwrap_or(1)
    }

    fn lookup_max(&self) -> usize {
        self.prompt_lookup_max.unwrap_or(3)
    }

    /// Whether the model must be loaded with its multi-token-prediction layer.
    pub(crate) fn wants_mtp(&self) -> bool {
        self.speculative.as_deref() == Some("mtp")
    }

    /// The engine's speculation, checked; `None` without `--speculative`. A draft model is
    /// loaded with `opts` (the target's) and checked against `target` and its tokenizer.
    pub(crate) fn config(
        &self,
        opts: &LoadOptions,
        target: &dyn Model,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Option<SpecConfig>> {
        self.check()?;
        let Some(name) = &self.speculative else {
            return Ok(None);
        };
        let method = match &self.draft_model {
            Some(m) => {
                let path = fetch::resolve_model(m).context("--draft-model")?;
                SpecMethod::Draft(DraftModel::load(&path, m, opts, target, tokenizer)?)
            }
            None => SpecMethod::parse(name, self.lookup_min(), self.lookup_max())?,
        };
        self.with(method).map(Some)
    }

    fn with(&self, method: SpecMethod) -> Result<SpecConfig> {
        let cfg = SpecConfig {
            method,
            num_speculative_tokens: self.num_speculative_tokens,
            adaptive: !self.speculative_fixed_k,
            disable_by_batch_size: Some(self.speculative_disable_by_batch_size),
        };
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("--speculative: {e}"))?;
        Ok(cfg)
    }
}
