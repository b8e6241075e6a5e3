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
use mempool::{DataBuf, Pool, RegistrarId};
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

/// Work requests an RDMA transfer of `len` bytes takes.
pub fn chunks(len: usize) -> usize {
    len.div_ceil(chunk_len(len)).max(1)
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
    pub completion_errors: u64,
}

/// The listeners and, once a device is known, everything built on it.
pub struct IserPortals {
    pub cm: EventChannel,
    /// Listener ids and the engine portal index each maps to (for TPGT).
    pub listeners: Vec<(CmId, usize)>,
    pub dev: Option<IserDevice>,
    pub by_qp: HashMap<u32, u32>,
    pub by_cm: HashMap<CmIdRef, u32>,
    pub counters: IserCounters,
}

impl IserPortals {
    /// Opens the event channel and listens on `addrs` (address, portal
    /// index). `Err` with a message when there is no RDMA at all.
    pub fn open(addrs: &[(SocketAddr, usize)]) -> Result<IserPortals, String> {
        let cm = EventChannel::new().map_err(|e| e.to_string())?;
        let mut listeners = Vec::new();
        for &(addr, portal) in addrs {
            match cm.listen(addr, 128) {
                Ok(l) => {
                    tracing::info!(%addr, "iSER portal listening");
                    listeners.push((l, portal));
                }
                Err(e) => tracing::warn!(%addr, "iSER portal cannot listen: {e}; skipping it"),
            }
        }
        if listeners.is_empty() {
            return Err("no iSER portal could listen".into());
        }
        Ok(IserPortals {
            cm,
            listeners,
            dev: None,
            by_qp: HashMap::new(),
            by_cm: HashMap::new(),
            counters: IserCounters::default(),
        })
    }

    /// Builds the device side from the first listener bound to one.
    pub fn try_device_from_listeners(&mut self, pool: &Pool) {
        if self.dev.is_some() {
            return;
        }
        let ctx = self.listeners.iter().find_map(|(l, _)| l.context().ok());
        if let Some(ctx) = ctx {
            match IserDevice::new(ctx, pool) {
                Ok(d) => self.dev = Some(d),
                Err(e) => tracing::warn!("iSER device setup failed: {e}"),
            }
        }
    }

    pub fn portal_of(&self, listener: CmIdRef) -> usize {
        self.listeners
            .iter()
            .find(|(l, _)| l.handle() == listener)
            .map_or(0, |(_, p)| *p)
    }
}

/// One RDMA device as the target uses it.
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
    /// (base, len, lkey) of every pool arena.
    arenas: Vec<(usize, usize, u32)>,
    pub attr: DeviceAttr,
    /// ibv_reg_mr calls once the device was set up (pool arenas, slabs):
    /// the counter that must stay flat under load.
    pub regs_at_setup: u64,
    pub armed: bool,
    pub _rid: RegistrarId,
    pub pd: ProtectionDomain,
    pub ctx: Context,
}

