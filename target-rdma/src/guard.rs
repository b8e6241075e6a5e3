//! Holding up against hostile clients at login: failed authentications
//! are counted per peer address and per initiator name and slow further
//! attempts down; and one peer address gets only a share of the login
//! slots.
//!
//! The policy (also in README.md, "Failed logins and login floods"):
//!
//! - A failed authentication (Login Response 02/01) counts against the
//!   peer's IP address and against the InitiatorName it gave.
//! - The first `AUTH_FAILURES_FREE` consecutive failures of a key cost
//!   nothing. From then on, the next login attempt of that key (one TCP
//!   connection's first Login Request) is answered no earlier than
//!   `AUTH_DELAY_MIN` after the last failure, doubling with each further
//!   failure up to `AUTH_DELAY_MAX`: 100 ms after the 5th, 200 ms after
//!   the 6th, ..., 5 s from the 11th on.
//! - Attempts of a key that has failed are spaced out by that delay even
//!   when they come on many connections at once: attempts under way count
//!   as failures until they end, and each one admitted books the next
//!   slot. Before its first failure a key's parallel attempts all go at
//!   once (a host logging in many sessions), so a guesser's first wave is
//!   as wide as its connections (at most `LOGIN_CONNECTIONS_PER_PEER_MAX`
//!   per address), and only the first per name.
//!   One that would wait more than `AUTH_WAIT_MAX` is refused: its
//!   connection is closed without an answer.
//! - A successful login resets the counters of its peer address and of its
//!   initiator name. A key with no failure for `AUTH_ENTRY_TTL` is
//!   forgotten; the table holds at most `AUTH_KEYS_MAX` keys, the one with
//!   the oldest failure making room for a new one.
//! - A peer address is an IPv4 address or an IPv6 /64 (`peer_group`).
//! - While logging in, connections from one peer address take at most
//!   `LOGIN_CONNECTIONS_PER_PEER_MAX` of the engine's login slots; beyond
//!   that a new connection from it is closed at once.
//!
//! The waiting is done by the engine, which keeps the held Login Request
//! and the time it may go on (no thread sleeps); this module only decides,
//! from the `now` it is given.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Consecutive failures of a key that are not slowed down (typing a wrong
/// secret a few times is normal).
pub const AUTH_FAILURES_FREE: u32 = 5;
/// The delay after the `AUTH_FAILURES_FREE`th failure; it doubles with
/// each further one.
pub const AUTH_DELAY_MIN: Duration = Duration::from_millis(100);
/// The delay stops doubling here: guessing then runs at one attempt per
/// 5 s per key, while a legitimate initiator that got its secret right
/// waits no longer than this for its next attempt.
pub const AUTH_DELAY_MAX: Duration = Duration::from_secs(5);
/// The longest an attempt is held; a throttled key sending attempts faster
/// than its delay has the extra ones refused rather than queued for ever.
pub const AUTH_WAIT_MAX: Duration = Duration::from_secs(10);
/// A key without a failure for this long is forgotten.
pub const AUTH_ENTRY_TTL: Duration = Duration::from_secs(600);
/// Keys (peer addresses and initiator names) tracked at most.
pub const AUTH_KEYS_MAX: usize = 4096;
/// Login-phase connections one peer address may hold (of the engine's
/// `max_login_connections`, 1024): a sixteenth, so that one host stalling
/// logins leaves the others room.
pub const LOGIN_CONNECTIONS_PER_PEER_MAX: usize = 64;
/// Login Requests held back at once, at most; beyond that a throttled
/// attempt is refused.
pub const HELD_LOGINS_MAX: usize = 256;

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Peer(IpAddr),
    Initiator(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Consecutive failures.
    failures: u32,
    /// Attempts admitted and not yet ended. Once the key has failed they
    /// count as failures to come, or a guesser's attempts on many
    /// connections at once would all pass before their failures are
    /// known; before any failure they count for nothing, so that a host
    /// logging in many sessions at once (multipath, a hypervisor at boot)
    /// is never held up.
    in_flight: u32,
    /// The next attempt of this key is answered no earlier.
    next_at: Instant,
    /// The last failure or admission; what expiry and eviction go by.
    last_seen: Instant,
}

