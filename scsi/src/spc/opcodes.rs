//! REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the commands this LUN
//! implements, SPC ones answered here and SBC ones in `sbc`, with their
//! CDB usage data.

use mempool::DataBuf;
use std::sync::OnceLock;

use super::{be16, be32, SpcState};
use crate::common::CmdError;
use crate::sense::Sense;

/// Recommended command timeout reported with RCTD, in seconds.
const RECOMMENDED_TIMEOUT: u32 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    Always,
    /// Only where blocks can be deallocated (UNMAP, the UNMAP bit of
    /// WRITE SAME), see `SpcState::can_unmap`.
    Unmap,
    NoUnmap,
    /// GET LBA STATUS: any thin LUN (without an extent map everything
    /// reads as mapped, which is then true).
    LbaStatus,
    /// PREVENT ALLOW MEDIUM REMOVAL: removable LUNs only.
    Removable,
}

struct Op {
    /// CDB usage data: byte 0 is the opcode, for service-action commands
    /// the service action sits in its CDB position (SPC-4 6.35.3), other
    /// bits mark the fields we evaluate. We do not support NACA or
    /// linking, so the CONTROL byte is all zeros.
    usage: &'static [u8],
    /// Whether the opcode has service actions.
    servactv: bool,
    when: When,
}

const fn op(usage: &'static [u8]) -> Op {
    Op {
        usage,
        servactv: false,
        when: When::Always,
    }
}
const fn sa_op(usage: &'static [u8]) -> Op {
    Op {
        usage,
        servactv: true,
        when: When::Always,
    }
}
const fn unmap(mut o: Op) -> Op {
    o.when = When::Unmap;
    o
}
const fn no_unmap(mut o: Op) -> Op {
    o.when = When::NoUnmap;
    o
}
const fn removable(mut o: Op) -> Op {
    o.when = When::Removable;
    o
}
const fn lba_status(mut o: Op) -> Op {
    o.when = When::LbaStatus;
    o
}

const F: u8 = 0xff;

