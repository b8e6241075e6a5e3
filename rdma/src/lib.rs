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
