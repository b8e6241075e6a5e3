//! The reactor: one thread that owns its sockets, its iSCSI connections and
//! the SCSI targets, and moves work between them without locks.
//!
//! Loop: wait for socket readiness (mio) -> read bytes -> decode PDUs ->
//! `iscsi::conn::Connection` -> SCSI tasks to `scsi::Target` -> completions
//! -> back into the connection -> wire bytes -> socket. This version runs a
//! single reactor; sharding connections across per-core reactors is the
//! next step and will keep this shape, each reactor owning what it serves.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::PollMode;
use iscsi::conn::{CloseReason, ConnConfig, Connection, Event};
use iscsi::login::{ChapConfig, LoginContext, LoginStatus, SessionRequest};
use iscsi::params::{SessionType, TargetLimits};
use iscsi::textreq::{TargetRecord, TextContext};
use mempool::BufPool;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use rand::RngCore;
use scsi::{Nexus, ScsiCompletion, ScsiTask, TaskAttr};
use transport_tcp::{Fill, TcpConn, TX_BACKLOG_MAX_BYTES};

/// One exported iSCSI target: its name, access rules and SCSI device.
pub struct ExportedTarget {
    pub name: String,
    /// Initiator names allowed; empty means anyone.
    pub allow: Vec<String>,
    pub chap: ChapConfig,
    pub device: scsi::Target,
}

/// A listening portal.
pub struct Portal {
    pub addr: SocketAddr,
    pub tpgt: u16,
}

/// Engine-wide settings.
#[derive(Clone)]
pub struct EngineConfig {
    pub limits: TargetLimits,
    pub nop_interval_ms: u64,
    pub nop_timeout_ms: u64,
    pub max_sessions: usize,
    /// Connections accepted but not yet logged in, at most.
    pub max_login_connections: usize,
    pub discovery_chap: ChapConfig,
    pub poll: PollMode,
}

const SIGNAL_TOKEN: Token = Token(usize::MAX - 1);
/// Listener tokens are 0..portals; connection tokens start here.
const CONN_TOKEN_BASE: usize = 1 << 20;
const TICK: Duration = Duration::from_millis(500);
/// Adaptive polling keeps spinning this long after the last work it saw:
/// long enough to catch the next command of a queue-depth-1 initiator
/// without a sleep and wake-up, short enough that an idle target sleeps.
const POLL_IDLE_BUDGET: Duration = Duration::from_micros(50);

struct Session {
    tsih: u16,
    initiator_name: String,
    isid: u64,
    target: usize,
    session_type: SessionType,
    /// The connection currently carrying the session.
    conn: u64,
    cid: u16,
    nexus: Option<scsi::NexusId>,
}

struct ConnEntry {
    tcp: TcpConn,
    proto: Connection,
    portal: usize,
    /// Session this connection belongs to, once login instated it.
    tsih: Option<u16>,
    /// Stopped reading because too much output is queued.
    read_paused: bool,
    /// Empty buffer (with capacity) passed between connection and socket.
    spare_tx: Vec<u8>,
    closing: bool,
}