/// Sorted by opcode, then service action.
static OPS: &[Op] = &[
    op(&[0x00, 0, 0, 0, 0, 0]),                          // TEST UNIT READY
    op(&[0x03, 0x01, 0, 0, F, 0]),                       // REQUEST SENSE
    op(&[0x08, 0x1f, F, F, F, 0]),                       // READ(6)
    op(&[0x0a, 0x1f, F, F, F, 0]),                       // WRITE(6)
    op(&[0x12, 0x01, F, F, F, 0]),                       // INQUIRY
    op(&[0x15, 0x11, 0, 0, F, 0]),                       // MODE SELECT(6)
    op(&[0x16, 0, 0, 0, 0, 0]),                          // RESERVE(6)
    op(&[0x17, 0, 0, 0, 0, 0]),                          // RELEASE(6)
    op(&[0x1a, 0x08, F, F, F, 0]),                       // MODE SENSE(6)
    op(&[0x1b, 0x01, 0, 0x0f, 0xf7, 0]),                 // START STOP UNIT
    removable(op(&[0x1e, 0, 0, 0, 0x03, 0])),            // PREVENT ALLOW MEDIUM REMOVAL
    op(&[0x25, 0, F, F, F, F, 0, 0, 0x01, 0]),           // READ CAPACITY(10)
    op(&[0x28, 0x18, F, F, F, F, 0x1f, F, F, 0]),        // READ(10)
    op(&[0x2a, 0x18, F, F, F, F, 0x1f, F, F, 0]),        // WRITE(10)
    op(&[0x2e, 0x12, F, F, F, F, 0x1f, F, F, 0]),        // WRITE AND VERIFY(10)
    op(&[0x2f, 0x16, F, F, F, F, 0x1f, F, F, 0]),        // VERIFY(10)
    op(&[0x34, 0x02, F, F, F, F, 0x1f, F, F, 0]),        // PRE-FETCH(10)
    op(&[0x35, 0x02, F, F, F, F, 0x1f, F, F, 0]),        // SYNCHRONIZE CACHE(10)
    op(&[0x37, 0, 0x1f, 0, 0, 0, 0, F, F, 0]),           // READ DEFECT DATA(10)
    unmap(op(&[0x41, 0x08, F, F, F, F, 0x1f, F, F, 0])), // WRITE SAME(10)
    no_unmap(op(&[0x41, 0x00, F, F, F, F, 0x1f, F, F, 0])),
    unmap(op(&[0x42, 0, 0, 0, 0, 0, 0x1f, F, F, 0])), // UNMAP
    sa_op(&[0x48, 0xa1, 0, 0, 0, 0, 0, F, F, 0]),     // SANITIZE OVERWRITE
    unmap(sa_op(&[0x48, 0xa2, 0, 0, 0, 0, 0, F, F, 0])), // SANITIZE BLOCK ERASE
    sa_op(&[0x48, 0xbf, 0, 0, 0, 0, 0, F, F, 0]),     // SANITIZE EXIT FAILURE MODE
    op(&[0x55, 0x11, 0, 0, 0, 0, 0, F, F, 0]),        // MODE SELECT(10)
    op(&[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]),           // RESERVE(10)
    op(&[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]),           // RELEASE(10)
    op(&[0x5a, 0x18, F, F, 0, 0, 0, F, F, 0]),        // MODE SENSE(10)
    sa_op(&[0x5e, 0x00, 0, 0, 0, 0, 0, F, F, 0]),     // PRIN READ KEYS
    sa_op(&[0x5e, 0x01, 0, 0, 0, 0, 0, F, F, 0]),     // PRIN READ RESERVATION
    sa_op(&[0x5e, 0x02, 0, 0, 0, 0, 0, F, F, 0]),     // PRIN REPORT CAPABILITIES
    sa_op(&[0x5e, 0x03, 0, 0, 0, 0, 0, F, F, 0]),     // PRIN READ FULL STATUS
    sa_op(&[0x5f, 0x00, F, 0, 0, F, F, F, F, 0]),     // PROUT REGISTER
    sa_op(&[0x5f, 0x01, F, 0, 0, F, F, F, F, 0]),     // PROUT RESERVE
    sa_op(&[0x5f, 0x02, F, 0, 0, F, F, F, F, 0]),     // PROUT RELEASE
    sa_op(&[0x5f, 0x03, F, 0, 0, F, F, F, F, 0]),     // PROUT CLEAR
    sa_op(&[0x5f, 0x04, F, 0, 0, F, F, F, F, 0]),     // PROUT PREEMPT
    sa_op(&[0x5f, 0x05, F, 0, 0, F, F, F, F, 0]),     // PROUT PREEMPT AND ABORT
    sa_op(&[0x5f, 0x06, F, 0, 0, F, F, F, F, 0]),     // PROUT REGISTER AND IGNORE
    sa_op(&[0x5f, 0x07, F, 0, 0, F, F, F, F, 0]),     // PROUT REGISTER AND MOVE
    sa_op(&[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]), // EXTENDED COPY (LID1)
    sa_op(&[0x84, 0x00, F, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]), // RCR COPY STATUS
    sa_op(&[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]), // RCR OPERATING PARAMETERS
    sa_op(&[0x84, 0x04, F, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]), // RCR FAILED SEGMENT DETAILS
    op(&[0x88, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0]), // READ(16)
    op(&[0x89, 0x18, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0x1f, 0]), // COMPARE AND WRITE
    op(&[0x8a, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0]), // WRITE(16)
    op(&[0x8b, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0]), // ORWRITE(16)
    op(&[0x8e, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0]), // WRITE AND VERIFY(16)
    op(&[0x8f, 0x16, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0]), // VERIFY(16)
    op(&[0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0]), // PRE-FETCH(16)
    op(&[0x91, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0]), // SYNCHRONIZE CACHE(16)
    unmap(op(&[
        0x93, 0x09, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0,
    ])), // WRITE SAME(16)
    no_unmap(op(&[
        0x93, 0x01, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, 0,
    ])),
    op(&[0x9c, 0x18, F, F, F, F, F, F, F, F, 0, 0, F, F, 0x1f, 0]), // WRITE ATOMIC(16)
    sa_op(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]), // READ CAPACITY(16)
    lba_status(sa_op(&[
        0x9e, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0,
    ])), // GET LBA STATUS
    op(&[0xa0, 0, F, 0, 0, 0, F, F, F, F, 0, 0]),                   // REPORT LUNS
    sa_op(&[0xa3, 0x2a, 0, 0, 0, 0, F, F, F, F, 0, 0]),             // REPORT TARGET PORT GROUPS
    sa_op(&[0xa3, 0x0c, 0x87, F, F, F, F, F, F, F, 0, 0]),          // REPORT SUPPORTED OPCODES
    sa_op(&[0xa3, 0x0d, 0x80, 0, 0, 0, F, F, F, F, 0, 0]),          // REPORT SUPPORTED TMFS
    op(&[0xa8, 0x18, F, F, F, F, F, F, F, F, 0x1f, 0]),             // READ(12)
    op(&[0xaa, 0x18, F, F, F, F, F, F, F, F, 0x1f, 0]),             // WRITE(12)
    op(&[0xae, 0x12, F, F, F, F, F, F, F, F, 0x1f, 0]),             // WRITE AND VERIFY(12)
    op(&[0xaf, 0x16, F, F, F, F, F, F, F, F, 0x1f, 0]),             // VERIFY(12)
    op(&[0xb7, 0x1f, 0, 0, 0, 0, F, F, F, F, 0, 0]),                // READ DEFECT DATA(12)
];

