//! SBC commands exercised through `Lun` and `Target`: submit, poll, and
//! look at data, status and sense bytes.

use crate::backstore::{Backstore, MemBackstore};
use crate::common::{LunInfo, ScsiCompletion, ScsiTask};
use crate::lun::Lun;
use crate::stats::{IoCounters, IoKind};
use crate::status;
use crate::target::{decode_lun, encode_lun, Target};
use mempool::DataBuf;
use proptest::prelude::*;

const BS: u32 = 512;

fn info(blocks: u64, thin: bool, ro: bool) -> LunInfo {
    LunInfo {
        thin_provisioned: thin,
        read_only: ro,
        ..LunInfo::for_tests(BS, blocks)
    }
}

fn mem_lun(blocks: u64) -> Lun {
    Lun::new(
        info(blocks, true, false),
        Box::new(MemBackstore::new(blocks * BS as u64).unwrap()),
    )
    .unwrap()
}

fn task(tag: u64, cdb: &[u8], data_out: DataBuf) -> ScsiTask {
    ScsiTask {
        tag,
        nexus: 1,
        cdb: cdb.into(),
        edtl: data_out.len() as u32,
        data_out,
        ..Default::default()
    }
}

fn run(lun: &mut Lun, cdb: &[u8], data_out: DataBuf) -> ScsiCompletion {
    lun.submit(task(99, cdb, data_out));
    let mut out = Vec::new();
    // Backstores that complete in the background (a file on io_uring)
    // may need a few polls; the others answer on the first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lun.poll(&mut out) == 0 {
        assert!(std::time::Instant::now() < deadline, "no completion");
        std::thread::yield_now();
    }
    assert_eq!(out.len(), 1);
    assert_eq!(lun.in_flight(), 0);
    out.pop().unwrap()
}

/// (key, asc, ascq) of fixed-format sense.
fn sense(c: &ScsiCompletion) -> (u8, u8, u8) {
    assert_eq!(c.status, status::CHECK_CONDITION, "{c:?}");
    (c.sense[2] & 0xf, c.sense[12], c.sense[13])
}

fn ok(c: &ScsiCompletion) {
    assert_eq!(c.status, status::GOOD, "sense {:02x?}", c.sense);
}

