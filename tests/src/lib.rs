//! The lab: a node, an agent pod and a stand-in API server, built from real kernel parts
//! (network namespaces, veth pairs, cgroup v2 directories) that the lab creates and
//! removes itself. Used by the kernel tests, `cargo xtask demo` and `cargo xtask bench
//! kernel`. Needs root.
//!
//! ```text
//!  netns A (agent pod)         netns N (node: the daemon)         netns B (API server)
//!  10.S.1.2 fd00:0:S:1::2 ---- 10.S.1.1 / 10.S.2.1 (fwd) -------- 10.S.2.2:6443 (real IP)
//!  cgroup <root>/agent         portcullis run (listen 10.S.1.1)   10.S.3.1:443 (ClusterIP)
//!  cgroup <root>/bystander                                       [fd00:0:S:2::2]:6443
//! ```
//! Only addresses inside these namespaces are ever dialled.
use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Where the built binaries are: `$PORTCULLIS_BIN_DIR`, else `<repo>/target/release`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("PORTCULLIS_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    dir.join(name)
}

fn sh(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args)).map(drop)
}

/// The first cgroup v2 mount.
pub fn cgroup2_root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split(' ').nth(4)?;
            (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mp))
        })
        .context("no cgroup2 filesystem mounted: the kernel tier needs cgroup v2")
}

/// Result of one probe run.
#[derive(Debug)]
pub struct Probe {
    /// The probe's pid (the shell execs into nsenter, which execs the probe).
    pub process: u32,
    pub status: ExitStatus,
    /// The last JSON line the probe printed (Null if none, e.g. it was killed).
    pub json: Value,
    pub stderr: String,
}

impl Probe {
    pub fn ok(&self) -> bool {
        self.json["ok"].as_bool() == Some(true)
    }
    pub fn errno(&self) -> Option<i64> {
        self.json["errno"].as_i64()
    }
    pub fn pid(&self) -> Option<u64> {
        self.json["pid"].as_u64()
    }
    pub fn killed_by(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.status.signal()
    }
}

/// Sends `sig` to process `pid` (a child the test started). Through kill(2), not a
/// `kill` binary: a fresh machine need not have procps.
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    ensure!(
        rc == 0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Detaches the bpf link pinned at `path` (`bpftool link detach`), as an intruder
/// with CAP_BPF could, behind the daemon's back. The pin stays.
pub fn detach_pinned_link(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET (7) reads the path pointer in a zeroed 128-byte bpf_attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, attr.as_mut_ptr(), 128) };
    ensure!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut attr = [0u64; 16];
    attr[0] = fd as u64;
    // SAFETY: BPF_LINK_DETACH (34) reads link_fd from a zeroed bpf_attr; close takes the
    // fd BPF_OBJ_GET returned.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 34, attr.as_mut_ptr(), 128) };
    let err = std::io::Error::last_os_error();
    // SAFETY: as above.
    unsafe { libc::close(fd as i32) };
    ensure!(rc == 0, "BPF_LINK_DETACH {}: {err}", path.display());
    Ok(())
}

pub struct Lab {
    pub s: u32,
    pub dir: PathBuf,
    pub cg_root: PathBuf,
    pub agent_cg: PathBuf,
    pub bystander_cg: PathBuf,
    pub bpffs_dir: PathBuf,
    pub config: PathBuf,
    ns: [String; 3],
    daemon: std::sync::Mutex<Option<Child>>,
    standin: Option<Child>,
    extra: std::sync::Mutex<Vec<Child>>,
}

