use super::*;
use crate::sense::SenseKey;
use mempool::DataBuf;

const I1: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";
const I2: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2";
const TGT: &str = "iqn.2024-01.org.example:target";

fn info() -> LunInfo {
    LunInfo {
        lun: 0,
        block_size: 512,
        num_blocks: 2048,
        vendor: "TGTRDMA".into(),
        product: "Block LUN".into(),
        revision: "0.1".into(),
        serial: "SER0001".into(),
        naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        thin_provisioned: true,
        read_only: false,
        removable: false,
        pr_file: None,
        mode_file: None,
        max_transfer_blocks: 2048,
        max_unmap_blocks: 4096,
        max_unmap_descriptors: 64,
        max_write_same_blocks: 8192,
        write_cache: true,
    }
}

fn caps() -> BackstoreCaps {
    BackstoreCaps {
        discard: true,
        write_zeroes: true,
        volatile_cache: true,
        extent_status: true,
    }
}

fn nexus(id: NexusId, name: &str, isid: u64, tpgt: u16) -> Nexus {
    Nexus {
        id,
        initiator_name: name.into(),
        isid,
        target_name: TGT.into(),
        tpgt,
    }
}

/// A LUN with nexus 1 (initiator 1) and 2 (initiator 2), both on portal
/// group 1, their POWER ON unit attentions already consumed.
fn lun_with(info: LunInfo) -> SpcState {
    let mut s = SpcState::new(&info, caps()).unwrap();
    s.nexus_added(&nexus(1, I1, 0x23d000000001, 1));
    s.nexus_added(&nexus(2, I2, 0x23d000000002, 1));
    for id in [1, 2] {
        assert!(matches!(
            run(&mut s, id, &[0; 6], &[]),
            Err(CmdError::Check(_))
        ));
        run(&mut s, id, &[0; 6], &[]).unwrap();
    }
    s
}

fn lun() -> SpcState {
    lun_with(info())
}

/// What `lun.rs` does: precheck, then execute.
fn run(s: &mut SpcState, id: NexusId, cdb: &[u8], out: &[u8]) -> Result<DataBuf, CmdError> {
    if let Some(e) = s.precheck(id, cdb) {
        return Err(e);
    }
    let mut din = DataBuf::new();
    match s.execute(id, cdb, out, &mut din) {
        Some(r) => r.map(|()| din),
        None => panic!("not an SPC command: {cdb:02x?}"),
    }
}

