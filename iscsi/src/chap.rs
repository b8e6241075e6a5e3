//! CHAP (RFC 1994, RFC 7143 12.1.3) with MD5, SHA-1, SHA-256 and SHA3-256,
//! plus the iSCSI encodings of binary values (RFC 7143 6.1: `0x` hex and
//! `0b` base64) that CHAP_C and CHAP_R travel in.
//!
//! SHA-1 (CHAP_A=6, used by Linux) has no crate in the workspace, so a small
//! implementation lives here; it is checked against the FIPS 180 vectors.

use md5::Md5;
use sha2::{Digest, Sha256};
use sha3::Sha3_256;

/// Longest binary value (challenge or response) we decode. RFC 7143
/// 12.1.3 bounds CHAP_C at 1024 bytes; responses are at most 32.
pub const BINARY_LEN_MAX: usize = 1024;

/// CHAP digest algorithms by their IANA PPP code (the CHAP_A value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlgorithm {
    Md5,
    Sha1,
    Sha256,
    Sha3_256,
}

impl ChapAlgorithm {
    /// The algorithms we accept, keyed by CHAP_A code.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            5 => Some(ChapAlgorithm::Md5),
            6 => Some(ChapAlgorithm::Sha1),
            7 => Some(ChapAlgorithm::Sha256),
            8 => Some(ChapAlgorithm::Sha3_256),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha1 => 6,
            ChapAlgorithm::Sha256 => 7,
            ChapAlgorithm::Sha3_256 => 8,
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha1 => 20,
            ChapAlgorithm::Sha256 | ChapAlgorithm::Sha3_256 => 32,
        }
    }

    /// Challenge length the target sends: as long as the digest, so the
    /// challenge carries as much entropy as the response can distinguish.
    pub fn challenge_len(self) -> usize {
        self.digest_len()
    }

    /// RFC 1994 response: H(identifier || secret || challenge).
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        match self {
            ChapAlgorithm::Md5 => {
                let mut h = Md5::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
            ChapAlgorithm::Sha1 => {
                let mut buf = Vec::with_capacity(1 + secret.len() + challenge.len());
                buf.push(id);
                buf.extend_from_slice(secret);
                buf.extend_from_slice(challenge);
                sha1(&buf).to_vec()
            }
            ChapAlgorithm::Sha256 => {
                let mut h = Sha256::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
            ChapAlgorithm::Sha3_256 => {
                let mut h = Sha3_256::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
        }
    }
}

/// Compare without an early exit, so the time taken does not tell an
/// attacker how many leading bytes of a forged response were right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// `0x` followed by lowercase hex, the form Linux and libiscsi expect.
pub fn encode_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Decode an iSCSI binary value: `0x`/`0X` hex or `0b`/`0B` base64.
/// `None` for anything else, an empty value, or more than
/// `BINARY_LEN_MAX` bytes.
pub fn decode_binary(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() < 3 || b[0] != b'0' {
        return None;
    }
    match b[1] {
        b'x' | b'X' => decode_hex(&b[2..]),
        b'b' | b'B' => decode_base64(&b[2..]),
        _ => None,
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn decode_hex(digits: &[u8]) -> Option<Vec<u8>> {
    if digits.is_empty() || digits.len().div_ceil(2) > BINARY_LEN_MAX {
        return None;
    }
    let mut out = Vec::with_capacity(digits.len().div_ceil(2));
    // An odd digit count means an implied leading zero nibble.
    let (head, rest) = if digits.len() % 2 == 1 {
        (Some(digits[0]), &digits[1..])
    } else {
        (None, digits)
    };
    if let Some(h) = head {
        out.push(hex_val(h)?);
    }
    for pair in rest.chunks_exact(2) {
        out.push(hex_val(pair[0])? << 4 | hex_val(pair[1])?);
    }
    Some(out)
}

fn b64_val(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some((c - b'A') as u32),
        b'a'..=b'z' => Some((c - b'a') as u32 + 26),
        b'0'..=b'9' => Some((c - b'0') as u32 + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

fn decode_base64(s: &[u8]) -> Option<Vec<u8>> {
    // Padding is optional: strip up to two '=' and require none inside.
    let mut end = s.len();
    let mut pads = 0;
    while end > 0 && s[end - 1] == b'=' && pads < 2 {
        end -= 1;
        pads += 1;
    }
    let body = &s[..end];
    if body.is_empty() || body.len() % 4 == 1 || body.len() / 4 * 3 > BINARY_LEN_MAX + 3 {
        return None;
    }
    if pads > 0 && !(body.len() + pads).is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
    for chunk in body.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = acc << 6 | b64_val(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&acc.to_be_bytes()[1..4]),
            3 => {
                acc <<= 6;
                out.extend_from_slice(&acc.to_be_bytes()[1..3]);
            }
            2 => {
                acc <<= 12;
                out.push(acc.to_be_bytes()[1]);
            }
            _ => return None,
        }
    }
    if out.len() > BINARY_LEN_MAX {
        return None;
    }
    Some(out)
}

/// Base64 with padding (RFC 4648), prefixed `0b`.
pub fn encode_base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::from("0b");
    for chunk in bytes.chunks(3) {
        let mut b = [0u8; 3];
        b[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// SHA-1 (FIPS 180-4), only for CHAP_A=6.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (o, v) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_vectors() {
        assert_eq!(
            encode_hex(&sha1(b"abc")),
            "0xa9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            encode_hex(&sha1(b"")),
            "0xda39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        assert_eq!(
            encode_hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "0x84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // Crosses the 55/56-byte padding boundary and a second block.
        let m = [b'a'; 1000];
        assert_eq!(
            encode_hex(&sha1(&m)),
            "0x291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
    }

    #[test]
    fn md5_response_matches_rfc1994_construction() {
        // Independently: MD5(0x01 || "secret" || 0x00..0x0f).
        let challenge: Vec<u8> = (0u8..16).collect();
        let mut h = Md5::new();
        h.update([1u8]);
        h.update(b"secret");
        h.update(&challenge);
        let expect = h.finalize().to_vec();
        assert_eq!(
            ChapAlgorithm::Md5.response(1, b"secret", &challenge),
            expect
        );
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0X1ff"), Some(vec![1, 255]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("12"), None);
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQI"), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQ=="), Some(vec![1]));
        assert_eq!(decode_binary("0bA"), None);
        assert_eq!(decode_binary("0bA=B="), None);
        for len in 0..40usize {
            let v: Vec<u8> = (0..len as u8).map(|x| x.wrapping_mul(37)).collect();
            if len > 0 {
                assert_eq!(decode_binary(&encode_base64(&v)), Some(v.clone()));
                assert_eq!(decode_binary(&encode_hex(&v)), Some(v.clone()));
            }
        }
        assert!(decode_binary(&encode_hex(&[0u8; BINARY_LEN_MAX + 1])).is_none());
    }

    #[test]
    fn constant_time_eq_basic() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
