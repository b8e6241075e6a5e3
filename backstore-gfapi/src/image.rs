//! One image file on a volume, exported as a LUN: the `Backstore`.
//!
//! Each operation takes one of `SLOTS` preallocated in-flight slots, which
//! owns the operation's buffer until gfapi's callback for it has run. The
//! callback (on one of gluster's threads) pushes `(slot, result, errno)`
//! onto a bounded lock-free queue with one place per slot, so the push
//! cannot fail and allocates nothing, then writes an eventfd. The
//! reactor's `poll` drains the queue and finishes operations or starts
//! their next step (the fdatasync after a FUA write, the rest of a short
//! transfer, zero fill where discard is refused).
//!
//! Every operation has a deadline (`command_timeout`). A timer checks
//! them: an operation past it completes with ETIMEDOUT, its slot keeps the
//! buffer until the late callback arrives and is only then reused.
//! `completion_fd` is an epoll descriptor over the eventfd and that timer,
//! so the reactor wakes for either.

use crate::volume::Volume;
use crossbeam_queue::ArrayQueue;
use gfapi_sys as sys;
use mempool::{DataBuf, DATA_SEGMENTS_MAX};
use rustix::event::epoll;
use rustix::event::{EventfdFlags, PollFd, PollFlags};
use scsi::backstore::{Backstore, BackstoreCaps, Io, IoDone, IoOp};
use std::collections::VecDeque;
use std::ffi::{c_void, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Operations in gfapi at once per LUN.
const SLOTS: usize = 128;
/// Operations waiting for a slot. A LUN holds at most 1024 commands, so
/// only slots held by timed-out operations push past this; then new
/// operations fail with EBUSY (retryable) instead of growing memory.
const MAX_BACKLOG: usize = 4096;
/// gfapi refuses a single iovec of 1 GiB or more; transfers go in pieces
/// of at most this.
const MAX_RW: usize = 256 << 20;
/// How long `drop` and `shutdown` wait for operations still in gfapi.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Default bound on one operation (README: gluster ping-timeout 10 s <
/// command timeout 20 s < Linux's SCSI command timeout 30 s).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// How to open an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOptions {
    /// Operations not completed by gfapi within this complete with
    /// ETIMEDOUT.
    pub command_timeout: Duration,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

/// A finished gfapi call, as the callback saw it.
#[derive(Clone, Copy)]
struct Completion {
    slot: u32,
    ret: isize,
    errno: i32,
}

/// What the callback touches: it lives at a fixed address (boxed) for as
/// long as any operation may call back.
struct Sink {
    queue: ArrayQueue<Completion>,
    eventfd: OwnedFd,
}

/// The `data` pointer given to gfapi for one slot.
struct CallbackCtx {
    sink: *const Sink,
    slot: u32,
}

/// gfapi's completion callback. Runs on a gluster thread: it must not
/// block, allocate or panic.
unsafe extern "C" fn on_complete(
    _fd: *mut sys::glfs_fd_t,
    ret: isize,
    _prestat: *mut sys::glfs_stat,
    _poststat: *mut sys::glfs_stat,
    data: *mut c_void,
) {
    let errno = if ret < 0 {
        // SAFETY: __errno_location returns this thread's errno, which
        // gfapi set before calling back with -1.
        unsafe { *libc::__errno_location() }
    } else {
        0
    };
    // SAFETY: `data` is the `CallbackCtx` of the slot this call was
    // submitted for; contexts and the sink they point to are freed only
    // after every submitted call has called back (or are leaked).
    let ctx = unsafe { &*(data as *const CallbackCtx) };
    // SAFETY: as above.
    let sink = unsafe { &*ctx.sink };
    // One place per slot and at most one call per slot in gfapi: never
    // full.
    let _ = sink.queue.push(Completion {
        slot: ctx.slot,
        ret,
        errno,
    });
    let _ = rustix::io::write(&sink.eventfd, &1u64.to_ne_bytes());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Transfer,
    Sync,
    Discard,
    ZeroFill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// In gfapi; the caller waits for it.
    Busy,
    /// Timed out: the caller got ETIMEDOUT, gfapi still owns the buffer.
    Orphan,
}

struct Slot {
    state: SlotState,
    tag: u64,
    op: IoOp,
    stage: Stage,
    /// The caller's buffer, handed to gfapi as it is. Its heap storage is
    /// neither moved nor resized while gfapi may use it.
    buf: DataBuf,
    /// Bytes of `buf` transferred so far.
    done: usize,
    deadline: Instant,
}

pub struct GlusterBackstore {
    vol: Arc<Volume>,
    fd: NonNull<sys::glfs_fd_t>,
    name: String,
    size: u64,
    timeout: Duration,
    slots: Vec<Slot>,
    /// `DATA_SEGMENTS_MAX` iovecs per slot, at fixed addresses, for
    /// preadv/pwritev: one per buffer of a scatter-gather `DataBuf`, so a
    /// command is one gluster operation however its buffer is made.
    iovs: Box<[libc::iovec]>,
    /// From `Box::into_raw`; freed in drop unless leaked.
    ctxs: NonNull<[CallbackCtx]>,
    sink: NonNull<Sink>,
    free: Vec<u32>,
    backlog: VecDeque<(Io, Instant)>,
    done: VecDeque<IoDone>,
    /// Slots in gfapi (busy or orphaned).
    in_gfapi: usize,
    /// Cleared when the volume refuses discard; zero fill is used then.
    discard_ok: bool,
    timer: OwnedFd,
    timer_at: Option<Instant>,
    epoll: OwnedFd,
    warned_full: bool,
    /// The errno of the last failed operation, 0 after a success: failures
    /// are logged when they start or change, not once per command.
    failing: i32,
}

// SAFETY: the raw pointers (fd, contexts, sink, iovecs) are used from the
// thread that owns the backstore, and from gluster threads only through
// the callback, which touches nothing but the sink's lock-free queue and
// eventfd. A LUN is moved to its reactor once and never shared.
unsafe impl Send for GlusterBackstore {}

fn last_errno() -> i32 {
    let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if e == 0 {
        libc::EIO
    } else {
        e
    }
}

fn os_err(what: String, e: i32) -> io::Error {
    let base = io::Error::from_raw_os_error(e);
    io::Error::new(base.kind(), format!("{what}: {base}"))
}

impl GlusterBackstore {
    /// Open `path` (starting with '/') on `vol`. A missing file is created
    /// at `size`; an existing one keeps its length unless `size` asks for
    /// more (it grows, sparsely); without `size` the LUN has the file's
    /// size. Blocking: call it at startup, off the reactors.
    pub fn open(
        vol: Arc<Volume>,
        path: &str,
        size: Option<u64>,
        opts: ImageOptions,
    ) -> io::Result<GlusterBackstore> {
        let name = format!("gluster volume {} image {path}", vol.name());
        let cpath = CString::new(path).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: NUL in path"))
        })?;
        // SAFETY: valid handle and NUL-terminated path.
        let mut fd = unsafe { sys::glfs_open(vol.raw(), cpath.as_ptr(), libc::O_RDWR) };
        if fd.is_null() {
            let e = last_errno();
            if e != libc::ENOENT {
                return Err(os_err(format!("{name}: open"), e));
            }
            if size.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{name}: does not exist and no size given (add ?size=SIZE)"),
                ));
            }
            // SAFETY: as above. O_EXCL: if another creator won the race,
            // fail rather than truncate its file.
            fd = unsafe {
                sys::glfs_creat(
                    vol.raw(),
                    cpath.as_ptr(),
                    libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                    0o644,
                )
            };
            if fd.is_null() {
                return Err(os_err(format!("{name}: create"), last_errno()));
            }
        }
        let Some(fd) = NonNull::new(fd) else {
            return Err(io::Error::other(format!("{name}: open")));
        };
        let close = |e: io::Error| {
            // SAFETY: `fd` is open and nothing else uses it.
            unsafe { sys::glfs_close(fd.as_ptr()) };
            e
        };
        // SAFETY: libc::stat is plain data; all zeros is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: open fd, `st` is writable and lives across the call.
        if unsafe { sys::glfs_fstat(fd.as_ptr(), &mut st) } != 0 {
            return Err(close(os_err(format!("{name}: fstat"), last_errno())));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(close(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: not a regular file"),
            )));
        }
        let actual = st.st_size as u64;
        let size = match size {
            None => actual,
            Some(s) if s <= actual => s,
            Some(s) => {
                // SAFETY: open fd; NULL pre/post stat pointers are allowed.
                let r = unsafe {
                    sys::glfs_ftruncate(
                        fd.as_ptr(),
                        s as _,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    )
                };
                if r != 0 {
                    return Err(close(os_err(
                        format!("{name}: grow to {s} bytes"),
                        last_errno(),
                    )));
                }
                s
            }
        };
        if size == 0 {
            return Err(close(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: the file is empty (give ?size=SIZE to grow it)"),
            )));
        }
        let efd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| close(io::Error::other(format!("{name}: eventfd: {e}"))))?;
        // SAFETY: timerfd_create has no memory arguments; a non-negative
        // result is a new descriptor we own.
        let tfd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if tfd < 0 {
            return Err(close(os_err(format!("{name}: timerfd"), last_errno())));
        }
        // SAFETY: `tfd` is a fresh descriptor nobody else owns.
        let timer = unsafe { OwnedFd::from_raw_fd(tfd) };
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| close(io::Error::other(format!("{name}: epoll: {e}"))))?;
        for f in [efd.as_fd(), timer.as_fd()] {
            epoll::add(&ep, f, epoll::EventData::new_u64(0), epoll::EventFlags::IN)
                .map_err(|e| close(io::Error::other(format!("{name}: epoll_ctl: {e}"))))?;
        }
        let sink = Box::new(Sink {
            queue: ArrayQueue::new(SLOTS),
            eventfd: efd,
        });
        let sink = NonNull::from(Box::leak(sink));
        let ctxs: Box<[CallbackCtx]> = (0..SLOTS as u32)
            .map(|slot| CallbackCtx {
                sink: sink.as_ptr(),
                slot,
            })
            .collect();
        let ctxs = NonNull::from(Box::leak(ctxs));
        let now = Instant::now();
        tracing::info!("{name}: {size} bytes");
        Ok(GlusterBackstore {
            vol,
            fd,
            name,
            size,
            timeout: opts.command_timeout,
            slots: (0..SLOTS)
                .map(|_| Slot {
                    state: SlotState::Free,
                    tag: 0,
                    op: IoOp::Flush,
                    stage: Stage::Sync,
                    buf: DataBuf::default(),
                    done: 0,
                    deadline: now,
                })
                .collect(),
            iovs: (0..SLOTS * DATA_SEGMENTS_MAX)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            ctxs,
            sink,
            free: (0..SLOTS as u32).rev().collect(),
            backlog: VecDeque::with_capacity(MAX_BACKLOG),
            done: VecDeque::with_capacity(SLOTS + MAX_BACKLOG),
            in_gfapi: 0,
            discard_ok: true,
            timer,
            timer_at: None,
            epoll: ep,
            warned_full: false,
            failing: 0,
        })
    }

    fn sink(&self) -> &Sink {
        // SAFETY: allocated in `open`, freed only in drop.
        unsafe { self.sink.as_ref() }
    }

    fn check(&self, op: &IoOp, buf_len: usize) -> Result<(), i32> {
        let (offset, len) = match *op {
            IoOp::Read { offset } | IoOp::Write { offset, .. } => (offset, buf_len as u64),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => (offset, len),
            IoOp::Flush => return Ok(()),
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.size && end <= i64::MAX as u64 => Ok(()),
            _ => Err(libc::EINVAL),
        }
    }

    fn arm_timer(&mut self, at: Instant) {
        if self.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        let d = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as _,
                tv_nsec: d.subsec_nanos() as _,
            },
        };
        // SAFETY: our timerfd, a valid itimerspec, NULL for the old value.
        if unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) }
            == 0
        {
            self.timer_at = Some(at);
        } else {
            tracing::warn!(
                "{}: timerfd_settime: {}",
                self.name,
                io::Error::last_os_error()
            );
        }
    }

    fn start(&mut self, io: Io, deadline: Instant) {
        let Io { tag, op, buf } = io;
        let empty = match op {
            IoOp::Read { .. } | IoOp::Write { .. } => buf.is_empty(),
            IoOp::Discard { len, .. } | IoOp::WriteZeroes { len, .. } => len == 0,
            IoOp::Flush => false,
        };
        if empty {
            self.done.push_back(IoDone {
                tag,
                result: Ok(()),
                buf,
            });
            return;
        }
        let Some(slot) = self.free.pop() else {
            unreachable!("start without a free slot");
        };
        let stage = match op {
            IoOp::Read { .. } | IoOp::Write { .. } => Stage::Transfer,
            IoOp::Flush => Stage::Sync,
            IoOp::Discard { .. } if self.discard_ok => Stage::Discard,
            IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => Stage::ZeroFill,
        };
        let s = &mut self.slots[slot as usize];
        s.state = SlotState::Busy;
        s.tag = tag;
        s.op = op;
        s.stage = stage;
        s.buf = buf;
        s.done = 0;
        s.deadline = deadline;
        self.in_gfapi += 1;
        self.arm_timer(deadline);
        self.issue(slot);
    }

    /// Hand the current step of `slot` to gfapi.
    fn issue(&mut self, slot: u32) {
        let i = slot as usize;
        let fd = self.fd.as_ptr();
        // SAFETY: `ctxs` is allocated in `open` and freed only in drop.
        let ctx = unsafe { &self.ctxs.as_ref()[i] } as *const CallbackCtx as *mut c_void;
        let cb: sys::glfs_io_cbk = Some(on_complete);
        let s = &mut self.slots[i];
        let r = match (s.stage, s.op) {
            (Stage::Transfer, IoOp::Read { offset } | IoOp::Write { offset, .. }) => {
                let n = (s.buf.len() - s.done).min(MAX_RW);
                let iovs = &mut self.iovs[i * DATA_SEGMENTS_MAX..(i + 1) * DATA_SEGMENTS_MAX];
                let mut count = 0;
                if matches!(s.op, IoOp::Read { .. }) {
                    for (iov, piece) in iovs.iter_mut().zip(s.buf.slices_at_mut(s.done, n)) {
                        iov.iov_base = piece.as_mut_ptr() as *mut c_void;
                        iov.iov_len = piece.len();
                        count += 1;
                    }
                } else {
                    // Read access only: write data may be a read-only view
                    // of a receive ring, which a mutable borrow would move
                    // to the heap. gfapi only reads it (iovec's pointer is
                    // not const in C).
                    for (iov, piece) in iovs.iter_mut().zip(s.buf.slices_at(s.done, n)) {
                        iov.iov_base = piece.as_ptr() as *mut c_void;
                        iov.iov_len = piece.len();
                        count += 1;
                    }
                }
                let iov = iovs.as_ptr();
                let at = (offset + s.done as u64) as libc::off_t;
                if matches!(s.op, IoOp::Read { .. }) {
                    // SAFETY: the iovec and the buffer range it names stay
                    // valid and untouched by us until the callback for this
                    // slot: the buffer is owned by the slot (kept even on
                    // timeout), the iovec sits at a fixed address, and the
                    // context outlives every call (drop waits or leaks).
                    unsafe { sys::glfs_preadv_async(fd, iov, count, at, 0, cb, ctx) }
                } else {
                    // SAFETY: as for preadv; gfapi only reads the buffer.
                    unsafe { sys::glfs_pwritev_async(fd, iov, count, at, 0, cb, ctx) }
                }
            }
            // SAFETY: open fd; the context outlives the call as above.
            (Stage::Sync, _) => unsafe { sys::glfs_fdatasync_async(fd, cb, ctx) },
            (Stage::Discard, IoOp::Discard { offset, len }) => {
                // SAFETY: as above; no buffer involved.
                unsafe { sys::glfs_discard_async(fd, offset as _, len as _, cb, ctx) }
            }
            (
                Stage::ZeroFill,
                IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len },
            ) => {
                // SAFETY: as above; no buffer involved.
                unsafe { sys::glfs_zerofill_async(fd, offset as _, len as _, cb, ctx) }
            }
            (stage, op) => unreachable!("stage {stage:?} for {op:?}"),
        };
        if r < 0 {
            // Refused before starting: no callback will come.
            let e = last_errno();
            self.finish(slot, Err(e));
        }
    }

    /// The operation in `slot` is over (for the caller and for gfapi).
    fn finish(&mut self, slot: u32, result: Result<(), i32>) {
        match result {
            Err(e) if e != self.failing => {
                self.failing = e;
                tracing::warn!(
                    "{}: gluster operations failing: {}",
                    self.name,
                    io::Error::from_raw_os_error(e)
                );
            }
            Ok(()) if self.failing != 0 => {
                self.failing = 0;
                tracing::info!("{}: gluster operations succeed again", self.name);
            }
            _ => {}
        }
        let s = &mut self.slots[slot as usize];
        let buf = std::mem::take(&mut s.buf);
        let was = s.state;
        s.state = SlotState::Free;
        self.in_gfapi -= 1;
        self.free.push(slot);
        if was == SlotState::Busy {
            self.done.push_back(IoDone {
                tag: s.tag,
                result,
                buf,
            });
        }
        self.start_backlog();
    }

    fn start_backlog(&mut self) {
        while !self.free.is_empty() {
            let Some((io, deadline)) = self.backlog.pop_front() else {
                break;
            };
            self.start(io, deadline);
        }
    }

    fn complete(&mut self, c: Completion) {
        let slot = c.slot;
        let i = slot as usize;
        let Some(s) = self.slots.get_mut(i) else {
            return;
        };
        match s.state {
            SlotState::Free => return,
            SlotState::Orphan => return self.finish(slot, Err(libc::ETIMEDOUT)),
            SlotState::Busy => {}
        }
        if c.ret < 0 {
            let e = match c.errno {
                // What gluster's EIO means cannot be told apart here: a
                // bad copy (split-brain) or one of the translators failing
                // for a while. A medium error is final for an initiator
                // while retrying a real one a few times costs little, so
                // it is reported as a communication error, which is
                // retried. (Reads on an image whose bricks are all down or
                // hung come back EBADFD, measured on a replica volume; the
                // SCSI layer treats that as retryable too.)
                0 | libc::EIO => libc::ECOMM,
                e => e,
            };
            if s.stage == Stage::Discard && (e == libc::EOPNOTSUPP || e == libc::ENOSYS) {
                // Deallocated blocks must read as zeros (the LUN reports
                // LBPRZ), so where the bricks cannot punch holes the
                // range is zeroed instead, from now on directly.
                s.stage = Stage::ZeroFill;
                self.discard_ok = false;
                return self.issue(slot);
            }
            return self.finish(slot, Err(e));
        }
        let n = c.ret as usize;
        let next = match (s.stage, s.op) {
            (Stage::Transfer, IoOp::Read { .. }) => {
                s.done += n;
                if n == 0 && s.done < s.buf.len() {
                    // Past the end of a file that shrank under us: those
                    // blocks are gone, and zeros would pass for data.
                    return self.finish(slot, Err(libc::EIO));
                }
                if s.done < s.buf.len() {
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            (Stage::Transfer, IoOp::Write { fua, .. }) => {
                if n == 0 {
                    Err(libc::EIO)
                } else {
                    s.done += n;
                    if s.done < s.buf.len() {
                        Ok(true)
                    } else if fua {
                        // FUA: this write durable before completion; gfapi
                        // has no per-write sync flag, so the file is synced.
                        s.stage = Stage::Sync;
                        Ok(true)
                    } else {
                        Ok(false)
                    }
                }
            }
            _ => Ok(false),
        };
        match next {
            Ok(true) => self.issue(slot),
            Ok(false) => self.finish(slot, Ok(())),
            Err(e) => self.finish(slot, Err(e)),
        }
    }

    fn drain_completions(&mut self) -> usize {
        let mut n = 0;
        while let Some(c) = self.sink().queue.pop() {
            n += 1;
            self.complete(c);
        }
        n
    }

    /// Fail what is past its deadline and re-arm the timer for the next.
    fn expire(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        let mut expired = 0;
        for s in self.slots.iter_mut() {
            if s.state != SlotState::Busy {
                continue;
            }
            if s.deadline <= now {
                // The buffer stays with the slot until gfapi calls back;
                // the caller gets an empty one with the error.
                s.state = SlotState::Orphan;
                self.done.push_back(IoDone {
                    tag: s.tag,
                    result: Err(libc::ETIMEDOUT),
                    buf: DataBuf::default(),
                });
                expired += 1;
            } else {
                next = Some(next.map_or(s.deadline, |t| t.min(s.deadline)));
            }
        }
        while self.backlog.front().is_some_and(|(_, d)| *d <= now) {
            let (io, _) = self.backlog.pop_front().unwrap();
            self.done.push_back(IoDone {
                tag: io.tag,
                result: Err(libc::ETIMEDOUT),
                buf: io.buf,
            });
            expired += 1;
        }
        if expired > 0 {
            tracing::warn!(
                "{}: {expired} operations not completed by gluster within {} s failed with \
                 ETIMEDOUT ({} still held by gluster)",
                self.name,
                self.timeout.as_secs_f32(),
                self.slots
                    .iter()
                    .filter(|s| s.state == SlotState::Orphan)
                    .count()
            );
        }
        if let Some((_, d)) = self.backlog.front() {
            next = Some(next.map_or(*d, |t| t.min(*d)));
        }
        self.timer_at = None;
        if let Some(t) = next {
            self.arm_timer(t);
        }
    }

    fn reset_fds(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.sink().eventfd, &mut b);
    }

    /// Wait (blocking) until nothing is in gfapi or `grace` passed;
    /// returns whether everything came back.
    fn drain_blocking(&mut self, grace: Duration) -> bool {
        let end = Instant::now() + grace;
        loop {
            self.reset_fds();
            self.drain_completions();
            if self.in_gfapi == 0 && self.backlog.is_empty() {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            if self.timer_at.is_some_and(|t| t <= now) {
                self.expire(now);
            }
            let left = (end - now).min(Duration::from_millis(100));
            let mut pfd = [PollFd::new(&self.sink().eventfd, PollFlags::IN)];
            let _ = rustix::event::poll(&mut pfd, left.as_millis().max(1) as i32);
        }
    }

    /// Operations in gfapi, for tests and stats.
    pub fn in_flight(&self) -> usize {
        self.in_gfapi
    }
}

impl Backstore for GlusterBackstore {
    fn kind(&self) -> &'static str {
        "gluster"
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackstoreCaps {
        BackstoreCaps {
            // Punched holes read as zeros; where the bricks cannot punch,
            // discard falls back to zero fill, so LBPRZ holds either way.
            discard: true,
            write_zeroes: true,
            // write-behind and the bricks' page cache hold writes until
            // fdatasync.
            volatile_cache: true,
            extent_status: false,
        }
    }

    fn submit(&mut self, io: Io) {
        if let Err(e) = self.check(&io.op, io.buf.len()) {
            self.done.push_back(IoDone {
                tag: io.tag,
                result: Err(e),
                buf: io.buf,
            });
            return;
        }
        let deadline = Instant::now() + self.timeout;
        if self.backlog.is_empty() && !self.free.is_empty() {
            self.start(io, deadline);
        } else if self.backlog.len() < MAX_BACKLOG {
            self.backlog.push_back((io, deadline));
            self.arm_timer(deadline);
        } else {
            if !self.warned_full {
                self.warned_full = true;
                tracing::warn!(
                    "{}: {} operations waiting; refusing more with EBUSY",
                    self.name,
                    SLOTS + MAX_BACKLOG
                );
            }
            self.done.push_back(IoDone {
                tag: io.tag,
                result: Err(libc::EBUSY),
                buf: io.buf,
            });
        }
    }

    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize {
        if self.in_gfapi > 0 || !self.backlog.is_empty() {
            // Reset first: a completion pushed after this read signals
            // again, so none is left unsignalled.
            self.reset_fds();
            self.drain_completions();
            if let Some(t) = self.timer_at {
                let now = Instant::now();
                if t <= now {
                    let mut b = [0u8; 8];
                    let _ = rustix::io::read(&self.timer, &mut b);
                    self.expire(now);
                }
            }
        }
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }

    fn shutdown(&mut self) -> Result<(), i32> {
        if !self.drain_blocking(self.timeout + DRAIN_GRACE) {
            return Err(libc::ETIMEDOUT);
        }
        // SAFETY: open fd; NULL pre/post stat pointers are allowed.
        let r = unsafe {
            sys::glfs_fdatasync(self.fd.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut())
        };
        if r != 0 {
            return Err(last_errno());
        }
        Ok(())
    }
}

impl Drop for GlusterBackstore {
    fn drop(&mut self) {
        if self.drain_blocking(DRAIN_GRACE) {
            // SAFETY: nothing is in gfapi any more; the fd is ours.
            unsafe { sys::glfs_close(self.fd.as_ptr()) };
            // SAFETY: from Box::leak in `open`; no callback can run now.
            drop(unsafe { Box::from_raw(self.ctxs.as_ptr()) });
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(self.sink.as_ptr()) });
            return;
        }
        // gfapi still holds buffers and will call back into the contexts:
        // leak them, the fd and the volume rather than free memory it may
        // still write.
        tracing::error!(
            "{}: {} operations never came back from gluster; leaking their buffers",
            self.name,
            self.in_gfapi
        );
        std::mem::forget(std::mem::take(&mut self.slots));
        std::mem::forget(Arc::clone(&self.vol));
    }
}
