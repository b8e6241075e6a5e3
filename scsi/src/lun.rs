//! A logical unit: one backstore, its SPC state, and the commands in
//! flight against it.
//!
//! Commands that touch the medium live in a slab of slots until they
//! finish. Each holds an LBA range lock while it runs (shared for reads,
//! exclusive for writes) so that multi-step commands such as COMPARE AND
//! WRITE are atomic against every other command on the same blocks;
//! commands whose range is busy wait in arrival order. Task attributes are
//! not otherwise honored: every task is treated as SIMPLE.
//!
//! Each LUN counts its commands (`stats`) when `poll` hands their
//! completions over, so a command finished and then aborted before that
//! counts as aborted, not as I/O, and the latency is what the transport
//! sees.

use crate::backstore::{Backstore, BackstoreCaps, Io, IoDone, IoOp};
use crate::common::{CmdError, LunInfo, Nexus, NexusId, ScsiCompletion, ScsiTask};
use crate::sanitize::{self, Job, Request, Waiter};
use crate::sbc::{self, Decoded, MediumCmd, Next};
use crate::sense::Sense;
use crate::spc::SpcState;
use crate::stats::{IoCounters, IoKind, IoSample};
use crate::status;
use mempool::DataBuf;
use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::time::Instant;

/// Most commands one LUN holds at once (running, waiting for a range
/// lock, or finished and not yet polled); beyond it, TASK SET FULL.
pub const MAX_TASKS: usize = 1024;

/// What the counters need to know of a command when it completes, taken
/// when it is submitted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    started: Instant,
    kind: IoKind,
    /// Most bytes the command can move: EDTL for a read (the transport
    /// sends no more), the data received for a write.
    limit_bytes: u32,
}

impl Stamp {
    fn new(cdb: &[u8], edtl: u32, sent: usize) -> Stamp {
        let kind = IoKind::from_opcode(cdb.first().copied().unwrap_or(0));
        let limit_bytes = match kind {
            IoKind::Write => sent.min(u32::MAX as usize) as u32,
            _ => edtl,
        };
        Stamp {
            started: Instant::now(),
            kind,
            limit_bytes,
        }
    }

    /// What the completion `c` of this command adds to the counters.
    fn sample(self, c: &ScsiCompletion, now: Instant) -> IoSample {
        let failed = !matches!(c.status, status::GOOD | status::CONDITION_MET);
        let bytes = match self.kind {
            _ if failed => 0,
            IoKind::Read => c.data_in.len().min(self.limit_bytes as usize) as u64,
            IoKind::Write => c.data_out_len.min(self.limit_bytes) as u64,
            IoKind::Other => 0,
        };
        let ns = now.saturating_duration_since(self.started).as_nanos();
        IoSample {
            kind: self.kind,
            bytes,
            failed,
            latency_ns: u64::try_from(ns).unwrap_or(u64::MAX),
        }
    }
}

/// Whom a completion answers, and its stamp. The copy manager's own reads
/// and writes have no stamp: they are not commands of an initiator, and
/// the EXTENDED COPY that made them is counted instead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub tag: u64,
    pub nexus: NexusId,
    pub stamp: Option<Stamp>,
}

struct Task {
    tag: u64,
    nexus: NexusId,
    stamp: Option<Stamp>,
    /// Distinguishes this use of the slot from earlier ones, so a late
    /// backstore completion for an aborted task cannot reach a new one.
    generation: u32,
    cmd: MediumCmd,
    data_out: DataBuf,
    data_in: DataBuf,
    /// Aborted while a backstore operation was in flight: finish that
    /// operation, then drop the task without a completion.
    aborted: bool,
    /// The task deallocated or zeroed blocks while the write cache was
    /// off: a flush must make that durable before GOOD.
    flush_before_done: bool,
    /// That flush is in flight; its result is the task's.
    flushing: bool,
}

