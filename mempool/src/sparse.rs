//! Lazily backed memory for RAM LUNs: one anonymous mapping the size of
//! the LUN, reserved but not committed, so memory is taken only where it
//! is written and given back when a range is discarded.
//!
//! Why one mapping and not a table of heap chunks: random 4 KiB writes
//! over a LUN of a gigabyte or more miss the TLB on nearly every copy, and
//! under a hypervisor each miss walks two page tables. The mapping starts
//! on a 2 MiB boundary and asks for transparent huge pages, so a 1 GiB LUN
//! needs 512 TLB entries rather than 262,144. The kernel zero-fills pages
//! on first touch; nothing here allocates on the I/O path.

use std::io;

use memmap2::{Advice, MmapMut, MmapOptions, UncheckedAdvice};

use crate::HUGE_PAGE_BYTES;

const BASE_PAGE_BYTES: usize = 4096;

pub struct SparseMap {
    map: MmapMut,
    /// Where the 2 MiB-aligned usable range starts in `map`.
    off: usize,
    len_bytes: usize,
    huge: bool,
}

impl SparseMap {
    /// Reserves `len_bytes` of zeroed address space. Nothing is committed
    /// (`MAP_NORESERVE`): a thin 1 TiB LUN costs only its page tables
    /// until it is written.
    pub fn new(len_bytes: usize) -> io::Result<SparseMap> {
        // One huge page more than asked, to start on a 2 MiB boundary: the
        // kernel backs only aligned 2 MiB ranges with huge pages.
        let map = MmapOptions::new()
            .len(len_bytes.max(1) + HUGE_PAGE_BYTES)
            .no_reserve_swap()
            .map_anon()?;
        let addr = map.as_ptr() as usize;
        let off = addr.next_multiple_of(HUGE_PAGE_BYTES) - addr;
        let huge = len_bytes == 0 || map.advise_range(Advice::HugePage, off, len_bytes).is_ok();
        Ok(SparseMap {
            map,
            off,
            len_bytes,
            huge,
        })
    }

    pub fn len(&self) -> usize {
        self.len_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    /// Whether the kernel took the huge-page advice (it refuses when
    /// transparent huge pages are disabled, `never`).
    pub fn huge_pages_advised(&self) -> bool {
        self.huge
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.off..self.off + self.len_bytes]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[self.off..self.off + self.len_bytes]
    }

    /// Copies `src` to `offset`. Copies of `STREAM_MIN_BYTES` and more
    /// store around the caches (non-temporal stores) where the CPU has
    /// them: data written to a LUN is rarely read back soon, and an
    /// ordinary store first reads each destination line from memory
    /// (read-for-ownership), then evicts the reactor's working set to
    /// keep it. Measured here, random 4 KiB copies into a 1 GiB map: 800
    /// ns each with `copy_from_slice`, 400-620 ns streamed. Panics if the
    /// range is out of bounds.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) {
        let end = offset.checked_add(src.len()).expect("range overflows");
        let dst = &mut self.as_mut_slice()[offset..end];
        if src.len() >= STREAM_MIN_BYTES {
            stream_copy(dst, src);
        } else {
            dst.copy_from_slice(src);
        }
    }

    /// Zeroes `[offset, offset + len)` and gives the whole pages inside it
    /// back to the kernel (they read as zeros and are committed again on
    /// the next write). Panics if the range is out of bounds.
    pub fn discard(&mut self, offset: usize, len: usize) {
        let end = offset.checked_add(len).expect("range overflows");
        assert!(end <= self.len_bytes, "discard beyond the map");
        let first = offset.next_multiple_of(BASE_PAGE_BYTES);
        let last = end / BASE_PAGE_BYTES * BASE_PAGE_BYTES;
        if first >= last {
            self.as_mut_slice()[offset..end].fill(0);
            return;
        }
        self.as_mut_slice()[offset..first].fill(0);
        self.as_mut_slice()[last..end].fill(0);
        // SAFETY: `&mut self` means no reference into the mapping is alive,
        // and [first, last) is page-aligned and inside it. MADV_DONTNEED on
        // private anonymous memory replaces the pages' contents with zeros
        // on next access, and zero bytes are a valid `[u8]`.
        let freed = unsafe {
            self.map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                self.off + first,
                last - first,
            )
        };
        if freed.is_err() {
            // Only EINVAL/EAGAIN are possible for a valid range; the caller
            // asked for zeros, and zeros it gets either way.
            self.as_mut_slice()[first..last].fill(0);
        }
    }
}

/// Below this a copy goes through the caches: its few lines cost little
/// either way, and a small write is likelier to be read back (metadata).
pub const STREAM_MIN_BYTES: usize = 4096;

