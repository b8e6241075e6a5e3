//! Buffer handles and scatter-gather lists.

use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pool::{ArenaId, ClassId, KeyTable, RegistrarId, RegistrationKey};
use crate::MAX_SEGMENTS;

static LEAKED_BUFS: AtomicU64 = AtomicU64::new(0);

/// Buffers dropped without being freed to a [`crate::CoreCache`], in this
/// process, across pools. Their bytes are never reused (and a pool with
/// such buffers outstanding leaks its arenas when dropped); a non-zero
/// value is a bug in the caller.
pub fn leaked_buffers() -> u64 {
    LEAKED_BUFS.load(Ordering::Relaxed)
}

/// A free buffer as the free lists keep it: where it is, no length, no
/// ownership (only [`Buf::from_raw`] turns it back into a handle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawBuf {
    pub ptr: NonNull<u8>,
    pub arena: u16,
    pub class: u8,
    pub shift: u8,
}

// SAFETY: a RawBuf is an address and some indexes; it grants no access by
// itself. Moving it to another thread's free list is how buffers migrate.
unsafe impl Send for RawBuf {}

/// One pool buffer, owned: its `capacity()` bytes belong to this handle
/// alone until it is given back with [`crate::CoreCache::free`], which
/// consumes it. Not `Clone`; `&mut self` is needed to write.
///
/// `len()` is how many of those bytes hold data (set by the allocator for
/// a command's transfer, or by the caller); the full capacity stays
/// reachable through [`Buf::as_slice`] / [`Buf::as_mut_slice`]. Contents
/// are whatever the previous user left: fill before sending.
///
/// Dropping a handle without freeing it leaks the buffer (counted in
/// [`leaked_buffers`]); the pool never reuses bytes a handle may reach.
pub struct Buf {
    ptr: NonNull<u8>,
    len: u32,
    arena: u16,
    class: u8,
    shift: u8,
}

const _: () = assert!(std::mem::size_of::<Buf>() == 16);
const _: () = assert!(std::mem::size_of::<Option<Buf>>() == 16);

// SAFETY: a Buf owns its bytes exclusively, like a Box<[u8]>; the arena
// they live in stays mapped while any Buf into it exists, whichever thread
// holds it.
unsafe impl Send for Buf {}
// SAFETY: `&Buf` only gives `&[u8]`; writing needs `&mut Buf`.
unsafe impl Sync for Buf {}

impl Buf {
    /// Turns a free buffer into its owning handle.
    ///
    /// # Safety
    /// `raw` must describe a buffer of a live arena that no other `Buf`
    /// covers and that is in no free list (the caller just took it off
    /// one).
    pub(crate) unsafe fn from_raw(raw: RawBuf, len: usize) -> Buf {
        debug_assert!(len <= 1 << raw.shift);
        Buf {
            ptr: raw.ptr,
            len: len as u32,
            arena: raw.arena,
            class: raw.class,
            shift: raw.shift,
        }
    }

    /// Gives up ownership without running the leak accounting in `Drop`.
    pub(crate) fn into_raw(self) -> RawBuf {
        let raw = RawBuf {
            ptr: self.ptr,
            arena: self.arena,
            class: self.class,
            shift: self.shift,
        };
        std::mem::forget(self);
        raw
    }

    /// Bytes the buffer holds at most (its class's `buf_bytes`).
    pub fn capacity(&self) -> usize {
        1 << self.shift
    }

