//! The private data of the RDMA CM exchange that opens an iSER connection
//! (RFC 7145 9.1, and the Linux initiator's 4-byte form): the connect
//! request says what the initiator cannot do, the accept says what the
//! target will not use.

/// ZBVA: the initiator does not use zero-based virtual addresses (in the
/// request); the target does not use them (in the reply).
pub const ZBVA_NOT_USED: u8 = 0x80;
/// The initiator does not support Send with Invalidate (request); the
/// target will not use it (reply).
pub const SEND_W_INV_NOT_USED: u8 = 0x40;

pub const CM_HDR_LEN: usize = 4;

/// What the initiator's connect request declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Remote addresses are zero-based (offsets within each STag) rather
    /// than virtual addresses.
    pub zero_based_va: bool,
    /// The initiator accepts Send with Invalidate of its STags.
    pub send_with_invalidate: bool,
}

/// Why a connect request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmError {
    /// The private data is missing or shorter than the iSER CM header.
    Short(usize),
    /// The initiator addresses its buffers zero-based, which this target
    /// does not implement (the Linux initiator never does).
    ZeroBasedVa,
}

impl std::fmt::Display for CmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmError::Short(n) => write!(f, "iSER CM private data of {n} bytes, want {CM_HDR_LEN}"),
            CmError::ZeroBasedVa => write!(f, "initiator uses zero-based virtual addresses"),
        }
    }
}

impl std::error::Error for CmError {}

impl ConnectRequest {
    /// Reads the request's private data. RDMA CM pads private data with
    /// zeros to its transport's fixed size, so only the first 4 bytes
    /// count.
    pub fn decode(private_data: &[u8]) -> Result<ConnectRequest, CmError> {
        let Some(h) = private_data.get(..CM_HDR_LEN) else {
            return Err(CmError::Short(private_data.len()));
        };
        let req = ConnectRequest {
            zero_based_va: h[0] & ZBVA_NOT_USED == 0,
            send_with_invalidate: h[0] & SEND_W_INV_NOT_USED == 0,
        };
        if req.zero_based_va {
            return Err(CmError::ZeroBasedVa);
        }
        Ok(req)
    }

    /// The accept's private data: never zero-based; Send with Invalidate
    /// only when both sides want it.
    pub fn reply(&self, target_wants_invalidate: bool) -> [u8; CM_HDR_LEN] {
        let mut flags = ZBVA_NOT_USED;
        if !(self.send_with_invalidate && target_wants_invalidate) {
            flags |= SEND_W_INV_NOT_USED;
        }
        [flags, 0, 0, 0]
    }

    /// Whether responses may invalidate the initiator's STags, as agreed.
    pub fn use_invalidate(&self, target_wants_invalidate: bool) -> bool {
        self.send_with_invalidate && target_wants_invalidate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_request_forms() {
        // Linux sends ZBVA_NOT_SUP, and SEND_W_INV_NOT_SUP when its device
        // cannot do remote invalidation; private data is zero-padded.
        let mut pd = [0u8; 56];
        pd[0] = 0x80;
        let r = ConnectRequest::decode(&pd).unwrap();
        assert!(r.send_with_invalidate && !r.zero_based_va);
        assert_eq!(r.reply(true), [0x80, 0, 0, 0]);
        assert!(r.use_invalidate(true));
        assert_eq!(r.reply(false), [0xc0, 0, 0, 0]);
        assert!(!r.use_invalidate(false));
        pd[0] = 0xc0;
        let r = ConnectRequest::decode(&pd).unwrap();
        assert!(!r.send_with_invalidate);
        assert_eq!(r.reply(true), [0xc0, 0, 0, 0]);
    }

    #[test]
    fn refused_requests() {
        assert_eq!(ConnectRequest::decode(&[]), Err(CmError::Short(0)));
        assert_eq!(ConnectRequest::decode(&[0x80, 0]), Err(CmError::Short(2)));
        assert_eq!(
            ConnectRequest::decode(&[0x40, 0, 0, 0]),
            Err(CmError::ZeroBasedVa)
        );
    }
}
