//! The engine: one reactor thread per core, each owning its sockets, its
//! iSCSI connections and the SCSI targets whose home it is, and moving work
//! between them without locks on the I/O path.
//!
//! A reactor's loop: drain its inbox (messages from other cores) -> wait
//! for socket readiness (mio) -> read bytes -> decode PDUs ->
//! `iscsi::conn::Connection` -> SCSI tasks -> `scsi::Target` -> completions
//! -> back into the connection -> wire bytes -> socket.
//!
//! Placement. Core 0 holds the listeners and runs every login (rare and
//! cheap). When a normal session reaches full feature phase its connection
//! is handed, socket and protocol state together, to the least-loaded core
//! (ties go to the home core of the session's target) and stays there.
//!
//! Shared state. Each SCSI target (its LUNs: reservations, unit
//! attentions, COMPARE AND WRITE range locks, EXTENDED COPY between its
//! LUNs) lives on one home core, assigned round-robin. A connection on the
//! home core submits directly; one elsewhere sends the task through the
//! home core's inbox (buffers move, nothing is copied) and gets the
//! completion back the same way. Every piece of SCSI state therefore has
//! one owner and needs no lock. The session table (TSIH allocation,
//! reinstatement, the session limit) is touched only at login and logout
//! and sits behind a mutex that no I/O takes.
//!
//! Inboxes are bounded lock-free queues (`ArrayQueue`); a full inbox makes
//! the sender keep the message in a local overflow queue and retry, never
//! drop it. A reactor about to sleep announces it (`parked`) and senders
//! wake it through its `mio::Waker` only then, so cores that are spinning
//! are not sent system calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{BufferSg, PollMode};
use crossbeam_queue::ArrayQueue;
use iscsi::conn::{BufferSource, CloseReason, ConnConfig, Connection, Event, RdmaTags, TxSink};
use iscsi::idhash::BuildIdHasher;
use iscsi::login::{ChapConfig, LoginContext, LoginStatus, SessionRequest};
use iscsi::params::{SessionType, TargetLimits};
use iscsi::textreq::{TargetRecord, TextContext};
use mempool::{BufPool, CoreCache, DataBuf, Pool, PoolConfig};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::RngCore;
use rdma::{CmEventKind, Completion, WcStatus};
use scsi::{Nexus, NexusId, ScsiCompletion, ScsiTask, TaskAttr};
use transport_tcp::{Fill, TcpConn, TX_BACKLOG_MAX_BYTES};

use crate::guard::LoginGuard;
use crate::iser::{IserDevice, IserLink, IserPortals, Op, PendingRead};

mod login_gate;

/// One exported iSCSI target: its name, access rules and SCSI device.
pub struct ExportedTarget {
    pub name: String,
    /// Initiator names allowed; empty means anyone.
    pub allow: Vec<String>,
    pub chap: ChapConfig,
    pub device: scsi::Target,
}

/// A listening portal.
#[derive(Debug, Clone)]
pub struct Portal {
    pub addr: SocketAddr,
    pub tpgt: u16,
}

/// Engine-wide settings.
#[derive(Clone)]
pub struct EngineConfig {
    pub limits: TargetLimits,
    pub nop_interval_ms: u64,
    pub nop_timeout_ms: u64,
    pub max_sessions: usize,
    /// Connections accepted but not yet logged in, at most.
    pub max_login_connections: usize,
    pub discovery_chap: ChapConfig,
    pub poll: PollMode,
    /// Adaptive polling's pause between batches of small commands
    /// (`COALESCE_PROBE_EVERY`); zero: never.
    pub poll_coalesce: Duration,
    /// Bytes of the command data pool (`DATA_POOL_BYTES` by default).
    pub data_pool_bytes: usize,
    /// When READ and WRITE data may span smaller buffers.
    pub buffer_sg: BufferSg,
    /// One reactor per entry, pinned to that CPU when `pin` is set.
    pub cores: Vec<usize>,
    pub pin: bool,
    /// Where to write the counters as JSON every second.
    pub stats_file: Option<std::path::PathBuf>,
    /// iSER portals (RDMA CM listeners on reactor 0). Without an RDMA
    /// device they are skipped with one log line.
    pub iser_portals: Vec<Portal>,
    /// A debugging aid for the no-allocation check: once a reactor is in
    /// steady state (commands completing, no connection arriving, logging
    /// in or leaving for a tick), print a backtrace for each of its next
    /// this many heap allocations. 0: off.
    pub trace_allocs: u32,
}

/// One reactor's counters. Plain integers: only the reactor's own thread
/// writes them; it copies them into `Shared::published` once per tick for
/// the stats writer (and, later, the control plane) to read.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CoreStats {
    pub reactor: usize,
    /// The CPU the reactor is pinned to.
    pub cpu: Option<usize>,
    /// Connections served by this reactor now (logging in or placed).
    pub connections: u64,
    pub pdus_rx: u64,
    /// SCSI commands from this reactor's connections.
    pub commands: u64,
    /// Of those, sent to another reactor that owns the target.
    pub commands_forwarded: u64,
    /// Commands executed here for connections on other reactors.
    pub commands_served_remote: u64,
    /// Completions given to this reactor's connections.
    pub completions: u64,
    pub data_in_bytes: u64,
    pub data_out_bytes: u64,
    /// TCP write data (immediate and Data-Out) read by the socket
    /// straight into its command's buffer, and copied there from the
    /// receive ring (PDUs with little data, which one read brings many
    /// of; see `transport_tcp::direct`).
    pub rx_data_direct_bytes: u64,
    pub rx_data_copied_bytes: u64,
    /// Receive rings given back by connections idle for a tick.
    pub rx_rings_released: u64,
    /// Messages taken from this reactor's inbox.
    pub messages_in: u64,
    /// Wake-ups sent to parked reactors.
    pub wakeups_sent: u64,
    /// Loop iterations, and the time spent in those that found work.
    pub loops: u64,
    pub busy_ns: u64,
    /// Heap allocations made by this reactor's thread since it started
    /// (the I/O path's should stay flat under load).
    pub heap_allocs: u64,
    /// Command data buffers that came from the heap instead of the
    /// hugepage pool (a transfer above the largest class, or the class
    /// exhausted on this core).
    pub data_pool_misses: u64,
    /// Commands that waited for a data buffer (their class exhausted).
    pub data_pool_waits: u64,
    /// Commands whose data spans several smaller pool buffers (a
    /// scatter-gather buffer, `--buffer-sg`).
    pub data_pool_sg: u64,
    /// Of the commands that waited, those granted pieces of a smaller
    /// class that came free before a buffer of their own class did.
    pub data_pool_waits_in_pieces: u64,
    /// Pauses before a poll to let commands gather (receive coalescing,
    /// `--poll-coalesce-us`).
    pub coalesce_pauses: u64,
    /// iSER connections served by this reactor now.
    pub iser_connections: u64,
    /// Memory registrations (ibv_reg_mr) of the iSER device's protection
    /// domain: at device setup (each pool arena once, plus the send and
    /// receive slabs), and since then (stays zero: nothing is registered
    /// on the I/O path).
    pub rdma_registrations_at_setup: u64,
    pub rdma_registrations_since_setup: u64,
    pub iser_sends: u64,
    pub iser_recvs: u64,
    pub iser_rdma_writes: u64,
    pub iser_rdma_reads: u64,
    pub iser_rdma_write_bytes: u64,
    pub iser_rdma_read_bytes: u64,
    /// Read data copied into a registered pool buffer because the device
    /// server returned it in a heap buffer.
    pub iser_bounce_copies: u64,
    pub iser_send_invalidates: u64,
    pub iser_responses_without_invalidate: u64,
    pub iser_completion_errors: u64,
    /// Completions of this reactor's connections, counted as their LUN
    /// counted them (kind, bytes, errors, latency).
    #[serde(skip)]
    pub io: scsi::IoCounters,
}

/// One LUN's counters, published by its home reactor.
#[derive(Debug, Clone)]
struct LunStats {
    target: usize,
    lun: u64,
    io: scsi::IoCounters,
}

const SIGNAL_TOKEN: Token = Token(usize::MAX - 1);
const WAKER_TOKEN: Token = Token(usize::MAX - 2);
/// Backstores with their own completion queue (io_uring) signal an
/// eventfd; its readiness only wakes the reactor, which polls its devices
/// on every loop iteration anyway.
const COMPLETION_TOKEN: Token = Token(usize::MAX - 3);
/// Reactor 0: the iSER RDMA CM event channel and the device's CQ channel.
const ISER_CM_TOKEN: Token = Token(usize::MAX - 4);
const ISER_CQ_TOKEN: Token = Token(usize::MAX - 5);
/// Listener tokens are 0..portals; connection tokens start here.
const CONN_TOKEN_BASE: usize = 1 << 20;
const TICK: Duration = Duration::from_millis(500);
/// Adaptive polling spins this long after the last work it saw: longer
/// than a wake-up from epoll costs here (docs/engine.md, "Polling").
const POLL_IDLE_BUDGET: Duration = Duration::from_micros(250);
/// Adaptive polling spins only while commands come one at a time: every
/// `SPIN_PROBE_EVERY` it blocks for `SPIN_PROBE_FOR` and counts commands
/// per wake-up (docs/engine.md, "Polling").
const SPIN_PROBE_EVERY: Duration = Duration::from_millis(200);
const SPIN_PROBE_FOR: Duration = Duration::from_millis(20);
/// Four times the average commands per wake-up below which spinning pays
/// (1.25: an initiator at queue depth 1 brings exactly one).
const SPIN_BATCH_MIN_X4: u64 = 5;
/// Receive coalescing (`--poll-coalesce-us`): pausing between batches lets
/// commands gather so one `recv` and one `writev` serve many; whether it
/// pays is measured every `COALESCE_PROBE_EVERY` by a `COALESCE_PROBE_FOR`
/// run the other way, backing off to `COALESCE_PROBE_EVERY_MAX` on a
/// steady load (docs/engine.md, "Receive coalescing", has the figures).
const COALESCE_PROBE_EVERY: Duration = Duration::from_millis(500);
const COALESCE_PROBE_EVERY_MAX: Duration = Duration::from_secs(4);
const COALESCE_PROBE_FOR: Duration = Duration::from_millis(20);
/// Pausing must save at least a tenth of the CPU per command...
const COALESCE_CPU_GAIN_PCT: u64 = 90;
/// ...and keep four fifths of the commands per second.
const COALESCE_RATE_LOSS_PCT: u64 = 80;
/// A window with fewer commands decides nothing.
const COALESCE_WINDOW_CMDS_MIN: u64 = 64;
/// Only a loop iteration that handled this many commands, from socket
/// reads, is followed by a pause: a lone command (queue depth 1) is
/// answered at once, and iSER has no reads to gather.
const COALESCE_BATCH_MIN: u64 = 2;
/// Messages one inbox holds. Bounds the memory of a core's inbox; more
/// than this in flight towards one core waits in the sender's overflow.
const INBOX_CAPACITY: usize = 16 * 1024;
/// Messages handled per loop iteration, so a flood from other cores does
/// not starve this core's own sockets.
const INBOX_BATCH_MAX: usize = 1024;
/// Reactors at most (the tag keeps the core in 8 bits).
pub const CORES_MAX: usize = 256;
/// Connection ids are 24 bits in a task tag.
const LOCAL_ID_MASK: u32 = (1 << 24) - 1;
/// Each reactor's buffer cache: enough buffers per size class for every
/// command of a few full-depth sessions, and a byte cap so that a burst of
/// large commands does not keep its memory forever.
const BUF_POOL_PER_CLASS_MAX: usize = 1024;
const BUF_POOL_CACHED_BYTES_MAX: usize = 256 << 20;
/// The data buffer pool (hugepage arenas shared by all reactors): bytes
/// mapped at start-up by default (`--buffer-pool-mib`), and the largest
/// buffer class. A command whose class is exhausted waits for a buffer
/// (`BufWait`); commands above the largest class use heap buffers
/// (counted as `data_pool_misses`).
pub const DATA_POOL_BYTES: usize = 256 << 20;
const DATA_POOL_CLASS_MAX: usize = 16 << 20;
/// Commands a reactor holds waiting for a data buffer, at most (beyond
/// it, and beyond the pool's own wait queue, a heap buffer serves).
const BUF_WAITS_MAX: usize = 4096;
/// PDUs a connection keeps behind a held write command (`ConnEntry::
/// stash`): enough for a default command window (128) and the
/// unsolicited Data-Outs of the held command; a fuller stash pauses
/// reading.
const STASH_MAX: usize = 512;
/// Heap buffers per size class (4 KiB up to MaxRecvDataSegmentLength)
/// each reactor's cache holds from start-up, for the data of PDUs stashed
/// behind a held write (at the default 256 KiB segment, 32 commands'
/// immediate data): so that overload, when commands wait for pool
/// buffers, does not make the I/O path allocate. A deeper stash still
/// allocates rather than stop reading, which could leave the Data-Outs
/// that would free buffers unread behind it. Address space only until
/// used (16 MiB per reactor at the default segment).
const STASH_WARM_PER_CLASS: usize = 32;
/// A connection's pending output is handed to the socket layer in pieces
/// of about this size (below transport_tcp's reuse cap of 4 MiB, with
/// room for one more 1 MiB response).
const TX_CHUNK_BYTES: usize = 2 << 20;
/// How long shutdown waits for commands already in the device servers.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A task's tag names the core and connection that wait for its
/// completion, and the task within the connection.
fn task_tag(core: usize, local: u32, task: u32) -> u64 {
    debug_assert!(core < CORES_MAX && local <= LOCAL_ID_MASK);
    (core as u64) << 56 | (local as u64) << 32 | task as u64
}

fn tag_core(tag: u64) -> usize {
    (tag >> 56) as usize
}

fn tag_local(tag: u64) -> u32 {
    (tag >> 32) as u32 & LOCAL_ID_MASK
}

/// What crosses between reactors.
enum Msg {
    /// A connection placed on this core: register its socket and serve it.
    Adopt(Box<ConnEntry>),
    /// This core's part of an RDMA device set up at a first connect
    /// request (sent before any connection placed here).
    IserDevice(Box<IserDevice>),
    /// An iSER connect request placed on this core (with its portal
    /// index): its queue pair goes on this core's CQ and SRQ, its CM id
    /// on this core's event channel, and it stays here.
    IserConnect(Box<(rdma::ConnectRequest, usize)>),
    /// Reactor 0 saw the RDMA device removed: release this core's part.
    IserDeviceGone,
    /// Execute a task on a target whose home is this core.
    Submit {
        target: usize,
        lun: u64,
        task: ScsiTask,
    },
    /// A task's completion, back to the core of its connection.
    Complete(ScsiCompletion),
    Abort {
        target: usize,
        lun: u64,
        nexus: NexusId,
        tag: u64,
    },
    /// LOGICAL UNIT RESET; answered with `TmfDone` to `reply` (a tag).
    LunReset {
        target: usize,
        lun: u64,
        nexus: NexusId,
        reply: u64,
    },
    TargetReset {
        target: usize,
        nexus: NexusId,
        cold: bool,
        reply: u64,
    },
    TmfDone {
        reply: u64,
        response: u8,
        cold: bool,
    },
    NexusAdded {
        target: usize,
        nexus: Nexus,
    },
    NexusRemoved {
        target: usize,
        nexus: NexusId,
    },
    /// Close the connection with this global id, wherever it lives
    /// (session reinstatement, cold reset).
    Kill(u64),
    Shutdown,
}

/// A reactor's mailbox, as other reactors see it.
struct CoreLink {
    inbox: ArrayQueue<Msg>,
    waker: Waker,
    /// Set while the reactor waits in `epoll_wait`: only then do senders
    /// pay for a wake-up.
    parked: AtomicBool,
    /// Full-feature connections placed on this core.
    load: AtomicUsize,
}

struct TargetMeta {
    name: String,
    allow: Vec<String>,
    chap: ChapConfig,
    /// The reactor that owns this target's device server.
    home: usize,
    /// Each LUN's number, block size and MAXIMUM TRANSFER LENGTH in
    /// blocks: what sizing a command's scratch buffer takes
    /// (`scsi::scratch_len`); and whether its backstore wants data buffers
    /// aligned in memory (write data lent from a receive ring is not).
    luns: Vec<(u64, u32, u32, bool)>,
}

struct Session {
    tsih: u16,
    initiator_name: String,
    isid: u64,
    target: usize,
    session_type: SessionType,
    /// Global id of the connection currently carrying the session.
    conn: u64,
    cid: u16,
    nexus: Option<NexusId>,
}

struct SessionTable {
    map: HashMap<u16, Session>,
    next_tsih: u16,
    next_nexus: u64,
}

impl SessionTable {
    fn alloc_tsih(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let t = self.next_tsih;
            self.next_tsih = self.next_tsih.wrapping_add(1).max(1);
            if !self.map.contains_key(&t) {
                return Some(t);
            }
        }
        None
    }
}

/// What every reactor reads; only `sessions` changes, and only at login
/// and logout.
struct Shared {
    cfg: EngineConfig,
    targets: Vec<TargetMeta>,
    portals: Vec<Portal>,
    /// The addresses actually bound (port 0 resolved), for SendTargets.
    portal_addrs: Vec<SocketAddr>,
    sessions: Mutex<SessionTable>,
    cores: Vec<CoreLink>,
    next_conn: AtomicU64,
    /// Reactors that have stopped reading sockets at shutdown.
    stopping: AtomicUsize,
    /// Each reactor's last published counters (written once per tick).
    published: Vec<Mutex<CoreStats>>,
    /// Each reactor's LUNs' counters, one entry per LUN it owns, sized at
    /// start-up so that publishing overwrites in place.
    published_luns: Vec<Mutex<Vec<LunStats>>>,
    /// Set when every reactor has returned, to end the stats writer.
    finished: AtomicBool,
    /// The command data pool (for its counters; reactors hold caches).
    data_pool: Pool,
    /// Failed logins per peer address and initiator name (`guard`);
    /// touched only at login, like `sessions`.
    guard: Mutex<LoginGuard>,
}