    /// Bytes holding data.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the data length. Panics above `capacity()`.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "len {len} above capacity {}",
            self.capacity()
        );
        self.len = len as u32;
    }

    /// The whole buffer, `capacity()` bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: [ptr, ptr + capacity) lies inside a live arena (the pool
        // checks the range when it carves buffers and keeps the arena
        // mapped while handles exist), no other handle covers it (free
        // lists hold only buffers without a handle), and `&self` rules out
        // a concurrent `&mut` through this handle. The bytes were
        // initialized when the arena was populated (zero pages).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity()) }
    }

    /// The whole buffer, `capacity()` bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only live
        // reference to these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity()) }
    }

    /// The first `len()` bytes.
    pub fn data(&self) -> &[u8] {
        &self.as_slice()[..self.len()]
    }

    /// The first `len()` bytes, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.as_mut_slice()[..len]
    }

    /// The buffer's virtual address: what an RDMA work request or an
    /// iovec carries.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as usize as u64
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn arena(&self) -> ArenaId {
        ArenaId(self.arena)
    }

    pub fn class(&self) -> ClassId {
        ClassId(self.class)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if LEAKED_BUFS.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::error!(
                addr = self.addr(),
                buf_bytes = self.capacity(),
                "pool buffer dropped without being freed; it is leaked"
            );
        }
    }
}

impl fmt::Debug for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buf")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("arena", &self.arena)
            .field("class", &self.class)
            .finish()
    }
}

/// A byte range outside what an [`SgList`] or [`Buf`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub offset: usize,
    pub len: usize,
    pub len_bytes: usize,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bytes {}..{} outside the {} bytes held",
            self.offset,
            self.offset.saturating_add(self.len),
            self.len_bytes
        )
    }
}

impl std::error::Error for OutOfRange {}

/// One contiguous piece of an [`SgList`]'s data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: usize,
    pub arena: ArenaId,
}

/// A [`Segment`] with the memory key of its arena for one registrar: what
/// an RDMA scatter-gather element (`ibv_sge`) needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaSegment {
    pub addr: u64,
    pub len: u32,
    pub key: RegistrationKey,
}

/// The buffers holding one command's data, in order, at most
/// [`MAX_SEGMENTS`], inline (no heap). The data is the concatenation of
/// each buffer's first `len()` bytes; [`crate::CoreCache`] fills every
/// buffer but the last to capacity.
///
/// Dropping a non-empty list leaks its buffers; give them back with
/// [`crate::CoreCache::free_sg`].
pub struct SgList {
    bufs: [Option<Buf>; MAX_SEGMENTS],
    count: usize,
}

impl Default for SgList {
    fn default() -> SgList {
        SgList::new()
    }
}

impl fmt::Debug for SgList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.bufs()).finish()
    }
}

impl SgList {
    pub const fn new() -> SgList {
        SgList {
            bufs: [const { None }; MAX_SEGMENTS],
            count: 0,
        }
    }

    /// Buffers in the list.
    pub fn segment_count(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == MAX_SEGMENTS
    }

    /// Bytes of data: the sum of the buffers' lengths.
    pub fn len_bytes(&self) -> usize {
        self.bufs().map(Buf::len).sum()
    }

    /// Bytes the buffers could hold.
    pub fn capacity_bytes(&self) -> usize {
        self.bufs().map(Buf::capacity).sum()
    }

    /// Appends a buffer; gives it back when the list is full.
    pub fn push(&mut self, buf: Buf) -> Result<(), Buf> {
        if self.count == MAX_SEGMENTS {
            return Err(buf);
        }
        debug_assert!(self.bufs[self.count].is_none());
        self.bufs[self.count] = Some(buf);
        self.count += 1;
        Ok(())
    }

    /// Removes the last buffer.
    pub fn pop(&mut self) -> Option<Buf> {
        if self.count == 0 {
            return None;
        }
        self.count -= 1;
        let b = self.bufs[self.count].take();
        debug_assert!(b.is_some());
        b
    }

    pub fn get(&self, i: usize) -> Option<&Buf> {
        self.bufs[..self.count].get(i)?.as_ref()
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Buf> {
        self.bufs[..self.count].get_mut(i)?.as_mut()
    }

    pub fn bufs(&self) -> impl Iterator<Item = &Buf> + '_ {
        self.bufs[..self.count]
            .iter()
            .map(|b| b.as_ref().expect("slot below count"))
    }

