//! Plain `#[repr(C)]` types shared by the Portcullis kernel programs (`ebpf/`) and the
//! daemon. Everything here is `no_std` and free of pointers so the same bytes mean the
//! same thing on both sides of a BPF map or ring buffer.
//!
//! Conventions:
//! - Addresses are 16 bytes in network byte order. IPv4 is stored IPv4-mapped
//!   (`::ffff:a.b.c.d`) so one key type serves both families and a v4-mapped IPv6
//!   connect to a protected IPv4 endpoint matches the same key.
//! - Ports are in host byte order.
//! - Every struct has explicit padding fields so no byte of a map key is undefined.
#![cfg_attr(not(test), no_std)]

#[cfg(feature = "user")]
mod user;

/// How many cgroup levels the kernel programs walk upwards looking for an enrolled
/// ancestor. Kubernetes pod cgroups sit 3-5 levels deep; 32 leaves room for nesting.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Names of the maps, shared so the daemon can find their pins in bpffs.
pub mod maps {
    /// Enrolled agent cgroups: `u64` cgroup id -> [`super::Enrollment`].
    pub const AGENT_CGROUPS: &str = "PC_AGENT_CGROUPS";
    /// Protected endpoints: [`super::SockKey`] -> [`super::Protection`].
    pub const PROTECTED: &str = "PC_PROTECTED";
    /// Single-slot array holding [`super::Settings`].
    pub const SETTINGS: &str = "PC_SETTINGS";
    /// Socket cookie -> [`super::ConnRecord`], written at connect time, removed when
    /// the socket is released (getpeername answers from it).
    pub const CONN_BY_COOKIE: &str = "PC_CONN_BY_COOKIE";
    /// Agent's local address -> a copy of its [`super::ConnRecord`], written when the
    /// connection's SYN leaves (the egress program). The daemon takes the entry on accept; it outlives the agent's
    /// socket, so a client that closes before the daemon accepts is still attributed.
    pub const CONN_BY_CLIENT: &str = "PC_CONN_BY_CLIENT";
    /// Processes that were ever seen inside an agent cgroup: tgid -> [`super::StickyAgent`].
    pub const STICKY_TASKS: &str = "PC_STICKY_TASKS";
    /// Ring buffer of [`super::Event`].
    pub const EVENTS: &str = "PC_EVENTS";
    /// Per-CPU event budget and counts: [`super::EventCountKey`] -> [`super::EventCount`].
    pub const EVENT_COUNTS: &str = "PC_EVENT_COUNTS";
}

/// Layout version of the pinned maps. Pins made by a build with another layout cannot
/// be reused; the daemon refuses to start on them and says what to do.
pub const MAPS_LAYOUT: u32 = 4;

/// Every map layout this crate has recorded, oldest first: (`MAPS_LAYOUT`, the
/// [`layout::fingerprint`] of the pinned types in that layout). The build fails unless
/// the last row is the current version and the types' current fingerprint, so a
/// field reordered, resized, added or removed in a pinned type cannot build without a
/// new version. To change a pinned type: bump `MAPS_LAYOUT` and append a row with the
/// new fingerprint (`cargo test -p portcullis-common layout -- --nocapture` prints it).
/// Never edit a row.
pub const MAPS_LAYOUTS: &[(u32, u64)] = &[(3, 0x356e_6f9b_7c98_a0d9), (4, 0xea4f_3a86_974d_f90d)];

const _: () = {
    let mut i = 1;
    while i < MAPS_LAYOUTS.len() {
        assert!(
            MAPS_LAYOUTS[i].0 > MAPS_LAYOUTS[i - 1].0,
            "MAPS_LAYOUTS: versions must increase"
        );
        assert!(
            MAPS_LAYOUTS[i].1 != MAPS_LAYOUTS[i - 1].1,
            "MAPS_LAYOUTS: a new version must record a new layout"
        );
        i += 1;
    }
    let (version, recorded) = MAPS_LAYOUTS[MAPS_LAYOUTS.len() - 1];
    assert!(
        version == MAPS_LAYOUT,
        "MAPS_LAYOUT has no row in MAPS_LAYOUTS: append (MAPS_LAYOUT, fingerprint)"
    );
    assert!(
        recorded == layout::fingerprint(),
        "a pinned map type changed layout: bump MAPS_LAYOUT and append its fingerprint to MAPS_LAYOUTS (see its docs)"
    );
};

/// The layout of every type stored in a pinned map or sent on the ring buffer, as a
/// number: each type's size and alignment, each field's offset and size.
pub mod layout {
    use core::mem::{align_of, offset_of, size_of};

