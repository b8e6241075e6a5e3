//! SBC-3 commands that move blocks through the backstore.
//!
//! `decode` validates a CDB against the LUN's geometry and limits and
//! either answers it at once (READ CAPACITY, GET LBA STATUS, PRE-FETCH,
//! errors) or returns a `MediumCmd`: an LBA range to lock and a small state
//! machine that `lun.rs` drives one backstore operation at a time.

use crate::backstore::{Backstore, BackstoreCaps, IoOp};
use crate::common::{CmdError, LunInfo};
use crate::sense::{Sense, SenseKey};
use mempool::DataBuf;

/// Limits this device server applies and the SPC side reports in the
/// Block Limits VPD page (0xB0); both halves must read them from here so
/// the page and the behavior agree.
pub(crate) mod limits {
    /// WSNZ: a WRITE SAME with NUMBER OF LOGICAL BLOCKS zero means "to
    /// the end of the medium" (SBC-3 5.42). That range is held to MAXIMUM
    /// WRITE SAME LENGTH like any other, so one command never rewrites
    /// more than that; nearer the start it fails with INVALID FIELD IN CDB.
    pub const WSNZ: bool = false;
    /// MAXIMUM COMPARE AND WRITE LENGTH in blocks. The CDB field is one
    /// byte; 255 lets initiators use all of it.
    pub const MAX_COMPARE_AND_WRITE: u8 = 255;
    /// MAXIMUM ATOMIC TRANSFER LENGTH in blocks for WRITE ATOMIC (16): one
    /// backstore write under an exclusive range lock.
    pub const MAX_ATOMIC_TRANSFER: u32 = 256;
    /// ATOMIC ALIGNMENT and ATOMIC TRANSFER LENGTH GRANULARITY: none.
    pub const ATOMIC_ALIGNMENT: u32 = 0;
    pub const ATOMIC_GRANULARITY: u32 = 0;
    /// MAXIMUM ATOMIC TRANSFER LENGTH WITH ATOMIC BOUNDARY / MAXIMUM
    /// ATOMIC BOUNDARY SIZE: boundaries are not supported.
    pub const MAX_ATOMIC_BOUNDARY: u32 = 0;
}

/// WRITE SAME writes its pattern in pieces of at most this many bytes, so
/// a long WRITE SAME needs one bounded buffer, not one the size of the
/// range.
const WRITE_SAME_PIECE: usize = 1 << 20;
/// Most descriptors one GET LBA STATUS answer carries.
const LBA_STATUS_DESCRIPTORS: usize = 64;
/// Bytes of the longest GET LBA STATUS answer: header and descriptors.
const LBA_STATUS_ANSWER_MAX: usize = 8 + 16 * LBA_STATUS_DESCRIPTORS;

const EAGAIN: i32 = 11;
const EBUSY: i32 = 16;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EPIPE: i32 = 32;
const ECOMM: i32 = 70;
const EBADFD: i32 = 77;
const ENETDOWN: i32 = 100;
const ENETUNREACH: i32 = 101;
const ECONNABORTED: i32 = 103;
const ECONNRESET: i32 = 104;
const ENOTCONN: i32 = 107;
const ESHUTDOWN: i32 = 108;
const ETIMEDOUT: i32 = 110;
const ECONNREFUSED: i32 = 111;
const EHOSTDOWN: i32 = 112;
const EHOSTUNREACH: i32 = 113;

/// Which SBC path a command takes through the backstore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Read `nlb` blocks into data-in.
    Read,
    /// Write the first `nlb` blocks of data-out.
    Write {
        fua: bool,
    },
    /// Write, then (BYTCHK) read back and compare.
    WriteVerify {
        bytchk: bool,
    },
    /// Read and compare with data-out: whole range (`same: false`) or one
    /// block against every block (`same: true`).
    Verify {
        same: bool,
    },
    /// Read, compare with the first half of data-out, write the second.
    CompareAndWrite {
        fua: bool,
    },
    /// Read, OR with data-out, write.
    OrWrite {
        fua: bool,
    },
    /// One data-out block repeated over the range (or zeros when `zero`);
    /// `unmap` deallocates instead.
    WriteSame {
        unmap: bool,
        zero: bool,
    },
    /// Deallocate the range of each of the parameter list's first
    /// `descriptors` block descriptors (checked by `decode`; read again from
    /// the data-out buffer as each is issued, so an UNMAP allocates
    /// nothing).
    Unmap {
        descriptors: u32,
    },
    Flush,
}

/// The length of an UNMAP block descriptor, and where descriptor `i`
/// starts in the parameter list (after its 8-byte header).
const UNMAP_DESCRIPTOR_LEN: usize = 16;
fn unmap_descriptor_at(i: usize) -> usize {
    8 + i * UNMAP_DESCRIPTOR_LEN
}

