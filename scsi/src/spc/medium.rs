//! The medium of a logical unit: START STOP UNIT (SBC-3 5.25) and, for
//! removable LUNs, PREVENT ALLOW MEDIUM REMOVAL (SPC-4 6.13) with eject
//! and load.
//!
//! Prevention is kept per I_T nexus: medium removal is prevented while any
//! I_T nexus has it prevented. An I_T nexus loses its prevention when it
//! is lost (logout, connection loss) and every I_T nexus does on a logical
//! unit reset (which target resets are made of). The medium itself stays
//! where it is across resets. Non-removable LUNs have no medium to eject
//! and keep none of this state.

use super::SpcState;
use crate::common::{CmdError, NexusId};
use crate::sense::{Sense, SenseKey};
use std::collections::HashSet;

#[derive(Debug, Default)]
pub(crate) struct Medium {
    /// The medium has been ejected (START STOP UNIT with LOEJ).
    ejected: bool,
    /// I_T nexuses that have medium removal prevented.
    prevent: HashSet<NexusId>,
}

/// NOT READY, MEDIUM NOT PRESENT.
pub(crate) const fn medium_not_present() -> Sense {
    Sense::new(SenseKey::NotReady, 0x3a, 0x00)
}

/// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED.
const fn removal_prevented() -> Sense {
    Sense::new(SenseKey::IllegalRequest, 0x53, 0x02)
}

impl Medium {
    pub(crate) fn present(&self) -> bool {
        !self.ejected
    }

    pub(crate) fn nexus_lost(&mut self, id: NexusId) {
        self.prevent.remove(&id);
    }

    pub(crate) fn reset(&mut self) {
        self.prevent.clear();
    }
}

impl SpcState {
    /// Commands that need the medium fail with MEDIUM NOT PRESENT while it
    /// is ejected.
    pub(crate) fn medium_present(&self) -> bool {
        self.medium.present()
    }

    /// START STOP UNIT. A non-zero POWER CONDITION asks for a power state
    /// and makes the device server ignore START and LOEJ; the logical unit
    /// has no power states to change, so that is all it does. START alone
    /// has nothing to spin up or down. LOEJ ejects (START 0) or loads
    /// (START 1) a removable medium; neither moves it while removal is
    /// prevented, and a non-removable LUN has nothing to eject.
    pub(super) fn start_stop_unit(&mut self, cdb: &[u8]) -> Result<(), CmdError> {
        let power_condition = cdb[4] >> 4;
        let loej = cdb[4] & 0x02 != 0;
        let start = cdb[4] & 0x01 != 0;
        if power_condition != 0 || !loej {
            return Ok(());
        }
        if !self.info.removable {
            return Err(Sense::invalid_field_in_cdb(4, Some(1)).into());
        }
        if !self.medium.prevent.is_empty() {
            return Err(removal_prevented().into());
        }
        self.medium.ejected = !start;
        Ok(())
    }

    /// PREVENT ALLOW MEDIUM REMOVAL: PREVENT 00b allows, 01b prevents for
    /// this I_T nexus; 10b and 11b are obsolete/reserved. Only removable
    /// LUNs have the command (REPORT SUPPORTED OPERATION CODES agrees).
    pub(super) fn prevent_allow(&mut self, nexus: NexusId, cdb: &[u8]) -> Result<(), CmdError> {
        if !self.info.removable {
            return Err(Sense::invalid_opcode().into());
        }
        match cdb[4] & 0x03 {
            0 => {
                self.medium.prevent.remove(&nexus);
                Ok(())
            }
            1 => {
                self.medium.prevent.insert(nexus);
                Ok(())
            }
            _ => Err(Sense::invalid_field_in_cdb(4, Some(1)).into()),
        }
    }
}
