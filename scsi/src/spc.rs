//! SPC-4 commands answered from the LUN's own state, without the backstore:
//! INQUIRY and VPD pages, MODE SENSE/SELECT, REQUEST SENSE, REPORT
//! SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, TEST UNIT READY,
//! and the unit-attention and reservation checks every command passes
//! through first. Reservations themselves live in `pr`.
//!
//! CONTRACT with `lun.rs` (do not change signatures without updating it):
//! - `SpcState::new(&LunInfo, caps)` at LUN creation.
//! - `precheck` before every command: a pending unit attention or a
//!   reservation conflict ends the command there.
//! - `execute` runs the command if it is one of ours, else returns `None`
//!   and `lun.rs` tries SBC.

use crate::backstore::BackstoreCaps;
use crate::common::{CmdError, LunInfo, Nexus, NexusId};

/// Unit attention conditions we raise (SPC-4 6.x, SAM-5 5.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAttention {
    /// 29/00 POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
    PowerOnReset,
    /// 29/03 BUS DEVICE RESET FUNCTION OCCURRED (LUN reset)
    LunReset,
    /// 2A/01 MODE PARAMETERS CHANGED
    ModeParametersChanged,
    /// 2A/03 RESERVATIONS PREEMPTED
    ReservationsPreempted,
    /// 2A/04 RESERVATIONS RELEASED
    ReservationsReleased,
    /// 2A/05 REGISTRATIONS PREEMPTED
    RegistrationsPreempted,
    /// 2A/09 CAPACITY DATA HAS CHANGED
    CapacityChanged,
    /// 3F/0E REPORTED LUNS DATA HAS CHANGED
    ReportedLunsChanged,
}

pub(crate) struct SpcState {
    pub(crate) info: LunInfo,
    pub(crate) caps: BackstoreCaps,
}

impl SpcState {
    pub(crate) fn new(info: &LunInfo, caps: BackstoreCaps) -> Result<SpcState, String> {
        Ok(SpcState {
            info: info.clone(),
            caps,
        })
    }

    pub(crate) fn nexus_added(&mut self, _nexus: &Nexus) {}

    pub(crate) fn nexus_removed(&mut self, _id: NexusId) {}

    /// Checks made before any command runs: pending unit attentions (not
    /// for INQUIRY, REPORT LUNS, REQUEST SENSE) and reservation conflicts.
    pub(crate) fn precheck(&mut self, _nexus: NexusId, _cdb: &[u8]) -> Option<CmdError> {
        None
    }

    /// Run `cdb` if it is an SPC command this module answers. `data_in` is
    /// filled at its natural length (the caller truncates to EDTL).
    pub(crate) fn execute(
        &mut self,
        _nexus: NexusId,
        _cdb: &[u8],
        _data_out: &[u8],
        _data_in: &mut Vec<u8>,
    ) -> Option<Result<(), CmdError>> {
        None
    }

    /// D_SENSE from the control mode page: encode sense as descriptors.
    pub(crate) fn descriptor_sense(&self) -> bool {
        false
    }

    /// WCE from the caching mode page.
    pub(crate) fn write_cache_enabled(&self) -> bool {
        self.caps.volatile_cache
    }

    /// Raise `ua` for every nexus except `except`.
    pub(crate) fn establish_ua(&mut self, _ua: UnitAttention, _except: Option<NexusId>) {}

    /// LOGICAL UNIT RESET by `by`: SPC-2 reservations are released and every
    /// other nexus gets a unit attention. Persistent reservations survive.
    pub(crate) fn lun_reset(&mut self, _by: NexusId) {}
}