impl IserDevice {
    pub fn new(ctx: Context, pool: &Pool) -> Result<IserDevice, String> {
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
        let cqe = (RECV_SLOTS as u32 + 8 * SQ_DEPTH).min(attr.max_cqe.max(1024));
        let cq = CompletionQueue::new(&ctx, cqe, true).map_err(|e| e.to_string())?;
        let nrecv = RECV_SLOTS.min(attr.max_srq_wr.max(64) as usize);
        let srq = SharedReceiveQueue::new(&pd, nrecv as u32, 1).map_err(|e| e.to_string())?;
        let recv = OwnedRegion::new(&pd, RECV_SLOT * nrecv, AccessFlags::LOCAL_WRITE)
            .map_err(|e| e.to_string())?;
        let send = OwnedRegion::new(&pd, SEND_SLOT * SEND_SLOTS, AccessFlags::LOCAL_WRITE)
            .map_err(|e| e.to_string())?;
        let bounce = OwnedRegion::new(&pd, BOUNCE_CHUNK * BOUNCE_CHUNKS, AccessFlags::LOCAL_WRITE)
            .map_err(|e| e.to_string())?;
        let dev = IserDevice {
            srq,
            cq,
            recv,
            send,
            send_free: (0..SEND_SLOTS as u32).rev().collect(),
            bounce,
            bounce_free_list: (0..BOUNCE_CHUNKS as u16).rev().collect(),
            arenas,
            regs_at_setup: 0,
            armed: false,
            _rid: rid,
            attr,
            pd,
            ctx,
        };
        for slot in 0..nrecv {
            dev.repost(slot).map_err(|e| e.to_string())?;
        }
        let mut dev = dev;
        dev.regs_at_setup = dev.pd.registrations();
        tracing::info!(
            device = %dev.ctx.name(),
            max_sge = dev.attr.max_sge,
            max_qp_init_rd_atom = dev.attr.max_qp_init_rd_atom,
            registrations = dev.regs_at_setup,
            recv_slots = nrecv,
            "iSER device ready: data pool registered once per arena, receives posted"
        );
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
        self.arenas
            .iter()
            .find(|(b, l, _)| addr >= *b && addr + len <= b + l)
            .map(|a| a.2)
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
    pub fn bounce_drain(&self, b: &Bounce, out: &mut [u8]) {
        let region = self.bounce.as_slice();
        for (i, piece) in out.chunks_mut(BOUNCE_CHUNK).enumerate() {
            let at = b.chunks[i] as usize * BOUNCE_CHUNK;
            piece.copy_from_slice(&region[at..at + piece.len()]);
        }
    }

    /// Registrations made since the device was set up (zero when no
    /// memory is registered on the I/O path).
    pub fn registrations_since_setup(&self) -> u64 {
        self.pd.registrations() - self.regs_at_setup
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
    /// When closing began (for the teardown timeout).
    pub closing_since: Option<std::time::Instant>,
    /// Whole PDUs waiting for a send slot.
    pub stream: Vec<u8>,
    pub ops: Vec<Option<Op>>,
    ops_free: Vec<u32>,
    pub sq_used: u32,
    pub sq_max: u32,
    pub pending_reads: VecDeque<PendingRead>,
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
        if !id.is_on(&dev.ctx) {
            return Err("connect request on another RDMA device".into());
        }
        let sq = SQ_DEPTH.min(dev.attr.max_qp_wr.max(64));
        let caps = id
            .create_qp(
                &dev.pd,
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
        // Send with Invalidate is not used yet: plain Sends.
        let reply = IserCmHeader::target_reply(&hdr, false).encode();
        // The kernel's CM hands a connect request's depths over from the
        // receiver's point of view (the peer's responder resources arrive
        // as `initiator_depth`: how many RDMA Reads we may issue), as
        // LIO's isert reads them too. The Linux initiator offers its
        // device's maximum there and 1 as its own initiator depth.
        let init_depth = (dev.attr.max_qp_init_rd_atom.min(255) as u8).min(req.initiator_depth);
        let resp_res = (dev.attr.max_qp_rd_atom.min(255) as u8).min(req.responder_resources);
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
            "iSER connection accepted"
        );
        Ok(IserLink {
            id,
            qp_num,
            established: false,
            disconnected: false,
            broken: false,
            closing_since: None,
            stream: Vec::with_capacity(16 << 10),
            ops: Vec::with_capacity(512),
            ops_free: Vec::with_capacity(512),
            sq_used: 0,
            sq_max: caps.max_send_wr.min(sq),
            pending_reads: VecDeque::with_capacity(64),
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
    pub fn post_sends(&mut self, local: u32, dev: &mut IserDevice, sends: &mut u64) -> bool {
        if self.broken || self.disconnected {
            self.stream.clear();
            return true;
        }
        let hdr = IserHeader::TARGET.encode();
        let mut pos = 0;
        loop {
            let mut sges = [Sge::default(); 16];
            let mut ids = [0u64; 16];
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
                wrs[i].sges = std::slice::from_ref(&sges[i]);
            }
            if let Err(e) = self.id.post_send(&wrs[..n]) {
                tracing::warn!(local, "iSER post of Sends failed: {e}");
                self.broken = true;
                return false;
            }
            *sends += n as u64;
        }
        self.stream.drain(..pos);
        true
    }

    /// Posts an RDMA operation of `len` bytes between local `addr` (lkey)
    /// and the peer's `stag`/`va`, in pieces of at most RDMA_CHUNK, the
    /// last one signaled with op `op`. Returns `Err(op)` without posting
    /// when the send queue has no room (or the post failed).
    /// `Err(Some(op))`: nothing posted (no room, or the link is down);
    /// `Err(None)`: the post failed and the link is broken.
    #[allow(clippy::too_many_arguments)]
    pub fn post_rdma(
        &mut self,
        local: u32,
        write: bool,
        addr: u64,
        lkey: u32,
        len: usize,
        stag: u32,
        va: u64,
        op: Op,
    ) -> Result<(), Option<Op>> {
        if self.broken || self.disconnected || len == 0 {
            return Err(Some(op));
        }
        let chunk = chunk_len(len);
        let n = len.div_ceil(chunk);
        let mut sges = [Sge::default(); MAX_CHUNKS];
        for (i, sge) in sges.iter_mut().enumerate().take(n) {
            let off = i * chunk;
            let l = chunk.min(len - off);
            *sge = Sge::new(addr + off as u64, l as u32, lkey);
        }
        self.post_rdma_sges(local, write, &sges[..n], stag, va, op)
    }

    /// Posts one RDMA request per local piece in `sges`, the remote side
    /// contiguous from `va`; the last request signaled with `op`.
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

    #[test]
    fn work_request_ids_round_trip_and_never_look_like_receives() {
        for (local, op) in [(0u32, 0u32), (1, 7), ((1 << 24) - 1, u32::MAX)] {
            let id = op_wr_id(local, op);
            assert_eq!((wr_local(id), wr_op(id)), (local, op));
            assert_eq!(id & RECV_BIT, 0);
        }
    }
}
