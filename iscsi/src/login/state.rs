//! Login state machine internals (RFC 7143 6, 11.12, 11.13).
//!
//! One `State` per connection. Each Login Request is checked against the
//! fields of the first (ISID, TSIH, CID, ITT, CmdSN, versions), its text
//! is collected across C-bit continuations, then its keys are split by
//! stage: security keys go to `auth`, operational keys to `negotiate`.
//! Answers too long for one PDU go out in C-bit pieces; the stage
//! transition decided for them is taken with the last piece.

use super::auth::Auth;
use super::negotiate::{classify, KeyClass, Negotiator};
use super::{ChapConfig, LoginContext, LoginOutcome, LoginStatus, LoginStep, SessionRequest};
use crate::name::NAME_LEN_MAX;
use crate::params::{SessionType, TargetLimits, Transport};
use crate::pdu::{flags, opcode, Pdu};
use crate::text;

/// Login PDUs accepted per login before we give up on the initiator.
pub(super) const LOGIN_PDUS_MAX: u32 = 64;
/// Keys accepted in one (reassembled) Login Request.
pub(super) const LOGIN_KEYS_MAX: usize = 512;
/// RFC 7143 6.3: during login both sides use the default
/// MaxRecvDataSegmentLength, whatever is being declared.
pub(super) const LOGIN_SEGMENT_MAX: usize = 8192;
/// The only protocol version there is (RFC 7143 11.12.4).
const VERSION: u8 = 0;

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

#[derive(Debug, Default, PartialEq, Eq)]
enum Phase {
    /// No Login Request seen yet.
    #[default]
    Initial,
    /// Negotiating.
    Active,
    /// Completed or failed; no more Login Requests are accepted.
    Done,
}

/// Our answer text that did not fit into one Login Response.
#[derive(Debug)]
struct Outgoing {
    data: Vec<u8>,
    pos: usize,
    /// The stage transition decided for this answer, taken with its last
    /// piece.
    transit: Option<u8>,
}

/// Fields of the first Login Request that every later one must repeat.
#[derive(Debug, Default, Clone, Copy)]
struct Ids {
    isid: u64,
    tsih: u16,
    cid: u16,
    itt: u32,
    cmdsn: u32,
    version_max: u8,
    version_min: u8,
}

#[derive(Default)]
pub(super) struct State {
    phase: Phase,
    pdus: u32,
    ids: Ids,
    /// StatSN of the next response.
    statsn: u32,
    /// Current stage (CSG every request must carry).
    stage: u8,
    /// The first complete request (names, ACL) has been processed.
    named: bool,
    initiator_name: String,
    initiator_alias: Option<String>,
    target_name: Option<String>,
    session_type: SessionType,
    /// Request text collected across C-bit continuations.
    incoming: Vec<u8>,
    outgoing: Option<Outgoing>,
    /// Whether an operational-stage response has been produced (our
    /// MaxRecvDataSegmentLength goes into the first).
    op_answered: bool,
    auth: Auth,
    neg: Option<Negotiator>,
    /// TargetAlias held back until the initiator has authenticated: in the
    /// first response it would tell who asks without a secret that the
    /// target exists.
    alias_pending: Option<String>,
    /// The status of the failure response, once sent.
    failed: Option<LoginStatus>,
}

impl State {
    pub(super) fn initiator_name(&self) -> Option<&str> {
        Some(self.initiator_name.as_str()).filter(|n| self.named && !n.is_empty())
    }

    pub(super) fn failure(&self) -> Option<LoginStatus> {
        self.failed
    }
}

pub(super) fn handle(
    limits: &TargetLimits,
    transport: Transport,
    st: &mut State,
    ctx: &mut dyn LoginContext,
    req: &Pdu,
) -> LoginStep {
    match step(limits, transport, st, ctx, req) {
        Ok(s) => s,
        Err(status) => fail(st, req, status),
    }
}

