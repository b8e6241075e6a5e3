//! PDU layout of RFC 7143 section 11: the 48-byte Basic Header Segment
//! (BHS), optional Additional Header Segments (AHS), the data segment with
//! its padding, and the optional CRC32C digests.
//!
//! The BHS is kept as raw bytes with named accessors rather than decoded into
//! one Rust struct per opcode: most fields sit at the same offsets in every
//! PDU, the hot path touches only a few of them, and a raw header can be
//! forwarded or echoed without re-encoding.

use crate::digest;

/// Tag value meaning "no tag": no ITT, no TTT, a new request (RFC 7143
/// 11.18, 11.19).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Largest DataSegmentLength the 24-bit field can carry.
pub const DATA_SEGMENT_LEN_MAX: u32 = (1 << 24) - 1;
/// Largest AHS the 8-bit TotalAHSLength (in 4-byte words) can carry.
pub const AHS_LEN_MAX: usize = 255 * 4;

/// Opcodes (RFC 7143 11.1.1).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TASK_MGMT_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK_REQ: u8 = 0x10;

    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TASK_MGMT_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MSG: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Flag bits in byte 1 of the BHS, by PDU type.
pub mod flags {
    /// F: final PDU of a sequence (most PDUs).
    pub const FINAL: u8 = 0x80;
    /// Login/Text: C, more text follows.
    pub const CONTINUE: u8 = 0x40;
    /// Login: T, transit to the next stage.
    pub const TRANSIT: u8 = 0x80;
    /// SCSI Command: R, data-in expected.
    pub const READ: u8 = 0x40;
    /// SCSI Command: W, data-out expected.
    pub const WRITE: u8 = 0x20;
    /// SCSI Command: task attribute mask.
    pub const ATTR_MASK: u8 = 0x07;
    /// Data-In: A, acknowledge requested (ERL > 0 only).
    pub const ACK: u8 = 0x40;
    /// Data-In / SCSI Response: o, residual overflow.
    pub const OVERFLOW: u8 = 0x04;
    /// Data-In / SCSI Response: u, residual underflow.
    pub const UNDERFLOW: u8 = 0x02;
    /// Data-In: S, status is carried in this PDU.
    pub const STATUS: u8 = 0x01;
}

/// Why bytes could not be taken as a PDU. Never a panic: the connection
/// layer turns these into a Reject or a dropped connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PduError {
    /// DataSegmentLength exceeds what this side declared it can receive.
    DataSegmentTooLong { len: u32, max: u32 },
    /// The header digest did not match.
    HeaderDigest { expected: u32, got: u32 },
    /// The data digest did not match. The header was good, so the PDU can
    /// be identified and rejected (RFC 7143 7.8).
    DataDigest {
        bhs: Box<Bhs>,
        expected: u32,
        got: u32,
    },
    /// An opcode no initiator may send.
    BadOpcode(u8),
    /// AHS words that do not parse.
    BadAhs,
}

impl std::fmt::Display for PduError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PduError::DataSegmentTooLong { len, max } => {
                write!(
                    f,
                    "DataSegmentLength {len} exceeds MaxRecvDataSegmentLength {max}"
                )
            }
            PduError::HeaderDigest { expected, got } => {
                write!(
                    f,
                    "header digest mismatch: expected {expected:#010x}, got {got:#010x}"
                )
            }
            PduError::DataDigest { expected, got, .. } => {
                write!(
                    f,
                    "data digest mismatch: expected {expected:#010x}, got {got:#010x}"
                )
            }
            PduError::BadOpcode(op) => write!(f, "opcode {op:#04x} is not an initiator opcode"),
            PduError::BadAhs => write!(f, "malformed AHS"),
        }
    }
}

impl std::error::Error for PduError {}

/// The 48-byte Basic Header Segment with accessors named after RFC 7143
/// fields. Offsets that differ between PDU types have per-type accessors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs{{op={:#04x} flags={:#04x} itt={:#010x} dsl={}}}",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_segment_len()
        )
    }
}

impl Bhs {
    pub fn new(opcode: u8) -> Self {
        let mut b = Bhs::default();
        b.0[0] = opcode & 0x3f;
        b
    }

