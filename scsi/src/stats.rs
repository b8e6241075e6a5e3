//! I/O counters and a latency histogram, kept without locks or atomics.
//!
//! Each `IoCounters` has one owner: the reactor thread that owns the LUN
//! (or, for the engine's per-core counters, the core). Plain `u64` fields
//! are enough because nobody else writes them; recording a command costs a
//! few increments and never allocates. The control plane does not read the
//! owner's copy in place: it asks each reactor for a snapshot (the types
//! are `Copy`), and adds the snapshots of every core together with
//! `merge`. Counters only grow, so rates come from the difference of two
//! snapshots.

/// Buckets below 4 us, one per microsecond.
const LINEAR: usize = 4;
/// Buckets per power of two above that. Four bound a percentile's error
/// to 25% of its value, which is what tail-latency reports need.
const SUB_BITS: u32 = 2;
const SUB: usize = 1 << SUB_BITS;
/// Highest power of two with its own buckets: the last bucket ends at
/// 2^26 us (about 67 s), beyond any latency a working target shows.
const TOP_EXP: u32 = 25;
/// Number of buckets.
pub const BUCKETS: usize = LINEAR + (TOP_EXP as usize - 1) * SUB;
const LAST: usize = BUCKETS - 1;

fn bucket_of(us: u64) -> usize {
    if us < LINEAR as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    if exp > TOP_EXP {
        // Longer than the last bucket: it keeps them, and `max_us` says how
        // long they were.
        return LAST;
    }
    let sub = (us >> (exp - SUB_BITS)) as usize & (SUB - 1);
    LINEAR + (exp - SUB_BITS) as usize * SUB + sub
}

/// Bucket `i` holds latencies `lower(i) <= us < upper(i)`.
fn bucket_upper_us(i: usize) -> u64 {
    if i < LINEAR {
        return i as u64 + 1;
    }
    let group = (i - LINEAR) / SUB;
    let sub = (i - LINEAR) % SUB;
    ((SUB + sub + 1) as u64) << group
}

/// How long commands took, in buckets of microseconds: exact below 4 us,
/// then four buckets per power of two up to about 67 s. A fixed array, so
/// it can be copied as a snapshot and recorded into without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: [u64; BUCKETS],
    /// Exact sum for the mean. u128: a u64 of nanoseconds wraps after
    /// about 200 days at a million commands a second of 1 ms each.
    sum_ns: u128,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: [0; BUCKETS],
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, latency_ns: u64) {
        self.buckets[bucket_of(latency_ns / 1000)] += 1;
        self.sum_ns += latency_ns as u128;
        self.max_ns = self.max_ns.max(latency_ns);
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// A latency that at least `p` percent (0 to 100, clamped) of the
    /// recorded ones did not exceed: the upper bound of the bucket where
    /// that rank falls, in microseconds, but never more than `max_us`. 0
    /// when nothing was recorded.
    pub fn percentile(&self, p: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
        let rank = ((p * count as f64 / 100.0).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                if i == LAST {
                    break;
                }
                return bucket_upper_us(i).min(self.max_us());
            }
        }
        self.max_us()
    }

    /// Mean latency in microseconds (0 when nothing was recorded).
    pub fn mean_us(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum_ns as f64 / n as f64 / 1000.0,
        }
    }

    /// Longest latency recorded, rounded up to a whole microsecond so that
    /// it bounds the latencies like a bucket's upper bound does.
    pub fn max_us(&self) -> u64 {
        self.max_ns.div_ceil(1000)
    }

    /// Add `other`'s latencies to these (snapshots of several cores).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Each bucket as (upper bound in microseconds, latencies in it), for
    /// exporting the whole distribution. The last bucket also holds what
    /// is beyond it, so its bound is `u64::MAX`.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets.iter().enumerate().map(|(i, &n)| {
            let upper = if i == LAST {
                u64::MAX
            } else {
                bucket_upper_us(i)
            };
            (upper, n)
        })
    }
}

/// What a command counts as. Reads and writes are the commands that move
/// their data between the initiator and the medium, so `read_bytes /
/// reads` is an I/O size; commands that touch the medium without carrying
/// its data (WRITE SAME, UNMAP, COMPARE AND WRITE, VERIFY, SYNCHRONIZE
/// CACHE) are `Other`, like the SPC commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Other,
}

impl IoKind {
    pub fn from_opcode(op: u8) -> IoKind {
        match op {
            // READ (6/10/12/16)
            0x08 | 0x28 | 0xa8 | 0x88 => IoKind::Read,
            // WRITE (6/10/12/16), WRITE AND VERIFY (10/12/16), WRITE
            // ATOMIC (16)
            0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x9c => IoKind::Write,
            _ => IoKind::Other,
        }
    }
}

