//! iSCSI over TCP: the byte-stream side of a connection. It reads from a
//! non-blocking socket into a receive buffer, cuts PDUs out of it with the
//! connection's current `Decoder` (digests and segment limits change at the
//! end of login, so PDUs are taken one at a time), and writes queued wire
//! bytes with as few system calls as the socket allows: every PDU produced
//! while handling one batch of input goes out in one write.
//!
//! Data flow: socket -> `TcpConn::fill` -> `next_pdu` -> iscsi connection;
//! iscsi connection -> `queue`/`flush` -> socket. Read data is not copied
//! into the output: the connection hands the buffer the backstore filled
//! to `TcpConn` (as an `iscsi::conn::TxSink`), the Data-In headers go
//! between ranges of it, and one writev sends headers and data from where
//! they lie. Sent buffers wait in `take_sent` for the engine to reuse.

#![forbid(unsafe_code)]

mod direct;
mod rx;

pub use direct::{RxCounts, DIRECT_MIN_BYTES};

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use iscsi::conn::{DataBuf, TxSink};
use iscsi::pdu::{Decoder, Pdu, PduError, BHS_LEN};
use mempool::RxRing;
use mio::net::TcpStream;
use rx::RxMem;

/// How much one `fill` call reads before yielding to other connections.
const READ_BUDGET_BYTES: usize = 4 * 1024 * 1024;
/// Initial receive buffer; it grows to the largest PDU the decoder allows.
const RX_INITIAL_BYTES: usize = 64 * 1024;
/// Above this much unsent output, the engine stops reading from the
/// connection until the initiator drains it.
pub const TX_BACKLOG_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Where `next_pdu_placing` offers a data segment: the PDU's header, the
/// segment, and what lends the segment out where it lies (`None` from a
/// heap buffer). True when the segment was taken.
pub type Place<'a> = dyn FnMut(&iscsi::Bhs, &[u8], &dyn Fn() -> Option<DataBuf>) -> bool + 'a;

/// What a `fill` call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Read this many bytes; the socket may have more later.
    Read(usize),
    /// The peer closed its side.
    Eof,
}

pub struct TcpConn {
    pub stream: TcpStream,
    rx: RxMem,
    /// Heap memory for the receive buffer when the pool has no ring (taken
    /// at the first read and when the buffer grows, both before the
    /// connection's steady state, so falling back never allocates).
    rx_spare: Vec<u8>,
    /// Undecoded bytes are `rx[rx_pos..rx_end]`.
    rx_pos: usize,
    rx_end: usize,
    /// What waits to be written, oldest first; `tx_pos` bytes of the front
    /// segment are already out. Queuing a whole buffer moves it here rather
    /// than appending it to one growing buffer, so a burst of large
    /// responses costs no copy and no reallocation.
    txq: VecDeque<Seg>,
    tx_pos: usize,
    tx_pending: usize,
    /// Written-out buffers kept for reuse (their capacity is the point).
    tx_free: Vec<Vec<u8>>,
    /// Data buffers that `Seg::Data` ranges send from, with the number of
    /// their ranges still queued.
    data: Vec<Option<(DataBuf, u32)>>,
    data_free: Vec<u16>,
    /// The buffer `put_range` refers to.
    data_current: Option<u16>,
    /// The last `put_range`: data slot, start, end.
    last_range: (u16, u32, u32),
    /// Data buffers whose ranges are all written, for `take_sent`.
    sent: Vec<DataBuf>,
    /// A data segment being received into place, and the PDU of one
    /// completed (see `direct`).
    direct: Option<direct::Direct>,
    direct_done: Option<Result<Pdu, PduError>>,
    /// The next read takes only a PDU header (a large segment was just
    /// received into place; another may follow).
    header_next: bool,
    /// See `drained`.
    drained: bool,
    /// Bytes were read since the last `release_idle_ring`.
    rx_active: bool,
    rx_counts: RxCounts,
}

/// The bytes `seg` sends (free function so `flush` can borrow the
/// stream mutably beside them).
fn seg_slice<'a>(data: &'a [Option<(DataBuf, u32)>], seg: &'a Seg) -> &'a [u8] {
    match seg {
        Seg::Owned(v) => v,
        Seg::Inline { bytes, len } => &bytes[..*len as usize],
        // Within one buffer of a scatter-gather `DataBuf` (`put_range`).
        Seg::Data { slot, start, end } => match &data[*slot as usize] {
            Some((b, _)) => b.piece_at(*start as usize, (*end - *start) as usize),
            None => &[],
        },
    }
}

/// One piece of queued output.
#[derive(Debug)]
enum Seg {
    Owned(Vec<u8>),
    /// Copied bytes (PDU headers, padding, digests), kept in the segment
    /// itself so that queuing them never allocates.
    Inline {
        bytes: [u8; INLINE_BYTES],
        len: u8,
    },
    Data {
        slot: u16,
        start: u32,
        end: u32,
    },
}

