//! The safe RDMA layer under the iSER transport. The iSER transport
//! accepts initiators through RDMA CM, moves SCSI data with RDMA Write
//! (Data-In) and RDMA Read (Data-Out) straight between the initiator's
//! memory and hugepage pool buffers, and exchanges iSCSI PDUs by Send and
//! receive; this crate is everything it needs from libibverbs and
//! librdmacm, and the only place besides `rdma-sys` with `unsafe` code.
//! Its place in the data flow: the pool registers each arena once per
//! protection domain through [`PdRegistrar`]; a reactor owns one
//! [`CompletionQueue`] and one [`SharedReceiveQueue`] per core and polls
//! them; each connection is a [`CmId`] with its queue pair on that core,
//! posting work requests whose scatter-gather lists point into pool
//! buffers. The control plane reads [`CmEvent`]s from an
//! [`EventChannel`] whose fd sits in the reactor's poller.
//!
//! Objects own their verbs resources and free them on drop, in the order
//! verbs requires (QP, then SRQ/CQ/MR, then PD, then channels): handles
//! hold reference-counted pointers to what they depend on. Posting and
//! polling do not allocate. Without an RDMA device, opening anything
//! returns [`Error::NoDevice`]; nothing panics.
//!
//! The target's side in short (`examples/loopback.rs` runs all of it,
//! with a client, on soft-RoCE):
//!
//! ```no_run
//! use rdma::iser::IserCmHeader;
//! use rdma::{AccessFlags, CmEventKind, Completion, CompletionQueue, ConnParam};
//! use rdma::{EventChannel, QpInit, SharedReceiveQueue};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let pool = mempool::Pool::new(mempool::PoolConfig::default())?;
//! let cm = EventChannel::new()?; // Error::NoDevice on a host without RDMA
//! let listener = cm.listen("169.254.77.1:3260".parse()?, 64)?;
//! let ctx = listener.context()?;
//! let pd = ctx.alloc_pd()?;
//! let rid = pool.add_registrar(Box::new(pd.registrar(AccessFlags::LOCAL_WRITE)))?;
//! // Per reactor core: one CQ (with a channel fd for its poller), one SRQ
//! // kept full of receive buffers (posted before any accept).
//! let cq = CompletionQueue::new(&ctx, 4096, true)?;
//! let srq = SharedReceiveQueue::new(&pd, 1024, 1)?;
//! # let _ = rid;
//! while let Some(ev) = cm.get_event()? {
//!     if let CmEventKind::ConnectRequest(req) = ev.kind {
//!         let Some(hdr) = IserCmHeader::decode(&req.private_data) else {
//!             continue; // not iSER: dropping the id rejects it
//!         };
//!         let mut id = req.id;
//!         id.create_qp(&pd, &QpInit {
//!             send_cq: &cq, recv_cq: &cq, srq: Some(&srq),
//!             max_send_wr: 512, max_recv_wr: 0, max_send_sge: 16,
//!             max_recv_sge: 1, max_inline_data: 0,
//!         })?;
//!         let reply = IserCmHeader::target_reply(&hdr, true).encode();
//!         let depth = ctx.query()?.max_qp_init_rd_atom.min(255) as u8;
//!         id.accept(&ConnParam {
//!             private_data: &reply,
//!             initiator_depth: depth.min(req.responder_resources),
//!             ..ConnParam::default()
//!         })?;
//!         // Hand `id` to the session's reactor (and `id.migrate` to its
//!         // event channel); it posts RDMA Writes, Reads and Sends on it.
//!     }
//! }
//! // In the reactor: poll into a fixed array, re-arm when idle.
//! let mut done = [Completion::EMPTY; 64];
//! let n = cq.poll(&mut done)?;
//! if n == 0 {
//!     cq.req_notify(false)?; // then poll once more before sleeping
//! }
//! # Ok(())
//! # }
//! ```

mod cm;
mod error;
pub mod iser;
mod verbs;
mod wr;

pub use cm::{
    CmEvent, CmEventKind, CmId, CmIdRef, ConnParam, ConnectRequest, EventChannel, MwBind,
    PrivateData, QpCaps, QpInit,
};
pub use error::{Error, Result};
pub use verbs::{
    devices, release_removed_devices, AccessFlags, CompletionQueue, Context, DeviceAttr,
    MemoryRegion, MemoryWindow, OwnedRegion, PdRegistrar, ProtectionDomain, SharedReceiveQueue,
};
pub use wr::{Completion, RecvWr, SendFlags, SendOp, SendWr, Sge, WcOpcode, WcStatus};

#[cfg(test)]
mod tests;
