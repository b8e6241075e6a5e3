//! `DataBuf`: the buffer one command's data lives in from the transport
//! to the backstore and back. It is either a pool buffer (hugepage arena
//! memory, registered once for RDMA) or, for small emulated responses,
//! tests and the rare buffer that outgrows its class, a heap vector. The
//! device server and the backstores see one type with the few vector
//! operations they use; where the bytes live is the engine's business.
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

enum Repr {
    Heap(Vec<u8>),
    Pool { buf: Buf, home: DataHome },
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

    /// The pool buffer inside, for the pool to take back (`None` for a
    /// heap buffer, returned as `Err`).
    pub(crate) fn into_pool(self) -> Result<(Buf, DataHome), Vec<u8>> {
        let mut me = std::mem::ManuallyDrop::new(self);
        // Take the representation out, leaving an empty vector: `Drop`
        // (which would send a pool buffer home) must not run on it.
        match std::mem::replace(&mut me.0, Repr::Heap(Vec::new())) {
            Repr::Heap(v) => Err(v),
            Repr::Pool { buf, home } => Ok((buf, home)),
        }
    }

    /// Whether the bytes are in a pool arena (registered for RDMA).
    pub fn is_pool(&self) -> bool {
        matches!(self.0, Repr::Pool { .. })
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Heap(v) => v.len(),
            Repr::Pool { buf, .. } => buf.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        match &self.0 {
            Repr::Heap(v) => v.capacity(),
            Repr::Pool { buf, .. } => buf.capacity(),
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0)
    }

    pub fn truncate(&mut self, len: usize) {
        match &mut self.0 {
            Repr::Heap(v) => v.truncate(len),
            Repr::Pool { buf, .. } => {
                if len < buf.len() {
                    buf.set_len(len)
                }
            }
        }
    }

    /// Makes room for `additional` more bytes. A pool buffer that is too
    /// small moves to the heap (a copy and an allocation: only emulated
    /// responses larger than their buffer do this).
    pub fn reserve(&mut self, additional: usize) {
        let need = self.len() + additional;
        match &mut self.0 {
            Repr::Heap(v) => v.reserve(additional),
            Repr::Pool { buf, .. } if need <= buf.capacity() => {}
            Repr::Pool { buf, .. } => {
                let mut v = Vec::with_capacity(need.max(2 * buf.capacity()));
                v.extend_from_slice(buf.data());
                if let Repr::Pool { buf, home } = std::mem::replace(&mut self.0, Repr::Heap(v)) {
                    home.give_back(buf);
                }
            }
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
            Repr::Pool { buf, .. } => {
                buf.set_len(len);
                buf.as_mut_slice()[old..len].fill(value);
            }
        }
    }

    /// Sets the length to `len` without writing the bytes: they hold
    /// whatever was there (initialized memory: zeros or an earlier use's
    /// data). For buffers the caller overwrites completely before reading.
    pub fn set_len_stale(&mut self, len: usize) {
        match &mut self.0 {
            Repr::Pool { buf, .. } if len <= buf.capacity() => buf.set_len(len),
            _ => self.resize(len, 0),
        }
    }

    pub fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b])
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        match &mut self.0 {
            Repr::Heap(v) => v.extend_from_slice(bytes),
            Repr::Pool { buf, .. } => {
                let old = buf.len();
                buf.set_len(old + bytes.len());
                buf.as_mut_slice()[old..old + bytes.len()].copy_from_slice(bytes);
            }
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
        self.deref().to_vec()
    }

    /// The bytes as a heap vector: moved out of a heap buffer, copied out
    /// of a pool buffer (which then goes home).
    pub fn into_vec(self) -> Vec<u8> {
        match self.into_pool() {
            Err(v) => v,
            Ok((buf, home)) => {
                let v = buf.data().to_vec();
                home.give_back(buf);
                v
            }
        }
    }
}

impl Drop for DataBuf {
    fn drop(&mut self) {
        if let Repr::Pool { .. } = self.0 {
            if let Repr::Pool { buf, home } = std::mem::replace(&mut self.0, Repr::Heap(Vec::new()))
            {
                home.give_back(buf);
            }
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
        }
    }
}

impl DerefMut for DataBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Repr::Heap(v) => v,
            Repr::Pool { buf, .. } => buf.data_mut(),
        }
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
            .finish()
    }
}

impl PartialEq for DataBuf {
    fn eq(&self, other: &DataBuf) -> bool {
        **self == **other
    }
}

impl Eq for DataBuf {}

impl PartialEq<Vec<u8>> for DataBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

impl PartialEq<[u8]> for DataBuf {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for DataBuf {
    fn eq(&self, other: &[u8; N]) -> bool {
        **self == other[..]
    }
}

impl PartialEq<&[u8]> for DataBuf {
    fn eq(&self, other: &&[u8]) -> bool {
        **self == **other
    }
}

impl PartialEq<DataBuf> for Vec<u8> {
    fn eq(&self, other: &DataBuf) -> bool {
        self[..] == **other
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
