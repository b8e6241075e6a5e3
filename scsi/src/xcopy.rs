//! The copy manager of a target: EXTENDED COPY (LID1) and RECEIVE COPY
//! RESULTS (SPC-4 5.17, 6.4, 6.18), block to block between the LUNs of one
//! `Target`.
//!
//! `Lun::submit` runs its usual checks on both commands (unit attention,
//! reservation conflict on the LUN that received them, opcode support) and
//! hands them to the `Target`, which gives them to the `CopyManager` here:
//! a copy spans LUNs, so its state lives at the target level.
//!
//! The manager validates the whole parameter list before it moves any
//! data. A copy then runs one segment after the other, in chunks of at
//! most `CHUNK_BYTES`: a READ(16) on the source LUN, then a WRITE(16) of
//! the same buffer on the destination LUN, both through
//! `Lun::submit_copy_io`. They take the path of any other read or write
//! (LBA range locks, the asynchronous backstore, write protection) and the
//! reservation checks of the I_T nexus that sent the EXTENDED COPY, and
//! come back from `Lun::poll` under `COPY_NEXUS`; `Target::poll` hands
//! those to `divert`. A copy has one operation in flight and one buffer,
//! so memory is bounded by `MAX_CONCURRENT_COPIES * CHUNK_BYTES`.
//!
//! Supported: CSCD descriptors of type E4h (identification descriptor)
//! naming a LUN of this target by its NAA designator (VPD page 83h), and
//! segment descriptors of type 02h (block device to block device, with
//! DC). No inline or held data (RECEIVE DATA), no stream devices, no
//! LID4 / ROD tokens.

use crate::be::{be16, be32, be64};
use crate::common::{CmdError, LunInfo, NexusId, ScsiCompletion, ScsiTask};
use crate::lun::{Lun, Origin, Stamp};
use crate::sense::{FieldPointer, Sense, SenseKey};
use crate::status;
use mempool::DataBuf;
use std::collections::VecDeque;

pub(crate) const EXTENDED_COPY: u8 = 0x83;
pub(crate) const RECEIVE_COPY_RESULTS: u8 = 0x84;

/// The I_T nexus that the copy manager's own reads and writes carry, so
/// their completions can be told apart from the initiators' commands.
pub(crate) const COPY_NEXUS: NexusId = NexusId::MAX;

// RECEIVE COPY RESULTS service actions (LID1).
const COPY_STATUS: u8 = 0x00;
const OPERATING_PARAMETERS: u8 = 0x03;
const FAILED_SEGMENT_DETAILS: u8 = 0x04;

// Descriptor type codes.
const SEG_BLOCK_TO_BLOCK: u8 = 0x02;
const CSCD_IDENTIFICATION: u8 = 0xe4;

const HEADER_LEN: usize = 16;
const CSCD_LEN: usize = 32;
const SEG_B2B_LEN: usize = 28;

// LIST ID USAGE (parameter list header byte 1, bits 4-3).
const USAGE_HOLD: u8 = 0b00;
const USAGE_RESERVED: u8 = 0b01;
const USAGE_NO_LIST_ID: u8 = 0b11;

/// MAXIMUM CSCD DESCRIPTOR COUNT.
pub(crate) const MAX_CSCD_DESCRIPTORS: usize = 8;
/// MAXIMUM SEGMENT DESCRIPTOR COUNT.
pub(crate) const MAX_SEGMENT_DESCRIPTORS: usize = 16;
/// MAXIMUM DESCRIPTOR LIST LENGTH: room for the most descriptors of each
/// kind we accept, and no more.
pub(crate) const MAX_DESCRIPTOR_LIST_LENGTH: usize =
    MAX_CSCD_DESCRIPTORS * CSCD_LEN + MAX_SEGMENT_DESCRIPTORS * SEG_B2B_LEN;
/// MAXIMUM SEGMENT LENGTH in bytes. With 16 segments one EXTENDED COPY
/// moves at most 2 GiB.
pub(crate) const MAX_SEGMENT_LENGTH: u64 = 128 << 20;
/// Copies running at once on a target (TOTAL CONCURRENT COPIES, and
/// MAXIMUM IDENTIFIED CONCURRENT COPIES).
pub(crate) const MAX_CONCURRENT_COPIES: usize = 16;
/// Held copy results (for RECEIVE COPY RESULTS) kept per target; the
/// oldest go first.
pub(crate) const MAX_HELD_RESULTS: usize = 64;
/// Largest read or write the copy manager makes, and its buffer size.
pub(crate) const CHUNK_BYTES: u64 = 1 << 20;
/// DATA SEGMENT GRANULARITY (log2 bytes): segments move whole blocks.
const DATA_SEGMENT_GRANULARITY_LOG2: u8 = 9;

pub(crate) fn is_copy_opcode(op: u8) -> bool {
    op == EXTENDED_COPY || op == RECEIVE_COPY_RESULTS
}

fn ptr(at: usize) -> u16 {
    at.min(u16::MAX as usize) as u16
}

/// INVALID FIELD IN PARAMETER LIST at byte `at` of the parameter list.
fn bad_param(at: usize, bit: Option<u8>) -> Sense {
    Sense::invalid_field_in_param(ptr(at), bit)
}

/// ILLEGAL REQUEST with `asc`/`ascq`, pointing at byte `at` of the
/// parameter list.
fn illegal(asc: u8, ascq: u8, at: usize) -> Sense {
    let mut s = Sense::new(SenseKey::IllegalRequest, asc, ascq);
    s.field_pointer = Some(FieldPointer {
        in_cdb: false,
        byte: ptr(at),
        bit: None,
    });
    s
}

/// COPY ABORTED with `asc`/`ascq` and a segment pointer (SD=0: relative
/// to the start of the parameter list) at byte `at`.
fn copy_aborted(asc: u8, ascq: u8, at: usize) -> Sense {
    let mut s = Sense::new(SenseKey::CopyAborted, asc, ascq);
    s.field_pointer = Some(FieldPointer {
        in_cdb: false,
        byte: ptr(at),
        bit: None,
    });
    s
}

/// COPY TARGET DEVICE NOT REACHABLE.
fn unreachable(at: usize) -> Sense {
    copy_aborted(0x0d, 0x02, at)
}

/// (key, asc, ascq) of encoded sense data, fixed or descriptor format.
fn parse_sense(s: &[u8]) -> (u8, u8, u8) {
    let g = |i: usize| s.get(i).copied().unwrap_or(0);
    match g(0) & 0x7f {
        0x72 | 0x73 => (g(1) & 0x0f, g(2), g(3)),
        _ => (g(2) & 0x0f, g(12), g(13)),
    }
}

/// A CSCD descriptor as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cscd {
    /// Offset of the descriptor in the parameter list.
    at: usize,
    peripheral_type: u8,
    /// The designator when it is a logical unit NAA designator of 16
    /// bytes, the only kind that names a LUN of ours.
    naa: Option<[u8; 16]>,
    /// DISK BLOCK LENGTH from the block device parameters.
    block_len: u32,
}

/// A block to block segment descriptor as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SegmentDesc {
    at: usize,
    /// DC: NUMBER OF BLOCKS counts destination blocks, not source blocks.
    dc: bool,
    src: u16,
    dst: u16,
    blocks: u16,
    src_lba: u64,
    dst_lba: u64,
}

#[derive(Debug)]
struct ParamList {
    list_id: u8,
    usage: u8,
    cscds: Vec<Cscd>,
    segments: Vec<SegmentDesc>,
}

