//! RDMA CM: the event channel, CM ids (listeners and connections), and
//! the queue pair each connection carries.

use std::fmt;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys as sys;

use crate::error::{Error, Result};
use crate::verbs::{
    post_recv_chain, set_nonblocking, AccessFlags, CompletionQueue, Context, CqInner, MemoryRegion,
    MemoryWindow, PdInner, ProtectionDomain, SharedReceiveQueue, SrqInner, POST_CHAIN,
};
use crate::wr::{fill_send_wr, RecvWr, SendWr};

struct ChannelInner {
    raw: *mut sys::rdma_event_channel,
}

// SAFETY: the channel is a file descriptor wrapper; librdmacm calls on it
// are thread-safe.
unsafe impl Send for ChannelInner {}
// SAFETY: as above.
unsafe impl Sync for ChannelInner {}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // SAFETY: every CM id on the channel holds it alive, so none is
        // left; created by us, destroyed once.
        unsafe { sys::rdma_destroy_event_channel(self.raw) };
    }
}

/// An RDMA CM event channel (`rdma_event_channel`) with a non-blocking
/// fd, so a reactor can poll it beside sockets. Every CM id is created on
/// one; events come back decoded as [`CmEvent`] and already acknowledged.
pub struct EventChannel {
    inner: Arc<ChannelInner>,
}

impl EventChannel {
    /// Fails with [`Error::NoDevice`] on a host without RDMA.
    pub fn new() -> Result<EventChannel> {
        // SAFETY: no arguments; returns null and sets errno on failure.
        let raw = unsafe { sys::rdma_create_event_channel() };
        if raw.is_null() {
            return Err(Error::last_opening("rdma_create_event_channel"));
        }
        let ch = EventChannel {
            inner: Arc::new(ChannelInner { raw }),
        };
        set_nonblocking(ch.as_raw_fd(), "fcntl(rdma_event_channel)")?;
        Ok(ch)
    }

    /// A new CM id on this channel (`rdma_create_id`, RDMA_PS_TCP: the
    /// reliable-connected port space iSER uses).
    pub fn create_id(&self) -> Result<CmId> {
        let mut raw: *mut sys::rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is alive and the id keeps it so.
        let rc = unsafe {
            sys::rdma_create_id(self.inner.raw, &mut raw, ptr::null_mut(), sys::RDMA_PS_TCP)
        };
        if rc != 0 {
            return Err(Error::last_opening("rdma_create_id"));
        }
        Ok(CmId {
            raw,
            qp: None,
            _channel: self.inner.clone(),
        })
    }

    /// A listener: `rdma_create_id`, `rdma_bind_addr`, `rdma_listen`.
    /// Port 0 picks a free port ([`CmId::local_addr`] tells which).
    pub fn listen(&self, addr: SocketAddr, backlog: i32) -> Result<CmId> {
        let id = self.create_id()?;
        id.bind_addr(addr)?;
        // SAFETY: the id is alive and bound.
        if unsafe { sys::rdma_listen(id.raw, backlog) } != 0 {
            return Err(Error::last("rdma_listen"));
        }
        Ok(id)
    }

    /// The next event if one is queued (`rdma_get_cm_event`), decoded and
    /// acknowledged; `None` when there is none (EAGAIN).
    pub fn get_event(&self) -> Result<Option<CmEvent>> {
        let mut ev: *mut sys::rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is alive and its fd is non-blocking.
        if unsafe { sys::rdma_get_cm_event(self.inner.raw, &mut ev) } != 0 {
            let e = Error::last("rdma_get_cm_event");
            return match e.errno() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: the library returned a valid event, which stays valid
        // until acknowledged below.
        let raw = unsafe { RawEvent::read(&*ev) };
        // Acknowledge before anything else can fail or block: the event
        // owns the private data (copied above), and rdma_destroy_id waits
        // for every event of its id to be acknowledged.
        // SAFETY: acknowledged exactly once.
        unsafe { sys::rdma_ack_cm_event(ev) };
        Ok(Some(self.build(raw)))
    }

    /// Waits up to `timeout` for an event (poll(2) on the fd). For tests
    /// and tools; a reactor polls the fd itself and calls `get_event`.
    pub fn wait_event(&self, timeout: Duration) -> Result<Option<CmEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.get_event()? {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            poll_readable(self.as_raw_fd(), left)?;
        }
    }

