//! Pool configuration: how many bytes, which buffer classes, how mapped.

use crate::{
    HUGE_PAGE_BYTES, MAX_BUF_BYTES, MAX_CLASSES, MAX_CORES, MAX_CORE_CACHE_BUFS, MAX_POOL_BYTES,
    MAX_WAITERS, MIN_BUF_BYTES,
};

/// How arenas are backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// 2 MiB hugetlb pages when reserved, transparent huge pages otherwise.
    Auto,
    /// 2 MiB hugetlb pages (`MAP_HUGETLB`); fail when too few are reserved.
    HugeTlb,
    /// An anonymous mapping advised `MADV_HUGEPAGE`, 2 MiB aligned.
    TransparentHuge,
    /// The global allocator (tests, Miri); never registered for RDMA in
    /// production, but nothing stops it.
    Heap,
}

/// One buffer class: buffers of `buf_bytes` (a power of two), taking
/// `weight` shares of the pool's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassConfig {
    pub buf_bytes: usize,
    pub weight: u32,
}

/// Everything a [`crate::Pool`] is built from.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Bytes mapped at start-up, split between classes by weight (each
    /// class gets whole 2 MiB units, at least one, and whole buffers).
    pub arena_bytes: usize,
    /// Bytes the pool may ever map, arenas added later included. Sizes
    /// the per-class free queues, which are allocated at start-up.
    pub arena_limit_bytes: usize,
    /// Buffer classes, ascending `buf_bytes`, 1 to [`MAX_CLASSES`].
    pub classes: Vec<ClassConfig>,
    /// Per-core caches the pool hands out (cores 0..cores).
    pub cores: usize,
    /// Free buffers a core keeps per class before it returns half of them
    /// to the shared queue (clamped to a quarter of the class per core).
    pub core_cache_bufs: usize,
    /// Commands a core may queue per class waiting for buffers.
    pub waiters_per_class: usize,
    pub backing: Backing,
    /// `mlock` the arenas (a failure is logged, not fatal).
    pub lock_memory: bool,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            arena_bytes: 256 << 20,
            arena_limit_bytes: 256 << 20,
            classes: PoolConfig::default_classes(),
            cores: 1,
            core_cache_bufs: 32,
            waiters_per_class: 1024,
            backing: Backing::Auto,
            lock_memory: true,
        }
    }
}

/// What [`PoolConfig::plan`] derives for one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClassPlan {
    pub buf_bytes: usize,
    /// Bytes of the class's start-up arena.
    pub arena_bytes: usize,
    /// Bytes the class may ever map.
    pub limit_bytes: usize,
}

impl PoolConfig {
    /// 4 KiB, 64 KiB, 256 KiB and 1 MiB, weighted 1:3:6:6 (16, 48, 96 and
    /// 96 MiB of the default 256 MiB).
    pub fn default_classes() -> Vec<ClassConfig> {
        PoolConfig::classes_for_burst(1 << 20)
    }

    /// Classes for a negotiated MaxBurstLength (or the largest transfer a
    /// command may need in one piece): 4 KiB for PDUs and small I/O, 64 KiB
    /// and 256 KiB, 1 MiB, 2 MiB, 4 MiB, 8 MiB, and the burst rounded up to
    /// a power of two if larger, each no larger than that. 2 MiB because
    /// Linux's initiators cap a command just under it (iSER over soft-RoCE
    /// sends 2044 KiB); 4 and 8 MiB so that a command of that size does not
    /// take a buffer of the top class (16 MiB for the engine), four or two
    /// times what it needs.
    /// Commands bigger than the largest class span several buffers.
    pub fn classes_for_burst(max_burst_bytes: usize) -> Vec<ClassConfig> {
        let top = max_burst_bytes
            .clamp(MIN_BUF_BYTES, MAX_BUF_BYTES)
            .next_power_of_two();
        let mut v = Vec::new();
        for (buf_bytes, weight) in [
            (4 << 10, 1),
            (64 << 10, 3),
            (256 << 10, 6),
            (1 << 20, 6),
            (2 << 20, 4),
            (4 << 20, 3),
            (8 << 20, 3),
        ] {
            if buf_bytes <= top {
                v.push(ClassConfig { buf_bytes, weight });
            }
        }
        if v.last().is_some_and(|c| c.buf_bytes < top) {
            v.push(ClassConfig {
                buf_bytes: top,
                weight: 3,
            });
        }
        v
    }