/// The LOGICAL BLOCK ADDRESS and NUMBER OF LOGICAL BLOCKS of UNMAP block
/// descriptor `d`.
fn unmap_range(d: &[u8]) -> (u64, u64) {
    (be(d, 0, 8), be(d, 8, 4))
}

/// A command that needs the backstore.
#[derive(Debug)]
pub(crate) struct MediumCmd {
    pub kind: Kind,
    pub lba: u64,
    pub nlb: u64,
    /// Range to hold while the command runs: `None` for no lock, else
    /// (first block, block count, exclusive).
    pub lock: Option<(u64, u64, bool)>,
    /// Bytes the CDB asks to move in the data-out direction.
    pub data_out_len: u32,
    step: Step,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Start,
    Reading,
    Writing,
    /// Write done, FUA requested on a path that could not pass it down.
    Flushing,
    /// WRITE AND VERIFY: reading back.
    ReadBack,
    /// WRITE SAME / UNMAP: `done` blocks (or ranges) finished so far.
    Repeat {
        done: u64,
    },
}

/// What `decode` made of a CDB.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Answered without the medium; data-in is filled. Carries the
    /// data-out length the CDB asked for.
    Done(Result<u8, CmdError>, u32),
    Medium(MediumCmd),
}

/// The next thing a command needs.
#[derive(Debug)]
pub(crate) enum Next {
    Io(IoOp, DataBuf),
    /// Finished with this status or error.
    Done(Result<(), CmdError>),
}

fn b(cdb: &[u8], i: usize) -> u8 {
    cdb.get(i).copied().unwrap_or(0)
}

fn be(cdb: &[u8], at: usize, n: usize) -> u64 {
    crate::be::be_or_zero(cdb, at, n)
}

fn invalid(byte: u16, bit: Option<u8>) -> CmdError {
    CmdError::Check(Sense::invalid_field_in_cdb(byte, bit))
}

/// The LBA of a data-touching command must lie within the medium, and
/// all of the range too.
fn check_range(info: &LunInfo, lba: u64, nlb: u64) -> Result<(), CmdError> {
    match lba.checked_add(nlb) {
        Some(end) if end <= info.num_blocks => Ok(()),
        _ => Err(CmdError::Check(Sense::lba_out_of_range())),
    }
}

/// Is this opcode one that modifies the medium (for write protection)?
pub(crate) fn is_write_opcode(op: u8) -> bool {
    matches!(
        op,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b | 0x9c
    )
}

