//! Tests driving `LoginMachine` through a plain test context.

use super::negotiate::Negotiator;
use super::*;
use crate::params::{ConnParams, SessionParams, SessionType, TargetLimits, Transport};
use crate::pdu::{flags, opcode, Bhs, Pdu};
use crate::text;
use md5::Md5;
use sha2::{Digest, Sha256};

const INIT: &str = "iqn.2026-01.test:init";
const TGT: &str = "iqn.2026-01.test:disk1";
const ISID: u64 = 0x8000_1234_5678;
const ITT: u32 = 0x77;
const CMDSN: u32 = 5;

struct Ctx {
    targets: Vec<&'static str>,
    denied: Vec<&'static str>,
    chap: ChapConfig,
    rnd: u8,
    instated: Vec<SessionRequest>,
    instate_result: Result<u16, LoginStatus>,
    alias: Option<String>,
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx {
            targets: vec![TGT],
            denied: vec![],
            chap: ChapConfig::default(),
            rnd: 0x10,
            instated: vec![],
            instate_result: Ok(0x1234),
            alias: None,
        }
    }
}

impl LoginContext for Ctx {
    fn portal_group_tag(&self) -> u16 {
        7
    }
    fn target_exists(&self, t: &str) -> bool {
        self.targets.contains(&t)
    }
    fn initiator_allowed(&self, _t: &str, i: &str) -> bool {
        !self.denied.contains(&i)
    }
    fn chap(&self, _t: Option<&str>) -> ChapConfig {
        self.chap.clone()
    }
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.rnd;
            self.rnd = self.rnd.wrapping_add(1);
        }
    }
    fn instate_session(&mut self, req: &SessionRequest) -> Result<u16, LoginStatus> {
        self.instated.push(req.clone());
        self.instate_result
    }
    fn target_alias(&self, _t: &str) -> Option<String> {
        self.alias.clone()
    }
    fn authenticate_first(&self) -> bool {
        self.chap.initiator.is_some()
    }
}

fn kvbytes(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in pairs {
        text::push(&mut b, k, v);
    }
    b
}

fn raw(csg: u8, nsg: u8, fl: u8, data: Vec<u8>) -> Pdu {
    let mut p = Pdu::new(opcode::LOGIN_REQ);
    p.bhs.set_immediate(true);
    p.bhs.set_flags(fl | (csg << 2) | nsg);
    p.bhs.set_isid(ISID);
    p.bhs.set_itt(ITT);
    p.bhs.set_u16_at(20, 1); // CID
    p.bhs.set_u32_at(24, CMDSN);
    p.bhs.set_data_segment_len(data.len() as u32);
    p.data = data;
    p
}

fn req(csg: u8, nsg: u8, t: bool, pairs: &[(&str, &str)]) -> Pdu {
    raw(csg, nsg, if t { flags::TRANSIT } else { 0 }, kvbytes(pairs))
}

fn machine() -> LoginMachine {
    LoginMachine::new(TargetLimits::default(), Transport::Tcp)
}

fn kv(p: &Pdu) -> Vec<(String, String)> {
    text::parse(&p.data).unwrap()
}

fn get(p: &Pdu, k: &str) -> Option<String> {
    kv(p).into_iter().find(|(kk, _)| kk == k).map(|(_, v)| v)
}

#[track_caller]
fn cont(s: LoginStep) -> Pdu {
    match s {
        LoginStep::Continue(mut v) => {
            assert_eq!(v.len(), 1);
            let p = v.remove(0);
            assert_eq!(p.bhs.opcode(), opcode::LOGIN_RESP);
            assert_eq!(p.bhs.login_status(), (0, 0));
            p
        }
        other => panic!("expected Continue, got {other:?}"),
    }
}

#[track_caller]
fn complete(s: LoginStep) -> (Pdu, LoginOutcome) {
    match s {
        LoginStep::Complete {
            mut responses,
            outcome,
        } => {
            assert_eq!(responses.len(), 1);
            (responses.remove(0), *outcome)
        }
        other => panic!("expected Complete, got {other:?}"),
    }
}

