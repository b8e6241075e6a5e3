//! The iSER side of the engine (RFC 7145): RDMA CM listeners, one device
//! (PD, CQ with a completion channel, SRQ kept full of receive slots, a
//! slab of registered send slots, the data pool registered once per
//! arena), and per connection an [`IserLink`]: its queue pair, the PDUs
//! waiting for a send slot, and the RDMA operations in flight.
//!
//! The engine drives all of it from reactor 0 (iSER connections are not
//! placed on other cores yet); this module owns the verbs objects and the
//! bookkeeping, the engine owns the protocol (`iscsi::conn::Connection`).
//!
//! Work request ids: receives carry `RECV_BIT | slot`; everything on a
//! send queue carries `local id << 32 | op index`, the op being a slot in
//! the link's `ops` slab (a Send's slot, an RDMA Write's buffer, an RDMA
//! Read's task). Only the last request of a group is signaled; the
//! op records how many send-queue entries the group took.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use iscsi::conn::TaskId;
use mempool::{DataBuf, DataDest, Pool, RegistrarId};
use rdma::iser::IserCmHeader;
use rdma::{
    AccessFlags, CmId, CmIdRef, CompletionQueue, ConnectRequest, Context, DeviceAttr, EventChannel,
    OwnedRegion, ProtectionDomain, QpInit, RecvWr, SendFlags, SendOp, SendWr, Sge,
    SharedReceiveQueue,
};
use transport_iser::framing::pdu_len;
use transport_iser::header::{IserHeader, ISER_HDR_LEN};

/// Data segment we accept in one received message (TargetRecvDataSegmentLength
/// we declare on iSER): receive slots are sized from it.
pub const RECV_DATA_MAX: u32 = 8192;
/// One receive slot: iSER header, BHS, AHS up to 256 bytes, data segment.
pub const RECV_SLOT: usize = 8704;
/// Receive slots in the SRQ (shared by every iSER connection).
pub const RECV_SLOTS: usize = 1024;
/// One send slot: iSER header and one PDU (login responses carry up to
/// 8 KiB of data; full-feature PDUs are headers and a little sense).
pub const SEND_SLOT: usize = 8704;
pub const SEND_SLOTS: usize = 1024;
/// Send-queue entries per connection.
pub const SQ_DEPTH: u32 = 2048;
/// Largest piece one RDMA Read or Write moves.
pub const RDMA_CHUNK: usize = 1 << 20;
/// RDMA requests one Write or Read of a command may take.
pub const MAX_CHUNKS: usize = 32;
pub const RECV_BIT: u64 = 1 << 63;
/// The bounce region: chunks of this size, this many (32 MiB).
pub const BOUNCE_CHUNK: usize = 1 << 20;
pub const BOUNCE_CHUNKS: usize = 32;

fn chunk_len(len: usize) -> usize {
    RDMA_CHUNK.max(len.div_ceil(MAX_CHUNKS))
}

/// Work requests an RDMA transfer of `len` bytes in one buffer takes.
#[cfg(test)]
fn chunks(len: usize) -> usize {
    len.div_ceil(chunk_len(len)).max(1)
}

/// Entries of a connection's ITT -> STag table for Send with Invalidate
/// (a power of two; commands in flight on a connection are far fewer).
pub const INV_SLOTS: usize = 256;
/// Slots an ITT may take, from its hashed start.
pub const INV_PROBE: usize = 8;

/// The STag a command advertised, kept until its SCSI Response.
#[derive(Clone, Copy, Default)]
struct InvEntry {
    itt: u32,
    stag: u32,
    valid: bool,
}

/// Send with Invalidate (RFC 7145 5.1.3) for one connection: the STag
/// each command advertised, by ITT, until its SCSI Response invalidates
/// it. A hashed table with a short probe window and no allocation: when a
/// window is full one invalidation is lost (the initiator then does it
/// itself), and a lookup matches the whole ITT, so a wrong STag is never
/// invalidated.
pub struct InvTable {
    /// Both sides agreed on Send with Invalidate at connect time.
    pub on: bool,
    e: [InvEntry; INV_SLOTS],
}

impl InvTable {
    pub fn new(on: bool) -> InvTable {
        InvTable {
            on,
            e: [InvEntry::default(); INV_SLOTS],
        }
    }

    /// The slots an ITT may occupy: a hashed start and the few after it.
    /// Linux takes ITTs from block-layer tags, which two CPUs hand out
    /// from hints far apart, so the ITTs in flight are not a compact range:
    /// an ITT taken modulo the table size collided systematically (in the
    /// VM test three responses in four lost their invalidation).
    fn window(itt: u32) -> impl Iterator<Item = usize> {
        let start = (itt.wrapping_mul(0x9e37_79b1) >> 24) as usize;
        (0..INV_PROBE).map(move |i| (start + i) % INV_SLOTS)
    }