pub struct Lun {
    info: LunInfo,
    backstore: Box<dyn Backstore>,
    caps: BackstoreCaps,
    spc: SpcState,
    slots: Vec<Option<Task>>,
    free: Vec<usize>,
    generation: u32,
    /// Slots waiting for their range lock, oldest first.
    waiting: VecDeque<usize>,
    /// Set when a lock was released or a waiter left, so waiters are
    /// looked at again.
    recheck: bool,
    done: VecDeque<(ScsiCompletion, Option<Stamp>)>,
    io_done: Vec<IoDone>,
    /// The SANITIZE operation under way (see `sanitize`).
    sanitize: Option<Job>,
    /// Sanitize failure mode after a failed operation: whether that
    /// operation allowed EXIT FAILURE MODE (AUSE).
    sanitize_failed: Option<bool>,
    /// OVERWRITE pace in bytes a second (0: none).
    sanitize_rate: u64,
    /// EXTENDED COPY / RECEIVE COPY RESULTS that passed this LUN's checks,
    /// for the target's copy manager (`take_copy_commands`).
    copy_cmds: Vec<(ScsiTask, Stamp)>,
    /// Ranges of waiters found blocked in one pass of `start_waiters`
    /// (kept between passes so the pass does not allocate).
    blocked: Vec<(u64, u64, bool)>,
    /// Range locks granted and not yet released: (start, end, exclusive,
    /// slot), the only record of which task holds what. Kept apart from
    /// the tasks so a waiter's conflict check reads one short contiguous
    /// array (writes lock exclusively, so every write makes that check)
    /// rather than every slot's task.
    held: Vec<(u64, u64, bool, usize)>,
    /// Tasks holding an exclusive range lock (COMPARE AND WRITE and the
    /// like). Shared locks conflict only with exclusive ones, so while
    /// there are none a shared waiter starts without a scan.
    exclusive_held: u32,
    stats: IoCounters,
}

/// `op` as it must reach the backstore while the write cache is off
/// (WCE=0: every write durable before GOOD, SBC-3 4.15): writes carry
/// FUA, and a deallocation or zeroing, which has no FUA of its own, asks
/// the task for a flush before it completes.
fn durable(op: IoOp, flush_before_done: &mut bool) -> IoOp {
    match op {
        IoOp::Write { offset, .. } => IoOp::Write { offset, fua: true },
        IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => {
            *flush_before_done = true;
            op
        }
        IoOp::Read { .. } | IoOp::Flush => op,
    }
}

fn ranges_conflict(a: (u64, u64, bool), b: (u64, u64, bool)) -> bool {
    a.0 < b.1 && b.0 < a.1 && (a.2 || b.2)
}

/// Data-out length of SPC commands with a parameter list, so the
/// transport can compute residuals; others move what was sent.
fn spc_data_out_len(cdb: &[u8], sent: usize) -> u32 {
    let g = |i: usize| cdb.get(i).copied().unwrap_or(0) as u32;
    match cdb.first().copied().unwrap_or(0) {
        0x15 => g(4),                                             // MODE SELECT (6)
        0x55 => (g(7) << 8) | g(8),                               // MODE SELECT (10)
        0x5f => (g(5) << 24) | (g(6) << 16) | (g(7) << 8) | g(8), // PERSISTENT RESERVE OUT
        0x3b => (g(6) << 16) | (g(7) << 8) | g(8),                // WRITE BUFFER
        0x1d => (g(3) << 8) | g(4),                               // SEND DIAGNOSTIC
        _ => sent as u32,
    }
}