/// Segments written by one `writev` (below the kernel's IOV_MAX of 1024).
const WRITEV_BUFS_MAX: usize = 256;
/// Copied bytes one inline segment holds: a header with its digest plus
/// the previous data segment's padding and digest.
const INLINE_BYTES: usize = 88;
/// Data buffers a connection can be sending from at once; more than its
/// commands in flight is never needed (a slot is added past this only
/// if a transport misbehaves, and logged as a bug would be).
const DATA_SLOTS: usize = 1024;
/// Empty buffers kept for reuse per connection.
const TX_FREE_MAX: usize = 8;
/// `queue` copies up to this many bytes into inline segments (a batch of
/// responses and R2Ts) rather than take the caller's buffer.
const QUEUE_COPY_MAX_BYTES: usize = 16 * 1024;
/// A recycled buffer larger than this is dropped instead of kept.
const TX_KEEP_CAPACITY_MAX: usize = 4 * 1024 * 1024;

impl TcpConn {
    pub fn new(stream: TcpStream) -> TcpConn {
        // Small PDUs (responses, R2Ts) must leave at once; batching is done
        // here, not by Nagle.
        let _ = stream.set_nodelay(true);
        TcpConn {
            stream,
            rx: RxMem::Heap(Vec::new()),
            rx_spare: Vec::new(),
            rx_pos: 0,
            rx_end: 0,
            txq: VecDeque::with_capacity(WRITEV_BUFS_MAX),
            tx_pos: 0,
            tx_pending: 0,
            tx_free: Vec::with_capacity(TX_FREE_MAX),
            data: Vec::with_capacity(DATA_SLOTS),
            data_free: Vec::with_capacity(DATA_SLOTS),
            data_current: None,
            last_range: (0, 0, 0),
            sent: Vec::with_capacity(64),
            direct: None,
            direct_done: None,
            header_next: false,
            drained: false,
            rx_active: false,
            rx_counts: RxCounts::default(),
        }
    }

    /// Read what the socket has, up to the read budget, into heap memory
    /// (see `fill_with`).
    pub fn fill(&mut self, decoder: &Decoder) -> io::Result<Fill> {
        self.fill_with(decoder, &mut |_| None)
    }

