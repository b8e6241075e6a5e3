//! Text Request handling in full feature phase (RFC 7143 6.3, 11.10,
//! 11.11, Appendix C "SendTargets Operation").
//!
//! Sans-IO like the rest of the crate: `TextMachine` takes one Text Request
//! and returns one Text Response without StatSN/ExpCmdSN/MaxCmdSN (the
//! connection layer owns those). Long answers are continued with the C bit
//! and a Target Transfer Tag; the initiator fetches the rest with empty Text
//! Requests carrying that TTT. Long requests (C bit from the initiator) are
//! collected, each piece answered with an empty response.
//!
//! Key policy in full feature phase:
//! - `SendTargets`: answered with `TargetName`/`TargetAddress` lines.
//! - `MaxRecvDataSegmentLength` (TCP): a new declaration by the initiator is
//!   accepted without an answer (it is declarative); the connection layer
//!   picks it up with [`TextMachine::take_max_xmit_update`]. The current
//!   response still uses the old value. On iSER it is `Irrelevant`.
//! - `InitiatorAlias`: accepted and ignored.
//! - Login-only keys (every other RFC 7143 / RFC 7145 key): `Reject`,
//!   since they may not be renegotiated after login.
//! - Anything else: `NotUnderstood`.

use crate::login::negotiate::is_known_key;
use crate::params::{ConnParams, SessionParams, SessionType, Transport};
use crate::pdu::{flags, opcode, Pdu, RESERVED_TAG};
use crate::text;

/// Upper bound on one complete answer; SendTargets stops adding targets
/// beyond it so a huge configuration cannot make us buffer without limit.
pub const TEXT_RESPONSE_MAX: usize = 1 << 20;
/// Keys accepted in one Text Request.
pub const TEXT_KEYS_MAX: usize = 256;

/// One target as SendTargets reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRecord {
    pub name: String,
    /// "ip:port,tpgt"; IPv6 addresses in brackets.
    pub addresses: Vec<String>,
}

/// What the Text phase asks the target about. Implemented by the engine,
/// usually on the same type as `LoginContext`.
pub trait TextContext {
    /// Targets to report for `SendTargets=<query>`. `query` is the raw value:
    /// `All`, a target name, or empty. `session_target` is `None` in a
    /// discovery session. Implementations must leave out targets the
    /// initiator may not log in to (ACLs); `TextMachine` further narrows
    /// the answer to the session's target in normal sessions and to the
    /// named target for a name query.
    fn send_targets(
        &self,
        initiator_name: &str,
        session_target: Option<&str>,
        query: &str,
    ) -> Vec<TargetRecord>;
}

/// Why a Reject PDU is owed instead of a Text Response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextReject {
    /// Reason 0x09: a TTT or ITT that matches no pending exchange, a
    /// reserved ITT.
    InvalidPduField,
    /// Reason 0x04: F and C together, data where none may be, malformed or
    /// oversized text, a repeated key.
    ProtocolError,
}

impl TextReject {
    /// The Reject PDU reason code (RFC 7143 11.17.1).
    pub fn reason(&self) -> u8 {
        match self {
            TextReject::InvalidPduField => 0x09,
            TextReject::ProtocolError => 0x04,
        }
    }
}

#[derive(Debug)]
enum PendingKind {
    /// The initiator's text is continued (C bit); collected so far.
    Incoming(Vec<u8>),
    /// Our answer did not fit; what remains to send.
    Outgoing { data: Vec<u8>, pos: usize },
    /// The initiator left the exchange open (F=0) and may continue it.
    Open,
}

#[derive(Debug)]
struct Pending {
    itt: u32,
    ttt: u32,
    kind: PendingKind,
}

/// Per-connection Text Request state. See the module docs.
#[derive(Debug, Default)]
pub struct TextMachine {
    pending: Option<Pending>,
    last_ttt: u32,
    max_xmit_update: Option<u32>,
}

