//! The pool (shared, control plane) and its per-core caches (data plane).
//!
//! Where buffers live: every free buffer is either in its class's shared
//! lock-free queue or in exactly one core's local free list. A core
//! allocates from its local list, refilling it from the shared queue in
//! batches, and frees into its local list, spilling half of it back when
//! it grows past `core_cache_bufs`. So buffers freed on another core than
//! the one that allocated them simply join that core's list, and reach
//! the others through the shared queue.
//!
//! Waiting: a core that cannot satisfy a request queues the caller's
//! token (FIFO per class) and sets its bit in the class's `hungry` mask;
//! other cores see the mask in [`CoreCache::maintain`] and spill their
//! idle buffers of that class to the shared queue, from where the waiting
//! core's [`CoreCache::next_grant`] picks them up. Requests take all
//! their buffers at once or none, and among cores that wait the lowest
//! numbered one gets priority (the others give back what they hold and
//! keep no partial refills), so waiting cores cannot deadlock each other:
//! every request is granted once enough granted requests complete.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::error::Error;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_queue::ArrayQueue;

use crate::arena::{thp_disabled, Arena};
use crate::buf::{Buf, RawBuf, SgList};
use crate::config::PoolConfig;
use crate::databuf::{DataBuf, DATA_SEGMENTS_MAX};
use crate::ring::{RingSlots, RxRing, RING_SLOTS};
use crate::{Backing, HUGE_PAGE_BYTES, MAX_ARENAS, MAX_CORES, MAX_REGISTRARS, MAX_SEGMENTS};

/// A buffer class, by index into the configured classes (ascending size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(pub(crate) u8);

impl ClassId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// An arena, by index in creation order (below [`MAX_ARENAS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArenaId(pub(crate) u16);

impl ArenaId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A registrar, by index in the order they were added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistrarId(pub(crate) u8);

impl RegistrarId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What a transport gets back for registering an arena: for RDMA the
/// memory region's local and remote keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegistrationKey {
    pub lkey: u32,
    pub rkey: u32,
}

/// An arena as a registrar sees it.
#[derive(Clone, Copy, Debug)]
pub struct ArenaInfo {
    pub id: ArenaId,
    pub class: ClassId,
    pub base: *mut u8,
    pub len_bytes: usize,
    pub buf_bytes: usize,
    /// What backs it (never `Auto`).
    pub backing: Backing,
    pub locked: bool,
}

pub type RegisterError = Box<dyn Error + Send + Sync>;

/// A transport's hook for registering memory once per arena (e.g. one
/// `ibv_reg_mr` per arena per protection domain). The pool calls
/// `register` for every existing arena when the registrar is added and
/// for every arena added later, before any of that arena's buffers is
/// handed out; `deregister` when the pool is dropped (or an arena's
/// registration is rolled back), before the arena is unmapped.
pub trait Registrar: Send {
    fn register(&mut self, arena: &ArenaInfo) -> Result<RegistrationKey, RegisterError>;
    fn deregister(&mut self, _arena: &ArenaInfo, _key: RegistrationKey) {}
}

/// Registration keys by (arena, registrar), written once each; reading
/// is one acquire load (a plain load on x86).
pub struct KeyTable {
    slots: Box<[OnceLock<RegistrationKey>]>,
}

impl KeyTable {
    fn new() -> KeyTable {
        KeyTable {
            slots: (0..MAX_ARENAS * MAX_REGISTRARS)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    fn slot(arena: ArenaId, registrar: RegistrarId) -> usize {
        arena.index() * MAX_REGISTRARS + registrar.index()
    }

    /// The key `registrar` got for `arena`, once registered.
    pub fn get(&self, arena: ArenaId, registrar: RegistrarId) -> Option<RegistrationKey> {
        if arena.index() >= MAX_ARENAS || registrar.index() >= MAX_REGISTRARS {
            return None;
        }
        self.slots[KeyTable::slot(arena, registrar)].get().copied()
    }
}

#[derive(Debug)]
pub enum PoolError {
    Config(String),
    Map {
        class: ClassId,
        arena_bytes: usize,
        source: io::Error,
    },
    Register {
        arena: ArenaId,
        registrar: RegistrarId,
        source: RegisterError,
    },
    NoSuchClass(usize),
    /// Adding the arena would map more than the class's share of
    /// `arena_limit_bytes`, or is not a whole number of units.
    ClassLimit {
        class: ClassId,
        arena_bytes: usize,
        limit_bytes: usize,
    },
    TooManyArenas,
    TooManyRegistrars,
    CoreOutOfRange(usize),
    CoreTaken(usize),
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Config(s) => write!(f, "pool configuration: {s}"),
            PoolError::Map {
                class,
                arena_bytes,
                source,
            } => write!(
                f,
                "cannot map a {arena_bytes}-byte arena for class {}: {source}",
                class.0
            ),
            PoolError::Register {
                arena,
                registrar,
                source,
            } => write!(
                f,
                "registrar {} cannot register arena {}: {source}",
                registrar.0, arena.0
            ),
            PoolError::NoSuchClass(i) => write!(f, "no buffer class {i}"),
            PoolError::ClassLimit {
                class,
                arena_bytes,
                limit_bytes,
            } => write!(
                f,
                "class {}: {arena_bytes} more bytes exceed its {limit_bytes}-byte limit \
                 or are not whole units",
                class.0
            ),
            PoolError::TooManyArenas => write!(f, "more than {MAX_ARENAS} arenas"),
            PoolError::TooManyRegistrars => write!(f, "more than {MAX_REGISTRARS} registrars"),
            PoolError::CoreOutOfRange(c) => write!(f, "core {c} beyond the configured cores"),
            PoolError::CoreTaken(c) => write!(f, "core {c} already has its cache"),
        }
    }
}

impl Error for PoolError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            PoolError::Map { source, .. } => Some(source),
            PoolError::Register { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// Why a request can never be satisfied (as opposed to "not now").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// More bytes than [`MAX_SEGMENTS`] buffers of any class (or than the
    /// class has) can hold.
    TooLarge { bytes: usize, max_bytes: usize },
    /// The core's waiter queue for the class is full
    /// (`waiters_per_class`): size it for the commands a core can have.
    WaitQueueFull { class: ClassId },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::TooLarge { bytes, max_bytes } => {
                write!(
                    f,
                    "{bytes} bytes exceed the {max_bytes} one command may use"
                )
            }
            AllocError::WaitQueueFull { class } => {
                write!(f, "waiter queue of class {} is full", class.0)
            }
        }
    }
}

impl Error for AllocError {}

/// Outcome of [`CoreCache::alloc_or_wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Alloc {
    /// The list holds the buffers now.
    Ready,
    /// The token is queued; [`CoreCache::next_grant`] returns it with its
    /// buffers once enough are free.
    Queued,
}

/// Which buffers a request of `bytes` takes: `segments` buffers of
/// `class`, all full but the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocPlan {
    pub class: ClassId,
    pub segments: usize,
    pub bytes: usize,
}