/// Decode and validate `cdb`. `None` when the opcode is not SBC (the
/// caller answers INVALID COMMAND OPERATION CODE).
pub(crate) fn decode(
    cdb: &[u8],
    info: &LunInfo,
    caps: BackstoreCaps,
    bs: &mut dyn Backstore,
    // Only its length for READ and WRITE, whose data may be in pieces;
    // the commands that read it get it as one slice (`Lun::submit`).
    data_out: &DataBuf,
    data_in: &mut DataBuf,
) -> Option<Decoded> {
    let op = b(cdb, 0);
    let bsz = info.block_size as u64;
    // What a plain block transfer moves, in bytes (saturating: a length
    // that overflows is rejected before it matters).
    let xfer = |nlb: u64| -> u32 { nlb.saturating_mul(bsz).min(u32::MAX as u64) as u32 };

    let r: Result<Decoded, (CmdError, u32)> = (|| {
        match op {
            // READ (6/10/12/16)
            0x08 | 0x28 | 0xa8 | 0x88 => {
                let (lba, nlb) = rw_fields(cdb, op);
                if op != 0x08 && b(cdb, 1) >> 5 != 0 {
                    return Err((invalid(1, Some(7)), 0));
                }
                check_range(info, lba, nlb).map_err(|e| (e, 0))?;
                if nlb > info.max_transfer_blocks as u64 {
                    return Err((invalid(if op == 0x08 { 4 } else { len_byte(op) }, None), 0));
                }
                Ok(medium(Kind::Read, lba, nlb, Some(false), 0))
            }
            // WRITE (6/10/12/16), WRITE ATOMIC (16)
            0x0a | 0x2a | 0xaa | 0x8a | 0x9c => {
                let (lba, nlb) = rw_fields(cdb, op);
                let dol = xfer(nlb);
                if op != 0x0a && b(cdb, 1) >> 5 != 0 {
                    return Err((invalid(1, Some(7)), dol));
                }
                check_range(info, lba, nlb).map_err(|e| (e, dol))?;
                if op == 0x9c {
                    if be(cdb, 10, 2) != 0 {
                        return Err((invalid(10, None), dol));
                    }
                    if nlb > limits::MAX_ATOMIC_TRANSFER as u64 {
                        return Err((invalid(12, None), dol));
                    }
                }
                if nlb > info.max_transfer_blocks as u64 {
                    return Err((invalid(len_byte(op), None), dol));
                }
                let fua = op != 0x0a && b(cdb, 1) & 0x08 != 0;
                // A short data-out writes only the whole blocks received:
                // the transport reports the rest as residual and the
                // blocks never sent keep their old contents.
                let got = (data_out.len() as u64 / bsz).min(nlb);
                Ok(medium(Kind::Write { fua }, lba, got, Some(true), dol))
            }
            // WRITE AND VERIFY (10/12/16)
            0x2e | 0xae | 0x8e => {
                let (lba, nlb) = rw_fields(cdb, op);
                let dol = xfer(nlb);
                let b1 = b(cdb, 1);
                if b1 >> 5 != 0 {
                    return Err((invalid(1, Some(7)), dol));
                }
                let bytchk = (b1 >> 1) & 3;
                if bytchk > 1 {
                    return Err((invalid(1, Some(2)), dol));
                }
                check_range(info, lba, nlb).map_err(|e| (e, dol))?;
                if nlb > info.max_transfer_blocks as u64 {
                    return Err((invalid(len_byte(op), None), dol));
                }
                let got = (data_out.len() as u64 / bsz).min(nlb);
                Ok(medium(
                    Kind::WriteVerify {
                        bytchk: bytchk == 1,
                    },
                    lba,
                    got,
                    Some(true),
                    dol,
                ))
            }
            // VERIFY (10/12/16)
            0x2f | 0xaf | 0x8f => {
                let (lba, nlb) = rw_fields(cdb, op);
                let b1 = b(cdb, 1);
                let bytchk = (b1 >> 1) & 3;
                let dol = match bytchk {
                    1 => xfer(nlb),
                    3 => info.block_size,
                    _ => 0,
                };
                if b1 >> 5 != 0 {
                    return Err((invalid(1, Some(7)), dol));
                }
                if bytchk == 2 {
                    return Err((invalid(1, Some(2)), dol));
                }
                check_range(info, lba, nlb).map_err(|e| (e, dol))?;
                if bytchk == 0 || nlb == 0 {
                    // Nothing to compare; the range check is the verify a
                    // RAM or file medium can make.
                    return Ok(Decoded::Done(Ok(crate::status::GOOD), dol));
                }
                if nlb > info.max_transfer_blocks as u64 {
                    return Err((invalid(len_byte(op), None), dol));
                }
                if (data_out.len() as u64) < dol as u64 {
                    return Err((CmdError::Check(Sense::param_list_length()), dol));
                }
                Ok(medium(
                    Kind::Verify { same: bytchk == 3 },
                    lba,
                    nlb,
                    Some(false),
                    dol,
                ))
            }
            // SYNCHRONIZE CACHE (10/16)
            0x35 | 0x91 => {
                let (lba, nlb) = if op == 0x35 {
                    (be(cdb, 2, 4), be(cdb, 7, 2))
                } else {
                    (be(cdb, 2, 8), be(cdb, 10, 4))
                };
                check_range(info, lba, nlb).map_err(|e| (e, 0))?;
                Ok(medium(Kind::Flush, lba, nlb, None, 0))
            }
            // PRE-FETCH (10/16): the medium is as fast as any cache we
            // could fill, so only the range is checked. GOOD, not
            // CONDITION MET, since nothing is held for the initiator.
            0x34 | 0x90 => {
                let (lba, nlb) = if op == 0x34 {
                    (be(cdb, 2, 4), be(cdb, 7, 2))
                } else {
                    (be(cdb, 2, 8), be(cdb, 10, 4))
                };
                check_range(info, lba, nlb).map_err(|e| (e, 0))?;
                Ok(Decoded::Done(Ok(crate::status::GOOD), 0))
            }
            // WRITE SAME (10/16)
            0x41 | 0x93 => {
                let b1 = b(cdb, 1);
                let ndob = op == 0x93 && b1 & 0x01 != 0;
                let dol = if ndob { 0 } else { info.block_size };
                let (lba, nlb) = if op == 0x41 {
                    (be(cdb, 2, 4), be(cdb, 7, 2))
                } else {
                    (be(cdb, 2, 8), be(cdb, 10, 4))
                };
                if b1 >> 5 != 0 {
                    return Err((invalid(1, Some(7)), dol));
                }
                if b1 & 0x10 != 0 {
                    return Err((invalid(1, Some(4)), dol));
                }
                // PBDATA/LBDATA are obsolete and we never filled in LBAs.
                if b1 & 0x06 != 0 {
                    return Err((invalid(1, Some(2)), dol));
                }
                let unmap = b1 & 0x08 != 0;
                if unmap && !(info.thin_provisioned && caps.discard) {
                    return Err((invalid(1, Some(3)), dol));
                }
                // An LBA past the end is reported as such even with zero
                // blocks, before the zero itself is judged.
                check_range(info, lba, nlb).map_err(|e| (e, dol))?;
                let nlb = if nlb == 0 {
                    if limits::WSNZ {
                        return Err((invalid(len_byte(op), None), dol));
                    }
                    info.num_blocks - lba
                } else {
                    nlb
                };
                if nlb > info.max_write_same_blocks {
                    return Err((invalid(len_byte(op), None), dol));
                }
                if !ndob && data_out.len() != info.block_size as usize {
                    return Err((invalid(len_byte(op), None), dol));
                }
                let zero = ndob || data_out.iter().all(|&x| x == 0);
                Ok(medium(
                    Kind::WriteSame { unmap, zero },
                    lba,
                    nlb,
                    Some(true),
                    dol,
                ))
            }
            // UNMAP
            0x42 => {
                if !(info.thin_provisioned && caps.discard) {
                    return Err((CmdError::Check(Sense::invalid_opcode()), 0));
                }
                let plen = be(cdb, 7, 2) as usize;
                let dol = plen as u32;
                if b(cdb, 1) & 0x01 != 0 {
                    return Err((invalid(1, Some(0)), dol));
                }
                if plen == 0 {
                    return Ok(Decoded::Done(Ok(crate::status::GOOD), 0));
                }
                if plen < 8 || data_out.len() < 8 {
                    return Err((CmdError::Check(Sense::param_list_length()), dol));
                }
                let p = &data_out[..plen.min(data_out.len())];
                let bd_len = be(p, 2, 2) as usize;
                let avail = p.len() - 8;
                if bd_len > avail {
                    return Err((CmdError::Check(Sense::param_list_length()), dol));
                }
                let count = bd_len / UNMAP_DESCRIPTOR_LEN;
                if count > info.max_unmap_descriptors as usize {
                    return Err((CmdError::Check(Sense::invalid_field_in_param(2, None)), dol));
                }
                let mut total = 0u64;
                let (mut lo, mut hi) = (u64::MAX, 0u64);
                for i in 0..count {
                    let at = unmap_descriptor_at(i);
                    let (lba, nlb) = unmap_range(&p[at..at + UNMAP_DESCRIPTOR_LEN]);
                    check_range(info, lba, nlb).map_err(|e| (e, dol))?;
                    total += nlb;
                    if nlb > 0 {
                        lo = lo.min(lba);
                        hi = hi.max(lba + nlb);
                    }
                }
                if total > info.max_unmap_blocks as u64 {
                    return Err((CmdError::Check(Sense::invalid_field_in_param(8, None)), dol));
                }
                if total == 0 {
                    return Ok(Decoded::Done(Ok(crate::status::GOOD), dol));
                }
                let descriptors = count as u32;
                Ok(medium(
                    Kind::Unmap { descriptors },
                    lo,
                    hi - lo,
                    Some(true),
                    dol,
                ))
            }
            // COMPARE AND WRITE
            0x89 => {
                let lba = be(cdb, 2, 8);
                let nlb = b(cdb, 13) as u64;
                let dol = xfer(2 * nlb);
                let b1 = b(cdb, 1);
                if b1 >> 5 != 0 {
                    return Err((invalid(1, Some(7)), dol));
                }
                if nlb > limits::MAX_COMPARE_AND_WRITE as u64
                    || nlb > info.max_transfer_blocks as u64
                {
                    return Err((invalid(13, None), dol));
                }
                check_range(info, lba, nlb).map_err(|e| (e, dol))?;
                // Half a verify buffer cannot be compared and half a write
                // buffer cannot be written atomically: the data-out must be
                // exactly what the CDB describes. That also catches 256
                // blocks wrapped to 0 in the one-byte field.
                if data_out.len() as u64 != 2 * nlb * bsz {
                    return Err((invalid(13, None), dol));
                }
                if nlb == 0 {
                    return Ok(Decoded::Done(Ok(crate::status::GOOD), dol));
                }
                let fua = b1 & 0x08 != 0;
                Ok(medium(
                    Kind::CompareAndWrite { fua },
                    lba,
                    nlb,
                    Some(true),
                    dol,
                ))
            }
            // ORWRITE (16)
            0x8b => {
                let (lba, nlb) = (be(cdb, 2, 8), be(cdb, 10, 4));
                let dol = xfer(nlb);
                let b1 = b(cdb, 1);
                if b1 >> 5 != 0 {
                    return Err((invalid(1, Some(7)), dol));
                }
                check_range(info, lba, nlb).map_err(|e| (e, dol))?;
                if nlb > info.max_transfer_blocks as u64 {
                    return Err((invalid(10, None), dol));
                }
                let got = (data_out.len() as u64 / bsz).min(nlb);
                let fua = b1 & 0x08 != 0;
                Ok(medium(Kind::OrWrite { fua }, lba, got, Some(true), dol))
            }
            // READ CAPACITY (10)
            0x25 => {
                let last = info.num_blocks.saturating_sub(1);
                let last = if last > 0xffff_fffe {
                    0xffff_ffff
                } else {
                    last as u32
                };
                data_in.extend_from_slice(&last.to_be_bytes());
                data_in.extend_from_slice(&info.block_size.to_be_bytes());
                Ok(Decoded::Done(Ok(crate::status::GOOD), 0))
            }
            // SERVICE ACTION IN (16)
            0x9e => match b(cdb, 1) & 0x1f {
                0x10 => {
                    let alloc = be(cdb, 10, 4) as usize;
                    let mut d = [0u8; 32];
                    d[0..8].copy_from_slice(&info.num_blocks.saturating_sub(1).to_be_bytes());
                    d[8..12].copy_from_slice(&info.block_size.to_be_bytes());
                    if info.thin_provisioned && caps.discard {
                        // LBPME, and LBPRZ: every backstore's discarded
                        // blocks read back as zeros.
                        d[14] = 0xc0;
                    }
                    data_in.extend_from_slice(&d[..alloc.min(32)]);
                    Ok(Decoded::Done(Ok(crate::status::GOOD), 0))
                }
                0x12 => {
                    // Backstores without an extent map report everything
                    // mapped (the trait's default), which is true for them.
                    if !info.thin_provisioned {
                        return Err((invalid(1, Some(4)), 0));
                    }
                    let lba = be(cdb, 2, 8);
                    let alloc = be(cdb, 10, 4) as usize;
                    if lba >= info.num_blocks {
                        return Err((CmdError::Check(Sense::lba_out_of_range()), 0));
                    }
                    lba_status(info, bs, lba, alloc, data_in).map_err(|e| (e, 0))?;
                    Ok(Decoded::Done(Ok(crate::status::GOOD), 0))
                }
                // Byte 1 points at the service action, which initiators
                // read as "not supported".
                _ => Err((invalid(1, Some(4)), 0)),
            },
            // READ DEFECT DATA (10/12): RAM and files have no defects;
            // both lists are reported valid and empty in the format asked.
            0x37 | 0xb7 => {
                let flags = b(cdb, if op == 0x37 { 2 } else { 1 }) & 0x1f;
                let alloc = if op == 0x37 {
                    be(cdb, 7, 2)
                } else {
                    be(cdb, 6, 4)
                } as usize;
                let hdr = if op == 0x37 { 4 } else { 8 };
                let mut d = vec![0u8; hdr];
                d[1] = flags;
                d.truncate(alloc);
                data_in.extend_from_slice(&d);
                Ok(Decoded::Done(Ok(crate::status::GOOD), 0))
            }
            _ => Err((CmdError::Check(Sense::invalid_opcode()), u32::MAX)),
        }
    })();
    match r {
        Ok(d) => Some(d),
        Err((_, u32::MAX)) => None,
        Err((e, dol)) => {
            data_in.clear();
            Some(Decoded::Done(Err(e), dol))
        }
    }
}

