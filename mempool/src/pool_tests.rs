use std::sync::{Arc, Mutex};

use super::*;
use crate::{ClassConfig, MAX_SEGMENTS};

/// 2 MiB of 4 KiB buffers (512) and 2 MiB of 64 KiB buffers (32), on the
/// heap so Miri can run it.
pub(crate) fn small(cores: usize) -> PoolConfig {
    PoolConfig {
        arena_bytes: 4 << 20,
        arena_limit_bytes: 8 << 20,
        classes: vec![
            ClassConfig {
                buf_bytes: 4 << 10,
                weight: 1,
            },
            ClassConfig {
                buf_bytes: 64 << 10,
                weight: 1,
            },
        ],
        cores,
        core_cache_bufs: 8,
        waiters_per_class: 4,
        backing: Backing::Heap,
        lock_memory: false,
    }
}

const C4K: ClassId = ClassId(0);
const C64K: ClassId = ClassId(1);

#[test]
fn alloc_write_free() {
    let pool = Pool::new(small(1)).unwrap();
    let mut cc = pool.core_cache(0).unwrap();
    let mut b = cc.try_alloc(C4K).unwrap();
    assert_eq!((b.len(), b.capacity()), (0, 4096));
    assert_eq!(b.addr() % 4096, 0);
    b.as_mut_slice()[4095] = 7;
    b.set_len(10);
    b.data_mut().fill(1);
    assert_eq!(b.data(), &[1; 10]);
    assert_eq!(b.as_slice()[4095], 7);
    let st = cc.stats(C4K);
    assert_eq!((st.allocs, st.in_use, st.in_use_high_water), (1, 1, 1));
    cc.free(b);
    let st = cc.stats(C4K);
    assert_eq!((st.frees, st.in_use, st.in_use_high_water), (1, 0, 1));
    cc.maintain();
    let ps = pool.stats();
    assert_eq!(ps[0].total_bufs, 512);
    assert_eq!(ps[0].free_bufs, 512);
    assert_eq!(ps[1].total_bufs, 32);
    assert_eq!(
        (ps[0].allocs, ps[0].frees, ps[0].in_use_high_water),
        (1, 1, 1)
    );
}

#[test]
fn plans() {
    let classes = [(4096, 512), (65536, 32), (1 << 20, 8)];
    let p = |b| {
        let p = choose(b, &classes).unwrap();
        (p.class.0, p.segments)
    };
    assert_eq!(p(0), (0, 0));
    assert_eq!(p(1), (0, 1));
    assert_eq!(p(4096), (0, 1));
    assert_eq!(p(5000), (0, 2));
    assert_eq!(p(60_000), (1, 1));
    assert_eq!(p(100 << 10), (0, 25));
    assert_eq!(p(128 << 10), (1, 2));
    assert_eq!(p(1 << 20), (2, 1));
    assert_eq!(p((1 << 20) + 4096), (1, 17));
    assert_eq!(p(8 << 20), (2, 8));
    // 9 MiB: more 1 MiB buffers than exist, 144 64 KiB ones exceed 64.
    assert_eq!(
        choose(9 << 20, &classes),
        Err(AllocError::TooLarge {
            bytes: 9 << 20,
            max_bytes: 8 << 20
        })
    );
}

