//! The iSER CM private data (RFC 7145): the 4-byte header an iSER
//! initiator puts in its connect request and the target answers in its
//! accept. Only the first byte carries anything: two flags, both phrased
//! as "not", so an all-zero header means "uses zero-based virtual
//! addresses and supports Send with Invalidate".

/// ZBVA not used: the initiator's read/write VAs are real addresses
/// (Linux always sets it).
pub const ISER_ZBVA_NOT_SUPPORTED: u8 = 0x80;
/// The sender does not support (or, in the accept, will not use) Send
/// with Invalidate.
pub const ISER_SEND_W_INV_NOT_SUPPORTED: u8 = 0x40;
/// Length of the header on the wire.
pub const ISER_CM_HDR_LEN: usize = 4;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IserCmHeader {
    pub zbva_not_supported: bool,
    pub send_w_inv_not_supported: bool,
}

impl IserCmHeader {
    /// Decodes the header at the start of CM private data; `None` if
    /// there are fewer than 4 bytes (not an iSER peer). Reserved bits are
    /// ignored, as the RFC asks of a receiver.
    pub fn decode(private_data: &[u8]) -> Option<IserCmHeader> {
        let b = private_data.get(..ISER_CM_HDR_LEN)?;
        Some(IserCmHeader {
            zbva_not_supported: b[0] & ISER_ZBVA_NOT_SUPPORTED != 0,
            send_w_inv_not_supported: b[0] & ISER_SEND_W_INV_NOT_SUPPORTED != 0,
        })
    }

    pub fn encode(&self) -> [u8; ISER_CM_HDR_LEN] {
        let mut f = 0;
        if self.zbva_not_supported {
            f |= ISER_ZBVA_NOT_SUPPORTED;
        }
        if self.send_w_inv_not_supported {
            f |= ISER_SEND_W_INV_NOT_SUPPORTED;
        }
        [f, 0, 0, 0]
    }

    /// The target's answer to an initiator's header: virtual addresses
    /// the way the initiator uses them (this target supports only real
    /// ones, like Linux isert), and Send with Invalidate only if the
    /// initiator can take it and the target wants it.
    pub fn target_reply(initiator: &IserCmHeader, target_uses_send_w_inv: bool) -> IserCmHeader {
        IserCmHeader {
            zbva_not_supported: true,
            send_w_inv_not_supported: initiator.send_w_inv_not_supported || !target_uses_send_w_inv,
        }
    }

    /// Whether Send with Invalidate may be used on the connection, given
    /// both sides' headers.
    pub fn send_w_inv_agreed(initiator: &IserCmHeader, target: &IserCmHeader) -> bool {
        !initiator.send_w_inv_not_supported && !target.send_w_inv_not_supported
    }
}