impl TextMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// A MaxRecvDataSegmentLength the initiator declared in full feature
    /// phase, to become the connection's max_xmit_data_segment_length.
    pub fn take_max_xmit_update(&mut self) -> Option<u32> {
        self.max_xmit_update.take()
    }

    /// Whether an exchange is in progress (continuation either way).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    fn alloc_ttt(&mut self) -> u32 {
        self.last_ttt = self.last_ttt.wrapping_add(1);
        if self.last_ttt == RESERVED_TAG {
            self.last_ttt = 1;
        }
        self.last_ttt
    }

    /// Feed one Text Request (opcode 0x04). Generic so callers holding a
    /// `&mut C` with `C: ?Sized` can pass it; `&dyn TextContext` works too.
    pub fn handle<C: TextContext + ?Sized>(
        &mut self,
        ctx: &C,
        session: &SessionParams,
        conn: &ConnParams,
        req: &Pdu,
    ) -> Result<Pdu, TextReject> {
        let b = &req.bhs;
        if b.opcode() != opcode::TEXT_REQ {
            return Err(TextReject::ProtocolError);
        }
        let f = b.flags();
        let fin = f & flags::FINAL != 0;
        let cont = f & flags::CONTINUE != 0;
        if fin && cont {
            return Err(TextReject::ProtocolError);
        }
        let itt = b.itt();
        if itt == RESERVED_TAG {
            return Err(TextReject::InvalidPduField);
        }
        let ttt = b.ttt();
        let chunk_max = (conn.max_xmit_data_segment_length as usize).max(1);

        if ttt == RESERVED_TAG {
            // A new request resets whatever exchange was pending (RFC 7143
            // 11.10.4), whichever ITT it had.
            self.pending = None;
            if cont {
                return self.start_incoming(req, itt, Vec::new());
            }
            let answer = self.answer(ctx, session, conn, &req.data)?;
            return Ok(self.send(req, itt, answer, 0, !fin, chunk_max));
        }

        // A continuation: it must name the pending exchange exactly. A
        // stray TTT leaves the pending exchange intact.
        let Some(p) = self.pending.take() else {
            return Err(TextReject::InvalidPduField);
        };
        if p.itt != itt || p.ttt != ttt {
            self.pending = Some(p);
            return Err(TextReject::InvalidPduField);
        }
        match p.kind {
            PendingKind::Outgoing { data, pos } => {
                if !req.data.is_empty() || cont {
                    return Err(TextReject::ProtocolError);
                }
                Ok(self.send(req, itt, data, pos, false, chunk_max))
            }
            PendingKind::Incoming(buf) => self.continue_incoming(ctx, session, conn, req, buf),
            PendingKind::Open => {
                if cont {
                    return self.start_incoming(req, itt, Vec::new());
                }
                let answer = self.answer(ctx, session, conn, &req.data)?;
                Ok(self.send(req, itt, answer, 0, !fin, chunk_max))
            }
        }
    }

    fn start_incoming(&mut self, req: &Pdu, itt: u32, mut buf: Vec<u8>) -> Result<Pdu, TextReject> {
        if buf.len() + req.data.len() > text::TEXT_LEN_MAX {
            return Err(TextReject::ProtocolError);
        }
        buf.extend_from_slice(&req.data);
        let ttt = self.alloc_ttt();
        self.pending = Some(Pending {
            itt,
            ttt,
            kind: PendingKind::Incoming(buf),
        });
        // An empty response with F=0 asks for the next piece.
        Ok(response(req, 0, ttt, Vec::new()))
    }

    fn continue_incoming<C: TextContext + ?Sized>(
        &mut self,
        ctx: &C,
        session: &SessionParams,
        conn: &ConnParams,
        req: &Pdu,
        mut buf: Vec<u8>,
    ) -> Result<Pdu, TextReject> {
        let itt = req.bhs.itt();
        let f = req.bhs.flags();
        if f & flags::CONTINUE != 0 {
            return self.start_incoming(req, itt, buf);
        }
        if buf.len() + req.data.len() > text::TEXT_LEN_MAX {
            return Err(TextReject::ProtocolError);
        }
        buf.extend_from_slice(&req.data);
        let answer = self.answer(ctx, session, conn, &buf)?;
        let chunk_max = (conn.max_xmit_data_segment_length as usize).max(1);
        Ok(self.send(req, itt, answer, 0, f & flags::FINAL == 0, chunk_max))
    }

    /// Send `data[pos..]`, continuing with the C bit if it does not fit.
    /// `keep_open`: the initiator sent F=0, so the exchange stays open.
    fn send(
        &mut self,
        req: &Pdu,
        itt: u32,
        data: Vec<u8>,
        pos: usize,
        keep_open: bool,
        chunk_max: usize,
    ) -> Pdu {
        let rest = data.len().saturating_sub(pos);
        if rest > chunk_max {
            let chunk = data[pos..pos + chunk_max].to_vec();
            let ttt = self.alloc_ttt();
            self.pending = Some(Pending {
                itt,
                ttt,
                kind: PendingKind::Outgoing {
                    data,
                    pos: pos + chunk_max,
                },
            });
            return response(req, flags::CONTINUE, ttt, chunk);
        }
        let chunk = data.get(pos..).map(<[u8]>::to_vec).unwrap_or_default();
        if keep_open {
            let ttt = self.alloc_ttt();
            self.pending = Some(Pending {
                itt,
                ttt,
                kind: PendingKind::Open,
            });
            return response(req, 0, ttt, chunk);
        }
        self.pending = None;
        response(req, flags::FINAL, RESERVED_TAG, chunk)
    }

    /// The complete answer to one complete request text.
    fn answer<C: TextContext + ?Sized>(
        &mut self,
        ctx: &C,
        session: &SessionParams,
        conn: &ConnParams,
        data: &[u8],
    ) -> Result<Vec<u8>, TextReject> {
        let pairs = text::parse(data).map_err(|_| TextReject::ProtocolError)?;
        if pairs.len() > TEXT_KEYS_MAX {
            return Err(TextReject::ProtocolError);
        }
        for (i, (k, _)) in pairs.iter().enumerate() {
            if k.is_empty() || pairs[..i].iter().any(|(k2, _)| k2 == k) {
                return Err(TextReject::ProtocolError);
            }
        }
        let mut out = Vec::new();
        for (k, v) in &pairs {
            match k.as_str() {
                "SendTargets" => send_targets(ctx, session, v, &mut out),
                "MaxRecvDataSegmentLength" => {
                    if conn.transport == Transport::Iser {
                        text::push(&mut out, k, "Irrelevant");
                    } else {
                        match crate::login::negotiate::parse_number(v) {
                            Some(n) if (512..=(1 << 24) - 1).contains(&n) => {
                                self.max_xmit_update = Some(n as u32);
                            }
                            _ => text::push(&mut out, k, "Reject"),
                        }
                    }
                }
                "InitiatorAlias" => {}
                _ if is_known_key(k) => text::push(&mut out, k, "Reject"),
                _ => text::push(&mut out, k, "NotUnderstood"),
            }
        }
        Ok(out)
    }
}