    pub fn bufs_mut(&mut self) -> impl Iterator<Item = &mut Buf> + '_ {
        self.bufs[..self.count]
            .iter_mut()
            .map(|b| b.as_mut().expect("slot below count"))
    }

    /// Sets the data length to `len_bytes`, filling buffers in order (each
    /// to capacity, the last partly, the rest empty).
    pub fn set_len_bytes(&mut self, len_bytes: usize) -> Result<(), OutOfRange> {
        let cap = self.capacity_bytes();
        if len_bytes > cap {
            return Err(OutOfRange {
                offset: 0,
                len: len_bytes,
                len_bytes: cap,
            });
        }
        let mut left = len_bytes;
        for b in self.bufs_mut() {
            let n = left.min(b.capacity());
            b.set_len(n);
            left -= n;
        }
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfRange> {
        let len_bytes = self.len_bytes();
        match offset.checked_add(len) {
            Some(end) if end <= len_bytes => Ok(()),
            _ => Err(OutOfRange {
                offset,
                len,
                len_bytes,
            }),
        }
    }

    /// Copies `src` into the data at byte `offset` (a Data-Out PDU's
    /// payload on the TCP path). The range must lie within `len_bytes()`.
    pub fn copy_from_slice_at(&mut self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
        self.check(offset, src.len())?;
        let mut skip = offset;
        let mut src = src;
        for b in self.bufs_mut() {
            if src.is_empty() {
                break;
            }
            let data = b.data_mut();
            if skip >= data.len() {
                skip -= data.len();
                continue;
            }
            let n = (data.len() - skip).min(src.len());
            data[skip..skip + n].copy_from_slice(&src[..n]);
            src = &src[n..];
            skip = 0;
        }
        debug_assert!(src.is_empty());
        Ok(())
    }

    /// Copies the data at byte `offset` into `dst` (a Data-In PDU's
    /// payload on the TCP path). The range must lie within `len_bytes()`.
    pub fn copy_to_slice_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
        self.check(offset, dst.len())?;
        let mut skip = offset;
        let mut dst = dst;
        for b in self.bufs() {
            if dst.is_empty() {
                break;
            }
            let data = b.data();
            if skip >= data.len() {
                skip -= data.len();
                continue;
            }
            let n = (data.len() - skip).min(dst.len());
            let (head, tail) = dst.split_at_mut(n);
            head.copy_from_slice(&data[skip..skip + n]);
            dst = tail;
            skip = 0;
        }
        debug_assert!(dst.is_empty());
        Ok(())
    }

    /// The data as (address, length, arena) pieces, empty buffers skipped.
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        self.bufs().filter(|b| !b.is_empty()).map(|b| Segment {
            addr: b.addr(),
            len: b.len(),
            arena: b.arena(),
        })
    }

    /// The data as RDMA scatter-gather elements with the keys `registrar`
    /// got for each arena. Panics if an arena was not registered with it
    /// (the pool registers every arena with every registrar before any of
    /// its buffers is handed out, so that is a wrong `registrar`).
    pub fn rdma_segments<'a>(
        &'a self,
        keys: &'a KeyTable,
        registrar: RegistrarId,
    ) -> impl Iterator<Item = RdmaSegment> + 'a {
        self.segments().map(move |s| RdmaSegment {
            addr: s.addr,
            len: s.len as u32,
            key: keys
                .get(s.arena, registrar)
                .expect("arena not registered with this registrar"),
        })
    }

    /// Fills `out` with the data as `IoSlice`s (iovecs) for `writev` and
    /// friends; returns how many were filled (empty buffers skipped).
    pub fn io_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, b) in out.iter_mut().zip(self.bufs().filter(|b| !b.is_empty())) {
            *slot = IoSlice::new(b.data());
            n += 1;
        }
        n
    }

    /// Fills `out` with the data as `IoSliceMut`s for `readv` and friends;
    /// returns how many were filled (empty buffers skipped).
    pub fn io_slices_mut<'a>(&'a mut self, out: &mut [IoSliceMut<'a>]) -> usize {
        let mut n = 0;
        for (slot, b) in out
            .iter_mut()
            .zip(self.bufs_mut().filter(|b| !b.is_empty()))
        {
            *slot = IoSliceMut::new(b.data_mut());
            n += 1;
        }
        n
    }
}