impl Entry {
    fn counted(&self) -> u32 {
        if self.failures == 0 {
            return 0;
        }
        self.failures.saturating_add(self.in_flight)
    }
}

/// Whether a login attempt may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Now,
    /// Hold its first Login Request until then.
    At(Instant),
    /// Close the connection without an answer.
    Refuse,
}

/// Counters for the stats file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuardStats {
    /// Failed authentications (02/01) since start.
    pub auth_failures: u64,
    /// Login attempts held back by the throttle.
    pub auth_delayed: u64,
    /// Login attempts refused (closed) because they would wait too long.
    pub auth_refused: u64,
    /// Keys (peer addresses, initiator names) tracked now.
    pub auth_keys: u64,
    /// Connections closed at accept: their peer had its share of the login
    /// slots.
    pub peer_share_refused: u64,
    /// Connections closed at accept: every login slot was taken.
    pub login_slots_refused: u64,
}

/// The failed-login table. See the module docs.
#[derive(Debug, Default)]
pub struct LoginGuard {
    entries: HashMap<Key, Entry>,
    stats: GuardStats,
}

/// What one peer is, for counting: an IPv4 address (also when it comes
/// IPv4-mapped), or an IPv6 /64, which is what one host usually gets and
/// can pick addresses from at will.
pub fn peer_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

fn keys(peer: Option<IpAddr>, name: Option<&str>) -> impl Iterator<Item = Key> + '_ {
    peer.map(|p| Key::Peer(peer_group(p))).into_iter().chain(
        name.filter(|n| !n.is_empty())
            .map(|n| Key::Initiator(n.to_string())),
    )
}

/// The wait before the next attempt of a key with `failures` failures.
pub fn delay_after(failures: u32) -> Duration {
    if failures < AUTH_FAILURES_FREE {
        return Duration::ZERO;
    }
    let doublings = (failures - AUTH_FAILURES_FREE).min(16);
    AUTH_DELAY_MIN
        .saturating_mul(1 << doublings)
        .min(AUTH_DELAY_MAX)
}

impl LoginGuard {
    /// A connection's first Login Request arrived, from `peer` with
    /// `name`: may it be answered now? An attempt admitted (now or later)
    /// is under way until `failed`, `succeeded` or `ended` is called for
    /// it with the same peer and name.
    pub fn admit(&mut self, now: Instant, peer: Option<IpAddr>, name: Option<&str>) -> Admit {
        let ks: Vec<Key> = keys(peer, name).collect();
        let mut at = now;
        let mut throttled = false;
        for k in &ks {
            if let Some(e) = self.live(k, now) {
                if e.counted() >= AUTH_FAILURES_FREE {
                    throttled = true;
                    at = at.max(e.next_at);
                }
            }
        }
        if throttled && at.saturating_duration_since(now) > AUTH_WAIT_MAX {
            self.stats.auth_refused += 1;
            return Admit::Refuse;
        }
        for k in ks {
            let e = self.entry(k, now);
            // Book the slot after this one, so that attempts on parallel
            // connections are spaced out too.
            if e.counted() >= AUTH_FAILURES_FREE {
                e.next_at = at + delay_after(e.counted());
            }
            e.in_flight = e.in_flight.saturating_add(1);
            e.last_seen = e.last_seen.max(now);
        }
        self.stats.auth_keys = self.entries.len() as u64;
        if at > now {
            self.stats.auth_delayed += 1;
            Admit::At(at)
        } else {
            Admit::Now
        }
    }

