//! Real mappings: 2 MiB hugetlb pages when reserved, transparent huge
//! pages otherwise. What is reserved is the machine's business: these
//! tests check the pool does the right thing either way and print what it
//! got (`--nocapture`). To exercise the hugetlb path:
//! `echo 16 > /proc/sys/vm/nr_hugepages`, run, then restore the old value.

#![cfg(not(miri))]

use mempool::{Backing, ClassConfig, Pool, PoolConfig, PoolError, SgList};

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// kB of `AnonHugePages` (THP) in the mapping containing `addr`.
fn thp_kb(addr: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().split(' ').next()?.parse().ok();
            }
        }
    }
    None
}

fn config(backing: Backing) -> PoolConfig {
    PoolConfig {
        arena_bytes: 8 << 20,
        arena_limit_bytes: 8 << 20,
        classes: vec![
            ClassConfig {
                buf_bytes: 4 << 10,
                weight: 1,
            },
            ClassConfig {
                buf_bytes: 1 << 20,
                weight: 3,
            },
        ],
        cores: 1,
        core_cache_bufs: 8,
        waiters_per_class: 8,
        backing,
        lock_memory: true,
    }
}

fn init_log() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
}

#[test]
fn auto_uses_hugetlb_when_reserved_else_thp() {
    init_log();
    let free_pages = meminfo("HugePages_Free:");
    let pool = Pool::new(config(Backing::Auto)).unwrap();
    for a in pool.arenas() {
        println!(
            "arena {:?}: {} bytes of {} KiB buffers at {:p}, {:?}, locked {}, AnonHugePages {:?} kB \
             (HugePages_Free was {free_pages})",
            a.id,
            a.len_bytes,
            a.buf_bytes >> 10,
            a.base,
            a.backing,
            a.locked,
            thp_kb(a.base as usize),
        );
        assert_eq!(a.base as usize % (2 << 20), 0, "arena not 2 MiB aligned");
        assert!(matches!(
            a.backing,
            Backing::HugeTlb | Backing::TransparentHuge
        ));
        if free_pages == 0 {
            assert_eq!(a.backing, Backing::TransparentHuge);
        }
    }
    // The buffers work whatever the backing.
    let mut cc = pool.core_cache(0).unwrap();
    let mut sg = SgList::new();
    assert!(cc.try_alloc_sg(3 << 20, &mut sg).unwrap());
    assert_eq!(sg.segment_count(), 3);
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 253) as u8).collect();
    sg.copy_from_slice_at(0, &data).unwrap();
    let mut back = vec![0; data.len()];
    sg.copy_to_slice_at(0, &mut back).unwrap();
    assert!(back == data);
    cc.free_sg(&mut sg);
}

#[test]
fn hugetlb_only_fails_cleanly_without_reserved_pages() {
    init_log();
    // 8 MiB needs 4 pages; only meaningful when fewer are free.
    if meminfo("HugePages_Free:") >= 4 {
        println!("huge pages are reserved here; nothing to check");
        return;
    }
    match Pool::new(config(Backing::HugeTlb)) {
        Err(PoolError::Map { source, .. }) => {
            println!("as expected: {source}");
            assert_eq!(source.raw_os_error(), Some(12), "want ENOMEM");
        }
        other => panic!("expected a mapping error, got {other:?}"),
    }
}
