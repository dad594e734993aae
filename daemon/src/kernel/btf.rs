//! Offsets into kernel structures, read from the running kernel's BTF. The Rust eBPF
//! toolchain has no CO-RE field relocations, so the one offset the programs need
//! (`task_struct.tgid`, for the fork tracker) is resolved here and handed over in the
//! settings map.
use btf_rs::{Btf, BtfType, Type};

use super::KernelError;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn task_tgid_offset() -> Result<u32, KernelError> {
    let err = |m: String| KernelError::Btf(m);
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| err(format!("{VMLINUX_BTF}: {e}")))?;
    let types = btf
        .resolve_types_by_name("task_struct")
        .map_err(|e| err(format!("task_struct: {e}")))?;
    for t in types {
        if let Type::Struct(s) = t
            && let Some(bits) = member_bit_offset(&btf, &s, "tgid", 0)
        {
            if bits % 8 != 0 {
                return Err(err(format!(
                    "task_struct.tgid at bit {bits} is not byte aligned"
                )));
            }
            return Ok(bits / 8);
        }
    }
    Err(err("task_struct has no tgid member".into()))
}

/// Bit offset of `name` in `s`, looking through anonymous struct/union members.
fn member_bit_offset(btf: &Btf, s: &btf_rs::Struct, name: &str, base: u32) -> Option<u32> {
    for m in &s.members {
        let mname = if m.get_name_offset().is_some_and(|o| o != 0) {
            btf.resolve_name(m).unwrap_or_default()
        } else {
            String::new()
        };
        if mname == name {
            return Some(base + m.bit_offset());
        }
        if mname.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(off) = member_bit_offset(btf, &inner, name, base + m.bit_offset())
        {
            return Some(off);
        }
    }
    None
}
