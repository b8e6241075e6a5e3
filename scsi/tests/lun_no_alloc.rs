//! A LUN reaching a new high-water mark of commands in flight must not
//! allocate: its slots and queues are sized for `MAX_TASKS` when it is
//! made. The engine's no-allocation check on the real binary found these
//! growing (under Gluster, whose completions arrive in bursts); this test
//! finds the same without a network. Its own binary, so the counting
//! allocator sees only this test.

use mempool::DataBuf;
use scsi::backstore::MemBackstore;
use scsi::{Lun, LunInfo, ScsiCompletion, ScsiTask};

#[global_allocator]
static HEAP: mempool::HeapCount = mempool::HeapCount;

const BS: u32 = 512;

fn lun() -> Lun {
    lun_with(false)
}

fn lun_with(thin_provisioned: bool) -> Lun {
    let blocks = 8192;
    let info = LunInfo {
        lun: 0,
        block_size: BS,
        num_blocks: blocks,
        vendor: "TEST".into(),
        product: "LUN".into(),
        revision: "0001".into(),
        serial: "s0".into(),
        naa: [0; 16],
        thin_provisioned,
        read_only: false,
        removable: false,
        pr_file: None,
        mode_file: None,
        max_transfer_blocks: 4096,
        max_unmap_blocks: 4096,
        max_unmap_descriptors: 8,
        max_write_same_blocks: 65535,
        write_cache: true,
    };
    Lun::new(
        info,
        Box::new(MemBackstore::new(blocks * BS as u64).unwrap()),
    )
    .unwrap()
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Reads and writes of 8 blocks; every fourth write overlaps the previous
/// one's range, so some wait for a range lock.
fn tasks(n: usize, tag0: u64) -> Vec<ScsiTask> {
    (0..n)
        .map(|i| {
            let lba = if i % 4 == 3 {
                (i - 2) as u32 * 8
            } else {
                i as u32 * 8
            };
            let len = 8 * BS as usize;
            let write = i % 2 == 1;
            ScsiTask {
                tag: tag0 + i as u64,
                nexus: 1,
                cdb: rw10(if write { 0x2a } else { 0x28 }, lba, 8)[..].into(),
                edtl: len as u32,
                data_out: if write {
                    DataBuf::from(vec![i as u8; len])
                } else {
                    DataBuf::new()
                },
                data_in: if write {
                    DataBuf::new()
                } else {
                    DataBuf::from(vec![0u8; len])
                },
                ..Default::default()
            }
        })
        .collect()
}

/// Writes of `byte` over the whole LUN, 128 blocks each.
fn fill_tasks(byte: u8) -> Vec<ScsiTask> {
    (0..64u32)
        .map(|i| ScsiTask {
            tag: 100 + i as u64,
            nexus: 1,
            cdb: rw10(0x2a, i * 128, 128)[..].into(),
            edtl: 128 * BS,
            data_out: DataBuf::from(vec![byte; 128 * BS as usize]),
            ..Default::default()
        })
        .collect()
}

fn run(lun: &mut Lun, batch: Vec<ScsiTask>, out: &mut Vec<ScsiCompletion>) {
    let n = batch.len();
    for t in batch {
        lun.submit(t);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while out.len() < n {
        lun.poll(out);
        assert!(std::time::Instant::now() < deadline, "completions missing");
    }
}

#[test]
fn a_burst_of_commands_does_not_grow_the_lun() {
    let mut lun = lun();
    // First use of each path (one read, one write) may set things up, and
    // the RAM backstore allocates a chunk on its first write (a thin RAM
    // disk, by design): write the whole range once first.
    let mut out = Vec::with_capacity(1024);
    run(&mut lun, tasks(2, 0), &mut out);
    out.clear();
    run(&mut lun, fill_tasks(0), &mut out);
    out.clear();
    let n = 512;
    let batch = tasks(n, 1000);
    let before = mempool::thread_heap_allocs();
    // A failure prints where the first allocations happened.
    mempool::trace_thread_allocs(3);
    run(&mut lun, batch, &mut out);
    mempool::trace_thread_allocs(0);
    let allocs = mempool::thread_heap_allocs() - before;
    assert_eq!(out.len(), n);
    for c in &out {
        assert_eq!(c.status, 0, "tag {} sense {:02x?}", c.tag, c.sense);
    }
    assert_eq!(allocs, 0, "heap allocations during a burst of {n} commands");
}

/// UNMAP of `count` one-block descriptors, every other one empty, from
/// `lba0` on, `stride` blocks apart.
fn unmap_task(tag: u64, lba0: u64, count: usize, stride: u64) -> ScsiTask {
    let mut list = vec![0u8; 8 + 16 * count];
    let len = list.len();
    list[0..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
    list[2..4].copy_from_slice(&((16 * count) as u16).to_be_bytes());
    for k in 0..count {
        let d = &mut list[8 + 16 * k..8 + 16 * k + 16];
        d[0..8].copy_from_slice(&(lba0 + k as u64 * stride).to_be_bytes());
        d[8..12].copy_from_slice(&((k % 2) as u32).to_be_bytes());
    }
    let mut cdb = [0u8; 10];
    cdb[0] = 0x42;
    cdb[7..9].copy_from_slice(&(list.len() as u16).to_be_bytes());
    ScsiTask {
        tag,
        nexus: 1,
        cdb: cdb[..].into(),
        edtl: list.len() as u32,
        data_out: DataBuf::from(list),
        ..Default::default()
    }
}

#[test]
fn unmap_reads_its_descriptors_where_they_arrived() {
    let mut lun = lun_with(true);
    let mut out = Vec::with_capacity(1024);
    // Blocks to deallocate, and a first UNMAP down each path.
    run(&mut lun, fill_tasks(0xa5), &mut out);
    out.clear();
    run(&mut lun, vec![unmap_task(200, 0, 8, 3)], &mut out);
    assert_eq!(out[0].status, 0);
    out.clear();
    let batch: Vec<ScsiTask> = (0..256u64)
        .map(|i| unmap_task(1000 + i, 1 + (i % 32) * 256, 8, 3))
        .collect();
    let before = mempool::thread_heap_allocs();
    mempool::trace_thread_allocs(3);
    run(&mut lun, batch, &mut out);
    mempool::trace_thread_allocs(0);
    let allocs = mempool::thread_heap_allocs() - before;
    assert_eq!(out.len(), 256);
    for c in &out {
        assert_eq!(c.status, 0, "tag {} sense {:02x?}", c.tag, c.sense);
    }
    assert_eq!(allocs, 0, "heap allocations during 256 UNMAPs");
    // The odd descriptors (one block each) were deallocated, the empty
    // ones between them left alone: blocks 3, 9, 15, 21 by the first
    // UNMAP, 4, 10, 16, 22 by the batch.
    out.clear();
    let read = ScsiTask {
        tag: 5000,
        nexus: 1,
        cdb: rw10(0x28, 1, 24)[..].into(),
        edtl: 24 * BS,
        data_in: DataBuf::from(vec![0u8; 24 * BS as usize]),
        ..Default::default()
    };
    run(&mut lun, vec![read], &mut out);
    let zeroed: Vec<u64> = out[0]
        .data_in
        .chunks(BS as usize)
        .enumerate()
        .filter(|(_, b)| b.iter().all(|&x| x == 0))
        .map(|(i, _)| 1 + i as u64)
        .collect();
    assert_eq!(zeroed, [3, 4, 9, 10, 15, 16, 21, 22]);
}