impl Op {
    fn opcode(&self) -> u8 {
        self.usage[0]
    }
    fn sa(&self) -> u16 {
        if self.servactv {
            // Service actions live in the low five bits of byte 1.
            (self.usage[1] & 0x1f) as u16
        } else {
            0
        }
    }
}

impl SpcState {
    /// Thin provisioning as SBC implements it: the LUN is thin and the
    /// backstore can deallocate (and then reads zeros).
    pub(crate) fn can_unmap(&self) -> bool {
        self.info.thin_provisioned && self.caps.discard
    }

    fn ops(&self) -> impl Iterator<Item = &'static Op> + '_ {
        let unmap = self.can_unmap();
        let lba_status = self.info.thin_provisioned;
        let removable = self.info.removable;
        OPS.iter().filter(move |o| match o.when {
            When::Always => true,
            When::Unmap => unmap,
            When::NoUnmap => !unmap,
            When::LbaStatus => lba_status,
            When::Removable => removable,
        })
    }

    /// Whether REPORT SUPPORTED OPERATION CODES advertises `op` (with
    /// service action `sa` for opcodes that have them).
    pub(crate) fn opcode_supported(&self, op: u8, sa: u16) -> bool {
        // Every command asks this; most opcodes (READ, WRITE, ...) are in
        // the table unconditionally and without service actions, so one
        // table lookup answers them instead of a walk over the table.
        static ALWAYS: OnceLock<[bool; 256]> = OnceLock::new();
        let always = ALWAYS.get_or_init(|| {
            let mut t = [false; 256];
            for o in OPS {
                if o.when == When::Always && !o.servactv {
                    t[o.opcode() as usize] = true;
                }
            }
            t
        });
        always[op as usize]
            || self
                .ops()
                .any(|o| o.opcode() == op && (!o.servactv || o.sa() == sa))
    }

    fn timeout_descriptor(out: &mut DataBuf) {
        out.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&RECOMMENDED_TIMEOUT.to_be_bytes());
    }

    pub(super) fn report_supported_opcodes(
        &self,
        cdb: &[u8],
        data_in: &mut DataBuf,
    ) -> Result<(), CmdError> {
        let rctd = cdb[2] & 0x80 != 0;
        let options = cdb[2] & 0x07;
        let req_op = cdb[3];
        let req_sa = be16(cdb, 4);
        let alloc = be32(cdb, 6) as usize;
        data_in.clear();
        match options {
            0 => {
                data_in.extend_from_slice(&[0, 0, 0, 0]);
                for o in self.ops() {
                    data_in.push(o.opcode());
                    data_in.push(0);
                    data_in.extend_from_slice(&o.sa().to_be_bytes());
                    data_in.push(0);
                    data_in.push(if rctd { 0x02 } else { 0 } | o.servactv as u8);
                    data_in.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
                    if rctd {
                        Self::timeout_descriptor(data_in);
                    }
                }
                let len = (data_in.len() - 4) as u32;
                data_in[0..4].copy_from_slice(&len.to_be_bytes());
            }
            1..=3 => {
                let has_sa = self.ops().any(|o| o.opcode() == req_op && o.servactv);
                let known = self.ops().any(|o| o.opcode() == req_op);
                // 001b asks by opcode alone, 010b by opcode and service
                // action; asking the wrong way is an error.
                if known && ((options == 1 && has_sa) || (options == 2 && !has_sa)) {
                    return Err(Sense::invalid_field_in_cdb(2, Some(2)).into());
                }
                let found = self
                    .ops()
                    .find(|o| o.opcode() == req_op && (!o.servactv || o.sa() == req_sa));
                match found {
                    Some(o) => {
                        // SUPPORT 011b: supported as the standard says.
                        data_in.push(0);
                        data_in.push(if rctd { 0x80 } else { 0 } | 0x03);
                        data_in.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
                        data_in.extend_from_slice(o.usage);
                        if rctd {
                            Self::timeout_descriptor(data_in);
                        }
                    }
                    // SUPPORT 001b: not supported.
                    None => data_in.extend_from_slice(&[0, 0x01, 0, 0]),
                }
            }
            _ => return Err(Sense::invalid_field_in_cdb(2, Some(2)).into()),
        }
        data_in.truncate(alloc);
        Ok(())
    }
}
