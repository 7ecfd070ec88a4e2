//! One checked model configuration, resolved from GGUF metadata or from an HF `config.json`.
//!
//! Model code reads only [`ModelConfig`]; every field is validated here (non-zero sizes, heads
//! divisible into KV groups, rope dims within the head), so the forward pass can index freely.

use serde_json::Value;
use supernode_kernels::ops::RopeStyle;

use crate::{Metadata, ModelError, Result};

/// The architectures supernode runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
}

impl Arch {
    /// GGUF `general.architecture` names, HF `model_type` names.
    const TABLE: [(Arch, &'static str, &'static str); 1] = [(Arch::Llama, "llama", "llama")];

    pub fn from_gguf_name(name: &str) -> Result<Arch> {
        Self::TABLE
            .iter()
            .find(|(_, g, _)| *g == name)
            .map(|(a, _, _)| *a)
            .ok_or_else(|| unsupported(name))
    }

    pub fn from_hf_model_type(name: &str) -> Result<Arch> {
        Self::TABLE
            .iter()
            .find(|(_, _, h)| *h == name)
            .map(|(a, _, _)| *a)
            .ok_or_else(|| unsupported(name))
    }

    /// The GGUF name, which prefixes the architecture's metadata keys.
    pub fn gguf_name(self) -> &'static str {
        Self::TABLE
            .iter()
            .find(|(a, _, _)| *a == self)
            .map_or("?", |(_, g, _)| g)
    }
}

fn unsupported(name: &str) -> ModelError {
    ModelError::UnsupportedArch {
        arch: name.to_string(),
        supported: Arch::TABLE
            .iter()
            .map(|(_, g, _)| *g)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// How rope frequencies are stretched for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        factor: f64,
    },
}

/// Rotary position embedding settings of an attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotated dimensions per head (even; ≤ head_dim).
    pub dim: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Angular frequency of each of the `dim / 2` dimension pairs.
    pub fn inv_freq(&self) -> Vec<f64> {
        let div = match self.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => factor,
        };
        (0..self.dim / 2)
            .map(|i| self.theta.powf(-(2.0 * i as f64) / self.dim as f64) / div)
            .collect()
    }
}

/// The checked configuration of a decoder-only transformer.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Dimension of each query/key head.
    pub head_dim: usize,
    /// Dimension of each value head.
    pub v_head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    /// The context length the model was trained for.
    pub context_len: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
}

