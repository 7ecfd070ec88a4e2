//! `dequantize_row` on real tensors of the two demo models equals the values decoded by the
//! `gguf` Python package (`tests/fixtures/real_blocks.json`, from
//! `tools/make_block_reference.py`): Q8_0, Q4_1, Q5_0, Q4_K, Q6_K and F32 blocks as llama.cpp's
//! quantiser wrote them.

use std::path::PathBuf;

use supernode_kernels::quant::dequantize_row;
use supernode_models::gguf::read_gguf;

fn cache() -> PathBuf {
    std::env::var_os("SUPERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/supernode")
        })
}

#[test]
fn real_blocks_match_gguf_py() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/real_blocks.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let mut types = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let model = cache().join("models").join(case["model"].as_str().unwrap());
        assert!(
            model.is_file(),
            "{} missing: run `supernode fetch` for it first",
            model.display()
        );
        let file = read_gguf(&model).unwrap();
        let name = case["tensor"].as_str().unwrap();
        let t = file.tensor(name).unwrap();
        assert_eq!(t.dtype.name(), case["type"].as_str().unwrap());
        let want: Vec<f64> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let mut row = vec![0f32; t.cols()];
        let row_bytes = t.dtype.row_bytes(t.cols()).unwrap();
        dequantize_row(t.dtype, &t.bytes()[..row_bytes], &mut row);
        for (i, (&got, &w)) in row.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(got) - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{name} ({}) element {i}: {got} vs gguf-py {w}",
                t.dtype.name()
            );
        }
        types.push(t.dtype.name());
    }
    for ty in ["Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K", "F32"] {
        assert!(types.contains(&ty), "{ty} not covered");
    }
}
