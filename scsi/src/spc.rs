//! SPC-4 commands answered from the LUN's own state, without the backstore:
//! INQUIRY and VPD pages, MODE SENSE/SELECT, REQUEST SENSE, REPORT
//! SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, REPORT TARGET
//! PORT GROUPS, TEST UNIT READY, RESERVE/RELEASE, PERSISTENT RESERVE IN/OUT,
//! and the unit-attention and reservation checks every command passes
//! through first. Reservations themselves live in `pr`.
//!
//! CONTRACT with `lun.rs` (do not change signatures without updating it):
//! - `SpcState::new(&LunInfo, caps)` at LUN creation.
//! - `precheck` before every command: a pending unit attention or a
//!   reservation conflict ends the command there.
//! - `execute` runs the command if it is one of ours, else returns `None`
//!   and `lun.rs` tries SBC.
//! - `write_protected()` (read-only LUN or SWP set by MODE SELECT) must
//!   fail writes with DATA PROTECT / WRITE PROTECTED.
//! - `opcode_supported(op, sa)` is what REPORT SUPPORTED OPERATION CODES
//!   advertises; SBC must implement exactly the SBC ones listed there.
//! - `take_aborted_nexuses()` after a PERSISTENT RESERVE OUT: tasks of
//!   these I_T nexuses were preempted with PREEMPT AND ABORT.
//! - `lun_reset(by)` raises 29/03 for every I_T nexus, `by` included
//!   (SAM-5 6.3.3; libiscsi MultipathIO.Reset expects it on every path),
//!   so the next command from `by` gets CHECK CONDITION too.
//! - Block limits advertised (VPD B0h) come from `sbc::limits` and
//!   `LunInfo`; thin provisioning features from `can_unmap()`.

mod inquiry;
mod medium;
mod mode;
mod opcodes;

use crate::backstore::BackstoreCaps;
pub(crate) use crate::be::{be16, be32};
use crate::common::{CmdError, LunInfo, Nexus, NexusId};
use crate::pr::PrState;
use crate::sense::Sense;
use mempool::DataBuf;
use std::collections::{HashMap, VecDeque};

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
    /// 3F/0E REPORTED LUNS DATA HAS CHANGED
    ReportedLunsChanged,
}

impl UnitAttention {
    pub fn sense(self) -> Sense {
        let (asc, ascq) = match self {
            UnitAttention::PowerOnReset => (0x29, 0x00),
            UnitAttention::LunReset => (0x29, 0x03),
            UnitAttention::ModeParametersChanged => (0x2a, 0x01),
            UnitAttention::ReservationsPreempted => (0x2a, 0x03),
            UnitAttention::ReservationsReleased => (0x2a, 0x04),
            UnitAttention::RegistrationsPreempted => (0x2a, 0x05),
            UnitAttention::ReportedLunsChanged => (0x3f, 0x0e),
        };
        Sense::unit_attention(asc, ascq)
    }

    fn is_reset(self) -> bool {
        matches!(self, UnitAttention::PowerOnReset | UnitAttention::LunReset)
    }
}

/// Pending unit attentions per I_T nexus, bounded so that a nexus that
/// never sends commands cannot make us grow.
const UA_QUEUE_MAX: usize = 16;

// Operation codes handled here.
const TEST_UNIT_READY: u8 = 0x00;
const REQUEST_SENSE: u8 = 0x03;
const INQUIRY: u8 = 0x12;
const START_STOP_UNIT: u8 = 0x1b;
const PREVENT_ALLOW: u8 = 0x1e;
const MODE_SELECT_6: u8 = 0x15;
const RESERVE_6: u8 = 0x16;
const RELEASE_6: u8 = 0x17;
const MODE_SENSE_6: u8 = 0x1a;
const MODE_SELECT_10: u8 = 0x55;
const RESERVE_10: u8 = 0x56;
const RELEASE_10: u8 = 0x57;
const MODE_SENSE_10: u8 = 0x5a;
const PERSISTENT_RESERVE_IN: u8 = 0x5e;
const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
const REPORT_LUNS: u8 = 0xa0;
const MAINTENANCE_IN: u8 = 0xa3;

