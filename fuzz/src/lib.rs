//! Shared harness for the fuzz targets of the sans-IO iSCSI core.
//!
//! The `login` and `connection` targets read their input as a little
//! program for [`Driver`]: a few header bytes choose the target's
//! configuration, then each step starts with a control byte:
//!
//! | `ctl & 7` | step |
//! | --- | --- |
//! | 0, 1 | raw PDU: the next 48 bytes are the BHS, then AHS and data as the BHS declares (cut short at the end of the input) |
//! | 2, 3 | structured PDU: a few bytes pick an opcode and fields; CmdSN, ITT, TTT, DataSN, offsets and CHAP answers are filled in from what the connection said so far, so the fuzzer reaches deep states without guessing numbers |
//! | 4 | timer: advance the clock by `u16 * 16` ms and `tick` |
//! | 5 | complete the oldest deferred SCSI command (status and data from the input) |
//! | 6 | answer the oldest LUN/target reset with `tmf_done` |
//! | 7 | complete every deferred command and reset |
//!
//! `ctl & 0x08` flips one byte after the BHS of a PDU on the wire (a digest
//! error when digests are on); `ctl >> 5` advances the clock a little and
//! ticks. Every PDU is encoded with the connection's current digest
//! settings and taken back through `Connection::decoder()`, as a transport
//! would. After every step all output is decoded and checked.

use std::collections::VecDeque;

use iscsi::chap::{encode_hex, ChapAlgorithm};
use iscsi::conn::{tmf, ConnConfig, Connection, DataBuf, Event, TaskId, TxSink, RESERVED_TAG};
use iscsi::login::{ChapConfig, LoginContext, LoginStatus, SessionRequest};
use iscsi::params::{TargetLimits, Transport};
use iscsi::pdu::{flags, opcode, Decoder, Encoder, Pdu, PduError, BHS_LEN, DATA_SEGMENT_LEN_MAX};
use iscsi::text;
use iscsi::textreq::{TargetRecord, TextContext};

// ---------------------------------------------------------------------
// Input

/// A cursor over the fuzz input that never fails: past the end it yields
/// zeros, so every input is a valid program.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }
}

// ---------------------------------------------------------------------
// The target's side: names, secrets, a deterministic context

pub const INITIATOR: &str = "iqn.2026-01.fuzz:init";
/// No CHAP unless the context says every target wants it.
pub const TARGET_OPEN: &str = "iqn.2026-01.fuzz:open";
/// CHAP required.
pub const TARGET_CHAP: &str = "iqn.2026-01.fuzz:chap";
/// CHAP required, mutual CHAP available.
pub const TARGET_MUTUAL: &str = "iqn.2026-01.fuzz:mutual";
/// The ACL refuses every initiator.
pub const TARGET_DENIED: &str = "iqn.2026-01.fuzz:denied";
pub const TARGETS: [&str; 4] = [TARGET_OPEN, TARGET_CHAP, TARGET_MUTUAL, TARGET_DENIED];

pub const CHAP_USER: &str = "fuzz-user";
pub const CHAP_SECRET: &str = "fuzz-secret-0123";
pub const CHAP_TARGET_USER: &str = "fuzz-target";
pub const CHAP_TARGET_SECRET: &str = "fuzz-target-secret";

/// Context bits (first input byte of the login target).
pub const CTX_CHAP_ALL: u8 = 0x01;
pub const CTX_CHAP_DISCOVERY: u8 = 0x02;
pub const CTX_INSTATE_FAIL: u8 = 0x04;
pub const CTX_DENY_OTHERS: u8 = 0x08;
pub const CTX_ALIAS: u8 = 0x10;

/// `LoginContext + TextContext` with deterministic randomness.
pub struct FuzzCtx {
    bits: u8,
    rnd: u32,
    pub instated: u32,
}

impl FuzzCtx {
    pub fn new(bits: u8) -> Self {
        FuzzCtx {
            bits,
            rnd: 0x1234_5678,
            instated: 0,
        }
    }
}

fn chap_initiator() -> Option<(String, String)> {
    Some((CHAP_USER.into(), CHAP_SECRET.into()))
}

impl LoginContext for FuzzCtx {
    fn portal_group_tag(&self) -> u16 {
        1
    }
    fn target_exists(&self, t: &str) -> bool {
        TARGETS.contains(&t)
    }
    fn initiator_allowed(&self, t: &str, i: &str) -> bool {
        t != TARGET_DENIED && (self.bits & CTX_DENY_OTHERS == 0 || i == INITIATOR)
    }
    fn chap(&self, t: Option<&str>) -> ChapConfig {
        match t {
            None if self.bits & CTX_CHAP_DISCOVERY != 0 => ChapConfig {
                initiator: chap_initiator(),
                target: None,
            },
            None => ChapConfig::default(),
            Some(TARGET_CHAP) => ChapConfig {
                initiator: chap_initiator(),
                target: None,
            },
            Some(TARGET_MUTUAL) => ChapConfig {
                initiator: chap_initiator(),
                target: Some((CHAP_TARGET_USER.into(), CHAP_TARGET_SECRET.into())),
            },
            Some(_) if self.bits & CTX_CHAP_ALL != 0 => ChapConfig {
                initiator: chap_initiator(),
                target: None,
            },
            Some(_) => ChapConfig::default(),
        }
    }
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            // xorshift32: deterministic, so crashes reproduce.
            self.rnd ^= self.rnd << 13;
            self.rnd ^= self.rnd >> 17;
            self.rnd ^= self.rnd << 5;
            *b = self.rnd as u8;
        }
    }
    fn instate_session(&mut self, req: &SessionRequest) -> Result<u16, LoginStatus> {
        assert!(
            !req.initiator_name.is_empty(),
            "instated without InitiatorName"
        );
        if self.bits & CTX_INSTATE_FAIL != 0 {
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        self.instated += 1;
        Ok(if req.tsih == 0 { 0x4242 } else { req.tsih })
    }
    fn target_alias(&self, _t: &str) -> Option<String> {
        (self.bits & CTX_ALIAS != 0).then(|| "fuzz alias".to_string())
    }
}

