//! `DataBuf`: the buffer one command's data lives in from the transport
//! to the backstore and back. It is either a pool buffer (hugepage arena
//! memory, registered once for RDMA) or, for small emulated responses,
//! tests and the rare buffer that outgrows its class, a heap vector. The
//! device server and the backstores see one type with the few vector
//! operations they use; where the bytes live is the engine's business.
//!
//! A command whose class has no free buffer may instead span up to
//! [`DATA_SEGMENTS_MAX`] buffers of one smaller class (a scatter-gather
//! buffer, [`crate::CoreCache::alloc_data_sg`]). Its bytes are not one slice: the read and write
//! path (backstores, transports) walks them with [`DataBuf::segments`],
//! [`DataBuf::slices_at`] and the copy helpers. Reading one as a slice
//! (`Deref`) is a bug in the caller and asserts; `DerefMut` and the
//! growing vector operations first move the bytes into one heap buffer
//! (a copy and an allocation, as for a pool buffer that outgrows its class),
//! so emulated commands stay correct if one ever meets such a buffer.
//!
//! A pool buffer goes back to its pool when the reactor frees it
//! ([`crate::CoreCache::free_data`], local and cheap) or, on any other path
//! that drops it (an error path, a connection torn down), by its `Drop`,
//! which pushes it onto the class's shared free queue: never leaked, never
//! freed twice.

use std::fmt;
use std::ops::{Deref, DerefMut};

use crate::buf::Buf;
use crate::pool::DataHome;

pub struct DataBuf(Repr);

// Moved through every queue of the I/O path: a few words, however its
// bytes are laid out.
const _: () = assert!(std::mem::size_of::<DataBuf>() <= 32);

/// Buffers one scatter-gather `DataBuf` holds at most (its list is one of
/// the pool's [`crate::SG_SLOTS`] slots, mapped at start-up): 8 covers a
/// 16 MiB command with 2 MiB buffers, a 1 MiB one with 256 KiB buffers.
pub const DATA_SEGMENTS_MAX: usize = 8;

enum Repr {
    Heap(Vec<u8>),
    Pool {
        buf: Buf,
        home: DataHome,
    },
    /// `count` buffers of one class, listed in the pool's segment slot
    /// `slot` (held by this `DataBuf` alone), each `1 << seg_shift`
    /// long: data byte `i` is in buffer `i >> seg_shift`. The buffers'
    /// own lengths are not used.
    Sg {
        slot: u32,
        count: u8,
        seg_shift: u8,
        len: u32,
        home: DataHome,
    },
    /// `len` bytes of the receive ring in ring slot `slot` from `off`
    /// (`crate::RxRing::view`): read-only, written through only after a
    /// move to the heap.
    View {
        slot: u32,
        off: u32,
        len: u32,
        home: DataHome,
    },
}

impl DataBuf {
    /// An empty heap buffer (allocates nothing until written).
    pub const fn new() -> DataBuf {
        DataBuf(Repr::Heap(Vec::new()))
    }

    pub fn with_capacity(n: usize) -> DataBuf {
        DataBuf(Repr::Heap(Vec::with_capacity(n)))
    }

    pub(crate) fn from_pool(buf: Buf, home: DataHome) -> DataBuf {
        DataBuf(Repr::Pool { buf, home })
    }

    pub(crate) fn from_ring(slot: u32, off: usize, len: usize, home: DataHome) -> DataBuf {
        DataBuf(Repr::View {
            slot,
            off: u32::try_from(off).expect("rings are under 4 GiB"),
            len: u32::try_from(len).expect("rings are under 4 GiB"),
            home,
        })
    }

    /// Whether the bytes are a view of a receive ring (no copy was made).
    pub fn is_ring_view(&self) -> bool {
        matches!(self.0, Repr::View { .. })
    }

    /// A scatter-gather buffer of `len` bytes over `bufs` (2 to
    /// `DATA_SEGMENTS_MAX` buffers of one class, enough for `len`), listed
    /// in segment slot `slot` (taken from `home`, empty).
    pub(crate) fn from_pool_segments(
        slot: u32,
        bufs: impl Iterator<Item = Buf>,
        len: usize,
        home: DataHome,
    ) -> DataBuf {
        let mut d = DataBuf(Repr::Sg {
            slot,
            count: 0,
            seg_shift: 0,
            len: u32::try_from(len).expect("segments hold less than 4 GiB"),
            home,
        });
        let mut count = 0;
        let mut seg_bytes = 0;
        for b in bufs {
            assert!(count < DATA_SEGMENTS_MAX, "too many segments");
            assert!(seg_bytes == 0 || b.capacity() == seg_bytes, "mixed classes");
            seg_bytes = b.capacity();
            let list = d.sg_list_mut();
            assert!(list[count].is_none(), "a taken slot is empty");
            list[count] = Some(b);
            count += 1;
        }
        assert!(count >= 2 && seg_bytes.is_power_of_two());
        assert!(len <= count * seg_bytes && len > (count - 1) * seg_bytes);
        if let Repr::Sg {
            count: c,
            seg_shift,
            ..
        } = &mut d.0
        {
            *c = count as u8;
            *seg_shift = seg_bytes.trailing_zeros() as u8;
        }
        d
    }

