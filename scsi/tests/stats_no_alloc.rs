//! Recording into the counters must not allocate: it runs once per
//! command on the reactor's hot path. A counting global allocator checks
//! it; this file is its own test binary so the allocator sees nothing else.

use scsi::{IoCounters, IoKind, LatencyHistogram};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    // Per thread, so the test harness's own threads do not count.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// The only unsafe code of the crate's tests, which a global allocator
// cannot do without. SAFETY: every call goes unchanged to `System`, which
// upholds `GlobalAlloc`'s contract; counting touches no allocator state.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|n| n.set(n.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn recording_does_not_allocate() {
    let mut c = IoCounters::new();
    let mut h = LatencyHistogram::new();
    let before = allocs();
    for i in 0..100_000u64 {
        let kind = match i % 3 {
            0 => IoKind::Read,
            1 => IoKind::Write,
            _ => IoKind::Other,
        };
        c.record(kind, 4096, i % 17 == 0, i * 1_234_567);
        h.record(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    let mut snapshot = c;
    snapshot.merge(&c);
    h.merge(&c.latency);
    let p99 = h.percentile(99.0);
    assert_eq!(allocs(), before);
    assert_eq!(snapshot.completions(), 200_000);
    assert!(p99 > 0);
}
