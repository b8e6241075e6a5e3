//! Arbitrary bytes through `pdu::Decoder`: byte 0 picks the digests (bits
//! 0-1), bytes 1-3 the largest accepted DataSegmentLength; the rest is a
//! stream decoded PDU by PDU. Checks: progress is positive and within the
//! buffer, framing agrees with decode, a shorter buffer asks for more,
//! and encode(decode(x)) decodes to the same PDU with the same header
//! bytes.
#![no_main]

use iscsi::pdu::{pad_len, Decoder, Encoder, BHS_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let header_digest = data[0] & 1 != 0;
    let data_digest = data[0] & 2 != 0;
    let max = u32::from_be_bytes([0, data[1], data[2], data[3]]);
    let d = Decoder {
        header_digest,
        data_digest,
        max_recv_data_len: max,
    };
    let enc = Encoder {
        header_digest,
        data_digest,
    };
    let mut buf = &data[4..];
    while !buf.is_empty() {
        let (pdu, used) = match d.decode(buf) {
            Ok(Some(x)) => x,
            Ok(None) => {
                // Not enough bytes: the framing must say so too.
                if buf.len() >= BHS_LEN {
                    let fr = d.framing(buf[..BHS_LEN].try_into().unwrap()).unwrap();
                    assert!(fr.wire_len > buf.len());
                }
                break;
            }
            Err(_) => break,
        };
        assert!(
            used > 0 && used <= buf.len(),
            "used {used} of {}",
            buf.len()
        );
        assert_eq!(used % 4, 0, "wire length not 4-byte aligned");
        let fr = d.framing(buf[..BHS_LEN].try_into().unwrap()).unwrap();
        assert_eq!(fr.wire_len, used);
        assert_eq!(pdu.ahs.len(), pdu.bhs.total_ahs_len());
        assert_eq!(pdu.data.len(), pdu.bhs.data_segment_len() as usize);
        assert!(pdu.data.len() as u64 <= max as u64);
        // Accessors that walk the AHS must not panic.
        let _ = pdu.extended_cdb();
        let _ = pdu.bidi_read_len();
        // One byte short: more needed, never a PDU.
        assert!(matches!(d.decode(&buf[..used - 1]), Ok(None)));

        let mut wire = Vec::new();
        enc.encode(&pdu, &mut wire);
        assert_eq!(wire.len(), used);
        let hdr = BHS_LEN + pdu.ahs.len() + if header_digest { 4 } else { 0 };
        assert_eq!(
            wire[..hdr],
            buf[..hdr],
            "header bytes changed by re-encoding"
        );
        if !pdu.data.is_empty() {
            // Only padding (and so the data digest) may differ.
            let n = pdu.data.len();
            assert_eq!(wire[hdr..hdr + n], buf[hdr..hdr + n]);
            assert_eq!(pad_len(n), (4 - n % 4) % 4);
        }
        match d.decode(&wire) {
            Ok(Some((again, n))) => {
                assert_eq!(n, wire.len());
                assert_eq!(again, pdu, "decode(encode(decode(x))) != decode(x)");
            }
            other => panic!("re-encoded PDU does not decode: {other:?}"),
        }
        buf = &buf[used..];
    }
});
