//! Reading HF `config.json` values: typed getters that refuse a mistyped value rather than
//! fall back on a default, and the rope settings in both the older `rope_theta`/`rope_scaling`
//! style and the newer `rope_parameters` style.

use serde_json::Value;

use super::{yarn_mscale, RopeScaling};
use crate::{ModelError, Result};

/// A non-negative integer `k` of `config`, `None` when absent or null.
pub(crate) fn hf_int(config: &Value, k: &str) -> Result<Option<usize>> {
    match config.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|u| Some(u as usize)).ok_or_else(|| {
            ModelError::Metadata(format!(
                "config.json: `{k}` should be a non-negative integer, got {v}"
            ))
        }),
    }
}

/// A number `k` of `config`, `None` when absent or null.
pub(crate) fn hf_num(config: &Value, k: &str) -> Result<Option<f64>> {
    match config.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => hf_as_num(k, v).map(Some),
    }
}

/// The value `v` of key `k` as a number.
pub(crate) fn hf_as_num(k: &str, v: &Value) -> Result<f64> {
    v.as_f64().ok_or_else(|| {
        ModelError::Metadata(format!("config.json: `{k}` should be a number, got {v}"))
    })
}

/// A bool `k` of `config`, `None` when absent or null.
pub(crate) fn hf_bool(config: &Value, k: &str) -> Result<Option<bool>> {
    match config.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            ModelError::Metadata(format!("config.json: `{k}` should be a bool, got {v}"))
        }),
    }
}

/// Field `k` of the rope dict `params`, or of the older top-level `rope_scaling`.
pub(crate) fn hf_rope_field<'a>(
    config: &'a Value,
    params: Option<&'a Value>,
    k: &str,
) -> Option<&'a Value> {
    params
        .and_then(|p| p.get(k))
        .or_else(|| config.get("rope_scaling").and_then(|p| p.get(k)))
        .filter(|v| !v.is_null())
}

/// Rope base and scaling from an HF rope dict `params` (`rope_parameters`, or one layer type's
/// entry of it), falling back on the older top-level `rope_theta` and `rope_scaling`.
pub(crate) fn hf_rope(
    config: &Value,
    params: Option<&Value>,
    default_theta: f64,
) -> Result<(f64, RopeScaling)> {
    let field = |k: &str| hf_rope_field(config, params, k);
    let theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) if !v.is_null() => hf_as_num("rope_theta", v)?,
        _ => hf_num(config, "rope_theta")?.unwrap_or(default_theta),
    };
    let num = |k: &str| {
        field(k)
            .map(|v| hf_as_num(&format!("rope_scaling.{k}"), v))
            .transpose()
    };
    let rope_type = field("rope_type")
        .or_else(|| field("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?.unwrap_or(1.0),
        },
        "llama3" => {
            let num = |k: &str| {
                num(k)?.ok_or_else(|| {
                    ModelError::Metadata(format!("config.json: llama3 rope scaling needs `{k}`"))
                })
            };
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_pos: num("original_max_position_embeddings")?,
            }
        }
        "yarn" => {
            let max_pos = hf_num(config, "max_position_embeddings")?;
            let original_max_pos = num("original_max_position_embeddings")?
                .or(max_pos)
                .ok_or_else(|| {
                    ModelError::Metadata(
                        "config.json: yarn rope scaling needs `original_max_position_embeddings`"
                            .into(),
                    )
                })?;
            // transformers: a missing factor is the context extension itself.
            let factor = match (num("factor")?, max_pos) {
                (Some(f), _) => f,
                (None, Some(m)) => m / original_max_pos,
                (None, None) => {
                    return Err(ModelError::Metadata(
                        "config.json: yarn rope scaling needs `factor`".into(),
                    ))
                }
            };
            // `attention_factor`, else from `mscale` / `mscale_all_dim` when both are set
            // (non-zero), else YaRN's default `0.1 ln(factor) + 1`.
            let attn_factor = match (
                num("attention_factor")?,
                num("mscale")?,
                num("mscale_all_dim")?,
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            let nonzero = |k: &str, default: f64| -> Result<f64> {
                Ok(num(k)?.filter(|v| *v != 0.0).unwrap_or(default))
            };
            RopeScaling::Yarn {
                factor,
                original_max_pos,
                beta_fast: nonzero("beta_fast", 32.0)?,
                beta_slow: nonzero("beta_slow", 1.0)?,
                attn_factor,
                truncate: match field("truncate") {
                    None => true,
                    Some(v) => v.as_bool().ok_or_else(|| {
                        ModelError::Metadata(format!(
                            "config.json: `rope_scaling.truncate` should be a bool, got {v}"
                        ))
                    })?,
                },
            }
        }
        other => {
            return Err(ModelError::Metadata(format!(
                "config.json: rope type `{other}` is not supported (supported: default, linear, llama3, yarn)"
            )))
        }
    };
    Ok((theta, scaling))
}