#[track_caller]
fn failed(s: LoginStep) -> LoginStatus {
    match s {
        LoginStep::Failed(p) => {
            assert_eq!(p.bhs.opcode(), opcode::LOGIN_RESP);
            assert!(p.data.is_empty());
            assert_eq!(p.bhs.flags(), 0);
            let (class, detail) = p.bhs.login_status();
            assert_ne!(class, 0);
            LoginStatus { class, detail }
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn names() -> Vec<(&'static str, &'static str)> {
    vec![("InitiatorName", INIT), ("TargetName", TGT)]
}

#[test]
fn plain_login_operational_only() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    let mut pairs = names();
    pairs.extend([
        ("InitiatorAlias", "host1"),
        ("HeaderDigest", "None"),
        ("MaxRecvDataSegmentLength", "65536"),
        ("MaxBurstLength", "1048576"),
        ("FirstBurstLength", "65536"),
        ("InitialR2T", "No"),
    ]);
    let (r, o) = complete(m.handle(&mut ctx, &req(1, 3, true, &pairs)));
    let b = &r.bhs;
    assert_eq!(b.opcode(), opcode::LOGIN_RESP);
    assert_eq!(b.flags(), flags::TRANSIT | (1 << 2) | 3);
    assert_eq!((b.version_max(), b.version_min()), (0, 0));
    assert_eq!(b.isid(), ISID);
    assert_eq!(b.tsih(), 0x1234);
    assert_eq!(b.itt(), ITT);
    // StatSN came from fill_random (bytes 0x10..0x13).
    assert_eq!(b.statsn(), 0x1011_1213);
    assert_eq!(b.expcmdsn(), CMDSN);
    assert_eq!(b.maxcmdsn(), CMDSN + 127);
    assert_eq!(b.login_status(), (0, 0));
    assert_eq!(b.data_segment_len() as usize, r.data.len());
    assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("7"));
    assert_eq!(
        get(&r, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("None"));
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("1048576"));
    assert_eq!(get(&r, "FirstBurstLength").as_deref(), Some("65536"));
    assert_eq!(get(&r, "InitialR2T").as_deref(), Some("No"));
    assert_eq!(get(&r, "InitiatorAlias"), None);

    assert_eq!(o.tsih, 0x1234);
    assert_eq!(o.isid, ISID);
    assert_eq!(o.cid, 1);
    assert_eq!(o.exp_cmdsn, CMDSN);
    assert_eq!(o.next_statsn, 0x1011_1214);
    assert_eq!(o.session.initiator_name, INIT);
    assert_eq!(o.session.target_name, TGT);
    assert_eq!(o.session.initiator_alias.as_deref(), Some("host1"));
    assert_eq!(o.session.session_type, SessionType::Normal);
    assert_eq!(o.session.max_burst_length, 1_048_576);
    assert!(!o.session.initial_r2t);
    let d = SessionParams::default();
    assert_eq!(o.session.max_connections, d.max_connections);
    assert_eq!(o.session.max_outstanding_r2t, d.max_outstanding_r2t);
    assert_eq!(o.session.default_time2wait, d.default_time2wait);
    assert_eq!(o.conn.max_recv_data_segment_length, 262_144);
    assert_eq!(o.conn.max_xmit_data_segment_length, 65_536);
    assert!(!o.conn.header_digest && !o.conn.data_digest);

    assert_eq!(ctx.instated.len(), 1);
    let s = &ctx.instated[0];
    assert_eq!((s.tsih, s.cid, s.isid), (0, 1, ISID));
    assert_eq!(s.target_name, TGT);
    // Nothing more once complete.
    assert_eq!(
        failed(m.handle(&mut ctx, &req(1, 3, true, &[]))),
        LoginStatus::INITIATOR_ERROR
    );
}

#[test]
fn security_none_then_operational() {
    let mut ctx = Ctx {
        alias: Some("Disk One".into()),
        ..Ctx::default()
    };
    let mut m = machine();
    let mut pairs = names();
    pairs.push(("AuthMethod", "CHAP,None"));
    let r = cont(m.handle(&mut ctx, &req(0, 1, true, &pairs)));
    assert_eq!(r.bhs.flags(), flags::TRANSIT | 1);
    assert_eq!(get(&r, "AuthMethod").as_deref(), Some("None"));
    assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("7"));
    assert_eq!(get(&r, "TargetAlias").as_deref(), Some("Disk One"));
    let sn = r.bhs.statsn();
    let r2 = cont(m.handle(&mut ctx, &req(1, 3, false, &[("ErrorRecoveryLevel", "2")])));
    assert_eq!(r2.bhs.statsn(), sn + 1);
    assert_eq!(r2.bhs.flags(), 1 << 2);
    assert_eq!(get(&r2, "ErrorRecoveryLevel").as_deref(), Some("0"));
    assert_eq!(
        get(&r2, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(get(&r2, "TargetPortalGroupTag"), None);
    let (r3, o) = complete(m.handle(&mut ctx, &req(1, 3, true, &[])));
    assert_eq!(r3.bhs.statsn(), sn + 2);
    assert!(r3.data.is_empty());
    assert_eq!(o.next_statsn, sn + 3);
    assert_eq!(o.conn.max_recv_data_segment_length, 262_144);
    assert_eq!(o.conn.max_xmit_data_segment_length, 8192);
}

#[test]
fn security_straight_to_full_feature() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    let mut pairs = names();
    pairs.push(("AuthMethod", "None"));
    let (r, o) = complete(m.handle(&mut ctx, &req(0, 3, true, &pairs)));
    assert_eq!(r.bhs.flags(), flags::TRANSIT | 3);
    // We never declared, so both sides keep 8192.
    assert_eq!(o.conn, ConnParams::default());
}

#[test]
fn discovery_login() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    let r = cont(m.handle(
        &mut ctx,
        &req(
            0,
            1,
            true,
            &[
                ("InitiatorName", INIT),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ],
        ),
    ));
    assert_eq!(get(&r, "TargetPortalGroupTag"), None);
    let r = cont(m.handle(
        &mut ctx,
        &req(
            1,
            3,
            false,
            &[
                ("MaxBurstLength", "4096"),
                ("MaxConnections", "4"),
                ("DefaultTime2Wait", "5"),
                ("HeaderDigest", "CRC32C,None"),
            ],
        ),
    ));
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("Irrelevant"));
    assert_eq!(get(&r, "MaxConnections").as_deref(), Some("Irrelevant"));
    assert_eq!(get(&r, "DefaultTime2Wait").as_deref(), Some("5"));
    assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("CRC32C"));
    let (_, o) = complete(m.handle(&mut ctx, &req(1, 3, true, &[])));
    assert_eq!(o.session.session_type, SessionType::Discovery);
    assert_eq!(o.session.target_name, "");
    assert_eq!(o.session.max_burst_length, 262_144);
    assert_eq!(o.session.default_time2wait, 5);
    assert!(o.conn.header_digest);
    assert_eq!(ctx.instated[0].session_type, SessionType::Discovery);
    assert_eq!(ctx.instated[0].target_name, "");
}

// ---- CHAP ----

fn md5_resp(id: u8, secret: &[u8], c: &[u8]) -> Vec<u8> {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(c);
    h.finalize().to_vec()
}

fn sha256_resp(id: u8, secret: &[u8], c: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update([id]);
    h.update(secret);
    h.update(c);
    h.finalize().to_vec()
}

fn hex(b: &[u8]) -> String {
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02X}"));
    }
    s
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.strip_prefix("0x").unwrap();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn chap_ctx(mutual: bool) -> Ctx {
    Ctx {
        chap: ChapConfig {
            initiator: Some(("alice".into(), "initiator-secret".into())),
            target: mutual.then(|| ("tgt".into(), "target-secret-x".into())),
        },
        ..Ctx::default()
    }
}

/// Up to the target's challenge; returns (algorithm, CHAP_I, CHAP_C).
fn chap_start(m: &mut LoginMachine, ctx: &mut Ctx, algs: &str) -> (String, u8, Vec<u8>) {
    let mut pairs = names();
    pairs.push(("AuthMethod", "None,CHAP"));
    let r = cont(m.handle(ctx, &req(0, 1, true, &pairs)));
    assert_eq!(r.bhs.flags() & flags::TRANSIT, 0);
    assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
    let r = cont(m.handle(ctx, &req(0, 1, false, &[("CHAP_A", algs)])));
    let a = get(&r, "CHAP_A").unwrap();
    let i: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
    let c = unhex(&get(&r, "CHAP_C").unwrap());
    (a, i, c)
}