impl Shared {
    fn sessions(&self) -> MutexGuard<'_, SessionTable> {
        lock(&self.sessions)
    }
}

impl ConnEntry {
    /// Reading pauses while a held command's stash is full.
    fn stash_full(&self) -> bool {
        self.held.is_some() && self.stash.len() >= STASH_MAX
    }

    /// Whether a PDU behind the held command may run before it: only a
    /// Data-Out whose command the core already has, not the held one nor
    /// one in the stash (`stashed_before`: how many of the stash's
    /// entries, from the back, came before this PDU).
    fn data_out_may_pass(&self, bhs: &iscsi::Bhs, stashed_before: usize) -> bool {
        use iscsi::pdu::opcode;
        if bhs.opcode() != opcode::DATA_OUT {
            return false;
        }
        let itt = bhs.itt();
        let held = self.held.as_ref().is_some_and(|(h, _)| h.bhs.itt() == itt);
        let skip = self.stash.len() - stashed_before;
        !held
            && !self
                .stash
                .iter()
                .skip(skip)
                .any(|(p, _)| p.bhs.opcode() == opcode::SCSI_CMD && p.bhs.itt() == itt)
    }
}

/// How a connection's bytes move.
enum Link {
    Tcp(Box<TcpConn>),
    Iser(Box<IserLink>),
}

struct ConnEntry {
    // First, so dropped first: an iSER queue pair is destroyed before the
    // protocol's task buffers it may still point at.
    link: Link,
    proto: Connection,
    portal: usize,
    /// Unique for the process lifetime; names the connection in the
    /// session table and in `Msg::Kill`.
    global: u64,
    /// Session this connection belongs to, once login instated it.
    tsih: Option<u16>,
    /// The session's target and I_T nexus, cached at full feature phase
    /// so the I/O path never looks at the session table.
    session: Option<(usize, NexusId)>,
    /// Stopped reading because too much output is queued.
    read_paused: bool,
    /// A write command held until the data pool grants its buffer
    /// (`BufWait::Write`), and the PDUs that came after it, in order.
    /// Data-Outs for other tasks still go through at once: those tasks
    /// hold buffers that only their data frees, and a hold that stopped
    /// them could wait for ever. At most `STASH_MAX`; when full, the
    /// connection reads nothing more until the hold ends.
    held: Option<(iscsi::Pdu, RdmaTags)>,
    stash: VecDeque<(iscsi::Pdu, RdmaTags)>,
    closing: bool,
    /// Counted in its core's `load`.
    placed: bool,
    /// The peer's address, for the failed-login accounting and the per-peer
    /// share of the login slots.
    peer: Option<IpAddr>,
    /// Where the first Login Request is with the failed-login throttle.
    gate: Gate,
    /// The login attempt the throttle admitted, with the InitiatorName it
    /// was admitted under, until it succeeds, fails or the connection
    /// goes (`LoginGuard::succeeded`, `failed`, `ended`).
    attempt: Option<Attempt>,
}

struct Attempt {
    name: Option<String>,
}

/// A connection's first Login Request and the failed-login throttle
/// (`guard::LoginGuard::admit`).
enum Gate {
    /// Not seen yet.
    Unchecked,
    /// Admitted (or past login).
    Passed,
    /// Held until its time comes (`Reactor::held_logins`); the connection
    /// reads nothing meanwhile.
    Held(Box<(iscsi::Pdu, RdmaTags)>),
}

/// The whole target: built on the main thread, then `run` starts one
/// reactor per configured core.
pub struct Engine {
    sh: Arc<Shared>,
    reactors: Vec<Reactor>,
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        targets: Vec<ExportedTarget>,
        portals: Vec<Portal>,
    ) -> io::Result<Engine> {
        let n = cfg.cores.len().max(1);
        if n > CORES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {CORES_MAX} reactor cores"),
            ));
        }
        let mut polls = Vec::with_capacity(n);
        let mut links = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Poll::new()?;
            let waker = Waker::new(poll.registry(), WAKER_TOKEN)?;
            links.push(CoreLink {
                inbox: ArrayQueue::new(INBOX_CAPACITY),
                waker,
                parked: AtomicBool::new(false),
                load: AtomicUsize::new(0),
            });
            polls.push(poll);
        }
        let mut listeners = Vec::new();
        let mut portal_addrs = Vec::new();
        for (i, p) in portals.iter().enumerate() {
            let mut l = TcpListener::bind(p.addr).map_err(|e| {
                io::Error::new(e.kind(), format!("portal {}: cannot listen: {e}", p.addr))
            })?;
            polls[0]
                .registry()
                .register(&mut l, Token(i), Interest::READABLE)?;
            portal_addrs.push(l.local_addr().unwrap_or(p.addr));
            listeners.push(l);
        }
        let mut metas = Vec::with_capacity(targets.len());
        let mut devices: Vec<Vec<Option<scsi::Target>>> = (0..n).map(|_| Vec::new()).collect();
        for d in devices.iter_mut() {
            d.resize_with(targets.len(), || None);
        }
        for (i, t) in targets.into_iter().enumerate() {
            let home = i % n;
            let luns = t
                .device
                .luns()
                .iter()
                .map(|l| {
                    let i = l.info();
                    let aligned = l.wants_aligned_buffers();
                    (i.lun, i.block_size, i.max_transfer_blocks, aligned)
                })
                .collect();
            metas.push(TargetMeta {
                name: t.name,
                allow: t.allow,
                chap: t.chap,
                home,
                luns,
            });
            devices[home][i] = Some(t.device);
        }
        let published_luns = devices
            .iter()
            .map(|ds| {
                let mut v = Vec::new();
                for (target, d) in ds.iter().enumerate() {
                    if let Some(d) = d {
                        for (lun, io) in d.lun_stats() {
                            v.push(LunStats {
                                target,
                                lun,
                                io: *io,
                            });
                        }
                    }
                }
                Mutex::new(v)
            })
            .collect();
        // One pool for every reactor: buffers move with completions from
        // core to core and go back to whichever core frees them.
        let data_pool = Pool::new(PoolConfig {
            arena_bytes: cfg.data_pool_bytes,
            arena_limit_bytes: cfg.data_pool_bytes,
            classes: PoolConfig::classes_for_burst(DATA_POOL_CLASS_MAX),
            cores: n,
            ..PoolConfig::default()
        })
        .map_err(io::Error::other)?;
        let mut iser = open_iser(&cfg, &portals, &polls, &data_pool);
        let sh = Arc::new(Shared {
            data_pool: data_pool.clone(),
            published_luns,
            cfg,
            targets: metas,
            portals,
            portal_addrs,
            sessions: Mutex::new(SessionTable {
                map: HashMap::new(),
                next_tsih: 1,
                next_nexus: 1,
            }),
            cores: links,
            next_conn: AtomicU64::new(1),
            stopping: AtomicUsize::new(0),
            published: (0..n).map(|_| Mutex::new(CoreStats::default())).collect(),
            finished: AtomicBool::new(false),
            guard: Mutex::new(LoginGuard::default()),
        });
        for (poll, ds) in polls.iter().zip(&devices) {
            for d in ds.iter().flatten() {
                for l in d.luns() {
                    if let Some(fd) = l.completion_fd() {
                        use std::os::fd::AsRawFd;
                        poll.registry().register(
                            &mut mio::unix::SourceFd(&fd.as_raw_fd()),
                            COMPLETION_TOKEN,
                            Interest::READABLE,
                        )?;
                    }
                }
            }
        }
        let started = Instant::now();
        let mut reactors = Vec::with_capacity(n);
        for (me, (poll, devices)) in polls.into_iter().zip(devices).enumerate() {
            reactors.push(Reactor {
                me,
                sh: sh.clone(),
                poll,
                listeners: if me == 0 {
                    std::mem::take(&mut listeners)
                } else {
                    Vec::new()
                },
                conns: HashMap::with_hasher(BuildIdHasher),
                iser: iser.get_mut(me).and_then(Option::take),
                next_local: 0,
                devices,
                pool: Buffers {
                    heap: {
                        let mut h = BufPool::new(BUF_POOL_PER_CLASS_MAX, BUF_POOL_CACHED_BYTES_MAX);
                        h.prewarm(
                            sh.cfg.limits.max_recv_data_segment_length as usize,
                            STASH_WARM_PER_CLASS,
                        );
                        h
                    },
                    data: data_pool.core_cache(me).map_err(io::Error::other)?,
                    data_misses: 0,
                    reserved: None,
                },
                buf_waits: HashMap::with_capacity_and_hasher(BUF_WAITS_MAX, BuildIdHasher),
                completions: Vec::with_capacity(1024),
                touched: Vec::with_capacity(1024),
                reap_needed: false,
                kills: Vec::new(),
                ended: Vec::new(),
                outbox: (0..n).map(|_| VecDeque::new()).collect(),
                wake: vec![false; n],
                started,
                scratch: Vec::new(),
                reaped: Vec::new(),
                stopping: false,
                trace_mark: (0, 0),
                trace_armed: false,
                spin: SpinPolicy::new(started),
                coalesce_due: false,
                iter_read: false,
                coalesce_policy: CoalescePolicy::new(started),
                held_logins: BinaryHeap::new(),
                share_warned: None,
                share_refusals: 0,
                stats: CoreStats {
                    reactor: me,
                    cpu: sh.cfg.pin.then(|| sh.cfg.cores.get(me).copied()).flatten(),
                    ..CoreStats::default()
                },
            });
        }
        Ok(Engine { sh, reactors })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sh.portal_addrs.clone()
    }

    /// Serve until SIGINT or SIGTERM, then finish in-flight commands, flush
    /// the backstores and return. Reactor 0 runs on the calling thread.
    pub fn run(self) -> io::Result<()> {
        let mut reactors = self.reactors.into_iter();
        let mut first = reactors.next().expect("at least one reactor");
        let mut handles = Vec::new();
        for r in reactors {
            let name = format!("reactor-{}", r.me);
            handles.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || r.run_pinned())?,
            );
        }
        let signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        let writer = self.sh.cfg.stats_file.clone().map(|path| {
            let sh = self.sh.clone();
            std::thread::Builder::new()
                .name("stats".into())
                .spawn(move || stats_writer(&sh, &path))
        });
        let mut result = first.run_with_signals(signals);
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    result = result.and(Err(e));
                }
                Err(_) => {
                    result = result.and(Err(io::Error::other("a reactor thread panicked")));
                }
            }
        }
        self.sh.finished.store(true, Ordering::SeqCst);
        if let Some(Ok(w)) = writer {
            let _ = w.join();
        }
        for p in &self.sh.published {
            let s = lock(p).clone();
            tracing::info!(
                reactor = s.reactor,
                commands = s.commands,
                forwarded = s.commands_forwarded,
                served_remote = s.commands_served_remote,
                busy_ms = s.busy_ns / 1_000_000,
                heap_allocs = s.heap_allocs,
                data_pool_misses = s.data_pool_misses,
                "reactor counters"
            );
        }
        tracing::info!("stopped");
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain counters or tables changed by single
    // inserts and removes; a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_json(io: &scsi::IoCounters) -> serde_json::Value {
    let h = &io.latency;
    serde_json::json!({
        "reads": io.reads,
        "writes": io.writes,
        "other": io.other,
        "read_bytes": io.read_bytes,
        "write_bytes": io.write_bytes,
        "errors": io.errors,
        "aborted": io.aborted,
        "durable_writes": io.durable_writes,
        "flushes": io.flushes,
        "latency_us_mean": h.mean_us(),
        "latency_us_p50": h.percentile(50.0),
        "latency_us_p99": h.percentile(99.0),
        "latency_us_p999": h.percentile(99.9),
        "latency_us_max": h.max_us(),
        "latency_us_buckets": h.buckets().filter(|&(_, n)| n > 0).collect::<Vec<_>>(),
    })
}

/// The counters as one JSON document: per reactor (with its connections'
/// I/O) and per LUN (kept by the LUN's home reactor).
fn stats_json(sh: &Shared) -> String {
    let cores: Vec<serde_json::Value> = sh
        .published
        .iter()
        .map(|p| {
            let c = lock(p).clone();
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            v["io"] = io_json(&c.io);
            v
        })
        .collect();
    let mut luns = Vec::new();
    for p in &sh.published_luns {
        for l in lock(p).iter() {
            luns.push(serde_json::json!({
                "target": sh.targets[l.target].name,
                "lun": l.lun,
                "io": io_json(&l.io),
            }));
        }
    }
    let pool: Vec<serde_json::Value> = sh
        .data_pool
        .stats()
        .iter()
        .map(|c| {
            serde_json::json!({
                "buf_bytes": c.buf_bytes,
                "total_bufs": c.total_bufs,
                "free_bufs": c.free_bufs,
                "in_use": c.in_use,
                "in_use_high_water": c.in_use_high_water,
                "allocs": c.allocs,
                "frees": c.frees,
                "alloc_failed": c.alloc_failed,
                "waits": c.waits,
            })
        })
        .collect();
    let guard = serde_json::to_value(lock(&sh.guard).stats()).unwrap_or_default();
    let doc = serde_json::json!({
        "version": 1,
        "reactors": cores,
        "luns": luns,
        "data_pool": pool,
        "login_guard": guard,
    });
    doc.to_string()
}

