//! The iSER state machine on the host, against a software stand-in for
//! verbs. The stand-in makes the engine's calls in the engine's order
//! (target-rdma/src/engine.rs: `iser_recv`, `process_events`,
//! `iser_post_read`, `iser_send_done`, `IserSink`), on a real RAM LUN.
//! The initiator's registered memory sits at real virtual addresses (Linux
//! advertises no ZBVA); an access outside a region is a remote access
//! error, which breaks the queue pair. RDMA Writes and Sends leave in
//! posting order, so data is in place before the SCSI Response after it;
//! RDMA Reads complete in whatever order a test picks.

use std::collections::{HashMap, VecDeque};

use iscsi::conn::{reject, tmf, BufferSource, ConnConfig, Connection, DataBuf, Event, TxSink};
use iscsi::conn::{RdmaTags, RESERVED_TAG};
use iscsi::login::{ChapConfig, LoginContext, LoginStatus, SessionRequest};
use iscsi::params::{TargetLimits, Transport};
use iscsi::pdu::{flags, opcode, Decoder, Encoder, Pdu};
use iscsi::textreq::{TargetRecord, TextContext};
use scsi::backstore::MemBackstore;
use scsi::{Cdb, Lun, LunInfo, Nexus, ScsiTask, TaskAttr};
use transport_iser::framing::{decode_message, split_pdus};
use transport_iser::header::flags::{ISCSI_CTRL, RSV, WSV};
use transport_iser::{IserHeader, ISER_HDR_LEN};

const TARGET: &str = "iqn.2026-01.test:standin";
const INITIATOR: &str = "iqn.2026-01.test:host";
const ISID: u64 = 0x0023_0000_0001;
const NEXUS: u64 = 1;
const BS: usize = 512;
const LUN_BYTES: usize = 32 << 20;
const LUN_BLOCKS: usize = LUN_BYTES / BS;
const MAX_IO: usize = 8 << 20;
const FIRST_BURST: usize = 65536;
/// What the engine gives an iSER connection: receive buffers for 8 KiB
/// of data (`iser::RECV_DATA_MAX`), Sends of one send slot at most.
const RECV_DATA_MAX: usize = 8192;
const SEND_SLOT: usize = 8704;

/// xorshift64*: every run replays the same commands.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        for c in v.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
        v
    }

    /// 1 to 16384 blocks (512 B to 8 MiB), each power-of-two band as
    /// likely as the next, so that tiny and huge transfers both come up.
    fn blocks(&mut self) -> usize {
        let top = 1 << self.below(15);
        top / 2 + 1 + self.below(top - top / 2)
    }
}

fn sn_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) as i32 >= 0
}

struct Ctx;

impl LoginContext for Ctx {
    fn portal_group_tag(&self) -> u16 {
        1
    }
    fn target_exists(&self, name: &str) -> bool {
        name == TARGET
    }
    fn initiator_allowed(&self, _: &str, _: &str) -> bool {
        true
    }
    fn chap(&self, _: Option<&str>) -> ChapConfig {
        ChapConfig::default()
    }
    fn fill_random(&mut self, buf: &mut [u8]) {
        buf.fill(0x5a);
    }
    fn instate_session(&mut self, _: &SessionRequest) -> Result<u16, LoginStatus> {
        Ok(1)
    }
}

impl TextContext for Ctx {
    fn send_targets(&self, _: &str, _: Option<&str>, _: &str) -> Vec<TargetRecord> {
        Vec::new()
    }
}

impl BufferSource for Ctx {}

/// What the initiator offers at login (the Linux initiator's values
/// unless a test wants other limits).
#[derive(Clone, Copy)]
struct Keys {
    immediate: bool,
    initial_r2t: bool,
    max_burst: u32,
    max_r2t: u16,
    /// InitiatorRecvDataSegmentLength.
    initiator_recv: u32,
}

const LINUX: Keys = Keys {
    immediate: true,
    initial_r2t: false,
    max_burst: 262_144,
    max_r2t: 4,
    initiator_recv: 65536,
};

impl Keys {
    /// The login text, one `key=value` per word.
    fn text(&self) -> String {
        let yn = |b: bool| if b { "Yes" } else { "No" };
        format!(
            "InitiatorName={INITIATOR} TargetName={TARGET} SessionType=Normal \
             HeaderDigest=None DataDigest=None RDMAExtensions=Yes \
             TargetRecvDataSegmentLength=262144 InitiatorRecvDataSegmentLength={} \
             ImmediateData={} InitialR2T={} FirstBurstLength={FIRST_BURST} \
             MaxBurstLength={} MaxOutstandingR2T={} ErrorRecoveryLevel=0",
            self.initiator_recv,
            yn(self.immediate),
            yn(self.initial_r2t),
            self.max_burst,
            self.max_r2t
        )
    }
}

/// The target's answer for `key` in a Login Response, "" when none.
fn answer(resp: &Pdu, key: &str) -> String {
    let kv = iscsi::text::parse(&resp.data).expect("login text");
    let found = kv.into_iter().find(|(k, _)| k == key);
    found.map(|kv| kv.1).unwrap_or_default()
}

/// Data-In PDUs the iSCSI layer would have made for `len` bytes: none
/// longer than InitiatorRecvDataSegmentLength, none across a
/// MaxBurstLength boundary.
fn data_in_pdus(len: usize, seg: u32, burst: u32) -> u32 {
    let (seg, burst) = (seg as usize, burst as usize);
    let pdus = |b: usize| (len - b * burst).min(burst).div_ceil(seg) as u32;
    (0..len.div_ceil(burst)).map(pdus).sum()
}

fn rw10(op: u8, lba: usize, blocks: usize) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
    c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
    c
}