    /// A SCSI Command arrived with `tags`: remember the STag its response
    /// will invalidate (the read buffer's, else the write buffer's).
    pub fn note_command(&mut self, itt: u32, tags: iscsi::conn::RdmaTags) {
        if !self.on {
            return;
        }
        // A stale entry of the same ITT (its task ended without a
        // response) goes first, whatever this command brings.
        if let Some(k) = Self::window(itt).find(|&k| self.e[k].valid && self.e[k].itt == itt) {
            self.e[k].valid = false;
        }
        let Some((stag, _)) = tags.read.or(tags.write) else {
            return;
        };
        // A full window (stale entries of aborted tasks, or many commands
        // hashing alike) gives up its first slot: that command's response
        // then goes as a plain Send and the initiator invalidates itself.
        let k = Self::window(itt)
            .find(|&k| !self.e[k].valid)
            .unwrap_or_else(|| Self::window(itt).next().expect("INV_PROBE > 0"));
        self.e[k] = InvEntry {
            itt,
            stag,
            valid: true,
        };
    }

    /// How PDU `pdu` goes out: a SCSI Response whose command advertised
    /// an STag invalidates it, once.
    pub fn send_op(&mut self, pdu: &[u8]) -> SendOp {
        if !self.on || !is_scsi_response(pdu) {
            return SendOp::Send;
        }
        let itt = u32::from_be_bytes([pdu[16], pdu[17], pdu[18], pdu[19]]);
        match Self::window(itt).find(|&k| self.e[k].valid && self.e[k].itt == itt) {
            Some(k) => {
                self.e[k].valid = false;
                SendOp::SendWithInv {
                    invalidate_rkey: self.e[k].stag,
                }
            }
            None => SendOp::Send,
        }
    }
}

pub fn op_wr_id(local: u32, op: u32) -> u64 {
    (local as u64) << 32 | op as u64
}

pub fn wr_local(wr_id: u64) -> u32 {
    (wr_id >> 32) as u32
}

pub fn wr_op(wr_id: u64) -> u32 {
    wr_id as u32
}

/// Counters the engine exports.
#[derive(Debug, Default, Clone, Copy)]
pub struct IserCounters {
    pub connections_accepted: u64,
    pub connect_rejects: u64,
    pub sends: u64,
    pub recvs: u64,
    pub rdma_writes: u64,
    pub rdma_reads: u64,
    pub rdma_write_bytes: u64,
    pub rdma_read_bytes: u64,
    /// Read data copied into a pool buffer because it sat on the heap.
    pub bounce_copies: u64,
    /// SCSI Responses sent with Send with Invalidate.
    pub send_invalidates: u64,
    /// SCSI Responses sent as plain Sends on connections that agreed on
    /// Send with Invalidate (no STag advertised, or its entry lost).
    pub responses_without_invalidate: u64,
    pub completion_errors: u64,
}

/// One reactor's iSER side: its RDMA CM event channel (reactor 0's also
/// holds the listeners), its part of the device once one is known, and
/// the maps from queue pair and CM id to its connections.
pub struct IserPortals {
    pub cm: EventChannel,
    /// Listener ids and the engine portal index each maps to (for TPGT);
    /// empty except on reactor 0.
    pub listeners: Vec<(CmId, usize)>,
    /// Reactor 0: the portals to listen on again after a device removal.
    pub addrs: Vec<(SocketAddr, usize)>,
    pub dev: Option<IserDevice>,
    pub by_qp: HashMap<u32, u32>,
    pub by_cm: HashMap<CmIdRef, u32>,
    pub counters: IserCounters,
}

impl IserPortals {
    /// Opens the event channel and listens on `addrs` (address, portal
    /// index). `Err` with a message when there is no RDMA at all.
    pub fn open(addrs: &[(SocketAddr, usize)]) -> Result<IserPortals, String> {
        let mut ip = IserPortals::for_core()?;
        ip.addrs = addrs.to_vec();
        if !ip.listen(true) {
            return Err("no iSER portal could listen".into());
        }
        Ok(ip)
    }

    /// Listens on every portal; true if any listens. `loud` logs each
    /// failure (at start-up; retries after a device removal stay quiet).
    pub fn listen(&mut self, loud: bool) -> bool {
        for &(addr, portal) in &self.addrs {
            match self.cm.listen(addr, 128) {
                Ok(l) => {
                    tracing::info!(%addr, "iSER portal listening");
                    self.listeners.push((l, portal));
                }
                Err(e) if loud => {
                    tracing::warn!(%addr, "iSER portal cannot listen: {e}; skipping it")
                }
                Err(e) => tracing::debug!(%addr, "iSER portal cannot listen yet: {e}"),
            }
        }
        !self.listeners.is_empty()
    }