#[test]
fn chap_md5_one_way() {
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let (a, i, c) = chap_start(&mut m, &mut ctx, "5");
    assert_eq!(a, "5");
    assert_eq!(c.len(), 16);
    let r = hex(&md5_resp(i, b"initiator-secret", &c));
    let resp = cont(m.handle(
        &mut ctx,
        &req(0, 1, true, &[("CHAP_N", "alice"), ("CHAP_R", &r)]),
    ));
    assert_eq!(resp.bhs.flags(), flags::TRANSIT | 1);
    assert!(resp.data.is_empty());
    let (_, o) = complete(m.handle(&mut ctx, &req(1, 3, true, &[])));
    assert_eq!(o.tsih, 0x1234);
}

#[test]
fn chap_sha256_mutual_base64() {
    let mut ctx = chap_ctx(true);
    let mut m = machine();
    // Unknown algorithms are skipped; the first supported one wins.
    let (a, i, c) = chap_start(&mut m, &mut ctx, "99,7,5");
    assert_eq!(a, "7");
    assert_eq!(c.len(), 32);
    let r = crate::chap::encode_base64(&sha256_resp(i, b"initiator-secret", &c));
    let my_c = [0xabu8; 20];
    let resp = cont(m.handle(
        &mut ctx,
        &req(
            0,
            1,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &r),
                ("CHAP_I", "0x2a"),
                ("CHAP_C", &hex(&my_c)),
            ],
        ),
    ));
    assert_eq!(resp.bhs.flags(), flags::TRANSIT | 1);
    assert_eq!(get(&resp, "CHAP_N").as_deref(), Some("tgt"));
    let tr = unhex(&get(&resp, "CHAP_R").unwrap());
    assert_eq!(tr, sha256_resp(42, b"target-secret-x", &my_c));
    complete(m.handle(&mut ctx, &req(1, 3, true, &[])));
}

#[test]
fn chap_md5_mutual_and_other_algorithms() {
    for (alg, len) in [("5", 16), ("6", 20), ("8", 32)] {
        let mut ctx = chap_ctx(true);
        let mut m = machine();
        let (a, i, c) = chap_start(&mut m, &mut ctx, alg);
        assert_eq!(a, alg);
        assert_eq!(c.len(), len);
        let code = alg.parse().unwrap();
        let alg_impl = crate::chap::ChapAlgorithm::from_code(code).unwrap();
        let r = if alg == "5" {
            md5_resp(i, b"initiator-secret", &c)
        } else {
            alg_impl.response(i, b"initiator-secret", &c)
        };
        let resp = cont(m.handle(
            &mut ctx,
            &req(
                0,
                1,
                false,
                &[
                    ("CHAP_N", "alice"),
                    ("CHAP_R", &hex(&r)),
                    ("CHAP_I", "3"),
                    ("CHAP_C", "0x0102030405060708"),
                ],
            ),
        ));
        // No T bit asked, none given; the mutual answer is there.
        assert_eq!(resp.bhs.flags(), 0);
        let tr = unhex(&get(&resp, "CHAP_R").unwrap());
        if alg == "5" {
            assert_eq!(
                tr,
                md5_resp(3, b"target-secret-x", &[1, 2, 3, 4, 5, 6, 7, 8])
            );
        }
        assert_eq!(tr.len(), len);
        let r = cont(m.handle(&mut ctx, &req(0, 1, true, &[])));
        assert_eq!(r.bhs.flags(), flags::TRANSIT | 1);
        complete(m.handle(&mut ctx, &req(1, 3, true, &[])));
    }
}

#[test]
fn chap_failures() {
    // Wrong secret.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let (_, i, c) = chap_start(&mut m, &mut ctx, "5");
    let r = hex(&md5_resp(i, b"wrong", &c));
    let s = failed(m.handle(
        &mut ctx,
        &req(0, 1, true, &[("CHAP_N", "alice"), ("CHAP_R", &r)]),
    ));
    assert_eq!(s, LoginStatus::AUTH_FAILURE);
    assert_eq!((s.class, s.detail), (2, 1));

    // Wrong user name.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let (_, i, c) = chap_start(&mut m, &mut ctx, "5");
    let r = hex(&md5_resp(i, b"initiator-secret", &c));
    let s = failed(m.handle(
        &mut ctx,
        &req(0, 1, true, &[("CHAP_N", "bob"), ("CHAP_R", &r)]),
    ));
    assert_eq!(s, LoginStatus::AUTH_FAILURE);

    // Reflected challenge.
    let mut ctx = chap_ctx(true);
    let mut m = machine();
    let (_, i, c) = chap_start(&mut m, &mut ctx, "5");
    let r = hex(&md5_resp(i, b"initiator-secret", &c));
    let s = failed(m.handle(
        &mut ctx,
        &req(
            0,
            1,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &r),
                ("CHAP_I", "1"),
                ("CHAP_C", &hex(&c)),
            ],
        ),
    ));
    assert_eq!(s, LoginStatus::AUTH_FAILURE);

    // Mutual asked, no target secret configured.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let (_, i, c) = chap_start(&mut m, &mut ctx, "5");
    let r = hex(&md5_resp(i, b"initiator-secret", &c));
    let s = failed(m.handle(
        &mut ctx,
        &req(
            0,
            1,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &r),
                ("CHAP_I", "1"),
                ("CHAP_C", "0x0102"),
            ],
        ),
    ));
    assert_eq!(s, LoginStatus::AUTH_FAILURE);

    // No supported algorithm.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let mut pairs = names();
    pairs.push(("AuthMethod", "CHAP"));
    cont(m.handle(&mut ctx, &req(0, 1, false, &pairs)));
    let s = failed(m.handle(&mut ctx, &req(0, 1, false, &[("CHAP_A", "1,2,3")])));
    assert_eq!(s, LoginStatus::AUTH_FAILURE);

    // CHAP required, initiator offers only None.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let mut pairs = names();
    pairs.push(("AuthMethod", "None"));
    assert_eq!(
        failed(m.handle(&mut ctx, &req(0, 1, true, &pairs))),
        LoginStatus::AUTH_FAILURE
    );

    // CHAP required, initiator skips the security stage.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    assert_eq!(
        failed(m.handle(&mut ctx, &req(1, 3, true, &names()))),
        LoginStatus::AUTH_FAILURE
    );

    // CHAP required, initiator asks to leave without AuthMethod.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    assert_eq!(
        failed(m.handle(&mut ctx, &req(0, 1, true, &names()))),
        LoginStatus::AUTH_FAILURE
    );

    // Same secret both ways is refused.
    let mut ctx = chap_ctx(true);
    ctx.chap.target = Some(("tgt".into(), "initiator-secret".into()));
    let mut m = machine();
    let (_, i, c) = chap_start(&mut m, &mut ctx, "5");
    let r = hex(&md5_resp(i, b"initiator-secret", &c));
    let s = failed(m.handle(
        &mut ctx,
        &req(
            0,
            1,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &r),
                ("CHAP_I", "1"),
                ("CHAP_C", "0x0102"),
            ],
        ),
    ));
    assert_eq!(s, LoginStatus::AUTH_FAILURE);

    // Security keys renegotiated after authentication.
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let (_, i, c) = chap_start(&mut m, &mut ctx, "5");
    let r = hex(&md5_resp(i, b"initiator-secret", &c));
    cont(m.handle(
        &mut ctx,
        &req(0, 1, false, &[("CHAP_N", "alice"), ("CHAP_R", &r)]),
    ));
    assert_eq!(
        failed(m.handle(&mut ctx, &req(0, 1, true, &[("CHAP_A", "5")]))),
        LoginStatus::INITIATOR_ERROR
    );
}

