//! Receiving a data segment straight into its final place.
//!
//! The receive ring serves small PDUs well: one read brings many commands.
//! Write data that came through it would be copied a second time, from
//! the ring into the command's buffer. So once the ring holds the header
//! of a PDU whose data segment is mostly still in the socket, and the
//! connection says where that segment belongs (`rx_direct_begin` of the
//! iSCSI core), the rest of the segment is read with `readv` straight
//! into that place, its padding and digest into a scratch trailer, and
//! just the next PDU's header into the ring, all in one system call. A
//! stream of large Data-Outs then costs one read per PDU and no copy of
//! payload beyond the kernel's. Segments with less than
//! `DIRECT_MIN_BYTES` still to come stay on the ring: copying a few
//! kilobytes is cheaper than the system calls saved by reading many
//! small PDUs at once.

use std::io::{self, IoSliceMut, Read};

use iscsi::digest::crc32c_append;
use iscsi::pdu::{pad_len, Decoder, Pdu, PduError, BHS_LEN};
use iscsi::Bhs;
use mempool::{DataDest, DATA_SEGMENTS_MAX};

use crate::{Fill, TcpConn, READ_BUDGET_BYTES};

/// A segment with fewer bytes than this still in the socket is read
/// through the ring.
pub const DIRECT_MIN_BYTES: usize = 16 * 1024;
/// Discarded data (its place gone) is read this much at a time.
const DISCARD_CHUNK_BYTES: usize = 16 * 1024;

/// A data segment being read into place.
#[derive(Debug)]
pub(crate) struct Direct {
    bhs: Bhs,
    data_len: usize,
    /// Data bytes received so far.
    got: usize,
    /// Padding, then the data digest when negotiated.
    trailer: [u8; 8],
    trailer_len: usize,
    trailer_got: usize,
    data_digest: bool,
    /// CRC32C of the data received so far.
    crc: u32,
    /// The length of a header (BHS and header digest) to read after the
    /// segment.
    header_len: usize,
}

/// Payload bytes put into place since the last `take_rx_counts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxCounts {
    /// Read by the socket straight into place.
    pub direct: u64,
    /// Copied there from the receive ring.
    pub copied: u64,
}

impl TcpConn {
    /// The header of a PDU at the front of the ring whose data segment
    /// should be received into place: no AHS, and at least
    /// `DIRECT_MIN_BYTES` of the segment still to come.
    pub fn direct_candidate(&self, decoder: &Decoder) -> Option<Bhs> {
        if self.direct.is_some() || self.direct_done.is_some() {
            return None;
        }
        let buf = self.rx.bytes(self.rx_pos, self.rx_end);
        let (bhs, fr, start) = decoder.header(buf).ok()??;
        let present = buf.len() - start;
        if fr.ahs_len != 0 || present >= fr.data_len || fr.data_len - present < DIRECT_MIN_BYTES {
            return None;
        }
        Some(bhs)
    }

    /// Start receiving the segment of the `direct_candidate` PDU into
    /// `dst` (exactly its DataSegmentLength bytes): what the ring holds
    /// of it is copied now, the rest comes through `fill_direct`.
    pub fn begin_direct(&mut self, decoder: &Decoder, mut dst: DataDest<'_>) {
        let buf = self.rx.bytes(self.rx_pos, self.rx_end);
        let Ok(Some((bhs, fr, start))) = decoder.header(buf) else {
            debug_assert!(false, "begin_direct without a candidate");
            return;
        };
        // The candidate was the last thing in the ring: its data is not
        // all there, so nothing follows it.
        let present = buf.len() - start;
        assert!(present < fr.data_len && dst.len() == fr.data_len);
        dst.copy_from(0, &buf[start..]);
        let crc = if decoder.data_digest {
            crc32c_append(0, &buf[start..])
        } else {
            0
        };
        self.rx_counts.copied += present as u64;
        self.rx_pos = self.rx_end;
        self.rx_restart_if_empty();
        self.direct = Some(Direct {
            bhs,
            data_len: fr.data_len,
            got: present,
            trailer: [0; 8],
            trailer_len: pad_len(fr.data_len) + decoder.data_digest_len(),
            trailer_got: 0,
            data_digest: decoder.data_digest,
            crc,
            header_len: BHS_LEN + decoder.header_digest_len(),
        });
    }