    /// An admitted attempt's authentication failed; returns the highest
    /// consecutive failure count among its keys (for the log).
    pub fn failed(&mut self, now: Instant, peer: Option<IpAddr>, name: Option<&str>) -> u32 {
        self.stats.auth_failures += 1;
        let mut most = 0;
        for k in keys(peer, name) {
            let e = self.entry(k, now);
            e.in_flight = e.in_flight.saturating_sub(1);
            e.failures = e.failures.saturating_add(1);
            e.last_seen = now;
            e.next_at = e.next_at.max(now + delay_after(e.failures));
            most = most.max(e.failures);
        }
        self.stats.auth_keys = self.entries.len() as u64;
        most
    }

    /// An admitted attempt ended otherwise (another refusal, the peer
    /// left): no longer under way, and not a failed authentication.
    pub fn ended(&mut self, peer: Option<IpAddr>, name: Option<&str>) {
        for k in keys(peer, name) {
            if let Some(e) = self.entries.get_mut(&k) {
                e.in_flight = e.in_flight.saturating_sub(1);
                if e.failures == 0 && e.in_flight == 0 {
                    self.entries.remove(&k);
                }
            }
        }
        self.stats.auth_keys = self.entries.len() as u64;
    }

    /// The live entry of `k`, made (evicting the oldest when the table is
    /// full) if there is none.
    fn entry(&mut self, k: Key, now: Instant) -> &mut Entry {
        if self.live(&k, now).is_none() {
            self.entries.remove(&k);
            if self.entries.len() >= AUTH_KEYS_MAX {
                self.evict_oldest();
            }
        }
        self.entries.entry(k).or_insert(Entry {
            failures: 0,
            in_flight: 0,
            next_at: now,
            last_seen: now,
        })
    }

    /// A login succeeded: its peer address and initiator name start over.
    pub fn succeeded(&mut self, peer: Option<IpAddr>, name: Option<&str>) {
        for k in keys(peer, name) {
            self.entries.remove(&k);
        }
        self.stats.auth_keys = self.entries.len() as u64;
    }

    /// Forget keys whose last failure is `AUTH_ENTRY_TTL` old.
    pub fn expire(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < AUTH_ENTRY_TTL);
        self.stats.auth_keys = self.entries.len() as u64;
    }

    /// An attempt `admit` delayed found no room among the held logins
    /// (`HELD_LOGINS_MAX`) and was refused instead.
    pub fn note_held_full(&mut self) {
        self.stats.auth_delayed = self.stats.auth_delayed.saturating_sub(1);
        self.stats.auth_refused += 1;
    }

    pub fn note_peer_share_refused(&mut self) {
        self.stats.peer_share_refused += 1;
    }

    pub fn note_login_slots_refused(&mut self) {
        self.stats.login_slots_refused += 1;
    }

    pub fn stats(&self) -> GuardStats {
        self.stats
    }

    fn live(&self, k: &Key, now: Instant) -> Option<&Entry> {
        self.entries
            .get(k)
            .filter(|e| now.saturating_duration_since(e.last_seen) < AUTH_ENTRY_TTL)
    }

    fn evict_oldest(&mut self) {
        // A scan of at most AUTH_KEYS_MAX entries, only when a new key
        // finds the table full: cheaper than keeping an order for it.
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.entries.remove(&k);
        }
    }
}