    use super::{
        ConnRecord, Enrollment, Event, EventCount, EventCountKey, GuardOffsets, Origin, Protection,
        Settings, SockKey, StickyAgent,
    };

    /// FNV-1a, one 64-bit number at a time.
    const fn mix(h: u64, v: u64) -> u64 {
        let bytes = v.to_le_bytes();
        let mut h = h;
        let mut i = 0;
        while i < bytes.len() {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        h
    }

    /// The size of the field `f` selects (its type is never named, so a change of
    /// type cannot be missed here).
    const fn field_size<T, F>(_f: fn(&T) -> &F) -> usize {
        size_of::<F>()
    }

    /// Mixes in a type's size and alignment, then each listed field's offset and size.
    macro_rules! mix_type {
        ($h:expr, $t:ident { $($f:ident),+ $(,)? }) => {{
            let mut h = mix($h, size_of::<$t>() as u64);
            h = mix(h, align_of::<$t>() as u64);
            $(
                h = mix(h, offset_of!($t, $f) as u64);
                h = mix(h, field_size(|v: &$t| &v.$f) as u64);
            )+
            h
        }};
    }

    /// The fingerprint of the current layout (see [`super::MAPS_LAYOUTS`]).
    pub const fn fingerprint() -> u64 {
        let h = 0xcbf2_9ce4_8422_2325;
        let h = mix_type!(h, SockKey { addr, port, _pad });
        let h = mix_type!(h, Protection { id, flags });
        let h = mix_type!(h, Enrollment { enrolled_at });
        let h = mix_type!(h, StickyAgent { agent_cgroup });
        let h = mix_type!(
            h,
            GuardOffsets {
                task_files,
                files_fdt,
                fdt_max_fds,
                fdt_fd,
                file_private_data,
                socket_type,
                socket_file,
                socket_sk,
                sk_family,
                thread_status,
                uring_opcode,
                uring_cmd,
                uring_sock_domain,
                uring_sock_type,
                uring_sock_protocol,
                uring_op_socket
            }
        );
        let h = mix_type!(
            h,
            Settings {
                daemon_v4,
                daemon_v6,
                flags,
                task_tgid_offset,
                offsets
            }
        );
        let h = mix_type!(
            h,
            EventCountKey {
                agent_cgroup,
                kind,
                hook
            }
        );
        let h = mix_type!(
            h,
            EventCount {
                window_start_ns,
                in_window,
                _pad,
                emitted,
                suppressed,
                first_ns,
                last_ns
            }
        );
        let h = mix_type!(
            h,
            Origin {
                cgroup_id,
                agent_cgroup_id,
                netns_cookie,
                tgid,
                pid,
                uid,
                gid,
                comm
            }
        );
        let h = mix_type!(
            h,
            ConnRecord {
                original_dst,
                origin,
                socket_cookie,
                ktime_ns
            }
        );
        mix_type!(
            h,
            Event {
                kind,
                hook,
                origin,
                dst,
                redirected_to,
                family,
                sock_type,
                protocol,
                _pad,
                socket_cookie,
                ktime_ns
            }
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// `cargo test -p portcullis-common layout -- --nocapture`: the value to record.
        #[test]
        fn layout_fingerprint_is_recorded() {
            std::println!("layout fingerprint: {:#018x}", fingerprint());
            assert_eq!(
                super::super::MAPS_LAYOUTS.last().map(|r| r.1),
                Some(fingerprint())
            );
        }

        #[test]
        fn a_moved_field_changes_the_fingerprint() {
            #[allow(dead_code)]
            #[repr(C)]
            struct A {
                x: u32,
                y: u64,
            }
            #[allow(dead_code)]
            #[repr(C)]
            struct B {
                y: u64,
                x: u32,
            }
            let a = mix_type!(1, A { x, y });
            let b = mix_type!(1, B { x, y });
            assert_ne!(a, b);
        }
    }
}

/// Size of the event ring buffer in bytes (power of two, multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 4 << 20;
/// Capacity of the per-connection maps. LRU: the oldest entries go first if a burst of
/// connections outruns the daemon; the daemon deletes entries as it consumes them.
pub const CONN_MAP_ENTRIES: u32 = 65_536;
pub const AGENT_CGROUP_ENTRIES: u32 = 16_384;
pub const PROTECTED_ENTRIES: u32 = 1_024;
pub const STICKY_TASK_ENTRIES: u32 = 65_536;

/// `AF_INET` / `AF_INET6` as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// An address + port, used both as a map key (protected endpoints, client tuples) and
/// inside records.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct SockKey {
    /// Network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host byte order. In the protected map, 0 means "every port of this address".
    pub port: u16,
    pub _pad: u16,
}

impl SockKey {
    pub const fn from_v4(octets: [u8; 4], port: u16) -> Self {
        let [a, b, c, d] = octets;
        SockKey {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
            port,
            _pad: 0,
        }
    }

