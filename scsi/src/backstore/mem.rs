//! Sparse RAM backstore. The LUN is one lazily committed mapping on
//! transparent huge pages (`mempool::SparseMap`): memory is taken where
//! the LUN is written and given back where it is discarded, and a 4 KiB
//! random write costs one copy without a TLB miss per I/O. A bitmap of
//! 64 KiB chunks remembers what was written, so never-written and
//! discarded chunks read as zeros without touching memory and report as
//! deallocated.
//!
//! Memory: written data is held in huge pages, so a sparsely written LUN
//! may hold up to 2 MiB per written 2 MiB region (at most the LUN's size).

use super::{Backstore, BackstoreCaps, Extent, Io, IoDone, IoOp};
use mempool::SparseMap;
use std::collections::VecDeque;

/// Granule of the written-chunk bitmap: what UNMAP must cover to free
/// memory, and the granularity at which `extent_status` reports.
pub const MEM_CHUNK: u64 = 64 * 1024;

const EINVAL: i32 = 22;

pub struct MemBackstore {
    size: u64,
    map: SparseMap,
    /// One bit per `MEM_CHUNK`: set once written, clear when discarded whole.
    written: Vec<u64>,
    done: VecDeque<IoDone>,
}

impl MemBackstore {
    /// The allocation granule, which is also the granularity at which
    /// `extent_status` reports.
    pub const CHUNK: u64 = MEM_CHUNK;

    /// Reserves the LUN's address space; fails only if the address space
    /// cannot be had (a size beyond the machine's, or a strict overcommit
    /// policy that counts reservations).
    pub fn new(size_bytes: u64) -> std::io::Result<MemBackstore> {
        let len = usize::try_from(size_bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "size beyond the address space",
            )
        })?;
        let map = SparseMap::new(len)?;
        if !map.huge_pages_advised() {
            tracing::info!(
                size_bytes,
                "transparent huge pages are off; the RAM LUN uses base pages"
            );
        }
        let chunks = size_bytes.div_ceil(MEM_CHUNK) as usize;
        Ok(MemBackstore {
            size: size_bytes,
            map,
            written: vec![0; chunks.div_ceil(64)],
            done: VecDeque::with_capacity(crate::lun::MAX_TASKS),
        })
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn chunk_count(&self) -> usize {
        self.size.div_ceil(MEM_CHUNK) as usize
    }

    fn is_written(&self, chunk: usize) -> bool {
        self.written[chunk / 64] & (1 << (chunk % 64)) != 0
    }

    /// Calls `f(chunk index, offset in LUN, offset in request, len)` for
    /// each chunk piece of [offset, offset+len).
    fn for_pieces(offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let n = (MEM_CHUNK - pos % MEM_CHUNK).min(len - done);
            f(
                (pos / MEM_CHUNK) as usize,
                pos as usize,
                done as usize,
                n as usize,
            );
            done += n;
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        let mem = self.map.as_slice();
        Self::for_pieces(offset, buf.len() as u64, |ci, pos, at, n| {
            let dst = &mut buf[at..at + n];
            if self.is_written(ci) {
                dst.copy_from_slice(&mem[pos..pos + n]);
            } else {
                dst.fill(0);
            }
        });
    }

    fn write(&mut self, offset: u64, buf: &[u8]) {
        self.map.write_at(offset as usize, buf);
        let written = &mut self.written;
        Self::for_pieces(offset, buf.len() as u64, |ci, _, _, _| {
            written[ci / 64] |= 1 << (ci % 64);
        });
    }

    /// Whole chunks are freed (when `free`) and marked unwritten; the
    /// edges of a range are zeroed in place.
    fn zero(&mut self, offset: u64, len: u64, free: bool) {
        let size = self.size;
        let (map, written) = (&mut self.map, &mut self.written);
        Self::for_pieces(offset, len, |ci, pos, _, n| {
            let bit = 1u64 << (ci % 64);
            if written[ci / 64] & bit == 0 {
                return; // reads as zeros already
            }
            let whole = (pos as u64).is_multiple_of(MEM_CHUNK)
                && (n as u64 == MEM_CHUNK || pos as u64 + n as u64 == size);
            if whole && free {
                map.discard(pos, n);
                written[ci / 64] &= !bit;
            } else {
                map.as_mut_slice()[pos..pos + n].fill(0);
            }
        });
    }

    /// Bytes in chunks written and not discarded since (for tests and
    /// stats; the memory held is this rounded up to huge pages).
    pub fn allocated_bytes(&self) -> u64 {
        self.written
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum::<u64>()
            * MEM_CHUNK
    }
}

