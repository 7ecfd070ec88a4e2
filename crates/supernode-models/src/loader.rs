//! The one entry point for loading a model from a path: a `.gguf` file or a directory with
//! `config.json` and safetensors. Reads the config, resolves the [`Numerics`] from the
//! precision asked for, and has the architecture's [`Family`](crate::arch::Family) build it.

use std::path::{Path, PathBuf};

use serde_json::Value;
use supernode_kernels::Precision;

use crate::arch::{Arch, Model};
use crate::config::{ModelConfig, ROPE_FREQS, TOKENS_KEY};
use crate::gguf::read_gguf;
use crate::kv_cache::KvDType;
use crate::numerics::Numerics;
use crate::safetensors::read_safetensors_dir;
use crate::weights::Weights;
use crate::{Metadata, ModelError, Result};

/// Where a model came from; the engine builds its tokenizer from this.
pub enum ModelSource {
    Gguf { path: PathBuf, metadata: Metadata },
    HfDir { dir: PathBuf, config: Value },
}

/// A model ready to run.
pub struct LoadedModel {
    pub model: Box<dyn Model>,
    pub source: ModelSource,
}

/// How to load a model.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// How activations meet quantised weights in every projection (default: exact; the
    /// command line's default is quantized).
    pub precision: Precision,
    /// The KV cache's element type; `None` takes the precision's own
    /// ([`KvDType::for_rounding`]: f32 in exact precision, f16 in quantized).
    pub kv_dtype: Option<KvDType>,
    /// Also load the checkpoint's first multi-token-prediction (NextN) layer, the drafter of
    /// `--speculative mtp` (unused otherwise, so not loaded by default).
    pub mtp: bool,
}

impl LoadOptions {
    /// The numerics these options give every layer.
    fn numerics(&self) -> Numerics {
        Numerics::new(self.precision).with_kv_dtype(self.kv_dtype)
    }
}

/// What to tell the user about a model directory that is loaded only in part: a multimodal
/// checkpoint (Gemma 3, Qwen3.5), of which the text model is loaded and the vision tower is not.
pub fn partial_load_note(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let model_type = config.get("model_type")?.as_str()?;
    crate::arch::hf_wrapper(model_type)?;
    Some(format!(
        "{} is a multimodal `{model_type}` checkpoint: loading its text model only (the vision \
         tower is not loaded)",
        path.display()
    ))
}

/// Whether to load the NextN layer: when asked for, of a checkpoint that has one, of an
/// architecture whose layer is supported (Qwen3.5, Qwen3-Next and DeepSeek-V3 so far).
fn check_mtp(cfg: &ModelConfig, opts: &LoadOptions) -> Result<bool> {
    if !opts.mtp {
        return Ok(false);
    }
    if !matches!(
        cfg.arch,
        Arch::Qwen35 | Arch::Qwen35Moe | Arch::Qwen3Next | Arch::DeepseekV3
    ) {
        return Err(ModelError::Invalid(format!(
            "multi-token prediction (--speculative mtp) is supported for Qwen3.5, Qwen3-Next and \
             DeepSeek-V3 checkpoints so far, not `{}`: use `ngram` or `draft`",
            cfg.arch.gguf_name()
        )));
    }
    if cfg.nextn_layers == 0 {
        return Err(ModelError::Invalid(
            "the checkpoint has no multi-token-prediction layer (--speculative mtp needs one): \
             use `ngram` or `draft`"
                .into(),
        ));
    }
    Ok(true)
}

/// Loads a model from a GGUF file or an HF-style safetensors directory.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if path.is_dir() {
        let st = read_safetensors_dir(path)?;
        let mut cfg = ModelConfig::from_hf(&st.config).map_err(|e| {
            ModelError::Invalid(format!("{}: {e}", path.join("config.json").display()))
        })?;
        cfg.load_nextn = check_mtp(&cfg, opts)?;
        let weights = Weights::new(st.tensors, opts.numerics());
        let model = (cfg.arch.family().build)(cfg, &weights)?;
        return Ok(LoadedModel {
            model,
            source: ModelSource::HfDir {
                dir: st.dir,
                config: st.config,
            },
        });
    }
    let file = read_gguf(path)?;
    let vocab_rows = file.tensor("token_embd.weight").map_or(0, |t| t.rows());
    let in_file = |e: ModelError| ModelError::Invalid(format!("{}: {e}", path.display()));
    let mut cfg = ModelConfig::from_gguf(&file.metadata, vocab_rows).map_err(in_file)?;
    let weights = Weights::new(file.tensors, opts.numerics());
    check_vocab_rows(&file.metadata, &cfg, &weights).map_err(in_file)?;
    if weights.get(ROPE_FREQS).is_some() {
        let factors = weights
            .vector(ROPE_FREQS, cfg.rope.dim / 2)
            .map_err(in_file)?;
        cfg = cfg
            .with_rope_factors(factors.into_iter().map(f64::from).collect())
            .map_err(in_file)?;
    }
    cfg.load_nextn = check_mtp(&cfg, opts).map_err(in_file)?;
    let family = cfg.arch.family();
    if let Some(from_tensors) = family.gguf_tensors {
        cfg = from_tensors(cfg, &weights).map_err(in_file)?;
    }
    let model = (family.build)(cfg, &weights).map_err(in_file)?;
    Ok(LoadedModel {
        model,
        source: ModelSource::Gguf {
            path: file.path,
            metadata: file.metadata,
        },
    })
}

/// llama.cpp's rule for GGUF files: the embedding and the output matrix have exactly one row
/// per token of the vocabulary (`tokenizer.ggml.tokens`, or `{arch}.vocab_size`), so that every
/// id the tokenizer makes has an embedding and every logit a token. (A file with neither key
/// takes its vocabulary from the embedding.)
fn check_vocab_rows(meta: &Metadata, cfg: &ModelConfig, w: &Weights) -> Result<()> {
    let vocab_key = format!("{}.vocab_size", cfg.arch.gguf_name());
    let from = if meta.get(TOKENS_KEY).is_some() {
        format!("the {} tokens of `{TOKENS_KEY}`", cfg.vocab_size)
    } else if meta.get(&vocab_key).is_some() {
        format!("`{vocab_key}` = {}", cfg.vocab_size)
    } else {
        return Ok(());
    };
    for name in ["token_embd.weight", "output.weight"] {
        match w.get(name) {
            Some(t) if t.shape.len() == 2 && t.rows() != cfg.vocab_size => {
                return Err(ModelError::Tensor {
                    name: name.into(),
                    msg: format!(
                        "has {} rows, but the vocabulary is {from}; there must be one row per token",
                        t.rows()
                    ),
                })
            }
            _ => {}
        }
    }
    Ok(())
}
