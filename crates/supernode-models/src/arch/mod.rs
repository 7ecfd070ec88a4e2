//! One file per architecture family, and the registry that maps names to them.
//!
//! An architecture is its file plus one row of the registry here: the file holds what sets the
//! family apart — its GGUF metadata and config.json keys and defaults, the keys its errors name,
//! its HF tensor names, the tensors it loads and its forward pass, composed from the shared [`decoder`] and
//! [`crate::layers`] — behind the entry points of a [`Family`]; the row gives the names that
//! select it (GGUF `general.architecture`, HF `model_type`). [`Model`] is what a built one is.

pub mod decoder;
pub mod deepseek_v3;
pub mod deepseek_v32;
pub mod deepseek_v4;
pub mod gemma3;
pub mod llama;
pub mod qwen3_5;

use serde_json::Value;

use crate::config::KeyNames;
use crate::kv_cache::{KvCache, KvLayerSpec};
use crate::names::Row;
use crate::trace::Trace;
use crate::weights::Weights;
use crate::{Batch, Metadata, ModelConfig, ModelError, Result};

/// The architectures supernode runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma3,
    /// Llama with Q/K/V biases (built by the Llama family's builder).
    Qwen2,
    /// Llama with per-head Q/K RMSNorms (built by the Llama family's builder).
    Qwen3,
    /// Qwen3 with a sparse mixture-of-experts feed-forward on some layers (built by the Llama
    /// family's builder).
    Qwen3Moe,
    /// DeepSeek-V3 / R1: multi-head latent attention and a grouped sigmoid-routed MoE with a
    /// shared expert (llama.cpp's `deepseek2`, which covers V2 and V3).
    DeepseekV3,
    /// DeepSeek-V3.2: V3 with DeepSeek Sparse Attention (a lightning indexer picks each
    /// query's top-k positions).
    DeepseekV32,
    /// DeepSeek-V4: sliding, compressed sparse and heavily compressed attention over one
    /// shared key-value head, hyper-connections, hash-routed and learned-routed MoE layers.
    DeepseekV4,
    /// Qwen3.5 (dense): hybrid Gated DeltaNet linear attention and gated full attention.
    Qwen35,
    /// Qwen3.5-MoE: Qwen3.5 with a MoE (gated shared expert) on every layer.
    Qwen35Moe,
    /// Qwen3-Next: Qwen3.5-MoE's layers with Qwen3-MoE's sparse-layer rules and fused inputs.
    Qwen3Next,
}

/// What an architecture family gives the shared config reading and loading.
pub struct Family {
    /// Reads the family's own GGUF metadata (and its rope style) into a config whose shared
    /// fields are read.
    pub read_gguf: fn(&mut ModelConfig, &Metadata) -> Result<()>,
    /// The defaults of `arch`'s transformers config class, filled in where config.json leaves a
    /// key out.
    pub hf_defaults: fn(Arch) -> Value,
    /// Checks what the family cannot run and reads its own config.json keys into a config whose
    /// shared fields are read.
    pub read_hf: fn(&mut ModelConfig, &Value) -> Result<()>,
    /// What a GGUF file's tensors tell beyond its metadata, if anything.
    pub gguf_tensors: Option<fn(ModelConfig, &Weights) -> Result<ModelConfig>>,
    /// Loads the model's tensors and builds it.
    pub build: fn(ModelConfig, &Weights) -> Result<Box<dyn Model>>,
    /// The keys its errors name where they differ from the shared ones.
    pub keys: KeyNames,
    /// Its own rows of the HF → GGUF tensor names (besides the shared ones of
    /// [`crate::names`]).
    pub hf_names: &'static [Row],
}

/// Each architecture with its GGUF `general.architecture` name, its HF `model_type` and its
/// family. The order is that of the supported-names lists in errors.
static REGISTRY: [(Arch, &str, &str, &Family); 11] = [
    (Arch::Llama, "llama", "llama", &llama::FAMILY),
    (Arch::Gemma3, "gemma3", "gemma3_text", &gemma3::FAMILY),
    (Arch::Qwen2, "qwen2", "qwen2", &llama::FAMILY),
    (Arch::Qwen3, "qwen3", "qwen3", &llama::FAMILY),
    (Arch::Qwen3Moe, "qwen3moe", "qwen3_moe", &llama::FAMILY),
    (
        Arch::DeepseekV3,
        "deepseek2",
        "deepseek_v3",
        &deepseek_v3::FAMILY,
    ),
    (
        Arch::DeepseekV32,
        "deepseek32",
        "deepseek_v32",
        &deepseek_v32::FAMILY,
    ),
    (
        Arch::DeepseekV4,
        "deepseek4",
        "deepseek_v4",
        &deepseek_v4::FAMILY,
    ),
    (Arch::Qwen35, "qwen35", "qwen3_5_text", &qwen3_5::FAMILY),
    (
        Arch::Qwen35Moe,
        "qwen35moe",
        "qwen3_5_moe_text",
        &qwen3_5::FAMILY,
    ),
    (Arch::Qwen3Next, "qwen3next", "qwen3_next", &qwen3_5::FAMILY),
];

