//! Cost of allocation and free, in ns per operation (plain timing loops,
//! `cargo bench -p mempool`). Maps the default 256 MiB pool.

use std::hint::black_box;
use std::time::Instant;

use mempool::{BufPool, Pool, PoolConfig, SgList};

/// Runs `f` `iters` times; `f` does `ops` operations each time.
fn time(name: &str, iters: u64, ops: u64, mut f: impl FnMut()) {
    for _ in 0..iters / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / (iters * ops) as f64;
    println!("{name:<58} {ns:>8.1} ns/op");
}

fn main() {
    let pool = Pool::new(PoolConfig {
        cores: 2,
        ..PoolConfig::default()
    })
    .expect("pool");
    for a in pool.arenas() {
        println!(
            "arena {:?}: {} MiB of {} KiB buffers, {:?}, locked {}",
            a.id,
            a.len_bytes >> 20,
            a.buf_bytes >> 10,
            a.backing,
            a.locked
        );
    }
    let mut a = pool.core_cache(0).unwrap();
    let mut b = pool.core_cache(1).unwrap();
    let c4k = pool.class_of(4096).unwrap();
    let n = 10_000_000;

    time("try_alloc(4 KiB) + free, same core", n, 1, || {
        let x = a.try_alloc(c4k).unwrap();
        a.free(black_box(x));
    });
    let mut held = Vec::with_capacity(256);
    time(
        "256 x try_alloc(4 KiB), then 256 x free (per pair)",
        n / 256,
        256,
        || {
            for _ in 0..256 {
                held.push(a.try_alloc(c4k).unwrap());
            }
            for x in held.drain(..) {
                a.free(x);
            }
        },
    );
    let mut sg = SgList::new();
    for (label, bytes) in [
        ("alloc_or_wait(4 KiB) + free_sg (1 segment)", 4096),
        ("alloc_or_wait(256 KiB) + free_sg (1 segment)", 256 << 10),
        ("alloc_or_wait(4 MiB) + free_sg (4 x 1 MiB)", 4 << 20),
        (
            "alloc_or_wait(1 MiB + 4 KiB) + free_sg (17 x 64 KiB)",
            (1 << 20) + 4096,
        ),
    ] {
        time(label, n / 4, 1, || {
            let r = a.alloc_or_wait(bytes, 1, &mut sg).unwrap();
            assert_eq!(r, mempool::Alloc::Ready);
            a.free_sg(black_box(&mut sg));
        });
    }
    time(
        "try_alloc(4 KiB) on core 0, free on core 1 (via queue)",
        n,
        1,
        || {
            let x = a.try_alloc(c4k).unwrap();
            b.free(black_box(x));
        },
    );
    time("maintain() with nothing to do", n, 1, || a.maintain());
    let mut legacy = BufPool::new(1024, 1 << 30);
    time("heap BufPool take + give (256 KiB Vec)", n, 1, || {
        let v = legacy.take(256 << 10);
        legacy.give(black_box(v));
    });
    a.maintain();
    b.maintain();
    for s in pool.stats() {
        println!("{s:?}");
    }
}