#[test]
fn chap_transit_withheld_until_done() {
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    let mut pairs = names();
    pairs.push(("AuthMethod", "CHAP"));
    pairs.push(("CHAP_A", "5"));
    // AuthMethod and CHAP_A in one request, T asked: challenge, no T.
    let r = cont(m.handle(&mut ctx, &req(0, 1, true, &pairs)));
    assert_eq!(r.bhs.flags(), 0);
    assert!(get(&r, "CHAP_C").is_some());
}

// ---- naming, ACL, instatement ----

/// Every response of a CHAP login that sends `secret` as CHAP_R, in
/// order; the last one is the failure (or the transition) it ends with.
fn chap_transcript(ctx: &mut Ctx, secret: &[u8]) -> Vec<Pdu> {
    let mut m = machine();
    let mut out = Vec::new();
    let mut pairs = names();
    pairs.push(("AuthMethod", "CHAP"));
    let steps: [Pdu; 2] = [
        req(0, 1, false, &pairs),
        req(0, 1, false, &[("CHAP_A", "5")]),
    ];
    for p in &steps {
        out.push(cont(m.handle(ctx, p)));
    }
    let i: u8 = get(&out[1], "CHAP_I").unwrap().parse().unwrap();
    let c = unhex(&get(&out[1], "CHAP_C").unwrap());
    let r = hex(&md5_resp(i, secret, &c));
    let last = req(0, 1, true, &[("CHAP_N", "alice"), ("CHAP_R", &r)]);
    match m.handle(ctx, &last) {
        LoginStep::Continue(mut v) => out.push(v.remove(0)),
        LoginStep::Failed(p) => out.push(p),
        other => panic!("unexpected {other:?}"),
    }
    out
}

#[test]
fn with_chap_unknown_target_and_acl_fail_like_a_wrong_secret() {
    let chap = || Ctx {
        alias: Some("Disk One".into()),
        ..chap_ctx(false)
    };
    let wrong = chap_transcript(&mut chap(), b"not-the-secret!");
    let unknown = chap_transcript(
        &mut Ctx {
            targets: vec![],
            ..chap()
        },
        b"initiator-secret",
    );
    let denied = chap_transcript(
        &mut Ctx {
            denied: vec![INIT],
            ..chap()
        },
        b"initiator-secret",
    );
    let fail = wrong.last().unwrap();
    assert_eq!(fail.bhs.login_status(), (2, 1));
    // Same PDUs, byte for byte, at every step (the test context's
    // "random" numbers repeat, so StatSN and challenges match too).
    for other in [&unknown, &denied] {
        assert_eq!(other.len(), wrong.len());
        for (a, b) in wrong.iter().zip(other.iter()) {
            assert_eq!(a.bhs.0, b.bhs.0);
            assert_eq!(a.data, b.data);
        }
    }
    // Nothing in the first answer tells the target exists.
    assert_eq!(get(&wrong[0], "TargetAlias"), None);
    // The right secret still logs in, and learns the alias once
    // authenticated.
    let ok = chap_transcript(&mut chap(), b"initiator-secret");
    let last = ok.last().unwrap();
    assert_eq!(last.bhs.login_status(), (0, 0));
    assert_eq!(get(last, "TargetAlias").as_deref(), Some("Disk One"));
    assert_eq!(get(&ok[0], "TargetAlias"), None);
}

#[test]
fn failure_and_initiator_name_are_reported() {
    let mut ctx = chap_ctx(false);
    let mut m = machine();
    assert_eq!(m.initiator_name(), None);
    let mut pairs = names();
    pairs.push(("AuthMethod", "None"));
    failed(m.handle(&mut ctx, &req(0, 1, true, &pairs)));
    assert_eq!(m.failure(), Some(LoginStatus::AUTH_FAILURE));
    assert_eq!(m.initiator_name(), Some(INIT));
}

#[test]
fn first_request_checks() {
    type Case = (Ctx, Vec<(&'static str, &'static str)>, LoginStatus);
    let cases: Vec<Case> = vec![
        (
            Ctx {
                denied: vec![INIT],
                ..Ctx::default()
            },
            names(),
            LoginStatus::AUTHORIZATION_FAILURE,
        ),
        (
            Ctx {
                targets: vec![],
                ..Ctx::default()
            },
            names(),
            LoginStatus::NOT_FOUND,
        ),
        (
            Ctx::default(),
            vec![("TargetName", TGT)],
            LoginStatus::MISSING_PARAMETER,
        ),
        (
            Ctx::default(),
            vec![("InitiatorName", INIT)],
            LoginStatus::MISSING_PARAMETER,
        ),
        (
            Ctx::default(),
            vec![("InitiatorName", INIT), ("SessionType", "Bogus")],
            LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
        ),
    ];
    let codes = [0x0202u16, 0x0203, 0x0207, 0x0207, 0x0209];
    for ((mut ctx, pairs, want), code) in cases.into_iter().zip(codes) {
        let mut m = machine();
        let s = failed(m.handle(&mut ctx, &req(1, 3, true, &pairs)));
        assert_eq!(s, want);
        assert_eq!(u16::from(s.class) << 8 | u16::from(s.detail), code);
        assert!(ctx.instated.is_empty());
    }
}