    /// Checks every limit and derives each class's arena sizes.
    pub(crate) fn plan(&self) -> Result<Vec<ClassPlan>, String> {
        if self.classes.is_empty() || self.classes.len() > MAX_CLASSES {
            return Err(format!(
                "{} buffer classes, want 1 to {MAX_CLASSES}",
                self.classes.len()
            ));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if !c.buf_bytes.is_power_of_two()
                || !(MIN_BUF_BYTES..=MAX_BUF_BYTES).contains(&c.buf_bytes)
            {
                return Err(format!(
                    "class buf_bytes {} is not a power of two from {MIN_BUF_BYTES} to {MAX_BUF_BYTES}",
                    c.buf_bytes
                ));
            }
            if c.weight == 0 || c.weight > 1 << 16 {
                return Err(format!(
                    "class {} weight {} out of 1..=65536",
                    c.buf_bytes, c.weight
                ));
            }
            if i > 0 && self.classes[i - 1].buf_bytes >= c.buf_bytes {
                return Err("classes must have strictly ascending buf_bytes".into());
            }
        }
        if self.arena_bytes > MAX_POOL_BYTES || self.arena_limit_bytes > MAX_POOL_BYTES {
            return Err(format!("arena bytes above the {MAX_POOL_BYTES} limit"));
        }
        if self.arena_limit_bytes < self.arena_bytes {
            return Err("arena_limit_bytes below arena_bytes".into());
        }
        if !(1..=MAX_CORES).contains(&self.cores) {
            return Err(format!("{} cores, want 1 to {MAX_CORES}", self.cores));
        }
        if !(1..=MAX_CORE_CACHE_BUFS).contains(&self.core_cache_bufs) {
            return Err(format!(
                "core_cache_bufs {}, want 1 to {MAX_CORE_CACHE_BUFS}",
                self.core_cache_bufs
            ));
        }
        if !(1..=MAX_WAITERS).contains(&self.waiters_per_class) {
            return Err(format!(
                "waiters_per_class {}, want 1 to {MAX_WAITERS}",
                self.waiters_per_class
            ));
        }
        let weights: u64 = self.classes.iter().map(|c| c.weight as u64).sum();
        let mut plans = Vec::with_capacity(self.classes.len());
        for c in &self.classes {
            let unit = c.buf_bytes.max(HUGE_PAGE_BYTES);
            let share = |total: usize| {
                let bytes = (total as u128 * c.weight as u128 / weights as u128) as usize;
                (bytes / unit).max(1) * unit
            };
            let arena_bytes = share(self.arena_bytes);
            let limit_bytes = share(self.arena_limit_bytes).max(arena_bytes);
            plans.push(ClassPlan {
                buf_bytes: c.buf_bytes,
                arena_bytes,
                limit_bytes,
            });
        }
        let limit: usize = plans.iter().map(|p| p.limit_bytes).sum();
        if limit > MAX_POOL_BYTES {
            return Err(format!(
                "classes round up to {limit} bytes, above {MAX_POOL_BYTES}"
            ));
        }
        Ok(plans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_split() {
        let p = PoolConfig::default().plan().unwrap();
        let got: Vec<_> = p
            .iter()
            .map(|c| (c.buf_bytes, c.arena_bytes >> 20))
            .collect();
        assert_eq!(
            got,
            [
                (4 << 10, 16),
                (64 << 10, 48),
                (256 << 10, 96),
                (1 << 20, 96)
            ]
        );
    }

    #[test]
    fn burst_classes() {
        let sizes = |b| -> Vec<usize> {
            PoolConfig::classes_for_burst(b)
                .iter()
                .map(|c| c.buf_bytes >> 10)
                .collect()
        };
        assert_eq!(sizes(8192), [4, 8]);
        assert_eq!(sizes(262144), [4, 64, 256]);
        assert_eq!(sizes(300_000), [4, 64, 256, 512]);
        assert_eq!(sizes(1 << 20), [4, 64, 256, 1024]);
        assert_eq!(sizes(2 << 20), [4, 64, 256, 1024, 2048]);
        assert_eq!(sizes(3 << 20), [4, 64, 256, 1024, 2048, 4096]);
        assert_eq!(sizes(8 << 20), [4, 64, 256, 1024, 2048, 4096, 8192]);
        let all = [4, 64, 256, 1024, 2048, 4096, 8192, 16384];
        assert_eq!(sizes(16 << 20), all);
        assert_eq!(sizes(1 << 30), all);
    }

    #[test]
    fn rejects() {
        let bad = |f: &dyn Fn(&mut PoolConfig)| {
            let mut c = PoolConfig::default();
            f(&mut c);
            c.plan().unwrap_err()
        };
        bad(&|c| c.classes.clear());
        bad(&|c| c.classes[0].buf_bytes = 5000);
        bad(&|c| c.classes[0].buf_bytes = 1024);
        bad(&|c| c.classes.swap(0, 1));
        bad(&|c| c.classes[1].weight = 0);
        bad(&|c| c.cores = 0);
        bad(&|c| c.cores = 65);
        bad(&|c| c.arena_limit_bytes = 1);
        bad(&|c| c.waiters_per_class = 0);
        bad(&|c| c.core_cache_bufs = 0);
    }

    #[test]
    fn small_pool_gets_a_unit_per_class() {
        let c = PoolConfig {
            arena_bytes: 1,
            arena_limit_bytes: 1,
            ..PoolConfig::default()
        };
        for p in c.plan().unwrap() {
            assert_eq!(p.arena_bytes, HUGE_PAGE_BYTES);
        }
    }
}