    #[inline]
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    #[inline]
    pub fn set_u16_at(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    #[inline]
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.0[off..off + 4].try_into().unwrap())
    }
    #[inline]
    pub fn set_u32_at(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    #[inline]
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.0[off..off + 8].try_into().unwrap())
    }
    #[inline]
    pub fn set_u64_at(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    // ---- fields common to all PDUs ----
    #[inline]
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// I bit: immediate delivery (initiator PDUs only).
    #[inline]
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn set_immediate(&mut self, on: bool) {
        if on {
            self.0[0] |= 0x40
        } else {
            self.0[0] &= !0x40
        }
    }
    #[inline]
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }
    #[inline]
    pub fn final_bit(&self) -> bool {
        self.0[1] & flags::FINAL != 0
    }
    /// TotalAHSLength in bytes.
    #[inline]
    pub fn total_ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn set_total_ahs_len(&mut self, bytes: usize) {
        debug_assert!(bytes.is_multiple_of(4) && bytes <= AHS_LEN_MAX);
        self.0[4] = (bytes / 4) as u8;
    }
    #[inline]
    pub fn data_segment_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    pub fn set_data_segment_len(&mut self, len: u32) {
        assert!(len <= DATA_SEGMENT_LEN_MAX);
        let b = len.to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }
    /// LUN field (bytes 8..16), raw SAM encoding.
    #[inline]
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn set_lun(&mut self, lun: u64) {
        self.set_u64_at(8, lun)
    }
    /// Initiator Task Tag.
    #[inline]
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32_at(16, v)
    }
    /// Target Transfer Tag (NOP, R2T, Data, Text, SNACK).
    #[inline]
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }
    pub fn set_ttt(&mut self, v: u32) {
        self.set_u32_at(20, v)
    }
    /// CmdSN in initiator PDUs (offset 24).
    #[inline]
    pub fn cmdsn(&self) -> u32 {
        self.u32_at(24)
    }
    /// ExpStatSN in initiator PDUs (offset 28).
    #[inline]
    pub fn expstatsn(&self) -> u32 {
        self.u32_at(28)
    }
    /// StatSN in target PDUs (offset 24).
    pub fn set_statsn(&mut self, v: u32) {
        self.set_u32_at(24, v)
    }
    pub fn statsn(&self) -> u32 {
        self.u32_at(24)
    }
    /// ExpCmdSN in target PDUs (offset 28).
    pub fn set_expcmdsn(&mut self, v: u32) {
        self.set_u32_at(28, v)
    }
    pub fn expcmdsn(&self) -> u32 {
        self.u32_at(28)
    }
    /// MaxCmdSN in target PDUs (offset 32).
    pub fn set_maxcmdsn(&mut self, v: u32) {
        self.set_u32_at(32, v)
    }
    pub fn maxcmdsn(&self) -> u32 {
        self.u32_at(32)
    }

    // ---- SCSI Command (11.3) ----
    /// Expected Data Transfer Length.
    pub fn edtl(&self) -> u32 {
        self.u32_at(20)
    }
    /// The 16-byte CDB field.
    pub fn cdb(&self) -> &[u8; 16] {
        self.0[32..48].try_into().unwrap()
    }

    // ---- Data-Out / Data-In / R2T ----
    /// DataSN (Data-In/Out) or R2TSN (R2T), offset 36.
    pub fn datasn(&self) -> u32 {
        self.u32_at(36)
    }
    pub fn set_datasn(&mut self, v: u32) {
        self.set_u32_at(36, v)
    }
    /// Buffer Offset, offset 40.
    pub fn buffer_offset(&self) -> u32 {
        self.u32_at(40)
    }
    pub fn set_buffer_offset(&mut self, v: u32) {
        self.set_u32_at(40, v)
    }
    /// Residual Count (Data-In, SCSI Response), offset 44.
    pub fn set_residual_count(&mut self, v: u32) {
        self.set_u32_at(44, v)
    }
    pub fn residual_count(&self) -> u32 {
        self.u32_at(44)
    }

    // ---- Login (11.12, 11.13) ----
    /// ISID, the 6 bytes at offset 8 of a Login PDU, as a 48-bit number.
    pub fn isid(&self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.0[8..14]);
        u64::from_be_bytes(b)
    }
    pub fn set_isid(&mut self, isid: u64) {
        self.0[8..14].copy_from_slice(&isid.to_be_bytes()[2..]);
    }
    pub fn tsih(&self) -> u16 {
        self.u16_at(14)
    }
    pub fn set_tsih(&mut self, v: u16) {
        self.set_u16_at(14, v)
    }
    /// CID in Login and Logout requests (offset 20).
    pub fn cid(&self) -> u16 {
        self.u16_at(20)
    }
    /// Login: CSG (current stage), bits 2-3 of byte 1.
    pub fn login_csg(&self) -> u8 {
        (self.0[1] >> 2) & 3
    }
    /// Login: NSG (next stage), bits 0-1 of byte 1.
    pub fn login_nsg(&self) -> u8 {
        self.0[1] & 3
    }
    /// Login request: Version-max / Login response: Version-max.
    pub fn version_max(&self) -> u8 {
        self.0[2]
    }
    /// Login request: Version-min / Login response: Version-active.
    pub fn version_min(&self) -> u8 {
        self.0[3]
    }
    /// Login response Status-Class and Status-Detail (offsets 36, 37).
    pub fn set_login_status(&mut self, class: u8, detail: u8) {
        self.0[36] = class;
        self.0[37] = detail;
    }
    pub fn login_status(&self) -> (u8, u8) {
        (self.0[36], self.0[37])
    }

    // ---- Task Management (11.5, 11.6) ----
    /// Function code (byte 1, low 7 bits).
    pub fn tmf_function(&self) -> u8 {
        self.0[1] & 0x7f
    }
    /// Referenced Task Tag (offset 20).
    pub fn referenced_task_tag(&self) -> u32 {
        self.u32_at(20)
    }
    /// RefCmdSN (offset 32).
    pub fn ref_cmdsn(&self) -> u32 {
        self.u32_at(32)
    }
    /// ExpDataSN (offset 36), also used by SNACK and SCSI Response.
    pub fn exp_datasn(&self) -> u32 {
        self.u32_at(36)
    }

    // ---- Logout (11.14) ----
    /// Reason code (byte 1, low 7 bits).
    pub fn logout_reason(&self) -> u8 {
        self.0[1] & 0x7f
    }
}

