//! The `Backstore` interface: where a LUN's blocks live. It is
//! asynchronous, submit now and complete later, so that io_uring, libgfapi
//! callbacks and RDMA fit it unchanged. Buffers move into the request and
//! come back in the completion, never copied by this layer.

#[allow(unsafe_code)] // io_uring's submission queue push
mod file;
mod mem;
mod null;

use mempool::DataBuf;
use std::os::fd::BorrowedFd;

pub use file::{FileBackstore, FileOptions};
pub use mem::MemBackstore;
pub use null::NullBackstore;

/// What a backstore can do beyond reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackstoreCaps {
    /// `Discard` deallocates, and deallocated blocks read back as zeros.
    pub discard: bool,
    /// `WriteZeroes` is cheaper than writing a zero buffer.
    pub write_zeroes: bool,
    /// Writes may sit in a volatile cache until `Flush` (reported as WCE).
    pub volatile_cache: bool,
    /// `extent_status` answers mapped/deallocated ranges.
    pub extent_status: bool,
}

/// One backstore operation. Offsets and lengths are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Fill the whole of `Io::buf` from `offset`.
    Read { offset: u64 },
    /// Write the whole of `Io::buf` at `offset`; with `fua`, durable before
    /// completion.
    Write { offset: u64, fua: bool },
    /// Make all completed writes durable.
    Flush,
    /// Deallocate `len` bytes at `offset` (they then read as zeros).
    Discard { offset: u64, len: u64 },
    /// Zero `len` bytes at `offset`.
    WriteZeroes { offset: u64, len: u64 },
}

/// A submitted operation.
#[derive(Debug)]
pub struct Io {
    /// The caller's handle, echoed in `IoDone`.
    pub tag: u64,
    pub op: IoOp,
    /// Data to write, or the buffer to read into (its length is the read
    /// length). Write data is read only through shared borrows
    /// (`segments`, `slices_at`): it may be a view lent from a receive
    /// ring, which a mutable borrow moves to the heap. Empty for Flush,
    /// Discard and WriteZeroes. A read must fill every byte (zeros past
    /// the end of a file or for unmapped ranges): the buffer may hold
    /// another command's old data.
    pub buf: DataBuf,
}

/// A completed operation.
#[derive(Debug)]
pub struct IoDone {
    pub tag: u64,
    /// `Err(errno)` on failure.
    pub result: Result<(), i32>,
    /// The request's buffer, filled for reads.
    pub buf: DataBuf,
}

/// Mapping state of a range, for GET LBA STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub mapped: bool,
    /// Bytes from the asked offset that share this state.
    pub len: u64,
}

/// A LUN's storage. Implementations never block the calling reactor in
/// `submit`; results arrive through `poll` on the same thread. `Send`
/// because a LUN is built on the main thread and then moved to the reactor
/// that owns it; it is never shared.
pub trait Backstore: Send {
    /// Short kind name for logs ("mem", "null", "file").
    fn kind(&self) -> &'static str;
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    fn caps(&self) -> BackstoreCaps;
    /// Start an operation. Errors found before starting are reported as a
    /// completion, not a return value, so callers have one path.
    fn submit(&mut self, io: Io);
    /// Move finished operations into `out`; returns how many.
    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize;
    /// Offsets and lengths must be multiples of this (O_DIRECT files);
    /// a LUN whose block size is not one is refused.
    fn io_align(&self) -> u32 {
        1
    }
    /// A descriptor that becomes readable when completions are waiting,
    /// for backstores that complete in the background (io_uring). A
    /// reactor that sleeps should wait on it too and then call `poll`;
    /// `None`: completions only ever appear during `submit` or `poll`.
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Mapping state at `offset` (only when `caps().extent_status`).
    fn extent_status(&mut self, offset: u64) -> Result<Extent, i32> {
        Ok(Extent {
            mapped: true,
            len: self.size_bytes().saturating_sub(offset),
        })
    }
    /// Make everything durable before shutdown (blocking is allowed here).
    fn shutdown(&mut self) -> Result<(), i32> {
        Ok(())
    }
}

/// `bytes` in a scatter-gather `DataBuf` of 4 KiB pool buffers (whole
/// buffers: a multiple of 4 KiB, two to eight of them), for tests of
/// backstores taking data in pieces.
#[cfg(test)]
pub(crate) fn test_sg_buf(bytes: &[u8]) -> DataBuf {
    let mut d = test_cache()
        .lock()
        .unwrap()
        .alloc_data_sg(bytes.len())
        .unwrap();
    d.copy_from_at(0, bytes);
    assert!(d.segment_count() >= 2);
    d
}

/// One pool buffer with room for `len` bytes, holding none (`len` 0) but
/// stale bytes underneath: what a transport hands a command as its
/// scratch buffer (`crate::scratch_len`).
#[cfg(test)]
pub(crate) fn test_scratch_buf(len: usize) -> DataBuf {
    let mut d = test_cache().lock().unwrap().alloc_data(len).unwrap();
    assert!(d.is_pool() && d.segment_count() == 1);
    d.copy_from_at(0, &vec![0xee; len]);
    d.clear();
    d
}

#[cfg(test)]
fn test_cache() -> &'static std::sync::Mutex<mempool::CoreCache> {
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<mempool::CoreCache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        let pool = mempool::Pool::new(mempool::PoolConfig {
            arena_bytes: 8 << 20,
            arena_limit_bytes: 8 << 20,
            cores: 1,
            backing: mempool::Backing::Heap,
            classes: vec![
                mempool::ClassConfig {
                    buf_bytes: 4 << 10,
                    weight: 1,
                },
                mempool::ClassConfig {
                    buf_bytes: 64 << 10,
                    weight: 1,
                },
            ],
            ..mempool::PoolConfig::default()
        })
        .unwrap();
        Mutex::new(Box::leak(Box::new(pool)).core_cache(0).unwrap())
    })
}
