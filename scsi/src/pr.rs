//! Reservations: SPC-2 RESERVE/RELEASE (6)/(10) and SPC-4 persistent
//! reservations (PERSISTENT RESERVE IN/OUT), with APTPL state kept in a
//! file across restarts. Owned by `spc::SpcState`.
//!
//! Registrations belong to I_T nexus *identities* (initiator port name and
//! target port), never to a `NexusId`, so they outlive reconnects as SPC-4
//! requires. An SPC-2 reservation, by contrast, dies with its I_T nexus.

use crate::be::{be16, be32, be64};
use crate::common::{CmdError, Nexus, NexusId};
use crate::sense::Sense;
use crate::spc::UnitAttention;
use mempool::DataBuf;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Bound on registrations per LUN: SPEC_I_PT and many initiators must not
/// grow the table without limit.
pub(crate) const MAX_REGISTRATIONS: usize = 256;

/// PERSISTENT RESERVE IN service actions (SPC-4 6.15.1).
const PRIN_READ_KEYS: u8 = 0x00;
const PRIN_READ_RESERVATION: u8 = 0x01;
const PRIN_REPORT_CAPABILITIES: u8 = 0x02;
const PRIN_READ_FULL_STATUS: u8 = 0x03;

/// PERSISTENT RESERVE OUT service actions (SPC-4 6.16.2).
const PROUT_REGISTER: u8 = 0x00;
const PROUT_RESERVE: u8 = 0x01;
const PROUT_RELEASE: u8 = 0x02;
const PROUT_CLEAR: u8 = 0x03;
const PROUT_PREEMPT: u8 = 0x04;
const PROUT_PREEMPT_AND_ABORT: u8 = 0x05;
const PROUT_REGISTER_AND_IGNORE: u8 = 0x06;
const PROUT_REGISTER_AND_MOVE: u8 = 0x07;

/// iSCSI PROTOCOL IDENTIFIER in TransportIDs and designators (SPC-4 7.6.1).
pub(crate) const PROTOCOL_ISCSI: u8 = 0x5;

/// Persistent reservation TYPE (SPC-4 6.16.3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    pub(crate) fn from_u8(v: u8) -> Option<PrType> {
        Some(match v {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }
    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }
    fn registrants_only(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
        )
    }
    /// The Exclusive Access family also fences reads.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// How a command fares under a persistent reservation held by another
/// I_T nexus (SPC-4 table 5.13.1 and SBC-3 4.17): `Read` is fenced only by
/// Exclusive Access types, `Write` by every type for non-registrants and
/// by WE/EA for registrants too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Allowed,
    Read,
    Write,
}

/// The access class of `cdb` (non-empty).
pub(crate) fn classify(cdb: &[u8]) -> Access {
    let byte = |i: usize| cdb.get(i).copied().unwrap_or(0);
    match cdb[0] {
        // INQUIRY, REQUEST SENSE, TEST UNIT READY, REPORT LUNS, LOG SENSE,
        // PERSISTENT RESERVE IN/OUT, READ CAPACITY(10), MAINTENANCE IN
        // (report commands), READ MEDIA SERIAL NUMBER.
        0x12 | 0x03 | 0x00 | 0xa0 | 0x4d | 0x5e | 0x5f | 0x25 | 0xa3 | 0xab => Access::Allowed,
        // SPC-2 RESERVE/RELEASE are judged by the SPC-2 exceptions instead.
        0x16 | 0x17 | 0x56 | 0x57 => Access::Allowed,
        // READ CAPACITY(16) is allowed; other SERVICE ACTION IN(16)
        // (GET LBA STATUS) read.
        0x9e if byte(1) & 0x1f == 0x10 => Access::Allowed,
        0x9e => Access::Read,
        // PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0 only relaxes.
        0x1e if byte(4) & 0x03 == 0 => Access::Allowed,
        // START STOP UNIT with START=1 and no power condition.
        0x1b if byte(4) & 0xf1 == 0x01 => Access::Allowed,
        // READ(6/10/12/16), VERIFY(10/12/16), PRE-FETCH(10/16), READ DEFECT
        // DATA(10/12), READ LONG(10).
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x37 | 0xb7 | 0x3e => {
            Access::Read
        }
        _ => Access::Write,
    }
}

