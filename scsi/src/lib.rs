//! The SCSI device server of target-rdma. It sits between the iSCSI session
//! layer and the backstores: a transport hands it a `ScsiTask` (CDB plus any
//! write data, already gathered), the addressed `Lun` decodes the CDB,
//! answers SPC-4 commands from its own state (inquiry data, mode pages,
//! reservations, unit attentions) and turns SBC-3 commands into
//! asynchronous `Backstore` operations. Completions come back through
//! `poll`, on the same thread that submitted, carrying status, sense and
//! data. Each LUN counts what it completes (`stats`). Nothing here knows
//! about iSCSI or sockets.

// Only the io_uring submission in the file backstore needs `unsafe`.
#![deny(unsafe_code)]

pub mod backstore;
mod be;
pub mod common;
pub mod lun;
pub mod persist;
mod pr;
mod sanitize;
mod sbc;
pub mod sense;
mod spc;
pub mod stats;
pub mod target;
#[cfg(test)]
mod write_cache_tests;
mod xcopy;

pub use backstore::{Backstore, BackstoreCaps, Io, IoDone, IoOp};
pub use common::{Cdb, CmdError, LunInfo, Nexus, NexusId, ScsiCompletion, ScsiTask, TaskAttr};
pub use lun::Lun;
pub use mempool::DataBuf;
pub use sbc::scratch_len;
pub use sense::{Sense, SenseKey};
pub use stats::{IoCounters, IoKind, IoSample, LatencyHistogram};
pub use target::Target;

/// SCSI status codes (SAM-5 5.3).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}
