//! CRC32C (Castagnoli) digests for iSCSI headers and data (RFC 7143 13.1).
//! The value travels least-significant byte first, as Linux and libiscsi
//! send it.

/// CRC32C over several slices as if they were one.
pub fn crc32c_parts(parts: &[&[u8]]) -> u32 {
    let mut crc = 0u32;
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    crc
}

/// CRC32C of what `crc` covered followed by `data`, for a digest
/// computed as the data arrives.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_value() {
        assert_eq!(super::crc32c_parts(&[b"123456789"]), 0xe306_9283);
        assert_eq!(super::crc32c_parts(&[b"1234", b"56789"]), 0xe306_9283);
    }
}