fn check(r: Result<DataBuf, CmdError>) -> Sense {
    match r {
        Err(CmdError::Check(s)) => s,
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

fn assert_sense(r: Result<DataBuf, CmdError>, key: SenseKey, asc: u8, ascq: u8) -> Sense {
    let s = check(r);
    assert_eq!((s.key, s.asc, s.ascq), (key, asc, ascq), "{s:?}");
    s
}

fn invalid_cdb(r: Result<DataBuf, CmdError>, byte: u16, bit: Option<u8>) {
    let s = assert_sense(r, SenseKey::IllegalRequest, 0x24, 0);
    let fp = s.field_pointer.unwrap();
    assert!(fp.in_cdb);
    assert_eq!((fp.byte, fp.bit), (byte, bit));
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, evpd as u8, page, a[0], a[1], 0]
}

fn tur() -> [u8; 6] {
    [0; 6]
}

fn read10() -> [u8; 10] {
    [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]
}

fn write10() -> [u8; 10] {
    [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0]
}

// ---- unit attentions -------------------------------------------------

#[test]
fn power_on_ua_reported_once_and_not_to_inquiry() {
    let mut s = SpcState::new(&info(), caps()).unwrap();
    s.nexus_added(&nexus(7, I1, 1, 1));
    run(&mut s, 7, &inquiry(false, 0, 96), &[]).unwrap();
    assert_sense(
        run(&mut s, 7, &tur(), &[]),
        SenseKey::UnitAttention,
        0x29,
        0,
    );
    run(&mut s, 7, &tur(), &[]).unwrap();
}

#[test]
fn request_sense_returns_and_clears_ua() {
    let mut s = SpcState::new(&info(), caps()).unwrap();
    s.nexus_added(&nexus(7, I1, 1, 1));
    let d = run(&mut s, 7, &[0x03, 0, 0, 0, 252, 0], &[]).unwrap();
    assert_eq!(d.len(), 18);
    assert_eq!((d[0], d[2], d[12], d[13]), (0x70, 0x06, 0x29, 0x00));
    let d = run(&mut s, 7, &[0x03, 0x01, 0, 0, 252, 0], &[]).unwrap();
    assert_eq!(&d[..4], &[0x72, 0, 0, 0]);
    run(&mut s, 7, &tur(), &[]).unwrap();
    let d = run(&mut s, 7, &[0x03, 0, 0, 0, 8, 0], &[]).unwrap();
    assert_eq!(d.len(), 8);
}

#[test]
fn lun_reset_reaches_every_nexus_and_frees_spc2_reservation() {
    let mut s = lun();
    run(&mut s, 1, &[0x16, 0, 0, 0, 0, 0], &[]).unwrap();
    s.lun_reset(1);
    for id in [1, 2] {
        assert_sense(
            run(&mut s, id, &tur(), &[]),
            SenseKey::UnitAttention,
            0x29,
            3,
        );
        run(&mut s, id, &tur(), &[]).unwrap();
    }
    run(&mut s, 2, &[0x16, 0, 0, 0, 0, 0], &[]).unwrap();
}

#[test]
fn ua_queue_is_bounded_and_deduplicated() {
    let mut s = lun();
    for _ in 0..100 {
        s.establish_ua(UnitAttention::ReservationsPreempted, None);
        s.establish_ua(UnitAttention::ModeParametersChanged, Some(2));
    }
    assert_eq!(s.nexuses[&1].ua.len(), 2);
    assert_eq!(s.nexuses[&2].ua.len(), 1);
}

#[test]
fn unknown_nexus_does_not_panic() {
    let mut s = SpcState::new(&info(), caps()).unwrap();
    run(&mut s, 99, &tur(), &[]).unwrap();
    run(&mut s, 99, &inquiry(true, 0x83, 512), &[]).unwrap();
    assert!(s.precheck(99, &[]).is_none());
    assert!(s.execute(99, &[], &[], &mut DataBuf::new()).is_none());
    // Short CDBs are refused, not indexed.
    check(run(&mut s, 99, &[0x12, 1], &[]));
    check(run(&mut s, 99, &[0x5f, 0], &[]));
}

// ---- INQUIRY ---------------------------------------------------------

#[test]
fn standard_inquiry() {
    let mut s = lun();
    let d = run(&mut s, 1, &inquiry(false, 0, 260), &[]).unwrap();
    assert_eq!(d.len(), 96);
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(&d[..4], &[0, 0, 6, 0x12]);
    assert_eq!(d[5] & 0x30, 0x10, "TPGS implicit");
    assert_eq!(d[7] & 0x02, 0x02, "CmdQue");
    assert_eq!(&d[8..16], b"TGTRDMA ");
    assert_eq!(&d[16..32], b"Block LUN       ");
    assert_eq!(&d[32..36], b"0.1 ");
    assert_eq!(
        &d[58..66],
        &[0x00, 0xa0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xc0]
    );
    // Allocation length truncates, 255 and 256 agree.
    for alloc in [0u16, 1, 5, 36, 95] {
        let d = run(&mut s, 1, &inquiry(false, 0, alloc), &[]).unwrap();
        assert_eq!(d.len(), alloc as usize);
    }
    let a = run(&mut s, 1, &inquiry(false, 0, 255), &[]).unwrap();
    let b = run(&mut s, 1, &inquiry(false, 0, 256), &[]).unwrap();
    assert_eq!(a, b);
}

#[test]
fn inquiry_field_errors() {
    let mut s = lun();
    invalid_cdb(run(&mut s, 1, &inquiry(false, 1, 255), &[]), 2, Some(7));
    invalid_cdb(run(&mut s, 1, &[0x12, 0x02, 0, 0, 255, 0], &[]), 1, Some(1));
    invalid_cdb(run(&mut s, 1, &inquiry(true, 0x99, 255), &[]), 2, Some(7));
}

#[test]
fn every_supported_vpd_page_reads_back() {
    let mut s = lun();
    let d = run(&mut s, 1, &inquiry(true, 0, 255), &[]).unwrap();
    assert_eq!(&d[..4], &[0, 0, 0, 8]);
    for &page in &d[4..] {
        let v = run(&mut s, 1, &inquiry(true, page, 1024), &[]).unwrap();
        assert_eq!(v[1], page);
        assert_eq!(be16(&v, 2) as usize, v.len() - 4);
    }
    let v = run(&mut s, 1, &inquiry(true, 0x80, 255), &[]).unwrap();
    assert_eq!(&v[4..], b"SER0001");
}

#[test]
fn device_identification_designators() {
    let mut s = lun();
    let v = run(&mut s, 1, &inquiry(true, 0x83, 1024), &[]).unwrap();
    let mut found = Vec::new();
    let mut i = 4;
    while i < v.len() {
        let len = v[i + 3] as usize;
        found.push((v[i], v[i + 1], v[i + 4..i + 4 + len].to_vec()));
        i += 4 + len;
    }
    assert_eq!(i, v.len());
    assert_eq!(found[0], (0x01, 0x03, info().naa.to_vec()));
    assert_eq!(found[1].1, 0x01);
    assert!(found[1].2.starts_with(b"TGTRDMA SER0001"));
    assert_eq!(found[2], (0x51, 0x94, vec![0, 0, 0, 1]));
    assert_eq!(found[3], (0x51, 0x95, vec![0, 0, 0, 1]));
    let name = format!("{TGT},t,0x0001");
    assert_eq!(found[4].1, 0x98);
    assert!(found[4].2.starts_with(name.as_bytes()));
    assert_eq!(found[4].2.len() % 4, 0);
}

#[test]
fn block_limits_and_provisioning() {
    let mut s = lun();
    let v = run(&mut s, 1, &inquiry(true, 0xb0, 64), &[]).unwrap();
    assert_eq!(v.len(), 64);
    assert_eq!(v[3], 0x3c);
    assert_eq!(v[4] & 1, 0, "WSNZ: zero blocks means to the end");
    assert_eq!(v[5], 255);
    assert_eq!(be32(&v, 8), 2048);
    assert_eq!(be32(&v, 20), 4096);
    assert_eq!(be32(&v, 24), 64);
    assert_eq!(u64::from_be_bytes(v[36..44].try_into().unwrap()), 8192);
    let lbp = run(&mut s, 1, &inquiry(true, 0xb2, 64), &[]).unwrap();
    assert_eq!(&lbp[4..8], &[0, 0xe4, 0x02, 0]);
    let bdc = run(&mut s, 1, &inquiry(true, 0xb1, 64), &[]).unwrap();
    assert_eq!(be16(&bdc, 4), 1);
    assert_eq!(bdc[7] >> 4, 0x04, "WABEREQ 01b (BLOCK ERASE), WACEREQ 00b");

    let mut thick = info();
    thick.thin_provisioned = false;
    let mut s = lun_with(thick);
    let v = run(&mut s, 1, &inquiry(true, 0xb0, 64), &[]).unwrap();
    assert_eq!((be32(&v, 20), be32(&v, 24)), (0, 0));
    let lbp = run(&mut s, 1, &inquiry(true, 0xb2, 64), &[]).unwrap();
    assert_eq!(&lbp[4..8], &[0, 0, 0, 0]);
    let bdc = run(&mut s, 1, &inquiry(true, 0xb1, 64), &[]).unwrap();
    assert_eq!(bdc[7], 0, "no BLOCK ERASE without deallocation");
}

// ---- MODE SENSE / MODE SELECT -----------------------------------------

fn mode_sense6(dbd: bool, pc: u8, page: u8, sub: u8, alloc: u8) -> [u8; 6] {
    [0x1a, (dbd as u8) << 3, (pc << 6) | page, sub, alloc, 0]
}

#[test]
fn mode_sense6_all_pages() {
    let mut s = lun();
    let d = run(&mut s, 1, &mode_sense6(false, 0, 0x3f, 0, 255), &[]).unwrap();
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[2], 0x10, "DPOFUA, not write protected");
    assert_eq!(d[3], 8);
    assert_eq!(be32(&d, 4), 2048);
    assert_eq!(&d[9..12], &[0, 2, 0]);
    // caching, control, IEC, in that order (no subpages with 00h).
    assert_eq!((d[12], d[13]), (0x08, 0x12));
    assert_eq!(d[14] & 0x04, 0x04, "WCE");
    assert_eq!((d[32], d[33]), (0x0a, 0x0a));
    assert_eq!((d[44], d[45]), (0x1c, 0x0a));
    assert_eq!(d.len(), 56);
    let all = run(&mut s, 1, &mode_sense6(true, 0, 0x3f, 0xff, 255), &[]).unwrap();
    assert_eq!(all.len(), 4 + 20 + 12 + 32 + 12);
    // Truncated to the allocation length.
    let d = run(&mut s, 1, &mode_sense6(false, 0, 0x3f, 0, 4), &[]).unwrap();
    assert_eq!(d.len(), 4);
}

