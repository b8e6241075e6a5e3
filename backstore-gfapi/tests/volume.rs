//! Against a real volume: scripts/gluster.sh starts glusterd and exports
//! TARGET_RDMA_GLUSTER_TEST (scripts/test.sh does this in CI, where a
//! glusterd that cannot start makes these tests fail, not skip). Without
//! the variable they print why and pass without testing anything.

use backstore_gfapi::{ConnectOptions, GlusterBackstore, GlusterUrl, ImageOptions, Volume};
use scsi::backstore::{Backstore, Io, IoDone, IoOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ENV: &str = "TARGET_RDMA_GLUSTER_TEST";

fn url() -> Option<GlusterUrl> {
    match std::env::var(ENV) {
        // gluster://HOST/VOLUME: the tests name their own files in it.
        Ok(u) => Some(
            GlusterUrl::parse(&format!("{}/probe", u.trim_end_matches('/')))
                .expect("bad TARGET_RDMA_GLUSTER_TEST"),
        ),
        Err(_) => {
            println!(
                "skipped: {ENV} not set (run scripts/gluster.sh start DIR and source DIR/env)"
            );
            None
        }
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        init_timeout: Duration::from_secs(30),
        log_file: Some(std::env::temp_dir().join("target-rdma-gfapi-test.log")),
        ..ConnectOptions::default()
    }
}

fn volume(u: &GlusterUrl) -> Arc<Volume> {
    Volume::connect(&u.volume, &u.servers, &opts()).expect("connect to the test volume")
}

/// A file name no other test (or earlier run) uses.
fn unique(name: &str) -> String {
    let n: u64 = rand::random();
    format!("/{name}-{}-{n:016x}.img", std::process::id())
}

fn wait(b: &mut GlusterBackstore, n: usize) -> Vec<IoDone> {
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        b.poll(&mut out);
        if out.len() < n {
            let fd = b.completion_fd().unwrap();
            let mut pfd = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            let _ = rustix::event::poll(&mut pfd, 100);
        }
        assert!(
            Instant::now() < end,
            "{} of {n} completions after 60 s",
            out.len()
        );
    }
    assert_eq!(out.len(), n, "more completions than operations");
    out
}

fn run(b: &mut GlusterBackstore, op: IoOp, buf: Vec<u8>) -> IoDone {
    b.submit(Io {
        tag: 7,
        op,
        buf: buf.into(),
    });
    let d = wait(b, 1).pop().unwrap();
    assert_eq!(d.tag, 7);
    d
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (seed as usize * 131 + j * 7 + j / 4096) as u8)
        .collect()
}

#[test]
fn data_operations() {
    let Some(u) = url() else { return };
    let vol = volume(&u);
    let path = unique("data");
    let size = 16u64 << 20;
    let mut b =
        GlusterBackstore::open(vol.clone(), &path, Some(size), ImageOptions::default()).unwrap();
    assert_eq!(b.size_bytes(), size);
    assert_eq!(b.kind(), "gluster");
    // A new file reads as zeros.
    let d = run(&mut b, IoOp::Read { offset: 0 }, vec![1; 1 << 20]);
    assert_eq!(d.result, Ok(()));
    assert!(d.buf.iter().all(|&x| x == 0));
    let data = pattern(1, 3 << 20);
    let d = run(
        &mut b,
        IoOp::Write {
            offset: 4096,
            fua: false,
        },
        data.clone(),
    );
    assert_eq!(d.result, Ok(()));
    assert_eq!(d.buf, data, "the write's buffer comes back unchanged");
    let d = run(
        &mut b,
        IoOp::Write {
            offset: 8 << 20,
            fua: true,
        },
        pattern(2, 512),
    );
    assert_eq!(d.result, Ok(()));
    assert_eq!(run(&mut b, IoOp::Flush, Vec::new()).result, Ok(()));
    let d = run(&mut b, IoOp::Read { offset: 4096 }, vec![0; 3 << 20]);
    assert_eq!(d.result, Ok(()));
    assert!(d.buf == data);
    let d = run(&mut b, IoOp::Read { offset: 8 << 20 }, vec![0; 512]);
    assert!(d.buf == pattern(2, 512));
    // Discard and write zeroes read back as zeros; neighbours stay.
    let d = run(
        &mut b,
        IoOp::Discard {
            offset: 1 << 20,
            len: 64 << 10,
        },
        Vec::new(),
    );
    assert_eq!(d.result, Ok(()));
    let d = run(
        &mut b,
        IoOp::WriteZeroes {
            offset: (2 << 20) + 512,
            len: 1024,
        },
        Vec::new(),
    );
    assert_eq!(d.result, Ok(()));
    let d = run(&mut b, IoOp::Read { offset: 4096 }, vec![1; 3 << 20]);
    let at = |off: usize| off - 4096;
    let got = &d.buf;
    assert!(got[..at(1 << 20)] == data[..at(1 << 20)]);
    assert!(got[at(1 << 20)..at((1 << 20) + (64 << 10))]
        .iter()
        .all(|&x| x == 0));
    assert!(
        got[at((1 << 20) + (64 << 10))..at((2 << 20) + 512)]
            == data[at((1 << 20) + (64 << 10))..at((2 << 20) + 512)]
    );
    assert!(got[at((2 << 20) + 512)..at((2 << 20) + 1536)]
        .iter()
        .all(|&x| x == 0));
    assert!(got[at((2 << 20) + 1536)..] == data[at((2 << 20) + 1536)..]);
    // Out of range: refused before gfapi sees it.
    for (op, len) in [
        (IoOp::Read { offset: size - 511 }, 512),
        (
            IoOp::Write {
                offset: size,
                fua: false,
            },
            1,
        ),
        (
            IoOp::Discard {
                offset: size,
                len: 1,
            },
            0,
        ),
        (
            IoOp::WriteZeroes {
                offset: 1,
                len: u64::MAX,
            },
            0,
        ),
    ] {
        assert_eq!(
            run(&mut b, op, vec![0; len]).result,
            Err(libc::EINVAL),
            "{op:?}"
        );
    }
    // Zero-length operations complete at once.
    assert_eq!(
        run(&mut b, IoOp::Read { offset: 0 }, Vec::new()).result,
        Ok(())
    );
    assert_eq!(b.shutdown(), Ok(()));
    drop(b);
    // Reopened without a size: the file's; with a larger one: grown.
    let b = GlusterBackstore::open(vol.clone(), &path, None, ImageOptions::default()).unwrap();
    assert_eq!(b.size_bytes(), size);
    drop(b);
    let mut b = GlusterBackstore::open(vol.clone(), &path, Some(2 * size), ImageOptions::default())
        .unwrap();
    assert_eq!(b.size_bytes(), 2 * size);
    let d = run(&mut b, IoOp::Read { offset: 8 << 20 }, vec![0; 512]);
    assert!(d.buf == pattern(2, 512), "data survives reopening");
    // A missing file without a size is refused with a reason.
    let e = GlusterBackstore::open(vol, &unique("missing"), None, ImageOptions::default())
        .err()
        .expect("missing file without size");
    assert!(e.to_string().contains("no size given"), "{e}");
}