/// Whether a peer with `from_peer` connections in login may open another.
pub fn peer_may_log_in(from_peer: usize) -> bool {
    from_peer < LOGIN_CONNECTIONS_PER_PEER_MAX
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
    const MS: Duration = Duration::from_millis(1);

    /// `n` attempts, one after the other, each failing as soon as it is
    /// answered; returns when the last one failed.
    fn fail_n(g: &mut LoginGuard, mut now: Instant, n: u32, peer: IpAddr, name: &str) -> Instant {
        for _ in 0..n {
            match g.admit(now, Some(peer), Some(name)) {
                Admit::Now => {}
                Admit::At(t) => now = t,
                Admit::Refuse => panic!("refused"),
            }
            g.failed(now, Some(peer), Some(name));
        }
        now
    }

    #[test]
    fn delays_double_from_the_fifth_failure_and_stop_at_the_cap() {
        let want = [0, 0, 0, 0, 0, 100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for (f, ms) in want.iter().enumerate() {
            assert_eq!(delay_after(f as u32), Duration::from_millis(*ms), "{f}");
        }
        assert_eq!(delay_after(u32::MAX), AUTH_DELAY_MAX);
    }

    #[test]
    fn sequential_guesses_wait_the_doubling_delays() {
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..13 {
            let at = match g.admit(now, Some(A), Some("n")) {
                Admit::Now => now,
                Admit::At(t) => t,
                Admit::Refuse => panic!("refused"),
            };
            waits.push(at.duration_since(now).as_millis() as u64);
            now = at;
            g.failed(now, Some(A), Some("n"));
        }
        assert_eq!(
            waits,
            [0, 0, 0, 0, 0, 100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
        assert_eq!(g.stats().auth_failures, 13);
        assert_eq!(g.stats().auth_delayed, 8);
    }

    #[test]
    fn a_guesser_is_slowed_and_others_are_not() {
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        let t = fail_n(&mut g, t0, 5, A, "iqn.x:evil");
        // The 6th attempt waits 100 ms, whether it comes with the same
        // name, another name, or the same name from elsewhere.
        assert_eq!(
            g.admit(t, Some(A), Some("iqn.x:other")),
            Admit::At(t + 100 * MS)
        );
        g.ended(Some(A), Some("iqn.x:other"));
        let mut g2 = LoginGuard::default();
        let t2 = fail_n(&mut g2, t0, 5, A, "iqn.x:evil");
        assert_eq!(
            g2.admit(t2, Some(B), Some("iqn.x:evil")),
            Admit::At(t2 + 100 * MS)
        );
        // A different initiator from a different address goes at once.
        assert_eq!(g.admit(t, Some(B), Some("iqn.x:good")), Admit::Now);
        g.succeeded(Some(B), Some("iqn.x:good"));
        assert_eq!(g.admit(t, None, Some("iqn.x:good")), Admit::Now);
        g.succeeded(None, Some("iqn.x:good"));
        assert_eq!(g.stats().auth_failures, 5);
        // The guesser's address and name.
        assert_eq!(g.stats().auth_keys, 2);
    }

    #[test]
    fn parallel_logins_of_a_host_that_never_failed_all_go_at_once() {
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        let got: Vec<Admit> = (0..64).map(|_| g.admit(t0, Some(A), Some("n"))).collect();
        assert!(got.iter().all(|a| *a == Admit::Now), "{got:?}");
        for _ in 0..64 {
            g.succeeded(Some(A), Some("n"));
        }
        assert_eq!(g.stats().auth_delayed, 0);
    }

    #[test]
    fn attempts_under_way_count_once_the_key_has_failed() {
        // One failure, then 32 connections at once: the first five pass,
        // the rest are spaced out as if each had failed, and those beyond
        // AUTH_WAIT_MAX refused.
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        let t0 = fail_n(&mut g, t0, 1, A, "n");
        let got: Vec<Admit> = (0..32).map(|_| g.admit(t0, Some(A), Some("n"))).collect();
        assert!(got[..5].iter().all(|a| *a == Admit::Now), "{got:?}");
        let waits: Vec<u64> = got[5..]
            .iter()
            .map_while(|a| match a {
                Admit::At(t) => Some(t.duration_since(t0).as_millis() as u64),
                _ => None,
            })
            .collect();
        assert_eq!(waits, [100, 300, 700, 1500, 3100, 6300]);
        assert!(got[11..].iter().all(|a| *a == Admit::Refuse));
        assert_eq!(g.stats().auth_refused, 21);
        // Attempts that end without a failure free their count.
        let mut g = LoginGuard::default();
        for _ in 0..10 {
            assert_eq!(g.admit(t0, Some(A), Some("n")), Admit::Now);
            g.ended(Some(A), Some("n"));
        }
        assert_eq!(g.stats().auth_keys, 0);
    }

    #[test]
    fn parallel_attempts_of_a_capped_key_are_5_s_apart() {
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        let t = fail_n(&mut g, t0, 11, A, "n");
        // 5 s per attempt: the first at t + 5 s, the next at 10 s, the
        // third would wait 15 s > AUTH_WAIT_MAX.
        let before = g.stats().auth_delayed;
        assert_eq!(g.admit(t, Some(A), Some("n")), Admit::At(t + 5000 * MS));
        assert_eq!(g.admit(t, Some(A), Some("n")), Admit::At(t + 10_000 * MS));
        assert_eq!(g.admit(t, Some(A), Some("n")), Admit::Refuse);
        let s = g.stats();
        assert_eq!((s.auth_delayed - before, s.auth_refused), (2, 1));
    }

    #[test]
    fn success_resets_and_entries_expire() {
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        let t = fail_n(&mut g, t0, 8, A, "n");
        // The right secret: admitted after the window, then succeeds.
        let at = match g.admit(t, Some(A), Some("n")) {
            Admit::At(at) => at,
            other => panic!("{other:?}"),
        };
        assert_eq!(at, t + delay_after(8));
        g.succeeded(Some(A), Some("n"));
        assert_eq!(g.admit(at, Some(A), Some("n")), Admit::Now);
        assert_eq!(g.stats().auth_keys, 2);
        // One failure after the reset counts from one again.
        assert_eq!(g.failed(at, Some(A), Some("n")), 1);

        let t = fail_n(&mut g, at, 10, B, "m");
        let gone = t + AUTH_ENTRY_TTL;
        assert_eq!(g.admit(gone, Some(B), Some("m")), Admit::Now);
        assert_eq!(g.failed(gone, Some(B), Some("m")), 1);
        g.expire(gone + AUTH_ENTRY_TTL);
        assert_eq!(g.stats().auth_keys, 0);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest() {
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        for i in 0..AUTH_KEYS_MAX + 10 {
            g.failed(t0 + (i as u32) * MS, None, Some(&format!("iqn.x:{i}")));
        }
        assert_eq!(g.stats().auth_keys, AUTH_KEYS_MAX as u64);
        let now = t0 + Duration::from_secs(60);
        // The first names went; the last are still there.
        assert!(g.live(&Key::Initiator("iqn.x:0".into()), now).is_none());
        let last = format!("iqn.x:{}", AUTH_KEYS_MAX + 9);
        assert!(g.live(&Key::Initiator(last), now).is_some());
    }

    #[test]
    fn ipv6_peers_count_by_their_64_prefix() {
        let p = |s: &str| peer_group(s.parse().unwrap());
        assert_eq!(p("2001:db8:1:2:aaaa::1"), p("2001:db8:1:2:bbbb::7"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(p("::ffff:10.0.0.1"), p("10.0.0.1"));
        assert_eq!(p("10.0.0.1").to_string(), "10.0.0.1");
        let t0 = Instant::now();
        let mut g = LoginGuard::default();
        for i in 0..AUTH_FAILURES_FREE {
            let a: IpAddr = format!("2001:db8::{i:x}").parse().unwrap();
            g.failed(t0, Some(a), None);
        }
        let other: IpAddr = "2001:db8::ffff".parse().unwrap();
        assert!(matches!(g.admit(t0, Some(other), None), Admit::At(_)));
    }

    #[test]
    fn peer_share() {
        assert!(peer_may_log_in(0));
        assert!(peer_may_log_in(LOGIN_CONNECTIONS_PER_PEER_MAX - 1));
        assert!(!peer_may_log_in(LOGIN_CONNECTIONS_PER_PEER_MAX));
    }
}