impl iscsi::conn::BufferSource for FuzzCtx {}

impl TextContext for FuzzCtx {
    fn send_targets(&self, i: &str, _session: Option<&str>, _q: &str) -> Vec<TargetRecord> {
        TARGETS
            .iter()
            .filter(|t| self.initiator_allowed(t, i))
            .map(|t| TargetRecord {
                name: t.to_string(),
                addresses: vec!["192.0.2.1:3260,1".into(), "[2001:db8::1]:3260,1".into()],
            })
            .collect()
    }
}

/// Connection configuration from one input byte.
pub fn config(b: u8) -> ConnConfig {
    let mut limits = TargetLimits::default();
    match b & 3 {
        0 => {}
        1 => {
            limits.max_recv_data_segment_length = 512;
            limits.max_burst_length = 512;
            limits.first_burst_length = 512;
            limits.max_outstanding_r2t = 1;
            limits.immediate_data = false;
            limits.initial_r2t = true;
            limits.queue_depth = 1;
            limits.max_cmd_data_len = 4096;
        }
        2 => {
            limits.max_recv_data_segment_length = 8192;
            limits.max_burst_length = 16384;
            limits.first_burst_length = 8192;
            limits.max_outstanding_r2t = 4;
            limits.queue_depth = 4;
            limits.max_cmd_data_len = 256 * 1024;
        }
        _ => {
            limits.queue_depth = 2;
            limits.max_cmd_data_len = 1 << 20;
        }
    }
    let (nop_interval_ms, nop_timeout_ms, login_timeout_ms) = match (b >> 2) & 3 {
        0 => (30_000, 30_000, 30_000),
        1 => (0, 30_000, 30_000),
        2 => (100, 100, 100),
        _ => (1, 1, 1),
    };
    ConnConfig {
        limits,
        transport: if b & 0x10 != 0 {
            Transport::Iser
        } else {
            Transport::Tcp
        },
        nop_interval_ms,
        nop_timeout_ms,
        login_timeout_ms,
    }
}

// ---------------------------------------------------------------------
// Output checks

/// Target opcodes (RFC 7143 11.1.1).
pub fn is_target_opcode(op: u8) -> bool {
    matches!(
        op,
        opcode::NOP_IN
            | opcode::SCSI_RESP
            | opcode::TASK_MGMT_RESP
            | opcode::LOGIN_RESP
            | opcode::TEXT_RESP
            | opcode::DATA_IN
            | opcode::LOGOUT_RESP
            | opcode::R2T
            | opcode::ASYNC_MSG
            | opcode::REJECT
    )
}

