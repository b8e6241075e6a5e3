//! Self-test of the `rdma` crate on a real device, in one process: a
//! target side (listener, pool buffers registered once per arena through
//! the PD's Registrar, one CQ with a completion channel, one SRQ) and an
//! initiator side (a client CM id, one owned registered region) connect
//! over RDMA CM on the address given, exchange iSER CM headers both
//! ways, then move data the way iSER does: Sends into SRQ receives,
//! RDMA Write of several MiB from a scatter-gather list followed by a
//! Send (Data-In and its response), RDMA Read into a scatter-gather list
//! (solicited Data-Out), and Send with Invalidate of a memory window's
//! rkey. Every byte is checked. Prints PASS/FAIL lines; exits non-zero on
//! any failure.
//!
//! Usage: loopback ADDR [MIB] [ROUNDS]   (e.g. loopback 169.254.77.1 8 4)
//!
//! `loopback ADDR MIB ROUNDS removal` instead deletes the device
//! (`rdma link delete`) once connected, expects DEVICE_REMOVAL on every
//! id, releases everything, and checks the deletion then completes. It
//! leaves the machine without that device: run it last.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use std::os::fd::AsRawFd;

use mempool::{thread_heap_allocs, Backing, Buf, ClassConfig, HeapCount, Pool, PoolConfig, SgList};
use rdma::iser::IserCmHeader;
use rdma::{
    AccessFlags, CmEvent, CmEventKind, CmIdRef, Completion, CompletionQueue, ConnParam,
    EventChannel, MwBind, OwnedRegion, QpInit, RecvWr, SendFlags, SendOp, SendWr, Sge,
    SharedReceiveQueue, WcOpcode,
};

const CM_TOKEN: Token = Token(0);
const CQ_TOKEN: Token = Token(1);

/// Events read from the target CQ's completion channel, all run long.
static WAKEUPS: AtomicU32 = AtomicU32::new(0);

#[global_allocator]
static ALLOC: HeapCount = HeapCount;

/// Size of one control message (a login PDU's buffer in iSER).
const MSG: usize = 8192;
const RECVS: usize = 16;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Scatter-gather elements one list holds at most (mempool's limit).
const MAX_SGES: usize = 64;

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

struct Report {
    failed: u32,
}

impl Report {
    fn check(&mut self, ok: bool, what: &str, detail: &str) {
        println!("{} {what}: {detail}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failed += 1;
        }
    }
}

/// CM events from the one channel both sides use, with the ones not yet
/// wanted kept in arrival order.
struct Events {
    ch: EventChannel,
    pending: VecDeque<CmEvent>,
}

impl Events {
    fn wait(&mut self, what: &str, mut want: impl FnMut(&CmEvent) -> bool) -> Res<CmEvent> {
        if let Some(i) = self.pending.iter().position(&mut want) {
            return Ok(self.pending.remove(i).expect("position is in range"));
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let seen: Vec<String> = self
                    .pending
                    .iter()
                    .map(|e| format!("{:?} on {:#x}", e.kind, e.id.0))
                    .collect();
                return Err(format!(
                    "timed out waiting for {what}; other events: {seen:?}"
                ));
            }
            match self.ch.wait_event(left) {
                Ok(Some(ev)) if want(&ev) => return Ok(ev),
                Ok(Some(ev)) => self.pending.push_back(ev),
                Ok(None) => {}
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
    }

    fn on(&mut self, id: CmIdRef, what: &str) -> Res<CmEventKind> {
        Ok(self.wait(what, |e| e.id == id)?.kind)
    }
}

/// Collects `want` completions into `out` (capacity reserved by the
/// caller, so nothing allocates). With `evented`, sleeps on the CQ's
/// channel between empty polls, re-polling after arming so a completion
/// that raced the arm is not missed; otherwise spins.
fn reap(cq: &CompletionQueue, want: usize, evented: bool, out: &mut Vec<Completion>) -> Res<u32> {
    let mut batch = [Completion::EMPTY; 32];
    let mut events = 0;
    let deadline = Instant::now() + TIMEOUT;
    out.clear();
    while out.len() < want {
        let n = cq.poll(&mut batch).map_err(|e| e.to_string())?;
        out.extend_from_slice(&batch[..n]);
        if n > 0 {
            continue;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out with {} of {want} completions",
                out.len()
            ));
        }
        if evented {
            cq.req_notify(false).map_err(|e| e.to_string())?;
            let n = cq.poll(&mut batch).map_err(|e| e.to_string())?;
            out.extend_from_slice(&batch[..n]);
            if n == 0 {
                let n = cq
                    .wait_events(Duration::from_millis(100))
                    .map_err(|e| e.to_string())?;
                events += n;
                WAKEUPS.fetch_add(n, Ordering::Relaxed);
            }
        } else {
            // Soft-RoCE does its work in kernel threads on the same CPUs:
            // spinning flat out would slow the transfer being waited for.
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    Ok(events)
}

fn bad_completion(cs: &[Completion]) -> Option<String> {
    cs.iter().find(|c| !c.is_success()).map(|c| {
        format!(
            "wr {} completed with {} (vendor {})",
            c.wr_id, c.status, c.vendor_err
        )
    })
}

/// The byte at offset `i` of round `r`'s data in direction `d`: never
/// the same for neighbouring rounds, offsets or directions.
fn pattern(d: u8, r: u32, i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((r as u64) << 8 | d as u64);
    (x >> 29) as u8 ^ (i as u8).rotate_left(3)
}

fn fill(buf: &mut [u8], d: u8, r: u32) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(d, r, i);
    }
}