/// A whole PDU: header, AHS and data segment (without padding or digests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn new(opcode: u8) -> Self {
        Pdu {
            bhs: Bhs::new(opcode),
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    /// Extended CDB AHS (type 1) bytes, if present (RFC 7143 11.2.2.3).
    pub fn extended_cdb(&self) -> Option<&[u8]> {
        let mut a = &self.ahs[..];
        while a.len() >= 4 {
            let len = u16::from_be_bytes([a[0], a[1]]) as usize;
            let ty = a[2];
            let body_end = 3 + len;
            if body_end > a.len() {
                return None;
            }
            if ty == 1 && len >= 1 {
                // One reserved byte then CDB bytes 16.. of the full CDB.
                return Some(&a[4..body_end]);
            }
            let padded = (body_end + 3) & !3;
            a = &a[padded.min(a.len())..];
        }
        None
    }

    /// Bidirectional Expected Read-Data Length AHS (type 2).
    pub fn bidi_read_len(&self) -> Option<u32> {
        let mut a = &self.ahs[..];
        while a.len() >= 8 {
            let len = u16::from_be_bytes([a[0], a[1]]) as usize;
            if a[2] == 2 && len == 5 {
                return Some(u32::from_be_bytes(a[4..8].try_into().unwrap()));
            }
            let padded = (3 + len + 3) & !3;
            a = &a[padded.min(a.len())..];
        }
        None
    }
}

/// Bytes needed to pad `len` to a 4-byte boundary.
#[inline]
pub fn pad_len(len: usize) -> usize {
    (4 - (len & 3)) & 3
}

/// Incremental decoder for a byte stream. It never allocates more than the
/// declared limits allow: the data segment is bounded by `max_recv_data_len`
/// (our MaxRecvDataSegmentLength) before any buffer is sized for it.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest DataSegmentLength we accept.
    pub max_recv_data_len: u32,
}

/// What the decoder learned from the first BHS_LEN bytes.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    /// Total bytes of the PDU on the wire, digests and padding included.
    pub wire_len: usize,
    pub ahs_len: usize,
    pub data_len: usize,
}

impl Decoder {
    pub fn new(max_recv_data_len: u32) -> Self {
        Decoder {
            header_digest: false,
            data_digest: false,
            max_recv_data_len,
        }
    }

    /// Bytes of the header digest on the wire (0 or 4).
    pub fn header_digest_len(&self) -> usize {
        if self.header_digest {
            4
        } else {
            0
        }
    }

    /// Bytes of the data digest after a data segment (0 or 4).
    pub fn data_digest_len(&self) -> usize {
        if self.data_digest {
            4
        } else {
            0
        }
    }

