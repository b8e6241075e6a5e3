//! Types shared by every part of the device server and its callers.

use crate::sense::Sense;
use mempool::DataBuf;
use std::path::PathBuf;

/// Identifies an I_T nexus for the life of the process. Assigned by the
/// engine; stable while the iSCSI session lives.
pub type NexusId = u64;

/// An I_T nexus as SPC sees it: the initiator port and the target port.
/// For iSCSI the initiator port name is `<initiator name>,i,0x<ISID>` and
/// the target port name `<target name>,t,0x<TPGT>` (RFC 7143 10.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nexus {
    pub id: NexusId,
    pub initiator_name: String,
    /// 48-bit ISID.
    pub isid: u64,
    pub target_name: String,
    /// Target Portal Group Tag, which is also the relative target port
    /// identifier and the target port group we report.
    pub tpgt: u16,
}

impl Nexus {
    pub fn initiator_port_name(&self) -> String {
        format!("{},i,0x{:012x}", self.initiator_name, self.isid)
    }
    pub fn target_port_name(&self) -> String {
        format!("{},t,0x{:04x}", self.target_name, self.tpgt)
    }
}

/// Task attribute from the iSCSI SCSI Command PDU (SAM-5 8.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    Untagged,
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

impl TaskAttr {
    /// From the ATTR field (3 bits) of an iSCSI SCSI Command.
    pub fn from_iscsi(bits: u8) -> TaskAttr {
        match bits & 7 {
            0 => TaskAttr::Untagged,
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            _ => TaskAttr::Simple,
        }
    }
}

/// Largest CDB we accept: 16 bytes in the BHS plus an extended CDB AHS.
pub const CDB_LEN_MAX: usize = 260;

/// CDB bytes carried inline: every CDB but a variable-length one fits, so
/// a command crosses the transport, the device server and other cores
/// without a heap allocation.
pub const CDB_INLINE_LEN: usize = 16;

/// A command descriptor block: up to [`CDB_INLINE_LEN`] bytes inline, a
/// longer (extended, up to [`CDB_LEN_MAX`]) one on the heap. Reads as a
/// byte slice.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Cdb {
    inline: [u8; CDB_INLINE_LEN],
    inline_len: u8,
    /// Non-empty only for CDBs longer than `CDB_INLINE_LEN`.
    long: Vec<u8>,
}

impl Cdb {
    /// The BHS's 16 CDB bytes followed by an extended-CDB AHS, if any.
    pub fn from_parts(head: &[u8], ext: &[u8]) -> Cdb {
        if ext.is_empty() {
            return Cdb::from(head);
        }
        let mut long = Vec::with_capacity(head.len() + ext.len());
        long.extend_from_slice(head);
        long.extend_from_slice(ext);
        Cdb::from(long)
    }
}

impl From<&[u8]> for Cdb {
    fn from(b: &[u8]) -> Cdb {
        if b.len() <= CDB_INLINE_LEN {
            let mut inline = [0; CDB_INLINE_LEN];
            inline[..b.len()].copy_from_slice(b);
            Cdb {
                inline,
                inline_len: b.len() as u8,
                long: Vec::new(),
            }
        } else {
            Cdb {
                inline: [0; CDB_INLINE_LEN],
                inline_len: 0,
                long: b.to_vec(),
            }
        }
    }
}

impl From<Vec<u8>> for Cdb {
    fn from(b: Vec<u8>) -> Cdb {
        if b.len() <= CDB_INLINE_LEN {
            Cdb::from(&b[..])
        } else {
            Cdb {
                inline: [0; CDB_INLINE_LEN],
                inline_len: 0,
                long: b,
            }
        }
    }
}

impl std::ops::Deref for Cdb {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.long.is_empty() {
            &self.inline[..self.inline_len as usize]
        } else {
            &self.long
        }
    }
}

