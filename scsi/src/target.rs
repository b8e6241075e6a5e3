//! A SCSI target device: the LUNs of one iSCSI target, REPORT LUNS, and
//! answers for LUNs that do not exist.

use crate::common::{Nexus, NexusId, ScsiCompletion, ScsiTask};
use crate::lun::Lun;
use crate::sense::Sense;
use crate::stats::IoCounters;
use crate::status;
use crate::xcopy::CopyManager;
use std::collections::VecDeque;

/// Largest LUN the flat space addressing method can express.
pub const MAX_LUN: u64 = 0x3fff;

/// Decode the 8-byte SAM LUN field (SAM-5 4.7) as carried big-endian in
/// the iSCSI header. Only single-level peripheral (00b) and flat space
/// (01b) addressing are understood; anything else names no LUN of ours.
pub fn decode_lun(raw: u64) -> Option<u64> {
    let [b0, b1, rest @ ..] = raw.to_be_bytes();
    if rest.iter().any(|&x| x != 0) {
        return None;
    }
    match b0 >> 6 {
        0 if b0 == 0 => Some(b1 as u64),
        1 => Some((((b0 & 0x3f) as u64) << 8) | b1 as u64),
        _ => None,
    }
}

/// Encode `lun` as REPORT LUNS lists it (and as initiators address it):
/// peripheral addressing below 256, flat space above.
pub fn encode_lun(lun: u64) -> u64 {
    let b = if lun < 256 {
        [0, lun as u8]
    } else {
        [0x40 | ((lun >> 8) as u8 & 0x3f), lun as u8]
    };
    u64::from_be_bytes([b[0], b[1], 0, 0, 0, 0, 0, 0])
}

#[derive(Default)]
pub struct Target {
    luns: Vec<Lun>,
    /// Answers made by the target itself (REPORT LUNS, absent LUNs).
    pending: VecDeque<ScsiCompletion>,
    /// EXTENDED COPY between this target's LUNs.
    xcopy: CopyManager,
}

impl Target {
    pub fn new() -> Target {
        Target::default()
    }

    /// Add a LUN. A LUN number already present or beyond `MAX_LUN` is
    /// refused (the LUN is dropped) and false returned.
    pub fn add_lun(&mut self, lun: Lun) -> bool {
        let id = lun.info().lun;
        if id > MAX_LUN || self.luns.iter().any(|l| l.info().lun == id) {
            return false;
        }
        self.luns.push(lun);
        self.luns.sort_by_key(|l| l.info().lun);
        true
    }

    pub fn luns(&self) -> &[Lun] {
        &self.luns
    }

    pub fn luns_mut(&mut self) -> &mut [Lun] {
        &mut self.luns
    }

