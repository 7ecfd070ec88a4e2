//! Joining a split GGUF (`NAME-00001-of-0000N.gguf`, as llama.cpp's `gguf-split` writes it)
//! into one file, as `gguf-split --merge` does.
//!
//! The parts are not byte ranges of one file: each is a GGUF of its own, holding some of the
//! tensors, and the first also the model's metadata. Every part carries `split.no`,
//! `split.count` and (the first) `split.tensors.count`. The joined file has the first part's
//! metadata without the `split.*` keys and every part's tensors, in part order, laid out
//! afresh at the file's alignment. Tensor bytes stream from the parts' memory maps to the
//! output, so joining needs no memory for the weights. The file is written beside the target
//! and renamed into place once complete, so an interrupted join leaves nothing half-written
//! under the target's name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use supernode_models::gguf::{read_gguf, GgufWriter};
use supernode_models::Metadata;

fn split_key(meta: &Metadata, key: &str, part: &Path) -> Result<i64> {
    meta.get(key).and_then(|v| v.as_i64()).with_context(|| {
        format!(
            "{} is not a part of a split GGUF (no integer `{key}`)",
            part.display()
        )
    })
}

/// Joins `parts` (in order) into `target`.
pub(crate) fn join_split_gguf(parts: &[PathBuf], target: &Path) -> Result<()> {
    let files = parts
        .iter()
        .map(|p| read_gguf(p).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let first = &files[0];
    let count = split_key(&first.metadata, "split.count", &parts[0])?;
    if count != parts.len() as i64 {
        bail!(
            "{} says the model has {count} parts, but {} were downloaded",
            parts[0].display(),
            parts.len()
        );
    }
    for (i, (f, p)) in files.iter().zip(parts).enumerate() {
        let no = split_key(&f.metadata, "split.no", p)?;
        if no != i as i64 {
            bail!("{} is split part {no}, expected part {i}", p.display());
        }
    }
    let tensors: Vec<_> = files.iter().flat_map(|f| &f.tensors).collect();
    if let Some(Ok(n)) = first
        .metadata
        .get("split.tensors.count")
        .and_then(|v| v.as_i64())
        .map(usize::try_from)
    {
        if n != tensors.len() {
            bail!(
                "the split GGUF {} announces {n} tensors but its parts hold {}",
                parts[0].display(),
                tensors.len()
            );
        }
    }
    let mut writer = GgufWriter::new();
    for (k, v) in &first.metadata.entries {
        if !k.starts_with("split.") {
            writer.meta(k, v.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    for t in &tensors {
        if !seen.insert(t.name.as_str()) {
            bail!("tensor `{}` is in two parts of the split GGUF", t.name);
        }
        let shape = t.shape.iter().map(|&d| d as u64).collect();
        writer.raw_tensor(&t.name, t.dtype.ggml_id(), shape, Vec::new());
    }
    let sizes: Vec<usize> = tensors.iter().map(|t| t.bytes().len()).collect();
    let (header, offsets) = writer.header(&sizes)?;

    let tmp = target.with_extension("gguf.partial");
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let bar = ProgressBar::new(sizes.iter().sum::<usize>() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("joining {} parts", parts.len()));
    let write_err = || format!("writing {}", tmp.display());
    out.write_all(&header).with_context(write_err)?;
    let mut pos = 0usize;
    for (t, off) in tensors.iter().zip(offsets) {
        let pad = off - pos;
        out.write_all(&vec![0u8; pad]).with_context(write_err)?;
        out.write_all(t.bytes()).with_context(write_err)?;
        pos = off + t.bytes().len();
        bar.inc(t.bytes().len() as u64);
    }
    bar.finish_and_clear();
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(write_err)?;
    file.sync_all().with_context(write_err)?;
    drop(file);
    // The joined file must read back as a whole GGUF before it takes the target's name.
    if let Err(e) = read_gguf(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        bail!("the joined GGUF does not read back: {e}");
    }
    std::fs::rename(&tmp, target)
        .with_context(|| format!("cannot move the joined model to {}", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use supernode_kernels::DType;
    use supernode_models::MetaValue;

    fn part(dir: &Path, no: u16, count: u16, tensors: &[(&str, f32)], total: i32) -> PathBuf {
        let mut w = GgufWriter::new();
        if no == 0 {
            w.meta("general.architecture", MetaValue::String("llama".into()));
            w.meta("split.tensors.count", MetaValue::I32(total));
        }
        w.meta("split.no", MetaValue::U16(no));
        w.meta("split.count", MetaValue::U16(count));
        for (name, v) in tensors {
            let data: Vec<u8> = [*v; 3].iter().flat_map(|x| x.to_le_bytes()).collect();
            w.tensor(name, DType::F32, &[3], data);
        }
        let p = dir.join(format!("m-{:05}-of-{count:05}.gguf", no + 1));
        w.write(&p).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("supernode-join-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn parts_join_into_one_file_with_all_tensors_and_no_split_keys() {
        let d = tmpdir("ok");
        let parts = vec![
            part(&d, 0, 2, &[("a", 1.0), ("b", 2.0)], 3),
            part(&d, 1, 2, &[("c", 3.0)], 3),
        ];
        let target = d.join("m.gguf");
        join_split_gguf(&parts, &target).unwrap();
        let g = read_gguf(&target).unwrap();
        let names: Vec<_> = g.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(
            g.tensor("c").unwrap().bytes(),
            &[3.0f32.to_le_bytes(); 3].concat()[..]
        );
        assert!(g.metadata.get("split.count").is_none());
        assert_eq!(g.architecture().unwrap(), "llama");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_wrong_part_count_or_order_is_refused() {
        let d = tmpdir("bad");
        let p0 = part(&d, 0, 2, &[("a", 1.0)], 2);
        let p1 = part(&d, 1, 2, &[("b", 2.0)], 2);
        let target = d.join("m.gguf");
        let err = join_split_gguf(std::slice::from_ref(&p0), &target)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 parts"), "{err}");
        let err = join_split_gguf(&[p1, p0], &target).unwrap_err().to_string();
        assert!(err.contains("is split part"), "{err}");
        assert!(!target.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