#[test]
fn unsupported_version_and_instate_error() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    let mut p = req(1, 3, true, &names());
    p.bhs.0[2] = 2;
    p.bhs.0[3] = 1;
    assert_eq!(
        failed(m.handle(&mut ctx, &p)),
        LoginStatus::UNSUPPORTED_VERSION
    );

    let mut ctx = Ctx {
        instate_result: Err(LoginStatus::SESSION_DOES_NOT_EXIST),
        ..Ctx::default()
    };
    let mut m = machine();
    let mut p = req(1, 3, true, &names());
    p.bhs.set_tsih(9);
    let resp = match m.handle(&mut ctx, &p) {
        LoginStep::Failed(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(resp.bhs.login_status(), (2, 0x0a));
    // TSIH stays as given on failure.
    assert_eq!(resp.bhs.tsih(), 9);
    assert_eq!(ctx.instated[0].tsih, 9);
}

// ---- malformed input ----

#[test]
fn malformed_requests_fail_with_initiator_error() {
    let good = || req(1, 3, false, &names());
    let mut cases: Vec<Vec<Pdu>> = Vec::new();
    // Wrong opcode.
    let mut p = good();
    p.bhs.0[0] = opcode::TEXT_REQ;
    cases.push(vec![p]);
    // NSG=2 with T, CSG=3 at the start, T with C.
    cases.push(vec![req(0, 2, true, &names())]);
    cases.push(vec![req(3, 3, true, &names())]);
    cases.push(vec![raw(
        1,
        3,
        flags::TRANSIT | flags::CONTINUE,
        kvbytes(&names()),
    )]);
    // T with NSG not beyond CSG.
    cases.push(vec![req(1, 1, true, &names())]);
    // Non-UTF-8, no '=', empty key.
    cases.push(vec![raw(1, 3, 0, b"InitiatorName=\xff\0".to_vec())]);
    cases.push(vec![raw(1, 3, 0, b"InitiatorName\0".to_vec())]);
    cases.push(vec![raw(1, 3, 0, b"=x\0".to_vec())]);
    // Repeated key in one request.
    let mut pairs = names();
    pairs.push(("MaxBurstLength", "4096"));
    pairs.push(("MaxBurstLength", "8192"));
    cases.push(vec![req(1, 3, false, &pairs)]);
    // Key renegotiated in a later request.
    let mut pairs = names();
    pairs.push(("MaxBurstLength", "4096"));
    cases.push(vec![
        req(1, 3, false, &pairs),
        req(1, 3, false, &[("MaxBurstLength", "8192")]),
    ]);
    // Stage jump backwards.
    let mut pairs = names();
    pairs.push(("AuthMethod", "None"));
    cases.push(vec![req(0, 1, true, &pairs), req(0, 1, true, &[])]);
    // Stage jump forwards without a granted transition.
    cases.push(vec![req(0, 1, false, &names()), req(1, 3, true, &[])]);
    // Operational key in the security stage; security key in operational.
    let mut pairs = names();
    pairs.push(("MaxBurstLength", "4096"));
    cases.push(vec![req(0, 1, false, &pairs)]);
    let mut pairs = names();
    pairs.push(("AuthMethod", "None"));
    cases.push(vec![req(1, 3, false, &pairs)]);
    // ITT, CmdSN, ISID, CID changes.
    for (off, len) in [(16usize, 4usize), (24, 4), (8, 6), (20, 2)] {
        let mut p = req(1, 3, true, &[]);
        p.bhs.0[off + len - 1] ^= 1;
        cases.push(vec![good(), p]);
    }
    // A different InitiatorName later.
    cases.push(vec![
        good(),
        req(1, 3, true, &[("InitiatorName", "iqn.x:other")]),
    ]);
    for (n, case) in cases.into_iter().enumerate() {
        let mut ctx = Ctx::default();
        let mut m = machine();
        let last = case.len() - 1;
        for (i, p) in case.into_iter().enumerate() {
            let s = m.handle(&mut ctx, &p);
            if i < last {
                cont(s);
            } else {
                assert_eq!(failed(s), LoginStatus::INITIATOR_ERROR, "case {n}");
            }
        }
    }
}

#[test]
fn same_names_may_be_repeated_and_mrdsl_redeclared() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    let mut pairs = names();
    pairs.push(("MaxRecvDataSegmentLength", "16384"));
    cont(m.handle(&mut ctx, &req(1, 3, false, &pairs)));
    let mut pairs = names();
    pairs.push(("MaxRecvDataSegmentLength", "32768"));
    pairs.push(("TargetAlias", "ignored"));
    let (_, o) = complete(m.handle(&mut ctx, &req(1, 3, true, &pairs)));
    assert_eq!(o.conn.max_xmit_data_segment_length, 32768);
}

#[test]
fn login_pdu_limit() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    cont(m.handle(&mut ctx, &req(1, 3, false, &names())));
    for _ in 1..state::LOGIN_PDUS_MAX {
        cont(m.handle(&mut ctx, &req(1, 3, false, &[])));
    }
    assert_eq!(
        failed(m.handle(&mut ctx, &req(1, 3, false, &[]))),
        LoginStatus::INITIATOR_ERROR
    );
}

// ---- continuation ----

#[test]
fn request_continuation() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    let mut pairs = names();
    pairs.push(("MaxBurstLength", "65536"));
    let whole = kvbytes(&pairs);
    let pieces: Vec<&[u8]> = vec![&whole[..10], &whole[10..30], &whole[30..]];
    let r = cont(m.handle(&mut ctx, &raw(1, 3, flags::CONTINUE, pieces[0].to_vec())));
    assert!(r.data.is_empty());
    assert_eq!(r.bhs.flags(), 1 << 2);
    let r = cont(m.handle(&mut ctx, &raw(1, 3, flags::CONTINUE, pieces[1].to_vec())));
    assert!(r.data.is_empty());
    let (r, o) = complete(m.handle(&mut ctx, &raw(1, 3, flags::TRANSIT, pieces[2].to_vec())));
    // The TPGT rides on the first response after the request completed.
    assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("7"));
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("65536"));
    assert_eq!(o.session.max_burst_length, 65536);
}

