//! The data path never touches the heap: a counting global allocator sees
//! no allocation (or free) while buffers are allocated, waited for,
//! granted, copied, described and freed, across two cores.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use mempool::{Alloc, Backing, ClassConfig, Pool, PoolConfig, SgList, MAX_SEGMENTS};

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    if ARMED.with(Cell::get) {
        CALLS.with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards to the system allocator unchanged; counting touches
// only const-initialized thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Heap calls made by `f` on this thread.
fn heap_calls(f: impl FnOnce()) -> u64 {
    CALLS.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    CALLS.with(Cell::get)
}

#[test]
fn alloc_and_free_do_not_touch_the_heap() {
    let cfg = PoolConfig {
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
        core_cache_bufs: 16,
        waiters_per_class: 64,
        backing: if cfg!(miri) {
            Backing::Heap
        } else {
            Backing::Auto
        },
        lock_memory: false,
    };
    let pool = Pool::new(cfg).unwrap();
    let mut a = pool.core_cache(0).unwrap();
    let mut b = pool.core_cache(1).unwrap();
    let c256 = pool.class_of(256 << 10).unwrap();
    let mut lists: Vec<SgList> = (0..8).map(|_| SgList::new()).collect();
    let mut held = Vec::with_capacity(64);
    let payload = [0x5a_u8; 9000];
    let mut out = [0_u8; 9000];
    let rounds = if cfg!(miri) { 2 } else { 200 };

    let calls = heap_calls(|| {
        for round in 0..rounds {
            // Plain allocation on one core, free on the other.
            for (i, sg) in lists.iter_mut().enumerate() {
                let bytes = 1 + (i * 37_000 + round * 911) % (200 << 10);
                assert!(a.try_alloc_sg(bytes, sg).unwrap());
                assert_eq!(sg.len_bytes(), bytes);
            }
            for sg in lists.iter_mut() {
                let n = 9000.min(sg.len_bytes());
                sg.copy_from_slice_at(0, &payload[..n]).unwrap();
                sg.copy_to_slice_at(0, &mut out[..n]).unwrap();
                let mut io = [std::io::IoSlice::new(&[]); MAX_SEGMENTS];
                assert!(sg.io_slices(&mut io) > 0);
                assert!(sg.segments().count() > 0);
            }
            for sg in lists.iter_mut() {
                b.free_sg(sg);
            }
            // Exhaust the 256 KiB class, wait, and get granted.
            while let Some(x) = a.try_alloc(c256) {
                held.push(x);
            }
            assert_eq!(
                a.alloc_or_wait(256 << 10, 7, &mut lists[0]),
                Ok(Alloc::Queued)
            );
            assert_eq!(
                a.alloc_or_wait(512 << 10, 8, &mut lists[1]),
                Ok(Alloc::Queued)
            );
            assert_eq!(
                a.alloc_or_wait(256 << 10, 9, &mut lists[2]),
                Ok(Alloc::Queued)
            );
            assert!(a.cancel_wait(9));
            assert!(a.next_grant().is_none());
            for x in held.drain(..) {
                b.free(x);
            }
            b.maintain();
            let (t, mut g) = a.next_grant().unwrap();
            assert_eq!(t, 7);
            a.free_sg(&mut g);
            let (t, mut g) = a.next_grant().unwrap();
            assert_eq!(t, 8);
            b.free_sg(&mut g);
            assert!(a.next_grant().is_none());
            a.maintain();
            b.maintain();
        }
        a.flush();
        b.flush();
    });
    assert_eq!(calls, 0, "the data path called the allocator {calls} times");
    let st = pool.stats();
    assert!(st
        .iter()
        .all(|c| c.in_use == 0 && c.free_bufs == c.total_bufs));
    assert_eq!(st[2].waits, 3 * rounds as u64);
    assert_eq!(st[2].granted, 2 * rounds as u64);
}
