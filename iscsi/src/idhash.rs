//! A hasher for tables keyed by small integer ids that the target hands
//! out or the protocol carries (ITTs, task tags, connection ids), which
//! every PDU and completion looks up. SipHash's resistance to chosen keys
//! buys nothing there: a table holds one connection's or one reactor's
//! commands, bounded, so an initiator choosing colliding ITTs only slows
//! work it shares a table with, a little. A multiply with the high half
//! folded in spreads consecutive ids (the usual choice) over both the
//! bucket bits and the control bits.

use std::hash::{BuildHasher, Hasher};

#[derive(Debug, Clone, Copy, Default)]
pub struct BuildIdHasher;

#[derive(Debug, Default)]
pub struct IdHasher(u64);

impl BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64)
    }
    fn write_u64(&mut self, v: u64) {
        let h = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