    fn build(&self, raw: RawEvent) -> CmEvent {
        let id = CmIdRef(raw.id as usize);
        let kind = match raw.event {
            sys::RDMA_CM_EVENT_ADDR_RESOLVED => CmEventKind::AddrResolved,
            sys::RDMA_CM_EVENT_ADDR_ERROR => CmEventKind::AddrError { status: raw.status },
            sys::RDMA_CM_EVENT_ROUTE_RESOLVED => CmEventKind::RouteResolved,
            sys::RDMA_CM_EVENT_ROUTE_ERROR => CmEventKind::RouteError { status: raw.status },
            sys::RDMA_CM_EVENT_CONNECT_REQUEST => CmEventKind::ConnectRequest(ConnectRequest {
                listener: CmIdRef(raw.listen_id as usize),
                id: CmId {
                    raw: raw.id,
                    qp: None,
                    _channel: self.inner.clone(),
                },
                private_data: raw.private_data,
                responder_resources: raw.responder_resources,
                initiator_depth: raw.initiator_depth,
            }),
            sys::RDMA_CM_EVENT_CONNECT_RESPONSE => CmEventKind::ConnectResponse {
                private_data: raw.private_data,
            },
            sys::RDMA_CM_EVENT_CONNECT_ERROR => CmEventKind::ConnectError { status: raw.status },
            sys::RDMA_CM_EVENT_UNREACHABLE => CmEventKind::Unreachable { status: raw.status },
            sys::RDMA_CM_EVENT_REJECTED => CmEventKind::Rejected {
                status: raw.status,
                private_data: raw.private_data,
            },
            sys::RDMA_CM_EVENT_ESTABLISHED => CmEventKind::Established {
                private_data: raw.private_data,
                responder_resources: raw.responder_resources,
                initiator_depth: raw.initiator_depth,
            },
            sys::RDMA_CM_EVENT_DISCONNECTED => CmEventKind::Disconnected,
            sys::RDMA_CM_EVENT_DEVICE_REMOVAL => CmEventKind::DeviceRemoval,
            sys::RDMA_CM_EVENT_ADDR_CHANGE => CmEventKind::AddrChange,
            sys::RDMA_CM_EVENT_TIMEWAIT_EXIT => CmEventKind::TimewaitExit,
            other => CmEventKind::Other {
                event: other,
                status: raw.status,
            },
        };
        CmEvent { id, kind }
    }
}

impl AsRawFd for EventChannel {
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: the channel is alive while `self` is.
        unsafe { (*self.inner.raw).fd }
    }
}

impl AsFd for EventChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd stays open as long as the channel.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

pub(crate) fn poll_readable(fd: RawFd, timeout: Duration) -> Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        let e = Error::last("poll");
        return if e.errno() == Some(libc::EINTR) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// Private data carried by a CM message, copied out of the event (no
/// allocation). RDMA CM hands the whole fixed-size field of the message
/// (56 bytes in a connect request, 196 in a reply), zero-padded, not
/// just what the peer wrote.
#[derive(Clone, Copy)]
pub struct PrivateData {
    len: u8,
    bytes: [u8; 255],
}

impl PrivateData {
    pub const EMPTY: PrivateData = PrivateData {
        len: 0,
        bytes: [0; 255],
    };

    /// Copies at most 255 bytes (the CM's length field is a u8).
    pub fn new(data: &[u8]) -> PrivateData {
        let mut p = PrivateData::EMPTY;
        let n = data.len().min(255);
        p.bytes[..n].copy_from_slice(&data[..n]);
        p.len = n as u8;
        p
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::ops::Deref for PrivateData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for PrivateData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.as_bytes()[..(self.len as usize).min(8)];
        write!(f, "PrivateData({} bytes, {:02x?}..)", self.len, shown)
    }
}

