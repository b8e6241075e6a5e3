//! The iSER header (RFC 7145 9.2) that precedes every iSCSI PDU sent over
//! an RDMA Send, in either direction: 28 bytes, big-endian.
//!
//! ```text
//! byte 0      flags
//! bytes 1-3   reserved
//! bytes 4-7   write STag   (valid with WSV: where solicited write data is)
//! bytes 8-15  write VA
//! bytes 16-19 read STag    (valid with RSV: where read data goes)
//! bytes 20-27 read VA
//! ```

use iscsi::conn::RdmaTags;

pub const ISER_HDR_LEN: usize = 28;

/// The header's flags (RFC 7145 9.2; values as the Linux initiator sends).
pub mod flags {
    /// An iSCSI control-type PDU follows.
    pub const ISCSI_CTRL: u8 = 0x10;
    /// The write STag and VA are valid.
    pub const WSV: u8 = 0x08;
    /// The read STag and VA are valid.
    pub const RSV: u8 = 0x04;
    /// iSER Hello / HelloReply (opcode in the high nibble): only when
    /// iSERHelloRequired, which the Linux initiator never asks for.
    pub const OPCODE_MASK: u8 = 0xf0;
    pub const HELLO: u8 = 0x20;
    pub const HELLO_REPLY: u8 = 0x30;
}

/// A decoded iSER header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IserHeader {
    pub flags: u8,
    pub write_stag: u32,
    pub write_va: u64,
    pub read_stag: u32,
    pub read_va: u64,
}

/// What is wrong with a received message's iSER header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than 28 bytes.
    Short(usize),
    /// An opcode other than iSCSI control (Hello, HelloReply, unknown):
    /// the connection does not carry iSCSI PDUs as negotiated.
    Opcode(u8),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Short(n) => {
                write!(f, "iSER message of {n} bytes, shorter than its header")
            }
            HeaderError::Opcode(o) => {
                write!(f, "iSER opcode {o:#04x} where an iSCSI PDU was expected")
            }
        }
    }
}

impl std::error::Error for HeaderError {}

impl IserHeader {
    /// The header the target puts before each PDU it sends: a control PDU,
    /// no buffers advertised (the target never asks the initiator to RDMA).
    pub const TARGET: IserHeader = IserHeader {
        flags: flags::ISCSI_CTRL,
        write_stag: 0,
        write_va: 0,
        read_stag: 0,
        read_va: 0,
    };

    pub fn encode(&self) -> [u8; ISER_HDR_LEN] {
        let mut b = [0u8; ISER_HDR_LEN];
        b[0] = self.flags;
        b[4..8].copy_from_slice(&self.write_stag.to_be_bytes());
        b[8..16].copy_from_slice(&self.write_va.to_be_bytes());
        b[16..20].copy_from_slice(&self.read_stag.to_be_bytes());
        b[20..28].copy_from_slice(&self.read_va.to_be_bytes());
        b
    }

    /// The header at the front of a received message, checked to announce
    /// an iSCSI PDU.
    pub fn decode(msg: &[u8]) -> Result<IserHeader, HeaderError> {
        let Some(b) = msg.get(..ISER_HDR_LEN) else {
            return Err(HeaderError::Short(msg.len()));
        };
        let flags = b[0];
        if flags & flags::OPCODE_MASK != flags::ISCSI_CTRL {
            return Err(HeaderError::Opcode(flags & flags::OPCODE_MASK));
        }
        let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Ok(IserHeader {
            flags,
            write_stag: be32(4),
            write_va: be64(8),
            read_stag: be32(16),
            read_va: be64(20),
        })
    }

    /// The buffers the initiator advertised, for the protocol core.
    pub fn rdma_tags(&self) -> RdmaTags {
        RdmaTags {
            write: (self.flags & flags::WSV != 0).then_some((self.write_stag, self.write_va)),
            read: (self.flags & flags::RSV != 0).then_some((self.read_stag, self.read_va)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_byte_layout() {
        let h = IserHeader {
            flags: flags::ISCSI_CTRL | flags::WSV | flags::RSV,
            write_stag: 0x0102_0304,
            write_va: 0x1112_1314_1516_1718,
            read_stag: 0x2122_2324,
            read_va: 0x3132_3334_3536_3738,
        };
        let b = h.encode();
        assert_eq!(b[0], 0x1c);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(b[8], 0x11);
        assert_eq!(&b[16..20], &[0x21, 0x22, 0x23, 0x24]);
        assert_eq!(b[27], 0x38);
        assert_eq!(IserHeader::decode(&b), Ok(h));
        let t = h.rdma_tags();
        assert_eq!(t.write, Some((0x0102_0304, 0x1112_1314_1516_1718)));
        assert_eq!(t.read, Some((0x2122_2324, 0x3132_3334_3536_3738)));
    }

    #[test]
    fn tags_only_where_flagged() {
        let mut h = IserHeader {
            flags: flags::ISCSI_CTRL | flags::RSV,
            write_stag: 9,
            write_va: 9,
            read_stag: 7,
            read_va: 0x1000,
        };
        assert_eq!(h.rdma_tags().write, None);
        assert_eq!(h.rdma_tags().read, Some((7, 0x1000)));
        h.flags = flags::ISCSI_CTRL;
        assert_eq!(h.rdma_tags(), RdmaTags::default());
    }

    #[test]
    fn short_and_non_iscsi_messages_are_refused() {
        assert_eq!(IserHeader::decode(&[0x10; 27]), Err(HeaderError::Short(27)));
        let mut b = IserHeader::TARGET.encode();
        b[0] = flags::HELLO;
        assert_eq!(IserHeader::decode(&b), Err(HeaderError::Opcode(0x20)));
        b[0] = 0;
        assert_eq!(IserHeader::decode(&b), Err(HeaderError::Opcode(0)));
    }
}
