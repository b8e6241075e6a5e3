//! Backstore on a regular file or a block device.
//!
//! Operations run on one io_uring per backstore. `submit` only queues
//! submission entries; `poll` enters the kernel once for the whole batch
//! the reactor built since the last poll, reaps whatever completions are
//! there without waiting, and enters once more only if reaping queued
//! follow-up work (the rest of a short transfer, a retry, a fallback).
//! Entering in `poll` rather than per `submit` costs nothing in latency:
//! the reactor always polls its backstores right after a round of
//! submissions, and the synchronous path already made completions wait
//! for that poll. A slow disk therefore no longer stalls the reactor. A
//! reactor that sleeps should also wait on `completion_fd`, an eventfd the
//! ring signals, so that a completion arriving while it sleeps wakes it.
//!
//! The ring is bounded: at most `MAX_IN_FLIGHT` operations are in the
//! kernel, each with at most one entry outstanding, so the submission
//! queue never fills and the completion queue (twice its size) never
//! overflows. Operations beyond that wait in a backlog of at most
//! `MAX_BACKLOG` and start as slots free; past even that, an operation
//! runs synchronously rather than being refused.
//!
//! When the ring cannot be set up (seccomp, io_uring disabled by sysctl, a
//! kernel without the opcodes used here) each syscall runs synchronously
//! inside `submit`, as the first version did, and its completion waits in
//! a queue for `poll`.
//!
//! With `FileOptions::direct` the file is opened O_DIRECT: data bypasses
//! the page cache, so offsets, lengths and buffer addresses must be
//! aligned to what the device or filesystem asks (statx DIOALIGN, else the
//! block device's logical block size, else 4096). Offsets and lengths come
//! from LBAs, and `Lun::new` refuses a block size that is not a multiple
//! of `io_align`, so only buffer addresses can be off; such transfers go
//! through a small pre-allocated set of aligned bounce buffers.

use super::{Backstore, BackstoreCaps, Extent, Io, IoDone, IoOp};
use io_uring::{opcode, types, IoUring, Probe};
use mempool::DataBuf;
use rustix::fs::{AtFlags, FallocateFlags, OFlags, SeekFrom, StatxFlags};
use rustix::io::{Errno, ReadWriteFlags};
use std::cell::OnceCell;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

const EINVAL: i32 = 22;
const EIO: i32 = 5;
const ENXIO: i32 = 6;

/// Zero-fill fallback writes go out in pieces of this size so a large
/// WRITE ZEROES does not allocate a buffer the size of the range; one such
/// buffer is allocated per backstore and shared by every piece.
const ZERO_PIECE: usize = 1 << 20;

/// Submission queue entries; the completion queue gets twice as many.
const RING_ENTRIES: u32 = 128;
/// Operations in the kernel at once. Each has at most one entry in the
/// ring, so this many never overflow the submission or completion queue.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;
/// Operations waiting for a ring slot. A LUN holds at most
/// `lun::MAX_TASKS` (1024) commands, each with one operation outstanding,
/// so only operations of aborted commands still in the kernel can push
/// past this; then work runs synchronously rather than growing memory
/// without bound.
const MAX_BACKLOG: usize = 4096;
/// One read or write entry moves at most this much; larger buffers go in
/// several (the opcode's length is 32 bits, and the kernel caps one
/// transfer just under 2 GiB anyway).
const MAX_RW: usize = 1 << 30;
/// EAGAIN and EINTR from an entry are retried this many times before the
/// error is reported, so a persistently busy device cannot spin us forever.
const MAX_RETRIES: u32 = 64;

/// Bounce buffers for O_DIRECT transfers whose memory is not aligned: a
/// few, allocated up front, each used for a whole operation in pieces of
/// its size. Buffers from the `mempool` crate will come aligned, and then
/// these only serve callers with their own buffers.
const BOUNCE_COUNT: usize = 8;
const BOUNCE_SIZE: usize = 256 << 10;

/// How to open a [`FileBackstore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// O_DIRECT: bypass the page cache. Fails to open on filesystems that
    /// refuse direct I/O.
    pub direct: bool,
    /// Open without write access; every modifying operation then fails with
    /// EROFS, and a missing file is not created.
    pub read_only: bool,
}

/// A heap buffer whose usable part starts at an aligned address. The `Vec`
/// is never resized, so the address stays valid while the kernel uses it.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize, align: usize) -> AlignedBuf {
        let raw = vec![0u8; len + align];
        let addr = raw.as_ptr() as usize;
        let start = (align - addr % align) % align;
        AlignedBuf { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// What both the ring and the synchronous path use.
struct Shared {
    file: File,
    size: u64,
    block_device: bool,
    read_only: bool,
    direct: bool,
    /// Alignment O_DIRECT needs of buffer addresses (1 without direct).
    mem_align: usize,
    /// Alignment O_DIRECT needs of offsets and lengths (1 without direct).
    off_align: usize,
    /// Cleared the first time the filesystem refuses an fallocate mode,
    /// so later requests go straight to the fallback.
    punch_ok: bool,
    zero_range_ok: bool,
    zeros: AlignedBuf,
    /// The synchronous path's bounce buffer (direct only).
    scratch: Option<AlignedBuf>,
}

/// Which part of an operation is in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading or writing `Op::buf`.
    Transfer,
    Sync,
    Punch,
    ZeroRange,
    /// Writing zeros from `Shared::zeros` over the range, piece by piece.
    ZeroFill,
}

/// An operation owned by the ring until its last completion is reaped.
struct Op {
    tag: u64,
    op: IoOp,
    /// The caller's buffer. It stays in this slab entry, unresized, while
    /// the kernel may touch it; its heap storage never moves.
    buf: DataBuf,
    /// Index into `Uring::bounce` when `buf` is not aligned for O_DIRECT.
    bounce: Option<usize>,
    stage: Stage,
    /// Bytes finished: of `buf` for transfers, of the range for zero fill.
    done: u64,
    retries: u32,
}

struct Uring {
    ring: IoUring,
    /// Slab indexed by `user_data`.
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    backlog: VecDeque<Io>,
    bounce: Vec<AlignedBuf>,
    free_bounce: Vec<usize>,
    /// Signalled by the kernel on each completion once somebody asked for
    /// it (`completion_fd`); until then no signalling cost is paid.
    eventfd: OnceCell<OwnedFd>,
    /// Completions copied out of the ring before acting on them.
    reaped: Vec<(u64, i32)>,
    warned_overflow: bool,
}

pub struct FileBackstore {
    sh: Shared,
    /// `None`: io_uring is unavailable and every operation runs inline.
    uring: Option<Uring>,
    done: VecDeque<IoDone>,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(EIO)
}

fn is_write(op: &IoOp) -> bool {
    !matches!(op, IoOp::Read { .. } | IoOp::Flush)
}

fn fallocate_unsupported(errno: i32) -> bool {
    errno == Errno::OPNOTSUPP.raw_os_error() || errno == Errno::NOSYS.raw_os_error()
}

