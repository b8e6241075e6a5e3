//! The engine's side of `guard`: a connection's first Login Request is
//! checked with the failed-login throttle and held (a timer on the
//! reactor, no sleeping) or refused; how each login attempt ends is
//! reported back to it. Kept apart from `engine.rs`, which is big enough.

use std::cmp::Reverse;
use std::time::Instant;

use iscsi::login::LoginStatus;

use super::{lock, Attempt, Gate, Reactor};
use crate::guard::{Admit, HELD_LOGINS_MAX};

impl Reactor {
    /// A login failed: an authentication failure counts against the
    /// peer's address and the initiator's name (`guard`).
    pub(super) fn login_failed(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let attempt = c.attempt.take();
        let login = c.proto.login();
        let status = login.and_then(|l| l.failure());
        let name = login.and_then(|l| l.initiator_name());
        // The keys the attempt was admitted under (the same name, unless
        // the first request came in pieces).
        let admitted = attempt.as_ref().and_then(|a| a.name.as_deref());
        if status != Some(LoginStatus::AUTH_FAILURE) {
            if attempt.is_some() {
                lock(&self.sh.guard).ended(c.peer, admitted);
            }
            tracing::info!(id, ?status, initiator = name, "login refused");
            return;
        }
        let failures = lock(&self.sh.guard).failed(Instant::now(), c.peer, admitted.or(name));
        tracing::warn!(
            id,
            peer = %c.peer.map(|p| p.to_string()).unwrap_or_default(),
            initiator = name.unwrap_or(""),
            failures,
            "authentication failed"
        );
    }

    /// Check a connection's first Login Request with the failed-login
    /// throttle. True: go on now. False: it is held (the caller keeps the
    /// PDU) or, refused, the connection is closing.
    pub(super) fn gate_login(&mut self, id: u32, pdu: &iscsi::Pdu) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return false;
        };
        let name = initiator_name_in(&pdu.data);
        let now = Instant::now();
        let admit = lock(&self.sh.guard).admit(now, c.peer, name);
        if admit != Admit::Refuse {
            c.attempt = Some(Attempt {
                name: name.map(str::to_string),
            });
        }
        match admit {
            Admit::Now => {
                c.gate = Gate::Passed;
                true
            }
            Admit::At(at) if self.held_logins.len() < HELD_LOGINS_MAX => {
                tracing::debug!(id, peer = ?c.peer, initiator = name, wait_ms = at.saturating_duration_since(now).as_millis() as u64, "login held back after failed authentications");
                self.held_logins.push(Reverse((at, id)));
                false
            }
            Admit::At(_) | Admit::Refuse => {
                if matches!(admit, Admit::At(_)) {
                    // Admitted with a wait, but no room to hold it.
                    let mut g = lock(&self.sh.guard);
                    g.note_held_full();
                    if let Some(a) = c.attempt.take() {
                        g.ended(c.peer, a.name.as_deref());
                    }
                }
                tracing::debug!(id, peer = ?c.peer, initiator = name, "login refused after failed authentications");
                self.mark_closed(id, "login refused after failed authentications");
                false
            }
        }
    }

    /// Let held Login Requests whose time has come go on, then what their
    /// connections sent meanwhile.
    pub(super) fn release_held_logins(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((due, id))) = self.held_logins.peek() {
            if due > now {
                break;
            }
            self.held_logins.pop();
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let Gate::Held(held) = std::mem::replace(&mut c.gate, Gate::Passed) else {
                continue;
            };
            if c.closing {
                continue;
            }
            let (pdu, rdma) = *held;
            let now_ms = self.now_ms();
            self.feed_pdu(id, pdu, rdma, now_ms);
            self.handle_buffered(id);
            self.service_read(id);
        }
    }
}

/// The InitiatorName in the text of a first Login Request. Only whole
/// pairs count (a NUL after them): a request continued with the C bit may
/// end inside one. Not found: the attempt is judged by its peer address
/// alone (the login's failure still counts against the name).
fn initiator_name_in(data: &[u8]) -> Option<&str> {
    let whole = &data[..data.iter().rposition(|&b| b == 0)?];
    whole
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"InitiatorName="))
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiator_name_from_whole_pairs_only() {
        assert_eq!(
            initiator_name_in(b"TargetName=t\0InitiatorName=iqn.x:a\0AuthMethod=CHAP\0"),
            Some("iqn.x:a")
        );
        // Cut inside the name (a C-bit piece): not taken.
        assert_eq!(
            initiator_name_in(b"TargetName=t\0InitiatorName=iqn.x"),
            None
        );
        assert_eq!(initiator_name_in(b"InitiatorName=iqn.x:a"), None);
        assert_eq!(initiator_name_in(b""), None);
        assert_eq!(initiator_name_in(b"InitiatorName=\xff\0"), None);
    }
}
