//! Models from the Hub: `--model org/repo[@REVISION][:QUANT]` (and `supernode fetch ...`).
//!
//! `@REVISION` names a branch, tag or commit (default `main`), as `--revision` does for vLLM
//! and `revision=` for transformers.
//!
//! The repository's file list decides what to download ([`select`]): one GGUF chosen by its
//! quant tag (a split set downloaded whole and joined, [`join`]), or a safetensors directory
//! with its tokenizer. Downloads go through hf-hub's synchronous client into the Hub's own
//! cache layout (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`), so files another tool
//! downloaded are reused and vice versa; a joined split GGUF is written once into
//! supernode's cache (`<cache>/hub/`).
//!
//! - `HF_ENDPOINT` names another Hub (a mirror, or the tests' local mock); `HF_TOKEN` (else
//!   the token file in `$HF_HOME`) authenticates, for gated and private repositories.
//! - Offline: with `HF_HUB_OFFLINE=1`, or when the Hub cannot be reached, the file list is
//!   the cached snapshot's (`refs/main` → `snapshots/<commit>/`), and files come from the
//!   cache only. A file already in the cache is never downloaded again.
//! - An interrupted download resumes: hf-hub appends to `blobs/<etag>.part` with a `Range`
//!   request, up to [`RETRIES`] times within one run; a run that still fails keeps the part
//!   file and the next run continues it. (A part file that is already complete, left by a
//!   process killed between the last byte and the rename, gets HTTP 416 from the Hub: the
//!   message says to delete it.) A file whose ETag is a SHA-256 (the Hub's ETag of a
//!   large file) is checked against it after a download; a mismatch deletes it.
//! - Nothing waits forever: the repository's file list is one request bounded by
//!   `HF_HUB_ETAG_TIMEOUT` seconds, and a download gives up after `HF_HUB_DOWNLOAD_TIMEOUT`
//!   seconds without a byte (both default to 10, as in `huggingface_hub`), keeping its part
//!   file for the next run.

mod join;
mod select;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::{Progress, RepoInfo};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use crate::fetch::cache_dir;
use crate::model_args::status_line;
use select::Plan;

/// Resumed attempts of one interrupted file download within a run.
const RETRIES: usize = 3;

/// `org/repo`, the optional revision of `org/repo@REV` and the optional quant tag of
/// `org/repo:QUANT`.
#[derive(Debug, PartialEq)]
pub(crate) struct HubSpec {
    pub(crate) repo: String,
    pub(crate) revision: Option<String>,
    pub(crate) quant: Option<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A branch, tag or commit: names separated by `/` (`refs/pr/1`).
fn valid_revision(s: &str) -> bool {
    s.split('/').all(valid_name)
}

impl HubSpec {
    /// `org/repo[@REV][:QUANT]`, or `None` for anything else (a path, a short name).
    pub(crate) fn parse(spec: &str) -> Option<HubSpec> {
        let (head, quant) = match spec.split_once(':') {
            Some((r, q)) => (r, Some(q)),
            None => (spec, None),
        };
        let (repo, revision) = match head.split_once('@') {
            Some((r, v)) => (r, Some(v)),
            None => (head, None),
        };
        let (org, name) = repo.split_once('/')?;
        if !valid_name(org)
            || !valid_name(name)
            || quant.is_some_and(|q| !valid_name(q))
            || revision.is_some_and(|v| !valid_revision(v))
        {
            return None;
        }
        Some(HubSpec {
            repo: repo.to_owned(),
            revision: revision.map(str::to_owned),
            quant: quant.map(str::to_owned),
        })
    }

    /// The repository at its revision, as hf-hub names it.
    fn handle(&self) -> Repo {
        let revision = self.revision.clone().unwrap_or_else(|| "main".to_owned());
        Repo::with_revision(self.repo.clone(), RepoType::Model, revision)
    }

    /// `org/repo`, or `org/repo@REV`: the name messages use.
    fn display(&self) -> String {
        match &self.revision {
            Some(v) => format!("{}@{v}", self.repo),
            None => self.repo.clone(),
        }
    }
}

/// Seconds from the environment variable `var` (a positive number), else `default`.
fn seconds_from_env(var: &str, default: f64) -> Duration {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs_f64(default), Duration::from_secs_f64)
}