    /// Each LUN's number and counters, in LUN order. Commands the target
    /// answers itself (REPORT LUNS, LUNs that do not exist) belong to no
    /// LUN and are not counted.
    pub fn lun_stats(&self) -> impl Iterator<Item = (u64, &IoCounters)> + '_ {
        self.luns.iter().map(|l| (l.info().lun, l.stats()))
    }

    fn find(&mut self, raw_lun: u64) -> Option<&mut Lun> {
        let id = decode_lun(raw_lun)?;
        self.luns.iter_mut().find(|l| l.info().lun == id)
    }

    pub fn has_lun(&self, raw_lun: u64) -> bool {
        decode_lun(raw_lun).is_some_and(|id| self.luns.iter().any(|l| l.info().lun == id))
    }

    pub fn nexus_added(&mut self, nexus: &Nexus) {
        for l in &mut self.luns {
            l.nexus_added(nexus);
        }
    }

    pub fn nexus_removed(&mut self, id: NexusId) {
        self.pending.retain(|c| c.nexus != id);
        self.xcopy.nexus_removed(id, &mut self.luns);
        for l in &mut self.luns {
            l.nexus_removed(id);
        }
    }

    /// Start `task` on the LUN addressed by the raw 8-byte SAM LUN field.
    pub fn submit(&mut self, raw_lun: u64, task: ScsiTask) {
        let op = task.cdb.first().copied();
        if op == Some(0xa0) {
            return self.report_luns(task);
        }
        match self.find(raw_lun) {
            Some(l) => {
                l.submit(task);
                // EXTENDED COPY and RECEIVE COPY RESULTS that passed the
                // LUN's checks go to the copy manager, which spans LUNs.
                let id = l.info().lun;
                for (t, stamp) in l.take_copy_commands() {
                    self.xcopy.submit(id, t, stamp, &mut self.luns);
                }
            }
            None => self.absent_lun(task),
        }
    }

    fn reply(&mut self, task: ScsiTask, r: Result<Vec<u8>, Sense>) {
        let mut c = ScsiCompletion {
            tag: task.tag,
            nexus: task.nexus,
            data_out_len: task.data_out.len() as u32,
            data_out: task.data_out,
            ..Default::default()
        };
        match r {
            Ok(d) => {
                c.data_in = task.data_in;
                c.data_in.clear();
                c.data_in.extend_from_slice(&d);
            }
            Err(s) => {
                c.status = status::CHECK_CONDITION;
                // No LUN, no control mode page: fixed format.
                s.encode(false, &mut c.sense);
            }
        }
        self.pending.push_back(c);
    }

    fn report_luns(&mut self, task: ScsiTask) {
        let cdb = &task.cdb;
        let g = |i: usize| cdb.get(i).copied().unwrap_or(0);
        let alloc = u32::from_be_bytes([g(6), g(7), g(8), g(9)]) as usize;
        let r = if alloc < 16 {
            Err(Sense::invalid_field_in_cdb(6, None))
        } else {
            match g(2) {
                // Logical units (0x00, 0x02); we have no well-known ones (0x01).
                sel @ (0x00..=0x02) => {
                    let ids: Vec<u64> = if sel == 1 {
                        Vec::new()
                    } else {
                        self.luns.iter().map(|l| l.info().lun).collect()
                    };
                    let mut d = Vec::with_capacity(8 + 8 * ids.len());
                    d.extend_from_slice(&((ids.len() * 8) as u32).to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    for id in ids {
                        d.extend_from_slice(&encode_lun(id).to_be_bytes());
                    }
                    d.truncate(alloc);
                    Ok(d)
                }
                _ => Err(Sense::invalid_field_in_cdb(2, None)),
            }
        };
        self.reply(task, r)
    }

    /// SPC-4 for a LUN that is not there: INQUIRY describes "no device",
    /// REQUEST SENSE reports why, everything else fails.
    fn absent_lun(&mut self, task: ScsiTask) {
        let cdb = &task.cdb;
        let g = |i: usize| cdb.get(i).copied().unwrap_or(0);
        let r = match g(0) {
            0x12 => {
                let alloc = u16::from_be_bytes([g(3), g(4)]) as usize;
                let mut d = if g(1) & 1 != 0 {
                    vec![0x7f, g(2), 0, 0]
                } else {
                    let mut d = vec![0u8; 36];
                    // Peripheral qualifier 011b, device type 1Fh.
                    d[0] = 0x7f;
                    d[2] = 0x06; // SPC-4
                    d[3] = 0x02; // response data format
                    d[4] = 31;
                    d
                };
                d.truncate(alloc);
                Ok(d)
            }
            0x03 => {
                let mut d = Vec::new();
                Sense::lun_not_supported().encode(g(1) & 1 != 0, &mut d);
                d.truncate(g(4) as usize);
                Ok(d)
            }
            _ => Err(Sense::lun_not_supported()),
        };
        self.reply(task, r)
    }

    pub fn poll(&mut self, out: &mut Vec<ScsiCompletion>) -> usize {
        let mut n = self.pending.len();
        out.extend(self.pending.drain(..));
        // The copy manager's reads and writes come back among the LUNs'
        // completions; each one it takes may start the next or finish an
        // EXTENDED COPY, so poll again until it takes none.
        loop {
            let start = out.len();
            for l in &mut self.luns {
                l.poll(out);
            }
            let internal = self.xcopy.divert(out, start, &mut self.luns);
            n += out.len() - start;
            if internal == 0 {
                break;
            }
        }
        n
    }

    /// Commands submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
            + self.luns.iter().map(|l| l.in_flight()).sum::<usize>()
            + self.xcopy.in_flight()
    }

    /// ABORT TASK: true if the task was found; it will not complete.
    pub fn abort(&mut self, raw_lun: u64, nexus: NexusId, tag: u64) -> bool {
        let before = self.pending.len();
        self.pending.retain(|c| !(c.nexus == nexus && c.tag == tag));
        if self.pending.len() != before {
            return true;
        }
        let Some(id) = decode_lun(raw_lun) else {
            return false;
        };
        let copies = self
            .xcopy
            .abort_where(|l, n, t| l == id && n == nexus && t == tag, &mut self.luns);
        if copies > 0 {
            return true;
        }
        self.find(raw_lun).is_some_and(|l| l.abort(nexus, tag))
    }

    /// QUERY TASK: is the task still in the task set?
    pub fn query_task(&mut self, raw_lun: u64, nexus: NexusId, tag: u64) -> bool {
        if self
            .pending
            .iter()
            .any(|c| c.nexus == nexus && c.tag == tag)
        {
            return true;
        }
        if decode_lun(raw_lun).is_some_and(|id| self.xcopy.has_task(id, nexus, tag)) {
            return true;
        }
        self.find(raw_lun).is_some_and(|l| l.has_task(nexus, tag))
    }

    /// ABORT TASK SET / CLEAR TASK SET: the nexus's tasks on one LUN.
    pub fn abort_task_set(&mut self, raw_lun: u64, nexus: NexusId) -> bool {
        match self.find(raw_lun) {
            Some(l) => {
                l.abort_nexus(nexus);
                let id = l.info().lun;
                self.xcopy
                    .abort_where(|l, n, _| l == id && n == nexus, &mut self.luns);
                true
            }
            None => false,
        }
    }

    /// LOGICAL UNIT RESET; false if no such LUN.
    pub fn lun_reset(&mut self, raw_lun: u64, by: NexusId) -> bool {
        match self.find(raw_lun) {
            Some(l) => {
                l.reset(by);
                let id = l.info().lun;
                self.xcopy.lun_reset(id, &mut self.luns);
                true
            }
            None => false,
        }
    }

    /// TARGET WARM/COLD RESET: every LUN resets.
    pub fn target_reset(&mut self, by: NexusId) {
        self.pending.clear();
        for l in &mut self.luns {
            l.reset(by);
        }
        self.xcopy.target_reset(&mut self.luns);
    }
}