// MAINTENANCE IN service actions.
const REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
const REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
const REPORT_SUPPORTED_TMFS: u8 = 0x0d;

struct NexusSlot {
    nexus: Nexus,
    ua: VecDeque<UnitAttention>,
}

/// Mode parameters that can change (shared by all I_T nexuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModeParams {
    /// Caching page WCE.
    pub(crate) wce: bool,
    /// Control page D_SENSE.
    pub(crate) d_sense: bool,
    /// Control page SWP: software write protect.
    pub(crate) swp: bool,
}

pub(crate) struct SpcState {
    pub(crate) info: LunInfo,
    pub(crate) caps: BackstoreCaps,
    nexuses: HashMap<NexusId, NexusSlot>,
    mode: ModeParams,
    /// Mode parameters saved by MODE SELECT with SP=1 (`info.mode_file`).
    saved_mode: Option<ModeParams>,
    pr: PrState,
    aborted: Vec<NexusId>,
    medium: medium::Medium,
    /// While the logical unit is not ready for a reason of its own (a
    /// sanitize in progress), what REQUEST SENSE reports when no unit
    /// attention is pending. Set by `lun.rs`.
    pub(crate) not_ready: Option<Sense>,
}

/// Length of the CDB for `op` by its group code (SPC-4 4.2.5.1).
fn cdb_len(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 1,
    }
}

impl SpcState {
    pub(crate) fn new(info: &LunInfo, caps: BackstoreCaps) -> Result<SpcState, String> {
        let pr = PrState::new(info.pr_file.as_deref())?;
        let saved_mode = match &info.mode_file {
            Some(p) => Self::load_mode(p)?,
            None => None,
        };
        Ok(SpcState {
            info: info.clone(),
            caps,
            nexuses: HashMap::new(),
            mode: Self::start_mode(caps, info, saved_mode),
            saved_mode,
            pr,
            aborted: Vec::new(),
            medium: medium::Medium::default(),
            not_ready: None,
        })
    }

    /// Saved values where there are some, else defaults. Values a
    /// backstore cannot change are the defaults whatever was saved, and
    /// the LUN option `write_cache = false` keeps the cache off.
    fn start_mode(caps: BackstoreCaps, info: &LunInfo, saved: Option<ModeParams>) -> ModeParams {
        let d = Self::default_mode(caps, info);
        match saved {
            None => d,
            Some(s) => ModeParams {
                wce: s.wce && d.wce,
                ..s
            },
        }
    }

    fn default_mode(caps: BackstoreCaps, info: &LunInfo) -> ModeParams {
        ModeParams {
            wce: caps.volatile_cache && info.write_cache,
            d_sense: false,
            swp: false,
        }
    }

    /// A new I_T nexus: it starts with POWER ON, RESET pending, as after
    /// power on (SAM-5 5.14).
    pub(crate) fn nexus_added(&mut self, nexus: &Nexus) {
        let mut ua = VecDeque::new();
        ua.push_back(UnitAttention::PowerOnReset);
        self.nexuses.insert(
            nexus.id,
            NexusSlot {
                nexus: nexus.clone(),
                ua,
            },
        );
    }

    pub(crate) fn nexus_removed(&mut self, id: NexusId) {
        self.nexuses.remove(&id);
        self.pr.nexus_lost(id);
        self.medium.nexus_lost(id);
    }