fn step(
    limits: &TargetLimits,
    transport: Transport,
    st: &mut State,
    ctx: &mut dyn LoginContext,
    req: &Pdu,
) -> Result<LoginStep, LoginStatus> {
    let b = &req.bhs;
    match st.phase {
        Phase::Done => return Err(LoginStatus::INITIATOR_ERROR),
        Phase::Initial => {
            let mut sn = [0u8; 4];
            ctx.fill_random(&mut sn);
            st.statsn = u32::from_be_bytes(sn);
            st.phase = Phase::Active;
            st.ids = Ids {
                isid: b.isid(),
                tsih: b.tsih(),
                cid: b.cid(),
                itt: b.itt(),
                cmdsn: b.cmdsn(),
                version_max: b.version_max(),
                version_min: b.version_min(),
            };
            st.stage = b.login_csg();
            st.neg = Some(Negotiator::new(limits.clone(), transport));
            if b.opcode() != opcode::LOGIN_REQ {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            if b.version_min() > VERSION || b.version_max() < b.version_min() {
                return Err(LoginStatus::UNSUPPORTED_VERSION);
            }
            if st.stage != STAGE_SECURITY && st.stage != STAGE_OPERATIONAL {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
        }
        Phase::Active => {
            if b.opcode() != opcode::LOGIN_REQ {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            let i = &st.ids;
            // RFC 7143 11.12: one login is one task; its identifiers and
            // CmdSN do not change between its requests.
            if b.isid() != i.isid
                || b.tsih() != i.tsih
                || b.cid() != i.cid
                || b.itt() != i.itt
                || b.cmdsn() != i.cmdsn
                || b.version_max() != i.version_max
                || b.version_min() != i.version_min
            {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
        }
    }
    st.pdus += 1;
    if st.pdus > LOGIN_PDUS_MAX {
        return Err(LoginStatus::INITIATOR_ERROR);
    }

    let f = b.flags();
    let transit = f & flags::TRANSIT != 0;
    let cont = f & flags::CONTINUE != 0;
    let csg = b.login_csg();
    let nsg = b.login_nsg();
    if transit && cont {
        return Err(LoginStatus::INITIATOR_ERROR);
    }
    // A CSG other than the current stage is a jump (backwards, or forwards
    // without a transition we granted).
    if csg != st.stage {
        return Err(LoginStatus::INITIATOR_ERROR);
    }
    let nsg_ok = match csg {
        STAGE_SECURITY => nsg == STAGE_OPERATIONAL || nsg == STAGE_FULL_FEATURE,
        _ => nsg == STAGE_FULL_FEATURE,
    };
    if transit && !nsg_ok {
        return Err(LoginStatus::INITIATOR_ERROR);
    }
    let want = transit.then_some(nsg);

    if let Some(out) = st.outgoing.take() {
        // The initiator is fetching the rest of our answer with empty
        // requests.
        if !req.data.is_empty() || cont {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        return send(st, ctx, limits, req, out, want);
    }

    if st.incoming.len() + req.data.len() > text::TEXT_LEN_MAX {
        return Err(LoginStatus::INITIATOR_ERROR);
    }
    st.incoming.extend_from_slice(&req.data);
    if cont {
        // RFC 7143 6.1: each piece of a continued request is answered
        // with an empty response.
        let (stage, tsih) = (st.stage, st.ids.tsih);
        let r = response(st, req, stage, 0, Vec::new(), tsih, 1);
        return Ok(LoginStep::Continue(vec![r]));
    }
    let data = std::mem::take(&mut st.incoming);
    let answer = process(st, ctx, &data, want)?;
    send(st, ctx, limits, req, answer, want)
}

/// Read one complete request text and produce our answer and the
/// transition we grant.
fn process(
    st: &mut State,
    ctx: &mut dyn LoginContext,
    data: &[u8],
    want: Option<u8>,
) -> Result<Outgoing, LoginStatus> {
    let pairs = text::parse(data).map_err(|_| LoginStatus::INITIATOR_ERROR)?;
    if pairs.len() > LOGIN_KEYS_MAX {
        return Err(LoginStatus::INITIATOR_ERROR);
    }
    for (i, (k, _)) in pairs.iter().enumerate() {
        // A key twice in one request is a renegotiation (RFC 7143 6.2).
        if k.is_empty() || pairs[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
    }
    let mut out = Vec::new();
    let first = !st.named;
    if first {
        name_session(st, ctx, &pairs, &mut out)?;
        st.named = true;
    }
    let neg = st.neg.as_mut().ok_or(LoginStatus::TARGET_ERROR)?;
    let mut security: Vec<(&str, &str)> = Vec::new();
    for (k, v) in &pairs {
        let (k, v) = (k.as_str(), v.as_str());
        match classify(k) {
            KeyClass::AnyStage => match k {
                "InitiatorName" if !first && v != st.initiator_name => {
                    return Err(LoginStatus::INITIATOR_ERROR)
                }
                "TargetName" if !first && Some(v) != st.target_name.as_deref() => {
                    return Err(LoginStatus::INITIATOR_ERROR)
                }
                "SessionType" if !first && parse_session_type(v) != Some(st.session_type) => {
                    return Err(LoginStatus::INITIATOR_ERROR)
                }
                "InitiatorAlias" => st.initiator_alias = Some(v.to_string()),
                // Target-sent declaratives coming from the initiator carry
                // nothing for us; they need no answer.
                _ => {}
            },
            KeyClass::Security => {
                // RFC 7143 6.3: a key outside its stage is a protocol error.
                if st.stage != STAGE_SECURITY {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                security.push((k, v));
            }
            KeyClass::Operational => {
                if st.stage != STAGE_OPERATIONAL {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                neg.offer(k, v, &mut out)?;
            }
            KeyClass::FullFeature => text::push(&mut out, k, "Irrelevant"),
            KeyClass::Unknown => text::push(&mut out, k, "NotUnderstood"),
        }
    }

    let transit = if st.stage == STAGE_SECURITY {
        st.auth.step(ctx, &security, &mut out)?;
        if st.auth.done() {
            if let Some(alias) = st.alias_pending.take() {
                text::push(&mut out, "TargetAlias", &alias);
            }
        }
        match want {
            Some(nsg) if st.auth.can_leave()? => {
                // Skipping the operational stage would leave a default we
                // cannot honour; steer the initiator through it.
                if nsg == STAGE_FULL_FEATURE && neg.needs_proposals() {
                    Some(STAGE_OPERATIONAL)
                } else {
                    Some(nsg)
                }
            }
            _ => None,
        }
    } else {
        neg.end_request(&mut out);
        if !st.op_answered {
            st.op_answered = true;
            neg.declare(&mut out);
        }
        // RFC 7143 6.3: no T bit while the initiator owes us answers to
        // our own proposals.
        match want {
            Some(nsg) if !neg.propose(&mut out) && !neg.awaiting() => Some(nsg),
            _ => None,
        }
    };
    Ok(Outgoing {
        data: out,
        pos: 0,
        transit,
    })
}

fn parse_session_type(v: &str) -> Option<SessionType> {
    match v {
        "Normal" => Some(SessionType::Normal),
        "Discovery" => Some(SessionType::Discovery),
        _ => None,
    }
}

/// The checks of the first complete request: who is logging in to what.
fn name_session(
    st: &mut State,
    ctx: &mut dyn LoginContext,
    pairs: &[(String, String)],
    out: &mut Vec<u8>,
) -> Result<(), LoginStatus> {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    };
    let initiator = get("InitiatorName").unwrap_or("");
    if initiator.is_empty() {
        return Err(LoginStatus::MISSING_PARAMETER);
    }
    if initiator.len() > NAME_LEN_MAX {
        return Err(LoginStatus::INITIATOR_ERROR);
    }
    let session_type = match get("SessionType") {
        None => SessionType::Normal,
        Some(v) => parse_session_type(v).ok_or(LoginStatus::SESSION_TYPE_NOT_SUPPORTED)?,
    };
    let target = get("TargetName");
    if target.is_some_and(|t| t.len() > NAME_LEN_MAX) {
        return Err(LoginStatus::INITIATOR_ERROR);
    }
    // Authentication before authorization (`LoginContext::
    // authenticate_first`): a refusal the name alone decides is, where a
    // secret is due, kept until the CHAP exchange ends, and then given as
    // the 02/01 a wrong secret gets.
    let mut unknown_target = false;
    let mut refused = false;
    if session_type == SessionType::Normal {
        let t = target
            .filter(|t| !t.is_empty())
            .ok_or(LoginStatus::MISSING_PARAMETER)?;
        let hide = ctx.authenticate_first();
        if !ctx.target_exists(t) {
            if !hide {
                return Err(LoginStatus::NOT_FOUND);
            }
            unknown_target = true;
            refused = true;
        } else if !ctx.initiator_allowed(t, initiator) {
            if !(hide && ctx.chap(Some(t)).initiator.is_some()) {
                return Err(LoginStatus::AUTHORIZATION_FAILURE);
            }
            refused = true;
        }
    }
    st.initiator_name = initiator.to_string();
    st.target_name = target.map(str::to_string);
    st.session_type = session_type;
    let discovery = session_type == SessionType::Discovery;
    if let Some(neg) = st.neg.as_mut() {
        neg.set_discovery(discovery);
    }
    let chap = if unknown_target {
        // No target, no secret: an exchange that looks like the real one
        // and that `refuse` makes fail at its end.
        ChapConfig {
            initiator: Some((String::new(), String::new())),
            target: None,
        }
    } else {
        ctx.chap(if discovery { None } else { target })
    };
    st.auth.set_config(chap);
    if refused {
        st.auth.refuse();
    }
    // Starting in the operational stage skips authentication, which is
    // only allowed when none is required.
    if st.stage == STAGE_OPERATIONAL && st.auth.required() {
        return Err(LoginStatus::AUTH_FAILURE);
    }
    // RFC 7143 13.9: the TPGT goes into the first response whenever the
    // initiator named a target.
    if let Some(t) = target {
        text::push(
            out,
            "TargetPortalGroupTag",
            &ctx.portal_group_tag().to_string(),
        );
        if !discovery && !unknown_target {
            if let Some(alias) = ctx.target_alias(t).filter(|a| !a.contains('\0')) {
                if st.auth.required() {
                    st.alias_pending = Some(alias);
                } else {
                    text::push(out, "TargetAlias", &alias);
                }
            }
        }
    }
    Ok(())
}

/// Send the next piece of `out`; the last piece carries the transition,
/// granted only if the request now being answered still asks for it.
fn send(
    st: &mut State,
    ctx: &mut dyn LoginContext,
    limits: &TargetLimits,
    req: &Pdu,
    mut out: Outgoing,
    want: Option<u8>,
) -> Result<LoginStep, LoginStatus> {
    let (stage, tsih) = (st.stage, st.ids.tsih);
    let rest = out.data.len().saturating_sub(out.pos);
    if rest > LOGIN_SEGMENT_MAX {
        let chunk = out.data[out.pos..out.pos + LOGIN_SEGMENT_MAX].to_vec();
        out.pos += LOGIN_SEGMENT_MAX;
        let r = response(st, req, stage, flags::CONTINUE, chunk, tsih, 1);
        st.outgoing = Some(out);
        return Ok(LoginStep::Continue(vec![r]));
    }
    let chunk = out
        .data
        .get(out.pos..)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    // The target may pick a stage no later than the one asked for.
    let transit = match (out.transit, want) {
        (Some(granted), Some(asked)) => Some(granted.min(asked)),
        _ => None,
    };
    match transit {
        None => {
            let r = response(st, req, stage, 0, chunk, tsih, 1);
            Ok(LoginStep::Continue(vec![r]))
        }
        Some(STAGE_FULL_FEATURE) => finish(st, ctx, limits, req, chunk),
        Some(nsg) => {
            let r = response(st, req, stage, flags::TRANSIT | nsg, chunk, tsih, 1);
            st.stage = nsg;
            Ok(LoginStep::Continue(vec![r]))
        }
    }
}

/// The final response: instate the session and hand over the results.
fn finish(
    st: &mut State,
    ctx: &mut dyn LoginContext,
    limits: &TargetLimits,
    req: &Pdu,
    chunk: Vec<u8>,
) -> Result<LoginStep, LoginStatus> {
    let discovery = st.session_type == SessionType::Discovery;
    let sreq = SessionRequest {
        initiator_name: st.initiator_name.clone(),
        // Discovery sessions have no target (see SessionParams).
        target_name: if discovery {
            String::new()
        } else {
            st.target_name.clone().unwrap_or_default()
        },
        session_type: st.session_type,
        isid: st.ids.isid,
        tsih: st.ids.tsih,
        cid: st.ids.cid,
    };
    let tsih = ctx.instate_session(&sreq)?;
    let neg = st.neg.as_ref().ok_or(LoginStatus::TARGET_ERROR)?;
    let (mut session, conn) = neg.results();
    session.session_type = st.session_type;
    session.initiator_name = st.initiator_name.clone();
    session.initiator_alias = st.initiator_alias.clone();
    session.target_name = sreq.target_name;
    // The final response opens the command window the connection layer
    // keeps from then on (MaxCmdSN - ExpCmdSN + 1 = queue depth).
    let window = limits.queue_depth.max(1);
    let stage = st.stage;
    let r = response(
        st,
        req,
        stage,
        flags::TRANSIT | STAGE_FULL_FEATURE,
        chunk,
        tsih,
        window,
    );
    let outcome = LoginOutcome {
        session,
        conn,
        isid: st.ids.isid,
        tsih,
        cid: st.ids.cid,
        exp_cmdsn: st.ids.cmdsn,
        next_statsn: st.statsn,
    };
    st.phase = Phase::Done;
    st.stage = STAGE_FULL_FEATURE;
    Ok(LoginStep::Complete {
        responses: vec![r],
        outcome: Box::new(outcome),
    })
}

/// A Login Response (RFC 7143 11.13) with the next StatSN.
/// `stage_flags` carries T, C and NSG; CSG is `csg`. `window` is the
/// number of commands MaxCmdSN admits from ExpCmdSN on (1 during login).
fn response(
    st: &mut State,
    req: &Pdu,
    csg: u8,
    stage_flags: u8,
    data: Vec<u8>,
    tsih: u16,
    window: u32,
) -> Pdu {
    let mut p = Pdu::new(opcode::LOGIN_RESP);
    // NSG is meaningful only with the T bit.
    let nsg = if stage_flags & flags::TRANSIT != 0 {
        stage_flags & 3
    } else {
        0
    };
    p.bhs
        .set_flags((stage_flags & (flags::TRANSIT | flags::CONTINUE)) | ((csg & 3) << 2) | nsg);
    p.bhs.0[2] = VERSION;
    p.bhs.0[3] = VERSION;
    p.bhs.set_isid(st.ids.isid);
    p.bhs.set_tsih(tsih);
    p.bhs.set_itt(req.bhs.itt());
    p.bhs.set_statsn(st.statsn);
    st.statsn = st.statsn.wrapping_add(1);
    let cmdsn = req.bhs.cmdsn();
    p.bhs.set_expcmdsn(cmdsn);
    p.bhs.set_maxcmdsn(cmdsn.wrapping_add(window.max(1) - 1));
    p.bhs.set_data_segment_len(data.len() as u32);
    p.data = data;
    p
}

/// A failed login: the status, no data, TSIH as the initiator gave it,
/// T/C/CSG/NSG zero (reserved on reject, RFC 7143 11.13).
fn fail(st: &mut State, req: &Pdu, status: LoginStatus) -> LoginStep {
    tracing::debug!(class = status.class, detail = status.detail, "login failed");
    st.phase = Phase::Done;
    st.failed = Some(status);
    st.outgoing = None;
    st.incoming = Vec::new();
    let mut p = Pdu::new(opcode::LOGIN_RESP);
    p.bhs.0[2] = VERSION;
    p.bhs.0[3] = VERSION;
    p.bhs.set_isid(req.bhs.isid());
    p.bhs.set_tsih(req.bhs.tsih());
    p.bhs.set_itt(req.bhs.itt());
    p.bhs.set_statsn(st.statsn);
    st.statsn = st.statsn.wrapping_add(1);
    p.bhs.set_expcmdsn(req.bhs.cmdsn());
    p.bhs.set_maxcmdsn(req.bhs.cmdsn());
    p.bhs.set_login_status(status.class, status.detail);
    LoginStep::Failed(p)
}
