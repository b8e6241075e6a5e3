//! Operational key negotiation (RFC 7143 6.2 and 13, RFC 7145 6).
//!
//! The initiator offers, we answer with the result of the key's result
//! function applied to its value and ours (ours comes from `TargetLimits`).
//! Keys whose RFC default would break one of our limits and which the
//! initiator never offered are proposed by us before we agree to leave the
//! operational stage; the initiator's reply to such a proposal is taken as
//! the result, not as a new offer.

use super::LoginStatus;
use crate::params::{ConnParams, SessionParams, TargetLimits, Transport};
use crate::pdu::AHS_LEN_MAX;
use crate::text;

/// Bounds of MaxRecvDataSegmentLength, MaxBurstLength, FirstBurstLength
/// and the iSER data segment keys.
pub(crate) const SEG_MIN: u64 = 512;
pub(crate) const SEG_MAX: u64 = (1 << 24) - 1;
/// The data segment size both sides use until one declares another.
pub(crate) const SEG_DEFAULT: u32 = 8192;

/// Where a key may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyClass {
    /// Security stage only (RFC 7143 12).
    Security,
    /// Declaratives allowed in any login stage.
    AnyStage,
    /// Operational stage only.
    Operational,
    /// Full feature phase only (SendTargets).
    FullFeature,
    Unknown,
}

const SECURITY_KEYS: &[&str] = &[
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
];

const ANY_STAGE_KEYS: &[&str] = &[
    "InitiatorName",
    "TargetName",
    "SessionType",
    "InitiatorAlias",
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
];

/// Every operational key we know. Indexes into this table stand for the
/// key in `Negotiator`, so its bookkeeping is bounded by the table size.
const OPERATIONAL_KEYS: &[&str] = &[
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "OFMarker",
    "IFMarker",
    "OFMarkInt",
    "IFMarkInt",
    "TaskReporting",
    "iSCSIProtocolLevel",
    "RDMAExtensions",
    "TargetRecvDataSegmentLength",
    "InitiatorRecvDataSegmentLength",
    "MaxAHSLength",
    "TaggedBufferForSolicitedDataOnly",
    "iSERHelloRequired",
    "MaxOutstandingUnexpectedPDUs",
];

pub(crate) fn classify(key: &str) -> KeyClass {
    if SECURITY_KEYS.contains(&key) {
        KeyClass::Security
    } else if ANY_STAGE_KEYS.contains(&key) {
        KeyClass::AnyStage
    } else if OPERATIONAL_KEYS.contains(&key) {
        KeyClass::Operational
    } else if key == "SendTargets" {
        KeyClass::FullFeature
    } else {
        KeyClass::Unknown
    }
}

/// Whether RFC 7143 / RFC 7145 define `key` (anything else is answered
/// NotUnderstood, including X- and X# extension keys).
pub(crate) fn is_known_key(key: &str) -> bool {
    classify(key) != KeyClass::Unknown
}

/// RFC 7143 6.1 numerical values: decimal or `0x` hex, below 2^64.
pub(crate) fn parse_number(v: &str) -> Option<u64> {
    let b = v.as_bytes();
    if b.len() > 2 && b[0] == b'0' && (b[1] == b'x' || b[1] == b'X') {
        let digits = &v[2..];
        if digits.len() > 16 || !digits.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(digits, 16).ok();
    }
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.parse().ok()
}

pub(crate) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// The answers an acceptor gives instead of a value; never offers.
fn is_answer_constant(v: &str) -> bool {
    matches!(v, "NotUnderstood" | "Irrelevant" | "Reject")
}

fn key_index(key: &str) -> Option<usize> {
    OPERATIONAL_KEYS.iter().position(|k| *k == key)
}

/// Keys that are "Irrelevant when: SessionType=Discovery".
fn irrelevant_in_discovery(key: &str) -> bool {
    matches!(
        key,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
            | "TaskReporting"
    )
}