fn retryable(errno: i32) -> bool {
    errno == Errno::AGAIN.raw_os_error() || errno == Errno::INTR.raw_os_error()
}

/// What O_DIRECT asks of (memory, offsets and lengths) for this file.
fn dio_align(file: &File, block_device: bool) -> io::Result<(usize, usize)> {
    if let Ok(st) = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0 {
            if st.stx_dio_offset_align == 0 {
                // statx's way of saying this file cannot do direct I/O,
                // even though open accepted the flag.
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the filesystem does not support direct I/O on this file",
                ));
            }
            return Ok((
                st.stx_dio_mem_align.max(1) as usize,
                st.stx_dio_offset_align as usize,
            ));
        }
    }
    if block_device {
        if let Ok(n) = rustix::fs::ioctl_blksszget(file) {
            return Ok((n as usize, n as usize));
        }
    }
    Ok((4096, 4096))
}

/// Read into `buf` at `offset` until it is full or the file ends; returns
/// how much was read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64, off_align: usize) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // Direct I/O moves whole blocks except at the end of the file, so
        // an unaligned position means the end was reached.
        if !done.is_multiple_of(off_align) {
            break;
        }
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Shared {
    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// The checks every operation passes before it starts.
    fn check(&self, op: &IoOp, buf_len: usize) -> Result<(), i32> {
        if is_write(op) && self.read_only {
            return Err(Errno::ROFS.raw_os_error());
        }
        let (offset, len) = match *op {
            IoOp::Read { offset } | IoOp::Write { offset, .. } => (offset, buf_len as u64),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => (offset, len),
            IoOp::Flush => return Ok(()),
        };
        if !self.in_range(offset, len) {
            return Err(EINVAL);
        }
        // The kernel would refuse these too; refusing here keeps a zero
        // fill fallback from failing halfway through the range.
        let a = self.off_align as u64;
        if self.direct && (!offset.is_multiple_of(a) || !len.is_multiple_of(a)) {
            return Err(EINVAL);
        }
        Ok(())
    }

    fn needs_bounce(&self, io: &Io) -> bool {
        self.direct
            && matches!(io.op, IoOp::Read { .. } | IoOp::Write { .. })
            && !io.buf.is_aligned(self.mem_align)
    }

    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let align = self.off_align;
        let mut done = 0;
        match self.scratch.as_mut() {
            Some(s) if !(buf.as_ptr() as usize).is_multiple_of(self.mem_align) => {
                while done < buf.len() {
                    let n = (buf.len() - done).min(s.len);
                    let got = read_full_at(
                        &self.file,
                        &mut s.as_mut_slice()[..n],
                        offset + done as u64,
                        align,
                    )?;
                    buf[done..done + got].copy_from_slice(&s.as_slice()[..got]);
                    done += got;
                    if got < n {
                        break;
                    }
                }
            }
            _ => done = read_full_at(&self.file, buf, offset, align)?,
        }
        // Someone shrank the file under us: the blocks past its new end
        // are gone, and zeros would pass for data.
        if done < buf.len() {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        Ok(())
    }

    fn write_sync(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        match self.scratch.as_mut() {
            Some(s) if !(buf.as_ptr() as usize).is_multiple_of(self.mem_align) => {
                let piece_len = s.len;
                for (i, piece) in buf.chunks(piece_len).enumerate() {
                    let d = &mut s.as_mut_slice()[..piece.len()];
                    d.copy_from_slice(piece);
                    self.file.write_all_at(d, offset + (i * piece_len) as u64)?;
                }
            }
            _ => self.file.write_all_at(buf, offset)?,
        }
        Ok(())
    }

    fn write_zeros_sync(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = self.zeros.as_slice();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard_sync(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.punch_ok {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(&self.file, flags, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if fallocate_unsupported(e.raw_os_error()) => self.punch_ok = false,
                Err(e) => return Err(e.into()),
            }
        }
        // Deallocated blocks must read as zeros (we report LBPRZ), so
        // without hole punching the range is written with zeros instead.
        self.write_zeros_sync(offset, len)
    }

    fn write_zeroes_sync(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.zero_range_ok {
            match rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if fallocate_unsupported(e.raw_os_error()) => self.zero_range_ok = false,
                Err(e) => return Err(e.into()),
            }
        }
        self.write_zeros_sync(offset, len)
    }

    /// The synchronous path: the whole operation inside the call.
    fn run_sync(&mut self, op: IoOp, buf: &mut DataBuf) -> Result<(), i32> {
        self.check(&op, buf.len())?;
        // Piece by piece: a scatter-gather buffer is several.
        let mut at = 0u64;
        let r = match op {
            IoOp::Read { offset } => buf.segments_mut().try_for_each(|piece| {
                self.read_sync(offset + at, piece)?;
                at += piece.len() as u64;
                Ok(())
            }),
            IoOp::Write { offset, fua } => buf
                .segments()
                .try_for_each(|piece| {
                    self.write_sync(offset + at, piece)?;
                    at += piece.len() as u64;
                    Ok(())
                })
                // FUA: one sync after all the pieces.
                .and_then(|()| match fua {
                    true => rustix::fs::fdatasync(&self.file).map_err(io::Error::from),
                    false => Ok(()),
                }),
            IoOp::Flush => rustix::fs::fdatasync(&self.file).map_err(io::Error::from),
            IoOp::Discard { offset, len } => self.discard_sync(offset, len),
            IoOp::WriteZeroes { offset, len } => self.write_zeroes_sync(offset, len),
        };
        r.map_err(|e| errno(&e))
    }
}