    pub const fn from_v6(addr: [u8; 16], port: u16) -> Self {
        SockKey {
            addr,
            port,
            _pad: 0,
        }
    }

    /// True when the address is an IPv4 address (stored IPv4-mapped).
    pub const fn is_v4(&self) -> bool {
        let a = &self.addr;
        a[0] == 0
            && a[1] == 0
            && a[2] == 0
            && a[3] == 0
            && a[4] == 0
            && a[5] == 0
            && a[6] == 0
            && a[7] == 0
            && a[8] == 0
            && a[9] == 0
            && a[10] == 0xff
            && a[11] == 0xff
    }

    pub const fn v4_octets(&self) -> [u8; 4] {
        [self.addr[12], self.addr[13], self.addr[14], self.addr[15]]
    }

    pub const fn with_port(&self, port: u16) -> Self {
        SockKey {
            addr: self.addr,
            port,
            _pad: 0,
        }
    }
}

/// Value of the protected-endpoints map.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Protection {
    /// Free-form id chosen by the daemon (index in its config) so events can name the rule.
    pub id: u32,
    /// [`protection_flags`]. (Was padding, always 0: same layout, 0 = redirect.)
    pub flags: u32,
}

/// Flags in [`Protection::flags`].
pub mod protection_flags {
    /// Refuse agents' connections (and datagrams) instead of redirecting them to the
    /// daemon: the kubelet's port of every node, every other port of this node.
    pub const REFUSE: u32 = 1 << 0;
}

/// Value of the agent-cgroups map.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Enrollment {
    /// Wall-clock seconds at enrollment, for `portcullis status`.
    pub enrolled_at: u64,
}

/// Value of the sticky-tasks map: a process that was seen in an agent cgroup stays an
/// agent (and so do its children) even if it moves itself to another cgroup.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct StickyAgent {
    /// The enrolled cgroup the process was first seen in.
    pub agent_cgroup: u64,
}

/// Flags in [`Settings::flags`].
pub mod settings_flags {
    /// The daemon has an IPv4 listen address: redirect IPv4 (and v4-mapped) connects.
    pub const HAVE_DAEMON_V4: u32 = 1 << 0;
    /// The daemon has an IPv6 listen address: redirect native IPv6 connects.
    pub const HAVE_DAEMON_V6: u32 = 1 << 1;
    /// Offsets for the fork tracker were resolved from kernel BTF.
    pub const HAVE_TASK_OFFSETS: u32 = 1 << 2;
    // Bits 3 and 4 were the offsets of earlier builds' packet-socket fallback (see
    // [`super::GuardOffsets`]); not reused, so an old object never misreads a new flag.
}

/// Byte offsets into kernel structures that earlier builds' packet-socket fallback
/// (`sys_enter`/`sys_exit`/io_uring tracepoints) read. No program reads them since the
/// fallback moved to the `cap_capable` tracepoint; the struct stays in [`Settings`]
/// so the pinned settings map keeps its layout ([`MAPS_LAYOUT`]) across the upgrade.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct GuardOffsets {
    /// `task_struct.files`
    pub task_files: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.private_data` (a `struct socket *` for a socket file)
    pub file_private_data: u32,
    /// `socket.type`
    pub socket_type: u32,
    /// `socket.file` (points back at the file: proves `private_data` is a socket)
    pub socket_file: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`
    pub sk_family: u32,
    /// `task_struct.thread_info.status` (x86 `TS_COMPAT`: a 32-bit syscall)
    pub thread_status: u32,
    /// `io_kiocb.opcode`
    pub uring_opcode: u32,
    /// `io_kiocb.cmd` (where an opcode's prepared arguments live)
    pub uring_cmd: u32,
    /// `io_socket.domain`, `.type`, `.protocol`
    pub uring_sock_domain: u32,
    pub uring_sock_type: u32,
    pub uring_sock_protocol: u32,
    /// The value of `IORING_OP_SOCKET` in this kernel's `enum io_uring_op`.
    pub uring_op_socket: u32,
}

