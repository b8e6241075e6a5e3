//! One iSCSI connection from login to close, sans-IO (RFC 7143 4, 11).
//!
//! The transport decodes PDUs with `decoder()` and hands each one to
//! `handle_pdu`; it drains the wire bytes to send with `take_tx` and the
//! work for the device server with `poll_event`, and feeds SCSI completions
//! back with `scsi_complete`. Timers are driven by `tick(now_ms)`.
//!
//! Sessions have one connection (MaxConnections is negotiated down to our
//! limit, 1 by default), so the session's command window (CmdSN, ExpCmdSN,
//! MaxCmdSN) lives here too. Error recovery level 0: protocol errors inside
//! a command's data transfer end the connection, which is what the
//! initiator's session recovery expects at that level.

use std::collections::{HashMap, VecDeque};

use crate::idhash::BuildIdHasher;
use crate::login::{LoginContext, LoginMachine, LoginOutcome, LoginStep};
use crate::params::{ConnParams, SessionParams, SessionType, TargetLimits, Transport};
use crate::pdu::{flags, opcode, Bhs, Decoder, Encoder, Pdu, PduError, BHS_LEN};
use crate::textreq::{TextContext, TextMachine};
pub use mempool::{DataBuf, DataDest};

pub use crate::pdu::RESERVED_TAG;

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Task management function codes (RFC 7143 11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
    pub const QUERY_TASK: u8 = 9;
    pub const QUERY_TASK_SET: u8 = 10;
    pub const QUERY_ASYNC_EVENT: u8 = 11;

    // Responses (RFC 7143 11.6.1).
    pub const RESP_COMPLETE: u8 = 0;
    pub const RESP_NO_TASK: u8 = 1;
    pub const RESP_NO_LUN: u8 = 2;
    pub const RESP_REASSIGN_UNSUPPORTED: u8 = 4;
    pub const RESP_NOT_SUPPORTED: u8 = 5;
    /// FUNCTION SUCCEEDED (RFC 7144 4.4, IANA "iSCSI Task Management
    /// Function Response" registry value 7): QUERY TASK found the task.
    /// "Function complete" (0) then means it is not in the task set.
    pub const RESP_FUNCTION_SUCCEEDED: u8 = 7;
    pub const RESP_REJECTED: u8 = 255;
}

/// The connection's view of one command.
pub type TaskId = u32;

/// Connection timing and limits, fixed at creation.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub limits: TargetLimits,
    pub transport: Transport,
    /// Ping an idle initiator with NOP-In after this long (0: never).
    pub nop_interval_ms: u64,
    /// Close when a ping is not answered within this long.
    pub nop_timeout_ms: u64,
    /// Close a connection that has not finished login within this long.
    pub login_timeout_ms: u64,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            limits: TargetLimits::default(),
            transport: Transport::Tcp,
            nop_interval_ms: 30_000,
            nop_timeout_ms: 30_000,
            login_timeout_ms: 30_000,
        }
    }
}

/// What an iSER header (RFC 7145 9.2) says about the initiator's buffers
/// for one SCSI Command: the STag and base virtual address the target
/// RDMA-Reads solicited write data from, and those it RDMA-Writes read
/// data to. For reads, byte N of the transfer is at `va + N`; for writes
/// the write VA addresses the first solicited byte, so byte N is at
/// `va + N - unsolicited length` (the Linux initiator advertises it so
/// and does not use zero-based addressing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RdmaTags {
    pub write: Option<(u32, u64)>,
    pub read: Option<(u32, u64)>,
}

/// Work for the engine.
#[derive(Debug)]
pub enum Event {
    /// iSER: fetch `len` bytes of write data by RDMA Read from the
    /// initiator's `stag` at `va` into the task's buffer at `offset`
    /// (`rdma_read_target`), then call `rdma_read_done`. This is the
    /// R2T of iSCSI over TCP, and counts against MaxOutstandingR2T.
    RdmaRead {
        task: TaskId,
        ttt: u32,
        offset: u32,
        len: u32,
        stag: u32,
        va: u64,
    },
    /// Login finished; the connection is in full feature phase.
    LoggedIn(Box<LoginOutcome>),
    /// Execute a SCSI command; answer with `scsi_complete(task, ..)`.
    Scsi(ScsiRequest),
    /// A command given to the device server was aborted: its completion
    /// will be dropped, and the device server may drop it too.
    Abort { task: TaskId, lun: u64 },
    /// Reset the logical unit (raw SAM LUN); answer with `tmf_done`.
    LunReset { itt: u32, lun: u64 },
    /// Reset the whole target; answer with `tmf_done`. `cold` also ends
    /// every session once the response is out.
    TargetReset { itt: u32, cold: bool },
    /// Close the transport once the bytes queued so far are sent.
    Close(CloseReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    LoginFailed,
    Logout,
    ProtocolError(String),
    NopTimeout,
    LoginTimeout,
    TargetColdReset,
}

/// Where a connection gets buffers for write data, and where it returns
/// the payload buffers of PDUs it is done with, so that the data path
/// reuses memory instead of allocating. The defaults allocate and free,
/// which suits tests and tools.
pub trait BufferSource {
    /// An empty buffer with room for at least `len` bytes.
    fn data_buffer(&mut self, len: usize) -> Vec<u8> {
        Vec::with_capacity(len)
    }
    /// A buffer of exactly `len` bytes that the caller will overwrite
    /// completely; its contents may be stale (never read before written).
    fn data_buffer_sized(&mut self, len: usize) -> DataBuf {
        vec![0; len].into()
    }
    /// A buffer the connection no longer needs.
    fn recycle(&mut self, buf: Vec<u8>) {
        drop(buf)
    }
    /// A data buffer the connection no longer needs.
    fn recycle_data(&mut self, buf: DataBuf) {
        drop(buf)
    }
}

/// Where a transport takes a connection's output when it can send data
/// from the buffer that holds it (a socket's writev, an RDMA work
/// request) instead of a copy. Calls arrive in wire order.
pub trait TxSink {
    /// Wire bytes, copied (headers, padding, digests: a few bytes each).
    fn put_bytes(&mut self, bytes: &[u8]);
    /// Wire bytes, taking `bytes`' contents (leaving it empty).
    fn put_vec(&mut self, bytes: &mut Vec<u8>);
    /// The data buffer that the following `put_range` calls send from.
    fn put_data(&mut self, buf: DataBuf);
    /// Send `start..end` of the last buffer given to `put_data`.
    fn put_range(&mut self, start: usize, end: usize);
    /// CRC32C of the bytes of the last `put_range` (the data digest,
    /// asked for only when it is on).
    fn last_range_crc32c(&self) -> u32;
    /// iSER: RDMA-Write the first `len` bytes of `buf` to the initiator's
    /// `stag` at `va`, ordered before every Send that follows (the SCSI
    /// Response). Only iSER connections call it; a sink that cannot do
    /// RDMA keeps the default, which gives the buffer back unsent.
    fn put_rdma_write(&mut self, buf: DataBuf, len: usize, stag: u32, va: u64) -> Option<DataBuf> {
        let _ = (len, stag, va);
        Some(buf)
    }
}

/// How a completion's data reaches the wire.
enum DataIn<'a> {
    Copy(&'a [u8]),
    /// The buffer (taken when the first range is sent) and its sink.
    Owned(&'a mut Option<DataBuf>, &'a mut dyn TxSink),
}

impl DataIn<'_> {
    fn len(&self) -> usize {
        match self {
            DataIn::Copy(d) => d.len(),
            DataIn::Owned(b, _) => b.as_ref().map_or(0, |b| b.len()),
        }
    }
}

/// Queued output up to this size (a response or two) is copied into a
/// sink rather than handed over as a buffer (see `hand_tx`).
const HAND_TX_COPY_MAX: usize = 128;

/// A SCSI command for the device server.
#[derive(Debug)]
pub struct ScsiRequest {
    pub task: TaskId,
    /// Raw 8-byte SAM LUN field.
    pub lun: u64,
    /// The BHS's 16 CDB bytes (a shorter CDB is zero-padded)...
    pub cdb: [u8; 16],
    /// ...and the rest of an extended CDB (the Extended CDB AHS), usually
    /// empty, so a command carries no heap allocation.
    pub cdb_ext: Vec<u8>,
    /// ATTR bits of the SCSI Command PDU.
    pub attr: u8,
    pub edtl: u32,
    pub read: bool,
    pub write: bool,
    /// All write data (`<= edtl` bytes), gathered from immediate data,
    /// unsolicited and solicited Data-Out.
    pub data_out: DataBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    FullFeature,
    /// Logout response queued or fatal error: ignore further input.
    Closing,
}

#[derive(Debug)]
enum TaskState {
    /// Collecting write data.
    DataOut,
    /// With the device server.
    Submitted,
    /// Aborted while with the device server: drop its completion.
    Aborted,
}

/// One outstanding R2T (RFC 7143 11.8).
#[derive(Debug, Clone, Copy, Default)]
struct R2t {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_datasn: u32,
}

/// Outstanding R2Ts of one task at most; more than MaxOutstandingR2T
/// allows is never needed, and fewer is always allowed, so a negotiated
/// value above this just means we solicit this many at a time.
const R2T_SLOTS: usize = 16;

/// A task's outstanding R2Ts, inline so that soliciting write data does
/// not allocate.
#[derive(Debug, Default)]
struct R2tList {
    items: [R2t; R2T_SLOTS],
    len: usize,
}

impl R2tList {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, r: R2t) {
        assert!(self.len < R2T_SLOTS, "more R2Ts than R2T_SLOTS");
        self.items[self.len] = r;
        self.len += 1;
    }

    fn find_mut(&mut self, ttt: u32) -> Option<&mut R2t> {
        self.items[..self.len].iter_mut().find(|r| r.ttt == ttt)
    }

    /// Keep the R2Ts for which `keep` is true, in order.
    fn retain(&mut self, keep: impl Fn(&R2t) -> bool) {
        let mut n = 0;
        for i in 0..self.len {
            if keep(&self.items[i]) {
                self.items[n] = self.items[i];
                n += 1;
            }
        }
        self.len = n;
    }
}

#[derive(Debug)]
struct Task {
    itt: u32,
    /// Immediate commands hold no place in the command window.
    immediate: bool,
    lun: u64,
    state: TaskState,
    cdb: [u8; 16],
    cdb_ext: Vec<u8>,
    attr: u8,
    edtl: u32,
    read: bool,
    write: bool,
    /// Write data gathered so far, sized to EDTL once write data flows.
    data_out: DataBuf,
    /// Bytes of write data received in order from offset 0.
    received: u32,
    /// The unsolicited sequence is over (F bit seen, or none allowed).
    unsolicited_done: bool,
    /// Unsolicited Data-Out DataSN expected next.
    unsolicited_datasn: u32,
    /// Offset from which no R2T has been sent yet.
    r2t_next_offset: u32,
    /// Where solicited data starts (the unsolicited data's end): the iSER
    /// write VA addresses this byte.
    solicited_base: u32,
    r2ts: R2tList,
    r2tsn: u32,
    /// iSER: the initiator's buffers (none on TCP).
    rdma: RdmaTags,
}

/// Where a valid Data-Out's data belongs.
#[derive(Debug, Clone, Copy)]
enum DataOutTo {
    Unsolicited,
    /// The R2T with this TTT.
    R2t(u32),
}

/// Where a data segment received straight into place goes.
#[derive(Debug, Clone, Copy)]
enum RxInto {
    /// A Data-Out's, into its task's buffer at BufferOffset.
    DataOut { itt: u32, offset: u32, len: u32 },
    /// A write command's immediate data, into the buffer staged for it.
    Staged { itt: u32, cmdsn: u32, len: u32 },
}

enum DataOutError {
    /// No task with that ITT (aborted, refused or finished).
    NoTask,
    /// Solicited data on iSER, where solicited data only moves by RDMA
    /// Read (RFC 7145): the PDU is rejected and dropped, and the task goes
    /// on with its RDMA Reads.
    NotOnIser,
    /// The task's data sequence is broken: ASC, ASCQ and why.
    Sequence(u8, u8, String),
}

/// Fixed-format sense data (SPC-4 4.5.3) for the few commands the iSCSI
/// layer ends itself, before or without the device server: `sks` is the
/// sense-key specific field (bytes 15-17).
const fn fixed_sense(key: u8, asc: u8, ascq: u8, sks: [u8; 3]) -> [u8; 18] {
    [
        0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, sks[0], sks[1], sks[2],
    ]
}

/// ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at the transfer length:
/// the iSCSI layer refuses an oversized write before sizing its buffer.
const SENSE_TRANSFER_TOO_LONG: [u8; 18] = fixed_sense(0x05, 0x24, 0x00, [0xc0, 0, 7]);

/// ILLEGAL REQUEST, INVALID FIELD IN CDB, with no field pointer: the
/// Extended CDB AHS makes a CDB longer than any SCSI defines.
const SENSE_CDB_TOO_LONG: [u8; 18] = fixed_sense(0x05, 0x24, 0x00, [0, 0, 0]);

/// Longest CDB SCSI defines (SPC-4 4.2.3: a variable-length CDB's
/// additional length ends it at 260 bytes), so the Extended CDB AHS
/// carries at most its last 244. A TotalAHSLength of up to 1020 bytes
/// would let an initiator send more; the device server never sees it.
pub const CDB_LEN_MAX: usize = 260;

/// Largest sense data carried in a SCSI Response (SenseLength is 16 bits,
/// but SPC-4 sense data is at most 252 bytes).
const SENSE_LEN_MAX: usize = 252;

/// Limits on what one connection holds (TIGER_STYLE: a bound on
/// everything).
const PENDING_CMDS_MAX: usize = 64;
const IMMEDIATE_SLOTS: usize = 16;

pub struct Connection {
    cfg: ConnConfig,
    phase: Phase,
    login: Option<LoginMachine>,
    session: SessionParams,
    params: ConnParams,
    decoder: Decoder,
    encoder: Encoder,
    /// Wire bytes waiting for the transport.
    tx: Vec<u8>,
    events: VecDeque<Event>,

    // Sequencing (RFC 7143 4.2.2).
    statsn: u32,
    exp_cmdsn: u32,
    max_cmdsn: u32,
    /// Non-immediate commands that arrived ahead of ExpCmdSN.
    pending: Vec<(Pdu, RdmaTags)>,

    // Tasks.
    slots: Vec<Option<Task>>,
    generations: Vec<u16>,
    free: Vec<u32>,
    by_itt: HashMap<u32, TaskId, BuildIdHasher>,
    /// Non-immediate tasks holding a place in the command window.
    window_used: u32,
    next_ttt: u32,