/// Counters of one class. From [`Pool::stats`]: the whole pool, as last
/// published by each core ([`CoreCache::maintain`]); `in_use_high_water`
/// is total minus free buffers, sampled by each core whenever it touches
/// the shared queue or publishes and tracked exactly through its own
/// allocations in between: exact with one core; with several, off by at
/// most what the other cores did since that core's last sample. From
/// [`CoreCache::stats`]: that core alone, exact; `in_use` is what this
/// core allocated minus what it freed (0 when it freed more).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    pub buf_bytes: usize,
    pub total_bufs: u64,
    /// Free buffers: the shared queue plus core caches (pool view), or
    /// this core's cache.
    pub free_bufs: u64,
    pub in_use: u64,
    pub in_use_high_water: u64,
    /// Buffers handed out.
    pub allocs: u64,
    /// Buffers given back.
    pub frees: u64,
    /// `try_alloc` / `try_alloc_sg` calls that found nothing.
    pub alloc_failed: u64,
    /// Requests queued to wait.
    pub waits: u64,
    /// Queued requests granted their buffers.
    pub granted: u64,
    /// Requests waiting now.
    pub waiting: u64,
}

// Per-core published counters, by index.
const S_ALLOCS: usize = 0;
const S_FREES: usize = 1;
const S_FAILED: usize = 2;
const S_WAITS: usize = 3;
const S_GRANTED: usize = 4;
const S_WAITING: usize = 5;
const S_LOCAL_FREE: usize = 6;
const S_HIGH: usize = 7;
const S_FIELDS: usize = 8;

struct ClassShared {
    buf_bytes: usize,
    shift: u8,
    free: ArrayQueue<RawBuf>,
    total_bufs: AtomicU64,
    limit_bytes: usize,
    /// Bit `core` set: that core has requests waiting it cannot satisfy.
    hungry: AtomicU64,
    /// Largest in-use total seen at a publication.
    high_water: AtomicU64,
    /// Buffers that came back by a `DataBuf`'s drop rather than through a
    /// core cache (counted as frees pool-wide).
    returned: AtomicU64,
}

struct ArenaSlot {
    arena: Arena,
    class: u8,
}

struct Control {
    arena_count: usize,
    mapped_bytes: Vec<usize>,
    /// Indexed by `RegistrarId`; `None` once removed (ids are not reused,
    /// since keys are written once).
    registrars: Vec<Option<Box<dyn Registrar>>>,
}

struct Shared {
    classes: Vec<ClassShared>,
    arenas: Box<[OnceLock<ArenaSlot>]>,
    keys: KeyTable,
    control: Mutex<Control>,
    core_taken: Box<[AtomicBool]>,
    /// `[core][class][field]`, flattened.
    core_stats: Box<[AtomicU64]>,
    /// Segment lists of scatter-gather `DataBuf`s.
    sg: SgSlots,
    /// Receive rings lent out as `DataBuf` views.
    rings: RingSlots,
    cfg: PoolConfig,
}

/// Scatter-gather `DataBuf`s a pool has out at once, at most. Their
/// segment lists live here rather than in the `DataBuf`, which then stays
/// a few words long everywhere it is moved; 128 bytes a slot.
pub const SG_SLOTS: usize = 4096;

/// The segment lists of scatter-gather `DataBuf`s, mapped at start-up. A
/// slot belongs to whoever took its index from `free` until the index is
/// pushed back.
struct SgSlots {
    slots: Box<[UnsafeCell<[Option<Buf>; DATA_SEGMENTS_MAX]>]>,
    free: ArrayQueue<u32>,
}

// SAFETY: a slot is only reached through the one `DataBuf` holding its
// index (taken from `free`, a lock-free queue, so at most one holder), and
// that `DataBuf` lends it out by `&`/`&mut` as it is itself borrowed; the
// `Buf`s in a slot are `Send`.
unsafe impl Sync for SgSlots {}

impl SgSlots {
    fn new(n: usize) -> SgSlots {
        let free = ArrayQueue::new(n);
        for i in 0..n {
            free.push(i as u32).expect("sized for every slot");
        }
        SgSlots {
            slots: (0..n)
                .map(|_| UnsafeCell::new([const { None }; DATA_SEGMENTS_MAX]))
                .collect(),
            free,
        }
    }
}

impl Shared {
    fn stat(&self, core: usize, class: usize, field: usize) -> &AtomicU64 {
        &self.core_stats[(core * self.classes.len() + class) * S_FIELDS + field]
    }

    /// Gives registrar `rid` back its key of each of the first
    /// `arena_count` arenas.
    fn deregister_arenas(&self, arena_count: usize, rid: RegistrarId, reg: &mut dyn Registrar) {
        for id in 0..arena_count {
            let Some(info) = self.info(id) else { continue };
            if let Some(key) = self.keys.get(info.id, rid) {
                reg.deregister(&info, key);
            }
        }
    }

    fn info(&self, id: usize) -> Option<ArenaInfo> {
        let slot = self.arenas[id].get()?;
        Some(ArenaInfo {
            id: ArenaId(id as u16),
            class: ClassId(slot.class),
            base: slot.arena.base.as_ptr(),
            len_bytes: slot.arena.len_bytes,
            buf_bytes: self.classes[slot.class as usize].buf_bytes,
            backing: slot.arena.backing,
            locked: slot.arena.locked,
        })
    }

    /// Pool-wide in-use count of a class from the published counters.
    fn in_use(&self, class: usize) -> u64 {
        let mut allocs = 0u64;
        let mut frees = 0u64;
        for core in 0..self.cfg.cores {
            allocs += self.stat(core, class, S_ALLOCS).load(Ordering::Relaxed);
            frees += self.stat(core, class, S_FREES).load(Ordering::Relaxed);
        }
        frees += self.classes[class].returned.load(Ordering::Relaxed);
        allocs.saturating_sub(frees)
    }

    /// Whether `raw` is a buffer of this pool, of the class it says.
    fn owns(&self, raw: &RawBuf) -> bool {
        let c = raw.class as usize;
        c < self.classes.len()
            && self.classes[c].shift == raw.shift
            && self
                .arenas
                .get(raw.arena as usize)
                .and_then(OnceLock::get)
                .is_some_and(|s| {
                    s.class == raw.class
                        && s.arena.contains(raw.ptr.as_ptr(), 1 << raw.shift)
                        && (raw.ptr.as_ptr() as usize - s.arena.base.as_ptr() as usize)
                            .is_multiple_of(1 << raw.shift)
                })
    }
}

