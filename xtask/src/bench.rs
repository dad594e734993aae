//! `cargo xtask bench WHAT`: delegated to the lab binary, which measures the baseline
//! and the subject in the same run.
use anyhow::{Result, bail};

use crate::{test, upstream};

pub fn run(what: &str, args: &[String]) -> Result<()> {
    match what {
        "kernel" => test::lab(&["bench-kernel"], args, false),
        "proxy" => {
            let nginx = upstream::nginx()?;
            test::lab_with_env(&["bench-proxy"], args, true, &[("PORTCULLIS_NGINX", nginx)])
        }
        other => bail!("unknown benchmark `{other}`; available: kernel, proxy"),
    }
}