#[test]
fn response_continuation() {
    let mut ctx = Ctx::default();
    let mut m = machine();
    let unknown: Vec<String> = (0..500)
        .map(|i| format!("X-com.example.key-number-{i:05}"))
        .collect();
    let mut pairs = names();
    for k in &unknown {
        pairs.push((k.as_str(), "1"));
    }
    let mut r = m.handle(&mut ctx, &req(1, 3, true, &pairs));
    let mut all = Vec::new();
    let mut pieces = 0;
    let outcome = loop {
        match r {
            LoginStep::Continue(v) => {
                let p = &v[0];
                assert!(p.data.len() <= 8192);
                assert_eq!(p.bhs.flags() & flags::CONTINUE, flags::CONTINUE);
                assert_eq!(p.bhs.flags() & flags::TRANSIT, 0);
                all.extend_from_slice(&p.data);
                pieces += 1;
                r = m.handle(&mut ctx, &req(1, 3, true, &[]));
            }
            LoginStep::Complete { responses, outcome } => {
                let p = &responses[0];
                assert_eq!(p.bhs.flags() & flags::CONTINUE, 0);
                all.extend_from_slice(&p.data);
                break outcome;
            }
            LoginStep::Failed(p) => panic!("{:?}", p.bhs.login_status()),
        }
    };
    assert!(pieces >= 2);
    let kv = text::parse(&all).unwrap();
    let nu: Vec<_> = kv.iter().filter(|(_, v)| v == "NotUnderstood").collect();
    assert_eq!(nu.len(), 500);
    assert_eq!(outcome.tsih, 0x1234);
    assert_eq!(ctx.instated.len(), 1);

    // Data in a fetch request is an error.
    let mut ctx = Ctx::default();
    let mut m = machine();
    cont(m.handle(&mut ctx, &req(1, 3, true, &pairs)));
    assert_eq!(
        failed(m.handle(&mut ctx, &req(1, 3, true, &[("X-a", "1")]))),
        LoginStatus::INITIATOR_ERROR
    );
}

// ---- proposals of our own ----

#[test]
fn target_proposes_keys_its_limits_need() {
    let limits = TargetLimits {
        max_burst_length: 65536,
        first_burst_length: 16384,
        immediate_data: false,
        ..TargetLimits::default()
    };
    let mut ctx = Ctx::default();
    let mut m = LoginMachine::new(limits.clone(), Transport::Tcp);
    let mut pairs = names();
    pairs.push(("AuthMethod", "None"));
    // Security -> full feature asked; we steer through the operational
    // stage because defaults exceed our limits.
    let r = cont(m.handle(&mut ctx, &req(0, 3, true, &pairs)));
    assert_eq!(r.bhs.flags(), flags::TRANSIT | 1);
    let r = cont(m.handle(&mut ctx, &req(1, 3, true, &[])));
    assert_eq!(r.bhs.flags() & flags::TRANSIT, 0);
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("65536"));
    assert_eq!(get(&r, "ImmediateData").as_deref(), Some("No"));
    assert_eq!(get(&r, "FirstBurstLength").as_deref(), Some("16384"));
    let (r, o) = complete(m.handle(
        &mut ctx,
        &req(
            1,
            3,
            true,
            &[
                ("MaxBurstLength", "32768"),
                ("ImmediateData", "No"),
                ("FirstBurstLength", "16384"),
            ],
        ),
    ));
    // Answers to our proposals are not answered again.
    assert!(r.data.is_empty());
    assert_eq!(o.session.max_burst_length, 32768);
    assert!(!o.session.immediate_data);
    assert_eq!(o.session.first_burst_length, 16384);

    // Offered by the initiator instead: no proposals needed.
    let mut ctx = Ctx::default();
    let mut m = LoginMachine::new(limits, Transport::Tcp);
    let mut pairs = names();
    pairs.extend([
        ("MaxBurstLength", "262144"),
        ("ImmediateData", "Yes"),
        ("InitialR2T", "No"),
        ("FirstBurstLength", "65536"),
    ]);
    let (r, o) = complete(m.handle(&mut ctx, &req(1, 3, true, &pairs)));
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("65536"));
    assert_eq!(get(&r, "ImmediateData").as_deref(), Some("No"));
    assert_eq!(get(&r, "FirstBurstLength").as_deref(), Some("16384"));
    assert_eq!(o.session.max_burst_length, 65536);
}

// ---- the key table ----

struct Row {
    transport: Transport,
    discovery: bool,
    key: &'static str,
    value: &'static str,
    /// None: no answer expected.
    answer: Option<&'static str>,
    check: fn(&SessionParams, &ConnParams) -> bool,
}

fn ok(_: &SessionParams, _: &ConnParams) -> bool {
    true
}

macro_rules! rows {
    ($( $t:ident $d:literal $k:literal = $v:literal => $a:expr, $c:expr; )*) => {
        vec![$( Row {
            transport: Transport::$t,
            discovery: $d,
            key: $k,
            value: $v,
            answer: $a,
            check: $c,
        }, )*]
    };
}

