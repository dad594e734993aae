//! Every `unsafe` block and every libc call of the daemon, each behind a safe function
//! whose contract is checked here (the crate denies `unsafe` everywhere else).
use std::{
    ffi::CString,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::Path,
};

use aya::maps::{MapData, RingBuf};
use portcullis_common::Event;
use tokio::io::{Interest, unix::AsyncFd};

/// The reader of the programs' aya-log ring, logging to the `log` facade.
pub type ProgramLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// A ring-buffer record as an [`Event`]; `None` if it is too short.
pub fn event_from_bytes(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked above; `Event` is plain old data (aya::Pod: every
    // bit pattern is a valid value) and read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// The bytes of an [`Event`], as the kernel writes them (tests).
#[cfg(test)]
pub fn event_bytes(ev: &Event) -> Vec<u8> {
    // SAFETY: `Event` is plain old data with explicit padding fields, so every byte of
    // it is initialised; the slice lives no longer than `ev`.
    unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>()) }
        .to_vec()
}

/// CLOCK_BOOTTIME in nanoseconds: the clock `bpf_ktime_get_boot_ns` reads.
pub fn boottime_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME exists on
    // every kernel this daemon supports (it cannot fail with a valid pointer).
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Whether `path` is on a filesystem whose `statfs` type is `magic`.
pub fn is_fs_type(path: &Path, magic: i64) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == magic
    }
}

/// `mount -t bpf bpf TARGET`.
pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all pointers are valid NUL-terminated strings owned here; mount(2) does
    // not keep them.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the heap's free pages back to the kernel (glibc `malloc_trim(0)`): memory a
/// burst used and freed (10,000 watches opened at once) otherwise stays resident,
/// measured 167 -> 107 MB. True if any memory was released. A no-op elsewhere.
pub fn release_free_heap() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks and trims the allocator's own arenas under
        // their locks; it takes no pointer and is safe to call from any thread.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

/// The daemon's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The event ring buffer, registered with the reactor for readiness.
pub fn readable_ring(ring: RingBuf<MapData>) -> io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the RingBuf owns its map's fd (an OwnedFd inside MapData) for its whole
    // life and always returns that same fd from as_raw_fd, as register requires.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(io::Error::from)
}

/// The programs' log ring (aya-log), registered with the reactor for readiness.
pub fn readable_logger(logger: ProgramLogger) -> io::Result<AsyncFd<ProgramLogger>> {
    // SAFETY: the logger owns its ring buffer map's fd for its whole life and always
    // returns that same fd from as_raw_fd.
    unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }.map_err(io::Error::from)
}

/// `bpf(2)` commands used directly (aya does not expose effective-flag queries or a
/// cgroup link's target).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
/// `enum bpf_link_type`: a cgroup attachment.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-filled 128-byte buffer laid out as the command's
    // `union bpf_attr` member; the kernel reads and writes only within the size given
    // and keeps no pointer to it after returning.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// What the kernel says about a pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFacts {
    pub link_type: u32,
    pub id: u32,
    /// 0 once the link was detached (its program no longer runs).
    pub prog_id: u32,
    /// For a cgroup link: the cgroup it is attached to (0 when detached) and how.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// Opens the link pinned at `path` and reads its info.
pub fn pinned_link_facts(path: &Path) -> io::Result<LinkFacts> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u64; 32];
    let mut attr = [0u64; 16];
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // struct bpf_link_info { u32 type; u32 id; u32 prog_id; union { struct { u64
    // cgroup_id; u32 attach_type; } cgroup; ... } } (the union is 8-byte aligned).
    Ok(LinkFacts {
        link_type: info[0] as u32,
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        cgroup_id: info[2],
        attach_type: info[3] as u32,
    })
}

/// Ids of the programs in effect on `cgroup` for `attach_type` (its own and those
/// inherited from ancestors), as `BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE` says.
pub fn effective_prog_ids(cgroup: &std::fs::File, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 256];
    let mut attr = [0u64; 16];
    // { u32 target_fd; u32 attach_type; u32 query_flags; u32 attach_flags;
    //   u64 prog_ids; u32 prog_cnt; ... }
    attr[0] = (cgroup.as_raw_fd() as u32 as u64) | ((attach_type as u64) << 32);
    attr[1] = BPF_F_QUERY_EFFECTIVE as u64;
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = ids.len() as u64;
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let n = (attr[3] as u32 as usize).min(ids.len());
    ids.truncate(n);
    Ok(ids)
}

/// Raises the soft open-file limit to the hard limit; returns (before, after).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((before, lim.rlim_cur))
    }
}

/// Moves the calling thread into the mount namespace `ns` (an open `/proc/PID/ns/mnt`).
/// The kernel refuses this for a multi-threaded process: call it before any thread
/// (or async runtime) starts.
pub fn enter_mount_namespace(ns: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on a descriptor `ns` owns for the duration of the call; it
    // touches no memory of this process.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// `mount --make-shared TARGET`: mounts below it propagate to the namespaces (and
/// containers) that bind it with propagation.
pub fn make_shared(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated string owned here; null source/fstype/data are
    // what mount(2) expects for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_SHARED,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The addresses of this network namespace's interfaces (getifaddrs(3)).
pub fn interface_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own into `head`; it is freed below with
    // freeifaddrs and no pointer into it outlives this function.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned (non-null checked);
        // ifa_addr is null or points to a sockaddr of the family it names, which is
        // read as the matching sockaddr_in / sockaddr_in6.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_env = "gnu")]
    fn freed_heap_below_live_memory_is_released() {
        // 40 MB of small blocks freed under one that stays: free() alone cannot give
        // them back (they are not at the top of the heap), malloc_trim can.
        let blocks: Vec<Box<[u8; 4096]>> = (0..10_000).map(|_| Box::new([1u8; 4096])).collect();
        let pin = Box::new([2u8; 4096]);
        drop(blocks);
        assert!(super::release_free_heap(), "no free pages were released");
        assert_eq!(pin[0], 2);
    }
}