fn send_targets<C: TextContext + ?Sized>(
    ctx: &C,
    session: &SessionParams,
    value: &str,
    out: &mut Vec<u8>,
) {
    let (session_target, wanted): (Option<&str>, Option<&str>) = match session.session_type {
        SessionType::Discovery => match value {
            "All" => (None, None),
            // RFC 7143 C: an empty value names the session's target, and a
            // discovery session has none.
            "" => return,
            name => (None, Some(name)),
        },
        SessionType::Normal => {
            let t = session.target_name.as_str();
            match value {
                "All" | "" => (Some(t), Some(t)),
                name => (Some(t), Some(name)),
            }
        }
    };
    let records = ctx.send_targets(&session.initiator_name, session_target, value);
    for r in records {
        if wanted.is_some_and(|w| w != r.name) {
            continue;
        }
        // A NUL inside a name would split the pair; such a record is a
        // configuration error and is left out.
        if r.name.is_empty() || r.name.contains('\0') {
            continue;
        }
        let mut rec = Vec::new();
        text::push(&mut rec, "TargetName", &r.name);
        for a in r.addresses.iter().filter(|a| !a.contains('\0')) {
            text::push(&mut rec, "TargetAddress", a);
        }
        if out.len() + rec.len() > TEXT_RESPONSE_MAX {
            tracing::warn!("SendTargets answer truncated at {} bytes", out.len());
            break;
        }
        out.extend_from_slice(&rec);
    }
}