impl Lab {
    pub fn ns_node(&self) -> &str {
        &self.ns[0]
    }
    pub fn ns_agent(&self) -> &str {
        &self.ns[1]
    }
    pub fn ns_api(&self) -> &str {
        &self.ns[2]
    }
    /// The API server's real address.
    pub fn api(&self) -> SocketAddr {
        format!("10.{}.2.2:6443", self.s).parse().unwrap()
    }
    /// The kubernetes Service ClusterIP.
    pub fn cluster_ip(&self) -> SocketAddr {
        format!("10.{}.3.1:443", self.s).parse().unwrap()
    }
    /// Another port on the API server's host, not protected by the lab's config (for
    /// run-time `protect` / `unprotect`).
    pub fn api_alt(&self) -> SocketAddr {
        format!("10.{}.2.2:8443", self.s).parse().unwrap()
    }
    pub fn api_v6(&self) -> SocketAddr {
        format!("[fd00:0:{}:2::2]:6443", self.s).parse().unwrap()
    }
    pub fn daemon_v4(&self) -> SocketAddr {
        format!("10.{}.1.1:15443", self.s).parse().unwrap()
    }
    pub fn daemon_v6(&self) -> SocketAddr {
        format!("[fd00:0:{}:1::1]:15443", self.s).parse().unwrap()
    }
    /// A plain listener on the node, not protected (benchmarks' baseline target).
    pub fn sink(&self) -> SocketAddr {
        format!("10.{}.1.1:16443", self.s).parse().unwrap()
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Builds namespaces, veths, cgroups and the config, and starts the stand-in API
    /// server. The daemon is not started.
    pub fn new(tag: &str) -> Result<Lab> {
        Self::build_with(tag, true)
    }

    /// As `new`, but the API namespace is left empty for a real API server (e2e tier).
    pub fn without_standin(tag: &str) -> Result<Lab> {
        Self::build_with(tag, false)
    }

    /// What labs of killed runs left (a killed process skips `Drop`): their cgroups
    /// (named after the dead pid), network namespaces and pins. Once per process.
    fn sweep_dead_labs() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let Ok(root) = cgroup2_root() else { return };
            let Ok(rd) = std::fs::read_dir(&root) else {
                return;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix("portcullis-lab-") else {
                    continue;
                };
                let Some((s, pid)) = rest.split_once('-') else {
                    continue;
                };
                let Ok(pid) = pid.parse::<u32>() else {
                    continue;
                };
                if Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                let cg = e.path();
                for sub in ["agent", "bystander", ""] {
                    let _ = std::fs::write(cg.join(sub).join("cgroup.kill"), "1");
                }
                std::thread::sleep(Duration::from_millis(50));
                for sub in ["agent", "bystander", ""] {
                    let _ = std::fs::remove_dir(cg.join(sub));
                }
                for ns in ["node", "agent", "api"] {
                    let _ = Command::new("ip")
                        .args(["netns", "del", &format!("pc{s}-{ns}")])
                        .output();
                }
                let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/portcullis-lab-{s}"));
                eprintln!("cleaned up a lab left by killed process {pid} ({name})");
            }
        });
    }

    fn build_with(tag: &str, standin: bool) -> Result<Lab> {
        Self::sweep_dead_labs();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let s = 100 + (std::process::id() + n * 7) % 150;
        let base = format!("pc{s}");
        let dir =
            std::env::temp_dir().join(format!("portcullis-lab-{tag}-{s}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let cg_root = cgroup2_root()?.join(format!("portcullis-lab-{s}-{}", std::process::id()));
        let mut lab = Lab {
            s,
            dir: dir.clone(),
            agent_cg: cg_root.join("agent"),
            bystander_cg: cg_root.join("bystander"),
            cg_root,
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/portcullis-lab-{s}")),
            config: dir.join("portcullis.yaml"),
            ns: [
                format!("{base}-node"),
                format!("{base}-agent"),
                format!("{base}-api"),
            ],
            daemon: std::sync::Mutex::new(None),
            standin: None,
            extra: std::sync::Mutex::new(Vec::new()),
        };
        lab.build(&base, standin)
            .with_context(|| format!("building lab {base}"))?;
        Ok(lab)
    }

    fn build(&mut self, base: &str, standin: bool) -> Result<()> {
        let s = self.s;
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns])?;
        }
        let (n, a, b) = (self.ns[0].clone(), self.ns[1].clone(), self.ns[2].clone());
        let (va, vna, vb, vnb) = (
            format!("{base}a"),
            format!("{base}na"),
            format!("{base}b"),
            format!("{base}nb"),
        );
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vna])?;
        ip(&["link", "set", &va, "netns", &a])?;
        ip(&["link", "set", &vna, "netns", &n])?;
        ip(&["link", "add", &vb, "type", "veth", "peer", "name", &vnb])?;
        ip(&["link", "set", &vb, "netns", &b])?;
        ip(&["link", "set", &vnb, "netns", &n])?;
        let v4 = |x: &str| format!("10.{s}.{x}");
        let v6 = |x: &str| format!("fd00:0:{s}:{x}");
        for (ns, dev, a4, a6) in [
            (&a, &va, v4("1.2/24"), v6("1::2/64")),
            (&n, &vna, v4("1.1/24"), v6("1::1/64")),
            (&b, &vb, v4("2.2/24"), v6("2::2/64")),
            (&n, &vnb, v4("2.1/24"), v6("2::1/64")),
        ] {
            ip(&["-n", ns, "addr", "add", &a4, "dev", dev])?;
            ip(&["-n", ns, "-6", "addr", "add", &a6, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &b, "addr", "add", &v4("3.1/32"), "dev", "lo"])?;
        ip(&["-n", &a, "route", "add", "default", "via", &v4("1.1")])?;
        ip(&[
            "-n",
            &a,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &v6("1::1"),
        ])?;
        ip(&["-n", &b, "route", "add", "default", "via", &v4("2.1")])?;
        ip(&[
            "-n",
            &b,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &v6("2::1"),
        ])?;
        ip(&["-n", &n, "route", "add", &v4("3.0/24"), "via", &v4("2.2")])?;
        sh(Command::new("ip").args([
            "netns",
            "exec",
            &n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]))?;

        std::fs::create_dir_all(&self.agent_cg)?;
        std::fs::create_dir_all(&self.bystander_cg)?;

        let config = format!(
            "listen:\n  ipv4: \"{}\"\n  ipv6: \"{}\"\nkernel:\n  verify_interval: 1s\n  attach_cgroup: {}\n  bpffs_dir: {}\n  agent_cgroups: [{}]\n  protected_endpoints: [\"{}\", \"{}\", \"{}\"]\nstate_dir: {}\nlog:\n  level: info\n",
            self.daemon_v4(),
            self.daemon_v6(),
            self.cg_root.display(),
            self.bpffs_dir.display(),
            self.agent_cg.display(),
            self.api(),
            self.cluster_ip(),
            self.api_v6(),
            self.state_dir().display()
        );
        std::fs::write(&self.config, config)?;

        if !standin {
            return Ok(());
        }
        // The stand-in API server, and the node's plain sink for benchmarks.
        self.standin = Some(self.serve(
            &b,
            "standin.jsonl",
            &[self.api(), self.cluster_ip(), self.api_v6(), self.api_alt()],
        )?);
        Ok(())
    }

    fn serve(&self, ns: &str, log: &str, addrs: &[SocketAddr]) -> Result<Child> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg(bin("pc-probe"))
            .arg("serve")
            .arg("--log")
            .arg(self.dir.join(log));
        for a in addrs {
            cmd.arg(a.to_string());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting pc-probe serve")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("stand-in server did not start");
        }
        Ok(child)
    }

    /// Keeps a helper process for the lab's lifetime (killed on drop).
    pub fn adopt(&self, child: Child) {
        self.extra.lock().unwrap().push(child);
    }

    /// Starts a plain listener on the node (benchmarks' baseline target).
    pub fn start_sink(&self) -> Result<()> {
        let c = self.serve(self.ns_node(), "sink.jsonl", &[self.sink()])?;
        self.extra.lock().unwrap().push(c);
        Ok(())
    }

    /// Starts `portcullis run` in the node namespace and waits until it is ready.
    pub fn start_daemon(&self) -> Result<Value> {
        self.start_daemon_wrapped(&[])
    }

    /// [`Self::start_daemon`] under `wrap` (a command and its arguments the daemon's
    /// command line is appended to: a profiler's), with a ready deadline four times as
    /// long when wrapped.
    pub fn start_daemon_wrapped(&self, wrap: &[String]) -> Result<Value> {
        let ready_file = self.state_dir().join("ready");
        let _ = std::fs::remove_file(&ready_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns_node()))
            .args(wrap)
            .arg(bin("portcullis"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting portcullis run")?;
        let pid = child.id();
        *self.daemon.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(if wrap.is_empty() { 30 } else { 120 });
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["pid"].as_u64() == Some(pid as u64)
            {
                return Ok(v);
            }
            let exited = match self.daemon.lock().unwrap().as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(st) = exited {
                bail!(
                    "portcullis run exited ({st}) before ready:\n{}",
                    self.daemon_log()
                );
            }
            if Instant::now() > deadline {
                bail!("portcullis run not ready in time:\n{}", self.daemon_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up, as in a crash or OOM kill.
    pub fn kill_daemon(&self) {
        if let Some(mut c) = self.daemon.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`frozen`) or SIGCONT the daemon. A frozen daemon keeps its listening
    /// socket: the kernel still completes handshakes into the accept queue, but nothing
    /// accepts them until it is thawed.
    pub fn freeze_daemon(&self, frozen: bool) -> Result<()> {
        let pid = match self.daemon.lock().unwrap().as_ref() {
            Some(c) => c.id(),
            None => bail!("no daemon running"),
        };
        signal(pid, if frozen { libc::SIGSTOP } else { libc::SIGCONT })
    }

    /// Runs pc-probe inside the agent cgroup and network namespace.
    pub fn agent(&self, args: &[&str]) -> Result<Probe> {
        self.probe_in(&self.agent_cg, args)
    }

    /// Runs pc-probe in the bystander cgroup (under the attach point, not enrolled).
    pub fn bystander(&self, args: &[&str]) -> Result<Probe> {
        self.probe_in(&self.bystander_cg, args)
    }

    /// pc-probe as an agent process: a shell moves itself into the cgroup, then execs
    /// into the agent netns, as a container runtime does (cgroup first, then exec).
    fn probe_command(&self, cg: &Path, args: &[&str]) -> Command {
        let mut cmd = self.command_in_cgroup(cg, &bin("pc-probe"));
        cmd.args(args);
        cmd
    }

    /// Any program as a process of cgroup `cg` in the agent network namespace.
    pub fn command_in_cgroup(&self, cg: &Path, program: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("cg=$1; ns=$2; shift 2; echo $$ > \"$cg/cgroup.procs\" && exec nsenter --net=\"$ns\" \"$@\"")
            .arg("pc-agent")
            .arg(cg)
            .arg(format!("/run/netns/{}", self.ns_agent()))
            .arg(program);
        cmd
    }

    /// Any program as an enrolled agent process.
    pub fn agent_command(&self, program: &Path) -> Command {
        self.command_in_cgroup(&self.agent_cg, program)
    }

    /// Any program in network namespace `ns` (not in an agent cgroup).
    pub fn command_in_ns(&self, ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
        cmd
    }

    /// Adds a section to the daemon's config (before it starts).
    pub fn append_config(&self, yaml: &str) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)?;
        f.write_all(yaml.as_bytes())?;
        Ok(())
    }

    pub fn probe_in(&self, cg: &Path, args: &[&str]) -> Result<Probe> {
        let mut child = self
            .probe_command(cg, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pc-probe")?;
        let process = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("probe {args:?} did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        Ok(Probe {
            process,
            status,
            json,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Starts a long-lived `pc-probe hold ADDR` in `cg`; returns the child, its stdin and
    /// the first JSON line.
    pub fn hold(
        &self,
        cg: &Path,
        addr: SocketAddr,
    ) -> Result<(
        Child,
        ChildStdin,
        BufReader<std::process::ChildStdout>,
        Value,
    )> {
        let mut child = self
            .probe_command(cg, &["hold", &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line)?;
        let v = serde_json::from_str(&line).with_context(|| format!("hold printed {line:?}"))?;
        Ok((child, stdin, out, v))
    }

    /// Runs the portcullis CLI with this lab's config; returns (success, stdout+stderr).
    pub fn portcullis_status(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new(bin("portcullis"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_BACKTRACE", "0")
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// Runs the portcullis CLI with this lab's config.
    pub fn portcullis(&self, args: &[&str]) -> Result<String> {
        sh(Command::new(bin("portcullis"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_BACKTRACE", "0"))
    }

    fn jsonl(&self, path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn kernel_events(&self) -> Vec<Value> {
        self.jsonl(&self.state_dir().join("kernel-events.jsonl"))
    }
    pub fn connections(&self) -> Vec<Value> {
        self.jsonl(&self.state_dir().join("connections.jsonl"))
    }
    /// What the stand-in API server saw (accepts, data, datagrams).
    pub fn standin_log(&self) -> Vec<Value> {
        self.jsonl(&self.dir.join("standin.jsonl"))
    }

    /// Waits up to `secs` for `f` to find something in the kernel events.
    pub fn wait_event(&self, secs: u64, f: impl Fn(&Value) -> bool) -> Option<Value> {
        wait_for(secs, || self.kernel_events().into_iter().find(|e| f(e)))
    }
    pub fn wait_connection(&self, secs: u64, f: impl Fn(&Value) -> bool) -> Option<Value> {
        wait_for(secs, || self.connections().into_iter().find(|e| f(e)))
    }

    /// The cgroup id (inode) of a cgroup directory.
    pub fn cgroup_id(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
    }

    pub fn write_stdin(stdin: &mut ChildStdin, line: &str) -> Result<()> {
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        Ok(())
    }
}

pub mod gate;
pub mod idp;
pub mod install;
pub mod node;

pub fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_daemon();
        let extra = std::mem::take(&mut *self.extra.lock().unwrap());
        for mut c in self.standin.take().into_iter().chain(extra) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Detach programs and remove pins, then the namespaces and cgroups.
        let _ = Command::new(bin("portcullis"))
            .args(["unload", "--config"])
            .arg(&self.config)
            .output();
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for cg in [&self.agent_cg, &self.bystander_cg, &self.cg_root] {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(50));
        for cg in [&self.agent_cg, &self.bystander_cg, &self.cg_root] {
            let _ = std::fs::remove_dir(cg);
        }
        if std::env::var_os("PORTCULLIS_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
