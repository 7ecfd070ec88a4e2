//! The cost of one decode step of DeepSeek Sparse Attention against dense MLA, at a given
//! context, on a tiny random DeepSeek-V3.2 whose attention has the real model's proportions
//! (16 heads over a latent of 128 + 16 roped dims, against an indexer of 4 heads of 32: the
//! indexer reads 128 values per cached position where the absorbed attention reads 16 × 144).
//!
//! ```text
//! cargo run --release -p supernode-models --example sparse_decode [-- CTX ...]
//! ```
//!
//! For each context (default 512 and 4096) it fills the cache by prefill, then times decode
//! steps at that context: `dense` is the same model without its indexer (DeepSeek-V3's MLA),
//! `indexed, all` runs the indexer but keeps every position (`index_topk` past the context),
//! `sparse` keeps the indexer's `index_topk` = 64 best. Prints the median milliseconds of a
//! step of each as JSON lines.

use std::time::Instant;

use serde_json::json;
use supernode_kernels::{DType, Precision};
use supernode_models::arch::deepseek_v3;
use supernode_models::{Batch, KvCache, Model, ModelConfig, Numerics, Storage, Tensor};

const HIDDEN: usize = 256;
const HEADS: usize = 16;
const Q_LORA: usize = 64;
const RANK: usize = 128;
const NOPE: usize = 32;
const ROPE: usize = 16;
const V: usize = 32;
const FFN: usize = 512;
const VOCAB: usize = 256;
const LAYERS: usize = 2;
const INDEX_HEADS: usize = 4;
const INDEX_DIM: usize = 32;
const BLOCK: usize = 16;
const STEPS: usize = 15;

fn config(model_type: &str, top_k: usize) -> serde_json::Value {
    json!({
        "model_type": model_type, "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": FFN, "moe_intermediate_size": 32, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "q_lora_rank": Q_LORA,
        "kv_lora_rank": RANK, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE,
        "v_head_dim": V, "max_position_embeddings": 163_840, "rms_norm_eps": 1e-6,
        "rope_theta": 10_000.0, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1,
        "topk_group": 1, "first_k_dense_replace": LAYERS, "index_n_heads": INDEX_HEADS,
        "index_head_dim": INDEX_DIM, "index_topk": top_k,
    })
}

/// Random weights under their GGUF names (`shape` in ggml order: inputs first).
fn weights(indexer: bool) -> Vec<Tensor> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut t = |name: String, shape: &[usize], norm: bool| {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let r = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let v = if norm { 1.0 + 0.1 * r } else { 0.1 * r };
                v.to_le_bytes()
            })
            .collect();
        Tensor {
            name,
            dtype: DType::F32,
            shape: shape.to_vec(),
            storage: Storage::Owned(bytes.into()),
        }
    };
    let mut out = vec![
        t("token_embd.weight".into(), &[HIDDEN, VOCAB], false),
        t("output_norm.weight".into(), &[HIDDEN], true),
        t("output.weight".into(), &[HIDDEN, VOCAB], false),
    ];
    for i in 0..LAYERS {
        let p = |n: &str| format!("blk.{i}.{n}");
        out.extend([
            t(p("attn_norm.weight"), &[HIDDEN], true),
            t(p("ffn_norm.weight"), &[HIDDEN], true),
            t(p("ffn_gate.weight"), &[HIDDEN, FFN], false),
            t(p("ffn_up.weight"), &[HIDDEN, FFN], false),
            t(p("ffn_down.weight"), &[FFN, HIDDEN], false),
            t(p("attn_q_a.weight"), &[HIDDEN, Q_LORA], false),
            t(p("attn_q_a_norm.weight"), &[Q_LORA], true),
            t(
                p("attn_q_b.weight"),
                &[Q_LORA, HEADS * (NOPE + ROPE)],
                false,
            ),
            t(p("attn_kv_a_mqa.weight"), &[HIDDEN, RANK + ROPE], false),
            t(p("attn_kv_a_norm.weight"), &[RANK], true),
            t(p("attn_kv_b.weight"), &[RANK, HEADS * (NOPE + V)], false),
            t(p("attn_output.weight"), &[HEADS * V, HIDDEN], false),
        ]);
        if indexer {
            out.extend([
                t(
                    p("indexer.attn_q_b.weight"),
                    &[Q_LORA, INDEX_HEADS * INDEX_DIM],
                    false,
                ),
                t(p("indexer.attn_k.weight"), &[HIDDEN, INDEX_DIM], false),
                t(p("indexer.k_norm.weight"), &[INDEX_DIM], true),
                t(p("indexer.k_norm.bias"), &[INDEX_DIM], false),
                t(p("indexer.proj.weight"), &[HIDDEN, INDEX_HEADS], false),
            ]);
        }
    }
    out
}

/// Median milliseconds of a decode step at context `ctx` (the cache filled by prefill first).
fn step_ms(model: &dyn Model, ctx: usize) -> f64 {
    let blocks = (ctx + STEPS).div_ceil(BLOCK) + 1;
    let mut kv = KvCache::new(&model.kv_specs(), BLOCK, blocks).expect("cache");
    let table: Vec<u32> = (0..blocks as u32).collect();
    let tables = [table.as_slice()];
    let token = |p: usize| ((p * 37 + 11) % VOCAB) as u32;
    let mut run = |start: usize, end: usize| {
        let tokens: Vec<u32> = (start..end).map(token).collect();
        let positions: Vec<usize> = (start..end).collect();
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            seq_of: &vec![0; end - start],
            block_tables: &tables,
            logits_for: &[end - start - 1],
            state_slots: &[],
            chunked_until: &[],
            drafts: &[],
        };
        model.forward(&batch, &mut kv).expect("forward");
    };
    for start in (0..ctx).step_by(256) {
        run(start, (start + 256).min(ctx));
    }
    let mut times: Vec<f64> = (ctx..ctx + STEPS)
        .map(|p| {
            let t0 = Instant::now();
            run(p, p + 1);
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[STEPS / 2]
}

fn main() {
    let ctxs: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a context length"))
        .collect();
    let ctxs = if ctxs.is_empty() {
        vec![512, 4096]
    } else {
        ctxs
    };
    let load = |model_type: &str, top_k: usize, indexer: bool| -> Box<dyn Model> {
        let cfg = ModelConfig::from_hf(&config(model_type, top_k)).expect("config");
        let w = supernode_models::weights::Weights::new(
            weights(indexer),
            Numerics::new(Precision::Exact),
        );
        Box::new(deepseek_v3::load(cfg, &w).expect("model"))
    };
    for &ctx in &ctxs {
        let dense = step_ms(&*load("deepseek_v3", 0, false), ctx);
        let all = step_ms(&*load("deepseek_v32", 1 << 24, true), ctx);
        let sparse = step_ms(&*load("deepseek_v32", 64, true), ctx);
        println!(
            "{}",
            json!({"context": ctx, "index_topk": 64, "dense_ms": dense,
                   "indexed_all_ms": all, "sparse_ms": sparse,
                   "threads": supernode_kernels::pool::threads()})
        );
    }
}