/// The fields of an `rdma_cm_event`, copied so the event can be
/// acknowledged at once.
pub(crate) struct RawEvent {
    pub(crate) id: *mut sys::rdma_cm_id,
    pub(crate) listen_id: *mut sys::rdma_cm_id,
    pub(crate) event: u32,
    pub(crate) status: i32,
    pub(crate) private_data: PrivateData,
    pub(crate) responder_resources: u8,
    pub(crate) initiator_depth: u8,
}

impl RawEvent {
    /// # Safety
    /// `ev` must be an unacknowledged event from librdmacm (or a test's
    /// stand-in whose private data pointer covers its length).
    pub(crate) unsafe fn read(ev: &sys::rdma_cm_event) -> RawEvent {
        let connected = matches!(
            ev.event,
            sys::RDMA_CM_EVENT_CONNECT_REQUEST
                | sys::RDMA_CM_EVENT_CONNECT_RESPONSE
                | sys::RDMA_CM_EVENT_ESTABLISHED
                | sys::RDMA_CM_EVENT_REJECTED
        );
        let (private_data, rr, depth) = if connected {
            // SAFETY: for these events and RC ids, `conn` is the member
            // the library filled.
            let c = unsafe { ev.param.conn };
            let pd = if c.private_data.is_null() || c.private_data_len == 0 {
                PrivateData::EMPTY
            } else {
                // SAFETY: the library (or the caller) guarantees the
                // pointer covers private_data_len bytes until the ack.
                PrivateData::new(unsafe {
                    std::slice::from_raw_parts(
                        c.private_data as *const u8,
                        c.private_data_len as usize,
                    )
                })
            };
            (pd, c.responder_resources, c.initiator_depth)
        } else {
            (PrivateData::EMPTY, 0, 0)
        };
        RawEvent {
            id: ev.id,
            listen_id: ev.listen_id,
            event: ev.event,
            status: ev.status,
            private_data,
            responder_resources: rr,
            initiator_depth: depth,
        }
    }
}

/// Which CM id an event is about: compare with [`CmId::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CmIdRef(pub usize);

/// A decoded, acknowledged RDMA CM event.
#[derive(Debug)]
pub struct CmEvent {
    /// The id the event is about (for a connect request, the new id).
    pub id: CmIdRef,
    pub kind: CmEventKind,
}

#[derive(Debug)]
pub enum CmEventKind {
    AddrResolved,
    AddrError {
        status: i32,
    },
    RouteResolved,
    RouteError {
        status: i32,
    },
    /// A peer wants to connect to a listener; accept or reject the new id
    /// (dropping it rejects).
    ConnectRequest(ConnectRequest),
    ConnectResponse {
        private_data: PrivateData,
    },
    ConnectError {
        status: i32,
    },
    Unreachable {
        status: i32,
    },
    /// The peer (or its CM) refused; `status` is the IB CM reject reason
    /// (28 = consumer reject, carrying the peer's private data).
    Rejected {
        status: i32,
        private_data: PrivateData,
    },
    /// The connection is up. On the active side the private data is the
    /// peer's accept data.
    Established {
        private_data: PrivateData,
        responder_resources: u8,
        initiator_depth: u8,
    },
    /// The peer disconnected (or the connection failed). If this side
    /// did not start it, answer with [`CmId::disconnect`]: the peer gets
    /// its own Disconnected only then (or after the DREQ timeout).
    Disconnected,
    /// The device is going away: destroy every id and queue on it.
    DeviceRemoval,
    AddrChange,
    /// The connection's QP may now be destroyed and its number reused.
    TimewaitExit,
    Other {
        event: u32,
        status: i32,
    },
}