/// `dst.copy_from_slice(src)` with the 64-byte lines of `dst` stored
/// non-temporally (SSE2, which every x86-64 CPU has); the unaligned head
/// and tail go the ordinary way.
#[cfg(target_arch = "x86_64")]
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    assert_eq!(dst.len(), src.len());
    let len = dst.len();
    let head = dst.as_ptr().align_offset(64).min(len);
    let body = (len - head) / 64 * 64;
    dst[..head].copy_from_slice(&src[..head]);
    let mut i = head;
    while i < head + body {
        // SAFETY: [i, i + 64) lies inside both slices (i + 64 <= head +
        // body <= len); `dst + i` is 64-byte aligned (head aligned it, body
        // steps by 64), as the streaming store wants 16; loads are the
        // unaligned kind. SSE2 is part of x86-64, so the instructions
        // exist. `dst` is exclusively borrowed, so nothing else reads or
        // writes these bytes meanwhile.
        unsafe {
            let s = src.as_ptr().add(i) as *const __m128i;
            let d = dst.as_mut_ptr().add(i) as *mut __m128i;
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: a fence, no memory access of its own; SSE2 has it. Streaming
    // stores are weakly ordered: without it another thread handed these
    // bytes later (a read on another core) could see them stale.
    unsafe { _mm_sfence() };
    dst[head + body..].copy_from_slice(&src[head + body..]);
}

#[cfg(not(target_arch = "x86_64"))]
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    #[cfg_attr(miri, ignore = "mmap and madvise")]
    fn reads_zero_takes_memory_where_written_and_gives_it_back() {
        let len = 64 << 20;
        let mut m = SparseMap::new(len).unwrap();
        assert_eq!(m.len(), len);
        assert_eq!(m.as_slice().as_ptr() as usize % HUGE_PAGE_BYTES, 0);
        let before = rss_kib();
        // Reading untouched memory commits nothing of note (zero page).
        assert!(m.as_slice()[..len].iter().step_by(4096).all(|&b| b == 0));
        m.as_mut_slice()[..32 << 20].fill(0xa5);
        let written = rss_kib();
        assert!(
            written >= before + 30 * 1024,
            "32 MiB written: RSS {before} -> {written} KiB"
        );
        // An unaligned discard: edges zeroed in place, the inside freed.
        m.discard(100, (32 << 20) - 200);
        let after = rss_kib();
        assert!(
            after + 28 * 1024 <= written,
            "32 MiB discarded: RSS {written} -> {after} KiB"
        );
        let s = m.as_slice();
        assert!(s[..100].iter().all(|&b| b == 0xa5));
        assert!(s[100..(32 << 20) - 100].iter().all(|&b| b == 0));
        assert!(s[(32 << 20) - 100..32 << 20].iter().all(|&b| b == 0xa5));
        // Discarded memory is writable again.
        m.as_mut_slice()[4096..8192].fill(7);
        assert!(m.as_slice()[4096..8192].iter().all(|&b| b == 7));
        // A discard inside one page only zeroes.
        m.discard(4100, 10);
        assert_eq!(
            &m.as_slice()[4098..4112],
            &[7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 7]
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "mmap")]
    fn a_large_thin_map_costs_no_memory_up_front() {
        // 256 GiB of address space on a machine with less memory.
        let m = SparseMap::new(256 << 30).unwrap();
        assert_eq!(m.len(), 256 << 30);
        let empty = SparseMap::new(0).unwrap();
        assert!(empty.is_empty() && empty.as_slice().is_empty());
    }

    #[test]
    #[cfg_attr(miri, ignore = "mmap")]
    fn write_at_copies_exactly_whatever_the_alignment_and_length() {
        let len = 1 << 20;
        let mut m = SparseMap::new(len).unwrap();
        let mut model = vec![0u8; len];
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 31 + i / 251) as u8).collect();
        let mut seed = 7u64;
        // Streamed and not, every head and tail alignment, sources off any
        // boundary; unwritten bytes around each copy must stay as they were.
        let mut cases = vec![(0, 0, 4096), (64, 0, 65536), (3, 5, 4095), (1, 1, 4097)];
        for _ in 0..300 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = (seed >> 40) as usize % 20_000;
            let at = (seed >> 8) as usize % (len - n);
            let from = (seed >> 20) as usize % (src.len() - n);
            cases.push((at, from, n));
        }
        for (at, from, n) in cases {
            m.write_at(at, &src[from..from + n]);
            model[at..at + n].copy_from_slice(&src[from..from + n]);
            assert!(
                m.as_slice() == &model[..],
                "write_at({at}, {n} bytes from {from})"
            );
        }
    }

    #[test]
    #[should_panic(expected = "discard beyond the map")]
    #[cfg_attr(miri, ignore = "mmap")]
    fn discard_out_of_range_panics() {
        let mut m = SparseMap::new(8192).unwrap();
        m.discard(4096, 8192);
    }
}
