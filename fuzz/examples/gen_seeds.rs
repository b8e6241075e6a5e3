//! Writes the committed seed corpus under fuzz/seeds/<target>/ and checks
//! that each login seed really gets where it is meant to.
//!
//!     cd fuzz && cargo run --example gen_seeds
//!
//! Seeds are real PDUs: a Login Request, a SCSI READ(10), a WRITE(10) with
//! its Data-Out, a NOP-Out, Text SendTargets, task management and Logout,
//! wrapped in the step format of `iscsi_fuzz` for the connection targets.

use std::path::Path;

use iscsi::pdu::{flags, opcode, Encoder, Pdu};
use iscsi::text;
use iscsi_fuzz::{
    config, scripted_login, Driver, FuzzCtx, Input, INITIATOR, LOGIN_CMDSN, TARGET_OPEN,
};

fn login_req() -> Pdu {
    let mut p = Pdu::new(opcode::LOGIN_REQ);
    p.bhs.set_immediate(true);
    p.bhs.set_flags(flags::TRANSIT | (1 << 2) | 3);
    p.bhs.set_isid(0x8000_0000_0001);
    p.bhs.set_itt(1);
    p.bhs.set_u16_at(20, 1);
    p.bhs.set_u32_at(24, LOGIN_CMDSN);
    text::push(&mut p.data, "InitiatorName", INITIATOR);
    text::push(&mut p.data, "TargetName", TARGET_OPEN);
    text::push(&mut p.data, "SessionType", "Normal");
    text::push(&mut p.data, "HeaderDigest", "None");
    text::push(&mut p.data, "DataDigest", "None");
    text::push(&mut p.data, "MaxRecvDataSegmentLength", "8192");
    text::push(&mut p.data, "ImmediateData", "Yes");
    text::push(&mut p.data, "InitialR2T", "Yes");
    p
}

fn scsi_cmd(cmdsn: u32, itt: u32, write: bool, blocks: u16, imm: &[u8]) -> Pdu {
    let mut p = Pdu::new(opcode::SCSI_CMD);
    let dir = if write { flags::WRITE } else { flags::READ };
    p.bhs.set_flags(flags::FINAL | dir | 1);
    p.bhs.set_itt(itt);
    p.bhs.set_u32_at(20, blocks as u32 * 512);
    p.bhs.set_u32_at(24, cmdsn);
    p.bhs.0[32] = if write { 0x2a } else { 0x28 };
    p.bhs.0[39..41].copy_from_slice(&blocks.to_be_bytes());
    p.data = imm.to_vec();
    p
}

fn data_out(itt: u32, ttt: u32, datasn: u32, offset: u32, len: usize) -> Pdu {
    let mut p = Pdu::new(opcode::DATA_OUT);
    p.bhs.set_flags(flags::FINAL);
    p.bhs.set_itt(itt);
    p.bhs.set_ttt(ttt);
    p.bhs.set_datasn(datasn);
    p.bhs.set_buffer_offset(offset);
    p.data = vec![0xa5; len];
    p
}

fn nop_out(cmdsn: u32, itt: u32) -> Pdu {
    let mut p = Pdu::new(opcode::NOP_OUT);
    p.bhs.set_immediate(true);
    p.bhs.set_flags(flags::FINAL);
    p.bhs.set_itt(itt);
    p.bhs.set_ttt(0xffff_ffff);
    p.bhs.set_u32_at(24, cmdsn);
    p.data = b"ping".to_vec();
    p
}

fn text_req(cmdsn: u32, itt: u32) -> Pdu {
    let mut p = Pdu::new(opcode::TEXT_REQ);
    p.bhs.set_flags(flags::FINAL);
    p.bhs.set_itt(itt);
    p.bhs.set_ttt(0xffff_ffff);
    p.bhs.set_u32_at(24, cmdsn);
    text::push(&mut p.data, "SendTargets", "All");
    p
}

