//! The write cache contract seen at the backstore: what a LUN asks of it
//! with WCE on and off, for every command that changes the medium.

use crate::backstore::{Backstore, BackstoreCaps, Io, IoDone, IoOp, MemBackstore};
use crate::common::{LunInfo, Nexus, ScsiCompletion, ScsiTask};
use crate::lun::Lun;
use crate::status;
use mempool::DataBuf;
use std::sync::{Arc, Mutex};

const BS: u32 = 512;
const BLOCKS: u64 = 2048;

/// A RAM backstore that says it has a volatile cache (as files and
/// Gluster do) and records every operation it is given.
struct Recording {
    mem: MemBackstore,
    ops: Arc<Mutex<Vec<IoOp>>>,
}

impl Backstore for Recording {
    fn kind(&self) -> &'static str {
        "recording"
    }
    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }
    fn caps(&self) -> BackstoreCaps {
        BackstoreCaps {
            volatile_cache: true,
            ..self.mem.caps()
        }
    }
    fn submit(&mut self, io: Io) {
        self.ops.lock().unwrap().push(io.op);
        self.mem.submit(io)
    }
    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize {
        self.mem.poll(out)
    }
}

fn info(write_cache: bool) -> LunInfo {
    LunInfo {
        write_cache,
        ..LunInfo::for_tests(BS, BLOCKS)
    }
}

fn lun(write_cache: bool) -> (Lun, Arc<Mutex<Vec<IoOp>>>) {
    let ops = Arc::new(Mutex::new(Vec::new()));
    let b = Recording {
        mem: MemBackstore::new(BLOCKS * BS as u64).unwrap(),
        ops: ops.clone(),
    };
    let mut l = Lun::new(info(write_cache), Box::new(b)).unwrap();
    for id in [1, 2] {
        l.nexus_added(&Nexus {
            id,
            initiator_name: format!("iqn.2026-12.test:i{id}"),
            isid: id,
            target_name: "iqn.2026-12.test:t".into(),
            tpgt: 1,
        });
    }
    (l, ops)
}

fn run(lun: &mut Lun, nexus: u64, cdb: &[u8], data_out: &[u8]) -> ScsiCompletion {
    let data_out: DataBuf = data_out.to_vec().into();
    lun.submit(ScsiTask {
        tag: 7,
        nexus,
        cdb: cdb.into(),
        edtl: data_out.len().max(255) as u32,
        data_out,
        ..Default::default()
    });
    let mut out = Vec::new();
    lun.poll(&mut out);
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

/// Run until GOOD, consuming the unit attentions a new nexus has.
fn good(lun: &mut Lun, nexus: u64, cdb: &[u8], data_out: &[u8]) -> ScsiCompletion {
    for _ in 0..4 {
        let c = run(lun, nexus, cdb, data_out);
        if c.status == status::GOOD {
            return c;
        }
        assert_eq!(
            c.sense[2] & 0xf,
            0x6,
            "only unit attentions: {:02x?}",
            c.sense
        );
    }
    panic!("no GOOD for {cdb:02x?}");
}

fn ua_asc(lun: &mut Lun, nexus: u64) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    for _ in 0..4 {
        let c = run(lun, nexus, &[0, 0, 0, 0, 0, 0], &[]);
        if c.status == status::GOOD {
            break;
        }
        seen.push((c.sense[12], c.sense[13]));
    }
    seen
}

/// WCE from MODE SENSE(6) of the caching page, as `nexus` sees it.
fn wce(lun: &mut Lun, nexus: u64) -> bool {
    let d = good(lun, nexus, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]).data_in;
    assert_eq!(d[4] & 0x3f, 0x08, "caching page");
    d[6] & 0x04 != 0
}

/// A MODE SELECT(6) parameter list: the caching page as `nexus` reads it
/// now (PS cleared, it is reserved here), with WCE set to `on`.
fn caching_page(lun: &mut Lun, nexus: u64, on: bool) -> Vec<u8> {
    let d = good(lun, nexus, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]).data_in;
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(&d[4..]);
    p[4] &= 0x3f;
    if on {
        p[6] |= 0x04;
    } else {
        p[6] &= !0x04;
    }
    p
}

