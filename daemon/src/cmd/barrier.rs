//! `portcullis barrier`: the first init container of every agent pod (injected by the
//! admission webhook). It exits 0 only once its own connection to the API server is
//! answered by the gate, i.e. once the pod's cgroup is enrolled; until then it retries,
//! and after `--timeout` it exits 1 (the kubelet restarts it: the pod stays closed).
use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result};

use crate::tls;

pub struct Args {
    pub ca_pem: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub server: Option<String>,
    pub name: String,
    pub timeout: Duration,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let pem = match (&a.ca_pem, &a.ca_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => anyhow::bail!(
            "give the interception CA (--ca-file, or PORTCULLIS_CA_PEM in the environment)"
        ),
    };
    let server = match a.server {
        Some(s) => s,
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST")
                .context("KUBERNETES_SERVICE_HOST is not set: give --server HOST:PORT")?;
            let port =
                std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_string());
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        }
    };
    let cfg = tls::only_ca(&pem)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let started = std::time::Instant::now();
    let mut attempts = 0u32;
    let mut said = std::time::Instant::now();
    loop {
        attempts += 1;
        let r = rt.block_on(tls::answered_by_gate(
            cfg.clone(),
            &server,
            &a.name,
            Duration::from_secs(2),
        ));
        match r {
            Ok(()) => {
                println!(
                    "enforced: {server} is answered by the gate (after {attempts} attempts, {:.2} s)",
                    started.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                if started.elapsed() > a.timeout {
                    eprintln!(
                        "not enforced after {:.0} s: {e} (is the Portcullis daemon running on this node?)",
                        a.timeout.as_secs_f64()
                    );
                    return Ok(ExitCode::from(1));
                }
                if said.elapsed() > Duration::from_secs(5) {
                    eprintln!("waiting for enforcement: {e}");
                    said = std::time::Instant::now();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
