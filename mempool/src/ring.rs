//! Receive rings whose bytes can be lent out: a TCP connection reads many
//! PDUs at once into one pool buffer (its ring), and a write whose data
//! came whole inside a PDU takes that data as a [`DataBuf`] view of the
//! ring instead of a copy. The ring goes back to its pool when its owner
//! and its last view are gone, whichever is last, on whatever thread.
//!
//! Rules that keep the bytes sound without locks:
//! - A view's bytes are never written again by anyone: the owner writes
//!   only at or beyond the end of its furthest view (`views_end`), views do
//!   not overlap, and writing through a view (`DerefMut`) moves it to the
//!   heap first.
//! - The owner may move bytes back to the front of the ring only while no
//!   view is alive (`RxRing::compact`); otherwise it takes a new ring.
//! - The slot's count is the number of holders (owner and views). The one
//!   who takes it to zero is the only one left and takes the buffer out.

use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crossbeam_queue::ArrayQueue;

use crate::buf::Buf;
use crate::databuf::DataBuf;
use crate::pool::DataHome;

/// Rings a pool has out at once, owned or pinned by views, at most: one
/// per connection plus those still lent out to writes in flight.
pub const RING_SLOTS: usize = 1024;

pub(crate) struct RingSlots {
    slots: Box<[RingSlot]>,
    free: ArrayQueue<u32>,
}

struct RingSlot {
    buf: UnsafeCell<Option<Buf>>,
    refs: AtomicU32,
}

// SAFETY: a slot's `buf` is written only by the holder that took the slot
// index from `free` (before it lends out any view) and by the holder that
// drops `refs` to zero (when no other holder is left); the AcqRel count
// orders those accesses. Everyone else only reads the buffer's bytes, at
// ranges no one writes (see the module comment). `Buf` is `Send`.
unsafe impl Sync for RingSlots {}

impl RingSlots {
    pub(crate) fn new(n: usize) -> RingSlots {
        let free = ArrayQueue::new(n);
        for i in 0..n {
            free.push(i as u32).expect("sized for every slot");
        }
        RingSlots {
            slots: (0..n)
                .map(|_| RingSlot {
                    buf: UnsafeCell::new(None),
                    refs: AtomicU32::new(0),
                })
                .collect(),
            free,
        }
    }

    /// Puts `buf` in a free slot with one holder (the owner); `Err(buf)`
    /// when every slot is taken.
    pub(crate) fn take(&self, buf: Buf) -> Result<u32, Buf> {
        let Some(slot) = self.free.pop() else {
            return Err(buf);
        };
        let s = &self.slots[slot as usize];
        // SAFETY: the slot came from `free`, so no one else holds it.
        unsafe { *s.buf.get() = Some(buf) };
        s.refs.store(1, Ordering::Release);
        Ok(slot)
    }

    /// One more holder of `slot` (the caller is one already).
    pub(crate) fn hold(&self, slot: u32) {
        let old = self.slots[slot as usize]
            .refs
            .fetch_add(1, Ordering::Relaxed);
        assert!(old > 0, "a view of a ring no one holds");
    }

    /// One holder fewer; the last one gets the buffer back and the slot
    /// is free again.
    pub(crate) fn release(&self, slot: u32) -> Option<Buf> {
        let s = &self.slots[slot as usize];
        if s.refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        // SAFETY: the count reached zero, so the caller was the last
        // holder: no view or owner reads the buffer any more, and no one
        // else can reach the slot until it is pushed back to `free`.
        let buf = unsafe { (*s.buf.get()).take() };
        self.free.push(slot).expect("a slot is given back once");
        buf
    }

    pub(crate) fn holders(&self, slot: u32) -> u32 {
        self.slots[slot as usize].refs.load(Ordering::Acquire)
    }

