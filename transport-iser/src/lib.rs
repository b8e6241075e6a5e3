//! iSER, iSCSI Extensions for RDMA (RFC 7145): the transport that moves an
//! iSCSI connection over an RDMA reliable connection. In the data flow it
//! sits where `transport-tcp` sits: receive completions carry an iSER
//! header and one iSCSI PDU each into the shared protocol core
//! (`iscsi::conn::Connection`, which never learns which transport it
//! runs on beyond the data movement it asks for), and what the core
//! answers leaves as Sends (control PDUs and responses), RDMA Writes (read
//! data, in place of Data-In) and RDMA Reads (write data, in place of
//! R2T and solicited Data-Out).
//!
//! This crate holds the parts that need no RDMA device and are tested on
//! any host: the iSER header (`header`) and framing between a stream of
//! PDUs and one message per Send (`framing`). The RDMA CM private data
//! (`rdma::iser`) and the verbs themselves are in the `rdma` crate.

#![forbid(unsafe_code)]

pub mod framing;
pub mod header;

pub use header::{IserHeader, ISER_HDR_LEN};