/// Commands another I_T nexus may still send while an SPC-2 reservation
/// is held (SPC-2 5.5.1).
fn spc2_allowed(cdb: &[u8]) -> bool {
    match cdb[0] {
        0x12 | 0x03 | 0xa0 | 0x4d | 0x17 | 0x57 | 0xa3 => true,
        0x1e => cdb.get(4).copied().unwrap_or(0) & 0x03 == 0,
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Registration {
    /// Stable handle so the reservation can name its holder.
    id: u64,
    key: u64,
    initiator_name: String,
    /// None: every initiator port of this iSCSI name (TransportID format
    /// 00b names the initiator device, not one port).
    isid: Option<u64>,
    target_name: String,
    /// None: registered through every target port (ALL_TG_PT).
    tpgt: Option<u16>,
}

impl Registration {
    fn matches(&self, n: &Nexus) -> bool {
        self.initiator_name.eq_ignore_ascii_case(&n.initiator_name)
            && self.isid.is_none_or(|i| i == n.isid)
            && self.target_name.eq_ignore_ascii_case(&n.target_name)
            && self.tpgt.is_none_or(|t| t == n.tpgt)
    }
    /// Whether this registration and a prospective one would cover a
    /// common I_T nexus.
    fn overlaps(&self, name: &str, isid: Option<u64>, tpgt: Option<u16>) -> bool {
        self.initiator_name.eq_ignore_ascii_case(name)
            && (self.isid.is_none() || isid.is_none() || self.isid == isid)
            && (self.tpgt.is_none() || tpgt.is_none() || self.tpgt == tpgt)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    ty: PrType,
    /// Registration id of the holder; unused for all-registrants types,
    /// where every registrant holds it.
    holder: u64,
}

/// Side effects of a PERSISTENT RESERVE OUT the caller must carry out.
#[derive(Debug, Default)]
pub(crate) struct PrOutcome {
    pub(crate) uas: Vec<(NexusId, UnitAttention)>,
    /// I_T nexuses whose tasks PREEMPT AND ABORT must abort.
    pub(crate) aborted: Vec<NexusId>,
}

#[derive(Debug, Clone)]
pub(crate) struct PrState {
    generation: u32,
    regs: Vec<Registration>,
    reservation: Option<Reservation>,
    /// Activate Persist Through Power Loss, as set by the last REGISTER.
    aptpl: bool,
    next_id: u64,
    file: Option<PathBuf>,
    spc2_holder: Option<NexusId>,
}

fn conflict<T>() -> Result<T, CmdError> {
    Err(CmdError::ReservationConflict)
}

fn param_len_err<T>() -> Result<T, CmdError> {
    Err(Sense::param_list_length().into())
}
fn bad_param<T>(byte: usize, bit: Option<u8>) -> Result<T, CmdError> {
    Err(Sense::invalid_field_in_param(byte.min(u16::MAX as usize) as u16, bit).into())
}

/// An iSCSI TransportID (SPC-4 7.6.4.6): format 00b names the initiator,
/// format 01b one of its ports `<name>,i,0x<ISID>`.
pub(crate) fn transport_id(name: &str, isid: Option<u64>, out: &mut DataBuf) {
    let start = out.len();
    out.push(match isid {
        Some(_) => 0x40 | PROTOCOL_ISCSI,
        None => PROTOCOL_ISCSI,
    });
    out.extend_from_slice(&[0, 0, 0]);
    match isid {
        Some(i) => {
            let _ = write!(PushStr(out), "{name},i,0x{i:012x}");
        }
        None => out.extend_from_slice(name.as_bytes()),
    }
    out.push(0);
    // The name is NUL terminated, padded to a multiple of 4 and at least
    // 20 bytes.
    while !(out.len() - start - 4).is_multiple_of(4) || out.len() - start - 4 < 20 {
        out.push(0);
    }
    let len = (out.len() - start - 4) as u16;
    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
}

struct PushStr<'a>(&'a mut DataBuf);
impl std::fmt::Write for PushStr<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Parse one TransportID at `buf` (which sits at byte `off` of the
/// parameter list). Returns initiator name, ISID and bytes consumed.
fn parse_transport_id(buf: &[u8], off: usize) -> Result<(String, Option<u64>, usize), CmdError> {
    if buf.len() < 4 {
        return param_len_err();
    }
    if buf[0] & 0x0f != PROTOCOL_ISCSI {
        return bad_param(off, Some(3));
    }
    let format = buf[0] >> 6;
    if format > 1 || buf[0] & 0x30 != 0 {
        return bad_param(off, Some(7));
    }
    let total = 4 + be16(buf, 2) as usize;
    if total > buf.len() {
        return param_len_err();
    }
    let body = &buf[4..total];
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let Ok(s) = std::str::from_utf8(&body[..end]) else {
        return bad_param(off + 4, None);
    };
    if s.is_empty()
        || s.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return bad_param(off + 4, None);
    }
    if format == 0 {
        return Ok((s.to_string(), None, total));
    }
    let lower = s.to_ascii_lowercase();
    let Some(pos) = lower.rfind(",i,0x") else {
        return bad_param(off + 4, None);
    };
    let hex = &s[pos + 5..];
    match u64::from_str_radix(hex, 16) {
        Ok(isid) if !hex.is_empty() && hex.len() <= 12 && pos > 0 => {
            Ok((s[..pos].to_string(), Some(isid), total))
        }
        _ => bad_param(off + 4, None),
    }
}

impl PrState {
    /// Fresh state, or the APTPL state saved in `file` if it exists.
    pub(crate) fn new(file: Option<&Path>) -> Result<PrState, String> {
        let mut st = PrState {
            generation: 0,
            regs: Vec::new(),
            reservation: None,
            aptpl: false,
            next_id: 1,
            file: file.map(Path::to_path_buf),
            spc2_holder: None,
        };
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => st
                    .load(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Ok(st)
    }

    pub(crate) fn ptpl_capable(&self) -> bool {
        self.file.is_some()
    }

    fn reg_of(&self, n: &Nexus) -> Option<usize> {
        self.regs.iter().position(|r| r.matches(n))
    }

    pub(crate) fn is_registered(&self, n: &Nexus) -> bool {
        self.reg_of(n).is_some()
    }

    fn is_holder(&self, idx: usize) -> bool {
        self.reservation
            .is_some_and(|r| r.ty.all_registrants() || r.holder == self.regs[idx].id)
    }

    /// Reservation checks every command passes (SPC-4 5.13.1, SPC-2 5.5.1
    /// and the SPC-2/PR exceptions of SPC-4 5.13.3).
    pub(crate) fn check_access(&self, me: &Nexus, cdb: &[u8]) -> Result<(), CmdError> {
        let Some(&op) = cdb.first() else {
            return Ok(());
        };
        if let Some(h) = self.spc2_holder {
            if h != me.id && !spc2_allowed(cdb) {
                return conflict();
            }
            // With an SPC-2 reservation in place, PR commands conflict for
            // everyone, the holder included.
            if matches!(op, 0x5e | 0x5f) {
                return conflict();
            }
        }
        // Once anyone is registered, SPC-2 RESERVE and RELEASE conflict
        // regardless of initiator.
        if matches!(op, 0x16 | 0x17 | 0x56 | 0x57) && !self.regs.is_empty() {
            return conflict();
        }
        let Some(res) = self.reservation else {
            return Ok(());
        };
        let mine = self.reg_of(me);
        if mine.is_some_and(|i| self.is_holder(i)) {
            return Ok(());
        }
        // Registrants pass RO/AR reservations; WE/EA admit only the holder.
        let registered = mine.is_some() && (res.ty.registrants_only() || res.ty.all_registrants());
        let allowed = match classify(cdb) {
            Access::Allowed => true,
            Access::Read => registered || !res.ty.exclusive_access(),
            Access::Write => registered,
        };
        if allowed {
            Ok(())
        } else {
            conflict()
        }
    }

    /// SPC-2 RESERVE(6)/(10) from `id`.
    pub(crate) fn spc2_reserve(&mut self, id: NexusId) -> Result<(), CmdError> {
        match self.spc2_holder {
            Some(h) if h != id => conflict(),
            _ => {
                self.spc2_holder = Some(id);
                Ok(())
            }
        }
    }

    /// SPC-2 RELEASE(6)/(10): a no-op unless `id` holds the reservation.
    pub(crate) fn spc2_release(&mut self, id: NexusId) {
        if self.spc2_holder == Some(id) {
            self.spc2_holder = None;
        }
    }

    /// LOGICAL UNIT RESET: SPC-2 reservations go, persistent ones stay.
    pub(crate) fn reset(&mut self) {
        self.spc2_holder = None;
    }

    /// I_T nexus loss releases the SPC-2 reservation it held.
    pub(crate) fn nexus_lost(&mut self, id: NexusId) {
        self.spc2_release(id);
    }

    /// PERSISTENT RESERVE IN. `data_in` gets the full response truncated
    /// to the allocation length.
    pub(crate) fn persistent_reserve_in(
        &self,
        cdb: &[u8],
        data_in: &mut DataBuf,
    ) -> Result<(), CmdError> {
        let sa = cdb[1] & 0x1f;
        let alloc = be16(cdb, 7) as usize;
        data_in.clear();
        match sa {
            PRIN_READ_KEYS => {
                data_in.extend_from_slice(&self.generation.to_be_bytes());
                data_in.extend_from_slice(&((self.regs.len() * 8) as u32).to_be_bytes());
                for r in &self.regs {
                    data_in.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            PRIN_READ_RESERVATION => {
                data_in.extend_from_slice(&self.generation.to_be_bytes());
                match self.reservation {
                    None => data_in.extend_from_slice(&0u32.to_be_bytes()),
                    Some(res) => {
                        data_in.extend_from_slice(&16u32.to_be_bytes());
                        // All-registrants reservations report key zero.
                        let key = if res.ty.all_registrants() {
                            0
                        } else {
                            self.regs
                                .iter()
                                .find(|r| r.id == res.holder)
                                .map_or(0, |r| r.key)
                        };
                        data_in.extend_from_slice(&key.to_be_bytes());
                        data_in.extend_from_slice(&[0, 0, 0, 0, 0, res.ty as u8, 0, 0]);
                    }
                }
            }
            PRIN_REPORT_CAPABILITIES => {
                // CRH: SPC-2 RESERVE/RELEASE follow the SPC-4 5.13.3
                // exceptions; SIP_C, ATP_C; PTPL_C only with a state file.
                let mut b2 = 0x10 | 0x08 | 0x04;
                if self.ptpl_capable() {
                    b2 |= 0x01;
                }
                // TMV with ALLOW COMMANDS 011b: TEST UNIT READY and
                // PERSISTENT RESERVE IN pass WE and EA reservations.
                let mut b3 = 0x80 | 0x30;
                if self.aptpl {
                    b3 |= 0x01;
                }
                // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR.
                data_in.extend_from_slice(&[0, 8, b2, b3, 0xea, 0x01, 0, 0]);
            }
            PRIN_READ_FULL_STATUS => {
                data_in.extend_from_slice(&self.generation.to_be_bytes());
                data_in.extend_from_slice(&[0, 0, 0, 0]);
                for (i, r) in self.regs.iter().enumerate() {
                    let holder = self.is_holder(i);
                    data_in.extend_from_slice(&r.key.to_be_bytes());
                    data_in.extend_from_slice(&[0, 0, 0, 0]);
                    let mut flags = 0u8;
                    if r.tpgt.is_none() {
                        flags |= 0x02;
                    }
                    if holder {
                        flags |= 0x01;
                    }
                    let scope_type = match self.reservation {
                        Some(res) if holder => res.ty as u8,
                        _ => 0,
                    };
                    data_in.extend_from_slice(&[flags, scope_type, 0, 0, 0, 0]);
                    data_in.extend_from_slice(&r.tpgt.unwrap_or(0).to_be_bytes());
                    let len_at = data_in.len();
                    data_in.extend_from_slice(&[0, 0, 0, 0]);
                    transport_id(&r.initiator_name, r.isid, data_in);
                    let tid_len = (data_in.len() - len_at - 4) as u32;
                    data_in[len_at..len_at + 4].copy_from_slice(&tid_len.to_be_bytes());
                }
                let add = (data_in.len() - 8) as u32;
                data_in[4..8].copy_from_slice(&add.to_be_bytes());
            }
            _ => return Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
        }
        data_in.truncate(alloc);
        Ok(())
    }

    /// PERSISTENT RESERVE OUT from `me`; `all` are the I_T nexuses
    /// currently connected (unit attentions go to them). GOOD only once
    /// the new state is kept where APTPL asks for it: a state that cannot be saved is undone and the
    /// command fails, so an initiator is never told of a registration or
    /// reservation that a restart would forget.
    pub(crate) fn persistent_reserve_out(
        &mut self,
        me: &Nexus,
        all: &[&Nexus],
        cdb: &[u8],
        data_out: &[u8],
    ) -> Result<PrOutcome, CmdError> {
        // A rare command: the copy is not on the I/O path.
        let before = self.clone();
        let out = self.apply_out(me, all, cdb, data_out)?;
        if let Err(e) = self.persist() {
            tracing::error!("persistent reservations not saved, command refused: {e}");
            *self = before;
            return Err(Sense::internal_failure().into());
        }
        Ok(out)
    }

    fn apply_out(
        &mut self,
        me: &Nexus,
        all: &[&Nexus],
        cdb: &[u8],
        data_out: &[u8],
    ) -> Result<PrOutcome, CmdError> {
        let sa = cdb[1] & 0x1f;
        let scope = cdb[2] >> 4;
        let ty = cdb[2] & 0x0f;
        let plen = be32(cdb, 5) as usize;
        if sa > PROUT_REGISTER_AND_MOVE {
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
        }
        if data_out.len() < plen {
            return param_len_err();
        }
        let p = &data_out[..plen];
        if sa == PROUT_REGISTER_AND_MOVE {
            return self.register_and_move(me, p);
        }
        if plen < 24 {
            return param_len_err();
        }
        let rk = be64(p, 0);
        let sark = be64(p, 8);
        let spec_i_pt = p[20] & 0x08 != 0;
        let all_tg_pt = p[20] & 0x04 != 0;
        let aptpl = p[20] & 0x01 != 0;
        if spec_i_pt {
            if sa != PROUT_REGISTER {
                return bad_param(20, Some(3));
            }
            if plen < 28 || 28 + be32(p, 24) as usize != plen {
                return param_len_err();
            }
        } else if plen != 24 {
            return param_len_err();
        }
        let registering = sa == PROUT_REGISTER || sa == PROUT_REGISTER_AND_IGNORE;
        if registering && aptpl && !self.ptpl_capable() {
            return bad_param(20, Some(0));
        }
        let out = match sa {
            PROUT_REGISTER | PROUT_REGISTER_AND_IGNORE => {
                let tids = if spec_i_pt { &p[28..] } else { &[][..] };
                let req = RegisterReq {
                    rk,
                    sark,
                    ignore: sa == PROUT_REGISTER_AND_IGNORE,
                    all_tg_pt,
                    aptpl,
                    tids,
                };
                self.register(me, all, req)?
            }
            PROUT_RESERVE => self.reserve(me, rk, scope, ty)?,
            PROUT_RELEASE => self.release(me, all, rk, scope, ty)?,
            PROUT_CLEAR => self.clear(me, all, rk)?,
            PROUT_PREEMPT | PROUT_PREEMPT_AND_ABORT => {
                self.preempt(me, all, rk, sark, scope, ty, sa == PROUT_PREEMPT_AND_ABORT)?
            }
            _ => return self.register_and_move(me, p),
        };
        Ok(out)
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn register(
        &mut self,
        me: &Nexus,
        all: &[&Nexus],
        req: RegisterReq<'_>,
    ) -> Result<PrOutcome, CmdError> {
        let mut out = PrOutcome::default();
        match self.reg_of(me) {
            None => {
                if !req.ignore && req.rk != 0 {
                    return conflict();
                }
                if req.sark == 0 {
                    // Nothing to register; SPC-4 leaves PRgeneration alone.
                    return Ok(out);
                }
                let tpgt = if req.all_tg_pt { None } else { Some(me.tpgt) };
                let mut new = vec![(me.initiator_name.clone(), Some(me.isid))];
                let mut pos = 0;
                while pos < req.tids.len() {
                    let (name, isid, used) = parse_transport_id(&req.tids[pos..], 28 + pos)?;
                    let dup_of_me = name.eq_ignore_ascii_case(&me.initiator_name)
                        && isid.is_none_or(|i| i == me.isid);
                    if !dup_of_me {
                        if self.regs.iter().any(|r| r.overlaps(&name, isid, tpgt)) {
                            return bad_param(28 + pos, None);
                        }
                        new.push((name, isid));
                    }
                    pos += used;
                }
                if self.regs.len() + new.len() > MAX_REGISTRATIONS {
                    return Err(Sense::insufficient_registration_resources().into());
                }
                for (name, isid) in new {
                    let id = self.new_id();
                    self.regs.push(Registration {
                        id,
                        key: req.sark,
                        initiator_name: name,
                        isid,
                        target_name: me.target_name.clone(),
                        tpgt,
                    });
                }
            }
            Some(i) => {
                if !req.ignore && req.rk != self.regs[i].key {
                    return conflict();
                }
                if !req.tids.is_empty() {
                    return bad_param(20, Some(3));
                }
                if req.sark == 0 {
                    self.unregister(i, me, all, &mut out);
                } else {
                    self.regs[i].key = req.sark;
                }
            }
        }
        self.aptpl = req.aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(out)
    }

    fn unregister(&mut self, i: usize, me: &Nexus, all: &[&Nexus], out: &mut PrOutcome) {
        let reg = self.regs.remove(i);
        let Some(res) = self.reservation else {
            return;
        };
        if res.ty.all_registrants() {
            // Held by all registrants: it ends with the last of them.
            if self.regs.is_empty() {
                self.reservation = None;
            }
        } else if res.holder == reg.id {
            self.reservation = None;
            if res.ty.registrants_only() {
                self.ua_to_registered(me, all, UnitAttention::ReservationsReleased, out);
            }
        }
    }

    fn ua_to_registered(&self, me: &Nexus, all: &[&Nexus], ua: UnitAttention, out: &mut PrOutcome) {
        for n in all {
            if n.id != me.id && self.is_registered(n) {
                out.uas.push((n.id, ua));
            }
        }
    }

    fn registered_with_key(&self, me: &Nexus, rk: u64) -> Result<usize, CmdError> {
        match self.reg_of(me) {
            Some(i) if self.regs[i].key == rk => Ok(i),
            _ => conflict(),
        }
    }

    fn check_scope_type(scope: u8, ty: u8) -> Result<PrType, CmdError> {
        if scope != 0 {
            return Err(Sense::invalid_field_in_cdb(2, Some(7)).into());
        }
        PrType::from_u8(ty).ok_or_else(|| Sense::invalid_field_in_cdb(2, Some(3)).into())
    }

    fn reserve(&mut self, me: &Nexus, rk: u64, scope: u8, ty: u8) -> Result<PrOutcome, CmdError> {
        let ty = Self::check_scope_type(scope, ty)?;
        let i = self.registered_with_key(me, rk)?;
        match self.reservation {
            Some(res) if self.is_holder(i) && res.ty == ty => {}
            Some(_) => return conflict(),
            None => {
                self.reservation = Some(Reservation {
                    ty,
                    holder: self.regs[i].id,
                })
            }
        }
        Ok(PrOutcome::default())
    }

    fn release(
        &mut self,
        me: &Nexus,
        all: &[&Nexus],
        rk: u64,
        scope: u8,
        ty: u8,
    ) -> Result<PrOutcome, CmdError> {
        let i = self.registered_with_key(me, rk)?;
        let mut out = PrOutcome::default();
        let Some(res) = self.reservation else {
            return Ok(out);
        };
        if !self.is_holder(i) {
            return Ok(out);
        }
        if scope != 0 || ty != res.ty as u8 {
            return Err(Sense::invalid_release_of_pr().into());
        }
        self.reservation = None;
        if res.ty.registrants_only() || res.ty.all_registrants() {
            self.ua_to_registered(me, all, UnitAttention::ReservationsReleased, &mut out);
        }
        Ok(out)
    }

    fn clear(&mut self, me: &Nexus, all: &[&Nexus], rk: u64) -> Result<PrOutcome, CmdError> {
        self.registered_with_key(me, rk)?;
        let mut out = PrOutcome::default();
        self.ua_to_registered(me, all, UnitAttention::ReservationsPreempted, &mut out);
        self.regs.clear();
        self.reservation = None;
        self.generation = self.generation.wrapping_add(1);
        Ok(out)
    }

    /// Remove the registrations selected by `pick`, never the issuer's,
    /// and tell the I_T nexuses that lost theirs.
    fn preempt_regs(
        &mut self,
        me: &Nexus,
        all: &[&Nexus],
        abort: bool,
        out: &mut PrOutcome,
        pick: impl Fn(&Registration) -> bool,
    ) -> usize {
        let before: Vec<NexusId> = all
            .iter()
            .filter(|n| n.id != me.id && self.is_registered(n))
            .map(|n| n.id)
            .collect();
        let n0 = self.regs.len();
        self.regs.retain(|r| r.matches(me) || !pick(r));
        let removed = n0 - self.regs.len();
        for n in all {
            if before.contains(&n.id) && !self.is_registered(n) {
                out.uas.push((n.id, UnitAttention::RegistrationsPreempted));
                if abort {
                    out.aborted.push(n.id);
                }
            }
        }
        removed
    }

    #[allow(clippy::too_many_arguments)]
    fn preempt(
        &mut self,
        me: &Nexus,
        all: &[&Nexus],
        rk: u64,
        sark: u64,
        scope: u8,
        ty: u8,
        abort: bool,
    ) -> Result<PrOutcome, CmdError> {
        let ty = Self::check_scope_type(scope, ty)?;
        let i = self.registered_with_key(me, rk)?;
        let my_id = self.regs[i].id;
        let mut out = PrOutcome::default();
        match self.reservation {
            Some(res) if res.ty.all_registrants() && sark == 0 => {
                // Preempting an all-registrants reservation with key zero
                // removes everyone else and takes it over.
                self.preempt_regs(me, all, abort, &mut out, |_| true);
                self.reservation = Some(Reservation { ty, holder: my_id });
            }
            Some(res)
                if !res.ty.all_registrants()
                    && self
                        .regs
                        .iter()
                        .any(|r| r.id == res.holder && r.key == sark) =>
            {
                self.preempt_regs(me, all, abort, &mut out, |r| r.key == sark);
                self.reservation = Some(Reservation { ty, holder: my_id });
                if res.ty != ty {
                    let skip: Vec<NexusId> = out.uas.iter().map(|(id, _)| *id).collect();
                    for n in all {
                        if n.id != me.id && !skip.contains(&n.id) && self.is_registered(n) {
                            out.uas.push((n.id, UnitAttention::ReservationsReleased));
                        }
                    }
                }
            }
            _ => {
                // No reservation, or SARK names someone other than the
                // holder: only registrations go.
                if sark == 0 {
                    return bad_param(8, None);
                }
                if !self.regs.iter().any(|r| r.key == sark && !r.matches(me))
                    && !self.regs[i].key.eq(&sark)
                {
                    return conflict();
                }
                self.preempt_regs(me, all, abort, &mut out, |r| r.key == sark);
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(out)
    }

    fn register_and_move(&mut self, me: &Nexus, p: &[u8]) -> Result<PrOutcome, CmdError> {
        if p.len() < 24 || 24 + be32(p, 20) as usize != p.len() {
            return param_len_err();
        }
        let rk = be64(p, 0);
        let sark = be64(p, 8);
        let unreg = p[17] & 0x02 != 0;
        let aptpl = p[17] & 0x01 != 0;
        let rtpi = be16(p, 18);
        let i = self.registered_with_key(me, rk)?;
        let Some(res) = self.reservation else {
            return conflict();
        };
        if res.ty.all_registrants() || !self.is_holder(i) {
            return conflict();
        }
        if sark == 0 {
            return bad_param(8, None);
        }
        if aptpl && !self.ptpl_capable() {
            return bad_param(17, Some(0));
        }
        if rtpi == 0 {
            return bad_param(18, None);
        }
        let (name, isid, used) = parse_transport_id(&p[24..], 24)?;
        if used != p.len() - 24 {
            return param_len_err();
        }
        // Moving to ourselves is meaningless (SPC-4 5.13.8).
        if name.eq_ignore_ascii_case(&me.initiator_name)
            && isid.is_none_or(|x| x == me.isid)
            && rtpi == me.tpgt
        {
            return bad_param(24, None);
        }
        let existing = self.regs.iter().position(|r| {
            r.initiator_name.eq_ignore_ascii_case(&name) && r.isid == isid && r.tpgt == Some(rtpi)
        });
        let dest_id = match existing {
            Some(j) => {
                self.regs[j].key = sark;
                self.regs[j].id
            }
            None => {
                if self.regs.len() >= MAX_REGISTRATIONS {
                    return Err(Sense::insufficient_registration_resources().into());
                }
                let id = self.new_id();
                self.regs.push(Registration {
                    id,
                    key: sark,
                    initiator_name: name,
                    isid,
                    target_name: me.target_name.clone(),
                    tpgt: Some(rtpi),
                });
                id
            }
        };
        self.reservation = Some(Reservation {
            ty: res.ty,
            holder: dest_id,
        });
        if unreg {
            let my_id = self.regs[i].id;
            self.regs.retain(|r| r.id != my_id);
        }
        self.aptpl = aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(PrOutcome::default())
    }

    /// Save (APTPL on) or forget (APTPL off) the persistent state. The
    /// file is replaced atomically (`crate::persist`), so a crash leaves
    /// old or new, never a mix.
    fn persist(&self) -> std::io::Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        if !self.aptpl {
            return crate::persist::remove_durably(path);
        }
        self.save(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("saving {}: {e}", path.display())))
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut text = String::from("target-rdma-pr 1\n");
        let _ = writeln!(text, "generation {}", self.generation);
        for r in &self.regs {
            let _ = writeln!(
                text,
                "reg {} {:016x} {} {} {} {}",
                r.id,
                r.key,
                escape(&r.initiator_name),
                r.isid.map_or("*".to_string(), |i| format!("{i:012x}")),
                escape(&r.target_name),
                r.tpgt.map_or("*".to_string(), |t| t.to_string()),
            );
        }
        if let Some(res) = self.reservation {
            let _ = writeln!(text, "reservation {} {}", res.ty as u8, res.holder);
        }
        crate::persist::write_atomic(path, text.as_bytes())
    }

    fn load(&mut self, text: &str) -> Result<(), String> {
        let mut lines = text.lines();
        if lines.next() != Some("target-rdma-pr 1") {
            return Err("not a target-rdma persistent reservation file".into());
        }
        for (n, line) in lines.enumerate() {
            let bad = || format!("line {}: cannot parse {line:?}", n + 2);
            let f: Vec<&str> = line.split_ascii_whitespace().collect();
            match f.as_slice() {
                [] => {}
                ["generation", g] => self.generation = g.parse().map_err(|_| bad())?,
                ["reg", id, key, name, isid, target, tpgt] => {
                    if self.regs.len() >= MAX_REGISTRATIONS {
                        return Err(bad());
                    }
                    let r = Registration {
                        id: id.parse().map_err(|_| bad())?,
                        key: u64::from_str_radix(key, 16).map_err(|_| bad())?,
                        initiator_name: unescape(name).ok_or_else(bad)?,
                        isid: match *isid {
                            "*" => None,
                            s => Some(u64::from_str_radix(s, 16).map_err(|_| bad())?),
                        },
                        target_name: unescape(target).ok_or_else(bad)?,
                        tpgt: match *tpgt {
                            "*" => None,
                            s => Some(s.parse().map_err(|_| bad())?),
                        },
                    };
                    self.next_id = self.next_id.max(r.id + 1);
                    self.regs.push(r);
                }
                ["reservation", ty, holder] => {
                    let ty = ty.parse().ok().and_then(PrType::from_u8).ok_or_else(bad)?;
                    let holder: u64 = holder.parse().map_err(|_| bad())?;
                    if !ty.all_registrants() && !self.regs.iter().any(|r| r.id == holder) {
                        return Err(bad());
                    }
                    self.reservation = Some(Reservation { ty, holder });
                }
                _ => return Err(bad()),
            }
        }
        self.aptpl = true;
        Ok(())
    }
}

struct RegisterReq<'a> {
    rk: u64,
    sark: u64,
    ignore: bool,
    all_tg_pt: bool,
    aptpl: bool,
    tids: &'a [u8],
}

/// Names go into a whitespace-separated file: escape what would break it.
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(o, "%{b:02x}");
            }
        } else {
            o.push(c);
        }
    }
    if o.is_empty() {
        o.push('%');
    }
    o
}

fn unescape(s: &str) -> Option<String> {
    if s == "%" {
        return Some(String::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
