//! The legacy heap pool: a per-reactor free list of `Vec<u8>`.
//!
//! This is what the single-reactor engine uses today. It allocates from
//! the heap when its free list is empty, so it is not the data-path pool
//! the per-core engine will use; that is [`crate::Pool`] with its
//! [`crate::CoreCache`]s. It stays until the engine has moved over.

/// A per-reactor free list of byte vectors. Not shared between threads:
/// each reactor owns one, so taking and returning a buffer takes no lock.
pub struct BufPool {
    free: Vec<Vec<u8>>,
    /// Buffers kept at most; more are dropped when returned.
    cap: usize,
    /// Capacity given to buffers created when the free list is empty.
    buf_size: usize,
    pub stats: PoolStats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    pub taken: u64,
    pub created: u64,
    pub in_use: u64,
    pub in_use_high_water: u64,
}

impl BufPool {
    pub fn new(buf_size: usize, cap: usize) -> BufPool {
        BufPool {
            free: Vec::with_capacity(cap),
            cap,
            buf_size,
            stats: PoolStats::default(),
        }
    }

    /// An empty buffer with at least the pool's buffer size of capacity.
    pub fn take(&mut self) -> Vec<u8> {
        self.stats.taken += 1;
        self.stats.in_use += 1;
        self.stats.in_use_high_water = self.stats.in_use_high_water.max(self.stats.in_use);
        match self.free.pop() {
            Some(b) => b,
            None => {
                self.stats.created += 1;
                Vec::with_capacity(self.buf_size)
            }
        }
    }

    /// Return a buffer; its contents are discarded.
    pub fn give(&mut self, mut b: Vec<u8>) {
        self.stats.in_use = self.stats.in_use.saturating_sub(1);
        if self.free.len() < self.cap && b.capacity() > 0 {
            b.clear();
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn recycles() {
        let mut p = super::BufPool::new(4096, 4);
        let mut b = p.take();
        b.extend_from_slice(&[1, 2, 3]);
        let ptr = b.as_ptr();
        p.give(b);
        let c = p.take();
        assert!(c.is_empty());
        assert_eq!(c.as_ptr(), ptr);
        assert_eq!(p.stats.created, 1);
    }
}
