//! Sparse RAM backstore. Memory is taken a chunk at a time on first write,
//! so a large thin LUN costs only what has been written; chunks that were
//! never written or were discarded whole read as zeros and report as
//! deallocated.

use super::{Backstore, BackstoreCaps, Extent, Io, IoDone, IoOp};
use std::collections::VecDeque;

/// Allocation granule. Small enough that UNMAP of modest ranges frees
/// memory, large enough that the chunk table stays small (16 Ki entries
/// per GiB).
pub const MEM_CHUNK: u64 = 64 * 1024;

const EINVAL: i32 = 22;

pub struct MemBackstore {
    size: u64,
    chunks: Vec<Option<Box<[u8]>>>,
    done: VecDeque<IoDone>,
}

impl MemBackstore {
    /// The allocation granule, which is also the granularity at which
    /// `extent_status` reports.
    pub const CHUNK: u64 = MEM_CHUNK;

    pub fn new(size_bytes: u64) -> MemBackstore {
        let n = size_bytes.div_ceil(MEM_CHUNK);
        let mut chunks = Vec::new();
        chunks.resize_with(n as usize, || None);
        MemBackstore {
            size: size_bytes,
            chunks,
            done: VecDeque::with_capacity(crate::lun::MAX_TASKS),
        }
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Calls `f(chunk index, offset in chunk, offset in request, len)` for
    /// each chunk piece of [offset, offset+len).
    fn for_pieces(offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let idx = pos / MEM_CHUNK;
            let within = pos % MEM_CHUNK;
            let n = (MEM_CHUNK - within).min(len - done);
            f(idx as usize, within as usize, done as usize, n as usize);
            done += n;
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        Self::for_pieces(offset, buf.len() as u64, |ci, within, at, n| {
            let dst = &mut buf[at..at + n];
            match &self.chunks[ci] {
                Some(c) => dst.copy_from_slice(&c[within..within + n]),
                None => dst.fill(0),
            }
        });
    }

    fn write(&mut self, offset: u64, buf: &[u8]) {
        let chunks = &mut self.chunks;
        Self::for_pieces(offset, buf.len() as u64, |ci, within, at, n| {
            let c = chunks[ci].get_or_insert_with(|| vec![0u8; MEM_CHUNK as usize].into());
            c[within..within + n].copy_from_slice(&buf[at..at + n]);
        });
    }

    /// Whole chunks are freed; the edges of a range are zeroed in place.
    fn zero(&mut self, offset: u64, len: u64, free: bool) {
        let size = self.size;
        let chunks = &mut self.chunks;
        Self::for_pieces(offset, len, |ci, within, _, n| {
            let whole =
                within == 0 && (n as u64 == MEM_CHUNK || ci as u64 * MEM_CHUNK + n as u64 == size);
            if whole && free {
                chunks[ci] = None;
            } else if let Some(c) = &mut chunks[ci] {
                c[within..within + n].fill(0);
            }
        });
    }

    /// Bytes of memory held by written chunks (for tests and stats).
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.is_some()).count() as u64 * MEM_CHUNK
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
        let mapped = self.chunks[first].is_some();
        let mut end = first + 1;
        while end < self.chunks.len() && self.chunks[end].is_some() == mapped {
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
        let mut b = MemBackstore::new(MEM_CHUNK * 2);
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
        let mut b = MemBackstore::new(size);
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
        let mut b = MemBackstore::new(4096);
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