fn medium(kind: Kind, lba: u64, nlb: u64, lock: Option<bool>, dol: u32) -> Decoded {
    Decoded::Medium(MediumCmd {
        kind,
        lba,
        nlb,
        lock: lock.map(|x| (lba, nlb, x)),
        data_out_len: dol,
        step: Step::Start,
    })
}

/// LBA and transfer length of the READ/WRITE/VERIFY families.
fn rw_fields(cdb: &[u8], op: u8) -> (u64, u64) {
    match op {
        0x08 | 0x0a => {
            let lba = be(cdb, 1, 3) & 0x1f_ffff;
            let n = b(cdb, 4) as u64;
            (lba, if n == 0 { 256 } else { n })
        }
        0x28 | 0x2a | 0x2e | 0x2f => (be(cdb, 2, 4), be(cdb, 7, 2)),
        0xa8 | 0xaa | 0xae | 0xaf => (be(cdb, 2, 4), be(cdb, 6, 4)),
        0x9c => (be(cdb, 2, 8), be(cdb, 12, 2)),
        _ => (be(cdb, 2, 8), be(cdb, 10, 4)),
    }
}

/// The working buffer a medium command takes as its data-in buffer
/// (there is no Data-In) in bytes, for a LUN of `block_size` whose
/// MAXIMUM TRANSFER LENGTH is `max_blocks`: the range
/// read back by VERIFY and WRITE AND VERIFY with BYTCHK, COMPARE AND WRITE
/// and ORWRITE, and the pattern WRITE SAME writes piece by piece. 0 for
/// every other command and for ranges the device server will refuse. A
/// transport that hands such a buffer (from its pool) in the task's
/// `data_in` spares the device server a heap buffer; one too small or
/// absent is grown on the heap, so the figure only needs to be right for
/// the common case.
pub fn scratch_len(cdb: &[u8], block_size: u32, max_blocks: u32) -> usize {
    let op = b(cdb, 0);
    // GET LBA STATUS: its answer, which the device server writes as it
    // walks the extent map.
    if op == 0x9e && b(cdb, 1) & 0x1f == 0x12 {
        return (be(cdb, 10, 4) as usize).min(LBA_STATUS_ANSWER_MAX);
    }
    let bsz = block_size as u64;
    let blocks = match op {
        0x2f | 0xaf | 0x8f if matches!((b(cdb, 1) >> 1) & 3, 1 | 3) => rw_fields(cdb, op).1,
        0x2e | 0xae | 0x8e if (b(cdb, 1) >> 1) & 3 == 1 => rw_fields(cdb, op).1,
        0x89 => b(cdb, 13) as u64,
        0x8b => rw_fields(cdb, op).1,
        // With UNMAP set the range is deallocated, no pattern written.
        0x41 | 0x93 if b(cdb, 1) & 0x08 == 0 => {
            let nlb = if op == 0x41 {
                be(cdb, 7, 2)
            } else {
                be(cdb, 10, 4)
            };
            let per = (WRITE_SAME_PIECE as u64 / bsz.max(1)).max(1);
            // Zero blocks: to the end of the medium, pieces of `per`.
            if nlb == 0 {
                per
            } else {
                nlb.min(per)
            }
        }
        _ => 0,
    };
    if blocks > max_blocks as u64 && !matches!(op, 0x41 | 0x93) {
        return 0;
    }
    usize::try_from(blocks.saturating_mul(bsz)).unwrap_or(0)
}

