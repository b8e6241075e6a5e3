//! Device contexts, protection domains, memory regions, completion
//! queues and shared receive queues. Each is an owning handle; objects
//! that depend on another (an MR on its PD, a PD on its context) hold a
//! reference-counted pointer to it, so the verbs destroy order (QP, then
//! SRQ/CQ/MR, then PD, then channel and context) follows from Rust's.

use std::ffi::CStr;
use std::os::fd::{BorrowedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mempool::{ArenaId, ArenaInfo, RegisterError, Registrar, RegistrationKey};
use rdma_sys as sys;

use crate::error::{Error, Result};
use crate::wr::{fill_recv_wr, Completion, RecvWr};

/// Work requests chained into one post call at most; longer slices are
/// posted in several calls. Bounds the stack used by a post.
pub(crate) const POST_CHAIN: usize = 16;

/// Sets O_NONBLOCK on a descriptor a library created, so the reactor can
/// poll it and reads return EAGAIN instead of blocking.
pub(crate) fn set_nonblocking(fd: RawFd, call: &'static str) -> Result<()> {
    // SAFETY: fcntl on a descriptor we were given; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::last(call));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::last(call));
    }
    Ok(())
}

/// RDMA CM's list of device contexts. librdmacm opens every device once
/// and shares the contexts with its CM ids; holding the list keeps them
/// referenced for as long as anything built on them lives.
struct DeviceList {
    list: *mut *mut sys::ibv_context,
    len: usize,
}

// SAFETY: the list is only read after creation and freed once, on drop;
// verbs contexts are safe to use from any thread.
unsafe impl Send for DeviceList {}
// SAFETY: as above.
unsafe impl Sync for DeviceList {}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from rdma_get_devices and is freed once.
        unsafe { sys::rdma_free_devices(self.list) };
    }
}

/// An open RDMA device (`ibv_context`), as RDMA CM shares it.
#[derive(Clone)]
pub struct Context {
    raw: *mut sys::ibv_context,
    _list: Arc<DeviceList>,
}

// SAFETY: verbs contexts are thread-safe; the pointer stays valid while
// the list is held.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// Limits of a device (`ibv_device_attr`), the ones a transport sizes
/// its queues and RDMA Read depth by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceAttr {
    pub max_mr_size: u64,
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    pub max_mr: u32,
    pub max_pd: u32,
    pub max_qp_rd_atom: u32,
    pub max_qp_init_rd_atom: u32,
    pub max_srq: u32,
    pub max_srq_wr: u32,
    pub max_srq_sge: u32,
    pub max_mw: u32,
}

/// Every RDMA device RDMA CM can use. Fails with [`Error::NoDevice`]
/// when there is none.
pub fn devices() -> Result<Vec<Context>> {
    let mut n: i32 = 0;
    // SAFETY: rdma_get_devices only writes the count.
    let list = unsafe { sys::rdma_get_devices(&mut n) };
    if list.is_null() {
        return Err(Error::last_opening("rdma_get_devices"));
    }
    let shared = Arc::new(DeviceList {
        list,
        len: n.max(0) as usize,
    });
    if shared.len == 0 {
        return Err(Error::NoDevice {
            call: "rdma_get_devices",
            errno: libc::ENODEV,
        });
    }
    Ok((0..shared.len)
        .map(|i| Context {
            // SAFETY: i is below the count the library returned.
            raw: unsafe { *shared.list.add(i) },
            _list: shared.clone(),
        })
        .collect())
}

/// Lets librdmacm notice removed devices and close its own contexts on
/// them, which the kernel waits for before it can finish removing one.
/// librdmacm only re-reads the device list when asked for it, so after a
/// DEVICE_REMOVAL, once everything built on the device is dropped, call
/// this (or anything that opens a device). librdmacm (rdma-core 44)
/// skips this when no device is left at all: removing the last device
/// then completes only when the process exits.
pub fn release_removed_devices() {
    let _ = devices();
}