    /// The segment list of a scatter-gather buffer (empty otherwise).
    fn sg_list(&self) -> &[Option<Buf>] {
        match &self.0 {
            // SAFETY: this `DataBuf` holds the slot alone (`SgSlots`), and
            // the shared borrow of `self` keeps `sg_list_mut` from
            // running while the result lives.
            Repr::Sg { slot, home, .. } => unsafe { &*home.sg_bufs(*slot) },
            _ => &[],
        }
    }

    /// `sg_list`, mutable.
    fn sg_list_mut(&mut self) -> &mut [Option<Buf>] {
        match &self.0 {
            // SAFETY: as in `sg_list`; the exclusive borrow of `self` makes
            // this the only reference into the slot while it lives.
            Repr::Sg { slot, home, .. } => unsafe { &mut *home.sg_bufs(*slot) },
            _ => &mut [],
        }
    }

    /// Buffers the bytes are in: 1 unless a scatter-gather buffer.
    pub fn segment_count(&self) -> usize {
        match &self.0 {
            Repr::Sg { count, .. } => *count as usize,
            _ => 1,
        }
    }

    /// Whether the bytes are one slice (`Deref` works).
    pub fn is_contiguous(&self) -> bool {
        !matches!(self.0, Repr::Sg { .. })
    }