/// Check the parameter list header and the descriptors' syntax. `p` is
/// what was received, at most PARAMETER LIST LENGTH bytes.
fn parse(p: &[u8]) -> Result<ParamList, Sense> {
    if p.len() < HEADER_LEN {
        return Err(Sense::param_list_length());
    }
    let list_id = p[0];
    let usage = (p[1] >> 3) & 0x03;
    if usage == USAGE_RESERVED {
        return Err(bad_param(1, Some(4)));
    }
    if usage == USAGE_NO_LIST_ID && list_id != 0 {
        return Err(bad_param(0, Some(7)));
    }
    let cl = be16(p, 2) as u64;
    let sl = be32(p, 8) as u64;
    let il = be32(p, 12) as u64;
    if cl + sl > MAX_DESCRIPTOR_LIST_LENGTH as u64 {
        return Err(Sense::param_list_length());
    }
    if HEADER_LEN as u64 + cl + sl + il > p.len() as u64 {
        return Err(Sense::param_list_length());
    }
    // MAXIMUM INLINE DATA LENGTH is zero: no segment type we take uses it.
    if il != 0 {
        return Err(bad_param(12, Some(7)));
    }
    let (cl, sl) = (cl as usize, sl as usize);

    let mut cscds = Vec::new();
    let end = HEADER_LEN + cl;
    let mut at = HEADER_LEN;
    while at < end {
        if cscds.len() == MAX_CSCD_DESCRIPTORS {
            // TOO MANY TARGET DESCRIPTORS
            return Err(illegal(0x26, 0x06, at));
        }
        if p[at] != CSCD_IDENTIFICATION {
            // UNSUPPORTED TARGET DESCRIPTOR TYPE CODE
            return Err(illegal(0x26, 0x07, at));
        }
        if end - at < CSCD_LEN {
            return Err(bad_param(2, None));
        }
        let d = &p[at..at + CSCD_LEN];
        // Byte 1: LU ID TYPE and NUL do not apply to an identification
        // descriptor (SPC-4), only the peripheral device type does.
        // Bytes 2-3 (relative initiator port) name no port we would use.
        let code_set = d[4] & 0x0f;
        let association = (d[5] >> 4) & 0x03;
        let designator_type = d[5] & 0x0f;
        let len = d[7] as usize;
        if len > 16 {
            return Err(bad_param(at + 7, None));
        }
        let naa =
            (code_set == 1 && association == 0 && designator_type == 3 && len == 16).then(|| {
                let mut n = [0u8; 16];
                n.copy_from_slice(&d[8..24]);
                n
            });
        cscds.push(Cscd {
            at,
            peripheral_type: d[1] & 0x1f,
            naa,
            block_len: u32::from_be_bytes([0, d[29], d[30], d[31]]),
        });
        at += CSCD_LEN;
    }

    let mut segments = Vec::new();
    let end = HEADER_LEN + cl + sl;
    let mut at = HEADER_LEN + cl;
    while at < end {
        if segments.len() == MAX_SEGMENT_DESCRIPTORS {
            // TOO MANY SEGMENT DESCRIPTORS
            return Err(illegal(0x26, 0x08, at));
        }
        if end - at < 4 {
            return Err(bad_param(8, None));
        }
        if p[at] != SEG_BLOCK_TO_BLOCK {
            // UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE
            return Err(illegal(0x26, 0x09, at));
        }
        if be16(p, at + 2) as usize != SEG_B2B_LEN - 4 {
            return Err(bad_param(at + 2, None));
        }
        if end - at < SEG_B2B_LEN {
            return Err(bad_param(8, None));
        }
        let d = &p[at..at + SEG_B2B_LEN];
        segments.push(SegmentDesc {
            at,
            dc: d[1] & 0x02 != 0,
            src: be16(d, 4),
            dst: be16(d, 6),
            blocks: be16(d, 10),
            src_lba: be64(d, 12),
            dst_lba: be64(d, 20),
        });
        at += SEG_B2B_LEN;
    }
    Ok(ParamList {
        list_id,
        usage,
        cscds,
        segments,
    })
}

/// One segment, resolved to LUNs and byte counts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    /// Offset of the segment descriptor in the parameter list.
    at: usize,
    src_lun: u64,
    dst_lun: u64,
    src_bs: u64,
    dst_bs: u64,
    src_lba: u64,
    dst_lba: u64,
    bytes: u64,
    /// Bytes per read and write: a multiple of both block sizes.
    chunk: u64,
    /// Source and destination overlap with the destination higher up:
    /// copy from the end so no source block is overwritten before it is
    /// read.
    backward: bool,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The LUN a segment's CSCD index names. `at` points at the index.
fn endpoint<'a>(
    list: &ParamList,
    luns: &[&'a LunInfo],
    index: u16,
    at: usize,
) -> Result<&'a LunInfo, Sense> {
    let Some(c) = list.cscds.get(index as usize) else {
        return Err(unreachable(at));
    };
    if c.peripheral_type != 0 {
        return Err(bad_param(c.at + 1, Some(4)));
    }
    let Some(info) = c
        .naa
        .and_then(|n| luns.iter().copied().find(|l| l.naa == n))
    else {
        return Err(unreachable(c.at + 4));
    };
    if c.block_len != info.block_size {
        return Err(bad_param(c.at + 29, None));
    }
    Ok(info)
}

/// Resolve every segment against the target's LUNs, so that nothing is
/// moved for a list that would fail part way.
fn plan(list: &ParamList, luns: &[&LunInfo]) -> Result<Vec<Job>, Sense> {
    let mut jobs = Vec::with_capacity(list.segments.len());
    for s in &list.segments {
        let src = endpoint(list, luns, s.src, s.at + 4)?;
        let dst = endpoint(list, luns, s.dst, s.at + 6)?;
        let (src_bs, dst_bs) = (src.block_size as u64, dst.block_size as u64);
        if src_bs == 0 || dst_bs == 0 {
            return Err(copy_aborted(0x00, 0x00, s.at));
        }
        let bytes = s.blocks as u64 * if s.dc { dst_bs } else { src_bs };
        if !bytes.is_multiple_of(src_bs)
            || !bytes.is_multiple_of(dst_bs)
            || bytes > MAX_SEGMENT_LENGTH
        {
            return Err(bad_param(s.at + 10, None));
        }
        let in_range =
            |lba: u64, bs: u64, n: u64| lba.checked_add(bytes / bs).is_some_and(|e| e <= n);
        if !in_range(s.src_lba, src_bs, src.num_blocks) {
            return Err(copy_aborted(0x00, 0x00, s.at + 12));
        }
        if !in_range(s.dst_lba, dst_bs, dst.num_blocks) {
            return Err(copy_aborted(0x00, 0x00, s.at + 20));
        }
        let lcm = src_bs / gcd(src_bs, dst_bs) * dst_bs;
        let cap = CHUNK_BYTES
            .min(src.max_transfer_blocks as u64 * src_bs)
            .min(dst.max_transfer_blocks as u64 * dst_bs);
        let chunk = (cap / lcm * lcm).max(lcm);
        let (s0, d0) = (s.src_lba * src_bs, s.dst_lba * dst_bs);
        let backward = src.lun == dst.lun && d0 > s0 && d0 < s0 + bytes;
        jobs.push(Job {
            at: s.at,
            src_lun: src.lun,
            dst_lun: dst.lun,
            src_bs,
            dst_bs,
            src_lba: s.src_lba,
            dst_lba: s.dst_lba,
            bytes,
            chunk,
            backward,
        });
    }
    Ok(jobs)
}

/// The operation a copy has in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    lun: u64,
    write: bool,
    /// Byte offset within the segment, and length.
    at: u64,
    len: u64,
}

