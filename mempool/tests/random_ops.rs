//! Thousands of random allocations, waits, grants, frees on either core,
//! cancels and maintenance: buffers never overlap, contents survive until
//! freed (no aliasing), and the counters add up.

use std::collections::BTreeMap;

use mempool::{Alloc, AllocError, Backing, ClassConfig, CoreCache, Pool, PoolConfig, SgList};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Allocate (or queue) `bytes` on core `core`.
    Alloc {
        core: usize,
        bytes: usize,
    },
    /// Free live command `pick` (modulo count) on core `core`.
    Free {
        core: usize,
        pick: usize,
    },
    Grant {
        core: usize,
    },
    Cancel {
        core: usize,
        pick: usize,
    },
    Maintain {
        core: usize,
    },
    Flush {
        core: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let core = 0..2usize;
    prop_oneof![
        4 => (core.clone(), prop_oneof![1..8192usize, 1..(200usize << 10), 1..(600usize << 10)])
            .prop_map(|(core, bytes)| Op::Alloc { core, bytes }),
        4 => (core.clone(), any::<usize>()).prop_map(|(core, pick)| Op::Free { core, pick }),
        2 => core.clone().prop_map(|core| Op::Grant { core }),
        1 => (core.clone(), any::<usize>()).prop_map(|(core, pick)| Op::Cancel { core, pick }),
        1 => core.clone().prop_map(|core| Op::Maintain { core }),
        1 => core.prop_map(|core| Op::Flush { core }),
    ]
}

fn config() -> PoolConfig {
    PoolConfig {
        arena_bytes: 6 << 20,
        arena_limit_bytes: 6 << 20,
        classes: vec![
            ClassConfig {
                buf_bytes: 4 << 10,
                weight: 1,
            },
            ClassConfig {
                buf_bytes: 64 << 10,
                weight: 1,
            },
            ClassConfig {
                buf_bytes: 256 << 10,
                weight: 1,
            },
        ],
        cores: 2,
        core_cache_bufs: 4,
        waiters_per_class: 8,
        backing: Backing::Heap,
        lock_memory: false,
    }
}

/// Bytes stamped in each buffer: both ends and the middle (stamping all
/// of it makes the debug build too slow for thousands of operations).
fn probes(cap: usize) -> impl Iterator<Item = usize> {
    (0..16).chain(cap / 2..cap / 2 + 16).chain(cap - 16..cap)
}

struct Live {
    sg: SgList,
    stamp: u8,
}

struct Model {
    live: Vec<Live>,
    /// addr -> capacity of every live buffer.
    ranges: BTreeMap<u64, u64>,
    /// Tokens waiting, per core.
    waiting: [Vec<u64>; 2],
    next_token: u64,
}

impl Model {
    fn add(&mut self, mut sg: SgList, bytes: usize) {
        assert_eq!(sg.len_bytes(), bytes);
        for b in sg.bufs() {
            let (addr, cap) = (b.addr(), b.capacity() as u64);
            assert_eq!(addr % cap, 0, "buffer not aligned to its size");
            if let Some((&a, &c)) = self.ranges.range(..=addr).next_back() {
                assert!(a + c <= addr, "overlaps a live buffer");
            }
            if let Some((&a, _)) = self.ranges.range(addr..).next() {
                assert!(addr + cap <= a, "overlaps a live buffer");
            }
            self.ranges.insert(addr, cap);
        }
        let stamp = (self.next_token % 251) as u8;
        for b in sg.bufs_mut() {
            for i in probes(b.capacity()) {
                b.as_mut_slice()[i] = stamp;
            }
        }
        self.live.push(Live { sg, stamp });
    }

    fn remove(&mut self, pick: usize) -> Option<SgList> {
        if self.live.is_empty() {
            return None;
        }
        let l = self.live.swap_remove(pick % self.live.len());
        for b in l.sg.bufs() {
            for i in probes(b.capacity()) {
                assert_eq!(b.as_slice()[i], l.stamp, "buffer changed under its owner");
            }
            assert!(self.ranges.remove(&b.addr()).is_some());
        }
        Some(l.sg)
    }
}

