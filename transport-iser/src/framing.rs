//! One iSCSI PDU per RDMA message. The protocol core writes its output as
//! one byte stream (as TCP wants it); over iSER each PDU leaves as its own
//! Send behind an iSER header, and each received message holds exactly
//! one header and one PDU. Digests are never used on iSER (RFC 7145 6.4),
//! so a PDU's length follows from its BHS alone.

use iscsi::pdu::{Decoder, Pdu, PduError, BHS_LEN};

use crate::header::{HeaderError, IserHeader, ISER_HDR_LEN};

/// Length on the wire of the PDU at the front of `stream`, once its BHS is
/// there: BHS, AHS, data segment padded to 4 bytes.
pub fn pdu_len(stream: &[u8]) -> Option<usize> {
    pdu_lens(stream).map(|(_, padded)| padded)
}

/// Length of the PDU at the front of `stream` without and with the pad
/// bytes of its data segment.
fn pdu_lens(stream: &[u8]) -> Option<(usize, usize)> {
    let bhs = stream.get(..BHS_LEN)?;
    let ahs = bhs[4] as usize * 4;
    let data = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    Some((BHS_LEN + ahs + data, BHS_LEN + ahs + data.div_ceil(4) * 4))
}

/// The whole PDUs of `stream`, in order; a partial PDU at the end (which
/// the core never leaves) is returned as the remainder.
pub fn split_pdus(stream: &[u8]) -> (impl Iterator<Item = &[u8]>, &[u8]) {
    let mut end = 0;
    while let Some(n) = pdu_len(&stream[end..]) {
        if end + n > stream.len() {
            break;
        }
        end += n;
    }
    let (whole, rest) = stream.split_at(end);
    let mut pos = 0;
    let iter = std::iter::from_fn(move || {
        let n = pdu_len(&whole[pos..])?;
        let pdu = &whole[pos..pos + n];
        pos += n;
        Some(pdu)
    });
    (iter, rest)
}