impl Lun {
    pub fn new(mut info: LunInfo, backstore: Box<dyn Backstore>) -> Result<Lun, String> {
        // MAXIMUM WRITE SAME LENGTH is kept within MAXIMUM TRANSFER LENGTH:
        // initiators (libiscsi's conformance tests among them) expect to be
        // able to write and read back any range one WRITE SAME may cover,
        // and it bounds the work of one command. The SPC side reports the
        // clamped value because it gets this same `info`.
        info.max_write_same_blocks = info
            .max_write_same_blocks
            .min(info.max_transfer_blocks as u64);
        let caps = backstore.caps();
        if info.block_size == 0 {
            return Err("block size must not be zero".into());
        }
        let align = backstore.io_align();
        if !info.block_size.is_multiple_of(align) {
            return Err(format!(
                "block size {} is not a multiple of the {} backstore's {align}-byte direct I/O \
                 alignment",
                info.block_size,
                backstore.kind()
            ));
        }
        let need = info.num_blocks.checked_mul(info.block_size as u64);
        if need.is_none_or(|n| n > backstore.size_bytes()) {
            return Err(format!(
                "{} blocks of {} bytes do not fit the {} backstore of {} bytes",
                info.num_blocks,
                info.block_size,
                backstore.kind(),
                backstore.size_bytes()
            ));
        }
        let spc = SpcState::new(&info, caps)?;
        Ok(Lun {
            info,
            backstore,
            caps,
            spc,
            // Every per-task queue sized for MAX_TASKS now (a task holds at
            // most one slot, one queue entry and one backstore operation),
            // so reaching a new high-water mark under load never grows
            // one on the I/O path.
            slots: Vec::with_capacity(MAX_TASKS),
            free: Vec::with_capacity(MAX_TASKS),
            generation: 0,
            waiting: VecDeque::with_capacity(MAX_TASKS),
            recheck: false,
            done: VecDeque::with_capacity(MAX_TASKS),
            io_done: Vec::with_capacity(MAX_TASKS),
            sanitize: None,
            sanitize_failed: None,
            sanitize_rate: sanitize::DEFAULT_RATE,
            copy_cmds: Vec::new(),
            blocked: Vec::with_capacity(MAX_TASKS),
            held: Vec::with_capacity(MAX_TASKS),
            exclusive_held: 0,
            stats: IoCounters::new(),
        })
    }

    pub fn info(&self) -> &LunInfo {
        &self.info
    }

    /// Whether the backstore wants data buffers aligned in memory
    /// (O_DIRECT files): a buffer that is not goes through its bounce
    /// buffers.
    pub fn wants_aligned_buffers(&self) -> bool {
        self.backstore.io_align() > 1
    }

    /// The commands this LUN has completed or seen aborted so far. Copy
    /// it to take a snapshot.
    pub fn stats(&self) -> &IoCounters {
        &self.stats
    }

    /// An EXTENDED COPY this LUN received was aborted in the copy
    /// manager, so it ends without a completion from here.
    pub(crate) fn count_aborted_copy(&mut self) {
        self.stats.aborted += 1;
    }

    pub fn nexus_added(&mut self, nexus: &Nexus) {
        self.spc.nexus_added(nexus)
    }

    /// The nexus is gone: its tasks are aborted silently.
    pub fn nexus_removed(&mut self, id: NexusId) {
        self.abort_where(|n, _| n == id);
        self.spc.nexus_removed(id)
    }

    pub(crate) fn finish(
        &mut self,
        origin: Origin,
        result: Result<u8, CmdError>,
        data_in: DataBuf,
        data_out: DataBuf,
        data_out_len: u32,
    ) {
        let mut c = ScsiCompletion {
            tag: origin.tag,
            nexus: origin.nexus,
            status: status::GOOD,
            sense: Vec::new(),
            data_in,
            data_out_len,
            data_out,
            sample: None,
        };
        match result {
            Ok(s) => c.status = s,
            Err(e) => {
                c.data_in.clear();
                c.status = match e {
                    CmdError::Check(s) => {
                        s.encode(self.spc.descriptor_sense(), &mut c.sense);
                        status::CHECK_CONDITION
                    }
                    CmdError::ReservationConflict => status::RESERVATION_CONFLICT,
                    CmdError::Busy => status::BUSY,
                    CmdError::TaskSetFull => status::TASK_SET_FULL,
                };
            }
        }
        self.done.push_back((c, origin.stamp));
    }

    fn tasks_held(&self) -> usize {
        self.slots.len() - self.free.len() + self.done.len() + self.copy_cmds.len()
    }