fn set_wce(lun: &mut Lun, nexus: u64, on: bool) {
    let p = caching_page(lun, nexus, on);
    good(lun, nexus, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p);
}

fn write10(lba: u32, fua: bool) -> [u8; 10] {
    let mut c = [0x2a, (fua as u8) << 3, 0, 0, 0, 0, 0, 0, 8, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c
}

fn ops(rec: &Arc<Mutex<Vec<IoOp>>>) -> Vec<IoOp> {
    std::mem::take(&mut *rec.lock().unwrap())
}

#[test]
fn with_the_cache_on_only_fua_and_sync_cache_reach_the_medium() {
    let (mut l, rec) = lun(true);
    assert!(wce(&mut l, 1));
    ops(&rec);
    good(&mut l, 1, &write10(0, false), &[1; 4096]);
    good(&mut l, 1, &write10(8, true), &[2; 4096]);
    good(&mut l, 1, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        ops(&rec),
        [
            IoOp::Write {
                offset: 0,
                fua: false
            },
            IoOp::Write {
                offset: 4096,
                fua: true
            },
            IoOp::Flush,
        ]
    );
    assert_eq!((l.stats().durable_writes, l.stats().flushes), (1, 1));
}

#[test]
fn with_the_cache_off_every_write_is_durable_before_good() {
    let (mut l, rec) = lun(true);
    ua_asc(&mut l, 2);
    set_wce(&mut l, 1, false);
    // Every nexus sees the change, the others told by a unit attention.
    assert_eq!(ua_asc(&mut l, 2), [(0x2a, 0x01)]);
    assert!(!wce(&mut l, 2) && !wce(&mut l, 1));
    ops(&rec);

    good(&mut l, 1, &write10(0, false), &[1; 4096]);
    good(&mut l, 2, &write10(8, false), &[1; 4096]);
    // WRITE SAME(10) without UNMAP writes its pattern.
    good(&mut l, 1, &[0x41, 0, 0, 0, 0, 32, 0, 0, 4, 0], &[3; 512]);
    let want = |offset| IoOp::Write { offset, fua: true };
    assert_eq!(ops(&rec), [want(0), want(4096), want(16384)]);

    // An UNMAP has no FUA: its deallocation is flushed before GOOD.
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&0u64.to_be_bytes());
    list.extend_from_slice(&8u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    good(&mut l, 1, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list);
    assert_eq!(
        ops(&rec),
        [
            IoOp::Discard {
                offset: 0,
                len: 4096
            },
            IoOp::Flush
        ]
    );
    // So is WRITE SAME(16) with UNMAP.
    let mut ws = [0u8; 16];
    ws[0] = 0x93;
    ws[1] = 0x08;
    ws[9] = 64;
    ws[13] = 8;
    good(&mut l, 1, &ws, &[0; 512]);
    assert_eq!(
        ops(&rec),
        [
            IoOp::Discard {
                offset: 32768,
                len: 4096
            },
            IoOp::Flush
        ]
    );
    assert_eq!(l.stats().durable_writes, 3);

    // Turned on again: plain writes may sit in the cache.
    set_wce(&mut l, 2, true);
    good(&mut l, 2, &write10(0, false), &[1; 4096]);
    assert_eq!(
        ops(&rec),
        [IoOp::Write {
            offset: 0,
            fua: false
        }]
    );
    assert_eq!(ua_asc(&mut l, 1), [(0x2a, 0x01)]);
}

#[test]
fn the_write_cache_option_starts_with_the_cache_off_and_a_reset_keeps_it_off() {
    let (mut l, rec) = lun(false);
    assert!(!wce(&mut l, 1));
    // The default page says so too: the cache is off until asked on.
    let d = good(&mut l, 1, &[0x1a, 0x08, 0x88, 0, 255, 0], &[]).data_in;
    assert_eq!(d[6] & 0x04, 0, "default WCE");
    ops(&rec);
    good(&mut l, 1, &write10(0, false), &[1; 4096]);
    assert_eq!(
        ops(&rec),
        [IoOp::Write {
            offset: 0,
            fua: true
        }]
    );

    // The cache turned on, then a reset: back to the default (off).
    set_wce(&mut l, 1, true);
    l.reset(1);
    assert!(!wce(&mut l, 1));

    // Cache on by default, turned off: a reset does not turn it on.
    let (mut l, rec) = lun(true);
    set_wce(&mut l, 1, false);
    l.reset(2);
    assert!(!wce(&mut l, 1));
    ops(&rec);
    good(&mut l, 2, &write10(0, false), &[1; 4096]);
    assert_eq!(
        ops(&rec),
        [IoOp::Write {
            offset: 0,
            fua: true
        }]
    );
}

#[test]
fn saved_pages_are_refused() {
    let (mut l, _) = lun(true);
    ua_asc(&mut l, 1);
    let p = caching_page(&mut l, 1, false);
    // SP=1: ILLEGAL REQUEST, INVALID FIELD IN CDB, and nothing changes.
    let c = run(&mut l, 1, &[0x15, 0x11, 0, 0, p.len() as u8, 0], &p);
    assert_eq!(c.status, status::CHECK_CONDITION);
    assert_eq!((c.sense[2] & 0xf, c.sense[12], c.sense[13]), (5, 0x24, 0));
    assert!(wce(&mut l, 1));
}

fn lun_saving(write_cache: bool, mode_file: &std::path::Path) -> Lun {
    let ops = Arc::new(Mutex::new(Vec::new()));
    let b = Recording {
        mem: MemBackstore::new(BLOCKS * BS as u64).unwrap(),
        ops,
    };
    let mut inf = info(write_cache);
    inf.mode_file = Some(mode_file.to_path_buf());
    Lun::new(inf, Box::new(b)).unwrap()
}

/// MODE SELECT SP=1 body turning WCE off, from the current page.
fn wce_off_page(lun: &mut Lun) -> Vec<u8> {
    let d = good(lun, 1, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]).data_in;
    assert_eq!(d[4] & 0x80, 0x80, "PS: the page can be saved");
    caching_page(lun, 1, false)
}