/// Rewrite the stats file every second until the engine stops, and once
/// more at the end. Runs on its own thread: file I/O stays off reactors.
fn stats_writer(sh: &Shared, path: &std::path::Path) {
    let write = || {
        let text = stats_json(sh);
        if let Err(e) = scsi::persist::write_atomic(path, text.as_bytes()) {
            tracing::warn!(path = %path.display(), "cannot write the stats file: {e}");
        }
    };
    while !sh.finished.load(Ordering::SeqCst) {
        write();
        for _ in 0..10 {
            if sh.finished.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    write();
}

/// Opens the iSER side of every reactor: reactor 0's event channel holds
/// the listeners, the others' take the connections placed on them. When a
/// listener is bound to a device's address, the device (a CQ and SRQ per
/// core) is set up now; otherwise at the first connect request. Never
/// fails: without RDMA (no device, no rdma_cm) one line says so and TCP
/// goes on.
fn open_iser(
    cfg: &EngineConfig,
    portals: &[Portal],
    polls: &[Poll],
    pool: &Pool,
) -> Vec<Option<Box<IserPortals>>> {
    let mut out: Vec<Option<Box<IserPortals>>> = polls.iter().map(|_| None).collect();
    if cfg.iser_portals.is_empty() {
        return out;
    }
    let addrs: Vec<(SocketAddr, usize)> = cfg
        .iser_portals
        .iter()
        .map(|p| {
            let tcp = portals.iter().position(|t| t.tpgt == p.tpgt).unwrap_or(0);
            (p.addr, tcp)
        })
        .collect();
    let not_served = |e: &str| {
        let list: Vec<String> = addrs.iter().map(|a| a.0.to_string()).collect();
        tracing::warn!(
            "iSER portal(s) {} not served: {e}; serving TCP only",
            list.join(", ")
        );
    };
    let mut sides = Vec::with_capacity(polls.len());
    match IserPortals::open(&addrs) {
        Ok(ip) => sides.push(ip),
        Err(e) => {
            not_served(&e);
            return out;
        }
    }
    for _ in 1..polls.len() {
        match IserPortals::for_core() {
            Ok(ip) => sides.push(ip),
            Err(e) => {
                not_served(&e);
                return out;
            }
        }
    }
    use std::os::fd::AsRawFd;
    for (ip, poll) in sides.iter().zip(polls) {
        let fd = ip.cm.as_raw_fd();
        if let Err(e) = poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            ISER_CM_TOKEN,
            Interest::READABLE,
        ) {
            not_served(&format!("cannot poll an RDMA CM channel: {e}"));
            return out;
        }
    }
    if let Some(ctx) = sides[0].listener_context() {
        match IserDevice::open_all(ctx, pool, polls.len()) {
            Ok(devs) => {
                for ((ip, poll), d) in sides.iter_mut().zip(polls).zip(devs) {
                    poll_cq(poll.registry(), &d);
                    ip.dev = Some(d);
                }
            }
            Err(e) => tracing::warn!("iSER device setup failed: {e}"),
        }
    }
    for (slot, ip) in out.iter_mut().zip(sides) {
        *slot = Some(Box::new(ip));
    }
    out
}

/// Puts a core's CQ completion channel in its reactor's poller.
fn poll_cq(registry: &mio::Registry, d: &IserDevice) {
    if let Some(fd) = d.cq.event_fd() {
        if let Err(e) = registry.register(
            &mut mio::unix::SourceFd(&fd),
            ISER_CQ_TOKEN,
            Interest::READABLE,
        ) {
            tracing::warn!("iSER: cannot poll a CQ's completion channel: {e}");
        }
    }
}

struct Reactor {
    me: usize,
    sh: Arc<Shared>,
    poll: Poll,
    /// Only reactor 0 listens.
    listeners: Vec<TcpListener>,
    conns: HashMap<u32, ConnEntry, BuildIdHasher>,
    /// This core's iSER side (reactor 0's holds the listeners): its CM
    /// channel, CQ, SRQ and slabs, for the connections placed here.
    iser: Option<Box<IserPortals>>,
    next_local: u32,
    /// Indexed by target; `Some` for targets whose home is this core.
    devices: Vec<Option<scsi::Target>>,
    pool: Buffers,
    /// Commands waiting for a data buffer, by the token the pool grants
    /// them with (at most `BUF_WAITS_MAX`).
    buf_waits: HashMap<u64, BufWait, BuildIdHasher>,
    completions: Vec<ScsiCompletion>,
    /// Connections that got completions in one round (reused buffer).
    touched: Vec<u32>,
    /// Some connection is closing: `reap` has work.
    reap_needed: bool,
    /// Global ids of connections to close, found during a login.
    kills: Vec<u64>,
    /// Nexuses of sessions ended during a login (reinstatement).
    ended: Vec<(usize, NexusId)>,
    /// Messages a full inbox refused, per destination core, oldest first.
    outbox: Vec<VecDeque<Msg>>,
    /// Destinations sent something since the last wake-up pass.
    wake: Vec<bool>,
    started: Instant,
    /// Reused list of connection ids for the periodic tick.
    scratch: Vec<u32>,
    /// Reused list of connections `reap` removes; separate from `scratch`
    /// because `reap` runs inside the tick's walk over `scratch`.
    reaped: Vec<u32>,
    stopping: bool,
    stats: CoreStats,
    /// `EngineConfig::trace_allocs`: connections and commands at the last
    /// tick, and whether tracing is armed.
    trace_mark: (usize, u64),
    trace_armed: bool,
    spin: SpinPolicy,
    /// Whether the next poll waits `EngineConfig::poll_coalesce` first,
    /// and whether a socket read brought data this iteration.
    coalesce_due: bool,
    iter_read: bool,
    coalesce_policy: CoalescePolicy,
    /// First Login Requests held back by the failed-login throttle, by the
    /// time they may go on (at most `HELD_LOGINS_MAX`).
    held_logins: BinaryHeap<Reverse<(Instant, u32)>>,
    /// When the last "share of login slots" warning was logged, and the
    /// connections refused since.
    share_warned: Option<Instant>,
    share_refusals: u64,
}

/// Whether adaptive polling spins (see `SPIN_PROBE_EVERY`).
struct SpinPolicy {
    spin: bool,
    /// While blocking: when the current measurement window ends.
    window_end: Instant,
    /// While spinning: when the next probe (a blocking window) starts.
    next_probe: Instant,
    /// Wake-ups from a blocking poll that brought commands, and the
    /// commands they brought, in this window.
    wakes: u64,
    commands: u64,
}

impl SpinPolicy {
    fn new(now: Instant) -> SpinPolicy {
        SpinPolicy {
            spin: true,
            window_end: now,
            next_probe: now + SPIN_PROBE_EVERY,
            wakes: 0,
            commands: 0,
        }
    }

    /// After a loop iteration: `blocked` if its poll could sleep, and the
    /// commands it handled.
    fn observe(&mut self, now: Instant, blocked: bool, commands: u64) {
        if self.spin {
            if now >= self.next_probe {
                self.spin = false;
                self.window_end = now + SPIN_PROBE_FOR;
                self.wakes = 0;
                self.commands = 0;
            }
            return;
        }
        if blocked && commands > 0 {
            self.wakes += 1;
            self.commands += commands;
        }
        if now >= self.window_end {
            // Commands arriving one per wake-up: spinning catches them
            // sooner and for less CPU than a sleep and wake-up each. No
            // command at all: idle, and sleeping is right.
            if self.wakes > 0 && self.commands * 4 < self.wakes * SPIN_BATCH_MIN_X4 {
                self.spin = true;
                self.next_probe = now + SPIN_PROBE_EVERY;
            } else {
                self.window_end = now + SPIN_PROBE_EVERY;
                self.wakes = 0;
                self.commands = 0;
            }
        }
    }
}

/// Whether adaptive polling pauses between batches (see
/// `COALESCE_PROBE_EVERY`).
struct CoalescePolicy {
    on: bool,
    /// Whether the current window runs the other way (`!on`).
    probing: bool,
    /// When the current window ends: a probe, or a `COALESCE_PROBE_EVERY`
    /// part of the time run the `on` way.
    until: Instant,
    /// The current window: when it started, the thread's CPU time then
    /// (none before the first reading, or when it could not be read), and
    /// the commands since.
    started: Instant,
    cpu_ns_start: Option<u64>,
    commands: u64,
    /// Since the last probe: when it ended, and what the last part
    /// measured (`None` before the first part ends; `Some(None)` for a
    /// part with too few commands to measure).
    main_started: Instant,
    last_part: Option<Option<WindowCost>>,
    /// The part just before the probe running now.
    main: Option<WindowCost>,
    /// Whether the load changed within the time before the probe.
    changed: bool,
    /// The time run the `on` way between probes (backs off while probes
    /// confirm the choice on a steady load).
    every: Duration,
}

/// What one window of `CoalescePolicy` measured.
#[derive(Debug, Clone, Copy)]
struct WindowCost {
    cpu_ns: u64,
    commands: u64,
    elapsed_ns: u64,
}

impl WindowCost {
    /// Whether `self` (paused) beats `other` (not paused): enough less CPU
    /// per command, at a rate not much lower.
    fn pausing_pays(&self, other: &WindowCost) -> bool {
        // Cross-multiplied ratios; u128 keeps ns x commands exact.
        let (c, o) = (self, other);
        let cheaper = c.cpu_ns as u128 * o.commands as u128 * 100
            <= o.cpu_ns as u128 * c.commands as u128 * COALESCE_CPU_GAIN_PCT as u128;
        let fast = c.commands as u128 * o.elapsed_ns as u128 * 100
            >= o.commands as u128 * c.elapsed_ns as u128 * COALESCE_RATE_LOSS_PCT as u128;
        cheaper && fast
    }

    /// Whether two windows saw the same load: command rates within a
    /// factor of two and CPU per command within one of 1.5 (4k reads at
    /// depth followed by 4k writes keep the rate but not the cost).
    fn same_load(&self, other: &WindowCost) -> bool {
        let (a, b) = (self, other);
        let rate_a = a.commands as u128 * b.elapsed_ns as u128;
        let rate_b = b.commands as u128 * a.elapsed_ns as u128;
        let cost_a = a.cpu_ns as u128 * b.commands as u128;
        let cost_b = b.cpu_ns as u128 * a.commands as u128;
        rate_a <= 2 * rate_b
            && rate_b <= 2 * rate_a
            && 2 * cost_a <= 3 * cost_b
            && 2 * cost_b <= 3 * cost_a
    }
}

impl CoalescePolicy {
    fn new(now: Instant) -> CoalescePolicy {
        CoalescePolicy {
            on: false,
            probing: false,
            until: now + COALESCE_PROBE_EVERY,
            started: now,
            cpu_ns_start: None,
            commands: 0,
            main_started: now,
            last_part: None,
            main: None,
            changed: false,
            every: COALESCE_PROBE_EVERY,
        }
    }

    /// After a loop iteration that handled `commands`, `from_reads` of
    /// them out of socket reads: whether the next poll should wait first.
    /// `cpu_ns` reads the thread's CPU time; it is called only when a
    /// window ends, and a window it cannot measure decides nothing.
    fn observe(
        &mut self,
        now: Instant,
        commands: u64,
        from_reads: bool,
        cpu_ns: impl FnOnce() -> Option<u64>,
    ) -> bool {
        self.commands += commands;
        if now >= self.until {
            let cpu_now = cpu_ns();
            let window = match (self.cpu_ns_start, cpu_now) {
                (Some(start), Some(end)) => Some(WindowCost {
                    cpu_ns: end.saturating_sub(start),
                    commands: self.commands,
                    elapsed_ns: now.saturating_duration_since(self.started).as_nanos() as u64,
                }),
                _ => None,
            }
            .filter(|w| w.commands >= COALESCE_WINDOW_CMDS_MIN);
            if self.probing {
                let mut steady = false;
                if let (Some(main), Some(probe)) = (self.main, window) {
                    let (paused, plain) = if self.on {
                        (main, probe)
                    } else {
                        (probe, main)
                    };
                    let was = self.on;
                    self.on = paused.pausing_pays(&plain);
                    steady = was == self.on && !self.changed;
                }
                self.every = if steady {
                    (self.every * 2).min(COALESCE_PROBE_EVERY_MAX)
                } else {
                    COALESCE_PROBE_EVERY
                };
                self.probing = false;
                self.main_started = now;
                self.last_part = None;
                self.until = now + COALESCE_PROBE_EVERY;
            } else {
                // A load that changes within a long stretch between probes
                // is probed at once, not up to `COALESCE_PROBE_EVERY_MAX`
                // later (a 10 s write run after reads could spend 4 s unpaused).
                let changed = match self.last_part {
                    None => false,
                    Some(Some(a)) => !window.is_some_and(|b| a.same_load(&b)),
                    Some(None) => window.is_some(),
                };
                let due = now.saturating_duration_since(self.main_started) >= self.every;
                if changed || due {
                    self.changed = changed;
                    self.main = window;
                    self.probing = true;
                    self.until = now + COALESCE_PROBE_FOR;
                } else {
                    self.last_part = Some(window);
                    self.until = now + COALESCE_PROBE_EVERY;
                }
            }
            self.started = now;
            self.cpu_ns_start = cpu_now;
            self.commands = 0;
        }
        let pausing = self.on != self.probing;
        pausing && from_reads && commands >= COALESCE_BATCH_MIN
    }
}

/// This thread's CPU time in nanoseconds (the scheduler's, the same clock
/// `/proc/<pid>/stat`'s utime and stime are cut from). Opening the file
/// with a short path allocates nothing.
fn thread_cpu_ns() -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open("/proc/thread-self/schedstat").ok()?;
    let mut buf = [0u8; 96];
    let n = f.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Reactor {
    fn link(&self) -> &CoreLink {
        &self.sh.cores[self.me]
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn pin(&self) {
        if !self.sh.cfg.pin {
            return;
        }
        let Some(&cpu) = self.sh.cfg.cores.get(self.me) else {
            return;
        };
        if core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            tracing::info!(reactor = self.me, cpu, "reactor pinned");
        } else {
            tracing::warn!(
                reactor = self.me,
                cpu,
                "could not pin the reactor to this CPU"
            );
        }
    }

    fn run_pinned(mut self) -> io::Result<()> {
        self.pin();
        self.run(None)
    }

    fn run_with_signals(&mut self, mut signals: signal_hook_mio::v1_0::Signals) -> io::Result<()> {
        self.pin();
        self.poll
            .registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)?;
        self.run(Some(signals))
    }

    fn run(&mut self, mut signals: Option<signal_hook_mio::v1_0::Signals>) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        if !self.sh.cfg.poll_coalesce.is_zero() {
            // The default timer slack (50 us) would double a coalescing
            // pause; best effort.
            let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1000");
        }
        let mut last_tick = Instant::now();
        let mut last_work = Instant::now();
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if self.stopping {
                let deadline = *stop_deadline.get_or_insert_with(|| {
                    self.sh.stopping.fetch_add(1, Ordering::SeqCst);
                    Instant::now() + SHUTDOWN_GRACE
                });
                if self.stop_complete() || Instant::now() >= deadline {
                    return self.shutdown();
                }
            }
            let mut timeout = match self.sh.cfg.poll {
                PollMode::Busy => Duration::ZERO,
                PollMode::Interrupt => TICK,
                PollMode::Adaptive if self.spin.spin && last_work.elapsed() < POLL_IDLE_BUDGET => {
                    Duration::ZERO
                }
                PollMode::Adaptive => TICK,
            };
            if let Some(Reverse((due, _))) = self.held_logins.peek() {
                // Wake when a held login may go on.
                timeout = timeout.min(due.saturating_duration_since(Instant::now()));
            }
            if self.coalesce_due && !timeout.is_zero() {
                // Let the next batch gather in the sockets (see
                // `COALESCE_PROBE_EVERY`): a plain sleep, which data
                // arriving does not cut short, unlike the poll.
                std::thread::sleep(self.sh.cfg.poll_coalesce);
                self.stats.coalesce_pauses += 1;
            }
            if self.stopping || (self.pool.data.waiting() > 0 && !timeout.is_zero()) {
                // Keep the loop turning for the in-flight work (and for
                // buffers other cores free for commands waiting here), but
                // do not burn the CPU while waiting for it.
                timeout = Duration::from_millis(1);
            } else if !timeout.is_zero() {
                // Idle buffers go back to the shared queues before we
                // sleep, so busy cores can use them.
                self.pool.data.flush();
                self.link().parked.store(true, Ordering::SeqCst);
                // Pairs with the sender's fence between its push and its
                // look at `parked`: either it sees us parked and wakes us,
                // or we see its message here.
                fence(Ordering::SeqCst);
                if !self.link().inbox.is_empty() {
                    timeout = Duration::ZERO;
                }
                // The CQ's channel wakes us only once armed; a completion
                // that raced the arm is found by the poll after it.
                if self.iser_arm() {
                    timeout = Duration::ZERO;
                }
            }
            let cmds_before = self.stats.commands + self.stats.commands_served_remote;
            let r = self.poll.poll(&mut events, Some(timeout));
            self.link().parked.store(false, Ordering::Relaxed);
            let woke = Instant::now();
            self.stats.loops += 1;
            // Messages sent before the socket events we are about to handle
            // were caused (a session ended before its Logout Response left)
            // are handled first. This is the only drain: a message pushed
            // while we are not parked is found by the check before the
            // next sleep, so none waits for a wake-up that never comes.
            let got = self.drain_inbox();
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if !events.is_empty() || got > 0 {
                last_work = woke;
            } else if timeout.is_zero() && self.sh.cfg.poll == PollMode::Adaptive {
                // Spinning with nothing to do: let an initiator sharing
                // this core run instead of burning its time slice.
                std::thread::yield_now();
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNAL_TOKEN => {
                        let stop = signals
                            .as_mut()
                            .is_some_and(|s| s.pending().next().is_some());
                        if stop && !self.stopping {
                            tracing::info!("signal received: stopping");
                            for core in 0..self.sh.cores.len() {
                                if core != self.me {
                                    self.send(core, Msg::Shutdown);
                                }
                            }
                            self.stopping = true;
                        }
                    }
                    WAKER_TOKEN | COMPLETION_TOKEN => {}
                    ISER_CM_TOKEN => self.iser_cm_events(),
                    ISER_CQ_TOKEN => {
                        if let Some(d) = self.iser.as_mut().and_then(|i| i.dev.as_mut()) {
                            let _ = d.cq.take_events();
                            d.armed = false;
                        }
                    }
                    Token(i) if i < self.listeners.len() => {
                        if !self.stopping {
                            self.accept(i);
                        }
                    }
                    Token(t) => {
                        let id = (t - CONN_TOKEN_BASE) as u32;
                        if (ev.is_readable() || ev.is_read_closed() || ev.is_error())
                            && !self.stopping
                        {
                            self.service_read(id);
                        }
                        if ev.is_writable() {
                            self.flush_conn(id);
                        }
                    }
                }
            }
            self.release_held_logins();
            let mut completed = self.iser_poll();
            completed += self.run_until_idle();
            self.serve_buffer_waits();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick();
            }
            self.flush_outbox();
            if got > 0 || completed > 0 || !events.is_empty() {
                self.stats.busy_ns += woke.elapsed().as_nanos() as u64;
            }
            if self.sh.cfg.poll == PollMode::Adaptive {
                let cmds = self.stats.commands + self.stats.commands_served_remote - cmds_before;
                self.spin.observe(Instant::now(), !timeout.is_zero(), cmds);
                let from_reads = std::mem::take(&mut self.iter_read);
                self.coalesce_due = !self.sh.cfg.poll_coalesce.is_zero()
                    && self.coalesce_policy.observe(
                        Instant::now(),
                        cmds,
                        from_reads,
                        thread_cpu_ns,
                    );
            }
        }
    }

    /// Arms allocation tracing (`EngineConfig::trace_allocs`) once a tick
    /// passed in steady state: commands completed, the same connections,
    /// all in full feature phase. Logins, placement and logouts allocate
    /// by design; they disarm it (`trace_disarm`).
    fn trace_allocs_when_steady(&mut self) {
        let commands = self.stats.commands + self.stats.commands_served_remote;
        let steady = self.conns.len() == self.trace_mark.0
            && commands > self.trace_mark.1
            && self
                .conns
                .values()
                .all(|c| c.proto.is_full_feature() && !c.closing);
        self.trace_mark = (self.conns.len(), commands);
        if steady && !self.trace_armed {
            self.trace_armed = true;
            // No log line here: it would allocate inside the window the
            // no-allocation check measures.
            mempool::trace_thread_allocs(self.sh.cfg.trace_allocs);
        }
    }

    fn trace_disarm(&mut self) {
        if self.trace_armed {
            self.trace_armed = false;
            mempool::trace_thread_allocs(0);
        }
    }

    /// Copy this reactor's counters where the stats writer reads them.
    fn publish(&mut self) {
        self.stats.connections = self.conns.len() as u64;
        self.stats.heap_allocs = mempool::thread_heap_allocs();
        self.stats.data_pool_misses = self.pool.data_misses;
        self.stats.data_pool_sg = self.pool.data.sg_allocs();
        if let Some(ip) = &self.iser {
            let k = ip.counters;
            self.stats.iser_connections = ip.by_cm.len() as u64;
            self.stats.iser_sends = k.sends;
            self.stats.iser_recvs = k.recvs;
            self.stats.iser_rdma_writes = k.rdma_writes;
            self.stats.iser_rdma_reads = k.rdma_reads;
            self.stats.iser_rdma_write_bytes = k.rdma_write_bytes;
            self.stats.iser_rdma_read_bytes = k.rdma_read_bytes;
            self.stats.iser_bounce_copies = k.bounce_copies;
            self.stats.iser_send_invalidates = k.send_invalidates;
            self.stats.iser_responses_without_invalidate = k.responses_without_invalidate;
            self.stats.iser_completion_errors = k.completion_errors;
            // The device's PD is shared: reactor 0 (which always has a
            // part of it once there is one) speaks for it.
            if let (0, Some(d)) = (self.me, &ip.dev) {
                self.stats.rdma_registrations_at_setup = d.shared.regs_at_setup();
                self.stats.rdma_registrations_since_setup = d.shared.registrations_since_setup();
            }
        }
        lock(&self.sh.published[self.me]).clone_from(&self.stats);
        let mut luns = lock(&self.sh.published_luns[self.me]);
        let mut slots = luns.iter_mut();
        for d in self.devices.iter().flatten() {
            for (_, io) in d.lun_stats() {
                if let Some(slot) = slots.next() {
                    slot.io = *io;
                }
            }
        }
    }

    fn tick(&mut self) {
        self.pool.data.maintain();
        self.publish();
        if self.me == 0 {
            lock(&self.sh.guard).expire(Instant::now());
        }
        if self.sh.cfg.trace_allocs > 0 {
            self.trace_allocs_when_steady();
        }
        let now = self.now_ms();
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend(self.conns.keys().copied());
        for &id in &ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.proto.tick(now);
                if let Link::Tcp(tcp) = &mut c.link {
                    // Idle a whole tick: its pool ring goes back (see
                    // `TcpConn::release_idle_ring`).
                    if tcp.release_idle_ring() {
                        self.stats.rx_rings_released += 1;
                    }
                }
                if matches!(c.link, Link::Iser(_)) {
                    // Reads waiting for bounce chunks another connection
                    // held.
                    self.iser_retry_reads(id);
                }
            }
            self.process_events(id);
            self.flush_conn(id);
        }
        self.scratch = ids;
        self.reap();
        self.iser_relisten();
    }

    /// Queue a message for another core; a full inbox keeps it here until
    /// `flush_outbox` can deliver it. Order per destination is kept.
    fn send(&mut self, core: usize, msg: Msg) {
        debug_assert_ne!(core, self.me, "a reactor handles its own work directly");
        if self.outbox[core].is_empty() {
            if let Err(m) = self.sh.cores[core].inbox.push(msg) {
                self.outbox[core].push_back(m);
            }
        } else {
            self.outbox[core].push_back(msg);
        }
        self.wake[core] = true;
    }

    /// Retry refused messages, then wake each destination that is asleep.
    /// Once per loop iteration, so a burst of messages costs one wake-up.
    fn flush_outbox(&mut self) {
        for core in 0..self.outbox.len() {
            let link = &self.sh.cores[core];
            while let Some(m) = self.outbox[core].pop_front() {
                if let Err(m) = link.inbox.push(m) {
                    self.outbox[core].push_front(m);
                    break;
                }
            }
            if self.wake[core] {
                self.wake[core] = false;
                fence(Ordering::SeqCst);
                if link.parked.load(Ordering::SeqCst) {
                    let _ = link.waker.wake();
                    self.stats.wakeups_sent += 1;
                }
            }
        }
    }

    /// Handle up to a batch of messages from other cores.
    fn drain_inbox(&mut self) -> usize {
        let mut n = 0;
        while n < INBOX_BATCH_MAX {
            let Some(msg) = self.link().inbox.pop() else {
                break;
            };
            n += 1;
            if matches!(msg, Msg::Submit { .. }) {
                self.stats.commands_served_remote += 1;
            }
            self.handle_msg(msg);
        }
        self.stats.messages_in += n as u64;
        if n > 0 {
            self.finish_touched();
        }
        n
    }

    /// Every message already in the inbox, before input that may have been
    /// sent after them is handled (`drain_inbox` stops after a batch; the
    /// inbox never holds more than its capacity, which bounds the loop).
    fn drain_inbox_before_input(&mut self) {
        let mut left = INBOX_CAPACITY;
        loop {
            let n = self.drain_inbox();
            left = left.saturating_sub(n);
            if n < INBOX_BATCH_MAX || left == 0 {
                break;
            }
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Adopt(entry) => self.adopt(*entry),
            Msg::IserDevice(d) => self.iser_take_device(*d),
            Msg::IserDeviceGone => self.iser_device_removed(),
            Msg::IserConnect(b) => {
                let (req, portal) = *b;
                self.iser_connect_here(req, portal);
            }
            Msg::Submit { target, lun, task } => match self.devices[target].as_mut() {
                Some(d) => d.submit(lun, task),
                None => debug_assert!(false, "task sent to a core that is not its home"),
            },
            Msg::Complete(c) => self.deliver(c),
            Msg::Abort {
                target,
                lun,
                nexus,
                tag,
            } => {
                if let Some(d) = self.devices[target].as_mut() {
                    d.abort(lun, nexus, tag);
                }
            }
            Msg::LunReset {
                target,
                lun,
                nexus,
                reply,
            } => {
                let response = self.lun_reset(target, lun, nexus);
                self.reply_tmf(reply, response, false);
            }
            Msg::TargetReset {
                target,
                nexus,
                cold,
                reply,
            } => {
                if let Some(d) = self.devices[target].as_mut() {
                    d.target_reset(nexus);
                }
                self.reply_tmf(reply, iscsi::conn::tmf::RESP_COMPLETE, cold);
            }
            Msg::TmfDone {
                reply,
                response,
                cold,
            } => self.tmf_done(reply, response, cold),
            Msg::NexusAdded { target, nexus } => {
                if let Some(d) = self.devices[target].as_mut() {
                    d.nexus_added(&nexus);
                }
            }
            Msg::NexusRemoved { target, nexus } => {
                if let Some(d) = self.devices[target].as_mut() {
                    d.nexus_removed(nexus);
                }
            }
            Msg::Kill(global) => self.kill_local(global),
            Msg::Shutdown => self.stopping = true,
        }
    }

    fn lun_reset(&mut self, target: usize, lun: u64, nexus: NexusId) -> u8 {
        match self.devices[target]
            .as_mut()
            .map(|d| d.lun_reset(lun, nexus))
        {
            Some(true) => iscsi::conn::tmf::RESP_COMPLETE,
            Some(false) => iscsi::conn::tmf::RESP_NO_LUN,
            None => iscsi::conn::tmf::RESP_REJECTED,
        }
    }

    fn reply_tmf(&mut self, reply: u64, response: u8, cold: bool) {
        let core = tag_core(reply);
        if core == self.me {
            self.tmf_done(reply, response, cold);
        } else {
            self.send(
                core,
                Msg::TmfDone {
                    reply,
                    response,
                    cold,
                },
            );
        }
    }

    fn tmf_done(&mut self, reply: u64, response: u8, cold: bool) {
        let id = tag_local(reply);
        if let Some(c) = self.conns.get_mut(&id) {
            c.proto.tmf_done(reply as u32, response);
            if cold {
                c.proto.close_after_cold_reset();
            }
            self.touched.push(id);
        }
    }

    /// Give a completion to its connection, here or on its core.
    fn route(&mut self, c: ScsiCompletion) {
        let core = tag_core(c.tag);
        if core == self.me {
            self.deliver(c);
        } else {
            self.send(core, Msg::Complete(c));
        }
    }

    fn deliver(&mut self, c: ScsiCompletion) {
        let id = tag_local(c.tag);
        let Some(conn) = self.conns.get_mut(&id) else {
            self.pool.give_data(c.data_in);
            self.pool.give_data(c.data_out);
            return;
        };
        self.touched.push(id);
        self.stats.completions += 1;
        self.stats.data_in_bytes += c.data_in.len() as u64;
        self.stats.data_out_bytes += c.data_out_len as u64;
        if let Some(sample) = &c.sample {
            self.stats.io.add(sample);
        }
        let tcp = match &mut conn.link {
            Link::Tcp(tcp) => &mut **tcp,
            Link::Iser(link) => {
                let (dev, counters) = match self.iser.as_deref_mut() {
                    Some(ip) => (ip.dev.as_mut(), Some(&mut ip.counters)),
                    None => (None, None),
                };
                let mut sink = IserSink {
                    link,
                    dev,
                    counters,
                    pool: &mut self.pool,
                    local: id,
                };
                if let Some(b) = conn.proto.scsi_complete_owned(
                    c.tag as u32,
                    c.status,
                    &c.sense,
                    c.data_in,
                    c.data_out_len,
                    &mut sink,
                ) {
                    self.pool.give_data(b);
                }
                self.pool.give_data(c.data_out);
                return;
            }
        };
        // The read data goes out from this buffer, not a copy; the socket
        // layer gives it back once written (`take_sent`).
        if let Some(b) = conn.proto.scsi_complete_owned(
            c.tag as u32,
            c.status,
            &c.sense,
            c.data_in,
            c.data_out_len,
            tcp,
        ) {
            self.pool.give_data(b);
        }
        if conn.proto.tx_len() >= TX_CHUNK_BYTES {
            // Queue large output now rather than let one buffer grow past
            // what the socket layer keeps for reuse; the flush still
            // writes all queued buffers in one writev.
            conn.proto.hand_tx(tcp);
        }
        self.pool.give_data(c.data_out);
    }

    /// Flush each connection that got completions, once, with one writev.
    fn finish_touched(&mut self) {
        // Completions of several connections interleave.
        self.touched.sort_unstable();
        self.touched.dedup();
        // One at a time off the end, in place: the work below may run
        // completions itself (a nested `run_until_idle`), whose ids land
        // in this same vector, which keeps its capacity (taking it out
        // left an empty one that such a push had to allocate), and are
        // handled by this loop or the nested one.
        while let Some(id) = self.touched.pop() {
            self.process_events(id);
            self.flush_conn(id);
        }
    }

    /// Drain backstore completions and whatever they unblock; returns how
    /// many there were.
    fn run_until_idle(&mut self) -> usize {
        let mut total = 0;
        loop {
            let mut n = 0;
            self.completions.clear();
            for d in self.devices.iter_mut().flatten() {
                n += d.poll(&mut self.completions);
            }
            if n == 0 {
                break;
            }
            total += n;
            let mut done = std::mem::take(&mut self.completions);
            for c in done.drain(..) {
                self.route(c);
            }
            self.completions = done;
            self.finish_touched();
        }
        self.reap();
        total
    }

    fn alloc_local(&mut self) -> u32 {
        loop {
            let id = self.next_local;
            self.next_local = (self.next_local + 1) & LOCAL_ID_MASK;
            if !self.conns.contains_key(&id) {
                return id;
            }
        }
    }

    fn register(&mut self, id: u32, c: &mut ConnEntry) -> io::Result<()> {
        let Link::Tcp(tcp) = &mut c.link else {
            return Ok(());
        };
        self.poll.registry().register(
            &mut tcp.stream,
            Token(CONN_TOKEN_BASE + id as usize),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    fn accept(&mut self, portal: usize) {
        self.trace_disarm();
        loop {
            match self.listeners[portal].accept() {
                Ok((stream, peer)) => {
                    let (mut logging_in, mut from_peer) = (0, 0);
                    let group = crate::guard::peer_group(peer.ip());
                    for c in self.conns.values() {
                        if !c.proto.is_full_feature() && !c.closing {
                            logging_in += 1;
                            from_peer +=
                                usize::from(c.peer.map(crate::guard::peer_group) == Some(group));
                        }
                    }
                    if logging_in >= self.sh.cfg.max_login_connections
                        || self.conns.len() > LOCAL_ID_MASK as usize / 2
                    {
                        lock(&self.sh.guard).note_login_slots_refused();
                        tracing::warn!(%peer, "too many connections in login; refusing");
                        drop(stream);
                        continue;
                    }
                    if !crate::guard::peer_may_log_in(from_peer) {
                        // One host stalling logins must not take the slots
                        // of the others (`LOGIN_CONNECTIONS_PER_PEER_MAX`).
                        lock(&self.sh.guard).note_peer_share_refused();
                        self.share_refusals += 1;
                        // A flood must not flood the log too: one line a
                        // second at most, with the count since the last.
                        let now = Instant::now();
                        if self
                            .share_warned
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                        {
                            tracing::warn!(
                                %peer,
                                refused = self.share_refusals,
                                "peer has its share of login slots; refusing its new connections"
                            );
                            self.share_warned = Some(now);
                            self.share_refusals = 0;
                        }
                        drop(stream);
                        continue;
                    }
                    let cc = ConnConfig {
                        limits: self.sh.cfg.limits.clone(),
                        transport: iscsi::params::Transport::Tcp,
                        nop_interval_ms: self.sh.cfg.nop_interval_ms,
                        nop_timeout_ms: self.sh.cfg.nop_timeout_ms,
                        login_timeout_ms: 30_000,
                    };
                    let mut entry = ConnEntry {
                        link: Link::Tcp(Box::new(TcpConn::new(stream))),
                        proto: Connection::new(cc, self.now_ms()),
                        portal,
                        global: self.sh.next_conn.fetch_add(1, Ordering::Relaxed),
                        tsih: None,
                        session: None,
                        read_paused: false,
                        held: None,
                        // Sized at accept, not at the first hold: one more
                        // than the limit (see `offer_pdu`).
                        stash: VecDeque::with_capacity(STASH_MAX + 1),
                        closing: false,
                        placed: false,
                        peer: Some(peer.ip()),
                        gate: Gate::Unchecked,
                        attempt: None,
                    };
                    let id = self.alloc_local();
                    if let Err(e) = self.register(id, &mut entry) {
                        tracing::warn!(%peer, "register failed: {e}");
                        continue;
                    }
                    tracing::debug!(%peer, id, global = entry.global, "connection accepted");
                    self.conns.insert(id, entry);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Take over a connection placed on this core by the login core.
    fn adopt(&mut self, mut entry: ConnEntry) {
        self.trace_disarm();
        let id = self.alloc_local();
        if let Err(e) = self.register(id, &mut entry) {
            tracing::warn!(global = entry.global, "register failed: {e}");
            entry.closing = true;
        }
        // The session may have been reinstated by another login while the
        // connection was on its way here; its `Kill` then found nothing.
        let current = entry.tsih.is_some_and(|t| {
            self.sh
                .sessions()
                .map
                .get(&t)
                .is_some_and(|s| s.conn == entry.global)
        });
        if !current {
            entry.closing = true;
        }
        tracing::debug!(global = entry.global, core = self.me, "connection placed");
        let closing = entry.closing;
        self.conns.insert(id, entry);
        if closing {
            self.reap_needed = true;
            return;
        }
        // Whatever the connection still has to say or has received (the
        // final login response, PDUs sent right behind it) is handled here.
        self.process_events(id);
        self.handle_buffered(id);
        self.service_read(id);
    }

    /// Read and handle everything a connection has sent.
    fn service_read(&mut self, id: u32) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.closing || c.stash_full() || matches!(c.gate, Gate::Held(_)) {
                // A held login reads on when released (`release_held_logins`).
                return;
            }
            let Link::Tcp(tcp) = &mut c.link else {
                return;
            };
            if tcp.tx_pending() > TX_BACKLOG_MAX_BYTES {
                c.read_paused = true;
                return;
            }
            let fill = if tcp.in_direct() {
                tcp.fill_direct(c.proto.rx_direct_dest())
            } else {
                let data = &mut self.pool.data;
                tcp.fill_with(c.proto.decoder(), &mut |n| data.alloc_ring(n))
            };
            let drained = tcp.drained();
            let got = match fill {
                Ok(Fill::Read(n)) => n,
                Ok(Fill::Eof) | Err(_) => {
                    self.mark_closed(id, "peer closed the connection");
                    return;
                }
            };
            if got > 0 {
                self.iter_read = true;
                // Bytes read now may answer something another core did
                // before it pushed a message here (a session ended before
                // its Logout Response left: its SPC-2 reservation must be
                // gone before the initiator's next command runs). The
                // drain at the top of the loop may be long past: a
                // preempted reactor reads bytes sent after it.
                self.drain_inbox_before_input();
            }
            self.handle_buffered(id);
            self.run_until_idle();
            if got == 0 || (drained && self.coalesce_due) {
                return;
            }
        }
    }

    /// Handle every whole PDU in the receive buffer.
    fn handle_buffered(&mut self, id: u32) {
        let now = self.now_ms();
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.closing
                || c.proto.is_closing()
                || c.stash_full()
                || matches!(c.gate, Gate::Held(_))
            {
                break;
            }
            // Behind a held command only Data-Outs of other tasks run
            // now; nothing else may be staged meanwhile (a staged buffer
            // whose command is neither running nor pending in the core
            // is given back by the next PDU the core handles).
            let holding = c.held.is_some();
            let Link::Tcp(tcp) = &mut c.link else {
                break;
            };
            let (heap, data) = (&mut self.pool.heap, &mut self.pool.data);
            let sg_mode = self.sh.cfg.buffer_sg;
            let decoder = c.proto.decoder().clone();
            let proto = &mut c.proto;
            let luns = c.session.map(|(t, _)| &self.sh.targets[t].luns[..]);
            // A segment received into place (`transport_tcp::direct`)
            // comes before anything else in the ring.
            let next = match tcp.take_direct() {
                Some(r) => {
                    proto.rx_direct_end();
                    r.map(Some)
                }
                None if tcp.in_direct() => Ok(None),
                // Write data (Data-Out and immediate) goes from the receive
                // buffer straight into its command's buffer; other data
                // segments into heap buffers kept for reuse.
                None => tcp.next_pdu_placing(
                    &decoder,
                    &mut |bhs, d, lend| {
                        // Lent data lies where it came (after a header),
                        // which an O_DIRECT file would bounce: those LUNs
                        // get a copy in an aligned pool buffer. Looked up
                        // only when a write's data is about to be lent.
                        let lend_here = |lun: u64| {
                            let id = scsi::target::decode_lun(lun);
                            let may =
                                luns.is_some_and(|l| l.iter().any(|x| Some(x.0) == id && !x.3));
                            if may {
                                lend()
                            } else {
                                None
                            }
                        };
                        place_or_stage(proto, holding, data, sg_mode, bhs, d, &lend_here)
                    },
                    &mut |n| heap.take(n),
                ),
            };
            let pdu = match next {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // The PDU at the front is incomplete: if most of its
                    // write data is still to come, have the socket read it
                    // straight into the command's buffer.
                    if let Some(bhs) = tcp.direct_candidate(&decoder) {
                        let may = !holding || bhs.opcode() == iscsi::pdu::opcode::DATA_OUT;
                        let sg = sg_for(sg_mode, bhs.cdb());
                        if let Some(dst) = may
                            .then(|| proto.rx_direct_begin(&bhs, &mut |n| alloc_pool(data, n, sg)))
                            .flatten()
                        {
                            tcp.begin_direct(&decoder, dst);
                        }
                    }
                    let counts = tcp.take_rx_counts();
                    self.stats.rx_data_direct_bytes += counts.direct;
                    self.stats.rx_data_copied_bytes += counts.copied;
                    break;
                }
                Err(e) => {
                    tracing::warn!(id, "bad PDU: {e}");
                    c.proto.handle_decode_error(e);
                    self.process_events(id);
                    continue;
                }
            };
            self.offer_pdu(id, pdu, RdmaTags::default(), now);
        }
        self.flush_conn(id);
    }

    /// A connection's next PDU, in order: stashed behind a held write
    /// command unless it is a Data-Out of a task the core already has,
    /// else dispatched.
    fn offer_pdu(&mut self, id: u32, pdu: iscsi::Pdu, rdma: RdmaTags, now: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.held.is_some() && !c.data_out_may_pass(&pdu.bhs, c.stash.len()) {
            c.stash.push_back((pdu, rdma));
            if c.stash.len() > STASH_MAX {
                // Only iSER gets here (TCP stops reading at the limit): its
                // receives cannot wait. The held command takes a heap
                // buffer (counted) rather than lose the order.
                self.release_held(id, None, now);
            }
            return;
        }
        self.dispatch_pdu(id, pdu, rdma, now);
    }

    /// Feed a connection's next PDU in order, first reserving the buffer
    /// of a write command; when the pool has none now, the command is
    /// held (and the PDUs after it stashed) until one is granted.
    fn dispatch_pdu(&mut self, id: u32, pdu: iscsi::Pdu, rdma: RdmaTags, now: u64) {
        if let Some(len) = write_buffer_wanted(&pdu) {
            let sg = sg_for(self.sh.cfg.buffer_sg, pdu.bhs.cdb());
            if !self.reserve_write(id, len, sg) {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.held = Some((pdu, rdma));
                }
                return;
            }
        }
        self.feed_reserved(id, pdu, rdma, now);
    }

    /// `feed_pdu` with the buffer `reserve_write` reserved for the
    /// command, if any; one the command did not take goes back.
    fn feed_reserved(&mut self, id: u32, pdu: iscsi::Pdu, rdma: RdmaTags, now: u64) {
        self.feed_pdu(id, pdu, rdma, now);
        if let Some(r) = self.pool.reserved.take() {
            self.pool.give_data(r);
        }
    }

    /// End connection `id`'s hold: feed the held command with `buf` (the
    /// pool's grant; None: its wait is cancelled and it takes what its
    /// `BufferSource` finds), then the stash in order until another write
    /// command has to wait.
    fn release_held(&mut self, id: u32, buf: Option<DataBuf>, now: u64) {
        let Some((pdu, rdma)) = self.conns.get_mut(&id).and_then(|c| c.held.take()) else {
            if let Some(b) = buf {
                self.pool.give_data(b);
            }
            return;
        };
        if buf.is_none() {
            let token = write_wait_token(self.me, id);
            self.buf_waits.remove(&token);
            self.pool.data.cancel_wait(token);
        }
        self.pool.reserved = buf;
        self.feed_reserved(id, pdu, rdma, now);
        while let Some((p, rdma)) = self
            .conns
            .get_mut(&id)
            .filter(|c| c.held.is_none() && !c.closing && !c.proto.is_closing())
            .and_then(|c| c.stash.pop_front())
        {
            self.dispatch_pdu(id, p, rdma, now);
        }
        // Another command is held now: Data-Outs further back in the
        // stash for tasks the core already has go on, or those tasks
        // (holding buffers) would wait for data that waits for a buffer
        // they hold. (An initiator may send several commands before their
        // unsolicited data: Linux over iSER does.)
        let kept = self.conns.get(&id).map_or(0, |c| c.stash.len());
        for i in 0..kept {
            let Some(c) = self
                .conns
                .get_mut(&id)
                .filter(|c| !c.closing && !c.proto.is_closing())
            else {
                return;
            };
            let Some((p, rdma)) = c.stash.pop_front() else {
                return;
            };
            // Everything before this one that stayed is at the back now.
            let before = c.stash.len() - (kept - 1 - i);
            if c.data_out_may_pass(&p.bhs, before) {
                self.feed_pdu(id, p, rdma, now);
            } else {
                c.stash.push_back((p, rdma));
            }
        }
    }

    /// Reserve the data buffer of a write command about to be fed to
    /// connection `id` (`Buffers::reserved`). False: the pool queued the
    /// request; the command waits in `held` for `serve_buffer_waits`.
    /// True also when the pool cannot queue it (too large for a class,
    /// queues full): the command then takes its chances as before.
    fn reserve_write(&mut self, id: u32, len: usize, sg: BufferSg) -> bool {
        let token = write_wait_token(self.me, id);
        match self.pool_or_wait(len, token, sg) {
            PoolWait::Ready(b) => {
                self.pool.reserved = Some(b);
                true
            }
            PoolWait::Queued => {
                self.buf_waits.insert(token, BufWait::Write { id });
                false
            }
            PoolWait::Unserved => true,
        }
    }

    /// `len` bytes from this core's pool cache, or `token` queued for a
    /// grant (counted as `data_pool_waits`; the caller keeps the waiting
    /// command in `buf_waits`). Unserved: nothing to wait for (no length,
    /// no class that large) or no room to wait (`BUF_WAITS_MAX`, the
    /// class's wait queue).
    fn pool_or_wait(&mut self, len: usize, token: u64, sg: BufferSg) -> PoolWait {
        if len == 0 {
            return PoolWait::Unserved;
        }
        if let Some(b) = alloc_pool(&mut self.pool.data, len, sg) {
            return PoolWait::Ready(b);
        }
        if self.buf_waits.len() >= BUF_WAITS_MAX {
            return PoolWait::Unserved;
        }
        // Nothing free, one buffer or pieces: queue for one buffer.
        match self.pool.data.wait_for_data(len, token) {
            Ok(()) => {
                self.stats.data_pool_waits += 1;
                PoolWait::Queued
            }
            Err(_) => PoolWait::Unserved,
        }
    }

    /// Give the buffers the pool granted to the commands waiting for
    /// them: a read goes to its device, a held write command to its
    /// connection, whose input then resumes.
    fn serve_buffer_waits(&mut self) {
        while self.pool.data.waiting() > 0 {
            let buf;
            let token;
            if let Some((t, sg)) = self.pool.data.next_grant() {
                token = t;
                buf = self.pool.data.data_from_grant(sg);
            } else {
                // None of its own class yet, but smaller buffers idle: a
                // READ or WRITE waiting goes on with its data in pieces
                // (`--buffer-sg`) rather than wait for a whole buffer.
                let mode = self.sh.cfg.buffer_sg;
                let (waits, conns) = (&self.buf_waits, &self.conns);
                let mut pieces_ok = |t: u64| match waits.get(&t) {
                    Some(BufWait::Read { task, scratch, .. }) => {
                        !scratch && sg_for(mode, &task.cdb) != BufferSg::Off
                    }
                    Some(BufWait::Write { id }) => conns
                        .get(id)
                        .and_then(|c| c.held.as_ref())
                        .is_some_and(|(pdu, _)| sg_for(mode, pdu.bhs.cdb()) != BufferSg::Off),
                    None => false,
                };
                let Some((t, d)) = self.pool.data.grant_in_pieces(&mut pieces_ok) else {
                    return;
                };
                token = t;
                buf = d;
                self.stats.data_pool_waits_in_pieces += 1;
            }
            match self.buf_waits.remove(&token) {
                Some(BufWait::Read {
                    target,
                    lun,
                    mut task,
                    ..
                }) => {
                    task.data_in = buf;
                    self.run_at_home(target, Msg::Submit { target, lun, task });
                }
                Some(BufWait::Write { id }) => {
                    let now = self.now_ms();
                    self.release_held(id, Some(buf), now);
                    // Then what is still in the ring and in the socket (a
                    // full stash paused reading; the readiness edge has
                    // passed); on iSER, what the released PDUs caused.
                    self.handle_buffered(id);
                    self.service_read(id);
                    self.iser_flush(id);
                }
                None => self.pool.give_data(buf),
            }
        }
    }

    /// A connection is going away: the commands it has waiting for
    /// buffers go too (its local id may be reused, and tags with it).
    fn drop_buffer_waits(&mut self, id: u32) {
        let data = &mut self.pool.data;
        self.buf_waits.retain(|&token, _| {
            let keep = tag_local(token) != id;
            if !keep {
                data.cancel_wait(token);
            }
            keep
        });
    }

    /// One decoded PDU (with what an iSER header said, on iSER) into a
    /// connection's protocol core, then what it caused: a login's effects
    /// on other sessions and the connection's events. Shared by TCP and
    /// iSER.
    fn feed_pdu(&mut self, id: u32, pdu: iscsi::Pdu, rdma: RdmaTags, now: u64) {
        if self.trace_armed
            && self
                .conns
                .get(&id)
                .is_some_and(|c| !c.proto.is_full_feature())
        {
            self.trace_disarm();
        }
        let Some(mut c) = self.conns.get_mut(&id) else {
            return;
        };
        if !matches!(c.gate, Gate::Passed) {
            // Login only: a PDU of a connection in full feature phase
            // costs this one compare.
            if matches!(c.gate, Gate::Held(_)) {
                // Only iSER gets here (a held TCP connection reads
                // nothing): an initiator sends nothing more before its
                // Login Response.
                self.mark_closed(id, "PDU behind a held Login Request");
                return;
            }
            if c.proto.is_full_feature() || pdu.bhs.opcode() != iscsi::pdu::opcode::LOGIN_REQ {
                c.gate = Gate::Passed;
            } else if !self.gate_login(id, &pdu) {
                if let Some(c) = self.conns.get_mut(&id) {
                    if !c.closing {
                        c.gate = Gate::Held(Box::new((pdu, rdma)));
                    }
                }
                return;
            }
            let Some(again) = self.conns.get_mut(&id) else {
                return;
            };
            c = again;
        }
        let mut ctx = Ctx {
            sh: &self.sh,
            conn_global: c.global,
            portal: c.portal,
            instated: None,
            kills: &mut self.kills,
            ended: &mut self.ended,
            pool: &mut self.pool,
        };
        c.proto.handle_pdu_rdma(&mut ctx, pdu, rdma, now);
        self.stats.pdus_rx += 1;
        if let Some(tsih) = ctx.instated {
            c.tsih = Some(tsih);
        }
        if !self.kills.is_empty() || !self.ended.is_empty() {
            self.login_side_effects();
        }
        self.process_events(id);
    }

    /// Carry out what a login decided about other sessions: close the
    /// connections of reinstated sessions and tell their devices.
    fn login_side_effects(&mut self) {
        for (target, nexus) in std::mem::take(&mut self.ended) {
            self.nexus_removed(target, nexus);
        }
        for global in std::mem::take(&mut self.kills) {
            self.kill_everywhere(global);
        }
    }

    fn kill_everywhere(&mut self, global: u64) {
        for core in 0..self.sh.cores.len() {
            if core != self.me {
                self.send(core, Msg::Kill(global));
            }
        }
        self.kill_local(global);
    }

    fn kill_local(&mut self, global: u64) {
        let found = self
            .conns
            .iter()
            .find(|(_, c)| c.global == global)
            .map(|(&id, _)| id);
        if let Some(id) = found {
            self.mark_closed(id, "session reinstated or ended by a target reset");
        }
    }

    /// Carry out `msg` on the home reactor of `target`: here, at once, or
    /// there through its inbox. Either way the same `handle_msg` runs it.
    fn run_at_home(&mut self, target: usize, msg: Msg) {
        let home = self.sh.targets[target].home;
        if home == self.me {
            self.handle_msg(msg);
        } else {
            self.send(home, msg);
        }
    }

    fn nexus_added(&mut self, target: usize, nexus: Nexus) {
        self.run_at_home(target, Msg::NexusAdded { target, nexus });
    }

    fn nexus_removed(&mut self, target: usize, nexus: NexusId) {
        self.run_at_home(target, Msg::NexusRemoved { target, nexus });
    }

    /// Carry out what the connection asked for.
    fn process_events(&mut self, id: u32) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let Some(ev) = c.proto.poll_event() else {
                break;
            };
            let (session, global) = (c.session, c.global);
            match ev {
                Event::RdmaRead {
                    task,
                    ttt,
                    offset,
                    len,
                    stag,
                    va,
                } => {
                    if !matches!(c.link, Link::Iser(_)) {
                        tracing::error!(id, "RDMA Read requested on a TCP connection");
                        self.mark_closed(id, "RDMA Read on a TCP connection");
                        return;
                    }
                    self.iser_rdma_read(
                        id,
                        PendingRead {
                            task,
                            ttt,
                            offset,
                            len,
                            stag,
                            va,
                        },
                    );
                }
                Event::LoggedIn(o) => {
                    let peer = c.peer;
                    let attempt = c.attempt.take();
                    {
                        let mut g = lock(&self.sh.guard);
                        g.succeeded(peer, Some(&o.session.initiator_name));
                        if let Some(name) = attempt.and_then(|a| a.name) {
                            g.succeeded(None, Some(&name));
                        }
                    }
                    if let Some(target) = self.logged_in(id, &o) {
                        // The connection may move to another core: stop
                        // here; its remaining events go with it.
                        if self.place(id, target) {
                            return;
                        }
                    }
                }
                Event::Scsi(req) => {
                    let Some((target, nexus)) = session else {
                        continue;
                    };
                    let tag = task_tag(self.me, id, req.task);
                    let mut task = ScsiTask {
                        tag,
                        nexus,
                        cdb: scsi::Cdb::from_parts(&req.cdb, &req.cdb_ext),
                        attr: TaskAttr::from_iscsi(req.attr),
                        edtl: req.edtl,
                        data_out: req.data_out,
                        data_in: DataBuf::new(),
                    };
                    self.stats.commands += 1;
                    if self.sh.targets[target].home != self.me {
                        self.stats.commands_forwarded += 1;
                    }
                    let lun = req.lun;
                    // The read buffer, sized by the EDTL, or the scratch
                    // buffer VERIFY, COMPARE AND WRITE, WRITE SAME and the
                    // like read back or build their data in (one slice;
                    // the device server empties it on submit), from the
                    // pool; when its class is exhausted the command waits
                    // for a buffer (`serve_buffer_waits`).
                    let want = if req.read {
                        let sg = sg_for(self.sh.cfg.buffer_sg, &req.cdb);
                        Some((req.edtl as usize, sg, false))
                    } else {
                        self.scratch_len(target, lun, &task.cdb)
                            .map(|n| (n, BufferSg::Off, true))
                    };
                    if let Some((len, sg, scratch)) = want {
                        task.data_in = match self.pool_or_wait(len, tag, sg) {
                            PoolWait::Ready(b) => b,
                            // A scratch buffer the pool cannot give is
                            // grown by the device server. Beyond the
                            // largest class, which is MAXIMUM TRANSFER
                            // LENGTH, the device server refuses the CDB or
                            // sizes what it does transfer itself: never a
                            // buffer of the EDTL an initiator claims (up to
                            // 4 GiB for one PDU).
                            PoolWait::Unserved if scratch || len > DATA_POOL_CLASS_MAX => {
                                DataBuf::new()
                            }
                            // Heap, counted as a miss.
                            PoolWait::Unserved => self.pool.data(len),
                            PoolWait::Queued => {
                                self.buf_waits.insert(
                                    tag,
                                    BufWait::Read {
                                        target,
                                        lun,
                                        task,
                                        scratch,
                                    },
                                );
                                continue;
                            }
                        };
                    }
                    self.run_at_home(target, Msg::Submit { target, lun, task });
                }
                Event::Abort { task, lun } => {
                    let Some((target, nexus)) = session else {
                        continue;
                    };
                    let tag = task_tag(self.me, id, task);
                    if matches!(self.buf_waits.get(&tag), Some(BufWait::Read { .. })) {
                        // Never given to the device: end it here.
                        self.buf_waits.remove(&tag);
                        self.pool.data.cancel_wait(tag);
                        c.proto
                            .scsi_complete(task, scsi::status::TASK_ABORTED, &[], &[], 0);
                        continue;
                    }
                    self.run_at_home(
                        target,
                        Msg::Abort {
                            target,
                            lun,
                            nexus,
                            tag,
                        },
                    );
                }
                Event::LunReset { itt, lun } => {
                    let reply = task_tag(self.me, id, itt);
                    let Some((target, nexus)) = session else {
                        self.tmf_done(reply, iscsi::conn::tmf::RESP_REJECTED, false);
                        continue;
                    };
                    self.run_at_home(
                        target,
                        Msg::LunReset {
                            target,
                            lun,
                            nexus,
                            reply,
                        },
                    );
                }
                Event::TargetReset { itt, cold } => {
                    let reply = task_tag(self.me, id, itt);
                    let Some((target, nexus)) = session else {
                        self.tmf_done(reply, iscsi::conn::tmf::RESP_COMPLETE, cold);
                        continue;
                    };
                    if cold {
                        // A cold reset ends every session of the target.
                        let others: Vec<u64> = self
                            .sh
                            .sessions()
                            .map
                            .values()
                            .filter(|s| s.target == target && s.conn != global)
                            .map(|s| s.conn)
                            .collect();
                        for g in others {
                            self.kill_everywhere(g);
                        }
                    }
                    self.run_at_home(
                        target,
                        Msg::TargetReset {
                            target,
                            nexus,
                            cold,
                            reply,
                        },
                    );
                }
                Event::Close(reason) => {
                    match &reason {
                        CloseReason::Logout => tracing::info!(id, "logout"),
                        CloseReason::LoginFailed => self.login_failed(id),
                        r => tracing::info!(id, "closing: {r:?}"),
                    }
                    // The session ends now, before the Logout Response (or
                    // whatever else is queued) goes out: once the initiator
                    // has it, it may act on another connection, and the
                    // I_T nexus (its SPC-2 reservation, say) must already
                    // be gone on the target's home reactor. The message
                    // is in that reactor's inbox before our bytes leave.
                    if let Some(c) = self.conns.get_mut(&id) {
                        if let Some(tsih) = c.tsih.take() {
                            self.end_session(tsih, global);
                        }
                    }
                    self.mark_closed(id, "connection closing");
                }
            }
        }
    }

    /// Record the nexus of a session that reached full feature phase.
    /// Returns the target when the connection is a normal session's, to
    /// be placed on a core.
    fn logged_in(&mut self, id: u32, o: &iscsi::login::LoginOutcome) -> Option<usize> {
        let tsih = o.tsih;
        let c = self.conns.get_mut(&id)?;
        let tpgt = self.sh.portals[c.portal].tpgt;
        let mut added = None;
        let result = {
            let mut table = self.sh.sessions();
            let table = &mut *table;
            let s = table.map.get_mut(&tsih)?;
            tracing::info!(
                initiator = %o.session.initiator_name,
                target = %o.session.target_name,
                tsih,
                "login complete"
            );
            if s.session_type != SessionType::Normal {
                return None;
            }
            let nexus = match s.nexus {
                Some(n) => n,
                None => {
                    let nexus = Nexus {
                        id: table.next_nexus,
                        initiator_name: s.initiator_name.clone(),
                        isid: s.isid,
                        target_name: self.sh.targets[s.target].name.clone(),
                        tpgt,
                    };
                    table.next_nexus += 1;
                    s.nexus = Some(nexus.id);
                    let id = nexus.id;
                    added = Some(nexus);
                    id
                }
            };
            c.session = Some((s.target, nexus));
            s.target
        };
        if let Some(n) = added {
            // Sent before the connection moves, so the home core knows the
            // nexus before any command of it arrives (one FIFO per pair of
            // cores, and the connection's core starts sending only after
            // it received the connection from here).
            self.nexus_added(result, n);
        }
        Some(result)
    }

    /// The core with the fewest placed connections, ties going to cores
    /// `preferred` says yes to, then to the lowest index; counted in its
    /// load at once, so placements racing on other cores see it.
    fn claim_least_loaded(&self, preferred: impl Fn(usize) -> bool) -> usize {
        let cores = &self.sh.cores;
        let best = (0..cores.len())
            .min_by_key(|&core| {
                (
                    cores[core].load.load(Ordering::Relaxed),
                    !preferred(core),
                    core,
                )
            })
            .expect("at least one core");
        cores[best].load.fetch_add(1, Ordering::Relaxed);
        best
    }

    /// Put a full-feature connection on the least-loaded core, preferring
    /// the home of its target. Returns whether it left this core.
    fn place(&mut self, id: u32, target: usize) -> bool {
        if let Some(c) = self.conns.get_mut(&id) {
            if matches!(c.link, Link::Iser(_)) {
                // An iSER connection was placed, and counted, at its
                // connect request: its queue pair cannot change CQ.
                debug_assert!(c.placed);
                return false;
            }
        }
        let home = self.sh.targets[target].home;
        let best = self.claim_least_loaded(|core| core == home);
        if best == self.me {
            if let Some(c) = self.conns.get_mut(&id) {
                c.placed = true;
            }
            return false;
        }
        let Some(mut entry) = self.conns.remove(&id) else {
            return true;
        };
        // Bytes already queued for the socket (the final login response)
        // go out now, in order, before anything the new core writes.
        let Link::Tcp(tcp) = &mut entry.link else {
            return true;
        };
        entry.proto.hand_tx(&mut **tcp);
        let _ = tcp.flush();
        let _ = self.poll.registry().deregister(&mut tcp.stream);
        entry.placed = true;
        tracing::debug!(
            global = entry.global,
            from = self.me,
            to = best,
            "placing connection"
        );
        self.send(best, Msg::Adopt(Box::new(entry)));
        true
    }

    fn flush_conn(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let tcp = match &mut c.link {
            Link::Tcp(tcp) => &mut **tcp,
            Link::Iser(_) => return self.iser_flush(id),
        };
        // Small batches are copied into the socket's queue; a large one
        // swaps buffers with it, each keeping its capacity (see
        // `TcpConn::queue`).
        c.proto.hand_tx(tcp);
        let flushed = tcp.flush();
        for b in tcp.take_sent() {
            self.pool.give_data(b);
        }
        if flushed.is_err() {
            self.mark_closed(id, "write failed");
            return;
        }
        if c.read_paused && tcp.tx_pending() <= TX_BACKLOG_MAX_BYTES / 2 {
            c.read_paused = false;
            // Edge-triggered readiness will not fire again for bytes that
            // are already waiting.
            self.service_read(id);
        }
    }

    fn mark_closed(&mut self, id: u32, why: &str) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.closing {
                tracing::debug!(id, "{why}");
            }
            c.closing = true;
            self.reap_needed = true;
        }
    }

    /// Remove connections that are closing and have sent what they could.
    fn reap(&mut self) {
        if !self.reap_needed {
            return;
        }
        self.trace_disarm();
        let mut done = std::mem::take(&mut self.reaped);
        done.clear();
        done.extend(
            self.conns
                .iter()
                .filter(|(_, c)| {
                    c.closing
                        && match &c.link {
                            Link::Tcp(tcp) => tcp.tx_pending() == 0 || c.proto.is_closing(),
                            Link::Iser(l) => iser_done(l),
                        }
                })
                .map(|(&id, _)| id),
        );
        // iSER connections still sending: disconnect once their queue is
        // empty (or at once when the peer left or the QP broke).
        for (&id, c) in self.conns.iter_mut() {
            if let (true, Link::Iser(l)) = (c.closing, &mut c.link) {
                let since = *l.closing_since.get_or_insert_with(Instant::now);
                let drained = l.stream.is_empty() && l.idle();
                if !l.disconnected && (drained || l.broken || since.elapsed() > ISER_DRAIN_MAX) {
                    tracing::debug!(id, "iSER: disconnecting");
                    let _ = l.id.disconnect();
                    l.disconnected = true;
                }
            }
        }
        for &id in &done {
            let Some(mut c) = self.conns.remove(&id) else {
                continue;
            };
            if let Some(a) = c.attempt.take() {
                // A login attempt that never came to an end (the peer left,
                // a protocol error, the login timeout).
                lock(&self.sh.guard).ended(c.peer, a.name.as_deref());
            }
            self.drop_buffer_waits(id);
            let tcp = match c.link {
                Link::Tcp(ref mut tcp) => tcp,
                Link::Iser(l) => {
                    if let Some(ip) = self.iser.as_mut() {
                        ip.by_qp.remove(&l.qp_num);
                        ip.by_cm.remove(&l.id.handle());
                    }
                    let dev = self.iser.as_mut().and_then(|i| i.dev.as_mut());
                    for b in l.release(dev) {
                        self.pool.give_data(b);
                    }
                    tracing::debug!(id, "iSER connection released");
                    if c.placed {
                        self.link().load.fetch_sub(1, Ordering::Relaxed);
                    }
                    if let Some(tsih) = c.tsih {
                        self.end_session(tsih, c.global);
                    }
                    continue;
                }
            };
            let _ = tcp.flush();
            for b in tcp.take_all_data() {
                self.pool.give_data(b);
            }
            let _ = self.poll.registry().deregister(&mut tcp.stream);
            let _ = tcp.stream.shutdown(std::net::Shutdown::Both);
            if c.placed {
                self.link().load.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(tsih) = c.tsih {
                self.end_session(tsih, c.global);
            }
        }
        self.reaped = done;
        // Closing connections still flushing their last bytes stay for
        // the next pass.
        self.reap_needed = self.conns.values().any(|c| c.closing);
    }

    /// End the session if this connection still carries it.
    fn end_session(&mut self, tsih: u16, global: u64) {
        let removed = {
            let mut table = self.sh.sessions();
            match table.map.get(&tsih) {
                Some(s) if s.conn == global => table.map.remove(&tsih),
                _ => None,
            }
        };
        if let Some(s) = removed {
            if let Some(n) = s.nexus {
                self.nexus_removed(s.target, n);
            }
            tracing::debug!(tsih, "session ended");
        }
    }

    /// Every reactor has stopped reading, and nothing this core owns or
    /// forwards is still in flight.
    fn stop_complete(&self) -> bool {
        self.sh.stopping.load(Ordering::SeqCst) == self.sh.cores.len()
            && self.devices.iter().flatten().all(|d| d.in_flight() == 0)
            && self.link().inbox.is_empty()
            && self.outbox.iter().all(|q| q.is_empty())
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.flush_outbox();
        self.publish();
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend(self.conns.keys().copied());
        for &id in &ids {
            self.flush_conn(id);
        }
        let mut result = Ok(());
        for d in self.devices.iter_mut().flatten() {
            for l in d.luns_mut() {
                if let Err(errno) = l.shutdown() {
                    tracing::error!(lun = l.info().lun, errno, "flush at shutdown failed");
                    result = Err(io::Error::from_raw_os_error(errno));
                }
            }
        }
        tracing::debug!(reactor = self.me, "reactor stopped");
        result
    }
}

