//! A global allocator that counts heap allocations per thread.
//!
//! The I/O path promises not to touch the heap: its buffers come from the
//! pools of this crate and everything else is sized at start-up. This
//! allocator is how that promise is checked on the real binary under a
//! real workload: each reactor reads its own thread's count and publishes
//! it with its other counters, and a test compares the count before and
//! after a run. It forwards to the system allocator; the only added cost
//! is one thread-local increment per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // `const` initialisation: reading it never allocates nor registers a
    // destructor, so it is safe to touch from inside the allocator.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    // Backtraces still to print (see `trace_thread_allocs`), and whether
    // this thread is printing one now: the tracer's own allocations are
    // neither traced nor counted.
    static TRACE_LEFT: Cell<u32> = const { Cell::new(0) };
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

/// Counting wrapper around [`System`]; install with
/// `#[global_allocator] static A: HeapCount = HeapCount;`.
pub struct HeapCount;

fn bump() {
    // `try_with`: during thread teardown the slot may be gone; such late
    // allocations are not the I/O path's and are simply not counted.
    if IN_TRACE.try_with(|t| t.get()).unwrap_or(true) {
        return;
    }
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let left = TRACE_LEFT.try_with(|c| c.get()).unwrap_or(0);
    if left > 0 {
        TRACE_LEFT.set(left - 1);
        IN_TRACE.set(true);
        let bt = std::backtrace::Backtrace::force_capture();
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "heap allocation traced on thread {name} ({} more to trace):\n{bt}",
            left - 1
        );
        IN_TRACE.set(false);
    }
}

/// Prints a backtrace to stderr for each of the next `n` heap allocations
/// made by the calling thread (0 stops). Counts only when [`HeapCount`]
/// is the global allocator. A debugging aid: when the no-allocation check
/// fails on a rare path, the trace names the allocation instead of a bare
/// count. Expensive (unwinding and symbolising run inside the allocation),
/// so only armed on request.
pub fn trace_thread_allocs(n: u32) {
    let _ = TRACE_LEFT.try_with(|c| c.set(n));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees are ours; the counter is a
// thread-local `Cell` with const initialisation, which does not allocate
// and so cannot recurse into the allocator.
unsafe impl GlobalAlloc for HeapCount {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded as is (see the impl's comment).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: forwarded as is; `ptr` and `layout` come from our own
        // `alloc`, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Heap allocations (including reallocations) made so far by the calling
/// thread. Counts only when [`HeapCount`] is the global allocator.
pub fn thread_heap_allocs() -> u64 {
    ALLOCS.try_with(|c| c.get()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_threads_allocations_only() {
        // Not the global allocator in this test binary: call it directly.
        let a = HeapCount;
        let before = thread_heap_allocs();
        let layout = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: a non-zero-sized layout; the block is freed with the
        // same layout below.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` came from `a.alloc(layout)`.
        let p = unsafe { a.realloc(p, layout, 128) };
        assert!(!p.is_null());
        // SAFETY: `p` is the reallocated block of 128 bytes.
        unsafe { a.dealloc(p, Layout::from_size_align(128, 8).unwrap()) };
        assert_eq!(thread_heap_allocs() - before, 2);
        let other = std::thread::spawn(thread_heap_allocs).join().unwrap();
        assert_eq!(other, 0, "another thread has its own count");
    }

    #[test]
    fn traced_allocations_are_counted_once_and_the_budget_runs_out() {
        let a = HeapCount;
        let layout = Layout::from_size_align(32, 8).unwrap();
        trace_thread_allocs(2);
        let before = thread_heap_allocs();
        for _ in 0..3 {
            // SAFETY: a non-zero-sized layout, freed with the same layout.
            unsafe { a.dealloc(a.alloc(layout), layout) };
        }
        // The backtraces' own allocations (through the system allocator
        // here, through `HeapCount` in the binary) are not counted.
        assert_eq!(thread_heap_allocs() - before, 3);
        assert_eq!(TRACE_LEFT.with(|c| c.get()), 0);
        assert!(!IN_TRACE.with(|t| t.get()));
    }
}