#[test]
fn sg_spans_buffers_and_copies() {
    let pool = Pool::new(small(1)).unwrap();
    let mut cc = pool.core_cache(0).unwrap();
    let mut sg = SgList::new();
    let bytes = 3 * 4096 + 100;
    assert!(cc.try_alloc_sg(bytes, &mut sg).unwrap());
    assert_eq!(sg.segment_count(), 4);
    assert_eq!(sg.len_bytes(), bytes);
    let lens: Vec<_> = sg.segments().map(|s| s.len).collect();
    assert_eq!(lens, [4096, 4096, 4096, 100]);
    let src: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    sg.copy_from_slice_at(0, &src[..5000]).unwrap();
    sg.copy_from_slice_at(5000, &src[5000..]).unwrap();
    let mut out = vec![0; bytes];
    sg.copy_to_slice_at(0, &mut out).unwrap();
    assert_eq!(out, src);
    let mut mid = vec![0; 8200];
    sg.copy_to_slice_at(4000, &mut mid).unwrap();
    assert_eq!(mid, src[4000..12200]);
    assert!(sg.copy_to_slice_at(bytes - 1, &mut [0; 2]).is_err());
    assert!(sg.copy_from_slice_at(usize::MAX, &[0]).is_err());
    let mut io = [std::io::IoSlice::new(&[]); MAX_SEGMENTS];
    let n = sg.io_slices(&mut io);
    assert_eq!(n, 4);
    let joined: Vec<u8> = io[..n].iter().flat_map(|s| s.iter().copied()).collect();
    assert_eq!(joined, src);
    sg.set_len_bytes(4096).unwrap();
    assert_eq!(sg.segments().count(), 1);
    assert!(sg.set_len_bytes(4 * 4096 + 1).is_err());
    cc.free_sg(&mut sg);
    assert!(sg.is_empty());
    assert_eq!(cc.stats(C4K).in_use, 0);
    // Zero bytes: ready, nothing taken.
    assert_eq!(cc.alloc_or_wait(0, 1, &mut sg), Ok(Alloc::Ready));
    assert!(sg.is_empty());
}

#[test]
fn exhaustion_waits_in_order_and_grants() {
    let pool = Pool::new(small(1)).unwrap();
    let mut cc = pool.core_cache(0).unwrap();
    let mut held = Vec::new();
    while let Some(b) = cc.try_alloc(C64K) {
        held.push(b);
    }
    assert_eq!(held.len(), 32);
    assert_eq!(cc.stats(C64K).alloc_failed, 1);
    let mut sg = SgList::new();
    assert!(!cc.try_alloc_sg(64 << 10, &mut sg).unwrap());
    // Waiters: token 1 needs two buffers, 2 and 3 one each.
    assert_eq!(cc.alloc_or_wait(128 << 10, 1, &mut sg), Ok(Alloc::Queued));
    assert_eq!(cc.alloc_or_wait(64 << 10, 2, &mut sg), Ok(Alloc::Queued));
    assert_eq!(cc.alloc_or_wait(64 << 10, 3, &mut sg), Ok(Alloc::Queued));
    assert_eq!(cc.alloc_or_wait(64 << 10, 4, &mut sg), Ok(Alloc::Queued));
    assert_eq!(
        cc.alloc_or_wait(64 << 10, 5, &mut sg),
        Err(AllocError::WaitQueueFull { class: C64K })
    );
    assert!(cc.cancel_wait(4));
    assert!(!cc.cancel_wait(4));
    assert_eq!(cc.waiting(), 3);
    assert!(sg.is_empty());
    assert!(cc.next_grant().is_none());
    // One free buffer is not enough for token 1, and 2 may not overtake.
    cc.free(held.pop().unwrap());
    assert!(cc.next_grant().is_none());
    assert!(
        cc.try_alloc(C64K).is_none(),
        "try_alloc must not jump the queue"
    );
    cc.free(held.pop().unwrap());
    let (t, mut g) = cc.next_grant().unwrap();
    assert_eq!((t, g.segment_count(), g.len_bytes()), (1, 2, 128 << 10));
    assert!(cc.next_grant().is_none());
    cc.free_sg(&mut g);
    let (t, mut g2) = cc.next_grant().unwrap();
    assert_eq!(t, 2);
    let (t, mut g3) = cc.next_grant().unwrap();
    assert_eq!(t, 3);
    assert!(cc.next_grant().is_none());
    assert_eq!(cc.waiting(), 0);
    let st = cc.stats(C64K);
    assert_eq!((st.waits, st.granted, st.waiting), (4, 3, 0));
    cc.free_sg(&mut g2);
    cc.free_sg(&mut g3);
    for b in held.drain(..) {
        cc.free(b);
    }
    assert_eq!(pool.shared.classes[1].hungry.load(Ordering::Relaxed), 0);
    cc.maintain();
    let ps = pool.stats();
    assert_eq!(
        (ps[1].in_use, ps[1].free_bufs, ps[1].in_use_high_water),
        (0, 32, 32)
    );
}

