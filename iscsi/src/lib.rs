//! The iSCSI protocol core of target-rdma (RFC 7143), sans-IO in the manner
//! of quinn-proto: it never touches a socket, a clock or a thread. A
//! transport (TCP or iSER) feeds it PDUs and timer ticks; it answers with
//! PDUs to send and SCSI tasks for the device server, and takes the device
//! server's completions back. Both transports share it, and it can be
//! fuzzed and tested without a network.
//!
//! Data flow: transport -> `conn::Connection` (login, sequencing, R2T,
//! task management) -> SCSI tasks -> completions -> Data-In / SCSI Response
//! PDUs -> transport.

#![forbid(unsafe_code)]

pub mod chap;
pub mod conn;
pub mod digest;
pub mod idhash;
pub mod login;
pub mod name;
pub mod params;
pub mod pdu;
pub mod text;
pub mod textreq;

pub use pdu::{Bhs, Pdu, PduError};