    /// Sizes of the PDU whose BHS starts `bhs`; checks the declared data
    /// length against our limit before the data arrives.
    pub fn framing(&self, bhs: &[u8; BHS_LEN]) -> Result<Framing, PduError> {
        let b = Bhs(*bhs);
        let ahs_len = b.total_ahs_len();
        let data_len = b.data_segment_len();
        if data_len > self.max_recv_data_len {
            return Err(PduError::DataSegmentTooLong {
                len: data_len,
                max: self.max_recv_data_len,
            });
        }
        let data_len = data_len as usize;
        let mut wire_len = BHS_LEN + ahs_len + self.header_digest_len();
        if data_len > 0 {
            wire_len += data_len + pad_len(data_len) + self.data_digest_len();
        }
        Ok(Framing {
            wire_len,
            ahs_len,
            data_len,
        })
    }

    /// The header of the PDU at the front of `buf` once its BHS, AHS and
    /// header digest have all arrived, the digest checked: the BHS, the
    /// PDU's sizes, and where its data segment starts. A transport learns
    /// from it where a data segment belongs before the segment arrives.
    pub fn header(&self, buf: &[u8]) -> Result<Option<(Bhs, Framing, usize)>, PduError> {
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let bhs_bytes: [u8; BHS_LEN] = buf[..BHS_LEN].try_into().unwrap();
        let fr = self.framing(&bhs_bytes)?;
        let mut pos = BHS_LEN + fr.ahs_len;
        if buf.len() < pos + self.header_digest_len() {
            return Ok(None);
        }
        if self.header_digest {
            let got = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap());
            let expected = digest::crc32c_parts(&[&buf[..pos]]);
            if got != expected {
                return Err(PduError::HeaderDigest { expected, got });
            }
            pos += 4;
        }
        Ok(Some((Bhs(bhs_bytes), fr, pos)))
    }

    /// Decode one PDU from the front of `buf`. Returns `Ok(None)` when more
    /// bytes are needed, else the PDU and the number of bytes it used.
    pub fn decode(&self, buf: &[u8]) -> Result<Option<(Pdu, usize)>, PduError> {
        self.decode_with(buf, &mut Vec::with_capacity)
    }

    /// `decode`, taking the data segment's buffer from `data_buf` (called
    /// with the segment length, only when there is one) so a reactor can
    /// hand out recycled buffers instead of allocating.
    pub fn decode_with(
        &self,
        buf: &[u8],
        data_buf: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Option<(Pdu, usize)>, PduError> {
        self.decode_placing(buf, &mut |_, _| false, data_buf)
    }

    /// `decode_with`, first offering the (digest-checked) data segment to
    /// `place`, which may copy it where it finally belongs (a write
    /// command's buffer) and return true; the PDU then comes back with
    /// empty data and `data_buf` is not called.
    pub fn decode_placing(
        &self,
        buf: &[u8],
        place: &mut dyn FnMut(&Bhs, &[u8]) -> bool,
        data_buf: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Option<(Pdu, usize)>, PduError> {
        let Some((bhs, fr, pos)) = self.header(buf)? else {
            return Ok(None);
        };
        if buf.len() < fr.wire_len {
            return Ok(None);
        }
        let mut pdu = Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        };
        pdu.ahs
            .extend_from_slice(&buf[BHS_LEN..BHS_LEN + fr.ahs_len]);
        if fr.data_len > 0 {
            let data = &buf[pos..pos + fr.data_len];
            let padded = fr.data_len + pad_len(fr.data_len);
            if self.data_digest {
                let got =
                    u32::from_le_bytes(buf[pos + padded..pos + padded + 4].try_into().unwrap());
                let expected = digest::crc32c_parts(&[&buf[pos..pos + padded]]);
                if got != expected {
                    return Err(PduError::DataDigest {
                        bhs: Box::new(pdu.bhs),
                        expected,
                        got,
                    });
                }
            }
            if !place(&pdu.bhs, data) {
                pdu.data = data_buf(fr.data_len);
                pdu.data.clear();
                pdu.data.extend_from_slice(data);
            }
        }
        Ok(Some((pdu, fr.wire_len)))
    }
}

/// Encodes PDUs with the connection's digest settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Encoder {
    pub header_digest: bool,
    pub data_digest: bool,
}

impl Encoder {
    /// Append the wire form of `pdu` to `out`. DataSegmentLength and
    /// TotalAHSLength are set from the PDU's own vectors.
    pub fn encode(&self, pdu: &Pdu, out: &mut Vec<u8>) {
        self.encode_parts(&pdu.bhs, &pdu.ahs, &pdu.data, out)
    }