/// Ends the process when the download it watches has had no byte for
/// `HF_HUB_DOWNLOAD_TIMEOUT` seconds, until it is dropped. hf-hub's client has no read
/// timeout, and models are resolved before anything else runs, so exiting with one line (the
/// part file kept for the next run) is the clean way out of a stalled connection.
struct Watchdog {
    /// When the last byte came.
    last: Arc<Mutex<Instant>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(what: &str) -> Watchdog {
        let limit = seconds_from_env("HF_HUB_DOWNLOAD_TIMEOUT", 10.0);
        let last = Arc::new(Mutex::new(Instant::now()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, st, what) = (last.clone(), stop.clone(), what.to_owned());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100).min(limit / 4));
                let idle = l.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                if idle >= limit && !st.load(Ordering::Relaxed) {
                    eprintln!(
                        "error: no data from {} for {:.0} s while downloading {what} \
                         (HF_HUB_DOWNLOAD_TIMEOUT): check the network and run the same \
                         command again; the download resumes where it stopped",
                        endpoint_name(),
                        limit.as_secs_f64()
                    );
                    std::process::exit(1);
                }
            }
        });
        Watchdog {
            last,
            stop,
            thread: Some(thread),
        }
    }

    /// Data came: the clock starts again.
    fn feed(last: &Mutex<Instant>) {
        *last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// hf-hub's progress callbacks: keep the watchdog fed, and show how far a download is.
struct Activity {
    what: String,
    last: Arc<Mutex<Instant>>,
    total: usize,
    done: usize,
    shown: Instant,
}

impl Progress for Activity {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size;
        Watchdog::feed(&self.last);
    }

    fn update(&mut self, size: usize) {
        self.done += size;
        Watchdog::feed(&self.last);
        if self.shown.elapsed() >= Duration::from_secs(1) && self.total > 0 {
            self.shown = Instant::now();
            let mib = |b: usize| b as f64 / (1 << 20) as f64;
            status_line(
                false,
                &format!(
                    "downloading {}: {:.0} of {:.0} MiB",
                    self.what,
                    mib(self.done.min(self.total)),
                    mib(self.total)
                ),
            );
        }
    }

    fn finish(&mut self) {
        Watchdog::feed(&self.last);
    }
}

fn offline_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The Hub named in messages: `HF_ENDPOINT` if set.
fn endpoint_name() -> String {
    match std::env::var("HF_ENDPOINT") {
        Ok(e) if !e.is_empty() => format!("the Hub at {e}"),
        _ => "the Hub".to_owned(),
    }
}

/// What a failed request means, in one line that says what to do.
fn explain(e: ApiError, repo: &str, what: &str) -> anyhow::Error {
    match e {
        ApiError::TooManyRetries(inner) => explain(*inner, repo, what),
        ApiError::RequestError(err) => match *err {
            ureq::Error::Status(404, _) => anyhow!(
                "{what} not found on {} (no local file or directory of that name either): \
                 check the name `{repo}`",
                endpoint_name()
            ),
            ureq::Error::Status(401 | 403, _) => anyhow!(
                "{} refused access to {repo} (gated or private): accept its licence on the \
                 Hub and set HF_TOKEN to a token with read access",
                endpoint_name()
            ),
            ureq::Error::Status(416, _) => anyhow!(
                "{} refused to resume {what} (HTTP 416): delete its `.part` file under {} and \
                 run again",
                endpoint_name(),
                Cache::from_env().path().display()
            ),
            ureq::Error::Status(code, _) => {
                anyhow!("{} answered HTTP {code} for {what}", endpoint_name())
            }
            ureq::Error::Transport(t) => anyhow!(
                "could not reach {} ({t}); offline use (HF_HUB_OFFLINE=1) needs {repo}'s \
                 files in the cache",
                endpoint_name()
            ),
        },
        ApiError::IoError(io) => anyhow!(
            "the download of {what} was interrupted ({io}); run the same command again to \
             resume it"
        ),
        other => anyhow!("cannot download {what} from {}: {other}", endpoint_name()),
    }
}

/// Is the failure one of reaching the Hub at all (so the cache may stand in)?
fn unreachable(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(err) => matches!(**err, ureq::Error::Transport(_)),
        ApiError::TooManyRetries(inner) => unreachable(inner),
        _ => false,
    }
}