/// How long a closing iSER connection may take to send what it queued
/// before it is disconnected anyway (and as long again for the flushed
/// requests to come back before its queue pair is destroyed).
const ISER_DRAIN_MAX: Duration = Duration::from_secs(2);

fn iser_done(l: &IserLink) -> bool {
    l.device_gone
        || l.disconnected
            && (l.idle()
                || l.closing_since
                    .is_some_and(|t| t.elapsed() > ISER_DRAIN_MAX * 2))
}

/// Where an iSER connection's completion output goes: PDU bytes to the
/// link's send stream, read data by RDMA Write straight from its buffer.
struct IserSink<'a> {
    link: &'a mut IserLink,
    dev: Option<&'a mut crate::iser::IserDevice>,
    counters: Option<&'a mut crate::iser::IserCounters>,
    pool: &'a mut Buffers,
    local: u32,
}

impl TxSink for IserSink<'_> {
    fn put_bytes(&mut self, bytes: &[u8]) {
        self.link.stream.extend_from_slice(bytes);
    }

    fn put_vec(&mut self, bytes: &mut Vec<u8>) {
        self.link.stream.extend_from_slice(bytes);
        bytes.clear();
    }

    // iSER never sends Data-In PDUs: the protocol core does not call these.
    fn put_data(&mut self, buf: DataBuf) {
        self.pool.give_data(buf);
    }

    fn put_range(&mut self, _start: usize, _end: usize) {}

    fn last_range_crc32c(&self) -> u32 {
        0
    }

    fn put_rdma_write(&mut self, buf: DataBuf, len: usize, stag: u32, va: u64) -> Option<DataBuf> {
        let Some(dev) = self.dev.as_deref_mut() else {
            return Some(buf);
        };
        let len = len.min(buf.len());
        let mut sges = [rdma::Sge::default(); crate::iser::MAX_CHUNKS];
        let pieces = buf
            .slices_at(0, len)
            .map(|p| (p.as_ptr() as usize, p.len()));
        let Some(wrs) = dev.sges_for(pieces, len, &mut sges) else {
            if !buf.is_contiguous() {
                // Pool pieces are always registered: never here.
                tracing::error!(len, "iSER: read data in unregistered pieces");
                return Some(buf);
            }
            // A heap buffer (pool miss): copy into registered bounce
            // chunks rather than register memory on the I/O path.
            let Some(b) = dev.bounce_alloc(len, &mut sges) else {
                tracing::warn!(len, "iSER: no bounce chunks free for read data");
                return Some(buf);
            };
            dev.bounce_fill(&b, &buf[..len]);
            let n = b.n as usize;
            let op = Op::BounceWrite {
                bounce: b,
                wrs: n as u32,
            };
            return match self
                .link
                .post_rdma_sges(self.local, true, &sges[..n], stag, va, op)
            {
                Ok(()) => {
                    if let Some(k) = self.counters.as_deref_mut() {
                        k.rdma_writes += 1;
                        k.rdma_write_bytes += len as u64;
                        k.bounce_copies += 1;
                    }
                    self.pool.give_data(buf);
                    None
                }
                Err(Some(_)) => {
                    dev.bounce_free(&b);
                    Some(buf)
                }
                Err(None) => {
                    self.pool.give_data(buf);
                    None
                }
            };
        };
        let op = Op::Write {
            buf,
            wrs: wrs as u32,
        };
        match self
            .link
            .post_rdma_sges(self.local, true, &sges[..wrs], stag, va, op)
        {
            Ok(()) => {
                if let Some(k) = self.counters.as_deref_mut() {
                    k.rdma_writes += 1;
                    k.rdma_write_bytes += len as u64;
                }
                None
            }
            Err(Some(Op::Write { buf, .. })) => Some(buf),
            // Posting failed: the link is broken and the connection ends;
            // the buffer stays with the op until teardown.
            Err(_) => None,
        }
    }
}

