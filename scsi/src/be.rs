//! Big-endian fields of CDBs and parameter lists, which SCSI uses
//! throughout. The fixed-width readers index like slices (callers have
//! checked the length); `be_or_zero` reads bytes past the end as zero, for
//! CDB fields of commands whose length the opcode does not pin down.

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// `n` bytes (at most 8) from `at`; bytes past the end of `b` read as 0.
pub(crate) fn be_or_zero(b: &[u8], at: usize, n: usize) -> u64 {
    debug_assert!(n <= 8);
    (at..at + n).fold(0u64, |acc, i| {
        (acc << 8) | b.get(i).copied().unwrap_or(0) as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_big_endian() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(be16(&b, 1), 0x0203);
        assert_eq!(be32(&b, 0), 0x0102_0304);
        assert_eq!(be64(&b, 1), 0x0203_0405_0607_0809);
        assert_eq!(be_or_zero(&b, 7, 4), 0x0809_0000);
        assert_eq!(be_or_zero(&b, 20, 2), 0);
    }
}
