//! The heap pool the engine uses until its data path moves onto
//! [`crate::Pool`]: per-reactor free lists of `Vec<u8>` in power-of-two
//! size classes.
//!
//! Buffers are plain heap vectors because the device server and the
//! backstores still take `Vec<u8>`; what this pool adds is that, once
//! warm, the data path reuses them instead of allocating: a buffer is
//! filed under the largest class its capacity covers and handed out for
//! any length up to that class. The cache is bounded per class and in
//! bytes, so a burst of large commands does not pin memory forever.

/// Smallest class: 4 KiB.
const CLASS_MIN_SHIFT: u32 = 12;
/// Largest class: 16 MiB; larger buffers are not kept.
const CLASS_MAX_SHIFT: u32 = 24;
const CLASSES: usize = (CLASS_MAX_SHIFT - CLASS_MIN_SHIFT + 1) as usize;

/// A per-reactor set of free lists. Not shared between threads: each
/// reactor owns one, so taking and returning a buffer takes no lock.
pub struct BufPool {
    free: [Vec<Vec<u8>>; CLASSES],
    /// Buffers kept per class at most.
    per_class_max: usize,
    /// Bytes kept in all free lists at most.
    cached_bytes_max: usize,
    cached_bytes: usize,
    pub stats: PoolStats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    pub taken: u64,
    /// Buffers allocated because the class's free list was empty.
    pub created: u64,
    pub in_use: u64,
    pub in_use_high_water: u64,
    /// Buffers freed on return because their class or the byte cap was full.
    pub dropped: u64,
}

/// Class whose size is the smallest power of two >= `len`.
fn class_for_len(len: usize) -> Option<usize> {
    let shift = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(CLASS_MIN_SHIFT);
    (shift <= CLASS_MAX_SHIFT).then(|| (shift - CLASS_MIN_SHIFT) as usize)
}

/// Largest class a buffer of `cap` bytes can serve.
fn class_for_cap(cap: usize) -> Option<usize> {
    if cap < 1 << CLASS_MIN_SHIFT {
        return None;
    }
    let shift = (usize::BITS - 1 - cap.leading_zeros()).min(CLASS_MAX_SHIFT);
    Some((shift - CLASS_MIN_SHIFT) as usize)
}

impl BufPool {
    /// `per_class_max` buffers per class and `cached_bytes_max` bytes in
    /// all at most are kept for reuse.
    pub fn new(per_class_max: usize, cached_bytes_max: usize) -> BufPool {
        BufPool {
            free: std::array::from_fn(|_| Vec::with_capacity(per_class_max.min(4096))),
            per_class_max,
            cached_bytes_max,
            cached_bytes: 0,
            stats: PoolStats::default(),
        }
    }