pub struct Engine {
    cfg: EngineConfig,
    targets: Vec<ExportedTarget>,
    portals: Vec<Portal>,
    listeners: Vec<TcpListener>,
    poll: Poll,
    conns: HashMap<u64, ConnEntry>,
    next_conn: u64,
    sessions: HashMap<u16, Session>,
    next_tsih: u16,
    next_nexus: u64,
    pool: BufPool,
    completions: Vec<ScsiCompletion>,
    /// Connections that got completions in one round (reused buffer).
    touched: Vec<u64>,
    /// Some connection is closing: `reap` has work.
    reap_needed: bool,
    started: Instant,
    /// Connections to close, found while handling another connection.
    doomed: Vec<u64>,
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        targets: Vec<ExportedTarget>,
        portals: Vec<Portal>,
    ) -> io::Result<Engine> {
        let poll = Poll::new()?;
        let mut listeners = Vec::new();
        for (i, p) in portals.iter().enumerate() {
            let mut l = TcpListener::bind(p.addr).map_err(|e| {
                io::Error::new(e.kind(), format!("portal {}: cannot listen: {e}", p.addr))
            })?;
            poll.registry()
                .register(&mut l, Token(i), Interest::READABLE)?;
            listeners.push(l);
        }
        Ok(Engine {
            cfg,
            targets,
            portals,
            listeners,
            poll,
            conns: HashMap::new(),
            next_conn: 0,
            sessions: HashMap::new(),
            next_tsih: 1,
            next_nexus: 1,
            pool: BufPool::new(256 * 1024, 1024),
            completions: Vec::with_capacity(1024),
            touched: Vec::with_capacity(1024),
            reap_needed: false,
            started: Instant::now(),
            doomed: Vec::new(),
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Serve until SIGINT or SIGTERM, then finish in-flight commands, flush
    /// the backstores and return.
    pub fn run(&mut self) -> io::Result<()> {
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let mut last_tick = Instant::now();
        let mut last_work = Instant::now();
        loop {
            let timeout = match self.cfg.poll {
                PollMode::Busy => Duration::ZERO,
                PollMode::Interrupt => TICK,
                PollMode::Adaptive if last_work.elapsed() < POLL_IDLE_BUDGET => Duration::ZERO,
                PollMode::Adaptive => TICK,
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if !events.is_empty() {
                last_work = Instant::now();
            } else if timeout.is_zero() && self.cfg.poll == PollMode::Adaptive {
                // Spinning with nothing to do: let an initiator sharing
                // this core run instead of burning its time slice.
                std::thread::yield_now();
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNAL_TOKEN => {
                        if signals.pending().next().is_some() {
                            tracing::info!("signal received: stopping");
                            return self.shutdown();
                        }
                    }
                    Token(i) if i < self.listeners.len() => self.accept(i),
                    Token(t) => {
                        let id = (t - CONN_TOKEN_BASE) as u64;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.service_read(id);
                        }
                        if ev.is_writable() {
                            self.flush_conn(id);
                        }
                    }
                }
            }
            self.run_until_idle();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                let now = self.now_ms();
                let ids: Vec<u64> = self.conns.keys().copied().collect();
                for id in ids {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.proto.tick(now);
                    }
                    self.process_events(id);
                    self.flush_conn(id);
                }
                self.reap();
            }
        }
    }

    /// Drain backstore completions and whatever they unblock.
    fn run_until_idle(&mut self) {
        loop {
            let mut n = 0;
            self.completions.clear();
            for t in &mut self.targets {
                n += t.device.poll(&mut self.completions);
            }
            if n == 0 {
                break;
            }
            let mut done = std::mem::take(&mut self.completions);
            let mut touched = std::mem::take(&mut self.touched);
            for c in done.drain(..) {
                let id = c.tag >> 32;
                let task = c.tag as u32;
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.proto
                        .scsi_complete(task, c.status, &c.sense, &c.data_in, c.data_out_len);
                    touched.push(id);
                }
                self.pool.give(c.data_in);
                self.pool.give(c.data_out);
            }
            self.completions = done;
            // Completions of several connections interleave: each
            // connection is flushed once per round, with one writev.
            touched.sort_unstable();
            touched.dedup();
            for &id in &touched {
                self.process_events(id);
                self.flush_conn(id);
            }
            touched.clear();
            self.touched = touched;
        }
        self.reap();
    }

    fn accept(&mut self, portal: usize) {
        loop {
            match self.listeners[portal].accept() {
                Ok((mut stream, peer)) => {
                    let logging_in = self
                        .conns
                        .values()
                        .filter(|c| !c.proto.is_full_feature())
                        .count();
                    if logging_in >= self.cfg.max_login_connections {
                        tracing::warn!(%peer, "too many connections in login; refusing");
                        drop(stream);
                        continue;
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    let token = Token(CONN_TOKEN_BASE + id as usize);
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::warn!(%peer, "register failed: {e}");
                        continue;
                    }
                    tracing::debug!(%peer, id, "connection accepted");
                    let cc = ConnConfig {
                        limits: self.cfg.limits.clone(),
                        transport: iscsi::params::Transport::Tcp,
                        nop_interval_ms: self.cfg.nop_interval_ms,
                        nop_timeout_ms: self.cfg.nop_timeout_ms,
                        login_timeout_ms: 30_000,
                    };
                    self.conns.insert(
                        id,
                        ConnEntry {
                            tcp: TcpConn::new(stream),
                            proto: Connection::new(cc, self.now_ms()),
                            portal,
                            tsih: None,
                            read_paused: false,
                            spare_tx: Vec::new(),
                            closing: false,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Read and handle everything a connection has sent.
    fn service_read(&mut self, id: u64) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.closing {
                return;
            }
            if c.tcp.tx_pending() > TX_BACKLOG_MAX_BYTES {
                c.read_paused = true;
                return;
            }
            let fill = c.tcp.fill(c.proto.decoder());
            let got = match fill {
                Ok(Fill::Read(n)) => n,
                Ok(Fill::Eof) | Err(_) => {
                    self.mark_closed(id, "peer closed the connection");
                    return;
                }
            };
            self.handle_buffered(id);
            self.run_until_idle();
            if got == 0 {
                return;
            }
        }
    }

    /// Handle every whole PDU in the receive buffer.
    fn handle_buffered(&mut self, id: u64) {
        let now = self.now_ms();
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.closing || c.proto.is_closing() {
                break;
            }
            let pdu = match c.tcp.next_pdu(c.proto.decoder()) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(id, "bad PDU: {e}");
                    c.proto.handle_decode_error(e);
                    self.process_events(id);
                    continue;
                }
            };
            let portal = c.portal;
            // Split borrows: the connection lives in `conns`, the context
            // borrows the rest of the engine.
            let mut entry = self.conns.remove(&id).expect("present above");
            {
                let mut ctx = Ctx {
                    engine: self,
                    conn_id: id,
                    portal,
                    instated: None,
                };
                entry.proto.handle_pdu(&mut ctx, pdu, now);
                if let Some(tsih) = ctx.instated {
                    entry.tsih = Some(tsih);
                }
            }
            self.conns.insert(id, entry);
            self.process_events(id);
        }
        self.flush_conn(id);
    }

    /// Carry out what the connection asked for.
    fn process_events(&mut self, id: u64) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let Some(ev) = c.proto.poll_event() else {
                break;
            };
            match ev {
                Event::LoggedIn(o) => {
                    let tsih = o.tsih;
                    if let Some(s) = self.sessions.get_mut(&tsih) {
                        if s.session_type == SessionType::Normal && s.nexus.is_none() {
                            let nexus = Nexus {
                                id: self.next_nexus,
                                initiator_name: s.initiator_name.clone(),
                                isid: s.isid,
                                target_name: self.targets[s.target].name.clone(),
                                tpgt: self.portals[c.portal].tpgt,
                            };
                            self.next_nexus += 1;
                            s.nexus = Some(nexus.id);
                            self.targets[s.target].device.nexus_added(&nexus);
                        }
                        tracing::info!(
                            initiator = %o.session.initiator_name,
                            target = %o.session.target_name,
                            tsih,
                            "login complete"
                        );
                    }
                }
                Event::Scsi(req) => {
                    let Some((target, nexus)) = self.session_of(id) else {
                        continue;
                    };
                    let data_in = self.pool.take();
                    let task = ScsiTask {
                        tag: id << 32 | req.task as u64,
                        nexus,
                        cdb: req.cdb,
                        attr: TaskAttr::from_iscsi(req.attr),
                        edtl: req.edtl,
                        data_out: req.data_out,
                        data_in,
                    };
                    self.targets[target].device.submit(req.lun, task);
                }
                Event::Abort { task, lun } => {
                    if let Some((target, nexus)) = self.session_of(id) {
                        self.targets[target]
                            .device
                            .abort(lun, nexus, id << 32 | task as u64);
                    }
                }
                Event::LunReset { itt, lun } => {
                    let resp = match self.session_of(id) {
                        Some((target, nexus)) => {
                            if self.targets[target].device.lun_reset(lun, nexus) {
                                iscsi::conn::tmf::RESP_COMPLETE
                            } else {
                                iscsi::conn::tmf::RESP_NO_LUN
                            }
                        }
                        None => iscsi::conn::tmf::RESP_REJECTED,
                    };
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.proto.tmf_done(itt, resp);
                    }
                }
                Event::TargetReset { itt, cold } => {
                    if let Some((target, nexus)) = self.session_of(id) {
                        self.targets[target].device.target_reset(nexus);
                        if cold {
                            // A cold reset ends every session of the target.
                            let others: Vec<u64> = self
                                .sessions
                                .values()
                                .filter(|s| s.target == target && s.conn != id)
                                .map(|s| s.conn)
                                .collect();
                            self.doomed.extend(others);
                        }
                    }
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.proto.tmf_done(itt, iscsi::conn::tmf::RESP_COMPLETE);
                        if cold {
                            c.proto.close_after_cold_reset();
                        }
                    }
                }
                Event::Close(reason) => {
                    match &reason {
                        CloseReason::Logout => tracing::info!(id, "logout"),
                        CloseReason::LoginFailed => tracing::info!(id, "login refused"),
                        r => tracing::info!(id, "closing: {r:?}"),
                    }
                    c.closing = true;
                    self.reap_needed = true;
                }
            }
        }
    }

    fn session_of(&self, id: u64) -> Option<(usize, scsi::NexusId)> {
        let c = self.conns.get(&id)?;
        let s = self.sessions.get(&c.tsih?)?;
        if s.conn != id {
            return None;
        }
        Some((s.target, s.nexus?))
    }

    fn flush_conn(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.proto.has_tx() {
            // Three buffers cycle between the connection, this spare and the
            // socket, each keeping its capacity, so a large response does
            // not allocate (and map) a fresh buffer every time.
            c.proto.take_tx(&mut c.spare_tx);
            c.tcp.queue(&mut c.spare_tx);
        }
        if c.tcp.flush().is_err() {
            self.mark_closed(id, "write failed");
            return;
        }
        if c.read_paused && c.tcp.tx_pending() <= TX_BACKLOG_MAX_BYTES / 2 {
            c.read_paused = false;
            // Edge-triggered readiness will not fire again for bytes that
            // are already waiting.
            self.service_read(id);
        }
    }

    fn mark_closed(&mut self, id: u64, why: &str) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.closing {
                tracing::debug!(id, "{why}");
            }
            c.closing = true;
            self.reap_needed = true;
        }
    }

    /// Remove connections that are closing and have sent what they could.
    fn reap(&mut self) {
        if !self.reap_needed && self.doomed.is_empty() {
            return;
        }
        for id in std::mem::take(&mut self.doomed) {
            self.mark_closed(id, "session reinstated or ended by a target reset");
        }
        let done: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closing && (c.tcp.tx_pending() == 0 || c.proto.is_closing()))
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            let Some(mut c) = self.conns.remove(&id) else {
                continue;
            };
            let _ = c.tcp.flush();
            let _ = self.poll.registry().deregister(&mut c.tcp.stream);
            let _ = c.tcp.stream.shutdown(std::net::Shutdown::Both);
            if let Some(tsih) = c.tsih {
                let ends = self.sessions.get(&tsih).is_some_and(|s| s.conn == id);
                if ends {
                    self.end_session(tsih);
                }
            }
        }
        // Closing connections still flushing their last bytes stay for
        // the next pass.
        self.reap_needed = self.conns.values().any(|c| c.closing);
    }

    fn end_session(&mut self, tsih: u16) {
        if let Some(s) = self.sessions.remove(&tsih) {
            if let Some(n) = s.nexus {
                self.targets[s.target].device.nexus_removed(n);
            }
            tracing::debug!(tsih, "session ended");
        }
    }

    fn shutdown(&mut self) -> io::Result<()> {
        // Commands already given to the device server finish first.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.targets.iter().any(|t| t.device.in_flight() > 0) && Instant::now() < deadline {
            self.run_until_idle();
            std::thread::sleep(Duration::from_millis(1));
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.flush_conn(id);
        }
        let mut result = Ok(());
        for t in &mut self.targets {
            for l in t.device.luns_mut() {
                if let Err(errno) = l.shutdown() {
                    tracing::error!(lun = l.info().lun, errno, "flush at shutdown failed");
                    result = Err(io::Error::from_raw_os_error(errno));
                }
            }
        }
        tracing::info!("stopped");
        result
    }

    fn alloc_tsih(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let t = self.next_tsih;
            self.next_tsih = self.next_tsih.wrapping_add(1).max(1);
            if !self.sessions.contains_key(&t) {
                return Some(t);
            }
        }
        None
    }
}

