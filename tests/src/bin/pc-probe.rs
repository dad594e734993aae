//! pc-probe: what an agent process might try, one attempt per run, result as one JSON
//! line on stdout. Run by the lab inside an agent cgroup and network namespace. Also the
//! stand-in API server (`serve`) and the load generator for `bench kernel`.
//! Test-only: nothing here is part of the product.
use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP connect, then getpeername/getsockname.
    Tcp {
        addr: SocketAddr,
        /// Bind this local port first (SO_REUSEADDR), to reuse an earlier attempt's.
        #[arg(long)]
        bind_port: Option<u16>,
    },
    /// TCP connect from an IPv6 socket to the IPv4-mapped form of `addr`.
    TcpMapped { addr: SocketAddr },
    /// Unconnected UDP sendto (QUIC's first flight looks like this).
    Udp { addr: SocketAddr },
    /// connect() a UDP socket (a connected QUIC client does this).
    UdpConnect { addr: SocketAddr },
    /// TCP Fast Open: sendto with MSG_FASTOPEN and data, no connect().
    Tfo { addr: SocketAddr },
    /// connect() submitted through io_uring.
    Uring { addr: SocketAddr },
    /// socket(AF_INET, SOCK_RAW, IPPROTO_TCP) and a hand-made SYN to `addr`.
    Raw { addr: SocketAddr },
    /// socket(AF_PACKET, SOCK_RAW, ETH_P_ALL).
    Packet,
    /// Create a socket by one route: `native` socket(2), `pair` socketpair(2),
    /// `compat` the 32-bit socket syscall (int 0x80, nr 359), `socketcall` the 32-bit
    /// socketcall(SYS_SOCKET) (int 0x80, nr 102, arguments in memory below 4 GiB),
    /// `compat-pair` the 32-bit socketpair (nr 360), `uring` IORING_OP_SOCKET.
    /// Family, type and protocol as numbers; `--protocol-be` byte-swaps the protocol
    /// (ETH_P_* values are big-endian).
    Socket {
        route: String,
        family: i32,
        sock_type: i32,
        #[arg(default_value_t = 0)]
        protocol: i32,
        #[arg(long)]
        protocol_be: bool,
    },
    /// Write our pid into another cgroup's cgroup.procs, then TCP connect; a child forked
    /// after the move connects too.
    Leave { procs: String, addr: SocketAddr },
    /// 32-bit socketcall(SYS_SOCKET) while a second thread flips the argument block in
    /// memory between AF_INET and AF_PACKET (a check that reads the arguments before
    /// the kernel copies them can be raced). Bounded: `count` calls or `max_secs`.
    SocketcallRace {
        #[arg(long, default_value_t = 5000)]
        count: u32,
        #[arg(long, default_value_t = 3)]
        max_secs: u64,
    },
    /// Connect now; on each stdin line `send` write 64 bytes and report; `quit` ends.
    Hold { addr: SocketAddr },
    /// Bounded connect loop; reports latency percentiles.
    BenchConnect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        count: u32,
        #[arg(long, default_value_t = 10)]
        max_secs: u64,
    },
    /// Bounded burst of refused UDP sends (each one a kernel event).
    BenchEvents {
        addr: SocketAddr,
        #[arg(long, default_value_t = 50_000)]
        count: u32,
        #[arg(long, default_value_t = 10)]
        max_secs: u64,
    },
    /// Bounded loop of one operation, for `bench kernel`'s cost to non-agents:
    /// `syscall` (getppid), `socket` (a UDP socket opened and closed), `udp` (a
    /// datagram to `addr`), `connect` (TCP to `addr`), `fork` (fork + exec + exit of
    /// /bin/true). Reports how many and how long.
    BenchOps {
        op: String,
        #[arg(long)]
        addr: Option<SocketAddr>,
        #[arg(long, default_value_t = 10_000)]
        count: u32,
        #[arg(long, default_value_t = 10)]
        max_secs: u64,
    },
    /// Stand-in API server / sink: accept TCP and UDP on `addrs`, log to `log`.
    Serve {
        #[arg(long)]
        log: String,
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
    },
}