impl Reactor {
    fn iser_dev(&mut self) -> Option<&mut crate::iser::IserDevice> {
        self.iser.as_mut().and_then(|i| i.dev.as_mut())
    }

    /// Queue the connection's output and Send whole PDUs while send slots
    /// last (the rest goes as send completions free slots).
    fn iser_flush(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Link::Iser(l) = &mut c.link else {
            return;
        };
        if c.proto.has_tx() {
            c.proto.take_tx(&mut l.stream);
        }
        let Some(ip) = self.iser.as_mut() else {
            return;
        };
        let Some(dev) = ip.dev.as_mut() else {
            return;
        };
        if !l.post_sends(id, dev, &mut ip.counters) {
            self.mark_closed(id, "iSER send failed");
        }
    }

    /// Arm the CQ's channel before sleeping; true when the poll after the
    /// arm found work (then do not sleep).
    fn iser_arm(&mut self) -> bool {
        let Some(d) = self.iser_dev() else {
            return false;
        };
        if d.armed || d.cq.req_notify(false).is_err() {
            return false;
        }
        d.armed = true;
        self.iser_poll() > 0
    }

    /// Handle every completion waiting in the iSER CQ.
    fn iser_poll(&mut self) -> usize {
        let mut total = 0;
        let mut batch = [Completion::EMPTY; 32];
        loop {
            let n = match self.iser_dev() {
                Some(d) => d.cq.poll(&mut batch).unwrap_or(0),
                None => return total,
            };
            if n == 0 {
                return total;
            }
            total += n;
            // As in service_read: messages pushed before these receives
            // arrived are handled before the PDUs they carry.
            self.drain_inbox_before_input();
            for wc in &batch[..n] {
                if wc.wr_id & crate::iser::RECV_BIT != 0 {
                    self.iser_recv(wc);
                } else {
                    self.iser_send_done(wc);
                }
            }
        }
    }

