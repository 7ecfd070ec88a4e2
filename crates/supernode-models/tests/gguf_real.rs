//! `read_gguf` on the two real models (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M) that the
//! project's fetch step puts in `~/.cache/supernode/models/`. The expected counts, shapes and
//! types were read from the files with an independent Python parser of the GGUF layout.
//! A test whose file is absent says so and passes (the files are present here and in CI).

use std::path::PathBuf;
use std::time::Instant;

use supernode_kernels::DType;
use supernode_models::gguf::{read_gguf, GgufFile};
use supernode_models::Storage;

/// The cached model; a missing file fails the test with what to run.
fn model(name: &str) -> PathBuf {
    let cache = std::env::var_os("SUPERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/supernode")
        });
    let path = cache.join("models").join(format!("{name}.gguf"));
    assert!(
        path.is_file(),
        "{} is missing: run `supernode fetch {name}` first",
        path.display()
    );
    path
}

fn check_tensor(f: &GgufFile, name: &str, dtype: DType, shape: &[usize]) {
    let t = f.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    assert_eq!((t.dtype, t.shape.as_slice()), (dtype, shape), "{name}");
    assert_eq!(
        t.bytes().len(),
        dtype.row_bytes(shape[0]).unwrap() * t.rows(),
        "{name}"
    );
}

/// Every tensor lies inside the file, after the header, aligned, and no two overlap.
fn check_layout(f: &GgufFile) {
    let file_len = std::fs::metadata(&f.path).unwrap().len() as usize;
    let mut ranges: Vec<_> = f
        .tensors
        .iter()
        .map(|t| match &t.storage {
            Storage::Mapped(map, r) => {
                assert_eq!(map.len(), file_len);
                r.clone()
            }
            Storage::Owned(_) => panic!("{} is not mapped", t.name),
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    for r in &ranges {
        assert!(r.start >= f.data_offset && r.end <= file_len && r.start < r.end);
        assert_eq!((r.start - f.data_offset) % f.alignment, 0);
    }
    for w in ranges.windows(2) {
        assert!(w[0].end <= w[1].start, "overlap {:?} {:?}", w[0], w[1]);
    }
}

#[test]
fn smollm2_135m() {
    let path = model("smollm2-135m");
    let f = read_gguf(&path).unwrap();
    assert_eq!((f.version, f.architecture().unwrap()), (3, "llama"));
    assert_eq!((f.tensors.len(), f.metadata.entries.len()), (272, 33));
    assert_eq!((f.alignment, f.data_offset), (32, 1_785_664));
    let m = &f.metadata;
    assert_eq!(m.get_usize("llama.block_count").unwrap(), Some(30));
    assert_eq!(m.get_usize("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    assert_eq!(
        m.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(false)
    );
    assert_eq!(
        m.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        49152
    );
    assert_eq!(
        m.get_str_array("tokenizer.ggml.merges")
            .unwrap()
            .unwrap()
            .len(),
        48900
    );
    check_tensor(&f, "token_embd.weight", DType::Q8_0, &[576, 49152]);
    check_tensor(&f, "output_norm.weight", DType::F32, &[576]);
    check_tensor(&f, "blk.0.attn_q.weight", DType::Q4_1, &[576, 576]);
    check_tensor(&f, "blk.0.attn_k.weight", DType::Q4_1, &[576, 192]);
    check_tensor(&f, "blk.29.ffn_down.weight", DType::Q4_1, &[1536, 576]);
    assert!(
        f.tensor("output.weight").is_none(),
        "the output head is tied"
    );
    check_layout(&f);
}

#[test]
fn gemma3_270m() {
    let path = model("gemma3-270m");
    let start = Instant::now();
    let f = read_gguf(&path).unwrap();
    let took = start.elapsed();
    eprintln!("read_gguf({}) took {took:?}", path.display());
    assert_eq!((f.version, f.architecture().unwrap()), (3, "gemma3"));
    assert_eq!((f.tensors.len(), f.metadata.entries.len()), (236, 33));
    let m = &f.metadata;
    assert_eq!(m.get_usize("gemma3.block_count").unwrap(), Some(18));
    assert_eq!(
        m.get_usize("gemma3.attention.sliding_window").unwrap(),
        Some(512)
    );
    assert_eq!(
        m.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(true)
    );
    assert_eq!(
        m.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        262_144
    );
    assert_eq!(
        m.get_f32_array("tokenizer.ggml.scores")
            .unwrap()
            .unwrap()
            .len(),
        262_144
    );
    check_tensor(&f, "token_embd.weight", DType::Q8_0, &[640, 262_144]);
    check_tensor(&f, "blk.0.attn_q.weight", DType::Q5_0, &[640, 1024]);
    check_tensor(&f, "blk.0.attn_output.weight", DType::Q4K, &[1024, 640]);
    check_tensor(&f, "blk.0.ffn_down.weight", DType::Q6K, &[2048, 640]);
    check_tensor(&f, "blk.0.attn_k_norm.weight", DType::F32, &[256]);
    check_tensor(&f, "blk.17.post_ffw_norm.weight", DType::F32, &[640]);
    check_layout(&f);
    // The header is parsed from the map, tensor bytes are never touched: milliseconds, not
    // the seconds that reading 250 MB would take. The bound is loose for slow CI machines.
    assert!(took.as_millis() < 2_000, "read_gguf took {took:?}");
}
