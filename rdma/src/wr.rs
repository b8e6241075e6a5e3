//! Work requests and completions: the plain-data side of posting and
//! polling, kept apart from the queues so it can be tested without a
//! device.

use std::ffi::CStr;
use std::fmt;
use std::ops::BitOr;

use rdma_sys as sys;

/// One scatter-gather element: (address, length, local key). Laid out
/// exactly as `ibv_sge`, so a `&[Sge]` is handed to the device as is.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct Sge(sys::ibv_sge);

impl Sge {
    pub const fn new(addr: u64, length: u32, lkey: u32) -> Sge {
        Sge(sys::ibv_sge { addr, length, lkey })
    }

    pub fn addr(&self) -> u64 {
        self.0.addr
    }

    pub fn length(&self) -> u32 {
        self.0.length
    }

    pub fn lkey(&self) -> u32 {
        self.0.lkey
    }
}

impl Default for Sge {
    fn default() -> Sge {
        Sge::new(0, 0, 0)
    }
}

impl fmt::Debug for Sge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sge({:#x}+{} lkey {:#x})",
            self.0.addr, self.0.length, self.0.lkey
        )
    }
}

impl PartialEq for Sge {
    fn eq(&self, o: &Sge) -> bool {
        (self.0.addr, self.0.length, self.0.lkey) == (o.0.addr, o.0.length, o.0.lkey)
    }
}

impl Eq for Sge {}

impl From<mempool::RdmaSegment> for Sge {
    fn from(s: mempool::RdmaSegment) -> Sge {
        Sge::new(s.addr, s.len, s.key.lkey)
    }
}

/// What a send-queue work request does (`ibv_wr_opcode`), with the
/// remote side's address and key where it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    /// IBV_WR_SEND: consumes a receive on the peer.
    Send,
    /// IBV_WR_SEND_WITH_INV: a Send that also invalidates the peer's
    /// `invalidate_rkey` (the initiator's STag in iSER).
    SendWithInv { invalidate_rkey: u32 },
    /// IBV_WR_RDMA_WRITE into the peer's memory at (remote_addr, rkey).
    RdmaWrite { remote_addr: u64, rkey: u32 },
    /// IBV_WR_RDMA_READ from the peer's memory at (remote_addr, rkey).
    RdmaRead { remote_addr: u64, rkey: u32 },
}

/// `ibv_send_flags`, the ones a transport uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendFlags(u32);

impl SendFlags {
    pub const NONE: SendFlags = SendFlags(0);
    /// IBV_SEND_SIGNALED: produce a completion even on success.
    pub const SIGNALED: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_SIGNALED.0);
    /// IBV_SEND_SOLICITED: wake a peer armed for solicited events only.
    pub const SOLICITED: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_SOLICITED.0);
    /// IBV_SEND_FENCE: wait for earlier RDMA Reads before starting.
    pub const FENCE: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_FENCE.0);
    /// IBV_SEND_INLINE: copy the data into the work request (small Sends).
    pub const INLINE: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_INLINE.0);

    pub fn contains(self, o: SendFlags) -> bool {
        self.0 & o.0 == o.0
    }

    pub fn bits(self) -> u32 {
        self.0
    }
}

impl BitOr for SendFlags {
    type Output = SendFlags;
    fn bitor(self, o: SendFlags) -> SendFlags {
        SendFlags(self.0 | o.0)
    }
}

/// One send-queue work request. `sges` must describe registered memory
/// (lkeys of this QP's protection domain) that stays valid until the
/// request completes.
#[derive(Clone, Copy, Debug)]
pub struct SendWr<'a> {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: &'a [Sge],
    pub flags: SendFlags,
}

/// One receive work request (for a QP's receive queue or an SRQ).
#[derive(Clone, Copy, Debug)]
pub struct RecvWr<'a> {
    pub wr_id: u64,
    pub sges: &'a [Sge],
}

/// Writes `wr` into the verbs structure, without chaining (`next` null).
pub(crate) fn fill_send_wr(wr: &SendWr<'_>, out: &mut sys::ibv_send_wr) {
    *out = sys::ibv_send_wr::default();
    out.wr_id = wr.wr_id;
    out.next = std::ptr::null_mut();
    // The device only reads the list; the verbs prototype is not const.
    out.sg_list = wr.sges.as_ptr() as *mut sys::ibv_sge;
    out.num_sge = wr.sges.len() as i32;
    out.send_flags = wr.flags.0;
    match wr.op {
        SendOp::Send => out.opcode = sys::IBV_WR_SEND,
        SendOp::SendWithInv { invalidate_rkey } => {
            out.opcode = sys::IBV_WR_SEND_WITH_INV;
            out.__bindgen_anon_1.invalidate_rkey = invalidate_rkey;
        }
        SendOp::RdmaWrite { remote_addr, rkey } => {
            out.opcode = sys::IBV_WR_RDMA_WRITE;
            out.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
        }
        SendOp::RdmaRead { remote_addr, rkey } => {
            out.opcode = sys::IBV_WR_RDMA_READ;
            out.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
        }
    }
}