/// A running EXTENDED COPY.
struct Copy {
    /// Tag of the copy's reads and writes; never reused.
    id: u64,
    /// The LUN that received the command, and the command itself.
    lun: u64,
    tag: u64,
    nexus: NexusId,
    stamp: Stamp,
    list_id: u8,
    usage: u8,
    data_out_len: u32,
    data_out: DataBuf,
    data_in: DataBuf,
    jobs: Vec<Job>,
    /// Segments finished, and bytes finished of the current one.
    seg: usize,
    done: u64,
    moved: u64,
    io: Option<InFlight>,
    buf: DataBuf,
    /// Aborted (task management, nexus loss, reset): wait for the
    /// operation in flight, then go without a completion.
    aborted: bool,
}

enum Action {
    Io {
        lun: u64,
        write: bool,
        lba: u64,
        nlb: u32,
        buf: DataBuf,
    },
    Finish(Result<(), CmdError>),
}

impl Copy {
    /// The next step, given the completion of the operation in flight
    /// (`None` to start).
    fn next(&mut self, done: Option<ScsiCompletion>) -> Action {
        if let Some(c) = done {
            let Some(io) = self.io.take() else {
                return Action::Finish(Err(Sense::internal_failure().into()));
            };
            let at = self.jobs.get(self.seg).map_or(0, |j| j.at);
            match c.status {
                status::GOOD => {}
                status::RESERVATION_CONFLICT => {
                    return Action::Finish(Err(CmdError::ReservationConflict))
                }
                status::BUSY => return Action::Finish(Err(CmdError::Busy)),
                status::TASK_SET_FULL => return Action::Finish(Err(CmdError::TaskSetFull)),
                _ => {
                    // The copy target's error, as COPY ABORTED pointing at
                    // the segment being processed.
                    let (_, asc, ascq) = parse_sense(&c.sense);
                    return Action::Finish(Err(copy_aborted(asc, ascq, at).into()));
                }
            }
            if io.write {
                self.buf = c.data_out;
                self.done += io.len;
                self.moved += io.len;
            } else {
                let Some(job) = self.jobs.get(self.seg) else {
                    return Action::Finish(Err(Sense::internal_failure().into()));
                };
                if c.data_in.len() as u64 != io.len {
                    return Action::Finish(Err(copy_aborted(0x00, 0x00, at).into()));
                }
                self.io = Some(InFlight {
                    lun: job.dst_lun,
                    write: true,
                    ..io
                });
                return Action::Io {
                    lun: job.dst_lun,
                    write: true,
                    lba: job.dst_lba + io.at / job.dst_bs,
                    nlb: (io.len / job.dst_bs) as u32,
                    buf: c.data_in,
                };
            }
        }
        while let Some(job) = self.jobs.get(self.seg) {
            if self.done >= job.bytes {
                self.seg += 1;
                self.done = 0;
                continue;
            }
            let len = (job.bytes - self.done).min(job.chunk);
            let at = if job.backward {
                job.bytes - self.done - len
            } else {
                self.done
            };
            self.io = Some(InFlight {
                lun: job.src_lun,
                write: false,
                at,
                len,
            });
            return Action::Io {
                lun: job.src_lun,
                write: false,
                lba: job.src_lba + at / job.src_bs,
                nlb: (len / job.src_bs) as u32,
                buf: std::mem::take(&mut self.buf),
            };
        }
        Action::Finish(Ok(()))
    }
}

/// Results of a finished EXTENDED COPY with LIST ID USAGE 00b, for
/// RECEIVE COPY RESULTS.
#[derive(Debug, Clone)]
struct Held {
    nexus: NexusId,
    list_id: u8,
    status: u8,
    sense: Option<Sense>,
    segments: u16,
    bytes: u64,
}

fn status_of(r: &Result<(), CmdError>) -> (u8, Option<Sense>) {
    match r {
        Ok(()) => (status::GOOD, None),
        Err(CmdError::Check(s)) => (status::CHECK_CONDITION, Some(*s)),
        Err(CmdError::ReservationConflict) => (status::RESERVATION_CONFLICT, None),
        Err(CmdError::Busy) => (status::BUSY, None),
        Err(CmdError::TaskSetFull) => (status::TASK_SET_FULL, None),
    }
}

fn lun_mut(luns: &mut [Lun], id: u64) -> Option<&mut Lun> {
    luns.iter_mut().find(|l| l.info().lun == id)
}

/// The copy manager of one target.
#[derive(Default)]
pub(crate) struct CopyManager {
    copies: Vec<Copy>,
    held: VecDeque<Held>,
    next_id: u64,
}

impl CopyManager {
    /// Run EXTENDED COPY or RECEIVE COPY RESULTS received on LUN `lun`,
    /// which has already checked unit attentions and reservations. The
    /// answer comes through that LUN's `poll`.
    pub(crate) fn submit(&mut self, lun: u64, task: ScsiTask, stamp: Stamp, luns: &mut [Lun]) {
        if task.cdb.first() == Some(&EXTENDED_COPY) {
            self.extended_copy(lun, task, stamp, luns)
        } else {
            self.receive_copy_results(lun, task, stamp, luns)
        }
    }

    fn extended_copy(&mut self, lun: u64, task: ScsiTask, stamp: Stamp, luns: &mut [Lun]) {
        let ScsiTask {
            tag,
            nexus,
            cdb,
            data_out,
            mut data_in,
            ..
        } = task;
        data_in.clear();
        let origin = Origin {
            tag,
            nexus,
            stamp: Some(stamp),
        };
        let dol = if cdb.len() >= 16 { be32(&cdb, 10) } else { 0 };
        let prepared = self.prepare(nexus, &cdb, &data_out, luns);
        let (list_id, usage, jobs) = match prepared {
            Ok(Some(p)) => p,
            Ok(None) => {
                if let Some(l) = lun_mut(luns, lun) {
                    l.finish(origin, Ok(status::GOOD), data_in, data_out, dol);
                }
                return;
            }
            Err((e, hold)) => {
                if let Some(list_id) = hold {
                    let (status, sense) = status_of(&Err(e.clone()));
                    self.hold(Held {
                        nexus,
                        list_id,
                        status,
                        sense,
                        segments: 0,
                        bytes: 0,
                    });
                }
                if let Some(l) = lun_mut(luns, lun) {
                    l.finish(origin, Err(e), data_in, data_out, dol);
                }
                return;
            }
        };
        self.next_id += 1;
        self.copies.push(Copy {
            id: self.next_id,
            lun,
            tag,
            nexus,
            stamp,
            list_id,
            usage,
            data_out_len: dol,
            data_out,
            data_in,
            jobs,
            seg: 0,
            done: 0,
            moved: 0,
            io: None,
            buf: DataBuf::new(),
            aborted: false,
        });
        self.step(self.copies.len() - 1, None, luns);
    }