/// Where a [`DataBuf`] from a pool goes back to when it is dropped rather
/// than freed through a core cache: the pool's shared state, kept alive
/// for the rest of the process (a pool that hands out `DataBuf`s lives as
/// long as the engine anyway).
#[derive(Clone, Copy)]
pub(crate) struct DataHome(&'static Shared);

impl DataHome {
    /// Returns `buf` to its class's shared free queue: one lock-free push,
    /// from any thread.
    pub(crate) fn give_back(self, buf: Buf) {
        let raw = buf.into_raw();
        assert!(
            self.0.owns(&raw),
            "a DataBuf went back to a pool it is not from: {raw:?}"
        );
        let cs = &self.0.classes[raw.class as usize];
        cs.returned.fetch_add(1, Ordering::Relaxed);
        cs.free
            .push(raw)
            .expect("shared queue holds every buffer of the class");
    }

    fn is(self, sh: &Shared) -> bool {
        std::ptr::eq(self.0, sh)
    }

    /// A free segment-list slot (empty), if any.
    pub(crate) fn sg_take(self) -> Option<u32> {
        self.0.sg.free.pop()
    }

    /// Gives back slot `slot`, which the caller took and has emptied.
    pub(crate) fn sg_give(self, slot: u32) {
        self.0
            .sg
            .free
            .push(slot)
            .expect("a slot is given back once");
    }

    /// The segment list in slot `slot`. Reading or writing through the
    /// pointer is sound only for the slot's holder (see `SgSlots`), and
    /// only while no other reference it made is in use.
    pub(crate) fn sg_bufs(self, slot: u32) -> *mut [Option<Buf>; DATA_SEGMENTS_MAX] {
        self.0.sg.slots[slot as usize].get()
    }

    pub(crate) fn rings(self) -> &'static RingSlots {
        &self.0.rings
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every core cache is gone (each held an Arc), and each spilled
        // its free buffers, so whatever is not in a shared queue is held
        // by a `Buf` somewhere (or was leaked by dropping one).
        let outstanding: u64 = self
            .classes
            .iter()
            .map(|c| c.total_bufs.load(Ordering::Relaxed) - c.free.len() as u64)
            .sum();
        let ctl = self.control.get_mut().unwrap_or_else(|e| e.into_inner());
        let arena_count = ctl.arena_count;
        let registrars = std::mem::take(&mut ctl.registrars);
        for (r, reg) in registrars.into_iter().enumerate() {
            if let Some(mut reg) = reg {
                self.deregister_arenas(arena_count, RegistrarId(r as u8), reg.as_mut());
            }
        }
        if outstanding > 0 {
            tracing::warn!(
                outstanding,
                "pool dropped with buffers still held; leaking its arenas"
            );
            for slot in self.arenas.iter_mut() {
                if let Some(s) = slot.take() {
                    std::mem::forget(s);
                }
            }
        }
    }
}

