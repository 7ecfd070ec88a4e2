//! `supernode`: the command line. See DESIGN.md's command-line contract; tests rely on the
//! JSON shapes printed here.

mod bench;
mod chat_repl;
mod cli;
mod fetch;
mod hub;
mod model_args;
mod server;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