/// What one completed command adds to the counters: measured once by the
/// LUN and carried in its completion, so that the reactor of the
/// initiator's connection counts the same thing in its own counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoSample {
    pub kind: IoKind,
    /// Bytes moved (0 if the command failed).
    pub bytes: u64,
    pub failed: bool,
    pub latency_ns: u64,
}

/// Commands completed on one LUN (or one core), by kind, with the bytes
/// they moved and how long they took from submission to completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    pub reads: u64,
    pub writes: u64,
    /// Completed commands that are neither reads nor writes.
    pub other: u64,
    /// Data-in bytes of reads that succeeded, as far as the initiator
    /// takes them (at most its expected data transfer length).
    pub read_bytes: u64,
    /// Data-out bytes of writes that succeeded, as far as the initiator
    /// sent them.
    pub write_bytes: u64,
    /// Completions with a status other than GOOD or CONDITION MET (CHECK
    /// CONDITION, RESERVATION CONFLICT, BUSY, TASK SET FULL), of any kind.
    pub errors: u64,
    /// Commands that ended without a completion: aborted by task
    /// management, a reset, or the loss of their I_T nexus. Not in
    /// `reads`, `writes`, `other` or `latency`.
    pub aborted: u64,
    /// Backstore writes asked to be durable before they complete: FUA
    /// from the initiator, or every write while the write cache is off.
    pub durable_writes: u64,
    /// Backstore flushes: SYNCHRONIZE CACHE, and the flush after an
    /// UNMAP or WRITE SAME that deallocated or zeroed while the cache
    /// is off.
    pub flushes: u64,
    /// Every completion counted above, whatever its kind and status.
    pub latency: LatencyHistogram,
}