/// The buffer pool: arenas, classes, registrations, statistics. A cheap
/// handle (`Clone`) for the control plane; the data path uses the
/// [`CoreCache`]s it hands out.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl Pool {
    /// Maps every class's start-up arena (populated, locked when asked)
    /// and sizes every queue; nothing is allocated afterwards except by
    /// [`Pool::add_arena`] and [`Pool::add_registrar`].
    pub fn new(cfg: PoolConfig) -> Result<Pool, PoolError> {
        let plans = cfg.plan().map_err(PoolError::Config)?;
        let classes = plans
            .iter()
            .map(|p| ClassShared {
                buf_bytes: p.buf_bytes,
                shift: p.buf_bytes.trailing_zeros() as u8,
                free: ArrayQueue::new(p.limit_bytes / p.buf_bytes),
                total_bufs: AtomicU64::new(0),
                limit_bytes: p.limit_bytes,
                hungry: AtomicU64::new(0),
                high_water: AtomicU64::new(0),
                returned: AtomicU64::new(0),
            })
            .collect();
        let n = plans.len();
        let shared = Shared {
            classes,
            arenas: (0..MAX_ARENAS).map(|_| OnceLock::new()).collect(),
            keys: KeyTable::new(),
            control: Mutex::new(Control {
                arena_count: 0,
                mapped_bytes: vec![0; n],
                registrars: Vec::with_capacity(MAX_REGISTRARS),
            }),
            core_taken: (0..cfg.cores).map(|_| AtomicBool::new(false)).collect(),
            core_stats: (0..cfg.cores * n * S_FIELDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            sg: SgSlots::new(SG_SLOTS),
            rings: RingSlots::new(RING_SLOTS),
            cfg,
        };
        if matches!(shared.cfg.backing, Backing::Auto | Backing::TransparentHuge) && thp_disabled()
        {
            tracing::warn!(
                "transparent huge pages are disabled (never); fallback arenas use 4 KiB pages"
            );
        }
        let pool = Pool {
            shared: Arc::new(shared),
        };
        for (i, p) in plans.iter().enumerate() {
            pool.add_arena(ClassId(i as u8), p.arena_bytes)?;
        }
        Ok(pool)
    }

    pub fn config(&self) -> &PoolConfig {
        &self.shared.cfg
    }

    /// The classes, smallest first, with their `buf_bytes`.
    pub fn classes(&self) -> impl Iterator<Item = (ClassId, usize)> + '_ {
        self.shared
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (ClassId(i as u8), c.buf_bytes))
    }

    /// The class whose buffers are exactly `buf_bytes`.
    pub fn class_of(&self, buf_bytes: usize) -> Option<ClassId> {
        self.classes()
            .find(|&(_, b)| b == buf_bytes)
            .map(|(c, _)| c)
    }

    /// Which buffers a request of `bytes` would take.
    pub fn plan(&self, bytes: usize) -> Result<AllocPlan, AllocError> {
        let sizes: Vec<_> = self
            .shared
            .classes
            .iter()
            .map(|c| (c.buf_bytes, c.total_bufs.load(Ordering::Relaxed)))
            .collect();
        choose(bytes, &sizes)
    }

    /// The cache for `core` (0..cores), once: a second call for the same
    /// core fails until the first cache is dropped.
    pub fn core_cache(&self, core: usize) -> Result<CoreCache, PoolError> {
        let sh = &self.shared;
        if core >= sh.cfg.cores {
            return Err(PoolError::CoreOutOfRange(core));
        }
        if sh.core_taken[core].swap(true, Ordering::AcqRel) {
            return Err(PoolError::CoreTaken(core));
        }
        let classes = sh
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let total = c.total_bufs.load(Ordering::Relaxed);
                let share = (total as usize / (4 * sh.cfg.cores)).max(1);
                let cache_bufs = sh.cfg.core_cache_bufs.min(share);
                let stat = |f| sh.stat(core, i, f).load(Ordering::Relaxed);
                let stats = LocalStats {
                    allocs: stat(S_ALLOCS),
                    frees: stat(S_FREES),
                    alloc_failed: stat(S_FAILED),
                    waits: stat(S_WAITS),
                    granted: stat(S_GRANTED),
                    high_water: stat(S_HIGH),
                };
                LocalClass {
                    free: Vec::with_capacity(cache_bufs + MAX_SEGMENTS + 1),
                    cache_bufs,
                    batch_bufs: (cache_bufs / 2).max(1),
                    total_bufs: total,
                    waiters: VecDeque::with_capacity(sh.cfg.waiters_per_class),
                    hungry: false,
                    stats,
                    base_in_use: 0,
                    min_free: 0,
                    peak_in_use: 0,
                }
            })
            .collect();
        Ok(CoreCache {
            shared: self.shared.clone(),
            core,
            bit: 1 << core,
            classes,
            waiting: 0,
            next_class: 0,
            dirty: true,
            home: None,
            sg_allocs: 0,
        })
    }

    /// Maps another arena of `arena_bytes` (whole 2 MiB units, and whole
    /// buffers) for `class`, registers it with every registrar, then adds
    /// its buffers to the class. Control plane only: it maps memory and
    /// takes a lock. Bounded by the class's share of `arena_limit_bytes`.
    pub fn add_arena(&self, class: ClassId, arena_bytes: usize) -> Result<ArenaId, PoolError> {
        let sh = &*self.shared;
        let cs = sh
            .classes
            .get(class.index())
            .ok_or(PoolError::NoSuchClass(class.index()))?;
        let mut ctl = sh.control.lock().unwrap_or_else(|e| e.into_inner());
        let unit = cs.buf_bytes.max(HUGE_PAGE_BYTES);
        let mapped = ctl.mapped_bytes[class.index()];
        if arena_bytes == 0
            || !arena_bytes.is_multiple_of(unit)
            || arena_bytes > cs.limit_bytes.saturating_sub(mapped)
        {
            return Err(PoolError::ClassLimit {
                class,
                arena_bytes,
                limit_bytes: cs.limit_bytes,
            });
        }
        if ctl.arena_count == MAX_ARENAS {
            return Err(PoolError::TooManyArenas);
        }
        let id = ArenaId(ctl.arena_count as u16);
        let arena =
            Arena::map(arena_bytes, sh.cfg.backing, sh.cfg.lock_memory).map_err(|source| {
                PoolError::Map {
                    class,
                    arena_bytes,
                    source,
                }
            })?;
        let info = ArenaInfo {
            id,
            class,
            base: arena.base.as_ptr(),
            len_bytes: arena_bytes,
            buf_bytes: cs.buf_bytes,
            backing: arena.backing,
            locked: arena.locked,
        };
        let mut keys = [RegistrationKey::default(); MAX_REGISTRARS];
        let nreg = ctl.registrars.len();
        for r in 0..nreg {
            let Some(reg) = ctl.registrars[r].as_mut() else {
                continue;
            };
            match reg.register(&info) {
                Ok(k) => keys[r] = k,
                Err(source) => {
                    for (done, key) in keys.iter().enumerate().take(r) {
                        if let Some(reg) = ctl.registrars[done].as_mut() {
                            reg.deregister(&info, *key);
                        }
                    }
                    return Err(PoolError::Register {
                        arena: id,
                        registrar: RegistrarId(r as u8),
                        source,
                    });
                }
            }
        }
        for (r, key) in keys.iter().enumerate().take(nreg) {
            if ctl.registrars[r].is_none() {
                continue;
            }
            let set = sh.keys.slots[KeyTable::slot(id, RegistrarId(r as u8))].set(*key);
            assert!(set.is_ok(), "arena {} registered twice", id.0);
        }
        let bufs = arena_bytes / cs.buf_bytes;
        let base = arena.base;
        tracing::info!(
            arena = id.0,
            buf_bytes = cs.buf_bytes,
            bufs,
            arena_bytes,
            backing = match arena.backing {
                Backing::HugeTlb => "2 MiB hugetlb pages",
                Backing::TransparentHuge => "transparent huge pages (madvise)",
                Backing::Heap => "heap",
                Backing::Auto => unreachable!(),
            },
            locked = arena.locked,
            "buffer arena mapped"
        );
        let set = sh.arenas[id.index()].set(ArenaSlot {
            arena,
            class: class.0,
        });
        assert!(set.is_ok(), "arena slot {} reused", id.0);
        ctl.arena_count += 1;
        ctl.mapped_bytes[class.index()] += arena_bytes;
        for i in 0..bufs {
            // SAFETY: i * buf_bytes + buf_bytes <= arena_bytes, so the
            // pointer stays inside the arena's allocation.
            let ptr = unsafe { base.add(i * cs.buf_bytes) };
            let raw = RawBuf {
                ptr,
                arena: id.0,
                class: class.0,
                shift: cs.shift,
            };
            cs.free
                .push(raw)
                .expect("free queue is sized for the class limit");
        }
        cs.total_bufs.fetch_add(bufs as u64, Ordering::Release);
        Ok(id)
    }

    /// Adds a registrar and registers every existing arena with it; later
    /// arenas are registered as they are added. Control plane only.
    pub fn add_registrar(
        &self,
        mut registrar: Box<dyn Registrar>,
    ) -> Result<RegistrarId, PoolError> {
        let sh = &*self.shared;
        let mut ctl = sh.control.lock().unwrap_or_else(|e| e.into_inner());
        if ctl.registrars.len() == MAX_REGISTRARS {
            return Err(PoolError::TooManyRegistrars);
        }
        let rid = RegistrarId(ctl.registrars.len() as u8);
        let mut keys = Vec::with_capacity(ctl.arena_count);
        for id in 0..ctl.arena_count {
            let info = sh.info(id).expect("arena below count is set");
            match registrar.register(&info) {
                Ok(k) => keys.push(k),
                Err(source) => {
                    for (done, key) in keys.iter().enumerate() {
                        let info = sh.info(done).expect("arena below count is set");
                        registrar.deregister(&info, *key);
                    }
                    return Err(PoolError::Register {
                        arena: info.id,
                        registrar: rid,
                        source,
                    });
                }
            }
        }
        for (id, key) in keys.into_iter().enumerate() {
            let set = sh.keys.slots[KeyTable::slot(ArenaId(id as u16), rid)].set(key);
            assert!(set.is_ok(), "registrar slot {} reused", rid.0);
        }
        ctl.registrars.push(Some(registrar));
        Ok(rid)
    }

    /// Deregisters every arena from registrar `rid` and drops it (an RDMA
    /// device going away must get its memory registrations back before
    /// it can be released). Its keys stay readable but name nothing; the
    /// id is not reused. Control plane only; false if `rid` is unknown or
    /// already removed.
    pub fn remove_registrar(&self, rid: RegistrarId) -> bool {
        let sh = &*self.shared;
        let mut ctl = sh.control.lock().unwrap_or_else(|e| e.into_inner());
        let count = ctl.arena_count;
        let Some(mut reg) = ctl.registrars.get_mut(rid.index()).and_then(Option::take) else {
            return false;
        };
        sh.deregister_arenas(count, rid, reg.as_mut());
        true
    }

    /// Every arena mapped so far.
    pub fn arenas(&self) -> Vec<ArenaInfo> {
        let ctl = self
            .shared
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (0..ctl.arena_count)
            .filter_map(|id| self.shared.info(id))
            .collect()
    }

    pub fn keys(&self) -> &KeyTable {
        &self.shared.keys
    }

    /// Counters per class, smallest class first, summed over cores as
    /// they last published them.
    pub fn stats(&self) -> Vec<ClassStats> {
        let sh = &*self.shared;
        (0..sh.classes.len())
            .map(|c| {
                let cs = &sh.classes[c];
                let sum = |f| -> u64 {
                    (0..sh.cfg.cores)
                        .map(|core| sh.stat(core, c, f).load(Ordering::Relaxed))
                        .sum()
                };
                let in_use = sh.in_use(c);
                let high = cs
                    .high_water
                    .fetch_max(in_use, Ordering::Relaxed)
                    .max(in_use);
                ClassStats {
                    buf_bytes: cs.buf_bytes,
                    total_bufs: cs.total_bufs.load(Ordering::Relaxed),
                    free_bufs: cs.free.len() as u64 + sum(S_LOCAL_FREE),
                    in_use,
                    in_use_high_water: high,
                    allocs: sum(S_ALLOCS),
                    frees: sum(S_FREES),
                    alloc_failed: sum(S_FAILED),
                    waits: sum(S_WAITS),
                    granted: sum(S_GRANTED),
                    waiting: sum(S_WAITING),
                }
            })
            .collect()
    }
}