impl Context {
    /// The device a CM id is bound to (after bind to a device address,
    /// address resolution, or on a connect request's new id).
    pub(crate) fn for_verbs(verbs: *mut sys::ibv_context) -> Result<Context> {
        if verbs.is_null() {
            return Err(Error::Invalid {
                call: "rdma_cm_id.verbs",
                why: "the CM id is not bound to a device (wildcard address?)",
            });
        }
        devices()?
            .into_iter()
            .find(|c| c.raw == verbs)
            .ok_or(Error::NoDevice {
                call: "rdma_get_devices",
                errno: libc::ENODEV,
            })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_context {
        self.raw
    }

    /// The kernel's name for the device (e.g. "rxe0", "mlx5_0").
    pub fn name(&self) -> String {
        // SAFETY: a context always has its device; the name is a static
        // NUL-terminated string owned by the library.
        unsafe {
            let dev = (*self.raw).device;
            let p = sys::ibv_get_device_name(dev);
            if p.is_null() {
                return String::new();
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }

    pub fn query(&self) -> Result<DeviceAttr> {
        let mut a = sys::ibv_device_attr::default();
        // SAFETY: the context is open; the call fills `a`.
        let rc = unsafe { sys::ibv_query_device(self.raw, &mut a) };
        if rc != 0 {
            return Err(Error::from_errno("ibv_query_device", rc));
        }
        Ok(DeviceAttr {
            max_mr_size: a.max_mr_size,
            max_qp_wr: a.max_qp_wr as u32,
            max_sge: a.max_sge as u32,
            max_cqe: a.max_cqe as u32,
            max_mr: a.max_mr as u32,
            max_pd: a.max_pd as u32,
            max_qp_rd_atom: a.max_qp_rd_atom as u32,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom as u32,
            max_srq: a.max_srq as u32,
            max_srq_wr: a.max_srq_wr as u32,
            max_srq_sge: a.max_srq_sge as u32,
            max_mw: a.max_mw as u32,
        })
    }

    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        ProtectionDomain::new(self)
    }
}

/// `ibv_access_flags` for memory regions and windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessFlags(u32);

impl AccessFlags {
    /// Receives and RDMA Read responses write into it: every target buffer.
    pub const LOCAL_WRITE: AccessFlags =
        AccessFlags(sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    pub const REMOTE_WRITE: AccessFlags =
        AccessFlags(sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    pub const REMOTE_READ: AccessFlags =
        AccessFlags(sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    pub const MW_BIND: AccessFlags = AccessFlags(sys::ibv_access_flags::IBV_ACCESS_MW_BIND.0);

    pub fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for AccessFlags {
    type Output = AccessFlags;
    fn bitor(self, o: AccessFlags) -> AccessFlags {
        AccessFlags(self.0 | o.0)
    }
}

pub(crate) struct PdInner {
    raw: *mut sys::ibv_pd,
    ctx: Context,
    registrations: AtomicU64,
    deregistrations: AtomicU64,
}

// SAFETY: a PD is a kernel handle usable from any thread; the counters
// are atomics.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: every MR, SRQ, QP and MW holds this PD alive, so none
        // is left when it is deallocated.
        unsafe { sys::ibv_dealloc_pd(self.raw) };
    }
}

/// A protection domain (`ibv_pd`). Cloning shares it. Counts the memory
/// registrations made through it, so a test can show the data path makes
/// none.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl ProtectionDomain {
    pub fn new(ctx: &Context) -> Result<ProtectionDomain> {
        // SAFETY: the context is open for as long as `ctx` is held, and
        // the PD keeps a clone of it.
        let raw = unsafe { sys::ibv_alloc_pd(ctx.raw) };
        if raw.is_null() {
            return Err(Error::last("ibv_alloc_pd"));
        }
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                raw,
                ctx: ctx.clone(),
                registrations: AtomicU64::new(0),
                deregistrations: AtomicU64::new(0),
            }),
        })
    }

    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_pd {
        self.inner.raw
    }

    /// Registers `len` bytes at `addr` (`ibv_reg_mr_iova2` with the
    /// address as I/O virtual address, which is what the `ibv_reg_mr`
    /// macro does).
    ///
    /// # Safety
    /// The range must stay mapped, and not be handed to anything else
    /// that assumes exclusive access while the device may write it,
    /// until the returned region is dropped.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        if len == 0 {
            return Err(Error::Invalid {
                call: "ibv_reg_mr_iova2",
                why: "empty range",
            });
        }
        // SAFETY: the caller guarantees the range; the PD is alive.
        let raw = unsafe {
            sys::ibv_reg_mr_iova2(self.inner.raw, addr.cast(), len, addr as u64, access.0)
        };
        if raw.is_null() {
            return Err(Error::last("ibv_reg_mr_iova2"));
        }
        self.inner.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(MemoryRegion {
            raw,
            pd: self.inner.clone(),
        })
    }

    /// `ibv_reg_mr` calls made through this PD so far.
    pub fn registrations(&self) -> u64 {
        self.inner.registrations.load(Ordering::Relaxed)
    }

    /// Regions registered through this PD and not yet deregistered.
    pub fn live_regions(&self) -> u64 {
        self.registrations() - self.inner.deregistrations.load(Ordering::Relaxed)
    }

    /// A [`Registrar`] for a buffer pool: one region per arena, with
    /// `access` (LOCAL_WRITE for a target's buffers).
    pub fn registrar(&self, access: AccessFlags) -> PdRegistrar {
        PdRegistrar {
            pd: self.clone(),
            access,
            regions: Vec::new(),
        }
    }

    /// A type 2 memory window (`ibv_alloc_mw`), bound later through a
    /// queue pair; its rkey can be invalidated by the peer's Send with
    /// Invalidate.
    pub fn alloc_mw(&self) -> Result<MemoryWindow> {
        // SAFETY: the PD is alive; the window keeps it so.
        let raw = unsafe { sys::ibv_alloc_mw(self.inner.raw, sys::IBV_MW_TYPE_2) };
        if raw.is_null() {
            return Err(Error::last("ibv_alloc_mw"));
        }
        Ok(MemoryWindow {
            raw,
            // SAFETY: the library set the initial key at allocation.
            rkey: std::cell::Cell::new(unsafe { (*raw).rkey }),
            _pd: self.inner.clone(),
        })
    }
}

