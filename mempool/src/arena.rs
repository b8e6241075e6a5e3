//! Arenas: one contiguous mapping per call, on 2 MiB huge pages when the
//! system has them, populated and locked before any buffer is handed out.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;

use memmap2::{Advice, MmapMut, MmapOptions};

use crate::{Backing, HUGE_PAGE_BYTES};

/// log2 of [`HUGE_PAGE_BYTES`], as `MAP_HUGETLB` wants it.
const HUGE_PAGE_SHIFT: u8 = 21;
const _: () = assert!(1 << HUGE_PAGE_SHIFT == HUGE_PAGE_BYTES);
const BASE_PAGE_BYTES: usize = 4096;

/// One mapped region. Its bytes are only ever reached through buffer
/// handles derived from `base`; the arena itself never reads or writes
/// them after it is populated.
pub(crate) struct Arena {
    pub base: NonNull<u8>,
    pub len_bytes: usize,
    /// The backing actually obtained (never `Auto`).
    pub backing: Backing,
    pub locked: bool,
    keep: Keep,
}

/// What gives the arena's memory back when it goes: the mapping is held
/// for its `Drop` (munmap), never read.
enum Keep {
    Map(#[expect(dead_code, reason = "held for its Drop, which unmaps")] MmapMut),
    Heap(Layout),
}

// SAFETY: an Arena is an address range plus the object that unmaps or
// frees it. It hands out no references to its bytes (buffer handles do,
// one owner per buffer), so sharing or sending it between threads cannot
// create aliasing access; MmapMut is itself Send + Sync.
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` only exposes the base address and length.
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps `len_bytes` (a multiple of [`HUGE_PAGE_BYTES`]) as `backing`
    /// says, populating every page; `lock` asks for `mlock` too.
    pub fn map(len_bytes: usize, backing: Backing, lock: bool) -> io::Result<Arena> {
        assert!(len_bytes > 0 && len_bytes.is_multiple_of(HUGE_PAGE_BYTES));
        let backing = if cfg!(miri) && backing == Backing::Auto {
            Backing::Heap
        } else {
            backing
        };
        match backing {
            Backing::HugeTlb => Arena::hugetlb(len_bytes, lock),
            Backing::TransparentHuge => Arena::thp(len_bytes, lock),
            Backing::Heap => Arena::heap(len_bytes),
            Backing::Auto => match Arena::hugetlb(len_bytes, lock) {
                Ok(a) => Ok(a),
                Err(e) => {
                    tracing::info!(
                        arena_bytes = len_bytes,
                        error = %e,
                        "no 2 MiB huge pages for this arena (none or too few reserved in \
                         /proc/sys/vm/nr_hugepages); using transparent huge pages"
                    );
                    Arena::thp(len_bytes, lock)
                }
            },
        }
    }

    fn hugetlb(len_bytes: usize, lock: bool) -> io::Result<Arena> {
        let mut map = MmapOptions::new()
            .len(len_bytes)
            .huge(Some(HUGE_PAGE_SHIFT))
            .populate()
            .map_anon()?;
        let locked = lock && try_lock(&map, len_bytes);
        let base = NonNull::new(map.as_mut_ptr()).expect("mmap returned null");
        assert_eq!(base.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
        Ok(Arena {
            base,
            len_bytes,
            backing: Backing::HugeTlb,
            locked,
            keep: Keep::Map(map),
        })
    }

    fn thp(len_bytes: usize, lock: bool) -> io::Result<Arena> {
        // Map one huge page more than asked so the arena can start on a
        // 2 MiB boundary: the kernel only backs aligned 2 MiB ranges with
        // huge pages. The unused head and tail stay untouched unless
        // `lock` faults them in (at most one huge page per arena).
        let mut map = MmapOptions::new()
            .len(len_bytes + HUGE_PAGE_BYTES)
            .map_anon()?;
        let addr = map.as_ptr() as usize;
        let off = addr.next_multiple_of(HUGE_PAGE_BYTES) - addr;
        if let Err(e) = map.advise_range(Advice::HugePage, off, len_bytes) {
            tracing::warn!(error = %e, "madvise(MADV_HUGEPAGE) failed; arena uses base pages");
        }
        if map
            .advise_range(Advice::PopulateWrite, off, len_bytes)
            .is_err()
        {
            // Kernels before 5.14: fault every page in by hand.
            for i in (off..off + len_bytes).step_by(BASE_PAGE_BYTES) {
                map[i] = 0;
            }
        }
        let locked = lock && try_lock(&map, len_bytes);
        let base = NonNull::new(map[off..].as_mut_ptr()).expect("mmap returned null");
        Ok(Arena {
            base,
            len_bytes,
            backing: Backing::TransparentHuge,
            locked,
            keep: Keep::Map(map),
        })
    }

    fn heap(len_bytes: usize) -> io::Result<Arena> {
        let layout = Layout::from_size_align(len_bytes, HUGE_PAGE_BYTES)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size (asserted in `map`).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let base = NonNull::new(p).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(Arena {
            base,
            len_bytes,
            backing: Backing::Heap,
            locked: false,
            keep: Keep::Heap(layout),
        })
    }

    /// Whether `[ptr, ptr + len)` lies inside this arena.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.base.as_ptr() as usize;
        let p = ptr as usize;
        p >= start && p - start <= self.len_bytes && len <= self.len_bytes - (p - start)
    }
}

fn try_lock(map: &MmapMut, len_bytes: usize) -> bool {
    match map.lock() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                arena_bytes = len_bytes,
                error = %e,
                "mlock failed (raise RLIMIT_MEMLOCK); arena is populated but not locked"
            );
            false
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if let Keep::Heap(layout) = self.keep {
            // SAFETY: `base` came from `alloc_zeroed(layout)` in `heap` and
            // is freed only here, once; the pool drops an arena only when
            // no buffer handle into it is left (otherwise it leaks it).
            unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
        }
    }
}

/// Whether transparent huge pages are switched off system-wide.
pub(crate) fn thp_disabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[never]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_arena_is_aligned_and_zeroed() {
        let a = Arena::map(HUGE_PAGE_BYTES, Backing::Heap, false).unwrap();
        assert_eq!(a.base.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
        assert!(a.contains(a.base.as_ptr(), HUGE_PAGE_BYTES));
        assert!(!a.contains(a.base.as_ptr(), HUGE_PAGE_BYTES + 1));
        assert!(!a.contains(a.base.as_ptr().wrapping_sub(1), 1));
    }

    #[test]
    #[cfg_attr(miri, ignore = "mmap and madvise")]
    fn thp_arena_is_aligned() {
        let a = Arena::map(2 * HUGE_PAGE_BYTES, Backing::TransparentHuge, false).unwrap();
        assert_eq!(a.backing, Backing::TransparentHuge);
        assert_eq!(a.base.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
    }
}