fn tmf(cmdsn: u32, itt: u32, func: u8, rtt: u32) -> Pdu {
    let mut p = Pdu::new(opcode::TASK_MGMT_REQ);
    p.bhs.set_immediate(true);
    p.bhs.set_flags(flags::FINAL | func);
    p.bhs.set_itt(itt);
    p.bhs.set_u32_at(20, rtt);
    p.bhs.set_u32_at(24, cmdsn);
    p.bhs.set_u32_at(32, cmdsn);
    p
}

fn logout(cmdsn: u32, itt: u32) -> Pdu {
    let mut p = Pdu::new(opcode::LOGOUT_REQ);
    p.bhs.set_immediate(true);
    p.bhs.set_flags(flags::FINAL);
    p.bhs.set_itt(itt);
    p.bhs.set_u16_at(20, 1);
    p.bhs.set_u32_at(24, cmdsn);
    p
}

/// Wire form with the given digests.
fn wire(p: &Pdu, hd: bool, dd: bool) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder {
        header_digest: hd,
        data_digest: dd,
    }
    .encode(p, &mut out);
    out
}

/// A raw-PDU step: control byte 0, then BHS, AHS and unpadded data.
fn raw(p: &Pdu) -> Vec<u8> {
    let mut b = p.bhs;
    b.set_total_ahs_len(p.ahs.len());
    b.set_data_segment_len(p.data.len() as u32);
    let mut out = vec![0u8];
    out.extend_from_slice(&b.0);
    out.extend_from_slice(&p.ahs);
    out.extend_from_slice(&p.data);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// Run a login-target seed and report whether it reached full feature
/// phase.
fn login_reaches_ffp(seed: &[u8]) -> bool {
    let mut inp = Input::new(seed);
    let ctx = FuzzCtx::new(inp.u8());
    let cfg = config(inp.u8());
    let mut d = Driver::new(cfg, ctx, true);
    d.run(&mut inp);
    println!(
        "login seed: ffp {}; {} SCSI commands; sent {}",
        d.ffp,
        d.scsi_cmds,
        sent(&d)
    );
    d.ffp
}

fn sent(d: &Driver) -> String {
    (0..64)
        .filter(|&op| d.sent[op] > 0)
        .map(|op| format!("{op:#04x}x{}", d.sent[op]))
        .collect::<Vec<_>>()
        .join(" ")
}

// Structured login step helpers (see Driver::login_pdu / login_key).
const K_INAME: u8 = 0;
const K_TNAME: u8 = 2;
const K_NORMAL: u8 = 4;
const K_DISCOVERY: u8 = 3;
const K_AUTH_CHAP: u8 = 7;
const K_CHAP_A: u8 = 8;
const K_CHAP_N: u8 = 9;
const K_CHAP_R: u8 = 10;
const K_CHAP_IC: u8 = 11;
const K_HD: u8 = 12;
const K_MRDSL: u8 = 14;

/// ctl 2, sel 0 (login), flags: transit or not; then the number of keys
/// and the key bytes (each key code followed by its argument bytes).
fn login_step(transit: bool, nkeys: u8, keys: &[u8]) -> Vec<u8> {
    let mut v = vec![2u8, 0, if transit { 0x40 } else { 0 }, nkeys];
    v.extend_from_slice(keys);
    v
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    // ---- pdu_decode: digest byte, 3 bytes of max length, a PDU stream.
    let dir = root.join("pdu_decode");
    let pdus = [
        ("login", login_req()),
        ("read10", scsi_cmd(1, 2, false, 8, &[])),
        ("write10_imm", scsi_cmd(2, 3, true, 2, &[0x5a; 512])),
        ("data_out", data_out(3, 0x10, 0, 512, 512)),
        ("nop_out", nop_out(3, 4)),
        ("text", text_req(3, 5)),
    ];
    for dig in 0u8..4 {
        let (hd, dd) = (dig & 1 != 0, dig & 2 != 0);
        let mut all = vec![dig, 0x04, 0x00, 0x00];
        for (name, p) in &pdus {
            let mut one = vec![dig, 0x00, 0x20, 0x00];
            one.extend(wire(p, hd, dd));
            write(&dir, &format!("{name}_d{dig}"), &one);
            all.extend(wire(p, hd, dd));
        }
        write(&dir, &format!("stream_d{dig}"), &all);
    }

    // ---- login: ctx byte, config byte, steps.
    let dir = root.join("login");
    let sn = LOGIN_CMDSN;
    // Raw login, then a READ, a NOP-Out, a write with R2T and its Data-Out.
    let mut s = vec![0u8, 0];
    s.extend(raw(&login_req()));
    s.extend(raw(&scsi_cmd(sn, 2, false, 8, &[])));
    s.push(0x10); // completed at once: status GOOD, EDTL bytes of data
    s.extend(raw(&nop_out(sn + 1, 3)));
    s.extend(raw(&scsi_cmd(sn + 1, 4, true, 4, &[0x5a; 512])));
    s.extend(raw(&data_out(4, 1, 0, 512, 1536)));
    s.push(0x00); // completed: GOOD, no data
    s.extend(raw(&text_req(sn + 2, 5)));
    s.extend(raw(&logout(sn + 3, 6)));
    assert!(login_reaches_ffp(&s), "plain login seed");
    write(&dir, "plain_login_read_write", &s);

    // Only a Login Request.
    let mut s = vec![0u8, 0];
    s.extend(raw(&login_req()));
    assert!(login_reaches_ffp(&s));
    write(&dir, "login_only", &s);

    // CHAP (MD5) on the CHAP target, then operational, structured.
    let chap = |target: u8, alg: u8, mutual: bool| {
        let mut s = vec![0u8, 0];
        s.extend(login_step(
            false,
            4,
            &[K_INAME, K_TNAME, target, K_NORMAL, K_AUTH_CHAP],
        ));
        s.extend(login_step(false, 1, &[K_CHAP_A, alg]));
        let mut keys = vec![K_CHAP_N, K_CHAP_R, 0];
        if mutual {
            keys.extend([K_CHAP_IC, 0x21]);
            keys.extend(0u8..16);
        }
        s.extend(login_step(true, if mutual { 3 } else { 2 }, &keys));
        s.extend(login_step(true, 2, &[K_HD, 1, K_MRDSL, 1]));
        s
    };
    let s = chap(1, 0, false);
    assert!(login_reaches_ffp(&s), "CHAP MD5 seed");
    write(&dir, "chap_md5", &s);
    let s = chap(1, 2, false);
    assert!(login_reaches_ffp(&s), "CHAP SHA-256 seed");
    write(&dir, "chap_sha256", &s);
    let s = chap(2, 0, true);
    assert!(login_reaches_ffp(&s), "mutual CHAP seed");
    write(&dir, "chap_mutual", &s);
    // CHAP refused: a wrong response.
    let mut s = vec![0u8, 0];
    s.extend(login_step(
        false,
        4,
        &[K_INAME, K_TNAME, 1, K_NORMAL, K_AUTH_CHAP],
    ));
    s.extend(login_step(false, 1, &[K_CHAP_A, 0]));
    s.extend(login_step(true, 2, &[K_CHAP_N, K_CHAP_R, 1]));
    assert!(!login_reaches_ffp(&s));
    write(&dir, "chap_wrong", &s);
    // Discovery with CHAP required for discovery, then SendTargets.
    let mut s = vec![0x02u8, 0];
    s.extend(login_step(false, 3, &[K_INAME, K_DISCOVERY, K_AUTH_CHAP]));
    s.extend(login_step(false, 1, &[K_CHAP_A, 0]));
    s.extend(login_step(true, 2, &[K_CHAP_N, K_CHAP_R, 0]));
    s.extend(login_step(true, 0, &[]));
    // Structured Text: ctl 2, sel 0xc4 (text), flags 0, query All.
    s.extend([2, 0xc4, 0x00, 0]);
    assert!(login_reaches_ffp(&s), "discovery seed");
    write(&dir, "discovery_chap_sendtargets", &s);

    // ---- connection: config byte, login options byte, steps.
    let dir = root.join("connection");
    let raw_read = {
        let mut s = vec![0u8, 0x0c];
        s.extend(raw(&scsi_cmd(sn, 2, false, 8, &[])));
        s.extend([7, 0x10]); // complete it with EDTL bytes of data
        s.extend(raw(&nop_out(sn + 1, 3)));
        s
    };
    write(&dir, "read_nop", &raw_read);
    // Write: immediate data, R2T, Data-Out answering it, completion.
    let mut s = vec![0u8, 0x0c];
    s.extend(raw(&scsi_cmd(sn, 4, true, 4, &[0x5a; 512])));
    s.extend(raw(&data_out(4, 1, 0, 512, 1536)));
    s.extend([7, 0x00]);
    write(&dir, "write_r2t_data_out", &s);
    // Structured write with digests on: scsi cmd (sel 2), fl 0x80 for
    // immediate data; m = 0x32 (write, edtl 65536); then Data-Outs.
    let mut s = vec![0u8, 0x6f];
    s.extend([2, 0x02, 0x90, 0x32, 0, 4]);
    for _ in 0..8 {
        s.extend([2, 0x05, 0x00]);
    }
    s.extend([7, 0x10]);
    write(&dir, "write_structured_digests", &s);
    // Unsolicited Data-Out (InitialR2T=No), then the R2T for the rest.
    let mut s = vec![0u8, 0x04 | 0x20];
    s.extend([2, 0x02, 0x90, 0x36, 0, 8]);
    s.extend([2, 0x05, 0x02, 2, 0x05, 0x02, 2, 0x05, 0x12]);
    s.extend([2, 0x05, 0x00, 2, 0x05, 0x00, 5, 0x00]);
    write(&dir, "write_unsolicited", &s);
    // TMF: abort a pending write, LUN reset, target cold reset.
    let mut s = vec![0u8, 0x0c];
    s.extend(raw(&scsi_cmd(sn, 4, true, 64, &[])));
    s.extend(raw(&scsi_cmd(sn + 1, 5, false, 8, &[])));
    s.extend(raw(&tmf(sn + 2, 6, 1, 4)));
    s.extend(raw(&tmf(sn + 2, 7, 9, 5)));
    s.extend(raw(&tmf(sn + 2, 8, 5, 0)));
    s.extend([6, 0]);
    s.extend(raw(&tmf(sn + 2, 9, 7, 0)));
    s.extend([7, 0]);
    write(&dir, "tmf", &s);
    // Text and Logout; NOP ping after idle time (tick), answered.
    let mut s = vec![0u8, 0x0c];
    s.extend(raw(&text_req(sn, 5)));
    s.extend([4, 0x08, 0x00]); // +32.768 s: ping
    s.extend([2, 0xc1, 0x03]); // NOP-Out answering the ping
    s.extend(raw(&logout(sn + 1, 6)));
    write(&dir, "text_ping_logout", &s);
    // Discovery session: SendTargets.
    let mut s = vec![0u8, 0x80];
    s.extend(raw(&text_req(sn, 5)));
    write(&dir, "discovery_text", &s);

    // The connection seeds must get through their scripted login.
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let seed = std::fs::read(&path).unwrap();
        let mut inp = Input::new(&seed);
        let cfg = config(inp.u8() & 0x0f);
        let mut d = Driver::new(cfg, FuzzCtx::new(0), false);
        d.step_pdu(scripted_login(inp.u8()));
        assert!(d.ffp);
        d.run(&mut inp);
        println!(
            "{}: {} SCSI commands; sent {}",
            path.file_name().unwrap().to_string_lossy(),
            d.scsi_cmds,
            sent(&d)
        );
    }
    println!("seeds written to {}", root.display());
}
