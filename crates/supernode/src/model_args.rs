//! The model arguments every subcommand shares (`--model`, `--threads`, `--ctx`,
//! `--precision`, `--kv-cache-dtype`, `--verbose`), and opening the model they name. Its own module so that the
//! subcommands (`cli`, `bench`, `server`) depend on it and not on each other.

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use supernode_engine::session::Session;
use supernode_kernels::Precision;
use supernode_models::{KvDType, LoadOptions};

use crate::fetch;

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A .gguf file, a directory with config.json + *.safetensors, a short name
    /// (smollm2-135m, gemma3-270m, qwen2.5-0.5b) fetched into the cache on first use, or a Hub name
    /// org/repo[@REV][:QUANT] (a GGUF chosen by quant tag, or a safetensors repository).
    #[arg(long, short = 'm')]
    pub(crate) model: String,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub(crate) threads: Option<usize>,
    /// Context length (default: the model's).
    #[arg(long)]
    pub(crate) ctx: Option<usize>,
    /// How activations meet quantised weights: `quantized` (llama.cpp's numerics: activations
    /// quantised to 8 bits, integer dot products, f16 attention; as close to a float64 forward
    /// as llama.cpp is, and 2-4x faster than `exact` on AVX-512) or `exact` (f32 activations
    /// against dequantised weights: agrees with a float64 forward on the same weights to 1e-4,
    /// for reference-grade numerics).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Quantized)]
    pub(crate) precision: PrecisionArg,
    /// The KV cache's element type: `auto` (f32 in exact precision; f16 in quantized, whose
    /// keys and values are f16 values already), `f32`, or `f16` (in exact precision each key
    /// and value is rounded to f16 as it is cached: half the memory and the bytes decode reads
    /// per token of context, logits about 1e-3 relative further from a float64 forward).
    #[arg(long, value_enum, default_value_t = KvCacheDtypeArg::Auto)]
    pub(crate) kv_cache_dtype: KvCacheDtypeArg,
    /// Print load time and speed on stderr even when it is not a terminal.
    #[arg(long, short = 'v')]
    pub(crate) verbose: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum KvCacheDtypeArg {
    Auto,
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PrecisionArg {
    Quantized,
    Exact,
}

/// Sets up the thread pool and resolves the model path and load options of `m`.
pub(crate) fn prepare(m: &ModelArgs) -> Result<(PathBuf, LoadOptions)> {
    if let Some(t) = m.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        if !supernode_kernels::pool::set_threads(t) {
            bail!("the thread pool already runs with another thread count");
        }
    }
    let path: PathBuf = fetch::resolve_model(&m.model)?;
    Ok((path, load_options(m)))
}

/// How `m` asks models to be loaded (a draft model is loaded the same way).
pub(crate) fn load_options(m: &ModelArgs) -> LoadOptions {
    let precision = match m.precision {
        PrecisionArg::Quantized => Precision::Quantized,
        PrecisionArg::Exact => Precision::Exact,
    };
    let kv_dtype = match m.kv_cache_dtype {
        KvCacheDtypeArg::Auto => None,
        KvCacheDtypeArg::F32 => Some(KvDType::F32),
        KvCacheDtypeArg::F16 => Some(KvDType::F16),
    };
    LoadOptions {
        precision,
        kv_dtype,
        mtp: false,
    }
}

/// The session of `m` and the model file's path.
pub(crate) fn open_model(m: &ModelArgs) -> Result<(Session, PathBuf)> {
    open_model_with(m, false)
}

/// [`open_model`], with the checkpoint's multi-token-prediction layer too when `mtp` asks
/// (`--speculative mtp`).
pub(crate) fn open_model_with(m: &ModelArgs, mtp: bool) -> Result<(Session, PathBuf)> {
    let (path, mut opts) = prepare(m)?;
    opts.mtp = mtp;
    let t0 = Instant::now();
    let session = Session::load(&path, &opts, m.ctx)?;
    if let Some(note) = supernode_models::partial_load_note(&path) {
        status_line(true, &note);
    }
    status_line(
        m.verbose,
        &format!(
            "loaded {} in {:.2}s",
            path.display(),
            t0.elapsed().as_secs_f64()
        ),
    );
    Ok((session, path))
}

impl ModelArgs {
    pub(crate) fn kv_cache_dtype_name(&self) -> &'static str {
        match self.kv_cache_dtype {
            KvCacheDtypeArg::Auto => "auto",
            KvCacheDtypeArg::F32 => "f32",
            KvCacheDtypeArg::F16 => "f16",
        }
    }

    pub(crate) fn precision_name(&self) -> &'static str {
        match self.precision {
            PrecisionArg::Quantized => "quantized",
            PrecisionArg::Exact => "exact",
        }
    }
}

/// A status line on stderr (kept off stdout, which carries results), shown on a terminal or
/// with `--verbose`.
pub(crate) fn status_line(verbose: bool, msg: &str) {
    if verbose || io::stderr().is_terminal() {
        eprintln!("supernode: {msg}");
    }
}
