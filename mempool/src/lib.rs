//! Buffer pools for the data path. Every payload byte the target moves
//! lives in a pool buffer: the transport receives into it (a socket read
//! for TCP, an RDMA Read or a Send for iSER), the backstore writes it out
//! or reads into it, and the same buffer goes back out to the initiator
//! (a socket write, or an RDMA Write) before it returns here. Nothing is
//! copied between those steps and nothing is allocated: all memory is
//! mapped at start-up as arenas on 2 MiB huge pages (hugetlbfs when pages
//! are reserved, transparent huge pages otherwise), cut into fixed buffer
//! classes sized from the negotiated burst lengths, registered once per
//! arena with each RDMA device, and handed out through per-core caches.
//!
//! The pieces:
//! - [`Pool`]: the shared, control-plane handle. Maps arenas, registers
//!   them through a [`Registrar`], hands out one [`CoreCache`] per core
//!   and reports [`ClassStats`].
//! - [`CoreCache`]: owned by one reactor; allocation and free touch only
//!   its own free lists (no locks, no atomic read-modify-writes). Buffers
//!   move between cores through a lock-free queue per class, in batches.
//! - [`Buf`]: an owned handle to one buffer (capacity plus a length);
//!   [`SgList`]: up to [`MAX_SEGMENTS`] buffers holding one command's
//!   bytes, with copy helpers for TCP and (addr, len, key) segments for
//!   RDMA and iovec system calls.
//! - Exhaustion never fails a command and never allocates:
//!   [`CoreCache::alloc_or_wait`] queues the caller's token and
//!   [`CoreCache::next_grant`] hands the buffers over once they are free.
//!
//! - [`SparseMap`]: not a pool but the same kind of memory, for the RAM
//!   backstore: a LUN-sized anonymous mapping on transparent huge pages,
//!   committed where written and given back on discard.
//!
//! [`BufPool`] is the heap pool the engine uses today (size-classed free
//! lists of `Vec<u8>`), until its data path moves onto [`Pool`].
//!
//! A reactor's side of the contract, in short:
//!
//! ```
//! use mempool::{Alloc, Backing, Pool, PoolConfig, SgList};
//!
//! let pool = Pool::new(PoolConfig {
//!     arena_bytes: 8 << 20,
//!     arena_limit_bytes: 8 << 20,
//!     cores: 1,
//!     backing: Backing::Heap, // Auto in production
//!     ..PoolConfig::default()
//! })?;
//! // At start-up, per RDMA device: pool.add_registrar(Box::new(my_pd))?
//! let mut cache = pool.core_cache(0)?; // moved into core 0's reactor
//!
//! // A WRITE of 300 KiB arrives: get buffers, or wait without failing.
//! let mut sg = SgList::new();
//! match cache.alloc_or_wait(300 << 10, 42, &mut sg)? {
//!     Alloc::Ready => { /* start the transfer into `sg` now */ }
//!     Alloc::Queued => { /* park command 42; next_grant() returns it */ }
//! }
//! sg.copy_from_slice_at(0, &[7; 1000])?; // TCP: Data-Out payload
//! cache.free_sg(&mut sg); // command done: same core or any other
//!
//! // Every loop iteration:
//! while let Some((token, sg)) = cache.next_grant() {
//!     # let mut sg = sg;
//!     // resume command `token` with its buffers
//!     # assert_eq!(token, 42); cache.free_sg(&mut sg);
//! }
//! cache.maintain();
//! // Before blocking in epoll/io_uring wait: cache.flush();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod arena;
mod buf;
mod config;
mod databuf;
mod heap_count;
mod legacy;
mod pool;
mod ring;
mod sparse;

pub use buf::leaked_buffers;
pub use buf::{Buf, OutOfRange, RdmaSegment, Segment, SgList};
pub use config::{Backing, ClassConfig, PoolConfig};
pub use databuf::{DataBuf, DataDest, Slices, SlicesMut, DATA_SEGMENTS_MAX};
pub use heap_count::{thread_heap_allocs, trace_thread_allocs, HeapCount};
pub use legacy::{BufPool, PoolStats};
pub use pool::{
    Alloc, AllocError, AllocPlan, ArenaId, ArenaInfo, ClassId, ClassStats, CoreCache, KeyTable,
    Pool, PoolError, RegisterError, Registrar, RegistrarId, RegistrationKey, SG_SLOTS,
};
pub use ring::{RxRing, RING_SLOTS};
pub use sparse::SparseMap;

/// Size of one huge page; arenas are multiples of it.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;
/// Smallest buffer class (one base page, the alignment O_DIRECT needs).
pub const MIN_BUF_BYTES: usize = 4 << 10;
/// Largest buffer class.
pub const MAX_BUF_BYTES: usize = 16 << 20;
/// Buffer classes per pool at most.
pub const MAX_CLASSES: usize = 8;
/// Cores (per-core caches) per pool at most: one bit each in a `u64`.
pub const MAX_CORES: usize = 64;
/// Arenas per pool at most, including arenas added after start-up.
pub const MAX_ARENAS: usize = 256;
/// Registrars (RDMA devices / protection domains) per pool at most, over
/// the process's life: ids are not reused, so a device removed and added
/// back takes a new one.
pub const MAX_REGISTRARS: usize = 8;
/// Buffers per scatter-gather list at most.
pub const MAX_SEGMENTS: usize = 64;
/// Mapped bytes per pool at most (arena_limit_bytes).
pub const MAX_POOL_BYTES: usize = 1 << 40;
/// Queued waiters per class per core at most.
pub const MAX_WAITERS: usize = 1 << 16;
/// Cached free buffers per class per core at most.
pub const MAX_CORE_CACHE_BUFS: usize = 4096;