    /// The slot of `id`; an I_T nexus we were never told about gets a
    /// made-up identity so that nothing panics and it cannot collide with
    /// a real initiator port.
    fn slot(&mut self, id: NexusId) -> &mut NexusSlot {
        self.nexuses.entry(id).or_insert_with(|| NexusSlot {
            nexus: Nexus {
                id,
                initiator_name: format!("unknown-nexus-{id}"),
                isid: 0,
                target_name: String::new(),
                tpgt: 0,
            },
            ua: VecDeque::new(),
        })
    }

    fn push_ua(slot: &mut NexusSlot, ua: UnitAttention) {
        if ua.is_reset() {
            // A reset supersedes whatever was pending.
            slot.ua.clear();
        } else if slot.ua.contains(&ua) || slot.ua.len() >= UA_QUEUE_MAX {
            return;
        }
        slot.ua.push_back(ua);
    }

    /// Checks made before any command runs: pending unit attentions (not
    /// for INQUIRY, REPORT LUNS, REQUEST SENSE) and reservation conflicts.
    pub(crate) fn precheck(&mut self, nexus: NexusId, cdb: &[u8]) -> Option<CmdError> {
        let op = *cdb.first()?;
        let slot = self.slot(nexus);
        match op {
            INQUIRY | REQUEST_SENSE => {}
            REPORT_LUNS => {
                // REPORT LUNS is how the initiator acts on this one.
                slot.ua.retain(|u| *u != UnitAttention::ReportedLunsChanged);
            }
            _ => {
                if let Some(ua) = slot.ua.pop_front() {
                    return Some(CmdError::Check(ua.sense()));
                }
            }
        }
        let me = &self.nexuses[&nexus].nexus;
        self.pr.check_access(me, cdb).err()
    }

    /// The reservation check alone, without unit attentions: for the reads
    /// and writes a copy manager makes on behalf of `nexus`.
    pub(crate) fn access_check(&mut self, nexus: NexusId, cdb: &[u8]) -> Option<CmdError> {
        self.slot(nexus);
        let me = &self.nexuses[&nexus].nexus;
        self.pr.check_access(me, cdb).err()
    }

    /// Run `cdb` if it is an SPC command this module answers. `data_in` is
    /// filled at its natural length truncated to the allocation length
    /// (the caller truncates to EDTL).
    pub(crate) fn execute(
        &mut self,
        nexus: NexusId,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut DataBuf,
    ) -> Option<Result<(), CmdError>> {
        let op = *cdb.first()?;
        let ours = matches!(
            op,
            TEST_UNIT_READY
                | REQUEST_SENSE
                | INQUIRY
                | MODE_SELECT_6
                | MODE_SELECT_10
                | MODE_SENSE_6
                | MODE_SENSE_10
                | RESERVE_6
                | RESERVE_10
                | RELEASE_6
                | RELEASE_10
                | PERSISTENT_RESERVE_IN
                | PERSISTENT_RESERVE_OUT
                | MAINTENANCE_IN
                | START_STOP_UNIT
                | PREVENT_ALLOW
        );
        if !ours {
            return None;
        }
        if cdb.len() < cdb_len(op) {
            return Some(Err(Sense::invalid_field_in_cdb(0, None).into()));
        }
        self.slot(nexus);
        Some(match op {
            TEST_UNIT_READY if !self.medium_present() => Err(medium::medium_not_present().into()),
            TEST_UNIT_READY => Ok(()),
            START_STOP_UNIT => self.start_stop_unit(cdb),
            PREVENT_ALLOW => self.prevent_allow(nexus, cdb),
            REQUEST_SENSE => self.request_sense(nexus, cdb, data_in),
            INQUIRY => self.inquiry(nexus, cdb, data_in),
            MODE_SENSE_6 | MODE_SENSE_10 => self.mode_sense(cdb, data_in),
            MODE_SELECT_6 | MODE_SELECT_10 => self.mode_select(nexus, cdb, data_out),
            RESERVE_6 | RESERVE_10 => self.reserve(nexus, cdb),
            RELEASE_6 | RELEASE_10 => self.release(nexus, cdb),
            PERSISTENT_RESERVE_IN => self.pr.persistent_reserve_in(cdb, data_in),
            PERSISTENT_RESERVE_OUT => self.persistent_reserve_out(nexus, cdb, data_out),
            _ => match cdb[1] & 0x1f {
                REPORT_TARGET_PORT_GROUPS => self.report_target_port_groups(nexus, cdb, data_in),
                REPORT_SUPPORTED_OPCODES => self.report_supported_opcodes(cdb, data_in),
                REPORT_SUPPORTED_TMFS => self.report_supported_tmfs(cdb, data_in),
                _ => Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
            },
        })
    }