#[test]
fn buffers_cross_cores_and_reach_waiters() {
    let pool = Pool::new(small(2)).unwrap();
    let mut a = pool.core_cache(0).unwrap();
    let mut b = pool.core_cache(1).unwrap();
    let mut held = Vec::new();
    while let Some(x) = a.try_alloc(C64K) {
        held.push(x);
    }
    assert_eq!(held.len(), 32);
    let mut sg = SgList::new();
    assert_eq!(a.alloc_or_wait(64 << 10, 9, &mut sg), Ok(Alloc::Queued));
    // Core 1 frees them (they were allocated on core 0): they stay in
    // core 1's cache until it sees core 0 waiting.
    for x in held.drain(..4) {
        b.free(x);
    }
    assert!(a.next_grant().is_none());
    b.maintain();
    let (t, mut g) = a.next_grant().unwrap();
    assert_eq!(t, 9);
    a.free_sg(&mut g);
    for x in held.drain(..) {
        b.free(x);
    }
    a.maintain();
    b.maintain();
    let ps = pool.stats();
    assert_eq!((ps[1].allocs, ps[1].frees, ps[1].in_use), (33, 33, 0));
    assert_eq!(ps[1].free_bufs, 32);
    // Core 1 freed 32 it never allocated: its own in-use reads 0.
    assert_eq!(b.stats(C64K).in_use, 0);
    drop(a);
    drop(b);
    let ps = pool.stats();
    assert_eq!(ps[1].free_bufs, 32);
    assert_eq!(pool.shared.classes[1].free.len(), 32);
}

#[test]
fn core_cache_once_per_core_and_stats_survive() {
    let pool = Pool::new(small(2)).unwrap();
    let mut a = pool.core_cache(0).unwrap();
    assert!(matches!(pool.core_cache(0), Err(PoolError::CoreTaken(0))));
    assert!(matches!(
        pool.core_cache(2),
        Err(PoolError::CoreOutOfRange(2))
    ));
    let x = a.try_alloc(C4K).unwrap();
    drop(a);
    let mut a = pool.core_cache(0).unwrap();
    assert_eq!(a.stats(C4K).allocs, 1);
    a.free(x);
    a.maintain();
    assert_eq!(pool.stats()[0].in_use, 0);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "the refused buffer stays out, so the pool leaks its arenas"
)]
#[should_panic(expected = "not from this pool")]
fn foreign_buffer_is_refused() {
    let p1 = Pool::new(small(1)).unwrap();
    let p2 = Pool::new(small(1)).unwrap();
    let mut c1 = p1.core_cache(0).unwrap();
    let mut c2 = p2.core_cache(0).unwrap();
    let b = c1.try_alloc(C4K).unwrap();
    c2.free(b);
}

#[derive(Default)]
struct Log {
    registered: Vec<(usize, usize, usize)>,
    deregistered: Vec<(usize, RegistrationKey)>,
}

struct MockReg {
    log: Arc<Mutex<Log>>,
    tag: u32,
    fail_at: Option<usize>,
}

impl Registrar for MockReg {
    fn register(&mut self, a: &ArenaInfo) -> Result<RegistrationKey, RegisterError> {
        if self.fail_at == Some(a.id.index()) {
            return Err("no memory for the MR".into());
        }
        self.log
            .lock()
            .unwrap()
            .registered
            .push((a.id.index(), a.base as usize, a.len_bytes));
        Ok(RegistrationKey {
            lkey: self.tag + a.id.0 as u32,
            rkey: 0x1000 + self.tag + a.id.0 as u32,
        })
    }
    fn deregister(&mut self, a: &ArenaInfo, key: RegistrationKey) {
        self.log
            .lock()
            .unwrap()
            .deregistered
            .push((a.id.index(), key));
    }
}

