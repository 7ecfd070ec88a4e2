//! `supernode`: the command line. See DESIGN.md's command-line contract; tests rely on the
//! JSON shapes printed here.

mod bench;
mod chat_repl;
mod cli;
mod fetch;
mod hub;
mod model_args;
mod server;
mod spec_args;
#[cfg(feature = "dynamo")]
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    pin_mmap_threshold();
    let args = cli::Cli::parse();
    if let Err(e) = supernode_kernels::check_isa_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Pins glibc's mmap threshold at its initial 128 KiB (unless `MALLOC_MMAP_THRESHOLD_` says
/// otherwise). By default glibc raises the threshold to the size of each large block freed,
/// after which blocks of up to 32 MiB come from the heap instead of their own mappings; a server
/// that frees logits and request buffers of a few hundred KiB all day then keeps heap pages it
/// cannot return, and its resident memory creeps up. Pinned, large blocks are mapped and
/// unmapped whole. (The forward pass itself reuses its buffers: `supernode_kernels::scratch`.)
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
            // is started.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 128 * 1024);
            }
        }
    }
}
