//! A backstore with no storage: reads return zeros and writes are
//! dropped. For measuring the protocol path without medium costs.

use super::{Backstore, BackstoreCaps, Io, IoDone, IoOp};
use std::collections::VecDeque;

const EINVAL: i32 = 22;

pub struct NullBackstore {
    size: u64,
    done: VecDeque<IoDone>,
}

impl NullBackstore {
    pub fn new(size_bytes: u64) -> NullBackstore {
        NullBackstore {
            size: size_bytes,
            done: VecDeque::with_capacity(crate::lun::MAX_TASKS),
        }
    }
}

impl Backstore for NullBackstore {
    fn kind(&self) -> &'static str {
        "null"
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackstoreCaps {
        BackstoreCaps::default()
    }

    fn submit(&mut self, io: Io) {
        let Io { tag, op, mut buf } = io;
        let (offset, len) = match op {
            IoOp::Read { offset } | IoOp::Write { offset, .. } => (offset, buf.len() as u64),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => (offset, len),
            IoOp::Flush => (0, 0),
        };
        let ok = offset.checked_add(len).is_some_and(|e| e <= self.size);
        if ok {
            if let IoOp::Read { .. } = op {
                for piece in buf.segments_mut() {
                    piece.fill(0);
                }
            }
        }
        let result = if ok { Ok(()) } else { Err(EINVAL) };
        self.done.push_back(IoDone { tag, result, buf });
    }

    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeros_drops_writes() {
        let mut b = NullBackstore::new(8192);
        b.submit(Io {
            tag: 1,
            op: IoOp::Write {
                offset: 0,
                fua: false,
            },
            buf: vec![9; 512].into(),
        });
        b.submit(Io {
            tag: 2,
            op: IoOp::Read { offset: 0 },
            buf: vec![9; 512].into(),
        });
        b.submit(Io {
            tag: 3,
            op: IoOp::Read { offset: 8000 },
            buf: vec![9; 512].into(),
        });
        let mut out = Vec::new();
        assert_eq!(b.poll(&mut out), 3);
        assert_eq!(out[0].result, Ok(()));
        assert_eq!(out[1].result, Ok(()));
        assert!(out[1].buf.iter().all(|&x| x == 0));
        assert_eq!(out[2].result, Err(EINVAL));
    }
}
