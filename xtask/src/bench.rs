//! `cargo xtask bench WHAT`: delegated to the lab binary, which measures the baseline
//! and the subject in the same run.
use anyhow::{Result, bail};

use crate::test;

pub fn run(what: &str, args: &[String]) -> Result<()> {
    match what {
        "kernel" => test::lab(&["bench-kernel"], args, false),
        other => bail!("unknown benchmark `{other}`; available: kernel"),
    }
}