impl IoCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one completion measured as `s`.
    pub fn add(&mut self, s: &IoSample) {
        self.record(s.kind, s.bytes, s.failed, s.latency_ns);
    }

    /// Count one completion. `bytes` is what it moved (0 if it failed).
    pub fn record(&mut self, kind: IoKind, bytes: u64, failed: bool, latency_ns: u64) {
        match kind {
            IoKind::Read => {
                self.reads += 1;
                self.read_bytes += bytes;
            }
            IoKind::Write => {
                self.writes += 1;
                self.write_bytes += bytes;
            }
            IoKind::Other => self.other += 1,
        }
        self.errors += failed as u64;
        self.latency.record(latency_ns);
    }

    /// Commands completed (aborted ones excluded).
    pub fn completions(&self) -> u64 {
        self.reads + self.writes + self.other
    }

    /// Add `other`'s counts to these.
    pub fn merge(&mut self, other: &IoCounters) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.other += other.other;
        self.read_bytes += other.read_bytes;
        self.write_bytes += other.write_bytes;
        self.errors += other.errors;
        self.aborted += other.aborted;
        self.durable_writes += other.durable_writes;
        self.flushes += other.flushes;
        self.latency.merge(&other.latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1000;

    #[test]
    fn bucket_boundaries() {
        // Every bucket starts where the one before ends, with no gap.
        let mut lower = 0;
        for i in 0..BUCKETS {
            assert_eq!(bucket_of(lower), i, "lower bound of bucket {i}");
            let upper = bucket_upper_us(i);
            assert!(upper > lower);
            assert_eq!(bucket_of(upper - 1), i, "last value of bucket {i}");
            lower = upper;
        }
        assert_eq!(lower, 1 << 26);
        assert_eq!(bucket_of(lower), LAST);
        assert_eq!(bucket_of(u64::MAX), LAST);
        // Exact below 4 us, then 4 to a power of two.
        assert_eq!(
            (0..9).map(bucket_upper_us).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8, 10]
        );
        assert_eq!(bucket_of(1000), bucket_of(1023));
        assert_ne!(bucket_of(1023), bucket_of(1024));
    }

    #[test]
    fn buckets_are_within_a_quarter() {
        for i in LINEAR..BUCKETS {
            let lower = bucket_upper_us(i - 1);
            let width = bucket_upper_us(i) - lower;
            assert!(width * 4 <= lower, "bucket {i}: {lower} + {width}");
        }
    }

    #[test]
    fn empty() {
        let h = LatencyHistogram::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.percentile(50.0), 0);
        assert_eq!(h.percentile(100.0), 0);
        assert_eq!(h.mean_us(), 0.0);
        assert_eq!(h.max_us(), 0);
    }

    #[test]
    fn nanoseconds_round_into_microsecond_buckets() {
        let mut h = LatencyHistogram::new();
        h.record(0);
        h.record(999);
        assert_eq!(h.buckets().next(), Some((1, 2)));
        h.record(1000);
        assert_eq!(h.buckets().nth(1), Some((2, 1)));
        assert_eq!(h.max_us(), 1);
        h.record(1001);
        assert_eq!(h.max_us(), 2);
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = LatencyHistogram::new();
        for us in 1..=1000 {
            h.record(us * US);
        }
        assert_eq!(h.count(), 1000);
        // The 500th value is 500 us, in [448, 512).
        assert_eq!(h.percentile(50.0), 512);
        // The 900th: 900 in [896, 1024).
        assert_eq!(h.percentile(90.0), 1000);
        assert_eq!(h.percentile(99.0), 1000);
        assert_eq!(h.percentile(100.0), 1000);
        // The smallest: 1 us, in [1, 2).
        assert_eq!(h.percentile(0.0), 2);
        assert_eq!(h.percentile(0.1), 2);
        assert_eq!(h.percentile(0.2), 3);
        assert_eq!(h.mean_us(), 500.5);
        assert_eq!(h.max_us(), 1000);
        // Each reported percentile bounds the true one, by at most 25%.
        for p in [1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9] {
            let truth = (p * 10.0_f64).ceil() as u64;
            let got = h.percentile(p);
            assert!(
                got > truth && got <= truth + truth / 4 + 1,
                "p{p}: {got} vs {truth}"
            );
        }
    }

    #[test]
    fn percentiles_of_a_bimodal_distribution() {
        let mut h = LatencyHistogram::new();
        for _ in 0..99 {
            h.record(20 * US);
        }
        h.record(10_000 * US);
        assert_eq!(h.percentile(50.0), 24);
        assert_eq!(h.percentile(99.0), 24);
        assert_eq!(h.percentile(99.5), 10_000);
        assert_eq!(h.percentile(100.0), 10_000);
        // Out of range p is clamped.
        assert_eq!(h.percentile(250.0), 10_000);
        assert_eq!(h.percentile(-1.0), 24);
        assert_eq!(h.percentile(f64::NAN), 24);
    }

    #[test]
    fn beyond_the_last_bucket() {
        let mut h = LatencyHistogram::new();
        h.record(100 * US);
        h.record(3_600_000_000 * US);
        assert_eq!(h.buckets().last(), Some((u64::MAX, 1)));
        assert_eq!(h.percentile(100.0), 3_600_000_000);
        assert_eq!(h.max_us(), 3_600_000_000);
        h.record(u64::MAX);
        assert_eq!(h.max_us(), u64::MAX.div_ceil(1000));
    }

    #[test]
    fn merge_is_the_sum_of_its_parts() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        let mut all = LatencyHistogram::new();
        for i in 0..3000u64 {
            let ns = (i * 7919) % 50_000 * US + i;
            if i % 3 == 0 {
                a.record(ns);
            } else {
                b.record(ns);
            }
            all.record(ns);
        }
        let mut m = a;
        m.merge(&b);
        assert_eq!(m, all);
        assert_eq!(m.count(), 3000);
        assert_eq!(m.max_us(), a.max_us().max(b.max_us()));
        let mut e = LatencyHistogram::new();
        e.merge(&m);
        assert_eq!(e, m);
    }

    #[test]
    fn counters_by_kind() {
        assert_eq!(IoKind::from_opcode(0x28), IoKind::Read);
        assert_eq!(IoKind::from_opcode(0x8a), IoKind::Write);
        assert_eq!(IoKind::from_opcode(0x2e), IoKind::Write);
        assert_eq!(IoKind::from_opcode(0x41), IoKind::Other);
        assert_eq!(IoKind::from_opcode(0x12), IoKind::Other);
        let mut c = IoCounters::new();
        c.record(IoKind::Read, 4096, false, 10 * US);
        c.record(IoKind::Read, 0, true, 2 * US);
        c.record(IoKind::Write, 512, false, 30 * US);
        c.record(IoKind::Other, 0, false, 0);
        let mut d = c;
        d.aborted = 2;
        d.merge(&c);
        assert_eq!(
            (
                d.reads,
                d.writes,
                d.other,
                d.read_bytes,
                d.write_bytes,
                d.errors,
                d.aborted
            ),
            (4, 2, 2, 8192, 1024, 2, 2)
        );
        assert_eq!(d.completions(), 8);
        assert_eq!(d.latency.count(), 8);
        assert_eq!(d.latency.max_us(), 30);
    }
}