/// Decode a whole output buffer; panics (a finding) on anything that is
/// not a clean sequence of PDUs.
pub fn decode_all(wire: &[u8], header_digest: bool, data_digest: bool) -> Vec<Pdu> {
    let d = Decoder {
        header_digest,
        data_digest,
        max_recv_data_len: DATA_SEGMENT_LEN_MAX,
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < wire.len() {
        match d.decode(&wire[pos..]) {
            Ok(Some((p, n))) => {
                assert!(n > 0 && n <= wire.len() - pos);
                out.push(p);
                pos += n;
            }
            Ok(None) => panic!(
                "output has {} trailing bytes that are not a whole PDU",
                wire.len() - pos
            ),
            Err(e) => panic!("output does not decode: {e}"),
        }
    }
    out
}

// ---------------------------------------------------------------------
// The driver

#[derive(Debug, Clone, Copy)]
struct Deferred {
    task: TaskId,
    edtl: u32,
    data_out_len: u32,
}

#[derive(Debug, Clone, Copy)]
struct OpenR2t {
    itt: u32,
    ttt: u32,
    offset: u32,
    len: u32,
    sent: u32,
    datasn: u32,
}

/// Login request identifiers the structured builder keeps stable.
const LOGIN_ISID: u64 = 0x8000_0000_1234;
const LOGIN_ITT: u32 = 0x1000;
const LOGIN_CID: u16 = 1;
pub const LOGIN_CMDSN: u32 = 10;

/// Steps per input: keeps one input's run time bounded.
const STEPS_MAX: usize = 2048;

/// Lays zero-copy output out as the wire carries it.
#[derive(Default)]
struct WireSink {
    wire: Vec<u8>,
    data: Vec<u8>,
    last: (usize, usize),
}

impl TxSink for WireSink {
    fn put_bytes(&mut self, bytes: &[u8]) {
        self.wire.extend_from_slice(bytes);
    }
    fn put_vec(&mut self, bytes: &mut Vec<u8>) {
        self.wire.append(bytes);
    }
    fn put_data(&mut self, buf: DataBuf) {
        self.data = buf.into_vec();
    }
    fn put_range(&mut self, start: usize, end: usize) {
        assert!(
            start <= end && end <= self.data.len(),
            "range outside the buffer"
        );
        self.last = (start, end);
        self.wire.extend_from_slice(&self.data[start..end]);
    }
    fn last_range_crc32c(&self) -> u32 {
        iscsi::digest::crc32c_parts(&[&self.data[self.last.0..self.last.1]])
    }
}

pub struct Driver {
    pub conn: Connection,
    pub ctx: FuzzCtx,
    now: u64,
    /// Complete SCSI commands and resets as soon as they appear.
    immediate: bool,
    deferred: VecDeque<Deferred>,
    resets: VecDeque<(u32, bool)>,
    /// A LoggedIn event was seen: output carries the negotiated digests.
    pub ffp: bool,
    /// A Close event was seen.
    pub closed: bool,
    tx: Vec<u8>,
    /// Output that went through the zero-copy path (`TxSink`), ahead of
    /// what `take_tx` returns.
    sink: WireSink,
    /// Flips at each use, so both the copying and the zero-copy paths
    /// (placed Data-Out, owned Data-In) are driven.
    alt: bool,
    /// PDUs sent by the target, by opcode (for judging seeds).
    pub sent: [u32; 64],
    /// SCSI commands handed to the device server.
    pub scsi_cmds: u32,

    // What the structured builder learned from the conversation.
    cmdsn: u32,
    next_itt: u32,
    last_itt: u32,
    last_write: Option<(u32, u32)>,
    unsolicited: Option<(u32, u32, u32)>,
    r2ts: VecDeque<OpenR2t>,
    ping_ttt: u32,
    text_ttt: u32,
    exp_statsn: u32,
    chap: Option<(u8, u8, Vec<u8>)>,
    login_stage: u8,
    login_target: &'static str,
}

impl Driver {
    pub fn new(cfg: ConnConfig, ctx: FuzzCtx, immediate: bool) -> Self {
        Driver {
            conn: Connection::new(cfg, 0),
            ctx,
            now: 0,
            immediate,
            deferred: VecDeque::new(),
            resets: VecDeque::new(),
            ffp: false,
            closed: false,
            tx: Vec::new(),
            sink: WireSink::default(),
            alt: false,
            sent: [0; 64],
            scsi_cmds: 0,
            cmdsn: LOGIN_CMDSN,
            next_itt: 1,
            last_itt: 0,
            last_write: None,
            unsolicited: None,
            r2ts: VecDeque::new(),
            ping_ttt: RESERVED_TAG,
            text_ttt: RESERVED_TAG,
            exp_statsn: 0,
            chap: None,
            login_stage: 0,
            login_target: TARGET_OPEN,
        }
    }

    /// Run the step program in `inp` (see the module docs).
    pub fn run(&mut self, inp: &mut Input) {
        let mut steps = 0;
        while !inp.is_empty() && steps < STEPS_MAX {
            steps += 1;
            let ctl = inp.u8();
            let before = self.snapshot();
            match ctl & 7 {
                0 | 1 => {
                    let pdu = raw_pdu(inp);
                    let corrupt = (ctl & 0x08 != 0).then(|| inp.u16() as usize);
                    self.feed(pdu, corrupt);
                }
                2 | 3 => {
                    let pdu = self.structured_pdu(inp);
                    let corrupt = (ctl & 0x08 != 0).then(|| inp.u16() as usize);
                    self.feed(pdu, corrupt);
                }
                4 => {
                    self.now += inp.u16() as u64 * 16;
                    self.conn.tick(self.now);
                }
                5 => {
                    if let Some(d) = self.deferred.pop_front() {
                        self.complete(d, inp);
                    }
                }
                6 => self.answer_reset(inp.u8()),
                _ => {
                    while let Some(d) = self.deferred.pop_front() {
                        self.complete(d, inp);
                    }
                    while !self.resets.is_empty() {
                        self.answer_reset(inp.u8());
                    }
                }
            }
            self.after_step(before, inp);
            if ctl >> 5 != 0 {
                // A little time passes: a step of its own, so its output
                // is checked against the state after the step above.
                let before = self.snapshot();
                self.now += (ctl >> 5) as u64 * 500;
                self.conn.tick(self.now);
                self.after_step(before, inp);
            }
        }
        // Finish: let the device server answer everything, then let time
        // run out so every timer fires.
        let before = self.snapshot();
        while let Some(d) = self.deferred.pop_front() {
            self.complete(d, inp);
        }
        while !self.resets.is_empty() {
            self.answer_reset(0);
        }
        self.now += 10_000_000;
        self.conn.tick(self.now);
        self.after_step(before, inp);
        let before = self.snapshot();
        self.now += 10_000_000;
        self.conn.tick(self.now);
        self.after_step(before, inp);
    }

    /// Feed one PDU as a step of its own and check what it caused.
    pub fn step_pdu(&mut self, pdu: Pdu) {
        let before = self.snapshot();
        self.feed(pdu, None);
        self.after_step(before, &mut Input::new(&[]));
    }

    /// Encode `pdu` as the initiator would, take it back through the
    /// connection's decoder and hand it over.
    pub fn feed(&mut self, mut pdu: Pdu, corrupt: Option<usize>) {
        let dec = self.conn.decoder().clone();
        let enc = Encoder {
            header_digest: dec.header_digest,
            data_digest: dec.data_digest,
        };
        pdu.ahs.truncate(pdu.ahs.len() & !3);
        pdu.ahs.truncate(iscsi::pdu::AHS_LEN_MAX);
        pdu.data.truncate(DATA_SEGMENT_LEN_MAX as usize);
        pdu.bhs.set_total_ahs_len(pdu.ahs.len());
        pdu.bhs.set_data_segment_len(pdu.data.len() as u32);
        let mut wire = Vec::with_capacity(BHS_LEN + pdu.ahs.len() + pdu.data.len() + 12);
        enc.encode(&pdu, &mut wire);
        let mut corrupted = false;
        if let Some(at) = corrupt {
            if wire.len() > BHS_LEN {
                // Only past the BHS, so the framing stays as declared.
                let i = BHS_LEN + at % (wire.len() - BHS_LEN);
                wire[i] ^= 0x5a;
                corrupted = true;
            }
        }
        match dec.decode(&wire) {
            Ok(Some((p, n))) => {
                assert_eq!(
                    n,
                    wire.len(),
                    "decoder used a different length than encoded"
                );
                let mut p = p;
                if !corrupted {
                    assert_eq!(p, pdu, "decode(encode(pdu)) != pdu");
                    self.alt = !self.alt;
                    // The engine's decode-time paths: data placed in its
                    // task's buffer, or a write's immediate data staged
                    // (lent whole, or copied into a buffer).
                    let taken = self.alt && {
                        let lend = |_lun| Some(DataBuf::from(p.data.clone()));
                        self.conn.place_data_out_lent(&p.bhs, &lend).is_some()
                            || self.conn.place_data_out(&p.bhs, &p.data)
                            || self.conn.stage_immediate_lent(&p.bhs, &lend)
                            || self
                                .conn
                                .stage_immediate(&p.bhs, &p.data, &mut |n| Some(vec![0; n].into()))
                    };
                    if taken {
                        p.data.clear();
                    }
                }
                self.conn.handle_pdu(&mut self.ctx, p, self.now);
            }
            Ok(None) => panic!(
                "decoder wants more bytes of a whole PDU ({} bytes)",
                wire.len()
            ),
            Err(e) => {
                match &e {
                    PduError::DataSegmentTooLong { .. } => {}
                    PduError::HeaderDigest { .. } | PduError::DataDigest { .. } => {
                        assert!(corrupted, "digest error on an intact PDU: {e}")
                    }
                    other => panic!("unexpected decode error on an encoded PDU: {other}"),
                }
                self.conn.handle_decode_error(e);
            }
        }
    }

    fn complete(&mut self, d: Deferred, inp: &mut Input) {
        let m = inp.u8();
        let status = match m & 3 {
            0 => 0,
            1 => 2,
            2 => 0x28,
            _ => inp.u8(),
        };
        let sense: &[u8] = match (m >> 2) & 3 {
            0 | 1 => &[],
            2 => &[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0],
            _ => &[0x72; 252],
        };
        let edtl = d.edtl.min(1 << 18) as usize;
        let data_len = match (m >> 4) & 3 {
            0 => 0,
            1 => edtl,
            2 => inp.u16() as usize * 8,
            _ => edtl + inp.u8() as usize,
        };
        let data: Vec<u8> = (0..data_len).map(|i| i as u8).collect();
        let data_out_len = match m >> 6 {
            0 => d.data_out_len,
            1 => d.edtl,
            2 => 0,
            _ => inp.u32(),
        };
        self.alt = !self.alt;
        if self.alt {
            self.conn
                .scsi_complete(d.task, status, sense, &data, data_out_len);
        } else {
            let _ = self.conn.scsi_complete_owned(
                d.task,
                status,
                sense,
                data.into(),
                data_out_len,
                &mut self.sink,
            );
        }
    }

    fn answer_reset(&mut self, b: u8) {
        let Some((itt, cold)) = self.resets.pop_front() else {
            return;
        };
        let response = if b & 0x80 != 0 {
            b & 7
        } else {
            tmf::RESP_COMPLETE
        };
        self.conn.tmf_done(itt, response);
        if cold {
            self.conn.close_after_cold_reset();
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            ffp: self.ffp || self.conn.is_full_feature(),
            closing: self.conn.is_closing(),
            max_xmit: self.conn.params().max_xmit_data_segment_length,
        }
    }

    /// Drain events and output, and check them.
    fn after_step(&mut self, before: Snapshot, inp: &mut Input) {
        // The step's own output first: it was encoded with the settings
        // in force before it (a final Login Response goes out without the
        // digests it negotiates).
        self.check_tx(before);
        let before = self.snapshot();
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::RdmaRead { .. } => panic!("RDMA Read on a TCP connection"),
                Event::LoggedIn(o) => {
                    assert!(!self.ffp, "LoggedIn twice");
                    assert_eq!(o.conn, *self.conn.params());
                    assert!(self.conn.is_full_feature());
                    self.ffp = true;
                    self.cmdsn = o.exp_cmdsn;
                }
                Event::Scsi(r) => {
                    self.scsi_cmds += 1;
                    assert!(self.ffp, "SCSI command before login completed");
                    assert!(r.cdb_ext.len() <= iscsi::conn::CDB_LEN_MAX - 16);
                    assert!(r.data_out.len() <= r.edtl as usize);
                    if r.write && r.edtl > 0 {
                        assert_eq!(r.data_out.len(), r.edtl as usize);
                    }
                    let d = Deferred {
                        task: r.task,
                        edtl: r.edtl,
                        data_out_len: r.data_out.len() as u32,
                    };
                    if self.immediate {
                        self.complete(d, inp);
                    } else {
                        self.deferred.push_back(d);
                    }
                }
                Event::Abort { .. } => {}
                Event::LunReset { itt, .. } => self.resets.push_back((itt, false)),
                Event::TargetReset { itt, cold } => self.resets.push_back((itt, cold)),
                Event::Close(_) => {
                    assert!(!self.closed, "Close twice");
                    assert!(self.conn.is_closing());
                    self.closed = true;
                }
            }
        }
        if self.immediate {
            while !self.resets.is_empty() {
                self.answer_reset(0);
            }
        }
        // Output of completions and reset answers.
        let after_events = Snapshot {
            ffp: self.ffp,
            ..before
        };
        self.check_tx(after_events);
    }

    fn check_tx(&mut self, before: Snapshot) {
        self.tx.clear();
        self.tx.append(&mut self.sink.wire);
        self.conn.take_tx(&mut self.tx);
        if self.tx.is_empty() {
            return;
        }
        assert!(!before.closing, "output after the connection closed");
        let (hd, dd) = if before.ffp {
            (
                self.conn.params().header_digest,
                self.conn.params().data_digest,
            )
        } else {
            (false, false)
        };
        let tx = std::mem::take(&mut self.tx);
        let max_xmit = before
            .max_xmit
            .max(self.conn.params().max_xmit_data_segment_length) as usize;
        for p in decode_all(&tx, hd, dd) {
            let op = p.bhs.opcode();
            self.sent[op as usize] += 1;
            assert!(is_target_opcode(op), "initiator opcode {op:#x} sent");
            if !before.ffp {
                assert_eq!(op, opcode::LOGIN_RESP, "non-login PDU during login");
                assert!(p.data.len() <= 8192, "login response data {}", p.data.len());
            } else {
                assert!(
                    p.data.len() <= max_xmit.max(BHS_LEN),
                    "{op:#x} with {} data bytes, initiator takes {max_xmit}",
                    p.data.len()
                );
            }
            self.learn(&p);
        }
        self.tx = tx;
    }

    /// Remember what a structured PDU may need to answer.
    fn learn(&mut self, p: &Pdu) {
        let b = &p.bhs;
        match b.opcode() {
            opcode::LOGIN_RESP => {
                if b.flags() & flags::TRANSIT != 0 {
                    self.login_stage = b.login_nsg();
                }
                if let Ok(kv) = text::parse(&p.data) {
                    let get = |k: &str| kv.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
                    if let (Some(a), Some(i), Some(c)) =
                        (get("CHAP_A"), get("CHAP_I"), get("CHAP_C"))
                    {
                        if let (Ok(a), Ok(i), Some(c)) = (
                            a.parse::<u8>(),
                            i.parse::<u8>(),
                            iscsi::chap::decode_binary(c),
                        ) {
                            self.chap = Some((a, i, c));
                        }
                    }
                }
            }
            opcode::R2T => {
                if self.r2ts.len() >= 64 {
                    self.r2ts.pop_front();
                }
                self.r2ts.push_back(OpenR2t {
                    itt: b.itt(),
                    ttt: b.ttt(),
                    offset: b.buffer_offset(),
                    len: b.u32_at(44),
                    sent: 0,
                    datasn: 0,
                });
            }
            opcode::NOP_IN if b.itt() == RESERVED_TAG => self.ping_ttt = b.ttt(),
            opcode::TEXT_RESP => self.text_ttt = b.ttt(),
            _ => {}
        }
        if b.opcode() != opcode::DATA_IN || b.flags() & flags::STATUS != 0 {
            self.exp_statsn = b.statsn().wrapping_add(1);
        }
    }

    // -----------------------------------------------------------------
    // Structured PDUs

    fn structured_pdu(&mut self, inp: &mut Input) -> Pdu {
        let sel = inp.u8();
        let fl = inp.u8();
        if !self.ffp && sel < 0xc0 {
            return self.login_pdu(sel, fl, inp);
        }
        let mut p = match sel % 8 {
            0 => self.login_pdu(sel, fl, inp),
            1 => self.nop_out(fl, inp),
            2 => self.scsi_cmd(fl, inp),
            3 => self.tmf(fl, inp),
            4 => self.text_req(fl, inp),
            5 => self.data_out(fl, inp),
            6 => {
                let mut p = Pdu::new(opcode::LOGOUT_REQ);
                p.bhs.set_flags(flags::FINAL | (fl & 3));
                p.bhs.set_itt(self.alloc_itt());
                p.bhs
                    .set_u16_at(20, if fl & 4 != 0 { 7 } else { LOGIN_CID });
                self.number(&mut p, fl & 8 != 0);
                p
            }
            _ => {
                let mut p = Pdu::new(opcode::SNACK_REQ);
                p.bhs.set_flags(flags::FINAL | (fl & 3));
                p.bhs.set_itt(self.last_itt);
                p
            }
        };
        // Occasionally knock CmdSN off the expected value.
        if sel & 0x40 != 0 && sel & 0x20 != 0 {
            let sn = p.bhs.cmdsn().wrapping_add(inp.u8() as i8 as u32);
            p.bhs.set_u32_at(24, sn);
        }
        p
    }

    fn alloc_itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1) % 0x10000;
        self.last_itt = itt;
        itt
    }

    /// CmdSN and ExpStatSN as a well-behaved initiator sets them.
    fn number(&mut self, p: &mut Pdu, immediate: bool) {
        p.bhs.set_immediate(immediate);
        p.bhs.set_u32_at(24, self.cmdsn);
        if !immediate {
            self.cmdsn = self.cmdsn.wrapping_add(1);
        }
        p.bhs.set_u32_at(28, self.exp_statsn);
    }

    fn login_pdu(&mut self, sel: u8, fl: u8, inp: &mut Input) -> Pdu {
        let mut p = Pdu::new(opcode::LOGIN_REQ);
        p.bhs.set_immediate(true);
        let csg = if fl & 0x10 != 0 {
            fl & 3
        } else {
            self.login_stage
        };
        let nsg = if fl & 0x20 != 0 {
            (fl >> 2) & 3
        } else if csg == 0 {
            1
        } else {
            3
        };
        let mut f = (csg << 2) | nsg;
        if fl & 0x40 != 0 {
            f |= flags::TRANSIT;
        }
        if fl & 0x80 != 0 && sel & 1 != 0 {
            f |= flags::CONTINUE;
        }
        p.bhs.set_flags(f);
        p.bhs.set_isid(LOGIN_ISID);
        p.bhs.set_itt(LOGIN_ITT);
        p.bhs.set_u16_at(20, LOGIN_CID);
        p.bhs.set_u32_at(24, LOGIN_CMDSN);
        p.bhs.set_u32_at(28, self.exp_statsn);
        if sel & 0x02 != 0 {
            // Perturb one identifier or the version.
            let at = 2 + inp.u8() as usize % 20;
            p.bhs.0[at] ^= inp.u8() | 1;
        }
        // Keys: each byte picks one from a dictionary, 0xff ends the list.
        let n = inp.u8() % 12;
        for _ in 0..n {
            let k = inp.u8();
            if k == 0xff {
                break;
            }
            self.login_key(k, inp, &mut p.data);
        }
        p
    }

    fn login_key(&mut self, k: u8, inp: &mut Input, out: &mut Vec<u8>) {
        let num = |inp: &mut Input| -> String {
            match inp.u8() % 6 {
                0 => "512".into(),
                1 => "8192".into(),
                2 => "262144".into(),
                3 => "16777215".into(),
                4 => "0".into(),
                _ => inp.u32().to_string(),
            }
        };
        match k % 32 {
            0 => text::push(out, "InitiatorName", INITIATOR),
            1 => text::push(out, "InitiatorName", "iqn.2026-01.fuzz:other"),
            2 => {
                let t = TARGETS[inp.u8() as usize % 4];
                self.login_target = t;
                text::push(out, "TargetName", t)
            }
            3 => text::push(out, "SessionType", "Discovery"),
            4 => text::push(out, "SessionType", "Normal"),
            5 => text::push(out, "AuthMethod", "None"),
            6 => text::push(out, "AuthMethod", "CHAP,None"),
            7 => text::push(out, "AuthMethod", "CHAP"),
            8 => text::push(
                out,
                "CHAP_A",
                ["5", "6", "7", "8", "7,5", "99"][inp.u8() as usize % 6],
            ),
            9 => text::push(out, "CHAP_N", CHAP_USER),
            10 => {
                // The right answer to the last challenge, or a wrong one.
                let wrong = inp.u8() & 1 != 0;
                let secret = if wrong { "nope" } else { CHAP_SECRET };
                let r = match &self.chap {
                    Some((a, i, c)) => ChapAlgorithm::from_code(*a as u64)
                        .map(|alg| alg.response(*i, secret.as_bytes(), c))
                        .unwrap_or_default(),
                    None => vec![0; 16],
                };
                text::push(out, "CHAP_R", &encode_hex(&r))
            }
            11 => {
                text::push(out, "CHAP_I", &inp.u8().to_string());
                let c = inp.take(16).to_vec();
                text::push(out, "CHAP_C", &encode_hex(&c));
            }
            12 => text::push(
                out,
                "HeaderDigest",
                ["None", "CRC32C", "CRC32C,None", "None,CRC32C", "x"][inp.u8() as usize % 5],
            ),
            13 => text::push(
                out,
                "DataDigest",
                ["None", "CRC32C", "CRC32C,None", "None,CRC32C", "x"][inp.u8() as usize % 5],
            ),
            14 => text::push(out, "MaxRecvDataSegmentLength", &num(inp)),
            15 => text::push(out, "MaxBurstLength", &num(inp)),
            16 => text::push(out, "FirstBurstLength", &num(inp)),
            17 => text::push(
                out,
                "ImmediateData",
                ["Yes", "No", "Maybe"][inp.u8() as usize % 3],
            ),
            18 => text::push(
                out,
                "InitialR2T",
                ["Yes", "No", "Maybe"][inp.u8() as usize % 3],
            ),
            19 => text::push(out, "MaxOutstandingR2T", &num(inp)),
            20 => text::push(out, "MaxConnections", &num(inp)),
            21 => text::push(out, "ErrorRecoveryLevel", &(inp.u8() % 4).to_string()),
            22 => text::push(out, "DefaultTime2Wait", &num(inp)),
            23 => text::push(out, "DefaultTime2Retain", &num(inp)),
            24 => text::push(out, "InitiatorAlias", "fuzz"),
            25 => text::push(out, "RDMAExtensions", ["Yes", "No"][inp.u8() as usize % 2]),
            26 => text::push(out, "InitiatorRecvDataSegmentLength", &num(inp)),
            27 => text::push(out, "TargetRecvDataSegmentLength", &num(inp)),
            28 => text::push(out, "X-fuzz-private", "1"),
            29 => text::push(out, "DataPDUInOrder", ["Yes", "No"][inp.u8() as usize % 2]),
            30 => text::push(out, "OFMarker", ["Yes", "No"][inp.u8() as usize % 2]),
            _ => {
                // Raw bytes: malformed text.
                let n = inp.u8() as usize % 64;
                out.extend_from_slice(inp.take(n));
            }
        }
    }

    fn nop_out(&mut self, fl: u8, inp: &mut Input) -> Pdu {
        let mut p = Pdu::new(opcode::NOP_OUT);
        p.bhs.set_flags(flags::FINAL);
        if fl & 1 != 0 {
            // Answer to a ping (or an unsolicited no-op).
            p.bhs.set_itt(RESERVED_TAG);
            p.bhs.set_ttt(if fl & 2 != 0 {
                self.ping_ttt
            } else {
                RESERVED_TAG
            });
            p.bhs.set_immediate(true);
            p.bhs.set_u32_at(24, self.cmdsn);
        } else {
            p.bhs.set_itt(self.alloc_itt());
            p.bhs.set_ttt(RESERVED_TAG);
            self.number(&mut p, fl & 2 != 0);
            p.data = vec![0xab; inp.u8() as usize * 4];
        }
        p.bhs.set_lun(lun(fl));
        p
    }

    fn scsi_cmd(&mut self, fl: u8, inp: &mut Input) -> Pdu {
        let mut p = Pdu::new(opcode::SCSI_CMD);
        let m = inp.u8();
        let read = m & 1 != 0;
        let write = m & 2 != 0;
        let mut f = fl & flags::ATTR_MASK;
        if m & 4 == 0 {
            f |= flags::FINAL;
        }
        if read {
            f |= flags::READ;
        }
        if write {
            f |= flags::WRITE;
        }
        p.bhs.set_flags(f);
        let itt = if m & 8 != 0 && self.last_itt != 0 {
            self.last_itt // a tag in use
        } else {
            self.alloc_itt()
        };
        p.bhs.set_itt(itt);
        p.bhs.set_lun(lun(fl));
        let edtl = match (m >> 4) & 7 {
            0 => 0,
            1 => 512,
            2 => 4096,
            3 => 65536,
            4 => 8192 + 512,
            5 => inp.u16() as u32 * 16,
            6 => 300_000,
            _ => inp.u32(),
        };
        p.bhs.set_u32_at(20, edtl);
        self.number(&mut p, fl & 0x08 != 0);
        let cdb_op = [0x28u8, 0x2a, 0x00, 0x12, 0x88, 0x8a, 0x7f, 0xa0][(fl >> 4) as usize & 7];
        p.bhs.0[32] = cdb_op;
        let cdb_len = inp.u8() as usize % 16;
        let cdb = inp.take(cdb_len);
        p.bhs.0[33..33 + cdb.len()].copy_from_slice(cdb);
        if m & 0x80 != 0 {
            // Extended CDB AHS (type 1): 16 more CDB bytes.
            p.ahs = vec![0, 17, 1, 0];
            p.ahs.extend_from_slice(&[0x5c; 16]);
        }
        if fl & 0x80 != 0 {
            // Immediate data.
            let n = (inp.u8() as u32 * 128).min(edtl.max(1));
            p.data = (0..n).map(|i| i as u8).collect();
        }
        if write {
            let imm = p.data.len() as u32;
            self.last_write = Some((itt, edtl));
            self.unsolicited = (m & 4 != 0).then_some((itt, imm, 0));
        }
        p
    }

    fn tmf(&mut self, fl: u8, inp: &mut Input) -> Pdu {
        let mut p = Pdu::new(opcode::TASK_MGMT_REQ);
        let func = inp.u8() % 13;
        p.bhs.set_flags(flags::FINAL | func);
        p.bhs.set_itt(self.alloc_itt());
        p.bhs.set_lun(lun(fl));
        let rtt = match (fl >> 2) & 3 {
            0 => self.last_write.map_or(0, |w| w.0),
            1 => self.itt_back(inp.u8()),
            2 => RESERVED_TAG,
            _ => inp.u32(),
        };
        p.bhs.set_u32_at(20, rtt);
        self.number(&mut p, fl & 0x10 == 0);
        let ref_sn = self.cmdsn.wrapping_sub(inp.u8() as u32 % 4);
        p.bhs.set_u32_at(32, ref_sn);
        p
    }

    fn itt_back(&self, back: u8) -> u32 {
        self.next_itt.wrapping_sub(1 + back as u32 % 8)
    }

    fn text_req(&mut self, fl: u8, inp: &mut Input) -> Pdu {
        let mut p = Pdu::new(opcode::TEXT_REQ);
        let mut f = 0;
        if fl & 1 == 0 {
            f |= flags::FINAL;
        }
        if fl & 2 != 0 {
            f |= flags::CONTINUE;
        }
        p.bhs.set_flags(f);
        // Continuing an exchange reuses its ITT and echoes the TTT.
        if fl & 4 != 0 {
            p.bhs.set_itt(self.last_itt);
            p.bhs.set_ttt(self.text_ttt);
        } else {
            p.bhs.set_itt(self.alloc_itt());
            p.bhs.set_ttt(RESERVED_TAG);
        }
        self.number(&mut p, fl & 8 != 0);
        if fl & 0x10 == 0 {
            let q = match inp.u8() % 5 {
                0 => "All",
                1 => "",
                2 => TARGET_OPEN,
                3 => TARGET_DENIED,
                _ => "iqn.nope",
            };
            text::push(&mut p.data, "SendTargets", q);
        }
        if fl & 0x20 != 0 {
            let n = match inp.u8() % 4 {
                0 => "512".to_string(),
                1 => "100".to_string(),
                2 => "262144".to_string(),
                _ => inp.u32().to_string(),
            };
            text::push(&mut p.data, "MaxRecvDataSegmentLength", &n);
        }
        if fl & 0x40 != 0 {
            let n = inp.u8() as usize % 96;
            p.data.extend_from_slice(inp.take(n));
        }
        if fl & 0x80 != 0 {
            // Oversized text.
            p.data.extend(std::iter::repeat_n(b'a', 9000));
        }
        p
    }

    fn data_out(&mut self, fl: u8, inp: &mut Input) -> Pdu {
        let mut p = Pdu::new(opcode::DATA_OUT);
        let seg = self.conn.params().max_xmit_data_segment_length.max(512);
        let seg = (self.conn.decoder().max_recv_data_len).min(seg.max(512));
        let want = match fl & 3 {
            0 => seg,
            1 => inp.u8() as u32 * 4 + 1,
            2 => 512,
            _ => inp.u16() as u32,
        };
        let mut final_bit = false;
        if fl & 4 == 0 && !self.r2ts.is_empty() {
            // Solicited: answer an R2T in order.
            let i = if fl & 8 != 0 {
                inp.u8() as usize % self.r2ts.len()
            } else {
                0
            };
            let r = &mut self.r2ts[i];
            let n = want.min(r.len.saturating_sub(r.sent));
            p.bhs.set_itt(r.itt);
            p.bhs.set_ttt(r.ttt);
            p.bhs.set_datasn(r.datasn);
            p.bhs.set_buffer_offset(r.offset.wrapping_add(r.sent));
            r.sent += n;
            r.datasn += 1;
            if r.sent >= r.len {
                final_bit = true;
                self.r2ts.remove(i);
            }
            p.data = vec![0x3c; n as usize];
        } else if let Some((itt, off, sn)) = self.unsolicited {
            // Unsolicited, after a write command without F.
            let edtl = self.last_write.map_or(0, |w| w.1);
            let n = want.min(edtl.saturating_sub(off));
            p.bhs.set_itt(itt);
            p.bhs.set_ttt(RESERVED_TAG);
            p.bhs.set_datasn(sn);
            p.bhs.set_buffer_offset(off);
            final_bit = fl & 0x10 != 0 || off + n >= edtl;
            self.unsolicited = (!final_bit).then_some((itt, off + n, sn + 1));
            p.data = vec![0xc3; n as usize];
        } else {
            p.bhs.set_itt(self.itt_back(fl));
            p.bhs.set_ttt(inp.u32());
            p.bhs.set_buffer_offset(inp.u32());
            p.data = vec![0x11; want.min(8192) as usize];
        }
        if final_bit || fl & 0x20 != 0 {
            p.bhs.set_flags(flags::FINAL);
        }
        if fl & 0x40 != 0 {
            // Off by a little: wrong offset or DataSN.
            let b = inp.u8();
            if b & 1 != 0 {
                p.bhs.set_datasn(p.bhs.datasn().wrapping_add(b as u32 >> 1));
            } else {
                p.bhs
                    .set_buffer_offset(p.bhs.buffer_offset().wrapping_add(b as u32 * 4));
            }
        }
        p.bhs.set_u32_at(28, self.exp_statsn);
        p
    }
}