fn errno_of(e: &std::io::Error) -> Value {
    json!({"errno": e.raw_os_error(), "error": e.to_string()})
}

fn out(v: Value) {
    println!("{v}");
    let _ = std::io::stdout().flush();
}

fn base(kind: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("probe".into(), kind.into());
    m.insert("pid".into(), std::process::id().into());
    m
}

fn finish(mut m: serde_json::Map<String, Value>, r: std::io::Result<Value>) {
    match r {
        Ok(v) => {
            m.insert("ok".into(), true.into());
            if let Value::Object(o) = v {
                m.extend(o);
            }
        }
        Err(e) => {
            m.insert("ok".into(), false.into());
            if let Value::Object(o) = errno_of(&e) {
                m.extend(o);
            }
        }
    }
    out(Value::Object(m));
}

fn names(s: &Socket) -> Value {
    let p = s
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string());
    let l = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string());
    json!({"peer": p, "local": l})
}

fn tcp(addr: SocketAddr, bind_port: Option<u16>) -> std::io::Result<Value> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(port) = bind_port {
        s.set_reuse_address(true)?;
        let any: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        };
        s.bind(&any.into())?;
    }
    s.connect_timeout(&addr.into(), Duration::from_secs(3))?;
    Ok(names(&s))
}

fn tcp_mapped(addr: SocketAddr) -> std::io::Result<Value> {
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("tcp-mapped needs an IPv4 address"));
    };
    let mapped = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port());
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(false)?;
    s.connect_timeout(&mapped.into(), Duration::from_secs(3))?;
    Ok(names(&s))
}

fn udp(addr: SocketAddr) -> std::io::Result<Value> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let s = UdpSocket::bind(bind)?;
    let n = s.send_to(b"\xc0quic-initial-stand-in", addr)?;
    Ok(json!({"sent": n}))
}

fn udp_connect(addr: SocketAddr) -> std::io::Result<Value> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.connect(&addr.into())?;
    Ok(names(&s))
}

fn tfo(addr: SocketAddr) -> std::io::Result<Value> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let n = s.send_to_with_flags(b"GET / HTTP/1.1\r\n\r\n", &addr.into(), libc::MSG_FASTOPEN)?;
    Ok(json!({"sent": n, "names": names(&s)}))
}

fn uring(addr: SocketAddr) -> std::io::Result<Value> {
    use io_uring::{IoUring, opcode, types};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let sa = SockAddr::from(addr);
    let mut ring = IoUring::new(4)?;
    let entry = opcode::Connect::new(types::Fd(s.as_raw_fd()), sa.as_ptr().cast(), sa.len())
        .build()
        .user_data(1);
    // SAFETY: `sa` and the socket outlive the submission: we wait for its completion
    // below before either is dropped.
    unsafe { ring.submission().push(&entry) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(std::io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(names(&s))
}

fn raw(addr: SocketAddr) -> std::io::Result<Value> {
    let s = Socket::new(Domain::for_address(addr), Type::RAW, Some(Protocol::TCP))?;
    // A bare TCP SYN header (checksum left 0: the point is whether it leaves at all).
    let mut syn = [0u8; 20];
    syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
    syn[2..4].copy_from_slice(&addr.port().to_be_bytes());
    syn[12] = 5 << 4;
    syn[13] = 0x02;
    let n = s.send_to(&syn, &addr.into())?;
    Ok(json!({"sent": n}))
}

fn packet() -> std::io::Result<Value> {
    let s = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from((libc::ETH_P_ALL as u16).to_be() as i32)),
    )?;
    Ok(json!({"fd": s.as_raw_fd()}))
}