/// What is wrong with a received message.
#[derive(Debug)]
pub enum FrameError {
    Header(HeaderError),
    Pdu(PduError),
    /// The message ends inside its PDU.
    Truncated {
        have: usize,
        want: usize,
    },
    /// Bytes after the PDU: one message carries one PDU.
    Trailing(usize),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Header(e) => e.fmt(f),
            FrameError::Pdu(e) => e.fmt(f),
            FrameError::Truncated { have, want } => {
                write!(f, "iSER message holds {have} bytes of a {want}-byte PDU")
            }
            FrameError::Trailing(n) => write!(f, "{n} bytes after the PDU in one iSER message"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The largest PDU a message may carry without its data segment's pad
/// bytes (BHS, the largest AHS, an 8 KiB data segment, as this target's
/// receive slots allow).
pub const UNPADDED_MAX: usize = BHS_LEN + 1020 + 8192;

/// A received message: its iSER header and its PDU. `decoder` is the
/// connection's (data segment limit = TargetRecvDataSegmentLength during
/// full feature phase, 8 KiB during login; digests off); the data segment
/// goes through `place`/`data_buf` as with TCP, so unsolicited write data
/// lands in its command's buffer directly.
pub fn decode_message(
    msg: &[u8],
    decoder: &Decoder,
    place: &mut dyn FnMut(&iscsi::Bhs, &[u8]) -> bool,
    data_buf: &mut dyn FnMut(usize) -> Vec<u8>,
) -> Result<(IserHeader, Pdu), FrameError> {
    let hdr = IserHeader::decode(msg).map_err(FrameError::Header)?;
    let body = &msg[ISER_HDR_LEN..];
    let (unpadded, want) = pdu_lens(body).unwrap_or((BHS_LEN, BHS_LEN));
    // RFC 7143 pads a data segment to 4 bytes and Linux's iSER sends the
    // pad, but libiscsi's iSER leaves it out of the message. A message
    // short by its pad alone is taken with the pad added here (on the
    // stack, and only then: such PDUs are login and text requests, a few
    // KiB).
    let padded: [u8; UNPADDED_MAX];
    let wire = if body.len() == unpadded && unpadded < want && want <= UNPADDED_MAX {
        let mut p = [0u8; UNPADDED_MAX];
        p[..body.len()].copy_from_slice(body);
        padded = p;
        &padded[..want]
    } else {
        body
    };
    match decoder.decode_placing(wire, place, data_buf) {
        Ok(Some((pdu, used))) if used == wire.len() => Ok((hdr, pdu)),
        Ok(Some((_, used))) => Err(FrameError::Trailing(wire.len() - used)),
        Ok(None) => Err(FrameError::Truncated {
            have: body.len(),
            want,
        }),
        Err(e) => Err(FrameError::Pdu(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::flags;
    use iscsi::pdu::{opcode, Encoder};

    fn wire(pdus: &[Pdu]) -> Vec<u8> {
        let mut w = Vec::new();
        for p in pdus {
            Encoder::default().encode(p, &mut w);
        }
        w
    }

    fn pdu(op: u8, ahs: usize, data: usize) -> Pdu {
        let mut p = Pdu::new(op);
        p.ahs = vec![0; ahs];
        p.data = (0..data).map(|i| i as u8).collect();
        p
    }

    #[test]
    fn a_stream_splits_into_its_pdus() {
        let pdus = [
            pdu(opcode::SCSI_RESP, 0, 0),
            pdu(opcode::DATA_IN, 0, 4097),
            pdu(opcode::NOP_IN, 0, 3),
            pdu(opcode::SCSI_RESP, 8, 18),
        ];
        let w = wire(&pdus);
        let (iter, rest) = split_pdus(&w);
        let lens: Vec<usize> = iter.map(<[u8]>::len).collect();
        assert_eq!(lens, [48, 48 + 4100, 48 + 4, 48 + 8 + 20]);
        assert!(rest.is_empty());
        let (iter, rest) = split_pdus(&w[..w.len() - 1]);
        assert_eq!(iter.count(), 3);
        assert_eq!(rest.len(), 48 + 8 + 20 - 1);
        let (iter, rest) = split_pdus(&w[..20]);
        assert_eq!((iter.count(), rest.len()), (0, 20));
    }

    #[test]
    fn messages_decode_to_header_and_pdu() {
        let mut p = pdu(opcode::SCSI_CMD, 0, 512);
        p.bhs.set_itt(7);
        let mut msg = IserHeader {
            flags: flags::ISCSI_CTRL | flags::WSV,
            write_stag: 5,
            write_va: 0x1000,
            ..IserHeader::default()
        }
        .encode()
        .to_vec();
        msg.extend_from_slice(&wire(std::slice::from_ref(&p)));
        let d = Decoder::new(8192);
        let (h, q) = decode_message(&msg, &d, &mut |_, _| false, &mut Vec::with_capacity).unwrap();
        assert_eq!(h.rdma_tags().write, Some((5, 0x1000)));
        assert_eq!(q.bhs.itt(), 7);
        assert_eq!(q.data, p.data);

        let mut long = msg.clone();
        long.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_message(&long, &d, &mut |_, _| false, &mut Vec::with_capacity),
            Err(FrameError::Trailing(4))
        ));
        assert!(matches!(
            decode_message(
                &msg[..msg.len() - 4],
                &d,
                &mut |_, _| false,
                &mut Vec::with_capacity
            ),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_message(&msg[..10], &d, &mut |_, _| false, &mut Vec::with_capacity),
            Err(FrameError::Header(_))
        ));
        // A data segment without its pad bytes (libiscsi's iSER sends
        // them so) is taken as if padded; missing data bytes are not.
        let mut odd = pdu(opcode::TEXT_REQ, 0, 13);
        odd.bhs.set_itt(9);
        let mut m = IserHeader::default().encode().to_vec();
        m[0] = flags::ISCSI_CTRL;
        m.extend_from_slice(&wire(std::slice::from_ref(&odd)));
        let (_, q) = decode_message(
            &m[..m.len() - 3],
            &d,
            &mut |_, _| false,
            &mut Vec::with_capacity,
        )
        .unwrap();
        assert_eq!((q.bhs.itt(), &q.data), (9, &odd.data));
        for cut in [4, 5] {
            assert!(matches!(
                decode_message(
                    &m[..m.len() - cut],
                    &d,
                    &mut |_, _| false,
                    &mut Vec::with_capacity
                ),
                Err(FrameError::Truncated { .. })
            ));
        }
        let small = Decoder::new(256);
        assert!(matches!(
            decode_message(&msg, &small, &mut |_, _| false, &mut Vec::with_capacity),
            Err(FrameError::Pdu(PduError::DataSegmentTooLong { .. }))
        ));
    }
}