    /// Start a command. Never blocks; the answer comes from `poll`.
    pub fn submit(&mut self, task: ScsiTask) {
        let ScsiTask {
            tag,
            nexus,
            cdb,
            edtl,
            mut data_out,
            mut data_in,
            ..
        } = task;
        data_in.clear();
        // Data in pieces is for READ and WRITE only; anything else handed
        // such a buffer gets it as one slice (a copy), never a wrong view.
        if !cdb
            .first()
            .is_some_and(|&op| crate::common::data_may_be_in_pieces(op))
        {
            data_out.make_contiguous();
            data_in.make_contiguous();
        }
        let sent = data_out.len();
        let stamp = Stamp::new(&cdb, edtl, sent);
        let origin = Origin {
            tag,
            nexus,
            stamp: Some(stamp),
        };
        if self.tasks_held() >= MAX_TASKS {
            return self.finish(origin, Err(CmdError::TaskSetFull), data_in, data_out, 0);
        }
        if cdb.is_empty() {
            let e = CmdError::Check(Sense::invalid_opcode());
            return self.finish(origin, Err(e), data_in, data_out, 0);
        }
        if let Some(e) = self.spc.precheck(nexus, &cdb) {
            let dol = spc_data_out_len(&cdb, sent);
            return self.finish(origin, Err(e), data_in, data_out, dol);
        }
        // A sanitize operation leaves the medium to itself (SBC-4 4.11).
        if self.sanitize.is_some() && !matches!(cdb[0], 0x12 | 0x03 | 0xa0) {
            let e = CmdError::Check(self.sanitize_sense());
            let dol = spc_data_out_len(&cdb, sent);
            return self.finish(origin, Err(e), data_in, data_out, dol);
        }
        // (READ and WRITE data in pieces: not an SPC command, no data read.)
        let spc_out: &[u8] = if data_out.is_contiguous() {
            &data_out
        } else {
            &[]
        };
        if let Some(r) = self.spc.execute(nexus, &cdb, spc_out, &mut data_in) {
            let dol = spc_data_out_len(&cdb, sent);
            let r = r.map(|()| status::GOOD);
            // PREEMPT AND ABORT: the preempted nexuses lose their tasks,
            // but not this command (the preemptor may preempt itself).
            for gone in self.spc.take_aborted_nexuses() {
                self.abort_where(|n, _| n == gone);
            }
            return self.finish(origin, r, data_in, data_out, dol);
        }
        // Everything from here on needs the medium.
        if !self.spc.medium_present() {
            let e = CmdError::Check(Sense::new(crate::sense::SenseKey::NotReady, 0x3a, 0));
            return self.finish(origin, Err(e), data_in, data_out, sent as u32);
        }
        if cdb[0] == 0x48 {
            return self.sanitize_command(origin, &cdb, data_in, data_out);
        }
        if self.sanitize_failed.is_some() {
            let e = CmdError::Check(sanitize::failed());
            return self.finish(origin, Err(e), data_in, data_out, sent as u32);
        }
        // REPORT SUPPORTED OPERATION CODES and the commands that work must
        // agree, so the SPC side's table decides which SBC commands exist.
        let sa = if cdb[0] == 0x9e {
            cdb.get(1).map_or(0, |b| (b & 0x1f) as u16)
        } else {
            0
        };
        if !self.spc.opcode_supported(cdb[0], sa) {
            // A SERVICE ACTION IN with an unknown service action points
            // at the service action field, which initiators read as "not
            // supported" too.
            let s = if cdb[0] == 0x9e && self.spc.opcode_supported(0x9e, 0x10) {
                Sense::invalid_field_in_cdb(1, Some(4))
            } else {
                Sense::invalid_opcode()
            };
            return self.finish(origin, Err(s.into()), data_in, data_out, sent as u32);
        }
        // EXTENDED COPY and RECEIVE COPY RESULTS span LUNs: the target's
        // copy manager (`xcopy`) takes them from here.
        if crate::xcopy::is_copy_opcode(cdb[0]) {
            let t = ScsiTask {
                tag,
                nexus,
                cdb,
                data_out,
                data_in,
                ..Default::default()
            };
            return self.copy_cmds.push((t, stamp));
        }
        self.start_medium(origin, &cdb, data_out, data_in, sent as u32);
    }

