//! Two reactor threads allocate, hand buffers to each other through a
//! channel, and free what they receive: no buffer is lost or doubled.

use std::sync::mpsc;

use mempool::{Alloc, Backing, ClassConfig, Pool, PoolConfig, SgList};

#[test]
fn two_cores_exchange_buffers() {
    let pool = Pool::new(PoolConfig {
        arena_bytes: 4 << 20,
        arena_limit_bytes: 4 << 20,
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
        cores: 2,
        core_cache_bufs: 8,
        waiters_per_class: 1,
        backing: Backing::Heap,
        lock_memory: false,
    })
    .unwrap();
    let rounds: u64 = if cfg!(miri) { 20 } else { 20_000 };
    let (tx0, rx0) = mpsc::channel::<SgList>();
    let (tx1, rx1) = mpsc::channel::<SgList>();
    let mut handles = Vec::new();
    for (core, tx, rx) in [(0, tx1, rx0), (1, tx0, rx1)] {
        let mut cc = pool.core_cache(core).unwrap();
        handles.push(std::thread::spawn(move || {
            let mut sent = 0u64;
            let mut sg = SgList::new();
            let mut waiting = false;
            while sent < rounds {
                cc.maintain();
                loop {
                    let mut got = match rx.try_recv() {
                        Ok(got) => got,
                        Err(mpsc::TryRecvError::Empty) => break,
                        // The peer is done sending (it still frees what we send).
                        Err(mpsc::TryRecvError::Disconnected) => break,
                    };
                    // Each buffer's first bytes carry the sender's core.
                    assert!(got
                        .bufs()
                        .all(|b| b.as_slice()[..8].iter().all(|&x| x == 1 - core as u8)));
                    cc.free_sg(&mut got);
                }
                let ready = if waiting {
                    match cc.next_grant() {
                        Some((_, g)) => {
                            sg = g;
                            waiting = false;
                            true
                        }
                        None => false,
                    }
                } else {
                    let bytes = 8 + (sent as usize * 7919) % (300 << 10);
                    match cc.alloc_or_wait(bytes, sent, &mut sg).unwrap() {
                        Alloc::Ready => true,
                        Alloc::Queued => {
                            waiting = true;
                            false
                        }
                    }
                };
                if ready {
                    for b in sg.bufs_mut() {
                        b.as_mut_slice()[..8].fill(core as u8);
                    }
                    tx.send(std::mem::take(&mut sg)).unwrap();
                    sent += 1;
                } else {
                    std::thread::yield_now();
                }
            }
            // Drain until the peer is done sending.
            drop(tx);
            cc.flush();
            while let Ok(mut got) = rx.recv() {
                cc.free_sg(&mut got);
                // About to block again: a sleeping core gives its cached
                // buffers back, or the peer could wait for them forever.
                cc.flush();
            }
            cc.maintain();
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    for s in pool.stats() {
        println!("{s:?}");
        assert_eq!((s.in_use, s.free_bufs), (0, s.total_bufs), "{s:?}");
        assert_eq!(s.allocs, s.frees);
    }
}