    /// A reactor's side without listeners: connections placed on it are
    /// migrated to its event channel.
    pub fn for_core() -> Result<IserPortals, String> {
        let cm = EventChannel::new().map_err(|e| e.to_string())?;
        Ok(IserPortals {
            cm,
            listeners: Vec::new(),
            addrs: Vec::new(),
            dev: None,
            by_qp: HashMap::new(),
            by_cm: HashMap::new(),
            counters: IserCounters::default(),
        })
    }

    /// The device of the first listener bound to one, if any.
    pub fn listener_context(&self) -> Option<Context> {
        self.listeners.iter().find_map(|(l, _)| l.context().ok())
    }

    pub fn portal_of(&self, listener: CmIdRef) -> usize {
        self.listeners
            .iter()
            .find(|(l, _)| l.handle() == listener)
            .map_or(0, |(_, p)| *p)
    }
}

/// Receive slots in one core's SRQ: `RECV_SLOTS`, or what the device
/// allows.
fn recv_slots(attr: &DeviceAttr) -> usize {
    RECV_SLOTS.min(attr.max_srq_wr.max(64) as usize)
}

/// What every core's part of one RDMA device shares: the context, the one
/// protection domain, and the data pool's registration in it.
pub struct DeviceShared {
    /// (base, len, lkey) of every pool arena.
    arenas: Vec<(usize, usize, u32)>,
    pub attr: DeviceAttr,
    /// ibv_reg_mr calls once every core's part was set up (pool arenas,
    /// slabs): the counter that must stay flat under load.
    pub regs_at_setup: std::sync::atomic::AtomicU64,
    rid: RegistrarId,
    pool: Pool,
    pub pd: ProtectionDomain,
    pub ctx: Context,
}

impl Drop for DeviceShared {
    /// The last core's part is gone: the pool's arenas are deregistered
    /// from the PD (before the PD and context fields drop), so nothing of
    /// ours holds the device any more.
    fn drop(&mut self) {
        self.pool.remove_registrar(self.rid);
    }
}

impl DeviceShared {
    /// Registrations made since the device was set up (zero when no
    /// memory is registered on the I/O path).
    pub fn registrations_since_setup(&self) -> u64 {
        self.pd.registrations() - self.regs_at_setup()
    }

