//! iSCSI over TCP: the byte-stream side of a connection. It reads from a
//! non-blocking socket into a receive buffer, cuts PDUs out of it with the
//! connection's current `Decoder` (digests and segment limits change at the
//! end of login, so PDUs are taken one at a time), and writes queued wire
//! bytes with as few system calls as the socket allows: every PDU produced
//! while handling one batch of input goes out in one write.
//!
//! Data flow: socket -> `TcpConn::fill` -> `next_pdu` -> iscsi connection;
//! iscsi connection -> `queue`/`flush` -> socket.

use std::io::{self, Read, Write};

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
    tx: Vec<u8>,
    /// Bytes of `tx` already written.
    tx_pos: usize,
}

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
            tx: Vec::with_capacity(RX_INITIAL_BYTES),
            tx_pos: 0,
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
        let buf = &self.rx[self.rx_pos..self.rx_end];
        match decoder.decode(buf) {
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

    /// Queue wire bytes (taking `bytes`' contents).
    pub fn queue(&mut self, bytes: &mut Vec<u8>) {
        if self.tx_pos == self.tx.len() {
            self.tx.clear();
            self.tx_pos = 0;
            std::mem::swap(&mut self.tx, bytes);
        } else {
            self.tx.extend_from_slice(bytes);
            bytes.clear();
        }
    }

    pub fn tx_pending(&self) -> usize {
        self.tx.len() - self.tx_pos
    }

    /// Write queued bytes until done or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.tx_pos < self.tx.len() {
            match self.stream.write(&self.tx[self.tx_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx.clear();
        self.tx_pos = 0;
        // Don't keep a huge buffer around after a large read.
        if self.tx.capacity() > 4 * RX_INITIAL_BYTES * 16 {
            self.tx.shrink_to(RX_INITIAL_BYTES);
        }
        Ok(())
    }
}