fn first_mismatch(buf: &[u8], d: u8, r: u32) -> Option<usize> {
    buf.iter()
        .enumerate()
        .position(|(i, b)| *b != pattern(d, r, i))
}

fn main() -> ExitCode {
    let mut report = Report { failed: 0 };
    match run(&mut report) {
        Ok(()) if report.failed == 0 => {
            println!("RESULT PASS");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            println!("RESULT FAIL ({} checks failed)", report.failed);
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("FAIL setup: {e}");
            println!("RESULT FAIL");
            ExitCode::FAILURE
        }
    }
}

fn run(report: &mut Report) -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let ip: IpAddr = args
        .get(1)
        .ok_or("usage: loopback ADDR [MIB] [ROUNDS] [removal]")?
        .parse()
        .map_err(err("ADDR"))?;
    let mib: usize = args
        .get(2)
        .map_or(Ok(8), |s| s.parse())
        .map_err(err("MIB"))?;
    let rounds: u32 = args
        .get(3)
        .map_or(Ok(4), |s| s.parse())
        .map_err(err("ROUNDS"))?;
    let removal = args.get(4).is_some_and(|a| a == "removal");
    if !(1..=16).contains(&mib) {
        return Err("MIB must be 1 to 16 (64 pool buffers of 256 KiB)".into());
    }
    let bytes = mib << 20;

    // ---- target side: listener, device, PD, pool, CQ, SRQ ----
    let mut ev = Events {
        ch: EventChannel::new().map_err(|e| e.to_string())?,
        pending: VecDeque::new(),
    };
    let listener = ev
        .ch
        .listen(SocketAddr::new(ip, 0), 16)
        .map_err(|e| e.to_string())?;
    let port = listener
        .local_addr()
        .ok_or("listener has no address")?
        .port();
    let tctx = listener.context().map_err(|e| e.to_string())?;
    let dev = tctx.query().map_err(|e| e.to_string())?;
    report.check(
        true,
        "device",
        &format!(
            "{} listening on {ip}:{port}; max_sge {} max_qp_rd_atom {} max_qp_init_rd_atom {} \
             max_srq_wr {} max_mw {}",
            tctx.name(),
            dev.max_sge,
            dev.max_qp_rd_atom,
            dev.max_qp_init_rd_atom,
            dev.max_srq_wr,
            dev.max_mw
        ),
    );
    let max_sge = dev.max_sge.clamp(1, 32);

    let tpd = tctx.alloc_pd().map_err(|e| e.to_string())?;
    let tpool = Pool::new(PoolConfig {
        arena_bytes: 24 << 20,
        arena_limit_bytes: 24 << 20,
        classes: vec![
            ClassConfig {
                buf_bytes: MSG,
                weight: 1,
            },
            ClassConfig {
                buf_bytes: 256 << 10,
                weight: 11,
            },
        ],
        cores: 1,
        backing: Backing::Auto,
        lock_memory: false,
        ..PoolConfig::default()
    })
    .map_err(err("pool"))?;
    let trid = tpool
        .add_registrar(Box::new(tpd.registrar(AccessFlags::LOCAL_WRITE)))
        .map_err(err("add_registrar"))?;
    let arenas = tpool.arenas().len() as u64;
    let regs_at_start = tpd.registrations();
    report.check(
        regs_at_start == arenas,
        "registrar",
        &format!("{regs_at_start} ibv_reg_mr for {arenas} pool arenas"),
    );
    let mut tcache = tpool.core_cache(0).map_err(err("core_cache"))?;
    let tcq = CompletionQueue::new(&tctx, 1024, true).map_err(|e| e.to_string())?;
    let srq = SharedReceiveQueue::new(&tpd, 256, 1).map_err(|e| e.to_string())?;
    let lkey_of = |b: &Buf| {
        tpool
            .keys()
            .get(b.arena(), trid)
            .expect("every arena is registered")
            .lkey
    };

    let small = tcache.class_for(MSG).ok_or("no class for a message")?;
    let mut trecv: Vec<Buf> = Vec::new();
    for _ in 0..RECVS {
        trecv.push(tcache.try_alloc(small).ok_or("pool: no receive buffer")?);
    }
    let trecv_sges: Vec<Sge> = trecv
        .iter()
        .map(|b| Sge::new(b.addr(), b.capacity() as u32, lkey_of(b)))
        .collect();
    let wrs: Vec<RecvWr> = trecv_sges
        .iter()
        .enumerate()
        .map(|(i, s)| RecvWr {
            wr_id: i as u64,
            sges: std::slice::from_ref(s),
        })
        .collect();
    srq.post_recv(&wrs).map_err(|e| e.to_string())?;
    report.check(
        true,
        "srq",
        &format!("{RECVS} receives of {MSG} bytes posted before any connection"),
    );

    // ---- initiator side: resolve, route, QP, receives, connect ----
    let mut cid = ev.ch.create_id().map_err(|e| e.to_string())?;
    cid.resolve_addr(SocketAddr::new(ip, port), TIMEOUT)
        .map_err(|e| e.to_string())?;
    match ev.on(cid.handle(), "ADDR_RESOLVED")? {
        CmEventKind::AddrResolved => {}
        other => return Err(format!("resolve_addr: {other:?}")),
    }
    cid.resolve_route(TIMEOUT).map_err(|e| e.to_string())?;
    match ev.on(cid.handle(), "ROUTE_RESOLVED")? {
        CmEventKind::RouteResolved => {}
        other => return Err(format!("resolve_route: {other:?}")),
    }
    let cctx = cid.context().map_err(|e| e.to_string())?;
    let cpd = cctx.alloc_pd().map_err(|e| e.to_string())?;
    // One region: the data area, then RECVS receive slots and one send
    // slot of MSG bytes each.
    let recv_base = bytes;
    let send_off = bytes + RECVS * MSG;
    let mut cmem = OwnedRegion::new(
        &cpd,
        send_off + MSG,
        AccessFlags::LOCAL_WRITE
            | AccessFlags::REMOTE_READ
            | AccessFlags::REMOTE_WRITE
            | AccessFlags::MW_BIND,
    )
    .map_err(|e| e.to_string())?;
    let ccq = CompletionQueue::new(&cctx, 256, false).map_err(|e| e.to_string())?;
    cid.create_qp(
        &cpd,
        &QpInit {
            send_cq: &ccq,
            recv_cq: &ccq,
            srq: None,
            max_send_wr: 64,
            max_recv_wr: RECVS as u32,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        },
    )
    .map_err(|e| e.to_string())?;
    let crecv_sges: Vec<Sge> = (0..RECVS)
        .map(|i| {
            cmem.sge(recv_base + i * MSG, MSG)
                .expect("inside the region")
        })
        .collect();
    let wrs: Vec<RecvWr> = crecv_sges
        .iter()
        .enumerate()
        .map(|(i, s)| RecvWr {
            wr_id: 1000 + i as u64,
            sges: std::slice::from_ref(s),
        })
        .collect();
    cid.post_recv(&wrs).map_err(|e| e.to_string())?;

    let ihdr = IserCmHeader {
        zbva_not_supported: true,
        send_w_inv_not_supported: false,
    };
    let ihdr_bytes = ihdr.encode();
    cid.connect(&ConnParam {
        private_data: &ihdr_bytes,
        responder_resources: dev.max_qp_rd_atom.min(16) as u8,
        initiator_depth: dev.max_qp_init_rd_atom.min(16) as u8,
        ..ConnParam::default()
    })
    .map_err(|e| e.to_string())?;

    // ---- target: connect request, QP on the SRQ, accept ----
    let lh = listener.handle();
    let req = ev.wait(
        "CONNECT_REQUEST",
        |e| matches!(&e.kind, CmEventKind::ConnectRequest(r) if r.listener == lh),
    )?;
    let CmEventKind::ConnectRequest(req) = req.kind else {
        unreachable!("matched above")
    };
    let got = IserCmHeader::decode(&req.private_data);
    report.check(
        got == Some(ihdr),
        "cm connect request",
        &format!(
            "{} bytes of private data, iSER CM header {:02x?} -> {got:?}; peer responder \
             resources {} initiator depth {}",
            req.private_data.len(),
            &req.private_data[..4.min(req.private_data.len())],
            req.responder_resources,
            req.initiator_depth
        ),
    );
    let mut sid = req.id;
    if !sid.is_on(&tctx) {
        return Err("connect request arrived on another device".into());
    }
    let caps = sid
        .create_qp(
            &tpd,
            &QpInit {
                send_cq: &tcq,
                recv_cq: &tcq,
                srq: Some(&srq),
                max_send_wr: 256,
                max_recv_wr: 0,
                max_send_sge: max_sge,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
        )
        .map_err(|e| e.to_string())?;
    let reply = IserCmHeader::target_reply(&ihdr, true);
    let reply_bytes = reply.encode();
    let rd_depth = (dev.max_qp_init_rd_atom.min(255) as u8).min(req.responder_resources);
    sid.accept(&ConnParam {
        private_data: &reply_bytes,
        initiator_depth: rd_depth,
        responder_resources: (dev.max_qp_rd_atom.min(255) as u8).min(req.initiator_depth),
        ..ConnParam::default()
    })
    .map_err(|e| e.to_string())?;

    let sh = sid.handle();
    let mut established = 0;
    let mut accept_pd = None;
    while established < 2 {
        let e = ev.wait("ESTABLISHED", |e| e.id == sh || e.id == cid.handle())?;
        match e.kind {
            CmEventKind::Established { private_data, .. } => {
                if e.id == cid.handle() {
                    accept_pd = IserCmHeader::decode(&private_data);
                }
                established += 1;
            }
            other => return Err(format!("while connecting: {other:?}")),
        }
    }
    let inv_agreed = accept_pd.is_some_and(|t| IserCmHeader::send_w_inv_agreed(&ihdr, &t));
    report.check(
        accept_pd == Some(reply) && inv_agreed,
        "cm established",
        &format!(
            "both sides; accept private data {:02x?} -> {accept_pd:?}, Send with Invalidate \
             agreed: {inv_agreed}; target QP {} (send sge {}), RDMA Read depth {rd_depth}",
            reply_bytes,
            sid.qp_num().unwrap_or(0),
            caps.max_send_sge
        ),
    );

    // The session's reactor has its own event channel; the connection's
    // events follow the id there.
    let mut rev = Events {
        ch: EventChannel::new().map_err(|e| e.to_string())?,
        pending: VecDeque::new(),
    };
    sid.migrate(&rev.ch).map_err(|e| e.to_string())?;
    // ... and polls its CM channel and its CQ's completion channel with
    // mio, beside its sockets.
    let mut reactor = Poll::new().map_err(err("mio"))?;
    let cm_fd = rev.ch.as_raw_fd();
    let cq_fd = tcq.event_fd().ok_or("the target CQ has no channel")?;
    reactor
        .registry()
        .register(&mut SourceFd(&cm_fd), CM_TOKEN, Interest::READABLE)
        .map_err(err("mio register"))?;
    reactor
        .registry()
        .register(&mut SourceFd(&cq_fd), CQ_TOKEN, Interest::READABLE)
        .map_err(err("mio register"))?;
    let mut ready = mio::Events::with_capacity(8);

    if removal {
        return device_removal(
            report,
            &tctx.name(),
            [&mut ev, &mut rev],
            [listener.handle(), cid.handle(), sh],
            move || {
                // Everything built on the device goes, in dependency order
                // (the handles enforce the verbs order among themselves).
                drop((sid, cid, listener, srq, tcq, ccq, cmem));
                for b in trecv {
                    tcache.free(b);
                }
                drop((tcache, tpool, tpd, cpd, tctx, cctx));
            },
        );
    }

    let mut tcs: Vec<Completion> = Vec::with_capacity(256);
    let mut ccs: Vec<Completion> = Vec::with_capacity(256);

    // ---- SEND client -> target into the SRQ ----
    fill(&mut cmem.as_mut_slice()[send_off..send_off + MSG], 1, 0);
    let s = [cmem.sge(send_off, MSG).expect("inside")];
    cid.post_send(&[SendWr {
        wr_id: 7,
        op: SendOp::Send,
        sges: &s,
        flags: SendFlags::SIGNALED,
    }])
    .map_err(|e| e.to_string())?;
    reap(&tcq, 1, true, &mut tcs)?;
    reap(&ccq, 1, false, &mut ccs)?;
    let c = tcs[0];
    let ok = c.is_success()
        && c.opcode == WcOpcode::Recv
        && c.byte_len as usize == MSG
        && first_mismatch(&trecv[c.wr_id as usize].as_slice()[..MSG], 1, 0).is_none()
        && ccs[0].is_success()
        && ccs[0].wr_id == 7;
    report.check(
        ok,
        "send/recv initiator->target",
        &format!(
            "{} bytes into SRQ receive {} ({}), verified",
            c.byte_len, c.wr_id, c.status
        ),
    );
    // Give the receive back at once, as a reactor does.
    let i = c.wr_id as usize;
    srq.post_recv(&[RecvWr {
        wr_id: i as u64,
        sges: std::slice::from_ref(&trecv_sges[i]),
    }])
    .map_err(|e| e.to_string())?;

    // ---- SEND target -> client ----
    let mut tsend = tcache.try_alloc(small).ok_or("pool: no send buffer")?;
    fill(&mut tsend.as_mut_slice()[..MSG], 2, 0);
    let s = [Sge::new(tsend.addr(), MSG as u32, lkey_of(&tsend))];
    sid.post_send(&[SendWr {
        wr_id: 8,
        op: SendOp::Send,
        sges: &s,
        flags: SendFlags::SIGNALED,
    }])
    .map_err(|e| e.to_string())?;
    reap(&ccq, 1, false, &mut ccs)?;
    reap(&tcq, 1, true, &mut tcs)?;
    let c = ccs[0];
    let slot = c.wr_id.wrapping_sub(1000) as usize;
    let ok = c.is_success()
        && c.opcode == WcOpcode::Recv
        && c.byte_len as usize == MSG
        && slot < RECVS
        && first_mismatch(
            &cmem.as_slice()[recv_base + slot * MSG..recv_base + (slot + 1) * MSG],
            2,
            0,
        )
        .is_none()
        && tcs[0].is_success();
    report.check(
        ok,
        "send/recv target->initiator",
        &format!("{} bytes ({}), verified", c.byte_len, c.status),
    );
    cid.post_recv(&[RecvWr {
        wr_id: c.wr_id,
        sges: std::slice::from_ref(&crecv_sges[slot.min(RECVS - 1)]),
    }])
    .map_err(|e| e.to_string())?;

    // ---- RDMA Write (Data-In + response Send) and RDMA Read ----
    let mut sg = SgList::new();
    if !tcache
        .try_alloc_sg(bytes, &mut sg)
        .map_err(err("alloc_sg"))?
    {
        return Err("pool: no buffers for the data".into());
    }
    let mut sges = [Sge::default(); MAX_SGES];
    let mut nsge = 0;
    for (slot, seg) in sges.iter_mut().zip(sg.rdma_segments(tpool.keys(), trid)) {
        *slot = seg.into();
        nsge += 1;
    }
    let mut scratch = vec![0u8; bytes];
    let rkey = cmem.mr().rkey();
    let raddr = cmem.addr();
    let resp = [Sge::new(tsend.addr(), 48, lkey_of(&tsend))];
    let mut write_time = Duration::ZERO;
    let mut read_time = Duration::ZERO;
    let mut write_ok = true;
    let mut read_ok = true;
    let mut detail_w = String::new();
    let mut detail_r = String::new();
    let mut nwr = 0;
    let mut data_allocs = 0;
    for r in 0..rounds {
        // Data-In: the target's pool buffers -> the initiator's memory.
        fill(&mut scratch, 3, r);
        sg.copy_from_slice_at(0, &scratch).map_err(err("copy"))?;
        cmem.as_mut_slice()[..bytes].fill(0);
        let heap0 = thread_heap_allocs();
        let t0 = Instant::now();
        let mut wrs = [SendWr {
            wr_id: 0,
            op: SendOp::Send,
            sges: &[],
            flags: SendFlags::NONE,
        }; MAX_SGES + 1];
        nwr = 0;
        let mut off = 0u64;
        for chunk in sges[..nsge].chunks(max_sge as usize) {
            wrs[nwr] = SendWr {
                wr_id: 100 + nwr as u64,
                op: SendOp::RdmaWrite {
                    remote_addr: raddr + off,
                    rkey,
                },
                sges: chunk,
                flags: SendFlags::NONE,
            };
            off += chunk.iter().map(|s| s.length() as u64).sum::<u64>();
            nwr += 1;
        }
        // The response rides behind the writes: the reliable connection
        // delivers it only after them.
        wrs[nwr] = SendWr {
            wr_id: 99,
            op: SendOp::Send,
            sges: &resp,
            flags: SendFlags::SIGNALED,
        };
        sid.post_send(&wrs[..=nwr]).map_err(|e| e.to_string())?;
        reap(&ccq, 1, false, &mut ccs)?;
        reap(&tcq, 1, true, &mut tcs)?;
        write_time += t0.elapsed();
        data_allocs += thread_heap_allocs() - heap0;
        let c = ccs[0];
        let bad = bad_completion(&ccs).or_else(|| bad_completion(&tcs));
        let mism = first_mismatch(&cmem.as_slice()[..bytes], 3, r);
        if bad.is_some() || mism.is_some() || off as usize != bytes {
            write_ok = false;
            detail_w = format!("round {r}: {bad:?}, first wrong byte {mism:?}, {off} bytes");
        }
        let slot = c.wr_id.wrapping_sub(1000) as usize;
        cid.post_recv(&[RecvWr {
            wr_id: c.wr_id,
            sges: std::slice::from_ref(&crecv_sges[slot.min(RECVS - 1)]),
        }])
        .map_err(|e| e.to_string())?;

        // Solicited Data-Out: the initiator's memory -> pool buffers.
        fill(&mut cmem.as_mut_slice()[..bytes], 4, r);
        scratch.fill(0);
        sg.copy_from_slice_at(0, &scratch).map_err(err("copy"))?;
        let heap0 = thread_heap_allocs();
        let t0 = Instant::now();
        let mut off = 0u64;
        let mut n = 0;
        for chunk in sges[..nsge].chunks(max_sge as usize) {
            wrs[n] = SendWr {
                wr_id: 200 + n as u64,
                op: SendOp::RdmaRead {
                    remote_addr: raddr + off,
                    rkey,
                },
                sges: chunk,
                flags: SendFlags::NONE,
            };
            off += chunk.iter().map(|s| s.length() as u64).sum::<u64>();
            n += 1;
        }
        wrs[n - 1].flags = SendFlags::SIGNALED;
        sid.post_send(&wrs[..n]).map_err(|e| e.to_string())?;
        reap(&tcq, 1, true, &mut tcs)?;
        read_time += t0.elapsed();
        data_allocs += thread_heap_allocs() - heap0;
        sg.copy_to_slice_at(0, &mut scratch).map_err(err("copy"))?;
        let bad = bad_completion(&tcs);
        let mism = first_mismatch(&scratch, 4, r);
        if bad.is_some() || mism.is_some() || tcs[0].opcode != WcOpcode::RdmaRead {
            read_ok = false;
            detail_r = format!("round {r}: {bad:?}, first wrong byte {mism:?}");
        }
    }
    let total = (bytes as u64 * rounds as u64) as f64;
    let mbps = |t: Duration| total / t.as_secs_f64().max(1e-9) / 1e6;
    report.check(
        write_ok,
        "rdma_write",
        &if write_ok {
            format!(
                "{rounds} x {mib} MiB from {nsge} pool buffers in {nwr} RDMA Writes + 1 Send \
                 each, {} bytes verified, {:.1} MB/s",
                total as u64,
                mbps(write_time)
            )
        } else {
            detail_w
        },
    );
    report.check(
        read_ok,
        "rdma_read",
        &if read_ok {
            format!(
                "{rounds} x {mib} MiB into {nsge} pool buffers by RDMA Read, {} bytes verified, \
                 {:.1} MB/s",
                total as u64,
                mbps(read_time)
            )
        } else {
            detail_r
        },
    );
    report.check(
        data_allocs == 0,
        "no heap on the data path",
        &format!("{data_allocs} Rust heap allocations while posting and polling"),
    );
    let regs_now = tpd.registrations();
    report.check(
        regs_now == regs_at_start,
        "registrations",
        &format!(
            "target PD: {regs_now} ibv_reg_mr in all ({arenas} arenas), {} during I/O; \
             initiator PD: {}",
            regs_now - regs_at_start,
            cpd.registrations()
        ),
    );

    // ---- completion channel: arm, sleep on the fd, wake on a receive ----
    let mut batch = [Completion::EMPTY; 32];
    while tcq.poll(&mut batch).map_err(|e| e.to_string())? > 0 {}
    tcq.req_notify(false).map_err(|e| e.to_string())?;
    let s = [cmem.sge(send_off, MSG).expect("inside")];
    cid.post_send(&[SendWr {
        wr_id: 9,
        op: SendOp::Send,
        sges: &s,
        flags: SendFlags::SIGNALED,
    }])
    .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut woke = 0;
    while woke == 0 && t0.elapsed() < TIMEOUT {
        reactor
            .poll(&mut ready, Some(TIMEOUT))
            .map_err(err("mio poll"))?;
        if ready.iter().any(|e| e.token() == CQ_TOKEN) {
            // Edge-triggered: take every event before sleeping again.
            woke += tcq.take_events().map_err(|e| e.to_string())?;
        }
    }
    let waited = t0.elapsed();
    let n = tcq.poll(&mut batch).map_err(|e| e.to_string())?;
    reap(&ccq, 1, false, &mut ccs)?;
    let got = batch[..n].iter().find(|c| c.opcode == WcOpcode::Recv);
    report.check(
        woke > 0 && got.is_some_and(|c| c.is_success()),
        "cq channel",
        &format!(
            "armed, slept in mio on the channel fd {:.1} ms, {woke} event(s), then polled \
             {n} completion(s); {} wakeups in the data phase",
            waited.as_secs_f64() * 1e3,
            WAKEUPS.load(Ordering::Relaxed)
        ),
    );
    if let Some(c) = got {
        let i = c.wr_id as usize;
        srq.post_recv(&[RecvWr {
            wr_id: i as u64,
            sges: std::slice::from_ref(&trecv_sges[i]),
        }])
        .map_err(|e| e.to_string())?;
    }

    // ---- Send with Invalidate of a memory window's rkey ----
    let inv = (|| -> Res<String> {
        let mw = cpd.alloc_mw().map_err(|e| e.to_string())?;
        let win = 64 << 10;
        let mw_rkey = cid
            .post_bind_mw(
                300,
                &MwBind {
                    mw: &mw,
                    mr: cmem.mr(),
                    addr: raddr,
                    len: win as u64,
                    access: AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ,
                },
                true,
            )
            .map_err(|e| e.to_string())?;
        reap(&ccq, 1, false, &mut ccs)?;
        if let Some(b) = bad_completion(&ccs) {
            return Err(format!("bind: {b}"));
        }
        // Write through the window, then Send with Invalidate of its rkey.
        let first = [sges[0]];
        let n = (first[0].length() as usize).min(win);
        let first = [Sge::new(first[0].addr(), n as u32, first[0].lkey())];
        fill(&mut scratch[..n], 5, 0);
        sg.copy_from_slice_at(0, &scratch[..n])
            .map_err(err("copy"))?;
        sid.post_send(&[
            SendWr {
                wr_id: 301,
                op: SendOp::RdmaWrite {
                    remote_addr: raddr,
                    rkey: mw_rkey,
                },
                sges: &first,
                flags: SendFlags::NONE,
            },
            SendWr {
                wr_id: 302,
                op: SendOp::SendWithInv {
                    invalidate_rkey: mw_rkey,
                },
                sges: &resp,
                flags: SendFlags::SIGNALED,
            },
        ])
        .map_err(|e| e.to_string())?;
        reap(&ccq, 1, false, &mut ccs)?;
        reap(&tcq, 1, true, &mut tcs)?;
        if let Some(b) = bad_completion(&ccs).or_else(|| bad_completion(&tcs)) {
            return Err(b);
        }
        if let Some(m) = first_mismatch(&cmem.as_slice()[..n], 5, 0) {
            return Err(format!("write through the window: byte {m} wrong"));
        }
        let c = ccs[0];
        if c.opcode != WcOpcode::Recv {
            return Err(format!("expected the Send's receive, got {c:?}"));
        }
        let reported = match c.invalidated_rkey {
            Some(k) if k == mw_rkey => "the receive reported it invalidated".to_string(),
            other => format!(
                "the receive reported invalidated rkey {other:?} (wc_flags {:#x})",
                c.wc_flags
            ),
        };
        // The invalidated key must no longer work: this write fails and
        // takes the connection to the error state (hence done last).
        sid.post_send(&[SendWr {
            wr_id: 303,
            op: SendOp::RdmaWrite {
                remote_addr: raddr,
                rkey: mw_rkey,
            },
            sges: &first,
            flags: SendFlags::SIGNALED,
        }])
        .map_err(|e| e.to_string())?;
        reap(&tcq, 1, true, &mut tcs)?;
        let after = tcs[0];
        if after.is_success() {
            return Err(format!(
                "an RDMA Write with the invalidated rkey succeeded; {reported}"
            ));
        }
        Ok(format!(
            "write of {n} bytes through window rkey {mw_rkey:#x} verified, then Send with \
             Invalidate of it: {reported}; a later write with it failed: {}",
            after.status
        ))
    })();
    match inv {
        Ok(d) => report.check(true, "send_with_inv", &d),
        Err(d) => report.check(false, "send_with_inv", &d),
    }

    // ---- disconnect ----
    cid.disconnect().map_err(|e| e.to_string())?;
    let ch = cid.handle();
    // The passive side answers a DISCONNECTED with its own
    // rdma_disconnect (the DREP); only then does the active side get its
    // DISCONNECTED instead of waiting out the DREQ timeout.
    let t0 = Instant::now();
    let mut target_event = None;
    while target_event.is_none() && t0.elapsed() < TIMEOUT {
        reactor
            .poll(&mut ready, Some(TIMEOUT))
            .map_err(err("mio poll"))?;
        if ready.iter().any(|e| e.token() == CM_TOKEN) {
            // Edge-triggered: drain the channel.
            while let Some(e) = rev.ch.get_event().map_err(|e| e.to_string())? {
                if e.id == sh && target_event.is_none() {
                    target_event = Some(e.kind);
                } else {
                    rev.pending.push_back(e);
                }
            }
        }
    }
    match target_event {
        Some(CmEventKind::Disconnected) => sid.disconnect().map_err(|e| e.to_string())?,
        Some(other) => return Err(format!("target, while disconnecting: {other:?}")),
        None => return Err("target: no DISCONNECTED through mio".into()),
    }
    match ev.on(ch, "DISCONNECTED on the initiator")? {
        CmEventKind::Disconnected => {}
        other => return Err(format!("initiator, while disconnecting: {other:?}")),
    }
    report.check(
        true,
        "disconnect",
        "both sides got DISCONNECTED, the target through mio on the channel its id was \
         migrated to",
    );
    // Flushed receives of the initiator's QP; the SRQ's stay posted.
    let _ = ccq.poll(&mut batch);
    let _ = tcq.poll(&mut batch);

    drop(sid);
    drop(cid);
    tcache.free(tsend);
    for b in trecv {
        tcache.free(b);
    }
    tcache.free_sg(&mut sg);
    Ok(())
}

