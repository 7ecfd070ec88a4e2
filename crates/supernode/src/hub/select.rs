//! Which files of a Hub repository make the model: pure functions of the repository's file
//! list, so every rule is unit-tested without a network.
//!
//! A repository with `.gguf` files is a GGUF repository. Its candidates are the single files
//! and the split sets (`NAME-00001-of-0000N.gguf`, all N parts); `mmproj` files (vision
//! projectors) are never candidates. A quant tag picks the candidate one of whose name
//! segments (the path cut at `/`, `-` and `.`) equals the tag, case-insensitively, so `Q4_K`
//! does not pick `Q4_K_M`; failing that, the one whose name contains the tag. Without a tag,
//! as llama.cpp's `-hf` does: `Q4_K_M` if there is one, else the only candidate. Otherwise a
//! repository with `config.json` and safetensors weights is a safetensors directory: the
//! config, the tokenizer files, and the weights (the shards the index lists, or
//! `model.safetensors`, or every top-level `.safetensors` file).

use anyhow::{bail, Result};

/// The quant picked when none is named, if the repository has it.
pub(crate) const DEFAULT_QUANT: &str = "Q4_K_M";

/// The tokenizer files a safetensors directory is loaded with, when the repository has them.
const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];
/// The index of a sharded safetensors checkpoint.
pub(crate) const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// What to download.
#[derive(Debug, PartialEq)]
pub(crate) enum Plan {
    /// One GGUF model: a single file (`parts` has one name) or a split set, parts in order.
    Gguf { name: String, parts: Vec<String> },
    /// A safetensors directory: these files (the index, if any, is resolved by the caller).
    Safetensors { files: Vec<String> },
}

/// One GGUF model of a repository.
#[derive(Debug, Clone)]
struct Candidate {
    /// The file name, or for a split set the name without the `-0000i-of-0000N` part.
    name: String,
    /// The files, in part order.
    parts: Vec<String>,
    /// The number of parts the names announce (1 for a single file).
    expected: usize,
}