impl ModelConfig {
    /// From GGUF metadata (`{arch}.block_count`, ...). `vocab_from_tensors` is the row count of
    /// the embedding, used when the file has no `{arch}.vocab_size`.
    pub fn from_gguf(meta: &Metadata, vocab_from_tensors: usize) -> Result<ModelConfig> {
        let arch_name = meta
            .get_str("general.architecture")?
            .ok_or_else(|| ModelError::Metadata("missing `general.architecture`".into()))?;
        let arch = Arch::from_gguf_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            meta.get_usize(&key(k))?
                .ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
        };
        let hidden = req("embedding_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = meta
            .get_usize(&key("attention.head_count_kv"))?
            .unwrap_or(n_heads);
        let head_dim = match meta.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let v_head_dim = meta
            .get_usize(&key("attention.value_length"))?
            .unwrap_or(head_dim);
        let scaling = match meta.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: meta.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some(other) => {
                return Err(ModelError::Metadata(format!(
                    "rope scaling type `{other}` is not supported (supported: none, linear)"
                )))
            }
        };
        let cfg = ModelConfig {
            arch,
            n_layers: req("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            v_head_dim,
            ffn_dim: req("feed_forward_length")?,
            vocab_size: meta
                .get_usize(&key("vocab_size"))?
                .unwrap_or(vocab_from_tensors),
            context_len: req("context_length")?,
            rms_eps: meta
                .get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5) as f32,
            rope: RopeConfig {
                theta: meta.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
                dim: meta
                    .get_usize(&key("rope.dimension_count"))?
                    .unwrap_or(head_dim),
                // llama.cpp's converter permutes Q/K rows of llama checkpoints so that ggml's
                // "normal" (adjacent-pair) rope is right for GGUF files.
                style: RopeStyle::Interleaved,
                scaling,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// From an HF `config.json`, in either the older `rope_theta`/`rope_scaling` style or the
    /// newer `rope_parameters` style.
    pub fn from_hf(config: &Value) -> Result<ModelConfig> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::Metadata("config.json has no `model_type`".into()))?;
        let arch = Arch::from_hf_model_type(model_type)?;
        let num = |k: &str| config.get(k).and_then(Value::as_f64);
        let int = |k: &str| -> Result<Option<usize>> {
            match config.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(|u| Some(u as usize)).ok_or_else(|| {
                    ModelError::Metadata(format!(
                        "config.json: `{k}` should be a non-negative integer, got {v}"
                    ))
                }),
            }
        };
        let req = |k: &str| -> Result<usize> {
            int(k)?.ok_or_else(|| ModelError::Metadata(format!("config.json: missing `{k}`")))
        };
        let hidden = req("hidden_size")?;
        let n_heads = req("num_attention_heads")?;
        let head_dim = match int("head_dim")? {
            Some(d) => d,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let params = config.get("rope_parameters");
        let rope_field = |k: &str| {
            params
                .and_then(|p| p.get(k))
                .or_else(|| config.get("rope_scaling").and_then(|p| p.get(k)))
        };
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| num("rope_theta"))
            .unwrap_or(10_000.0);
        let rope_type = rope_field("rope_type")
            .or_else(|| rope_field("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: rope_field("factor").and_then(Value::as_f64).unwrap_or(1.0),
            },
            other => {
                return Err(ModelError::Metadata(format!(
                    "config.json: rope type `{other}` is not supported (supported: default, linear)"
                )))
            }
        };
        let cfg = ModelConfig {
            arch,
            n_layers: req("num_hidden_layers")?,
            hidden,
            n_heads,
            n_kv_heads: int("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim,
            v_head_dim: head_dim,
            ffn_dim: req("intermediate_size")?,
            vocab_size: req("vocab_size")?,
            context_len: int("max_position_embeddings")?.unwrap_or(2048),
            rms_eps: num("rms_norm_eps").unwrap_or(1e-6) as f32,
            rope: RopeConfig {
                theta,
                dim: head_dim,
                // HF checkpoints are not permuted: transformers' rotate_half pairs halves.
                style: RopeStyle::Halves,
                scaling,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Metadata(m));
        for (name, v) in [
            ("layer count", self.n_layers),
            ("hidden size", self.hidden),
            ("head count", self.n_heads),
            ("KV head count", self.n_kv_heads),
            ("head dim", self.head_dim),
            ("value head dim", self.v_head_dim),
            ("feed-forward size", self.ffn_dim),
            ("vocabulary size", self.vocab_size),
            ("context length", self.context_len),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
            if v > 1 << 24 {
                return bad(format!("{name} is {v}, which is absurd"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads cannot be grouped over {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.rope.dim.is_multiple_of(2) || self.rope.dim > self.head_dim {
            return bad(format!(
                "rope dimension {} must be even and at most the head dim {}",
                self.rope.dim, self.head_dim
            ));
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 1.0) {
            return bad(format!(
                "rope base {} must be a finite number > 1",
                self.rope.theta
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("norm epsilon {} is invalid", self.rms_eps));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetaValue;

    fn llama_meta() -> Metadata {
        let mut m = Metadata::default();
        let mut put = |k: &str, v: MetaValue| {
            m.entries.insert(k.to_string(), v);
        };
        put("general.architecture", MetaValue::String("llama".into()));
        put("llama.embedding_length", MetaValue::U32(64));
        put("llama.attention.head_count", MetaValue::U32(4));
        put("llama.attention.head_count_kv", MetaValue::U32(2));
        put("llama.block_count", MetaValue::U32(2));
        put("llama.feed_forward_length", MetaValue::U32(128));
        put("llama.context_length", MetaValue::U32(256));
        put("llama.rope.freq_base", MetaValue::F32(100000.0));
        m
    }

    #[test]
    fn gguf_defaults_and_checks() {
        let cfg = ModelConfig::from_gguf(&llama_meta(), 100).unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.vocab_size, 100);
        assert_eq!(cfg.rope.dim, 16);
        assert_eq!(cfg.rope.style, RopeStyle::Interleaved);
        let mut m = llama_meta();
        m.entries
            .insert("llama.attention.head_count_kv".into(), MetaValue::U32(3));
        assert!(ModelConfig::from_gguf(&m, 100)
            .unwrap_err()
            .to_string()
            .contains("grouped"));
        m.entries.insert(
            "general.architecture".into(),
            MetaValue::String("mamba".into()),
        );
        let err = ModelConfig::from_gguf(&m, 100).unwrap_err().to_string();
        assert!(err.contains("mamba") && err.contains("llama"), "{err}");
    }

    #[test]
    fn hf_config_both_rope_styles() {
        let old: Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
            "vocab_size": 100, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}
        });
        let cfg = ModelConfig::from_hf(&old).unwrap();
        assert_eq!(cfg.rope.theta, 5e5);
        assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(cfg.rope.style, RopeStyle::Halves);
        let new: Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
            "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}
        });
        let cfg = ModelConfig::from_hf(&new).unwrap();
        assert_eq!(cfg.rope.theta, 1e4);
        assert_eq!(cfg.n_kv_heads, 4);
        let err = ModelConfig::from_hf(&serde_json::json!({"model_type": "rwkv"})).unwrap_err();
        assert!(err.to_string().contains("supported: llama"), "{err}");
    }
}