/// A 32-bit syscall through the compat entry (`int 0x80`) from this 64-bit process:
/// the same path and syscall table a 32-bit x86 program uses. Returns eax.
fn int80(nr: u32, a: u32, b: u32, c: u32, d: u32) -> i32 {
    let ret: i32;
    // rbx is reserved by LLVM: swap the first argument in and out around the call.
    // SAFETY: int 0x80 reads eax/ebx/ecx/edx and writes eax; rbx is restored by the
    // second xchg; r8-r11 are declared clobbered in case the kernel does not keep them.
    unsafe {
        std::arch::asm!(
            "xchg {tmp}, rbx",
            "int 0x80",
            "xchg {tmp}, rbx",
            tmp = inout(reg) a as u64 => _,
            inlateout("eax") nr as i32 => ret,
            in("ecx") b,
            in("edx") c,
            in("esi") d,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        );
    }
    ret
}

fn from_ret(ret: i32) -> std::io::Result<i32> {
    if ret < 0 {
        Err(std::io::Error::from_raw_os_error(-ret))
    } else {
        Ok(ret)
    }
}

fn socket_route(route: &str, family: i32, ty: i32, protocol: i32) -> std::io::Result<Value> {
    match route {
        "native" => {
            // SAFETY: socket(2) takes integers only.
            let fd = unsafe { libc::socket(family, ty, protocol) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(json!({"fd": fd}))
        }
        "pair" => {
            let mut sv = [-1i32; 2];
            // SAFETY: socketpair writes two ints into `sv`, which we own.
            let rc = unsafe { libc::socketpair(family, ty, protocol, sv.as_mut_ptr()) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(json!({"fds": sv}))
        }
        "compat" => {
            Ok(json!({"fd": from_ret(int80(359, family as u32, ty as u32, protocol as u32, 0))?}))
        }
        "compat-pair" => {
            let page = low_page()?;
            let ret = int80(
                360,
                family as u32,
                ty as u32,
                protocol as u32,
                page as usize as u32,
            );
            Ok(json!({"ret": from_ret(ret)?}))
        }
        "socketcall" => {
            let page = low_page()?;
            let args = [family as u32, ty as u32, protocol as u32];
            // SAFETY: `page` is a writable mapping of at least 12 bytes below 4 GiB.
            unsafe { std::ptr::copy_nonoverlapping(args.as_ptr(), page.cast::<u32>(), 3) };
            let ret = int80(102, 1, page as usize as u32, 0, 0);
            Ok(json!({"fd": from_ret(ret)?}))
        }
        "uring" => {
            use io_uring::{IoUring, opcode};
            let mut ring = IoUring::new(4)?;
            let entry = opcode::Socket::new(family, ty, protocol)
                .build()
                .user_data(7);
            // SAFETY: the entry refers to no memory of ours.
            unsafe { ring.submission().push(&entry) }.map_err(std::io::Error::other)?;
            ring.submit_and_wait(1)?;
            let cqe = ring
                .completion()
                .next()
                .ok_or_else(|| std::io::Error::other("no completion"))?;
            Ok(json!({"fd": from_ret(cqe.result())?}))
        }
        other => Err(std::io::Error::other(format!("unknown route {other}"))),
    }
}

/// A page below 4 GiB (32-bit syscalls take 32-bit pointers).
fn low_page() -> std::io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

fn socketcall_race(count: u32, max_secs: u64) -> std::io::Result<Value> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let page = low_page()?;
    let words = page.cast::<u32>();
    let args = [libc::AF_INET as u32, libc::SOCK_DGRAM as u32, 0];
    // SAFETY: `page` is a writable mapping of at least 12 bytes below 4 GiB.
    unsafe { std::ptr::copy_nonoverlapping(args.as_ptr(), words, 3) };
    let addr = words as usize;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let started = std::sync::Arc::new(AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        let started = started.clone();
        std::thread::spawn(move || {
            let family = addr as *mut u32;
            let mut i = 0u32;
            started.store(true, Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) {
                let f = if i.is_multiple_of(2) {
                    libc::AF_PACKET
                } else {
                    libc::AF_INET
                };
                // SAFETY: the mapping lives until the process exits; racing writes to it
                // are the point (the kernel copies it with copy_from_user).
                unsafe { std::ptr::write_volatile(family, f as u32) };
                i = i.wrapping_add(1);
            }
        })
    };
    while !started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let (mut packet, mut inet, mut calls) = (0u32, 0u32, 0u32);
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        calls += 1;
        let fd = int80(102, 1, addr as u32, 0, 0);
        if fd < 0 {
            continue;
        }
        let mut domain: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes an int into `domain`; close takes an fd we own.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&mut domain as *mut libc::c_int).cast(),
                &mut len,
            );
            libc::close(fd);
        }
        if domain == libc::AF_PACKET {
            packet += 1;
        } else {
            inet += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flipper.join();
    Ok(json!({"calls": calls, "packet_sockets": packet, "inet_sockets": inet}))
}