fn response(req: &Pdu, fl: u8, ttt: u32, data: Vec<u8>) -> Pdu {
    let mut p = Pdu::new(opcode::TEXT_RESP);
    p.bhs.set_flags(fl);
    // RFC 7143 11.11: the LUN is echoed whenever TTT is not reserved.
    p.bhs.set_lun(req.bhs.lun());
    p.bhs.set_itt(req.bhs.itt());
    p.bhs.set_ttt(ttt);
    p.bhs.set_data_segment_len(data.len() as u32);
    p.data = data;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ctx {
        targets: Vec<TargetRecord>,
    }

    impl TextContext for Ctx {
        fn send_targets(&self, _: &str, _: Option<&str>, _: &str) -> Vec<TargetRecord> {
            self.targets.clone()
        }
    }

    fn ctx(n: usize) -> Ctx {
        Ctx {
            targets: (0..n)
                .map(|i| TargetRecord {
                    name: format!("iqn.2026-01.test:target-with-a-longish-name-{i:04}"),
                    addresses: vec![
                        format!("192.168.1.{}:3260,1", i % 250),
                        format!("[fe80::{i:x}]:3260,2"),
                    ],
                })
                .collect(),
        }
    }

    fn discovery() -> SessionParams {
        SessionParams {
            session_type: SessionType::Discovery,
            initiator_name: "iqn.2026-01.test:init".into(),
            ..SessionParams::default()
        }
    }

    fn normal(target: &str) -> SessionParams {
        SessionParams {
            initiator_name: "iqn.2026-01.test:init".into(),
            target_name: target.into(),
            ..SessionParams::default()
        }
    }

    fn req(itt: u32, ttt: u32, fl: u8, data: &[u8]) -> Pdu {
        let mut p = Pdu::new(opcode::TEXT_REQ);
        p.bhs.set_flags(fl);
        p.bhs.set_itt(itt);
        p.bhs.set_ttt(ttt);
        p.bhs.set_lun(0x0001_0000_0000_0000);
        p.bhs.set_data_segment_len(data.len() as u32);
        p.data = data.to_vec();
        p
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in pairs {
            text::push(&mut b, k, v);
        }
        b
    }

    fn conn(xmit: u32) -> ConnParams {
        ConnParams {
            max_xmit_data_segment_length: xmit,
            ..ConnParams::default()
        }
    }

    /// Fetch a whole (possibly continued) answer, checking every piece.
    fn fetch(
        m: &mut TextMachine,
        c: &Ctx,
        s: &SessionParams,
        cp: &ConnParams,
        first: Pdu,
    ) -> (Vec<u8>, usize) {
        let itt = first.bhs.itt();
        let mut r = m.handle(c, s, cp, &first).unwrap();
        let mut all = Vec::new();
        let mut pieces = 1;
        loop {
            assert_eq!(r.bhs.opcode(), opcode::TEXT_RESP);
            assert_eq!(r.bhs.itt(), itt);
            assert!(r.data.len() <= cp.max_xmit_data_segment_length as usize);
            assert_eq!(r.bhs.data_segment_len() as usize, r.data.len());
            all.extend_from_slice(&r.data);
            if r.bhs.flags() & flags::FINAL != 0 {
                assert_eq!(r.bhs.ttt(), RESERVED_TAG);
                assert_eq!(r.bhs.flags() & flags::CONTINUE, 0);
                break;
            }
            assert_ne!(r.bhs.ttt(), RESERVED_TAG);
            assert_eq!(r.bhs.lun(), 0x0001_0000_0000_0000);
            r = m
                .handle(c, s, cp, &req(itt, r.bhs.ttt(), flags::FINAL, b""))
                .unwrap();
            pieces += 1;
        }
        (all, pieces)
    }

    #[test]
    fn send_targets_all_discovery() {
        let c = ctx(3);
        let mut m = TextMachine::default();
        let (data, pieces) = fetch(
            &mut m,
            &c,
            &discovery(),
            &conn(8192),
            req(
                5,
                RESERVED_TAG,
                flags::FINAL,
                &kv(&[("SendTargets", "All")]),
            ),
        );
        assert_eq!(pieces, 1);
        let pairs = text::parse(&data).unwrap();
        assert_eq!(pairs.len(), 9);
        assert_eq!(pairs[0].0, "TargetName");
        assert_eq!(
            pairs[1],
            ("TargetAddress".into(), "192.168.1.0:3260,1".into())
        );
        assert_eq!(
            pairs[2],
            ("TargetAddress".into(), "[fe80::0]:3260,2".into())
        );
        assert!(!m.is_pending());
    }

    #[test]
    fn send_targets_continuation() {
        let c = ctx(500);
        let mut m = TextMachine::default();
        let (data, pieces) = fetch(
            &mut m,
            &c,
            &discovery(),
            &conn(512),
            req(
                9,
                RESERVED_TAG,
                flags::FINAL,
                &kv(&[("SendTargets", "All")]),
            ),
        );
        assert!(pieces > 10);
        let pairs = text::parse(&data).unwrap();
        assert_eq!(pairs.len(), 1500);
        assert!(!m.is_pending());
    }

    #[test]
    fn continuation_errors() {
        let c = ctx(100);
        let s = discovery();
        let cp = conn(1024);
        let mut m = TextMachine::default();
        let r = m
            .handle(
                &c,
                &s,
                &cp,
                &req(
                    1,
                    RESERVED_TAG,
                    flags::FINAL,
                    &kv(&[("SendTargets", "All")]),
                ),
            )
            .unwrap();
        let ttt = r.bhs.ttt();
        assert_eq!(r.bhs.flags(), flags::CONTINUE);
        // Wrong TTT or wrong ITT: Reject (invalid PDU field), state kept.
        assert_eq!(
            m.handle(&c, &s, &cp, &req(1, ttt ^ 1, flags::FINAL, b""))
                .unwrap_err(),
            TextReject::InvalidPduField
        );
        assert_eq!(
            m.handle(&c, &s, &cp, &req(2, ttt, flags::FINAL, b""))
                .unwrap_err(),
            TextReject::InvalidPduField
        );
        assert!(m.is_pending());
        // Data in a fetch request is a protocol error.
        assert_eq!(
            m.handle(&c, &s, &cp, &req(1, ttt, flags::FINAL, b"a=b\0"))
                .unwrap_err(),
            TextReject::ProtocolError
        );
        // A new request (reserved TTT) abandons the pending exchange.
        let r = m
            .handle(
                &c,
                &s,
                &cp,
                &req(
                    1,
                    RESERVED_TAG,
                    flags::FINAL,
                    &kv(&[("SendTargets", "All")]),
                ),
            )
            .unwrap();
        let r2 = m
            .handle(
                &c,
                &s,
                &cp,
                &req(7, RESERVED_TAG, flags::FINAL, &kv(&[("X-foo", "1")])),
            )
            .unwrap();
        assert_eq!(r2.bhs.flags(), flags::FINAL);
        assert_eq!(text::parse(&r2.data).unwrap()[0].1, "NotUnderstood");
        assert_eq!(
            m.handle(&c, &s, &cp, &req(1, r.bhs.ttt(), flags::FINAL, b""))
                .unwrap_err(),
            TextReject::InvalidPduField
        );
        // F and C together.
        assert_eq!(
            m.handle(
                &c,
                &s,
                &cp,
                &req(1, RESERVED_TAG, flags::FINAL | flags::CONTINUE, b"")
            )
            .unwrap_err(),
            TextReject::ProtocolError
        );
        assert_eq!(
            m.handle(
                &c,
                &s,
                &cp,
                &req(RESERVED_TAG, RESERVED_TAG, flags::FINAL, b"")
            )
            .unwrap_err(),
            TextReject::InvalidPduField
        );
        assert_eq!(TextReject::InvalidPduField.reason(), 0x09);
        assert_eq!(TextReject::ProtocolError.reason(), 0x04);
    }

    #[test]
    fn incoming_continuation() {
        let c = ctx(2);
        let s = discovery();
        let cp = conn(8192);
        let mut m = TextMachine::default();
        let whole = kv(&[("X-a", "1"), ("SendTargets", "All")]);
        let (a, b) = whole.split_at(7);
        let r = m
            .handle(&c, &s, &cp, &req(3, RESERVED_TAG, flags::CONTINUE, a))
            .unwrap();
        assert!(r.data.is_empty());
        assert_eq!(r.bhs.flags() & flags::FINAL, 0);
        let ttt = r.bhs.ttt();
        assert_ne!(ttt, RESERVED_TAG);
        let r = m
            .handle(&c, &s, &cp, &req(3, ttt, flags::FINAL, b))
            .unwrap();
        assert_eq!(r.bhs.flags(), flags::FINAL);
        let pairs = text::parse(&r.data).unwrap();
        assert_eq!(pairs[0], ("X-a".into(), "NotUnderstood".into()));
        assert_eq!(pairs.len(), 1 + 2 * 3);
    }

    #[test]
    fn normal_session_sees_only_its_target() {
        let c = ctx(4);
        let t1 = c.targets[1].name.clone();
        let t2 = c.targets[2].name.clone();
        let s = normal(&t1);
        let cp = conn(8192);
        for q in ["All", ""] {
            let mut m = TextMachine::default();
            let (d, _) = fetch(
                &mut m,
                &c,
                &s,
                &cp,
                req(1, RESERVED_TAG, flags::FINAL, &kv(&[("SendTargets", q)])),
            );
            let pairs = text::parse(&d).unwrap();
            assert_eq!(pairs[0], ("TargetName".into(), t1.clone()));
            assert_eq!(pairs.len(), 3);
        }
        let mut m = TextMachine::default();
        let (d, _) = fetch(
            &mut m,
            &c,
            &s,
            &cp,
            req(1, RESERVED_TAG, flags::FINAL, &kv(&[("SendTargets", &t2)])),
        );
        assert_eq!(text::parse(&d).unwrap()[0].1, t2);
        // Discovery: a name query reports only that name; empty reports nothing.
        let (d, _) = fetch(
            &mut m,
            &c,
            &discovery(),
            &cp,
            req(1, RESERVED_TAG, flags::FINAL, &kv(&[("SendTargets", &t2)])),
        );
        assert_eq!(text::parse(&d).unwrap().len(), 3);
        let (d, _) = fetch(
            &mut m,
            &c,
            &discovery(),
            &cp,
            req(1, RESERVED_TAG, flags::FINAL, &kv(&[("SendTargets", "")])),
        );
        assert!(d.is_empty());
    }

    #[test]
    fn ffp_keys() {
        let c = ctx(0);
        let s = normal("iqn.x");
        let cp = conn(8192);
        let mut m = TextMachine::default();
        let r = m
            .handle(
                &c,
                &s,
                &cp,
                &req(
                    1,
                    RESERVED_TAG,
                    flags::FINAL,
                    &kv(&[
                        ("MaxRecvDataSegmentLength", "65536"),
                        ("InitiatorAlias", "x"),
                        ("MaxBurstLength", "512"),
                        ("Y-unknown", "1"),
                    ]),
                ),
            )
            .unwrap();
        let pairs = text::parse(&r.data).unwrap();
        assert_eq!(
            pairs,
            vec![
                ("MaxBurstLength".to_string(), "Reject".to_string()),
                ("Y-unknown".to_string(), "NotUnderstood".to_string())
            ]
        );
        assert_eq!(m.take_max_xmit_update(), Some(65536));
        assert_eq!(m.take_max_xmit_update(), None);
        let r = m
            .handle(
                &c,
                &s,
                &cp,
                &req(
                    2,
                    RESERVED_TAG,
                    flags::FINAL,
                    &kv(&[("MaxRecvDataSegmentLength", "100")]),
                ),
            )
            .unwrap();
        assert_eq!(text::parse(&r.data).unwrap()[0].1, "Reject");
        // Repeated key, malformed text.
        assert_eq!(
            m.handle(
                &c,
                &s,
                &cp,
                &req(
                    3,
                    RESERVED_TAG,
                    flags::FINAL,
                    &kv(&[("A", "1"), ("A", "2")])
                )
            )
            .unwrap_err(),
            TextReject::ProtocolError
        );
        assert_eq!(
            m.handle(
                &c,
                &s,
                &cp,
                &req(3, RESERVED_TAG, flags::FINAL, b"\xff=1\0")
            )
            .unwrap_err(),
            TextReject::ProtocolError
        );
    }

    #[test]
    fn open_exchange_with_f0() {
        let c = ctx(1);
        let s = discovery();
        let cp = conn(8192);
        let mut m = TextMachine::default();
        let r = m
            .handle(&c, &s, &cp, &req(4, RESERVED_TAG, 0, &kv(&[("X-a", "1")])))
            .unwrap();
        assert_eq!(r.bhs.flags() & flags::FINAL, 0);
        let ttt = r.bhs.ttt();
        assert_ne!(ttt, RESERVED_TAG);
        let r = m
            .handle(
                &c,
                &s,
                &cp,
                &req(4, ttt, flags::FINAL, &kv(&[("SendTargets", "All")])),
            )
            .unwrap();
        assert_eq!(r.bhs.flags(), flags::FINAL);
        assert_eq!(r.bhs.ttt(), RESERVED_TAG);
        assert!(!m.is_pending());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics(
                seq in proptest::collection::vec(
                    (any::<u8>(), 0u32..4, prop_oneof![Just(RESERVED_TAG), 0u32..4],
                     proptest::collection::vec(any::<u8>(), 0..200)),
                    1..12),
                xmit in 1u32..2000,
            ) {
                let c = ctx(20);
                let s = discovery();
                let cp = conn(xmit);
                let mut m = TextMachine::default();
                for (fl, itt, ttt, data) in seq {
                    if let Ok(r) = m.handle(&c, &s, &cp, &req(itt, ttt, fl, &data)) {
                        prop_assert!(r.data.len() <= xmit as usize);
                        let fin = r.bhs.flags() & flags::FINAL != 0;
                        prop_assert_eq!(fin, r.bhs.ttt() == RESERVED_TAG);
                    }
                }
            }
        }
    }
}