#[test]
fn one_connection_per_volume_and_servers() {
    let Some(u) = url() else { return };
    let a = volume(&u);
    let b = volume(&u);
    assert!(Arc::ptr_eq(&a, &b));
    let mut b1 = GlusterBackstore::open(
        a.clone(),
        &unique("share1"),
        Some(1 << 20),
        ImageOptions::default(),
    )
    .unwrap();
    let mut b2 = GlusterBackstore::open(
        b.clone(),
        &unique("share2"),
        Some(1 << 20),
        ImageOptions::default(),
    )
    .unwrap();
    assert_eq!(
        run(
            &mut b1,
            IoOp::Write {
                offset: 0,
                fua: false
            },
            vec![1; 4096]
        )
        .result,
        Ok(())
    );
    assert_eq!(
        run(
            &mut b2,
            IoOp::Write {
                offset: 0,
                fua: false
            },
            vec![2; 4096]
        )
        .result,
        Ok(())
    );
    assert!(run(&mut b1, IoOp::Read { offset: 0 }, vec![0; 4096])
        .buf
        .iter()
        .all(|&x| x == 1));
    assert!(run(&mut b2, IoOp::Read { offset: 0 }, vec![0; 4096])
        .buf
        .iter()
        .all(|&x| x == 2));
}

/// Far more operations than slots: the rest wait and start as slots free;
/// every one completes once with its own data.
#[test]
fn many_concurrent_operations() {
    let Some(u) = url() else { return };
    let vol = volume(&u);
    let len = 8192;
    let n = 1000u64;
    let mut b = GlusterBackstore::open(
        vol,
        &unique("many"),
        Some(n * len as u64),
        ImageOptions::default(),
    )
    .unwrap();
    for i in 0..n {
        b.submit(Io {
            tag: i,
            op: IoOp::Write {
                offset: i * len as u64,
                fua: i % 100 == 0,
            },
            buf: pattern(i, len).into(),
        });
    }
    assert!(b.in_flight() <= 128);
    let mut seen = vec![false; n as usize];
    for d in wait(&mut b, n as usize) {
        assert_eq!(d.result, Ok(()), "tag {}", d.tag);
        assert!(
            !std::mem::replace(&mut seen[d.tag as usize], true),
            "tag {} twice",
            d.tag
        );
    }
    for i in 0..n {
        b.submit(Io {
            tag: i,
            op: IoOp::Read {
                offset: i * len as u64,
            },
            buf: vec![0; len].into(),
        });
    }
    for d in wait(&mut b, n as usize) {
        assert_eq!(d.result, Ok(()));
        assert!(d.buf == pattern(d.tag, len), "tag {}", d.tag);
    }
    assert_eq!(b.in_flight(), 0);
}