fn leave(procs: &str, addr: SocketAddr) -> std::io::Result<Value> {
    std::fs::write(procs, std::process::id().to_string())?;
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let me = tcp(addr, None);
    // A child forked after the move, exec'ing nothing: same code path as the parent.
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["tcp", &addr.to_string()])
        .output()?;
    let child_out: Value = serde_json::from_slice(&child.stdout)
        .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&child.stdout)}));
    Ok(json!({
        "cgroup_after_move": own.trim(),
        "parent": match me { Ok(v) => json!({"ok": true, "names": v}), Err(e) => json!({"ok": false, "err": errno_of(&e)}) },
        "child": child_out,
    }))
}

fn hold(addr: SocketAddr) -> Result<()> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let mut m = base("hold");
    match s.connect_timeout(&addr.into(), Duration::from_secs(3)) {
        Ok(()) => {
            m.insert("ok".into(), true.into());
            m.insert("names".into(), names(&s));
        }
        Err(e) => {
            m.insert("ok".into(), false.into());
            m.insert("err".into(), errno_of(&e));
            out(Value::Object(m));
            return Ok(());
        }
    }
    out(Value::Object(m));
    let mut stream: std::net::TcpStream = s.into();
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "send" => {
                let r = stream.write_all(&[b'x'; 64]).and_then(|_| stream.flush());
                out(json!({"probe": "hold-send", "ok": r.is_ok()}));
            }
            _ => break,
        }
    }
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn bench_connect(addr: SocketAddr, count: u32, max_secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut samples = Vec::with_capacity(count as usize);
    let mut errors = 0u32;
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // Avoid TIME_WAIT port exhaustion on the client side across thousands of runs.
        s.set_linger(Some(Duration::ZERO))?;
        let t = Instant::now();
        let r = s.connect(&addr.into());
        let dt = t.elapsed().as_nanos() as u64;
        match r {
            Ok(()) => samples.push(dt),
            Err(_) => errors += 1,
        }
    }
    samples.sort_unstable();
    out(json!({
        "probe": "bench-connect", "addr": addr.to_string(), "n": samples.len(), "errors": errors,
        "p50_ns": percentile(&samples, 0.50), "p99_ns": percentile(&samples, 0.99),
        "mean_ns": if samples.is_empty() { 0 } else { samples.iter().sum::<u64>() / samples.len() as u64 },
    }));
    Ok(())
}

fn bench_events(addr: SocketAddr, count: u32, max_secs: u64) -> Result<()> {
    let s = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let t = Instant::now();
    let mut refused = 0u32;
    let mut sent = 0u32;
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        match s.send_to(b"x", addr) {
            Ok(_) => sent += 1,
            Err(_) => refused += 1,
        }
    }
    out(
        json!({"probe": "bench-events", "refused": refused, "sent": sent, "elapsed_ns": t.elapsed().as_nanos() as u64}),
    );
    Ok(())
}