fn cdb10(op: u8, b1: u8, lba: u32, n: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[1] = b1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn cdb16(op: u8, b1: u8, lba: u64, n: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = b1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

fn write10(lun: &mut Lun, lba: u32, data: DataBuf) {
    let n = (data.len() / BS as usize) as u16;
    ok(&run(lun, &cdb10(0x2a, 0, lba, n), data));
}

fn read10(lun: &mut Lun, lba: u32, n: u16) -> DataBuf {
    let c = run(lun, &cdb10(0x28, 0, lba, n), Vec::new().into());
    ok(&c);
    c.data_in
}

/// Whether REPORT SUPPORTED OPERATION CODES lists `op`: commands the SPC
/// table does not advertise are refused, so tests of them depend on it.
fn supported(lun: &mut Lun, op: u8) -> bool {
    let c = run(
        lun,
        &[0xa3, 0x0c, 0x01, op, 0, 0, 0, 0, 0, 255, 0, 0],
        Vec::new().into(),
    );
    ok(&c);
    c.data_in.get(1).is_some_and(|b| b & 7 == 3)
}

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    d[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    for &(lba, n) in ranges {
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
    }
    d
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
    c
}

#[test]
fn read_capacity() {
    let mut lun = mem_lun(1000);
    let c = run(
        &mut lun,
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Vec::new().into(),
    );
    ok(&c);
    assert_eq!(c.data_in, [0, 0, 0x03, 0xe7, 0, 0, 0x02, 0]);

    let mut cdb = cdb16(0x9e, 0x10, 0, 32);
    cdb[2..10].fill(0);
    let c = run(&mut lun, &cdb, Vec::new().into());
    ok(&c);
    assert_eq!(c.data_in.len(), 32);
    assert_eq!(&c.data_in[..8], &999u64.to_be_bytes());
    assert_eq!(&c.data_in[8..12], &BS.to_be_bytes());
    assert_eq!(c.data_in[13], 0);
    assert_eq!(c.data_in[14], 0xc0, "LBPME and LBPRZ");

    // Allocation length truncates.
    let c = run(&mut lun, &cdb16(0x9e, 0x10, 0, 12), Vec::new().into());
    ok(&c);
    assert_eq!(c.data_in.len(), 12);

    // Unknown service action points at byte 1.
    let c = run(&mut lun, &cdb16(0x9e, 0x1f, 0, 32), Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    assert_eq!(&c.sense[15..18], &[0xcc, 0, 1]);
}

#[test]
fn read_capacity10_saturates() {
    let blocks = 0x1_0000_0005u64;
    // A null backstore of any size costs nothing.
    let b = crate::backstore::NullBackstore::new(blocks * BS as u64);
    let mut lun = Lun::new(info(blocks, false, false), Box::new(b)).unwrap();
    let c = run(
        &mut lun,
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Vec::new().into(),
    );
    assert_eq!(&c.data_in[..4], &[0xff; 4]);
    let c = run(&mut lun, &cdb16(0x9e, 0x10, 0, 32), Vec::new().into());
    assert_eq!(&c.data_in[..8], &(blocks - 1).to_be_bytes());
    assert_eq!(c.data_in[14], 0, "not thin");
}

#[test]
fn read_write_all_sizes() {
    let mut lun = mem_lun(2048);
    let data: DataBuf = (0..4 * BS).map(|i| (i % 251) as u8).collect();
    write10(&mut lun, 10, data.clone());
    assert_eq!(read10(&mut lun, 10, 4), data);

    // READ (6): LBA 21 bits, length 4.
    let c = run(&mut lun, &[0x08, 0, 0, 10, 4, 0], Vec::new().into());
    ok(&c);
    assert_eq!(c.data_in, data);
    // READ (12) and (16).
    let mut c12 = [0u8; 12];
    c12[0] = 0xa8;
    c12[5] = 11;
    c12[9] = 2;
    let c = run(&mut lun, &c12, Vec::new().into());
    ok(&c);
    assert_eq!(c.data_in, &data[BS as usize..3 * BS as usize]);
    let c = run(&mut lun, &cdb16(0x88, 0x18, 13, 1), Vec::new().into());
    ok(&c);
    assert_eq!(c.data_in, &data[3 * BS as usize..]);

    // WRITE (6) with length 0 moves 256 blocks.
    let big = vec![0x77u8; 256 * BS as usize];
    let c = run(&mut lun, &[0x0a, 0, 0x01, 0x00, 0, 0], big.clone().into());
    ok(&c);
    assert_eq!(c.data_out_len, 256 * BS);
    assert_eq!(read10(&mut lun, 256, 256), big);

    // WRITE (16) with FUA, WRITE (12).
    let c = run(
        &mut lun,
        &cdb16(0x8a, 0x08, 2047, 1),
        vec![5; BS as usize].into(),
    );
    ok(&c);
    assert_eq!(read10(&mut lun, 2047, 1), vec![5; BS as usize]);
    let mut w12 = [0u8; 12];
    w12[0] = 0xaa;
    w12[5] = 1;
    w12[9] = 1;
    ok(&run(&mut lun, &w12, vec![6; BS as usize].into()));
    assert_eq!(read10(&mut lun, 1, 1), vec![6; BS as usize]);
}

#[test]
fn range_and_length_errors() {
    let mut lun = mem_lun(100);
    for cdb in [
        cdb10(0x28, 0, 100, 1).to_vec(),
        cdb10(0x28, 0, 99, 2).to_vec(),
        cdb10(0x28, 0, u32::MAX, 1).to_vec(),
        cdb16(0x88, 0, u64::MAX, 2).to_vec(),
        cdb16(0x88, 0, 1 << 63, 0).to_vec(),
        cdb10(0x2f, 0, 101, 0).to_vec(),
        cdb10(0x35, 0, 100, 1).to_vec(),
        cdb10(0x34, 0, 100, 1).to_vec(),
        cdb16(0x90, 0, 101, 0).to_vec(),
    ] {
        let c = run(&mut lun, &cdb, Vec::new().into());
        assert_eq!(sense(&c), (5, 0x21, 0), "{cdb:02x?}");
    }
    let c = run(
        &mut lun,
        &cdb10(0x2a, 0, 100, 1),
        vec![0; BS as usize].into(),
    );
    assert_eq!(sense(&c), (5, 0x21, 0));
    assert_eq!(c.data_out_len, BS);

    // Zero-length transfers at the end are fine.
    let c = run(&mut lun, &cdb10(0x28, 0, 100, 0), Vec::new().into());
    ok(&c);
    assert!(c.data_in.is_empty());
    ok(&run(&mut lun, &cdb10(0x2a, 0, 100, 0), Vec::new().into()));

    // Beyond MAXIMUM TRANSFER LENGTH.
    let mut lun = mem_lun(8192);
    let c = run(&mut lun, &cdb10(0x28, 0, 0, 4097), Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    // RDPROTECT/WRPROTECT without protection information.
    let c = run(&mut lun, &cdb10(0x28, 0x20, 0, 1), Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    let c = run(&mut lun, &cdb10(0x2a, 0x40, 0, 1), vec![0; 512].into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    // DPO/FUA/FUA_NV are fine.
    ok(&run(&mut lun, &cdb10(0x28, 0x1a, 0, 1), Vec::new().into()));
    // SYNCHRONIZE CACHE and PRE-FETCH.
    ok(&run(&mut lun, &cdb10(0x35, 0, 0, 0), Vec::new().into()));
    ok(&run(
        &mut lun,
        &cdb16(0x91, 0, 8000, 192),
        Vec::new().into(),
    ));
    ok(&run(&mut lun, &cdb10(0x34, 0, 8191, 1), Vec::new().into()));
    // WRITE SAME is limited to what one transfer could move.
    let c = run(
        &mut lun,
        &cdb16(0x93, 0, 0, 4097),
        vec![1; BS as usize].into(),
    );
    assert_eq!(sense(&c), (5, 0x24, 0));
}

#[test]
fn short_data_out_writes_whole_blocks_only() {
    let mut lun = mem_lun(16);
    write10(&mut lun, 0, vec![b'a'; 2 * BS as usize].into());
    // Two blocks asked, one sent.
    let c = run(
        &mut lun,
        &cdb10(0x2a, 0, 0, 2),
        vec![b'b'; BS as usize].into(),
    );
    ok(&c);
    assert_eq!(c.data_out_len, 2 * BS);
    let d = read10(&mut lun, 0, 2);
    assert!(d[..BS as usize].iter().all(|&x| x == b'b'));
    assert!(d[BS as usize..].iter().all(|&x| x == b'a'));
    // Part of a block: nothing written.
    ok(&run(
        &mut lun,
        &cdb10(0x2a, 0, 1, 1),
        vec![b'c'; 200].into(),
    ));
    assert!(read10(&mut lun, 1, 1).iter().all(|&x| x == b'a'));
    // More than asked: only the CDB's blocks.
    let c = run(
        &mut lun,
        &cdb10(0x2a, 0, 0, 1),
        vec![b'd'; 2 * BS as usize].into(),
    );
    ok(&c);
    assert_eq!(c.data_out_len, BS);
    assert!(read10(&mut lun, 1, 1).iter().all(|&x| x == b'a'));
}

#[test]
fn read_only_and_unknown() {
    let b = MemBackstore::new(64 * BS as u64).unwrap();
    let mut lun = Lun::new(info(64, true, true), Box::new(b)).unwrap();
    for (cdb, d) in [
        (cdb10(0x2a, 0, 0, 1).to_vec(), vec![0; 512]),
        (cdb10(0x41, 0, 0, 1).to_vec(), vec![0; 512]),
        (unmap_cdb(24).to_vec(), unmap_list(&[(0, 1)])),
        (cdb16(0x89, 0, 0, 0).to_vec(), vec![]),
    ] {
        let c = run(&mut lun, &cdb, d.into());
        assert_eq!(sense(&c), (7, 0x27, 0));
    }
    ok(&run(&mut lun, &cdb10(0x28, 0, 0, 1), Vec::new().into()));
    let c = run(&mut lun, &[0xc7, 0, 0, 0, 0, 0], Vec::new().into());
    assert_eq!(sense(&c), (5, 0x20, 0));
    let c = run(&mut lun, &[], Vec::new().into());
    assert_eq!(sense(&c), (5, 0x20, 0));
}

#[test]
fn verify_and_write_verify() {
    let mut lun = mem_lun(64);
    let data: DataBuf = (0..2 * BS).map(|i| i as u8).collect();
    write10(&mut lun, 4, data.clone());
    // BYTCHK 0: range only.
    ok(&run(&mut lun, &cdb10(0x2f, 0, 4, 2), Vec::new().into()));
    // BYTCHK 1 match and mismatch.
    let c = run(&mut lun, &cdb10(0x2f, 0x02, 4, 2), data.clone());
    ok(&c);
    assert!(c.data_in.is_empty());
    let mut bad = data.clone();
    bad[700] ^= 1;
    let c = run(&mut lun, &cdb10(0x2f, 0x02, 4, 2), bad);
    assert_eq!(sense(&c), (0xe, 0x1d, 0));
    assert_eq!(c.sense[0], 0xf0, "VALID set");
    assert_eq!(&c.sense[3..7], &700u32.to_be_bytes());
    // BYTCHK 3: one block against each block.
    write10(&mut lun, 10, vec![9; 3 * BS as usize].into());
    ok(&run(
        &mut lun,
        &cdb16(0x8f, 0x06, 10, 3),
        vec![9; BS as usize].into(),
    ));
    let c = run(
        &mut lun,
        &cdb16(0x8f, 0x06, 9, 3),
        vec![9; BS as usize].into(),
    );
    assert_eq!(sense(&c), (0xe, 0x1d, 0));
    assert_eq!(&c.sense[3..7], &0u32.to_be_bytes());
    // VRPROTECT, BYTCHK 2.
    let c = run(&mut lun, &cdb10(0x2f, 0x20, 4, 1), Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    let c = run(&mut lun, &cdb10(0x2f, 0x04, 4, 1), Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));

    // WRITE AND VERIFY with and without BYTCHK.
    ok(&run(
        &mut lun,
        &cdb10(0x2e, 0x02, 20, 1),
        vec![3; BS as usize].into(),
    ));
    ok(&run(
        &mut lun,
        &cdb16(0x8e, 0x10, 21, 1),
        vec![4; BS as usize].into(),
    ));
    assert_eq!(read10(&mut lun, 20, 2)[BS as usize], 4);
}

#[test]
fn compare_and_write() {
    let mut lun = mem_lun(64);
    write10(&mut lun, 5, vec![b'A'; 2 * BS as usize].into());
    let mut d = vec![b'A'; 2 * BS as usize];
    d.extend(vec![b'B'; 2 * BS as usize]);
    let mut cdb = cdb16(0x89, 0, 5, 0);
    cdb[13] = 2;
    let c = run(&mut lun, &cdb, d.clone().into());
    ok(&c);
    assert_eq!(c.data_out_len, 4 * BS);
    assert!(read10(&mut lun, 5, 2).iter().all(|&x| x == b'B'));
    // Now it miscompares at the first byte; nothing is written.
    let c = run(&mut lun, &cdb, d.clone().into());
    assert_eq!(sense(&c), (0xe, 0x1d, 0));
    assert_eq!(&c.sense[3..7], &0u32.to_be_bytes());
    let mut d2 = vec![b'B'; 2 * BS as usize];
    d2[2 * BS as usize - 27] = b'C';
    d2.extend(vec![b'Z'; 2 * BS as usize]);
    let c = run(&mut lun, &cdb, d2.into());
    assert_eq!(sense(&c), (0xe, 0x1d, 0));
    assert_eq!(&c.sense[3..7], &(2 * BS - 27).to_be_bytes());
    assert!(read10(&mut lun, 5, 2).iter().all(|&x| x == b'B'));
    // Wrong data-out size, too many blocks, beyond the end.
    let c = run(&mut lun, &cdb, vec![b'B'; 3 * BS as usize].into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    // 256 blocks wrapped to 0 in the CDB, with their data-out.
    let mut zero = cdb;
    zero[13] = 0;
    let c = run(&mut lun, &zero, vec![0; 512 * BS as usize].into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    ok(&run(&mut lun, &zero, Vec::new().into()));
    let mut big = cdb;
    big[13] = 255;
    let c = run(&mut lun, &big, Vec::new().into());
    assert_eq!(sense(&c), (5, 0x21, 0));
    let mut eol = cdb16(0x89, 0, 63, 0);
    eol[13] = 2;
    let c = run(&mut lun, &eol, vec![0; 4 * BS as usize].into());
    assert_eq!(sense(&c), (5, 0x21, 0));
}

#[test]
fn write_same_and_unmap() {
    let mut lun = mem_lun(8192);
    // 3000 blocks of one pattern: more than one internal piece.
    let mut blk = vec![0u8; BS as usize];
    blk[0] = 0xab;
    blk[511] = 0xcd;
    ok(&run(
        &mut lun,
        &cdb16(0x93, 0, 100, 3000),
        blk.clone().into(),
    ));
    for lba in [100u32, 2000, 3099] {
        assert_eq!(read10(&mut lun, lba, 1), blk);
    }
    assert!(read10(&mut lun, 3100, 1).iter().all(|&x| x == 0));
    // UNMAP bit deallocates, whatever the block holds.
    ok(&run(
        &mut lun,
        &cdb10(0x41, 0x08, 100, 10),
        vec![0xff; 512].into(),
    ));
    assert!(read10(&mut lun, 100, 10).iter().all(|&x| x == 0));
    // NDOB writes zeros without data-out.
    let c = run(&mut lun, &cdb16(0x93, 0x01, 110, 5), Vec::new().into());
    ok(&c);
    assert_eq!(c.data_out_len, 0);
    assert!(read10(&mut lun, 110, 5).iter().all(|&x| x == 0));
    assert_eq!(read10(&mut lun, 115, 1), blk);
    // Zero blocks (WSNZ), ANCHOR, bad data-out sizes, beyond the end.
    for (cdb, d) in [
        (cdb10(0x41, 0, 0, 0).to_vec(), blk.clone()),
        (cdb10(0x41, 0x18, 0, 1).to_vec(), blk.clone()),
        (cdb10(0x41, 0x08, 0, 1).to_vec(), vec![0; 256]),
        (cdb10(0x41, 0x08, 0, 1).to_vec(), vec![0; 1024]),
        (cdb10(0x41, 0x20, 0, 1).to_vec(), blk.clone()),
    ] {
        let c = run(&mut lun, &cdb, d.into());
        assert_eq!(sense(&c), (5, 0x24, 0), "{cdb:02x?}");
    }
    let c = run(&mut lun, &cdb10(0x41, 0, 8192, 1), blk.clone().into());
    assert_eq!(sense(&c), (5, 0x21, 0));
    // Zero blocks past the end: the LBA is what is wrong.
    let c = run(&mut lun, &cdb16(0x93, 0, 1 << 63, 0), blk.clone().into());
    assert_eq!(sense(&c), (5, 0x21, 0));
    let c = run(&mut lun, &cdb10(0x41, 0, 8193, 0), blk.clone().into());
    assert_eq!(sense(&c), (5, 0x21, 0));

    // UNMAP: several descriptors.
    write10(&mut lun, 0, vec![1; 8 * BS as usize].into());
    let list = unmap_list(&[(1, 2), (5, 1), (7, 0)]);
    let c = run(&mut lun, &unmap_cdb(list.len()), list.into());
    ok(&c);
    let d = read10(&mut lun, 0, 8);
    let z: Vec<bool> = d.chunks(BS as usize).map(|b| b[0] == 0).collect();
    assert_eq!(z, [false, true, true, false, false, true, false, false]);
    // Empty list, no parameter data.
    ok(&run(&mut lun, &unmap_cdb(0), Vec::new().into()));
    let l = unmap_list(&[]);
    ok(&run(&mut lun, &unmap_cdb(l.len()), l.into()));
    let l = unmap_list(&[(8192, 0)]);
    ok(&run(&mut lun, &unmap_cdb(l.len()), l.into()));
    // Errors.
    let l = unmap_list(&[(8191, 2)]);
    assert_eq!(
        sense(&run(&mut lun, &unmap_cdb(l.len()), l.into())),
        (5, 0x21, 0)
    );
    let l = unmap_list(&[(0, 1); 9]);
    assert_eq!(
        sense(&run(&mut lun, &unmap_cdb(l.len()), l.into())),
        (5, 0x26, 0)
    );
    let l = unmap_list(&[(0, 4097)]);
    assert_eq!(
        sense(&run(&mut lun, &unmap_cdb(l.len()), l.into())),
        (5, 0x26, 0)
    );
    let c = run(&mut lun, &unmap_cdb(4), vec![0; 4].into());
    assert_eq!(sense(&c), (5, 0x1a, 0));
    let mut anchor = unmap_cdb(24);
    anchor[1] = 1;
    let c = run(&mut lun, &anchor, unmap_list(&[(0, 1)]).into());
    assert_eq!(sense(&c), (5, 0x24, 0));

    // Without thin provisioning there is no UNMAP and no UNMAP bit.
    let b = MemBackstore::new(64 * BS as u64).unwrap();
    let mut thick = Lun::new(info(64, false, false), Box::new(b)).unwrap();
    let l = unmap_list(&[(0, 1)]);
    assert_eq!(
        sense(&run(&mut thick, &unmap_cdb(l.len()), l.into())),
        (5, 0x20, 0)
    );
    let c = run(&mut thick, &cdb10(0x41, 0x08, 0, 1), blk.into());
    assert_eq!(sense(&c), (5, 0x24, 0));
}

#[test]
fn get_lba_status() {
    let chunk = MemBackstore::CHUNK / BS as u64;
    let blocks = chunk * 8;
    let mut lun = mem_lun(blocks);
    let status = |lun: &mut Lun, lba: u64| {
        let c = run(lun, &cdb16(0x9e, 0x12, lba, 1024), Vec::new().into());
        ok(&c);
        let n = (c.data_in.len() - 8) / 16;
        assert_eq!(
            u32::from_be_bytes(c.data_in[0..4].try_into().unwrap()) as usize,
            4 + 16 * n
        );
        (0..n)
            .map(|i| {
                let d = &c.data_in[8 + 16 * i..24 + 16 * i];
                (
                    u64::from_be_bytes(d[0..8].try_into().unwrap()),
                    u32::from_be_bytes(d[8..12].try_into().unwrap()) as u64,
                    d[12],
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(status(&mut lun, 0), [(0, blocks, 1)]);
    write10(&mut lun, (2 * chunk) as u32, vec![1; BS as usize].into());
    assert_eq!(
        status(&mut lun, 1),
        [
            (1, 2 * chunk - 1, 1),
            (2 * chunk, chunk, 0),
            (3 * chunk, 5 * chunk, 1)
        ]
    );
    assert_eq!(
        status(&mut lun, 2 * chunk + 3)[0],
        (2 * chunk + 3, chunk - 3, 0)
    );
    let l = unmap_list(&[(2 * chunk, chunk as u32)]);
    ok(&run(&mut lun, &unmap_cdb(l.len()), l.into()));
    assert_eq!(status(&mut lun, 5), [(5, blocks - 5, 1)]);
    let c = run(
        &mut lun,
        &cdb16(0x9e, 0x12, blocks, 1024),
        Vec::new().into(),
    );
    assert_eq!(sense(&c), (5, 0x21, 0));
    let c = run(
        &mut lun,
        &cdb16(0x9e, 0x12, u64::MAX, 1024),
        Vec::new().into(),
    );
    assert_eq!(sense(&c), (5, 0x21, 0));
    let c = run(&mut lun, &cdb16(0x9e, 0x12, 0, 4), Vec::new().into());
    ok(&c);
    assert_eq!(c.data_in.len(), 4);
}

#[test]
fn start_stop_and_orwrite() {
    let mut lun = mem_lun(16);
    ok(&run(&mut lun, &[0x1b, 1, 0, 0, 1, 0], Vec::new().into()));
    ok(&run(&mut lun, &[0x1b, 0, 0, 0, 0, 0], Vec::new().into()));
    let c = run(&mut lun, &[0x1b, 1, 0, 0, 2, 0], Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));

    let unsupported = |lun: &mut Lun, cdb: &[u8], d: DataBuf| {
        assert_eq!(sense(&run(lun, cdb, d)), (5, 0x20, 0), "{cdb:02x?}");
    };
    let rdd10 = [0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0];
    let rdd12 = [0xb7, 0x0d, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    if supported(&mut lun, 0x37) {
        let c = run(&mut lun, &rdd10, Vec::new().into());
        ok(&c);
        assert_eq!(c.data_in, [0, 0x18, 0, 0]);
    } else {
        unsupported(&mut lun, &rdd10, Vec::new().into());
    }
    if supported(&mut lun, 0xb7) {
        let c = run(&mut lun, &rdd12, Vec::new().into());
        ok(&c);
        assert_eq!(c.data_in, [0, 0x0d, 0, 0, 0, 0, 0, 0]);
    } else {
        unsupported(&mut lun, &rdd12, Vec::new().into());
    }

    write10(&mut lun, 0, vec![0x0f; BS as usize].into());
    let orw = cdb16(0x8b, 0, 0, 1);
    if supported(&mut lun, 0x8b) {
        ok(&run(&mut lun, &orw, vec![0xf0; BS as usize].into()));
        assert!(read10(&mut lun, 0, 1).iter().all(|&x| x == 0xff));
    } else {
        unsupported(&mut lun, &orw, vec![0xf0; BS as usize].into());
    }
    // WRITE ATOMIC (16): length at bytes 12-13, no boundary.
    let mut wa = cdb16(0x9c, 0, 3, 0);
    wa[13] = 2;
    if supported(&mut lun, 0x9c) {
        ok(&run(&mut lun, &wa, vec![8; 2 * BS as usize].into()));
        assert!(read10(&mut lun, 3, 2).iter().all(|&x| x == 8));
        // Past the end is reported as such even beyond the atomic limit.
        let mut eol = cdb16(0x9c, 0, 15, 0);
        eol[12] = 1;
        eol[13] = 2;
        let c = run(&mut lun, &eol, vec![8; 258 * BS as usize].into());
        assert_eq!(sense(&c), (5, 0x21, 0));
        wa[11] = 1;
        assert_eq!(
            sense(&run(&mut lun, &wa, vec![8; 2 * BS as usize].into())),
            (5, 0x24, 0)
        );
    } else {
        unsupported(&mut lun, &wa, vec![8; 2 * BS as usize].into());
    }
}

#[test]
fn range_lock_orders_overlapping_commands() {
    let mut lun = mem_lun(64);
    // Submitted together before any poll: the read waits for the write
    // and must see its data; the CAW then sees the write too.
    lun.submit(task(
        1,
        &cdb10(0x2a, 0, 0, 2),
        vec![7; 2 * BS as usize].into(),
    ));
    lun.submit(task(2, &cdb10(0x28, 0, 1, 1), Vec::new().into()));
    let mut caw = cdb16(0x89, 0, 1, 0);
    caw[13] = 1;
    let mut d = vec![7u8; BS as usize];
    d.extend(vec![8u8; BS as usize]);
    lun.submit(task(3, &caw, d.into()));
    lun.submit(task(4, &cdb10(0x28, 0, 1, 1), Vec::new().into()));
    // Aborting a task that waits for its lock drops it for good.
    assert_eq!(lun.in_flight(), 4);
    assert!(lun.abort(1, 4));
    assert!(!lun.abort(1, 4));
    assert!(lun.has_task(1, 3));
    assert_eq!(lun.in_flight(), 3);
    let mut out = Vec::new();
    lun.poll(&mut out);
    out.sort_by_key(|c| c.tag);
    assert_eq!(out.len(), 3);
    out.iter().for_each(ok);
    assert_eq!(out[1].data_in, vec![7; BS as usize]);
    assert_eq!(read10(&mut lun, 1, 1), vec![8; BS as usize]);

    // A LUN reset drops everything without completions.
    lun.submit(task(5, &cdb10(0x28, 0, 1, 1), Vec::new().into()));
    lun.submit(task(6, &cdb10(0x2a, 0, 1, 1), vec![1; BS as usize].into()));
    lun.reset(1);
    assert_eq!(lun.in_flight(), 0);
    assert_eq!(lun.poll(&mut out), 0);
    // The reset leaves a unit attention for the nexus (SPC side); the
    // next command takes it.
    let c = run(&mut lun, &[0, 0, 0, 0, 0, 0], Vec::new().into());
    assert!(c.status == status::GOOD || sense(&c) == (6, 0x29, 0x03));
    assert_eq!(read10(&mut lun, 1, 1), vec![8; BS as usize]);
}

#[test]
fn task_set_full() {
    let mut lun = mem_lun(64);
    for i in 0..crate::lun::MAX_TASKS as u64 + 1 {
        lun.submit(task(i, &cdb10(0x28, 0, 0, 1), Vec::new().into()));
    }
    let mut out = Vec::new();
    lun.poll(&mut out);
    assert_eq!(out.len(), crate::lun::MAX_TASKS + 1);
    let full = out.iter().filter(|c| c.status == status::TASK_SET_FULL);
    assert_eq!(full.count(), 1);
}

#[test]
fn target_luns() {
    assert_eq!(decode_lun(0), Some(0));
    assert_eq!(decode_lun(0x0005_0000_0000_0000), Some(5));
    assert_eq!(decode_lun(0x4123_0000_0000_0000), Some(0x123));
    assert_eq!(decode_lun(0x0100_0000_0000_0000), None);
    assert_eq!(decode_lun(0x0000_0000_0000_0001), None);
    for l in [0, 7, 255, 256, 0x3fff] {
        assert_eq!(decode_lun(encode_lun(l)), Some(l));
    }

    let mut t = Target::new();
    let mut i3 = info(32, false, false);
    i3.lun = 300;
    t.add_lun(mem_lun(32));
    t.add_lun(Lun::new(i3, Box::new(MemBackstore::new(32 * 512).unwrap())).unwrap());
    assert!(t.has_lun(0));
    assert!(t.has_lun(encode_lun(300)));
    assert!(!t.has_lun(encode_lun(1)));

    let go = |t: &mut Target, raw: u64, cdb: &[u8]| {
        t.submit(raw, task(1, cdb, Vec::new().into()));
        let mut out = Vec::new();
        assert_eq!(t.poll(&mut out), 1);
        out.pop().unwrap()
    };
    let rl = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let c = go(&mut t, encode_lun(9), &rl);
    ok(&c);
    assert_eq!(&c.data_in[..8], &[0, 0, 0, 16, 0, 0, 0, 0]);
    assert_eq!(&c.data_in[8..16], &[0; 8]);
    assert_eq!(&c.data_in[16..18], &[0x41, 0x2c]);
    let c = go(&mut t, 0, &[0xa0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(&c.data_in, &[0; 8]);
    let c = go(&mut t, 0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0]);
    assert_eq!(sense(&c), (5, 0x24, 0));
    let c = go(&mut t, 0, &[0xa0, 0, 0x13, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(sense(&c), (5, 0x24, 0));

    let c = go(&mut t, encode_lun(1), &[0x12, 0, 0, 0, 96, 0]);
    ok(&c);
    assert_eq!(c.data_in.len(), 36);
    assert_eq!(c.data_in[0], 0x7f);
    let c = go(&mut t, encode_lun(1), &[0x03, 0, 0, 0, 252, 0]);
    ok(&c);
    assert_eq!((c.data_in[2], c.data_in[12]), (5, 0x25));
    let c = go(&mut t, encode_lun(1), &[0x00, 0, 0, 0, 0, 0]);
    assert_eq!(sense(&c), (5, 0x25, 0));
    let c = go(&mut t, encode_lun(300), &cdb10(0x28, 0, 31, 1));
    ok(&c);
    assert!(t.lun_reset(encode_lun(300), 1));
    assert!(!t.lun_reset(encode_lun(2), 1));
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Read(u64, u64),
    Unmap(Vec<(u64, u64)>),
    WriteSame(u64, u64, u8, bool),
}

const MODEL_BLOCKS: u64 = 600;

fn op_strategy() -> impl Strategy<Value = Op> {
    let range = (0..MODEL_BLOCKS, 1..40u64).prop_map(|(l, n)| (l, n.min(MODEL_BLOCKS - l)));
    prop_oneof![
        (range.clone(), any::<u8>()).prop_map(|((l, n), v)| Op::Write(l, n, v)),
        range.clone().prop_map(|(l, n)| Op::Read(l, n)),
        proptest::collection::vec(range.clone(), 0..4).prop_map(Op::Unmap),
        (range, any::<u8>(), any::<bool>()).prop_map(|((l, n), v, u)| Op::WriteSame(l, n, v, u)),
    ]
}

fn op_task(tag: u64, op: &Op) -> ScsiTask {
    let b = BS as usize;
    match op {
        Op::Write(l, n, v) => task(
            tag,
            &cdb16(0x8a, 0, *l, *n as u32),
            vec![*v; *n as usize * b].into(),
        ),
        Op::Read(l, n) => task(tag, &cdb16(0x88, 0, *l, *n as u32), Vec::new().into()),
        Op::Unmap(r) => {
            let r: Vec<(u64, u32)> = r.iter().map(|&(l, n)| (l, n as u32)).collect();
            let l = unmap_list(&r);
            task(tag, &unmap_cdb(l.len()), l.into())
        }
        Op::WriteSame(l, n, v, u) => {
            let b1 = if *u { 0x08 } else { 0 };
            task(tag, &cdb16(0x93, b1, *l, *n as u32), vec![*v; b].into())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Batches of commands submitted together (so overlapping ones queue on
    /// range locks) agree with a flat byte-array model applied in order.
    #[test]
    fn model(batches in proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..6), 1..12)) {
        let b = BS as usize;
        let mut lun = mem_lun(MODEL_BLOCKS);
        let mut model = vec![0u8; MODEL_BLOCKS as usize * b];
        let mut tag = 0;
        for batch in batches {
            let mut expect = Vec::new();
            for op in &batch {
                tag += 1;
                lun.submit(op_task(tag, op));
                let r = |l: &u64, n: &u64| (*l as usize * b)..((*l + *n) as usize * b);
                match op {
                    Op::Write(l, n, v) => model[r(l, n)].fill(*v),
                    Op::Read(l, n) => expect.push((tag, model[r(l, n)].to_vec())),
                    Op::Unmap(rs) => rs.iter().for_each(|(l, n)| model[r(l, n)].fill(0)),
                    Op::WriteSame(l, n, v, u) => model[r(l, n)].fill(if *u { 0 } else { *v }),
                }
            }
            let mut out = Vec::new();
            lun.poll(&mut out);
            prop_assert_eq!(out.len(), batch.len());
            for c in &out {
                prop_assert_eq!(c.status, status::GOOD);
            }
            for (t, data) in expect {
                let c = out.iter().find(|c| c.tag == t).unwrap();
                prop_assert!(c.data_in == data, "read {} differs", t);
            }
        }
    }

    /// Any CDB, any data: no panic, exactly one completion.
    #[test]
    fn random_cdbs(cdbs in proptest::collection::vec(
        (proptest::collection::vec(any::<u8>(), 0..20),
         proptest::collection::vec(any::<u8>(), 0..2048),
         any::<bool>()), 1..20))
    {
        let mut t = Target::new();
        t.add_lun(mem_lun(256));
        let mut n = 0;
        // What the LUN's counters should say; REPORT LUNS is the target's.
        let mut kinds = [0u64; 3];
        let mut report_luns = Vec::new();
        for (i, (mut cdb, data, small)) in cdbs.into_iter().enumerate() {
            // Bias towards our opcodes and small LBAs so decoding gets deep.
            if small && cdb.len() > 9 {
                const OPS: [u8; 20] = [0x08, 0x0a, 0x28, 0x2a, 0x2e, 0x2f, 0x35, 0x41, 0x42,
                    0x88, 0x8a, 0x89, 0x8b, 0x8f, 0x93, 0x9c, 0x9e, 0xa0, 0x25, 0x34];
                cdb[0] = OPS[cdb[0] as usize % OPS.len()];
                cdb[2..9].fill(0);
            }
            match cdb.first() {
                Some(0xa0) => report_luns.push(i as u64),
                op => kinds[IoKind::from_opcode(op.copied().unwrap_or(0)) as usize] += 1,
            }
            t.submit(0, task(i as u64, &cdb, data.into()));
            n += 1;
        }
        let mut out = Vec::new();
        t.poll(&mut out);
        prop_assert_eq!(out.len(), n);
        prop_assert_eq!(t.in_flight(), 0);
        // Every completion counted once, as what its opcode says.
        let s = t.luns()[0].stats();
        prop_assert_eq!([s.reads, s.writes, s.other], kinds);
        prop_assert_eq!(s.latency.count(), (n - report_luns.len()) as u64);
        let failed = out
            .iter()
            .filter(|c| !report_luns.contains(&c.tag))
            .filter(|c| !matches!(c.status, status::GOOD | status::CONDITION_MET))
            .count();
        prop_assert_eq!(s.errors, failed as u64);
        prop_assert_eq!(s.aborted, 0);
    }
}

#[test]
fn lun_rejects_oversized_geometry() {
    let b = MemBackstore::new(1024).unwrap();
    assert!(Lun::new(info(3, false, false), Box::new(b)).is_err());
    let b = MemBackstore::new(1024).unwrap();
    assert_eq!(b.size_bytes(), 1024);
}

/// A backstore that, like an O_DIRECT file on a 4K-sector device, needs
/// 4096-byte aligned offsets and lengths.
struct Aligned4k(MemBackstore);

impl Backstore for Aligned4k {
    fn kind(&self) -> &'static str {
        "aligned"
    }
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn caps(&self) -> crate::BackstoreCaps {
        self.0.caps()
    }
    fn io_align(&self) -> u32 {
        4096
    }
    fn submit(&mut self, io: crate::Io) {
        self.0.submit(io)
    }
    fn poll(&mut self, out: &mut Vec<crate::IoDone>) -> usize {
        self.0.poll(out)
    }
}

#[test]
fn lun_refuses_block_size_below_backstore_alignment() {
    let b = Aligned4k(MemBackstore::new(1 << 20).unwrap());
    let e = Lun::new(info(2048, false, false), Box::new(b))
        .err()
        .unwrap();
    assert!(e.contains("4096-byte direct I/O alignment"), "{e}");
    let mut i = info(256, false, false);
    i.block_size = 4096;
    assert!(Lun::new(i, Box::new(Aligned4k(MemBackstore::new(1 << 20).unwrap()))).is_ok());
}

#[test]
fn file_lun_end_to_end() {
    use crate::backstore::FileBackstore;
    let dir = tempfile::tempdir().unwrap();
    let blocks = 8192u64; // 4 MiB
    let b = FileBackstore::open(&dir.path().join("lun"), Some(blocks * BS as u64)).unwrap();
    let mut lun = Lun::new(info(blocks, true, false), Box::new(b)).unwrap();
    // 1 MiB at 1 MiB: filesystem extents line up with it.
    write10(&mut lun, 2048, vec![0x11; 1024 * BS as usize].into());
    write10(&mut lun, 3072, vec![0x11; 1024 * BS as usize].into());
    let c = run(&mut lun, &cdb16(0x9e, 0x12, 0, 64), Vec::new().into());
    ok(&c);
    let d = &c.data_in;
    assert_eq!(&d[8..16], &0u64.to_be_bytes());
    assert_eq!(&d[16..20], &2048u32.to_be_bytes());
    assert_eq!(d[20], 1, "hole first");
    assert_eq!(&d[24..32], &2048u64.to_be_bytes());
    assert_eq!(d[36], 0, "then data");
    // WRITE SAME of zeros with UNMAP punches a hole that reads as zeros.
    ok(&run(
        &mut lun,
        &cdb16(0x93, 0x08, 2048, 256),
        vec![0; 512].into(),
    ));
    assert!(read10(&mut lun, 2048, 256).iter().all(|&x| x == 0));
    assert!(read10(&mut lun, 2304, 1).iter().all(|&x| x == 0x11));
    // Zero pattern without UNMAP goes through WRITE ZEROES.
    ok(&run(
        &mut lun,
        &cdb16(0x93, 0, 2304, 8),
        vec![0; 512].into(),
    ));
    assert!(read10(&mut lun, 2304, 8).iter().all(|&x| x == 0));
    ok(&run(&mut lun, &cdb10(0x35, 0, 0, 0), Vec::new().into()));
    ok(&run(
        &mut lun,
        &cdb10(0x2a, 0x08, 7, 1),
        vec![3; 512].into(),
    ));
    assert_eq!(read10(&mut lun, 7, 1), vec![3; 512]);
    assert_eq!(lun.shutdown(), Ok(()));
}

#[test]
fn write_same_zero_blocks_runs_to_the_end() {
    // WSNZ 0: NUMBER OF LOGICAL BLOCKS 0 covers LBA..end, within MAXIMUM
    // WRITE SAME LENGTH (4096 here: MAXIMUM TRANSFER LENGTH).
    let mut lun = mem_lun(8192);
    let blk = vec![0x5a; BS as usize];
    ok(&run(
        &mut lun,
        &cdb10(0x41, 0, 8192 - 4096, 0),
        blk.clone().into(),
    ));
    assert_eq!(read10(&mut lun, 8191, 1), blk);
    assert_eq!(read10(&mut lun, 4096, 1), blk);
    assert!(read10(&mut lun, 4095, 1).iter().all(|&x| x == 0));
    let c = run(
        &mut lun,
        &cdb16(0x93, 0, 8192 - 4097, 0),
        blk.clone().into(),
    );
    assert_eq!(sense(&c), (5, 0x24, 0));
    // With UNMAP it deallocates to the end.
    ok(&run(&mut lun, &cdb16(0x93, 0x08, 8000, 0), blk.into()));
    assert!(read10(&mut lun, 8000, 192).iter().all(|&x| x == 0));
}

fn removable_lun(blocks: u64) -> Lun {
    let mut i = info(blocks, true, false);
    i.removable = true;
    Lun::new(i, Box::new(MemBackstore::new(blocks * BS as u64).unwrap())).unwrap()
}

fn ssu(immed: bool, pc: u8, loej: bool, start: bool) -> [u8; 6] {
    [
        0x1b,
        immed as u8,
        0,
        0,
        (pc << 4) | (loej as u8) << 1 | start as u8,
        0,
    ]
}

#[test]
fn removable_medium_eject_load_and_prevent() {
    let mut lun = removable_lun(64);
    let c = run(&mut lun, &[0x12, 0, 0, 0, 96, 0], Vec::new().into());
    assert_eq!(c.data_in[1], 0x80, "RMB");
    assert!(supported(&mut lun, 0x1e));
    // Eject: medium access fails with MEDIUM NOT PRESENT, SPC does not.
    ok(&run(
        &mut lun,
        &ssu(true, 0, true, false),
        Vec::new().into(),
    ));
    for cdb in [
        vec![0u8; 6],
        cdb10(0x28, 0, 0, 1).to_vec(),
        vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        cdb16(0x9e, 0x12, 0, 24).to_vec(),
        cdb10(0x35, 0, 0, 1).to_vec(),
    ] {
        assert_eq!(
            sense(&run(&mut lun, &cdb, Vec::new().into())),
            (2, 0x3a, 0),
            "{cdb:02x?}"
        );
    }
    let c = run(&mut lun, &cdb10(0x2a, 0, 0, 1), vec![0; BS as usize].into());
    assert_eq!(sense(&c), (2, 0x3a, 0));
    ok(&run(&mut lun, &[0x12, 0, 0, 0, 96, 0], Vec::new().into()));
    // Ejecting again is fine; loading brings the medium back.
    ok(&run(
        &mut lun,
        &ssu(false, 0, true, false),
        Vec::new().into(),
    ));
    ok(&run(
        &mut lun,
        &ssu(false, 0, true, true),
        Vec::new().into(),
    ));
    ok(&run(&mut lun, &[0u8; 6], Vec::new().into()));
    // A power condition, or no LOEJ, leaves the medium alone.
    for pc in 1..16 {
        ok(&run(
            &mut lun,
            &ssu(true, pc, true, false),
            Vec::new().into(),
        ));
    }
    ok(&run(
        &mut lun,
        &ssu(false, 0, false, false),
        Vec::new().into(),
    ));
    ok(&run(&mut lun, &[0u8; 6], Vec::new().into()));
    // PREVENT: no eject from this or another I_T nexus until allowed.
    ok(&run(&mut lun, &[0x1e, 0, 0, 0, 1, 0], Vec::new().into()));
    assert_eq!(
        sense(&run(
            &mut lun,
            &ssu(false, 0, true, false),
            Vec::new().into()
        )),
        (5, 0x53, 2)
    );
    let mut t = task(7, &ssu(false, 0, true, false), Vec::new().into());
    t.nexus = 2;
    lun.submit(t);
    let mut out = Vec::new();
    lun.poll(&mut out);
    assert_eq!(sense(&out[0]), (5, 0x53, 2));
    ok(&run(&mut lun, &[0u8; 6], Vec::new().into()));
    // Loading is refused too while prevented.
    assert_eq!(
        sense(&run(
            &mut lun,
            &ssu(false, 0, true, true),
            Vec::new().into()
        )),
        (5, 0x53, 2)
    );
    let c = run(&mut lun, &[0x1e, 0, 0, 0, 2, 0], Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    ok(&run(&mut lun, &[0x1e, 0, 0, 0, 0, 0], Vec::new().into()));
    ok(&run(
        &mut lun,
        &ssu(false, 0, true, false),
        Vec::new().into(),
    ));
    ok(&run(
        &mut lun,
        &ssu(false, 0, true, true),
        Vec::new().into(),
    ));
}

#[test]
fn prevention_ends_with_the_nexus_and_on_reset() {
    use crate::common::Nexus;
    let mut lun = removable_lun(64);
    let n = |id| Nexus {
        id,
        initiator_name: format!("i{id}"),
        isid: id,
        target_name: "t".into(),
        tpgt: 1,
    };
    lun.nexus_added(&n(1));
    lun.nexus_added(&n(3));
    ok(&run(&mut lun, &[0x12, 0, 0, 0, 96, 0], Vec::new().into()));
    let _ = run(&mut lun, &[0u8; 6], Vec::new().into()); // POWER ON unit attention
    let prevent = |lun: &mut Lun, id| {
        let mut t = task(5, &[0x1e, 0, 0, 0, 1, 0], Vec::new().into());
        t.nexus = id;
        lun.submit(t);
        let mut out = Vec::new();
        lun.poll(&mut out);
        out.pop().unwrap()
    };
    // Nexus 3 still has its unit attention; the next command gets it.
    assert_eq!(sense(&prevent(&mut lun, 3)), (6, 0x29, 0));
    ok(&prevent(&mut lun, 3));
    assert_eq!(
        sense(&run(
            &mut lun,
            &ssu(false, 0, true, false),
            Vec::new().into()
        )),
        (5, 0x53, 2)
    );
    lun.nexus_removed(3);
    ok(&run(
        &mut lun,
        &ssu(false, 0, true, false),
        Vec::new().into(),
    ));
    ok(&run(
        &mut lun,
        &ssu(false, 0, true, true),
        Vec::new().into(),
    ));
    ok(&prevent(&mut lun, 1));
    lun.reset(1);
    assert_eq!(
        sense(&run(&mut lun, &[0u8; 6], Vec::new().into())),
        (6, 0x29, 3)
    );
    ok(&run(
        &mut lun,
        &ssu(false, 0, true, false),
        Vec::new().into(),
    ));
    // The medium stays out across a reset.
    lun.reset(1);
    let _ = run(&mut lun, &[0u8; 6], Vec::new().into());
    assert_eq!(
        sense(&run(&mut lun, &[0u8; 6], Vec::new().into())),
        (2, 0x3a, 0)
    );
}

#[test]
fn non_removable_lun_has_no_medium_to_eject() {
    let mut lun = mem_lun(16);
    assert!(!supported(&mut lun, 0x1e));
    let c = run(&mut lun, &[0x1e, 0, 0, 0, 1, 0], Vec::new().into());
    assert_eq!(sense(&c), (5, 0x20, 0));
    let c = run(&mut lun, &ssu(true, 0, true, false), Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    let c = run(&mut lun, &[0x12, 0, 0, 0, 96, 0], Vec::new().into());
    assert_eq!(c.data_in[1], 0);
}

fn sanitize_cdb(b1: u8, plen: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x48;
    c[1] = b1;
    c[7..9].copy_from_slice(&plen.to_be_bytes());
    c
}

#[test]
fn sanitize_overwrite_and_block_erase() {
    let mut lun = mem_lun(4096);
    lun.set_sanitize_rate(0);
    write10(&mut lun, 0, vec![0x61; 8 * BS as usize].into());
    // OVERWRITE with a 4-byte pattern, IMMED 0: completes when done.
    let param = vec![1, 0, 0, 4, 1, 2, 3, 4];
    ok(&run(&mut lun, &sanitize_cdb(0x01, 8), param.into()));
    let b = read10(&mut lun, 4095, 1);
    assert_eq!(&b[..8], &[1, 2, 3, 4, 1, 2, 3, 4]);
    assert_eq!(read10(&mut lun, 0, 1), b);
    // BLOCK ERASE deallocates everything.
    ok(&run(&mut lun, &sanitize_cdb(0x02, 0), Vec::new().into()));
    assert!(read10(&mut lun, 0, 8).iter().all(|&x| x == 0));
    let c = run(&mut lun, &cdb16(0x9e, 0x12, 0, 24), Vec::new().into());
    ok(&c);
    assert_eq!(
        &c.data_in[8..21],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 1]
    );
    // CRYPTOGRAPHIC ERASE is not offered; EXIT FAILURE MODE is harmless.
    let c = run(&mut lun, &sanitize_cdb(0x03, 0), Vec::new().into());
    assert_eq!(sense(&c), (5, 0x24, 0));
    ok(&run(&mut lun, &sanitize_cdb(0x1f, 0), Vec::new().into()));
    // Write protection and reservations apply.
    let mut ro = Lun::new(
        info(64, true, true),
        Box::new(MemBackstore::new(64 * BS as u64).unwrap()),
    )
    .unwrap();
    let c = run(&mut ro, &sanitize_cdb(0x02, 0), Vec::new().into());
    assert_eq!(sense(&c), (7, 0x27, 0));
}

#[test]
fn sanitize_in_progress_survives_aborts_and_resets() {
    let mut lun = mem_lun(8192); // 4 MiB: four chunks
    lun.set_sanitize_rate(1); // first chunk now, the rest much later
    lun.submit(task(
        40,
        &sanitize_cdb(0x01, 5),
        vec![1, 0, 0, 1, 0xee].into(),
    ));
    let mut out = Vec::new();
    assert_eq!(lun.poll(&mut out), 0);
    assert!(lun.has_task(1, 40));
    // The SANITIZE itself is in flight: commands complete beside it.
    let run = |lun: &mut Lun, cdb: &[u8], d: DataBuf| {
        lun.submit(task(41, cdb, d));
        let mut out = Vec::new();
        assert_eq!(lun.poll(&mut out), 1);
        out.pop().unwrap()
    };
    // Everything but INQUIRY and REQUEST SENSE: SANITIZE IN PROGRESS.
    for cdb in [
        vec![0u8; 6],
        cdb10(0x28, 0, 0, 1).to_vec(),
        ssu(true, 0, false, true).to_vec(),
    ] {
        assert_eq!(
            sense(&run(&mut lun, &cdb, Vec::new().into())),
            (2, 0x04, 0x1b)
        );
    }
    ok(&run(&mut lun, &[0x12, 0, 0, 0, 96, 0], Vec::new().into()));
    let c = run(&mut lun, &[0x03, 0, 0, 0, 18, 0], Vec::new().into());
    ok(&c);
    assert_eq!(
        (c.data_in[2], c.data_in[12], c.data_in[13]),
        (2, 0x04, 0x1b)
    );
    assert_eq!(c.data_in[15], 0x80, "progress indication");
    // The command goes with ABORT TASK; the operation stays.
    assert!(lun.abort(1, 40));
    assert!(!lun.has_task(1, 40));
    lun.reset(1);
    lun.nexus_removed(1);
    assert_eq!(lun.in_flight(), 0);
    assert_eq!(lun.stats().aborted, 1);
    let _ = run(&mut lun, &[0u8; 6], Vec::new().into());
    assert_eq!(
        sense(&run(&mut lun, &[0u8; 6], Vec::new().into())),
        (2, 0x04, 0x1b)
    );
    // Unpaced, it finishes at the next poll, and nothing completes for
    // the aborted command.
    lun.set_sanitize_rate(0);
    assert_eq!(lun.poll(&mut out), 0);
    ok(&run(&mut lun, &[0u8; 6], Vec::new().into()));
    assert_eq!(read10(&mut lun, 8191, 1), vec![0xee; BS as usize]);
}

#[test]
fn counters_by_kind_bytes_and_errors() {
    let mut lun = mem_lun(1024);
    let read = |lun: &mut Lun, lba: u32, n: u16, edtl: u32| {
        let mut t = task(1, &cdb10(0x28, 0, lba, n), Vec::new().into());
        t.edtl = edtl;
        lun.submit(t);
        let mut out = Vec::new();
        assert_eq!(lun.poll(&mut out), 1);
        out.pop().unwrap()
    };
    write10(&mut lun, 0, vec![1; 8 * BS as usize].into());
    ok(&read(&mut lun, 0, 4, 4 * BS));
    // A read with a smaller EDTL moves only EDTL bytes.
    let c = read(&mut lun, 0, 4, BS);
    ok(&c);
    assert_eq!(c.data_in.len(), 4 * BS as usize);
    // A short write moves what was sent.
    ok(&run(
        &mut lun,
        &cdb10(0x2a, 0, 8, 4),
        vec![2; 2 * BS as usize].into(),
    ));
    // Failures count, with no bytes: a read and a write past the end,
    // an opcode we do not know.
    assert_eq!(sense(&read(&mut lun, 1024, 1, BS)).0, 5);
    let c = run(
        &mut lun,
        &cdb10(0x2a, 0, 1023, 2),
        vec![3; 2 * BS as usize].into(),
    );
    assert_eq!(sense(&c).0, 5);
    assert_eq!(
        sense(&run(&mut lun, &[0xff, 0, 0, 0, 0, 0], Vec::new().into())).0,
        5
    );
    // TEST UNIT READY and WRITE SAME are neither reads nor writes.
    ok(&run(&mut lun, &[0u8; 6], Vec::new().into()));
    ok(&run(
        &mut lun,
        &cdb10(0x41, 0, 16, 8),
        vec![4; BS as usize].into(),
    ));

    let s = *lun.stats();
    assert_eq!((s.reads, s.writes, s.other), (3, 3, 3));
    assert_eq!(s.read_bytes, 5 * BS as u64);
    assert_eq!(s.write_bytes, 10 * BS as u64);
    assert_eq!((s.errors, s.aborted), (3, 0));
    assert_eq!(s.completions(), 9);
    assert_eq!(s.latency.count(), 9);
}

#[test]
fn aborted_commands_are_not_io() {
    let mut lun = mem_lun(1024);
    let mut out = Vec::new();
    // A read at the backstore and a TEST UNIT READY already answered.
    lun.submit(task(1, &cdb10(0x28, 0, 0, 1), Vec::new().into()));
    lun.submit(task(2, &[0u8; 6], Vec::new().into()));
    assert!(lun.abort(1, 1));
    assert!(lun.abort(1, 2));
    assert!(!lun.abort(1, 2));
    // A write waiting for the range lock of another write.
    lun.submit(task(3, &cdb10(0x2a, 0, 0, 1), vec![0; BS as usize].into()));
    lun.submit(task(4, &cdb10(0x2a, 0, 0, 1), vec![0; BS as usize].into()));
    assert!(lun.abort(1, 4));
    assert_eq!(lun.poll(&mut out), 1);
    // Lost with a reset, and with the I_T nexus.
    lun.submit(task(5, &cdb10(0x2a, 0, 0, 1), vec![0; BS as usize].into()));
    lun.reset(2);
    lun.submit(task(6, &cdb10(0x28, 0, 0, 1), Vec::new().into()));
    lun.nexus_removed(1);
    assert_eq!(lun.poll(&mut out), 0);
    assert_eq!(lun.in_flight(), 0);

    let s = lun.stats();
    assert_eq!(s.aborted, 5);
    assert_eq!((s.reads, s.writes, s.other), (0, 1, 0));
    assert_eq!(s.latency.count(), 1);
}

#[test]
fn latency_runs_from_submit_to_poll() {
    let mut lun = mem_lun(1024);
    lun.submit(task(1, &cdb10(0x28, 0, 0, 1), Vec::new().into()));
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut out = Vec::new();
    assert_eq!(lun.poll(&mut out), 1);
    let h = &lun.stats().latency;
    assert_eq!(h.count(), 1);
    assert!(h.max_us() >= 5000, "{}", h.max_us());
    assert!(h.percentile(50.0) >= 5000);
    assert!(h.mean_us() >= 5000.0);
}

#[test]
fn target_counters_per_lun() {
    let mut t = Target::new();
    let mut i3 = info(32, false, false);
    i3.lun = 3;
    t.add_lun(mem_lun(32));
    t.add_lun(Lun::new(i3, Box::new(MemBackstore::new(32 * 512).unwrap())).unwrap());
    let mut read = task(1, &cdb10(0x28, 0, 0, 2), Vec::new().into());
    read.edtl = 2 * BS;
    t.submit(encode_lun(3), read);
    // REPORT LUNS and commands to absent LUNs belong to no LUN.
    t.submit(
        encode_lun(3),
        task(
            2,
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            Vec::new().into(),
        ),
    );
    t.submit(
        encode_lun(5),
        task(3, &[0x12, 0, 0, 0, 36, 0], Vec::new().into()),
    );
    let mut out = Vec::new();
    assert_eq!(t.poll(&mut out), 3);
    let stats: Vec<(u64, IoCounters)> = t.lun_stats().map(|(l, s)| (l, *s)).collect();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[0], (0, IoCounters::default()));
    assert_eq!(stats[1].0, 3);
    assert_eq!(
        (stats[1].1.reads, stats[1].1.read_bytes),
        (1, 2 * BS as u64)
    );
    assert_eq!(stats[1].1.completions(), 1);
    // The control plane adds up the snapshots of its cores.
    let mut total = IoCounters::new();
    for (_, s) in &stats {
        total.merge(s);
    }
    assert_eq!(total, stats[1].1);
}

/// Errors of a network backstore that goes away and comes back are
/// retryable (ABORTED COMMAND); media and space errors are not.
#[test]
fn backstore_errno_to_sense() {
    use crate::common::CmdError;
    use crate::sbc::io_error;
    use crate::sense::SenseKey;
    let key = |errno, write| match io_error(errno, write) {
        CmdError::Check(s) => (s.key, s.asc, s.ascq),
        e => panic!("{e:?}"),
    };
    for write in [false, true] {
        assert_eq!(
            key(110, write),
            (SenseKey::AbortedCommand, 0x08, 0x01),
            "ETIMEDOUT"
        );
        for e in [
            107, 111, 104, 103, 100, 101, 112, 113, 108, 32, 70, 77, 11, 16,
        ] {
            assert_eq!(
                key(e, write),
                (SenseKey::AbortedCommand, 0x08, 0x00),
                "errno {e}"
            );
        }
        assert_eq!(key(28, write), (SenseKey::DataProtect, 0x27, 0x07));
    }
    assert_eq!(key(5, false), (SenseKey::MediumError, 0x11, 0x00));
    assert_eq!(key(5, true).0, SenseKey::MediumError);
}

/// `run` with the scratch buffer a transport hands when it follows
/// `scratch_len`: a pool buffer of that size, empty, stale underneath.
fn run_with_scratch(lun: &mut Lun, cdb: &[u8], data_out: DataBuf) -> ScsiCompletion {
    let n = crate::scratch_len(cdb, BS, 4096);
    assert!(n > 0, "{cdb:02x?} wants a scratch buffer");
    let mut t = task(98, cdb, data_out);
    t.data_in = crate::backstore::test_scratch_buf(n);
    lun.submit(t);
    let mut out = Vec::new();
    assert_eq!(lun.poll(&mut out), 1);
    out.pop().unwrap()
}

#[test]
fn scratch_len_covers_the_commands_that_read_back_or_repeat() {
    let s = |cdb: &[u8]| crate::scratch_len(cdb, BS, 4096);
    assert_eq!(
        s(&cdb16(0x8f, 0x02, 0, 40)),
        40 * BS as usize,
        "VERIFY BYTCHK=01"
    );
    assert_eq!(
        s(&cdb16(0x8f, 0x06, 0, 40)),
        40 * BS as usize,
        "VERIFY BYTCHK=11"
    );
    assert_eq!(
        s(&cdb10(0x2f, 0, 0, 40)),
        0,
        "VERIFY without BYTCHK reads nothing"
    );
    assert_eq!(
        s(&cdb10(0x2e, 0x02, 0, 8)),
        8 * BS as usize,
        "WRITE AND VERIFY"
    );
    assert_eq!(s(&cdb10(0x2e, 0, 0, 8)), 0);
    let mut caw = cdb16(0x89, 0, 0, 0);
    caw[13] = 3;
    assert_eq!(s(&caw), 3 * BS as usize);
    assert_eq!(s(&cdb16(0x8b, 0, 0, 5)), 5 * BS as usize, "ORWRITE");
    assert_eq!(s(&cdb16(0x93, 0, 0, 5)), 5 * BS as usize, "WRITE SAME");
    let piece = super::WRITE_SAME_PIECE;
    assert_eq!(s(&cdb16(0x93, 0, 0, 1 << 20)), piece, "one piece at a time");
    assert_eq!(s(&cdb16(0x93, 0, 0, 0)), piece, "to the end of the medium");
    assert_eq!(s(&cdb16(0x93, 0x08, 0, 5)), 0, "UNMAP: nothing written");
    assert_eq!(s(&cdb16(0x8f, 0x02, 0, 5000)), 0, "refused: too long");
    assert_eq!(s(&cdb16(0x9e, 0x12, 0, 1024)), 1024, "GET LBA STATUS");
    assert_eq!(
        s(&cdb16(0x9e, 0x12, 0, 1 << 20)),
        8 + 16 * 64,
        "GET LBA STATUS answers 64 descriptors at most"
    );
    assert_eq!(s(&cdb16(0x9e, 0x10, 0, 32)), 0, "READ CAPACITY(16)");
    assert_eq!(s(&cdb10(0x28, 0, 0, 8)), 0, "READ has its Data-In buffer");
    assert_eq!(s(&cdb10(0x2a, 0, 0, 8)), 0);
}

#[test]
fn medium_commands_work_in_the_transports_scratch_buffer() {
    let mut lun = mem_lun(1024);
    let pat: Vec<u8> = (0..40 * BS).map(|i| (i * 7 + i / 511) as u8).collect();
    write10(&mut lun, 100, pat.clone().into());
    let in_place = |c: &ScsiCompletion| {
        assert!(c.data_in.is_empty(), "no Data-In");
        assert!(
            c.data_in.is_pool(),
            "the scratch buffer came back, not a heap one"
        );
    };
    // VERIFY: equal, then one byte different.
    let v = cdb16(0x8f, 0x02, 100, 40);
    let c = run_with_scratch(&mut lun, &v, pat.clone().into());
    ok(&c);
    in_place(&c);
    let mut other = pat.clone();
    other[13 * BS as usize + 9] ^= 1;
    let c = run_with_scratch(&mut lun, &v, other.into());
    assert_eq!(sense(&c), (0xe, 0x1d, 0));
    assert_eq!(&c.sense[3..7], &(13 * BS + 9).to_be_bytes());
    in_place(&c);
    // COMPARE AND WRITE of 8 blocks: compares, then writes.
    let mut caw = cdb16(0x89, 0, 100, 0);
    caw[13] = 8;
    let mut d = pat[..8 * BS as usize].to_vec();
    d.extend(vec![b'N'; 8 * BS as usize]);
    let c = run_with_scratch(&mut lun, &caw, d.into());
    ok(&c);
    in_place(&c);
    assert!(read10(&mut lun, 100, 8).iter().all(|&x| x == b'N'));
    // WRITE SAME of 40 blocks from a non-zero block: every block is the
    // pattern, none the stale bytes under the scratch buffer.
    let blk: Vec<u8> = (0..BS).map(|i| (i % 251) as u8 + 1).collect();
    let c = run_with_scratch(&mut lun, &cdb16(0x93, 0, 200, 40), blk.clone().into());
    ok(&c);
    in_place(&c);
    let back = read10(&mut lun, 200, 40);
    for (i, b) in back.chunks(BS as usize).enumerate() {
        assert_eq!(b, &blk[..], "block {i}");
    }
    // ORWRITE ORs into what is there.
    let c = run_with_scratch(
        &mut lun,
        &cdb16(0x8b, 0, 300, 2),
        vec![0x0f; 2 * BS as usize].into(),
    );
    ok(&c);
    in_place(&c);
    assert!(read10(&mut lun, 300, 2).iter().all(|&x| x == 0x0f));
    // GET LBA STATUS writes its answer into the scratch buffer: the
    // written chunks (blocks 0-383, 128 blocks a chunk) mapped, the rest
    // not.
    let c = run_with_scratch(&mut lun, &cdb16(0x9e, 0x12, 0, 1024), DataBuf::new());
    ok(&c);
    assert!(c.data_in.is_pool(), "answered in the scratch buffer");
    assert_eq!(c.data_in.len(), 40);
    assert_eq!(&c.data_in[..8], &[0, 0, 0, 36, 0, 0, 0, 0]);
    let desc = |i: usize| {
        let d = &c.data_in[8 + 16 * i..24 + 16 * i];
        (
            u64::from_be_bytes(d[..8].try_into().unwrap()),
            u32::from_be_bytes(d[8..12].try_into().unwrap()),
            d[12],
        )
    };
    assert_eq!((desc(0), desc(1)), ((0, 384, 0), (384, 640, 1)));
    // Cut at the allocation length, mid-descriptor.
    let c = run_with_scratch(&mut lun, &cdb16(0x9e, 0x12, 0, 13), DataBuf::new());
    ok(&c);
    assert_eq!(c.data_in.len(), 13);
    assert_eq!(&c.data_in[..4], &[0, 0, 0, 36]);
}
