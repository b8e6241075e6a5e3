//! A SCSI target device: the LUNs of one iSCSI target, REPORT LUNS, and
//! answers for LUNs that do not exist.

use crate::common::{Nexus, NexusId, ScsiCompletion, ScsiTask};
use crate::lun::Lun;

#[derive(Default)]
pub struct Target {
    luns: Vec<Lun>,
}

impl Target {
    pub fn new() -> Target {
        Target::default()
    }

    pub fn add_lun(&mut self, lun: Lun) {
        self.luns.push(lun);
    }

    pub fn luns(&self) -> &[Lun] {
        &self.luns
    }

    pub fn nexus_added(&mut self, nexus: &Nexus) {
        for l in &mut self.luns {
            l.nexus_added(nexus);
        }
    }

    pub fn nexus_removed(&mut self, id: NexusId) {
        for l in &mut self.luns {
            l.nexus_removed(id);
        }
    }

    /// Start `task` on the LUN addressed by the raw 8-byte SAM LUN field.
    pub fn submit(&mut self, _raw_lun: u64, _task: ScsiTask) {
        todo!("target dispatch")
    }

    pub fn poll(&mut self, out: &mut Vec<ScsiCompletion>) -> usize {
        self.luns.iter_mut().map(|l| l.poll(out)).sum()
    }

    /// LOGICAL UNIT RESET; false if no such LUN.
    pub fn lun_reset(&mut self, _raw_lun: u64, _by: NexusId) -> bool {
        todo!()
    }

    /// TARGET WARM/COLD RESET: every LUN resets.
    pub fn target_reset(&mut self, by: NexusId) {
        for l in &mut self.luns {
            l.reset(by);
        }
    }
}