    /// The Data-Out whose data `place_data_out` or a receive into place
    /// (`rx_direct_end`) put in place (ITT, BufferOffset, length), until
    /// `handle_pdu` gets that PDU.
    placed: Option<(u32, u32, u32)>,
    /// Immediate data that `stage_immediate` copied from the receive
    /// buffer into a data buffer sized for the whole write: (ITT, CmdSN,
    /// bytes of immediate data, buffer). Taken by the command when it
    /// runs; at most one per command waiting for a CmdSN gap, plus the
    /// one being decoded.
    staged: Vec<(u32, u32, u32, DataBuf)>,
    /// The PDU whose data segment the transport is receiving straight
    /// into its place (`rx_direct_begin` .. `rx_direct_end`).
    rx_into: Option<RxInto>,
    /// iSER: write buffers of tasks that ended (aborted, failed) while
    /// RDMA Reads into them were still posted: (task, reads outstanding,
    /// buffer). The device may still write into them, so they are freed
    /// only when `rdma_read_done` has been called for each read.
    rdma_held: Vec<(TaskId, u32, DataBuf)>,

    text: TextMachine,
    /// CID of this connection, from login.
    cid: u16,

    // Timers.
    created_ms: u64,
    last_rx_ms: u64,
    ping: Option<(u32, u64)>,
}

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers.
#[inline]
fn sn_lt(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}
#[inline]
fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

impl Connection {
    pub fn new(cfg: ConnConfig, now_ms: u64) -> Connection {
        let slots = cfg.limits.queue_depth as usize + IMMEDIATE_SLOTS;
        assert!(slots < 1 << 16, "queue depth too large for task ids");
        let login = LoginMachine::new(cfg.limits.clone(), cfg.transport);
        Connection {
            phase: Phase::Login,
            login: Some(login),
            session: SessionParams::default(),
            params: ConnParams {
                transport: cfg.transport,
                ..ConnParams::default()
            },
            // During login both sides are limited to 8192-byte data
            // segments (RFC 7143 13.12).
            decoder: Decoder::new(8192),
            encoder: Encoder::default(),
            tx: Vec::with_capacity(64 * 1024),
            events: VecDeque::new(),
            statsn: 0,
            exp_cmdsn: 0,
            max_cmdsn: 0,
            pending: Vec::with_capacity(PENDING_CMDS_MAX),
            staged: Vec::with_capacity(PENDING_CMDS_MAX + 1),
            slots: (0..slots).map(|_| None).collect(),
            generations: vec![0; slots],
            free: (0..slots as u32).rev().collect(),
            by_itt: HashMap::with_capacity_and_hasher(slots, BuildIdHasher),
            window_used: 0,
            next_ttt: 1,
            placed: None,
            rx_into: None,
            rdma_held: Vec::new(),
            text: TextMachine::default(),
            cid: 0,
            created_ms: now_ms,
            last_rx_ms: now_ms,
            ping: None,
            cfg,
        }
    }

