//! Debian's nginx as the benchmarks' reference reverse proxy (`bench proxy`, `lab-load
//! --targets nginx`): TLS and HTTP/2 toward the client, HTTP/1.1 with keep-alive to
//! the upstream, the daemon's credential and impersonation added, no buffering — what
//! a plain TLS-terminating reverse proxy in front of the API server does.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// One `server` block: where it listens and where it sends.
pub struct Server {
    /// `IP:PORT`.
    pub listen: String,
    /// `IP:PORT` of the upstream (verified as `kubernetes` against `ca`).
    pub upstream: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What every server adds upstream.
pub struct Upstream<'a> {
    pub token: &'a str,
    pub user: &'a str,
    pub group: &'a str,
    pub ca: &'a Path,
}

/// A running nginx, stopped with SIGTERM on drop (its master stops the workers;
/// SIGKILL would orphan them).
pub struct Nginx {
    pub child: Child,
}

impl Nginx {
    /// Writes the configuration into `dir` and starts `command` (the nginx binary,
    /// already placed in the right namespace) with it.
    pub fn start(
        mut command: Command,
        dir: &Path,
        servers: &[Server],
        up: &Upstream,
    ) -> Result<Nginx> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let d = dir.display();
        let mut http = String::new();
        for (i, s) in servers.iter().enumerate() {
            http += &format!(
                r#"  upstream u{i} {{ server {upstream}; keepalive 64; }}
  server {{
    listen {listen} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    client_max_body_size 10m;
    location / {{
      proxy_pass https://u{i};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_set_header Impersonate-User "{user}";
      proxy_set_header Impersonate-Group "{group}";
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name kubernetes;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
      proxy_buffering off;
      proxy_read_timeout 1h;
    }}
  }}
"#,
                upstream = s.upstream,
                listen = s.listen,
                cert = s.cert.display(),
                key = s.key.display(),
                token = up.token.trim(),
                user = up.user,
                group = up.group,
                ca = up.ca.display(),
            );
        }
        let conf = format!(
            r#"daemon off;
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
{http}}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = command
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx")?;
        let mut n = Nginx { child };
        std::thread::sleep(Duration::from_millis(500));
        if let Some(st) = n.child.try_wait()? {
            bail!(
                "nginx exited ({st}): {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = portcullis_tests::signal(self.child.id(), libc::SIGTERM);
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