    fn iser_send_done(&mut self, wc: &Completion) {
        let id = crate::iser::wr_local(wc.wr_id);
        let Some(ip) = self.iser.as_mut() else {
            return;
        };
        // A connection already gone: its slots went back at teardown.
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Link::Iser(l) = &mut c.link else {
            return;
        };
        if l.qp_num != wc.qp_num {
            return;
        }
        let op = l.op_take(crate::iser::wr_op(wc.wr_id));
        let ok = wc.is_success();
        if !ok {
            if wc.status != WcStatus::WR_FLUSH_ERR {
                ip.counters.completion_errors += 1;
                tracing::warn!(
                    id,
                    status = wc.status.as_str(),
                    vendor = wc.vendor_err,
                    opcode = ?wc.opcode,
                    "iSER work request failed; ending the connection"
                );
            }
            l.broken = true;
        }
        match op {
            None => {}
            Some(Op::Send { slot }) => {
                if let Some(dev) = ip.dev.as_mut() {
                    crate::iser::free_send_slot(dev, slot);
                }
            }
            Some(Op::Write { buf, .. }) => self.pool.give_data(buf),
            Some(Op::Read { task, ttt, .. }) => c.proto.rdma_read_done(task, ttt, ok),
            Some(Op::BounceWrite { bounce, .. }) => {
                if let Some(dev) = ip.dev.as_mut() {
                    dev.bounce_free(&bounce);
                }
            }
            Some(Op::BounceRead {
                task,
                ttt,
                offset,
                len,
                bounce,
                ..
            }) => {
                if let Some(dev) = ip.dev.as_mut() {
                    if ok {
                        if let Some(mut dst) = c.proto.rdma_read_target(task, offset, len) {
                            dev.bounce_drain(&bounce, &mut dst);
                        }
                    }
                    dev.bounce_free(&bounce);
                }
                c.proto.rdma_read_done(task, ttt, ok);
            }
        }
        if !ok {
            self.mark_closed(id, "iSER work request failed");
            self.process_events(id);
            return;
        }
        self.iser_retry_reads(id);
        self.process_events(id);
        self.iser_flush(id);
    }