#[test]
fn key_table() {
    let rows: Vec<Row> = rows![
        Tcp false "HeaderDigest" = "CRC32C,None" => Some("CRC32C"), |_, c| c.header_digest;
        Tcp false "HeaderDigest" = "None,CRC32C" => Some("None"), |_, c| !c.header_digest;
        Tcp false "DataDigest" = "X-foo,CRC32C" => Some("CRC32C"), |_, c| c.data_digest;
        Tcp false "DataDigest" = "X-foo" => Some("Reject"), |_, c| !c.data_digest;
        Iser false "HeaderDigest" = "CRC32C,None" => Some("None"), |_, c| !c.header_digest;
        Iser false "DataDigest" = "CRC32C" => Some("Reject"), |_, c| !c.data_digest;
        Tcp false "MaxConnections" = "8" => Some("1"), |s, _| s.max_connections == 1;
        Tcp false "MaxConnections" = "0" => Some("Reject"), ok;
        Tcp false "MaxConnections" = "65536" => Some("Reject"), ok;
        Tcp false "InitialR2T" = "No" => Some("No"), |s, _| !s.initial_r2t;
        Tcp false "InitialR2T" = "Yes" => Some("Yes"), |s, _| s.initial_r2t;
        Tcp false "InitialR2T" = "yes" => Some("Reject"), |s, _| s.initial_r2t;
        Tcp false "ImmediateData" = "No" => Some("No"), |s, _| !s.immediate_data;
        Tcp false "ImmediateData" = "Yes" => Some("Yes"), |s, _| s.immediate_data;
        Tcp false "MaxRecvDataSegmentLength" = "65536" => None, |_, c| c.max_xmit_data_segment_length == 65536;
        Tcp false "MaxRecvDataSegmentLength" = "511" => Some("Reject"), |_, c| c.max_xmit_data_segment_length == 8192;
        Tcp false "MaxRecvDataSegmentLength" = "16777216" => Some("Reject"), ok;
        Tcp false "MaxBurstLength" = "1048576" => Some("1048576"), |s, _| s.max_burst_length == 1_048_576;
        Tcp false "MaxBurstLength" = "16777215" => Some("16777215"), |s, _| s.max_burst_length == 16_777_215;
        Tcp false "MaxBurstLength" = "0x1000" => Some("4096"), |s, _| s.max_burst_length == 4096 && s.first_burst_length == 4096;
        Tcp false "MaxBurstLength" = "511" => Some("Reject"), |s, _| s.max_burst_length == 262_144;
        Tcp false "MaxBurstLength" = "16777216" => Some("Reject"), ok;
        Tcp false "MaxBurstLength" = "-1" => Some("Reject"), ok;
        Tcp false "FirstBurstLength" = "1048576" => Some("262144"), |s, _| s.first_burst_length == 262_144;
        Tcp false "FirstBurstLength" = "4096" => Some("4096"), |s, _| s.first_burst_length == 4096;
        Tcp false "FirstBurstLength" = "100" => Some("Reject"), |s, _| s.first_burst_length == 65536;
        Tcp false "DefaultTime2Wait" = "0" => Some("2"), |s, _| s.default_time2wait == 2;
        Tcp false "DefaultTime2Wait" = "10" => Some("10"), |s, _| s.default_time2wait == 10;
        Tcp false "DefaultTime2Wait" = "3601" => Some("Reject"), ok;
        Tcp false "DefaultTime2Retain" = "60" => Some("20"), |s, _| s.default_time2retain == 20;
        Tcp false "DefaultTime2Retain" = "0" => Some("0"), |s, _| s.default_time2retain == 0;
        Tcp false "MaxOutstandingR2T" = "1" => Some("1"), |s, _| s.max_outstanding_r2t == 1;
        Tcp false "MaxOutstandingR2T" = "64" => Some("16"), |s, _| s.max_outstanding_r2t == 16;
        Tcp false "MaxOutstandingR2T" = "0" => Some("Reject"), ok;
        Tcp false "DataPDUInOrder" = "No" => Some("Yes"), |s, _| s.data_pdu_in_order;
        Tcp false "DataSequenceInOrder" = "No" => Some("Yes"), |s, _| s.data_sequence_in_order;
        Tcp false "ErrorRecoveryLevel" = "2" => Some("0"), |s, _| s.error_recovery_level == 0;
        Tcp false "ErrorRecoveryLevel" = "3" => Some("Reject"), ok;
        Tcp false "OFMarker" = "Yes" => Some("No"), ok;
        Tcp false "IFMarker" = "No" => Some("No"), ok;
        Tcp false "OFMarkInt" = "2048~8192" => Some("Irrelevant"), ok;
        Tcp false "IFMarkInt" = "1~65535" => Some("Irrelevant"), ok;
        Tcp false "TaskReporting" = "FastAbort,RFC3720" => Some("RFC3720"), ok;
        Tcp false "TaskReporting" = "FastAbort" => Some("Reject"), ok;
        Tcp false "iSCSIProtocolLevel" = "2" => Some("1"), ok;
        Tcp false "iSCSIProtocolLevel" = "0" => Some("0"), ok;
        Tcp false "iSCSIProtocolLevel" = "32" => Some("Reject"), ok;
        Tcp false "RDMAExtensions" = "Yes" => Some("No"), ok;
        Iser false "RDMAExtensions" = "Yes" => Some("Yes"), ok;
        Tcp false "TargetRecvDataSegmentLength" = "8192" => Some("Irrelevant"), ok;
        Tcp false "InitiatorRecvDataSegmentLength" = "8192" => Some("Irrelevant"), ok;
        Tcp false "iSERHelloRequired" = "No" => Some("Irrelevant"), ok;
        Iser false "TargetRecvDataSegmentLength" = "1048576" => Some("262144"), |_, c| c.max_recv_data_segment_length == 262_144;
        Iser false "InitiatorRecvDataSegmentLength" = "65536" => Some("65536"), |_, c| c.max_xmit_data_segment_length == 65536;
        Iser false "InitiatorRecvDataSegmentLength" = "100" => Some("Reject"), |_, c| c.max_xmit_data_segment_length == 8192;
        Iser false "MaxRecvDataSegmentLength" = "65536" => None, |_, c| c.max_xmit_data_segment_length == 8192;
        Iser false "MaxAHSLength" = "2048" => Some("1020"), ok;
        Iser false "TaggedBufferForSolicitedDataOnly" = "No" => Some("No"), ok;
        Iser false "iSERHelloRequired" = "Yes" => Some("Reject"), ok;
        Iser false "iSERHelloRequired" = "No" => Some("No"), ok;
        Iser false "MaxOutstandingUnexpectedPDUs" = "16" => None, ok;
        Iser false "MaxOutstandingUnexpectedPDUs" = "1" => Some("Reject"), ok;
        Tcp true "MaxBurstLength" = "4096" => Some("Irrelevant"), |s, _| s.max_burst_length == 262_144;
        Tcp true "FirstBurstLength" = "4096" => Some("Irrelevant"), ok;
        Tcp true "InitialR2T" = "No" => Some("Irrelevant"), |s, _| s.initial_r2t;
        Tcp true "ImmediateData" = "No" => Some("Irrelevant"), |s, _| s.immediate_data;
        Tcp true "MaxOutstandingR2T" = "4" => Some("Irrelevant"), ok;
        Tcp true "DataPDUInOrder" = "No" => Some("Irrelevant"), ok;
        Tcp true "DataSequenceInOrder" = "No" => Some("Irrelevant"), ok;
        Tcp true "MaxConnections" = "2" => Some("Irrelevant"), ok;
        Tcp true "TaskReporting" = "RFC3720" => Some("Irrelevant"), ok;
        Tcp true "ErrorRecoveryLevel" = "1" => Some("0"), ok;
        Tcp true "DefaultTime2Retain" = "5" => Some("5"), |s, _| s.default_time2retain == 5;
        Tcp false "X-com.example.foo" = "1" => Some("NotUnderstood"), ok;
        Tcp false "InitialR2T" = "NotUnderstood" => None, |s, _| s.initial_r2t;
    ];
    for r in rows {
        let mut n = Negotiator::new(TargetLimits::default(), r.transport);
        n.set_discovery(r.discovery);
        let mut out = Vec::new();
        n.offer(r.key, r.value, &mut out).unwrap();
        n.end_request(&mut out);
        let got = text::parse(&out).unwrap();
        match r.answer {
            Some(a) => assert_eq!(
                got,
                vec![(r.key.to_string(), a.to_string())],
                "{} {}={}",
                if r.discovery { "discovery" } else { "normal" },
                r.key,
                r.value
            ),
            None => assert!(got.is_empty(), "{}={}: {got:?}", r.key, r.value),
        }
        let (s, c) = n.results();
        assert!((r.check)(&s, &c), "{}={}: {s:?} {c:?}", r.key, r.value);
        assert!(s.first_burst_length <= s.max_burst_length);
    }
}

