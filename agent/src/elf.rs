//! Telling a statically linked program (which LD_PRELOAD cannot reach) from a dynamic one:
//! a dynamic ELF has a PT_INTERP program header naming its loader.

use std::io::Read;
use std::path::Path;

const PT_INTERP: u32 = 3;

/// Some(true) for a static ELF, Some(false) for a dynamic one, None when not ELF (a
/// script, say) or unreadable.
pub fn is_static(path: &Path) -> Option<bool> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.by_ref().take(1 << 20).read_to_end(&mut buf).ok()?;
    if buf.get(..4)? != b"\x7fELF" {
        return None;
    }
    let le = *buf.get(5)? == 1;
    let u16_at = |o: usize| -> Option<u64> {
        let b: [u8; 2] = buf.get(o..o + 2)?.try_into().ok()?;
        Some(if le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        } as u64)
    };
    let u32_at = |o: usize| -> Option<u64> {
        let b: [u8; 4] = buf.get(o..o + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        } as u64)
    };
    let u64_at = |o: usize| -> Option<u64> {
        let b: [u8; 8] = buf.get(o..o + 8)?.try_into().ok()?;
        Some(if le {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let (phoff, entsize, num) = match buf.get(4)? {
        2 => (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?),
        1 => (u32_at(0x1c)?, u16_at(0x2a)?, u16_at(0x2c)?),
        _ => return None,
    };
    let interp = (0..num).any(|i| {
        let at = (phoff + i * entsize) as usize;
        u32_at(at) == Some(PT_INTERP as u64)
    });
    Some(!interp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_dynamic_from_not_elf() {
        assert_eq!(is_static(Path::new("/bin/sh")), Some(false));
        let script = std::env::temp_dir().join(format!("mig-elf-{}", std::process::id()));
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(is_static(&script), None);
        std::fs::remove_file(script).unwrap();
    }
}