    /// A segment is being received into place: `fill_direct` reads, not
    /// `fill`.
    pub fn in_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Read the segment under way into `dst` (the same place
    /// `begin_direct` was given; None once it is gone: the rest is read
    /// and dropped), then its trailer and the next header. Stops when the
    /// segment is complete (its PDU is then ready in `take_direct`), the
    /// socket is empty, or the read budget is spent.
    pub fn fill_direct(&mut self, mut dst: Option<DataDest<'_>>) -> io::Result<Fill> {
        let mut total = 0;
        self.drained = false;
        let mut scratch = [0u8; DISCARD_CHUNK_BYTES];
        loop {
            let TcpConn {
                stream,
                rx,
                rx_end,
                direct,
                rx_counts,
                rx_active,
                ..
            } = self;
            let Some(d) = direct.as_mut() else {
                return Ok(Fill::Read(total));
            };
            if total >= READ_BUDGET_BYTES {
                return Ok(Fill::Read(total));
            }
            let placing = matches!(dst, Some(ref b) if b.len() == d.data_len);
            let header_room = d.header_len.min(rx.capacity() - *rx_end);
            // The rest of the segment (in the pieces of a scatter-gather
            // buffer, or a scratch chunk when dropping it), its trailer,
            // and room for the next header: one readv.
            let mut iov: [IoSliceMut<'_>; DATA_SEGMENTS_MAX + 2] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            let mut n_iov = 0;
            let data_room = match dst.as_mut() {
                Some(b) if placing => {
                    for piece in b.pieces_from(d.got) {
                        iov[n_iov] = IoSliceMut::new(piece);
                        n_iov += 1;
                    }
                    d.data_len - d.got
                }
                _ => {
                    let n = (d.data_len - d.got).min(DISCARD_CHUNK_BYTES);
                    iov[0] = IoSliceMut::new(&mut scratch[..n]);
                    n_iov = 1;
                    n
                }
            };
            iov[n_iov] = IoSliceMut::new(&mut d.trailer[d.trailer_got..d.trailer_len]);
            iov[n_iov + 1] = IoSliceMut::new(rx.bytes_mut(*rx_end, *rx_end + header_room));
            let want = data_room + (d.trailer_len - d.trailer_got) + header_room;
            let res = stream.read_vectored(&mut iov[..n_iov + 2]);
            let n = match res {
                Ok(0) => {
                    return Ok(if total == 0 {
                        Fill::Eof
                    } else {
                        Fill::Read(total)
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    return Ok(Fill::Read(total));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n;
            *rx_active = true;
            let nd = n.min(data_room);
            if d.data_digest {
                match dst.as_ref() {
                    Some(b) if placing => {
                        for piece in b.pieces(d.got, nd) {
                            d.crc = crc32c_append(d.crc, piece);
                        }
                    }
                    _ => d.crc = crc32c_append(d.crc, &scratch[..nd]),
                }
            }
            d.got += nd;
            let nt = (n - nd).min(d.trailer_len - d.trailer_got);
            d.trailer_got += nt;
            *rx_end += n - nd - nt;
            if placing {
                rx_counts.direct += nd as u64;
            }
            if d.got == d.data_len && d.trailer_got == d.trailer_len {
                self.finish_direct();
                return Ok(Fill::Read(total));
            }
            if n < want {
                // A short read: the socket is empty (see `fill`).
                self.drained = true;
                return Ok(Fill::Read(total));
            }
        }
    }

    /// The segment is in: check its digest and make its PDU ready.
    fn finish_direct(&mut self) {
        let Some(d) = self.direct.take() else {
            return;
        };
        let pad = pad_len(d.data_len);
        let mut result = Ok(Pdu {
            bhs: d.bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        });
        if d.data_digest {
            let expected = crc32c_append(d.crc, &d.trailer[..pad]);
            let got = u32::from_le_bytes(d.trailer[pad..pad + 4].try_into().unwrap());
            if got != expected {
                result = Err(PduError::DataDigest {
                    bhs: Box::new(d.bhs),
                    expected,
                    got,
                });
            }
        }
        self.direct_done = Some(result);
        // Large segments tend to follow each other: read the next header
        // alone, so that its data too can go straight into place.
        self.header_next = true;
    }

    /// The PDU whose segment `fill_direct` completed (with empty data:
    /// the data is in place), or its data digest error. Comes before any
    /// PDU in the ring.
    pub fn take_direct(&mut self) -> Option<Result<Pdu, PduError>> {
        self.direct_done.take()
    }

    /// Payload put into place since the last call.
    pub fn take_rx_counts(&mut self) -> RxCounts {
        std::mem::take(&mut self.rx_counts)
    }
}