    /// How to frame the next PDU from the initiator.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn session(&self) -> &SessionParams {
        &self.session
    }

    pub fn params(&self) -> &ConnParams {
        &self.params
    }

    pub fn is_full_feature(&self) -> bool {
        self.phase == Phase::FullFeature
    }

    /// The login state machine, until full feature phase (also after the
    /// login failed: what it knows about who tried and how it ended).
    pub fn login(&self) -> Option<&LoginMachine> {
        self.login.as_ref()
    }

    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// Bytes queued for sending.
    pub fn has_tx(&self) -> bool {
        !self.tx.is_empty()
    }

    /// Wire bytes waiting for `take_tx`.
    pub fn tx_len(&self) -> usize {
        self.tx.len()
    }

    /// Move queued wire bytes into `out` (swapping buffers when `out` is
    /// empty, so nothing is copied in the common case).
    pub fn take_tx(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.tx);
        } else {
            out.extend_from_slice(&self.tx);
            self.tx.clear();
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Tasks in any state (for draining at close).
    pub fn tasks_in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// A decode error from the transport.
    pub fn handle_decode_error(&mut self, err: PduError) {
        match err {
            PduError::DataDigest { bhs, .. } if self.phase == Phase::FullFeature => {
                // The header is sound, so say which PDU was lost; at ERL 0
                // the initiator cannot retransmit it, so the connection ends.
                self.send_reject(reject::DATA_DIGEST_ERROR, &bhs);
                self.fatal("data digest error".into());
            }
            e => self.fatal(e.to_string()),
        }
    }

    /// Feed one decoded PDU.
    pub fn handle_pdu<C: LoginContext + TextContext + BufferSource>(
        &mut self,
        ctx: &mut C,
        pdu: Pdu,
        now_ms: u64,
    ) {
        self.handle_pdu_rdma(ctx, pdu, RdmaTags::default(), now_ms)
    }

    /// `handle_pdu` for iSER: the PDU with what its iSER header said about
    /// the initiator's buffers.
    pub fn handle_pdu_rdma<C: LoginContext + TextContext + BufferSource>(
        &mut self,
        ctx: &mut C,
        pdu: Pdu,
        rdma: RdmaTags,
        now_ms: u64,
    ) {
        self.last_rx_ms = now_ms;
        match self.phase {
            Phase::Closing => {}
            Phase::Login => self.handle_login(ctx, pdu),
            Phase::FullFeature => self.handle_ffp(ctx, pdu, rdma),
        }
        if !self.staged.is_empty() {
            // Staged data whose command neither ran nor waits for a CmdSN
            // gap (rejected, ignored): its buffer goes back to the pool.
            let pending = &self.pending;
            self.staged.retain(|&(itt, sn, _, _)| {
                pending
                    .iter()
                    .any(|(p, _)| p.bhs.itt() == itt && p.bhs.cmdsn() == sn)
            });
        }
    }

    /// Offered each data segment before the PDU is decoded into a `Pdu`:
    /// the immediate data of a write goes from the receive buffer into a
    /// buffer from `alloc`, sized for the whole write, which the command
    /// then keeps (one copy, into the pool, as for Data-Out). Returns
    /// false (the data then comes in the PDU as usual) for anything the
    /// command's checks would refuse, and when `alloc` has no buffer.
    pub fn stage_immediate(
        &mut self,
        bhs: &Bhs,
        data: &[u8],
        alloc: &mut dyn FnMut(usize) -> Option<DataBuf>,
    ) -> bool {
        if data.is_empty() || data.len() != bhs.data_segment_len() as usize {
            return false;
        }
        let Some(buf) = self.stage_buffer(bhs, alloc) else {
            return false;
        };
        buf.copy_from_at(0, data);
        true
    }

    /// `stage_immediate` for a write whose immediate data is all its
    /// data, without a copy: `lend` hands over the segment where it was
    /// received (a view of the transport's receive ring), and the command
    /// keeps that as its buffer. False, with nothing lent, for anything the
    /// command's checks would refuse, for data still to come after the
    /// segment, and when `lend` has nothing.
    /// `lend` is given the command's LUN (a LUN may refuse lent memory).
    pub fn stage_immediate_lent(
        &mut self,
        bhs: &Bhs,
        lend: &dyn Fn(u64) -> Option<DataBuf>,
    ) -> bool {
        let imm = bhs.data_segment_len();
        if imm != bhs.edtl() || !self.may_stage(bhs) {
            return false;
        }
        let Some(buf) = lend(bhs.lun()) else {
            return false;
        };
        debug_assert_eq!(buf.len(), imm as usize, "the segment is lent whole");
        self.staged.push((bhs.itt(), bhs.cmdsn(), imm, buf));
        true
    }

    /// A buffer staged for the write command `bhs`, sized for all its
    /// data, whose first DataSegmentLength bytes are for its immediate
    /// data; none for what the command's checks would refuse.
    fn stage_buffer(
        &mut self,
        bhs: &Bhs,
        alloc: &mut dyn FnMut(usize) -> Option<DataBuf>,
    ) -> Option<&mut DataBuf> {
        if !self.may_stage(bhs) {
            return None;
        }
        let (edtl, imm) = (bhs.edtl(), bhs.data_segment_len());
        let buf = alloc(edtl as usize)?;
        if buf.len() != edtl as usize {
            return None;
        }
        self.staged.push((bhs.itt(), bhs.cmdsn(), imm, buf));
        self.staged.last_mut().map(|s| &mut s.3)
    }

    /// Whether the write command `bhs`'s immediate data may be staged
    /// before the command runs: what its checks in `handle_scsi_cmd`
    /// would accept, with room in the staging list.
    fn may_stage(&self, bhs: &Bhs) -> bool {
        let edtl = bhs.edtl();
        let imm = bhs.data_segment_len();
        let (itt, cmdsn) = (bhs.itt(), bhs.cmdsn());
        !(self.phase != Phase::FullFeature
            || bhs.opcode() != opcode::SCSI_CMD
            || imm == 0
            || bhs.flags() & flags::WRITE == 0
            || !self.session.immediate_data
            || imm > edtl
            || imm > self.session.first_burst_length
            || edtl > self.cfg.limits.max_cmd_data_len
            || self.staged.len() == self.staged.capacity()
            // A command with these very numbers already holds a buffer
            // (it waits for a CmdSN gap): this one is a duplicate, which
            // `handle_pdu` answers, and must not write into that buffer.
            || self.staged.iter().any(|s| s.0 == itt && s.1 == cmdsn))
    }

    /// A transport that has a PDU's header (its digest checked) but not
    /// yet its data segment may have the segment received straight into
    /// the place it belongs, so the payload is copied by the kernel's
    /// socket read alone: a Data-Out's data into its task's buffer at
    /// BufferOffset, a write command's immediate data into a buffer from
    /// `alloc` staged for the command. Returns where the segment goes
    /// (DataSegmentLength bytes), or None for a PDU whose data must come
    /// the usual way (other opcodes, and anything `handle_pdu` would
    /// refuse, which it then answers). Once the segment is in, the
    /// transport calls `rx_direct_end` and gives the PDU to `handle_pdu`
    /// with empty data.
    pub fn rx_direct_begin(
        &mut self,
        bhs: &Bhs,
        alloc: &mut dyn FnMut(usize) -> Option<DataBuf>,
    ) -> Option<DataDest<'_>> {
        self.rx_into = None;
        let len = bhs.data_segment_len();
        if self.phase != Phase::FullFeature || len == 0 || bhs.total_ahs_len() != 0 {
            return None;
        }
        let into = match bhs.opcode() {
            opcode::DATA_OUT => {
                self.data_out_check(bhs, len).ok()?;
                RxInto::DataOut {
                    itt: bhs.itt(),
                    offset: bhs.buffer_offset(),
                    len,
                }
            }
            opcode::SCSI_CMD => {
                self.stage_buffer(bhs, alloc)?;
                RxInto::Staged {
                    itt: bhs.itt(),
                    cmdsn: bhs.cmdsn(),
                    len,
                }
            }
            _ => return None,
        };
        self.rx_into = Some(into);
        self.rx_direct_dest()
    }

    /// Where the rest of the segment `rx_direct_begin` accepted goes.
    /// None once that place is gone (the task was aborted meanwhile by
    /// another connection's task management): the transport then reads
    /// the rest of the segment and drops it.
    pub fn rx_direct_dest(&mut self) -> Option<DataDest<'_>> {
        match self.rx_into? {
            RxInto::DataOut { itt, offset, len } => {
                let id = *self.by_itt.get(&itt)?;
                let t = self.task_mut(id)?;
                if !matches!(t.state, TaskState::DataOut) {
                    return None;
                }
                DataDest::new(&mut t.data_out, offset as usize, len as usize)
            }
            RxInto::Staged { itt, cmdsn, len } => self
                .staged
                .iter_mut()
                .find(|s| s.0 == itt && s.1 == cmdsn)
                .and_then(|s| DataDest::new(&mut s.3, 0, len as usize)),
        }
    }

    /// The segment `rx_direct_begin` accepted is all in place; its PDU
    /// comes next, with empty data.
    pub fn rx_direct_end(&mut self) {
        if let Some(RxInto::DataOut { itt, offset, len }) = self.rx_into.take() {
            self.placed = Some((itt, offset, len));
        }
    }

    /// Drive timers: NOP-In pings, ping and login timeouts.
    pub fn tick(&mut self, now_ms: u64) {
        match self.phase {
            Phase::Closing => {}
            Phase::Login => {
                if now_ms.saturating_sub(self.created_ms) > self.cfg.login_timeout_ms {
                    self.close(CloseReason::LoginTimeout);
                }
            }
            Phase::FullFeature => {
                if let Some((_, sent)) = self.ping {
                    if now_ms.saturating_sub(sent) > self.cfg.nop_timeout_ms {
                        self.close(CloseReason::NopTimeout);
                    }
                } else if self.cfg.nop_interval_ms > 0
                    && now_ms.saturating_sub(self.last_rx_ms) > self.cfg.nop_interval_ms
                {
                    let ttt = self.alloc_ttt();
                    let mut b = Bhs::new(opcode::NOP_IN);
                    b.set_flags(flags::FINAL);
                    b.set_itt(RESERVED_TAG);
                    b.set_ttt(ttt);
                    // A ping carries the next StatSN without consuming it.
                    self.fill_sn(&mut b, false);
                    self.push(&b, &[]);
                    self.ping = Some((ttt, now_ms));
                }
            }
        }
    }

    // ---------------------------------------------------------------
    // Login

    fn handle_login<C: LoginContext>(&mut self, ctx: &mut C, pdu: Pdu) {
        if pdu.bhs.opcode() != opcode::LOGIN_REQ {
            // Nothing but Login is valid before full feature phase, and a
            // Login Response cannot answer another opcode.
            self.close(CloseReason::ProtocolError(format!(
                "opcode {:#04x} before login completed",
                pdu.bhs.opcode()
            )));
            return;
        }
        let Some(machine) = self.login.as_mut() else {
            return;
        };
        match machine.handle(ctx, &pdu) {
            LoginStep::Continue(resps) => {
                for r in &resps {
                    self.push(&r.bhs, &r.data);
                }
            }
            LoginStep::Failed(resp) => {
                self.push(&resp.bhs, &resp.data);
                self.close(CloseReason::LoginFailed);
            }
            LoginStep::Complete { responses, outcome } => {
                for r in &responses {
                    self.push(&r.bhs, &r.data);
                }
                self.enter_ffp(&outcome);
                self.events.push_back(Event::LoggedIn(outcome));
            }
        }
    }

    fn enter_ffp(&mut self, o: &LoginOutcome) {
        self.login = None;
        self.phase = Phase::FullFeature;
        self.session = o.session.clone();
        self.params = o.conn.clone();
        self.cid = o.cid;
        self.statsn = o.next_statsn;
        self.exp_cmdsn = o.exp_cmdsn;
        let depth = self.cfg.limits.queue_depth.max(1);
        self.max_cmdsn = self.exp_cmdsn.wrapping_add(depth - 1);
        // Digests and the negotiated segment size apply from the first PDU
        // after the final Login Response (RFC 7143 13.1, 13.12).
        self.decoder = Decoder {
            header_digest: o.conn.header_digest,
            data_digest: o.conn.data_digest,
            max_recv_data_len: o.conn.max_recv_data_segment_length,
        };
        self.encoder = Encoder {
            header_digest: o.conn.header_digest,
            data_digest: o.conn.data_digest,
        };
    }

    // ---------------------------------------------------------------
    // Full feature phase

    fn handle_ffp<C: LoginContext + TextContext + BufferSource>(
        &mut self,
        ctx: &mut C,
        pdu: Pdu,
        rdma: RdmaTags,
    ) {
        let op = pdu.bhs.opcode();
        match op {
            opcode::DATA_OUT => {
                self.handle_data_out(&pdu);
                return ctx.recycle(pdu.data);
            }
            opcode::SNACK_REQ => {
                // SNACK needs ErrorRecoveryLevel > 0, which we never agree to.
                return self.send_reject(reject::PROTOCOL_ERROR, &pdu.bhs);
            }
            opcode::LOGIN_REQ => {
                return self.send_reject(reject::PROTOCOL_ERROR, &pdu.bhs);
            }
            opcode::NOP_OUT
            | opcode::SCSI_CMD
            | opcode::TASK_MGMT_REQ
            | opcode::TEXT_REQ
            | opcode::LOGOUT_REQ => {}
            _ => return self.send_reject(reject::PROTOCOL_ERROR, &pdu.bhs),
        }
        // A NOP-Out answering our ping carries no command number.
        if op == opcode::NOP_OUT && pdu.bhs.itt() == RESERVED_TAG {
            return self.handle_nop_out(pdu);
        }
        if pdu.bhs.immediate() {
            // Immediate commands carry the current CmdSN and do not advance
            // it (RFC 7143 4.2.2.1); outside the window they are ignored.
            let sn = pdu.bhs.cmdsn();
            if !sn_le(self.exp_cmdsn, sn) || !sn_le(sn, self.max_cmdsn.wrapping_add(1)) {
                return;
            }
            return self.dispatch(ctx, pdu, rdma);
        }
        let sn = pdu.bhs.cmdsn();
        if sn == self.exp_cmdsn {
            self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
            self.dispatch(ctx, pdu, rdma);
            self.drain_pending(ctx);
        } else if sn_lt(self.exp_cmdsn, sn) && sn_le(sn, self.max_cmdsn) {
            // Ahead of a gap: hold it until the missing commands arrive.
            if self.pending.len() >= PENDING_CMDS_MAX {
                return self.fatal("too many commands waiting for a CmdSN gap".into());
            }
            if self.pending.iter().all(|(p, _)| p.bhs.cmdsn() != sn) {
                self.pending.push((pdu, rdma));
            }
        }
        // Outside the window: silently ignored (RFC 7143 4.2.2.1).
    }

    fn drain_pending<C: LoginContext + TextContext + BufferSource>(&mut self, ctx: &mut C) {
        while let Some(i) = self
            .pending
            .iter()
            .position(|(p, _)| p.bhs.cmdsn() == self.exp_cmdsn)
        {
            let (pdu, rdma) = self.pending.swap_remove(i);
            self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
            self.dispatch(ctx, pdu, rdma);
        }
    }

    fn dispatch<C: LoginContext + TextContext + BufferSource>(
        &mut self,
        ctx: &mut C,
        pdu: Pdu,
        rdma: RdmaTags,
    ) {
        if self.phase != Phase::FullFeature {
            return;
        }
        match pdu.bhs.opcode() {
            opcode::NOP_OUT => self.handle_nop_out(pdu),
            opcode::SCSI_CMD => self.handle_scsi_cmd(ctx, pdu, rdma),
            opcode::TASK_MGMT_REQ => self.handle_tmf(pdu),
            opcode::TEXT_REQ => self.handle_text(ctx, pdu),
            opcode::LOGOUT_REQ => self.handle_logout(pdu),
            _ => self.send_reject(reject::PROTOCOL_ERROR, &pdu.bhs),
        }
    }

    fn handle_nop_out(&mut self, pdu: Pdu) {
        let itt = pdu.bhs.itt();
        if itt == RESERVED_TAG {
            // The answer to our ping (or an unsolicited no-op).
            if let Some((ttt, _)) = self.ping {
                if pdu.bhs.ttt() == ttt {
                    self.ping = None;
                }
            }
            return;
        }
        let mut b = Bhs::new(opcode::NOP_IN);
        b.set_flags(flags::FINAL);
        b.set_lun(pdu.bhs.lun());
        b.set_itt(itt);
        b.set_ttt(RESERVED_TAG);
        self.fill_sn(&mut b, true);
        // The ping data comes back, limited to what the initiator accepts.
        let n = pdu
            .data
            .len()
            .min(self.params.max_xmit_data_segment_length as usize);
        self.push(&b, &pdu.data[..n]);
    }

    fn handle_logout(&mut self, pdu: Pdu) {
        let reason = pdu.bhs.logout_reason();
        let mut b = Bhs::new(opcode::LOGOUT_RESP);
        b.set_flags(flags::FINAL);
        b.set_itt(pdu.bhs.itt());
        // Response 0: closed successfully; 1: CID not found (RFC 7143
        // 11.15.1). Reason 2 (remove for recovery) needs ERL 2.
        let response = match reason {
            0 => 0,
            1 => {
                if pdu.bhs.cid() == self.cid() {
                    0
                } else {
                    1
                }
            }
            _ => 2,
        };
        b.0[2] = response;
        b.set_u16_at(40, self.session.default_time2wait);
        b.set_u16_at(42, self.session.default_time2retain);
        self.fill_sn(&mut b, true);
        self.push(&b, &[]);
        if response == 0 {
            self.abort_all(None);
            self.close(CloseReason::Logout);
        }
    }

    fn cid(&self) -> u16 {
        self.cid
    }

    fn handle_text<C: TextContext + ?Sized>(&mut self, ctx: &mut C, pdu: Pdu) {
        match self.text.handle(ctx, &self.session, &self.params, &pdu) {
            Ok(resp) => {
                let mut b = resp.bhs;
                self.fill_sn(&mut b, true);
                self.push(&b, &resp.data);
                if let Some(n) = self.text.take_max_xmit_update() {
                    self.params.max_xmit_data_segment_length = n;
                }
            }
            Err(r) => self.send_reject(r.reason(), &pdu.bhs),
        }
    }

    // ---------------------------------------------------------------
    // SCSI commands and write data

    fn handle_scsi_cmd<C: BufferSource>(&mut self, ctx: &mut C, pdu: Pdu, rdma: RdmaTags) {
        let bhs = pdu.bhs;
        if self.session.session_type == SessionType::Discovery {
            return self.send_reject(reject::COMMAND_NOT_SUPPORTED, &bhs);
        }
        let itt = bhs.itt();
        if itt == RESERVED_TAG || self.by_itt.contains_key(&itt) {
            // A tag in use is a task-in-progress error (RFC 7143 11.17.1).
            return self.send_reject(reject::INVALID_PDU_FIELD, &bhs);
        }
        let f = bhs.flags();
        let read = f & flags::READ != 0;
        let write = f & flags::WRITE != 0;
        let edtl = bhs.edtl();
        let staged = self
            .staged
            .iter()
            .position(|s| s.0 == itt && s.1 == bhs.cmdsn())
            .map(|i| self.staged.swap_remove(i));
        let imm_len = match &staged {
            Some(s) => s.2,
            None => pdu.data.len() as u32,
        };
        // Immediate data is allowed only when negotiated, only for writes,
        // and never beyond FirstBurstLength or EDTL.
        if imm_len > 0
            && (!self.session.immediate_data
                || !write
                || imm_len > edtl
                || imm_len > self.session.first_burst_length)
        {
            return self.send_reject(reject::PROTOCOL_ERROR, &bhs);
        }
        if write && edtl > self.cfg.limits.max_cmd_data_len {
            // The write buffer is sized from EDTL before any data arrives,
            // so a hostile EDTL must not size it: INVALID FIELD IN CDB.
            return self.respond_status_only(itt, 0x02, &SENSE_TRANSFER_TOO_LONG);
        }
        let ext = pdu.extended_cdb().unwrap_or_default();
        if ext.len() > CDB_LEN_MAX - bhs.cdb().len() {
            return self.respond_status_only(itt, 0x02, &SENSE_CDB_TOO_LONG);
        }
        let Some(slot) = self.free.pop() else {
            // No room: the window should have prevented this, so answer
            // TASK SET FULL rather than drop the command.
            return self.respond_status_only(itt, 0x28, &[]);
        };
        let cdb = *bhs.cdb();
        let cdb_ext = ext.to_vec();
        let id = self.task_id(slot);
        let want_data = write && edtl > 0;
        let mut task = Task {
            itt,
            immediate: bhs.immediate(),
            lun: bhs.lun(),
            state: TaskState::DataOut,
            cdb,
            cdb_ext,
            attr: f & flags::ATTR_MASK,
            edtl,
            read,
            write,
            data_out: DataBuf::new(),
            received: 0,
            unsolicited_done: true,
            unsolicited_datasn: 0,
            r2t_next_offset: 0,
            solicited_base: 0,
            r2ts: R2tList::default(),
            r2tsn: 0,
            rdma,
        };
        if want_data {
            if let Some((_, _, _, buf)) = staged {
                // Already in its buffer (`stage_immediate`).
                task.data_out = buf;
            } else if imm_len == edtl {
                // All the data came with the command: its buffer is the
                // task's, no copy.
                task.data_out = pdu.data.into();
            } else {
                // Every byte is written before the command runs: the
                // data sequence checks admit it only once `received`
                // reaches EDTL with each byte range given exactly once.
                let mut buf = ctx.data_buffer_sized(edtl as usize);
                buf.copy_from_at(0, &pdu.data);
                task.data_out = buf;
                ctx.recycle(pdu.data);
            }
            task.received = imm_len;
            // F clear on the command: unsolicited Data-Out follows, up to
            // FirstBurstLength (RFC 7143 11.3.1.1, 13.14).
            task.unsolicited_done = f & flags::FINAL != 0
                || self.session.initial_r2t
                || imm_len >= self.session.first_burst_length.min(edtl);
            task.r2t_next_offset = imm_len;
            task.solicited_base = imm_len;
        }
        if !bhs.immediate() {
            self.window_used += 1;
        }
        self.by_itt.insert(itt, id);
        self.slots[slot as usize] = Some(task);
        self.advance_task(id);
    }

    /// Send R2Ts or hand the task to the device server, as its data allows.
    fn advance_task(&mut self, id: TaskId) {
        let max_burst = self.session.max_burst_length.max(512);
        let max_r2t = (self.session.max_outstanding_r2t.max(1) as usize).min(R2T_SLOTS);
        let iser = self.params.transport == Transport::Iser;
        let Some(t) = self.task_mut(id) else { return };
        if t.received >= t.edtl || !t.write {
            let req = ScsiRequest {
                task: id,
                lun: t.lun,
                cdb: t.cdb,
                cdb_ext: std::mem::take(&mut t.cdb_ext),
                attr: t.attr,
                edtl: t.edtl,
                read: t.read,
                write: t.write,
                data_out: std::mem::take(&mut t.data_out),
            };
            t.state = TaskState::Submitted;
            self.events.push_back(Event::Scsi(req));
            return;
        }
        if !t.unsolicited_done {
            return;
        }
        // Solicit the rest, MaxBurstLength at a time, at most
        // MaxOutstandingR2T at once.
        let mut new_r2ts = [(0u32, 0u32); R2T_SLOTS];
        let mut n_new = 0;
        while t.r2ts.len() + n_new < max_r2t && t.r2t_next_offset < t.edtl {
            let len = (t.edtl - t.r2t_next_offset).min(max_burst);
            new_r2ts[n_new] = (t.r2t_next_offset, len);
            n_new += 1;
            t.r2t_next_offset += len;
        }
        let write_tag = t.rdma.write;
        let solicited_base = t.solicited_base;
        if iser && n_new > 0 && write_tag.is_none() {
            // Solicited data on iSER moves only by RDMA Read, which needs
            // the initiator's write STag.
            let itt = t.itt;
            self.take_task(id);
            tracing::info!(itt, "iSER write without a write STag");
            let sense = fixed_sense(0x0b, 0x0c, 0x0c, [0; 3]);
            return self.respond_status_only(itt, 0x02, &sense);
        }
        for &(offset, len) in &new_r2ts[..n_new] {
            let ttt = self.alloc_ttt();
            let (itt, lun, r2tsn) = {
                let t = self.task_mut(id).expect("task checked above");
                let r2tsn = t.r2tsn;
                t.r2tsn += 1;
                t.r2ts.push(R2t {
                    ttt,
                    offset,
                    len,
                    received: 0,
                    next_datasn: 0,
                });
                (t.itt, t.lun, r2tsn)
            };
            if let (true, Some((stag, va))) = (iser, write_tag) {
                self.events.push_back(Event::RdmaRead {
                    task: id,
                    ttt,
                    offset,
                    len,
                    stag,
                    // The initiator's write VA addresses the first byte
                    // it did not send unsolicited (Linux ib_iser
                    // advertises its buffer's address plus the
                    // unsolicited length; LIO's isert reads from there).
                    va: va.wrapping_add(offset.saturating_sub(solicited_base) as u64),
                });
                continue;
            }
            let mut b = Bhs::new(opcode::R2T);
            b.set_flags(flags::FINAL);
            b.set_lun(lun);
            b.set_itt(itt);
            b.set_ttt(ttt);
            self.fill_sn(&mut b, false);
            b.set_datasn(r2tsn);
            b.set_buffer_offset(offset);
            b.set_u32_at(44, len);
            self.push(&b, &[]);
        }
    }

    /// Where the data of a Data-Out PDU goes, or why it is refused. Shared
    /// by `place_data_out` (before the data is read) and `handle_data_out`
    /// (which applies it), so both always agree.
    fn data_out_check(&self, bhs: &Bhs, len: u32) -> Result<(TaskId, DataOutTo), DataOutError> {
        let Some(&id) = self.by_itt.get(&bhs.itt()) else {
            return Err(DataOutError::NoTask);
        };
        let Some(t) = self.task_ref(id) else {
            return Err(DataOutError::NoTask);
        };
        let ttt = bhs.ttt();
        let offset = bhs.buffer_offset();
        let datasn = bhs.datasn();
        let seq = |asc, ascq, why: String| Err(DataOutError::Sequence(asc, ascq, why));
        if !matches!(t.state, TaskState::DataOut) {
            return seq(
                0x4b,
                0x00,
                "Data-Out for a task not waiting for data".into(),
            );
        }
        if offset as u64 + len as u64 > t.edtl as u64 {
            return seq(
                0x4b,
                0x02,
                "Data-Out beyond the expected data transfer length".into(),
            );
        }
        if ttt == RESERVED_TAG {
            if t.unsolicited_done {
                seq(0x0c, 0x0c, "unexpected unsolicited data".into())
            } else if datasn != t.unsolicited_datasn {
                let e = t.unsolicited_datasn;
                seq(
                    0x4b,
                    0x00,
                    format!("unsolicited DataSN {datasn}, expected {e}"),
                )
            } else if offset != t.received {
                // DataPDUInOrder and DataSequenceInOrder are always Yes.
                let e = t.received;
                seq(0x4b, 0x05, format!("BufferOffset {offset}, expected {e}"))
            } else if offset + len > self.session.first_burst_length {
                seq(
                    0x0c,
                    0x0c,
                    "unsolicited data beyond FirstBurstLength".into(),
                )
            } else {
                Ok((id, DataOutTo::Unsolicited))
            }
        } else if self.params.transport == Transport::Iser {
            // The TTTs in `r2ts` name RDMA Reads under way into this very
            // buffer: taking such data as theirs would end the task while
            // a read may still write into it.
            Err(DataOutError::NotOnIser)
        } else if let Some(r) = t.r2ts.items[..t.r2ts.len].iter().find(|r| r.ttt == ttt) {
            if datasn != r.next_datasn {
                let e = r.next_datasn;
                seq(0x4b, 0x00, format!("DataSN {datasn}, expected {e}"))
            } else if offset != r.offset + r.received || r.received + len > r.len {
                seq(0x4b, 0x05, format!("BufferOffset {offset} outside its R2T"))
            } else {
                Ok((id, DataOutTo::R2t(ttt)))
            }
        } else {
            seq(0x4b, 0x01, format!("Data-Out with unknown TTT {ttt:#x}"))
        }
    }

    /// `place_data_out` without a copy, for a Data-Out that carries all of
    /// its task's write data at once (a small write without immediate
    /// data, sent unsolicited or answering one R2T): `lend` hands over the
    /// segment where it was received, given the task's LUN (a Data-Out's
    /// own LUN field is reserved when unsolicited), and the task keeps that
    /// in place of the buffer it was given, which is returned for the
    /// caller to give back to its pool. None, with nothing lent, for data
    /// the connection would refuse, for part of a task's data, and when
    /// `lend` has nothing; the caller then tries `place_data_out`.
    pub fn place_data_out_lent(
        &mut self,
        bhs: &Bhs,
        lend: &dyn Fn(u64) -> Option<DataBuf>,
    ) -> Option<DataBuf> {
        let len = bhs.data_segment_len();
        if self.phase != Phase::FullFeature
            || bhs.opcode() != opcode::DATA_OUT
            || len == 0
            || bhs.buffer_offset() != 0
            || bhs.total_ahs_len() != 0
        {
            return None;
        }
        let (id, _) = self.data_out_check(bhs, len).ok()?;
        let t = self.task_mut(id)?;
        if !matches!(t.state, TaskState::DataOut)
            || t.received != 0
            || len != t.edtl
            || t.data_out.len() != len as usize
        {
            return None;
        }
        let buf = lend(t.lun)?;
        debug_assert_eq!(buf.len(), len as usize, "the segment is lent whole");
        let given = std::mem::replace(&mut t.data_out, buf);
        self.placed = Some((bhs.itt(), 0, len));
        Some(given)
    }

    /// A transport that has a Data-Out's data in hand before giving the
    /// PDU to `handle_pdu` may put it straight into the task's buffer
    /// here (returns true), and then pass the PDU with empty data. Data the
    /// connection would refuse is not placed (false): the PDU then goes to
    /// `handle_pdu` with its data as usual, which answers the error. It is
    /// the placement of a segment received into place (`rx_direct_begin`)
    /// with the data already in hand.
    pub fn place_data_out(&mut self, bhs: &Bhs, data: &[u8]) -> bool {
        if bhs.opcode() != opcode::DATA_OUT || data.len() != bhs.data_segment_len() as usize {
            return false;
        }
        let Some(mut dst) = self.rx_direct_begin(bhs, &mut |_| None) else {
            return false;
        };
        dst.copy_from(0, data);
        self.rx_direct_end();
        true
    }

    fn handle_data_out(&mut self, pdu: &Pdu) {
        let bhs = pdu.bhs;
        // Data already put in place by `place_data_out` for this very PDU.
        let placed = self.placed.take().filter(|&(itt, off, n)| {
            pdu.data.is_empty()
                && itt == bhs.itt()
                && off == bhs.buffer_offset()
                && n == bhs.data_segment_len()
        });
        let len = match placed {
            Some((_, _, n)) => n,
            None => pdu.data.len() as u32,
        };
        let offset = bhs.buffer_offset();
        let (id, to) = match self.data_out_check(&bhs, len) {
            Ok(v) => v,
            Err(DataOutError::NoTask) => {
                // Data for a task we no longer hold: it was aborted or
                // refused before its data arrived, so the data has nowhere
                // to go.
                tracing::debug!(itt = bhs.itt(), "Data-Out for unknown task dropped");
                return;
            }
            Err(DataOutError::NotOnIser) => {
                tracing::info!(
                    itt = bhs.itt(),
                    ttt = bhs.ttt(),
                    "solicited Data-Out on an iSER connection rejected"
                );
                return self.send_reject(reject::PROTOCOL_ERROR, &bhs);
            }
            Err(DataOutError::Sequence(asc, ascq, why)) => {
                // A broken data sequence ends the command, not the
                // connection: CHECK CONDITION, ABORTED COMMAND with the ASC
                // saying what was wrong (SPC-4 table of 4Bh codes), and
                // later Data-Out PDUs for the task are dropped as belonging
                // to no task.
                tracing::info!(itt = bhs.itt(), "write data sequence error: {why}");
                let itt = bhs.itt();
                if let Some(&id) = self.by_itt.get(&itt) {
                    self.take_task(id);
                }
                let sense = fixed_sense(0x0b, asc, ascq, [0; 3]);
                return self.respond_status_only(itt, 0x02, &sense);
            }
        };
        let final_bit = bhs.final_bit();
        let Some(t) = self.task_mut(id) else {
            return;
        };
        if placed.is_none() {
            t.data_out.copy_from_at(offset as usize, &pdu.data);
        }
        t.received += len;
        match to {
            DataOutTo::Unsolicited => {
                t.unsolicited_datasn += 1;
                if final_bit {
                    t.unsolicited_done = true;
                    t.r2t_next_offset = t.received;
                    t.solicited_base = t.received;
                }
            }
            DataOutTo::R2t(ttt) => {
                if let Some(r) = t.r2ts.find_mut(ttt) {
                    r.next_datasn += 1;
                    r.received += len;
                }
                t.r2ts.retain(|r| r.received < r.len);
            }
        }
        self.advance_task(id);
    }

    /// The device server finished `task`. `data_in` is at its natural
    /// length; `data_out_len` is what the CDB asked to write. The data is
    /// copied into the connection's output; transports that can send from
    /// the buffer itself use `scsi_complete_owned`.
    pub fn scsi_complete(
        &mut self,
        task: TaskId,
        status: u8,
        sense: &[u8],
        data_in: &[u8],
        data_out_len: u32,
    ) {
        self.complete(task, status, sense, DataIn::Copy(data_in), data_out_len);
    }

    /// `scsi_complete` without copying the data: wire bytes produced so
    /// far, then each Data-In header followed by a range of `data_in`, go
    /// to `sink` in order, and the buffer goes with them. Returns the
    /// buffer when nothing is sent from it (no data, aborted task, closed
    /// connection), for the caller to reuse.
    pub fn scsi_complete_owned(
        &mut self,
        task: TaskId,
        status: u8,
        sense: &[u8],
        data_in: DataBuf,
        data_out_len: u32,
        sink: &mut dyn TxSink,
    ) -> Option<DataBuf> {
        let mut buf = Some(data_in);
        self.complete(
            task,
            status,
            sense,
            DataIn::Owned(&mut buf, sink),
            data_out_len,
        );
        buf
    }

    fn complete(
        &mut self,
        task: TaskId,
        status: u8,
        sense: &[u8],
        mut data_in: DataIn<'_>,
        data_out_len: u32,
    ) {
        let Some(t) = self.take_task(task) else {
            return;
        };
        if matches!(t.state, TaskState::Aborted) || self.phase != Phase::FullFeature {
            return;
        }
        let data_len = data_in.len();
        let edtl = t.edtl as u64;
        // Residuals compare EDTL with what the command wanted to move in
        // its data direction (RFC 7143 11.4.5).
        let natural = if t.write && !t.read {
            data_out_len as u64
        } else {
            data_len as u64
        };
        let (res_flag, residual) = if natural > edtl {
            (flags::OVERFLOW, (natural - edtl) as u32)
        } else if natural < edtl {
            (flags::UNDERFLOW, (edtl - natural) as u32)
        } else {
            (0, 0)
        };
        let send_len = (data_len as u64).min(if t.read || !t.write { edtl } else { 0 }) as usize;
        let mut datasn = t.r2tsn;
        if self.params.transport == Transport::Iser {
            return self.complete_iser(&t, status, sense, data_in, send_len, res_flag, residual);
        }
        // Status rides in the last Data-In when there is no sense to send
        // (RFC 7143 11.7.4).
        let collapse = send_len > 0 && sense.is_empty() && status == 0;
        if send_len > 0 {
            // Bytes already queued go first, then the buffer itself.
            if let DataIn::Owned(buf, sink) = &mut data_in {
                self.hand_tx(&mut **sink);
                if let Some(b) = buf.take() {
                    sink.put_data(b);
                }
            }
            for (off, n, burst_end) in self.data_in_pdus(send_len) {
                let last = off + n == send_len;
                let mut b = Bhs::new(opcode::DATA_IN);
                let mut fl = 0u8;
                if burst_end {
                    fl |= flags::FINAL;
                }
                b.set_lun(t.lun);
                b.set_itt(t.itt);
                b.set_ttt(RESERVED_TAG);
                b.set_datasn(datasn);
                b.set_buffer_offset(off as u32);
                if last && collapse {
                    fl |= flags::FINAL | flags::STATUS | res_flag;
                    b.0[3] = status;
                    b.set_residual_count(residual);
                    self.fill_sn(&mut b, true);
                } else {
                    self.fill_sn(&mut b, false);
                    b.set_statsn(0);
                }
                b.set_flags(fl);
                match &mut data_in {
                    DataIn::Copy(data) => self.push(&b, &data[off..off + n]),
                    DataIn::Owned(_, sink) => {
                        self.encoder.encode_header(&b, n, &mut self.tx);
                        sink.put_bytes(&self.tx);
                        self.tx.clear();
                        sink.put_range(off, off + n);
                        let mut trailer = [0u8; 8];
                        let crc = if self.encoder.data_digest {
                            sink.last_range_crc32c()
                        } else {
                            0
                        };
                        let len = self.encoder.data_trailer(n, crc, &mut trailer);
                        if len > 0 {
                            sink.put_bytes(&trailer[..len]);
                        }
                    }
                }
                datasn += 1;
            }
        }
        if !collapse {
            self.push_scsi_response(t.itt, status, sense, res_flag, datasn, residual);
        }
    }

    /// The Data-In PDUs that carry `len` bytes of read data: (BufferOffset,
    /// length, ends a burst or the data). Segments are at most the
    /// initiator's MaxRecvDataSegmentLength and never cross a
    /// MaxBurstLength boundary.
    fn data_in_pdus(&self, len: usize) -> impl Iterator<Item = (usize, usize, bool)> {
        let seg_max = self.params.max_xmit_data_segment_length.max(512) as usize;
        let burst_max = self.session.max_burst_length.max(512) as usize;
        let mut off = 0usize;
        std::iter::from_fn(move || {
            if off >= len {
                return None;
            }
            let burst_left = burst_max - (off % burst_max);
            let n = seg_max.min(len - off).min(burst_left);
            let at = off;
            off += n;
            Some((at, n, off == len || n == burst_left))
        })
    }

    /// iSER's data phase of a completion (RFC 7145 7.3.5): no Data-In
    /// PDUs; the read data goes by one RDMA Write to the initiator's read
    /// buffer, and a SCSI Response always follows (the reliable
    /// connection delivers it after the data). ExpDataSN still counts the
    /// Data-In PDUs the iSCSI layer would have produced.
    #[allow(clippy::too_many_arguments)]
    fn complete_iser(
        &mut self,
        t: &Task,
        status: u8,
        sense: &[u8],
        data_in: DataIn<'_>,
        send_len: usize,
        res_flag: u8,
        residual: u32,
    ) {
        let mut datasn = t.r2tsn;
        if send_len > 0 {
            let tag = t.rdma.read;
            let sent = match (data_in, tag) {
                (DataIn::Owned(buf, sink), Some((stag, va))) => {
                    self.hand_tx(&mut *sink);
                    match buf.take() {
                        Some(b) => match sink.put_rdma_write(b, send_len, stag, va) {
                            None => true,
                            Some(back) => {
                                *buf = Some(back);
                                false
                            }
                        },
                        None => false,
                    }
                }
                _ => false,
            };
            if !sent {
                // A read without a read STag is the initiator's protocol
                // error; a sink without RDMA is ours. Either way the data
                // cannot move: fail the command, not the connection.
                tracing::warn!(itt = t.itt, "iSER read data could not be sent");
                let sense = fixed_sense(0x0b, 0x44, 0x00, [0; 3]);
                return self.respond_status_only(t.itt, 0x02, &sense);
            }
            datasn += self.data_in_pdus(send_len).count() as u32;
        }
        self.push_scsi_response(t.itt, status, sense, res_flag, datasn, residual);
    }

    /// iSER: write buffers kept for RDMA Reads still posted into them
    /// after their task ended.
    pub fn rdma_buffers_held(&self) -> usize {
        self.rdma_held.len()
    }

    /// iSER: where the RDMA Read of `Event::RdmaRead` puts its bytes, the
    /// task's write buffer at `offset`; `None` once the task is gone
    /// (aborted): then skip the read and report it done anyway.
    pub fn rdma_read_target(
        &mut self,
        task: TaskId,
        offset: u32,
        len: u32,
    ) -> Option<DataDest<'_>> {
        let t = self.task_mut(task)?;
        if !matches!(t.state, TaskState::DataOut) {
            return None;
        }
        DataDest::new(&mut t.data_out, offset as usize, len as usize)
    }

    /// iSER: the RDMA Read for R2T `ttt` of `task` finished (`ok`), or
    /// failed (the queue pair is then broken and the connection ends).
    pub fn rdma_read_done(&mut self, task: TaskId, ttt: u32, ok: bool) {
        if !ok {
            return self.fatal("RDMA Read of write data failed".into());
        }
        if let Some(i) = self.rdma_held.iter().position(|h| h.0 == task) {
            // The task ended while this read was posted.
            self.rdma_held[i].1 -= 1;
            if self.rdma_held[i].1 == 0 {
                self.rdma_held.swap_remove(i);
            }
            return;
        }
        let Some(t) = self.task_mut(task) else {
            return;
        };
        if !matches!(t.state, TaskState::DataOut) {
            return;
        }
        let Some(r) = t.r2ts.find_mut(ttt) else {
            return;
        };
        let len = r.len - r.received;
        r.received = r.len;
        t.received += len;
        t.r2ts.retain(|r| r.received < r.len);
        self.advance_task(task);
    }

    /// Move the wire bytes queued so far into `sink`: small amounts by
    /// copy (the common case, a few headers), large ones by handing over
    /// the buffer.
    pub fn hand_tx(&mut self, sink: &mut dyn TxSink) {
        if self.tx.is_empty() {
            return;
        }
        if self.tx.len() <= HAND_TX_COPY_MAX {
            sink.put_bytes(&self.tx);
            self.tx.clear();
        } else {
            sink.put_vec(&mut self.tx);
        }
    }

    /// A SCSI Response with status and optional sense, no data.
    fn respond_status_only(&mut self, itt: u32, status: u8, sense: &[u8]) {
        self.push_scsi_response(itt, status, sense, 0, 0, 0);
    }

    /// Queue a SCSI Response (RFC 7143 11.4): "Command Completed at Target",
    /// `status`, residual flag and count, ExpDataSN, and the sense data
    /// behind its 2-byte SenseLength.
    fn push_scsi_response(
        &mut self,
        itt: u32,
        status: u8,
        sense: &[u8],
        res_flag: u8,
        exp_datasn: u32,
        residual: u32,
    ) {
        let mut b = Bhs::new(opcode::SCSI_RESP);
        b.set_flags(flags::FINAL | res_flag);
        b.0[3] = status;
        b.set_itt(itt);
        b.set_u32_at(36, exp_datasn);
        b.set_residual_count(residual);
        self.fill_sn(&mut b, true);
        let n = sense.len().min(SENSE_LEN_MAX);
        let mut seg = [0u8; 2 + SENSE_LEN_MAX];
        seg[..2].copy_from_slice(&(n as u16).to_be_bytes());
        seg[2..2 + n].copy_from_slice(&sense[..n]);
        let seg_len = if n == 0 { 0 } else { 2 + n };
        self.push(&b, &seg[..seg_len]);
    }

    // ---------------------------------------------------------------
    // Task management (RFC 7143 11.5)

    fn handle_tmf(&mut self, pdu: Pdu) {
        let b = pdu.bhs;
        let itt = b.itt();
        let lun = b.lun();
        let response = match b.tmf_function() {
            tmf::ABORT_TASK => self.tmf_abort_task(&b),
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                self.abort_all(Some(lun));
                tmf::RESP_COMPLETE
            }
            tmf::LOGICAL_UNIT_RESET => {
                self.abort_all(Some(lun));
                self.events.push_back(Event::LunReset { itt, lun });
                return;
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.abort_all(None);
                self.events.push_back(Event::TargetReset {
                    itt,
                    cold: b.tmf_function() == tmf::TARGET_COLD_RESET,
                });
                return;
            }
            tmf::QUERY_TASK => {
                let rtt = b.referenced_task_tag();
                let found = self.by_itt.get(&rtt).is_some_and(|&id| {
                    self.task_ref(id)
                        .is_some_and(|t| t.lun == lun && !matches!(t.state, TaskState::Aborted))
                });
                if found {
                    tmf::RESP_FUNCTION_SUCCEEDED
                } else {
                    tmf::RESP_COMPLETE
                }
            }
            tmf::QUERY_TASK_SET => {
                let any = self
                    .slots
                    .iter()
                    .flatten()
                    .any(|t| t.lun == lun && !matches!(t.state, TaskState::Aborted));
                if any {
                    tmf::RESP_FUNCTION_SUCCEEDED
                } else {
                    tmf::RESP_COMPLETE
                }
            }
            tmf::TASK_REASSIGN => tmf::RESP_REASSIGN_UNSUPPORTED,
            tmf::CLEAR_ACA | tmf::QUERY_ASYNC_EVENT => tmf::RESP_NOT_SUPPORTED,
            _ => tmf::RESP_REJECTED,
        };
        self.tmf_done(itt, response);
    }

    fn tmf_abort_task(&mut self, b: &Bhs) -> u8 {
        let rtt = b.referenced_task_tag();
        if let Some(&id) = self.by_itt.get(&rtt) {
            if self.task_ref(id).is_some_and(|t| t.lun == b.lun()) {
                self.abort_one(id);
                return tmf::RESP_COMPLETE;
            }
        }
        // Never received but within the window and older than this TMF:
        // consider it received and aborted (RFC 7143 11.5.1).
        let ref_sn = b.ref_cmdsn();
        if sn_le(self.exp_cmdsn, ref_sn) && sn_lt(ref_sn, b.cmdsn()) {
            tmf::RESP_COMPLETE
        } else {
            tmf::RESP_NO_TASK
        }
    }

    /// Answer a task management request, after the engine's part is done
    /// for LUN and target resets.
    pub fn tmf_done(&mut self, itt: u32, response: u8) {
        if self.phase != Phase::FullFeature {
            return;
        }
        let mut b = Bhs::new(opcode::TASK_MGMT_RESP);
        b.set_flags(flags::FINAL);
        b.0[2] = response;
        b.set_itt(itt);
        self.fill_sn(&mut b, true);
        self.push(&b, &[]);
    }

    /// After a TARGET COLD RESET response: end the connection.
    pub fn close_after_cold_reset(&mut self) {
        self.close(CloseReason::TargetColdReset);
    }

    fn abort_one(&mut self, id: TaskId) {
        let Some(t) = self.task_mut(id) else { return };
        match t.state {
            TaskState::DataOut => {
                self.take_task(id);
            }
            TaskState::Submitted => {
                t.state = TaskState::Aborted;
                let lun = t.lun;
                self.events.push_back(Event::Abort { task: id, lun });
            }
            TaskState::Aborted => {}
        }
    }

    /// Abort every task, or every task on `lun`.
    fn abort_all(&mut self, lun: Option<u64>) {
        let ids: Vec<TaskId> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let t = t.as_ref()?;
                (lun.is_none() || lun == Some(t.lun)).then(|| self.task_id(i as u32))
            })
            .collect();
        for id in ids {
            self.abort_one(id);
        }
    }

    // ---------------------------------------------------------------
    // Helpers

    fn task_id(&self, slot: u32) -> TaskId {
        (self.generations[slot as usize] as u32) << 16 | slot
    }

    fn slot_of(&self, id: TaskId) -> Option<usize> {
        let slot = (id & 0xffff) as usize;
        (slot < self.slots.len() && self.generations[slot] as u32 == id >> 16).then_some(slot)
    }

    fn task_ref(&self, id: TaskId) -> Option<&Task> {
        self.slots[self.slot_of(id)?].as_ref()
    }

    fn task_mut(&mut self, id: TaskId) -> Option<&mut Task> {
        let s = self.slot_of(id)?;
        self.slots[s].as_mut()
    }

    fn take_task(&mut self, id: TaskId) -> Option<Task> {
        let s = self.slot_of(id)?;
        let mut t = self.slots[s].take()?;
        if self.params.transport == Transport::Iser
            && matches!(t.state, TaskState::DataOut)
            && t.r2ts.len() > 0
        {
            // RDMA Reads are still posted into this buffer: keep it until
            // each has completed, so no other command can get it first.
            let buf = std::mem::take(&mut t.data_out);
            self.rdma_held.push((id, t.r2ts.len() as u32, buf));
        }
        self.generations[s] = self.generations[s].wrapping_add(1);
        self.free.push(s as u32);
        self.by_itt.remove(&t.itt);
        if !t.immediate {
            self.window_used = self.window_used.saturating_sub(1);
        }
        Some(t)
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    /// Fill StatSN, ExpCmdSN and MaxCmdSN; `advance` consumes a StatSN.
    fn fill_sn(&mut self, b: &mut Bhs, advance: bool) {
        b.set_statsn(self.statsn);
        if advance {
            self.statsn = self.statsn.wrapping_add(1);
        }
        // Open the window as far as free task slots allow, never closing
        // it below what was already promised (initiators ignore a smaller
        // MaxCmdSN).
        let depth = self.cfg.limits.queue_depth.max(1);
        let free = depth.saturating_sub(self.window_used);
        let candidate = self.exp_cmdsn.wrapping_add(free).wrapping_sub(1);
        if sn_lt(self.max_cmdsn, candidate) {
            self.max_cmdsn = candidate;
        }
        b.set_expcmdsn(self.exp_cmdsn);
        b.set_maxcmdsn(self.max_cmdsn);
    }

    fn push(&mut self, b: &Bhs, data: &[u8]) {
        self.encoder.encode_parts(b, &[], data, &mut self.tx);
    }

    fn send_reject(&mut self, reason: u8, rejected: &Bhs) {
        if self.phase != Phase::FullFeature {
            return;
        }
        let mut b = Bhs::new(opcode::REJECT);
        b.set_flags(flags::FINAL);
        b.0[2] = reason;
        b.set_itt(RESERVED_TAG);
        self.fill_sn(&mut b, true);
        let header: [u8; BHS_LEN] = rejected.0;
        self.push(&b, &header);
    }

    fn fatal(&mut self, why: String) {
        tracing::warn!("closing connection: {why}");
        self.close(CloseReason::ProtocolError(why));
    }

    fn close(&mut self, reason: CloseReason) {
        if self.phase == Phase::Closing {
            return;
        }
        self.phase = Phase::Closing;
        self.abort_all(None);
        self.events.push_back(Event::Close(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{ChapConfig, LoginStatus, SessionRequest};
    use crate::textreq::TargetRecord;

    struct Ctx;
    impl LoginContext for Ctx {
        fn portal_group_tag(&self) -> u16 {
            1
        }
        fn target_exists(&self, _: &str) -> bool {
            true
        }
        fn initiator_allowed(&self, _: &str, _: &str) -> bool {
            true
        }
        fn chap(&self, _: Option<&str>) -> ChapConfig {
            ChapConfig::default()
        }
        fn fill_random(&mut self, buf: &mut [u8]) {
            buf.fill(7);
        }
        fn instate_session(&mut self, _: &SessionRequest) -> Result<u16, LoginStatus> {
            Ok(1)
        }
    }
    impl BufferSource for Ctx {}

    impl TextContext for Ctx {
        fn send_targets(&self, _: &str, _: Option<&str>, _: &str) -> Vec<TargetRecord> {
            Vec::new()
        }
    }

    fn session() -> SessionParams {
        SessionParams {
            initiator_name: "iqn.2026-01.test:i".into(),
            target_name: "iqn.2026-01.test:t".into(),
            ..SessionParams::default()
        }
    }

    fn ffp(s: SessionParams, xmit: u32) -> Connection {
        let mut c = Connection::new(ConnConfig::default(), 0);
        c.enter_ffp(&LoginOutcome {
            session: s,
            conn: ConnParams {
                max_xmit_data_segment_length: xmit,
                max_recv_data_segment_length: 65536,
                ..ConnParams::default()
            },
            isid: 1,
            tsih: 1,
            cid: 0,
            exp_cmdsn: 1,
            next_statsn: 100,
        });
        c
    }

    fn drain(c: &mut Connection) -> Vec<Pdu> {
        let mut wire = Vec::new();
        c.take_tx(&mut wire);
        let d = Decoder::new(1 << 24);
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some((p, n)) = d.decode(&wire[pos..]).unwrap() {
            out.push(p);
            pos += n;
        }
        assert_eq!(pos, wire.len(), "trailing bytes in output");
        out
    }

    fn cmd(cmdsn: u32, itt: u32, fl: u8, edtl: u32, data: &[u8]) -> Pdu {
        let mut p = Pdu::new(opcode::SCSI_CMD);
        p.bhs.set_flags(fl);
        p.bhs.set_itt(itt);
        p.bhs.set_u32_at(20, edtl);
        p.bhs.set_u32_at(24, cmdsn);
        p.bhs.0[32] = 0x28;
        p.data = data.to_vec();
        p
    }

    fn scsi_event(c: &mut Connection) -> ScsiRequest {
        loop {
            match c.poll_event() {
                Some(Event::Scsi(r)) => return r,
                Some(_) => continue,
                None => panic!("no SCSI request"),
            }
        }
    }

    fn ffp_iser(s: SessionParams) -> Connection {
        let mut c = Connection::new(
            ConnConfig {
                transport: Transport::Iser,
                ..ConnConfig::default()
            },
            0,
        );
        c.enter_ffp(&LoginOutcome {
            session: s,
            conn: ConnParams {
                transport: Transport::Iser,
                max_xmit_data_segment_length: 8192,
                max_recv_data_segment_length: 8192,
                ..ConnParams::default()
            },
            isid: 1,
            tsih: 1,
            cid: 0,
            exp_cmdsn: 1,
            next_statsn: 100,
        });
        c
    }

    /// A sink that records RDMA Writes beside the wire bytes.
    #[derive(Default)]
    struct RdmaSink {
        wire: WireSink,
        writes: Vec<(DataBuf, usize, u32, u64, usize)>,
    }

    impl TxSink for RdmaSink {
        fn put_bytes(&mut self, bytes: &[u8]) {
            self.wire.put_bytes(bytes)
        }
        fn put_vec(&mut self, bytes: &mut Vec<u8>) {
            self.wire.put_vec(bytes)
        }
        fn put_data(&mut self, buf: DataBuf) {
            self.wire.put_data(buf)
        }
        fn put_range(&mut self, start: usize, end: usize) {
            self.wire.put_range(start, end)
        }
        fn last_range_crc32c(&self) -> u32 {
            self.wire.last_range_crc32c()
        }
        fn put_rdma_write(
            &mut self,
            buf: DataBuf,
            len: usize,
            stag: u32,
            va: u64,
        ) -> Option<DataBuf> {
            // Where the write sits among the Sends: bytes queued before it.
            let at = self.wire.wire.len();
            self.writes.push((buf, len, stag, va, at));
            None
        }
    }

    #[test]
    fn iser_read_data_goes_by_rdma_write_then_a_scsi_response() {
        let mut c = ffp_iser(session());
        let tags = RdmaTags {
            write: None,
            read: Some((0x55, 0x7f00_0000_1000)),
        };
        c.handle_pdu_rdma(
            &mut Ctx,
            cmd(1, 9, flags::FINAL | flags::READ, 20000, &[]),
            tags,
            0,
        );
        let r = scsi_event(&mut c);
        let data: Vec<u8> = (0..20000u32).map(|i| i as u8).collect();
        let mut sink = RdmaSink::default();
        assert!(c
            .scsi_complete_owned(r.task, 0, &[], data.clone().into(), 0, &mut sink)
            .is_none());
        assert_eq!(sink.writes.len(), 1);
        let (buf, len, stag, va, at) = &sink.writes[0];
        assert_eq!(
            (&buf[..*len], *stag, *va),
            (&data[..], 0x55, 0x7f00_0000_1000)
        );
        assert_eq!(*at, 0, "nothing was queued before the data");
        let out = drain(&mut c);
        assert_eq!(out.len(), 1, "no Data-In PDUs on iSER");
        let resp = &out[0].bhs;
        assert_eq!(resp.opcode(), opcode::SCSI_RESP);
        assert_eq!(resp.0[3], 0);
        assert_eq!(
            resp.u32_at(36),
            3,
            "ExpDataSN counts the Data-Ins that RDMA replaced"
        );
        assert!(sink.wire.wire.is_empty());
    }

    #[test]
    fn an_extended_cdb_beyond_260_bytes_is_refused_before_the_device_server() {
        // Extended CDB AHS (RFC 7143 11.3.3.2): AHSLength counts the
        // reserved byte and the CDB bytes after the first 16.
        let with_ext = |cmdsn: u32, itt: u32, ext_len: usize| {
            let mut p = cmd(cmdsn, itt, flags::FINAL | flags::READ, 512, &[]);
            let mut ahs = ((ext_len + 1) as u16).to_be_bytes().to_vec();
            ahs.extend_from_slice(&[1, 0]);
            ahs.extend((0..ext_len).map(|i| i as u8));
            ahs.resize((ahs.len() + 3) & !3, 0);
            p.bhs.set_total_ahs_len(ahs.len());
            p.ahs = ahs;
            p
        };
        let mut c = ffp(session(), 8192);
        c.handle_pdu(&mut Ctx, with_ext(1, 9, CDB_LEN_MAX - 16), 0);
        let r = scsi_event(&mut c);
        assert_eq!(r.cdb_ext.len(), CDB_LEN_MAX - 16);
        assert_eq!(r.cdb_ext[243], 243);
        c.scsi_complete(r.task, 0, &[], &[0; 512], 0);
        assert_eq!(drain(&mut c).last().unwrap().bhs.0[3], 0);

        // One byte more (the fuzzer's case: an AHS of up to 1020 bytes).
        for (i, ext_len) in [CDB_LEN_MAX - 15, 1000].into_iter().enumerate() {
            let itt = 10 + i as u32;
            c.handle_pdu(&mut Ctx, with_ext(2 + i as u32, itt, ext_len), 0);
            assert!(c.poll_event().is_none(), "the command reached no LUN");
            let out = drain(&mut c);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].bhs.itt(), itt);
            assert_eq!(out[0].bhs.0[3], 0x02, "CHECK CONDITION");
            assert_eq!(out[0].data[2 + 2], 0x05, "ILLEGAL REQUEST");
            assert_eq!(out[0].data[2 + 12], 0x24, "INVALID FIELD IN CDB");
            assert_eq!(c.tasks_in_flight(), 0);
        }
        assert!(!c.is_closing());
    }

    #[test]
    fn iser_read_without_a_read_stag_fails_the_command() {
        let mut c = ffp_iser(session());
        c.handle_pdu_rdma(
            &mut Ctx,
            cmd(1, 9, flags::FINAL | flags::READ, 4096, &[]),
            RdmaTags::default(),
            0,
        );
        let r = scsi_event(&mut c);
        let mut sink = RdmaSink::default();
        let back = c.scsi_complete_owned(r.task, 0, &[], vec![1; 4096].into(), 0, &mut sink);
        assert!(back.is_some() && sink.writes.is_empty());
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bhs.0[3], 0x02, "CHECK CONDITION");
        assert_eq!(out[0].data[2 + 2], 0x0b);
        assert!(!c.is_closing());
    }

    #[test]
    fn iser_write_merges_immediate_data_with_rdma_reads_of_the_rest() {
        let mut s = session();
        s.immediate_data = true;
        s.initial_r2t = true;
        s.first_burst_length = 8192;
        s.max_burst_length = 16384;
        s.max_outstanding_r2t = 1;
        let mut c = ffp_iser(s);
        let edtl = 40_000u32;
        let data: Vec<u8> = (0..edtl).map(|i| (i * 31 + 5) as u8).collect();
        let base = 0x10_0000u64;
        let tags = RdmaTags {
            write: Some((0x77, base)),
            read: None,
        };
        c.handle_pdu_rdma(
            &mut Ctx,
            cmd(1, 3, flags::FINAL | flags::WRITE, edtl, &data[..8192]),
            tags,
            0,
        );
        let mut reads = Vec::new();
        loop {
            match c.poll_event() {
                Some(Event::RdmaRead {
                    task,
                    ttt,
                    offset,
                    len,
                    stag,
                    va,
                }) => {
                    assert_eq!(stag, 0x77);
                    assert_eq!(
                        va,
                        base + (offset - 8192) as u64,
                        "the write VA addresses the first solicited byte"
                    );
                    assert!(len <= 16384);
                    // One outstanding at a time (MaxOutstandingR2T 1).
                    assert!(c.poll_event().is_none());
                    let mut dst = c.rdma_read_target(task, offset, len).expect("task waits");
                    dst.copy_from(0, &data[offset as usize..(offset + len) as usize]);
                    reads.push((offset, len));
                    c.rdma_read_done(task, ttt, true);
                }
                Some(Event::Scsi(r)) => {
                    assert_eq!(r.data_out, data);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(reads, vec![(8192, 16384), (24576, 15424)]);
        assert!(drain(&mut c).is_empty(), "no R2T PDUs on iSER");
    }

    #[test]
    fn iser_write_va_starts_after_immediate_and_unsolicited_data() {
        let mut s = session();
        s.immediate_data = true;
        s.initial_r2t = false;
        s.first_burst_length = 16384;
        s.max_burst_length = 1 << 20;
        let mut c = ffp_iser(s);
        let edtl = 40_000u32;
        let data: Vec<u8> = (0..edtl).map(|i| (i * 7 + 1) as u8).collect();
        let base = 0x20_0000u64;
        let tags = RdmaTags {
            write: Some((0x55, base)),
            read: None,
        };
        // 4096 bytes immediate, F clear: unsolicited Data-Out follows.
        c.handle_pdu_rdma(
            &mut Ctx,
            cmd(1, 9, flags::WRITE, edtl, &data[..4096]),
            tags,
            0,
        );
        assert!(c.poll_event().is_none(), "waits for the unsolicited data");
        let mut d = Pdu::new(opcode::DATA_OUT);
        d.bhs.set_itt(9);
        d.bhs.set_ttt(RESERVED_TAG);
        d.bhs.set_buffer_offset(4096);
        d.bhs.set_flags(flags::FINAL);
        d.data = data[4096..12288].to_vec();
        c.handle_pdu(&mut Ctx, d, 0);
        let Some(Event::RdmaRead {
            task,
            ttt,
            offset,
            len,
            va,
            ..
        }) = c.poll_event()
        else {
            panic!("an RDMA Read of the rest");
        };
        // The initiator's write VA names its first unsent byte.
        assert_eq!((offset, len, va), (12288, edtl - 12288, base));
        let mut dst = c.rdma_read_target(task, offset, len).expect("task waits");
        dst.copy_from(0, &data[offset as usize..]);
        c.rdma_read_done(task, ttt, true);
        match c.poll_event() {
            Some(Event::Scsi(r)) => assert_eq!(r.data_out, data),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn iser_write_without_a_write_stag_fails_the_command() {
        let mut s = session();
        s.immediate_data = false;
        let mut c = ffp_iser(s);
        c.handle_pdu_rdma(
            &mut Ctx,
            cmd(1, 3, flags::FINAL | flags::WRITE, 4096, &[]),
            RdmaTags::default(),
            0,
        );
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bhs.opcode(), opcode::SCSI_RESP);
        assert_eq!(out[0].bhs.0[3], 0x02);
        assert_eq!(c.tasks_in_flight(), 0);
    }

    #[test]
    fn iser_write_buffer_outlives_its_aborted_task_until_the_reads_complete() {
        let mut s = session();
        s.immediate_data = false;
        s.max_burst_length = 4096;
        s.max_outstanding_r2t = 2;
        let mut c = ffp_iser(s);
        let tags = RdmaTags {
            write: Some((1, 0x1000)),
            read: None,
        };
        c.handle_pdu_rdma(
            &mut Ctx,
            cmd(1, 3, flags::FINAL | flags::WRITE, 8192, &[]),
            tags,
            0,
        );
        let mut reads = Vec::new();
        while let Some(ev) = c.poll_event() {
            if let Event::RdmaRead { task, ttt, .. } = ev {
                reads.push((task, ttt));
            }
        }
        assert_eq!(reads.len(), 2);
        // ABORT TASK for ITT 3 while both reads are posted.
        let mut tmf = Pdu::new(opcode::TASK_MGMT_REQ);
        tmf.bhs.set_immediate(true);
        tmf.bhs.set_flags(flags::FINAL | tmf::ABORT_TASK);
        tmf.bhs.set_itt(50);
        tmf.bhs.set_u32_at(20, 3);
        tmf.bhs.set_u32_at(24, 2);
        c.handle_pdu(&mut Ctx, tmf, 0);
        assert_eq!(c.tasks_in_flight(), 0, "the task is gone");
        assert_eq!(c.rdma_buffers_held(), 1, "its buffer is not");
        assert!(c.rdma_read_target(reads[0].0, 0, 4096).is_none());
        c.rdma_read_done(reads[0].0, reads[0].1, true);
        assert_eq!(c.rdma_buffers_held(), 1);
        c.rdma_read_done(reads[1].0, reads[1].1, true);
        assert_eq!(c.rdma_buffers_held(), 0, "freed after the last read");
        assert!(!c.is_closing());
    }

    #[test]
    fn iser_rdma_read_failure_ends_the_connection() {
        let mut s = session();
        s.immediate_data = false;
        let mut c = ffp_iser(s);
        let tags = RdmaTags {
            write: Some((1, 0)),
            read: None,
        };
        c.handle_pdu_rdma(
            &mut Ctx,
            cmd(1, 3, flags::FINAL | flags::WRITE, 4096, &[]),
            tags,
            0,
        );
        let Some(Event::RdmaRead { task, ttt, .. }) = c.poll_event() else {
            panic!("expected an RDMA Read");
        };
        c.rdma_read_done(task, ttt, false);
        assert!(c.is_closing());
    }

    #[test]
    fn read_is_split_by_segment_length_with_status_in_last_data_in() {
        let mut c = ffp(session(), 8192);
        c.handle_pdu(
            &mut Ctx,
            cmd(1, 5, flags::FINAL | flags::READ, 20000, &[]),
            0,
        );
        let r = scsi_event(&mut c);
        assert_eq!(r.edtl, 20000);
        let data: Vec<u8> = (0..20000u32).map(|i| i as u8).collect();
        c.scsi_complete(r.task, 0, &[], &data, 0);
        let out = drain(&mut c);
        assert_eq!(out.len(), 3);
        let mut off = 0;
        for (i, p) in out.iter().enumerate() {
            assert_eq!(p.bhs.opcode(), opcode::DATA_IN);
            assert_eq!(p.bhs.datasn(), i as u32);
            assert_eq!(p.bhs.buffer_offset(), off);
            assert_eq!(p.data, data[off as usize..off as usize + p.data.len()]);
            off += p.data.len() as u32;
        }
        let last = &out[2].bhs;
        assert_eq!(last.flags() & (flags::FINAL | flags::STATUS), 0x81);
        assert_eq!(last.statsn(), 100);
        assert_eq!(last.expcmdsn(), 2);
        assert_eq!(off, 20000);
    }

    /// A sink that lays everything out as the wire would carry it.
    #[derive(Default)]
    struct WireSink {
        wire: Vec<u8>,
        data: Option<DataBuf>,
        last: (usize, usize),
        buffers: usize,
    }

    impl TxSink for WireSink {
        fn put_bytes(&mut self, bytes: &[u8]) {
            self.wire.extend_from_slice(bytes);
        }
        fn put_vec(&mut self, bytes: &mut Vec<u8>) {
            self.wire.append(bytes);
        }
        fn put_data(&mut self, buf: DataBuf) {
            self.buffers += 1;
            self.data = Some(buf);
        }
        fn put_range(&mut self, start: usize, end: usize) {
            self.last = (start, end);
            let d = self.data.as_ref().expect("range before data");
            self.wire.extend_from_slice(&d[start..end]);
        }
        fn last_range_crc32c(&self) -> u32 {
            let d = self.data.as_ref().expect("range before data");
            crate::digest::crc32c_parts(&[&d[self.last.0..self.last.1]])
        }
    }

    #[test]
    fn owned_completion_puts_the_same_bytes_on_the_wire_as_the_copying_one() {
        let sense = [
            0x70u8, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0,
        ];
        // (header digest, data digest, EDTL, data length, status, sense)
        type Case<'a> = (bool, bool, u32, usize, u8, &'a [u8]);
        let cases: [Case; 7] = [
            (false, false, 20000, 20000, 0, &[]),
            (true, true, 20000, 20000, 0, &[]),
            (false, true, 4097, 4097, 0, &[]),
            (true, false, 3000, 5000, 0, &[]),
            (false, false, 9000, 8191, 0, &[]),
            (true, true, 512, 512, 2, &sense),
            (false, false, 0, 512, 0, &[]),
        ];
        for (hd, dd, edtl, len, status, sense) in cases {
            let data: Vec<u8> = (0..len as u32).map(|i| (i * 13 + 7) as u8).collect();
            let mut wires = Vec::new();
            for owned in [false, true] {
                let mut c = ffp(session(), 8192);
                c.encoder.header_digest = hd;
                c.encoder.data_digest = dd;
                // Output already queued must stay ahead of the data.
                let mut nop = Pdu::new(opcode::NOP_OUT);
                nop.bhs.set_immediate(true);
                nop.bhs.set_flags(flags::FINAL);
                nop.bhs.set_itt(77);
                nop.bhs.set_ttt(RESERVED_TAG);
                nop.bhs.set_u32_at(24, 1);
                c.handle_pdu(&mut Ctx, nop, 0);
                c.handle_pdu(
                    &mut Ctx,
                    cmd(1, 5, flags::FINAL | flags::READ, edtl, &[]),
                    0,
                );
                let r = scsi_event(&mut c);
                let mut sink = WireSink::default();
                if owned {
                    let back = c.scsi_complete_owned(
                        r.task,
                        status,
                        sense,
                        data.clone().into(),
                        0,
                        &mut sink,
                    );
                    let sent = edtl > 0 && len > 0;
                    assert_eq!(back.is_none(), sent, "buffer kept only when sent from");
                    assert_eq!(sink.buffers, usize::from(sent));
                } else {
                    c.scsi_complete(r.task, status, sense, &data, 0);
                }
                c.take_tx(&mut sink.wire);
                wires.push(sink.wire);
            }
            assert_eq!(wires[0], wires[1], "hd {hd} dd {dd} edtl {edtl} len {len}");
            let mut d = Decoder::new(1 << 24);
            d.header_digest = hd;
            d.data_digest = dd;
            let (mut pos, mut pdus) = (0, 0);
            while let Some((_, n)) = d.decode(&wires[1][pos..]).unwrap() {
                pos += n;
                pdus += 1;
            }
            assert_eq!(pos, wires[1].len());
            assert!(pdus >= 2);
        }
    }

    #[test]
    fn owned_completion_of_an_aborted_or_dataless_task_returns_the_buffer() {
        let mut c = ffp(session(), 8192);
        c.handle_pdu(&mut Ctx, cmd(1, 5, flags::FINAL | flags::WRITE, 0, &[]), 0);
        let r = scsi_event(&mut c);
        let mut sink = WireSink::default();
        let back = c.scsi_complete_owned(
            r.task,
            0,
            &[],
            Vec::with_capacity(4096).into(),
            0,
            &mut sink,
        );
        assert_eq!(back.map(|b| b.capacity() >= 4096), Some(true));
        assert_eq!(sink.buffers, 0);
        // A task the connection no longer knows.
        let back = c.scsi_complete_owned(r.task, 0, &[], vec![1; 512].into(), 0, &mut sink);
        assert_eq!(back.map(|b| b.len()), Some(512));
    }

    #[test]
    fn residual_overflow_and_underflow() {
        let mut c = ffp(session(), 8192);
        // EDTL 0 but the command produced a block: nothing sent, overflow.
        c.handle_pdu(&mut Ctx, cmd(1, 1, flags::FINAL | flags::READ, 0, &[]), 0);
        let r = scsi_event(&mut c);
        c.scsi_complete(r.task, 0, &[], &[0u8; 512], 0);
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bhs.opcode(), opcode::SCSI_RESP);
        assert_ne!(out[0].bhs.flags() & flags::OVERFLOW, 0);
        assert_eq!(out[0].bhs.residual_count(), 512);
        // EDTL 10000, 512 produced: underflow 9488 in the collapsed status.
        c.handle_pdu(
            &mut Ctx,
            cmd(2, 2, flags::FINAL | flags::READ, 10000, &[]),
            0,
        );
        let r = scsi_event(&mut c);
        c.scsi_complete(r.task, 0, &[], &[1u8; 512], 0);
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_ne!(out[0].bhs.flags() & flags::UNDERFLOW, 0);
        assert_eq!(out[0].bhs.residual_count(), 9488);
        assert_eq!(out[0].data.len(), 512);
    }

    #[test]
    fn check_condition_carries_sense_in_response() {
        let mut c = ffp(session(), 8192);
        c.handle_pdu(&mut Ctx, cmd(1, 1, flags::FINAL | flags::READ, 512, &[]), 0);
        let r = scsi_event(&mut c);
        let sense = [
            0x70u8, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0,
        ];
        c.scsi_complete(r.task, 2, &sense, &[], 0);
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bhs.0[3], 2);
        assert_eq!(&out[0].data[..2], &[0, 18]);
        assert_eq!(&out[0].data[2..], &sense);
    }

    /// What the engine does while decoding: offer the immediate data to
    /// `stage_immediate`, and hand on the PDU without it when taken.
    fn staged(c: &mut Connection, mut p: Pdu) -> Pdu {
        p.bhs.set_data_segment_len(p.data.len() as u32);
        if c.stage_immediate(&p.bhs, &p.data, &mut |n| Some(vec![0xee; n].into())) {
            p.data.clear();
        }
        p
    }

    #[test]
    fn staged_immediate_data_lands_in_the_write_buffer() {
        let mut s = session();
        s.initial_r2t = true;
        s.immediate_data = true;
        s.first_burst_length = 65536;
        s.max_burst_length = 65536;
        let mut c = ffp(s, 8192);
        let data: Vec<u8> = (0..20000u32).map(|i| (i * 13) as u8).collect();
        let p = staged(
            &mut c,
            cmd(1, 9, flags::FINAL | flags::WRITE, 20000, &data[..8192]),
        );
        assert!(p.data.is_empty(), "taken by stage_immediate");
        c.handle_pdu(&mut Ctx, p, 0);
        assert!(c.staged.is_empty());
        let r2t = drain(&mut c);
        assert_eq!(r2t.len(), 1);
        assert_eq!(r2t[0].bhs.buffer_offset(), 8192);
        let mut d = Pdu::new(opcode::DATA_OUT);
        d.bhs.set_itt(9);
        d.bhs.set_ttt(r2t[0].bhs.ttt());
        d.bhs.set_buffer_offset(8192);
        d.bhs.set_flags(flags::FINAL);
        d.data = data[8192..].to_vec();
        c.handle_pdu(&mut Ctx, d, 0);
        assert_eq!(scsi_event(&mut c).data_out, data);
    }

    #[test]
    fn staged_immediate_data_waits_with_its_command_across_a_cmdsn_gap() {
        let mut s = session();
        s.immediate_data = true;
        s.first_burst_length = 65536;
        let mut c = ffp(s, 8192);
        let a = vec![0xa1u8; 4096];
        let b = vec![0xb2u8; 4096];
        // CmdSN 2 first: held for the gap, its data staged meanwhile.
        let p2 = staged(&mut c, cmd(2, 11, flags::FINAL | flags::WRITE, 4096, &b));
        c.handle_pdu(&mut Ctx, p2, 0);
        assert_eq!(c.staged.len(), 1);
        assert!(c.poll_event().is_none());
        let p1 = staged(&mut c, cmd(1, 10, flags::FINAL | flags::WRITE, 4096, &a));
        c.handle_pdu(&mut Ctx, p1, 0);
        assert!(c.staged.is_empty());
        let r1 = scsi_event(&mut c);
        let r2 = scsi_event(&mut c);
        assert_eq!((r1.data_out.to_vec(), r2.data_out.to_vec()), (a, b));
    }

    #[test]
    fn immediate_data_that_is_all_the_write_is_lent_not_copied() {
        let mut s = session();
        s.immediate_data = true;
        s.first_burst_length = 65536;
        let mut c = ffp(s, 8192);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let lent = std::cell::Cell::new(0);
        let lend = |_lun| {
            lent.set(lent.get() + 1);
            Some(DataBuf::from(data.clone()))
        };
        // Part of a longer write: not lent (more data comes after it).
        let mut p = cmd(1, 9, flags::WRITE, 8192, &data);
        p.bhs.set_data_segment_len(4096);
        assert!(!c.stage_immediate_lent(&p.bhs, &lend));
        // A read: refused before lending.
        let mut r = cmd(1, 9, flags::FINAL | flags::READ, 4096, &data);
        r.bhs.set_data_segment_len(4096);
        assert!(!c.stage_immediate_lent(&r.bhs, &lend));
        assert_eq!(lent.get(), 0);
        // The whole write: its buffer is what was lent.
        let mut p = cmd(1, 9, flags::FINAL | flags::WRITE, 4096, &data);
        p.bhs.set_data_segment_len(4096);
        assert!(c.stage_immediate_lent(&p.bhs, &lend));
        assert_eq!(lent.get(), 1);
        // Lent once: the same numbers again are a duplicate.
        assert!(!c.stage_immediate_lent(&p.bhs, &lend));
        p.data.clear();
        c.handle_pdu(&mut Ctx, p, 0);
        assert!(c.staged.is_empty());
        let r = scsi_event(&mut c);
        assert_eq!(r.data_out, data);
        c.scsi_complete(r.task, 0, &[], &[], 0);
        assert_eq!(drain(&mut c).last().unwrap().bhs.0[3], 0);
    }

    #[test]
    fn staged_data_of_a_refused_command_is_given_back() {
        let mut s = session();
        s.immediate_data = true;
        s.first_burst_length = 65536;
        let mut c = ffp(s, 8192);
        let p = staged(&mut c, cmd(1, 9, flags::WRITE, 65536, &[1u8; 4096]));
        c.handle_pdu(&mut Ctx, p, 0);
        // The same ITT again while the first is in progress: rejected.
        let p = staged(
            &mut c,
            cmd(2, 9, flags::FINAL | flags::WRITE, 4096, &[2u8; 4096]),
        );
        c.handle_pdu(&mut Ctx, p, 0);
        assert!(c.staged.is_empty());
        assert!(drain(&mut c)
            .iter()
            .any(|p| p.bhs.opcode() == opcode::REJECT));
        // Refused before staging: not a write.
        let mut p = cmd(3, 12, flags::FINAL | flags::READ, 4096, &[3u8; 512]);
        p.bhs.set_data_segment_len(512);
        assert!(!c.stage_immediate(&p.bhs, &p.data, &mut |n| Some(vec![0; n].into())));
    }

    #[test]
    fn write_with_immediate_data_then_r2ts() {
        let mut s = session();
        s.initial_r2t = true;
        s.immediate_data = true;
        s.first_burst_length = 65536;
        s.max_burst_length = 16384;
        s.max_outstanding_r2t = 2;
        let mut c = ffp(s, 8192);
        let data: Vec<u8> = (0..50000u32).map(|i| (i * 7) as u8).collect();
        c.handle_pdu(
            &mut Ctx,
            cmd(1, 9, flags::FINAL | flags::WRITE, 50000, &data[..8192]),
            0,
        );
        let r2ts = drain(&mut c);
        assert_eq!(r2ts.len(), 2);
        assert!(c.poll_event().is_none());
        let expect = [(8192u32, 16384u32), (24576, 16384)];
        for (p, (off, len)) in r2ts.iter().zip(expect) {
            assert_eq!(p.bhs.opcode(), opcode::R2T);
            assert_eq!(p.bhs.buffer_offset(), off);
            assert_eq!(p.bhs.u32_at(44), len);
        }
        let send = |c: &mut Connection, r2t: &Pdu, from: u32, len: u32| {
            let mut sn = 0;
            let mut off = from;
            while off < from + len {
                let n = (from + len - off).min(8192);
                let mut d = Pdu::new(opcode::DATA_OUT);
                d.bhs.set_itt(9);
                d.bhs.set_ttt(r2t.bhs.ttt());
                d.bhs.set_datasn(sn);
                d.bhs.set_buffer_offset(off);
                if off + n == from + len {
                    d.bhs.set_flags(flags::FINAL);
                }
                d.data = data[off as usize..(off + n) as usize].to_vec();
                c.handle_pdu(&mut Ctx, d, 0);
                sn += 1;
                off += n;
            }
        };
        send(&mut c, &r2ts[0], 8192, 16384);
        let third = drain(&mut c);
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].bhs.buffer_offset(), 40960);
        assert_eq!(third[0].bhs.u32_at(44), 9040);
        assert_eq!(third[0].bhs.datasn(), 2, "R2TSN counts per task");
        send(&mut c, &r2ts[1], 24576, 16384);
        assert!(c.poll_event().is_none());
        send(&mut c, &third[0], 40960, 9040);
        let r = scsi_event(&mut c);
        assert_eq!(r.data_out, data);
        c.scsi_complete(r.task, 0, &[], &[], 50000);
        let out = drain(&mut c);
        assert_eq!(out[0].bhs.opcode(), opcode::SCSI_RESP);
        assert_eq!(out[0].bhs.flags() & (flags::OVERFLOW | flags::UNDERFLOW), 0);
        assert_eq!(out[0].bhs.u32_at(36), 3, "ExpDataSN counts R2Ts");
    }

    #[test]
    fn unsolicited_data_out_then_r2t_for_the_rest() {
        let mut s = session();
        s.initial_r2t = false;
        s.immediate_data = false;
        s.first_burst_length = 8192;
        let mut c = ffp(s, 8192);
        c.handle_pdu(&mut Ctx, cmd(1, 3, flags::WRITE, 12288, &[]), 0);
        assert!(
            drain(&mut c).is_empty(),
            "no R2T before the unsolicited burst"
        );
        let mut d = Pdu::new(opcode::DATA_OUT);
        d.bhs.set_itt(3);
        d.bhs.set_ttt(RESERVED_TAG);
        d.bhs.set_flags(flags::FINAL);
        d.data = vec![1; 8192];
        c.handle_pdu(&mut Ctx, d, 0);
        let r2t = drain(&mut c);
        assert_eq!(r2t.len(), 1);
        assert_eq!(r2t[0].bhs.buffer_offset(), 8192);
        assert_eq!(r2t[0].bhs.u32_at(44), 4096);
    }

    #[test]
    fn placed_data_out_completes_the_write_like_copied_data() {
        let mut s = session();
        s.immediate_data = false;
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        for placing in [false, true] {
            let mut c = ffp(s.clone(), 1024);
            c.handle_pdu(
                &mut Ctx,
                cmd(1, 4, flags::FINAL | flags::WRITE, 4096, &[]),
                0,
            );
            let r2t = drain(&mut c);
            assert_eq!(r2t.len(), 1);
            for (i, chunk) in data.chunks(1024).enumerate() {
                let mut d = Pdu::new(opcode::DATA_OUT);
                d.bhs.set_itt(4);
                d.bhs.set_ttt(r2t[0].bhs.ttt());
                d.bhs.set_datasn(i as u32);
                d.bhs.set_buffer_offset(i as u32 * 1024);
                d.bhs.set_data_segment_len(1024);
                if i == 3 {
                    d.bhs.set_flags(flags::FINAL);
                }
                if placing {
                    assert!(c.place_data_out(&d.bhs, chunk));
                } else {
                    d.data = chunk.to_vec();
                }
                c.handle_pdu(&mut Ctx, d, 0);
            }
            let r = scsi_event(&mut c);
            assert_eq!(r.data_out, data, "placing {placing}");
        }
    }

    /// What the TCP transport does for a segment it receives into place:
    /// ask where it goes, write it there, end, and hand on the PDU empty.
    fn received_into_place(c: &mut Connection, mut p: Pdu) -> Option<Pdu> {
        p.bhs.set_data_segment_len(p.data.len() as u32);
        let mut dst = c.rx_direct_begin(&p.bhs, &mut |n| Some(vec![0xee; n].into()))?;
        assert_eq!(dst.len(), p.data.len());
        dst.copy_from(0, &p.data);
        assert!(c.rx_direct_dest().is_some());
        c.rx_direct_end();
        p.data.clear();
        Some(p)
    }

    #[test]
    fn write_data_received_into_place_completes_the_write() {
        let mut s = session();
        s.immediate_data = true;
        s.initial_r2t = true;
        s.first_burst_length = 65536;
        let mut c = ffp(s, 65536);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 31 + i / 977) as u8).collect();
        let p = received_into_place(
            &mut c,
            cmd(1, 9, flags::FINAL | flags::WRITE, 200_000, &data[..65536]),
        )
        .expect("immediate data has a place");
        c.handle_pdu(&mut Ctx, p, 0);
        let r2t = drain(&mut c);
        assert_eq!(r2t.len(), 1);
        assert_eq!(r2t[0].bhs.buffer_offset(), 65536);
        let mut off = 65536;
        for (i, chunk) in data[65536..].chunks(65536).enumerate() {
            let mut d = Pdu::new(opcode::DATA_OUT);
            d.bhs.set_itt(9);
            d.bhs.set_ttt(r2t[0].bhs.ttt());
            d.bhs.set_datasn(i as u32);
            d.bhs.set_buffer_offset(off);
            if off as usize + chunk.len() == data.len() {
                d.bhs.set_flags(flags::FINAL);
            }
            d.data = chunk.to_vec();
            off += chunk.len() as u32;
            let d = received_into_place(&mut c, d).expect("Data-Out has a place");
            c.handle_pdu(&mut Ctx, d, 0);
        }
        assert!(scsi_event(&mut c).data_out == data);
    }

    #[test]
    fn data_the_connection_would_refuse_gets_no_place() {
        let mut s = session();
        s.immediate_data = true;
        s.initial_r2t = true;
        let mut c = ffp(s, 65536);
        let alloc = &mut |n| Some(DataBuf::from(vec![0u8; n]));
        // Not write data.
        let mut nop = Pdu::new(opcode::NOP_OUT);
        nop.bhs.set_data_segment_len(100);
        assert!(c.rx_direct_begin(&nop.bhs, alloc).is_none());
        // A command with an AHS (its data would follow the AHS).
        let mut w = cmd(1, 9, flags::FINAL | flags::WRITE, 8192, &[0; 4096]);
        w.bhs.set_data_segment_len(4096);
        w.bhs.set_total_ahs_len(20);
        assert!(c.rx_direct_begin(&w.bhs, alloc).is_none());
        // A Data-Out for no task, and one with a wrong TTT.
        c.handle_pdu(
            &mut Ctx,
            cmd(1, 4, flags::FINAL | flags::WRITE, 8192, &[]),
            0,
        );
        let r2t = drain(&mut c);
        let mut d = Pdu::new(opcode::DATA_OUT);
        d.bhs.set_itt(5);
        d.bhs.set_ttt(r2t[0].bhs.ttt());
        d.bhs.set_data_segment_len(4096);
        assert!(c.rx_direct_begin(&d.bhs, alloc).is_none());
        d.bhs.set_itt(4);
        d.bhs.set_ttt(0x1234);
        assert!(c.rx_direct_begin(&d.bhs, alloc).is_none());
        // A command whose ITT and CmdSN a staged command already holds.
        let mut w = cmd(3, 20, flags::FINAL | flags::WRITE, 8192, &[]);
        w.bhs.set_data_segment_len(4096);
        assert!(c.rx_direct_begin(&w.bhs, alloc).is_some());
        assert!(c.rx_direct_begin(&w.bhs, alloc).is_none());
    }

    #[test]
    fn a_data_out_whose_task_was_aborted_loses_its_place() {
        let mut s = session();
        s.immediate_data = false;
        let mut c = ffp(s, 65536);
        c.handle_pdu(
            &mut Ctx,
            cmd(1, 4, flags::FINAL | flags::WRITE, 65536, &[]),
            0,
        );
        let r2t = drain(&mut c);
        let mut d = Pdu::new(opcode::DATA_OUT);
        d.bhs.set_itt(4);
        d.bhs.set_ttt(r2t[0].bhs.ttt());
        d.bhs.set_flags(flags::FINAL);
        d.bhs.set_data_segment_len(65536);
        assert!(c.rx_direct_begin(&d.bhs, &mut |_| unreachable!()).is_some());
        // The segment is on its way when the task is aborted.
        let mut tmf = Pdu::new(opcode::TASK_MGMT_REQ);
        tmf.bhs.set_immediate(true);
        tmf.bhs.set_flags(flags::FINAL | tmf::ABORT_TASK);
        tmf.bhs.set_itt(50);
        tmf.bhs.set_u32_at(20, 4);
        tmf.bhs.set_u32_at(24, 2);
        c.handle_pdu(&mut Ctx, tmf, 0);
        assert_eq!(c.tasks_in_flight(), 0);
        assert!(
            c.rx_direct_dest().is_none(),
            "no place once the task is gone"
        );
        c.rx_direct_end();
        // The PDU, its data dropped by the transport, is then ignored.
        c.handle_pdu(&mut Ctx, d, 0);
        assert!(!c.is_closing());
        assert!(drain(&mut c)
            .iter()
            .all(|p| p.bhs.opcode() != opcode::SCSI_RESP));
    }

    #[test]
    fn data_out_that_is_all_the_write_is_lent_not_copied() {
        let mut s = session();
        s.immediate_data = false;
        let mut c = ffp(s, 8192);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
        let asked = std::cell::RefCell::new(Vec::new());
        let lend = |lun| {
            asked.borrow_mut().push(lun);
            Some(DataBuf::from(data.clone()))
        };
        let lun = 0x0003_0000_0000_0000;
        let data_out = |itt, ttt, len| {
            let mut d = Pdu::new(opcode::DATA_OUT);
            d.bhs.set_flags(flags::FINAL);
            d.bhs.set_itt(itt);
            d.bhs.set_ttt(ttt);
            d.bhs.set_data_segment_len(len);
            d
        };
        // Half of an 8 KiB write: not lent (the rest goes beside it).
        let mut w = cmd(1, 4, flags::FINAL | flags::WRITE, 8192, &[]);
        w.bhs.set_lun(lun);
        c.handle_pdu(&mut Ctx, w, 0);
        let ttt = drain(&mut c)[0].bhs.ttt();
        assert!(c
            .place_data_out_lent(&data_out(4, ttt, 4096).bhs, &lend)
            .is_none());
        // Data the connection would refuse: an unknown TTT.
        let mut w = cmd(2, 5, flags::FINAL | flags::WRITE, 4096, &[]);
        w.bhs.set_lun(lun);
        c.handle_pdu(&mut Ctx, w, 0);
        let ttt = drain(&mut c)[0].bhs.ttt();
        assert!(c
            .place_data_out_lent(&data_out(5, ttt ^ 1, 4096).bhs, &lend)
            .is_none());
        assert!(asked.borrow().is_empty(), "nothing lent for these");
        // All of a write in one Data-Out: lent, asked for the command's LUN
        // (the Data-Out's own LUN field is left zero here), and the buffer
        // the task was given comes back.
        let d = data_out(5, ttt, 4096);
        let given = c.place_data_out_lent(&d.bhs, &lend).expect("lent");
        assert_eq!(given.len(), 4096);
        assert_eq!(*asked.borrow(), [lun]);
        c.handle_pdu(&mut Ctx, d, 0);
        let r = scsi_event(&mut c);
        assert_eq!(r.data_out, data);
        c.scsi_complete(r.task, 0, &[], &[], 0);
        assert_eq!(drain(&mut c).last().unwrap().bhs.0[3], 0);
    }

    #[test]
    fn data_out_the_connection_would_refuse_is_not_placed() {
        let mut s = session();
        s.immediate_data = false;
        let mut c = ffp(s, 1024);
        c.handle_pdu(
            &mut Ctx,
            cmd(1, 4, flags::FINAL | flags::WRITE, 2048, &[]),
            0,
        );
        let r2t = drain(&mut c);
        let mut d = Pdu::new(opcode::DATA_OUT);
        d.bhs.set_itt(4);
        d.bhs.set_ttt(r2t[0].bhs.ttt());
        d.bhs.set_data_segment_len(1024);
        // Wrong offset, wrong TTT, unknown ITT, length not matching.
        d.bhs.set_buffer_offset(1024);
        assert!(!c.place_data_out(&d.bhs, &[1; 1024]));
        d.bhs.set_buffer_offset(0);
        d.bhs.set_ttt(0x1234);
        assert!(!c.place_data_out(&d.bhs, &[1; 1024]));
        d.bhs.set_ttt(r2t[0].bhs.ttt());
        d.bhs.set_itt(5);
        assert!(!c.place_data_out(&d.bhs, &[1; 1024]));
        d.bhs.set_itt(4);
        assert!(!c.place_data_out(&d.bhs, &[1; 1000]));
        // A placed PDU whose data is then given anyway is taken as given
        // (the placement record belongs to an empty data segment only).
        assert!(c.place_data_out(&d.bhs, &[1; 1024]));
        d.data = vec![2; 1024];
        c.handle_pdu(&mut Ctx, d.clone(), 0);
        d.bhs.set_buffer_offset(1024);
        d.bhs.set_datasn(1);
        d.bhs.set_flags(flags::FINAL);
        c.handle_pdu(&mut Ctx, d, 0);
        let r = scsi_event(&mut c);
        assert_eq!(r.data_out, vec![2; 2048]);
    }

    #[test]
    fn bad_datasn_fails_the_command_not_the_connection() {
        let mut s = session();
        s.immediate_data = false;
        let mut c = ffp(s, 512);
        c.handle_pdu(
            &mut Ctx,
            cmd(1, 4, flags::FINAL | flags::WRITE, 1024, &[]),
            0,
        );
        let r2t = drain(&mut c);
        let mut d = Pdu::new(opcode::DATA_OUT);
        d.bhs.set_itt(4);
        d.bhs.set_ttt(r2t[0].bhs.ttt());
        d.bhs.set_datasn(27);
        d.data = vec![0; 512];
        c.handle_pdu(&mut Ctx, d.clone(), 0);
        assert!(!c.is_closing());
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bhs.opcode(), opcode::SCSI_RESP);
        assert_eq!(out[0].bhs.0[3], 0x02, "CHECK CONDITION");
        assert_eq!(out[0].data[2 + 2], 0x0b, "ABORTED COMMAND");
        assert_eq!(out[0].data[2 + 12], 0x4b);
        assert_eq!(c.tasks_in_flight(), 0);
        // Later Data-Out for the ended task is dropped without a word.
        d.bhs.set_datasn(1);
        c.handle_pdu(&mut Ctx, d, 0);
        assert!(drain(&mut c).is_empty());
        assert!(c.poll_event().is_none());
    }

    #[test]
    fn cmdsn_outside_window_is_ignored_and_gaps_are_reordered() {
        let mut c = ffp(session(), 8192);
        // Too low and too high: silently ignored.
        c.handle_pdu(&mut Ctx, cmd(0, 1, flags::FINAL, 0, &[]), 0);
        c.handle_pdu(&mut Ctx, cmd(1 + 128, 2, flags::FINAL, 0, &[]), 0);
        assert!(c.poll_event().is_none());
        assert!(drain(&mut c).is_empty());
        // CmdSN 2 before 1: held until 1 arrives, then both run in order.
        c.handle_pdu(&mut Ctx, cmd(2, 3, flags::FINAL, 0, &[]), 0);
        assert!(c.poll_event().is_none());
        c.handle_pdu(&mut Ctx, cmd(1, 4, flags::FINAL, 0, &[]), 0);
        let a = scsi_event(&mut c);
        let b = scsi_event(&mut c);
        assert_ne!(a.task, b.task);
        c.scsi_complete(a.task, 0, &[], &[], 0);
        let out = drain(&mut c);
        assert_eq!(out[0].bhs.itt(), 4);
        assert_eq!(out[0].bhs.expcmdsn(), 3);
    }

    #[test]
    fn nop_out_is_echoed_and_idle_initiator_is_pinged() {
        let mut c = ffp(session(), 8192);
        let mut p = Pdu::new(opcode::NOP_OUT);
        p.bhs.set_itt(77);
        p.bhs.set_immediate(true);
        p.bhs.set_u32_at(24, 1);
        p.data = b"ping".to_vec();
        c.handle_pdu(&mut Ctx, p, 0);
        let out = drain(&mut c);
        assert_eq!(out[0].bhs.opcode(), opcode::NOP_IN);
        assert_eq!(out[0].bhs.itt(), 77);
        assert_eq!(out[0].data, b"ping");
        // Idle past the interval: a ping with a TTT; unanswered: close.
        c.tick(31_000);
        let ping = drain(&mut c);
        assert_eq!(ping[0].bhs.itt(), RESERVED_TAG);
        assert_ne!(ping[0].bhs.ttt(), RESERVED_TAG);
        c.tick(62_000);
        assert!(c.is_closing());
    }

    #[test]
    fn abort_task_waiting_for_data_and_query_task() {
        let mut s = session();
        s.immediate_data = false;
        let mut c = ffp(s, 8192);
        c.handle_pdu(
            &mut Ctx,
            cmd(1, 10, flags::FINAL | flags::WRITE, 4096, &[]),
            0,
        );
        drain(&mut c);
        let tmf_pdu = |f: u8, rtt: u32, sn: u32| {
            let mut p = Pdu::new(opcode::TASK_MGMT_REQ);
            p.bhs.set_immediate(true);
            p.bhs.set_flags(0x80 | f);
            p.bhs.set_itt(500 + sn);
            p.bhs.set_u32_at(20, rtt);
            p.bhs.set_u32_at(24, sn);
            p.bhs.set_u32_at(32, 1);
            p
        };
        c.handle_pdu(&mut Ctx, tmf_pdu(tmf::QUERY_TASK, 10, 2), 0);
        assert_eq!(
            drain(&mut c)[0].bhs.0[2],
            7,
            "task exists: FUNCTION SUCCEEDED (RFC 7144)"
        );
        c.handle_pdu(&mut Ctx, tmf_pdu(tmf::ABORT_TASK, 10, 2), 0);
        let out = drain(&mut c);
        assert_eq!(out[0].bhs.opcode(), opcode::TASK_MGMT_RESP);
        assert_eq!(out[0].bhs.0[2], tmf::RESP_COMPLETE);
        assert_eq!(c.tasks_in_flight(), 0);
        c.handle_pdu(&mut Ctx, tmf_pdu(tmf::ABORT_TASK, 10, 2), 0);
        assert_eq!(drain(&mut c)[0].bhs.0[2], tmf::RESP_NO_TASK);
    }

    #[test]
    fn logout_answers_and_closes() {
        let mut c = ffp(session(), 8192);
        let mut p = Pdu::new(opcode::LOGOUT_REQ);
        p.bhs.set_immediate(true);
        p.bhs.set_flags(0x80);
        p.bhs.set_itt(1);
        p.bhs.set_u32_at(24, 1);
        c.handle_pdu(&mut Ctx, p, 0);
        let out = drain(&mut c);
        assert_eq!(out[0].bhs.opcode(), opcode::LOGOUT_RESP);
        assert_eq!(out[0].bhs.0[2], 0);
        assert!(c.is_closing());
    }

    #[test]
    fn snack_is_rejected() {
        let mut c = ffp(session(), 8192);
        let mut p = Pdu::new(opcode::SNACK_REQ);
        p.bhs.set_itt(3);
        c.handle_pdu(&mut Ctx, p, 0);
        let out = drain(&mut c);
        assert_eq!(out[0].bhs.opcode(), opcode::REJECT);
        assert_eq!(out[0].bhs.0[2], reject::PROTOCOL_ERROR);
        assert_eq!(out[0].data.len(), BHS_LEN);
    }
}