#[test]
fn mode_sense_errors() {
    let mut s = lun();
    let r = run(&mut s, 1, &mode_sense6(false, 3, 0x0a, 0, 255), &[]);
    assert_sense(r, SenseKey::IllegalRequest, 0x39, 0);
    invalid_cdb(
        run(&mut s, 1, &mode_sense6(false, 0, 0x05, 0, 255), &[]),
        2,
        Some(5),
    );
    invalid_cdb(
        run(&mut s, 1, &mode_sense6(false, 0, 0x08, 0x07, 255), &[]),
        3,
        Some(7),
    );
}

#[test]
fn mode_sense10_long_lba() {
    let mut s = lun();
    let d = run(&mut s, 1, &[0x5a, 0x10, 0x0a, 0, 0, 0, 0, 1, 0, 0], &[]).unwrap();
    assert_eq!(be16(&d, 0) as usize, d.len() - 2);
    assert_eq!(d[4] & 1, 1, "LONGLBA");
    assert_eq!(be16(&d, 6), 16);
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 2048);
    assert_eq!(be32(&d, 20), 512);
    assert_eq!(d[24], 0x0a);
}

/// The control page as MODE SENSE(6) with DBD returns it, wrapped in a
/// MODE SELECT(6) parameter list.
fn control_select(s: &mut SpcState, edit: impl Fn(&mut [u8])) -> DataBuf {
    let d = run(s, 1, &mode_sense6(true, 0, 0x0a, 0, 255), &[]).unwrap();
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(&d[4..]);
    edit(&mut p[4..]);
    p.into()
}

#[test]
fn mode_select_changes_d_sense_and_swp() {
    let mut s = lun();
    let p = control_select(&mut s, |pg| {
        pg[2] |= 0x04;
        pg[4] |= 0x08;
    });
    run(&mut s, 1, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).unwrap();
    assert!(s.descriptor_sense());
    assert!(s.write_protected());
    let d = run(&mut s, 1, &mode_sense6(true, 0, 0x0a, 0, 255), &[]).unwrap();
    assert_eq!(d[2] & 0x80, 0x80, "WP");
    // The other I_T nexus hears about it, we do not.
    run(&mut s, 1, &tur(), &[]).unwrap();
    assert_sense(
        run(&mut s, 2, &tur(), &[]),
        SenseKey::UnitAttention,
        0x2a,
        1,
    );
    // Selecting the same values again changes nothing and raises nothing.
    let p = control_select(&mut s, |_| {});
    run(&mut s, 1, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).unwrap();
    run(&mut s, 2, &tur(), &[]).unwrap();
    // A LUN reset puts the defaults back.
    s.lun_reset(1);
    assert!(!s.descriptor_sense() && !s.write_protected());
}

#[test]
fn mode_select_rejects_unchangeable_bits() {
    let mut s = lun();
    // QErr is not changeable: byte 3 of the page, bit 1.
    let p = control_select(&mut s, |pg| pg[3] |= 0x02);
    let e = assert_sense(
        run(&mut s, 1, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p),
        SenseKey::IllegalRequest,
        0x26,
        0,
    );
    let fp = e.field_pointer.unwrap();
    assert!(!fp.in_cdb);
    assert_eq!((fp.byte, fp.bit), (4 + 3, Some(1)));
    // Wrong page length.
    let mut p = control_select(&mut s, |_| {});
    p[5] = 0x0b;
    p.push(0);
    check(run(&mut s, 1, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p));
    // Unknown page.
    let p = [0, 0, 0, 0, 0x19, 0x02, 0, 0];
    check(run(&mut s, 1, &[0x15, 0x10, 0, 0, 8, 0], &p));
    // Truncated page.
    let p = control_select(&mut s, |_| {});
    let r = run(&mut s, 1, &[0x15, 0x10, 0, 0, 10, 0], &p[..10]);
    assert_sense(r, SenseKey::IllegalRequest, 0x1a, 0);
    // Parameter list longer than what arrived.
    let r = run(&mut s, 1, &[0x15, 0x10, 0, 0, 40, 0], &p);
    assert_sense(r, SenseKey::IllegalRequest, 0x1a, 0);
    // SP is not supported.
    invalid_cdb(run(&mut s, 1, &[0x15, 0x11, 0, 0, 0, 0], &[]), 1, Some(0));
    // Block descriptor with another block size.
    let p = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
    check(run(&mut s, 1, &[0x15, 0x10, 0, 0, 12, 0], &p));
    // Our own geometry is fine.
    let p = [0, 0, 0, 8, 0, 0, 8, 0, 0, 0, 2, 0];
    run(&mut s, 1, &[0x15, 0x10, 0, 0, 12, 0], &p).unwrap();
    assert!(!s.descriptor_sense());
}

#[test]
fn mode_select_wce() {
    let mut s = lun();
    let d = run(&mut s, 1, &mode_sense6(true, 0, 0x08, 0, 255), &[]).unwrap();
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(&d[4..]);
    p[6] &= !0x04;
    run(
        &mut s,
        1,
        &[0x55, 0x10, 0, 0, 0, 0, 0, 0, (p.len() + 4) as u8, 0],
        &{
            let mut q = vec![0, 0, 0, 0, 0, 0, 0, 0];
            q.extend_from_slice(&p[4..]);
            q
        },
    )
    .unwrap();
    assert!(!s.write_cache_enabled());
    let ch = run(&mut s, 1, &mode_sense6(true, 1, 0x08, 0, 255), &[]).unwrap();
    assert_eq!(ch[6], 0x04);
}

// ---- REPORT SUPPORTED OPERATION CODES / TMFs / TPGs ---------------------

fn rsoc(rctd: bool, opt: u8, op: u8, sa: u16) -> [u8; 12] {
    let sa = sa.to_be_bytes();
    [
        0xa3,
        0x0c,
        ((rctd as u8) << 7) | opt,
        op,
        sa[0],
        sa[1],
        0,
        0,
        0xff,
        0xff,
        0,
        0,
    ]
}