/// Deletes the soft-RoCE device under live connections: every CM id must
/// get DEVICE_REMOVAL, and once the caller's `release` has dropped all
/// that was built on the device, the kernel must be able to finish
/// removing it (it waits for user space to let go).
fn device_removal(
    report: &mut Report,
    dev: &str,
    channels: [&mut Events; 2],
    ids: [CmIdRef; 3],
    release: impl FnOnce(),
) -> Res<()> {
    let mut child = std::process::Command::new("rdma")
        .args(["link", "delete", dev])
        .spawn()
        .map_err(err("rdma link delete"))?;
    let t0 = Instant::now();
    let mut removed = [false; 3];
    let mut others = Vec::new();
    let [a, b] = channels;
    while !removed.iter().all(|r| *r) && t0.elapsed() < Duration::from_secs(30) {
        for ch in [&mut *a, &mut *b] {
            while let Some(e) = ch.ch.get_event().map_err(|e| e.to_string())? {
                match (ids.iter().position(|i| *i == e.id), &e.kind) {
                    (Some(i), CmEventKind::DeviceRemoval) => removed[i] = true,
                    _ => others.push(format!("{:?}", e.kind)),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    report.check(
        removed.iter().all(|r| *r),
        "device removal events",
        &format!(
            "DEVICE_REMOVAL on listener/initiator/target ids: {removed:?} after {:.1} s; \
             other events {others:?}",
            took.as_secs_f64()
        ),
    );
    release();
    rdma::release_removed_devices();
    let t1 = Instant::now();
    let status = loop {
        match child.try_wait().map_err(err("rdma link delete"))? {
            Some(st) => break Some(st),
            None if t1.elapsed() > Duration::from_secs(30) => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    report.check(
        status.is_some_and(|s| s.success()),
        "device released",
        &match status {
            Some(st) => format!(
                "after every resource was dropped, `rdma link delete {dev}` finished ({st}) \
                 {:.1} s later",
                t1.elapsed().as_secs_f64()
            ),
            None => format!(
                "`rdma link delete {dev}` still waiting 30 s after the release; open \
                 RDMA files: {:?}",
                std::fs::read_dir("/proc/self/fd")
                    .map(|d| d
                        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                        .filter(|p| p.starts_with("/dev/infiniband"))
                        .collect::<Vec<_>>())
                    .unwrap_or_default()
            ),
        },
    );
    Ok(())
}