    /// The data as slices, in order (one for a contiguous buffer, possibly
    /// empty).
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.slices_at(0, self.len())
    }

    /// The data as mutable slices, in order.
    pub fn segments_mut(&mut self) -> impl Iterator<Item = &mut [u8]> + '_ {
        let len = self.len();
        self.slices_at_mut(0, len)
    }

    /// The pieces of data bytes `[offset, offset + len)`, in order, each
    /// within one buffer. Panics past the data's length, as slicing does.
    pub fn slices_at(&self, offset: usize, len: usize) -> Slices<'_> {
        let end = offset.checked_add(len).expect("range overflows");
        assert!(
            end <= self.len(),
            "range {offset}+{len} past {}",
            self.len()
        );
        match &self.0 {
            Repr::Heap(v) => Slices::one(&v[offset..end]),
            Repr::Pool { buf, .. } => Slices::one(&buf.data()[offset..end]),
            // A view is one slice: `Deref` finds it.
            Repr::View { .. } => Slices::one(&self[offset..end]),
            Repr::Sg { seg_shift, .. } => Slices {
                one: None,
                bufs: self.sg_list(),
                seg_shift: *seg_shift,
                pos: offset,
                end,
            },
        }
    }

    /// `slices_at`, mutable.
    pub fn slices_at_mut(&mut self, offset: usize, len: usize) -> SlicesMut<'_> {
        let end = offset.checked_add(len).expect("range overflows");
        assert!(
            end <= self.len(),
            "range {offset}+{len} past {}",
            self.len()
        );
        if let Repr::View { .. } = self.0 {
            // A view is never written in place (see `crate::ring`).
            self.move_to_heap(self.len());
        }
        if let Repr::Sg { seg_shift, .. } = self.0 {
            let first = offset >> seg_shift;
            return SlicesMut {
                one: None,
                bufs: self.sg_list_mut()[first..].iter_mut(),
                first_off: offset - (first << seg_shift),
                left: end - offset,
                seg_bytes: 1 << seg_shift,
            };
        }
        match &mut self.0 {
            Repr::Heap(v) => SlicesMut::one(&mut v[offset..end]),
            Repr::Pool { buf, .. } => SlicesMut::one(&mut buf.data_mut()[offset..end]),
            Repr::Sg { .. } | Repr::View { .. } => unreachable!("handled above"),
        }
    }

    /// Makes the bytes one slice: a scatter-gather buffer moves into one
    /// heap buffer (a copy and an allocation); others are left alone.
    pub fn make_contiguous(&mut self) {
        if !self.is_contiguous() {
            self.move_to_heap(self.len());
        }
    }

    /// The contiguous run of data bytes starting at `offset`, at most
    /// `max_len` long: all of them up to `max_len` for a contiguous
    /// buffer, the rest of one buffer for a scatter-gather one. For
    /// transfers that take one pointer (a read or write system call).
    pub fn piece_at(&self, offset: usize, max_len: usize) -> &[u8] {
        let n = max_len.min(self.len().saturating_sub(offset));
        self.slices_at(offset, n).next().unwrap_or(&[])
    }

    /// `piece_at`, mutable.
    pub fn piece_at_mut(&mut self, offset: usize, max_len: usize) -> &mut [u8] {
        let n = max_len.min(self.len().saturating_sub(offset));
        self.slices_at_mut(offset, n).next().unwrap_or(&mut [])
    }

    /// Whether every piece starts at an address that is a multiple of
    /// `align` (a power of two), as O_DIRECT needs.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.segments()
            .all(|p| (p.as_ptr() as usize).is_multiple_of(align))
    }

    /// The pool buffers inside, for the pool to take back (`Err` for a
    /// heap buffer).
    pub(crate) fn into_parts(self) -> Result<(Parts, DataHome), Vec<u8>> {
        let mut me = std::mem::ManuallyDrop::new(self);
        // Take the representation out, leaving an empty vector: `Drop`
        // (which would send a pool buffer home) must not run on it.
        take_parts(std::mem::replace(&mut me.0, Repr::Heap(Vec::new())))
    }

    /// Whether the bytes are in pool arenas (registered for RDMA).
    pub fn is_pool(&self) -> bool {
        !matches!(self.0, Repr::Heap(_))
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Heap(v) => v.len(),
            Repr::Pool { buf, .. } => buf.len(),
            Repr::Sg { len, .. } | Repr::View { len, .. } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        match &self.0 {
            Repr::Heap(v) => v.capacity(),
            Repr::Pool { buf, .. } => buf.capacity(),
            Repr::View { len, .. } => *len as usize,
            Repr::Sg {
                count, seg_shift, ..
            } => (*count as usize) << *seg_shift,
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0)
    }

    pub fn truncate(&mut self, new_len: usize) {
        match &mut self.0 {
            Repr::Heap(v) => v.truncate(new_len),
            Repr::Pool { buf, .. } => {
                if new_len < buf.len() {
                    buf.set_len(new_len)
                }
            }
            Repr::Sg { len, .. } | Repr::View { len, .. } => {
                if new_len < *len as usize {
                    *len = new_len as u32
                }
            }
        }
    }

    /// Makes room for `additional` more bytes. A pool buffer that is too
    /// small moves to the heap (a copy and an allocation: only emulated
    /// responses larger than their buffer do this).
    pub fn reserve(&mut self, additional: usize) {
        let need = self.len() + additional;
        let cap = self.capacity();
        match &mut self.0 {
            Repr::Heap(v) => v.reserve(additional),
            _ if need <= cap => {}
            _ => self.move_to_heap(need.max(2 * cap)),
        }
    }

    /// The bytes into one heap vector of at least `capacity`, the pool
    /// buffers sent home.
    fn move_to_heap(&mut self, capacity: usize) {
        let mut v = Vec::with_capacity(capacity.max(self.len()));
        self.append_to(&mut v);
        send_home(std::mem::replace(&mut self.0, Repr::Heap(v)));
    }

    /// Appends the bytes, piece by piece, to `v`.
    fn append_to(&self, v: &mut Vec<u8>) {
        for piece in self.segments() {
            v.extend_from_slice(piece);
        }
    }

    /// Sets the length to `len`, filling new bytes with `value`.
    pub fn resize(&mut self, len: usize, value: u8) {
        let old = self.len();
        if len <= old {
            return self.truncate(len);
        }
        self.reserve(len - old);
        match &mut self.0 {
            Repr::Heap(v) => v.resize(len, value),
            _ => {
                self.set_len_stale(len);
                for piece in self.slices_at_mut(old, len - old) {
                    piece.fill(value);
                }
            }
        }
    }

    /// Sets the length to `len` without writing the bytes: they hold
    /// whatever was there (initialized memory: zeros or an earlier use's
    /// data). For buffers the caller overwrites completely before reading.
    pub fn set_len_stale(&mut self, new_len: usize) {
        let cap = self.capacity();
        match &mut self.0 {
            Repr::Pool { buf, .. } if new_len <= cap => buf.set_len(new_len),
            Repr::Sg { len, .. } | Repr::View { len, .. } if new_len <= cap => {
                *len = new_len as u32
            }
            _ => self.resize(new_len, 0),
        }
    }

    pub fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b])
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        match &mut self.0 {
            Repr::Heap(v) => v.extend_from_slice(bytes),
            _ => {
                let old = self.len();
                self.set_len_stale(old + bytes.len());
                self.copy_from_at(old, bytes);
            }
        }
    }

    /// Copies `src` into data bytes `[offset, offset + src.len())`, which
    /// must be within the length.
    pub fn copy_from_at(&mut self, offset: usize, src: &[u8]) {
        let mut at = 0;
        for piece in self.slices_at_mut(offset, src.len()) {
            piece.copy_from_slice(&src[at..at + piece.len()]);
            at += piece.len();
        }
    }

    /// Copies data bytes `[offset, offset + dst.len())` into `dst`.
    pub fn copy_to_at(&self, offset: usize, dst: &mut [u8]) {
        let mut at = 0;
        for piece in self.slices_at(offset, dst.len()) {
            dst[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
    }

    /// Removes the first `n` bytes, moving the rest to the front.
    pub fn remove_front(&mut self, n: usize) {
        let len = self.len();
        let n = n.min(len);
        self.copy_within(n..len, 0);
        self.truncate(len - n);
    }

    /// A heap copy of the bytes (tests and tools).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.append_to(&mut v);
        v
    }

    /// The bytes as a heap vector: moved out of a heap buffer, copied out
    /// of pool buffers (which then go home).
    pub fn into_vec(self) -> Vec<u8> {
        if self.is_pool() {
            // Dropping `self` after the copy sends the buffers home.
            return self.to_vec();
        }
        match self.into_parts() {
            Err(v) => v,
            Ok(_) => unreachable!("not a pool buffer"),
        }
    }

    /// Whether the bytes equal `other`'s, whatever either is made of.
    fn same_bytes(&self, other: &[u8]) -> bool {
        if self.len() != other.len() {
            return false;
        }
        let mut at = 0;
        self.segments().all(|piece| {
            let ok = piece == &other[at..at + piece.len()];
            at += piece.len();
            ok
        })
    }
}