#[test]
fn a_removed_registrar_gets_every_registration_back_and_no_new_ones() {
    let log = Arc::new(Mutex::new(Log::default()));
    let pool = Pool::new(small(1)).unwrap();
    let r = pool
        .add_registrar(Box::new(MockReg {
            log: log.clone(),
            tag: 100,
            fail_at: None,
        }))
        .unwrap();
    assert_eq!(log.lock().unwrap().registered.len(), 2);
    assert!(pool.remove_registrar(r));
    assert_eq!(log.lock().unwrap().deregistered.len(), 2);
    assert!(!pool.remove_registrar(r), "removed once only");
    // Arenas added afterwards are not offered to it, and a new registrar
    // (the device back) gets a new id and every arena.
    pool.add_arena(C64K, 2 << 20).unwrap();
    assert_eq!(log.lock().unwrap().registered.len(), 2);
    let r2 = pool
        .add_registrar(Box::new(MockReg {
            log: log.clone(),
            tag: 200,
            fail_at: None,
        }))
        .unwrap();
    assert_ne!(r, r2);
    assert_eq!(log.lock().unwrap().registered.len(), 5);
    drop(pool);
    // At drop only the live registrar deregisters (3 arenas).
    assert_eq!(log.lock().unwrap().deregistered.len(), 5);
}

#[test]
fn registrars_see_every_arena_once() {
    let log = Arc::new(Mutex::new(Log::default()));
    let pool = Pool::new(small(1)).unwrap();
    let r = pool
        .add_registrar(Box::new(MockReg {
            log: log.clone(),
            tag: 100,
            fail_at: None,
        }))
        .unwrap();
    assert_eq!(log.lock().unwrap().registered.len(), 2);
    let arenas = pool.arenas();
    assert_eq!(arenas.len(), 2);
    for a in &arenas {
        assert!(log.lock().unwrap().registered.contains(&(
            a.id.index(),
            a.base as usize,
            a.len_bytes
        )));
    }
    // An arena added later is registered before its buffers are out.
    let id = pool.add_arena(C64K, 2 << 20).unwrap();
    assert_eq!(id.index(), 2);
    assert_eq!(log.lock().unwrap().registered.len(), 3);
    assert_eq!(pool.stats()[1].total_bufs, 64);
    // Beyond the class's share of arena_limit_bytes (4 MiB).
    assert!(matches!(
        pool.add_arena(C64K, 2 << 20),
        Err(PoolError::ClassLimit { .. })
    ));
    assert!(matches!(
        pool.add_arena(C4K, 4096),
        Err(PoolError::ClassLimit { .. })
    ));
    let mut cc = pool.core_cache(0).unwrap();
    let mut sg = SgList::new();
    assert!(cc.try_alloc_sg(200 << 10, &mut sg).unwrap());
    for s in sg.rdma_segments(cc.keys(), r) {
        let b = sg.bufs().find(|b| b.addr() == s.addr).unwrap();
        assert_eq!(s.key.lkey, 100 + b.arena().0 as u32);
        assert_eq!(s.key.rkey, 0x1000 + 100 + b.arena().0 as u32);
    }
    assert_eq!(pool.keys().get(ArenaId(2), r).unwrap().lkey, 102);
    assert_eq!(pool.keys().get(ArenaId(3), r), None);
    assert_eq!(pool.keys().get(ArenaId(0), RegistrarId(1)), None);
    // A failing second registrar leaves nothing registered with it.
    let log2 = Arc::new(Mutex::new(Log::default()));
    let e = pool.add_registrar(Box::new(MockReg {
        log: log2.clone(),
        tag: 200,
        fail_at: Some(1),
    }));
    assert!(matches!(e, Err(PoolError::Register { .. })));
    assert_eq!(log2.lock().unwrap().deregistered.len(), 1);
    cc.free_sg(&mut sg);
    drop(cc);
    drop(pool);
    let l = log.lock().unwrap();
    assert_eq!(l.deregistered.len(), 3);
}

#[test]
#[cfg_attr(miri, ignore = "leaks on purpose")]
fn dropped_handles_leak_instead_of_dangling() {
    let pool = Pool::new(small(1)).unwrap();
    let mut cc = pool.core_cache(0).unwrap();
    let before = crate::leaked_buffers();
    let mut kept = cc.try_alloc(C4K).unwrap();
    drop(cc.try_alloc(C4K).unwrap());
    assert_eq!(crate::leaked_buffers(), before + 1);
    cc.maintain();
    assert_eq!(pool.stats()[0].in_use, 2);
    drop(cc);
    drop(pool);
    // The arena was leaked, so the handle still points at live memory.
    kept.as_mut_slice().fill(3);
    assert_eq!(kept.as_slice()[100], 3);
    std::mem::forget(kept);
}