/// A registered memory region (`ibv_mr`); deregistered on drop.
pub struct MemoryRegion {
    raw: *mut sys::ibv_mr,
    pd: Arc<PdInner>,
}

// SAFETY: the MR is a kernel handle; its fields are read-only after
// registration.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is valid until drop; lkey is set at registration.
        unsafe { (*self.raw).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.raw).rkey }
    }

    pub fn addr(&self) -> u64 {
        // SAFETY: as above.
        unsafe { (*self.raw).addr as u64 }
    }

    pub fn len(&self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.raw).length }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_mr {
        self.raw
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by us, deregistered once.
        unsafe { sys::ibv_dereg_mr(self.raw) };
        self.pd.deregistrations.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemoryRegion({:#x}+{} lkey {:#x} rkey {:#x})",
            self.addr(),
            self.len(),
            self.lkey(),
            self.rkey()
        )
    }
}

/// Memory this crate allocates and registers in one go: for tools and
/// tests playing the initiator, which need one contiguous registered
/// range without a pool.
pub struct OwnedRegion {
    // Declared first so it is dropped first: deregistered before freed.
    mr: MemoryRegion,
    buf: Box<[u8]>,
}

impl OwnedRegion {
    pub fn new(pd: &ProtectionDomain, len: usize, access: AccessFlags) -> Result<OwnedRegion> {
        let mut buf = vec![0u8; len].into_boxed_slice();
        // SAFETY: the boxed memory does not move when the OwnedRegion
        // does, and is freed only after the region is deregistered
        // (field order).
        let mr = unsafe { pd.register(buf.as_mut_ptr(), len, access) }?;
        Ok(OwnedRegion { mr, buf })
    }

    pub fn mr(&self) -> &MemoryRegion {
        &self.mr
    }