/// The pool buffers a pool-backed `DataBuf` is made of (one, or the
/// pieces of a scatter-gather one), for the pool to take back.
pub(crate) struct Parts([Option<Buf>; DATA_SEGMENTS_MAX]);

impl Parts {
    pub(crate) fn into_bufs(self) -> impl Iterator<Item = Buf> {
        self.0.into_iter().flatten()
    }
}

/// A representation taken out of its `DataBuf`: its pool buffers (a
/// scatter-gather one's segment slot given back), or its heap vector.
fn take_parts(repr: Repr) -> Result<(Parts, DataHome), Vec<u8>> {
    match repr {
        Repr::Heap(v) => Err(v),
        Repr::Pool { buf, home } => {
            let mut bufs = [const { None }; DATA_SEGMENTS_MAX];
            bufs[0] = Some(buf);
            Ok((Parts(bufs), home))
        }
        Repr::Sg { slot, home, .. } => {
            // SAFETY: the representation held the slot alone and is out
            // of its `DataBuf`, so nothing else reaches the slot; the list
            // moves out before the slot is given back.
            let list = unsafe { &mut *home.sg_bufs(slot) };
            let bufs = std::mem::replace(list, [const { None }; DATA_SEGMENTS_MAX]);
            home.sg_give(slot);
            Ok((Parts(bufs), home))
        }
        Repr::View { slot, home, .. } => {
            // The ring's buffer comes back with its last holder.
            let mut bufs = [const { None }; DATA_SEGMENTS_MAX];
            bufs[0] = home.rings().release(slot);
            Ok((Parts(bufs), home))
        }
    }
}

impl Drop for DataBuf {
    fn drop(&mut self) {
        if let Repr::Heap(_) = self.0 {
            return;
        }
        send_home(std::mem::replace(&mut self.0, Repr::Heap(Vec::new())));
    }
}

/// Gives a representation's pool buffers back to their class's shared
/// queue (a `Buf` dropped instead would leak).
fn send_home(repr: Repr) {
    if let Ok((parts, home)) = take_parts(repr) {
        for b in parts.into_bufs() {
            home.give_back(b);
        }
    }
}

impl Default for DataBuf {
    fn default() -> DataBuf {
        DataBuf::new()
    }
}

impl Deref for DataBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(v) => v,
            Repr::Pool { buf, .. } => buf.data(),
            Repr::View {
                slot,
                off,
                len,
                home,
            } => home.rings().bytes(*slot, *off as usize, *len as usize),
            // The read and write path walks segments; anything reading a
            // scatter-gather buffer as one slice was handed a buffer its
            // command never gets (see the module comment).
            Repr::Sg { .. } => panic!(
                "a scatter-gather DataBuf of {} bytes read as one slice",
                self.len()
            ),
        }
    }
}

impl DerefMut for DataBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        if let Repr::Sg { .. } | Repr::View { .. } = self.0 {
            // Correct before fast: one heap copy (a view is never written
            // in place).
            self.move_to_heap(self.len());
        }
        match &mut self.0 {
            Repr::Heap(v) => v,
            Repr::Pool { buf, .. } => buf.data_mut(),
            Repr::Sg { .. } | Repr::View { .. } => unreachable!("moved to the heap above"),
        }
    }
}

/// A place for received bytes: `len` bytes of a `DataBuf` from `offset`
/// (a Data-Out's data at its BufferOffset, a command's immediate data).
/// A transport reads into its pieces, one or several.
pub struct DataDest<'a> {
    buf: &'a mut DataBuf,
    offset: usize,
    len: usize,
}