/// Whether `bytes` in buffers of `total` bytes wastes at most an eighth
/// of the request.
fn waste_acceptable(total: usize, bytes: usize) -> bool {
    (total - bytes).saturating_mul(8) <= bytes
}

/// Picks the class for `bytes`: the largest class that wastes at most an
/// eighth of the request, else the one wasting least, never more than
/// [`MAX_SEGMENTS`] buffers nor more than the class has.
fn choose(bytes: usize, classes: &[(usize, u64)]) -> Result<AllocPlan, AllocError> {
    if bytes == 0 {
        return Ok(AllocPlan {
            class: ClassId(0),
            segments: 0,
            bytes: 0,
        });
    }
    let mut best: Option<(usize, usize, usize)> = None;
    for (i, &(size, total)) in classes.iter().enumerate().rev() {
        let segs = bytes.div_ceil(size);
        if segs > MAX_SEGMENTS || segs as u64 > total {
            continue;
        }
        let waste = segs * size - bytes;
        if waste_acceptable(segs * size, bytes) {
            best = Some((waste, i, segs));
            break;
        }
        if best.is_none_or(|b| waste < b.0) {
            best = Some((waste, i, segs));
        }
    }
    match best {
        Some((_, i, segs)) => Ok(AllocPlan {
            class: ClassId(i as u8),
            segments: segs,
            bytes,
        }),
        None => Err(AllocError::TooLarge {
            bytes,
            max_bytes: classes
                .iter()
                .map(|&(size, total)| size * (total as usize).min(MAX_SEGMENTS))
                .max()
                .unwrap_or(0),
        }),
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct LocalStats {
    allocs: u64,
    frees: u64,
    alloc_failed: u64,
    waits: u64,
    granted: u64,
    high_water: u64,
}

impl LocalStats {
    fn in_use(&self) -> u64 {
        self.allocs.saturating_sub(self.frees)
    }

    fn note_alloc(&mut self) {
        self.high_water = self.high_water.max(self.in_use());
    }
}

#[derive(Clone, Copy, Debug)]
struct Waiter {
    token: u64,
    bytes: usize,
    segments: usize,
}

struct LocalClass {
    /// Capacity `cache_bufs + MAX_SEGMENTS + 1`, never exceeded.
    free: Vec<RawBuf>,
    cache_bufs: usize,
    batch_bufs: usize,
    /// The class's buffer count when last looked (refreshed by
    /// `maintain`); bounds how many one request may take.
    total_bufs: u64,
    /// Capacity `waiters_per_class`, never exceeded.
    waiters: VecDeque<Waiter>,
    /// Whether this core's bit is set in the class's hungry mask.
    hungry: bool,
    stats: LocalStats,
    /// Pool-wide in-use plus this core's free buffers, at the last sample
    /// (total minus the shared queue minus the other cores' published
    /// free counts): pool-wide in-use is `base_in_use - free.len()` as
    /// far as this core's own activity goes.
    base_in_use: u64,
    /// Smallest `free.len()` since the last sample.
    min_free: usize,
    /// Largest pool-wide in-use seen, for the next publication.
    peak_in_use: u64,
}

/// One core's view of the pool: owned by that core's reactor, not shared
/// (`Send`, not `Sync`). Allocation and free use only its own lists; the
/// shared queues are touched in batches, and [`CoreCache::maintain`] —
/// call it once per reactor loop iteration — publishes counters and gives
/// idle buffers to cores that wait.
///
/// Dropping the cache returns its free buffers to the pool and forgets
/// its waiters (their buffers are never granted).
pub struct CoreCache {
    shared: Arc<Shared>,
    core: usize,
    bit: u64,
    classes: Vec<LocalClass>,
    /// Waiters over all classes.
    waiting: usize,
    /// Round-robin start for `next_grant`.
    next_class: usize,
    /// Counters or the local free lists changed since the last
    /// publication; `maintain` publishes only then.
    dirty: bool,
    /// Where this cache's `DataBuf`s return when dropped (set at the
    /// first `alloc_data`).
    home: Option<DataHome>,
    /// `alloc_data_sg` successes.
    sg_allocs: u64,
}

impl fmt::Debug for CoreCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreCache")
            .field("core", &self.core)
            .field("waiting", &self.waiting)
            .finish()
    }
}

impl CoreCache {
    pub fn core(&self) -> usize {
        self.core
    }

