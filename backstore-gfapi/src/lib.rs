//! The GlusterFS backstore: LUNs whose blocks live in an image file on a
//! Gluster volume, reached through libgfapi without a FUSE mount. In the
//! data flow it sits where the file backstore does: a command arrives on
//! a transport connection, the iSCSI session hands it to the SCSI device
//! server, the LUN turns it into backstore operations, and this crate
//! submits them with gfapi's asynchronous calls from the reactor (core)
//! that owns the LUN. gfapi completes them on its own threads; their
//! callbacks only push onto a lock-free queue and write an eventfd, and
//! the same reactor picks the completions up in `poll` and sends the
//! responses, so a command never changes core.
//!
//! The buffer that received the data from the initiator is the one handed
//! to gfapi, and the one gfapi fills is the one sent out: no copy in our
//! code. gfapi itself copies once each way (into its iobufs for writes,
//! out of them for reads); it has no zero-copy interface.
//!
//! - [`url`]: the LUN spec `gluster://HOST[:PORT][,HOST2[:PORT]...]/VOLUME/PATH[?size=SIZE]`.
//! - [`Volume`]: one connection (`glfs_t`) per volume and server list,
//!   shared by the LUNs on it; `glfs_init` runs on a thread of its own
//!   with a time bound.
//! - [`GlusterBackstore`]: one image, implementing `scsi::Backstore`, with
//!   a deadline on every operation (the command timeout).

pub mod image;
pub mod url;
pub mod volume;

pub use image::{GlusterBackstore, ImageOptions, DEFAULT_COMMAND_TIMEOUT};
pub use url::{GlusterUrl, Server, DEFAULT_PORT};
pub use volume::{ConnectOptions, Volume};
