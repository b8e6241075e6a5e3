//! A logical unit: one backstore, its SPC state, and the commands in
//! flight against it.

use crate::backstore::Backstore;
use crate::common::{LunInfo, Nexus, NexusId, ScsiCompletion, ScsiTask};
use crate::spc::SpcState;

pub struct Lun {
    info: LunInfo,
    backstore: Box<dyn Backstore>,
    spc: SpcState,
}

impl Lun {
    pub fn new(info: LunInfo, backstore: Box<dyn Backstore>) -> Result<Lun, String> {
        let spc = SpcState::new(&info, backstore.caps())?;
        Ok(Lun {
            info,
            backstore,
            spc,
        })
    }

    pub fn info(&self) -> &LunInfo {
        &self.info
    }

    pub fn nexus_added(&mut self, nexus: &Nexus) {
        self.spc.nexus_added(nexus)
    }

    pub fn nexus_removed(&mut self, id: NexusId) {
        self.spc.nexus_removed(id)
    }

    /// Start a command. Never blocks; the answer comes from `poll`.
    pub fn submit(&mut self, _task: ScsiTask) {
        let _ = &mut self.backstore;
        todo!("lun dispatch")
    }

    /// Move finished commands into `out`; returns how many.
    pub fn poll(&mut self, _out: &mut Vec<ScsiCompletion>) -> usize {
        0
    }

    /// Commands submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        0
    }

    /// LOGICAL UNIT RESET requested by `by`.
    pub fn reset(&mut self, by: NexusId) {
        self.spc.lun_reset(by)
    }

    /// Flush and close the backstore (blocking; used at shutdown).
    pub fn shutdown(&mut self) -> Result<(), i32> {
        self.backstore.shutdown()
    }
}