pub(crate) fn fill_recv_wr(wr: &RecvWr<'_>, out: &mut sys::ibv_recv_wr) {
    out.wr_id = wr.wr_id;
    out.next = std::ptr::null_mut();
    out.sg_list = wr.sges.as_ptr() as *mut sys::ibv_sge;
    out.num_sge = wr.sges.len() as i32;
}

/// A work completion's status (`ibv_wc_status`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WcStatus(pub u32);

impl WcStatus {
    pub const SUCCESS: WcStatus = WcStatus(sys::IBV_WC_SUCCESS);
    /// IBV_WC_WR_FLUSH_ERR: the QP went to the error state (disconnect);
    /// every outstanding request comes back with it.
    pub const WR_FLUSH_ERR: WcStatus = WcStatus(sys::IBV_WC_WR_FLUSH_ERR);
    pub const REM_ACCESS_ERR: WcStatus = WcStatus(sys::IBV_WC_REM_ACCESS_ERR);
    pub const LOC_PROT_ERR: WcStatus = WcStatus(sys::IBV_WC_LOC_PROT_ERR);

    pub fn is_success(self) -> bool {
        self == WcStatus::SUCCESS
    }

    /// The library's name for it ("success", "Work Request Flushed
    /// Error", ...).
    pub fn as_str(self) -> &'static str {
        // SAFETY: ibv_wc_status_str returns a pointer to a static string
        // for any value (an "unknown" text for values it does not know).
        let p = unsafe { sys::ibv_wc_status_str(self.0) };
        if p.is_null() {
            return "unknown";
        }
        // SAFETY: non-null, NUL-terminated and static, as above.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("unknown")
    }
}

impl fmt::Debug for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.as_str(), self.0)
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What completed (`ibv_wc_opcode`). Only meaningful when the status is
/// success: error completions carry no valid opcode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    #[default]
    Send,
    RdmaWrite,
    RdmaRead,
    CompSwap,
    FetchAdd,
    BindMw,
    LocalInv,
    Recv,
    RecvRdmaWithImm,
    Other(u32),
}

impl WcOpcode {
    fn from_raw(op: u32) -> WcOpcode {
        match op {
            sys::IBV_WC_SEND => WcOpcode::Send,
            sys::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            sys::IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            sys::IBV_WC_COMP_SWAP => WcOpcode::CompSwap,
            sys::IBV_WC_FETCH_ADD => WcOpcode::FetchAdd,
            sys::IBV_WC_BIND_MW => WcOpcode::BindMw,
            sys::IBV_WC_LOCAL_INV => WcOpcode::LocalInv,
            sys::IBV_WC_RECV => WcOpcode::Recv,
            sys::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            o => WcOpcode::Other(o),
        }
    }

    pub fn is_recv(self) -> bool {
        matches!(self, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm)
    }
}

/// The parts of `ibv_wc` a transport needs, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred (RDMA Read).
    pub byte_len: u32,
    pub qp_num: u32,
    /// The local key the peer invalidated with its Send with Invalidate
    /// (IBV_WC_WITH_INV).
    pub invalidated_rkey: Option<u32>,
    /// Immediate data, in host order (IBV_WC_WITH_IMM).
    pub imm_data: Option<u32>,
    pub vendor_err: u32,
    /// `ibv_wc_flags` as the provider reported them, for what the fields
    /// above do not decode.
    pub wc_flags: u32,
}

impl Completion {
    pub const EMPTY: Completion = Completion {
        wr_id: 0,
        status: WcStatus::SUCCESS,
        opcode: WcOpcode::Send,
        byte_len: 0,
        qp_num: 0,
        invalidated_rkey: None,
        imm_data: None,
        vendor_err: 0,
        wc_flags: 0,
    };

    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    pub(crate) fn from_wc(wc: &sys::ibv_wc) -> Completion {
        let flags = wc.wc_flags;
        let with_inv = flags & sys::ibv_wc_flags::IBV_WC_WITH_INV.0 != 0;
        let with_imm = flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        let ok = wc.status == sys::IBV_WC_SUCCESS;
        Completion {
            wr_id: wc.wr_id,
            status: WcStatus(wc.status),
            opcode: WcOpcode::from_raw(wc.opcode),
            byte_len: if ok { wc.byte_len } else { 0 },
            qp_num: wc.qp_num,
            invalidated_rkey: if ok && with_inv {
                // SAFETY: the flag says which member of the union the
                // device wrote; both are plain u32s, so either read is
                // defined.
                Some(unsafe { wc.__bindgen_anon_1.invalidated_rkey })
            } else {
                None
            },
            imm_data: if ok && with_imm {
                // SAFETY: as above; imm_data travels big-endian.
                Some(u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data }))
            } else {
                None
            },
            vendor_err: wc.vendor_err,
            wc_flags: flags,
        }
    }
}