/// What login and text negotiation see of the engine.
struct Ctx<'a> {
    engine: &'a mut Engine,
    conn_id: u64,
    portal: usize,
    instated: Option<u16>,
}

impl Ctx<'_> {
    fn target(&self, name: &str) -> Option<usize> {
        self.engine.targets.iter().position(|t| t.name == name)
    }
}

impl LoginContext for Ctx<'_> {
    fn portal_group_tag(&self) -> u16 {
        self.engine.portals[self.portal].tpgt
    }

    fn target_exists(&self, target_name: &str) -> bool {
        self.target(target_name).is_some()
    }

    fn initiator_allowed(&self, target_name: &str, initiator_name: &str) -> bool {
        self.target(target_name).is_some_and(|i| {
            let allow = &self.engine.targets[i].allow;
            allow.is_empty() || allow.iter().any(|a| a == initiator_name)
        })
    }

    fn chap(&self, target_name: Option<&str>) -> ChapConfig {
        match target_name.and_then(|n| self.target(n)) {
            Some(i) => self.engine.targets[i].chap.clone(),
            None => self.engine.cfg.discovery_chap.clone(),
        }
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        rand::rngs::OsRng.fill_bytes(buf);
    }

    fn instate_session(&mut self, req: &SessionRequest) -> Result<u16, LoginStatus> {
        let target = match req.session_type {
            SessionType::Discovery => usize::MAX,
            SessionType::Normal => self
                .target(&req.target_name)
                .ok_or(LoginStatus::NOT_FOUND)?,
        };
        let e = &mut *self.engine;
        if req.tsih != 0 {
            // Add or reinstate a connection: with one connection per
            // session only reinstatement (same CID) is possible.
            let s = e
                .sessions
                .get_mut(&req.tsih)
                .filter(|s| {
                    s.initiator_name == req.initiator_name
                        && s.isid == req.isid
                        && s.target == target
                })
                .ok_or(LoginStatus::SESSION_DOES_NOT_EXIST)?;
            if s.cid != req.cid {
                return Err(LoginStatus::TOO_MANY_CONNECTIONS);
            }
            e.doomed.push(s.conn);
            s.conn = self.conn_id;
            self.instated = Some(req.tsih);
            return Ok(req.tsih);
        }
        // A leading login with an ISID already in use by this initiator on
        // this target reinstates that session: the old one ends.
        let old: Vec<u16> = e
            .sessions
            .values()
            .filter(|s| {
                s.initiator_name == req.initiator_name && s.isid == req.isid && s.target == target
            })
            .map(|s| s.tsih)
            .collect();
        for tsih in old {
            if let Some(s) = e.sessions.get(&tsih) {
                e.doomed.push(s.conn);
                // Detach so the old connection's close does not end the
                // new session.
                let conn = s.conn;
                if let Some(c) = e.conns.get_mut(&conn) {
                    c.tsih = None;
                }
            }
            e.end_session(tsih);
        }
        if e.sessions.len() >= e.cfg.max_sessions {
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        let tsih = e.alloc_tsih().ok_or(LoginStatus::OUT_OF_RESOURCES)?;
        e.sessions.insert(
            tsih,
            Session {
                tsih,
                initiator_name: req.initiator_name.clone(),
                isid: req.isid,
                target,
                session_type: req.session_type,
                conn: self.conn_id,
                cid: req.cid,
                nexus: None,
            },
        );
        self.instated = Some(tsih);
        Ok(tsih)
    }
}

impl TextContext for Ctx<'_> {
    fn send_targets(
        &self,
        initiator_name: &str,
        session_target: Option<&str>,
        query: &str,
    ) -> Vec<TargetRecord> {
        let addresses: Vec<String> = self
            .engine
            .portals
            .iter()
            .zip(self.engine.listeners.iter())
            .map(|(p, l)| {
                let a = l.local_addr().unwrap_or(p.addr);
                format!("{a},{}", p.tpgt)
            })
            .collect();
        self.engine
            .targets
            .iter()
            .filter(|t| match query {
                "All" => session_target.is_none_or(|s| s == t.name),
                "" => session_target == Some(t.name.as_str()),
                name => name == t.name,
            })
            .filter(|t| t.allow.is_empty() || t.allow.iter().any(|a| a == initiator_name))
            .map(|t| TargetRecord {
                name: t.name.clone(),
                addresses: addresses.clone(),
            })
            .collect()
    }
}