/// The registered families, each once.
pub fn families() -> impl Iterator<Item = &'static Family> {
    REGISTRY
        .iter()
        .enumerate()
        .filter(|&(i, r)| !REGISTRY[..i].iter().any(|s| std::ptr::eq(s.3, r.3)))
        .map(|(_, r)| r.3)
}

/// HF `model_type`s that wrap a text model, each with the function that gives the text model's
/// config.json (with its own `model_type`).
type TextConfig = fn(&Value) -> Result<Value>;
static HF_WRAPPERS: [(&str, TextConfig); 3] = [
    ("gemma3", gemma3::hf_text_config),
    ("qwen3_5", qwen3_5::hf_text_config),
    ("qwen3_5_moe", qwen3_5::hf_text_config),
];

/// The function that unwraps a config.json of `model_type`, if that is a wrapper's.
pub fn hf_wrapper(model_type: &str) -> Option<TextConfig> {
    HF_WRAPPERS
        .iter()
        .find(|(t, _)| *t == model_type)
        .map(|&(_, f)| f)
}

impl Arch {
    pub fn from_gguf_name(name: &str) -> Result<Arch> {
        REGISTRY
            .iter()
            .find(|(_, g, _, _)| *g == name)
            .map(|(a, _, _, _)| *a)
            .ok_or_else(|| unsupported(name, false))
    }

    pub fn from_hf_model_type(name: &str) -> Result<Arch> {
        REGISTRY
            .iter()
            .find(|(_, _, h, _)| *h == name)
            .map(|(a, _, _, _)| *a)
            .ok_or_else(|| unsupported(name, true))
    }

    /// The GGUF name, which prefixes the architecture's metadata keys.
    pub fn gguf_name(self) -> &'static str {
        self.row().1
    }

    /// The `model_type` of its HF `config.json`.
    pub fn hf_model_type(self) -> &'static str {
        self.row().2
    }

    /// The family that reads and builds it.
    pub fn family(self) -> &'static Family {
        self.row().3
    }

    fn row(self) -> &'static (Arch, &'static str, &'static str, &'static Family) {
        REGISTRY
            .iter()
            .find(|(a, _, _, _)| *a == self)
            .expect("every architecture is registered")
    }
}

