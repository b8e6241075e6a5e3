//! SANITIZE (SBC-4 5.30): OVERWRITE and BLOCK ERASE run as a job of the
//! logical unit, not of the command that started it.
//!
//! Once a sanitize operation has started it survives ABORT TASK, ABORT
//! TASK SET, logical unit and target resets and the loss of the I_T nexus
//! that sent it (SBC-4 4.11); those only take away the command, which
//! would otherwise (IMMED 0) complete when the operation does. While it
//! runs, every command except INQUIRY, REPORT LUNS and REQUEST SENSE ends
//! with NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS, and
//! REQUEST SENSE reports the same with a progress indication.
//!
//! OVERWRITE writes the initialization pattern over every block, one
//! bounded chunk at a time, paced to at most `DEFAULT_RATE` bytes a second
//! so that a sanitize does not take the whole of a backing device shared
//! with other LUNs (a sanitize is a rare maintenance operation; it may be
//! slow, other LUNs' I/O should not be). BLOCK ERASE deallocates every
//! block (offered where blocks can be deallocated and then read as
//! zeros). CRYPTOGRAPHIC ERASE needs an encryption key to change; no
//! backstore has one, so it is refused like an unknown service action.
//! A failed operation leaves the logical unit in sanitize failure mode:
//! media access then fails with MEDIUM ERROR, SANITIZE COMMAND FAILED
//! until a sanitize succeeds or, if the failed one allowed it (AUSE),
//! EXIT FAILURE MODE.

use crate::backstore::{BackstoreCaps, Io, IoOp};
use crate::be::be16;
use crate::common::{CmdError, LunInfo, NexusId};
use crate::sense::{FieldPointer, Sense, SenseKey};
use mempool::DataBuf;
use std::time::Instant;

/// Backstore tag of the sanitize job's operations; task tags carry a slot
/// index in the high half, which never reaches `u32::MAX`.
pub(crate) const SANITIZE_TAG: u64 = u64::MAX;

/// Most bytes an OVERWRITE writes per second (0: no limit).
pub const DEFAULT_RATE: u64 = 32 << 20;

/// Bytes one overwrite operation covers.
const CHUNK: u64 = 1 << 20;
/// Bytes one BLOCK ERASE discard covers.
const ERASE_CHUNK: u64 = 1 << 30;

const OVERWRITE: u8 = 0x01;
const BLOCK_ERASE: u8 = 0x02;
const EXIT_FAILURE_MODE: u8 = 0x1f;

/// NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS, with the
/// progress indication (SPC-4 4.5.2.4.4: SKSV and a 16-bit fraction of
/// 65536) in the sense-key specific bytes.
pub(crate) fn in_progress(done: u64, total: u64) -> Sense {
    let fraction = if total == 0 {
        0
    } else {
        ((done.min(total) as u128 * 65536) / total as u128).min(65535) as u16
    };
    let mut s = Sense::new(SenseKey::NotReady, 0x04, 0x1b);
    // The progress indication has the field pointer's layout without C/D
    // and BPV: SKSV, then two bytes.
    s.field_pointer = Some(FieldPointer {
        in_cdb: false,
        byte: fraction,
        bit: None,
    });
    s
}

/// MEDIUM ERROR, SANITIZE COMMAND FAILED.
pub(crate) const fn failed() -> Sense {
    Sense::new(SenseKey::MediumError, 0x31, 0x03)
}

/// The command that waits for the job (IMMED 0).
#[derive(Debug)]
pub(crate) struct Waiter {
    pub tag: u64,
    pub nexus: NexusId,
    pub stamp: Option<crate::lun::Stamp>,
    pub data_in: DataBuf,
    pub data_out: DataBuf,
    pub data_out_len: u32,
}

#[derive(Debug)]
enum Method {
    /// One block of pattern, `passes` times, inverted between passes.
    Overwrite {
        block: DataBuf,
        invert: bool,
        passes: u8,
    },
    BlockErase,
}

#[derive(Debug)]
pub(crate) struct Job {
    method: Method,
    ause: bool,
    /// Pass under way (0-based) and the next byte of it to write.
    pass: u8,
    next: u64,
    total: u64,
    in_flight: bool,
    failed: bool,
    /// Chunk buffer of pattern, reused between writes.
    buf: DataBuf,
    started: Instant,
    /// Bytes handed to the backstore so far, over all passes.
    issued: u64,
    pub waiter: Option<Waiter>,
}