/// Byte where the transfer length field starts, for field pointers.
fn len_byte(op: u8) -> u16 {
    match op {
        0x08 | 0x0a => 4,
        0x28 | 0x2a | 0x2e | 0x2f | 0x41 => 7,
        0xa8 | 0xaa | 0xae | 0xaf => 6,
        0x9c => 12,
        _ => 10,
    }
}

/// GET LBA STATUS parameter data from the backstore's extent map.
fn lba_status(
    info: &LunInfo,
    bs: &mut dyn Backstore,
    lba: u64,
    alloc: usize,
    out: &mut DataBuf,
) -> Result<(), CmdError> {
    let bsz = info.block_size as u64;
    // Descriptors are gathered on the stack and the answer written straight
    // into `out` (a pool buffer from the engine, `scratch_len`): nothing
    // on the heap.
    let mut descs = [(0u64, 0u64, false); LBA_STATUS_DESCRIPTORS];
    let mut count = 0;
    let mut at = lba;
    while at < info.num_blocks && count < LBA_STATUS_DESCRIPTORS {
        let e = bs
            .extent_status(at * bsz)
            .map_err(|_| CmdError::Check(Sense::internal_failure()))?;
        // A block that is only partly allocated holds data: it is mapped.
        let (mapped, blocks) = if e.mapped {
            (true, e.len.div_ceil(bsz))
        } else if e.len / bsz == 0 {
            (true, 1)
        } else {
            (false, e.len / bsz)
        };
        let blocks = blocks.clamp(1, info.num_blocks - at);
        match count.checked_sub(1).map(|i| &mut descs[i]) {
            Some(last) if last.2 == mapped && last.1 + blocks <= u32::MAX as u64 => {
                last.1 += blocks
            }
            _ => {
                descs[count] = (at, blocks.min(u32::MAX as u64), mapped);
                count += 1;
            }
        }
        at += blocks.min(u32::MAX as u64);
    }
    // Each piece is cut at what the allocation length leaves.
    let mut left = alloc;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(left);
        out.extend_from_slice(&bytes[..n]);
        left -= n;
    };
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&((4 + count * 16) as u32).to_be_bytes());
    put(&head);
    for &(start, n, mapped) in &descs[..count] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&start.to_be_bytes());
        d[8..12].copy_from_slice(&(n as u32).to_be_bytes());
        d[12] = if mapped { 0 } else { 1 };
        put(&d);
    }
    Ok(())
}