    /// D_SENSE from the control mode page: encode sense as descriptors.
    pub(crate) fn descriptor_sense(&self) -> bool {
        self.mode.d_sense
    }

    /// WCE from the caching mode page.
    pub(crate) fn write_cache_enabled(&self) -> bool {
        self.mode.wce
    }

    /// Writes must fail with WRITE PROTECTED: the LUN is read-only or the
    /// initiator set SWP in the control mode page.
    pub(crate) fn write_protected(&self) -> bool {
        self.info.read_only || self.mode.swp
    }

    /// I_T nexuses whose tasks a PREEMPT AND ABORT preempted since the last
    /// call; `lun.rs` aborts their tasks in flight.
    #[allow(dead_code)] // contract method for lun.rs
    pub(crate) fn take_aborted_nexuses(&mut self) -> Vec<NexusId> {
        std::mem::take(&mut self.aborted)
    }

    /// Raise `ua` for every nexus except `except`.
    pub(crate) fn establish_ua(&mut self, ua: UnitAttention, except: Option<NexusId>) {
        for (id, slot) in self.nexuses.iter_mut() {
            if Some(*id) != except {
                Self::push_ua(slot, ua);
            }
        }
    }

    /// LOGICAL UNIT RESET by `by`: SPC-2 reservations are released, mode
    /// parameters return to their saved values (else defaults) and every nexus,
    /// `by` included (SAM-5 6.3.3), gets a unit attention. Persistent
    /// reservations survive; medium removal is allowed again. A reset
    /// never turns the write cache on: an initiator that turned it off
    /// relies on that for durability (Linux reads the caching page only
    /// when it scans the disk), and sees the cache off until it says
    /// otherwise.
    pub(crate) fn lun_reset(&mut self, _by: NexusId) {
        self.pr.reset();
        self.medium.reset();
        let wce = self.mode.wce;
        self.mode = Self::start_mode(self.caps, &self.info, self.saved_mode);
        self.mode.wce &= wce;
        self.establish_ua(UnitAttention::LunReset, None);
    }

    /// REQUEST SENSE (SPC-4 6.39): hands over (and clears) the next unit
    /// attention, or NO SENSE.
    fn request_sense(
        &mut self,
        nexus: NexusId,
        cdb: &[u8],
        data_in: &mut DataBuf,
    ) -> Result<(), CmdError> {
        let desc = cdb[1] & 0x01 != 0;
        let alloc = cdb[4] as usize;
        let sense = self
            .slot(nexus)
            .ua
            .pop_front()
            .map(UnitAttention::sense)
            .or(self.not_ready)
            .unwrap_or(Sense::no_sense());
        // REQUEST SENSE is rare: a scratch vector is fine here.
        let mut enc = Vec::with_capacity(32);
        sense.encode(desc, &mut enc);
        data_in.clear();
        data_in.extend_from_slice(&enc);
        data_in.truncate(alloc);
        Ok(())
    }