    pub fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// A scatter-gather element for `len` bytes at `offset`, or `None`
    /// past the end.
    pub fn sge(&self, offset: usize, len: usize) -> Option<crate::wr::Sge> {
        let end = offset.checked_add(len)?;
        if end > self.buf.len() || len > u32::MAX as usize {
            return None;
        }
        Some(crate::wr::Sge::new(
            self.addr() + offset as u64,
            len as u32,
            self.mr.lkey(),
        ))
    }
}

/// A type 2 memory window (`ibv_mw`).
pub struct MemoryWindow {
    raw: *mut sys::ibv_mw,
    // Binds posted on a send queue do not update the C struct's rkey, and
    // each bind of a type 2 window needs a key different from the last.
    rkey: std::cell::Cell<u32>,
    _pd: Arc<PdInner>,
}

// SAFETY: a kernel handle; the rkey field is only changed by binds the
// owner posts.
unsafe impl Send for MemoryWindow {}

impl MemoryWindow {
    /// The rkey the window got at allocation or its last posted bind.
    pub fn rkey(&self) -> u32 {
        self.rkey.get()
    }

    pub(crate) fn set_rkey(&self, rkey: u32) {
        self.rkey.set(rkey);
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_mw {
        self.raw
    }
}

impl Drop for MemoryWindow {
    fn drop(&mut self) {
        // SAFETY: allocated by us, freed once.
        unsafe { sys::ibv_dealloc_mw(self.raw) };
    }
}

/// Registers each of a pool's arenas once with one protection domain,
/// and deregisters it when the pool unmaps the arena.
pub struct PdRegistrar {
    pd: ProtectionDomain,
    access: AccessFlags,
    regions: Vec<(ArenaId, MemoryRegion)>,
}

impl PdRegistrar {
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }
}

impl Registrar for PdRegistrar {
    fn register(
        &mut self,
        arena: &ArenaInfo,
    ) -> std::result::Result<RegistrationKey, RegisterError> {
        // SAFETY: the pool's contract: an arena stays mapped until
        // `deregister` is called for it (or the registrar is dropped,
        // which the pool does before unmapping), and its memory is handed
        // out only as buffers the transport posts.
        let mr = unsafe { self.pd.register(arena.base, arena.len_bytes, self.access) }?;
        let key = RegistrationKey {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
        };
        self.regions.push((arena.id, mr));
        Ok(key)
    }

    fn deregister(&mut self, arena: &ArenaInfo, _key: RegistrationKey) {
        self.regions.retain(|(id, _)| *id != arena.id);
    }
}

struct CompChannel {
    raw: *mut sys::ibv_comp_channel,
    _ctx: Context,
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: its only CQ is destroyed before (the CQ owns it).
        unsafe { sys::ibv_destroy_comp_channel(self.raw) };
    }
}

pub(crate) struct CqInner {
    raw: *mut sys::ibv_cq,
    // Dropped after the CQ: field order matters, see Drop below.
    channel: Option<CompChannel>,
}

// SAFETY: CQs are thread-safe in verbs (providers lock polls).
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: QPs using this CQ hold it alive, so none is left; every
        // event read from the channel was acknowledged in take_events.
        unsafe { sys::ibv_destroy_cq(self.raw) };
    }
}

/// A completion queue (`ibv_cq`), optionally with its own completion
/// channel whose non-blocking fd a reactor polls. Cloning shares it.
#[derive(Clone)]
pub struct CompletionQueue {
    pub(crate) inner: Arc<CqInner>,
}