/// Sense data for a backstore's errno.
///
/// A network backstore (Gluster) that lost its servers or waited past the
/// command timeout reports a condition that goes away, not a bad medium,
/// so those errnos become ABORTED COMMAND: initiators retry it (Linux's
/// SCSI midlayer answers it with NEEDS_RETRY, up to the command's retry
/// count), whereas MEDIUM ERROR / UNRECOVERED READ ERROR is final there.
/// The additional sense names what happened: LOGICAL UNIT COMMUNICATION
/// TIME-OUT (08h/01h) for a timeout, LOGICAL UNIT COMMUNICATION FAILURE
/// (08h/00h) for a lost or refused connection and for EAGAIN/EBUSY (the
/// backstore is saturated; ECOMM: a network backstore's own "communication
/// error"; EBADFD: gfapi's answer to reads while every brick holding the
/// image is down or hung, until it reopens the file on reconnection). EIO
/// stays a medium error: a local disk's EIO is a bad medium; the Gluster
/// backstore reports gluster's EIO as ECOMM itself.
pub(crate) fn io_error(errno: i32, write: bool) -> CmdError {
    let s = match errno {
        ETIMEDOUT => Sense::new(SenseKey::AbortedCommand, 0x08, 0x01),
        ENOTCONN | ECONNREFUSED | ECONNRESET | ECONNABORTED | ENETDOWN | ENETUNREACH
        | EHOSTDOWN | EHOSTUNREACH | ESHUTDOWN | EPIPE | ECOMM | EBADFD | EAGAIN | EBUSY => {
            Sense::new(SenseKey::AbortedCommand, 0x08, 0x00)
        }
        // Thin provisioning ran out of backing space.
        ENOSPC => Sense::new(SenseKey::DataProtect, 0x27, 0x07),
        EROFS => Sense::write_protected(),
        _ if write => Sense::write_error(),
        _ => Sense::read_error(),
    };
    CmdError::Check(s)
}