    /// Validate an EXTENDED COPY. `Ok(None)`: nothing to do (no parameter
    /// list). An error carries the list identifier when its results are
    /// to be held.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        nexus: NexusId,
        cdb: &[u8],
        data_out: &[u8],
        luns: &[Lun],
    ) -> Result<Option<(u8, u8, Vec<Job>)>, (CmdError, Option<u8>)> {
        if cdb.len() < 16 {
            return Err((Sense::invalid_field_in_cdb(0, None).into(), None));
        }
        // Service action 00h is EXTENDED COPY (LID1); LID4 and the ROD
        // token commands are not offered.
        if cdb[1] & 0x1f != 0 {
            return Err((Sense::invalid_field_in_cdb(1, Some(4)).into(), None));
        }
        let plen = be32(cdb, 10) as usize;
        if plen == 0 {
            return Ok(None);
        }
        let p = &data_out[..plen.min(data_out.len())];
        let list = parse(p).map_err(|s| (s.into(), None))?;
        if list.usage != USAGE_NO_LIST_ID
            && self.copies.iter().any(|c| {
                !c.aborted
                    && c.nexus == nexus
                    && c.usage != USAGE_NO_LIST_ID
                    && c.list_id == list.list_id
            })
        {
            // OPERATION IN PROGRESS
            let s = Sense::new(SenseKey::IllegalRequest, 0x00, 0x16);
            return Err((s.into(), None));
        }
        if self.copies.len() >= MAX_CONCURRENT_COPIES {
            // INSUFFICIENT RESOURCES
            let s = Sense::new(SenseKey::IllegalRequest, 0x55, 0x03);
            return Err((s.into(), None));
        }
        let hold = (list.usage == USAGE_HOLD).then_some(list.list_id);
        let infos: Vec<&LunInfo> = luns.iter().map(|l| l.info()).collect();
        let jobs = plan(&list, &infos).map_err(|s| (s.into(), hold))?;
        Ok(Some((list.list_id, list.usage, jobs)))
    }

    /// Advance copy `idx` with the completion of its operation in flight.
    fn step(&mut self, idx: usize, done: Option<ScsiCompletion>, luns: &mut [Lun]) {
        let Some(c) = self.copies.get_mut(idx) else {
            return;
        };
        match c.next(done) {
            Action::Io {
                lun,
                write,
                lba,
                nlb,
                buf,
            } => match lun_mut(luns, lun) {
                Some(l) => l.submit_copy_io(c.id, c.nexus, write, lba, nlb, buf),
                None => {
                    c.io = None;
                    let at = c.jobs.get(c.seg).map_or(0, |j| j.at);
                    self.finish(idx, Err(unreachable(at).into()), luns);
                }
            },
            Action::Finish(r) => self.finish(idx, r, luns),
        }
    }

    /// Copy `idx` is over: answer its EXTENDED COPY and hold its results.
    fn finish(&mut self, idx: usize, r: Result<(), CmdError>, luns: &mut [Lun]) {
        if idx >= self.copies.len() {
            return;
        }
        let c = self.copies.swap_remove(idx);
        if c.aborted {
            return;
        }
        if c.usage == USAGE_HOLD {
            let (status, sense) = status_of(&r);
            self.hold(Held {
                nexus: c.nexus,
                list_id: c.list_id,
                status,
                sense,
                segments: c.seg.min(u16::MAX as usize) as u16,
                bytes: c.moved,
            });
        }
        if let Some(l) = lun_mut(luns, c.lun) {
            let r = r.map(|()| status::GOOD);
            let origin = Origin {
                tag: c.tag,
                nexus: c.nexus,
                stamp: Some(c.stamp),
            };
            l.finish(origin, r, c.data_in, c.data_out, c.data_out_len);
        }
    }

    fn hold(&mut self, h: Held) {
        self.held
            .retain(|x| !(x.nexus == h.nexus && x.list_id == h.list_id));
        if self.held.len() >= MAX_HELD_RESULTS {
            self.held.pop_front();
        }
        self.held.push_back(h);
    }

    /// Take the copy manager's completions out of `out[from..]` (they
    /// carry `COPY_NEXUS`) and move the copies along: more reads and
    /// writes, or finished EXTENDED COPY commands on their LUN. Returns how
    /// many were taken; the caller polls again while it is not zero.
    pub(crate) fn divert(
        &mut self,
        out: &mut Vec<ScsiCompletion>,
        from: usize,
        luns: &mut [Lun],
    ) -> usize {
        if !out[from.min(out.len())..]
            .iter()
            .any(|c| c.nexus == COPY_NEXUS)
        {
            return 0;
        }
        let tail: Vec<ScsiCompletion> = out.drain(from.min(out.len())..).collect();
        let mut n = 0;
        for c in tail {
            if c.nexus != COPY_NEXUS {
                out.push(c);
                continue;
            }
            n += 1;
            let Some(idx) = self.copies.iter().position(|x| x.id == c.tag) else {
                continue;
            };
            if self.copies[idx].aborted {
                self.copies.swap_remove(idx);
                continue;
            }
            self.step(idx, Some(c), luns);
        }
        n
    }

    /// EXTENDED COPY commands running and not aborted.
    pub(crate) fn in_flight(&self) -> usize {
        self.copies.iter().filter(|c| !c.aborted).count()
    }

    /// Abort the copies `pred(lun, nexus, tag)` selects; returns how many.
    /// A copy with an operation in flight goes when that returns.
    pub(crate) fn abort_where(
        &mut self,
        pred: impl Fn(u64, NexusId, u64) -> bool,
        luns: &mut [Lun],
    ) -> usize {
        let mut n = 0;
        for c in self.copies.iter_mut() {
            if !c.aborted && pred(c.lun, c.nexus, c.tag) {
                c.aborted = true;
                n += 1;
                if let Some(l) = lun_mut(luns, c.lun) {
                    l.count_aborted_copy();
                }
            }
        }
        self.copies.retain(|c| !(c.aborted && c.io.is_none()));
        n
    }

    /// QUERY TASK: is this EXTENDED COPY still running?
    pub(crate) fn has_task(&self, lun: u64, nexus: NexusId, tag: u64) -> bool {
        self.copies
            .iter()
            .any(|c| !c.aborted && c.lun == lun && c.nexus == nexus && c.tag == tag)
    }

    /// The I_T nexus is gone: its copies are aborted, its results dropped.
    pub(crate) fn nexus_removed(&mut self, nexus: NexusId, luns: &mut [Lun]) {
        self.abort_where(|_, n, _| n == nexus, luns);
        self.held.retain(|h| h.nexus != nexus);
    }

    /// LUN `lun` was reset: copies it received are aborted with it, and
    /// reads or writes the copy manager had on it are gone (the reset
    /// aborted them), so copies waiting for one end with COPY ABORTED.
    pub(crate) fn lun_reset(&mut self, lun: u64, luns: &mut [Lun]) {
        self.abort_where(|l, _, _| l == lun, luns);
        let mut i = 0;
        while i < self.copies.len() {
            let c = &mut self.copies[i];
            if c.io.is_some_and(|io| io.lun == lun) {
                c.io = None;
                let at = c.jobs.get(c.seg).map_or(0, |j| j.at);
                // BUS DEVICE RESET FUNCTION OCCURRED on a copy target.
                self.finish(i, Err(copy_aborted(0x29, 0x03, at).into()), luns);
            } else {
                i += 1;
            }
        }
    }

    /// Every LUN was reset: every copy and its operations are gone.
    pub(crate) fn target_reset(&mut self, luns: &mut [Lun]) {
        self.abort_where(|_, _, _| true, luns);
        self.copies.clear();
    }

    fn receive_copy_results(&mut self, lun: u64, task: ScsiTask, stamp: Stamp, luns: &mut [Lun]) {
        let ScsiTask {
            tag,
            nexus,
            cdb,
            data_out,
            mut data_in,
            ..
        } = task;
        data_in.clear();
        let r = self.copy_results(nexus, &cdb, &mut data_in);
        if let Some(l) = lun_mut(luns, lun) {
            let r = r.map(|()| status::GOOD);
            let origin = Origin {
                tag,
                nexus,
                stamp: Some(stamp),
            };
            l.finish(origin, r, data_in, data_out, 0);
        }
    }

    fn copy_results(&self, nexus: NexusId, cdb: &[u8], out: &mut DataBuf) -> Result<(), CmdError> {
        if cdb.len() < 16 {
            return Err(Sense::invalid_field_in_cdb(0, None).into());
        }
        let sa = cdb[1] & 0x1f;
        let list_id = cdb[2];
        let alloc = be32(cdb, 10) as usize;
        let running = self.copies.iter().find(|c| {
            !c.aborted && c.nexus == nexus && c.usage == USAGE_HOLD && c.list_id == list_id
        });
        let held = self
            .held
            .iter()
            .find(|h| h.nexus == nexus && h.list_id == list_id);
        match sa {
            COPY_STATUS => {
                // COPY MANAGER STATUS: 00h in progress, 01h completed
                // without errors, 02h completed with errors.
                let (state, segments, bytes) = match (running, held) {
                    (Some(c), _) => (0x00, c.seg.min(u16::MAX as usize) as u16, c.moved),
                    (None, Some(h)) => (
                        if h.status == status::GOOD { 0x01 } else { 0x02 },
                        h.segments,
                        h.bytes,
                    ),
                    // No such list identifier for this I_T nexus.
                    (None, None) => return Err(Sense::invalid_field_in_cdb(2, None).into()),
                };
                // TRANSFER COUNT in bytes, or in coarser units (KiB, MiB,
                // ...) when that does not fit.
                let (mut units, mut count) = (0u8, bytes);
                while count > u32::MAX as u64 {
                    count >>= 10;
                    units += 1;
                }
                out.extend_from_slice(&8u32.to_be_bytes());
                out.push(state);
                out.extend_from_slice(&segments.to_be_bytes());
                out.push(units);
                out.extend_from_slice(&(count as u32).to_be_bytes());
            }
            OPERATING_PARAMETERS => operating_parameters(out),
            FAILED_SEGMENT_DETAILS => match (running, held) {
                (None, Some(h)) if h.status != status::GOOD => {
                    let mut sense = Vec::new();
                    if let Some(s) = h.sense {
                        s.encode(false, &mut sense);
                    }
                    out.resize(60, 0);
                    out[56] = h.status;
                    out[58..60].copy_from_slice(&(sense.len() as u16).to_be_bytes());
                    out.extend_from_slice(&sense);
                    let n = (out.len() - 4) as u32;
                    out[0..4].copy_from_slice(&n.to_be_bytes());
                }
                // Running, or completed without errors: nothing failed.
                (Some(_), _) | (None, Some(_)) => out.extend_from_slice(&[0; 4]),
                (None, None) => return Err(Sense::invalid_field_in_cdb(2, None).into()),
            },
            // RECEIVE DATA needs held data, which we never keep.
            _ => return Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
        }
        out.truncate(alloc);
        Ok(())
    }
}

/// RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 6.18.4): the limits
/// `parse` and `plan` enforce.
fn operating_parameters(out: &mut DataBuf) {
    let mut d = [0u8; 44];
    // SNLID: LIST ID USAGE 11b (no list identifier) is supported.
    d[4] = 0x01;
    d[8..10].copy_from_slice(&(MAX_CSCD_DESCRIPTORS as u16).to_be_bytes());
    d[10..12].copy_from_slice(&(MAX_SEGMENT_DESCRIPTORS as u16).to_be_bytes());
    d[12..16].copy_from_slice(&(MAX_DESCRIPTOR_LIST_LENGTH as u32).to_be_bytes());
    d[16..20].copy_from_slice(&(MAX_SEGMENT_LENGTH as u32).to_be_bytes());
    // MAXIMUM INLINE DATA LENGTH, HELD DATA LIMIT, MAXIMUM STREAM DEVICE
    // TRANSFER SIZE: zero.
    d[34..36].copy_from_slice(&(MAX_CONCURRENT_COPIES as u16).to_be_bytes());
    d[36] = MAX_CONCURRENT_COPIES as u8;
    d[37] = DATA_SEGMENT_GRANULARITY_LOG2;
    let implemented = [SEG_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION];
    d[43] = implemented.len() as u8;
    out.extend_from_slice(&d);
    out.extend_from_slice(&implemented);
    let n = (out.len() - 4) as u32;
    out[0..4].copy_from_slice(&n.to_be_bytes());
}