    /// The header of a PDU whose `data_len`-byte data segment is sent
    /// separately (from the buffer that holds it), followed by
    /// `data_trailer`. No AHS.
    pub fn encode_header(&self, bhs: &Bhs, data_len: usize, out: &mut Vec<u8>) {
        let mut bhs = *bhs;
        bhs.set_total_ahs_len(0);
        bhs.set_data_segment_len(data_len as u32);
        let start = out.len();
        out.extend_from_slice(&bhs.0);
        if self.header_digest {
            let d = digest::crc32c_parts(&[&out[start..]]);
            out.extend_from_slice(&d.to_le_bytes());
        }
    }

    /// What follows a separately sent data segment of `len` bytes on the
    /// wire: padding to a multiple of 4 and the data digest if negotiated,
    /// continued from `data_crc`, the CRC32C of the data (the caller's:
    /// the data may be in several pieces; ignored without a data digest).
    /// Returns how many bytes of `out` it filled.
    pub fn data_trailer(&self, len: usize, data_crc: u32, out: &mut [u8; 8]) -> usize {
        let pad = pad_len(len);
        out[..pad].fill(0);
        let mut n = pad;
        if self.data_digest && len > 0 {
            let d = digest::crc32c_append(data_crc, &out[..pad]);
            out[n..n + 4].copy_from_slice(&d.to_le_bytes());
            n += 4;
        }
        n
    }

    /// As `encode`, with the data segment given separately so a Data-In can
    /// point into a larger task buffer without copying it into a `Pdu` first.
    pub fn encode_parts(&self, bhs: &Bhs, ahs: &[u8], data: &[u8], out: &mut Vec<u8>) {
        debug_assert!(ahs.len().is_multiple_of(4));
        let mut bhs = *bhs;
        bhs.set_total_ahs_len(ahs.len());
        bhs.set_data_segment_len(data.len() as u32);
        let start = out.len();
        out.extend_from_slice(&bhs.0);
        out.extend_from_slice(ahs);
        if self.header_digest {
            let d = digest::crc32c_parts(&[&out[start..]]);
            out.extend_from_slice(&d.to_le_bytes());
        }
        if !data.is_empty() {
            let pad = [0u8; 3];
            let p = &pad[..pad_len(data.len())];
            out.extend_from_slice(data);
            out.extend_from_slice(p);
            if self.data_digest {
                let d = digest::crc32c_parts(&[data, p]);
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_digests() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut p = Pdu::new(opcode::SCSI_CMD);
            p.bhs.set_itt(0x1234_5678);
            p.bhs.set_flags(flags::FINAL | flags::READ);
            p.data = b"hello".to_vec();
            let mut wire = Vec::new();
            Encoder {
                header_digest: hd,
                data_digest: dd,
            }
            .encode(&p, &mut wire);
            assert_eq!(wire.len() % 4, 0);
            let mut d = Decoder::new(8192);
            d.header_digest = hd;
            d.data_digest = dd;
            assert!(d.decode(&wire[..wire.len() - 1]).unwrap().is_none());
            let (q, used) = d.decode(&wire).unwrap().unwrap();
            assert_eq!(used, wire.len());
            assert_eq!(q.bhs.itt(), 0x1234_5678);
            assert_eq!(q.data, b"hello");
            if hd {
                let mut bad = wire.clone();
                bad[17] ^= 1;
                assert!(matches!(d.decode(&bad), Err(PduError::HeaderDigest { .. })));
            }
            if dd {
                let mut bad = wire.clone();
                let n = bad.len();
                bad[n - 6] ^= 1;
                assert!(matches!(d.decode(&bad), Err(PduError::DataDigest { .. })));
            }
        }
    }

    #[test]
    fn data_segment_limit_checked_before_data_arrives() {
        let mut b = Bhs::new(opcode::DATA_OUT);
        b.set_data_segment_len(9000);
        let d = Decoder::new(8192);
        assert!(matches!(
            d.decode(&b.0),
            Err(PduError::DataSegmentTooLong { len: 9000, .. })
        ));
    }

    #[test]
    fn isid_roundtrip() {
        let mut b = Bhs::new(opcode::LOGIN_REQ);
        b.set_isid(0x8000_1234_5678);
        assert_eq!(b.isid(), 0x8000_1234_5678);
        assert_eq!(b.0[8], 0x80);
    }
}