/// The completion descriptor wakes a reactor that sleeps on it.
#[test]
fn completion_fd_wakes_a_sleeper() {
    let Some(u) = url() else { return };
    let mut b = GlusterBackstore::open(
        volume(&u),
        &unique("wake"),
        Some(1 << 20),
        ImageOptions::default(),
    )
    .unwrap();
    let fd = b.completion_fd().unwrap().try_clone_to_owned().unwrap();
    for round in 0..5u64 {
        b.submit(Io {
            tag: round,
            op: IoOp::Write {
                offset: 0,
                fua: true,
            },
            buf: vec![round as u8; 4096].into(),
        });
        let mut out = Vec::new();
        b.poll(&mut out);
        while out.is_empty() {
            let mut pfd = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            let n = rustix::event::poll(&mut pfd, 10_000).unwrap();
            assert_eq!(n, 1, "completion_fd never became readable");
            b.poll(&mut out);
        }
        assert_eq!(out[0].result, Ok(()));
    }
}

/// With a zero command timeout every operation outlives its deadline:
/// callers get ETIMEDOUT at once (within the timer's resolution), each
/// operation completes exactly once, and the slots come back when gfapi's
/// late callbacks arrive, after which I/O works again.
#[test]
fn operations_past_the_command_timeout() {
    let Some(u) = url() else { return };
    let vol = volume(&u);
    let path = unique("timeout");
    let len = 4 << 20;
    let opts = ImageOptions {
        command_timeout: Duration::ZERO,
    };
    let mut b = GlusterBackstore::open(vol.clone(), &path, Some(64 << 20), opts).unwrap();
    let n = 16u64;
    let t0 = Instant::now();
    for i in 0..n {
        b.submit(Io {
            tag: i,
            op: IoOp::Read {
                offset: i * len as u64,
            },
            buf: vec![0; len].into(),
        });
    }
    let out = wait(&mut b, n as usize);
    let timed_out = out
        .iter()
        .filter(|d| d.result == Err(libc::ETIMEDOUT))
        .count();
    println!("{timed_out} of {n} timed out after {:?}", t0.elapsed());
    assert!(timed_out > 0);
    assert!(out
        .iter()
        .all(|d| d.result == Ok(()) || d.result == Err(libc::ETIMEDOUT)));
    assert!(
        out.iter()
            .filter(|d| d.result.is_err())
            .all(|d| d.buf.is_empty()),
        "a timed-out buffer stays with gfapi"
    );
    // The late callbacks free the slots; nothing more is reported.
    let end = Instant::now() + Duration::from_secs(30);
    let mut more = Vec::new();
    while b.in_flight() > 0 {
        b.poll(&mut more);
        std::thread::sleep(Duration::from_millis(5));
        assert!(Instant::now() < end, "slots never came back");
    }
    assert!(more.is_empty());
    drop(b);
    let mut b = GlusterBackstore::open(vol, &path, None, ImageOptions::default()).unwrap();
    assert_eq!(
        run(
            &mut b,
            IoOp::Write {
                offset: 0,
                fua: true
            },
            vec![3; 4096]
        )
        .result,
        Ok(())
    );
}

/// Connecting to nothing fails within the bound, with a message.
#[test]
fn unreachable_servers_fail_in_time() {
    let Some(u) = url() else { return };
    let bad = GlusterUrl::parse("gluster://127.0.0.3:1/nosuchvol/x").unwrap();
    let o = ConnectOptions {
        init_timeout: Duration::from_secs(5),
        ..opts()
    };
    let t0 = Instant::now();
    let e = Volume::connect(&bad.volume, &bad.servers, &o)
        .err()
        .expect("connected to nothing");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(e.to_string().contains("nosuchvol"), "{e}");
    println!("refused after {:?}: {e}", t0.elapsed());
    // A volume glusterd does not have.
    let t0 = Instant::now();
    let e = Volume::connect("nosuchvol", &u.servers, &o)
        .err()
        .expect("connected to a missing volume");
    assert!(t0.elapsed() < Duration::from_secs(8));
    println!("refused after {:?}: {e}", t0.elapsed());
}

/// A server that accepts the connection and never answers: glfs_init
/// would wait for the volfile indefinitely; connecting gives up at the
/// bound, and the init thread cleans up once gfapi returns.
#[test]
fn silent_server_hits_the_init_timeout() {
    if url().is_none() {
        return;
    }
    // The kernel completes the handshake from the listen backlog; nobody
    // ever reads or writes.
    let l = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let bad = GlusterUrl::parse(&format!("gluster://127.0.0.3:{port}/silentvol/x")).unwrap();
    let o = ConnectOptions {
        init_timeout: Duration::from_secs(3),
        ..opts()
    };
    let t0 = Instant::now();
    let e = Volume::connect(&bad.volume, &bad.servers, &o)
        .err()
        .expect("connected to a silent server");
    let took = t0.elapsed();
    println!("gave up after {took:?}: {e}");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("not connected within 3 s"), "{e}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(6),
        "{took:?}"
    );
    drop(l);
}
