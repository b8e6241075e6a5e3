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
}

/// Counting wrapper around [`System`]; install with
/// `#[global_allocator] static A: HeapCount = HeapCount;`.
pub struct HeapCount;

fn bump() {
    // `try_with`: during thread teardown the slot may be gone; such late
    // allocations are not the I/O path's and are simply not counted.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
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
}