fn ram_lun() -> scsi::Target {
    let info = LunInfo {
        lun: 0,
        block_size: BS as u32,
        num_blocks: LUN_BLOCKS as u64,
        vendor: "TEST".into(),
        product: "STANDIN".into(),
        revision: "0001".into(),
        serial: "standin0".into(),
        naa: [0; 16],
        thin_provisioned: false,
        read_only: false,
        removable: false,
        pr_file: None,
        mode_file: None,
        max_transfer_blocks: 65535,
        max_unmap_blocks: 4096,
        max_unmap_descriptors: 8,
        max_write_same_blocks: 65535,
        write_cache: true,
    };
    let mut t = scsi::Target::new();
    let store = MemBackstore::new(LUN_BYTES as u64).unwrap();
    assert!(t.add_lun(Lun::new(info, Box::new(store)).expect("RAM LUN")));
    t
}

/// The target's send queue: work requests leave in posting order.
enum Wr {
    Write(DataBuf, usize, u32, u64),
    Send(Vec<u8>),
}

/// An RDMA Read posted and not yet completed; `addr` is where the device
/// puts the bytes.
#[derive(Clone, Copy, Debug)]
struct Read {
    task: u32,
    ttt: u32,
    offset: u32,
    len: u32,
    stag: u32,
    va: u64,
    addr: usize,
}

/// The engine's `IserSink`: PDU bytes go to the send stream (posted at the
/// next flush), read data by an RDMA Write posted at once.
struct Sink<'a>(&'a mut Vec<u8>, &'a mut VecDeque<Wr>);

impl TxSink for Sink<'_> {
    fn put_bytes(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn put_vec(&mut self, bytes: &mut Vec<u8>) {
        self.0.append(bytes);
    }
    fn put_data(&mut self, _: DataBuf) {
        panic!("a Data-In buffer on iSER");
    }
    fn put_range(&mut self, _: usize, _: usize) {
        panic!("a Data-In range on iSER");
    }
    fn last_range_crc32c(&self) -> u32 {
        panic!("a Data-In digest on iSER");
    }
    fn put_rdma_write(&mut self, buf: DataBuf, len: usize, stag: u32, va: u64) -> Option<DataBuf> {
        self.1.push_back(Wr::Write(buf, len, stag, va));
        None
    }
}

/// One command of the initiator.
#[derive(Debug)]
struct Io {
    itt: u32,
    cmdsn: u32,
    lba: usize,
    len: usize,
    write: bool,
    stag: u32,
    unsolicited: usize,
}

type Memory = HashMap<u32, (u64, Vec<u8>)>;

/// The bytes an RDMA access of `len` at `va` touches; `None` is a remote
/// access error.
fn region(mem: &mut Memory, stag: u32, va: u64, len: usize) -> Option<&mut [u8]> {
    let (base, bytes) = mem.get_mut(&stag)?;
    let start = usize::try_from(va.checked_sub(*base)?).ok()?;
    bytes.get_mut(start..start.checked_add(len)?)
}

/// Both ends of one iSER connection and the wire between them.
struct Sim {
    // The target, as the engine holds one connection.
    conn: Connection,
    dev: scsi::Target,
    stream: Vec<u8>,
    sq: VecDeque<Wr>,
    /// The completion queue's RDMA Reads, in posting order.
    reads: Vec<Read>,
    /// The QP is in error: nothing more is sent.
    broken: bool,
    closed: Option<String>,
    // The initiator.
    keys: Keys,
    /// Registered memory: STag -> (VA of byte 0, bytes).
    mem: Memory,
    /// The ITT each STag was registered for.
    owner: HashMap<u32, u32>,
    rx: VecDeque<Pdu>,
    logged_in: bool,
    itt: u32,
    cmdsn: u32,
    exp_statsn: u32,
    exp_cmdsn: u32,
}

impl Sim {
    fn new(keys: Keys) -> Sim {
        let limits = TargetLimits {
            max_recv_data_segment_length: RECV_DATA_MAX as u32,
            ..TargetLimits::default()
        };
        let cfg = ConnConfig {
            limits,
            transport: Transport::Iser,
            nop_interval_ms: 0,
            ..ConnConfig::default()
        };
        Sim {
            conn: Connection::new(cfg, 0),
            dev: ram_lun(),
            stream: Vec::new(),
            sq: VecDeque::new(),
            reads: Vec::new(),
            broken: false,
            closed: None,
            keys,
            mem: HashMap::new(),
            owner: HashMap::new(),
            rx: VecDeque::new(),
            logged_in: false,
            itt: 0,
            cmdsn: 1,
            exp_statsn: 0,
            exp_cmdsn: 1,
        }
    }

    /// Logged in with `keys`, the first command's UNIT ATTENTION taken.
    fn ready(k: Keys) -> Sim {
        let mut s = Sim::new(k);
        assert_eq!(s.login(&k.text()).bhs.login_status(), (0, 0));
        let g = s.conn.session();
        let got = (
            g.immediate_data,
            g.initial_r2t,
            g.max_burst_length,
            g.max_outstanding_r2t,
        );
        assert_eq!(got, (k.immediate, k.initial_r2t, k.max_burst, k.max_r2t));
        // A new I_T nexus starts with POWER ON OCCURRED pending (SPC-4).
        let itt = s.command(&[0; 6], 0, flags::FINAL, &[], RdmaTags::default());
        s.settle();
        let r = s.response(itt);
        assert_eq!((r.bhs.0[3], r.data[2 + 2] & 0x0f), (2, 6), "UNIT ATTENTION");
        s
    }