fn all_ops(s: &mut SpcState, rctd: bool) -> Vec<(u8, u16, bool, u16)> {
    let d = run(s, 1, &rsoc(rctd, 0, 0, 0), &[]).unwrap();
    assert_eq!(be32(&d, 0) as usize, d.len() - 4);
    let step = if rctd { 20 } else { 8 };
    d[4..]
        .chunks(step)
        .map(|c| {
            assert_eq!(c[5] & 0x02 != 0, rctd);
            if rctd {
                assert_eq!(be16(c, 8), 0x0a);
            }
            (c[0], be16(c, 2), c[5] & 1 != 0, be16(c, 6))
        })
        .collect()
}

#[test]
fn rsoc_all_and_one() {
    let mut s = lun();
    let ops = all_ops(&mut s, false);
    assert_eq!(ops.len(), all_ops(&mut s, true).len());
    for op in [
        0x00, 0x12, 0x28, 0x2a, 0x42, 0x89, 0x8a, 0x93, 0xa0, 0x5e, 0x5f,
    ] {
        assert!(ops.iter().any(|o| o.0 == op), "{op:02x}");
    }
    for &(op, sa, servactv, len) in &ops {
        assert!(servactv || sa == 0);
        assert_eq!(len as usize, cdb_len(op));
        let (good, bad) = if servactv { (2, 1) } else { (1, 2) };
        let d = run(&mut s, 1, &rsoc(false, good, op, sa), &[]).unwrap();
        assert_eq!(d[1] & 0x07, 3);
        assert_eq!(be16(&d, 2), len);
        assert_eq!(d[4], op);
        if servactv {
            assert_eq!(d[5] & 0x1f, sa as u8);
        }
        invalid_cdb(run(&mut s, 1, &rsoc(false, bad, op, sa), &[]), 2, Some(2));
        let d = run(&mut s, 1, &rsoc(true, good, op, sa), &[]).unwrap();
        assert_eq!(d.len(), 4 + len as usize + 12);
        assert!(s.opcode_supported(op, sa));
    }
    let d = run(&mut s, 1, &rsoc(false, 1, 0xc5, 0), &[]).unwrap();
    assert_eq!(d, vec![0, 1, 0, 0]);
    invalid_cdb(run(&mut s, 1, &rsoc(false, 5, 0, 0), &[]), 2, Some(2));
}

#[test]
fn rsoc_tracks_thin_provisioning() {
    let mut thick = info();
    thick.thin_provisioned = false;
    let mut s = lun_with(thick);
    let ops = all_ops(&mut s, false);
    assert!(!ops.iter().any(|o| o.0 == 0x42));
    assert!(!ops.iter().any(|o| o.0 == 0x9e && o.1 == 0x12));
    assert!(ops.iter().any(|o| o.0 == 0x9e && o.1 == 0x10));
    let d = run(&mut s, 1, &rsoc(false, 1, 0x41, 0), &[]).unwrap();
    assert_eq!(d[5], 0x00, "no UNMAP bit");
}