impl Uring {
    fn new(sh: &Shared) -> io::Result<Uring> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks {name}"),
                ));
            }
        }
        let bounce: Vec<AlignedBuf> = if sh.direct {
            let size = BOUNCE_SIZE.max(sh.off_align);
            (0..BOUNCE_COUNT)
                .map(|_| AlignedBuf::zeroed(size, sh.mem_align))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Uring {
            ring,
            ops: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            // Operations past the ring's MAX_IN_FLIGHT wait here: at most
            // the LUN's MAX_TASKS, sized now so a burst does not grow it.
            backlog: VecDeque::with_capacity(crate::lun::MAX_TASKS),
            free_bounce: (0..bounce.len()).rev().collect(),
            bounce,
            eventfd: OnceCell::new(),
            reaped: Vec::with_capacity(2 * RING_ENTRIES as usize),
            warned_overflow: false,
        })
    }

    fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free.len()
    }

    fn can_start(&self, sh: &Shared, io: &Io) -> bool {
        !self.free.is_empty() && (!sh.needs_bounce(io) || !self.free_bounce.is_empty())
    }

    /// Take a checked operation: start it, queue it, or (backlog full) run
    /// it here and now.
    fn submit(&mut self, sh: &mut Shared, io: Io, done: &mut VecDeque<IoDone>) {
        if self.backlog.is_empty() && self.can_start(sh, &io) {
            self.start(sh, io, done);
        } else if self.backlog.len() < MAX_BACKLOG {
            self.backlog.push_back(io);
        } else {
            if !self.warned_overflow {
                self.warned_overflow = true;
                tracing::warn!(
                    "file backstore: more than {} operations waiting; running the excess \
                     synchronously",
                    MAX_IN_FLIGHT + MAX_BACKLOG
                );
            }
            let Io { tag, op, mut buf } = io;
            let result = sh.run_sync(op, &mut buf);
            done.push_back(IoDone { tag, result, buf });
        }
    }

    fn start(&mut self, sh: &mut Shared, io: Io, done: &mut VecDeque<IoDone>) {
        let bounce = if sh.needs_bounce(&io) {
            self.free_bounce.pop()
        } else {
            None
        };
        let Io { tag, op, buf } = io;
        let stage = match op {
            IoOp::Read { .. } | IoOp::Write { .. } => Stage::Transfer,
            IoOp::Flush => Stage::Sync,
            IoOp::Discard { .. } if sh.punch_ok => Stage::Punch,
            IoOp::WriteZeroes { .. } if sh.zero_range_ok => Stage::ZeroRange,
            IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => Stage::ZeroFill,
        };
        let empty = match op {
            IoOp::Read { .. } | IoOp::Write { .. } => buf.is_empty(),
            IoOp::Discard { len, .. } | IoOp::WriteZeroes { len, .. } => len == 0,
            IoOp::Flush => false,
        };
        if empty {
            // A zero-length read would look like the end of the file.
            if let Some(b) = bounce {
                self.free_bounce.push(b);
            }
            done.push_back(IoDone {
                tag,
                result: Ok(()),
                buf,
            });
            return;
        }
        let Some(slot) = self.free.pop() else {
            unreachable!("start without a free slot");
        };
        self.ops[slot] = Some(Op {
            tag,
            op,
            buf,
            bounce,
            stage,
            done: 0,
            retries: 0,
        });
        self.push(sh, slot, done);
    }

    /// Queue the entry for the current step of the operation in `slot`.
    fn push(&mut self, sh: &mut Shared, slot: usize, done: &mut VecDeque<IoDone>) {
        let Some(op) = self.ops[slot].as_mut() else {
            return;
        };
        let fd = types::Fd(sh.file.as_raw_fd());
        let entry = match (op.stage, op.op) {
            (Stage::Transfer, IoOp::Read { offset }) => {
                let at = op.done as usize;
                let (ptr, n) = match op.bounce {
                    Some(b) => {
                        let bb = &mut self.bounce[b];
                        let n = (op.buf.len() - at).min(bb.len);
                        (bb.as_mut_slice().as_mut_ptr(), n)
                    }
                    None => {
                        let piece = op.buf.piece_at_mut(at, MAX_RW);
                        (piece.as_mut_ptr(), piece.len())
                    }
                };
                opcode::Read::new(fd, ptr, n as u32)
                    .offset(offset + op.done)
                    .build()
            }
            (Stage::Transfer, IoOp::Write { offset, fua }) => {
                let at = op.done as usize;
                let (ptr, n) = match op.bounce {
                    Some(b) => {
                        let bb = &mut self.bounce[b];
                        let n = (op.buf.len() - at).min(bb.len);
                        op.buf.copy_to_at(at, &mut bb.as_mut_slice()[..n]);
                        (bb.as_slice().as_ptr(), n)
                    }
                    None => {
                        let piece = op.buf.piece_at(at, MAX_RW);
                        (piece.as_ptr(), piece.len())
                    }
                };
                // RWF_DSYNC makes this one write durable, as FUA asks,
                // without flushing everything else the file has cached.
                let flags = if fua { ReadWriteFlags::DSYNC.bits() } else { 0 };
                opcode::Write::new(fd, ptr, n as u32)
                    .offset(offset + op.done)
                    .rw_flags(flags as i32)
                    .build()
            }
            (Stage::Sync, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (Stage::Punch, IoOp::Discard { offset, len }) => {
                let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode.bits() as i32)
                    .build()
            }
            (Stage::ZeroRange, IoOp::WriteZeroes { offset, len }) => {
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(FallocateFlags::ZERO_RANGE.bits() as i32)
                    .build()
            }
            (
                Stage::ZeroFill,
                IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len },
            ) => {
                let zeros = sh.zeros.as_slice();
                let n = (len - op.done).min(zeros.len() as u64) as usize;
                opcode::Write::new(fd, zeros.as_ptr(), n as u32)
                    .offset(offset + op.done)
                    .build()
            }
            (stage, op) => unreachable!("stage {stage:?} for {op:?}"),
        }
        .user_data(slot as u64);
        for attempt in 0..2 {
            // SAFETY: the entry points at memory that outlives the
            // operation: `op.buf`'s heap storage, owned by `self.ops[slot]`
            // and neither moved nor resized until the completion carrying
            // `slot` is reaped (`finish` takes it out only then); a bounce
            // buffer that this operation holds exclusively for the same
            // time; or `sh.zeros`, which the kernel only reads and which
            // lives as long as the backstore. `FileBackstore`'s `Drop`
            // waits for every completion before any of them is freed.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Cannot happen while MAX_IN_FLIGHT <= RING_ENTRIES, but a full
            // queue only needs handing to the kernel to make room.
            if attempt == 0 {
                self.enter();
            }
        }
        tracing::error!("file backstore: io_uring submission queue stuck full");
        self.finish(sh, slot, Err(EIO), done);
    }

    /// Hand queued entries to the kernel.
    fn enter(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        // EINTR, EAGAIN and EBUSY leave the entries queued; the next poll
        // enters again.
        if let Err(e) = self.ring.submit() {
            let n = errno(&e);
            if !retryable(n) && n != Errno::BUSY.raw_os_error() {
                tracing::error!("file backstore: io_uring_enter: {e}");
            }
        }
    }

    /// Copy out and act on the completions that are there; returns how
    /// many were reaped.
    fn reap(&mut self, sh: &mut Shared, done: &mut VecDeque<IoDone>) -> usize {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let n = reaped.len();
        for (slot, res) in reaped.drain(..) {
            self.complete(sh, slot as usize, res, done);
        }
        self.reaped = reaped;
        n
    }

    /// One completion for `slot`: the next step, or the end.
    fn complete(&mut self, sh: &mut Shared, slot: usize, res: i32, done: &mut VecDeque<IoDone>) {
        let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if res < 0 {
            let e = -res;
            if retryable(e) && op.retries < MAX_RETRIES {
                op.retries += 1;
                self.push(sh, slot, done);
                return;
            }
            let fell_back = match op.stage {
                Stage::Punch if fallocate_unsupported(e) => {
                    sh.punch_ok = false;
                    true
                }
                Stage::ZeroRange if fallocate_unsupported(e) => {
                    sh.zero_range_ok = false;
                    true
                }
                _ => false,
            };
            if fell_back {
                // Deallocated blocks must read as zeros (we report
                // LBPRZ), so without hole punching the range is written
                // with zeros instead.
                op.stage = Stage::ZeroFill;
                op.done = 0;
                self.push(sh, slot, done);
                return;
            }
            return self.finish(sh, slot, Err(e), done);
        }
        op.retries = 0;
        let n = res as usize;
        let len = match (op.stage, op.op) {
            (Stage::Sync | Stage::Punch | Stage::ZeroRange, _) => {
                return self.finish(sh, slot, Ok(()), done)
            }
            (Stage::Transfer, IoOp::Read { .. }) => {
                let at = op.done as usize;
                if let Some(b) = op.bounce {
                    op.buf.copy_from_at(at, &self.bounce[b].as_slice()[..n]);
                }
                op.done += n as u64;
                let at = op.done as usize;
                // The end of the file (it shrank under us), or for direct
                // I/O a partial block, which only happens there: the
                // blocks past it are gone, and zeros would pass for data.
                if at < op.buf.len() && (n == 0 || !at.is_multiple_of(sh.off_align)) {
                    return self.finish(sh, slot, Err(EIO), done);
                }
                op.buf.len() as u64
            }
            (Stage::Transfer, _) => {
                if n == 0 {
                    return self.finish(sh, slot, Err(EIO), done);
                }
                op.done += n as u64;
                op.buf.len() as u64
            }
            (Stage::ZeroFill, IoOp::Discard { len, .. } | IoOp::WriteZeroes { len, .. }) => {
                if n == 0 {
                    return self.finish(sh, slot, Err(EIO), done);
                }
                op.done += n as u64;
                len
            }
            (stage, op) => unreachable!("stage {stage:?} for {op:?}"),
        };
        if op.done < len {
            // A short transfer: the rest goes in again.
            self.push(sh, slot, done);
        } else {
            self.finish(sh, slot, Ok(()), done);
        }
    }

    fn finish(
        &mut self,
        sh: &mut Shared,
        slot: usize,
        result: Result<(), i32>,
        done: &mut VecDeque<IoDone>,
    ) {
        let Some(op) = self.ops[slot].take() else {
            return;
        };
        self.free.push(slot);
        if let Some(b) = op.bounce {
            self.free_bounce.push(b);
        }
        done.push_back(IoDone {
            tag: op.tag,
            result,
            buf: op.buf,
        });
        self.start_backlog(sh, done);
    }

    /// Start waiting operations, in order, while they fit.
    fn start_backlog(&mut self, sh: &mut Shared, done: &mut VecDeque<IoDone>) {
        while let Some(io) = self.backlog.front() {
            if !self.can_start(sh, io) {
                break;
            }
            let io = self.backlog.pop_front().unwrap();
            self.start(sh, io, done);
        }
    }

    fn poll(&mut self, sh: &mut Shared, done: &mut VecDeque<IoDone>) {
        self.enter();
        if self.reap(sh, done) > 0 {
            if let Some(fd) = self.eventfd.get() {
                // Reset the counter, then reap again: a completion whose
                // signal this read swallowed is already in the ring.
                let mut b = [0u8; 8];
                let _ = rustix::io::read(fd, &mut b);
                self.reap(sh, done);
            }
        }
        self.enter();
    }

    /// Block until nothing is in the kernel or waiting (shutdown).
    fn wait_idle(&mut self, sh: &mut Shared, done: &mut VecDeque<IoDone>) -> io::Result<()> {
        loop {
            self.start_backlog(sh, done);
            self.enter();
            self.reap(sh, done);
            if self.in_flight() == 0 {
                if self.backlog.is_empty() {
                    return Ok(());
                }
                // Nothing in the kernel holds a slot or bounce buffer, so
                // the backlog starts on the next turn.
                continue;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if retryable(errno(&e)) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl FileBackstore {
    /// Open `path`. A missing regular file is created at `size`; an
    /// existing one keeps its length unless `size` asks for more (then it
    /// grows, sparsely). A block device has its own size; a `size` larger
    /// than the device is an error, a smaller one exports a prefix.
    pub fn open(path: &Path, size: Option<u64>) -> io::Result<FileBackstore> {
        FileBackstore::open_opts(path, size, FileOptions::default())
    }

    /// Open without write access (for media the process may only read);
    /// every modifying operation then fails with EROFS.
    pub fn open_read_only(path: &Path) -> io::Result<FileBackstore> {
        let opts = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        FileBackstore::open_opts(path, None, opts)
    }

    /// `open` with options: O_DIRECT, read-only.
    pub fn open_opts(
        path: &Path,
        size: Option<u64>,
        opts: FileOptions,
    ) -> io::Result<FileBackstore> {
        FileBackstore::open_with(path, size, opts, true)
    }

    fn open_with(
        path: &Path,
        size: Option<u64>,
        opts: FileOptions,
        try_uring: bool,
    ) -> io::Result<FileBackstore> {
        let FileOptions { direct, read_only } = opts;
        let exists = path.exists();
        if !exists && size.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: does not exist and no size given", path.display()),
            ));
        }
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(!read_only)
            .create(!exists && !read_only);
        if direct {
            oo.custom_flags(OFlags::DIRECT.bits() as i32);
        }
        let mut file = oo.open(path).map_err(|e| {
            if direct && e.raw_os_error() == Some(EINVAL) {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{}: the filesystem refuses O_DIRECT (direct I/O): {e}; put the file \
                         on a filesystem that supports it or turn direct off",
                        path.display()
                    ),
                )
            } else {
                e
            }
        })?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let actual = if block_device {
            file.seek(io::SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or block device", path.display()),
            ));
        };
        let (mem_align, off_align) = if direct {
            dio_align(&file, block_device).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: direct I/O refused: {e}", path.display()),
                )
            })?
        } else {
            (1, 1)
        };
        let size = match size {
            None => actual,
            Some(s) if s <= actual => s,
            Some(s) if !block_device && !read_only => {
                file.set_len(s)?;
                s
            }
            Some(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: size {s} exceeds its {actual} bytes", path.display()),
                ))
            }
        };
        let sh = Shared {
            file,
            size,
            block_device,
            read_only,
            direct,
            mem_align,
            off_align,
            punch_ok: true,
            zero_range_ok: !block_device,
            zeros: AlignedBuf::zeroed(ZERO_PIECE.max(off_align), mem_align),
            scratch: direct.then(|| AlignedBuf::zeroed(BOUNCE_SIZE.max(off_align), mem_align)),
        };
        let uring = if try_uring {
            match Uring::new(&sh) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!(
                        "{}: io_uring unavailable ({e}); file I/O runs synchronously on the \
                         reactor",
                        path.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        Ok(FileBackstore {
            sh,
            uring,
            done: VecDeque::with_capacity(crate::lun::MAX_TASKS),
        })
    }

    /// Whether operations go through io_uring (false: the synchronous
    /// fallback).
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }
}