    /// An empty buffer with room for at least `len` bytes.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.pop(len);
        b.clear();
        b
    }

    /// A buffer of exactly `len` bytes whose contents are whatever its
    /// last user left (zeros where nobody wrote): for data that will be
    /// overwritten completely, such as write data arriving in pieces, so
    /// that sizing it does not first write every byte.
    pub fn take_sized(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.pop(len);
        if b.len() >= len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    /// A buffer with room for `len` bytes, as its last user left it (the
    /// free lists keep the initialized length, not the contents' meaning).
    fn pop(&mut self, len: usize) -> Vec<u8> {
        self.stats.taken += 1;
        self.stats.in_use += 1;
        self.stats.in_use_high_water = self.stats.in_use_high_water.max(self.stats.in_use);
        let Some(class) = class_for_len(len) else {
            self.stats.created += 1;
            return Vec::with_capacity(len);
        };
        match self.free[class].pop() {
            Some(b) => {
                self.cached_bytes -= b.capacity();
                b
            }
            None => {
                self.stats.created += 1;
                Vec::with_capacity(1 << (class as u32 + CLASS_MIN_SHIFT))
            }
        }
    }

    /// Return a buffer; its contents are never read again, though
    /// `take_sized` may hand them out to be overwritten.
    pub fn give(&mut self, b: Vec<u8>) {
        self.stats.in_use = self.stats.in_use.saturating_sub(1);
        let Some(class) = class_for_cap(b.capacity()) else {
            return;
        };
        if self.free[class].len() >= self.per_class_max
            || self.cached_bytes + b.capacity() > self.cached_bytes_max
        {
            self.stats.dropped += 1;
            return;
        }
        self.cached_bytes += b.capacity();
        self.free[class].push(b);
    }

    /// Fill the free list of every class up to the one serving
    /// `len_max` with `per_class` buffers (within both caps), so a
    /// reactor allocates them at start-up rather than on the I/O path.
    /// The capacity is reserved, not touched: the kernel backs a buffer's
    /// pages only once it is used.
    pub fn prewarm(&mut self, len_max: usize, per_class: usize) {
        let Some(top) = class_for_len(len_max) else {
            return;
        };
        for class in 0..=top {
            let size = 1usize << (class as u32 + CLASS_MIN_SHIFT);
            while self.free[class].len() < per_class.min(self.per_class_max)
                && self.cached_bytes + size <= self.cached_bytes_max
            {
                self.cached_bytes += size;
                self.free[class].push(Vec::with_capacity(size));
            }
        }
    }

    /// Bytes held in the free lists.
    pub fn cached_bytes(&self) -> usize {
        self.cached_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prewarmed_classes_serve_without_creating() {
        let mut p = BufPool::new(8, 1 << 30);
        p.prewarm(20_000, 3);
        // Classes 4, 8, 16 and 32 KiB (20,000 bytes needs the 32 KiB one).
        assert_eq!(p.cached_bytes(), 3 * (4 + 8 + 16 + 32) * 1024);
        let taken: Vec<_> = (0..3).map(|_| p.take(20_000)).collect();
        assert_eq!(p.stats.created, 0);
        // The class is empty now, and the 64 KiB one was never warmed.
        let extra = p.take(20_000);
        assert_eq!(p.stats.created, 1);
        let bigger = p.take(40_000);
        p.give(bigger);
        assert_eq!(p.stats.created, 2);
        for b in taken {
            p.give(b);
        }
        p.give(extra);
        p.take(17_000);
        assert_eq!(p.stats.created, 2, "given back, served again");
        // The byte cap bounds the warm-up too.
        let mut small = BufPool::new(8, 10 * 1024);
        small.prewarm(4096, 8);
        assert_eq!(small.cached_bytes(), 8 * 1024);
    }

    #[test]
    fn recycles_within_a_class() {
        let mut p = BufPool::new(4, 1 << 30);
        let mut b = p.take(3000);
        assert!(b.capacity() >= 4096);
        b.extend_from_slice(&[1, 2, 3]);
        let ptr = b.as_ptr();
        p.give(b);
        let c = p.take(4096);
        assert!(c.is_empty());
        assert_eq!(c.as_ptr(), ptr);
        assert_eq!(p.stats.created, 1);
    }

    #[test]
    fn a_buffer_serves_only_lengths_it_can_hold() {
        let mut p = BufPool::new(4, 1 << 30);
        let b = p.take(1 << 20);
        assert!(b.capacity() >= 1 << 20);
        p.give(b);
        // A larger request must not get the 1 MiB buffer.
        let big = p.take((1 << 20) + 1);
        assert!(big.capacity() > 1 << 20);
        // An odd capacity is filed under the class it covers.
        p.give(Vec::with_capacity(6000));
        let c = p.take(4096);
        assert!(c.capacity() >= 4096);
        assert_eq!(class_for_cap(6000), Some(0));
        assert_eq!(class_for_len(6000), Some(1));
        assert_eq!(class_for_len(0), Some(0));
        assert_eq!(class_for_len(32 << 20), None);
    }

    #[test]
    fn caches_are_bounded() {
        let mut p = BufPool::new(2, 3 * 4096);
        let bufs: Vec<_> = (0..4).map(|_| p.take(4096)).collect();
        for b in bufs {
            p.give(b);
        }
        assert_eq!(p.free[0].len(), 2, "per-class cap");
        assert_eq!(p.stats.dropped, 2);
        let mut p = BufPool::new(8, 2 * 4096);
        let bufs: Vec<_> = (0..4).map(|_| p.take(4096)).collect();
        for b in bufs {
            p.give(b);
        }
        assert_eq!(p.cached_bytes(), 2 * 4096, "byte cap");
        // Tiny buffers are not kept at all.
        p.give(Vec::with_capacity(100));
        assert_eq!(p.cached_bytes(), 2 * 4096);
    }

    #[test]
    fn sized_buffers_have_the_asked_length_and_reuse_memory() {
        let mut p = BufPool::new(4, 1 << 30);
        let b = p.take_sized(10_000);
        assert_eq!(b.len(), 10_000);
        assert!(b.iter().all(|&x| x == 0));
        let ptr = b.as_ptr();
        p.give(b);
        let b = p.take_sized(9000);
        assert_eq!((b.len(), b.as_ptr()), (9000, ptr));
        p.give(b);
        let b = p.take_sized(16_000);
        assert_eq!((b.len(), b.as_ptr()), (16_000, ptr));
        p.give(b);
        let b = p.take(12_000);
        assert!(b.is_empty(), "take always hands out an empty buffer");
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(p.stats.created, 1);
    }
}