impl std::fmt::Debug for Cdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cdb(")?;
        for b in self.iter() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// One SCSI command as the transport hands it over.
#[derive(Debug, Default)]
pub struct ScsiTask {
    /// The caller's handle for this task, echoed in the completion. Unique
    /// among the caller's tasks in flight on this LUN.
    pub tag: u64,
    pub nexus: NexusId,
    /// The whole CDB (6 to 260 bytes).
    pub cdb: Cdb,
    pub attr: TaskAttr,
    /// Expected Data Transfer Length from the initiator: for reads, how
    /// much it will accept; for writes, how much it sent.
    pub edtl: u32,
    /// Write data as received, `data_out.len() <= edtl`.
    pub data_out: DataBuf,
    /// An empty buffer (capacity reused) for the device server to fill.
    pub data_in: DataBuf,
}

/// Whether a command's data may come in pieces (a scatter-gather
/// `DataBuf`): READ and WRITE (6, 10, 12, 16), whose data the device
/// server hands between transport and backstore untouched. Every other
/// command reads or builds its data as one slice.
pub fn data_may_be_in_pieces(opcode: u8) -> bool {
    matches!(
        opcode,
        0x08 | 0x28 | 0xa8 | 0x88 | 0x0a | 0x2a | 0xaa | 0x8a
    )
}

/// The device server's answer to a `ScsiTask`.
#[derive(Debug, Default)]
pub struct ScsiCompletion {
    pub tag: u64,
    pub nexus: NexusId,
    /// SCSI status (see `crate::status`).
    pub status: u8,
    /// Sense data in the format the LUN uses (fixed or descriptor),
    /// non-empty only with CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Data for the initiator, at its natural length: the transport sends
    /// at most EDTL bytes of it and reports the rest as residual overflow.
    pub data_in: DataBuf,
    /// Bytes the CDB asked to move in the data-out direction (0 for
    /// reads). The transport compares it with EDTL for the residual.
    pub data_out_len: u32,
    /// The task's write buffer, returned for reuse.
    pub data_out: DataBuf,
    /// What the LUN counted for this command (kind, bytes, failure, time
    /// from submission until `poll` handed it over); `None` for
    /// completions no initiator command stands behind.
    pub sample: Option<crate::stats::IoSample>,
}

/// Why a command ends without GOOD status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdError {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    ReservationConflict,
    Busy,
    TaskSetFull,
}

impl From<Sense> for CmdError {
    fn from(s: Sense) -> Self {
        CmdError::Check(s)
    }
}

/// Static identity and geometry of a logical unit, set when it is created.
#[derive(Debug, Clone)]
pub struct LunInfo {
    pub lun: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// Number of logical blocks (capacity / block_size).
    pub num_blocks: u64,
    /// T10 vendor identification, 8 ASCII bytes (space padded on output).
    pub vendor: String,
    /// Product identification, 16 ASCII bytes.
    pub product: String,
    /// Product revision level, 4 ASCII bytes.
    pub revision: String,
    /// Unit serial number (VPD 0x80), also the T10 vendor-id designator.
    pub serial: String,
    /// NAA IEEE Registered Extended designator (type 6), 16 bytes.
    pub naa: [u8; 16],
    /// The backstore can deallocate: UNMAP, WRITE SAME with UNMAP, GET LBA
    /// STATUS are offered and the LUN reports LBPME.
    pub thin_provisioned: bool,
    pub read_only: bool,
    /// The medium can be removed: RMB is set in INQUIRY, PREVENT ALLOW
    /// MEDIUM REMOVAL and START STOP UNIT with LOEJ eject and load it.
    pub removable: bool,
    /// Where persistent reservations with APTPL are kept across restarts.
    pub pr_file: Option<PathBuf>,
    /// Where mode pages saved with MODE SELECT SP=1 are kept; `None`: the
    /// LUN saves none (SP=1 is refused).
    pub mode_file: Option<PathBuf>,
    /// Largest transfer per command in blocks (VPD 0xB0).
    pub max_transfer_blocks: u32,
    /// Largest UNMAP in blocks and descriptors (VPD 0xB0).
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    /// Largest WRITE SAME in blocks (VPD 0xB0).
    pub max_write_same_blocks: u64,
    /// WCE at start-up, where the backstore has a volatile cache (the
    /// LUN option `write_cache`): false makes every write durable before
    /// GOOD until an initiator turns the cache on with MODE SELECT.
    pub write_cache: bool,
}

#[cfg(test)]
impl LunInfo {
    /// A thin, writable, non-removable LUN of `num_blocks` blocks, for
    /// tests; the fields a test cares about are set after.
    pub(crate) fn for_tests(block_size: u32, num_blocks: u64) -> LunInfo {
        LunInfo {
            lun: 0,
            block_size,
            num_blocks,
            vendor: "TEST".into(),
            product: "LUN".into(),
            revision: "0001".into(),
            serial: "s0".into(),
            naa: [0; 16],
            thin_provisioned: true,
            read_only: false,
            removable: false,
            pr_file: None,
            mode_file: None,
            max_transfer_blocks: 4096,
            max_unmap_blocks: 4096,
            max_unmap_descriptors: 8,
            max_write_same_blocks: 65535,
            write_cache: true,
        }
    }
}

#[cfg(test)]
mod cdb_tests {
    use super::*;

    #[test]
    fn short_and_long_cdbs_read_back() {
        let short: Vec<u8> = (0..16).collect();
        let c = Cdb::from(&short[..]);
        assert_eq!(&*c, &short[..]);
        assert_eq!(&*Cdb::from(&[0x28u8, 0, 1][..]), &[0x28, 0, 1]);
        let long: Vec<u8> = (0..40).collect();
        assert_eq!(&*Cdb::from(long.clone()), &long[..]);
        assert_eq!(&*Cdb::from_parts(&long[..16], &long[16..]), &long[..]);
        assert_eq!(&*Cdb::from_parts(&short, &[]), &short[..]);
        assert!(Cdb::default().is_empty());
    }
}