impl CompletionQueue {
    /// A CQ of at least `cqe` entries on `ctx`; with `with_channel`, a
    /// completion channel for event-driven waiting.
    pub fn new(ctx: &Context, cqe: u32, with_channel: bool) -> Result<CompletionQueue> {
        let channel = if with_channel {
            // SAFETY: the context is open; the channel keeps a clone.
            let raw = unsafe { sys::ibv_create_comp_channel(ctx.raw) };
            if raw.is_null() {
                return Err(Error::last("ibv_create_comp_channel"));
            }
            let ch = CompChannel {
                raw,
                _ctx: ctx.clone(),
            };
            // SAFETY: raw is a live channel.
            set_nonblocking(unsafe { (*raw).fd }, "fcntl(comp_channel)")?;
            Some(ch)
        } else {
            None
        };
        let ch_ptr = channel.as_ref().map_or(ptr::null_mut(), |c| c.raw);
        // SAFETY: context and (optional) channel are alive and outlive
        // the CQ (the channel is owned by it and dropped after it).
        let raw = unsafe { sys::ibv_create_cq(ctx.raw, cqe as i32, ptr::null_mut(), ch_ptr, 0) };
        if raw.is_null() {
            return Err(Error::last("ibv_create_cq"));
        }
        Ok(CompletionQueue {
            inner: Arc::new(CqInner { raw, channel }),
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_cq {
        self.inner.raw
    }

    /// Entries the device actually gave the CQ.
    pub fn capacity(&self) -> u32 {
        // SAFETY: valid until drop; cqe is set at creation.
        unsafe { (*self.inner.raw).cqe as u32 }
    }

    /// Polls up to `out.len()` completions into `out`; returns how many.
    /// No allocation: `ibv_wc`s go through a small stack array.
    pub fn poll(&self, out: &mut [Completion]) -> Result<usize> {
        const BATCH: usize = 16;
        let mut wcs = [sys::ibv_wc::default(); BATCH];
        let mut filled = 0;
        while filled < out.len() {
            let want = (out.len() - filled).min(BATCH);
            // SAFETY: `wcs` has room for `want` entries; the CQ is alive.
            let n = unsafe { sys::ibv_poll_cq(self.inner.raw, want as i32, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(Error::from_errno("ibv_poll_cq", -n));
            }
            let n = n as usize;
            for (o, wc) in out[filled..].iter_mut().zip(&wcs[..n]) {
                *o = Completion::from_wc(wc);
            }
            filled += n;
            if n < want {
                break;
            }
        }
        Ok(filled)
    }

    /// Arms the CQ (`ibv_req_notify_cq`): the next completion (or next
    /// solicited one) makes the channel's fd readable. Poll once more
    /// after arming, or a completion that raced in is missed.
    pub fn req_notify(&self, solicited_only: bool) -> Result<()> {
        // SAFETY: the CQ is alive.
        let rc = unsafe { sys::ibv_req_notify_cq(self.inner.raw, solicited_only as i32) };
        if rc != 0 {
            return Err(Error::from_errno("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// The completion channel's fd, if the CQ has one.
    pub fn event_fd(&self) -> Option<RawFd> {
        // SAFETY: the channel is alive while the CQ is.
        self.inner.channel.as_ref().map(|c| unsafe { (*c.raw).fd })
    }

    /// Reads every pending event from the channel and acknowledges them
    /// (`ibv_get_cq_event` + `ibv_ack_cq_events`); returns how many. Zero
    /// means the fd woke spuriously. The CQ must be re-armed afterwards.
    pub fn take_events(&self) -> Result<u32> {
        let Some(ch) = &self.inner.channel else {
            return Err(Error::Invalid {
                call: "ibv_get_cq_event",
                why: "the CQ has no completion channel",
            });
        };
        let mut n = 0u32;
        loop {
            let mut cq: *mut sys::ibv_cq = ptr::null_mut();
            let mut cq_ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: the channel is alive and non-blocking.
            let rc = unsafe { sys::ibv_get_cq_event(ch.raw, &mut cq, &mut cq_ctx) };
            if rc != 0 {
                let e = Error::last("ibv_get_cq_event");
                if e.errno() == Some(libc::EAGAIN) {
                    break;
                }
                self.ack(n);
                return Err(e);
            }
            debug_assert_eq!(cq, self.inner.raw, "one CQ per channel");
            n += 1;
        }
        self.ack(n);
        Ok(n)
    }

    /// Waits up to `timeout` for the channel's fd, then takes the events
    /// as [`CompletionQueue::take_events`] does. For tests and tools; a
    /// reactor polls the fd itself.
    pub fn wait_events(&self, timeout: std::time::Duration) -> Result<u32> {
        let Some(fd) = self.event_fd() else {
            return Err(Error::Invalid {
                call: "ibv_get_cq_event",
                why: "the CQ has no completion channel",
            });
        };
        crate::cm::poll_readable(fd, timeout)?;
        self.take_events()
    }

    fn ack(&self, n: u32) {
        if n > 0 {
            // SAFETY: n events for this CQ were read and not yet acked.
            unsafe { sys::ibv_ack_cq_events(self.inner.raw, n) };
        }
    }
}

pub(crate) struct SrqInner {
    raw: *mut sys::ibv_srq,
    _pd: Arc<PdInner>,
}

// SAFETY: SRQ posting is thread-safe in verbs.
unsafe impl Send for SrqInner {}
// SAFETY: as above.
unsafe impl Sync for SrqInner {}

impl Drop for SrqInner {
    fn drop(&mut self) {
        // SAFETY: QPs attached to it hold it alive, so none is left.
        unsafe { sys::ibv_destroy_srq(self.raw) };
    }
}

/// A shared receive queue (`ibv_srq`): one per reactor core, feeding the
/// receives of every queue pair on that core. Cloning shares it.
#[derive(Clone)]
pub struct SharedReceiveQueue {
    pub(crate) inner: Arc<SrqInner>,
}

impl SharedReceiveQueue {
    pub fn new(pd: &ProtectionDomain, max_wr: u32, max_sge: u32) -> Result<SharedReceiveQueue> {
        let mut attr = sys::ibv_srq_init_attr {
            srq_context: ptr::null_mut(),
            attr: sys::ibv_srq_attr {
                max_wr,
                max_sge,
                srq_limit: 0,
            },
        };
        // SAFETY: the PD is alive and the SRQ keeps it so.
        let raw = unsafe { sys::ibv_create_srq(pd.inner.raw, &mut attr) };
        if raw.is_null() {
            return Err(Error::last("ibv_create_srq"));
        }
        Ok(SharedReceiveQueue {
            inner: Arc::new(SrqInner {
                raw,
                _pd: pd.inner.clone(),
            }),
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_srq {
        self.inner.raw
    }

    /// Posts receives (`ibv_post_srq_recv`), chained in batches. Each
    /// buffer must be registered with LOCAL_WRITE in the SRQ's PD and
    /// stay valid until its completion.
    pub fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        post_recv_chain(wrs, "ibv_post_srq_recv", |head, bad| {
            // SAFETY: `head` is a valid chain built from `wrs`, which
            // outlives the call; the SRQ is alive.
            unsafe { sys::ibv_post_srq_recv(self.inner.raw, head, bad) }
        })
    }
}

/// Chains `wrs` in groups of [`POST_CHAIN`] on the stack and hands each
/// chain to `post`; maps a refusal to the index in `wrs`.
pub(crate) fn post_recv_chain(
    wrs: &[RecvWr<'_>],
    call: &'static str,
    mut post: impl FnMut(*mut sys::ibv_recv_wr, *mut *mut sys::ibv_recv_wr) -> i32,
) -> Result<()> {
    let mut chain = [sys::ibv_recv_wr::default(); POST_CHAIN];
    for (c, group) in wrs.chunks(POST_CHAIN).enumerate() {
        for (slot, wr) in chain.iter_mut().zip(group) {
            fill_recv_wr(wr, slot);
        }
        let base = chain.as_mut_ptr();
        for i in 1..group.len() {
            // SAFETY: i and i-1 are below group.len() <= POST_CHAIN.
            unsafe { (*base.add(i - 1)).next = base.add(i) };
        }
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        let rc = post(base, &mut bad);
        if rc != 0 {
            let at = if bad.is_null() {
                0
            } else {
                // SAFETY: the library points `bad` into our chain.
                unsafe { bad.offset_from(base) as usize }
            };
            return Err(Error::Post {
                call,
                errno: rc,
                index: c * POST_CHAIN + at,
            });
        }
    }
    Ok(())
}

impl CompletionQueue {
    /// The channel fd borrowed, for registering with a poller.
    pub fn as_event_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the fd stays open as long as the CQ (and so `self`).
        self.event_fd()
            .map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
    }
}