fn is_iser_key(key: &str) -> bool {
    matches!(
        key,
        "TargetRecvDataSegmentLength"
            | "InitiatorRecvDataSegmentLength"
            | "MaxAHSLength"
            | "TaggedBufferForSolicitedDataOnly"
            | "iSERHelloRequired"
            | "MaxOutstandingUnexpectedPDUs"
    )
}

/// Operational negotiation state of one login.
#[derive(Debug, Clone)]
pub(crate) struct Negotiator {
    limits: TargetLimits,
    transport: Transport,
    discovery: bool,
    session: SessionParams,
    conn: ConnParams,
    /// Keys the initiator has offered this login (index into
    /// OPERATIONAL_KEYS).
    seen: [bool; OPERATIONAL_KEYS.len()],
    /// Keys we proposed and whose answer is still due.
    proposed: [bool; OPERATIONAL_KEYS.len()],
    /// The initiator's FirstBurstLength in this request; answered once the
    /// whole request is read, because the answer depends on MaxBurstLength,
    /// InitialR2T and ImmediateData, which may follow it.
    first_burst_offer: Option<u64>,
    declared_mrdsl: bool,
    /// TargetRecvDataSegmentLength negotiated (iSER).
    iser_recv: Option<u32>,
    /// InitiatorRecvDataSegmentLength negotiated (iSER).
    iser_xmit: Option<u32>,
}

impl Negotiator {
    pub(crate) fn new(limits: TargetLimits, transport: Transport) -> Self {
        Negotiator {
            limits,
            transport,
            discovery: false,
            session: SessionParams::default(),
            conn: ConnParams {
                transport,
                ..ConnParams::default()
            },
            seen: [false; OPERATIONAL_KEYS.len()],
            proposed: [false; OPERATIONAL_KEYS.len()],
            first_burst_offer: None,
            declared_mrdsl: false,
            iser_recv: None,
            iser_xmit: None,
        }
    }

    pub(crate) fn set_discovery(&mut self, discovery: bool) {
        self.discovery = discovery;
    }

    fn iser(&self) -> bool {
        self.transport == Transport::Iser
    }

    // ---- our values, clamped into each key's legal range ----
    fn our_max_burst(&self) -> u64 {
        (self.limits.max_burst_length as u64).clamp(SEG_MIN, SEG_MAX)
    }
    fn our_first_burst(&self) -> u64 {
        (self.limits.first_burst_length as u64)
            .clamp(SEG_MIN, SEG_MAX)
            .min(self.session.max_burst_length as u64)
    }
    fn our_mrdsl(&self) -> u64 {
        (self.limits.max_recv_data_segment_length as u64).clamp(SEG_MIN, SEG_MAX)
    }