impl Backstore for FileBackstore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn size_bytes(&self) -> u64 {
        self.sh.size
    }

    fn caps(&self) -> BackstoreCaps {
        BackstoreCaps {
            discard: !self.sh.read_only,
            write_zeroes: !self.sh.read_only,
            volatile_cache: true,
            extent_status: !self.sh.block_device,
        }
    }

    fn io_align(&self) -> u32 {
        self.sh.off_align as u32
    }

    fn submit(&mut self, io: Io) {
        if let Err(e) = self.sh.check(&io.op, io.buf.len()) {
            self.done.push_back(IoDone {
                tag: io.tag,
                result: Err(e),
                buf: io.buf,
            });
            return;
        }
        match self.uring.as_mut() {
            Some(u) => u.submit(&mut self.sh, io, &mut self.done),
            None => {
                let Io { tag, op, mut buf } = io;
                let result = self.sh.run_sync(op, &mut buf);
                self.done.push_back(IoDone { tag, result, buf });
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize {
        if let Some(u) = self.uring.as_mut() {
            u.poll(&mut self.sh, &mut self.done);
        }
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        let u = self.uring.as_ref()?;
        if u.eventfd.get().is_none() {
            let flags =
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
            let fd = match rustix::event::eventfd(0, flags) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!("file backstore: eventfd: {e}");
                    return None;
                }
            };
            if let Err(e) = u.ring.submitter().register_eventfd(fd.as_raw_fd()) {
                tracing::warn!("file backstore: registering the completion eventfd: {e}");
                return None;
            }
            let _ = u.eventfd.set(fd);
        }
        u.eventfd.get().map(|fd| fd.as_fd())
    }

    fn extent_status(&mut self, offset: u64) -> Result<Extent, i32> {
        let size = self.sh.size;
        if offset >= size {
            return Err(EINVAL);
        }
        if self.sh.block_device {
            return Ok(Extent {
                mapped: true,
                len: size - offset,
            });
        }
        let pos = i64::try_from(offset).map_err(|_| EINVAL)?;
        // SEEK_DATA lands on `offset` itself when it is in data; otherwise
        // on the next data, or ENXIO when only a hole remains.
        let data = match rustix::fs::seek(&self.sh.file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(size),
            Err(e) if e.raw_os_error() == ENXIO => size,
            Err(e) => return Err(e.raw_os_error()),
        };
        if data > offset {
            return Ok(Extent {
                mapped: false,
                len: data - offset,
            });
        }
        let hole = match rustix::fs::seek(&self.sh.file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(size),
            Err(e) if e.raw_os_error() == ENXIO => size,
            Err(e) => return Err(e.raw_os_error()),
        };
        Ok(Extent {
            mapped: true,
            len: hole.saturating_sub(offset).max(1),
        })
    }

    fn shutdown(&mut self) -> Result<(), i32> {
        if let Some(u) = self.uring.as_mut() {
            // Completions that come in now have nobody to go to, but the
            // writes they finish must land before the final flush.
            u.wait_idle(&mut self.sh, &mut self.done)
                .map_err(|e| errno(&e))?;
        }
        if self.sh.read_only {
            return Ok(());
        }
        rustix::fs::fdatasync(&self.sh.file).map_err(|e| e.raw_os_error())
    }
}