/// A connect request: the new id, what the peer sent and asked for.
#[derive(Debug)]
pub struct ConnectRequest {
    pub listener: CmIdRef,
    pub id: CmId,
    pub private_data: PrivateData,
    /// As the CM reports them, from the receiver's point of view (the
    /// kernel swaps the peer's values, and LIO's isert reads them so):
    /// RDMA Reads the peer wants to issue at once, which we serve as
    /// responder.
    pub responder_resources: u8,
    /// RDMA Reads we may issue at once: the peer's responder resources
    /// (bounds our initiator depth).
    pub initiator_depth: u8,
}

/// `rdma_conn_param` for connect and accept.
#[derive(Clone, Copy, Debug)]
pub struct ConnParam<'a> {
    pub private_data: &'a [u8],
    /// RDMA Reads we serve at once for the peer.
    pub responder_resources: u8,
    /// RDMA Reads we issue at once.
    pub initiator_depth: u8,
    pub retry_count: u8,
    /// 7 = retry forever when the peer has no receive posted.
    pub rnr_retry_count: u8,
}

impl Default for ConnParam<'_> {
    fn default() -> Self {
        ConnParam {
            private_data: &[],
            responder_resources: 1,
            initiator_depth: 1,
            retry_count: 7,
            rnr_retry_count: 7,
        }
    }
}

impl ConnParam<'_> {
    pub(crate) fn to_raw(self, call: &'static str) -> Result<sys::rdma_conn_param> {
        let len = u8::try_from(self.private_data.len()).map_err(|_| Error::Invalid {
            call,
            why: "private data longer than 255 bytes",
        })?;
        Ok(sys::rdma_conn_param {
            private_data: if len == 0 {
                ptr::null()
            } else {
                self.private_data.as_ptr().cast()
            },
            private_data_len: len,
            responder_resources: self.responder_resources,
            initiator_depth: self.initiator_depth,
            flow_control: 1,
            retry_count: self.retry_count,
            rnr_retry_count: self.rnr_retry_count,
            srq: 0,
            qp_num: 0,
        })
    }
}

/// Sizes for a queue pair and the queues it uses.
#[derive(Clone, Copy)]
pub struct QpInit<'a> {
    pub send_cq: &'a CompletionQueue,
    pub recv_cq: &'a CompletionQueue,
    /// With an SRQ the QP has no receive queue of its own.
    pub srq: Option<&'a SharedReceiveQueue>,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// What the device granted (`ibv_qp_cap` after creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// What a QP keeps alive: it must be destroyed before any of these.
struct QpParts {
    _pd: Arc<PdInner>,
    _send_cq: Arc<CqInner>,
    _recv_cq: Arc<CqInner>,
    _srq: Option<Arc<SrqInner>>,
}

/// An RDMA CM id (`rdma_cm_id`): a listener, or one connection and its
/// queue pair. Drop destroys the QP, then the id; the queues, PD and
/// event channel it used go when their last user does.
///
/// Before dropping a connected id, disconnect and reap its send
/// completions (they come back flushed): completions for a destroyed QP
/// can still be sitting in a shared CQ.
pub struct CmId {
    raw: *mut sys::rdma_cm_id,
    qp: Option<QpParts>,
    _channel: Arc<ChannelInner>,
}

// SAFETY: a CM id and its QP may be used from any thread (verbs posting
// is thread-safe); only `&mut self` methods change the Rust-side state.
unsafe impl Send for CmId {}

impl fmt::Debug for CmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CmId({:p}, qp {:?})", self.raw, self.qp_num())
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        if self.qp.is_some() {
            // SAFETY: the QP was created on this id by create_qp.
            unsafe { sys::rdma_destroy_qp(self.raw) };
        }
        // SAFETY: events for this id were acknowledged as they were read,
        // so this does not wait; destroyed once.
        unsafe { sys::rdma_destroy_id(self.raw) };
    }
}

impl CmId {
    pub fn handle(&self) -> CmIdRef {
        CmIdRef(self.raw as usize)
    }