impl<'a> DataDest<'a> {
    /// `None` when the range is not within the buffer's data.
    pub fn new(buf: &'a mut DataBuf, offset: usize, len: usize) -> Option<DataDest<'a>> {
        let end = offset.checked_add(len)?;
        (end <= buf.len()).then_some(DataDest { buf, offset, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces of the place from byte `skip` of it on.
    pub fn pieces_from(&mut self, skip: usize) -> SlicesMut<'_> {
        let skip = skip.min(self.len);
        self.buf.slices_at_mut(self.offset + skip, self.len - skip)
    }

    /// The pieces of `len` bytes of the place from byte `skip` of it.
    pub fn pieces(&self, skip: usize, len: usize) -> Slices<'_> {
        assert!(skip + len <= self.len, "past the place");
        self.buf.slices_at(self.offset + skip, len)
    }

    /// Copies `src` into the place from byte `skip` of it.
    pub fn copy_from(&mut self, skip: usize, src: &[u8]) {
        assert!(skip + src.len() <= self.len, "past the place");
        self.buf.copy_from_at(self.offset + skip, src);
    }
}

/// Pieces of a `DataBuf` range (see [`DataBuf::slices_at`]).
pub struct Slices<'a> {
    one: Option<&'a [u8]>,
    bufs: &'a [Option<Buf>],
    seg_shift: u8,
    pos: usize,
    end: usize,
}

impl<'a> Slices<'a> {
    fn one(s: &'a [u8]) -> Slices<'a> {
        Slices {
            one: Some(s),
            bufs: &[],
            seg_shift: 0,
            pos: 0,
            end: 0,
        }
    }
}

impl<'a> Iterator for Slices<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if let Some(s) = self.one.take() {
            return Some(s);
        }
        if self.pos >= self.end {
            return None;
        }
        let i = self.pos >> self.seg_shift;
        let off = self.pos - (i << self.seg_shift);
        let n = ((1usize << self.seg_shift) - off).min(self.end - self.pos);
        self.pos += n;
        let buf = self.bufs[i].as_ref().expect("segment below count");
        Some(&buf.as_slice()[off..off + n])
    }
}

/// Mutable pieces of a `DataBuf` range (see [`DataBuf::slices_at_mut`]).
pub struct SlicesMut<'a> {
    one: Option<&'a mut [u8]>,
    bufs: std::slice::IterMut<'a, Option<Buf>>,
    first_off: usize,
    left: usize,
    seg_bytes: usize,
}

impl<'a> SlicesMut<'a> {
    fn one(s: &'a mut [u8]) -> SlicesMut<'a> {
        SlicesMut {
            one: Some(s),
            bufs: [].iter_mut(),
            first_off: 0,
            left: 0,
            seg_bytes: 0,
        }
    }
}

impl<'a> Iterator for SlicesMut<'a> {
    type Item = &'a mut [u8];
    fn next(&mut self) -> Option<&'a mut [u8]> {
        if let Some(s) = self.one.take() {
            return Some(s);
        }
        if self.left == 0 {
            return None;
        }
        let buf = self.bufs.next()?.as_mut().expect("segment below count");
        let off = std::mem::take(&mut self.first_off);
        let n = (self.seg_bytes - off).min(self.left);
        self.left -= n;
        Some(&mut buf.as_mut_slice()[off..off + n])
    }
}

impl From<Vec<u8>> for DataBuf {
    fn from(v: Vec<u8>) -> DataBuf {
        DataBuf(Repr::Heap(v))
    }
}

impl From<&[u8]> for DataBuf {
    fn from(b: &[u8]) -> DataBuf {
        DataBuf(Repr::Heap(b.to_vec()))
    }
}

impl Clone for DataBuf {
    /// Always a heap copy.
    fn clone(&self) -> DataBuf {
        DataBuf(Repr::Heap(self.to_vec()))
    }
}

impl Extend<u8> for DataBuf {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        for b in iter {
            self.push(b);
        }
    }
}

impl FromIterator<u8> for DataBuf {
    fn from_iter<I: IntoIterator<Item = u8>>(iter: I) -> DataBuf {
        DataBuf(Repr::Heap(iter.into_iter().collect()))
    }
}

impl fmt::Debug for DataBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataBuf")
            .field("len", &self.len())
            .field("pool", &self.is_pool())
            .field("segments", &self.segment_count())
            .finish()
    }
}

impl PartialEq for DataBuf {
    fn eq(&self, other: &DataBuf) -> bool {
        if other.is_contiguous() {
            self.same_bytes(other)
        } else {
            self.len() == other.len() && other.same_bytes(&self.to_vec())
        }
    }
}

impl Eq for DataBuf {}