/// A SANITIZE command that passed its checks. The job is boxed to keep
/// the rare case from making every `Request` large.
#[derive(Debug)]
pub(crate) enum Request {
    Start { job: Box<Job>, immed: bool },
    ExitFailureMode,
}

/// PARAMETER LIST LENGTH of a SANITIZE CDB (for residuals).
pub(crate) fn data_out_len(cdb: &[u8]) -> u32 {
    if cdb.len() < 10 {
        0
    } else {
        be16(cdb, 7) as u32
    }
}

/// Check a SANITIZE CDB and its parameter list. `erase` says whether
/// BLOCK ERASE is offered.
pub(crate) fn decode(
    cdb: &[u8],
    data_out: &[u8],
    info: &LunInfo,
    erase: bool,
    write_protected: bool,
) -> Result<Request, CmdError> {
    let invalid =
        |byte: u16, bit: Option<u8>| CmdError::Check(Sense::invalid_field_in_cdb(byte, bit));
    if cdb.len() < 10 {
        return Err(invalid(0, None));
    }
    let immed = cdb[1] & 0x80 != 0;
    let ause = cdb[1] & 0x20 != 0;
    let sa = cdb[1] & 0x1f;
    if cdb[1] & 0x40 != 0 {
        return Err(invalid(1, Some(6)));
    }
    if let Some(i) = (2..7).find(|&i| cdb[i] != 0) {
        return Err(invalid(i as u16, None));
    }
    let plen = be16(cdb, 7) as usize;
    let bsz = info.block_size as usize;
    match sa {
        OVERWRITE => {
            if !(5..=bsz + 4).contains(&plen) {
                return Err(invalid(7, None));
            }
        }
        BLOCK_ERASE if erase => {}
        EXIT_FAILURE_MODE => {}
        // CRYPTOGRAPHIC_ERASE, BLOCK ERASE where not offered, and the
        // rest.
        _ => return Err(invalid(1, Some(4))),
    }
    if sa != OVERWRITE && plen != 0 {
        return Err(invalid(7, None));
    }
    if sa == EXIT_FAILURE_MODE {
        return Ok(Request::ExitFailureMode);
    }
    if write_protected {
        return Err(CmdError::Check(Sense::write_protected()));
    }
    let method = if sa == OVERWRITE {
        if data_out.len() < plen {
            return Err(CmdError::Check(Sense::param_list_length_at(7)));
        }
        let p = &data_out[..plen];
        let param =
            |byte: u16, bit: Option<u8>| CmdError::Check(Sense::invalid_field_in_param(byte, bit));
        let passes = p[0] & 0x1f;
        if passes == 0 {
            return Err(param(0, Some(4)));
        }
        // TEST is for vendor tests of the overwrite path.
        if p[0] & 0x60 != 0 {
            return Err(param(0, Some(6)));
        }
        let ipl = be16(p, 2) as usize;
        if ipl == 0 || ipl > bsz {
            return Err(param(2, None));
        }
        if ipl + 4 > plen {
            return Err(CmdError::Check(Sense::param_list_length_at(7)));
        }
        let pattern = &p[4..4 + ipl];
        let block: DataBuf = pattern.iter().copied().cycle().take(bsz).collect();
        Method::Overwrite {
            block,
            invert: p[0] & 0x80 != 0,
            passes,
        }
    } else {
        Method::BlockErase
    };
    let total = info.num_blocks.saturating_mul(info.block_size as u64);
    Ok(Request::Start {
        job: Box::new(Job {
            method,
            ause,
            pass: 0,
            next: 0,
            total,
            in_flight: false,
            failed: false,
            buf: DataBuf::new(),
            started: Instant::now(),
            issued: 0,
            waiter: None,
        }),
        immed,
    })
}

impl Job {
    fn passes(&self) -> u8 {
        match self.method {
            Method::Overwrite { passes, .. } => passes,
            Method::BlockErase => 1,
        }
    }

