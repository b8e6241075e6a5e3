//! The receive ring's memory. In the engine it is a pool ring
//! (`mempool::RxRing`): the kernel's socket copy puts write data in pool
//! memory, and a write whose data came whole with its command takes it
//! from there as a view, with no second copy. Without a pool (tests, tools)
//! or when the pool has no ring to spare, a heap vector does the same job
//! with a copy out.

use iscsi::conn::DataBuf;
use mempool::RxRing;

pub(crate) enum RxMem {
    Heap(Vec<u8>),
    Ring(RxRing),
}

impl RxMem {
    pub(crate) fn capacity(&self) -> usize {
        match self {
            RxMem::Heap(v) => v.len(),
            RxMem::Ring(r) => r.capacity(),
        }
    }

    pub(crate) fn bytes(&self, from: usize, to: usize) -> &[u8] {
        match self {
            RxMem::Heap(v) => &v[from..to],
            RxMem::Ring(r) => r.bytes(from, to),
        }
    }

    pub(crate) fn bytes_mut(&mut self, from: usize, to: usize) -> &mut [u8] {
        match self {
            RxMem::Heap(v) => &mut v[from..to],
            RxMem::Ring(r) => r.bytes_mut(from, to),
        }
    }

    /// Moves `[from, to)` to the front in place; `false` when part of the
    /// ring is lent out (the caller moves to new memory instead).
    pub(crate) fn compact(&mut self, from: usize, to: usize) -> bool {
        match self {
            RxMem::Heap(v) => {
                v.copy_within(from..to, 0);
                true
            }
            RxMem::Ring(r) => r.compact(from, to),
        }
    }

    /// Bytes `[off, off + len)`, already decoded, lent out without a copy
    /// (only a pool ring can).
    pub(crate) fn view(&self, off: usize, len: usize) -> Option<DataBuf> {
        match self {
            RxMem::Heap(_) => None,
            RxMem::Ring(r) => Some(r.view(off, len)),
        }
    }

    /// Where the memory starts, to find a decoded slice's offset.
    pub(crate) fn base_addr(&self) -> usize {
        match self {
            RxMem::Heap(v) => v.as_ptr() as usize,
            RxMem::Ring(r) => r.base_addr(),
        }
    }
}