    /// Read what the socket has, up to the read budget. The receive
    /// memory comes from `new_ring` (a pool ring of at least the size
    /// asked, whose decoded write data `next_pdu_placing` can lend out)
    /// when it has one, else from the heap.
    pub fn fill_with(
        &mut self,
        decoder: &Decoder,
        new_ring: &mut dyn FnMut(usize) -> Option<RxRing>,
    ) -> io::Result<Fill> {
        let max_pdu = BHS_LEN + 1024 + 8 + decoder.max_recv_data_len as usize + 4;
        let want_cap = max_pdu + RX_INITIAL_BYTES;
        // Room for a maximal PDU, taken once (a heap vector's length stays
        // at its capacity so reads never zero-fill on the hot path).
        if self.rx.capacity() < want_cap {
            if self.rx_spare.len() < want_cap {
                self.rx_spare = vec![0; want_cap];
            }
            self.move_rx(want_cap, new_ring);
        }
        // Move the undecoded tail to the front when the free space runs
        // low: in place, or, while part of the ring is lent out, to a
        // new ring.
        if self.rx_pos > 0 && self.rx.capacity() - self.rx_end < RX_INITIAL_BYTES {
            if self.rx.compact(self.rx_pos, self.rx_end) {
                self.rx_end -= self.rx_pos;
                self.rx_pos = 0;
            } else {
                self.move_rx(want_cap, new_ring);
            }
        }

        // After a segment received into place, read just the next header
        // (the rest of it), so that a large segment behind it can go
        // into place too.
        let header_len = BHS_LEN + decoder.header_digest_len();
        // The flag holds until the header is complete: a read that finds
        // the socket empty, or brings part of a header, must not let the
        // next one take a window of data into the ring.
        let mut limit = self.rx.capacity();
        if self.header_next {
            if self.rx_buffered() < header_len {
                limit = (self.rx_end + header_len - self.rx_buffered()).min(self.rx.capacity());
            } else {
                self.header_next = false;
            }
        }
        let mut total = 0;
        self.drained = false;
        loop {
            if self.rx_end == limit || total >= READ_BUDGET_BYTES {
                return Ok(Fill::Read(total));
            }
            let space = limit - self.rx_end;
            match self.stream.read(self.rx.bytes_mut(self.rx_end, limit)) {
                Ok(0) => {
                    return if total == 0 {
                        Ok(Fill::Eof)
                    } else {
                        Ok(Fill::Read(total))
                    };
                }
                Ok(n) => {
                    self.rx_end += n;
                    total += n;
                    self.rx_active = true;
                    if self.rx_buffered() >= header_len {
                        self.header_next = false;
                    }
                    // A short read from a stream socket means its receive
                    // queue is empty (epoll(7)); asking again would only
                    // return EAGAIN. New data raises a new edge.
                    if n < space {
                        self.drained = true;
                        return Ok(Fill::Read(total));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    return Ok(Fill::Read(total));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the undecoded bytes to new memory of `cap` bytes: a ring from
    /// `new_ring`, else a heap vector. The old ring goes back to its pool
    /// with the last of the views it lent out.
    fn move_rx(&mut self, cap: usize, new_ring: &mut dyn FnMut(usize) -> Option<RxRing>) {
        let mut mem = match new_ring(cap) {
            Some(r) => RxMem::Ring(r),
            None if self.rx_spare.len() >= cap => RxMem::Heap(std::mem::take(&mut self.rx_spare)),
            None => RxMem::Heap(vec![0; cap]),
        };
        let n = self.rx_buffered();
        mem.bytes_mut(0, n)
            .copy_from_slice(self.rx.bytes(self.rx_pos, self.rx_end));
        if let RxMem::Heap(old) = std::mem::replace(&mut self.rx, mem) {
            if old.len() > self.rx_spare.len() {
                self.rx_spare = old;
            }
        }
        self.rx_pos = 0;
        self.rx_end = n;
    }

    /// Gives the receive ring back to its pool when nothing was read since
    /// the last call and nothing waits to be decoded, so that connections
    /// that sit idle (most of a large site's, most of the time) hold no
    /// pool memory: the next read takes a ring again. Called now and then
    /// (the engine's tick), not per read, so a busy connection keeps its
    /// ring, whose start stays warm in the cache. Lent parts of the ring
    /// stay valid; the ring goes home with the last of them. Returns
    /// whether a ring was given back.
    pub fn release_idle_ring(&mut self) -> bool {
        let active = std::mem::take(&mut self.rx_active);
        if active
            || self.rx_pos != self.rx_end
            || self.direct.is_some()
            || !matches!(self.rx, RxMem::Ring(_))
        {
            return false;
        }
        self.rx = RxMem::Heap(Vec::new());
        self.rx_pos = 0;
        self.rx_end = 0;
        true
    }

    /// Starts the ring over when everything in it is decoded, unless part
    /// of it is lent out (then reading goes on after it, and `fill` moves
    /// on when room runs low).
    fn rx_restart_if_empty(&mut self) {
        if self.rx_pos == self.rx_end && self.rx.compact(self.rx_pos, self.rx_end) {
            self.rx_pos = 0;
            self.rx_end = 0;
        }
    }

    /// Whether the last `fill` or `fill_direct` left the socket empty (a
    /// short read or EAGAIN): data arriving after it raises a new
    /// readiness edge, so reading again now would only find what came in
    /// meanwhile.
    pub fn drained(&self) -> bool {
        self.drained
    }

    /// Undecoded bytes in the receive buffer.
    pub fn rx_buffered(&self) -> usize {
        self.rx_end - self.rx_pos
    }

    /// Cut the next whole PDU out of the receive buffer.
    pub fn next_pdu(&mut self, decoder: &Decoder) -> Result<Option<Pdu>, PduError> {
        self.next_pdu_with(decoder, &mut Vec::with_capacity)
    }

    /// `next_pdu`, with the data segment copied into a buffer from
    /// `data_buf` (see `Decoder::decode_with`).
    pub fn next_pdu_with(
        &mut self,
        decoder: &Decoder,
        data_buf: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Option<Pdu>, PduError> {
        self.next_pdu_placing(decoder, &mut |_, _, _| false, data_buf)
    }

    /// `next_pdu_with`, offering the data segment to `place` first (see
    /// `Decoder::decode_placing`): write data goes from the receive buffer
    /// straight to the command's buffer. `place` may instead take the
    /// segment where it lies, as a `DataBuf` its third argument lends out
    /// (`None` when the receive memory is not a pool ring).
    pub fn next_pdu_placing(
        &mut self,
        decoder: &Decoder,
        place: &mut Place<'_>,
        data_buf: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Option<Pdu>, PduError> {
        let rx = &self.rx;
        let buf = rx.bytes(self.rx_pos, self.rx_end);
        let lent = std::cell::Cell::new(false);
        let base = rx.base_addr();
        let mut place_here = |bhs: &iscsi::Bhs, d: &[u8]| {
            let lend = || {
                let v = rx.view(d.as_ptr() as usize - base, d.len());
                lent.set(v.is_some());
                v
            };
            place(bhs, d, &lend)
        };
        match decoder.decode_placing(buf, &mut place_here, data_buf) {
            Ok(Some((pdu, used))) => {
                if pdu.data.is_empty() {
                    let n = pdu.bhs.data_segment_len() as u64;
                    if lent.get() {
                        // Lent from the ring: the socket's copy was the
                        // only one.
                        self.rx_counts.direct += n;
                    } else {
                        // Copied from the ring into place.
                        self.rx_counts.copied += n;
                    }
                }
                self.rx_pos += used;
                self.rx_restart_if_empty();
                Ok(Some(pdu))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                // A data digest error leaves the framing intact: skip just
                // that PDU. Anything else cannot be resynchronised.
                let skip = match &e {
                    PduError::DataDigest { bhs, .. } => decoder.framing(&bhs.0).ok(),
                    _ => None,
                };
                match skip {
                    Some(fr) => self.rx_pos += fr.wire_len,
                    None => self.rx_pos = self.rx_end,
                }
                Err(e)
            }
        }
    }

    /// Queue wire bytes, taking `bytes`' buffer and leaving a recycled
    /// empty one in its place.
    pub fn queue(&mut self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if bytes.len() <= QUEUE_COPY_MAX_BYTES {
            // The caller keeps its buffer and its capacity: swapping in a
            // smaller spare would make the caller's next PDUs grow it, an
            // allocation on the I/O path whenever a batch sets a new
            // high-water mark.
            self.put_bytes(bytes);
            bytes.clear();
            return;
        }
        self.tx_pending += bytes.len();
        // A spare at least as large, so the caller's buffer never shrinks;
        // none (more large batches queued than ever before): a new one,
        // off the steady path (text responses, copied data).
        let need = bytes.capacity();
        let spare = match self.tx_free.iter().position(|b| b.capacity() >= need) {
            Some(i) => self.tx_free.swap_remove(i),
            None => Vec::with_capacity(need),
        };
        self.txq
            .push_back(Seg::Owned(std::mem::replace(bytes, spare)));
    }

    /// Data buffers written out completely since the last call.
    pub fn take_sent(&mut self) -> std::vec::Drain<'_, DataBuf> {
        self.sent.drain(..)
    }

    /// Every data buffer still held (connection closing): sent or not.
    pub fn take_all_data(&mut self) -> impl Iterator<Item = DataBuf> + '_ {
        self.data_current = None;
        let held = self
            .data
            .iter_mut()
            .filter_map(|d| d.take().map(|(b, _)| b));
        self.sent.drain(..).chain(held)
    }

    fn seg_bytes<'a>(&'a self, seg: &'a Seg) -> &'a [u8] {
        seg_slice(&self.data, seg)
    }

    pub fn tx_pending(&self) -> usize {
        self.tx_pending
    }

    /// Write queued bytes until done or the socket is full, many buffers per
    /// system call.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.txq.is_empty() {
            let mut iov = [IoSlice::new(&[]); WRITEV_BUFS_MAX];
            let mut n_iov = 0;
            for (i, seg) in self.txq.iter().take(WRITEV_BUFS_MAX).enumerate() {
                let b = seg_slice(&self.data, seg);
                iov[i] = IoSlice::new(if i == 0 { &b[self.tx_pos..] } else { b });
                n_iov += 1;
            }
            let want: usize = iov[..n_iov].iter().map(|s| s.len()).sum();
            match self.stream.write_vectored(&iov[..n_iov]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.advance(n);
                    if n < want {
                        // Short write: the send buffer is full; the
                        // writable edge tells us when to go on.
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Account for `n` written bytes, recycling buffers written out.
    fn advance(&mut self, mut n: usize) {
        self.tx_pending -= n;
        while n > 0 {
            let front_left = self.seg_bytes(&self.txq[0]).len() - self.tx_pos;
            if n < front_left {
                self.tx_pos += n;
                return;
            }
            n -= front_left;
            self.tx_pos = 0;
            let seg = self
                .txq
                .pop_front()
                .expect("bytes written come from queued segments");
            self.segment_done(seg);
        }
        // Zero-length segments at the front are done as well.
        while self
            .txq
            .front()
            .is_some_and(|s| self.seg_bytes(s).is_empty())
        {
            let seg = self.txq.pop_front().expect("front exists");
            self.segment_done(seg);
        }
    }

    fn segment_done(&mut self, seg: Seg) {
        match seg {
            Seg::Owned(mut b) => {
                if self.tx_free.len() < TX_FREE_MAX && b.capacity() <= TX_KEEP_CAPACITY_MAX {
                    b.clear();
                    self.tx_free.push(b);
                }
            }
            Seg::Inline { .. } => {}
            Seg::Data { slot, .. } => {
                let entry = &mut self.data[slot as usize];
                if let Some((_, refs)) = entry {
                    *refs -= 1;
                    // Ranges of one buffer are all queued before the next
                    // flush, so none is queued after its count hits zero.
                    if *refs == 0 {
                        if self.data_current == Some(slot) {
                            self.data_current = None;
                        }
                        let (b, _) = entry.take().expect("checked");
                        self.sent.push(b);
                        self.data_free.push(slot);
                    }
                }
            }
        }
    }

    /// Stop adding ranges to the current data buffer; it is released once
    /// its queued ranges are written (at once if none are).
    fn close_current(&mut self) {
        let Some(slot) = self.data_current.take() else {
            return;
        };
        let entry = &mut self.data[slot as usize];
        if entry.as_ref().is_some_and(|(_, refs)| *refs == 0) {
            let (b, _) = entry.take().expect("checked");
            self.sent.push(b);
            self.data_free.push(slot);
        }
    }
}

impl TxSink for TcpConn {
    fn put_bytes(&mut self, mut bytes: &[u8]) {
        self.tx_pending += bytes.len();
        // Fill the last inline segment first (appending to the front one
        // is fine too: `tx_pos` counts from its start).
        if let Some(Seg::Inline { bytes: b, len }) = self.txq.back_mut() {
            let n = bytes.len().min(INLINE_BYTES - *len as usize);
            b[*len as usize..*len as usize + n].copy_from_slice(&bytes[..n]);
            *len += n as u8;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            let n = bytes.len().min(INLINE_BYTES);
            let mut b = [0u8; INLINE_BYTES];
            b[..n].copy_from_slice(&bytes[..n]);
            self.txq.push_back(Seg::Inline {
                bytes: b,
                len: n as u8,
            });
            bytes = &bytes[n..];
        }
    }

    fn put_vec(&mut self, bytes: &mut Vec<u8>) {
        self.queue(bytes);
    }

    fn put_data(&mut self, buf: DataBuf) {
        self.close_current();
        let slot = match self.data_free.pop() {
            Some(s) => s,
            None => {
                if self.data.len() >= DATA_SLOTS {
                    tracing::warn!(
                        slots = self.data.len(),
                        "more data buffers in flight than DATA_SLOTS"
                    );
                }
                self.data.push(None);
                (self.data.len() - 1) as u16
            }
        };
        self.data[slot as usize] = Some((buf, 0));
        self.data_current = Some(slot);
    }

    fn put_range(&mut self, start: usize, end: usize) {
        let Some(slot) = self.data_current else {
            debug_assert!(false, "put_range without put_data");
            return;
        };
        if let Some((b, refs)) = &mut self.data[slot as usize] {
            let end = end.min(b.len());
            let start = start.min(end);
            self.tx_pending += end - start;
            self.last_range = (slot, start as u32, end as u32);
            // A segment per piece (one for a contiguous buffer, empty
            // ranges included), so each is one slice for writev.
            let mut at = start;
            for piece in b.slices_at(start, end - start) {
                *refs += 1;
                self.txq.push_back(Seg::Data {
                    slot,
                    start: at as u32,
                    end: (at + piece.len()) as u32,
                });
                at += piece.len();
            }
        }
    }

    fn last_range_crc32c(&self) -> u32 {
        let (slot, start, end) = self.last_range;
        let mut crc = 0;
        if let Some(Some((b, _))) = self.data.get(slot as usize) {
            for piece in b.slices_at(start as usize, (end - start) as usize) {
                crc = iscsi::digest::crc32c_append(crc, piece);
            }
        }
        crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` in a scatter-gather `DataBuf` of 32 KiB buffers.
    fn sg_buf(bytes: &[u8]) -> mempool::DataBuf {
        use std::sync::OnceLock;
        static POOL: OnceLock<std::sync::Mutex<mempool::CoreCache>> = OnceLock::new();
        let cache = POOL.get_or_init(|| {
            let pool = mempool::Pool::new(mempool::PoolConfig {
                arena_bytes: 64 << 20,
                arena_limit_bytes: 64 << 20,
                cores: 1,
                backing: mempool::Backing::Heap,
                classes: vec![
                    mempool::ClassConfig {
                        buf_bytes: 32 << 10,
                        weight: 1,
                    },
                    mempool::ClassConfig {
                        buf_bytes: 1 << 20,
                        weight: 1,
                    },
                ],
                ..mempool::PoolConfig::default()
            })
            .unwrap();
            std::sync::Mutex::new(Box::leak(Box::new(pool)).core_cache(0).unwrap())
        });
        let whole = bytes.len().div_ceil(32 << 10).max(2) * (32 << 10);
        let mut d = cache
            .lock()
            .unwrap()
            .alloc_data_sg(whole)
            .expect("32 KiB buffers free");
        d.truncate(bytes.len());
        d.copy_from_at(0, bytes);
        assert!(!d.is_contiguous());
        d
    }

    /// A connection over loopback and the blocking socket at its far end.
    fn connected() -> (TcpConn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (TcpConn::new(TcpStream::from_std(server)), client)
    }

    #[test]
    fn queue_never_leaves_the_caller_a_smaller_buffer() {
        let (mut conn, client) = connected();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut c = client;
            c.read_to_end(&mut got).unwrap();
            got
        });
        let cap = 64 * 1024;
        let mut tx = Vec::with_capacity(cap);
        let mut expect = Vec::new();
        // Small batches are copied; large ones swap buffers, always for
        // one at least as large, so the caller's next PDUs never grow it.
        for (i, len) in [300usize, 20_000, 40, 16 * 1024, 60_000, 5]
            .into_iter()
            .enumerate()
        {
            tx.extend((0..len).map(|j| (i * 31 + j) as u8));
            expect.extend_from_slice(&tx);
            let before = tx.capacity();
            conn.queue(&mut tx);
            assert!(tx.is_empty());
            assert!(
                tx.capacity() >= before,
                "batch {i}: {} < {before}",
                tx.capacity()
            );
            while conn.tx_pending() > 0 {
                conn.flush().unwrap();
                std::thread::yield_now();
            }
        }
        drop(conn);
        assert_eq!(reader.join().unwrap(), expect);
    }

    #[test]
    fn queued_buffers_arrive_in_order_and_are_recycled() {
        let (mut conn, client) = connected();
        let mut expect = Vec::new();
        let mut buf = Vec::new();
        // More data than a socket buffer holds, in buffers of odd sizes.
        for i in 0..200u32 {
            let len = 1 + (i as usize * 7919) % 70_000;
            buf.extend((0..len).map(|j| (i as usize + j) as u8));
            expect.extend_from_slice(&buf);
            conn.queue(&mut buf);
            assert!(buf.is_empty());
        }
        assert_eq!(conn.tx_pending(), expect.len());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut c = client;
            c.read_to_end(&mut got).unwrap();
            got
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while conn.tx_pending() > 0 {
            conn.flush().unwrap();
            assert!(
                std::time::Instant::now() < deadline,
                "flush made no progress"
            );
            std::thread::yield_now();
        }
        assert!(
            !conn.tx_free.is_empty(),
            "written buffers are kept for reuse"
        );
        assert!(conn.tx_free.len() <= TX_FREE_MAX);
        drop(conn);
        assert_eq!(reader.join().unwrap(), expect);
    }

    #[test]
    fn headers_and_data_ranges_arrive_in_order_and_buffers_come_back() {
        let (mut conn, client) = connected();
        let mut expect = Vec::new();
        let mut owned = Vec::new();
        let buffers = 300usize;
        for i in 0..buffers {
            // A header, then a buffer sent in up to three ranges with
            // headers and trailers between them, as Data-In PDUs are.
            let hdr: Vec<u8> = (0..48 + i % 7).map(|j| (i * 3 + j) as u8).collect();
            conn.put_bytes(&hdr);
            expect.extend_from_slice(&hdr);
            let len = 1 + (i * 7919) % 200_000;
            let buf: Vec<u8> = (0..len).map(|j| (i + j * 31) as u8).collect();
            let cuts = [0, len / 3, len / 2, len];
            // Every third buffer in pieces (a scatter-gather `DataBuf`).
            let data = match i % 3 {
                2 => sg_buf(&buf),
                _ => buf.clone().into(),
            };
            conn.put_data(data);
            for w in cuts.windows(2) {
                conn.put_range(w[0], w[1]);
                assert_eq!(
                    conn.last_range_crc32c(),
                    iscsi::digest::crc32c_parts(&[&buf[w[0]..w[1]]])
                );
                expect.extend_from_slice(&buf[w[0]..w[1]]);
                conn.put_bytes(&[0xee; 5]);
                expect.extend_from_slice(&[0xee; 5]);
            }
            if i % 10 == 0 {
                owned.clear();
                owned.extend_from_slice(&[i as u8; 1000]);
                expect.extend_from_slice(&owned);
                conn.queue(&mut owned);
            }
            // Write as we go, so segments complete while others are added.
            conn.flush().unwrap();
        }
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut c = client;
            c.read_to_end(&mut got).unwrap();
            got
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut returned = 0;
        while conn.tx_pending() > 0 {
            conn.flush().unwrap();
            returned += conn.take_sent().count();
            assert!(
                std::time::Instant::now() < deadline,
                "flush made no progress"
            );
            std::thread::yield_now();
        }
        returned += conn.take_sent().count();
        assert_eq!(returned, buffers, "every data buffer comes back once sent");
        assert_eq!(conn.take_all_data().count(), 0);
        drop(conn);
        assert_eq!(reader.join().unwrap(), expect);
    }

    /// The wire bytes of a Data-Out with `data` and, behind it, a NOP-Out.
    fn data_out_then_nop(enc: &iscsi::pdu::Encoder, data: &[u8]) -> (Vec<u8>, usize) {
        let mut b = iscsi::Bhs::new(iscsi::pdu::opcode::DATA_OUT);
        b.set_itt(7);
        b.set_buffer_offset(4096);
        let mut wire = Vec::new();
        enc.encode(
            &Pdu {
                bhs: b,
                ahs: Vec::new(),
                data: data.to_vec(),
            },
            &mut wire,
        );
        let first = wire.len();
        let mut nop = iscsi::Bhs::new(iscsi::pdu::opcode::NOP_OUT);
        nop.set_itt(8);
        enc.encode(
            &Pdu {
                bhs: nop,
                ahs: Vec::new(),
                data: Vec::new(),
            },
            &mut wire,
        );
        (wire, first)
    }

    /// Read until `take_direct` has the PDU, the client writing `rest`
    /// in pieces meanwhile.
    fn receive_direct(
        conn: &mut TcpConn,
        client: &mut std::net::TcpStream,
        rest: &[u8],
        mut dst: Option<&mut mempool::DataBuf>,
    ) -> Result<Pdu, PduError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut sent = 0;
        loop {
            if sent < rest.len() {
                let n = (rest.len() - sent).min(7001);
                client.write_all(&rest[sent..sent + n]).unwrap();
                sent += n;
            }
            assert!(conn.in_direct() || conn.direct_done.is_some());
            let place = dst.as_deref_mut().map(|d| {
                let n = d.len();
                mempool::DataDest::new(d, 0, n).unwrap()
            });
            conn.fill_direct(place).unwrap();
            if let Some(r) = conn.take_direct() {
                assert_eq!(sent, rest.len(), "the PDU ended before its bytes did");
                return r;
            }
            assert!(std::time::Instant::now() < deadline, "no progress");
        }
    }

    fn fill_until_pdu(conn: &mut TcpConn, decoder: &Decoder) -> Pdu {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            conn.fill(decoder).unwrap();
            if let Some(p) = conn.next_pdu(decoder).unwrap() {
                return p;
            }
            assert!(std::time::Instant::now() < deadline, "no PDU");
        }
    }

    #[test]
    fn a_large_segment_is_read_into_place_and_the_next_pdu_follows() {
        for (digests, sg) in [(false, false), (true, false), (false, true), (true, true)] {
            let (mut conn, mut client) = connected();
            let mut decoder = Decoder::new(256 * 1024);
            decoder.header_digest = digests;
            decoder.data_digest = digests;
            let enc = iscsi::pdu::Encoder {
                header_digest: digests,
                data_digest: digests,
            };
            // An odd length, so the segment has padding.
            let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
            let (wire, first) = data_out_then_nop(&enc, &data);
            let head = 48 + if digests { 4 } else { 0 } + 1000;
            client.write_all(&wire[..head]).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while conn.rx_buffered() < head {
                conn.fill(&decoder).unwrap();
                assert!(std::time::Instant::now() < deadline);
            }
            assert!(conn.next_pdu(&decoder).unwrap().is_none());
            let bhs = conn.direct_candidate(&decoder).expect("a candidate");
            assert_eq!(bhs.itt(), 7);
            // Into one buffer, or into four 32 KiB pieces.
            let mut dst = match sg {
                false => mempool::DataBuf::from(vec![0u8; data.len()]),
                true => sg_buf(&vec![0u8; data.len()]),
            };
            let n = dst.len();
            conn.begin_direct(&decoder, mempool::DataDest::new(&mut dst, 0, n).unwrap());
            let pdu = receive_direct(&mut conn, &mut client, &wire[head..], Some(&mut dst))
                .expect("digest matches");
            assert_eq!(pdu.bhs.itt(), 7);
            assert!(pdu.data.is_empty());
            assert!(dst == data, "the segment landed byte for byte");
            let counts = conn.take_rx_counts();
            assert_eq!(counts.copied, 1000);
            assert_eq!(counts.direct, data.len() as u64 - 1000);
            // Only a header was read behind the segment.
            assert!(conn.rx_buffered() <= wire.len() - first);
            let nop = fill_until_pdu(&mut conn, &decoder);
            assert_eq!(nop.bhs.opcode(), iscsi::pdu::opcode::NOP_OUT);
            assert_eq!(nop.bhs.itt(), 8);
            // Small PDUs after it come many per read again.
            let nops: Vec<u8> = wire[first..].repeat(50);
            client.write_all(&nops).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            conn.fill(&decoder).unwrap();
            assert_eq!(conn.rx_buffered(), nops.len(), "one read took them all");
        }
    }

    #[test]
    fn a_segment_received_into_place_has_its_digest_checked() {
        let (mut conn, mut client) = connected();
        let mut decoder = Decoder::new(256 * 1024);
        decoder.data_digest = true;
        let enc = iscsi::pdu::Encoder {
            header_digest: false,
            data_digest: true,
        };
        let data = vec![0x5au8; 65_536];
        let (mut wire, first) = data_out_then_nop(&enc, &data);
        wire[48 + 30_000] ^= 1;
        client.write_all(&wire[..48]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while conn.direct_candidate(&decoder).is_none() {
            conn.fill(&decoder).unwrap();
            assert!(std::time::Instant::now() < deadline);
        }
        let mut dst = sg_buf(&vec![0u8; data.len()]);
        let n = dst.len();
        conn.begin_direct(&decoder, mempool::DataDest::new(&mut dst, 0, n).unwrap());
        let r = receive_direct(&mut conn, &mut client, &wire[48..], Some(&mut dst));
        assert!(matches!(r, Err(PduError::DataDigest { .. })), "{r:?}");
        // The framing is intact: the next PDU decodes.
        let nop = fill_until_pdu(&mut conn, &decoder);
        assert_eq!(nop.bhs.itt(), 8);
        assert!(wire.len() > first);
    }

    #[test]
    fn a_segment_whose_place_is_gone_is_read_and_dropped() {
        let (mut conn, mut client) = connected();
        let decoder = Decoder::new(256 * 1024);
        let enc = iscsi::pdu::Encoder::default();
        let data = vec![0x11u8; 200_000];
        let (wire, _) = data_out_then_nop(&enc, &data);
        client.write_all(&wire[..48 + 5000]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while conn.direct_candidate(&decoder).is_none() || conn.rx_buffered() < 48 + 5000 {
            conn.fill(&decoder).unwrap();
            assert!(std::time::Instant::now() < deadline);
        }
        let mut dst = mempool::DataBuf::from(vec![0u8; data.len()]);
        let n = dst.len();
        conn.begin_direct(&decoder, mempool::DataDest::new(&mut dst, 0, n).unwrap());
        let pdu = receive_direct(&mut conn, &mut client, &wire[48 + 5000..], None).unwrap();
        assert_eq!(pdu.bhs.itt(), 7);
        assert!(
            dst[5000..].iter().all(|&b| b == 0),
            "nothing written once gone"
        );
        assert_eq!(conn.take_rx_counts().direct, 0);
        let nop = fill_until_pdu(&mut conn, &decoder);
        assert_eq!(nop.bhs.itt(), 8);
    }

    /// A heap-backed pool of `arena_bytes` in 128 KiB buffers, one core:
    /// room for the rings of the tests below.
    fn ring_pool(arena_bytes: usize) -> mempool::Pool {
        mempool::Pool::new(mempool::PoolConfig {
            arena_bytes,
            arena_limit_bytes: arena_bytes,
            cores: 1,
            backing: mempool::Backing::Heap,
            classes: vec![mempool::ClassConfig {
                buf_bytes: 128 << 10,
                weight: 1,
            }],
            ..mempool::PoolConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn small_segments_are_lent_from_a_pool_ring_whatever_holds_them() {
        let pool = ring_pool(8 << 20);
        let mut cache = pool.core_cache(0).unwrap();
        for digests in [false, true] {
            let (mut conn, mut client) = connected();
            let mut decoder = Decoder::new(8192);
            decoder.header_digest = digests;
            decoder.data_digest = digests;
            let enc = iscsi::pdu::Encoder {
                header_digest: digests,
                data_digest: digests,
            };
            // 300 PDUs of 4 KiB (each segment stamped with its number):
            // ten rings' worth, so the ring moves on while views of it are
            // held, and starts over in place once they are gone.
            let n = 300u32;
            let mut wire = Vec::new();
            for i in 0..n {
                let mut p = Pdu::new(iscsi::pdu::opcode::DATA_OUT);
                p.bhs.set_itt(i);
                p.data = (0..4096u32).map(|j| (i * 31 + j) as u8).collect();
                enc.encode(&p, &mut wire);
            }
            let writer = std::thread::spawn(move || client.write_all(&wire).map(|()| client));
            let mut held = Vec::new();
            let mut got = 0;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while got < n {
                conn.fill_with(&decoder, &mut |len| cache.alloc_ring(len))
                    .unwrap();
                while let Some(p) = conn
                    .next_pdu_placing(
                        &decoder,
                        &mut |_, _, lend| match lend() {
                            Some(v) => {
                                held.push(v);
                                true
                            }
                            None => false,
                        },
                        &mut Vec::with_capacity,
                    )
                    .unwrap()
                {
                    assert_eq!(p.bhs.itt(), got);
                    assert!(p.data.is_empty(), "lent, not copied");
                    got += 1;
                }
                // The first 100 views are held to the end (a slow
                // backstore), later ones let go at once.
                if held.len() > 100 {
                    held.truncate(100);
                }
                assert!(std::time::Instant::now() < deadline, "{got} PDUs");
            }
            drop(writer.join().unwrap().unwrap());
            for (i, v) in held.iter().enumerate() {
                assert!(v.is_ring_view());
                let want: Vec<u8> = (0..4096u32).map(|j| (i as u32 * 31 + j) as u8).collect();
                assert!(*v == want, "segment {i} intact");
            }
            let counts = conn.take_rx_counts();
            assert_eq!((counts.direct, counts.copied), (n as u64 * 4096, 0));
            drop(held);
            drop(conn);
            cache.flush();
            assert_eq!(pool.stats()[0].in_use, 0, "every ring went home");
        }
    }

    #[test]
    fn an_idle_connection_gives_its_ring_back_and_takes_one_when_data_comes() {
        let pool = ring_pool(4 << 20);
        let mut cache = pool.core_cache(0).unwrap();
        let (mut conn, mut client) = connected();
        let decoder = Decoder::new(8192);
        let enc = iscsi::pdu::Encoder::default();
        let pdu = |i: u32| {
            let mut p = Pdu::new(iscsi::pdu::opcode::DATA_OUT);
            p.bhs.set_itt(i);
            p.data = vec![i as u8; 4096];
            let mut w = Vec::new();
            enc.encode(&p, &mut w);
            w
        };
        let in_use = |cache: &mut mempool::CoreCache| {
            cache.flush();
            pool.stats()[0].in_use
        };
        // Reads and decodes one PDU, lending its data (held by the caller).
        let receive = |conn: &mut TcpConn, cache: &mut mempool::CoreCache| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                conn.fill_with(&decoder, &mut |len| cache.alloc_ring(len))
                    .unwrap();
                let mut view = None;
                let got = conn
                    .next_pdu_placing(
                        &decoder,
                        &mut |_, _, lend| {
                            view = lend();
                            view.is_some()
                        },
                        &mut Vec::with_capacity,
                    )
                    .unwrap();
                if let Some(p) = got {
                    return (p.bhs.itt(), view.expect("lent"));
                }
                assert!(std::time::Instant::now() < deadline);
            }
        };
        client.write_all(&pdu(1)).unwrap();
        let (itt, first) = receive(&mut conn, &mut cache);
        assert_eq!((itt, first[0]), (1, 1));
        assert_eq!(in_use(&mut cache), 1, "the ring");
        // Read from since the last look: kept. Then idle: given back, while
        // the view lent from it stays intact and holds its buffer.
        assert!(!conn.release_idle_ring());
        assert!(conn.release_idle_ring());
        assert!(!conn.release_idle_ring(), "nothing left to give");
        assert!(first.iter().all(|&b| b == 1));
        assert_eq!(in_use(&mut cache), 1, "held by the view");
        drop(first);
        assert_eq!(in_use(&mut cache), 0, "home with its last holder");
        // Data again: a ring again, and the PDU decoded whole from it.
        client.write_all(&pdu(2)).unwrap();
        let (itt, second) = receive(&mut conn, &mut cache);
        assert_eq!(itt, 2);
        assert!(second.is_ring_view() && second.iter().all(|&b| b == 2));
        assert_eq!(in_use(&mut cache), 1);
        // Undecoded bytes keep the ring however long nothing more comes.
        let w = pdu(3);
        client.write_all(&w[..100]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while conn.rx_buffered() < 100 {
            conn.fill_with(&decoder, &mut |len| cache.alloc_ring(len))
                .unwrap();
            assert!(std::time::Instant::now() < deadline);
        }
        assert!(!conn.release_idle_ring());
        assert!(!conn.release_idle_ring(), "a part of a PDU is waiting");
        client.write_all(&w[100..]).unwrap();
        drop(second);
        let (itt, third) = receive(&mut conn, &mut cache);
        assert_eq!((itt, third[0]), (3, 3));
    }
}