    /// The classes, smallest first, with their `buf_bytes`.
    pub fn classes(&self) -> impl Iterator<Item = (ClassId, usize)> + '_ {
        self.shared
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (ClassId(i as u8), c.buf_bytes))
    }

    /// The smallest class whose buffers hold `bytes` in one piece.
    pub fn class_for(&self, bytes: usize) -> Option<ClassId> {
        self.classes().find(|&(_, b)| b >= bytes).map(|(c, _)| c)
    }

    /// Which buffers a request of `bytes` would take.
    pub fn plan(&self, bytes: usize) -> Result<AllocPlan, AllocError> {
        let mut sizes = [(0usize, 0u64); crate::MAX_CLASSES];
        for (i, lc) in self.classes.iter().enumerate() {
            sizes[i] = (self.shared.classes[i].buf_bytes, lc.total_bufs);
        }
        choose(bytes, &sizes[..self.classes.len()])
    }

    pub fn keys(&self) -> &KeyTable {
        &self.shared.keys
    }

    /// Requests waiting on this core, all classes.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// One empty buffer (`len() == 0`) of `class`, or `None` when the
    /// class has none free for this core or requests are already waiting
    /// for it (they go first). Never allocates memory.
    pub fn try_alloc(&mut self, class: ClassId) -> Option<Buf> {
        let c = class.index();
        assert!(c < self.classes.len(), "no class {c}");
        self.dirty = true;
        if !self.classes[c].waiters.is_empty() || !self.ensure(c, 1) {
            self.classes[c].stats.alloc_failed += 1;
            return None;
        }
        let lc = &mut self.classes[c];
        let raw = lc.free.pop().expect("ensured");
        lc.min_free = lc.min_free.min(lc.free.len());
        lc.stats.allocs += 1;
        lc.stats.note_alloc();
        // SAFETY: `raw` just left this core's free list, and a buffer is
        // in at most one free list and never also behind a handle.
        Some(unsafe { Buf::from_raw(raw, 0) })
    }

    /// The buffers for `bytes` into the empty `sg` (lengths set so the
    /// list holds exactly `bytes`), if free now; `Ok(false)` when not
    /// (nothing queued, nothing taken). Never allocates memory.
    pub fn try_alloc_sg(&mut self, bytes: usize, sg: &mut SgList) -> Result<bool, AllocError> {
        assert!(sg.is_empty(), "allocating into a non-empty SgList");
        let plan = self.plan(bytes)?;
        if plan.segments == 0 {
            return Ok(true);
        }
        let c = plan.class.index();
        self.dirty = true;
        if !self.classes[c].waiters.is_empty() || !self.ensure(c, plan.segments) {
            self.classes[c].stats.alloc_failed += 1;
            return Ok(false);
        }
        self.fill(plan, sg);
        Ok(true)
    }

    /// The buffers for `bytes` into the empty `sg` now (`Ready`), or
    /// `token` queued behind earlier waiters of the class (`Queued`): a
    /// later [`CoreCache::next_grant`] returns it with a filled list.
    /// Exhaustion never fails a request and never allocates memory; the
    /// errors are requests that could never be satisfied.
    pub fn alloc_or_wait(
        &mut self,
        bytes: usize,
        token: u64,
        sg: &mut SgList,
    ) -> Result<Alloc, AllocError> {
        assert!(sg.is_empty(), "allocating into a non-empty SgList");
        let plan = self.plan(bytes)?;
        if plan.segments == 0 {
            return Ok(Alloc::Ready);
        }
        let c = plan.class.index();
        self.dirty = true;
        if self.classes[c].waiters.is_empty() && self.ensure(c, plan.segments) {
            self.fill(plan, sg);
            return Ok(Alloc::Ready);
        }
        self.queue_waiter(
            plan.class,
            Waiter {
                token,
                bytes,
                segments: plan.segments,
            },
        )?;
        Ok(Alloc::Queued)
    }

    /// `w` behind the earlier waiters of `class`, which is marked hungry
    /// so that other cores give back its idle buffers.
    fn queue_waiter(&mut self, class: ClassId, w: Waiter) -> Result<(), AllocError> {
        let c = class.index();
        let lc = &mut self.classes[c];
        if lc.waiters.len() == lc.waiters.capacity() {
            return Err(AllocError::WaitQueueFull { class });
        }
        lc.waiters.push_back(w);
        lc.stats.waits += 1;
        self.waiting += 1;
        self.dirty = true;
        self.set_hungry(c, true);
        Ok(())
    }

    /// The next waiting request whose buffers are now free: its token and
    /// its filled list. Call it after freeing buffers and once per loop
    /// iteration until it returns `None`. FIFO within a class; classes
    /// take turns.
    pub fn next_grant(&mut self) -> Option<(u64, SgList)> {
        if self.waiting == 0 {
            return None;
        }
        let n = self.classes.len();
        for k in 0..n {
            let c = (self.next_class + k) % n;
            let Some(&w) = self.classes[c].waiters.front() else {
                continue;
            };
            if !self.ensure(c, w.segments) {
                self.set_hungry(c, true);
                continue;
            }
            self.classes[c].waiters.pop_front();
            self.waiting -= 1;
            self.classes[c].stats.granted += 1;
            self.dirty = true;
            let mut sg = SgList::new();
            self.fill(
                AllocPlan {
                    class: ClassId(c as u8),
                    segments: w.segments,
                    bytes: w.bytes,
                },
                &mut sg,
            );
            if self.classes[c].waiters.is_empty() {
                self.set_hungry(c, false);
            }
            self.next_class = (c + 1) % n;
            return Some((w.token, sg));
        }
        None
    }

    /// A request [`CoreCache::wait_for_data`] queued, served in pieces:
    /// when the first waiter of a class still finds no buffer of its own
    /// class but a smaller class has enough idle ones (the rule of
    /// [`CoreCache::alloc_data_sg`], which also leaves classes with
    /// waiters of their own alone), it leaves the queue with a
    /// scatter-gather `DataBuf` instead of waiting on. `pieces_ok(token)`
    /// says whether that request's command may have its data in pieces.
    /// For after [`CoreCache::next_grant`] has returned `None`: a buffer
    /// of the request's own class goes first. Never allocates memory.
    pub fn grant_in_pieces(
        &mut self,
        pieces_ok: &mut dyn FnMut(u64) -> bool,
    ) -> Option<(u64, DataBuf)> {
        if self.waiting == 0 {
            return None;
        }
        for c in 0..self.classes.len() {
            let Some(&w) = self.classes[c].waiters.front() else {
                continue;
            };
            if w.segments != 1 || self.ensure(c, 1) || !pieces_ok(w.token) {
                continue;
            }
            let Some(d) = self.alloc_data_sg(w.bytes) else {
                continue;
            };
            self.classes[c].waiters.pop_front();
            self.waiting -= 1;
            self.classes[c].stats.granted += 1;
            self.dirty = true;
            if self.classes[c].waiters.is_empty() {
                self.set_hungry(c, false);
            }
            return Some((w.token, d));
        }
        None
    }

    /// Drops a waiting request (its command was aborted); whether it was
    /// queued.
    pub fn cancel_wait(&mut self, token: u64) -> bool {
        for c in 0..self.classes.len() {
            let lc = &mut self.classes[c];
            if let Some(i) = lc.waiters.iter().position(|w| w.token == token) {
                lc.waiters.remove(i);
                self.waiting -= 1;
                if self.classes[c].waiters.is_empty() {
                    self.set_hungry(c, false);
                }
                self.dirty = true;
                return true;
            }
        }
        false
    }

    /// Gives a buffer back (allocated on any core of this pool). Panics
    /// if it belongs to another pool. Never allocates memory.
    pub fn free(&mut self, buf: Buf) {
        let raw = buf.into_raw();
        let c = raw.class as usize;
        let ok = self.shared.owns(&raw);
        assert!(ok, "freeing a buffer that is not from this pool: {raw:?}");
        self.dirty = true;
        let lc = &mut self.classes[c];
        lc.stats.frees += 1;
        assert!(lc.free.len() < lc.free.capacity());
        lc.free.push(raw);
        let limit = lc.cache_bufs
            + if lc.waiters.is_empty() {
                0
            } else {
                MAX_SEGMENTS
            };
        if lc.free.len() > limit {
            let keep = limit.saturating_sub(lc.batch_bufs);
            self.spill(c, keep);
        }
    }

    /// A [`DataBuf`] of `len` bytes (contents stale: whatever the buffer
    /// held) in one buffer of the smallest class that holds it, or `None`
    /// when no class is that large or the class has nothing free here now
    /// (the caller decides whether to wait or use the heap). Never
    /// allocates memory.
    pub fn alloc_data(&mut self, len: usize) -> Option<DataBuf> {
        let class = self.class_for(len.max(1))?;
        self.try_alloc_data(class, len)
    }

    fn try_alloc_data(&mut self, class: ClassId, len: usize) -> Option<DataBuf> {
        let mut buf = self.try_alloc(class)?;
        buf.set_len(len);
        Some(self.wrap_data(buf))
    }

    /// A scatter-gather [`DataBuf`] of `len` bytes over 2 to
    /// [`DATA_SEGMENTS_MAX`] buffers of one class smaller than the one
    /// `alloc_data` would use, if such a class has them free now and no
    /// waiters: for a command whose own class is exhausted while smaller
    /// buffers sit idle. The largest such class goes first (fewest
    /// segments); one that would waste more than an eighth of its bytes is
    /// skipped. Never allocates memory.
    pub fn alloc_data_sg(&mut self, len: usize) -> Option<DataBuf> {
        let whole = self.class_for(len.max(1))?.index();
        for c in (0..whole).rev() {
            let seg_bytes = self.shared.classes[c].buf_bytes;
            let segments = len.div_ceil(seg_bytes);
            if segments > DATA_SEGMENTS_MAX {
                break;
            }
            if segments < 2 || !waste_acceptable(segments * seg_bytes, len) {
                continue;
            }
            self.dirty = true;
            if !self.classes[c].waiters.is_empty() || !self.ensure(c, segments) {
                self.classes[c].stats.alloc_failed += 1;
                continue;
            }
            // The buffers are in this core's cache now: taken only with a
            // segment slot to list them in.
            let home = self.home();
            let slot = home.sg_take()?;
            self.sg_allocs += 1;
            let mut sg = SgList::new();
            self.fill(
                AllocPlan {
                    class: ClassId(c as u8),
                    segments,
                    bytes: len,
                },
                &mut sg,
            );
            // Any order: the buffers are interchangeable.
            let bufs = std::iter::from_fn(|| sg.pop());
            return Some(DataBuf::from_pool_segments(slot, bufs, len, home));
        }
        None
    }

    /// Scatter-gather `DataBuf`s `alloc_data_sg` has handed out on this
    /// core since the cache was made.
    pub fn sg_allocs(&self) -> u64 {
        self.sg_allocs
    }

    /// `alloc_data`, or, when the class has nothing free on this core
    /// now, `token` queued behind the class's earlier waiters: a later
    /// [`CoreCache::next_grant`] returns it with a one-buffer list, which
    /// [`CoreCache::data_from_grant`] makes the `DataBuf`. `Ok(None)`:
    /// queued. The errors are requests a wait cannot serve (no class
    /// holds `len` in one buffer) or the class's wait queue full. Never
    /// allocates memory.
    pub fn alloc_data_or_wait(
        &mut self,
        len: usize,
        token: u64,
    ) -> Result<Option<DataBuf>, AllocError> {
        if let Some(d) = self.alloc_data(len) {
            return Ok(Some(d));
        }
        self.wait_for_data(len, token)?;
        Ok(None)
    }

    /// `token` queued for one buffer of the class that holds `len`, for a
    /// caller that already found none free (`alloc_data`, and whatever
    /// else it tried): the second half of `alloc_data_or_wait`.
    pub fn wait_for_data(&mut self, len: usize, token: u64) -> Result<(), AllocError> {
        let Some(class) = self.class_for(len.max(1)) else {
            return Err(AllocError::TooLarge {
                bytes: len,
                max_bytes: self.classes().last().map_or(0, |(_, b)| b),
            });
        };
        self.queue_waiter(
            class,
            Waiter {
                token,
                bytes: len,
                segments: 1,
            },
        )
    }

    /// The `DataBuf` of a grant that `alloc_data_or_wait` queued (a list of
    /// one buffer, its length the request's).
    pub fn data_from_grant(&mut self, mut sg: SgList) -> DataBuf {
        let buf = sg.pop().expect("a data grant holds one buffer");
        assert!(sg.is_empty(), "a data grant holds one buffer");
        self.wrap_data(buf)
    }

    /// A receive ring of `len` bytes in a buffer of the smallest class
    /// that holds it, if one is free now (never waits, never allocates).
    /// Exactly `len`, not the class's size: how much one read may take
    /// is the caller's choice (a larger ring would swallow write data
    /// that could have been read straight into its command's buffer).
    pub fn alloc_ring(&mut self, len: usize) -> Option<RxRing> {
        let class = self.class_for(len.max(1))?;
        let mut buf = self.try_alloc(class)?;
        buf.set_len(len);
        let base = std::ptr::NonNull::new(buf.as_mut_ptr()).expect("pool memory");
        let home = self.home();
        match home.rings().take(buf) {
            Ok(slot) => Some(RxRing::new(slot, base, len, home)),
            Err(buf) => {
                self.free(buf);
                None
            }
        }
    }

    fn wrap_data(&mut self, buf: Buf) -> DataBuf {
        let home = self.home();
        DataBuf::from_pool(buf, home)
    }

    fn home(&mut self) -> DataHome {
        match self.home {
            Some(h) => h,
            None => {
                // Leaked once per cache, so buffers can find their way
                // home from any thread for the rest of the process.
                let sh: &'static Arc<Shared> = Box::leak(Box::new(self.shared.clone()));
                let h = DataHome(sh);
                self.home = Some(h);
                h
            }
        }
    }

    /// Takes a [`DataBuf`] back: a buffer of this pool into this core's
    /// cache, one of another pool to its own home; a heap buffer is
    /// returned for the caller to keep or drop.
    pub fn free_data(&mut self, data: DataBuf) -> Option<Vec<u8>> {
        match data.into_parts() {
            Err(v) => Some(v),
            Ok((parts, home)) if home.is(&self.shared) => {
                for buf in parts.into_bufs() {
                    self.free(buf);
                }
                None
            }
            Ok((parts, home)) => {
                for buf in parts.into_bufs() {
                    home.give_back(buf);
                }
                None
            }
        }
    }

    /// Gives back every buffer of the list, leaving it empty.
    pub fn free_sg(&mut self, sg: &mut SgList) {
        while let Some(b) = sg.pop() {
            self.free(b);
        }
    }

    /// Housekeeping for once per reactor loop iteration: spills idle
    /// buffers of classes other cores wait for, and publishes counters.
    /// A few relaxed loads when nothing happened.
    pub fn maintain(&mut self) {
        for c in 0..self.classes.len() {
            let cs = &self.shared.classes[c];
            let lc = &mut self.classes[c];
            lc.total_bufs = cs.total_bufs.load(Ordering::Acquire);
            let hungry = cs.hungry.load(Ordering::Relaxed);
            if hungry & !self.bit == 0 || lc.free.is_empty() {
                continue;
            }
            // Give idle buffers to waiting cores. A core that waits too
            // gives up what it holds to a lower-numbered waiting core
            // unless it can serve its own first waiter: among waiting
            // cores the lowest accumulates, so two cores each holding part
            // of what the other needs cannot wait on each other forever.
            let yields = match lc.waiters.front() {
                None => true,
                Some(w) => lc.free.len() < w.segments && hungry & (self.bit - 1) != 0,
            };
            if yields {
                self.spill(c, 0);
            }
        }
        if self.dirty {
            self.publish();
        }
    }

    /// Returns every cached free buffer to the shared queues (before the
    /// reactor sleeps, so other cores can use them) and publishes.
    pub fn flush(&mut self) {
        for c in 0..self.classes.len() {
            self.spill(c, 0);
        }
        self.publish();
    }

    /// This core's counters for `class` (see [`ClassStats`]).
    pub fn stats(&self, class: ClassId) -> ClassStats {
        let lc = &self.classes[class.index()];
        ClassStats {
            buf_bytes: self.shared.classes[class.index()].buf_bytes,
            total_bufs: lc.total_bufs,
            free_bufs: lc.free.len() as u64,
            in_use: lc.stats.in_use(),
            in_use_high_water: lc.stats.high_water,
            allocs: lc.stats.allocs,
            frees: lc.stats.frees,
            alloc_failed: lc.stats.alloc_failed,
            waits: lc.stats.waits,
            granted: lc.stats.granted,
            waiting: lc.waiters.len() as u64,
        }
    }

    /// Makes at least `n` buffers of class `c` free locally, refilling
    /// from the shared queue; whether it could.
    fn ensure(&mut self, c: usize, n: usize) -> bool {
        debug_assert!(n <= MAX_SEGMENTS);
        let lc = &mut self.classes[c];
        if lc.free.len() >= n {
            return true;
        }
        let cs = &self.shared.classes[c];
        // Take only what is needed while another core waits.
        let target = if cs.hungry.load(Ordering::Relaxed) & !self.bit != 0 {
            n
        } else {
            n.max(lc.batch_bufs)
        };
        let had = lc.free.len();
        while lc.free.len() < target {
            let Some(raw) = cs.free.pop() else { break };
            assert!(lc.free.len() < lc.free.capacity());
            lc.free.push(raw);
        }
        let ok = lc.free.len() >= n;
        if !ok && cs.hungry.load(Ordering::Relaxed) & (self.bit - 1) != 0 {
            // Not enough, and a lower-numbered core waits: leave what was
            // there for it (see `maintain`).
            while lc.free.len() > had {
                let raw = lc.free.pop().expect("len > had");
                cs.free
                    .push(raw)
                    .expect("shared queue holds every buffer of the class");
            }
        }
        // A refill that still falls short (`next_grant`) changes no other
        // counter, yet moves buffers out of the shared queue: unless it
        // marks the cache dirty, `maintain` does not publish and the pool
        // counts those buffers as neither free nor in use.
        if self.classes[c].free.len() != had {
            self.dirty = true;
        }
        self.sample(c);
        ok
    }

    /// Folds the in-use peak since the last sample into `peak_in_use` and
    /// takes a new sample. Slow path only (refill, spill, publication).
    fn sample(&mut self, c: usize) {
        let sh = &*self.shared;
        let cs = &sh.classes[c];
        let lc = &mut self.classes[c];
        lc.peak_in_use = lc
            .peak_in_use
            .max(lc.base_in_use.saturating_sub(lc.min_free as u64));
        let others_free: u64 = (0..sh.cfg.cores)
            .filter(|&core| core != self.core)
            .map(|core| sh.stat(core, c, S_LOCAL_FREE).load(Ordering::Relaxed))
            .sum();
        lc.base_in_use = lc
            .total_bufs
            .max(cs.total_bufs.load(Ordering::Relaxed))
            .saturating_sub(cs.free.len() as u64 + others_free);
        lc.min_free = lc.free.len();
    }

    /// Moves local free buffers of class `c` to the shared queue until
    /// `keep` remain.
    fn spill(&mut self, c: usize, keep: usize) {
        let cs = &self.shared.classes[c];
        let lc = &mut self.classes[c];
        if lc.free.len() <= keep {
            return;
        }
        while lc.free.len() > keep {
            let raw = lc.free.pop().expect("len > keep");
            cs.free
                .push(raw)
                .expect("shared queue holds every buffer of the class");
        }
        // The published free count is stale now (see `ensure`).
        self.dirty = true;
        self.sample(c);
    }

    /// Takes `plan.segments` local buffers (ensured) into `sg`.
    fn fill(&mut self, plan: AllocPlan, sg: &mut SgList) {
        let c = plan.class.index();
        let size = self.shared.classes[c].buf_bytes;
        let lc = &mut self.classes[c];
        assert!(lc.free.len() >= plan.segments);
        let mut left = plan.bytes;
        for _ in 0..plan.segments {
            let raw = lc.free.pop().expect("ensured");
            let len = left.min(size);
            left -= len;
            // SAFETY: `raw` just left this core's free list, and a buffer
            // is in at most one free list and never also behind a handle.
            let buf = unsafe { Buf::from_raw(raw, len) };
            if sg.push(buf).is_err() {
                unreachable!("plans never exceed MAX_SEGMENTS");
            }
        }
        assert_eq!(left, 0, "plan does not cover its bytes");
        lc.min_free = lc.min_free.min(lc.free.len());
        lc.stats.allocs += plan.segments as u64;
        lc.stats.note_alloc();
    }

    fn set_hungry(&mut self, c: usize, on: bool) {
        let lc = &mut self.classes[c];
        if lc.hungry == on {
            return;
        }
        lc.hungry = on;
        let mask = &self.shared.classes[c].hungry;
        if on {
            mask.fetch_or(self.bit, Ordering::Relaxed);
        } else {
            mask.fetch_and(!self.bit, Ordering::Relaxed);
        }
    }

    fn publish(&mut self) {
        self.dirty = false;
        for c in 0..self.classes.len() {
            self.sample(c);
            let sh = &*self.shared;
            let lc = &mut self.classes[c];
            let total = sh.classes[c].total_bufs.load(Ordering::Relaxed);
            sh.classes[c]
                .high_water
                .fetch_max(lc.peak_in_use.min(total), Ordering::Relaxed);
            lc.peak_in_use = 0;
            let put = |f, v| sh.stat(self.core, c, f).store(v, Ordering::Relaxed);
            put(S_ALLOCS, lc.stats.allocs);
            put(S_FREES, lc.stats.frees);
            put(S_FAILED, lc.stats.alloc_failed);
            put(S_WAITS, lc.stats.waits);
            put(S_GRANTED, lc.stats.granted);
            put(S_WAITING, lc.waiters.len() as u64);
            put(S_LOCAL_FREE, lc.free.len() as u64);
            put(S_HIGH, lc.stats.high_water);
        }
    }
}

impl Drop for CoreCache {
    fn drop(&mut self) {
        for c in 0..self.classes.len() {
            self.classes[c].waiters.clear();
            self.set_hungry(c, false);
        }
        self.waiting = 0;
        self.flush();
        self.shared.core_taken[self.core].store(false, Ordering::Release);
    }
}

const _: () = assert!(MAX_CORES <= u64::BITS as usize);
const _: () = assert!(MAX_ARENAS <= u16::MAX as usize + 1);

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