    pub fn regs_at_setup(&self) -> u64 {
        self.regs_at_setup
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One reactor core's part of an RDMA device: its completion queue (with
/// a completion channel the reactor polls), its shared receive queue kept
/// full of receive slots, its send slots and bounce chunks. Queue pairs of
/// the connections placed on the core use this CQ and SRQ, so a core's
/// completions never touch another core.
pub struct IserDevice {
    // Field order is drop order: queues before the PD and context.
    pub srq: SharedReceiveQueue,
    pub cq: CompletionQueue,
    recv: OwnedRegion,
    send: OwnedRegion,
    send_free: Vec<u32>,
    /// Registered chunks for data whose buffer is not in the pool (a heap
    /// fallback when the pool is exhausted): copied, never registered.
    bounce: OwnedRegion,
    bounce_free_list: Vec<u16>,
    pub armed: bool,
    pub shared: std::sync::Arc<DeviceShared>,
}

impl IserDevice {
    /// Sets up `ctx` for `cores` reactors: one PD with the data pool
    /// registered in it once per arena, and one [`IserDevice`] per core
    /// (index = reactor), its receives posted.
    pub fn open_all(ctx: Context, pool: &Pool, cores: usize) -> Result<Vec<IserDevice>, String> {
        let attr = ctx.query().map_err(|e| e.to_string())?;
        let pd = ctx.alloc_pd().map_err(|e| e.to_string())?;
        let rid = pool
            .add_registrar(Box::new(pd.registrar(AccessFlags::LOCAL_WRITE)))
            .map_err(|e| format!("registering the data pool: {e}"))?;
        let arenas = pool
            .arenas()
            .iter()
            .filter_map(|a| {
                let k = pool.keys().get(a.id, rid)?;
                Some((a.base as usize, a.len_bytes, k.lkey))
            })
            .collect();
        let shared = std::sync::Arc::new(DeviceShared {
            arenas,
            attr,
            regs_at_setup: Default::default(),
            rid,
            pool: pool.clone(),
            pd,
            ctx,
        });
        let devs = (0..cores.max(1))
            .map(|_| IserDevice::new_core(shared.clone()))
            .collect::<Result<Vec<_>, String>>()?;
        shared.regs_at_setup.store(
            shared.pd.registrations(),
            std::sync::atomic::Ordering::Relaxed,
        );
        tracing::info!(
            device = %shared.ctx.name(),
            cores = devs.len(),
            max_sge = shared.attr.max_sge,
            max_qp_init_rd_atom = shared.attr.max_qp_init_rd_atom,
            registrations = shared.regs_at_setup(),
            recv_slots_per_core = recv_slots(&shared.attr),
            "iSER device ready: data pool registered once per arena, a CQ and SRQ per core, receives posted"
        );
        Ok(devs)
    }

    fn new_core(shared: std::sync::Arc<DeviceShared>) -> Result<IserDevice, String> {
        let (ctx, pd, attr) = (&shared.ctx, &shared.pd, &shared.attr);
        let cqe = (RECV_SLOTS as u32 + 8 * SQ_DEPTH).min(attr.max_cqe.max(1024));
        let cq = CompletionQueue::new(ctx, cqe, true).map_err(|e| e.to_string())?;
        let nrecv = recv_slots(attr);
        let srq = SharedReceiveQueue::new(pd, nrecv as u32, 1).map_err(|e| e.to_string())?;
        let recv = OwnedRegion::new(pd, RECV_SLOT * nrecv, AccessFlags::LOCAL_WRITE)
            .map_err(|e| e.to_string())?;
        let send = OwnedRegion::new(pd, SEND_SLOT * SEND_SLOTS, AccessFlags::LOCAL_WRITE)
            .map_err(|e| e.to_string())?;
        let bounce = OwnedRegion::new(pd, BOUNCE_CHUNK * BOUNCE_CHUNKS, AccessFlags::LOCAL_WRITE)
            .map_err(|e| e.to_string())?;
        let dev = IserDevice {
            srq,
            cq,
            recv,
            send,
            send_free: (0..SEND_SLOTS as u32).rev().collect(),
            bounce,
            bounce_free_list: (0..BOUNCE_CHUNKS as u16).rev().collect(),
            armed: false,
            shared,
        };
        for slot in 0..nrecv {
            dev.repost(slot).map_err(|e| e.to_string())?;
        }
        Ok(dev)
    }

    /// Gives receive slot `slot` back to the SRQ.
    pub fn repost(&self, slot: usize) -> rdma::Result<()> {
        let sge = self
            .recv
            .sge(slot * RECV_SLOT, RECV_SLOT)
            .expect("slot inside the region");
        self.srq.post_recv(&[RecvWr {
            wr_id: RECV_BIT | slot as u64,
            sges: std::slice::from_ref(&sge),
        }])
    }

    /// The bytes a receive completion delivered into `slot`.
    pub fn received(&self, slot: usize, len: usize) -> Option<&[u8]> {
        let start = slot.checked_mul(RECV_SLOT)?;
        if len > RECV_SLOT {
            return None;
        }
        self.recv.as_slice().get(start..start + len)
    }

    /// The lkey covering `len` bytes at `addr`, when they lie in one
    /// registered pool arena.
    pub fn lkey_for(&self, addr: usize, len: usize) -> Option<u32> {
        self.shared
            .arenas
            .iter()
            .find(|(b, l, _)| addr >= *b && addr + len <= b + l)
            .map(|a| a.2)
    }

    /// The local scatter-gather list of an RDMA transfer of `len` bytes
    /// from or into `pieces` (the pieces of a command's `DataBuf`, in
    /// order, as address and length): each split as `post_rdma` splits
    /// one buffer, with the lkey of the arena it lies in. `None` when a
    /// piece is in no registered arena (a heap buffer) or the list would
    /// exceed `MAX_CHUNKS`.
    pub fn sges_for(
        &self,
        pieces: impl Iterator<Item = (usize, usize)>,
        len: usize,
        sges: &mut [Sge; MAX_CHUNKS],
    ) -> Option<usize> {
        let chunk = chunk_len(len);
        let mut n = 0;
        for (addr, plen) in pieces {
            let lkey = self.lkey_for(addr, plen)?;
            let mut off = 0;
            while off < plen {
                let l = chunk.min(plen - off);
                *sges.get_mut(n)? = Sge::new((addr + off) as u64, l as u32, lkey);
                n += 1;
                off += l;
            }
        }
        (n > 0).then_some(n)
    }

    /// Bounce chunks for `len` bytes, with their scatter-gather list
    /// (`None` when not enough are free).
    pub fn bounce_alloc(&mut self, len: usize, sges: &mut [Sge; MAX_CHUNKS]) -> Option<Bounce> {
        let n = len.div_ceil(BOUNCE_CHUNK);
        if n == 0 || n > MAX_CHUNKS || self.bounce_free_list.len() < n {
            return None;
        }
        let mut b = Bounce {
            chunks: [0; MAX_CHUNKS],
            n: n as u8,
        };
        for (i, (slot, sge)) in b.chunks.iter_mut().zip(sges.iter_mut()).take(n).enumerate() {
            let c = self.bounce_free_list.pop().expect("counted above");
            *slot = c;
            let l = BOUNCE_CHUNK.min(len - i * BOUNCE_CHUNK);
            *sge = self
                .bounce
                .sge(c as usize * BOUNCE_CHUNK, l)
                .expect("chunk inside the region");
        }
        Some(b)
    }

    pub fn bounce_free(&mut self, b: &Bounce) {
        self.bounce_free_list
            .extend_from_slice(&b.chunks[..b.n as usize]);
    }

    /// Copies `data` into the chunks of `b` (sized for it).
    pub fn bounce_fill(&mut self, b: &Bounce, data: &[u8]) {
        let region = self.bounce.as_mut_slice();
        for (i, piece) in data.chunks(BOUNCE_CHUNK).enumerate() {
            let at = b.chunks[i] as usize * BOUNCE_CHUNK;
            region[at..at + piece.len()].copy_from_slice(piece);
        }
    }

    /// Copies the chunks of `b` into `out`.
    pub fn bounce_drain(&self, b: &Bounce, out: &mut DataDest<'_>) {
        let region = self.bounce.as_slice();
        let mut done = 0;
        for &c in &b.chunks[..b.n as usize] {
            let n = (out.len() - done).min(BOUNCE_CHUNK);
            let at = c as usize * BOUNCE_CHUNK;
            out.copy_from(done, &region[at..at + n]);
            done += n;
        }
    }
}

/// What one entry of a link's op slab is waiting for.
pub enum Op {
    Send {
        slot: u32,
    },
    /// The buffer read data was RDMA-Written from, held until the write
    /// completes.
    Write {
        buf: DataBuf,
        wrs: u32,
    },
    Read {
        task: TaskId,
        ttt: u32,
        wrs: u32,
    },
    /// Read data copied into bounce chunks (its buffer was on the heap),
    /// written from there.
    BounceWrite {
        bounce: Bounce,
        wrs: u32,
    },
    /// Write data read into bounce chunks, copied into the task's buffer
    /// (on the heap) when the reads complete.
    BounceRead {
        task: TaskId,
        ttt: u32,
        offset: u32,
        len: u32,
        bounce: Bounce,
        wrs: u32,
    },
}

/// Bounce chunks one transfer holds.
#[derive(Clone, Copy)]
pub struct Bounce {
    pub chunks: [u16; MAX_CHUNKS],
    pub n: u8,
}

pub struct PendingRead {
    pub task: TaskId,
    pub ttt: u32,
    pub offset: u32,
    pub len: u32,
    pub stag: u32,
    pub va: u64,
}

/// One iSER connection's transport state.
pub struct IserLink {
    // Declared first, so dropped first: the queue pair is destroyed
    // before the buffers its requests point at are freed.
    pub id: CmId,
    pub qp_num: u32,
    pub established: bool,
    /// We called rdma_disconnect (answering the peer's, or closing).
    pub disconnected: bool,
    /// A work request failed: the queue pair is in error.
    pub broken: bool,
    /// The device was removed: nothing posted will complete; release now.
    pub device_gone: bool,
    /// When closing began (for the teardown timeout).
    pub closing_since: Option<std::time::Instant>,
    /// Whole PDUs waiting for a send slot.
    pub stream: Vec<u8>,
    pub ops: Vec<Option<Op>>,
    ops_free: Vec<u32>,
    pub sq_used: u32,
    pub sq_max: u32,
    pub pending_reads: VecDeque<PendingRead>,
    /// Send with Invalidate: saves the initiator a local invalidation of
    /// its memory registration per command.
    pub inv: InvTable,
}

impl IserLink {
    /// Creates the QP for a connect request and accepts it with the iSER
    /// CM reply. Returns the link, or why the request was refused.
    pub fn accept(req: ConnectRequest, dev: &IserDevice) -> Result<IserLink, String> {
        let Some(hdr) = IserCmHeader::decode(&req.private_data) else {
            return Err(format!(
                "connect request without an iSER CM header ({} bytes of private data)",
                req.private_data.len()
            ));
        };
        let req_depths = (req.initiator_depth, req.responder_resources);
        let mut id = req.id;
        let sh = &dev.shared;
        if !id.is_on(&sh.ctx) {
            return Err("connect request on another RDMA device".into());
        }
        let sq = SQ_DEPTH.min(sh.attr.max_qp_wr.max(64));
        let caps = id
            .create_qp(
                &sh.pd,
                &QpInit {
                    send_cq: &dev.cq,
                    recv_cq: &dev.cq,
                    srq: Some(&dev.srq),
                    max_send_wr: sq,
                    max_recv_wr: 0,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
            )
            .map_err(|e| format!("create_qp: {e}"))?;
        let reply_hdr = IserCmHeader::target_reply(&hdr, true);
        let send_inv = IserCmHeader::send_w_inv_agreed(&hdr, &reply_hdr);
        let reply = reply_hdr.encode();
        // The kernel's CM hands a connect request's depths over from the
        // receiver's point of view (the peer's responder resources arrive
        // as `initiator_depth`: how many RDMA Reads we may issue), as
        // LIO's isert reads them too. The Linux initiator offers its
        // device's maximum there and 1 as its own initiator depth.
        let init_depth = (sh.attr.max_qp_init_rd_atom.min(255) as u8).min(req.initiator_depth);
        let resp_res = (sh.attr.max_qp_rd_atom.min(255) as u8).min(req.responder_resources);
        id.accept(&rdma::ConnParam {
            private_data: &reply,
            initiator_depth: init_depth.max(1),
            responder_resources: resp_res,
            ..rdma::ConnParam::default()
        })
        .map_err(|e| format!("accept: {e}"))?;
        let qp_num = id.qp_num().unwrap_or(0);
        tracing::info!(
            peer = ?id.peer_addr(),
            qp_num,
            rdma_read_depth = init_depth,
            offered = ?(req_depths),
            send_queue = caps.max_send_wr,
            send_with_invalidate = send_inv,
            "iSER connection accepted"
        );
        Ok(IserLink {
            id,
            qp_num,
            established: false,
            disconnected: false,
            broken: false,
            device_gone: false,
            closing_since: None,
            stream: Vec::with_capacity(16 << 10),
            ops: Vec::with_capacity(512),
            ops_free: Vec::with_capacity(512),
            sq_used: 0,
            sq_max: caps.max_send_wr.min(sq),
            pending_reads: VecDeque::with_capacity(64),
            inv: InvTable::new(send_inv),
        })
    }

    fn op_alloc(&mut self, op: Op) -> u32 {
        match self.ops_free.pop() {
            Some(i) => {
                self.ops[i as usize] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        }
    }

    /// Takes op `i` (completed), freeing its slab entry.
    pub fn op_take(&mut self, i: u32) -> Option<Op> {
        let op = self.ops.get_mut(i as usize)?.take()?;
        self.ops_free.push(i);
        let wrs = match &op {
            Op::Send { .. } => 1,
            Op::Write { wrs, .. }
            | Op::Read { wrs, .. }
            | Op::BounceWrite { wrs, .. }
            | Op::BounceRead { wrs, .. } => *wrs,
        };
        self.sq_used = self.sq_used.saturating_sub(wrs);
        Some(op)
    }

    pub fn idle(&self) -> bool {
        self.sq_used == 0
    }

    /// Posts Sends for the whole PDUs in `stream` while send slots and
    /// send-queue room last. Returns false when the connection must end
    /// (a PDU larger than a slot, or a post failed).
    pub fn post_sends(
        &mut self,
        local: u32,
        dev: &mut IserDevice,
        counters: &mut IserCounters,
    ) -> bool {
        if self.broken || self.disconnected {
            self.stream.clear();
            return true;
        }
        let hdr = IserHeader::TARGET.encode();
        let mut pos = 0;
        loop {
            let mut sges = [Sge::default(); 16];
            let mut ids = [0u64; 16];
            let mut ops = [SendOp::Send; 16];
            let mut n = 0;
            while n < 16 {
                let Some(len) = pdu_len(&self.stream[pos..]) else {
                    break;
                };
                if pos + len > self.stream.len() {
                    break;
                }
                if ISER_HDR_LEN + len > SEND_SLOT {
                    tracing::warn!(
                        local,
                        len,
                        "PDU larger than an iSER send slot; ending the connection"
                    );
                    return false;
                }
                if self.sq_used >= self.sq_max {
                    break;
                }
                let Some(slot) = dev.send_free.pop() else {
                    break;
                };
                let pdu = &self.stream[pos..pos + len];
                ops[n] = self.inv.send_op(pdu);
                if self.inv.on && matches!(ops[n], SendOp::Send) && is_scsi_response(pdu) {
                    counters.responses_without_invalidate += 1;
                }
                let off = slot as usize * SEND_SLOT;
                let dst = &mut dev.send.as_mut_slice()[off..off + ISER_HDR_LEN + len];
                dst[..ISER_HDR_LEN].copy_from_slice(&hdr);
                dst[ISER_HDR_LEN..].copy_from_slice(&self.stream[pos..pos + len]);
                sges[n] = dev
                    .send
                    .sge(off, ISER_HDR_LEN + len)
                    .expect("slot inside the region");
                ids[n] = op_wr_id(local, self.op_alloc(Op::Send { slot }));
                self.sq_used += 1;
                pos += len;
                n += 1;
            }
            if n == 0 {
                break;
            }
            let mut wrs = [SendWr {
                wr_id: 0,
                op: SendOp::Send,
                sges: &[],
                flags: SendFlags::SIGNALED,
            }; 16];
            for i in 0..n {
                wrs[i].wr_id = ids[i];
                wrs[i].op = ops[i];
                wrs[i].sges = std::slice::from_ref(&sges[i]);
            }
            if let Err(e) = self.id.post_send(&wrs[..n]) {
                tracing::warn!(local, "iSER post of Sends failed: {e}");
                self.broken = true;
                return false;
            }
            counters.sends += n as u64;
            counters.send_invalidates += ops[..n]
                .iter()
                .filter(|o| matches!(o, SendOp::SendWithInv { .. }))
                .count() as u64;
        }
        self.stream.drain(..pos);
        true
    }

    /// Posts one RDMA request per local piece in `sges` (`sges_for`), the
    /// remote side contiguous from `va`; the last request signaled with
    /// `op`. `Err(Some(op))`: nothing posted (no room in the send queue,
    /// or the link is down); `Err(None)`: the post failed and the link is
    /// broken.
    pub fn post_rdma_sges(
        &mut self,
        local: u32,
        write: bool,
        sges: &[Sge],
        stag: u32,
        va: u64,
        op: Op,
    ) -> Result<(), Option<Op>> {
        let n = sges.len();
        if self.broken || self.disconnected || n == 0 || n > MAX_CHUNKS {
            return Err(Some(op));
        }
        if self.sq_used + n as u32 > self.sq_max {
            return Err(Some(op));
        }
        let idx = self.op_alloc(op);
        let wr_id = op_wr_id(local, idx);
        let mut wrs = [SendWr {
            wr_id,
            op: SendOp::Send,
            sges: &[],
            flags: SendFlags::NONE,
        }; MAX_CHUNKS];
        let mut off = 0u64;
        for i in 0..n {
            let remote_addr = va.wrapping_add(off);
            off += sges[i].length() as u64;
            wrs[i].op = if write {
                SendOp::RdmaWrite {
                    remote_addr,
                    rkey: stag,
                }
            } else {
                SendOp::RdmaRead {
                    remote_addr,
                    rkey: stag,
                }
            };
            wrs[i].sges = std::slice::from_ref(&sges[i]);
        }
        wrs[n - 1].flags = SendFlags::SIGNALED;
        self.sq_used += n as u32;
        if let Err(e) = self.id.post_send(&wrs[..n]) {
            tracing::warn!(
                local,
                "iSER post of RDMA {} failed: {e}",
                if write { "Write" } else { "Read" }
            );
            self.broken = true;
            // The op stays in the slab: flushed completions (if any) or
            // the teardown free it.
            return Err(None);
        }
        Ok(())
    }

    /// Send slots held by ops still in flight (returned to the device at
    /// teardown, once the queue pair is gone).
    pub fn release(self, dev: Option<&mut IserDevice>) -> Vec<DataBuf> {
        let IserLink { id, ops, .. } = self;
        drop(id);
        let mut bufs = Vec::new();
        let mut slots = Vec::new();
        let mut bounces = Vec::new();
        for op in ops.into_iter().flatten() {
            match op {
                Op::Send { slot } => slots.push(slot),
                Op::Write { buf, .. } => bufs.push(buf),
                Op::Read { .. } => {}
                Op::BounceWrite { bounce, .. } | Op::BounceRead { bounce, .. } => {
                    bounces.push(bounce)
                }
            }
        }
        if let Some(dev) = dev {
            dev.send_free.extend(slots);
            for b in &bounces {
                dev.bounce_free(b);
            }
        }
        bufs
    }
}

fn is_scsi_response(pdu: &[u8]) -> bool {
    pdu.len() >= iscsi::pdu::BHS_LEN && pdu[0] & 0x3f == iscsi::pdu::opcode::SCSI_RESP
}

/// Hands a completed Send's slot back.
pub fn free_send_slot(dev: &mut IserDevice, slot: u32) {
    dev.send_free.push(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_transfers_split_into_bounded_chunks() {
        for len in [
            1usize,
            4096,
            RDMA_CHUNK,
            RDMA_CHUNK + 1,
            8 << 20,
            16 << 20,
            64 << 20,
        ] {
            let n = chunks(len);
            assert!((1..=MAX_CHUNKS).contains(&n), "{len}: {n}");
            // The pieces cover the transfer exactly, none empty.
            let c = chunk_len(len);
            assert!(c * n >= len && c * (n - 1) < len, "{len}");
        }
        assert_eq!(chunks(8 << 20), 8);
        assert_eq!(chunks(64 << 20), MAX_CHUNKS);
    }

    fn response(itt: u32) -> [u8; 48] {
        let mut p = [0u8; 48];
        p[0] = 0x21;
        p[16..20].copy_from_slice(&itt.to_be_bytes());
        p
    }

    fn tags(read: Option<u32>, write: Option<u32>) -> iscsi::conn::RdmaTags {
        iscsi::conn::RdmaTags {
            read: read.map(|s| (s, 0x1000)),
            write: write.map(|s| (s, 0x2000)),
        }
    }

    #[test]
    fn a_response_invalidates_its_commands_stag_once() {
        let mut t = InvTable::new(true);
        t.note_command(7, tags(Some(0x11), None));
        t.note_command(8, tags(None, Some(0x22)));
        assert!(matches!(
            t.send_op(&response(8)),
            SendOp::SendWithInv {
                invalidate_rkey: 0x22
            }
        ));
        assert!(matches!(
            t.send_op(&response(7)),
            SendOp::SendWithInv {
                invalidate_rkey: 0x11
            }
        ));
        // Once only, and never for other PDUs or unknown ITTs.
        assert!(matches!(t.send_op(&response(7)), SendOp::Send));
        assert!(matches!(t.send_op(&response(9)), SendOp::Send));
        t.note_command(10, tags(Some(0x33), None));
        let mut nop_in = response(10);
        nop_in[0] = 0x20;
        assert!(matches!(t.send_op(&nop_in), SendOp::Send));
        assert!(matches!(t.send_op(&response(10)[..40]), SendOp::Send));
    }

    #[test]
    fn itts_far_apart_keep_their_entries() {
        // Block-layer tags from two CPUs: ITTs a table size apart, the
        // pattern that a table indexed by ITT modulo its size lost.
        let mut t = InvTable::new(true);
        let itts: Vec<u32> = (0..16u32)
            .flat_map(|i| [i, i + INV_SLOTS as u32, i + 2 * INV_SLOTS as u32])
            .collect();
        for (n, &itt) in itts.iter().enumerate() {
            t.note_command(itt, tags(Some(0x1000 + n as u32), None));
        }
        let mut invalidated = 0;
        for (n, &itt) in itts.iter().enumerate() {
            if let SendOp::SendWithInv { invalidate_rkey } = t.send_op(&response(itt)) {
                assert_eq!(invalidate_rkey, 0x1000 + n as u32, "itt {itt:#x}");
                invalidated += 1;
            }
        }
        assert!(
            invalidated >= itts.len() - 2,
            "{invalidated} of {}",
            itts.len()
        );
    }

    #[test]
    fn a_full_window_and_stale_entries_never_invalidate_a_wrong_stag() {
        let mut t = InvTable::new(true);
        // Far more commands than slots, as when aborted tasks leave stale
        // entries behind: every invalidation that happens names the STag
        // of its own command.
        let n = 4 * INV_SLOTS as u32;
        for itt in 0..n {
            t.note_command(itt.wrapping_mul(7919), tags(None, Some(itt ^ 0xabcd)));
        }
        let mut invalidated = 0;
        for itt in 0..n {
            if let SendOp::SendWithInv { invalidate_rkey } =
                t.send_op(&response(itt.wrapping_mul(7919)))
            {
                assert_eq!(invalidate_rkey, itt ^ 0xabcd);
                invalidated += 1;
            }
        }
        assert!(invalidated > 0 && invalidated <= INV_SLOTS);
        // A command reusing the ITT of a task that ended without a
        // response drops the stale entry, with or without buffers.
        t.note_command(9, tags(Some(0x44), None));
        t.note_command(9, tags(None, None));
        assert!(matches!(t.send_op(&response(9)), SendOp::Send));
        t.note_command(9, tags(Some(0x44), None));
        t.note_command(9, tags(Some(0x55), None));
        assert!(matches!(
            t.send_op(&response(9)),
            SendOp::SendWithInv {
                invalidate_rkey: 0x55
            }
        ));
        assert!(matches!(t.send_op(&response(9)), SendOp::Send));
    }

    #[test]
    fn without_agreement_every_pdu_is_a_plain_send() {
        let mut t = InvTable::new(false);
        t.note_command(1, tags(Some(0x11), None));
        assert!(matches!(t.send_op(&response(1)), SendOp::Send));
    }

    #[test]
    fn work_request_ids_round_trip_and_never_look_like_receives() {
        for (local, op) in [(0u32, 0u32), (1, 7), ((1 << 24) - 1, u32::MAX)] {
            let id = op_wr_id(local, op);
            assert_eq!((wr_local(id), wr_op(id)), (local, op));
            assert_eq!(id & RECV_BIT, 0);
        }
    }
}