impl Candidate {
    /// The name's segments, lower-cased, the `.gguf` extension dropped.
    fn segments(&self) -> Vec<String> {
        let lower = self.name.to_lowercase();
        let stem = lower.strip_suffix(".gguf").unwrap_or(&lower);
        stem.split(['/', '-', '.'])
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The quant label for listings: the last segment that looks like a quant type.
    fn label(&self) -> String {
        let stem = self.name.strip_suffix(".gguf").unwrap_or(&self.name);
        stem.rsplit(['/', '-', '.'])
            .find(|s| looks_like_quant(s))
            .map_or_else(|| self.name.clone(), str::to_owned)
    }
}

fn looks_like_quant(s: &str) -> bool {
    let u = s.to_uppercase();
    let digit_after = |p: &str| {
        u.strip_prefix(p)
            .and_then(|r| r.chars().next())
            .is_some_and(|c| c.is_ascii_digit())
    };
    digit_after("Q")
        || digit_after("IQ")
        || digit_after("TQ")
        || digit_after("F")
        || digit_after("BF")
}

/// `NAME-00001-of-00003.gguf` → (`NAME.gguf`, 1, 3).
fn split_part(file: &str) -> Option<(String, usize, usize)> {
    let stem = file.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (base, index) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(count) {
        return None;
    }
    let (i, n) = (index.parse().ok()?, count.parse().ok()?);
    (i >= 1 && i <= n).then(|| (format!("{base}.gguf"), i, n))
}

/// The GGUF models among `files`, sorted by name.
fn candidates(files: &[String]) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut splits: Vec<(String, usize, usize, String)> = Vec::new();
    for f in files {
        let lower = f.to_lowercase();
        let base = lower.rsplit('/').next().unwrap_or(&lower);
        if !lower.ends_with(".gguf") || base.contains("mmproj") {
            continue;
        }
        match split_part(f) {
            Some((name, i, n)) => splits.push((name, i, n, f.clone())),
            None => out.push(Candidate {
                name: f.clone(),
                parts: vec![f.clone()],
                expected: 1,
            }),
        }
    }
    splits.sort();
    for (name, _, n, file) in splits {
        match out.iter_mut().find(|c| c.name == name && c.expected == n) {
            Some(c) => c.parts.push(file),
            None => out.push(Candidate {
                name,
                parts: vec![file],
                expected: n,
            }),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn list(cands: &[&Candidate]) -> String {
    let mut labels: Vec<String> = cands.iter().map(|c| c.label()).collect();
    labels.dedup();
    labels.join(", ")
}

/// The files to download for `repo` (only used in messages) given its file list and the
/// quant tag, or a one-line error saying what the repository holds.
pub(crate) fn plan(repo: &str, files: &[String], quant: Option<&str>) -> Result<Plan> {
    let cands = candidates(files);
    if cands.is_empty() {
        return safetensors_plan(repo, files, quant);
    }
    let all: Vec<&Candidate> = cands.iter().collect();
    let chosen = match quant {
        Some(tag) => {
            let tag_l = tag.to_lowercase();
            let mut hits: Vec<&Candidate> = all
                .iter()
                .copied()
                .filter(|c| c.segments().contains(&tag_l))
                .collect();
            if hits.is_empty() {
                hits = all
                    .iter()
                    .copied()
                    .filter(|c| c.name.to_lowercase().contains(&tag_l))
                    .collect();
            }
            match hits.as_slice() {
                [one] => *one,
                [] => bail!(
                    "{repo} has no GGUF file matching the quant `{tag}`; available: {} \
                     (use {repo}:QUANT)",
                    list(&all)
                ),
                many => bail!(
                    "the quant `{tag}` matches several GGUF files of {repo}: {}; give a longer tag",
                    many.iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        None => {
            let default = DEFAULT_QUANT.to_lowercase();
            let preferred: Vec<&Candidate> = all
                .iter()
                .copied()
                .filter(|c| c.segments().contains(&default))
                .collect();
            match (preferred.as_slice(), all.as_slice()) {
                ([one], _) | ([], [one]) => *one,
                _ => bail!(
                    "{repo} has {} GGUF models and none is {DEFAULT_QUANT}: choose one with \
                     {repo}:QUANT (available: {})",
                    all.len(),
                    list(&all)
                ),
            }
        }
    };
    if chosen.parts.len() != chosen.expected {
        bail!(
            "{repo} has {} of the {} parts of the split GGUF {}: the repository is incomplete",
            chosen.parts.len(),
            chosen.expected,
            chosen.name
        );
    }
    Ok(Plan::Gguf {
        name: chosen.name.clone(),
        parts: chosen.parts.clone(),
    })
}

fn safetensors_plan(repo: &str, files: &[String], quant: Option<&str>) -> Result<Plan> {
    let has = |name: &str| files.iter().any(|f| f == name);
    let top_level: Vec<String> = files
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .cloned()
        .collect();
    if !has("config.json") || (top_level.is_empty() && !has(SAFETENSORS_INDEX)) {
        bail!(
            "{repo} has neither .gguf files nor config.json with .safetensors weights: \
             supernode cannot load it"
        );
    }
    if let Some(tag) = quant {
        bail!(
            "{repo} is a safetensors repository, with no GGUF files to choose `{tag}` from: \
             drop `:{tag}`"
        );
    }
    let mut want = vec!["config.json".to_owned()];
    want.extend(
        TOKENIZER_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| (*f).to_owned()),
    );
    if has(SAFETENSORS_INDEX) {
        want.push(SAFETENSORS_INDEX.to_owned());
    } else if has("model.safetensors") {
        want.push("model.safetensors".to_owned());
    } else {
        want.extend(top_level);
    }
    Ok(Plan::Safetensors { files: want })
}

/// The shard files a safetensors index lists, each once, sorted.
pub(crate) fn index_shards(index_json: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(index_json)
        .map_err(|e| anyhow::anyhow!("{SAFETENSORS_INDEX} is not valid JSON: {e}"))?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{SAFETENSORS_INDEX} has no `weight_map` object");
    };
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let Some(f) = file.as_str() else {
            bail!("{SAFETENSORS_INDEX}: a `weight_map` value is not a file name");
        };
        if f.contains("..") || f.starts_with('/') {
            bail!("{SAFETENSORS_INDEX} names a shard outside the repository: {f}");
        }
        shards.push(f.to_owned());
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn gguf(plan: Plan) -> Vec<String> {
        match plan {
            Plan::Gguf { parts, .. } => parts,
            other => panic!("expected a GGUF plan, got {other:?}"),
        }
    }

    const REPO: &[&str] = &[
        "README.md",
        "model-Q4_K_M.gguf",
        "model-Q4_K_S.gguf",
        "model-Q8_0.gguf",
        "mmproj-model-f16.gguf",
        "big/model-F16-00002-of-00002.gguf",
        "big/model-F16-00001-of-00002.gguf",
    ];

    #[test]
    fn a_tag_picks_its_segment_case_insensitively() {
        let f = files(REPO);
        assert_eq!(
            gguf(plan("o/r", &f, Some("q8_0")).unwrap()),
            ["model-Q8_0.gguf"]
        );
        assert_eq!(
            gguf(plan("o/r", &f, Some("Q4_K_S")).unwrap()),
            ["model-Q4_K_S.gguf"]
        );
    }

    #[test]
    fn no_tag_prefers_q4_k_m() {
        assert_eq!(
            gguf(plan("o/r", &files(REPO), None).unwrap()),
            ["model-Q4_K_M.gguf"]
        );
    }

    #[test]
    fn a_split_set_is_one_candidate_in_part_order() {
        assert_eq!(
            gguf(plan("o/r", &files(REPO), Some("F16")).unwrap()),
            [
                "big/model-F16-00001-of-00002.gguf",
                "big/model-F16-00002-of-00002.gguf"
            ]
        );
    }

    #[test]
    fn an_unknown_tag_lists_the_quants() {
        let err = plan("o/r", &files(REPO), Some("Q2_K"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Q4_K_M") && err.contains("Q8_0") && err.contains("F16"),
            "{err}"
        );
        assert!(!err.contains("mmproj"), "{err}");
    }

    #[test]
    fn an_ambiguous_tag_is_refused() {
        let err = plan("o/r", &files(REPO), Some("Q4_K"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("several"), "{err}");
    }

    #[test]
    fn a_single_gguf_is_the_default_and_several_need_a_tag() {
        let one = files(&["x.Q4_1.gguf", "README.md"]);
        assert_eq!(gguf(plan("o/r", &one, None).unwrap()), ["x.Q4_1.gguf"]);
        let two = files(&["x-Q4_0.gguf", "x-Q8_0.gguf"]);
        let err = plan("o/r", &two, None).unwrap_err().to_string();
        assert!(
            err.contains("Q4_0, Q8_0") && err.contains("o/r:QUANT"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_split_part_is_an_error() {
        let f = files(&["m-00001-of-00003.gguf", "m-00003-of-00003.gguf"]);
        let err = plan("o/r", &f, None).unwrap_err().to_string();
        assert!(err.contains("2 of the 3 parts"), "{err}");
    }

    #[test]
    fn safetensors_repos_take_config_tokenizer_and_weights() {
        let f = files(&[
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "README.md",
        ]);
        assert_eq!(
            plan("o/r", &f, None).unwrap(),
            Plan::Safetensors {
                files: files(&["config.json", "tokenizer.json", "model.safetensors"])
            }
        );
        let sharded = files(&[
            "config.json",
            SAFETENSORS_INDEX,
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]);
        assert_eq!(
            plan("o/r", &sharded, None).unwrap(),
            Plan::Safetensors {
                files: files(&["config.json", SAFETENSORS_INDEX])
            }
        );
        let err = plan("o/r", &f, Some("Q4_K_M")).unwrap_err().to_string();
        assert!(err.contains("drop `:Q4_K_M`"), "{err}");
    }

    #[test]
    fn a_repo_with_nothing_loadable_says_so() {
        let err = plan("o/r", &files(&["README.md", "model.onnx"]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither .gguf"), "{err}");
    }

    #[test]
    fn index_shards_are_listed_once() {
        let idx =
            r#"{"weight_map":{"a":"s-2.safetensors","b":"s-1.safetensors","c":"s-2.safetensors"}}"#;
        assert_eq!(
            index_shards(idx).unwrap(),
            ["s-1.safetensors", "s-2.safetensors"]
        );
        assert!(index_shards(r#"{"weight_map":{"a":"../x"}}"#).is_err());
        assert!(index_shards("not json").is_err());
    }
}