/// Socket families and types that reach the link layer directly (packet sockets),
/// bypassing every IP-level hook. Shared so the kernel guard and the tests agree.
pub mod packet {
    pub const AF_INET: i32 = 2;
    pub const AF_PACKET: i32 = 17;
    pub const AF_XDP: i32 = 44;
    /// Obsolete packet type: `socket(AF_INET, SOCK_PACKET, ...)` is turned into a
    /// `PF_PACKET` socket inside `__sock_create`.
    pub const SOCK_PACKET: i32 = 10;
    /// `type` may carry `SOCK_NONBLOCK` / `SOCK_CLOEXEC` above these bits.
    pub const SOCK_TYPE_MASK: i32 = 0xf;

    /// The family the kernel creates the socket in for these `socket()` arguments.
    pub const fn final_family(family: i32, sock_type: i32) -> i32 {
        if family == AF_INET && sock_type & SOCK_TYPE_MASK == SOCK_PACKET {
            AF_PACKET
        } else {
            family
        }
    }

    /// A family whose sockets send frames below IP.
    pub const fn is_link_layer(family: i32) -> bool {
        family == AF_PACKET || family == AF_XDP
    }

    /// Would `socket(family, type, ...)` create a packet socket?
    pub const fn creates_packet_socket(family: i32, sock_type: i32) -> bool {
        is_link_layer(final_family(family, sock_type))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_route_to_a_packet_socket_is_recognised() {
            assert!(creates_packet_socket(AF_PACKET, 3));
            assert!(creates_packet_socket(AF_PACKET, 2));
            assert!(creates_packet_socket(AF_XDP, 3));
            assert!(creates_packet_socket(AF_INET, SOCK_PACKET));
            // SOCK_NONBLOCK | SOCK_CLOEXEC on top of SOCK_PACKET.
            assert!(creates_packet_socket(
                AF_INET,
                SOCK_PACKET | 0o4000 | 0o2000000
            ));
            assert!(!creates_packet_socket(AF_INET, 1));
            assert!(!creates_packet_socket(AF_INET, 3));
            // Only PF_INET is rewritten; AF_INET6 + SOCK_PACKET fails in inet6_create.
            assert!(!creates_packet_socket(10, SOCK_PACKET));
        }
    }
}

/// Written by the daemon into the single-slot `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Settings {
    pub daemon_v4: SockKey,
    pub daemon_v6: SockKey,
    pub flags: u32,
    /// Byte offset of `tgid` in the kernel's `struct task_struct`, from BTF.
    pub task_tgid_offset: u32,
    pub offsets: GuardOffsets,
}

/// Key of the event-budget map: one budget per enrolled cgroup, event kind and hook.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct EventCountKey {
    pub agent_cgroup: u64,
    pub kind: u32,
    pub hook: u32,
}

/// How many events of one key the programs saw (per CPU: the daemon sums the CPUs).
/// Each CPU sends at most [`EVENT_BUDGET_PER_WINDOW`] events of a key to the ring
/// buffer per [`EVENT_WINDOW_NS`]; the rest are only counted here, and the daemon
/// writes them as aggregated records (count, first and last time).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct EventCount {
    /// `bpf_ktime_get_boot_ns` when this CPU's current window began.
    pub window_start_ns: u64,
    /// Events of this key in the current window on this CPU.
    pub in_window: u32,
    pub _pad: u32,
    /// Sent to the ring buffer (or tried: a full ring drops them).
    pub emitted: u64,
    /// Over budget: counted here, never sent one by one.
    pub suppressed: u64,
    /// First and last event of this key on this CPU.
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Length of an event-budget window.
pub const EVENT_WINDOW_NS: u64 = 1_000_000_000;
/// Events of one (cgroup, kind, hook) sent one by one per window and CPU.
pub const EVENT_BUDGET_PER_WINDOW: u32 = 20;
/// Capacity of the event-budget map (LRU: the least recently active keys go first).
pub const EVENT_COUNT_ENTRIES: u32 = 4_096;

/// Who made a socket operation, as the kernel saw it. Nothing here comes from the agent.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Origin {
    /// The cgroup the process was in (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// The enrolled agent cgroup that made this an agent socket (the cgroup itself or an
    /// ancestor), or the cgroup recorded for a sticky process.
    pub agent_cgroup_id: u64,
    /// Network namespace cookie of the socket (0 where the hook cannot tell).
    pub netns_cookie: u64,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: [u8; 16],
}

