//! Text key=value pairs carried in Login and Text PDUs (RFC 7143 6.1):
//! each pair is `key=value` terminated by a NUL byte.

/// Limits that keep a hostile initiator from making us hold unbounded text.
pub const KEY_LEN_MAX: usize = 63;
pub const VALUE_LEN_MAX: usize = 8192;
/// Total text accepted across continued (C bit) PDUs of one request.
pub const TEXT_LEN_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextError {
    /// A pair without '='.
    NoEquals,
    KeyTooLong,
    ValueTooLong,
    NotUtf8,
    TooLong,
}

/// Parse NUL-separated `key=value` pairs. Trailing bytes without a NUL are
/// taken as a last pair (some initiators omit the final NUL).
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    if data.len() > TEXT_LEN_MAX {
        return Err(TextError::TooLong);
    }
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(TextError::NoEquals)?;
        if k.len() > KEY_LEN_MAX {
            return Err(TextError::KeyTooLong);
        }
        if v.len() > VALUE_LEN_MAX {
            return Err(TextError::ValueTooLong);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Append `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut b = Vec::new();
        push(&mut b, "HeaderDigest", "CRC32C,None");
        push(&mut b, "X", "");
        let kv = parse(&b).unwrap();
        assert_eq!(kv[0], ("HeaderDigest".into(), "CRC32C,None".into()));
        assert_eq!(kv[1], ("X".into(), "".into()));
        assert_eq!(parse(b"a").unwrap_err(), TextError::NoEquals);
    }
}