    /// Reads that waited for send-queue room or bounce chunks, in order.
    fn iser_retry_reads(&mut self, id: u32) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let Link::Iser(l) = &mut c.link else {
                return;
            };
            let Some(pr) = l.pending_reads.pop_front() else {
                break;
            };
            if !self.iser_post_read(id, pr) {
                break;
            }
        }
    }

    /// A received message: iSER header and PDU into the protocol core.
    fn iser_recv(&mut self, wc: &Completion) {
        let slot = (wc.wr_id & !crate::iser::RECV_BIT) as usize;
        let now = self.now_ms();
        let Some(ip) = self.iser.as_mut() else {
            return;
        };
        let Some(dev) = ip.dev.as_mut() else {
            return;
        };
        if !wc.is_success() {
            if wc.status != WcStatus::WR_FLUSH_ERR {
                ip.counters.completion_errors += 1;
                tracing::warn!(status = wc.status.as_str(), "iSER receive failed");
            }
            let _ = dev.repost(slot);
            return;
        }
        ip.counters.recvs += 1;
        let conn = ip.by_qp.get(&wc.qp_num).copied();
        let Some((id, c)) = conn.and_then(|id| Some((id, self.conns.get_mut(&id)?))) else {
            let _ = dev.repost(slot);
            return;
        };
        if c.closing || c.proto.is_closing() {
            let _ = dev.repost(slot);
            return;
        }
        let decoded = {
            let msg = dev.received(slot, wc.byte_len as usize).unwrap_or(&[]);
            let decoder = c.proto.decoder().clone();
            // Nothing is staged behind a held command (see
            // `handle_buffered`).
            let holding = c.held.is_some();
            let proto = &mut c.proto;
            let (heap, data) = (&mut self.pool.heap, &mut self.pool.data);
            let sg_mode = self.sh.cfg.buffer_sg;
            transport_iser::framing::decode_message(
                msg,
                &decoder,
                // The receive slot is reposted at once: its bytes are
                // copied, never lent.
                &mut |bhs, d| place_or_stage(proto, holding, data, sg_mode, bhs, d, &|_| None),
                &mut |n| heap.take(n),
            )
        };
        if let Err(e) = dev.repost(slot) {
            tracing::error!("iSER: cannot repost a receive: {e}");
        }
        let (hdr, pdu) = match decoded {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(id, "malformed iSER message: {e}; ending the connection");
                self.mark_closed(id, "malformed iSER message");
                return;
            }
        };
        if pdu.bhs.opcode() == iscsi::pdu::opcode::SCSI_CMD {
            if let Link::Iser(l) = &mut c.link {
                l.inv.note_command(pdu.bhs.itt(), hdr.rdma_tags());
            }
        }
        self.offer_pdu(id, pdu, hdr.rdma_tags(), now);
        self.iser_flush(id);
    }

    /// Event::RdmaRead: fetch solicited write data into the task's buffer.
    fn iser_rdma_read(&mut self, id: u32, pr: PendingRead) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Link::Iser(l) = &mut c.link else {
            return;
        };
        if !l.pending_reads.is_empty() {
            // Keep the order of reads waiting for send-queue room.
            l.pending_reads.push_back(pr);
            return;
        }
        self.iser_post_read(id, pr);
    }

    /// Posts one read; false when it had to wait for send-queue room.
    fn iser_post_read(&mut self, id: u32, pr: PendingRead) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return true;
        };
        let Some(ip) = self.iser.as_mut() else {
            return true;
        };
        let Some(dev) = ip.dev.as_mut() else {
            return true;
        };
        let Link::Iser(l) = &mut c.link else {
            return true;
        };
        let Some(mut dst) = c.proto.rdma_read_target(pr.task, pr.offset, pr.len) else {
            // The task is gone (aborted): nothing to fetch.
            c.proto.rdma_read_done(pr.task, pr.ttt, true);
            return true;
        };
        let len = dst.len();
        let mut sges = [rdma::Sge::default(); crate::iser::MAX_CHUNKS];
        let pieces = dst
            .pieces_from(0)
            .map(|p| (p.as_mut_ptr() as usize, p.len()));
        let Some(wrs) = dev.sges_for(pieces, len, &mut sges) else {
            // The write buffer is on the heap (pool exhausted): read into
            // registered bounce chunks, copied over on completion.
            let Some(b) = dev.bounce_alloc(len, &mut sges) else {
                if len > crate::iser::BOUNCE_CHUNK * crate::iser::MAX_CHUNKS {
                    tracing::warn!(id, len, "iSER: write burst too large for bounce chunks");
                    c.proto.rdma_read_done(pr.task, pr.ttt, false);
                    return true;
                }
                l.pending_reads.push_back(pr);
                return false;
            };
            let n = b.n as usize;
            let op = Op::BounceRead {
                task: pr.task,
                ttt: pr.ttt,
                offset: pr.offset,
                len: pr.len,
                bounce: b,
                wrs: n as u32,
            };
            return match l.post_rdma_sges(id, false, &sges[..n], pr.stag, pr.va, op) {
                Ok(()) => {
                    ip.counters.rdma_reads += 1;
                    ip.counters.rdma_read_bytes += len as u64;
                    ip.counters.bounce_copies += 1;
                    true
                }
                Err(Some(_)) if !l.broken && !l.disconnected => {
                    dev.bounce_free(&b);
                    l.pending_reads.push_back(pr);
                    false
                }
                Err(_) => {
                    c.proto.rdma_read_done(pr.task, pr.ttt, false);
                    true
                }
            };
        };
        let op = Op::Read {
            task: pr.task,
            ttt: pr.ttt,
            wrs: wrs as u32,
        };
        match l.post_rdma_sges(id, false, &sges[..wrs], pr.stag, pr.va, op) {
            Ok(()) => {
                ip.counters.rdma_reads += 1;
                ip.counters.rdma_read_bytes += len as u64;
                true
            }
            Err(Some(_)) if !l.broken && !l.disconnected => {
                l.pending_reads.push_back(pr);
                false
            }
            Err(_) => {
                c.proto.rdma_read_done(pr.task, pr.ttt, false);
                true
            }
        }
    }

    /// RDMA CM events of the iSER listeners and connections.
    fn iser_cm_events(&mut self) {
        loop {
            let ev = match self.iser.as_ref().map(|i| i.cm.get_event()) {
                Some(Ok(Some(ev))) => ev,
                Some(Ok(None)) | None => return,
                Some(Err(e)) => {
                    tracing::warn!("iSER: reading RDMA CM events: {e}");
                    return;
                }
            };
            let conn = self
                .iser
                .as_ref()
                .and_then(|i| i.by_cm.get(&ev.id).copied());
            match ev.kind {
                CmEventKind::ConnectRequest(req) => self.iser_place(req),
                CmEventKind::Established { .. } => {
                    if let Some(Link::Iser(l)) = conn
                        .and_then(|id| self.conns.get_mut(&id))
                        .map(|c| &mut c.link)
                    {
                        l.established = true;
                    }
                }
                CmEventKind::Disconnected => {
                    if let Some(id) = conn {
                        if let Some(Link::Iser(l)) = self.conns.get_mut(&id).map(|c| &mut c.link) {
                            if !l.disconnected {
                                // Answer with our own disconnect, so the
                                // peer gets its DISCONNECTED now.
                                let _ = l.id.disconnect();
                                l.disconnected = true;
                            }
                        }
                        self.mark_closed(id, "iSER peer disconnected");
                    }
                }
                CmEventKind::DeviceRemoval => {
                    // Only for ids of the current device: a late event of
                    // a connection already released (device gone and
                    // maybe back) finds nothing here.
                    let listener = self
                        .iser
                        .as_ref()
                        .is_some_and(|i| i.listeners.iter().any(|(l, _)| l.handle() == ev.id));
                    if conn.is_some() || listener {
                        self.iser_device_removed();
                    }
                }
                CmEventKind::ConnectError { .. }
                | CmEventKind::Unreachable { .. }
                | CmEventKind::Rejected { .. } => {
                    if let Some(id) = conn {
                        if let Some(Link::Iser(l)) = self.conns.get_mut(&id).map(|c| &mut c.link) {
                            l.broken = true;
                            l.disconnected = true;
                        }
                        self.mark_closed(id, "iSER connection failed");
                    }
                }
                _ => {}
            }
        }
    }

    /// A connect request on an iSER portal (reactor 0): place it on the
    /// least-loaded core now, since its queue pair is bound to one core's
    /// CQ and SRQ for life. Ties go to cores other than reactor 0, which
    /// also runs the TCP logins and the listeners. The session's target is
    /// not known yet (login has not begun), so unlike TCP the target's
    /// home core cannot break ties.
    fn iser_place(&mut self, req: rdma::ConnectRequest) {
        self.trace_disarm();
        if self.stopping {
            return;
        }
        let n = self.sh.cores.len();
        let Some(ip) = self.iser.as_mut() else {
            return;
        };
        if ip.dev.is_none() {
            let ctx = req.id.context().map_err(|e| e.to_string());
            if let Err(e) = ctx.and_then(|ctx| self.iser_setup_device(ctx)) {
                tracing::warn!("iSER device setup failed: {e}; refusing the connection");
                if let Some(ip) = self.iser.as_mut() {
                    ip.counters.connect_rejects += 1;
                }
                return;
            }
        }
        let Some(ip) = self.iser.as_ref() else {
            return;
        };
        let portal = ip.portal_of(req.listener);
        let best = self.claim_least_loaded(|core| core != 0 || n == 1);
        if best == self.me {
            self.iser_connect(req, portal);
        } else {
            tracing::debug!(to = best, "placing iSER connection");
            self.send(best, Msg::IserConnect(Box::new((req, portal))));
        }
    }

    /// Reactor 0: sets up `ctx` for every core, keeps its own part and
    /// sends the others theirs (ahead of any connection placed there).
    fn iser_setup_device(&mut self, ctx: rdma::Context) -> Result<(), String> {
        let devs = IserDevice::open_all(ctx, &self.sh.data_pool, self.sh.cores.len())?;
        for (core, d) in devs.into_iter().enumerate() {
            if core == self.me {
                self.iser_take_device(d);
            } else {
                self.send(core, Msg::IserDevice(Box::new(d)));
            }
        }
        Ok(())
    }

    /// The RDMA device went away (DEVICE_REMOVAL on one of this core's CM
    /// ids, or reactor 0 passing it on): end this core's iSER connections
    /// at once (their requests will not complete), and drop everything
    /// built on the device, so the kernel can finish removing it.
    /// Reactor 0 also drops its listeners, tells every other core, and
    /// listens again from its tick until the address has a device again.
    fn iser_device_removed(&mut self) {
        let Some(ip) = self.iser.as_mut() else {
            return;
        };
        if ip.dev.is_none() && ip.listeners.is_empty() {
            return;
        }
        let ids: Vec<u32> = ip.by_cm.values().copied().collect();
        tracing::warn!(
            core = self.me,
            connections = ids.len(),
            "iSER: RDMA device removed; ending its connections and releasing it"
        );
        for id in ids {
            if let Some(Link::Iser(l)) = self.conns.get_mut(&id).map(|c| &mut c.link) {
                l.broken = true;
                l.disconnected = true;
                l.device_gone = true;
            }
            self.mark_closed(id, "RDMA device removed");
        }
        self.reap();
        let Some(ip) = self.iser.as_mut() else {
            return;
        };
        if let Some(d) = ip.dev.take() {
            if let Some(fd) = d.cq.event_fd() {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut mio::unix::SourceFd(&fd));
            }
        }
        if self.me == 0 {
            ip.listeners.clear();
            for core in 1..self.sh.cores.len() {
                self.send(core, Msg::IserDeviceGone);
            }
        }
        // librdmacm closes its own context on a removed device only when
        // it re-reads the device list.
        rdma::release_removed_devices();
    }

    /// From the tick, on reactor 0 (the others have no portals): listen
    /// again on the iSER portals after a device removal.
    fn iser_relisten(&mut self) {
        let Some(ip) = self.iser.as_mut() else {
            return;
        };
        if self.me != 0 || !ip.listeners.is_empty() || ip.addrs.is_empty() {
            return;
        }
        if ip.listen(false) {
            tracing::info!("iSER portals listening again");
            if let Some(ctx) = ip.listener_context() {
                if let Err(e) = self.iser_setup_device(ctx) {
                    tracing::warn!("iSER device setup failed: {e}");
                }
            }
        }
    }

    /// This core's part of the device, set up by reactor 0.
    fn iser_take_device(&mut self, d: IserDevice) {
        if let Some(ip) = self.iser.as_mut() {
            poll_cq(self.poll.registry(), &d);
            ip.dev = Some(d);
        }
    }

    /// A connect request placed here by reactor 0: its CM id moves to this
    /// core's event channel before the accept, so every later event of the
    /// connection arrives here.
    fn iser_connect_here(&mut self, mut req: rdma::ConnectRequest, portal: usize) {
        self.trace_disarm();
        let migrated = match self.iser.as_ref() {
            Some(ip) => req.id.migrate(&ip.cm).map_err(|e| e.to_string()),
            None => Err("no iSER side on this core".into()),
        };
        if let Err(e) = migrated {
            tracing::warn!(core = self.me, "iSER: cannot take a connection: {e}");
            self.link().load.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.iser_connect(req, portal);
    }

    /// Creates the connection placed here (and counted in this core's
    /// load): QP on this core's CQ and SRQ, accept with the iSER CM reply,
    /// and a login-phase connection, which stays on this core.
    fn iser_connect(&mut self, req: rdma::ConnectRequest, portal: usize) {
        let refuse = |r: &mut Reactor, why: &str| {
            tracing::warn!("iSER connect request refused: {why}");
            r.link().load.fetch_sub(1, Ordering::Relaxed);
            if let Some(ip) = r.iser.as_mut() {
                ip.counters.connect_rejects += 1;
            }
        };
        if self.stopping {
            return refuse(self, "stopping");
        }
        let Some(ip) = self.iser.as_mut() else {
            return refuse(self, "no iSER side on this core");
        };
        let Some(dev) = ip.dev.as_ref() else {
            return refuse(self, "no device set up on this core");
        };
        let link = match IserLink::accept(req, dev) {
            Ok(l) => l,
            Err(e) => return refuse(self, &e),
        };
        ip.counters.connections_accepted += 1;
        let (qp, handle) = (link.qp_num, link.id.handle());
        let peer = link.id.peer_addr().map(|a| a.ip());
        let mut limits = self.sh.cfg.limits.clone();
        limits.max_recv_data_segment_length = crate::iser::RECV_DATA_MAX;
        let cc = ConnConfig {
            limits,
            transport: iscsi::params::Transport::Iser,
            nop_interval_ms: self.sh.cfg.nop_interval_ms,
            nop_timeout_ms: self.sh.cfg.nop_timeout_ms,
            login_timeout_ms: 30_000,
        };
        let entry = ConnEntry {
            link: Link::Iser(Box::new(link)),
            proto: Connection::new(cc, self.now_ms()),
            portal,
            global: self.sh.next_conn.fetch_add(1, Ordering::Relaxed),
            tsih: None,
            session: None,
            read_paused: false,
            held: None,
            stash: VecDeque::with_capacity(STASH_MAX + 1),
            closing: false,
            placed: true,
            peer,
            gate: Gate::Unchecked,
            attempt: None,
        };
        let id = self.alloc_local();
        if let Some(ip) = self.iser.as_mut() {
            ip.by_qp.insert(qp, id);
            ip.by_cm.insert(handle, id);
        }
        self.conns.insert(id, entry);
    }
}

/// What login and text negotiation see of the engine.
struct Ctx<'a> {
    sh: &'a Shared,
    conn_global: u64,
    portal: usize,
    instated: Option<u16>,
    kills: &'a mut Vec<u64>,
    ended: &'a mut Vec<(usize, NexusId)>,
    pool: &'a mut Buffers,
}

impl BufferSource for Ctx<'_> {
    fn data_buffer(&mut self, len: usize) -> Vec<u8> {
        self.pool.take(len)
    }

    fn data_buffer_sized(&mut self, len: usize) -> DataBuf {
        self.pool.data(len)
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.pool.give(buf)
    }

    fn recycle_data(&mut self, buf: DataBuf) {
        self.pool.give_data(buf)
    }
}

/// A reactor's buffers: command data in the shared hugepage pool
/// (`DataBuf`s, through this core's cache: no lock, no allocation), and
/// PDU data segments (text, login, immediate data) in a heap cache.
struct Buffers {
    heap: BufPool,
    data: CoreCache,
    /// Data buffers served from the heap: larger than the largest class,
    /// or the class was exhausted and its wait queue full.
    data_misses: u64,
    /// The buffer reserved for the write command being fed to its
    /// connection (`Reactor::reserve_write`), taken by `data` when the
    /// command asks for a buffer of its size.
    reserved: Option<DataBuf>,
}

impl Buffers {
    fn take(&mut self, len: usize) -> Vec<u8> {
        self.heap.take(len)
    }

    fn give(&mut self, b: Vec<u8>) {
        self.heap.give(b)
    }

    /// `len` bytes for a command's data, contents stale (the caller
    /// overwrites all of it: write data arriving, a backstore's read).
    fn data(&mut self, len: usize) -> DataBuf {
        if len == 0 {
            return DataBuf::new();
        }
        if let Some(r) = self.reserved.take() {
            if r.len() == len {
                return r;
            }
            self.give_data(r);
        }
        match self.data.alloc_data(len) {
            Some(d) => d,
            None => {
                self.data_misses += 1;
                DataBuf::from(self.heap.take_sized(len))
            }
        }
    }

    fn give_data(&mut self, d: DataBuf) {
        if let Some(v) = self.data.free_data(d) {
            self.heap.give(v);
        }
    }
}

/// What `Reactor::pool_or_wait` got.
enum PoolWait {
    Ready(DataBuf),
    /// Queued for a grant.
    Queued,
    /// The pool cannot serve it by waiting.
    Unserved,
}

/// A command waiting for the data pool to grant its buffer.
enum BufWait {
    /// A read, ready to run but for its Data-In buffer; its token is its
    /// task tag, so an abort finds it.
    Read {
        target: usize,
        lun: u64,
        task: ScsiTask,
        /// The buffer is the command's scratch buffer (`scsi::scratch_len`),
        /// not its Data-In: one slice, never pieces.
        scratch: bool,
    },
    /// The write command held in connection `id`'s `held`; its token is
    /// `write_wait_token`.
    Write { id: u32 },
}

/// The token of a connection's held write command (one at a time): a
/// task tag no task has (task ids keep their slot in the low 16 bits,
/// and slots stay far below 0xffff).
fn write_wait_token(core: usize, id: u32) -> u64 {
    task_tag(core, id, u32::MAX)
}

/// How a command's data buffer may be made: several smaller buffers
/// only for the plain READ and WRITE commands, whose data goes between
/// transport and backstore in pieces (over TCP a `readv`/`writev` of
/// them, over iSER one RDMA work request each).
fn sg_for(mode: BufferSg, cdb: &[u8]) -> BufferSg {
    match cdb.first() {
        Some(&op) if scsi::common::data_may_be_in_pieces(op) => mode,
        _ => BufferSg::Off,
    }
}

/// `len` bytes from this core's pool cache now, without waiting: one
/// buffer of the smallest class that holds it, or (as `sg` allows)
/// several smaller ones. Never allocates memory.
fn alloc_pool(data: &mut CoreCache, len: usize, sg: BufferSg) -> Option<DataBuf> {
    match sg {
        BufferSg::Off => data.alloc_data(len),
        BufferSg::Fallback => data.alloc_data(len).or_else(|| data.alloc_data_sg(len)),
        BufferSg::Always => data.alloc_data_sg(len).or_else(|| data.alloc_data(len)),
    }
}

/// A data segment in hand with its PDU's header: a Data-Out's data into
/// its task's buffer, or (unless a command is held) a write command's
/// immediate data into a pool buffer staged for it. False: the data comes
/// in the PDU as usual.
fn place_or_stage(
    proto: &mut Connection,
    holding: bool,
    data: &mut CoreCache,
    sg_mode: BufferSg,
    bhs: &iscsi::Bhs,
    d: &[u8],
    lend: &dyn Fn(u64) -> Option<DataBuf>,
) -> bool {
    if let Some(given) = proto.place_data_out_lent(bhs, lend) {
        // The buffer the task was given, now unused: back to this core's
        // cache (one from the heap is dropped).
        drop(data.free_data(given));
        return true;
    }
    let sg = sg_for(sg_mode, bhs.cdb());
    proto.place_data_out(bhs, d)
        || (!holding
            && (proto.stage_immediate_lent(bhs, lend)
                || proto.stage_immediate(bhs, d, &mut |n| alloc_pool(data, n, sg))))
}