#[test]
fn first_burst_irrelevant_without_unsolicited_data() {
    let limits = TargetLimits {
        initial_r2t: true,
        ..TargetLimits::default()
    };
    let mut n = Negotiator::new(limits, Transport::Tcp);
    let mut out = Vec::new();
    // FirstBurstLength before the keys that make it irrelevant.
    n.offer("FirstBurstLength", "8192", &mut out).unwrap();
    n.offer("InitialR2T", "No", &mut out).unwrap();
    n.offer("ImmediateData", "No", &mut out).unwrap();
    n.end_request(&mut out);
    let got = text::parse(&out).unwrap();
    assert_eq!(got[0], ("InitialR2T".into(), "Yes".into()));
    assert_eq!(got[2], ("FirstBurstLength".into(), "Irrelevant".into()));
}

#[test]
fn defaults_when_nothing_negotiated() {
    for t in [Transport::Tcp, Transport::Iser] {
        let n = Negotiator::new(TargetLimits::default(), t);
        let (s, c) = n.results();
        assert_eq!(s, SessionParams::default());
        assert_eq!(
            c,
            ConnParams {
                transport: t,
                ..ConnParams::default()
            }
        );
    }
}

// ---- properties ----

mod prop {
    use super::*;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
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
        "OFMarkInt",
        "TaskReporting",
        "iSCSIProtocolLevel",
        "RDMAExtensions",
        "TargetRecvDataSegmentLength",
        "InitiatorRecvDataSegmentLength",
        "MaxAHSLength",
        "TaggedBufferForSolicitedDataOnly",
        "iSERHelloRequired",
        "MaxOutstandingUnexpectedPDUs",
        "InitiatorName",
        "TargetName",
        "SessionType",
        "AuthMethod",
        "CHAP_A",
        "CHAP_N",
        "CHAP_R",
        "CHAP_I",
        "CHAP_C",
        "SendTargets",
        "X-foo",
    ];

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(KEYS).prop_map(str::to_string),
            "[A-Za-z_#.-]{1,20}",
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Yes".to_string()),
            Just("No".to_string()),
            Just("None".to_string()),
            Just("CRC32C,None".to_string()),
            Just("Reject".to_string()),
            Just("Irrelevant".to_string()),
            Just("Discovery".to_string()),
            Just("CHAP,None".to_string()),
            Just("5,7".to_string()),
            (0u64..20_000_000).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| format!("0x{n:x}")),
            "[ -~]{0,40}",
        ]
    }

    fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((key(), value()), 0..12)
    }

    proptest! {
        #[test]
        fn negotiation_never_panics(
            reqs in proptest::collection::vec(pairs(), 1..4),
            iser in any::<bool>(),
            discovery in any::<bool>(),
            mbl in 0u32..20_000_000,
            fbl in 0u32..20_000_000,
            imm in any::<bool>(),
        ) {
            let limits = TargetLimits {
                max_burst_length: mbl,
                first_burst_length: fbl,
                immediate_data: imm,
                ..TargetLimits::default()
            };
            let t = if iser { Transport::Iser } else { Transport::Tcp };
            let mut n = Negotiator::new(limits, t);
            n.set_discovery(discovery);
            for req in reqs {
                let mut out = Vec::new();
                for (k, v) in &req {
                    if n.offer(k, v, &mut out).is_err() {
                        break;
                    }
                }
                n.end_request(&mut out);
                n.declare(&mut out);
                n.propose(&mut out);
                prop_assert!(text::parse(&out).is_ok());
            }
            let (s, c) = n.results();
            prop_assert!(s.first_burst_length <= s.max_burst_length);
            prop_assert!((512..=16_777_215).contains(&s.max_burst_length));
            prop_assert!((512..=16_777_215).contains(&c.max_recv_data_segment_length));
            prop_assert!((512..=16_777_215).contains(&c.max_xmit_data_segment_length));
            if iser {
                prop_assert!(!c.header_digest && !c.data_digest);
            }
        }

        #[test]
        fn machine_never_panics_on_arbitrary_pdus(
            pdus in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 48),
                 proptest::collection::vec(any::<u8>(), 0..300)),
                1..8),
        ) {
            let mut ctx = chap_ctx(true);
            let mut m = machine();
            for (bhs, data) in pdus {
                let mut b = Bhs::default();
                b.0.copy_from_slice(&bhs);
                let p = Pdu { bhs: b, ahs: Vec::new(), data };
                check(m.handle(&mut ctx, &p))?;
            }
        }

        #[test]
        fn machine_never_panics_on_plausible_logins(
            steps in proptest::collection::vec(
                (0u8..4, 0u8..4, 0u8..4, pairs()),
                1..10),
            chap in any::<bool>(),
        ) {
            let mut ctx = if chap { chap_ctx(true) } else { Ctx::default() };
            let mut m = machine();
            let mut first = true;
            for (csg, nsg, fl, mut kv) in steps {
                if first {
                    kv.insert(0, ("InitiatorName".into(), INIT.into()));
                    kv.insert(1, ("TargetName".into(), TGT.into()));
                    first = false;
                }
                let refs: Vec<(&str, &str)> =
                    kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let p = raw(csg, nsg, (fl & 3) << 6, kvbytes(&refs));
                if check(m.handle(&mut ctx, &p))? {
                    break;
                }
            }
            prop_assert!(ctx.instated.len() <= 1);
        }
    }

    /// Every step answers with Login Responses within the login segment
    /// size; true when the login ended.
    fn check(s: LoginStep) -> Result<bool, TestCaseError> {
        let (ps, end): (Vec<Pdu>, bool) = match s {
            LoginStep::Continue(v) => (v, false),
            LoginStep::Complete { responses, .. } => (responses, true),
            LoginStep::Failed(p) => {
                prop_assert!(p.data.is_empty());
                prop_assert!(p.bhs.login_status().0 != 0);
                (vec![p], true)
            }
        };
        for p in ps {
            prop_assert_eq!(p.bhs.opcode(), opcode::LOGIN_RESP);
            prop_assert!(p.data.len() <= 8192);
            prop_assert_eq!(p.bhs.data_segment_len() as usize, p.data.len());
            let f = p.bhs.flags();
            prop_assert!(!(f & flags::TRANSIT != 0 && f & flags::CONTINUE != 0));
        }
        Ok(end)
    }
}