/// What the kernel recorded when it redirected a connection to the daemon.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ConnRecord {
    /// Where the agent tried to connect.
    pub original_dst: SockKey,
    pub origin: Origin,
    pub socket_cookie: u64,
    /// `bpf_ktime_get_boot_ns` at connect.
    pub ktime_ns: u64,
}

/// Kinds of events on the ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EventKind {
    /// A TCP connect to a protected endpoint was rewritten to the daemon.
    Redirected = 1,
    /// A connect to a protected endpoint was refused (non-TCP socket, or no daemon
    /// address for the family).
    ConnectRefused = 2,
    /// A UDP/QUIC datagram to a protected endpoint was refused (sendmsg hook).
    DatagramRefused = 3,
    /// A raw socket was refused at creation (cgroup/sock_create).
    RawSocketRefused = 4,
    /// A packet socket (AF_PACKET) was refused at creation (BPF LSM socket_create).
    PacketSocketRefused = 5,
    /// The egress backstop dropped a packet to a protected endpoint.
    EgressDropped = 6,
    /// A process that left its agent cgroup was still treated as an agent.
    StickyAgentSeen = 7,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<EventKind> {
        Some(match v {
            1 => EventKind::Redirected,
            2 => EventKind::ConnectRefused,
            3 => EventKind::DatagramRefused,
            4 => EventKind::RawSocketRefused,
            5 => EventKind::PacketSocketRefused,
            6 => EventKind::EgressDropped,
            7 => EventKind::StickyAgentSeen,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Redirected => "redirected",
            EventKind::ConnectRefused => "connect_refused",
            EventKind::DatagramRefused => "datagram_refused",
            EventKind::RawSocketRefused => "raw_socket_refused",
            EventKind::PacketSocketRefused => "packet_socket_refused",
            EventKind::EgressDropped => "egress_dropped",
            EventKind::StickyAgentSeen => "sticky_agent_seen",
        }
    }
}

/// Which hook produced an event.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    SockCreate = 5,
    LsmSocketCreate = 6,
    SkbEgress = 7,
    /// Earlier builds' fallback for packet sockets (the caller killed at `sys_enter`);
    /// still decoded, for events of a pinned older object during a replace.
    SysEnterSocket = 8,
    /// Earlier builds' fallback at `sys_exit`.
    SysExitSocket = 9,
    /// Earlier builds' fallback for `IORING_OP_SOCKET`, at submission.
    IoUringSocket = 10,
    /// Fallback for packet sockets where BPF LSM is unavailable (the caller is killed):
    /// the CAP_NET_RAW check inside `packet_create`/`xsk_create`, every route.
    CapNetRaw = 11,
}

impl Hook {
    pub const fn from_u32(v: u32) -> Option<Hook> {
        Some(match v {
            1 => Hook::Connect4,
            2 => Hook::Connect6,
            3 => Hook::Sendmsg4,
            4 => Hook::Sendmsg6,
            5 => Hook::SockCreate,
            6 => Hook::LsmSocketCreate,
            7 => Hook::SkbEgress,
            8 => Hook::SysEnterSocket,
            9 => Hook::SysExitSocket,
            10 => Hook::IoUringSocket,
            11 => Hook::CapNetRaw,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "cgroup/connect4",
            Hook::Connect6 => "cgroup/connect6",
            Hook::Sendmsg4 => "cgroup/sendmsg4",
            Hook::Sendmsg6 => "cgroup/sendmsg6",
            Hook::SockCreate => "cgroup/sock_create",
            Hook::LsmSocketCreate => "lsm/socket_create",
            Hook::SkbEgress => "cgroup_skb/egress",
            Hook::SysEnterSocket => "tp_btf/sys_enter (SIGKILL)",
            Hook::SysExitSocket => "tp_btf/sys_exit (SIGKILL)",
            Hook::IoUringSocket => "tp_btf/io_uring_submit_req (SIGKILL)",
            Hook::CapNetRaw => "tp_btf/cap_capable (SIGKILL)",
        }
    }
}

/// One ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Event {
    /// [`EventKind`] as u32 (an enum read from a map must not be trusted to be valid).
    pub kind: u32,
    /// [`Hook`] as u32.
    pub hook: u32,
    pub origin: Origin,
    /// The destination the agent attempted (zero for socket-creation events).
    pub dst: SockKey,
    /// Where the connection was sent instead (redirects only).
    pub redirected_to: SockKey,
    /// Socket family, type and protocol as the hook saw them.
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    pub _pad: u32,
    pub socket_cookie: u64,
    pub ktime_ns: u64,
}