#[test]
fn saved_pages_outlive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("lun0.mode");
    let mut l = lun_saving(true, &f);
    // Nothing saved yet: the saved values are the defaults.
    let d = good(&mut l, 1, &[0x1a, 0x08, 0xc8, 0, 255, 0], &[]).data_in;
    assert_eq!(d[6] & 0x04, 0x04, "saved WCE before any save");
    let p = wce_off_page(&mut l);
    good(&mut l, 1, &[0x15, 0x11, 0, 0, p.len() as u8, 0], &p);
    assert!(!wce(&mut l, 1));
    let d = good(&mut l, 1, &[0x1a, 0x08, 0xc8, 0, 255, 0], &[]).data_in;
    assert_eq!(d[6] & 0x04, 0, "saved WCE");
    drop(l);

    // A restart: the saved page is the current one.
    let mut l = lun_saving(true, &f);
    assert!(!wce(&mut l, 1));
    // SP=0 changes the current page only: the saved one stays off.
    set_wce(&mut l, 1, true);
    drop(l);
    let mut l = lun_saving(true, &f);
    assert!(!wce(&mut l, 1));
    drop(l);

    // A garbled file keeps the LUN from starting, naming the file.
    std::fs::write(&f, "target-rdma-mode 1\nwce 2\n").unwrap();
    let b = MemBackstore::new(BLOCKS * BS as u64).unwrap();
    let mut inf = info(true);
    inf.mode_file = Some(f.clone());
    let e = Lun::new(inf, Box::new(b)).err().unwrap();
    assert!(e.contains("lun0.mode"), "{e}");
}

#[test]
fn a_page_that_cannot_be_saved_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gone").join("lun0.mode");
    let mut l = lun_saving(true, &f);
    let p = wce_off_page(&mut l);
    let c = run(&mut l, 1, &[0x15, 0x11, 0, 0, p.len() as u8, 0], &p);
    assert_eq!(c.status, status::CHECK_CONDITION);
    assert_eq!((c.sense[2] & 0xf, c.sense[12]), (4, 0x44), "HARDWARE ERROR");
    assert!(wce(&mut l, 1));
}