impl PartialEq<Vec<u8>> for DataBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.same_bytes(other)
    }
}

impl PartialEq<[u8]> for DataBuf {
    fn eq(&self, other: &[u8]) -> bool {
        self.same_bytes(other)
    }
}

impl<const N: usize> PartialEq<[u8; N]> for DataBuf {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.same_bytes(other)
    }
}

impl PartialEq<&[u8]> for DataBuf {
    fn eq(&self, other: &&[u8]) -> bool {
        self.same_bytes(other)
    }
}

impl PartialEq<DataBuf> for Vec<u8> {
    fn eq(&self, other: &DataBuf) -> bool {
        other.same_bytes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backing, Pool, PoolConfig};

    fn pool(cores: usize) -> Pool {
        Pool::new(PoolConfig {
            arena_bytes: 8 << 20,
            arena_limit_bytes: 8 << 20,
            cores,
            backing: Backing::Heap,
            ..PoolConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn vector_operations_on_pool_and_heap_buffers_agree() {
        let p = pool(1);
        let mut cache = p.core_cache(0).unwrap();
        let mut a = cache.alloc_data(0).unwrap();
        assert!(a.is_pool());
        assert_eq!(a.capacity(), 4096);
        let mut b = DataBuf::new();
        for d in [&mut a, &mut b] {
            d.extend_from_slice(&[1, 2, 3]);
            d.push(4);
            d.resize(10, 9);
            d.truncate(8);
            d[0] = 7;
            d.extend([5u8, 6]);
        }
        assert_eq!(a, b);
        assert_eq!(a, vec![7, 2, 3, 4, 9, 9, 9, 9, 5, 6]);
        assert!(a.is_pool(), "still fits its buffer");
        // Growing past the buffer moves to the heap; the pool buffer goes
        // home.
        a.resize(5000, 1);
        assert!(!a.is_pool());
        assert_eq!(&a[..10], &b[..]);
        assert_eq!(a.len(), 5000);
        cache.flush();
        assert_eq!(p.stats()[0].in_use, 0);
        assert_eq!(cache.free_data(a).map(|v| v.len()), Some(5000));
    }

    #[test]
    fn dropped_or_freed_anywhere_pool_buffers_go_home_once() {
        let p = pool(2);
        let leaked_before = crate::leaked_buffers();
        let mut c0 = p.core_cache(0).unwrap();
        let mut c1 = p.core_cache(1).unwrap();
        let total = p.stats()[1].total_bufs;
        let mut held: Vec<DataBuf> = (0..total).map(|_| c0.alloc_data(60_000).unwrap()).collect();
        assert!(held.iter().all(|d| d.len() == 60_000 && d.is_pool()));
        assert!(
            c0.alloc_data(60_000).is_none(),
            "class exhausted, nothing allocated"
        );
        c0.flush();
        assert_eq!(p.stats()[1].in_use, total);
        // Half freed by the other core, a quarter dropped on another
        // thread, the rest dropped here.
        let back = held.split_off(total as usize / 2);
        for d in back {
            assert!(c1.free_data(d).is_none());
        }
        let other: Vec<DataBuf> = held.split_off(total as usize / 4);
        std::thread::spawn(move || drop(other)).join().unwrap();
        drop(held);
        c0.flush();
        c1.flush();
        let s = p.stats()[1];
        assert_eq!(s.in_use, 0);
        assert_eq!(s.free_bufs, total);
        // Everything can be taken again.
        let again: Vec<DataBuf> = (0..total).map(|_| c1.alloc_data(65_536).unwrap()).collect();
        assert_eq!(again.len() as u64, total);
        // (Another test leaks one on purpose; this one leaks none.)
        assert_eq!(crate::leaked_buffers(), leaked_before);
    }

    #[test]
    fn an_exhausted_class_queues_the_request_and_grants_it_a_buffer_freed_anywhere() {
        let p = pool(2);
        let mut c0 = p.core_cache(0).unwrap();
        let mut c1 = p.core_cache(1).unwrap();
        let total = p.stats()[1].total_bufs;
        let mut held: Vec<DataBuf> = (0..total)
            .map(|_| c0.alloc_data_or_wait(60_000, 0).unwrap().unwrap())
            .collect();
        // Exhausted: two requests queue, in order; nothing is allocated.
        assert!(c0.alloc_data_or_wait(50_000, 7).unwrap().is_none());
        assert!(c0.alloc_data_or_wait(40_000, 8).unwrap().is_none());
        assert_eq!(c0.waiting(), 2);
        assert!(c0.next_grant().is_none(), "nothing free yet");
        // A later request does not overtake the queue, even when a buffer
        // is back.
        c1.free_data(held.pop().unwrap());
        c1.maintain();
        c1.flush();
        let mut granted = None;
        for _ in 0..100 {
            c0.maintain();
            if let Some(g) = c0.next_grant() {
                granted = Some(g);
                break;
            }
        }
        let (token, sg) = granted.expect("the buffer freed on core 1 reaches core 0's waiter");
        assert_eq!(token, 7);
        let d = c0.data_from_grant(sg);
        assert!(d.is_pool());
        assert_eq!(d.len(), 50_000);
        // The second waiter is cancelled (its command aborted).
        assert!(c0.cancel_wait(8));
        assert_eq!(c0.waiting(), 0);
        // Too large for any class: an error, not a wait.
        assert!(matches!(
            c0.alloc_data_or_wait(1 << 30, 9),
            Err(crate::AllocError::TooLarge { .. })
        ));
        drop(d);
        drop(held);
    }

    /// A pool with 64 KiB buffers only two of 1 MiB: enough to exhaust.
    fn sg_pool() -> Pool {
        Pool::new(PoolConfig {
            arena_bytes: 8 << 20,
            arena_limit_bytes: 8 << 20,
            cores: 1,
            backing: Backing::Heap,
            classes: vec![
                crate::ClassConfig {
                    buf_bytes: 64 << 10,
                    weight: 3,
                },
                crate::ClassConfig {
                    buf_bytes: 1 << 20,
                    weight: 1,
                },
            ],
            ..PoolConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_scatter_gather_buffer_spans_smaller_buffers_and_behaves_like_one() {
        let p = sg_pool();
        let mut cache = p.core_cache(0).unwrap();
        // 300 KiB + 5: five 64 KiB buffers (waste under an eighth).
        let len = 300 * 1024 + 5;
        let mut d = cache.alloc_data_sg(len).expect("64 KiB buffers are free");
        assert_eq!(d.len(), len);
        assert_eq!(d.segment_count(), 5);
        assert!(d.is_pool() && !d.is_contiguous());
        assert_eq!(d.capacity(), 5 * 65536);
        let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + i / 65536) as u8).collect();
        d.copy_from_at(0, &pattern);
        assert_eq!(d, pattern);
        assert_eq!(d.to_vec(), pattern);
        // Pieces split at buffer boundaries, whatever the range.
        let pieces: Vec<usize> = d.slices_at(65530, 70000).map(<[u8]>::len).collect();
        assert_eq!(pieces, vec![6, 65536, 4458]);
        let mut out = vec![0u8; 70000];
        d.copy_to_at(65530, &mut out);
        assert_eq!(out, pattern[65530..135530]);
        let mut at = 0;
        for piece in d.slices_at_mut(1000, 200_000) {
            piece.fill(0xee);
            at += piece.len();
        }
        assert_eq!(at, 200_000);
        let mut want = pattern.clone();
        want[1000..201_000].fill(0xee);
        assert_eq!(d, want);
        assert_eq!(d.segments().map(<[u8]>::len).sum::<usize>(), len);
        // Length changes within the buffers stay in them; growing past
        // them moves the bytes to the heap and sends the buffers home.
        d.truncate(100);
        d.set_len_stale(5 * 65536);
        assert_eq!(d.segment_count(), 5);
        d.truncate(70_000);
        d.extend_from_slice(&[1, 2, 3]);
        assert_eq!(d.len(), 70_003);
        assert_eq!(&d.to_vec()[69_999..], &[want[69_999], 1, 2, 3]);
        d.resize(70_010, 9);
        assert_eq!(&d.to_vec()[70_003..], &[9; 7]);
        assert!(!d.is_contiguous());
        d.resize(6 * 65536, 4);
        assert!(d.is_contiguous() && !d.is_pool());
        assert_eq!(&d[69_999..70_004], &[want[69_999], 1, 2, 3, 9]);
        assert_eq!(cache.free_data(d).map(|v| v.len()), Some(6 * 65536));
        cache.flush();
        assert_eq!(p.stats()[0].in_use, 0, "every segment went home");
    }

    #[test]
    fn scatter_gather_buffers_go_home_whole_from_anywhere() {
        let p = sg_pool();
        let mut cache = p.core_cache(0).unwrap();
        let total = p.stats()[0].total_bufs;
        // Freed through the cache, dropped on another thread, linearized
        // by a write through `DerefMut`: each way every segment returns.
        assert!(
            cache.alloc_data_sg(1 << 20).is_none(),
            "16 segments of 64 KiB are too many"
        );
        let a = cache.alloc_data_sg(450_000).unwrap();
        assert_eq!(a.segment_count(), 7);
        let b = cache.alloc_data_sg(190_000).unwrap();
        let mut c = cache.alloc_data_sg(130_000).unwrap();
        assert_eq!(c.segment_count(), 2);
        c.copy_from_at(65_530, &[1, 2, 3, 4, 5, 6, 7, 8]);
        c[65_533] = 0xff;
        assert!(c.is_contiguous() && !c.is_pool());
        assert_eq!(&c[65_530..65_538], &[1, 2, 3, 0xff, 5, 6, 7, 8]);
        cache.free_data(a);
        std::thread::spawn(move || drop(b)).join().unwrap();
        drop(c);
        cache.flush();
        let s = p.stats()[0];
        assert_eq!((s.in_use, s.free_bufs), (0, total));
    }

    #[test]
    fn scatter_gather_takes_only_idle_smaller_buffers() {
        let p = sg_pool();
        let mut cache = p.core_cache(0).unwrap();
        // Beyond what eight 64 KiB buffers hold: no list.
        assert!(cache.alloc_data_sg(DATA_SEGMENTS_MAX * 65536 + 1).is_none());
        // One buffer would do: not a scatter-gather request.
        assert!(cache.alloc_data_sg(65536).is_none());
        // Too wasteful: 65537 bytes in two 64 KiB buffers wastes half.
        assert!(cache.alloc_data_sg(65537).is_none());
        // Exhaust the 64 KiB class; then nothing, and nothing allocated.
        let total = p.stats()[0].total_bufs as usize;
        let held: Vec<DataBuf> = (0..total)
            .map(|_| cache.alloc_data(60_000).unwrap())
            .collect();
        assert!(cache.alloc_data_sg(500_000).is_none());
        drop(held);
        cache.flush();
        assert!(cache.alloc_data_sg(500_000).is_some());
    }

    #[test]
    fn a_waiting_request_is_granted_pieces_freed_in_a_smaller_class() {
        let p = sg_pool();
        let mut cache = p.core_cache(0).unwrap();
        let small = p.stats()[0].total_bufs as usize;
        let big = p.stats()[1].total_bufs as usize;
        // Every 1 MiB buffer and every 64 KiB one in use; two requests of
        // 410 KiB queue for a 1 MiB buffer.
        let bigs: Vec<DataBuf> = (0..big)
            .map(|_| cache.alloc_data(1 << 20).unwrap())
            .collect();
        let mut smalls: Vec<DataBuf> = (0..small)
            .map(|_| cache.alloc_data(65536).unwrap())
            .collect();
        assert!(cache.alloc_data(420_000).is_none() && cache.alloc_data_sg(420_000).is_none());
        cache.wait_for_data(420_000, 7).unwrap();
        cache.wait_for_data(420_000, 8).unwrap();
        let mut ok = |_t: u64| true;
        assert!(cache.next_grant().is_none());
        assert!(cache.grant_in_pieces(&mut ok).is_none(), "nothing idle yet");
        // Seven 64 KiB buffers come back: the first waiter takes them.
        for _ in 0..7 {
            cache.free_data(smalls.pop().unwrap());
        }
        cache.flush();
        let (token, d) = cache
            .grant_in_pieces(&mut ok)
            .expect("pieces for the first");
        assert_eq!((token, d.len(), d.segment_count()), (7, 420_000, 7));
        assert_eq!(cache.waiting(), 1);
        // A request that must stay whole is left waiting for its class.
        for _ in 0..7 {
            cache.free_data(smalls.pop().unwrap());
        }
        assert!(cache.grant_in_pieces(&mut |t| t != 8).is_none());
        // Its own class comes first: a freed 1 MiB buffer goes through
        // `next_grant`, and `grant_in_pieces` leaves it alone.
        let mut bigs = bigs;
        cache.free_data(bigs.pop().unwrap());
        assert!(cache.grant_in_pieces(&mut ok).is_none());
        let (token, sg) = cache.next_grant().unwrap();
        let whole = cache.data_from_grant(sg);
        assert_eq!((token, whole.segment_count()), (8, 1));
        assert_eq!(cache.waiting(), 0);
        drop((bigs, smalls, d, whole));
        cache.flush();
        assert!(
            p.stats().iter().all(|s| s.in_use == 0),
            "every buffer went home"
        );
    }

    #[test]
    #[should_panic(expected = "read as one slice")]
    fn reading_a_scatter_gather_buffer_as_one_slice_is_caught() {
        let p = sg_pool();
        let mut cache = p.core_cache(0).unwrap();
        let d = cache.alloc_data_sg(190_000).unwrap();
        let _ = d[0];
    }

    #[test]
    fn stale_length_keeps_bytes_and_never_reads_past_initialized_memory() {
        let p = pool(1);
        let mut cache = p.core_cache(0).unwrap();
        let mut d = cache.alloc_data(100).unwrap();
        d.fill(0xab);
        cache.free_data(d);
        let mut d = cache.alloc_data(50).unwrap();
        d.set_len_stale(4096);
        assert_eq!(d.len(), 4096);
        let mut h = DataBuf::new();
        h.set_len_stale(10);
        assert_eq!(h, vec![0; 10]);
    }
}