#[test]
fn single_core_high_water_is_exact() {
    let pool = Pool::new(small(1)).unwrap();
    let mut cc = pool.core_cache(0).unwrap();
    let mut held = Vec::new();
    let mut peak = 0;
    // Rise and fall without publishing in between: 37 up, 30 down, 100 up, 90 down...
    for (up, down) in [(37, 30), (100, 90), (5, 22), (300, 0)] {
        for _ in 0..up {
            held.push(cc.try_alloc(C4K).unwrap());
        }
        peak = peak.max(held.len());
        for _ in 0..down {
            cc.free(held.pop().unwrap());
        }
    }
    cc.maintain();
    assert_eq!(pool.stats()[0].in_use_high_water, peak as u64);
    assert_eq!(pool.stats()[0].in_use, held.len() as u64);
    for b in held.drain(..) {
        cc.free(b);
    }
    cc.maintain();
    assert_eq!(pool.stats()[0].in_use_high_water, peak as u64);
}

#[test]
fn two_waiting_cores_holding_halves_do_not_deadlock() {
    let pool = Pool::new(small(2)).unwrap();
    let mut a = pool.core_cache(0).unwrap();
    let mut b = pool.core_cache(1).unwrap();
    let mut held: Vec<Buf> = (0..32).map(|_| a.try_alloc(C64K).unwrap()).collect();
    // Each core waits for 20 of the 32 buffers and gets 16 of them back
    // into its own cache: neither can be served from what it holds.
    let mut sg = SgList::new();
    assert_eq!(a.alloc_or_wait(20 << 16, 1, &mut sg), Ok(Alloc::Queued));
    assert_eq!(b.alloc_or_wait(20 << 16, 2, &mut sg), Ok(Alloc::Queued));
    for x in held.drain(..16) {
        a.free(x);
    }
    for x in held.drain(..) {
        b.free(x);
    }
    let mut granted = Vec::new();
    for _ in 0..8 {
        for cc in [&mut a, &mut b] {
            if let Some((t, mut g)) = cc.next_grant() {
                assert_eq!(g.segment_count(), 20);
                granted.push(t);
                cc.free_sg(&mut g);
            }
            cc.maintain();
        }
    }
    assert_eq!(granted, [1, 2], "lower core first, then the other");
    a.maintain();
    b.maintain();
    assert_eq!(pool.stats()[1].in_use, 0);
}

#[test]
fn short_refill_for_a_waiter_is_published() {
    let pool = Pool::new(small(2)).unwrap();
    let mut a = pool.core_cache(0).unwrap();
    let mut b = pool.core_cache(1).unwrap();
    let mut held: Vec<Buf> = (0..31).map(|_| a.try_alloc(C64K).unwrap()).collect();
    a.flush();
    assert_eq!(pool.shared.classes[1].free.len(), 1);
    // Core 1 waits for two buffers while one is free, then flushes and
    // publishes that it caches none.
    let mut sg = SgList::new();
    assert_eq!(b.alloc_or_wait(2 << 16, 7, &mut sg), Ok(Alloc::Queued));
    b.flush();
    // The grant falls short but, as no lower core waits, keeps the one
    // buffer it took from the shared queue: the next `maintain` must
    // publish it as core 1's, or the pool counts it nowhere.
    assert!(b.next_grant().is_none());
    assert_eq!(pool.shared.classes[1].free.len(), 0);
    assert_eq!(b.stats(C64K).free_bufs, 1);
    b.maintain();
    let ps = pool.stats();
    assert_eq!((ps[1].in_use, ps[1].free_bufs), (31, 1));
    // Nothing is stranded: with the buffers back the waiter is served,
    // and once it is done every buffer is free again.
    for x in held.drain(..) {
        a.free(x);
    }
    a.maintain();
    let (t, mut g) = b.next_grant().unwrap();
    assert_eq!((t, g.segment_count()), (7, 2));
    b.free_sg(&mut g);
    a.maintain();
    b.maintain();
    let ps = pool.stats();
    assert_eq!((ps[1].in_use, ps[1].free_bufs, ps[1].waiting), (0, 32, 0));
    a.flush();
    b.flush();
    assert_eq!(pool.shared.classes[1].free.len(), 32);
}