/// The buffer a write command will ask its connection's `BufferSource`
/// for: all its data when not all of it came with the command, and the
/// command's immediate data was not already staged into a buffer.
fn write_buffer_wanted(pdu: &iscsi::Pdu) -> Option<usize> {
    let b = &pdu.bhs;
    let staged = pdu.data.is_empty() && b.data_segment_len() > 0;
    (b.opcode() == iscsi::pdu::opcode::SCSI_CMD
        && b.flags() & iscsi::pdu::flags::WRITE != 0
        && !staged
        && (pdu.data.len() as u32) < b.edtl())
    .then_some(b.edtl() as usize)
}

impl Reactor {
    /// The scratch buffer command `cdb` to LUN `raw_lun` of `target` wants
    /// (`scsi::scratch_len`), if any.
    fn scratch_len(&self, target: usize, raw_lun: u64, cdb: &[u8]) -> Option<usize> {
        let id = scsi::target::decode_lun(raw_lun)?;
        let &(_, bs, max, _) = self.sh.targets[target].luns.iter().find(|l| l.0 == id)?;
        Some(scsi::scratch_len(cdb, bs, max)).filter(|&n| n > 0)
    }
}

impl Ctx<'_> {
    fn target(&self, name: &str) -> Option<usize> {
        self.sh.targets.iter().position(|t| t.name == name)
    }
}

impl LoginContext for Ctx<'_> {
    fn portal_group_tag(&self) -> u16 {
        self.sh.portals[self.portal].tpgt
    }

    fn target_exists(&self, target_name: &str) -> bool {
        self.target(target_name).is_some()
    }

    fn initiator_allowed(&self, target_name: &str, initiator_name: &str) -> bool {
        self.target(target_name).is_some_and(|i| {
            let allow = &self.sh.targets[i].allow;
            allow.is_empty() || allow.iter().any(|a| a == initiator_name)
        })
    }

    fn chap(&self, target_name: Option<&str>) -> ChapConfig {
        match target_name.and_then(|n| self.target(n)) {
            Some(i) => self.sh.targets[i].chap.clone(),
            None => self.sh.cfg.discovery_chap.clone(),
        }
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        rand::rngs::OsRng.fill_bytes(buf);
    }

    fn authenticate_first(&self) -> bool {
        self.sh.targets.iter().any(|t| t.chap.initiator.is_some())
    }

    fn instate_session(&mut self, req: &SessionRequest) -> Result<u16, LoginStatus> {
        let target = match req.session_type {
            SessionType::Discovery => usize::MAX,
            SessionType::Normal => self
                .target(&req.target_name)
                .ok_or(LoginStatus::NOT_FOUND)?,
        };
        let mut table = self.sh.sessions();
        if req.tsih != 0 {
            // Add or reinstate a connection: with one connection per
            // session only reinstatement (same CID) is possible.
            let s = table
                .map
                .get_mut(&req.tsih)
                .filter(|s| {
                    s.initiator_name == req.initiator_name
                        && s.isid == req.isid
                        && s.target == target
                })
                .ok_or(LoginStatus::SESSION_DOES_NOT_EXIST)?;
            if s.cid != req.cid {
                return Err(LoginStatus::TOO_MANY_CONNECTIONS);
            }
            self.kills.push(s.conn);
            s.conn = self.conn_global;
            self.instated = Some(req.tsih);
            return Ok(req.tsih);
        }
        // A leading login with an ISID already in use by this initiator on
        // this target reinstates that session: the old one ends. Its
        // connection's later close does not end the new session, because
        // the table no longer names that connection.
        let old: Vec<u16> = table
            .map
            .values()
            .filter(|s| {
                s.initiator_name == req.initiator_name && s.isid == req.isid && s.target == target
            })
            .map(|s| s.tsih)
            .collect();
        for tsih in old {
            if let Some(s) = table.map.remove(&tsih) {
                self.kills.push(s.conn);
                if let Some(n) = s.nexus {
                    self.ended.push((s.target, n));
                }
                tracing::debug!(tsih, "session reinstated");
            }
        }
        if table.map.len() >= self.sh.cfg.max_sessions {
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        let tsih = table.alloc_tsih().ok_or(LoginStatus::OUT_OF_RESOURCES)?;
        table.map.insert(
            tsih,
            Session {
                tsih,
                initiator_name: req.initiator_name.clone(),
                isid: req.isid,
                target,
                session_type: req.session_type,
                conn: self.conn_global,
                cid: req.cid,
                nexus: None,
            },
        );
        self.instated = Some(tsih);
        Ok(tsih)
    }
}

impl TextContext for Ctx<'_> {
    fn send_targets(
        &self,
        initiator_name: &str,
        session_target: Option<&str>,
        query: &str,
    ) -> Vec<TargetRecord> {
        let addresses: Vec<String> = self
            .sh
            .portals
            .iter()
            .zip(self.sh.portal_addrs.iter())
            .map(|(p, a)| format!("{a},{}", p.tpgt))
            .collect();
        self.sh
            .targets
            .iter()
            .filter(|t| match query {
                "All" => session_target.is_none_or(|s| s == t.name),
                "" => session_target == Some(t.name.as_str()),
                name => name == t.name,
            })
            .filter(|t| t.allow.is_empty() || t.allow.iter().any(|a| a == initiator_name))
            .map(|t| TargetRecord {
                name: t.name.clone(),
                addresses: addresses.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message another core pushed into a reactor's inbox before the
    /// initiator sent some bytes is handled before the PDUs in those
    /// bytes, even when the reactor's drain at the top of its loop ran
    /// before they arrived (a reactor preempted inside `service_read`
    /// reads, in the same call, bytes sent long after its drain). The
    /// real case: a session ends on another core (Logout), the initiator
    /// gets the Logout Response and sends a command on a connection of
    /// the target's home core, which must not see that session's SPC-2
    /// reservation any more. Here the message is a `Kill` of the reading
    /// connection itself, so the PDU behind it must go unanswered.
    #[test]
    fn inbox_message_sent_before_the_bytes_is_handled_before_their_pdu() {
        use std::io::{Read, Write};
        let cfg = EngineConfig {
            limits: TargetLimits::default(),
            nop_interval_ms: 0,
            nop_timeout_ms: 0,
            max_sessions: 16,
            max_login_connections: 16,
            discovery_chap: ChapConfig::default(),
            poll: PollMode::Interrupt,
            poll_coalesce: Duration::ZERO,
            data_pool_bytes: DATA_POOL_BYTES,
            buffer_sg: BufferSg::Fallback,
            cores: vec![0, 1],
            pin: false,
            stats_file: None,
            iser_portals: Vec::new(),
            trace_allocs: 0,
        };
        let portal = Portal {
            addr: "127.0.0.1:0".parse().unwrap(),
            tpgt: 1,
        };
        let mut engine = Engine::new(cfg, Vec::new(), vec![portal]).unwrap();
        let addr = engine.local_addrs()[0];
        let mut r0 = engine.reactors.remove(0);
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let id = loop {
            r0.accept(0);
            if let Some(&id) = r0.conns.keys().next() {
                break id;
            }
            assert!(Instant::now() < deadline, "connection not accepted");
            std::thread::sleep(Duration::from_millis(1));
        };
        // Reactor 0 drained its inbox (top of its loop) before this.
        assert_eq!(r0.drain_inbox(), 0);
        // Another core ends the connection's session, then the initiator
        // sends a Login Request.
        let global = r0.conns[&id].global;
        assert!(r0.sh.cores[0].inbox.push(Msg::Kill(global)).is_ok());
        let mut pdu = iscsi::Pdu::new(iscsi::pdu::opcode::LOGIN_REQ);
        pdu.bhs.set_immediate(true);
        pdu.data = b"InitiatorName=iqn.2026-11.test:i\0SessionType=Discovery\0".to_vec();
        let mut wire = Vec::new();
        iscsi::pdu::Encoder::default().encode(&pdu, &mut wire);
        client.write_all(&wire).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // The reactor reads them without going round its loop again.
        r0.service_read(id);
        r0.flush_conn(id);
        assert!(
            r0.conns.get(&id).is_none_or(|c| c.closing),
            "the Kill was not handled"
        );
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 512];
        match client.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "the PDU read after the Kill was answered"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{e}"
            ),
        }
    }

    /// Drives the policy through one probe window with `per_wake` commands
    /// per blocking wake-up; returns whether it spins afterwards.
    fn probe(per_wake: u64) -> bool {
        let t0 = Instant::now();
        let mut p = SpinPolicy::new(t0);
        assert!(p.spin);
        // Spinning until the probe starts.
        p.observe(t0 + SPIN_PROBE_EVERY / 2, false, 1);
        assert!(p.spin);
        let start = t0 + SPIN_PROBE_EVERY;
        p.observe(start, false, 1);
        assert!(!p.spin, "the probe blocks");
        for i in 1..=10 {
            p.observe(start + Duration::from_millis(i), true, per_wake);
        }
        p.observe(start + SPIN_PROBE_FOR, true, 0);
        p.spin
    }

    #[test]
    fn adaptive_polling_spins_for_one_command_per_wake_and_blocks_for_batches() {
        assert!(probe(1), "queue depth 1: spin");
        assert!(!probe(2), "batches of two: block");
        assert!(!probe(8), "batches: block");
        // Idle (no command in the window): keep sleeping.
        assert!(!probe(0));
        // Blocking, a window of single commands turns spinning back on.
        let t0 = Instant::now();
        let mut p = SpinPolicy::new(t0);
        p.observe(t0 + SPIN_PROBE_EVERY, false, 0);
        p.observe(t0 + SPIN_PROBE_EVERY + SPIN_PROBE_FOR, true, 4);
        assert!(!p.spin);
        let w = t0 + SPIN_PROBE_EVERY + SPIN_PROBE_FOR;
        for i in 1..=5 {
            p.observe(w + Duration::from_millis(i), true, 1);
        }
        p.observe(w + SPIN_PROBE_EVERY, true, 0);
        assert!(p.spin);
    }

    /// Drives a `CoalescePolicy` through one window of `ms` milliseconds
    /// in which each millisecond's iteration handles `per_ms` commands
    /// for `cpu_us_per_ms` microseconds of CPU; returns whether those
    /// iterations paused, and moves `at` and `cpu_ns` on.
    fn coalesce_window(
        p: &mut CoalescePolicy,
        at: &mut Instant,
        cpu_ns: &mut u64,
        ms: u64,
        per_ms: u64,
        cpu_us_per_ms: u64,
    ) -> Vec<bool> {
        let mut paused = Vec::new();
        for _ in 0..ms {
            *at += Duration::from_millis(1);
            *cpu_ns += cpu_us_per_ms * 1000;
            let now_cpu = *cpu_ns;
            paused.push(p.observe(*at, per_ms, true, || Some(now_cpu)));
        }
        paused
    }

    const EVERY_MS: u64 = COALESCE_PROBE_EVERY.as_millis() as u64;
    const FOR_MS: u64 = COALESCE_PROBE_FOR.as_millis() as u64;

    /// The main window (`p.every` long, run the `on` way), then the probe.
    fn coalesce_round(
        p: &mut CoalescePolicy,
        at: &mut Instant,
        cpu_ns: &mut u64,
        main: (u64, u64),
        probe: (u64, u64),
    ) -> (Vec<bool>, Vec<bool>) {
        assert!(!p.probing);
        let ms = p.every.as_millis() as u64;
        let m = coalesce_window(p, at, cpu_ns, ms, main.0, main.1);
        assert!(p.probing, "a probe follows every main window");
        let q = coalesce_window(p, at, cpu_ns, FOR_MS, probe.0, probe.1);
        assert!(!p.probing);
        (m, q)
    }

    #[test]
    fn receive_coalescing_turns_on_where_pausing_saves_cpu() {
        let (mut at, mut cpu) = (Instant::now(), 1u64);
        let mut p = CoalescePolicy::new(at);
        // Off at start; the first window only takes a CPU reading, so the
        // first probe has nothing to compare with. (The iteration that
        // ends a window already runs the next one's way.)
        let (main, probe) = coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (50, 300));
        assert!(main[..main.len() - 1].iter().all(|x| !x));
        assert!(
            probe[..FOR_MS as usize - 1].iter().all(|&x| x),
            "probing pauses"
        );
        assert!(!p.on);
        // Not pausing: 10 us a command; pausing: 6 us at the same rate.
        coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (50, 300));
        assert!(p.on, "pausing saved 40% of the CPU per command");
        assert_eq!(p.every, COALESCE_PROBE_EVERY, "a change probes again soon");
        // On: iterations with a batch pause, a lone command never does,
        // nor commands that came other than by socket reads (iSER).
        at += Duration::from_millis(1);
        cpu += 1000;
        let c = cpu;
        assert!(p.observe(at, 4, true, || Some(c)));
        assert!(!p.observe(at, 1, true, || Some(c)));
        assert!(!p.observe(at, 4, false, || Some(c)));
        // The load changes: pausing now costs as much as not (reads at
        // depth), so the next probe, run without pausing, turns it off.
        let (main, probe) = coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (50, 500));
        // (This main window began a millisecond early, with the lone
        // commands above.)
        assert!(main[..main.len() - 2].iter().all(|&x| x));
        assert!(probe[..FOR_MS as usize - 2].iter().all(|&x| !x));
        assert!(!p.on, "no CPU saved: back to answering at once");
    }

    #[test]
    fn receive_coalescing_stays_off_when_pausing_costs_rate_or_sees_little() {
        let (mut at, mut cpu) = (Instant::now(), 1u64);
        let mut p = CoalescePolicy::new(at);
        coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (50, 500));
        // Pausing halves the CPU per command but also the rate.
        coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (25, 125));
        assert!(!p.on, "half the IOPS is too much to pay");
        // Pausing saves 5% only.
        coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (50, 475));
        assert!(!p.on, "too little saved to be worth the latency");
        // Too few commands in the probe to judge.
        coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (2, 1));
        assert!(!p.on);
        // No CPU reading: nothing is decided.
        let ms = p.every.as_millis() as u64;
        coalesce_window(&mut p, &mut at, &mut cpu, ms, 50, 500);
        for _ in 0..FOR_MS {
            at += Duration::from_millis(1);
            p.observe(at, 50, true, || None);
        }
        assert!(!p.on);
        // Idle: no decision either way.
        coalesce_round(&mut p, &mut at, &mut cpu, (0, 10), (0, 10));
        assert!(!p.on);
    }

    #[test]
    fn receive_coalescing_probes_less_often_while_the_choice_holds() {
        let (mut at, mut cpu) = (Instant::now(), 1u64);
        let mut p = CoalescePolicy::new(at);
        coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (50, 300));
        coalesce_round(&mut p, &mut at, &mut cpu, (50, 500), (50, 300));
        assert!(p.on);
        assert_eq!(p.every, COALESCE_PROBE_EVERY);
        // The same load, confirmed again and again: the main window
        // doubles up to the cap (the first confirmation compares with the
        // window before the switch, at the same rate).
        let mut seen = vec![];
        for _ in 0..6 {
            coalesce_round(&mut p, &mut at, &mut cpu, (50, 300), (50, 500));
            assert!(p.on);
            seen.push(p.every.as_millis() as u64);
        }
        let every = EVERY_MS;
        let max = COALESCE_PROBE_EVERY_MAX.as_millis() as u64;
        assert_eq!(seen[..3], [every * 2, every * 4, every * 8]);
        assert_eq!(*seen.last().unwrap(), max);
        // Within a long stretch the load changes, and the part of the
        // stretch that saw it ends the stretch: the probe runs at once, and
        // the next stretch is short again. First the rate falls to a third.
        coalesce_window(&mut p, &mut at, &mut cpu, 2 * EVERY_MS, 50, 300);
        assert!(!p.probing, "same load: no probe yet");
        coalesce_window(&mut p, &mut at, &mut cpu, EVERY_MS, 16, 96);
        assert!(p.probing, "a third of the rate ends the stretch");
        coalesce_window(&mut p, &mut at, &mut cpu, FOR_MS, 16, 160);
        assert!(!p.probing && p.on);
        assert_eq!(p.every, COALESCE_PROBE_EVERY);
        // Then, back at the longest stretch, the same rate at twice the CPU
        // per command (reads at depth followed by writes).
        for _ in 0..4 {
            coalesce_round(&mut p, &mut at, &mut cpu, (50, 300), (50, 500));
        }
        assert_eq!(p.every, COALESCE_PROBE_EVERY_MAX);
        coalesce_window(&mut p, &mut at, &mut cpu, EVERY_MS, 50, 300);
        assert!(!p.probing);
        coalesce_window(&mut p, &mut at, &mut cpu, EVERY_MS, 50, 600);
        assert!(p.probing, "twice the cost per command ends the stretch");
        coalesce_window(&mut p, &mut at, &mut cpu, FOR_MS, 50, 1000);
        assert!(!p.probing && p.on);
        assert_eq!(p.every, COALESCE_PROBE_EVERY);
    }

    #[test]
    fn thread_cpu_time_is_read_and_grows() {
        let a = thread_cpu_ns().expect("/proc/thread-self/schedstat");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = thread_cpu_ns().unwrap();
        assert!(b >= a + 10_000_000, "{a} -> {b} after 20 ms of spinning");
    }

    #[test]
    fn task_tag_round_trip() {
        for &(core, local, task) in &[
            (0usize, 0u32, 0u32),
            (1, 5, 0xffff_ffff),
            (255, LOCAL_ID_MASK, 0x1234_5678),
        ] {
            let t = task_tag(core, local, task);
            assert_eq!(tag_core(t), core);
            assert_eq!(tag_local(t), local);
            assert_eq!(t as u32, task);
        }
    }
}