/// First differing byte of `a` and `b`.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().min(b.len());
    // Equal is the common answer: one memcmp, instead of a byte loop the
    // compiler does not vectorize.
    if a[..n] == b[..n] {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

impl MediumCmd {
    /// Advance the command. `done` carries the result and buffer of the
    /// operation returned by the previous call (None on the first call).
    /// `data_out` / `data_in` are the task's buffers; a buffer handed out
    /// in `Next::Io` comes back through `done`.
    pub(crate) fn step(
        &mut self,
        info: &LunInfo,
        caps: BackstoreCaps,
        done: Option<(Result<(), i32>, DataBuf)>,
        data_out: &mut DataBuf,
        data_in: &mut DataBuf,
    ) -> Next {
        let bsz = info.block_size as u64;
        let off = self.lba * bsz;
        let len = (self.nlb * bsz) as usize;
        // Take back the buffer of the finished operation; it belongs in
        // data-out after a write and in data-in after a read.
        let mut result = Ok(());
        if let Some((r, buf)) = done {
            result = r;
            match self.step {
                Step::Writing if !matches!(self.kind, Kind::OrWrite { .. }) => *data_out = buf,
                Step::Repeat { .. } if matches!(self.kind, Kind::WriteSame { .. }) => {
                    if !buf.is_empty() {
                        *data_in = buf
                    }
                }
                Step::Flushing | Step::Repeat { .. } => {}
                _ => *data_in = buf,
            }
        }
        let was = self.step;
        if let Err(e) = result {
            let write = !matches!(was, Step::Reading | Step::ReadBack);
            data_in.clear();
            return Next::Done(Err(io_error(e, write)));
        }
        let zero_len = self.nlb == 0 && !matches!(self.kind, Kind::Flush | Kind::Unmap { .. });
        if was == Step::Start && zero_len {
            return Next::Done(Ok(()));
        }
        match (&self.kind, was) {
            (Kind::Read, Step::Start) => {
                self.step = Step::Reading;
                let mut buf = std::mem::take(data_in);
                // No zero-filling: a backstore's read fills every byte
                // (the `Io` contract), so a pool buffer's old contents are
                // never seen.
                buf.set_len_stale(len);
                Next::Io(IoOp::Read { offset: off }, buf)
            }
            (Kind::Read, _) => Next::Done(Ok(())),

            (Kind::Write { fua }, Step::Start) => {
                self.step = Step::Writing;
                let mut buf = std::mem::take(data_out);
                buf.truncate(len);
                Next::Io(
                    IoOp::Write {
                        offset: off,
                        fua: *fua,
                    },
                    buf,
                )
            }
            (Kind::Write { .. }, _) => Next::Done(Ok(())),

            (Kind::WriteVerify { .. }, Step::Start) => {
                self.step = Step::Writing;
                let mut buf = std::mem::take(data_out);
                buf.truncate(len);
                // The verify that follows must see the medium, not a cache.
                Next::Io(
                    IoOp::Write {
                        offset: off,
                        fua: true,
                    },
                    buf,
                )
            }
            (Kind::WriteVerify { bytchk }, Step::Writing) => {
                if !bytchk {
                    return Next::Done(Ok(()));
                }
                self.step = Step::ReadBack;
                let mut buf = std::mem::take(data_in);
                // A backstore's read fills every byte (the `Io` contract);
                // the transport's scratch buffer (`scratch_len`) is used
                // in place.
                buf.clear();
                buf.set_len_stale(len);
                Next::Io(IoOp::Read { offset: off }, buf)
            }
            (Kind::WriteVerify { .. }, _) => {
                let r = match first_diff(&data_in[..], &data_out[..len.min(data_out.len())]) {
                    Some(at) => Err(CmdError::Check(Sense::miscompare(at as u64))),
                    None => Ok(()),
                };
                data_in.clear();
                Next::Done(r)
            }

            (Kind::Verify { .. }, Step::Start)
            | (Kind::CompareAndWrite { .. }, Step::Start)
            | (Kind::OrWrite { .. }, Step::Start) => {
                self.step = Step::Reading;
                let mut buf = std::mem::take(data_in);
                buf.clear();
                buf.set_len_stale(len);
                Next::Io(IoOp::Read { offset: off }, buf)
            }
            (Kind::Verify { same }, _) => {
                let bl = bsz as usize;
                let diff = if *same {
                    let pat = &data_out[..bl.min(data_out.len())];
                    data_in
                        .chunks(bl)
                        .enumerate()
                        .find_map(|(i, c)| first_diff(c, pat).map(|d| i * bl + d))
                } else {
                    first_diff(&data_in[..], &data_out[..len.min(data_out.len())])
                };
                data_in.clear();
                match diff {
                    Some(at) => Next::Done(Err(CmdError::Check(Sense::miscompare(at as u64)))),
                    None => Next::Done(Ok(())),
                }
            }
            (Kind::CompareAndWrite { fua }, Step::Reading) => {
                let diff = first_diff(&data_in[..], &data_out[..len]);
                data_in.clear();
                if let Some(at) = diff {
                    return Next::Done(Err(CmdError::Check(Sense::miscompare(at as u64))));
                }
                self.step = Step::Writing;
                let mut buf = std::mem::take(data_out);
                buf.remove_front(len);
                buf.truncate(len);
                Next::Io(
                    IoOp::Write {
                        offset: off,
                        fua: *fua,
                    },
                    buf,
                )
            }
            (Kind::OrWrite { fua }, Step::Reading) => {
                let mut buf = std::mem::take(data_in);
                for (d, s) in buf.iter_mut().zip(data_out.iter()) {
                    *d |= *s;
                }
                self.step = Step::Writing;
                Next::Io(
                    IoOp::Write {
                        offset: off,
                        fua: *fua,
                    },
                    buf,
                )
            }
            (Kind::CompareAndWrite { .. }, _) => Next::Done(Ok(())),
            (Kind::OrWrite { .. }, _) => {
                data_in.clear();
                Next::Done(Ok(()))
            }

            (Kind::Flush, Step::Start) => {
                self.step = Step::Flushing;
                Next::Io(IoOp::Flush, DataBuf::new())
            }
            (Kind::Flush, _) => Next::Done(Ok(())),

            (Kind::WriteSame { unmap, zero }, _) => {
                let done = match was {
                    Step::Repeat { done } => done,
                    _ => 0,
                };
                if done >= self.nlb {
                    data_in.clear();
                    return Next::Done(Ok(()));
                }
                let start = (self.lba + done) * bsz;
                if *unmap && caps.discard {
                    self.step = Step::Repeat { done: self.nlb };
                    return Next::Io(
                        IoOp::Discard {
                            offset: start,
                            len: (self.nlb - done) * bsz,
                        },
                        DataBuf::new(),
                    );
                }
                if *zero && caps.write_zeroes {
                    self.step = Step::Repeat { done: self.nlb };
                    return Next::Io(
                        IoOp::WriteZeroes {
                            offset: start,
                            len: (self.nlb - done) * bsz,
                        },
                        DataBuf::new(),
                    );
                }
                // Repeat the block into a bounded buffer (kept in data-in
                // between pieces) and write it piece by piece.
                let per = (WRITE_SAME_PIECE as u64 / bsz).max(1);
                let n = (self.nlb - done).min(per);
                let mut buf = std::mem::take(data_in);
                let want = (n * bsz) as usize;
                let full = (per.min(self.nlb) * bsz) as usize;
                // The first piece builds the pattern (in the transport's
                // scratch buffer when it gave one: its bytes are stale);
                // later ones find it in data-in.
                if done == 0 || buf.len() != full {
                    buf.clear();
                    if *zero {
                        buf.resize(full, 0);
                    } else {
                        for _ in 0..full / bsz as usize {
                            buf.extend_from_slice(&data_out[..bsz as usize]);
                        }
                    }
                }
                // Only the last piece may be shorter: no piece needs the
                // whole pattern after it.
                let mut buf = buf;
                buf.truncate(want);
                self.step = Step::Repeat { done: done + n };
                Next::Io(
                    IoOp::Write {
                        offset: start,
                        fua: false,
                    },
                    buf,
                )
            }

            (Kind::Unmap { descriptors }, _) => {
                let mut i = match was {
                    Step::Repeat { done } => done as usize,
                    _ => 0,
                };
                while i < *descriptors as usize {
                    let mut d = [0u8; UNMAP_DESCRIPTOR_LEN];
                    data_out.copy_to_at(unmap_descriptor_at(i), &mut d);
                    let (lba, nlb) = unmap_range(&d);
                    i += 1;
                    if nlb > 0 {
                        self.step = Step::Repeat { done: i as u64 };
                        return Next::Io(
                            IoOp::Discard {
                                offset: lba * bsz,
                                len: nlb * bsz,
                            },
                            DataBuf::new(),
                        );
                    }
                }
                Next::Done(Ok(()))
            }
        }
    }
}

#[cfg(test)]
#[path = "sbc/tests.rs"]
mod tests;