impl Drop for FileBackstore {
    fn drop(&mut self) {
        let Some(u) = self.uring.as_mut() else {
            return;
        };
        // The kernel may still be reading or writing buffers owned here;
        // they must outlive every operation it has, so wait them out.
        let mut sink = VecDeque::new();
        if let Err(e) = u.wait_idle(&mut self.sh, &mut sink) {
            tracing::error!("file backstore: cannot wait for io_uring operations: {e}");
            // Unsafe to free what the kernel may still touch: leak it.
            std::mem::forget(std::mem::take(&mut u.ops));
            std::mem::forget(std::mem::take(&mut u.bounce));
            std::mem::forget(std::mem::replace(
                &mut self.sh.zeros,
                AlignedBuf::zeroed(0, 1),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Poll until `n` completions have come back (io_uring completes in
    /// the background); sorted by tag for easy checking.
    fn wait(b: &mut FileBackstore, n: usize) -> Vec<IoDone> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < n {
            b.poll(&mut out);
            assert!(
                Instant::now() < deadline,
                "{} of {n} completions",
                out.len()
            );
            std::thread::yield_now();
        }
        assert_eq!(out.len(), n, "more completions than operations");
        out.sort_by_key(|d| d.tag);
        out
    }

    #[test]
    fn data_in_pieces_is_written_and_read_piece_by_piece() {
        let dir = tempfile::tempdir().unwrap();
        let pattern: Vec<u8> = (0..20480u32).map(|i| (i * 13 + i / 4096) as u8).collect();
        let sg = crate::backstore::test_sg_buf;
        for (uring, direct) in [(true, false), (false, false), (true, true), (false, true)] {
            let path = dir.path().join(format!("sg-{uring}-{direct}.img"));
            let opts = FileOptions {
                direct,
                ..FileOptions::default()
            };
            let mut b = match FileBackstore::open_with(&path, Some(1 << 20), opts, uring) {
                Ok(b) => b,
                // A filesystem without O_DIRECT (tmpfs before 6.6).
                Err(_) if direct => continue,
                Err(e) => panic!("{e}"),
            };
            let write = IoOp::Write {
                offset: 8192,
                fua: true,
            };
            assert_eq!(
                run(&mut b, write, sg(&pattern)).result,
                Ok(()),
                "{uring} {direct}"
            );
            let d = run(&mut b, IoOp::Read { offset: 12288 }, sg(&[0xff; 12288]));
            assert_eq!(d.result, Ok(()));
            assert!(d.buf == pattern[4096..16384], "{uring} {direct}");
            assert_eq!(d.buf.segment_count(), 3);
            // Across the end of a file that shrank: an error, not zeros.
            b.sh.file.set_len(16384).unwrap();
            let d = run(&mut b, IoOp::Read { offset: 8192 }, sg(&[0xff; 16384]));
            assert_eq!(d.result, Err(EIO), "{uring} {direct}");
            let d = run(&mut b, IoOp::Read { offset: 8192 }, sg(&[0xff; 8192]));
            assert_eq!(d.result, Ok(()));
            assert!(d.buf == pattern[..8192], "{uring} {direct}");
        }
    }

    fn run(b: &mut FileBackstore, op: IoOp, buf: DataBuf) -> IoDone {
        b.submit(Io { tag: 3, op, buf });
        wait(b, 1).pop().unwrap()
    }

    fn write(offset: u64) -> IoOp {
        IoOp::Write { offset, fua: false }
    }

    fn uring_expected() -> bool {
        // The project's machines run io_uring; a sysctl may turn it off.
        std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim() == "0")
            .unwrap_or(true)
    }

    /// Open with and without io_uring: both paths must behave the same.
    fn open_both(p: &Path, size: Option<u64>, opts: FileOptions) -> [FileBackstore; 2] {
        let u = FileBackstore::open_with(p, size, opts, true).unwrap();
        if uring_expected() {
            assert!(u.uses_io_uring(), "io_uring setup failed");
        }
        let s = FileBackstore::open_with(p, None, opts, false).unwrap();
        assert!(!s.uses_io_uring());
        [u, s]
    }

    #[test]
    fn create_requires_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        assert!(FileBackstore::open(&p, None).is_err());
        let b = FileBackstore::open(&p, Some(1 << 20)).unwrap();
        assert_eq!(b.size_bytes(), 1 << 20);
        drop(b);
        let b = FileBackstore::open(&p, None).unwrap();
        assert_eq!(b.size_bytes(), 1 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let mut b = FileBackstore::open_read_only(&p).unwrap();
        assert!(!b.caps().discard);
        let d = run(&mut b, write(0), vec![0; 512].into());
        assert_eq!(d.result, Err(Errno::ROFS.raw_os_error()));
        // Growing an existing file.
        let b = FileBackstore::open(&p, Some(2 << 20)).unwrap();
        assert_eq!(b.size_bytes(), 2 << 20);
    }

    fn punch_and_extents(b: &mut FileBackstore) {
        let size = b.size_bytes();
        // A fresh sparse file is one hole.
        let e = b.extent_status(0).unwrap();
        assert!(!e.mapped);
        assert_eq!(e.len, size);

        let d = run(
            b,
            IoOp::Write {
                offset: 1 << 20,
                fua: true,
            },
            vec![0x5a; 1 << 20].into(),
        );
        assert_eq!(d.result, Ok(()));
        let d = run(
            b,
            IoOp::Read {
                offset: (1 << 20) - 4,
            },
            vec![1; 8].into(),
        );
        assert_eq!(d.result, Ok(()));
        assert_eq!(d.buf, [0, 0, 0, 0, 0x5a, 0x5a, 0x5a, 0x5a]);
        assert_eq!(run(b, IoOp::Flush, Vec::new().into()).result, Ok(()));

        // Filesystems allocate in their own blocks; tmpfs and ext4 use 4K
        // pages/blocks, so a 1 MiB aligned write is an exact extent.
        let e = b.extent_status(1 << 20).unwrap();
        assert!(e.mapped);
        assert_eq!(e.len, 1 << 20);
        let e = b.extent_status(0).unwrap();
        assert!(!e.mapped);
        assert_eq!(e.len, 1 << 20);

        let d = run(
            b,
            IoOp::Discard {
                offset: 1 << 20,
                len: 64 << 10,
            },
            Vec::new().into(),
        );
        assert_eq!(d.result, Ok(()));
        let d = run(b, IoOp::Read { offset: 1 << 20 }, vec![1; 64 << 10].into());
        assert!(d.buf.iter().all(|&x| x == 0));
        let d = run(
            b,
            IoOp::Read {
                offset: (1 << 20) + (64 << 10),
            },
            vec![0; 4].into(),
        );
        assert_eq!(d.buf, [0x5a; 4]);

        let d = run(
            b,
            IoOp::WriteZeroes {
                offset: (1 << 20) + (128 << 10) + 100,
                len: 1000,
            },
            Vec::new().into(),
        );
        assert_eq!(d.result, Ok(()));
        let d = run(
            b,
            IoOp::Read {
                offset: (1 << 20) + (128 << 10),
            },
            vec![1; 2000].into(),
        );
        assert!(d.buf[..100].iter().all(|&x| x == 0x5a));
        assert!(d.buf[100..1100].iter().all(|&x| x == 0));
        assert!(d.buf[1100..].iter().all(|&x| x == 0x5a));

        let d = run(b, IoOp::Read { offset: size - 1 }, vec![0; 2].into());
        assert_eq!(d.result, Err(EINVAL));
        assert!(b.extent_status(size).is_err());
        assert_eq!(b.shutdown(), Ok(()));
    }

    #[test]
    fn io_punch_and_extents() {
        for uring in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("lun0");
            let mut b =
                FileBackstore::open_with(&p, Some(4 << 20), FileOptions::default(), uring).unwrap();
            punch_and_extents(&mut b);
        }
    }

    #[test]
    fn fua_flush_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        for mut b in open_both(&p, Some(1 << 20), FileOptions::default()) {
            let salt = b.uses_io_uring() as u32;
            let data: DataBuf = (0..8192u32).map(|i| (i * 7 + salt) as u8).collect();
            let d = run(
                &mut b,
                IoOp::Write {
                    offset: 4096,
                    fua: true,
                },
                data.clone(),
            );
            assert_eq!(d.result, Ok(()));
            assert_eq!(run(&mut b, write(0), vec![9; 4096].into()).result, Ok(()));
            assert_eq!(run(&mut b, IoOp::Flush, Vec::new().into()).result, Ok(()));
            let d = run(
                &mut b,
                IoOp::Read { offset: 0 },
                vec![0; 4096 + 8192].into(),
            );
            assert_eq!(d.result, Ok(()));
            assert_eq!(&d.buf[..4096], &[9; 4096][..]);
            assert_eq!(&d.buf[4096..], &data[..]);
            // Another descriptor sees the same bytes: they reached the file.
            let mut check = vec![0; 8192];
            File::open(&p)
                .unwrap()
                .read_exact_at(&mut check, 4096)
                .unwrap();
            assert_eq!(check, data);
            // Empty transfers complete without touching the file.
            let d = run(&mut b, IoOp::Read { offset: 0 }, Vec::new().into());
            assert_eq!(d.result, Ok(()));
            assert_eq!(
                run(&mut b, write(1 << 20), Vec::new().into()).result,
                Ok(())
            );
        }
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        let size = 1u64 << 20;
        for mut b in open_both(&p, Some(size), FileOptions::default()) {
            for (op, len) in [
                (IoOp::Read { offset: size }, 1),
                (IoOp::Read { offset: size - 512 }, 1024),
                (IoOp::Read { offset: u64::MAX }, 1),
                (write(size - 1), 2),
                (
                    IoOp::Discard {
                        offset: size,
                        len: 1,
                    },
                    0,
                ),
                (
                    IoOp::WriteZeroes {
                        offset: 1,
                        len: u64::MAX,
                    },
                    0,
                ),
            ] {
                let d = run(&mut b, op, vec![0; len].into());
                assert_eq!(d.result, Err(EINVAL), "{op:?}");
            }
        }
        let opts = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        for mut b in open_both(&p, None, opts) {
            let rofs = Err(Errno::ROFS.raw_os_error());
            assert_eq!(run(&mut b, write(0), vec![0; 512].into()).result, rofs);
            let d = IoOp::Discard {
                offset: 0,
                len: 512,
            };
            assert_eq!(run(&mut b, d, Vec::new().into()).result, rofs);
            let z = IoOp::WriteZeroes {
                offset: 0,
                len: 512,
            };
            assert_eq!(run(&mut b, z, Vec::new().into()).result, rofs);
            // Out of range and read-only: read-only wins, as before.
            assert_eq!(run(&mut b, write(size), vec![0; 512].into()).result, rofs);
            assert_eq!(run(&mut b, IoOp::Flush, Vec::new().into()).result, Ok(()));
            let d = run(&mut b, IoOp::Read { offset: 0 }, vec![1; 512].into());
            assert_eq!(d.result, Ok(()));
            assert_eq!(b.shutdown(), Ok(()));
        }
    }

    /// The file shrinks under the backstore: a read across or past the
    /// new end fails with EIO (MEDIUM ERROR for the initiator) rather
    /// than passing zeros off as data; what is left reads as before, and
    /// a write past the end grows the file again.
    #[test]
    fn reads_past_a_shrunk_end_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        let resize = |len| {
            OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len)
                .unwrap()
        };
        for mut b in open_both(&p, Some(1 << 20), FileOptions::default()) {
            assert_eq!(
                run(&mut b, write(0), vec![7; 1 << 20].into()).result,
                Ok(())
            );
            resize(300_000);
            let d = run(
                &mut b,
                IoOp::Read { offset: 290_000 },
                vec![1; 20_000].into(),
            );
            assert_eq!(d.result, Err(EIO));
            let d = run(&mut b, IoOp::Read { offset: 500_000 }, vec![1; 4096].into());
            assert_eq!(d.result, Err(EIO));
            let d = run(&mut b, IoOp::Read { offset: 0 }, vec![1; 4096].into());
            assert_eq!(d.result, Ok(()));
            assert!(d.buf.iter().all(|&x| x == 7));
            assert_eq!(
                run(&mut b, write(500_000), vec![9; 4096].into()).result,
                Ok(())
            );
            let d = run(&mut b, IoOp::Read { offset: 500_000 }, vec![1; 4096].into());
            assert_eq!(d.result, Ok(()));
            assert!(d.buf.iter().all(|&x| x == 9));
            resize(1 << 20);
        }
    }

    /// Without hole punching or zero ranges the ranges are written with
    /// zeros, piece by piece (more than one piece here).
    #[test]
    fn zero_fill_fallbacks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        let size = 4u64 << 20;
        for mut b in open_both(&p, Some(size), FileOptions::default()) {
            b.sh.punch_ok = false;
            b.sh.zero_range_ok = false;
            let d = run(&mut b, write(0), vec![0xee; size as usize].into());
            assert_eq!(d.result, Ok(()));
            let len = 2 * ZERO_PIECE + 12_345;
            let d = IoOp::Discard {
                offset: 1000,
                len: len as u64,
            };
            assert_eq!(run(&mut b, d, Vec::new().into()).result, Ok(()));
            let z = IoOp::WriteZeroes {
                offset: 3 << 20,
                len: 4096,
            };
            assert_eq!(run(&mut b, z, Vec::new().into()).result, Ok(()));
            let d = run(
                &mut b,
                IoOp::Read { offset: 0 },
                vec![1; size as usize].into(),
            );
            let buf = &d.buf;
            assert!(buf[..1000].iter().all(|&x| x == 0xee));
            assert!(buf[1000..1000 + len].iter().all(|&x| x == 0));
            assert!(buf[1000 + len..3 << 20].iter().all(|&x| x == 0xee));
            assert!(buf[3 << 20..(3 << 20) + 4096].iter().all(|&x| x == 0));
            assert!(buf[(3 << 20) + 4096..].iter().all(|&x| x == 0xee));
        }
    }

    fn pattern(i: u64, len: usize) -> DataBuf {
        (0..len)
            .map(|j| (i as usize * 31 + j / 512) as u8)
            .collect()
    }

    /// Far more operations than the ring takes: the rest wait in the
    /// backlog and start as slots free; the ring never holds more than
    /// its limit.
    fn many_ops(b: &mut FileBackstore, n: u64, len: usize) {
        for i in 0..n {
            b.submit(Io {
                tag: i,
                op: IoOp::Write {
                    offset: i * len as u64,
                    fua: i % 50 == 0,
                },
                buf: pattern(i, len),
            });
        }
        if let Some(u) = &b.uring {
            assert!(u.in_flight() <= MAX_IN_FLIGHT);
            assert!(!u.backlog.is_empty());
        }
        b.submit(Io {
            tag: n,
            op: IoOp::Flush,
            buf: Vec::new().into(),
        });
        for d in wait(b, n as usize + 1) {
            assert_eq!(d.result, Ok(()), "tag {}", d.tag);
        }
        for i in 0..n {
            b.submit(Io {
                tag: i,
                op: IoOp::Read {
                    offset: i * len as u64,
                },
                buf: vec![0; len].into(),
            });
        }
        for d in wait(b, n as usize) {
            assert_eq!(d.result, Ok(()));
            assert!(d.buf == pattern(d.tag, len), "tag {}", d.tag);
        }
        if let Some(u) = &b.uring {
            assert_eq!(u.in_flight(), 0);
            assert!(u.backlog.is_empty());
            assert_eq!(u.free_bounce.len(), u.bounce.len());
        }
    }

    #[test]
    fn many_concurrent_ops_beyond_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        for mut b in open_both(&p, Some(8 << 20), FileOptions::default()) {
            many_ops(&mut b, 1000, 8192);
        }
    }

    /// Past the backlog's limit, operations run synchronously and still
    /// complete, each once.
    #[test]
    fn backlog_overflow_runs_inline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        let mut b = FileBackstore::open(&p, Some(1 << 20)).unwrap();
        if !b.uses_io_uring() {
            println!("skipped: io_uring unavailable");
            return;
        }
        let n = (MAX_IN_FLIGHT + MAX_BACKLOG + 100) as u64;
        for i in 0..n {
            b.submit(Io {
                tag: i,
                op: IoOp::Read {
                    offset: (i % 2048) * 512,
                },
                buf: vec![1; 512].into(),
            });
        }
        let u = b.uring.as_ref().unwrap();
        assert_eq!(u.backlog.len(), MAX_BACKLOG);
        assert!(b.done.len() >= 100);
        let out = wait(&mut b, n as usize);
        for (i, d) in out.iter().enumerate() {
            assert_eq!(d.tag, i as u64);
            assert_eq!(d.result, Ok(()));
            assert!(d.buf.iter().all(|&x| x == 0));
        }
    }

    /// Dropping the backstore with operations in the kernel waits for
    /// them: their buffers are not freed under the kernel, and the writes
    /// land.
    #[test]
    fn drop_waits_for_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        let mut b = FileBackstore::open(&p, Some(4 << 20)).unwrap();
        for i in 0..300u64 {
            b.submit(Io {
                tag: i,
                op: write(i * 8192),
                buf: pattern(i, 8192),
            });
        }
        // One poll hands the first batch to the kernel; the rest stays in
        // the backlog and is finished by drop.
        let mut out = Vec::new();
        b.poll(&mut out);
        drop(b);
        let f = File::open(&p).unwrap();
        for i in 0..300u64 {
            let mut got = vec![0; 8192];
            f.read_exact_at(&mut got, i * 8192).unwrap();
            assert!(got == pattern(i, 8192), "block {i}");
        }
    }

    #[test]
    fn completion_fd_wakes_a_sleeper() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        let mut b = FileBackstore::open(&p, Some(1 << 20)).unwrap();
        if !b.uses_io_uring() {
            assert!(b.completion_fd().is_none());
            println!("skipped: io_uring unavailable");
            return;
        }
        let fd = b.completion_fd().unwrap().try_clone_to_owned().unwrap();
        for round in 0..3u64 {
            b.submit(Io {
                tag: round,
                op: IoOp::Write {
                    offset: 0,
                    fua: true,
                },
                buf: vec![round as u8; 4096].into(),
            });
            b.submit(Io {
                tag: 10 + round,
                op: IoOp::Flush,
                buf: Vec::new().into(),
            });
            let mut out = Vec::new();
            b.poll(&mut out);
            let deadline = Instant::now() + Duration::from_secs(20);
            while out.len() < 2 {
                // Sleep the way a reactor would: on the descriptor.
                let mut pfd = [rustix::event::PollFd::new(
                    &fd,
                    rustix::event::PollFlags::IN,
                )];
                match rustix::event::poll(&mut pfd, 10_000) {
                    Ok(n) => assert_eq!(n, 1, "completion_fd never became readable"),
                    // io_uring's task work may interrupt the sleep too.
                    Err(Errno::INTR) => {}
                    Err(e) => panic!("poll: {e}"),
                }
                b.poll(&mut out);
                assert!(Instant::now() < deadline);
            }
            assert!(out.iter().all(|d| d.result.is_ok()));
        }
    }

    fn dir_for_direct() -> tempfile::TempDir {
        // /tmp may be tmpfs on other machines; /var/tmp is normally on a
        // disk filesystem.
        tempfile::tempdir_in("/var/tmp").unwrap_or_else(|_| tempfile::tempdir().unwrap())
    }

    fn open_direct(p: &Path, size: u64, uring: bool) -> Option<FileBackstore> {
        let opts = FileOptions {
            direct: true,
            read_only: false,
        };
        match FileBackstore::open_with(p, Some(size), opts, uring) {
            Ok(b) => Some(b),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("O_DIRECT"), "unclear refusal: {msg}");
                println!("skipped: the filesystem refuses O_DIRECT: {msg}");
                None
            }
        }
    }

    fn direct_data_ops(b: &mut FileBackstore) {
        let d = run(
            b,
            IoOp::Write {
                offset: 1 << 20,
                fua: true,
            },
            vec![0x5a; 1 << 20].into(),
        );
        assert_eq!(d.result, Ok(()));
        assert_eq!(run(b, IoOp::Flush, Vec::new().into()).result, Ok(()));
        let d = IoOp::Discard {
            offset: 1 << 20,
            len: 64 << 10,
        };
        assert_eq!(run(b, d, Vec::new().into()).result, Ok(()));
        let z = IoOp::WriteZeroes {
            offset: (1 << 20) + (128 << 10),
            len: 4096,
        };
        assert_eq!(run(b, z, Vec::new().into()).result, Ok(()));
        let d = run(b, IoOp::Read { offset: 1 << 20 }, vec![1; 256 << 10].into());
        assert_eq!(d.result, Ok(()));
        let (a, rest) = d.buf.split_at(64 << 10);
        let (m, rest) = rest.split_at(64 << 10);
        let (z, rest) = rest.split_at(4096);
        assert!(a.iter().all(|&x| x == 0));
        assert!(m.iter().all(|&x| x == 0x5a));
        assert!(z.iter().all(|&x| x == 0));
        assert!(rest.iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn direct_io() {
        for uring in [true, false] {
            let dir = dir_for_direct();
            let p = dir.path().join("lun0");
            let Some(mut b) = open_direct(&p, 8 << 20, uring) else {
                return;
            };
            let a = b.io_align() as usize;
            assert!(a.is_power_of_two() && a <= 4096, "alignment {a}");
            println!(
                "direct I/O alignment: memory {}, offsets {a}",
                b.sh.mem_align
            );
            direct_data_ops(&mut b);
            // Unaligned offsets and lengths are refused before the kernel
            // sees them.
            if a > 1 {
                let d = run(
                    &mut b,
                    IoOp::Read {
                        offset: a as u64 / 2,
                    },
                    vec![0; a].into(),
                );
                assert_eq!(d.result, Err(EINVAL));
                let d = run(&mut b, write(0), vec![0; a + 1].into());
                assert_eq!(d.result, Err(EINVAL));
            }
            // With whatever alignment buffers happen to have, then with
            // every buffer treated as unaligned: all transfers bounce,
            // more of them at once than there are bounce buffers.
            many_ops(&mut b, 300, 8192);
            b.sh.mem_align = 1 << 30;
            many_ops(&mut b, 300, 8192);
            // Longer than one bounce buffer: it goes in pieces.
            let big: DataBuf = (0..(BOUNCE_SIZE * 2 + 4096))
                .map(|i| (i / 4096) as u8)
                .collect();
            assert_eq!(run(&mut b, write(1 << 20), big.clone()).result, Ok(()));
            let d = run(
                &mut b,
                IoOp::Read { offset: 1 << 20 },
                vec![0; big.len()].into(),
            );
            assert_eq!(d.result, Ok(()));
            assert!(d.buf == big);
            assert_eq!(b.shutdown(), Ok(()));
        }
    }

    /// A filesystem that will not do direct I/O is named as such, not
    /// reported as a bare EINVAL.
    #[test]
    fn direct_refusal_is_clear() {
        // procfs files are regular files that refuse O_DIRECT at open;
        // tmpfs did too before Linux 6.6.
        let shm = tempfile::tempdir_in("/dev/shm").ok();
        let mut candidates = vec![(Path::new("/proc/self/status").to_path_buf(), None)];
        if let Some(d) = &shm {
            candidates.push((d.path().join("lun0"), Some(1 << 20)));
        }
        let mut refused = 0;
        for (p, size) in candidates {
            let opts = FileOptions {
                direct: true,
                read_only: size.is_none(),
            };
            match FileBackstore::open_opts(&p, size, opts) {
                Ok(_) => println!("{}: O_DIRECT accepted", p.display()),
                Err(e) => {
                    let msg = e.to_string();
                    println!("{}: {msg}", p.display());
                    assert!(msg.contains("refuses O_DIRECT"), "{msg}");
                    assert!(msg.contains(&p.display().to_string()), "{msg}");
                    refused += 1;
                }
            }
        }
        if refused == 0 {
            println!("skipped: no filesystem here refuses O_DIRECT");
        }
    }
}
