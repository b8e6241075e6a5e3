//! Scatter-gather `DataBuf`s against a plain vector: random sequences of
//! the operations the data path uses (placing received bytes at offsets,
//! reading ranges piece by piece, length changes, growth past the
//! buffers) must leave the same bytes, and every buffer must go home.

use mempool::{Backing, ClassConfig, DataDest, Pool, PoolConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Copy a pattern into `[at, at + len)` (clipped to the length).
    CopyIn {
        at: usize,
        len: usize,
        seed: u8,
    },
    /// The same through a `DataDest`, as a transport receives.
    Receive {
        at: usize,
        len: usize,
        seed: u8,
    },
    /// Read `[at, at + len)` back with `copy_to_at` and `slices_at`.
    ReadBack {
        at: usize,
        len: usize,
    },
    Truncate {
        len: usize,
    },
    SetLenStale {
        len: usize,
    },
    Extend {
        len: usize,
        seed: u8,
    },
    Resize {
        len: usize,
        value: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let pos = 0usize..40_000;
    prop_oneof![
        (pos.clone(), 0usize..20_000, any::<u8>()).prop_map(|(at, len, seed)| Op::CopyIn {
            at,
            len,
            seed
        }),
        (pos.clone(), 0usize..20_000, any::<u8>()).prop_map(|(at, len, seed)| Op::Receive {
            at,
            len,
            seed
        }),
        (pos.clone(), 0usize..40_000).prop_map(|(at, len)| Op::ReadBack { at, len }),
        pos.clone().prop_map(|len| Op::Truncate { len }),
        pos.clone().prop_map(|len| Op::SetLenStale { len }),
        (0usize..9_000, any::<u8>()).prop_map(|(len, seed)| Op::Extend { len, seed }),
        (0usize..45_000, any::<u8>()).prop_map(|(len, value)| Op::Resize { len, value }),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn pool() -> Pool {
    Pool::new(PoolConfig {
        arena_bytes: 4 << 20,
        arena_limit_bytes: 4 << 20,
        cores: 1,
        backing: Backing::Heap,
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
        ..PoolConfig::default()
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn scatter_gather_buffers_hold_what_a_vector_holds(
        start in 4097usize..32_768,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let p = pool();
        let mut cache = p.core_cache(0).unwrap();
        let Some(mut d) = cache.alloc_data_sg(start) else {
            // More than eight 4 KiB buffers hold, with an eighth wasted.
            return Ok(());
        };
        prop_assert!(!d.is_contiguous());
        // Stale bytes: make them known first.
        let first = pattern(start, 7);
        d.copy_from_at(0, &first);
        let mut model = first;
        for op in ops {
            match op {
                Op::CopyIn { at, len, seed } | Op::Receive { at, len, seed } => {
                    let at = at.min(model.len());
                    let len = len.min(model.len() - at);
                    let src = pattern(len, seed);
                    if matches!(op, Op::Receive { .. }) {
                        let mut dest = DataDest::new(&mut d, at, len).unwrap();
                        let half = len / 2;
                        dest.copy_from(0, &src[..half]);
                        // The rest through the pieces, as readv fills them.
                        let mut done = half;
                        for piece in dest.pieces_from(half) {
                            piece.copy_from_slice(&src[done..done + piece.len()]);
                            done += piece.len();
                        }
                        prop_assert_eq!(done, len);
                    } else {
                        d.copy_from_at(at, &src);
                    }
                    model[at..at + len].copy_from_slice(&src);
                }
                Op::ReadBack { at, len } => {
                    let at = at.min(model.len());
                    let len = len.min(model.len() - at);
                    let mut out = vec![0u8; len];
                    d.copy_to_at(at, &mut out);
                    prop_assert_eq!(&out[..], &model[at..at + len]);
                    let joined: Vec<u8> = d.slices_at(at, len).flatten().copied().collect();
                    prop_assert_eq!(&joined[..], &model[at..at + len]);
                    prop_assert_eq!(d.piece_at(at, len), &model[at..at + d.piece_at(at, len).len()]);
                }
                Op::Truncate { len } => {
                    d.truncate(len);
                    model.truncate(len);
                }
                Op::SetLenStale { len } => {
                    // Within the buffers the bytes stay (stale); beyond,
                    // the buffer grows with zeros like `resize`.
                    let cap = d.capacity();
                    let old = d.len();
                    d.set_len_stale(len);
                    prop_assert_eq!(d.len(), len);
                    if len > old {
                        if len <= cap {
                            // Stale: whatever the buffer held; adopt it.
                            let mut tail = vec![0u8; len - old];
                            d.copy_to_at(old, &mut tail);
                            model.extend_from_slice(&tail);
                        } else {
                            model.resize(len, 0);
                        }
                    } else {
                        model.truncate(len);
                    }
                }
                Op::Extend { len, seed } => {
                    let src = pattern(len, seed);
                    d.extend_from_slice(&src);
                    model.extend_from_slice(&src);
                }
                Op::Resize { len, value } => {
                    d.resize(len, value);
                    model.resize(len, value);
                }
            }
            prop_assert_eq!(d.len(), model.len());
            prop_assert!(d == model, "bytes differ after an operation");
        }
        drop(d);
        cache.flush();
        let s = p.stats();
        prop_assert_eq!(s[0].in_use + s[1].in_use, 0, "every buffer went home");
    }
}
