//! The safetensors path gives the same model as the GGUF path: one tiny random Llama is written
//! as an HF checkpoint (`config.json` + `model.safetensors`, HF parameter names, HF's unpermuted
//! Q/K rows for `rotate_half` rope) and as a GGUF (llama.cpp names, Q/K rows permuted for
//! adjacent-pair rope as llama.cpp's converter does); both must produce the same logits.

use std::collections::BTreeMap;
use std::path::Path;

use supernode_kernels::DType;
use supernode_kernels::Precision;
use supernode_models::gguf::GgufWriter;
use supernode_models::{load_model, Batch, KvCache, LoadOptions, MetaValue};

const H: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = H / HEADS;
const FF: usize = 48;
const VOCAB: usize = 40;
const LAYERS: usize = 2;

struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }
}

/// HF row order → llama.cpp's: row (head, i, half) of the GGUF matrix is row
/// (head, half, i) of the HF one.
fn permute_rows(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let half = HD / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for s in 0..2 {
                let src = h * HD + s * half + i;
                let dst = h * HD + 2 * i + s;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, v)) in tensors {
        let begin = data.len();
        data.extend(le(v));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

#[test]
fn safetensors_and_gguf_give_the_same_logits() {
    let dir = std::env::temp_dir().join(format!("supernode-st-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut hf: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut gguf = GgufWriter::new();
    gguf.meta("general.architecture", MetaValue::String("llama".into()));
    for (k, v) in [
        ("block_count", LAYERS),
        ("embedding_length", H),
        ("feed_forward_length", FF),
        ("attention.head_count", HEADS),
        ("attention.head_count_kv", KV),
        ("context_length", 128),
    ] {
        gguf.meta(&format!("llama.{k}"), MetaValue::U32(v as u32));
    }
    gguf.meta(
        "llama.attention.layer_norm_rms_epsilon",
        MetaValue::F32(1e-5),
    );
    gguf.meta("llama.rope.freq_base", MetaValue::F32(10000.0));
    // name pairs (HF, GGUF), [rows, cols], permute-heads
    let mut add = |hf_name: String,
                   gguf_name: String,
                   rows: usize,
                   cols: usize,
                   permute: Option<usize>,
                   norm: bool| {
        let v = if norm {
            rng.vec(rows * cols, 0.3).iter().map(|x| 1.0 + x).collect()
        } else {
            rng.vec(rows * cols, 0.3)
        };
        let g = match permute {
            Some(heads) => permute_rows(&v, heads, cols),
            None => v.clone(),
        };
        let shape = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        let gshape: Vec<usize> = shape.iter().rev().copied().collect();
        gguf.tensor(&gguf_name, DType::F32, &gshape, le(&g));
        hf.insert(hf_name, (shape, v));
    };
    add(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        VOCAB,
        H,
        None,
        false,
    );
    add(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        1,
        H,
        None,
        true,
    );
    add(
        "lm_head.weight".into(),
        "output.weight".into(),
        VOCAB,
        H,
        None,
        false,
    );
    for i in 0..LAYERS {
        let hfp = |n: &str| format!("model.layers.{i}.{n}");
        let gp = |n: &str| format!("blk.{i}.{n}");
        add(
            hfp("input_layernorm.weight"),
            gp("attn_norm.weight"),
            1,
            H,
            None,
            true,
        );
        add(
            hfp("post_attention_layernorm.weight"),
            gp("ffn_norm.weight"),
            1,
            H,
            None,
            true,
        );
        add(
            hfp("self_attn.q_proj.weight"),
            gp("attn_q.weight"),
            HEADS * HD,
            H,
            Some(HEADS),
            false,
        );
        add(
            hfp("self_attn.k_proj.weight"),
            gp("attn_k.weight"),
            KV * HD,
            H,
            Some(KV),
            false,
        );
        add(
            hfp("self_attn.v_proj.weight"),
            gp("attn_v.weight"),
            KV * HD,
            H,
            None,
            false,
        );
        add(
            hfp("self_attn.o_proj.weight"),
            gp("attn_output.weight"),
            H,
            HEADS * HD,
            None,
            false,
        );
        add(
            hfp("mlp.gate_proj.weight"),
            gp("ffn_gate.weight"),
            FF,
            H,
            None,
            false,
        );
        add(
            hfp("mlp.up_proj.weight"),
            gp("ffn_up.weight"),
            FF,
            H,
            None,
            false,
        );
        add(
            hfp("mlp.down_proj.weight"),
            gp("ffn_down.weight"),
            H,
            FF,
            None,
            false,
        );
    }
    let gguf_path = dir.join("tiny.gguf");
    gguf.write(&gguf_path).unwrap();
    let st_dir = dir.join("hf");
    std::fs::create_dir_all(&st_dir).unwrap();
    write_safetensors(&st_dir.join("model.safetensors"), &hf);
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    std::fs::write(st_dir.join("config.json"), config.to_string()).unwrap();

    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let positions: Vec<usize> = (0..tokens.len()).collect();
    let seq_of = vec![0; tokens.len()];
    let table: Vec<u32> = (0..8).collect();
    let tables = [table.as_slice()];
    let all: Vec<usize> = (0..tokens.len()).collect();
    let batch = Batch {
        tokens: &tokens,
        positions: &positions,
        seq_of: &seq_of,
        block_tables: &tables,
        logits_for: &all,
        state_slots: &[],
        chunked_until: &[],
        drafts: &[],
    };
    let run = |path: &Path| {
        let m = load_model(
            path,
            &LoadOptions {
                precision: Precision::Exact,
                kv_dtype: None,
                mtp: false,
            },
        )
        .unwrap()
        .model;
        let mut kv = KvCache::new(&m.kv_specs(), 4, 8).unwrap();
        m.forward(&batch, &mut kv).unwrap()
    };
    let a = run(&gguf_path);
    let b = run(&st_dir);
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "max |gguf - safetensors| = {max}");
    assert!(
        a.iter().map(|x| x.abs()).sum::<f32>() > 1.0,
        "logits are not trivial"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