    /// Finished: every pass written, or an operation failed.
    pub(crate) fn finished(&self) -> bool {
        !self.in_flight && (self.failed || self.pass >= self.passes())
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    pub(crate) fn ause(&self) -> bool {
        self.ause
    }

    /// How far along the job is, for REQUEST SENSE.
    pub(crate) fn progress(&self) -> Sense {
        let passes = self.passes() as u64;
        let done = (self.pass as u64).saturating_mul(self.total) + self.next;
        in_progress(done, passes.saturating_mul(self.total).max(1))
    }

    /// The next backstore operation, if one may start now: none while one
    /// is in flight, when finished, or when the pace says wait (`rate`
    /// bytes a second, 0 for no limit; the first chunk goes at once).
    pub(crate) fn next_io(&mut self, caps: BackstoreCaps, rate: u64) -> Option<Io> {
        if self.in_flight || self.finished() {
            return None;
        }
        let chunk_max = match self.method {
            Method::Overwrite { .. } => CHUNK,
            Method::BlockErase => ERASE_CHUNK,
        };
        let len = (self.total - self.next).min(chunk_max);
        if let Method::Overwrite { .. } = self.method {
            if rate > 0 {
                let allowed = (self.started.elapsed().as_secs_f64() * rate as f64) as u64;
                if self.issued > 0 && self.issued + len > allowed {
                    return None;
                }
            }
        }
        let offset = self.next;
        let (op, buf) = match &self.method {
            Method::BlockErase => (IoOp::Discard { offset, len }, DataBuf::new()),
            Method::Overwrite { block, invert, .. } => {
                let flip = *invert && self.pass % 2 == 1;
                let zero = block.iter().all(|&b| if flip { b == 0xff } else { b == 0 });
                if zero && caps.write_zeroes {
                    (IoOp::WriteZeroes { offset, len }, DataBuf::new())
                } else {
                    let mut buf = std::mem::take(&mut self.buf);
                    let want = len as usize;
                    let fresh =
                        buf.len() != want || buf.first() != Some(&pattern_byte(block, flip));
                    if fresh {
                        buf.clear();
                        while buf.len() < want {
                            let n = (want - buf.len()).min(block.len());
                            buf.extend(block[..n].iter().map(|&b| if flip { !b } else { b }));
                        }
                    }
                    (IoOp::Write { offset, fua: false }, buf)
                }
            }
        };
        self.in_flight = true;
        self.issued += len;
        self.next += len;
        if self.next >= self.total {
            self.next = 0;
            self.pass += 1;
        }
        if self.total == 0 {
            self.pass = self.passes();
        }
        Some(Io {
            tag: SANITIZE_TAG,
            op,
            buf,
        })
    }

    /// An operation of the job finished.
    pub(crate) fn complete(&mut self, result: Result<(), i32>, buf: DataBuf) {
        self.in_flight = false;
        if result.is_err() {
            self.failed = true;
        }
        if !buf.is_empty() {
            self.buf = buf;
        }
    }
}

fn pattern_byte(block: &[u8], flip: bool) -> u8 {
    let b = block.first().copied().unwrap_or(0);
    if flip {
        !b
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(blocks: u64) -> LunInfo {
        LunInfo {
            max_transfer_blocks: 64,
            max_unmap_blocks: 64,
            max_unmap_descriptors: 1,
            max_write_same_blocks: 64,
            ..LunInfo::for_tests(512, blocks)
        }
    }

    fn cdb(sa: u8, plen: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = 0x48;
        c[1] = sa;
        c[7..9].copy_from_slice(&plen.to_be_bytes());
        c
    }

    fn overwrite_param(count: u8, pattern: &[u8]) -> DataBuf {
        let mut p = vec![count, 0];
        p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
        p.extend_from_slice(pattern);
        p.into()
    }

    fn asc(r: Result<Request, CmdError>) -> (u8, u8, u8) {
        match r {
            Err(CmdError::Check(s)) => (s.key as u8, s.asc, s.ascq),
            other => panic!("expected CHECK CONDITION, got {other:?}"),
        }
    }

    #[test]
    fn service_actions() {
        let i = info(16);
        // Unknown, CRYPTOGRAPHIC ERASE, and BLOCK ERASE where it is not
        // offered: INVALID FIELD IN CDB.
        for sa in [0u8, 3, 4, 0x10, 0x1e] {
            assert_eq!(asc(decode(&cdb(sa, 0), &[], &i, true, false)), (5, 0x24, 0));
        }
        assert_eq!(asc(decode(&cdb(2, 0), &[], &i, false, false)), (5, 0x24, 0));
        assert!(matches!(
            decode(&cdb(2, 0), &[], &i, true, false),
            Ok(Request::Start { immed: false, .. })
        ));
        assert!(matches!(
            decode(&cdb(0x1f, 0), &[], &i, true, true),
            Ok(Request::ExitFailureMode)
        ));
        // Parameter data where none belongs.
        for sa in [2u8, 0x1f] {
            assert_eq!(
                asc(decode(&cdb(sa, 8), &[0; 8], &i, true, false)),
                (5, 0x24, 0)
            );
        }
        // Reserved bit and bytes.
        let mut c = cdb(2, 0);
        c[1] |= 0x40;
        assert_eq!(asc(decode(&c, &[], &i, true, false)), (5, 0x24, 0));
        for b in 2..7 {
            let mut c = cdb(2, 0);
            c[b] = 1;
            assert_eq!(asc(decode(&c, &[], &i, true, false)), (5, 0x24, 0));
        }
        // Write protection.
        assert_eq!(asc(decode(&cdb(2, 0), &[], &i, true, true)), (7, 0x27, 0));
    }

    #[test]
    fn overwrite_parameters() {
        let i = info(16);
        let good = overwrite_param(1, &[0xaa; 4]);
        assert!(decode(&cdb(0x81, 8), &good, &i, true, false).is_ok());
        // PARAMETER LIST LENGTH outside 5..=block+4.
        for plen in [0u16, 4, 517] {
            let d = vec![0u8; 520];
            assert_eq!(
                asc(decode(&cdb(1, plen), &d, &i, true, false)),
                (5, 0x24, 0)
            );
        }
        // OVERWRITE COUNT 0, pattern length 0 or beyond a block.
        let d = overwrite_param(0, &[1; 4]);
        assert_eq!(asc(decode(&cdb(1, 8), &d, &i, true, false)), (5, 0x26, 0));
        let mut d = vec![1u8, 0, 0, 0];
        d.resize(516, 0);
        assert_eq!(asc(decode(&cdb(1, 516), &d, &i, true, false)), (5, 0x26, 0));
        d[2..4].copy_from_slice(&516u16.to_be_bytes());
        assert_eq!(asc(decode(&cdb(1, 516), &d, &i, true, false)), (5, 0x26, 0));
        // Less data than the CDB announced.
        assert_eq!(
            asc(decode(&cdb(1, 8), &good[..6], &i, true, false)),
            (5, 0x1a, 0)
        );
    }

    #[test]
    fn overwrite_job_writes_every_pass_in_chunks() {
        let i = info(4096); // 2 MiB: two chunks a pass
        let p = overwrite_param(0x80 | 2, &[0x0f]);
        let Ok(Request::Start { mut job, immed }) = decode(&cdb(0x81, 5), &p, &i, true, false)
        else {
            panic!("decode failed")
        };
        assert!(immed);
        let mut writes = Vec::new();
        while !job.finished() {
            let io = job
                .next_io(BackstoreCaps::default(), 0)
                .expect("an operation");
            assert!(
                job.next_io(BackstoreCaps::default(), 0).is_none(),
                "one at a time"
            );
            let IoOp::Write { offset, .. } = io.op else {
                panic!("expected a write")
            };
            writes.push((offset, io.buf.len(), io.buf[0]));
            job.complete(Ok(()), io.buf);
        }
        let c = CHUNK as usize;
        assert_eq!(
            writes,
            vec![
                (0, c, 0x0f),
                (CHUNK, c, 0x0f),
                (0, c, 0xf0),
                (CHUNK, c, 0xf0)
            ]
        );
        assert!(!job.failed());
    }

    #[test]
    fn failure_and_pacing() {
        let i = info(8192); // 4 MiB
        let p = overwrite_param(1, &[0]);
        let Ok(Request::Start { mut job, .. }) = decode(&cdb(1, 5), &p, &i, true, false) else {
            panic!("decode failed")
        };
        // A slow pace lets the first chunk go and holds the second.
        let io = job.next_io(BackstoreCaps::default(), 1).unwrap();
        job.complete(Ok(()), io.buf);
        assert!(job.next_io(BackstoreCaps::default(), 1).is_none());
        assert!(!job.finished());
        // A failed operation ends the job as failed; zeros use WRITE ZEROES.
        let caps = BackstoreCaps {
            write_zeroes: true,
            ..Default::default()
        };
        let io = job.next_io(caps, 0).unwrap();
        assert!(matches!(io.op, IoOp::WriteZeroes { .. }));
        job.complete(Err(5), io.buf);
        assert!(job.finished() && job.failed());
    }

    #[test]
    fn progress_indication() {
        let mut out = Vec::new();
        in_progress(1, 4).encode(false, &mut out);
        assert_eq!((out[2], out[12], out[13]), (2, 0x04, 0x1b));
        assert_eq!(&out[15..18], &[0x80, 0x40, 0x00]);
    }
}