/// The commit the revision of `repo` points to in the cache (`refs/<revision>`, or the
/// revision itself when it is a commit with a snapshot), and its snapshot directory.
fn cached_snapshot(cache: &Cache, repo: &Repo) -> Option<(String, PathBuf)> {
    let dir = cache.path().join(repo.folder_name());
    let commit = match std::fs::read_to_string(dir.join("refs").join(repo.revision())) {
        Ok(c) => c.trim().to_owned(),
        Err(_) => repo.revision().to_owned(),
    };
    let snap = dir.join("snapshots").join(&commit);
    snap.is_dir().then_some((commit, snap))
}

/// Every file under `dir`, as `/`-separated paths relative to it.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        let path = e.path();
        if path.is_dir() {
            list_files(&path, &format!("{rel}/"), out);
        } else if path.is_file() {
            out.push(rel);
        }
    }
}

/// Where one model's files come from: the Hub (through the cache) or the cache alone.
struct Source {
    /// `org/repo[@REV]`, for messages.
    name: String,
    repo: Repo,
    cache: Cache,
    api: Option<ApiRepo>,
}

impl Source {
    /// The local path of `file`, downloading it if it is not cached.
    fn get(&self, file: &str) -> Result<PathBuf> {
        let what = format!("{}/{file}", self.name);
        if let Some(p) = self.cache.repo(self.repo.clone()).get(file) {
            return Ok(p);
        }
        let Some(api) = &self.api else {
            bail!(
                "{what} is not in the Hub cache at {} and the Hub is not used \
                 (HF_HUB_OFFLINE or unreachable): download it once online",
                self.cache.path().display()
            );
        };
        status_line(false, &format!("downloading {what}"));
        // hf-hub resumes from the `.part` file on each call; its own retry loop is not used
        // because it reports failure even when its last attempt succeeds.
        let mut attempt = 0;
        let path = loop {
            let watchdog = Watchdog::start(&what);
            let activity = Activity {
                what: what.clone(),
                last: watchdog.last.clone(),
                total: 0,
                done: 0,
                shown: Instant::now(),
            };
            let result = api.download_with_progress(file, activity);
            drop(watchdog);
            match result {
                Ok(p) => break p,
                Err(ApiError::IoError(e)) if attempt < RETRIES => {
                    attempt += 1;
                    status_line(
                        true,
                        &format!("the download of {what} was interrupted ({e}); resuming"),
                    );
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                Err(e) => return Err(explain(e, &self.name, &what)),
            }
        };
        check_digest(&path, &what)?;
        Ok(path)
    }
}

/// After a download: a blob whose name (its ETag) is a SHA-256 must hash to it.
fn check_digest(pointer: &Path, what: &str) -> Result<()> {
    let blob = std::fs::canonicalize(pointer)
        .with_context(|| format!("cannot resolve {}", pointer.display()))?;
    let Some(etag) = blob.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let mut file =
        std::fs::File::open(&blob).with_context(|| format!("cannot open {}", blob.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h).with_context(|| format!("reading {}", blob.display()))?;
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != etag.to_ascii_lowercase() {
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(pointer);
        bail!(
            "the downloaded {what} has SHA-256 {digest}, not the {etag} the Hub announced \
             (corrupt download, deleted): run the command again"
        );
    }
    Ok(())
}

/// The repository's file list and commit, in one request bounded by `HF_HUB_ETAG_TIMEOUT`.
fn repo_info(api: &ApiRepo) -> Result<RepoInfo, ApiError> {
    let timeout = seconds_from_env("HF_HUB_ETAG_TIMEOUT", 10.0);
    let reply = api
        .info_request()
        .timeout(timeout)
        .call()
        .map_err(Box::new)?;
    Ok(reply.into_json()?)
}

/// The local path of the model `spec` names: a GGUF file, or a safetensors directory.
pub(crate) fn resolve(spec: &HubSpec) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let name = spec.display();
    let handle = spec.handle();
    let cached = cached_snapshot(&cache, &handle);
    let offline_msg = |why: &str| {
        anyhow!(
            "{why}, and {name} is not in the Hub cache at {}: download it once online",
            cache.path().display()
        )
    };
    let (files, commit, api) = if offline_env() {
        let (commit, snap) = cached.ok_or_else(|| offline_msg("HF_HUB_OFFLINE is set"))?;
        let mut files = Vec::new();
        list_files(&snap, "", &mut files);
        (files, commit, None)
    } else {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| cache.token());
        let mut builder = ApiBuilder::from_env().with_token(token);
        if let Ok(e) = std::env::var("HF_ENDPOINT") {
            // hf-hub appends `/api/...` as is: a trailing slash would double it.
            builder = builder.with_endpoint(e.trim_end_matches('/').to_owned());
        }
        let api = builder
            .build()
            .map_err(|e| anyhow!("cannot set up the Hub client: {e}"))?
            .repo(handle.clone());
        match repo_info(&api) {
            Ok(info) => {
                let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
                (files, info.sha, Some(api))
            }
            Err(e) if unreachable(&e) && cached.is_some() => {
                status_line(
                    true,
                    &format!(
                        "{} cannot be reached; using the cached files of {name}",
                        endpoint_name()
                    ),
                );
                let (commit, snap) = cached.expect("checked above");
                let mut files = Vec::new();
                list_files(&snap, "", &mut files);
                (files, commit, None)
            }
            Err(e) => {
                let what = match &spec.revision {
                    Some(v) => format!("repository {} at revision {v}", spec.repo),
                    None => format!("repository {}", spec.repo),
                };
                return Err(explain(e, &name, &what));
            }
        }
    };
    let repo = &spec.repo;
    let source = Source {
        name: name.clone(),
        repo: handle,
        cache: cache.clone(),
        api,
    };
    match select::plan(repo, &files, spec.quant.as_deref())? {
        Plan::Gguf { name, parts } => {
            let paths = parts
                .iter()
                .map(|p| source.get(p))
                .collect::<Result<Vec<_>>>()?;
            if paths.len() == 1 {
                return Ok(paths.into_iter().next().expect("one part"));
            }
            let folder = Repo::model(repo.clone()).folder_name();
            let base = name.rsplit('/').next().unwrap_or(&name);
            let target = cache_dir()?
                .join("hub")
                .join(folder)
                .join(&commit)
                .join(base);
            if !target.is_file() {
                status_line(
                    true,
                    &format!("joining the {} parts of {name}", paths.len()),
                );
                join::join_split_gguf(&paths, &target)?;
            }
            Ok(target)
        }
        Plan::Safetensors { files } => {
            let mut dir = None;
            for f in &files {
                let path = source.get(f)?;
                if f == select::SAFETENSORS_INDEX {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    for shard in select::index_shards(&text)? {
                        source.get(&shard)?;
                    }
                }
                if f == "config.json" {
                    dir = path.parent().map(Path::to_path_buf);
                }
            }
            dir.context("the downloaded config.json has no directory")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_parse_and_paths_do_not() {
        assert_eq!(
            HubSpec::parse("org/repo-GGUF:q4_k_m"),
            Some(HubSpec {
                repo: "org/repo-GGUF".into(),
                revision: None,
                quant: Some("q4_k_m".into())
            })
        );
        assert_eq!(
            HubSpec::parse("org/repo-GGUF@v1.2:Q8_0"),
            Some(HubSpec {
                repo: "org/repo-GGUF".into(),
                revision: Some("v1.2".into()),
                quant: Some("Q8_0".into())
            })
        );
        let pr = HubSpec::parse("org/repo@refs/pr/7").expect("a pull-request revision");
        assert_eq!(
            (pr.revision.as_deref(), pr.quant.as_deref()),
            (Some("refs/pr/7"), None)
        );
        assert_eq!(pr.handle().url_revision(), "refs%2Fpr%2F7");
        assert_eq!(HubSpec::parse("Org_1/Repo.v2").map(|s| s.quant), Some(None));
        for not_hub in [
            "smollm2-135m",
            "/abs/model.gguf",
            "./rel/model",
            "a/b/c",
            "org/",
            "/repo",
            "org/repo:",
            "org/../x",
            "~/models",
            "org/repo@",
            "org/repo@:Q4_0",
            "org/repo@a//b",
            "org/repo@../x",
            "org/repo@/main",
            "org/repo@v1@v2",
        ] {
            assert_eq!(HubSpec::parse(not_hub), None, "{not_hub}");
        }
    }
}