/// One third-party copy descriptor of VPD page 8Fh, padded to a multiple
/// of four bytes.
fn tpc_descriptor(out: &mut DataBuf, ty: u16, body: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(body);
    while !(out.len() - start).is_multiple_of(4) {
        out.push(0);
    }
    let len = (out.len() - start - 4) as u16;
    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// The descriptors of the Third-party Copy VPD page (8Fh, SPC-4 7.8.17),
/// after the page header, which the caller writes.
pub(crate) fn third_party_copy_vpd(out: &mut DataBuf) {
    // Supported Commands: EXTENDED COPY (LID1); RECEIVE COPY RESULTS with
    // COPY STATUS, OPERATING PARAMETERS, FAILED SEGMENT DETAILS.
    let list = [
        EXTENDED_COPY,
        1,
        0x00,
        RECEIVE_COPY_RESULTS,
        3,
        COPY_STATUS,
        OPERATING_PARAMETERS,
        FAILED_SEGMENT_DETAILS,
    ];
    let mut body = vec![list.len() as u8];
    body.extend_from_slice(&list);
    tpc_descriptor(out, 0x0001, &body);
    // Parameter Data.
    let mut body = [0u8; 28];
    body[4..6].copy_from_slice(&(MAX_CSCD_DESCRIPTORS as u16).to_be_bytes());
    body[6..8].copy_from_slice(&(MAX_SEGMENT_DESCRIPTORS as u16).to_be_bytes());
    body[8..12].copy_from_slice(&(MAX_DESCRIPTOR_LIST_LENGTH as u32).to_be_bytes());
    tpc_descriptor(out, 0x0004, &body);
    // Supported Descriptors.
    tpc_descriptor(out, 0x0008, &[2, SEG_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION]);
    // Supported CSCD Descriptor IDs: none.
    tpc_descriptor(out, 0x000c, &[0, 0]);
    // General Copy Operations.
    let mut body = [0u8; 32];
    body[0..4].copy_from_slice(&(MAX_CONCURRENT_COPIES as u32).to_be_bytes());
    body[4..8].copy_from_slice(&(MAX_CONCURRENT_COPIES as u32).to_be_bytes());
    body[8..12].copy_from_slice(&(MAX_SEGMENT_LENGTH as u32).to_be_bytes());
    body[12] = DATA_SEGMENT_GRANULARITY_LOG2;
    tpc_descriptor(out, 0x8001, &body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backstore::MemBackstore;
    use crate::stats::IoCounters;
    use crate::target::{encode_lun, Target};

    fn naa(lun: u64) -> [u8; 16] {
        let mut n = [0u8; 16];
        n[0] = 0x60;
        n[15] = lun as u8 + 1;
        n
    }

    fn info(lun: u64, bs: u32, blocks: u64, ro: bool) -> LunInfo {
        LunInfo {
            lun,
            product: "XCOPY".into(),
            serial: format!("s{lun}"),
            naa: naa(lun),
            read_only: ro,
            max_write_same_blocks: 4096,
            ..LunInfo::for_tests(bs, blocks)
        }
    }

    fn lun(i: LunInfo) -> Lun {
        let size = i.num_blocks * i.block_size as u64;
        Lun::new(i, Box::new(MemBackstore::new(size).unwrap())).unwrap()
    }

    /// LUN 0: 8192 blocks of 512 bytes; LUN 1: 1024 blocks of 4096
    /// (`ro`: write protected).
    fn target(ro: bool) -> Target {
        let mut t = Target::new();
        assert!(t.add_lun(lun(info(0, 512, 8192, false))));
        assert!(t.add_lun(lun(info(1, 4096, 1024, ro))));
        t
    }

    fn cscd(lun: u64, bs: u32) -> Vec<u8> {
        let mut d = vec![0u8; CSCD_LEN];
        d[0] = CSCD_IDENTIFICATION;
        d[4] = 0x01; // binary
        d[5] = 0x03; // logical unit, NAA
        d[7] = 16;
        d[8..24].copy_from_slice(&naa(lun));
        d[29..32].copy_from_slice(&bs.to_be_bytes()[1..]);
        d
    }

    fn seg(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64, dc: bool) -> Vec<u8> {
        let mut d = vec![0u8; SEG_B2B_LEN];
        d[0] = SEG_BLOCK_TO_BLOCK;
        d[1] = if dc { 0x02 } else { 0 };
        d[2..4].copy_from_slice(&24u16.to_be_bytes());
        d[4..6].copy_from_slice(&src.to_be_bytes());
        d[6..8].copy_from_slice(&dst.to_be_bytes());
        d[10..12].copy_from_slice(&blocks.to_be_bytes());
        d[12..20].copy_from_slice(&src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
        d
    }

    fn list(id: u8, usage: u8, cscds: &[Vec<u8>], segs: &[Vec<u8>]) -> DataBuf {
        let cl: usize = cscds.iter().map(Vec::len).sum();
        let sl: usize = segs.iter().map(Vec::len).sum();
        let mut p = vec![0u8; HEADER_LEN];
        p[0] = id;
        p[1] = usage << 3;
        p[2..4].copy_from_slice(&(cl as u16).to_be_bytes());
        p[8..12].copy_from_slice(&(sl as u32).to_be_bytes());
        for d in cscds.iter().chain(segs) {
            p.extend_from_slice(d);
        }
        p.into()
    }

    fn xcopy_cdb(len: usize) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = EXTENDED_COPY;
        c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
        c
    }

    fn rcr_cdb(sa: u8, list_id: u8) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = RECEIVE_COPY_RESULTS;
        c[1] = sa;
        c[2] = list_id;
        c[10..14].copy_from_slice(&1024u32.to_be_bytes());
        c
    }

    fn rw16(op: u8, lba: u64, n: u32) -> DataBuf {
        let mut c = vec![0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&n.to_be_bytes());
        c.into()
    }

    fn run(t: &mut Target, lun: u64, nexus: u64, cdb: &[u8], data_out: DataBuf) -> ScsiCompletion {
        t.submit(
            encode_lun(lun),
            ScsiTask {
                tag: 42,
                nexus,
                cdb: cdb.into(),
                edtl: data_out.len() as u32,
                data_out,
                ..Default::default()
            },
        );
        let mut out = Vec::new();
        t.poll(&mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(t.in_flight(), 0);
        out.pop().unwrap()
    }

    fn xcopy(t: &mut Target, p: DataBuf) -> ScsiCompletion {
        run(t, 0, 1, &xcopy_cdb(p.len()), p)
    }

    fn ok(c: &ScsiCompletion) {
        assert_eq!(c.status, status::GOOD, "sense {:02x?}", c.sense);
    }

    /// (key, asc, ascq) of a CHECK CONDITION.
    fn check(c: &ScsiCompletion) -> (u8, u8, u8) {
        assert_eq!(c.status, status::CHECK_CONDITION, "{c:?}");
        parse_sense(&c.sense)
    }

    fn pattern(len: usize, seed: u8) -> DataBuf {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed ^ (i >> 9) as u8)
            .collect()
    }

    fn read(t: &mut Target, lun: u64, lba: u64, n: u32) -> DataBuf {
        let mut d = Vec::new();
        for at in (0..n).step_by(1024) {
            let k = (n - at).min(1024);
            let c = run(
                t,
                lun,
                1,
                &rw16(0x88, lba + at as u64, k),
                Vec::new().into(),
            );
            ok(&c);
            d.extend_from_slice(&c.data_in);
        }
        d.into()
    }

    fn write(t: &mut Target, lun: u64, lba: u64, data: DataBuf, bs: usize) {
        for (i, part) in data.chunks(1024 * bs).enumerate() {
            let n = (part.len() / bs) as u32;
            let at = lba + (i * 1024) as u64;
            ok(&run(t, lun, 1, &rw16(0x8a, at, n), part.to_vec().into()));
        }
    }

    fn parse_err(p: &[u8]) -> (u8, u8, u8) {
        let s = parse(p).unwrap_err();
        (s.key as u8, s.asc, s.ascq)
    }

    #[test]
    fn header_and_length_errors() {
        let good = list(1, 0, &[cscd(0, 512)], &[seg(0, 0, 8, 0, 8, false)]);
        assert!(parse(&good).is_ok());
        // Shorter than the header, or than the lists it announces.
        assert_eq!(parse_err(&good[..15]), (5, 0x1a, 0));
        assert_eq!(parse_err(&good[..16 + 31]), (5, 0x1a, 0));
        assert_eq!(parse_err(&good[..good.len() - 1]), (5, 0x1a, 0));
        // LIST ID USAGE 01b is reserved; 11b wants list identifier 0.
        let mut p = good.clone();
        p[1] = 1 << 3;
        assert_eq!(parse_err(&p), (5, 0x26, 0));
        p[1] = 3 << 3;
        assert_eq!(parse_err(&p), (5, 0x26, 0));
        p[0] = 0;
        assert!(parse(&p).is_ok());
        // Inline data is not supported.
        let mut p = good.clone();
        p[15] = 4;
        p.extend_from_slice(&[0; 4]);
        assert_eq!(parse_err(&p), (5, 0x26, 0));
        // A segment descriptor with the wrong length.
        let mut p = good.clone();
        p[16 + 32 + 3] = 0x20;
        assert_eq!(parse_err(&p), (5, 0x26, 0));
    }

    #[test]
    fn descriptor_limits_and_types() {
        let c = cscd(0, 512);
        let s = seg(0, 0, 8, 0, 8, false);
        let many_c = vec![c.clone(); MAX_CSCD_DESCRIPTORS + 1];
        let many_s = vec![s.clone(); MAX_SEGMENT_DESCRIPTORS + 1];
        assert_eq!(
            parse_err(&list(1, 0, &many_c, std::slice::from_ref(&s))),
            (5, 0x26, 0x06)
        );
        assert_eq!(
            parse_err(&list(1, 0, std::slice::from_ref(&c), &many_s)),
            (5, 0x26, 0x08)
        );
        // Both too many: longer than MAXIMUM DESCRIPTOR LIST LENGTH.
        assert_eq!(parse_err(&list(1, 0, &many_c, &many_s)), (5, 0x1a, 0));
        // Exactly at the limits is fine.
        let max_c = vec![c.clone(); MAX_CSCD_DESCRIPTORS];
        let max_s = vec![s.clone(); MAX_SEGMENT_DESCRIPTORS];
        let p = parse(&list(1, 0, &max_c, &max_s)).unwrap();
        assert_eq!(p.cscds.len(), MAX_CSCD_DESCRIPTORS);
        assert_eq!(p.segments.len(), MAX_SEGMENT_DESCRIPTORS);
        // FC N_Port_Name CSCD, stream to stream segment.
        let mut fc = c.clone();
        fc[0] = 0xe0;
        assert_eq!(
            parse_err(&list(1, 0, &[fc], std::slice::from_ref(&s))),
            (5, 0x26, 0x07)
        );
        let mut st = vec![0u8; 20];
        st[0] = 0x03;
        st[3] = 0x10;
        assert_eq!(parse_err(&list(1, 0, &[c], &[st])), (5, 0x26, 0x09));
    }

    #[test]
    fn plan_errors() {
        let a = info(0, 512, 8192, false);
        let b = info(1, 4096, 1024, false);
        let luns = [&a, &b];
        let plan_err = |p: DataBuf| {
            let s = plan(&parse(&p).unwrap(), &luns).unwrap_err();
            (s.key as u8, s.asc, s.ascq)
        };
        // Index past the CSCD list, unknown designator: not reachable.
        let p = list(1, 0, &[cscd(0, 512)], &[seg(0, 1, 8, 0, 8, false)]);
        assert_eq!(plan_err(p), (0x0a, 0x0d, 0x02));
        let p = list(1, 0, &[cscd(7, 512)], &[seg(0, 0, 8, 0, 8, false)]);
        assert_eq!(plan_err(p), (0x0a, 0x0d, 0x02));
        // Beyond the end of the destination or of the source.
        let p = list(1, 0, &[cscd(0, 512)], &[seg(0, 0, 8, 0, 8190, false)]);
        assert_eq!(plan_err(p), (0x0a, 0, 0));
        let p = list(1, 0, &[cscd(0, 512)], &[seg(0, 0, 8, u64::MAX, 0, false)]);
        assert_eq!(plan_err(p), (0x0a, 0, 0));
        // DISK BLOCK LENGTH must be the LUN's.
        let p = list(1, 0, &[cscd(0, 4096)], &[seg(0, 0, 8, 0, 8, false)]);
        assert_eq!(plan_err(p), (5, 0x26, 0));
        // 3 blocks of 512 are not a whole number of 4096-byte blocks.
        let p = list(
            1,
            0,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(0, 1, 3, 0, 0, false)],
        );
        assert_eq!(plan_err(p), (5, 0x26, 0));
        // With DC the count is in destination blocks.
        let p = list(
            1,
            0,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(0, 1, 3, 0, 0, true)],
        );
        let jobs = plan(&parse(&p).unwrap(), &luns).unwrap();
        assert_eq!(jobs[0].bytes, 3 * 4096);
        assert!(!jobs[0].backward);
    }

    #[test]
    fn copy_between_luns_through_the_backstores() {
        let mut t = target(false);
        // 6000 blocks of 512 (several chunks) from LUN 0 LBA 100 to LUN 1
        // LBA 10, which has 4096-byte blocks.
        let data = pattern(6000 * 512, 0x5a);
        write(&mut t, 0, 100, data.clone(), 512);
        let p = list(
            7,
            USAGE_HOLD,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(0, 1, 6000, 100, 10, false)],
        );
        ok(&xcopy(&mut t, p));
        assert_eq!(read(&mut t, 1, 10, 750), data);
        assert_eq!(read(&mut t, 1, 9, 1), vec![0; 4096]);
        assert_eq!(read(&mut t, 1, 760, 1), vec![0; 4096]);

        // Its results are held for this I_T nexus and list identifier.
        let c = run(&mut t, 0, 1, &rcr_cdb(COPY_STATUS, 7), Vec::new().into());
        ok(&c);
        let d = &c.data_in;
        assert_eq!(be32(d, 0), 8);
        assert_eq!(d[4], 0x01, "completed without errors");
        assert_eq!(be16(d, 5), 1, "segments processed");
        assert_eq!(d[7], 0, "bytes");
        assert_eq!(be32(d, 8), 6000 * 512);
        let c = run(
            &mut t,
            0,
            1,
            &rcr_cdb(FAILED_SEGMENT_DETAILS, 7),
            Vec::new().into(),
        );
        ok(&c);
        assert_eq!(c.data_in, vec![0; 4]);
        // Not for another nexus, nor another list identifier.
        let c = run(&mut t, 0, 2, &rcr_cdb(COPY_STATUS, 7), Vec::new().into());
        assert_eq!(check(&c), (5, 0x24, 0));
        let c = run(&mut t, 0, 1, &rcr_cdb(COPY_STATUS, 8), Vec::new().into());
        assert_eq!(check(&c), (5, 0x24, 0));
        // Gone with the nexus.
        t.nexus_removed(1);
        let c = run(&mut t, 0, 1, &rcr_cdb(COPY_STATUS, 7), Vec::new().into());
        assert_eq!(check(&c), (5, 0x24, 0));
    }

    #[test]
    fn overlapping_copy_within_one_lun() {
        let mut t = target(false);
        let data = pattern(4000 * 512, 3);
        write(&mut t, 0, 0, data.clone(), 512);
        // Up by 1000 blocks, overlapping: copied from the end.
        let p = list(0, 3, &[cscd(0, 512)], &[seg(0, 0, 4000, 0, 1000, false)]);
        ok(&xcopy(&mut t, p));
        assert_eq!(read(&mut t, 0, 1000, 4000), data);
        // And back down, overlapping the other way.
        let p = list(0, 3, &[cscd(0, 512)], &[seg(0, 0, 4000, 1000, 0, false)]);
        ok(&xcopy(&mut t, p));
        assert_eq!(read(&mut t, 0, 0, 4000), data);
    }

    #[test]
    fn errors_reach_the_initiator() {
        let mut t = target(false);
        // No parameter list: nothing to do.
        ok(&run(&mut t, 0, 1, &xcopy_cdb(0), Vec::new().into()));
        // LID4 and other service actions are not offered.
        let mut cdb = xcopy_cdb(0);
        cdb[1] = 0x01;
        assert_eq!(
            check(&run(&mut t, 0, 1, &cdb, Vec::new().into())),
            (5, 0x24, 0)
        );
        let c = run(&mut t, 0, 1, &rcr_cdb(0x01, 0), Vec::new().into());
        assert_eq!(check(&c), (5, 0x24, 0));
        // A held failure, with its sense in FAILED SEGMENT DETAILS.
        let p = list(
            9,
            USAGE_HOLD,
            &[cscd(0, 512)],
            &[seg(0, 0, 2048, 0, 8191, false)],
        );
        assert_eq!(check(&xcopy(&mut t, p)), (0x0a, 0, 0));
        let c = run(&mut t, 0, 1, &rcr_cdb(COPY_STATUS, 9), Vec::new().into());
        ok(&c);
        assert_eq!(c.data_in[4], 0x02, "completed with errors");
        let c = run(
            &mut t,
            0,
            1,
            &rcr_cdb(FAILED_SEGMENT_DETAILS, 9),
            Vec::new().into(),
        );
        ok(&c);
        let d = &c.data_in;
        assert_eq!(d[56], status::CHECK_CONDITION);
        let n = be16(d, 58) as usize;
        assert_eq!(d.len(), 60 + n);
        assert_eq!(parse_sense(&d[60..]), (0x0a, 0, 0));
        // Sense key specific: a field pointer into the parameter list at
        // the destination LBA of the first segment.
        assert_eq!(d[60 + 15] & 0xe0, 0x80);
        assert_eq!(be16(d, 60 + 16) as usize, 16 + 32 + 20);
    }

    #[test]
    fn write_protected_destination() {
        let mut t = target(true);
        let p = list(
            0,
            3,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(0, 1, 8, 0, 0, false)],
        );
        assert_eq!(check(&xcopy(&mut t, p)), (0x0a, 0x27, 0));
    }

    #[test]
    fn reservation_on_a_copy_target_conflicts() {
        let mut t = target(false);
        write(&mut t, 1, 0, vec![0xaa; 4096].into(), 4096);
        // Nexus 2 reserves LUN 1 (RESERVE(6)).
        ok(&run(
            &mut t,
            1,
            2,
            &[0x16, 0, 0, 0, 0, 0],
            Vec::new().into(),
        ));
        let p = list(
            0,
            3,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(0, 1, 8, 0, 0, false)],
        );
        let c = xcopy(&mut t, p.clone());
        assert_eq!(c.status, status::RESERVATION_CONFLICT);
        assert_eq!(read_as(&mut t, 2, 1, 0), vec![0xaa; 4096]);
        // The holder copies.
        ok(&run(&mut t, 0, 2, &xcopy_cdb(p.len()), p));
        assert_eq!(read_as(&mut t, 2, 1, 0), vec![0; 4096]);
    }

    fn read_as(t: &mut Target, nexus: u64, lun: u64, lba: u64) -> DataBuf {
        let c = run(t, lun, nexus, &rw16(0x88, lba, 1), Vec::new().into());
        ok(&c);
        c.data_in
    }

    #[test]
    fn same_list_identifier_while_running_and_aborts() {
        let mut t = target(false);
        let p = list(
            5,
            USAGE_HOLD,
            &[cscd(0, 512)],
            &[seg(0, 0, 4000, 0, 4096, false)],
        );
        let task = |tag| ScsiTask {
            tag,
            nexus: 1,
            cdb: xcopy_cdb(p.len()).into(),
            data_out: p.clone(),
            ..Default::default()
        };
        t.submit(encode_lun(0), task(1));
        t.submit(encode_lun(0), task(2));
        // One copy running (its read counts on LUN 0), one answered.
        assert_eq!(t.in_flight(), 3);
        // COPY STATUS while it runs.
        t.submit(
            encode_lun(0),
            ScsiTask {
                tag: 3,
                nexus: 1,
                cdb: rcr_cdb(COPY_STATUS, 5).into(),
                ..Default::default()
            },
        );
        assert!(t.query_task(encode_lun(0), 1, 1));
        let mut out = Vec::new();
        t.poll(&mut out);
        out.sort_by_key(|c| c.tag);
        assert_eq!(out.len(), 3);
        ok(&out[0]);
        // OPERATION IN PROGRESS
        assert_eq!(check(&out[1]), (5, 0x00, 0x16));
        ok(&out[2]);
        assert_eq!(out[2].data_in[4], 0x00, "in progress");

        // An aborted copy answers nothing and goes away.
        t.submit(encode_lun(0), task(4));
        assert!(t.abort(encode_lun(0), 1, 4));
        assert!(!t.query_task(encode_lun(0), 1, 4));
        let mut out = Vec::new();
        t.poll(&mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(t.in_flight(), 0);
        // So does one whose LUN is reset.
        t.submit(encode_lun(0), task(5));
        assert!(t.lun_reset(encode_lun(0), 9));
        t.poll(&mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn reset_of_a_copy_target_aborts_the_copy() {
        let mut t = target(false);
        // From LUN 1 to LUN 0: the first read is on LUN 1 as soon as the
        // command is submitted, and a reset of LUN 1 takes it away.
        let p = list(
            0,
            3,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(1, 0, 100, 0, 0, false)],
        );
        t.submit(
            encode_lun(0),
            ScsiTask {
                tag: 1,
                nexus: 1,
                cdb: xcopy_cdb(p.len()).into(),
                data_out: p,
                ..Default::default()
            },
        );
        assert!(t.lun_reset(encode_lun(1), 9));
        let mut out = Vec::new();
        t.poll(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(check(&out[0]), (0x0a, 0x29, 0x03));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn operating_parameters_and_vpd() {
        let mut t = target(false);
        let c = run(
            &mut t,
            0,
            1,
            &rcr_cdb(OPERATING_PARAMETERS, 0),
            Vec::new().into(),
        );
        ok(&c);
        let d = &c.data_in;
        assert_eq!(be32(d, 0) as usize, d.len() - 4);
        assert_eq!(be16(d, 8) as usize, MAX_CSCD_DESCRIPTORS);
        assert_eq!(be16(d, 10) as usize, MAX_SEGMENT_DESCRIPTORS);
        assert_eq!(be32(d, 12) as usize, MAX_DESCRIPTOR_LIST_LENGTH);
        assert_eq!(be32(d, 16) as u64, MAX_SEGMENT_LENGTH);
        assert_eq!(&d[43..], &[2, SEG_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION]);

        // INQUIRY: 3PC, and VPD page 8Fh listed and well formed.
        let c = run(&mut t, 0, 1, &[0x12, 0, 0, 0, 96, 0], Vec::new().into());
        assert_ne!(c.data_in[5] & 0x08, 0);
        let c = run(&mut t, 0, 1, &[0x12, 1, 0, 0, 255, 0], Vec::new().into());
        assert!(c.data_in[4..].contains(&0x8f));
        let c = run(&mut t, 0, 1, &[0x12, 1, 0x8f, 4, 0, 0], Vec::new().into());
        ok(&c);
        let d = &c.data_in;
        assert_eq!(be16(d, 2) as usize, d.len() - 4);
        let mut at = 4;
        let mut types = Vec::new();
        while at < d.len() {
            let len = be16(d, at + 2) as usize;
            assert_eq!(len % 4, 0);
            types.push(be16(d, at));
            at += 4 + len;
        }
        assert_eq!(at, d.len());
        assert_eq!(types, vec![0x0001, 0x0004, 0x0008, 0x000c, 0x8001]);

        // REPORT SUPPORTED OPERATION CODES lists both commands.
        let mut cdb = vec![0xa3, 0x0c, 0x02, EXTENDED_COPY, 0, 0, 0, 0, 1, 0, 0, 0];
        let c = run(&mut t, 0, 1, &cdb, Vec::new().into());
        assert_eq!(c.data_in[1] & 0x07, 0x03);
        cdb[3] = RECEIVE_COPY_RESULTS;
        cdb[5] = FAILED_SEGMENT_DETAILS;
        let c = run(&mut t, 0, 1, &cdb, Vec::new().into());
        assert_eq!(c.data_in[1] & 0x07, 0x03);
    }

    #[test]
    fn fuzzed_parameter_lists_never_panic() {
        let mut t = target(false);
        let base = list(
            1,
            0,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(0, 1, 8, 0, 0, false)],
        );
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut p = base.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % p.len();
                p[i] = (x >> 8) as u8;
            }
            p.truncate(x as usize % (p.len() + 1));
            let c = xcopy(&mut t, p);
            assert!(matches!(
                c.status,
                status::GOOD | status::CHECK_CONDITION | status::RESERVATION_CONFLICT
            ));
        }
    }

    #[test]
    fn counters_see_the_copy_not_its_reads_and_writes() {
        let mut t = target(false);
        write(&mut t, 0, 0, pattern(96 * 512, 1), 512);
        let p = list(
            0,
            USAGE_NO_LIST_ID,
            &[cscd(0, 512), cscd(1, 4096)],
            &[seg(0, 1, 96, 0, 0, false)],
        );
        ok(&xcopy(&mut t, p.clone()));
        let stats = |t: &Target| -> Vec<_> { t.lun_stats().map(|(_, s)| *s).collect() };
        let s = stats(&t);
        // LUN 0: the seeding write and the EXTENDED COPY; LUN 1 saw only
        // the copy manager's writes.
        assert_eq!((s[0].reads, s[0].writes, s[0].other), (0, 1, 1));
        assert_eq!(s[0].latency.count(), 2);
        assert_eq!(s[1], IoCounters::default());

        // Copies that end without a completion count as aborted on the
        // LUN that received them, once, however they go.
        let task = |tag| ScsiTask {
            tag,
            nexus: 1,
            cdb: xcopy_cdb(p.len()).into(),
            data_out: p.clone(),
            ..Default::default()
        };
        t.submit(encode_lun(0), task(1));
        assert!(t.abort(encode_lun(0), 1, 1));
        t.submit(encode_lun(0), task(2));
        assert!(t.abort_task_set(encode_lun(0), 1));
        t.submit(encode_lun(0), task(3));
        assert!(t.lun_reset(encode_lun(0), 9));
        t.submit(encode_lun(0), task(4));
        t.nexus_removed(1);
        t.submit(encode_lun(0), task(5));
        t.target_reset(9);
        let mut out = Vec::new();
        t.poll(&mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(t.in_flight(), 0);
        let s = stats(&t);
        assert_eq!(s[0].aborted, 5);
        assert_eq!(s[0].completions(), 2);
        assert_eq!(s[1], IoCounters::default());
    }
}