#[derive(Clone, Copy)]
struct Snapshot {
    ffp: bool,
    closing: bool,
    max_xmit: u32,
}

fn lun(fl: u8) -> u64 {
    // Mostly LUN 0; sometimes LUN 1 in SAM flat format.
    if fl & 0x40 != 0 {
        0x0001_0000_0000_0000
    } else {
        0
    }
}

/// A PDU from raw bytes: 48 bytes of BHS, then the AHS and data segment
/// the BHS declares, cut short at the end of the input. The data length
/// is bounded to keep one step cheap.
pub fn raw_pdu(inp: &mut Input) -> Pdu {
    let mut bhs = [0u8; BHS_LEN];
    let got = inp.take(BHS_LEN);
    bhs[..got.len()].copy_from_slice(got);
    let mut p = Pdu::default();
    p.bhs.0 = bhs;
    let ahs_len = p.bhs.total_ahs_len();
    p.ahs = inp.take(ahs_len).to_vec();
    let dsl = p.bhs.data_segment_len() as usize;
    p.data = inp.take(dsl.min(1 << 18)).to_vec();
    p
}

/// Wire form of `p` without digests, for seed files.
pub fn wire(p: &Pdu) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::default().encode(p, &mut out);
    out
}

/// The scripted login of the `connection` target: one Login Request from
/// the operational stage straight to full feature phase. `opt` picks the
/// negotiated settings.
pub fn scripted_login(opt: u8) -> Pdu {
    let mut p = Pdu::new(opcode::LOGIN_REQ);
    p.bhs.set_immediate(true);
    p.bhs.set_flags(flags::TRANSIT | (1 << 2) | 3);
    p.bhs.set_isid(LOGIN_ISID);
    p.bhs.set_itt(LOGIN_ITT);
    p.bhs.set_u16_at(20, LOGIN_CID);
    p.bhs.set_u32_at(24, LOGIN_CMDSN);
    let d = &mut p.data;
    text::push(d, "InitiatorName", INITIATOR);
    if opt & 0x80 != 0 {
        text::push(d, "SessionType", "Discovery");
    } else {
        text::push(d, "TargetName", TARGET_OPEN);
        text::push(d, "SessionType", "Normal");
    }
    text::push(
        d,
        "HeaderDigest",
        if opt & 1 != 0 { "CRC32C" } else { "None" },
    );
    text::push(
        d,
        "DataDigest",
        if opt & 2 != 0 { "CRC32C" } else { "None" },
    );
    text::push(d, "ImmediateData", if opt & 4 != 0 { "Yes" } else { "No" });
    text::push(d, "InitialR2T", if opt & 8 != 0 { "Yes" } else { "No" });
    let (mrdsl, fbl, mbl) = match (opt >> 4) & 3 {
        0 => ("8192", "65536", "262144"),
        1 => ("512", "512", "512"),
        2 => ("65536", "16384", "65536"),
        _ => ("262144", "262144", "1048576"),
    };
    text::push(d, "MaxRecvDataSegmentLength", mrdsl);
    text::push(d, "FirstBurstLength", fbl);
    text::push(d, "MaxBurstLength", mbl);
    text::push(
        d,
        "MaxOutstandingR2T",
        if opt & 0x40 != 0 { "4" } else { "1" },
    );
    p
}
