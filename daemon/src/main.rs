//! `portcullis`: the node daemon and its CLI. The arguments and everything printed are
//! in the library's `cmd`; an error is printed here, once, with its causes.
use std::process::ExitCode;

use clap::Parser;

fn main() -> anyhow::Result<ExitCode> {
    portcullis::cmd::run(portcullis::cmd::Cli::parse())
}