    fn login(&mut self, text: &str) -> Pdu {
        let mut p = Pdu::new(opcode::LOGIN_REQ);
        p.bhs.set_immediate(true);
        p.bhs.set_flags(flags::TRANSIT | (1 << 2) | 3);
        p.bhs.set_isid(ISID);
        p.bhs.set_u16_at(20, 1);
        p.bhs.set_u32_at(24, self.cmdsn);
        p.data = text.replace(' ', "\0").into_bytes();
        p.data.push(0);
        self.send(RdmaTags::default(), &p);
        self.wire();
        let r = self.rx.pop_front().expect("a Login Response");
        assert!(self.rx.is_empty() && r.bhs.opcode() == opcode::LOGIN_RESP);
        r
    }

    // ---- The target, as the engine drives it ----

    /// `iser_recv` and `feed_pdu`.
    fn target_recv(&mut self, msg: &[u8]) {
        if self.closed.is_some() || self.conn.is_closing() {
            return;
        }
        let decoder = self.conn.decoder().clone();
        let conn = &mut self.conn;
        let mut place = |bhs: &iscsi::Bhs, d: &[u8]| {
            conn.place_data_out(bhs, d)
                || conn.stage_immediate(bhs, d, &mut |n| Some(vec![0; n].into()))
        };
        match decode_message(msg, &decoder, &mut place, &mut Vec::with_capacity) {
            Ok((hdr, pdu)) => {
                self.conn.handle_pdu_rdma(&mut Ctx, pdu, hdr.rdma_tags(), 0);
                self.process_events();
            }
            Err(e) => self.closed = Some(format!("malformed iSER message: {e}")),
        }
        self.flush();
    }