#[test]
fn report_tmfs_and_target_port_groups() {
    let mut s = lun();
    let d = run(&mut s, 1, &[0xa3, 0x0d, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]).unwrap();
    assert_eq!(d, vec![0xde, 0, 0, 0]);
    let d = run(
        &mut s,
        1,
        &[0xa3, 0x0d, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0],
        &[],
    )
    .unwrap();
    assert_eq!(d.len(), 16);
    assert_eq!(d[3], 0x0c);
    s.nexus_added(&nexus(3, I1, 5, 2));
    let d = run(&mut s, 1, &[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).unwrap();
    assert_eq!(be32(&d, 0) as usize, d.len() - 4);
    assert_eq!(&d[4..12], &[0x80, 0x01, 0, 1, 0, 0, 0, 2]);
    assert_eq!(&d[12..], &[0, 0, 0, 1, 0, 0, 0, 2]);
    invalid_cdb(
        run(&mut s, 1, &[0xa3, 0x1f, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]),
        1,
        Some(4),
    );
}

// ---- SPC-2 RESERVE / RELEASE ------------------------------------------

#[test]
fn reserve6_two_initiators() {
    let mut s = lun();
    let reserve6 = [0x16, 0, 0, 0, 0, 0];
    let release6 = [0x17, 0, 0, 0, 0, 0];
    run(&mut s, 1, &reserve6, &[]).unwrap();
    run(&mut s, 1, &reserve6, &[]).unwrap();
    assert_eq!(
        run(&mut s, 2, &reserve6, &[]),
        Err(CmdError::ReservationConflict)
    );
    run(&mut s, 2, &release6, &[]).unwrap();
    run(&mut s, 1, &mode_sense6(false, 0, 0x3f, 0, 255), &[]).unwrap();
    let r = run(&mut s, 2, &mode_sense6(false, 0, 0x3f, 0, 255), &[]);
    assert_eq!(r, Err(CmdError::ReservationConflict));
    assert_eq!(s.precheck(2, &tur()), Some(CmdError::ReservationConflict));
    assert_eq!(
        s.precheck(2, &read10()),
        Some(CmdError::ReservationConflict)
    );
    run(&mut s, 2, &inquiry(false, 0, 96), &[]).unwrap();
    // PR commands conflict for everyone under an SPC-2 reservation.
    assert_eq!(s.precheck(1, &prin(0)), Some(CmdError::ReservationConflict));
    run(&mut s, 1, &release6, &[]).unwrap();
    run(&mut s, 2, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).unwrap();
    run(&mut s, 2, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).unwrap();
    invalid_cdb(
        run(&mut s, 2, &[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
        1,
        Some(4),
    );
    invalid_cdb(run(&mut s, 2, &[0x16, 0x01, 0, 0, 0, 0], &[]), 1, Some(0));
}

#[test]
fn reserve6_released_on_nexus_loss() {
    let mut s = lun();
    run(&mut s, 1, &[0x16, 0, 0, 0, 0, 0], &[]).unwrap();
    s.nexus_removed(1);
    run(&mut s, 2, &[0x16, 0, 0, 0, 0, 0], &[]).unwrap();
}

// ---- persistent reservations --------------------------------------------

const WE: u8 = 1;
const EA: u8 = 3;
const WE_RO: u8 = 5;
const EA_RO: u8 = 6;
const WE_AR: u8 = 7;
const EA_AR: u8 = 8;

fn prin(sa: u8) -> [u8; 10] {
    [0x5e, sa, 0, 0, 0, 0, 0, 0x40, 0, 0]
}

fn prout_cdb(sa: u8, ty: u8, len: u32) -> [u8; 10] {
    let l = len.to_be_bytes();
    [0x5f, sa, ty, 0, 0, l[0], l[1], l[2], l[3], 0]
}

fn params(rk: u64, sark: u64, flags: u8) -> DataBuf {
    let mut p = Vec::new();
    p.extend_from_slice(&rk.to_be_bytes());
    p.extend_from_slice(&sark.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, flags, 0, 0, 0]);
    p.into()
}

fn prout(
    s: &mut SpcState,
    id: NexusId,
    sa: u8,
    ty: u8,
    rk: u64,
    sark: u64,
) -> Result<DataBuf, CmdError> {
    run(s, id, &prout_cdb(sa, ty, 24), &params(rk, sark, 0))
}

/// PERSISTENT RESERVE IN from an unregistered bystander whose unit
/// attentions do not interest us.
fn observe(s: &mut SpcState, cdb: &[u8]) -> DataBuf {
    if !s.nexuses.contains_key(&OBSERVER) {
        s.nexus_added(&nexus(OBSERVER, "iqn.x:observer", 9, 1));
    }
    s.nexuses.get_mut(&OBSERVER).unwrap().ua.clear();
    run(s, OBSERVER, cdb, &[]).unwrap()
}

const OBSERVER: NexusId = 50;

fn keys(s: &mut SpcState) -> (u32, Vec<u64>) {
    let d = observe(s, &prin(0));
    assert_eq!(be32(&d, 4) as usize, d.len() - 8);
    let k = d[8..]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    (be32(&d, 0), k)
}

fn reservation(s: &mut SpcState) -> Option<(u64, u8)> {
    let d = observe(s, &prin(1));
    match be32(&d, 4) {
        0 => None,
        16 => Some((
            u64::from_be_bytes(d[8..16].try_into().unwrap()),
            d[21] & 0x0f,
        )),
        n => panic!("additional length {n}"),
    }
}

fn drain_uas(s: &mut SpcState) {
    for id in [1, 2] {
        s.nexuses.get_mut(&id).unwrap().ua.clear();
    }
}

#[test]
fn register_keys_and_generation() {
    let mut s = lun();
    assert_eq!(keys(&mut s), (0, vec![]));
    prout(&mut s, 1, 6, 0, 0, 0xabc).unwrap();
    prout(&mut s, 2, 0, 0, 0, 0xdef).unwrap();
    assert_eq!(keys(&mut s), (2, vec![0xabc, 0xdef]));
    // Registered with another key: conflict; right key: change it.
    assert_eq!(
        prout(&mut s, 1, 0, 0, 0x999, 0x1),
        Err(CmdError::ReservationConflict)
    );
    prout(&mut s, 1, 0, 0, 0xabc, 0x123).unwrap();
    // Unregistered nexus with a non-zero key: conflict.
    s.nexus_added(&nexus(5, I1, 77, 1));
    s.nexuses.get_mut(&5).unwrap().ua.clear();
    assert_eq!(
        prout(&mut s, 5, 0, 0, 0x5, 0x6),
        Err(CmdError::ReservationConflict)
    );
    // Registering nothing leaves PRgeneration alone.
    prout(&mut s, 5, 0, 0, 0, 0).unwrap();
    assert_eq!(keys(&mut s), (3, vec![0x123, 0xdef]));
    // Unregister.
    prout(&mut s, 1, 0, 0, 0x123, 0).unwrap();
    prout(&mut s, 2, 6, 0, 0, 0).unwrap();
    assert_eq!(keys(&mut s), (5, vec![]));
}

#[test]
fn registration_survives_reconnect() {
    let mut s = lun();
    prout(&mut s, 1, 6, 0, 0, 0xabc).unwrap();
    prout(&mut s, 1, 1, WE, 0xabc, 0).unwrap();
    s.nexus_removed(1);
    s.nexus_added(&nexus(11, I1, 0x23d000000001, 1));
    s.nexuses.get_mut(&11).unwrap().ua.clear();
    assert_eq!(s.precheck(11, &write10()), None, "still the holder");
    assert_eq!(
        s.precheck(2, &write10()),
        Some(CmdError::ReservationConflict)
    );
}

#[test]
fn prin_service_action_range_and_truncation() {
    let mut s = lun();
    for sa in 0..4 {
        run(&mut s, 1, &prin(sa), &[]).unwrap();
    }
    for sa in 4..0x20 {
        invalid_cdb(run(&mut s, 1, &prin(sa), &[]), 1, Some(4));
    }
    prout(&mut s, 1, 6, 0, 0, 0xabc).unwrap();
    let d = run(&mut s, 1, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[]).unwrap();
    assert_eq!(d.len(), 8);
    assert_eq!(be32(&d, 4), 8, "ADDITIONAL LENGTH is not truncated");
}

#[test]
fn report_capabilities() {
    let mut s = lun();
    let d = run(&mut s, 1, &prin(2), &[]).unwrap();
    assert_eq!(d.len(), 8);
    assert_eq!(be16(&d, 0), 8);
    assert_eq!(
        d[2] & 0x1d,
        0x1c,
        "CRH SIP_C ATP_C, no PTPL_C without a file"
    );
    assert_eq!(d[3] & 0x80, 0x80, "TMV");
    assert!((d[3] >> 4) & 7 <= 5);
    assert_eq!(be16(&d, 4), 0xea01);
}

/// Mirrors libiscsi's ProutReserve.Access* tests: what a second initiator
/// may do while registered and after unregistering.
#[test]
fn access_by_type() {
    // (type, reg read, reg write, unreg read, unreg write)
    let table = [
        (EA, false, false, false, false),
        (WE, true, false, true, false),
        (EA_RO, true, true, false, false),
        (WE_RO, true, true, true, false),
        (EA_AR, true, true, false, false),
        (WE_AR, true, true, true, false),
    ];
    for (ty, rr, rw, ur, uw) in table {
        let mut s = lun();
        let key = 0x1234;
        prout(&mut s, 1, 6, 0, 0, key).unwrap();
        prout(&mut s, 2, 6, 0, 0, key).unwrap();
        prout(&mut s, 1, 1, ty, key, 0).unwrap();
        let ar = ty >= WE_AR;
        assert_eq!(reservation(&mut s), Some((if ar { 0 } else { key }, ty)));
        let ok = |s: &mut SpcState, id, cdb: &[u8]| s.precheck(id, cdb).is_none();
        assert!(ok(&mut s, 1, &read10()) && ok(&mut s, 1, &write10()));
        assert_eq!(ok(&mut s, 2, &read10()), rr, "type {ty} reg read");
        assert_eq!(ok(&mut s, 2, &write10()), rw, "type {ty} reg write");
        // INQUIRY, TUR, READ CAPACITY and PR IN always pass.
        for cdb in [
            &inquiry(false, 0, 96)[..],
            &tur(),
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &prin(0),
        ] {
            assert!(ok(&mut s, 2, cdb));
        }
        prout(&mut s, 2, 0, 0, key, 0).unwrap();
        assert_eq!(ok(&mut s, 2, &read10()), ur, "type {ty} unreg read");
        assert_eq!(ok(&mut s, 2, &write10()), uw, "type {ty} unreg write");
        prout(&mut s, 1, 2, ty, key, 0).unwrap();
        prout(&mut s, 1, 0, 0, key, 0).unwrap();
        assert_eq!(keys(&mut s).1, vec![]);
        assert_eq!(reservation(&mut s), None);
    }
}

/// libiscsi's ProutReserve.Ownership*: the holder unregistering ends a
/// non-shared reservation; all-registrants ones live on.
#[test]
fn ownership_by_type() {
    for ty in [EA, WE, EA_RO, WE_RO, EA_AR, WE_AR] {
        let mut s = lun();
        prout(&mut s, 1, 6, 0, 0, 7).unwrap();
        prout(&mut s, 2, 6, 0, 0, 7).unwrap();
        prout(&mut s, 1, 1, ty, 7, 0).unwrap();
        prout(&mut s, 1, 0, 0, 7, 0).unwrap();
        if ty >= WE_AR {
            assert_eq!(reservation(&mut s), Some((0, ty)));
            prout(&mut s, 2, 2, ty, 7, 0).unwrap();
        } else {
            assert_eq!(reservation(&mut s), None, "type {ty}");
            let ua = s.precheck(2, &tur());
            if ty == EA_RO || ty == WE_RO {
                assert_sense(Err(ua.unwrap()), SenseKey::UnitAttention, 0x2a, 4);
            } else {
                assert_eq!(ua, None);
            }
        }
        prout(&mut s, 2, 0, 0, 7, 0).unwrap();
        assert_eq!(keys(&mut s).1, vec![]);
    }
}

#[test]
fn reserve_release_rules() {
    let mut s = lun();
    // Unregistered: conflict.
    assert_eq!(
        prout(&mut s, 1, 1, WE, 0, 0),
        Err(CmdError::ReservationConflict)
    );
    prout(&mut s, 1, 6, 0, 0, 1).unwrap();
    prout(&mut s, 2, 6, 0, 0, 2).unwrap();
    invalid_cdb(prout(&mut s, 1, 1, 2, 1, 0), 2, Some(3));
    invalid_cdb(prout(&mut s, 1, 1, 0x11, 1, 0), 2, Some(7));
    assert_eq!(
        prout(&mut s, 1, 1, WE, 2, 0),
        Err(CmdError::ReservationConflict)
    );
    prout(&mut s, 1, 1, WE, 1, 0).unwrap();
    prout(&mut s, 1, 1, WE, 1, 0).unwrap();
    assert_eq!(
        prout(&mut s, 1, 1, EA, 1, 0),
        Err(CmdError::ReservationConflict)
    );
    assert_eq!(
        prout(&mut s, 2, 1, WE, 2, 0),
        Err(CmdError::ReservationConflict)
    );
    // RESERVE/RELEASE do not bump PRgeneration.
    assert_eq!(keys(&mut s).0, 2);
    // Non-holder release is a no-op; wrong type from the holder is 26/04.
    prout(&mut s, 2, 2, WE, 2, 0).unwrap();
    assert_eq!(reservation(&mut s), Some((1, WE)));
    assert_sense(
        prout(&mut s, 1, 2, EA, 1, 0),
        SenseKey::IllegalRequest,
        0x26,
        4,
    );
    prout(&mut s, 1, 2, WE, 1, 0).unwrap();
    assert_eq!(reservation(&mut s), None);
    // SPC-2 RESERVE conflicts once anyone is registered.
    assert_eq!(
        s.precheck(1, &[0x16, 0, 0, 0, 0, 0]),
        Some(CmdError::ReservationConflict)
    );
}

#[test]
fn release_of_shared_reservation_notifies_registrants() {
    let mut s = lun();
    prout(&mut s, 1, 6, 0, 0, 1).unwrap();
    prout(&mut s, 2, 6, 0, 0, 2).unwrap();
    prout(&mut s, 1, 1, WE_RO, 1, 0).unwrap();
    prout(&mut s, 1, 2, WE_RO, 1, 0).unwrap();
    run(&mut s, 1, &tur(), &[]).unwrap();
    assert_sense(
        run(&mut s, 2, &tur(), &[]),
        SenseKey::UnitAttention,
        0x2a,
        4,
    );
}

#[test]
fn parameter_list_checks() {
    let mut s = lun();
    let r = run(&mut s, 1, &prout_cdb(6, 0, 20), &params(0, 1, 0)[..20]);
    assert_sense(r, SenseKey::IllegalRequest, 0x1a, 0);
    let mut p = params(0, 1, 0);
    p.extend_from_slice(&[0; 4]);
    let r = run(&mut s, 1, &prout_cdb(6, 0, 28), &p);
    assert_sense(r, SenseKey::IllegalRequest, 0x1a, 0);
    // Data shorter than the parameter list length.
    let r = run(&mut s, 1, &prout_cdb(6, 0, 24), &params(0, 1, 0)[..10]);
    assert_sense(r, SenseKey::IllegalRequest, 0x1a, 0);
    // APTPL without a state file.
    let r = run(&mut s, 1, &prout_cdb(6, 0, 24), &params(0, 1, 0x01));
    assert_sense(r, SenseKey::IllegalRequest, 0x26, 0);
    // SPEC_I_PT with REGISTER AND IGNORE EXISTING KEY.
    let r = run(&mut s, 1, &prout_cdb(6, 0, 24), &params(0, 1, 0x08));
    assert_sense(r, SenseKey::IllegalRequest, 0x26, 0);
    invalid_cdb(prout(&mut s, 1, 8, 0, 0, 0), 1, Some(4));
    assert_eq!(keys(&mut s).1, vec![]);
}

#[test]
fn clear_removes_everything() {
    let mut s = lun();
    prout(&mut s, 1, 6, 0, 0, 1).unwrap();
    prout(&mut s, 2, 6, 0, 0, 2).unwrap();
    prout(&mut s, 2, 1, EA, 2, 0).unwrap();
    assert_eq!(
        prout(&mut s, 1, 3, 0, 9, 0),
        Err(CmdError::ReservationConflict)
    );
    prout(&mut s, 1, 3, 0, 1, 0).unwrap();
    assert_eq!(keys(&mut s), (3, vec![]));
    assert_eq!(reservation(&mut s), None);
    assert_sense(
        run(&mut s, 2, &tur(), &[]),
        SenseKey::UnitAttention,
        0x2a,
        3,
    );
}

/// libiscsi's ProutPreempt.RemoveRegistration, with the same key on both
/// sides as its same-second rand_key() gives.
#[test]
fn preempt_removes_registration() {
    for (k1, k2) in [(0x11, 0x22), (0x33, 0x33)] {
        let mut s = lun();
        prout(&mut s, 1, 6, 0, 0, k1).unwrap();
        prout(&mut s, 2, 6, 0, 0, k2).unwrap();
        let (gen, k) = keys(&mut s);
        assert_eq!(k.len(), 2);
        prout(&mut s, 2, 4, EA, k2, k1).unwrap();
        assert_sense(
            run(&mut s, 1, &tur(), &[]),
            SenseKey::UnitAttention,
            0x2a,
            5,
        );
        run(&mut s, 2, &tur(), &[]).unwrap();
        assert_eq!(keys(&mut s), (gen + 1, vec![k2]));
        assert_eq!(reservation(&mut s), None);
    }
}

#[test]
fn preempt_takes_over_reservation() {
    let mut s = lun();
    prout(&mut s, 1, 6, 0, 0, 1).unwrap();
    prout(&mut s, 2, 6, 0, 0, 2).unwrap();
    prout(&mut s, 1, 1, WE, 1, 0).unwrap();
    // SARK zero without an all-registrants reservation.
    assert_sense(
        prout(&mut s, 2, 4, EA, 2, 0),
        SenseKey::IllegalRequest,
        0x26,
        0,
    );
    // Nobody has key 9.
    assert_eq!(
        prout(&mut s, 2, 4, EA, 2, 9),
        Err(CmdError::ReservationConflict)
    );
    prout(&mut s, 2, 5, EA, 2, 1).unwrap();
    assert_eq!(reservation(&mut s), Some((2, EA)));
    assert_eq!(keys(&mut s).1, vec![2]);
    assert_eq!(s.take_aborted_nexuses(), vec![1]);
    assert_sense(
        run(&mut s, 1, &tur(), &[]),
        SenseKey::UnitAttention,
        0x2a,
        5,
    );
    assert_eq!(
        s.precheck(1, &read10()),
        Some(CmdError::ReservationConflict)
    );
}

#[test]
fn preempt_all_registrants_with_zero_key() {
    let mut s = lun();
    prout(&mut s, 1, 6, 0, 0, 1).unwrap();
    prout(&mut s, 2, 6, 0, 0, 2).unwrap();
    prout(&mut s, 1, 1, WE_AR, 1, 0).unwrap();
    prout(&mut s, 2, 4, EA, 2, 0).unwrap();
    assert_eq!(reservation(&mut s), Some((2, EA)));
    assert_eq!(keys(&mut s).1, vec![2]);
}

fn full_status(s: &mut SpcState) -> Vec<(u64, u8, u8, u16, Vec<u8>)> {
    let d = observe(s, &[0x5e, 3, 0, 0, 0, 0, 0, 0x10, 0, 0]);
    assert_eq!(be32(&d, 4) as usize, d.len() - 8);
    let mut v = Vec::new();
    let mut i = 8;
    while i < d.len() {
        let len = be32(&d, i + 20) as usize;
        let key = u64::from_be_bytes(d[i..i + 8].try_into().unwrap());
        v.push((
            key,
            d[i + 12],
            d[i + 13],
            be16(&d, i + 18),
            d[i + 24..i + 24 + len].to_vec(),
        ));
        i += 24 + len;
    }
    v
}

#[test]
fn read_full_status_transport_ids() {
    let mut s = lun();
    prout(&mut s, 1, 6, 0, 0, 1).unwrap();
    run(&mut s, 2, &prout_cdb(6, 0, 24), &params(0, 2, 0x04)).unwrap();
    prout(&mut s, 1, 1, WE, 1, 0).unwrap();
    let st = full_status(&mut s);
    assert_eq!(st.len(), 2);
    let (key, flags, ty, rtpi, tid) = &st[0];
    assert_eq!((*key, *flags, *ty, *rtpi), (1, 0x01, WE, 1));
    assert_eq!(tid[0], 0x45);
    assert_eq!(be16(tid, 2) as usize, tid.len() - 4);
    assert_eq!(tid.len() % 4, 0);
    let name = format!("{I1},i,0x23d000000001");
    assert_eq!(&tid[4..4 + name.len()], name.as_bytes());
    assert_eq!(tid[4 + name.len()], 0);
    assert_eq!((st[1].0, st[1].1, st[1].3), (2, 0x02, 0), "ALL_TG_PT");
}

fn tid(name: &str) -> DataBuf {
    let mut v = DataBuf::new();
    crate::pr::transport_id(name, None, &mut v);
    v
}

#[test]
fn spec_i_pt_registers_listed_initiators() {
    let mut s = lun();
    let mut p = params(0, 0x77, 0x08);
    let t = tid(I2);
    p.extend_from_slice(&(t.len() as u32).to_be_bytes());
    p.extend_from_slice(&t);
    run(&mut s, 1, &prout_cdb(0, 0, p.len() as u32), &p).unwrap();
    assert_eq!(keys(&mut s), (1, vec![0x77, 0x77]));
    // Initiator 2 is registered now, through any ISID.
    prout(&mut s, 2, 0, 0, 0x77, 0x78).unwrap();
    // Listing an already registered initiator is refused.
    s.nexus_added(&nexus(4, "iqn.x:other", 3, 1));
    s.nexuses.get_mut(&4).unwrap().ua.clear();
    let r = run(&mut s, 4, &prout_cdb(0, 0, p.len() as u32), &p);
    assert_sense(r, SenseKey::IllegalRequest, 0x26, 0);
    // A TransportID that is not iSCSI.
    let mut p2 = p.clone();
    p2[28] = 0x06;
    check(run(&mut s, 4, &prout_cdb(0, 0, p2.len() as u32), &p2));
}

#[test]
fn register_and_move() {
    let mut s = lun();
    prout(&mut s, 1, 6, 0, 0, 1).unwrap();
    prout(&mut s, 1, 1, EA, 1, 0).unwrap();
    let mut t = DataBuf::new();
    crate::pr::transport_id(I2, Some(0x23d000000002), &mut t);
    let mut p = Vec::new();
    p.extend_from_slice(&1u64.to_be_bytes());
    p.extend_from_slice(&5u64.to_be_bytes());
    p.extend_from_slice(&[0, 0x02, 0, 1]);
    p.extend_from_slice(&(t.len() as u32).to_be_bytes());
    p.extend_from_slice(&t);
    // Only the holder may move.
    assert_eq!(
        run(&mut s, 2, &prout_cdb(7, EA, p.len() as u32), &p),
        Err(CmdError::ReservationConflict)
    );
    run(&mut s, 1, &prout_cdb(7, EA, p.len() as u32), &p).unwrap();
    assert_eq!(keys(&mut s).1, vec![5]);
    assert_eq!(reservation(&mut s), Some((5, EA)));
    assert_eq!(s.precheck(2, &write10()), None);
    assert_eq!(
        s.precheck(1, &read10()),
        Some(CmdError::ReservationConflict)
    );
}

#[test]
fn registration_table_is_bounded() {
    let mut s = lun();
    for i in 0..crate::pr::MAX_REGISTRATIONS as u64 {
        let id = 100 + i;
        s.nexus_added(&nexus(id, I1, i, 1));
        s.nexuses.get_mut(&id).unwrap().ua.clear();
        prout(&mut s, id, 6, 0, 0, 1 + i).unwrap();
    }
    let r = prout(&mut s, 1, 6, 0, 0, 9);
    assert_sense(r, SenseKey::IllegalRequest, 0x55, 4);
}

#[test]
fn aptpl_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut inf = info();
    inf.pr_file = Some(dir.path().join("lun0.pr"));
    let mut s = lun_with(inf.clone());
    let caps_d = run(&mut s, 1, &prin(2), &[]).unwrap();
    assert_eq!(caps_d[2] & 0x01, 0x01, "PTPL_C");
    run(&mut s, 1, &prout_cdb(6, 0, 24), &params(0, 0xaa, 0x01)).unwrap();
    run(&mut s, 2, &prout_cdb(6, 0, 24), &params(0, 0xbb, 0x05)).unwrap();
    prout(&mut s, 1, 1, WE_RO, 0xaa, 0).unwrap();
    let before = (keys(&mut s), reservation(&mut s), full_status(&mut s));
    assert!(inf.pr_file.as_ref().unwrap().exists());

    let mut s2 = lun_with(inf.clone());
    assert_eq!(
        (keys(&mut s2), reservation(&mut s2), full_status(&mut s2)),
        before
    );
    assert_eq!(run(&mut s2, 1, &prin(2), &[]).unwrap()[3] & 1, 1, "PTPL_A");
    assert_eq!(s2.precheck(1, &write10()), None);
    drain_uas(&mut s2);

    // APTPL=0 in a later REGISTER forgets the saved state.
    run(&mut s2, 1, &prout_cdb(0, 0, 24), &params(0xaa, 0xac, 0)).unwrap();
    assert!(!inf.pr_file.as_ref().unwrap().exists());
    let mut s3 = lun_with(inf.clone());
    assert_eq!(keys(&mut s3), (0, vec![]));

    std::fs::write(inf.pr_file.as_ref().unwrap(), "garbage\n").unwrap();
    assert!(SpcState::new(&inf, caps()).is_err());
}

/// A state that cannot be saved is not promised: the PERSISTENT RESERVE
/// OUT fails with HARDWARE ERROR and the registrations stay as they were.
#[test]
fn aptpl_state_that_cannot_be_saved_is_refused_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    let mut inf = info();
    let p = dir.path().join("sub").join("lun0.pr");
    std::fs::create_dir(p.parent().unwrap()).unwrap();
    inf.pr_file = Some(p.clone());
    let mut s = lun_with(inf.clone());
    run(&mut s, 1, &prout_cdb(6, 0, 24), &params(0, 0xaa, 0x01)).unwrap();
    let saved = std::fs::read(&p).unwrap();
    let before = keys(&mut s);
    // The directory gone: neither the new file nor its rename can be made.
    std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    let r = run(&mut s, 2, &prout_cdb(6, 0, 24), &params(0, 0xbb, 0x01));
    assert_sense(r, SenseKey::HardwareError, 0x44, 0);
    assert_eq!(keys(&mut s), before);
    std::fs::create_dir(p.parent().unwrap()).unwrap();
    std::fs::write(&p, &saved).unwrap();
    run(&mut s, 2, &prout_cdb(6, 0, 24), &params(0, 0xbb, 0x01)).unwrap();
    let mut s2 = lun_with(inf);
    assert_eq!(keys(&mut s2).1.len(), 2);
}