    /// Handle one operational key from the initiator, appending our answer
    /// (if any) to `out`. Err only for what fails the whole login.
    pub(crate) fn offer(
        &mut self,
        key: &str,
        value: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), LoginStatus> {
        let Some(idx) = key_index(key) else {
            text::push(out, key, "NotUnderstood");
            return Ok(());
        };
        if self.proposed[idx] {
            self.proposed[idx] = false;
            self.seen[idx] = true;
            return self.answer_to_proposal(key, value);
        }
        if self.seen[idx] {
            // RFC 7143 6.2: renegotiation is an initiator error, except that
            // a declaration of MaxRecvDataSegmentLength may be repeated
            // (it is declarative; UNH and others resend it).
            if key != "MaxRecvDataSegmentLength" {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
        }
        self.seen[idx] = true;
        if is_answer_constant(value) {
            // Only valid as a reply to a proposal; as an offer it means
            // nothing, and answering it could start a ping-pong.
            return Ok(());
        }
        if self.discovery && irrelevant_in_discovery(key) {
            text::push(out, key, "Irrelevant");
            return Ok(());
        }
        if !self.iser() && is_iser_key(key) {
            text::push(out, key, "Irrelevant");
            return Ok(());
        }
        let l = &self.limits;
        match key {
            "HeaderDigest" | "DataDigest" => {
                let choice = value.split(',').find(|d| match *d {
                    "None" => true,
                    "CRC32C" => !self.iser(),
                    _ => false,
                });
                match choice {
                    Some(d) => {
                        let on = d == "CRC32C";
                        if key == "HeaderDigest" {
                            self.conn.header_digest = on;
                        } else {
                            self.conn.data_digest = on;
                        }
                        text::push(out, key, d);
                    }
                    None => text::push(out, key, "Reject"),
                }
            }
            "MaxConnections" => {
                let ours = (l.max_connections as u64).max(1);
                if let Some(r) = num_min(out, key, value, 1, 65535, ours) {
                    self.session.max_connections = r as u16;
                }
            }
            "InitialR2T" => {
                let ours = l.initial_r2t;
                if let Some(r) = boolean(out, key, value, |i| i || ours) {
                    self.session.initial_r2t = r;
                }
            }
            "ImmediateData" => {
                let ours = l.immediate_data;
                if let Some(r) = boolean(out, key, value, |i| i && ours) {
                    self.session.immediate_data = r;
                }
            }
            "MaxRecvDataSegmentLength" => {
                if self.iser() {
                    // RFC 7145 6.3: replaced by the iSER keys; ignored.
                    return Ok(());
                }
                match parse_number(value) {
                    Some(n) if (SEG_MIN..=SEG_MAX).contains(&n) => {
                        self.conn.max_xmit_data_segment_length = n as u32;
                    }
                    _ => text::push(out, key, "Reject"),
                }
            }
            "MaxBurstLength" => {
                let ours = self.our_max_burst();
                if let Some(r) = num_min(out, key, value, SEG_MIN, SEG_MAX, ours) {
                    self.session.max_burst_length = r as u32;
                }
            }
            "FirstBurstLength" => match parse_number(value) {
                Some(n) if (SEG_MIN..=SEG_MAX).contains(&n) => self.first_burst_offer = Some(n),
                _ => text::push(out, key, "Reject"),
            },
            "DefaultTime2Wait" => {
                let ours = (l.default_time2wait as u64).min(3600);
                if let Some(r) = num_fn(out, key, value, 0, 3600, |i| i.max(ours)) {
                    self.session.default_time2wait = r as u16;
                }
            }
            "DefaultTime2Retain" => {
                let ours = (l.default_time2retain as u64).min(3600);
                if let Some(r) = num_min(out, key, value, 0, 3600, ours) {
                    self.session.default_time2retain = r as u16;
                }
            }
            "MaxOutstandingR2T" => {
                let ours = (l.max_outstanding_r2t as u64).max(1);
                if let Some(r) = num_min(out, key, value, 1, 65535, ours) {
                    self.session.max_outstanding_r2t = r as u16;
                }
            }
            // The connection layer delivers data in order only, so ours is
            // Yes and with OR the result is always Yes.
            "DataPDUInOrder" => {
                if let Some(r) = boolean(out, key, value, |_| true) {
                    self.session.data_pdu_in_order = r;
                }
            }
            "DataSequenceInOrder" => {
                if let Some(r) = boolean(out, key, value, |_| true) {
                    self.session.data_sequence_in_order = r;
                }
            }
            "ErrorRecoveryLevel" => {
                let ours = (l.error_recovery_level as u64).min(2);
                if let Some(r) = num_min(out, key, value, 0, 2, ours) {
                    self.session.error_recovery_level = r as u8;
                }
            }
            // Markers were dropped by RFC 7143; AND with our No.
            "OFMarker" | "IFMarker" => {
                boolean(out, key, value, |_| false);
            }
            "OFMarkInt" | "IFMarkInt" => text::push(out, key, "Irrelevant"),
            "TaskReporting" => {
                if value.split(',').any(|v| v == "RFC3720") {
                    text::push(out, key, "RFC3720");
                } else {
                    text::push(out, key, "Reject");
                }
            }
            // RFC 7143 13.24: we implement level 1.
            "iSCSIProtocolLevel" => {
                num_min(out, key, value, 0, 31, 1);
            }
            "RDMAExtensions" => {
                let ours = self.iser();
                boolean(out, key, value, |i| i && ours);
            }
            "TargetRecvDataSegmentLength" => {
                let ours = self.our_mrdsl();
                if let Some(r) = num_min(out, key, value, SEG_MIN, SEG_MAX, ours) {
                    self.iser_recv = Some(r as u32);
                }
            }
            "InitiatorRecvDataSegmentLength" => {
                if let Some(r) = num_min(out, key, value, SEG_MIN, SEG_MAX, SEG_MAX) {
                    self.iser_xmit = Some(r as u32);
                }
            }
            "MaxAHSLength" => {
                num_min(out, key, value, 0, 65535, AHS_LEN_MAX as u64);
            }
            "TaggedBufferForSolicitedDataOnly" => {
                boolean(out, key, value, |i| i);
            }
            // We do not implement the iSER Hello exchange.
            "iSERHelloRequired" => match parse_bool(value) {
                Some(false) => text::push(out, key, "No"),
                _ => text::push(out, key, "Reject"),
            },
            "MaxOutstandingUnexpectedPDUs" => match parse_number(value) {
                Some(n) if n == 0 || (2..=u32::MAX as u64).contains(&n) => {}
                _ => text::push(out, key, "Reject"),
            },
            _ => text::push(out, key, "NotUnderstood"),
        }
        Ok(())
    }

    /// The initiator's value for a key we proposed is the result.
    fn answer_to_proposal(&mut self, key: &str, value: &str) -> Result<(), LoginStatus> {
        if value == "Irrelevant" {
            return Ok(());
        }
        match key {
            "MaxBurstLength" => match parse_number(value) {
                Some(n) if (SEG_MIN..=SEG_MAX).contains(&n) => {
                    self.session.max_burst_length = n.min(self.our_max_burst()) as u32;
                }
                _ => return Err(LoginStatus::INITIATOR_ERROR),
            },
            "FirstBurstLength" => match parse_number(value) {
                Some(n) if (SEG_MIN..=SEG_MAX).contains(&n) => {
                    self.session.first_burst_length = n.min(self.our_first_burst()) as u32;
                }
                _ => return Err(LoginStatus::INITIATOR_ERROR),
            },
            "ImmediateData" => match parse_bool(value) {
                Some(v) => self.session.immediate_data = v && self.limits.immediate_data,
                None => return Err(LoginStatus::INITIATOR_ERROR),
            },
            _ => return Err(LoginStatus::INITIATOR_ERROR),
        }
        Ok(())
    }

    /// Called after each operational-stage request has been read.
    pub(crate) fn end_request(&mut self, out: &mut Vec<u8>) {
        if let Some(n) = self.first_burst_offer.take() {
            if self.session.initial_r2t && !self.session.immediate_data {
                text::push(out, "FirstBurstLength", "Irrelevant");
            } else {
                let r = n.min(self.our_first_burst());
                self.session.first_burst_length = r as u32;
                text::push(out, "FirstBurstLength", &r.to_string());
            }
        }
    }

    /// Our MaxRecvDataSegmentLength declaration, once per login, in the
    /// first operational-stage response (RFC 7143 13.12: declared by each
    /// side; without it the initiator must assume 8192).
    pub(crate) fn declare(&mut self, out: &mut Vec<u8>) {
        if self.declared_mrdsl || self.iser() {
            return;
        }
        self.declared_mrdsl = true;
        let v = self.our_mrdsl();
        self.conn.max_recv_data_segment_length = v as u32;
        text::push(out, "MaxRecvDataSegmentLength", &v.to_string());
    }

    fn proposals(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if self.discovery {
            return p;
        }
        let unset = |k: &str| key_index(k).is_some_and(|i| !self.seen[i] && !self.proposed[i]);
        let mbl = self.our_max_burst();
        if unset("MaxBurstLength") && (self.session.max_burst_length as u64) > mbl {
            p.push(("MaxBurstLength", mbl.to_string()));
        }
        if !self.limits.immediate_data && unset("ImmediateData") && self.session.immediate_data {
            p.push(("ImmediateData", "No".to_string()));
        }
        let fbl = self.our_first_burst().min(mbl);
        let fb_relevant = !self.session.initial_r2t || self.session.immediate_data;
        if unset("FirstBurstLength")
            && fb_relevant
            && (self.session.first_burst_length as u64) > fbl
        {
            p.push(("FirstBurstLength", fbl.to_string()));
        }
        p
    }

    /// Whether leaving login now would leave a default that breaks our
    /// limits; then the operational stage cannot be skipped.
    pub(crate) fn needs_proposals(&self) -> bool {
        !self.proposals().is_empty()
    }

    /// Append our own proposals; true if any were made (then the response
    /// must not carry the T bit, RFC 7143 6.3: the initiator owes answers).
    pub(crate) fn propose(&mut self, out: &mut Vec<u8>) -> bool {
        let p = self.proposals();
        for (k, v) in &p {
            text::push(out, k, v);
            if let Some(i) = key_index(k) {
                self.proposed[i] = true;
            }
        }
        !p.is_empty()
    }

    /// Whether answers to our proposals are still due.
    pub(crate) fn awaiting(&self) -> bool {
        self.proposed.iter().any(|p| *p)
    }

    /// The negotiated results; RFC defaults for everything not negotiated.
    pub(crate) fn results(&self) -> (SessionParams, ConnParams) {
        let mut s = self.session.clone();
        let mut c = self.conn.clone();
        if self.discovery {
            let d = SessionParams::default();
            s.max_connections = d.max_connections;
            s.initial_r2t = d.initial_r2t;
            s.immediate_data = d.immediate_data;
            s.max_burst_length = d.max_burst_length;
            s.first_burst_length = d.first_burst_length;
            s.max_outstanding_r2t = d.max_outstanding_r2t;
            s.data_pdu_in_order = d.data_pdu_in_order;
            s.data_sequence_in_order = d.data_sequence_in_order;
        }
        // RFC 7143 13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
        s.first_burst_length = s.first_burst_length.min(s.max_burst_length);
        if self.iser() {
            c.header_digest = false;
            c.data_digest = false;
            c.max_recv_data_segment_length = self.iser_recv.unwrap_or(SEG_DEFAULT);
            c.max_xmit_data_segment_length = self.iser_xmit.unwrap_or(SEG_DEFAULT);
        }
        (s, c)
    }
}

/// Numeric key with the Minimum result function.
fn num_min(out: &mut Vec<u8>, key: &str, value: &str, lo: u64, hi: u64, ours: u64) -> Option<u64> {
    num_fn(out, key, value, lo, hi, |i| i.min(ours))
}

/// Numeric key: out-of-range or malformed values are answered Reject
/// (RFC 7143 6.2), else the result of `f` is answered and returned.
fn num_fn(
    out: &mut Vec<u8>,
    key: &str,
    value: &str,
    lo: u64,
    hi: u64,
    f: impl Fn(u64) -> u64,
) -> Option<u64> {
    match parse_number(value) {
        Some(n) if (lo..=hi).contains(&n) => {
            let r = f(n);
            text::push(out, key, &r.to_string());
            Some(r)
        }
        _ => {
            text::push(out, key, "Reject");
            None
        }
    }
}

/// Boolean key: answer (and return) `f(initiator's value)`.
fn boolean(out: &mut Vec<u8>, key: &str, value: &str, f: impl Fn(bool) -> bool) -> Option<bool> {
    match parse_bool(value) {
        Some(v) => {
            let r = f(v);
            text::push(out, key, yes_no(r));
            Some(r)
        }
        None => {
            text::push(out, key, "Reject");
            None
        }
    }
}