    fn process_events(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::RdmaRead {
                    task,
                    ttt,
                    offset,
                    len,
                    stag,
                    va,
                } => {
                    let addr = 0;
                    self.post_read(Read {
                        task,
                        ttt,
                        offset,
                        len,
                        stag,
                        va,
                        addr,
                    })
                }
                Event::LoggedIn(_) => {
                    let (id, isid, tpgt) = (NEXUS, ISID, 1);
                    let (initiator_name, target_name) = (INITIATOR.into(), TARGET.into());
                    let nexus = Nexus {
                        id,
                        initiator_name,
                        isid,
                        target_name,
                        tpgt,
                    };
                    self.dev.nexus_added(&nexus);
                }
                Event::Scsi(r) => {
                    let task = ScsiTask {
                        tag: r.task as u64,
                        nexus: NEXUS,
                        cdb: Cdb::from_parts(&r.cdb, &r.cdb_ext),
                        attr: TaskAttr::from_iscsi(r.attr),
                        edtl: r.edtl,
                        data_out: r.data_out,
                        data_in: DataBuf::with_capacity(r.edtl as usize * r.read as usize),
                    };
                    self.dev.submit(r.lun, task);
                }
                Event::Abort { task, lun } => {
                    self.dev.abort(lun, NEXUS, task as u64);
                }
                Event::Close(why) => {
                    self.closed.get_or_insert(format!("{why:?}"));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// `iser_post_read`.
    fn post_read(&mut self, mut r: Read) {
        let Some(mut dst) = self.conn.rdma_read_target(r.task, r.offset, r.len) else {
            return self.conn.rdma_read_done(r.task, r.ttt, true);
        };
        assert_eq!(dst.len(), r.len as usize);
        r.addr = dst.pieces_from(0).next().expect("a piece").as_ptr() as usize;
        let end = r.addr + r.len as usize;
        // The device writes into a posted destination until the read
        // completes: memory handed to another command meanwhile would be
        // overwritten under it.
        let apart = |p: &Read| end <= p.addr || p.addr + p.len as usize <= r.addr;
        assert!(self.reads.iter().all(apart), "posted twice: {r:?}");
        assert!(r.len <= self.keys.max_burst, "beyond MaxBurstLength");
        let outstanding = self.reads.iter().filter(|p| p.stag == r.stag).count();
        assert!(outstanding < self.keys.max_r2t.into(), "MaxOutstandingR2T");
        // No ZBVA: byte N of the initiator's buffer is at its VA + N.
        assert_eq!(r.va, self.mem[&r.stag].0 + r.offset as u64, "VA of {r:?}");
        self.reads.push(r);
    }

    /// The completion of `reads[i]` polled: `iser_send_done`.
    fn complete_read(&mut self, i: usize) {
        let r = self.reads.remove(i);
        let src = region(&mut self.mem, r.stag, r.va, r.len as usize);
        let src = src.filter(|_| !self.broken);
        let ok = src.is_some();
        if let Some(src) = src {
            match self.conn.rdma_read_target(r.task, r.offset, r.len) {
                Some(mut dst) => {
                    let at = dst.pieces_from(0).next().expect("a piece").as_ptr() as usize;
                    assert_eq!(at, r.addr, "buffer moved under a read");
                    dst.copy_from(0, src);
                }
                None => assert!(self.conn.rdma_buffers_held() > 0, "freed under {r:?}"),
            }
        }
        self.conn.rdma_read_done(r.task, r.ttt, ok);
        self.broken |= !ok;
        self.process_events();
        if !ok {
            self.closed.get_or_insert("iSER work request failed".into());
        }
        self.flush();
    }

    /// Device completions into the connection (`deliver`), then what they
    /// caused (`finish_touched`); returns how many there were.
    fn run_device(&mut self) -> usize {
        let mut done = Vec::new();
        self.dev.poll(&mut done);
        let n = done.len();
        for c in done {
            let mut sink = Sink(&mut self.stream, &mut self.sq);
            let (tag, st, data, len) = (c.tag as u32, c.status, c.data_in, c.data_out_len);
            // A buffer that did not go out goes back to the pool: dropped.
            let _ = self
                .conn
                .scsi_complete_owned(tag, st, &c.sense, data, len, &mut sink);
        }
        self.process_events();
        self.flush();
        n
    }

    /// `iser_flush`: the whole PDUs of the stream, one Send each.
    fn flush(&mut self) {
        self.conn.take_tx(&mut self.stream);
        if self.broken {
            return self.stream.clear();
        }
        let (pdus, rest) = split_pdus(&self.stream);
        assert!(rest.is_empty(), "partial PDU in the send stream");
        for p in pdus {
            let msg = [&IserHeader::TARGET.encode()[..], p].concat();
            assert!(msg.len() <= SEND_SLOT, "a {}-byte Send", msg.len());
            self.sq.push_back(Wr::Send(msg));
        }
        self.stream.clear();
    }

    // ---- The wire and the initiator ----

    /// The send queue reaches the initiator, in order.
    fn wire(&mut self) {
        while let Some(wr) = self.sq.pop_front() {
            let (buf, len, stag, va) = match wr {
                Wr::Send(msg) => {
                    self.initiator_recv(&msg);
                    continue;
                }
                Wr::Write(buf, len, stag, va) => (buf, len, stag, va),
            };
            // The initiator completes a command on its SCSI Response: the
            // data must be there by then.
            let itt = self.owner[&stag];
            assert!(
                self.rx.iter().all(|p| p.bhs.itt() != itt),
                "data after response"
            );
            match region(&mut self.mem, stag, va, len) {
                Some(dst) => dst.copy_from_slice(&buf[..len]),
                None => {
                    self.broken = true;
                    self.closed.get_or_insert("RDMA Write: access error".into());
                }
            }
        }
    }

    fn initiator_recv(&mut self, msg: &[u8]) {
        let hdr = IserHeader::decode(msg).expect("an iSER header");
        assert_eq!(hdr, IserHeader::TARGET, "the target advertises no buffers");
        let decoded = Decoder::new(1 << 24).decode(&msg[ISER_HDR_LEN..]);
        let (pdu, used) = decoded.expect("a PDU").expect("a whole PDU");
        assert_eq!(used, msg.len() - ISER_HDR_LEN, "one PDU per Send");
        let (b, op) = (pdu.bhs, pdu.bhs.opcode());
        assert!(
            ![opcode::DATA_IN, opcode::R2T].contains(&op),
            "{b:?} on iSER"
        );
        let last_login = b.flags() & flags::TRANSIT != 0 && b.login_nsg() == 3;
        if op == opcode::LOGIN_RESP && last_login && b.login_status() == (0, 0) {
            self.logged_in = true;
            self.exp_statsn = b.statsn().wrapping_add(1);
        } else if self.logged_in {
            let seg = self.keys.initiator_recv as usize;
            assert!(pdu.data.len() <= seg, "a Send beyond its limit");
            let numbered = [opcode::SCSI_RESP, opcode::TASK_MGMT_RESP, opcode::REJECT];
            if numbered.contains(&op) || op == opcode::NOP_IN && b.itt() != RESERVED_TAG {
                assert_eq!(b.statsn(), self.exp_statsn, "StatSN of {b:?}");
                self.exp_statsn = self.exp_statsn.wrapping_add(1);
            }
            // ExpCmdSN never goes back nor past what was sent; the window
            // stays open (MaxCmdSN >= ExpCmdSN - 1).
            let (exp, max) = (b.expcmdsn(), b.maxcmdsn().wrapping_add(1));
            let ok = sn_le(self.exp_cmdsn, exp) && sn_le(exp, self.cmdsn) && sn_le(exp, max);
            assert!(ok, "ExpCmdSN, MaxCmdSN of {b:?}");
            self.exp_cmdsn = exp;
        }
        self.rx.push_back(pdu);
    }

    fn send(&mut self, tags: RdmaTags, pdu: &Pdu) {
        let mut h = IserHeader {
            flags: ISCSI_CTRL,
            ..IserHeader::default()
        };
        if let Some((stag, va)) = tags.write {
            (h.flags, h.write_stag, h.write_va) = (h.flags | WSV, stag, va);
        }
        if let Some((stag, va)) = tags.read {
            (h.flags, h.read_stag, h.read_va) = (h.flags | RSV, stag, va);
        }
        let mut msg = h.encode().to_vec();
        Encoder::default().encode(pdu, &mut msg);
        self.target_recv(&msg);
    }

    fn command(&mut self, cdb: &[u8], edtl: usize, fl: u8, imm: &[u8], tags: RdmaTags) -> u32 {
        self.itt += 1;
        let mut p = Pdu::new(opcode::SCSI_CMD);
        p.bhs.set_flags(fl | 1);
        p.bhs.set_itt(self.itt);
        p.bhs.set_u32_at(20, edtl as u32);
        p.bhs.set_u32_at(24, self.cmdsn);
        p.bhs.set_u32_at(28, self.exp_statsn);
        p.bhs.0[32..32 + cdb.len()].copy_from_slice(cdb);
        p.data = imm.to_vec();
        self.cmdsn = self.cmdsn.wrapping_add(1);
        self.send(tags, &p);
        self.itt
    }

    fn data_out(&mut self, itt: u32, ttt: u32, datasn: usize, off: usize, data: &[u8], f: bool) {
        let mut p = Pdu::new(opcode::DATA_OUT);
        p.bhs.set_flags(if f { flags::FINAL } else { 0 });
        p.bhs.set_itt(itt);
        p.bhs.set_ttt(ttt);
        p.bhs.set_u32_at(28, self.exp_statsn);
        p.bhs.set_datasn(datasn as u32);
        p.bhs.set_buffer_offset(off as u32);
        p.data = data.to_vec();
        self.send(RdmaTags::default(), &p);
    }

    /// READ(10) or WRITE(10) of the blocks `buf` spans, as the Linux
    /// initiator sends them. A read lands in `buf` at its read STag; a
    /// write sends `imm` bytes immediate, unsolicited Data-Out up to
    /// `unsolicited`, and leaves the rest for RDMA Read at a write VA that
    /// names the first solicited byte.
    fn io(&mut self, lba: usize, buf: Vec<u8>, write: bool, imm: usize, unsolicited: usize) -> Io {
        let len = buf.len();
        assert!(imm <= unsolicited && unsolicited <= len && imm <= RECV_DATA_MAX);
        // STags far apart, VAs not page aligned: a VA off by any amount
        // reads the wrong bytes or leaves the region.
        let stag = self.cmdsn + 0x100;
        let va = 0x7f00_0000_0000 + ((stag as u64) << 32) + 0x1d0;
        let data = |s: &Sim, r: std::ops::Range<usize>| s.mem[&stag].1[r].to_vec();
        self.mem.insert(stag, (va, buf));
        let mut tags = RdmaTags::default();
        let mut fl = if unsolicited > imm { 0 } else { flags::FINAL };
        if write {
            tags.write = (unsolicited < len).then_some((stag, va + unsolicited as u64));
            fl |= flags::WRITE;
        } else {
            (tags.read, fl) = (Some((stag, va)), fl | flags::READ);
        }
        let cdb = rw10(if write { 0x2a } else { 0x28 }, lba, len / BS);
        let itt = self.command(&cdb, len, fl, &data(self, 0..imm), tags);
        let cmdsn = self.cmdsn - 1;
        self.owner.insert(stag, itt);
        for (datasn, off) in (imm..unsolicited).step_by(RECV_DATA_MAX).enumerate() {
            let end = unsolicited.min(off + RECV_DATA_MAX);
            let last = end == unsolicited;
            self.data_out(itt, RESERVED_TAG, datasn, off, &data(self, off..end), last);
        }
        Io {
            itt,
            cmdsn,
            lba,
            len,
            write,
            stag,
            unsolicited,
        }
    }

    fn write(&mut self, lba: usize, data: Vec<u8>, imm: usize, unsolicited: usize) -> Io {
        self.io(lba, data, true, imm, unsolicited)
    }

    /// Into poisoned memory, so that bytes never written show.
    fn read(&mut self, lba: usize, blocks: usize) -> Io {
        self.io(lba, vec![0xee; blocks * BS], false, 0, 0)
    }

    fn abort_task(&mut self, io: &Io) -> u8 {
        self.itt += 1;
        let mut p = Pdu::new(opcode::TASK_MGMT_REQ);
        p.bhs.set_immediate(true);
        p.bhs.set_flags(flags::FINAL | tmf::ABORT_TASK);
        p.bhs.set_itt(self.itt);
        p.bhs.set_u32_at(20, io.itt);
        p.bhs.set_u32_at(24, self.cmdsn);
        p.bhs.set_u32_at(28, self.exp_statsn);
        p.bhs.set_u32_at(32, io.cmdsn);
        self.send(RdmaTags::default(), &p);
        self.wire();
        let r = self.take(opcode::TASK_MGMT_RESP, self.itt);
        r.expect("TMF response").bhs.0[2]
    }

    fn take(&mut self, op: u8, itt: u32) -> Option<Pdu> {
        let is = |p: &Pdu| p.bhs.opcode() == op && p.bhs.itt() == itt;
        let i = self.rx.iter().position(is)?;
        self.rx.remove(i)
    }

    fn response(&mut self, itt: u32) -> Pdu {
        let r = self.take(opcode::SCSI_RESP, itt);
        r.unwrap_or_else(|| panic!("no SCSI Response for ITT {itt:#x}"))
    }

    /// Checks the GOOD response of `io` and what it moved: written data
    /// goes into `model`, read data must equal it.
    fn finish(&mut self, io: &Io, model: &mut [u8]) {
        let r = self.response(io.itt);
        assert_eq!(r.bhs.0[3], 0, "status of {io:?}: {:02x?}", r.data);
        assert_eq!(r.bhs.flags() & (flags::OVERFLOW | flags::UNDERFLOW), 0);
        assert_eq!(r.bhs.residual_count(), 0);
        let (_, bytes) = self.mem.remove(&io.stag).expect("registered");
        let range = io.lba * BS..io.lba * BS + io.len;
        let k = self.keys;
        let exp_datasn = if io.write {
            model[range].copy_from_slice(&bytes);
            // An RDMA Read stands for each R2T, MaxBurstLength at most.
            (io.len - io.unsolicited).div_ceil(k.max_burst as usize) as u32
        } else {
            assert!(bytes == model[range], "READ data differs: {io:?}");
            data_in_pdus(io.len, k.initiator_recv, k.max_burst)
        };
        // RFC 7143 11.4: the R2Ts and Data-Ins the iSCSI layer would have
        // sent, though RDMA moved the data (RFC 7145).
        assert_eq!(r.bhs.exp_datasn(), exp_datasn, "ExpDataSN of {io:?}");
    }

    /// Whether anything moved on the wire or in the device.
    fn pump(&mut self) -> bool {
        let queued = !self.sq.is_empty();
        self.wire();
        self.run_device() > 0 || queued
    }

    /// Runs until nothing moves, completing RDMA Reads oldest first.
    fn settle(&mut self) {
        for _ in 0..1_000_000 {
            if !self.reads.is_empty() {
                self.complete_read(0);
            } else if !self.pump() && self.dev.in_flight() == 0 {
                return;
            }
        }
        panic!("the target stopped making progress");
    }

    fn no_trouble(&self) {
        assert_eq!(self.closed, None);
        assert!(!self.conn.is_closing());
        assert_eq!(self.conn.rdma_buffers_held(), 0);
    }
}

/// Writes `data` at `lba`, all solicited, and waits for it.
fn fill(s: &mut Sim, model: &mut [u8], lba: usize, data: Vec<u8>) {
    let io = s.write(lba, data, 0, 0);
    s.settle();
    s.finish(&io, model);
}

/// Reads `blocks` at `lba` back and compares them with `model`.
fn check(s: &mut Sim, model: &mut [u8], lba: usize, blocks: usize) {
    let io = s.read(lba, blocks);
    s.settle();
    s.finish(&io, model);
}

#[test]
fn login_answers_the_iser_keys_and_the_limits_hold() {
    let mut s = Sim::new(LINUX);
    // RFC 7145 6.3: MaxRecvDataSegmentLength gives way to the iSER keys.
    let text = LINUX.text().replace("=None ", "=CRC32C,None ");
    let r = s.login(&(text + " MaxRecvDataSegmentLength=262144"));
    assert_eq!(r.bhs.login_status(), (0, 0));
    assert!(r.bhs.flags() & flags::TRANSIT != 0 && r.bhs.login_nsg() == 3);
    let a = |key: &str| answer(&r, key);
    assert_eq!(a("RDMAExtensions"), "Yes");
    // The engine's receive buffers hold 8 KiB of data.
    assert_eq!(a("TargetRecvDataSegmentLength"), "8192");
    assert_eq!(a("InitiatorRecvDataSegmentLength"), "65536");
    assert_eq!(a("MaxRecvDataSegmentLength"), "");
    assert_eq!(a("HeaderDigest") + &a("DataDigest"), "NoneNone");
    let p = s.conn.params();
    assert!(p.transport == Transport::Iser && !p.header_digest && !p.data_digest);
    assert_eq!(p.max_recv_data_segment_length, 8192);
    assert_eq!(p.max_xmit_data_segment_length, 65536);
    assert!(s.conn.is_full_feature() && s.logged_in);

    let nop = |s: &mut Sim, n: usize| {
        let mut p = Pdu::new(opcode::NOP_OUT);
        p.bhs.set_immediate(true);
        p.bhs.set_flags(flags::FINAL);
        p.bhs.set_itt(0x77);
        p.bhs.set_ttt(RESERVED_TAG);
        p.bhs.set_u32_at(24, s.cmdsn);
        p.data = vec![0xa5; n];
        s.send(RdmaTags::default(), &p);
        s.wire();
    };
    // A ping of TargetRecvDataSegmentLength comes back whole...
    nop(&mut s, RECV_DATA_MAX);
    let echo = s.take(opcode::NOP_IN, 0x77).expect("NOP-In");
    assert_eq!(echo.data, vec![0xa5; RECV_DATA_MAX]);
    // ...one word more does not fit a receive buffer: the connection ends.
    nop(&mut s, RECV_DATA_MAX + 4);
    assert!(s.closed.as_deref().unwrap_or("").contains("malformed"));
    assert!(s.rx.is_empty());
}

#[test]
fn login_without_rdma_extensions_on_an_iser_connection() {
    // The code's choice: the connection's transport decides, not the key.
    // Without RDMAExtensions (default No, RFC 7145 6.3) the login still
    // succeeds and the iSER segment lengths keep their default of 8192;
    // an explicit No is answered No and changes nothing.
    for offer in ["", "No"] {
        let mut s = Sim::new(LINUX);
        let keep = |kv: &&str| !kv.contains("RDMA") && !kv.contains("RecvDataSegment");
        let mut text: Vec<String> = LINUX
            .text()
            .split(' ')
            .filter(keep)
            .map(Into::into)
            .collect();
        if !offer.is_empty() {
            text.push(format!("RDMAExtensions={offer}"));
        }
        let r = s.login(&text.join(" "));
        assert_eq!(r.bhs.login_status(), (0, 0), "{offer:?}");
        assert_eq!(answer(&r, "RDMAExtensions"), offer);
        assert_eq!(answer(&r, "MaxRecvDataSegmentLength"), "", "not on iSER");
        let p = s.conn.params();
        assert_eq!(p.transport, Transport::Iser);
        assert_eq!(p.max_recv_data_segment_length, 8192);
        assert_eq!(p.max_xmit_data_segment_length, 8192);
        // The data path follows: ExpDataSN counts 8 KiB Data-Ins.
        s.keys.initiator_recv = 8192;
        let itt = s.command(&[0; 6], 0, flags::FINAL, &[], RdmaTags::default());
        s.settle();
        s.response(itt);
        check(&mut s, &mut vec![0u8; LUN_BYTES], 8, 128);
        s.no_trouble();
    }
}

#[test]
fn reads_of_random_sizes_return_what_was_written() {
    let mut rng = Rng(0x5eed_0001);
    let mut s = Sim::ready(LINUX);
    let mut model = vec![0u8; LUN_BYTES];
    for lba in (0..LUN_BLOCKS).step_by(MAX_IO / BS) {
        fill(&mut s, &mut model, lba, rng.bytes(MAX_IO));
    }
    for blocks in [1, 16384, 128, 129, 512, 513] {
        let lba = rng.below(LUN_BLOCKS - blocks);
        check(&mut s, &mut model, lba, blocks);
    }
    for _ in 0..30 {
        let blocks = rng.blocks();
        let lba = rng.below(LUN_BLOCKS - blocks + 1);
        check(&mut s, &mut model, lba, blocks);
    }
    s.no_trouble();
}

#[test]
fn writes_with_all_data_solicited() {
    let mut rng = Rng(0x5eed_0002);
    // One RDMA Read at a time, a burst each: the read VA walks the buffer
    // from the write VA, which names byte 0.
    let (immediate, initial_r2t, max_burst, max_r2t) = (false, true, 65536, 1);
    let keys = Keys {
        immediate,
        initial_r2t,
        max_burst,
        max_r2t,
        ..LINUX
    };
    let mut s = Sim::ready(keys);
    let mut model = vec![0u8; LUN_BYTES];
    let io = s.write(100, rng.bytes(MAX_IO / 8 + BS), 0, 0);
    let (base, mut done) = (s.mem[&io.stag].0, 0);
    while let Some(&r) = s.reads.first() {
        assert_eq!((r.offset as usize, r.va), (done, base + done as u64));
        done += r.len as usize;
        s.complete_read(0);
    }
    s.settle();
    s.finish(&io, &mut model);
    check(&mut s, &mut model, 100, io.len / BS);

    // Four bursts posted at once, completed last first.
    let mut s = Sim::ready(Keys { max_r2t: 4, ..keys });
    let mut model = vec![0u8; LUN_BYTES];
    let io = s.write(7, rng.bytes(4 * 65536), 0, 0);
    assert_eq!(s.reads.len(), 4);
    while let Some(i) = s.reads.len().checked_sub(1) {
        s.complete_read(i);
    }
    s.settle();
    s.finish(&io, &mut model);
    check(&mut s, &mut model, 0, 1024);
    s.no_trouble();
}

#[test]
fn writes_with_immediate_and_unsolicited_data_around_first_burst_length() {
    let mut rng = Rng(0x5eed_0004);
    let mut s = Sim::ready(LINUX);
    let mut model = vec![0u8; LUN_BYTES];
    let mut lba = 0;
    // Immediate data alone: nothing is left to fetch.
    for len in [BS, 4096, RECV_DATA_MAX] {
        let io = s.write(lba, rng.bytes(len), len, len);
        assert!(s.reads.is_empty());
        s.settle();
        s.finish(&io, &mut model);
        lba += len / BS;
    }
    // Immediate data then Data-Out, or Data-Out alone, up to
    // FirstBurstLength; RDMA Read for the rest, from the write VA.
    let fb = FIRST_BURST;
    let sizes = [
        RECV_DATA_MAX + BS,
        fb - BS,
        fb,
        fb + BS,
        fb + 4 * 65536 + BS,
        MAX_IO,
    ];
    for (i, len) in sizes.into_iter().enumerate() {
        let imm = [RECV_DATA_MAX, 0][i % 2];
        let io = s.write(lba, rng.bytes(len), imm, len.min(fb));
        let base = s.mem[&io.stag].0;
        match s.reads.first() {
            Some(r) => assert_eq!((r.offset as usize, r.va), (fb, base + fb as u64)),
            None => assert!(len <= fb, "no RDMA Read for {len} bytes"),
        }
        s.settle();
        s.finish(&io, &mut model);
        lba += len / BS + 1;
    }
    check(&mut s, &mut model, 0, lba);
    s.no_trouble();
}

#[test]
fn abort_task_while_its_rdma_reads_are_outstanding() {
    let mut rng = Rng(0x5eed_0005);
    let max_burst = 65536;
    let mut s = Sim::ready(Keys { max_burst, ..LINUX });
    let mut model = vec![0u8; LUN_BYTES];
    fill(&mut s, &mut model, 0, rng.bytes(1 << 20));
    let old = s.write(64, rng.bytes(4 * 65536), 0, 0);
    assert_eq!(s.reads.len(), 4);
    s.complete_read(1);
    assert_eq!(s.abort_task(&old), tmf::RESP_COMPLETE);
    assert_eq!(s.conn.tasks_in_flight(), 0, "the task is gone");
    assert_eq!(s.conn.rdma_buffers_held(), 1, "its buffer is not");

    // The initiator may reuse the ITT now: the reads still posted are the
    // old task's, and the new buffer must be another.
    s.itt = old.itt - 1;
    let new = s.write(600, rng.bytes(4 * 65536), 0, 0);
    assert_eq!((new.itt, s.reads.len()), (old.itt, 7));
    while let Some(i) = s.reads.iter().position(|r| r.stag == old.stag) {
        s.complete_read(i);
    }
    assert_eq!(s.conn.rdma_buffers_held(), 0, "let go after the last read");
    s.settle();
    s.finish(&new, &mut model);
    assert!(s.rx.is_empty(), "for the aborted command: {:?}", s.rx);
    check(&mut s, &mut model, 0, 2048);
    s.no_trouble();
}

#[test]
fn a_read_or_write_without_its_stag_fails_only_the_command() {
    let mut s = Sim::ready(LINUX);
    let fl = flags::FINAL | flags::READ;
    let itt = s.command(&rw10(0x28, 0, 8), 8 * BS, fl, &[], RdmaTags::default());
    s.settle();
    let r = s.response(itt);
    assert_eq!(
        (r.bhs.0[3], r.data[2 + 2] & 0x0f),
        (2, 0x0b),
        "ABORTED COMMAND"
    );
    assert_eq!(r.bhs.exp_datasn(), 0);
    // A write whose solicited data has no write STag to come from.
    let fl = flags::FINAL | flags::WRITE;
    let itt = s.command(&rw10(0x2a, 0, 16), 16 * BS, fl, &[], RdmaTags::default());
    s.settle();
    assert_eq!(s.response(itt).bhs.0[3], 2);
    check(&mut s, &mut vec![0u8; LUN_BYTES], 0, 16);
    s.no_trouble();
}

#[test]
fn a_failed_rdma_read_ends_the_connection() {
    let mut rng = Rng(0x5eed_0006);
    let mut s = Sim::ready(LINUX);
    let io = s.write(0, rng.bytes(1 << 20), 0, 0);
    assert_eq!(s.reads.len(), 4);
    // The initiator dropped its registration: a remote access error.
    s.mem.remove(&io.stag);
    s.complete_read(2);
    assert!(s.conn.is_closing());
    assert!(s.closed.as_deref().unwrap_or("").contains("RDMA Read"));
    s.settle();
    // Nothing more goes out, and nothing more is taken in.
    s.read(0, 8);
    s.settle();
    assert!(s.rx.is_empty() && s.reads.is_empty());
}

/// One turn of the target's loop, picked at random: the completion queue
/// hands back the reads of different tasks in any order.
fn step(s: &mut Sim, rng: &mut Rng, live: &mut Vec<Io>, model: &mut [u8]) {
    match rng.below(3) {
        0 if !s.reads.is_empty() => s.complete_read(rng.below(s.reads.len())),
        1 => {
            s.run_device();
        }
        _ => s.wire(),
    }
    let done: Vec<u32> = s.rx.iter().map(|p| p.bhs.itt()).collect();
    for itt in done {
        let i = live.iter().position(|io| io.itt == itt);
        s.finish(&live.swap_remove(i.expect("a live ITT")), model);
    }
}

/// Commands in flight never overlap, so the model holds whatever order
/// the LUN runs them in.
#[test]
fn a_seeded_mix_of_200_commands_matches_a_model() {
    let mut rng = Rng(0x5eed_0007);
    let mut s = Sim::ready(LINUX);
    let mut model = vec![0u8; LUN_BYTES];
    let mut live: Vec<Io> = Vec::new();
    let (mut aborts, mut waiting) = (0, 0);
    for _ in 0..200 {
        let blocks = rng.blocks();
        let lba = rng.below(LUN_BLOCKS - blocks + 1);
        let apart = |io: &Io| lba >= io.lba + io.len / BS || io.lba >= lba + blocks;
        for n in 0.. {
            if live.len() < 16 && live.iter().all(apart) {
                break;
            }
            assert!(n < 1_000_000, "stuck with {live:?}");
            step(&mut s, &mut rng, &mut live, &mut model);
        }
        let len = blocks * BS;
        let (imm, fb) = (len.min(RECV_DATA_MAX), len.min(FIRST_BURST));
        let io = match rng.below(9) {
            0..=3 => s.read(lba, blocks),
            4 => s.write(lba, rng.bytes(len), 0, 0),
            5 => s.write(lba, rng.bytes(len), imm, imm),
            6 => s.write(lba, rng.bytes(len), imm, fb),
            _ => s.write(lba, rng.bytes(len), 0, fb),
        };
        live.push(io);
        for _ in 0..rng.below(8) {
            step(&mut s, &mut rng, &mut live, &mut model);
        }
        waiting += s.reads.len().saturating_sub(1);
        // Now and then ABORT TASK a write while reads are posted for it:
        // it never ran, so the model keeps the old data.
        let posted = |io: &Io| io.write && s.reads.iter().any(|r| r.stag == io.stag);
        if let Some(i) = live.iter().position(posted).filter(|_| rng.below(12) == 0) {
            let io = live.swap_remove(i);
            assert_eq!(s.abort_task(&io), tmf::RESP_COMPLETE);
            assert!(s.conn.rdma_buffers_held() > 0);
            aborts += 1;
        }
    }
    for n in 0.. {
        if live.is_empty() && s.reads.is_empty() {
            break;
        }
        assert!(n < 1_000_000, "stuck with {live:?}");
        step(&mut s, &mut rng, &mut live, &mut model);
    }
    assert!(
        aborts >= 3 && waiting >= 50,
        "{aborts} aborts, {waiting} waiting"
    );
    s.mem.clear();
    for lba in (0..LUN_BLOCKS).step_by(MAX_IO / BS) {
        check(&mut s, &mut model, lba, MAX_IO / BS);
    }
    assert_eq!(s.conn.tasks_in_flight(), 0);
    s.no_trouble();
}

/// Solicited data moves on iSER by RDMA Read only: the initiator sends no
/// R2T-answering Data-Out (RFC 7145). A Data-Out naming the TTT of a
/// posted RDMA Read must not be taken as that read's data (the command
/// would run and its buffer be let go while the read may still write into
/// it; TTTs count up from 1, so an initiator need not see one to hit one):
/// it is rejected as a protocol error and the task waits for its read.
#[test]
fn a_data_out_naming_a_posted_reads_ttt_is_not_its_data() {
    let mut rng = Rng(0x5eed_0008);
    let max_r2t = 1;
    let mut s = Sim::ready(Keys { max_r2t, ..LINUX });
    let io = s.write(0, rng.bytes(65536), 0, 0);
    let r = s.reads[0];
    let (off, len) = (r.offset as usize, r.len as usize);
    for (datasn, at) in (off..off + len).step_by(RECV_DATA_MAX).enumerate() {
        let last = at + RECV_DATA_MAX == off + len;
        s.data_out(io.itt, r.ttt, datasn, at, &[0; RECV_DATA_MAX], last);
    }
    assert_eq!(s.closed, None);
    while s.pump() {}
    let answered = s.take(opcode::SCSI_RESP, io.itt).is_some();
    assert!(!answered || s.conn.is_closing(), "done under a posted read");
    let rejected = s.take(opcode::REJECT, RESERVED_TAG);
    assert!(rejected.is_some_and(|p| p.bhs.0[2] == reject::PROTOCOL_ERROR));
    s.complete_read(0);
}