#[test]
fn classify_matches_sbc_table() {
    use crate::pr::{classify, Access};
    assert_eq!(classify(&read10()), Access::Read);
    assert_eq!(classify(&write10()), Access::Write);
    assert_eq!(classify(&[0x9e, 0x10]), Access::Allowed);
    assert_eq!(classify(&[0x9e, 0x12]), Access::Read);
    assert_eq!(classify(&[0x1a, 0, 0x3f, 0, 255, 0]), Access::Write);
    assert_eq!(classify(&[0x1b, 0, 0, 0, 0x01, 0]), Access::Allowed);
    assert_eq!(classify(&[0x1b, 0, 0, 0, 0x00, 0]), Access::Write);
    assert_eq!(classify(&[0x35]), Access::Write);
}

/// Random CDBs and parameter lists never panic.
#[test]
fn fuzz_no_panic() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::default();
    let ops = prop::sample::select(vec![
        0x00u8, 0x03, 0x12, 0x15, 0x16, 0x17, 0x1a, 0x55, 0x56, 0x57, 0x5a, 0x5e, 0x5f, 0xa3,
    ]);
    runner
        .run(
            &(
                ops,
                prop::collection::vec(any::<u8>(), 0..16),
                prop::collection::vec(any::<u8>(), 0..80),
            ),
            |(op, mut cdb, data)| {
                cdb.insert(0, op);
                let mut s = lun();
                let mut din = DataBuf::new();
                let _ = s.precheck(1, &cdb);
                let _ = s.execute(1, &cdb, &data, &mut din);
                Ok(())
            },
        )
        .unwrap();
}
