//! `cargo xtask bench WHAT`: delegated to the lab binary, which measures the baseline
//! and the subject in the same run.
use anyhow::{Result, bail};

use crate::{node, test};

pub fn run(what: &str, args: &[String]) -> Result<()> {
    match what {
        "kernel" => test::lab(&["bench-kernel"], args, false),
        // The kernel lab and the stand-in upstream: no node needed.
        "watches" => test::lab(&["bench-watches"], args, false),
        "proxy" => {
            let nginx = node::nginx()?;
            test::lab_with_env(&["bench-proxy"], args, true, &[("PORTCULLIS_NGINX", nginx)])
        }
        // Pure CPU/disk benchmarks of the daemon's library: no lab needed.
        "mask" | "audit" => {
            crate::run::status(
                std::process::Command::new(env!("CARGO"))
                    .current_dir(crate::paths::root())
                    .args(["bench", "-p", "portcullis", "--bench", what])
                    .args(args),
            )?;
            Ok(())
        }
        other => {
            bail!("unknown benchmark `{other}`; available: kernel, proxy, watches, mask, audit")
        }
    }
}