    /// EXTENDED COPY and RECEIVE COPY RESULTS commands that `submit` set
    /// aside for the target's copy manager.
    pub(crate) fn take_copy_commands(&mut self) -> Vec<(ScsiTask, Stamp)> {
        std::mem::take(&mut self.copy_cmds)
    }

    /// A READ(16) (`write` false) or WRITE(16) that the target's copy
    /// manager makes for an EXTENDED COPY sent by `on_behalf`. It takes
    /// the path of any other read or write (range lock, backstore, write
    /// protection) and the reservation checks of `on_behalf`'s I_T nexus,
    /// but reports and clears no unit attention. It completes through
    /// `poll` with `tag` and nexus `xcopy::COPY_NEXUS`; a write takes its
    /// data from `buf`, a read fills `buf` and returns it as data-in.
    pub(crate) fn submit_copy_io(
        &mut self,
        tag: u64,
        on_behalf: NexusId,
        write: bool,
        lba: u64,
        nlb: u32,
        buf: DataBuf,
    ) {
        let origin = Origin {
            tag,
            nexus: crate::xcopy::COPY_NEXUS,
            stamp: None,
        };
        let mut cdb = [0u8; 16];
        cdb[0] = if write { 0x8a } else { 0x88 };
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&nlb.to_be_bytes());
        let (data_out, mut data_in) = if write {
            (buf, DataBuf::new())
        } else {
            (DataBuf::new(), buf)
        };
        data_in.clear();
        if self.tasks_held() >= MAX_TASKS {
            return self.finish(origin, Err(CmdError::TaskSetFull), data_in, data_out, 0);
        }
        if let Some(e) = self.spc.access_check(on_behalf, &cdb) {
            return self.finish(origin, Err(e), data_in, data_out, 0);
        }
        self.start_medium(origin, &cdb, data_out, data_in, 0);
    }

    /// The part of a block command shared by initiators' commands and the
    /// copy manager's: write protection, SBC decoding, then either an
    /// immediate answer or the slab and its range lock. `refused_dol` is
    /// the data-out length reported when the command is refused here.
    fn start_medium(
        &mut self,
        origin: Origin,
        cdb: &[u8],
        data_out: DataBuf,
        mut data_in: DataBuf,
        refused_dol: u32,
    ) {
        if self.spc.write_protected() && sbc::is_write_opcode(cdb[0]) {
            let e = CmdError::Check(Sense::write_protected());
            return self.finish(origin, Err(e), data_in, data_out, refused_dol);
        }
        let decoded = sbc::decode(
            cdb,
            &self.info,
            self.caps,
            self.backstore.as_mut(),
            &data_out,
            &mut data_in,
        );
        let cmd = match decoded {
            None => {
                let e = CmdError::Check(Sense::invalid_opcode());
                return self.finish(origin, Err(e), data_in, data_out, refused_dol);
            }
            Some(Decoded::Done(r, dol)) => {
                return self.finish(origin, r, data_in, data_out, dol);
            }
            Some(Decoded::Medium(cmd)) => cmd,
        };
        self.enqueue(origin, cmd, data_out, data_in);
    }

    /// Put a decoded medium command in the slab and queue it for its range
    /// lock; it starts as soon as no conflicting command holds the range.
    fn enqueue(&mut self, origin: Origin, cmd: MediumCmd, data_out: DataBuf, data_in: DataBuf) {
        self.generation = self.generation.wrapping_add(1);
        let t = Task {
            tag: origin.tag,
            nexus: origin.nexus,
            stamp: origin.stamp,
            generation: self.generation,
            cmd,
            data_out,
            data_in,
            aborted: false,
            flush_before_done: false,
            flushing: false,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(t);
                i
            }
            None => {
                self.slots.push(Some(t));
                self.slots.len() - 1
            }
        };
        self.waiting.push_back(slot);
        self.recheck = true;
        self.start_waiters();
    }

    /// Range a task wants locked, as (start, end, exclusive).
    fn want(&self, slot: usize) -> Option<(u64, u64, bool)> {
        let t = self.slots.get(slot)?.as_ref()?;
        t.cmd.lock.map(|(s, n, x)| (s, s.saturating_add(n), x))
    }

    /// Start every waiting task whose range conflicts neither with a held
    /// lock nor with an older waiter (which keeps writers from starving).
    fn start_waiters(&mut self) {
        while std::mem::take(&mut self.recheck) {
            let mut blocked = std::mem::take(&mut self.blocked);
            blocked.clear();
            let mut i = 0;
            while i < self.waiting.len() {
                let slot = self.waiting[i];
                let want = self.want(slot);
                let free = match want {
                    None => true,
                    Some(w) if !w.2 && self.exclusive_held == 0 && !blocked.iter().any(|b| b.2) => {
                        true
                    }
                    Some(w) => {
                        !blocked.iter().any(|&b| ranges_conflict(w, b))
                            && !self
                                .held
                                .iter()
                                .any(|&(s, e, x, _)| ranges_conflict(w, (s, e, x)))
                    }
                };
                if free {
                    self.waiting.remove(i);
                    if let Some((s, e, x)) = want {
                        self.held.push((s, e, x, slot));
                        self.exclusive_held += x as u32;
                    }
                    self.advance(slot, None);
                } else {
                    if let Some(w) = want {
                        blocked.push(w);
                    }
                    i += 1;
                }
            }
            self.blocked = blocked;
        }
    }

    /// Whether every write must reach the medium before it completes: the
    /// write cache is off on a backstore that has one. Without a volatile
    /// cache (RAM, null) writes are as durable as the backstore makes them
    /// either way.
    fn each_write_durable(&self) -> bool {
        !self.spc.write_cache_enabled() && self.caps.volatile_cache
    }

    /// Run a task's next step.
    fn advance(&mut self, slot: usize, done: Option<(Result<(), i32>, DataBuf)>) {
        let each_durable = self.each_write_durable();
        let Some(Some(t)) = self.slots.get_mut(slot) else {
            return;
        };
        let next = if t.aborted {
            Next::Done(Ok(()))
        } else if std::mem::take(&mut t.flushing) {
            // The flush after a deallocation: its result ends the task.
            let r = done.map_or(Ok(()), |(r, _)| r);
            Next::Done(r.map_err(|e| sbc::io_error(e, true)))
        } else {
            t.cmd
                .step(&self.info, self.caps, done, &mut t.data_out, &mut t.data_in)
        };
        let next = match next {
            Next::Done(Ok(())) if std::mem::take(&mut t.flush_before_done) && !t.aborted => {
                t.flushing = true;
                Next::Io(IoOp::Flush, DataBuf::new())
            }
            n => n,
        };
        match next {
            Next::Io(op, buf) => {
                let op = if each_durable {
                    durable(op, &mut t.flush_before_done)
                } else {
                    op
                };
                match op {
                    IoOp::Write { fua: true, .. } => self.stats.durable_writes += 1,
                    IoOp::Flush => self.stats.flushes += 1,
                    _ => {}
                }
                let tag = ((slot as u64) << 32) | t.generation as u64;
                self.backstore.submit(Io { tag, op, buf });
            }
            Next::Done(r) => {
                let Some(t) = self.slots.get_mut(slot).and_then(Option::take) else {
                    return;
                };
                self.free.push(slot);
                if let Some(at) = self.held.iter().position(|e| e.3 == slot) {
                    let (_, _, exclusive, _) = self.held.swap_remove(at);
                    self.recheck = true;
                    self.exclusive_held -= exclusive as u32;
                }
                if !t.aborted {
                    let r = r.map(|()| status::GOOD);
                    let dol = t.cmd.data_out_len;
                    let origin = Origin {
                        tag: t.tag,
                        nexus: t.nexus,
                        stamp: t.stamp,
                    };
                    self.finish(origin, r, t.data_in, t.data_out, dol);
                }
            }
        }
    }

    /// Move finished commands into `out`; returns how many.
    pub fn poll(&mut self, out: &mut Vec<ScsiCompletion>) -> usize {
        let mut io_done = std::mem::take(&mut self.io_done);
        self.sanitize_pump();
        // Backstores that complete inline finish a step's successor in the
        // same call, so keep going until the backstore has nothing more.
        while self.backstore.poll(&mut io_done) > 0 {
            for d in io_done.drain(..) {
                if d.tag == sanitize::SANITIZE_TAG {
                    if let Some(job) = self.sanitize.as_mut() {
                        job.complete(d.result, d.buf);
                    }
                    self.sanitize_pump();
                    continue;
                }
                let slot = (d.tag >> 32) as usize;
                let generation = d.tag as u32;
                let ours =
                    matches!(self.slots.get(slot), Some(Some(t)) if t.generation == generation);
                if ours {
                    self.advance(slot, Some((d.result, d.buf)));
                }
            }
            self.start_waiters();
        }
        self.io_done = io_done;
        let n = self.done.len();
        if n > 0 {
            // One clock read for the batch: the completions were all
            // handed over now.
            let now = Instant::now();
            let stats = &mut self.stats;
            out.extend(self.done.drain(..).map(|(mut c, stamp)| {
                if let Some(s) = stamp {
                    let sample = s.sample(&c, now);
                    stats.add(&sample);
                    c.sample = Some(sample);
                }
                c
            }));
        }
        n
    }

    /// Commands submitted and not yet returned by `poll` (aborted ones
    /// excluded: they are never returned).
    pub fn in_flight(&self) -> usize {
        let waiter = self.sanitize.as_ref().is_some_and(|j| j.waiter.is_some());
        self.slots.iter().flatten().filter(|t| !t.aborted).count()
            + self.done.len()
            + waiter as usize
    }

    /// Abort the tasks `pred(nexus, tag)` selects; returns how many were
    /// found. Waiting and finished-unpolled tasks go at once; running ones
    /// when their backstore operation returns, without a completion.
    fn abort_where(&mut self, pred: impl Fn(NexusId, u64) -> bool) -> usize {
        let mut found = 0;
        // Of those, the initiators' commands (the copy manager's reads and
        // writes are not counted).
        let mut counted = 0;
        // A SANITIZE waiting for its operation goes; the operation stays.
        if let Some(job) = self.sanitize.as_mut() {
            if let Some(w) = job.waiter.take_if(|w| pred(w.nexus, w.tag)) {
                found += 1;
                counted += w.stamp.is_some() as u64;
            }
        }
        self.done.retain(|(c, stamp)| {
            let hit = pred(c.nexus, c.tag);
            if hit {
                found += 1;
                counted += stamp.is_some() as u64;
            }
            !hit
        });
        let mut i = 0;
        while i < self.waiting.len() {
            let slot = self.waiting[i];
            let hit = matches!(self.slots.get(slot), Some(Some(t)) if pred(t.nexus, t.tag));
            if hit {
                self.waiting.remove(i);
                if let Some(t) = self.slots[slot].take() {
                    counted += t.stamp.is_some() as u64;
                }
                self.free.push(slot);
                self.recheck = true;
                found += 1;
            } else {
                i += 1;
            }
        }
        for t in self.slots.iter_mut().flatten() {
            if !t.aborted && pred(t.nexus, t.tag) {
                t.aborted = true;
                found += 1;
                counted += t.stamp.is_some() as u64;
            }
        }
        self.stats.aborted += counted;
        self.start_waiters();
        found
    }

    /// ABORT TASK: true if the task was found (it will not complete).
    pub fn abort(&mut self, nexus: NexusId, tag: u64) -> bool {
        self.abort_where(|n, t| n == nexus && t == tag) > 0
    }

    /// ABORT TASK SET / CLEAR TASK SET for one nexus; returns how many.
    pub fn abort_nexus(&mut self, nexus: NexusId) -> usize {
        self.abort_where(|n, _| n == nexus)
    }

    /// QUERY TASK: is the task in the task set (not yet completed)?
    pub fn has_task(&self, nexus: NexusId, tag: u64) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|t| !t.aborted && t.nexus == nexus && t.tag == tag)
            || self
                .done
                .iter()
                .any(|(c, _)| c.nexus == nexus && c.tag == tag)
            || self.sanitize.as_ref().is_some_and(|j| {
                j.waiter
                    .as_ref()
                    .is_some_and(|w| w.nexus == nexus && w.tag == tag)
            })
    }

    /// Pace SANITIZE OVERWRITE at `bytes_per_sec` (0: as fast as the
    /// backstore goes).
    pub fn set_sanitize_rate(&mut self, bytes_per_sec: u64) {
        self.sanitize_rate = bytes_per_sec;
    }

    /// What commands get while a sanitize operation runs.
    fn sanitize_sense(&self) -> Sense {
        self.sanitize
            .as_ref()
            .map_or(Sense::not_ready(), Job::progress)
    }

    /// SANITIZE: checks, then start the operation (or leave failure mode).
    fn sanitize_command(
        &mut self,
        origin: Origin,
        cdb: &[u8],
        data_in: DataBuf,
        data_out: DataBuf,
    ) {
        let dol = sanitize::data_out_len(cdb);
        let req = sanitize::decode(
            cdb,
            &data_out,
            &self.info,
            self.spc.can_unmap(),
            self.spc.write_protected(),
        );
        match req {
            Err(e) => self.finish(origin, Err(e), data_in, data_out, dol),
            Ok(Request::ExitFailureMode) => {
                // Only an operation that allowed it (AUSE) may be left
                // this way; otherwise a new sanitize has to succeed.
                let r = match self.sanitize_failed {
                    Some(false) => Err(CmdError::Check(Sense::invalid_field_in_cdb(1, Some(4)))),
                    _ => {
                        self.sanitize_failed = None;
                        Ok(status::GOOD)
                    }
                };
                self.finish(origin, r, data_in, data_out, dol)
            }
            Ok(Request::Start { mut job, immed }) => {
                self.sanitize_failed = None;
                if immed {
                    self.finish(origin, Ok(status::GOOD), data_in, data_out, dol);
                } else {
                    job.waiter = Some(Waiter {
                        tag: origin.tag,
                        nexus: origin.nexus,
                        stamp: origin.stamp,
                        data_in,
                        data_out,
                        data_out_len: dol,
                    });
                }
                self.spc.not_ready = Some(job.progress());
                self.sanitize = Some(*job);
                self.sanitize_pump();
            }
        }
    }

    /// Move the sanitize operation along: its next backstore operation
    /// once the commands that were running have drained, and its end.
    fn sanitize_pump(&mut self) {
        let Some(job) = self.sanitize.as_mut() else {
            return;
        };
        if !job.finished() {
            if self.slots.iter().any(Option::is_some) {
                return;
            }
            if let Some(mut io) = job.next_io(self.caps, self.sanitize_rate) {
                self.spc.not_ready = Some(job.progress());
                if self.each_write_durable() {
                    // Its overwrites go down with FUA; its deallocations
                    // (BLOCK ERASE) are not flushed before its GOOD yet.
                    let mut unused = false;
                    io.op = durable(io.op, &mut unused);
                }
                self.backstore.submit(io);
            }
            return;
        }
        let Some(job) = self.sanitize.take() else {
            return;
        };
        self.spc.not_ready = None;
        let r = if job.failed() {
            self.sanitize_failed = Some(job.ause());
            Err(CmdError::Check(sanitize::failed()))
        } else {
            Ok(status::GOOD)
        };
        if let Some(w) = job.waiter {
            let origin = Origin {
                tag: w.tag,
                nexus: w.nexus,
                stamp: w.stamp,
            };
            self.finish(origin, r, w.data_in, w.data_out, w.data_out_len);
        }
    }

    /// LOGICAL UNIT RESET requested by `by`: every task is aborted.
    pub fn reset(&mut self, by: NexusId) {
        self.abort_where(|_, _| true);
        self.spc.lun_reset(by)
    }

    /// The backstore's `completion_fd`: readable when completions wait
    /// for `poll`.
    pub fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        self.backstore.completion_fd()
    }

    /// Flush and close the backstore (blocking; used at shutdown).
    pub fn shutdown(&mut self) -> Result<(), i32> {
        self.backstore.shutdown()
    }
}