    pub fn bind_addr(&self, addr: SocketAddr) -> Result<()> {
        let (mut sa, _) = sockaddr_from(addr);
        // SAFETY: the id is alive; `sa` is a valid sockaddr of its family.
        if unsafe { sys::rdma_bind_addr(self.raw, ptr::addr_of_mut!(sa).cast()) } != 0 {
            return Err(Error::last_opening("rdma_bind_addr"));
        }
        Ok(())
    }

    /// Starts address resolution; AddrResolved or AddrError follows.
    pub fn resolve_addr(&self, dst: SocketAddr, timeout: Duration) -> Result<()> {
        let (mut sa, _) = sockaddr_from(dst);
        // SAFETY: as for bind_addr; a null source lets the CM choose.
        let rc = unsafe {
            sys::rdma_resolve_addr(
                self.raw,
                ptr::null_mut(),
                ptr::addr_of_mut!(sa).cast(),
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if rc != 0 {
            return Err(Error::last_opening("rdma_resolve_addr"));
        }
        Ok(())
    }

    /// Starts route resolution; RouteResolved or RouteError follows.
    pub fn resolve_route(&self, timeout: Duration) -> Result<()> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the id is alive with its address resolved.
        if unsafe { sys::rdma_resolve_route(self.raw, ms) } != 0 {
            return Err(Error::last("rdma_resolve_route"));
        }
        Ok(())
    }

    /// The device the id is bound to (after binding to a device's
    /// address, address resolution, or on a connect request's new id).
    pub fn context(&self) -> Result<Context> {
        // SAFETY: the id is alive; `verbs` is set by the library.
        Context::for_verbs(unsafe { (*self.raw).verbs })
    }

    /// Moves the id to another event channel (`rdma_migrate_id`), e.g.
    /// from the listener's channel to the one of the reactor its session
    /// was placed on, so that reactor sees the connection's events.
    pub fn migrate(&mut self, to: &EventChannel) -> Result<()> {
        // SAFETY: the id and both channels are alive; events already read
        // were acknowledged, so the call does not wait on them.
        if unsafe { sys::rdma_migrate_id(self.raw, to.inner.raw) } != 0 {
            return Err(Error::last("rdma_migrate_id"));
        }
        self._channel = to.inner.clone();
        Ok(())
    }

    /// Whether this id is on `ctx`'s device.
    pub fn is_on(&self, ctx: &Context) -> bool {
        // SAFETY: as above.
        unsafe { (*self.raw).verbs == ctx.as_ptr() }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is alive; the route's address storage is its own.
        unsafe { sockaddr_to(sys::rdma_get_local_addr(self.raw).cast()) }
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as above.
        unsafe { sockaddr_to(sys::rdma_get_peer_addr(self.raw).cast()) }
    }

    /// Creates the id's reliable-connected queue pair (`rdma_create_qp`)
    /// in `pd`, on `pd`'s device. Returns what the device granted.
    pub fn create_qp(&mut self, pd: &ProtectionDomain, init: &QpInit<'_>) -> Result<QpCaps> {
        if self.qp.is_some() {
            return Err(Error::Invalid {
                call: "rdma_create_qp",
                why: "the id already has a queue pair",
            });
        }
        let mut attr = sys::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: init.send_cq.as_ptr(),
            recv_cq: init.recv_cq.as_ptr(),
            srq: init.srq.map_or(ptr::null_mut(), |s| s.as_ptr()),
            cap: sys::ibv_qp_cap {
                max_send_wr: init.max_send_wr,
                max_recv_wr: if init.srq.is_some() {
                    0
                } else {
                    init.max_recv_wr
                },
                max_send_sge: init.max_send_sge,
                max_recv_sge: if init.srq.is_some() {
                    0
                } else {
                    init.max_recv_sge
                },
                max_inline_data: init.max_inline_data,
            },
            qp_type: sys::IBV_QPT_RC,
            // Signal only the requests that ask for it.
            sq_sig_all: 0,
        };
        // SAFETY: id, PD, CQs and SRQ are alive; QpParts keeps them alive
        // until the QP is destroyed in Drop.
        if unsafe { sys::rdma_create_qp(self.raw, pd.as_ptr(), &mut attr) } != 0 {
            return Err(Error::last("rdma_create_qp"));
        }
        self.qp = Some(QpParts {
            _pd: pd.inner.clone(),
            _send_cq: init.send_cq.inner.clone(),
            _recv_cq: init.recv_cq.inner.clone(),
            _srq: init.srq.map(|s| s.inner.clone()),
        });
        let c = attr.cap;
        Ok(QpCaps {
            max_send_wr: c.max_send_wr,
            max_recv_wr: c.max_recv_wr,
            max_send_sge: c.max_send_sge,
            max_recv_sge: c.max_recv_sge,
            max_inline_data: c.max_inline_data,
        })
    }