impl Backstore for MemBackstore {
    fn kind(&self) -> &'static str {
        "mem"
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackstoreCaps {
        BackstoreCaps {
            discard: true,
            write_zeroes: true,
            volatile_cache: false,
            extent_status: true,
        }
    }

    fn submit(&mut self, io: Io) {
        let Io { tag, op, mut buf } = io;
        let result = match op {
            IoOp::Read { offset } => {
                if self.in_range(offset, buf.len() as u64) {
                    // Piece by piece: a scatter-gather buffer is several.
                    let mut at = offset;
                    for piece in buf.segments_mut() {
                        self.read(at, piece);
                        at += piece.len() as u64;
                    }
                    Ok(())
                } else {
                    Err(EINVAL)
                }
            }
            IoOp::Write { offset, .. } => {
                if self.in_range(offset, buf.len() as u64) {
                    let mut at = offset;
                    for piece in buf.segments() {
                        self.write(at, piece);
                        at += piece.len() as u64;
                    }
                    Ok(())
                } else {
                    Err(EINVAL)
                }
            }
            IoOp::Flush => Ok(()),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => {
                if self.in_range(offset, len) {
                    self.zero(offset, len, matches!(op, IoOp::Discard { .. }));
                    Ok(())
                } else {
                    Err(EINVAL)
                }
            }
        };
        self.done.push_back(IoDone { tag, result, buf });
    }

    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn extent_status(&mut self, offset: u64) -> Result<Extent, i32> {
        if offset >= self.size {
            return Err(EINVAL);
        }
        let first = (offset / MEM_CHUNK) as usize;
        let mapped = self.is_written(first);
        let mut end = first + 1;
        while end < self.chunk_count() && self.is_written(end) == mapped {
            end += 1;
        }
        let end_byte = (end as u64 * MEM_CHUNK).min(self.size);
        Ok(Extent {
            mapped,
            len: end_byte - offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: &mut MemBackstore, op: IoOp, buf: mempool::DataBuf) -> IoDone {
        b.submit(Io { tag: 7, op, buf });
        let mut out = Vec::new();
        assert_eq!(b.poll(&mut out), 1);
        out.pop().unwrap()
    }

    #[test]
    fn data_in_pieces_is_written_and_read_piece_by_piece() {
        let mut b = MemBackstore::new(MEM_CHUNK * 2).unwrap();
        let pattern: Vec<u8> = (0..20480u32).map(|i| (i * 13 + i / 4096) as u8).collect();
        // Across the chunk boundary, in five 4 KiB pieces.
        let off = MEM_CHUNK - 6000;
        let write = IoOp::Write {
            offset: off,
            fua: false,
        };
        assert_eq!(
            run(&mut b, write, super::super::test_sg_buf(&pattern)).result,
            Ok(())
        );
        let d = run(
            &mut b,
            IoOp::Read { offset: off + 4096 },
            super::super::test_sg_buf(&[0xff; 12288]),
        );
        assert_eq!(d.result, Ok(()));
        assert_eq!(d.buf, pattern[4096..16384]);
        let d = run(&mut b, IoOp::Read { offset: off }, vec![0; 20480].into());
        assert_eq!(d.buf, pattern);
    }

    #[test]
    fn sparse_read_write_discard() {
        let size = MEM_CHUNK * 4 + 512;
        let mut b = MemBackstore::new(size).unwrap();
        assert_eq!(b.allocated_bytes(), 0);
        let d = run(&mut b, IoOp::Read { offset: 100 }, vec![1u8; 1000].into());
        assert_eq!(d.result, Ok(()));
        assert!(d.buf.iter().all(|&x| x == 0));

        // A write straddling a chunk boundary allocates two chunks.
        let off = MEM_CHUNK - 10;
        let d = run(
            &mut b,
            IoOp::Write {
                offset: off,
                fua: false,
            },
            vec![0xaa; 20].into(),
        );
        assert_eq!(d.result, Ok(()));
        assert_eq!(b.allocated_bytes(), 2 * MEM_CHUNK);
        let d = run(&mut b, IoOp::Read { offset: off - 1 }, vec![0; 22].into());
        assert_eq!(d.buf[0], 0);
        assert!(d.buf[1..21].iter().all(|&x| x == 0xaa));
        assert_eq!(d.buf[21], 0);

        let e = b.extent_status(0).unwrap();
        assert!(e.mapped);
        assert_eq!(e.len, 2 * MEM_CHUNK);
        let e = b.extent_status(2 * MEM_CHUNK + 5).unwrap();
        assert!(!e.mapped);
        assert_eq!(e.len, size - 2 * MEM_CHUNK - 5);

        // Partial discard zeroes, whole-chunk discard frees.
        let d = run(
            &mut b,
            IoOp::Discard {
                offset: off,
                len: 5,
            },
            Vec::new().into(),
        );
        assert_eq!(d.result, Ok(()));
        assert_eq!(b.allocated_bytes(), 2 * MEM_CHUNK);
        let d = run(&mut b, IoOp::Read { offset: off }, vec![0; 20].into());
        assert_eq!(&d.buf[..5], &[0; 5]);
        assert_eq!(d.buf[5], 0xaa);
        run(
            &mut b,
            IoOp::Discard {
                offset: 0,
                len: MEM_CHUNK,
            },
            Vec::new().into(),
        );
        assert_eq!(b.allocated_bytes(), MEM_CHUNK);
        assert!(!b.extent_status(0).unwrap().mapped);

        // The short last chunk can be freed too.
        run(
            &mut b,
            IoOp::Write {
                offset: size - 1,
                fua: true,
            },
            vec![1].into(),
        );
        assert!(b.extent_status(size - 1).unwrap().mapped);
        run(
            &mut b,
            IoOp::Discard {
                offset: 4 * MEM_CHUNK,
                len: 512,
            },
            Vec::new().into(),
        );
        assert!(!b.extent_status(size - 1).unwrap().mapped);

        run(
            &mut b,
            IoOp::WriteZeroes {
                offset: MEM_CHUNK,
                len: 20,
            },
            Vec::new().into(),
        );
        let d = run(&mut b, IoOp::Read { offset: MEM_CHUNK }, vec![1; 20].into());
        assert!(d.buf.iter().all(|&x| x == 0));
    }

    #[test]
    fn out_of_range() {
        let mut b = MemBackstore::new(4096).unwrap();
        let d = run(&mut b, IoOp::Read { offset: 4000 }, vec![0; 200].into());
        assert_eq!(d.result, Err(EINVAL));
        let d = run(
            &mut b,
            IoOp::Write {
                offset: u64::MAX,
                fua: false,
            },
            vec![0; 2].into(),
        );
        assert_eq!(d.result, Err(EINVAL));
        let d = run(
            &mut b,
            IoOp::Discard {
                offset: 4096,
                len: 1,
            },
            Vec::new().into(),
        );
        assert_eq!(d.result, Err(EINVAL));
        assert!(b.extent_status(4096).is_err());
    }
}
