//! Where kernel functions are: `[start, end)` of built-in text symbols from
//! /proc/kallsyms, for the packet-socket fallback guard (which tells its callers apart
//! by return addresses on the kernel stack).
use std::path::Path;

/// `[start, end)` of the built-in kernel function `name`, or why it is not known: not
/// present (not built in: a module's addresses change when it is reloaded, so modules
/// are not used), or addresses hidden (`kernel.kptr_restrict`, missing CAP_SYSLOG).
pub fn function_range(kallsyms: &str, name: &str) -> Result<(u64, u64), String> {
    let mut start = None;
    let mut hidden = true;
    let mut addrs = Vec::new();
    for line in kallsyms.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(addr), Some(kind), Some(sym)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        if addr != 0 {
            hidden = false;
        }
        // Modules' symbols carry a `[module]` column; only the kernel image counts.
        if f.next().is_some() {
            continue;
        }
        addrs.push(addr);
        if sym == name && matches!(kind, "t" | "T") {
            start = Some(addr);
        }
    }
    if hidden {
        return Err("kernel addresses are hidden (kernel.kptr_restrict)".into());
    }
    let start = start.ok_or_else(|| format!("`{name}` is not a built-in kernel function"))?;
    // The next symbol above it (whatever its kind) ends it.
    let end = addrs
        .iter()
        .copied()
        .filter(|&a| a > start)
        .min()
        .ok_or_else(|| format!("`{name}` is the last symbol: its end is unknown"))?;
    Ok((start, end))
}

/// The ranges the packet-socket fallback guard matches, in its layout:
/// `[packet_create start, end, xsk_create start, end]`. All zero when `packet_create`
/// is not known (the guard then treats every granted CAP_NET_RAW check of an agent as
/// a packet socket); the AF_XDP pair zero when AF_XDP is not built in (then no AF_XDP
/// socket can be created at all).
pub fn link_layer_creators(path: &Path) -> Result<[u64; 4], String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (p0, p1) = function_range(&text, "packet_create")?;
    let (x0, x1) = function_range(&text, "xsk_create").unwrap_or((0, 0));
    Ok([p0, p1, x0, x1])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff8214a6f0 t __pfx_packet_create
ffffffff8214a700 t packet_create
ffffffff8214aa10 t __pfx_packet_sock_destruct
ffffffff8214aa20 t packet_sock_destruct
ffffffff82194480 t xsk_create
ffffffff821946c0 T xsk_something
ffffffffc0001000 t mod_create\t[some_mod]
ffffffffc0002000 t mod_next\t[some_mod]
ffffffff8214a800 d packet_data_in_between
";

    #[test]
    fn a_function_ends_at_the_next_symbol_of_any_kind() {
        assert_eq!(
            function_range(SAMPLE, "packet_create"),
            Ok((0xffffffff8214a700, 0xffffffff8214a800))
        );
        assert_eq!(
            function_range(SAMPLE, "xsk_create"),
            Ok((0xffffffff82194480, 0xffffffff821946c0))
        );
    }

    #[test]
    fn modules_hidden_addresses_and_missing_functions_are_refused() {
        let e = function_range(SAMPLE, "mod_create").unwrap_err();
        assert!(e.contains("not a built-in"), "{e}");
        let e = function_range(SAMPLE, "nope").unwrap_err();
        assert!(e.contains("not a built-in"), "{e}");
        let hidden = "0000000000000000 t packet_create\n0000000000000000 t other\n";
        let e = function_range(hidden, "packet_create").unwrap_err();
        assert!(e.contains("hidden"), "{e}");
        // Data symbols do not count as the function.
        let e = function_range(SAMPLE, "packet_data_in_between").unwrap_err();
        assert!(e.contains("not a built-in"), "{e}");
    }

    #[test]
    fn this_kernels_packet_create_is_found_when_addresses_are_visible() {
        // Only meaningful where /proc/kallsyms shows addresses (root, kptr_restrict < 2).
        let Ok(text) = std::fs::read_to_string("/proc/kallsyms") else {
            return;
        };
        match function_range(&text, "packet_create") {
            Ok((s, e)) => assert!(s < e && e - s < 64 * 1024, "{s:x}..{e:x}"),
            Err(e) => assert!(
                e.contains("hidden") || e.contains("not a built-in"),
                "unexpected: {e}"
            ),
        }
    }
}