    fn qp_ptr(&self, call: &'static str) -> Result<*mut sys::ibv_qp> {
        if self.qp.is_none() {
            return Err(Error::Invalid {
                call,
                why: "the CM id has no queue pair",
            });
        }
        // SAFETY: the id is alive; rdma_create_qp set `qp`.
        Ok(unsafe { (*self.raw).qp })
    }

    pub fn qp_num(&self) -> Option<u32> {
        let qp = self.qp_ptr("qp_num").ok()?;
        // SAFETY: the QP is alive while the id holds it.
        Some(unsafe { (*qp).qp_num })
    }

    /// Connects (`rdma_connect`) after route resolution; Established,
    /// Rejected, Unreachable or ConnectError follows.
    pub fn connect(&self, param: &ConnParam<'_>) -> Result<()> {
        let mut p = param.to_raw("rdma_connect")?;
        // SAFETY: the id is alive; `p` points at private data that lives
        // through the call (the library copies it).
        if unsafe { sys::rdma_connect(self.raw, &mut p) } != 0 {
            return Err(Error::last("rdma_connect"));
        }
        Ok(())
    }

    /// Accepts a connect request (`rdma_accept`). Post receives first:
    /// the peer may Send as soon as it sees the reply.
    pub fn accept(&self, param: &ConnParam<'_>) -> Result<()> {
        let mut p = param.to_raw("rdma_accept")?;
        // SAFETY: as for connect.
        if unsafe { sys::rdma_accept(self.raw, &mut p) } != 0 {
            return Err(Error::last("rdma_accept"));
        }
        Ok(())
    }

    pub fn reject(&self, private_data: &[u8]) -> Result<()> {
        let len = u8::try_from(private_data.len()).map_err(|_| Error::Invalid {
            call: "rdma_reject",
            why: "private data longer than 255 bytes",
        })?;
        // SAFETY: the id is alive; the data outlives the call.
        if unsafe { sys::rdma_reject(self.raw, private_data.as_ptr().cast(), len) } != 0 {
            return Err(Error::last("rdma_reject"));
        }
        Ok(())
    }

    /// Starts disconnecting (`rdma_disconnect`): the QP goes to the error
    /// state, outstanding work requests complete flushed, and both sides
    /// get Disconnected.
    pub fn disconnect(&self) -> Result<()> {
        // SAFETY: the id is alive.
        if unsafe { sys::rdma_disconnect(self.raw) } != 0 {
            return Err(Error::last("rdma_disconnect"));
        }
        Ok(())
    }

