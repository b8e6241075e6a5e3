//! iSCSI over TCP: the byte-stream side of a connection. It reads from a
//! non-blocking socket into a receive buffer, cuts PDUs out of it with the
//! connection's current `Decoder` (digests and segment limits change at the
//! end of login, so PDUs are taken one at a time), and writes queued wire
//! bytes with as few system calls as the socket allows: every PDU produced
//! while handling one batch of input goes out in one write.
//!
//! Data flow: socket -> `TcpConn::fill` -> `next_pdu` -> iscsi connection;
//! iscsi connection -> `queue`/`flush` -> socket.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use iscsi::pdu::{Decoder, Pdu, PduError, BHS_LEN};
use mio::net::TcpStream;

/// How much one `fill` call reads before yielding to other connections.
const READ_BUDGET_BYTES: usize = 4 * 1024 * 1024;
/// Initial receive buffer; it grows to the largest PDU the decoder allows.
const RX_INITIAL_BYTES: usize = 64 * 1024;
/// Above this much unsent output, the engine stops reading from the
/// connection until the initiator drains it.
pub const TX_BACKLOG_MAX_BYTES: usize = 16 * 1024 * 1024;

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
    rx: Vec<u8>,
    /// Undecoded bytes are `rx[rx_pos..rx_end]`.
    rx_pos: usize,
    rx_end: usize,
    /// Whole buffers waiting to be written, oldest first; `tx_pos` bytes of
    /// the front one are already out. Queuing a buffer moves it here rather
    /// than appending it to one growing buffer, so a burst of large
    /// responses costs no copy and no reallocation.
    txq: VecDeque<Vec<u8>>,
    tx_pos: usize,
    tx_pending: usize,
    /// Written-out buffers kept for reuse (their capacity is the point).
    tx_free: Vec<Vec<u8>>,
}

/// Buffers written by one `writev`.
const WRITEV_BUFS_MAX: usize = 64;
/// Empty buffers kept for reuse per connection.
const TX_FREE_MAX: usize = 8;
/// A recycled buffer larger than this is dropped instead of kept.
const TX_KEEP_CAPACITY_MAX: usize = 4 * 1024 * 1024;

impl TcpConn {
    pub fn new(stream: TcpStream) -> TcpConn {
        // Small PDUs (responses, R2Ts) must leave at once; batching is done
        // here, not by Nagle.
        let _ = stream.set_nodelay(true);
        TcpConn {
            stream,
            rx: Vec::new(),
            rx_pos: 0,
            rx_end: 0,
            txq: VecDeque::with_capacity(WRITEV_BUFS_MAX),
            tx_pos: 0,
            tx_pending: 0,
            tx_free: Vec::with_capacity(TX_FREE_MAX),
        }
    }

    /// Read what the socket has, up to the read budget.
    pub fn fill(&mut self, decoder: &Decoder) -> io::Result<Fill> {
        let max_pdu = BHS_LEN + 1024 + 8 + decoder.max_recv_data_len as usize + 4;
        let want_cap = max_pdu + RX_INITIAL_BYTES;
        // Grow once to hold a maximal PDU (the length stays at capacity so
        // reads never zero-fill on the hot path).
        if self.rx.len() < want_cap {
            self.rx.resize(want_cap, 0);
        }
        // Move the undecoded tail to the front when the free space runs low.
        if self.rx_pos > 0 && self.rx.len() - self.rx_end < RX_INITIAL_BYTES {
            self.rx.copy_within(self.rx_pos..self.rx_end, 0);
            self.rx_end -= self.rx_pos;
            self.rx_pos = 0;
        }
        let mut total = 0;
        loop {
            if self.rx_end == self.rx.len() || total >= READ_BUDGET_BYTES {
                return Ok(Fill::Read(total));
            }
            let space = self.rx.len() - self.rx_end;
            match self.stream.read(&mut self.rx[self.rx_end..]) {
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
                    // A short read from a stream socket means its receive
                    // queue is empty (epoll(7)); asking again would only
                    // return EAGAIN. New data raises a new edge.
                    if n < space {
                        return Ok(Fill::Read(total));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::Read(total)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
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
        let buf = &self.rx[self.rx_pos..self.rx_end];
        match decoder.decode_with(buf, data_buf) {
            Ok(Some((pdu, used))) => {
                self.rx_pos += used;
                if self.rx_pos == self.rx_end {
                    self.rx_pos = 0;
                    self.rx_end = 0;
                }
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
        self.tx_pending += bytes.len();
        let spare = self.tx_free.pop().unwrap_or_default();
        self.txq.push_back(std::mem::replace(bytes, spare));
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
            for (i, b) in self.txq.iter().take(WRITEV_BUFS_MAX).enumerate() {
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
            let front_left = self.txq[0].len() - self.tx_pos;
            if n < front_left {
                self.tx_pos += n;
                return;
            }
            n -= front_left;
            self.tx_pos = 0;
            let mut b = self
                .txq
                .pop_front()
                .expect("bytes written come from queued buffers");
            if self.tx_free.len() < TX_FREE_MAX && b.capacity() <= TX_KEEP_CAPACITY_MAX {
                b.clear();
                self.tx_free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_buffers_arrive_in_order_and_are_recycled() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut conn = TcpConn::new(TcpStream::from_std(server));
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
}
