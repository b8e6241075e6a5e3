//! The security stage: AuthMethod selection and CHAP (RFC 7143 12.1.3,
//! RFC 1994), one-way or mutual.
//!
//! The target verifies the initiator before it answers a mutual challenge,
//! so an unauthenticated peer cannot use us as an oracle for the target
//! secret; and it refuses its own challenge reflected back at it.

use super::{ChapConfig, LoginContext, LoginStatus};
use crate::chap::{constant_time_eq, decode_binary, encode_hex, ChapAlgorithm};
use crate::login::negotiate::parse_number;
use crate::text;

#[derive(Debug, Default)]
enum Step {
    /// No AuthMethod negotiated yet.
    #[default]
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    AwaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    AwaitResponse {
        alg: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    /// Authentication complete (or none was needed).
    Done,
}

#[derive(Debug, Default)]
pub(super) struct Auth {
    step: Step,
    cfg: ChapConfig,
    /// The exchange runs to its end but fails there whatever the response
    /// (authentication before authorization, see `LoginContext::
    /// authenticate_first`).
    refused: bool,
}

fn get<'a>(keys: &[(&str, &'a str)], k: &str) -> Option<&'a str> {
    keys.iter().find(|(kk, _)| *kk == k).map(|(_, v)| *v)
}

impl Auth {
    pub(super) fn set_config(&mut self, cfg: ChapConfig) {
        self.cfg = cfg;
    }

    /// Fail the exchange at its end, as a wrong secret would.
    pub(super) fn refuse(&mut self) {
        self.refused = true;
    }

    /// Whether the security stage's work is over (CHAP verified, or
    /// AuthMethod=None agreed).
    pub(super) fn done(&self) -> bool {
        matches!(self.step, Step::Done)
    }

    /// Whether the target insists on CHAP from this initiator.
    pub(super) fn required(&self) -> bool {
        self.cfg.initiator.is_some()
    }

    /// Process the security keys of one request, in any order within it.
    pub(super) fn step(
        &mut self,
        ctx: &mut dyn LoginContext,
        keys: &[(&str, &str)],
        out: &mut Vec<u8>,
    ) -> Result<(), LoginStatus> {
        if keys.is_empty() {
            return match self.step {
                // A request without keys in the middle of CHAP leaves the
                // exchange with nothing to answer: the initiator gave up.
                Step::AwaitAlgorithm | Step::AwaitResponse { .. } => Err(LoginStatus::AUTH_FAILURE),
                _ => Ok(()),
            };
        }
        let has = |k: &str| get(keys, k).is_some();
        if let Step::Start = self.step {
            let Some(methods) = get(keys, "AuthMethod") else {
                // CHAP keys before any AuthMethod agreement.
                return Err(LoginStatus::INITIATOR_ERROR);
            };
            let allowed = if self.required() { "CHAP" } else { "None" };
            if !methods.split(',').any(|m| m == allowed) {
                return Err(LoginStatus::AUTH_FAILURE);
            }
            text::push(out, "AuthMethod", allowed);
            if allowed == "None" {
                self.step = Step::Done;
                if keys.len() > 1 {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                return Ok(());
            }
            self.step = Step::AwaitAlgorithm;
            if keys.len() == 1 {
                return Ok(());
            }
        } else if has("AuthMethod") {
            return Err(LoginStatus::INITIATOR_ERROR);
        }

        match std::mem::take(&mut self.step) {
            Step::AwaitAlgorithm => {
                let Some(list) = get(keys, "CHAP_A") else {
                    return Err(LoginStatus::AUTH_FAILURE);
                };
                if ["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"]
                    .iter()
                    .any(|k| has(k))
                {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                let alg = list
                    .split(',')
                    .filter_map(|a| parse_number(a).and_then(ChapAlgorithm::from_code))
                    .next()
                    .ok_or(LoginStatus::AUTH_FAILURE)?;
                let mut id = [0u8; 1];
                ctx.fill_random(&mut id);
                let mut challenge = vec![0u8; alg.challenge_len()];
                ctx.fill_random(&mut challenge);
                text::push(out, "CHAP_A", &alg.code().to_string());
                text::push(out, "CHAP_I", &id[0].to_string());
                text::push(out, "CHAP_C", &encode_hex(&challenge));
                self.step = Step::AwaitResponse {
                    alg,
                    id: id[0],
                    challenge,
                };
                Ok(())
            }
            Step::AwaitResponse { alg, id, challenge } => {
                if has("CHAP_A") {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
                self.verify(alg, id, &challenge, keys, out)?;
                self.step = Step::Done;
                Ok(())
            }
            Step::Done | Step::Start => {
                // Security keys after authentication finished: a
                // renegotiation, which RFC 7143 6.2 forbids.
                self.step = Step::Done;
                Err(LoginStatus::INITIATOR_ERROR)
            }
        }
    }

    fn verify(
        &self,
        alg: ChapAlgorithm,
        id: u8,
        challenge: &[u8],
        keys: &[(&str, &str)],
        out: &mut Vec<u8>,
    ) -> Result<(), LoginStatus> {
        let fail = LoginStatus::AUTH_FAILURE;
        let (user, secret) = self.cfg.initiator.as_ref().ok_or(fail)?;
        let name = get(keys, "CHAP_N").ok_or(fail)?;
        let resp = get(keys, "CHAP_R").and_then(decode_binary).ok_or(fail)?;
        let expected = alg.response(id, secret.as_bytes(), challenge);
        // Evaluate both comparisons so a wrong name and a wrong response
        // take the same path.
        let name_ok = constant_time_eq(name.as_bytes(), user.as_bytes());
        let resp_ok = constant_time_eq(&resp, &expected);
        if !(name_ok & resp_ok) || self.refused {
            return Err(fail);
        }
        match (get(keys, "CHAP_I"), get(keys, "CHAP_C")) {
            (None, None) => Ok(()),
            (Some(i), Some(c)) => {
                let (tuser, tsecret) = self.cfg.target.as_ref().ok_or(fail)?;
                // One secret for both directions would let a reflected
                // exchange authenticate the target to itself.
                if tsecret == secret {
                    return Err(fail);
                }
                let i = parse_number(i).filter(|n| *n <= 255).ok_or(fail)? as u8;
                let c = decode_binary(c).ok_or(fail)?;
                if c.as_slice() == challenge {
                    return Err(fail);
                }
                let r = alg.response(i, tsecret.as_bytes(), &c);
                text::push(out, "CHAP_N", tuser);
                text::push(out, "CHAP_R", &encode_hex(&r));
                Ok(())
            }
            _ => Err(fail),
        }
    }

    /// The initiator asks to leave the security stage. Ok(true): it may;
    /// Ok(false): CHAP is still under way, answer without the T bit.
    pub(super) fn can_leave(&mut self) -> Result<bool, LoginStatus> {
        match self.step {
            Step::Done => Ok(true),
            Step::Start if self.required() => Err(LoginStatus::AUTH_FAILURE),
            Step::Start => {
                self.step = Step::Done;
                Ok(true)
            }
            Step::AwaitAlgorithm | Step::AwaitResponse { .. } => Ok(false),
        }
    }
}