fn run(ops: Vec<Op>) {
    let pool = Pool::new(config()).unwrap();
    let mut caches: Vec<CoreCache> = (0..2).map(|c| pool.core_cache(c).unwrap()).collect();
    let mut m = Model {
        live: Vec::new(),
        ranges: BTreeMap::new(),
        waiting: [Vec::new(), Vec::new()],
        next_token: 0,
    };
    let mut bytes_of = BTreeMap::new();
    for op in ops {
        match op {
            Op::Alloc { core, bytes } => {
                m.next_token += 1;
                let t = m.next_token;
                let mut sg = SgList::new();
                match caches[core].alloc_or_wait(bytes, t, &mut sg) {
                    Ok(Alloc::Ready) => m.add(sg, bytes),
                    Ok(Alloc::Queued) => {
                        assert!(sg.is_empty());
                        m.waiting[core].push(t);
                        bytes_of.insert(t, bytes);
                    }
                    // Queue sized too small for the load: refused, nothing taken.
                    Err(AllocError::WaitQueueFull { .. }) => {
                        assert!(sg.is_empty());
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Free { core, pick } => {
                if let Some(mut sg) = m.remove(pick) {
                    caches[core].free_sg(&mut sg);
                }
            }
            Op::Grant { core } => {
                while let Some((t, sg)) = caches[core].next_grant() {
                    let i = m.waiting[core]
                        .iter()
                        .position(|&w| w == t)
                        .expect("granted unknown token");
                    m.waiting[core].remove(i);
                    m.add(sg, bytes_of.remove(&t).unwrap());
                }
            }
            Op::Cancel { core, pick } => {
                if !m.waiting[core].is_empty() {
                    let t = m.waiting[core].remove(pick % m.waiting[core].len());
                    assert!(caches[core].cancel_wait(t));
                    bytes_of.remove(&t);
                }
            }
            Op::Maintain { core } => caches[core].maintain(),
            Op::Flush { core } => caches[core].flush(),
        }
        for (core, c) in caches.iter().enumerate() {
            assert_eq!(c.waiting(), m.waiting[core].len());
        }
    }
    // Counters: what the pool says is in use is what the model holds.
    for c in caches.iter_mut() {
        c.maintain();
    }
    let stats = pool.stats();
    let total_live = m.ranges.len() as u64;
    assert_eq!(stats.iter().map(|s| s.in_use).sum::<u64>(), total_live);
    for s in &stats {
        assert_eq!(s.in_use + s.free_bufs, s.total_bufs);
        assert_eq!(s.allocs - s.frees, s.in_use);
        assert!(s.in_use_high_water >= s.in_use && s.in_use_high_water <= s.total_bufs);
        assert!(s.granted + s.waiting <= s.waits);
    }
    let waiting = (m.waiting[0].len() + m.waiting[1].len()) as u64;
    assert_eq!(stats.iter().map(|s| s.waiting).sum::<u64>(), waiting);
    // Give everything back: every buffer returns to the shared queues.
    while let Some(mut sg) = m.remove(0) {
        caches[0].free_sg(&mut sg);
    }
    // Liveness: with every command done, every waiter is granted within a
    // few reactor iterations (granted commands complete at once here).
    for _ in 0..64 {
        for c in caches.iter_mut() {
            while let Some((_, mut sg)) = c.next_grant() {
                c.free_sg(&mut sg);
            }
            c.maintain();
        }
    }
    assert_eq!(
        caches.iter().map(CoreCache::waiting).sum::<usize>(),
        0,
        "waiters starved"
    );
    // Nothing stranded while the caches live: every buffer is counted
    // free, and a flush puts all of them back in the shared queues.
    for s in pool.stats() {
        assert_eq!((s.in_use, s.free_bufs, s.waiting), (0, s.total_bufs, 0));
    }
    for c in caches.iter_mut() {
        c.flush();
    }
    for (class, _) in pool.classes() {
        for c in &caches {
            assert_eq!(c.stats(class).free_bufs, 0);
        }
    }
    for s in pool.stats() {
        assert_eq!((s.in_use, s.free_bufs), (0, s.total_bufs));
    }
    drop(caches);
    for s in pool.stats() {
        assert_eq!((s.in_use, s.free_bufs), (0, s.total_bufs));
    }
}

/// The saved proptest case that once failed, reduced: core 1's grant
/// fell short yet took the last free 64 KiB buffer out of the shared
/// queue, and as nothing else changed its `maintain` did not publish, so
/// the pool counted that buffer neither free nor in use (31 of 32).
#[test]
fn short_grant_refill_is_counted_free() {
    use Op::*;
    run(vec![
        Alloc {
            core: 0,
            bytes: 130531,
        },
        Alloc {
            core: 0,
            bytes: 434760,
        },
        Alloc {
            core: 0,
            bytes: 423374,
        },
        Alloc {
            core: 1,
            bytes: 590564,
        },
        Alloc {
            core: 1,
            bytes: 118944,
        },
        Alloc {
            core: 0,
            bytes: 183725,
        },
        Alloc {
            core: 1,
            bytes: 176137,
        },
        Flush { core: 1 },
        Grant { core: 1 },
    ]);
}

proptest! {
    #![proptest_config(ProptestConfig {
        // An explicit count would shadow PROPTEST_CASES, which long soak
        // runs set.
        cases: if cfg!(miri) {
            2
        } else {
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(32)
        },
        ..ProptestConfig::default()
    })]
    #[test]
    fn random_ops_keep_buffers_disjoint(ops in prop::collection::vec(op(), 1..if cfg!(miri) { 60 } else { 4000 })) {
        run(ops);
    }
}