    /// Posts send-queue work requests (`ibv_post_send`), chained in groups
    /// of 16 on the stack: a Data-In of several RDMA Writes and the
    /// response Send go to the device in one call. Nothing allocates.
    ///
    /// Every Sge must be registered memory of this QP's protection domain
    /// that stays valid (and is not read or written by the program for
    /// the device-written kinds) until the request completes; the device
    /// checks keys and bounds, not Rust borrows.
    pub fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        let qp = self.qp_ptr("ibv_post_send")?;
        let mut chain = [sys::ibv_send_wr::default(); POST_CHAIN];
        for (c, group) in wrs.chunks(POST_CHAIN).enumerate() {
            for (slot, wr) in chain.iter_mut().zip(group) {
                fill_send_wr(wr, slot);
            }
            let base = chain.as_mut_ptr();
            for i in 1..group.len() {
                // SAFETY: i and i-1 are below group.len() <= POST_CHAIN.
                unsafe { (*base.add(i - 1)).next = base.add(i) };
            }
            let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
            // SAFETY: the chain and the Sge slices it points at live
            // through the call (the provider copies them into its queue);
            // the QP is alive.
            let rc = unsafe { sys::ibv_post_send(qp, base, &mut bad) };
            if rc != 0 {
                let at = if bad.is_null() {
                    0
                } else {
                    // SAFETY: the library points `bad` into our chain.
                    unsafe { bad.offset_from(base) as usize }
                };
                return Err(Error::Post {
                    call: "ibv_post_send",
                    errno: rc,
                    index: c * POST_CHAIN + at,
                });
            }
        }
        Ok(())
    }

    /// Posts receives on the QP's own receive queue (`ibv_post_recv`);
    /// for QPs without an SRQ.
    pub fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        let qp = self.qp_ptr("ibv_post_recv")?;
        post_recv_chain(wrs, "ibv_post_recv", |head, bad| {
            // SAFETY: `head` is a valid chain built from `wrs`, which
            // outlives the call; the QP is alive.
            unsafe { sys::ibv_post_recv(qp, head, bad) }
        })
    }

    /// Binds a type 2 memory window as `bind` says (IBV_WR_BIND_MW on the send queue) and returns the window's new
    /// rkey, valid for RDMA through this QP once the bind completes and
    /// until the peer invalidates it (Send with Invalidate).
    pub fn post_bind_mw(&self, wr_id: u64, bind: &MwBind<'_>, signaled: bool) -> Result<u32> {
        let MwBind {
            mw,
            mr,
            addr,
            len,
            access,
        } = *bind;
        let qp = self.qp_ptr("ibv_post_send(BIND_MW)")?;
        // SAFETY: plain arithmetic on a key, in C.
        let rkey = unsafe { sys::ibv_inc_rkey(mw.rkey()) };
        let mut wr = sys::ibv_send_wr {
            wr_id,
            opcode: sys::IBV_WR_BIND_MW,
            send_flags: if signaled {
                sys::ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            },
            ..Default::default()
        };
        wr.__bindgen_anon_2.bind_mw = sys::ibv_send_wr__bindgen_ty_4__bindgen_ty_1 {
            mw: mw.as_ptr(),
            rkey,
            bind_info: sys::ibv_mw_bind_info {
                mr: mr.as_ptr(),
                addr,
                length: len,
                mw_access_flags: access.bits(),
            },
        };
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: one request, alive through the call; window, region and
        // QP are alive (the caller keeps the window and region until the
        // bind completes).
        let rc = unsafe { sys::ibv_post_send(qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(Error::Post {
                call: "ibv_post_send(BIND_MW)",
                errno: rc,
                index: 0,
            });
        }
        mw.set_rkey(rkey);
        Ok(rkey)
    }
}

/// What a memory window bind covers: `len` bytes at `addr` inside `mr`,
/// with `access` (REMOTE_READ and/or REMOTE_WRITE) for the peer.
#[derive(Clone, Copy)]
pub struct MwBind<'a> {
    pub mw: &'a MemoryWindow,
    pub mr: &'a MemoryRegion,
    pub addr: u64,
    pub len: u64,
    pub access: AccessFlags,
}

/// A socket address as the CM wants it.
pub(crate) fn sockaddr_from(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            unsafe { ptr::write(ptr::addr_of_mut!(ss).cast(), sin) };
            (ss, mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { ptr::write(ptr::addr_of_mut!(ss).cast(), sin6) };
            (ss, mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// # Safety
/// `sa` is null or points at a sockaddr whose family says its size.
pub(crate) unsafe fn sockaddr_to(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller's guarantee; the family is read first and the
    // matching struct only then.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let s = &*(sa as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(s.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(s.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let s = &*(sa as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(s.sin6_addr.s6_addr),
                    u16::from_be(s.sin6_port),
                    s.sin6_flowinfo,
                    s.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}