    fn reserve(&mut self, nexus: NexusId, cdb: &[u8]) -> Result<(), CmdError> {
        // Extents and third-party reservations are obsolete; we refuse
        // them rather than silently reserving the whole LU for us.
        if cdb[0] == RESERVE_6 && cdb[1] & 0x01 != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(0)).into());
        }
        if cdb[0] == RESERVE_10 && cdb[1] & 0x12 != 0 {
            let bit = if cdb[1] & 0x10 != 0 { 4 } else { 1 };
            return Err(Sense::invalid_field_in_cdb(1, Some(bit)).into());
        }
        self.pr.spc2_reserve(nexus)
    }

    fn release(&mut self, nexus: NexusId, cdb: &[u8]) -> Result<(), CmdError> {
        if cdb[0] == RELEASE_10 && cdb[1] & 0x12 != 0 {
            let bit = if cdb[1] & 0x10 != 0 { 4 } else { 1 };
            return Err(Sense::invalid_field_in_cdb(1, Some(bit)).into());
        }
        self.pr.spc2_release(nexus);
        Ok(())
    }

    fn persistent_reserve_out(
        &mut self,
        nexus: NexusId,
        cdb: &[u8],
        data_out: &[u8],
    ) -> Result<(), CmdError> {
        let out = {
            let me = &self.nexuses[&nexus].nexus;
            let all: Vec<&Nexus> = self.nexuses.values().map(|s| &s.nexus).collect();
            self.pr.persistent_reserve_out(me, &all, cdb, data_out)?
        };
        for (id, ua) in out.uas {
            if let Some(slot) = self.nexuses.get_mut(&id) {
                Self::push_ua(slot, ua);
            }
        }
        self.aborted.extend(out.aborted);
        Ok(())
    }

    /// Distinct relative target port identifiers (TPGTs) seen so far.
    fn target_ports(&self, nexus: NexusId) -> Vec<u16> {
        let mut ports: Vec<u16> = self.nexuses.values().map(|s| s.nexus.tpgt).collect();
        if let Some(s) = self.nexuses.get(&nexus) {
            ports.push(s.nexus.tpgt);
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// REPORT TARGET PORT GROUPS (SPC-4 6.36): one group, id 1, always
    /// active/optimized, holding every target port (portal group).
    fn report_target_port_groups(
        &self,
        nexus: NexusId,
        cdb: &[u8],
        data_in: &mut DataBuf,
    ) -> Result<(), CmdError> {
        let format = cdb[1] >> 5;
        if format > 1 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)).into());
        }
        let alloc = be32(cdb, 6) as usize;
        let ports = self.target_ports(nexus);
        data_in.clear();
        data_in.extend_from_slice(&[0, 0, 0, 0]);
        if format == 1 {
            // Extended header: FORMAT TYPE 001b, no implicit transition time.
            data_in.extend_from_slice(&[0x10, 0, 0, 0]);
        }
        let count = ports.len().min(255);
        // PREF=1, state active/optimized; AO_SUP only; group 1.
        data_in.extend_from_slice(&[0x80, 0x01, 0x00, 0x01, 0, 0, 0, count as u8]);
        for p in ports.iter().take(count) {
            data_in.extend_from_slice(&[0, 0]);
            data_in.extend_from_slice(&p.to_be_bytes());
        }
        let len = (data_in.len() - 4) as u32;
        data_in[0..4].copy_from_slice(&len.to_be_bytes());
        data_in.truncate(alloc);
        Ok(())
    }

    /// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 6.40).
    fn report_supported_tmfs(&self, cdb: &[u8], data_in: &mut DataBuf) -> Result<(), CmdError> {
        let repd = cdb[2] & 0x80 != 0;
        let alloc = be32(cdb, 6) as usize;
        data_in.clear();
        // ATS, ATSS, CTSS, LURS, QTS, TRS (target warm/cold reset).
        data_in.extend_from_slice(&[0xde, 0x00, 0x00, 0x00]);
        if repd {
            // REPD: extended format with ADDITIONAL LENGTH 0Ch and no TMF
            // timeout information.
            data_in[3] = 0x0c;
            data_in.extend_from_slice(&[0u8; 12]);
        }
        data_in.truncate(alloc);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
