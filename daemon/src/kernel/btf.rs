//! Offsets into kernel structures, read from the running kernel's BTF. The Rust eBPF
//! toolchain has no CO-RE field relocations, so the offsets the programs need are
//! resolved here and handed over in the settings map: `task_struct.tgid` for the fork
//! tracker.
use btf_rs::{Btf, BtfType, Type};

use super::KernelError;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The running kernel's BTF, asked for member offsets by name.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<KernelBtf, KernelError> {
        let btf = Btf::from_file(VMLINUX_BTF)
            .map_err(|e| KernelError::Btf(format!("{VMLINUX_BTF}: {e}")))?;
        Ok(KernelBtf { btf })
    }

    /// Byte offset of `path` (members separated by dots, e.g. `__sk_common.skc_family`)
    /// inside `struct NAME`, looking through anonymous struct/union members.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32, KernelError> {
        let err = |m: String| KernelError::Btf(format!("{name}.{path}: {m}"));
        let mut current = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|e| err(e.to_string()))?
            .into_iter()
            .find_map(|t| match t {
                // Skip forward declarations: the definition has members.
                Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| err("no such struct".into()))?;
        let mut bits = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (off, member_type) = member_bit_offset(&self.btf, &current, part, 0)
                .ok_or_else(|| err(format!("no member `{part}`")))?;
            bits += off;
            if parts.peek().is_some() {
                current = match member_type {
                    Some(Type::Struct(s) | Type::Union(s)) => s,
                    _ => return Err(err(format!("`{part}` is not a struct or union"))),
                };
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(err(format!("at bit {bits}, not byte aligned")));
        }
        Ok(bits / 8)
    }

    pub fn task_tgid_offset(&self) -> Result<u32, KernelError> {
        self.offset("task_struct", "tgid")
    }
}

/// Bit offset of `name` in `s` (and the member's type), looking through anonymous
/// struct/union members.
fn member_bit_offset(
    btf: &Btf,
    s: &btf_rs::Struct,
    name: &str,
    base: u32,
) -> Option<(u32, Option<Type>)> {
    for m in &s.members {
        let mname = if m.get_name_offset().is_some_and(|o| o != 0) {
            btf.resolve_name(m).unwrap_or_default()
        } else {
            String::new()
        };
        if mname == name {
            return Some((base + m.bit_offset(), resolved(btf, m)));
        }
        if mname.is_empty()
            && let Some(Type::Struct(inner) | Type::Union(inner)) = resolved(btf, m)
            && let Some(found) = member_bit_offset(btf, &inner, name, base + m.bit_offset())
        {
            return Some(found);
        }
    }
    None
}

/// A member's type with typedefs and qualifiers looked through.
fn resolved(btf: &Btf, m: &btf_rs::Member) -> Option<Type> {
    let mut t = btf.resolve_chained_type(m).ok()?;
    for _ in 0..16 {
        t = match &t {
            Type::Typedef(x) => btf.resolve_chained_type(x).ok()?,
            Type::Const(x) => btf.resolve_chained_type(x).ok()?,
            Type::Volatile(x) => btf.resolve_chained_type(x).ok()?,
            Type::Restrict(x) => btf.resolve_chained_type(x).ok()?,
            Type::TypeTag(x) => btf.resolve_chained_type(x).ok()?,
            _ => return Some(t),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs where the kernel has BTF (every kernel tier machine); a no-op elsewhere.
    #[test]
    fn resolves_offsets_from_this_kernel() {
        let Ok(k) = KernelBtf::load() else { return };
        let off = |t: &str, m: &str| {
            k.offset(t, m)
                .unwrap_or_else(|e| panic!("{t}.{m} in this kernel's BTF: {e}"))
        };
        // struct socket { socket_state state; short type; unsigned long flags; struct file *file; struct sock *sk; ... }
        assert_eq!(off("socket", "type"), 4);
        assert!(off("socket", "sk") > off("socket", "file"));
        // Through the anonymous struct of sock_common.
        assert_eq!(off("sock", "__sk_common.skc_family"), 16);
        assert!(
            k.task_tgid_offset()
                .expect("task_struct.tgid in this kernel's BTF")
                > 0
        );
        assert!(k.offset("task_struct", "no_such_member").is_err());
    }
}