    /// `len` bytes of `slot`'s buffer from `off`, which a view holds.
    pub(crate) fn bytes(&self, slot: u32, off: usize, len: usize) -> &[u8] {
        // SAFETY: the caller holds the slot, so the buffer is in it and
        // stays there; the range is one no one writes while it is held
        // (a view's bytes; see the module comment).
        let buf = unsafe { (*self.slots[slot as usize].buf.get()).as_ref() };
        let buf = buf.expect("a held ring has its buffer");
        &buf.as_slice()[off..off + len]
    }
}

/// A connection's receive ring: a pool buffer it reads into, lending out
/// views of the data it decodes.
pub struct RxRing {
    slot: u32,
    base: NonNull<u8>,
    cap: usize,
    /// End of the furthest view lent out since the last compaction: the
    /// owner writes only at or beyond it.
    views_end: Cell<usize>,
    home: DataHome,
}

// SAFETY: the ring is a handle to pool memory that only its owner writes
// (through `&mut self`); moving it to another thread moves that right with
// it. Views are `DataBuf`s, `Send` on their own.
unsafe impl Send for RxRing {}

impl RxRing {
    pub(crate) fn new(slot: u32, base: NonNull<u8>, cap: usize, home: DataHome) -> RxRing {
        RxRing {
            slot,
            base,
            cap,
            views_end: Cell::new(0),
            home,
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The address of the ring's first byte, to find where a slice of it
    /// lies.
    pub fn base_addr(&self) -> usize {
        self.base.as_ptr() as usize
    }

    /// Whether views of this ring are still alive.
    pub fn lent(&self) -> bool {
        self.home.rings().holders(self.slot) > 1
    }

    /// Where the owner may write: `[views_end, capacity)`.
    pub fn writable_from(&self) -> usize {
        self.views_end.get()
    }

    /// Panics unless `[from, to)` is inside the ring and not lent out:
    /// the owner's part, which `bytes` and `bytes_mut` hand out.
    fn check_owned(&self, from: usize, to: usize) {
        assert!(from >= self.views_end.get(), "bytes {from}.. are lent out");
        assert!(
            from <= to && to <= self.cap,
            "range {from}..{to} past {}",
            self.cap
        );
    }

    /// Bytes `[from, to)` to read (not lent out).
    pub fn bytes(&self, from: usize, to: usize) -> &[u8] {
        self.check_owned(from, to);
        // SAFETY: in bounds of the ring's buffer, which lives while the
        // ring does (it holds the slot); no view covers the range, so only
        // the owner writes it, and not while this shared borrow lives.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(from), to - from) }
    }

    /// Bytes `[from, to)` to write (not lent out).
    pub fn bytes_mut(&mut self, from: usize, to: usize) -> &mut [u8] {
        self.check_owned(from, to);
        // SAFETY: as in `bytes`, and `&mut self` makes this the only
        // borrow of the owner's part.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(from), to - from) }
    }

    /// Moves bytes `[from, to)` to the front, if no view is alive (else
    /// `false`: the caller takes a new ring and copies them there).
    pub fn compact(&mut self, from: usize, to: usize) -> bool {
        if self.lent() {
            return false;
        }
        self.views_end.set(0);
        let all = self.bytes_mut(0, self.cap);
        all.copy_within(from..to, 0);
        true
    }

    /// Lends out bytes `[off, off + len)`, which the owner has read and
    /// will not read or write again, as a read-only `DataBuf`.
    pub fn view(&self, off: usize, len: usize) -> DataBuf {
        assert!(off >= self.views_end.get(), "views overlap");
        assert!(off + len <= self.cap, "view past the ring");
        self.home.rings().hold(self.slot);
        self.views_end.set(off + len);
        DataBuf::from_ring(self.slot, off, len, self.home)
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        if let Some(buf) = self.home.rings().release(self.slot) {
            self.home.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Backing, DataBuf, Pool, PoolConfig};

    fn pool() -> Pool {
        Pool::new(PoolConfig {
            arena_bytes: 8 << 20,
            arena_limit_bytes: 8 << 20,
            cores: 2,
            backing: Backing::Heap,
            ..PoolConfig::default()
        })
        .unwrap()
    }

    fn in_use(p: &Pool) -> u64 {
        p.stats().iter().map(|s| s.in_use).sum()
    }

    #[test]
    fn views_lend_ring_bytes_without_a_copy_and_the_ring_goes_home_last() {
        let p = pool();
        let mut c = p.core_cache(0).unwrap();
        let mut ring = c.alloc_ring(60_000).unwrap();
        assert_eq!(ring.capacity(), 60_000);
        // A "recv" of two 4 KiB segments after a 48-byte header each.
        for (i, b) in ring.bytes_mut(0, 2 * (48 + 4096)).iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let expect = |at: usize| (at..at + 4096).map(|i| (i % 251) as u8).collect::<Vec<_>>();
        let base = ring.bytes(0, 1).as_ptr();
        let a = ring.view(48, 4096);
        let b = ring.view(48 + 4096 + 48, 4096);
        assert!(a.is_ring_view() && a.is_pool() && a.is_contiguous());
        assert_eq!(a, expect(48));
        assert_eq!(b.segments().next().unwrap(), &expect(4192)[..]);
        assert_eq!(a.as_ptr(), base.wrapping_add(48), "no copy");
        assert!(ring.lent());
        assert_eq!(ring.writable_from(), 2 * (48 + 4096));
        // Not compacted while lent; the owner goes first, the views keep
        // the buffer.
        assert!(!ring.compact(2 * (48 + 4096), 2 * (48 + 4096)));
        c.flush();
        let held = in_use(&p);
        drop(ring);
        c.flush();
        assert_eq!(in_use(&p), held, "views still hold the ring");
        assert_eq!(c.free_data(a), None);
        // The last view, dropped on another thread, sends it home.
        std::thread::spawn(move || drop(b)).join().unwrap();
        c.flush();
        assert_eq!(in_use(&p), held - 1);
    }

    #[test]
    fn a_ring_without_views_compacts_in_place_and_a_freed_view_comes_back_locally() {
        let p = pool();
        let mut c = p.core_cache(0).unwrap();
        let mut ring = c.alloc_ring(4096).unwrap();
        ring.bytes_mut(0, 300).fill(1);
        ring.bytes_mut(100, 300).fill(2);
        let v = ring.view(0, 100);
        // The owner may not touch what it lent out, nor lend it twice.
        let caught = |f: &mut dyn FnMut()| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err()
        };
        assert!(caught(&mut || assert!(!ring.bytes(50, 60).is_empty())));
        assert!(caught(&mut || drop(ring.view(99, 10))));
        assert_eq!(c.free_data(v), None);
        assert!(!ring.lent());
        assert!(ring.compact(100, 300));
        assert_eq!(ring.writable_from(), 0);
        assert!(ring.bytes(0, 200).iter().all(|&b| b == 2));
        drop(ring);
        c.flush();
        assert_eq!(in_use(&p), 0);
    }

    #[test]
    fn writing_to_a_view_moves_it_out_of_the_ring() {
        let p = pool();
        let mut c = p.core_cache(0).unwrap();
        let mut ring = c.alloc_ring(4096).unwrap();
        ring.bytes_mut(0, 16).copy_from_slice(&[5; 16]);
        let mut v = ring.view(0, 16);
        let other = ring.view(16, 0);
        v.truncate(8);
        assert_eq!(v, [5u8; 8]);
        v[0] = 9;
        assert!(!v.is_ring_view() && !v.is_pool());
        assert_eq!(v, [9, 5, 5, 5, 5, 5, 5, 5]);
        drop(other);
        drop(ring);
        c.flush();
        assert_eq!(in_use(&p), 0, "moving out released the view");
        let _: DataBuf = v;
    }

    #[test]
    fn rings_run_out_cleanly() {
        let p = pool();
        let mut c = p.core_cache(0).unwrap();
        let mut rings = Vec::new();
        while let Some(r) = c.alloc_ring(1 << 20) {
            rings.push(r);
        }
        assert!(!rings.is_empty());
        rings.clear();
        assert!(c.alloc_ring(1 << 20).is_some());
    }
}