fn bench_ops(op: &str, addr: Option<SocketAddr>, count: u32, max_secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let need = || addr.context("this op needs --addr");
    let udp = if op == "udp" {
        let a = need()?;
        Some(UdpSocket::bind(if a.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?)
    } else {
        None
    };
    let t = Instant::now();
    let (mut done, mut errors) = (0u32, 0u32);
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let ok = match op {
            "syscall" => std::os::unix::process::parent_id() > 0,
            "socket" => Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).is_ok(),
            "udp" => match &udp {
                Some(s) => s.send_to(b"x", need()?).is_ok(),
                None => false,
            },
            "connect" => {
                let a = need()?;
                let s = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))?;
                s.set_linger(Some(Duration::ZERO))?;
                s.connect(&a.into()).is_ok()
            }
            "fork" => std::process::Command::new("/bin/true")
                .status()
                .is_ok_and(|s| s.success()),
            other => bail!("unknown op `{other}`: syscall, socket, udp, connect, fork"),
        };
        done += 1;
        if !ok {
            errors += 1;
        }
    }
    out(
        json!({"probe": "bench-ops", "op": op, "n": done, "errors": errors,
        "elapsed_ns": t.elapsed().as_nanos() as u64}),
    );
    Ok(())
}

fn serve(log: &str, addrs: &[SocketAddr]) -> Result<()> {
    let logf = std::sync::Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| log.to_string())?,
    ));
    let write = move |v: Value| {
        let mut f = logf.lock().unwrap();
        let _ = writeln!(f, "{v}");
    };
    let mut handles = Vec::new();
    for &a in addrs {
        let s = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if a.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&a.into()).with_context(|| format!("bind tcp {a}"))?;
        s.listen(128)?;
        let l: TcpListener = s.into();
        let w = write.clone();
        handles.push(std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                w(json!({"event": "accept", "listen": a.to_string(), "peer": peer}));
                let w2 = w.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        w2(json!({"event": "data", "listen": a.to_string(), "peer": peer, "bytes": n}));
                    }
                });
            }
        }));
        let u = UdpSocket::bind(a).with_context(|| format!("bind udp {a}"))?;
        let w = write.clone();
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = u.recv_from(&mut buf) {
                w(json!({"event": "datagram", "listen": a.to_string(), "peer": peer.to_string(), "bytes": n}));
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
    bail!("all listeners stopped")
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Tcp { addr, bind_port } => finish(base("tcp"), tcp(addr, bind_port)),
        Cmd::TcpMapped { addr } => finish(base("tcp-mapped"), tcp_mapped(addr)),
        Cmd::Udp { addr } => finish(base("udp"), udp(addr)),
        Cmd::UdpConnect { addr } => finish(base("udp-connect"), udp_connect(addr)),
        Cmd::Tfo { addr } => finish(base("tfo"), tfo(addr)),
        Cmd::Uring { addr } => finish(base("uring"), uring(addr)),
        Cmd::Raw { addr } => finish(base("raw"), raw(addr)),
        Cmd::Packet => finish(base("packet"), packet()),
        Cmd::SocketcallRace { count, max_secs } => {
            finish(base("socketcall-race"), socketcall_race(count, max_secs))
        }
        Cmd::Socket {
            route,
            family,
            sock_type,
            protocol,
            protocol_be,
        } => {
            let protocol = if protocol_be {
                (protocol as u16).to_be() as i32
            } else {
                protocol
            };
            finish(
                base("socket"),
                socket_route(&route, family, sock_type, protocol),
            )
        }
        Cmd::Leave { procs, addr } => finish(base("leave"), leave(&procs, addr)),
        Cmd::Hold { addr } => hold(addr)?,
        Cmd::BenchConnect {
            addr,
            count,
            max_secs,
        } => bench_connect(addr, count, max_secs)?,
        Cmd::BenchEvents {
            addr,
            count,
            max_secs,
        } => bench_events(addr, count, max_secs)?,
        Cmd::BenchOps {
            op,
            addr,
            count,
            max_secs,
        } => bench_ops(&op, addr, count, max_secs)?,
        Cmd::Serve { log, addrs } => serve(&log, &addrs)?,
    }
    Ok(())
}