/// The error for an architecture name we lack, listing the names of the same kind (GGUF
/// `general.architecture` or HF `model_type`) that we support.
fn unsupported(name: &str, hf: bool) -> ModelError {
    ModelError::UnsupportedArch {
        arch: name.to_string(),
        supported: REGISTRY
            .iter()
            .map(|&(_, g, h, _)| if hf { h } else { g })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A loaded model that computes logits for a flat batch.
pub trait Model: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// The geometry of each layer's KV cache rows.
    fn kv_specs(&self) -> Vec<KvLayerSpec>;

    /// Floats of each layer's recurrent state per sequence (linear attention), 0 for a layer
    /// without one; all 0 for a model without linear attention. A cache for the model gets
    /// its slots from [`KvCache::with_state_slots`].
    fn state_widths(&self) -> Vec<usize> {
        vec![0; self.kv_specs().len()]
    }

    /// Runs the batch, writing its K/V into `kv`; returns the logits of the rows in
    /// `batch.logits_for`, `vocab_size` each, in that order.
    fn forward(&self, batch: &Batch, kv: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_traced(batch, kv, &mut Trace::default())
    }

    /// [`Model::forward`], showing each named intermediate activation to `trace`'s hook (the
    /// same bits with or without one).
    fn forward_traced(
        &self,
        batch: &Batch,
        kv: &mut KvCache,
        trace: &mut Trace<'_>,
    ) -> Result<Vec<f32>>;

    /// Bytes of weights read to decode one token (for bandwidth figures).
    fn weight_bytes_per_token(&self) -> usize;

    /// After a step whose batch carried drafts for the sequence in state slot `slot`
    /// ([`Batch::drafts`]): puts its recurrent state back to the end of the first `accepted`
    /// drafts, as if the rejected ones had never run. Nothing for a model without recurrent
    /// state (attention never reads a rejected draft's rows again: they are overwritten).
    fn rollback_drafts(&self, kv: &mut KvCache, slot: usize, accepted: usize) {
        let _ = (kv, slot, accepted);
    }

    /// Whether the model has its first multi-token-prediction (NextN) layer loaded
    /// ([`crate::LoadOptions::mtp`], a checkpoint with [`ModelConfig::nextn_layers`]).
    fn has_nextn(&self) -> bool {
        false
    }

    /// The geometry of the NextN layer's own KV cache (one layer; empty without one).
    fn nextn_kv_specs(&self) -> Vec<KvLayerSpec> {
        Vec::new()
    }

    /// The NextN layer on `batch`: row `t` pairs `batch.tokens[t]`, the token at position
    /// `batch.positions[t]`, with `hidden[t]`, the hidden state (after the final norm) that
    /// predicted it, from the model's last layer or from this layer's previous row. Writes
    /// the rows' K/V into `kv` (a cache of [`Model::nextn_kv_specs`]); returns the logits of
    /// the rows in `batch.logits_for` (its guesses for the token after each) and writes every
    /// row's hidden state (after the layer's head norm) to `hidden_out`, to be fed back.
    fn forward_nextn(
        &self,
        batch: &Batch,
        hidden: &[f32],
        kv: &mut KvCache,
        hidden_out: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let _ = (batch, hidden, kv, hidden_out);
        Err(no_nextn())
    }
}

/// The error of [`Model::forward_nextn`] on a model without the layer.
pub(crate) fn no_nextn() -> ModelError {
    ModelError::Invalid("this model has no multi-token-prediction layer loaded".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use supernode_kernels::Precision;

    use crate::arch::Model;
    use crate::numerics::Numerics;
    use crate::safetensors::read_safetensors_dir;
    use crate::weights::Weights;
    use crate::{Batch, KvCache, ModelConfig};

    /// The multi-token-prediction layer of fixture `name` (`tests/fixtures/hf/<name>`, made by
    /// a `tools/make_*mtp_fixture.py` script with a float64 NumPy version of the layer) loaded
    /// by `load`: logits and hidden states of its reference rows within 1e-4, the same bits in
    /// two steps as in one (its own KV cache carries the first step), and not loaded unless
    /// asked for.
    pub(crate) fn check_mtp_reference(
        name: &str,
        load: impl Fn(ModelConfig, &Weights) -> crate::Result<Box<dyn Model>>,
    ) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf")
            .join(name);
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("mtp.json")).unwrap()).unwrap();
        let ints = |k: &str| -> Vec<usize> {
            reference[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        };
        let rows = |k: &str| -> Vec<f32> {
            reference[k]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                })
                .collect()
        };
        let tokens: Vec<u32> = ints("tokens").iter().map(|&t| t as u32).collect();
        let positions = ints("positions");
        let (hidden, want_logits, want_hidden) =
            (rows("hidden"), rows("logits"), rows("hidden_out"));
        let n = tokens.len();

        let st = read_safetensors_dir(&dir).unwrap();
        let mut cfg = ModelConfig::from_hf(&st.config).unwrap();
        assert_eq!(cfg.nextn_layers, 1);
        let plain = load(
            cfg.clone(),
            &Weights::new(st.tensors.clone(), Numerics::new(Precision::Exact)),
        )
        .unwrap();
        assert!(!plain.has_nextn() && plain.nextn_kv_specs().is_empty());
        cfg.load_nextn = true;
        let m = load(
            cfg,
            &Weights::new(st.tensors, Numerics::new(Precision::Exact)),
        )
        .unwrap();
        assert!(m.has_nextn());
        let h = m.config().hidden;
        let run = |cuts: &[usize]| {
            let mut kv = KvCache::new(&m.nextn_kv_specs(), 16, 4).unwrap();
            let table = [0u32, 1, 2, 3];
            let tables = [table.as_slice()];
            let (mut logits, mut hid) = (Vec::new(), Vec::new());
            for w in cuts.windows(2) {
                let (a, b) = (w[0], w[1]);
                let all: Vec<usize> = (0..b - a).collect();
                let batch = Batch {
                    tokens: &tokens[a..b],
                    positions: &positions[a..b],
                    seq_of: &vec![0; b - a],
                    block_tables: &tables,
                    logits_for: &all,
                    state_slots: &[],
                    chunked_until: &[],
                    drafts: &[],
                };
                let mut out = Vec::new();
                logits.extend(
                    m.forward_nextn(&batch, &hidden[a * h..b * h], &mut kv, &mut out)
                        .unwrap(),
                );
                hid.extend(out);
            }
            (logits, hid)
        };
        let (logits, hid) = run(&[0, n]);
        let far = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        let (dl, dh) = (far(&logits, &want_logits), far(&hid, &want_hidden));
        eprintln!("{name}: mtp layer against float64: logits {dl:.2e}, hidden {dh:.2e}");
        assert!(dl < 1e-4 && dh < 1e-4, "{name}: logits {dl}, hidden {dh}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (l2, h2) = run(&[0, 7, 8, n]);
        assert_eq!(bits(&l2), bits(&logits));
        assert_eq!(bits(&h2), bits(&hid));
        // Without the NextN layer, a model says so.
        let mut kv = KvCache::new(&m.kv_specs(), 16, 4).unwrap();
        let err = plain.forward_nextn(
            &Batch {
                tokens: &tokens[..1],
                positions: &positions[..1],
                seq_of: &[0],
                block_tables: &[&[0]],
                logits_for: &[0],
                state_slots: &[],
                chunked_until: &[],
                drafts: &[],
            },
            &hidden[..h],
            &mut kv,
            &mut Vec::new(),
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("multi-token-prediction"));
    }
}
